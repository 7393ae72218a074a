from shared.kit.service import serve

serve("partner_gateway")
