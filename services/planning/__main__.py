from shared.kit.service import serve

serve("planning")
