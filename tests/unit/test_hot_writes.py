"""Hot writes (``shared.kit.hot_writes``): a route served ahead of FastAPI answers every request
exactly as the documented route does, serves the plain ones itself, and a route it could serve
differently is refused when the app is made."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field

from shared.kit import my_number
from shared.kit.auth import Principal, Role, mint_token, require
from shared.kit.errors import Conflict
from shared.kit.hot_writes import NotHot
from shared.kit.http import ApiModel, create_app
from shared.kit.settings import Settings
from shared.kit.use_case import WriteRequest

SETTINGS = Settings(env="development", redis_url="", pg_dsn="postgresql://nobody@127.0.0.1:1/none")
MY_NUMBER = next(c for c in (f"12345678901{d}" for d in range(10)) if my_number.looks_like_my_number(c))

Writers = Annotated[Principal, Depends(require(Role.RESIDENT, Role.ADMIN))]


class Part(ApiModel):
    name: str = Field(max_length=20)
    count: int = 1


router = APIRouter(prefix="/v1")
#: Who ran the endpoint, per call: the hot write (``HotRoute``) or FastAPI's router.
SERVED_BY: list[str] = []


@router.post("/things/{thing_id}/parts", status_code=201)
async def add_part(thing_id: str, body: Part, principal: Writers, write: WriteRequest, request: Request) -> Response:
    SERVED_BY.append(type(request.scope["route"]).__name__)
    if body.name == "refuse":
        raise Conflict("this thing has that part already")
    if body.name == "boom":
        raise RuntimeError("a bug")
    if body.name == "away":
        raise ConnectionError("the database went away")
    return JSONResponse({
        "thing": thing_id, "name": body.name, "count": body.count, "caller": principal.subject,
        "operation": write.operation, "request": write.request, "key": write.idempotency_key,
        "correlation": write.correlation_id, "runtime": request.app.state.runtime,
    }, status_code=201)


def app_of(*, hot: bool) -> FastAPI:
    app = create_app(service="registration", settings=SETTINGS, routers=[router], hot_writes=[add_part] if hot else ())
    app.state.runtime = "the runtime"
    return app


@pytest.fixture
async def clients() -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    def client(app: FastAPI) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        return httpx.AsyncClient(transport=transport, base_url="http://kit.test")

    async with client(app_of(hot=True)) as hot, client(app_of(hot=False)) as plain:
        yield hot, plain


def token(role: Role, subject: str = "res-1") -> str:
    extra: dict[str, Any] = {"municipality": "304018"} if role is Role.STAFF else {}
    return mint_token(SETTINGS, subject=subject, role=role, **extra)


def headers(role: Role | None = Role.RESIDENT, /, **more: str) -> dict[str, str]:
    base = {"x-request-id": "req-1", "content-type": "application/json"}
    if role is not None:
        base["authorization"] = f"Bearer {token(role)}"
    return {**base, **more}


GOOD = json.dumps({"name": "wheel", "count": 4})

# (what, path, headers, body, served by the hot write)
CASES: list[tuple[str, str, dict[str, str], str, bool]] = [
    ("a resident's plain write", "/v1/things/t-1/parts", headers(), GOOD, True),
    ("an admin's", "/v1/things/t-1/parts", headers(Role.ADMIN), GOOD, True),
    ("under an Idempotency-Key", "/v1/things/t-1/parts", headers(**{"idempotency-key": "k-1"}), GOOD, True),
    ("a charset in the content type", "/v1/things/t-1/parts",
     headers(**{"content-type": "application/json; charset=utf-8"}), GOOD, True),
    ("a role the route refuses", "/v1/things/t-1/parts", headers(Role.STAFF), GOOD, False),
    ("no token", "/v1/things/t-1/parts", headers(None), GOOD, False),
    ("a forged token", "/v1/things/t-1/parts", headers(None, authorization="Bearer not.a.token"), GOOD, False),
    ("another scheme", "/v1/things/t-1/parts", headers(None, authorization=f"Basic {token(Role.RESIDENT)}"), GOOD,
     False),
    ("a body the model refuses", "/v1/things/t-1/parts", headers(), json.dumps({"name": "x" * 21}), False),
    ("a missing field", "/v1/things/t-1/parts", headers(), "{}", False),
    ("malformed JSON", "/v1/things/t-1/parts", headers(), '{"name": ', False),
    ("an empty body", "/v1/things/t-1/parts", headers(), "", False),
    ("a My Number in the body", "/v1/things/t-1/parts", headers(), json.dumps({"name": MY_NUMBER}), False),
    ("a My Number in the path", f"/v1/things/{MY_NUMBER}/parts", headers(), GOOD, False),
    ("a text body", "/v1/things/t-1/parts", headers(**{"content-type": "text/plain"}), GOOD, False),
    ("no content type", "/v1/things/t-1/parts", {k: v for k, v in headers().items() if k != "content-type"},
     GOOD, False),
    ("a query string", "/v1/things/t-1/parts?count=9", headers(), GOOD, False),
    ("a malformed Idempotency-Key", "/v1/things/t-1/parts", headers(**{"idempotency-key": "a key"}), GOOD, False),
    ("a refusal of the use case", "/v1/things/t-1/parts", headers(), json.dumps({"name": "refuse"}), True),
    ("a bug", "/v1/things/t-1/parts", headers(), json.dumps({"name": "boom"}), True),
    ("a transient fault", "/v1/things/t-1/parts", headers(), json.dumps({"name": "away"}), True),
    ("another route", "/v1/things/t-1/others", headers(), GOOD, False),
    ("a deeper path", "/v1/things/t-1/parts/p-1", headers(), GOOD, False),
]


@pytest.mark.parametrize(("what", "path", "sent_headers", "body", "served_hot"), CASES, ids=[c[0] for c in CASES])
async def test_a_hot_write_answers_as_the_documented_route(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient],
    what: str, path: str, sent_headers: dict[str, str], body: str, served_hot: bool,
) -> None:
    hot, plain = clients
    SERVED_BY.clear()
    hot_answer = await hot.post(path, headers=sent_headers, content=body)
    served_by = SERVED_BY[:]
    plain_answer = await plain.post(path, headers=sent_headers, content=body)
    assert hot_answer.status_code == plain_answer.status_code, what
    # FastAPI answers a bug from its outermost middleware, outside the one that adds the request id;
    # the hot write answers it inside, so that answer names the request too.
    unlike = {"content-length"} | ({"x-request-id"} if hot_answer.status_code == 500 else set())
    assert {k: v for k, v in hot_answer.headers.items() if k not in unlike} == {
        k: v for k, v in plain_answer.headers.items() if k not in unlike
    }
    assert hot_answer.content == plain_answer.content
    assert (served_by == ["HotRoute"]) is served_hot, served_by
    assert "HotRoute" not in SERVED_BY[len(served_by):]


async def test_the_write_carries_what_write_request_gives(clients: tuple[httpx.AsyncClient, httpx.AsyncClient]) -> None:
    hot, _ = clients
    answer = await hot.post(
        "/v1/things/t-9/parts", content=GOOD,
        headers=headers(**{"idempotency-key": "k-9", "x-correlation-id": "corr-9"}),
    )
    assert answer.status_code == 201
    assert answer.json() == {
        "thing": "t-9", "name": "wheel", "count": 4, "caller": "res-1",
        "operation": "POST /v1/things/{thing_id}/parts",
        "request": {"path": "/v1/things/t-9/parts", "query": "", "body": {"name": "wheel", "count": 4}},
        "key": "k-9", "correlation": "corr-9", "runtime": "the runtime",
    }


async def test_metrics_name_the_route_template(clients: tuple[httpx.AsyncClient, httpx.AsyncClient]) -> None:
    hot, _ = clients
    assert (await hot.post("/v1/things/t-1/parts", headers=headers(), content=GOOD)).status_code == 201
    metrics = (await hot.get("/metrics")).text
    assert 'route="/v1/things/{thing_id}/parts",status="201"' in metrics


def plan_of(build: Any) -> None:
    other = APIRouter(prefix="/v1")
    endpoint = build(other)
    create_app(service="registration", settings=SETTINGS, routers=[other, router], hot_writes=[endpoint])


def test_a_route_with_a_query_parameter_is_refused() -> None:
    def build(r: APIRouter) -> Any:
        @r.post("/queried/{thing_id}")
        async def queried(
            thing_id: str, body: Part, principal: Writers, force: Annotated[bool, Query()] = False
        ) -> Response:
            return Response()
        return queried

    with pytest.raises(NotHot, match="query"):
        plan_of(build)


def test_a_route_with_another_dependency_is_refused() -> None:
    async def rate_limited() -> None:
        return None

    def build(r: APIRouter) -> Any:
        @r.post("/limited", dependencies=[Depends(rate_limited)])
        async def limited(body: Part, principal: Writers) -> Response:
            return Response()
        return limited

    with pytest.raises(NotHot, match="dependencies"):
        plan_of(build)


def test_a_route_an_earlier_one_may_take_is_refused() -> None:
    def build(r: APIRouter) -> Any:
        @r.post("/things/special/parts")
        async def special(body: Part, principal: Writers) -> Response:
            return Response()
        return add_part  # ``router`` comes after ``other``: /things/special/parts matches first

    with pytest.raises(NotHot, match="comes first"):
        plan_of(build)


def test_a_route_with_a_typed_path_parameter_is_refused() -> None:
    def build(r: APIRouter) -> Any:
        @r.post("/numbered/{number}")
        async def numbered(number: int, body: Part, principal: Writers) -> Response:
            return Response()
        return numbered

    with pytest.raises(NotHot, match="path parameters"):
        plan_of(build)


def test_a_route_without_a_caller_is_refused() -> None:
    def build(r: APIRouter) -> Any:
        @r.post("/anonymous")
        async def anonymous(body: Part) -> Response:
            return Response()
        return anonymous

    with pytest.raises(NotHot, match="caller"):
        plan_of(build)


def test_a_route_whose_answer_fastapi_shapes_is_refused() -> None:
    def build(r: APIRouter) -> Any:
        @r.post("/shaped", response_model=Part)
        async def shaped(body: Part, principal: Writers) -> dict[str, Any]:
            return {"name": body.name, "secret": "dropped by the response model"}
        return shaped

    with pytest.raises(NotHot, match="Response"):
        plan_of(build)


def test_an_endpoint_no_route_serves_is_refused() -> None:
    async def nowhere(body: Part, principal: Writers) -> Response:
        return Response()

    with pytest.raises(NotHot, match="0 routes"):
        plan_of(lambda r: nowhere)


async def test_a_fault_while_checking_the_caller_is_answered_by_the_documented_route() -> None:
    # A session's sign-out is looked up in Redis; with Redis away both answer alike (never a bare 500).
    away = Settings(env="development", redis_url="redis://127.0.0.1:1/0", pg_dsn=SETTINGS.pg_dsn)
    signed_in = mint_token(away, subject="res-1", role=Role.RESIDENT, session="s-1")
    answers = []
    SERVED_BY.clear()
    for hot in (True, False):
        app = create_app(service="registration", settings=away, routers=[router], hot_writes=[add_part] if hot else ())
        app.state.runtime = "the runtime"
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://kit.test") as client:
            answers.append(await client.post(
                "/v1/things/t-1/parts", content=GOOD, headers={**headers(None), "authorization": f"Bearer {signed_in}"},
            ))
    assert answers[0].status_code == answers[1].status_code == 503
    assert answers[0].content == answers[1].content
    assert SERVED_BY == []
