from services.partner_gateway.main import create_app
from shared.kit.service import serve

serve(create_app(), "partner_gateway")
