"""Every service serves its own Swagger UI and ReDoc (no CDN: closed municipal networks), and its
OpenAPI document asks for the bearer token on every operation but the public ones."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from html.parser import HTMLParser
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi import FastAPI

from shared.contracts.topics import FRONTS, SERVICES
from shared.kit.settings import Settings

#: Operations anyone may call without a credential: the kit's operations routes, and the routes a
#: service makes public on purpose (method, path).
KIT_PUBLIC = {("get", "/healthz"), ("get", "/readyz"), ("get", "/metrics")}
PUBLIC: dict[str, set[tuple[str, str]]] = {service: set() for service in SERVICES} | {
    # the identity provider's protocol endpoints: OIDC discovery, keys, OAuth 2.0 token and revocation
    # (authenticated by their own form parameters)
    "identity": {
        ("get", "/.well-known/openid-configuration"), ("get", "/jwks.json"), ("post", "/oauth/token"),
        ("post", "/oauth/revoke"),
    },
    # each municipality's catalogue of designated activities (rate-limited per client IP)
    "registration": {("get", "/v1/public/municipalities/{code}/activities")},
    # adopted plans and designated support corporations (rate-limited per client IP)
    "planning": {
        ("get", "/v1/public/plans"), ("get", "/v1/public/plans/{plan_id}"), ("get", "/v1/public/corporations"),
    },
    # the national picture with counts of people under 10 withheld, and the KPIs (rate-limited per client IP)
    "insights": {
        ("get", "/v1/public/insights/registrations"), ("get", "/v1/public/insights/relationship-population"),
        ("get", "/v1/public/insights/kpis"),
    },
    "listings": {("get", "/v1/public/listings"), ("get", "/v1/public/listings/{listing_id}")},
}
#: Operations that also take another credential than the bearer token (the scheme's name).
OTHER_SCHEMES = {
    ("partner_gateway", "get", "/v1/certificates/{number}"): "apiKey",
    ("partner_gateway", "get", "/v1/feed"): "apiKey",  # the HTTP feed: API key or partner token
    ("partner_gateway", "get", "/v1/keys/{kid}"): "apiKey",  # a partner's key to its sealed member numbers
}


def build(service: str) -> FastAPI:
    main = importlib.import_module(f"services.{service}.main")
    create_app: Callable[[Settings], FastAPI] = main.create_app
    # Building an app connects to nothing, and these requests need no backend: no lifespan runs.
    return create_app(Settings(pg_dsn="postgresql://nobody@127.0.0.1:1/none", redis_url="redis://127.0.0.1:1/0"))


class Assets(HTMLParser):
    """Every URL a page loads: scripts, style sheets, icons, and attributes naming a URL."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href", "spec-url") and value:
                self.urls.append(value)


def page_urls(html: str) -> list[str]:
    parser = Assets()
    parser.feed(html)
    # Also URLs written into inline scripts (Swagger UI's ``url: '/openapi.json'``).
    return parser.urls + re.findall(r"""(?:https?:)?//[^\s'"<>)]+""", re.sub(r"<!--.*?-->", "", html, flags=re.S))


@pytest.mark.parametrize("service", SERVICES)
async def test_docs_pages_load_only_their_own_assets(service: str) -> None:
    app = build(service)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://docs.test") as client:
        expected = {
            "/docs": {"/openapi.json", "/docs/static/swagger-ui/swagger-ui-bundle.js",
                      "/docs/static/swagger-ui/swagger-ui.css", "/docs/static/swagger-ui/favicon-32x32.png"},
            "/redoc": {"/openapi.json", "/docs/static/redoc/redoc.standalone.js",
                       "/docs/static/swagger-ui/favicon-32x32.png"},
        }
        for page, assets in expected.items():
            response = await client.get(page)
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
            urls = page_urls(response.text)
            foreign = [url for url in urls if urlsplit(url).netloc or url.startswith("//") or not url.startswith("/")]
            assert foreign == [], f"{service} {page} loads from elsewhere: {foreign}"
            assert assets <= set(urls) | set(re.findall(r"url: '([^']+)'", response.text)), (page, urls)
        assert "persistAuthorization\": true" in (await client.get("/docs")).text

        kinds = {
            "/docs/static/swagger-ui/swagger-ui-bundle.js": ("javascript", b"SwaggerUIBundle", 1_000_000),
            "/docs/static/swagger-ui/swagger-ui.css": ("text/css", b".swagger-ui", 100_000),
            "/docs/static/swagger-ui/favicon-32x32.png": ("image/png", b"\x89PNG", 100),
            "/docs/static/redoc/redoc.standalone.js": ("javascript", b"Redoc", 1_000_000),
        }
        for path, (content_type, marker, size) in kinds.items():
            response = await client.get(path)
            assert response.status_code == 200, path
            assert content_type in response.headers["content-type"], (path, response.headers["content-type"])
            assert marker in response.content and len(response.content) >= size, path
        assert (await client.get("/docs/static/redoc/nothing.js")).status_code == 404
        assert (await client.get("/docs/static/../settings.py")).status_code == 404
        assert (await client.get("/openapi.json")).status_code == 200


# A front (the console) has no API operation: its pages take a session cookie, not a bearer token.
@pytest.mark.parametrize("service", [s for s in SERVICES if s not in FRONTS])
def test_every_operation_but_the_public_ones_asks_for_the_bearer_token(service: str) -> None:
    document = build(service).openapi()
    assert document["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
        "description": document["components"]["securitySchemes"]["bearer"]["description"],
    }
    public = KIT_PUBLIC | PUBLIC[service]
    seen: set[tuple[str, str]] = set()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            seen.add((method, path))
            security = operation.get("security", [])
            if (method, path) in public:
                assert not security, f"{service} {method.upper()} {path} is public but asks for {security}"
                continue
            schemes = {name for requirement in security for name in requirement}
            other = OTHER_SCHEMES.get((service, method, path))
            assert schemes == {"bearer"} | ({other} if other else set()), (
                f"{service} {method.upper()} {path}: security {security}"
            )
    assert public <= seen, f"public operations not in the document: {public - seen}"
    assert "/docs" not in document["paths"] and "/redoc" not in document["paths"]
