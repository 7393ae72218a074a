from services.donation.main import create_app
from shared.kit.service import serve

serve(create_app(), "donation")
