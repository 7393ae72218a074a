"""The HTTP kit: problem+json for every refusal, auth, body guard, operations endpoints."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import httpx
import pytest
from fastapi import APIRouter, Depends

from shared.kit.auth import Principal, Role, require
from shared.kit.errors import Conflict
from shared.kit.http import ApiModel, create_app
from shared.kit.settings import Settings
from tests.support import bearer, service_client

#: The test app's service name: its tokens must name it as their audience.
KIT = "kit-test"

class Order(ApiModel):
    municipality_code: str
    count: int


class AlreadyOrdered(Conflict):
    code = "already-ordered"


def build_app(settings: Settings):  # type: ignore[no-untyped-def]
    router = APIRouter(prefix="/v1")

    @router.post("/municipalities/{code}/orders", status_code=201)
    async def order(
        code: str, body: Order, principal: Annotated[Principal, Depends(require(Role.STAFF, Role.ADMIN))]
    ) -> dict[str, int]:
        principal.ensure_municipality(code)
        if body.count == 13:
            raise AlreadyOrdered("order 13 exists already", order=13, headers={"Retry-After": "5"})
        if body.count == 666:
            raise RuntimeError("a bug")
        return {"count": body.count}

    return create_app(service=KIT, settings=settings.model_copy(update={"max_body_bytes": 1024}),
                      routers=[router])


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with service_client(build_app(settings)) as client:
        yield client


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, object] = response.json()
    assert body["status"] == status and body["code"] == code and body["title"]
    return body


async def test_a_valid_request_passes(client: httpx.AsyncClient, settings: Settings) -> None:
    staff = bearer(settings, "staff", services=[KIT], municipality="304018")
    response = await client.post("/v1/municipalities/304018/orders", json={"municipality_code": "304018", "count": 2},
                                 headers=staff)
    assert response.status_code == 201 and response.json() == {"count": 2}


async def test_bad_bodies_are_4xx_problems_never_500(client: httpx.AsyncClient, settings: Settings) -> None:
    staff = bearer(settings, "staff", services=[KIT], municipality="304018")
    url = "/v1/municipalities/304018/orders"
    assert_problem(await client.post(url, content=b'{"count": ', headers={**staff, "content-type": "application/json"}),
                   400, "malformed-json")
    body = assert_problem(await client.post(url, json={"municipality_code": "304018", "count": 1, "extra": 1},
                                            headers=staff), 422, "invalid-request")
    assert "extra" in str(body["detail"])
    assert_problem(await client.post(url, json={"municipality_code": "304018", "count": "many"}, headers=staff),
                   422, "invalid-request")
    assert_problem(await client.post(url, content=b"count=1", headers={**staff, "content-type": "text/plain"}),
                   415, "unsupported-media-type")
    assert_problem(await client.post(url, json={"municipality_code": "x" * 2000, "count": 1}, headers=staff),
                   413, "body-too-large")
    assert_problem(await client.get("/v1/nowhere"), 404, "not-found")


async def test_what_postgresql_cannot_store_is_a_422_naming_where_it_is(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    staff = bearer(settings, "staff", services=[KIT], municipality="304018")
    url = "/v1/municipalities/304018/orders"
    for order, where in [
        ({"municipality_code": "3040\x0018", "count": 1}, ["body", "municipality_code"]),
        ({"municipality_code": "304018\n1", "count": 1}, ["body", "municipality_code"]),
        ({"municipality_code": "304018", "count": 2**63}, ["body", "count"]),
        ({"municipality_code": "304018", "count": -(2**63) - 1}, ["body", "count"]),
    ]:
        body = assert_problem(await client.post(url, json=order, headers=staff), 422, "invalid-request")
        errors = body["errors"]
        assert isinstance(errors, list) and [error["loc"] for error in errors] == [where], body
        assert ".".join(where) in str(body["detail"])
    # the path and the query are refused before any route (or its auth) sees them
    body = assert_problem(await client.post("/v1/municipalities/3040%0018/orders", json={}), 422, "invalid-request")
    assert body["errors"] == [{"loc": ["path"], "msg": "control characters are not allowed (U+0000)",
                               "type": "control_character"}]
    body = assert_problem(await client.get("/healthz", params={"probe": "a\x00"}), 422, "invalid-request")
    assert body["errors"] == [{"loc": ["query", "probe"], "msg": "control characters are not allowed (U+0000)",
                               "type": "control_character"}]
    assert_problem(await client.get("/healthz?probe=%C2%85"), 422, "invalid-request")
    assert (await client.get("/healthz", params={"probe": "山田 花子"})).status_code == 200
    ok = await client.post(url, json={"municipality_code": "304018", "count": 2**63 - 1}, headers=staff)
    assert ok.status_code == 201 and ok.json() == {"count": 2**63 - 1}


async def test_domain_errors_keep_their_code_and_unexpected_errors_are_a_500_problem(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    staff = bearer(settings, "staff", services=[KIT], municipality="304018")
    url = "/v1/municipalities/304018/orders"
    response = await client.post(url, json={"municipality_code": "304018", "count": 13}, headers=staff)
    body = assert_problem(response, 409, "already-ordered")
    assert body["order"] == 13 and response.headers["retry-after"] == "5"
    assert_problem(await client.post(url, json={"municipality_code": "304018", "count": 666}, headers=staff),
                   500, "internal-error")


async def test_auth_401_without_a_token_403_for_the_wrong_role_or_municipality(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    url = "/v1/municipalities/304018/orders"
    order = {"municipality_code": "304018", "count": 1}
    assert_problem(await client.post(url, json=order), 401, "unauthenticated")
    assert_problem(await client.post(url, json=order, headers={"Authorization": "Bearer not.a.jwt"}),
                   401, "unauthenticated")
    forged = bearer(settings.model_copy(update={"jwt_secret": "another-secret-that-is-long-enough-0123"}), "admin")
    assert_problem(await client.post(url, json=order, headers=forged), 401, "unauthenticated")
    resident = bearer(settings, "resident", services=[KIT])
    assert_problem(await client.post(url, json=order, headers=resident), 403, "forbidden")
    partner = bearer(settings, "partner", services=[KIT], partner="jal")
    assert_problem(await client.post(url, json=order, headers=partner), 403, "forbidden")
    other_town = bearer(settings, "staff", services=[KIT], municipality="131016")
    assert_problem(await client.post(url, json=order, headers=other_town), 403, "forbidden")
    assert (await client.post(url, json=order, headers=bearer(settings, "admin", services=[KIT]))).status_code == 201


async def test_operations_endpoints(client: httpx.AsyncClient, settings: Settings) -> None:
    assert (await client.get("/healthz")).json()["status"] == "ok"
    assert (await client.get("/readyz")).json() == {"ready": True, "checks": {}}
    await client.post("/v1/municipalities/304018/orders", json={"municipality_code": "304018", "count": 1},
                      headers=bearer(settings, "admin", services=[KIT]))
    metrics = (await client.get("/metrics")).text
    assert 'http_requests_total{method="POST",route="/v1/municipalities/{code}/orders",status="201"} 1.0' in metrics
    openapi = (await client.get("/openapi.json")).json()
    assert "/v1/municipalities/{code}/orders" in openapi["paths"]


def test_extras_may_not_overwrite_the_problem_members() -> None:
    with pytest.raises(ValueError, match="status"):
        AlreadyOrdered("x", status="shipped")


async def test_a_database_outage_is_a_503_problem_with_retry_after(settings: Settings) -> None:
    import asyncpg

    router = APIRouter()

    @router.get("/v1/down")
    async def down() -> None:
        await asyncpg.connect("postgresql://postgres@127.0.0.1:1/postgres")  # nothing listens on port 1

    app = create_app(service=KIT, settings=settings, routers=[router])
    async with service_client(app) as client:
        response = await client.get("/v1/down")
    assert_problem(response, 503, "service-unavailable")
    assert response.headers["retry-after"] == "1"
