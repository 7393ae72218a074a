"""One small FastAPI app factory for every service.

Every app has ``/healthz`` (the process answers), ``/readyz`` (its database and broker answer),
``/metrics`` (Prometheus) and OpenAPI; every error is ``application/problem+json`` (RFC 9457)
with a machine-readable ``code``. A malformed body, an unknown field or a wrong type is a 4xx
problem, never a 500. The request id / correlation id is bound to every log line of a request.

Input PostgreSQL cannot store is refused as a 422 before any handler sees it: every str of a request
body (``ApiModel``) is free of control characters (NUL above all: ``text`` cannot hold it) unless
its field opts in (``MultilineText``), every int fits a ``bigint`` unless the field bounds it
tighter, and no path or query string carries a control character (``BodyGuard``).

No request value may hold a My Number (``shared.kit.my_number``): every scalar of an ``ApiModel``
(str, int, date, enum...: whatever the field's type, the raw JSON value is looked at before the
field's own rules) and every string, int and member name of its free JSON, every query name and
value and every path segment; a field opts out only with ``MyNumberExempt``. The answer is a 422
``my-number-not-allowed`` naming where (``errors[].loc``), never the value.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, cast
from urllib.parse import parse_qsl, unquote

import structlog
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram
from pydantic import BaseModel, ConfigDict, Field, GetCoreSchemaHandler, StrictInt
from pydantic_core import CoreSchema, PydanticCustomError, core_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from structlog.contextvars import bind_contextvars, reset_contextvars

from shared.kit import tracing
from shared.kit.auth import TokenVerifier
from shared.kit.errors import TRANSIENT_ERRORS, DomainError, is_transient
from shared.kit.metrics import AppRegistry, Mirror, process_exited
from shared.kit.my_number import (
    MyNumberNotAllowed,
    find_my_number,
    looks_like_my_number,
    might_hold_my_number,
    refusal_detail,
    scalar_looks_like_my_number,
)
from shared.kit.rate_limit import RateLimiter
from shared.kit.settings import Settings

log = structlog.get_logger(__name__)

PROBLEM_JSON = "application/problem+json"
_BODY_METHODS = {"POST", "PUT", "PATCH"}
_FORM = b"application/x-www-form-urlencoded"


#: PostgreSQL's ``bigint`` and ``integer``: an int outside them is a 422, never a database error.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
#: An int bound for an ``integer`` column (every other int of a request body is bound to ``bigint``).
Int32 = Annotated[int, Field(ge=INT32_MIN, le=INT32_MAX)]
#: The most yen (or miles) one request may move: ¥10 billion is far above any donation or budget
#: top-up, and sums of such amounts stay far from a ``bigint``'s limit and exact as JSON numbers (2^53).
MAX_AMOUNT = 10**10
#: An amount of yen or miles in a request body: an int (never ``1.5``, ``"100"`` or ``true``) up to
#: MAX_AMOUNT. Whether it must be positive is the domain's rule, with its own problem code.
Amount = Annotated[StrictInt, Field(le=MAX_AMOUNT)]

#: C0 controls (NUL among them), DEL and C1 controls.
_CONTROLS = "".join(map(chr, [*range(0x20), *range(0x7F, 0xA0)]))
_CONTROL = re.compile(f"[{re.escape(_CONTROLS)}]")
_ALLOWED_CONTROLS = "nichiiki_allowed_controls"


@dataclass(frozen=True, slots=True)
class AllowControls:
    """Marks a str of an ``ApiModel`` that may hold these control characters (never NUL)."""

    chars: str

    def __post_init__(self) -> None:
        if "\x00" in self.chars or any(c not in _CONTROLS for c in self.chars):
            raise ValueError(f"not allowable control characters: {self.chars!r}")

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        schema = handler(source)
        metadata = {**(schema.get("metadata") or {}), _ALLOWED_CONTROLS: self.chars}
        return cast(CoreSchema, {**schema, "metadata": metadata})


#: Free text typed into a text area: line breaks and tabs allowed, other control characters not.
MultilineText = Annotated[str, AllowControls("\t\n\r")]

_MY_NUMBER_EXEMPT = "nichiiki_my_number_exempt"
_MY_NUMBER_ERROR = "my_number_not_allowed"


@dataclass(frozen=True, slots=True)
class MyNumberExempt:
    """Marks a field of an ``ApiModel`` (and everything in it) that is not checked for a My Number.

    Only for another system's own opaque identifier that may hold twelve digits by its own rules
    (a payment provider's reference): ``why`` says which system and why, and each use is justified
    where it is made. Never for anything a person types."""

    why: str

    def __post_init__(self) -> None:
        if not self.why.strip():
            raise ValueError("say why the field may hold twelve digits")

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        schema = handler(source)
        metadata = {**(schema.get("metadata") or {}), _MY_NUMBER_EXEMPT: True}
        return cast(CoreSchema, {**schema, "metadata": metadata})


def _my_number_error() -> PydanticCustomError:
    # Never the value: it may be a real individual number.
    return PydanticCustomError(_MY_NUMBER_ERROR, "A My Number is never accepted (12 digits with a valid check digit)")


def _no_my_number(value: Any) -> Any:
    """The before-validator of every scalar of an ``ApiModel``: it sees the raw JSON value (a str or a
    JSON number, whatever the field's type), before the field's own rules could refuse it as merely
    malformed or turn it into something else (a datetime from a number of milliseconds)."""
    if scalar_looks_like_my_number(value):
        raise _my_number_error()
    return value


class _NoControls:
    """The after-validator of every str of an ``ApiModel`` (one regex search: C speed)."""

    __slots__ = ("pattern",)

    def __init__(self, allowed: str) -> None:
        refused = "".join(c for c in _CONTROLS if c not in allowed)
        self.pattern = _CONTROL if refused == _CONTROLS else re.compile(f"[{re.escape(refused)}]")

    def __call__(self, value: str) -> str:
        found = self.pattern.search(value)
        if found is not None:
            raise _control_error(found)
        return value


_NO_CONTROLS = _NoControls("")


def _control_error(found: re.Match[str]) -> PydanticCustomError:
    return PydanticCustomError(
        "control_character", "String should not contain control characters (U+{code} at position {position})",
        {"code": f"{ord(found.group()):04X}", "position": found.start()},
    )


def _storable_json(value: Any) -> Any:
    """The after-validator of an ``Any`` (free JSON) in an ``ApiModel``: its strings and ints, at any
    depth, as storable as a typed field's, and no My Number in them nor in a member name."""
    return _check_json(value, my_number=True)


def _storable_json_exempt(value: Any) -> Any:
    """``_storable_json`` of free JSON under ``MyNumberExempt``."""
    return _check_json(value, my_number=False)


def _check_json(value: Any, *, my_number: bool) -> Any:
    stack = [value]
    while stack:
        item = stack.pop()
        if my_number and scalar_looks_like_my_number(item):
            raise _my_number_error()
        if isinstance(item, str):
            if (found := _CONTROL.search(item)) is not None:
                raise _control_error(found)
        elif isinstance(item, int) and not isinstance(item, bool):
            if not INT64_MIN <= item <= INT64_MAX:
                raise PydanticCustomError(
                    "int_out_of_range", "Integers should be within {minimum} and {maximum}",
                    {"minimum": INT64_MIN, "maximum": INT64_MAX},
                )
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return value


# Core schema keys that hold one inner schema, or a list of them (tuple items, chain steps).
_INNER = ("schema", "items_schema", "keys_schema", "values_schema", "lax_schema", "strict_schema",
          "json_schema", "python_schema", "steps")
# Schemas not looked into: other models (an ApiModel guards its own), references.
_OPAQUE = {"model", "dataclass", "typed-dict", "definition-ref", "definitions"}
# Scalars that a JSON str or number becomes: each looks at its raw value for a My Number first.
# (Not enums and literals: they take no value of the caller's making, and pydantic allows no
# validator on a discriminator; ``_my_number_loc`` names a My Number they refused.)
_SCALARS = {"float", "decimal", "bool", "date", "datetime", "time", "timedelta", "uuid", "url", "multi-host-url",
            "bytes", "complex"}
# Errors of fields that take only values of their own: one refusing a My Number is about a My Number.
_FIXED_VALUES = {"literal_error", "enum", "union_tag_invalid"}


def _no_my_number_in(schema: CoreSchema, exempt: bool) -> CoreSchema:
    return schema if exempt else core_schema.no_info_before_validator_function(_no_my_number, schema)


def _guarded(schema: CoreSchema, allowed: str = "", exempt: bool = False) -> CoreSchema:
    """``schema`` with every str refusing control characters (but ``allowed``), every int bounded
    to a ``bigint`` and every scalar refusing a My Number (unless ``exempt``); the same object when
    nothing in it changes."""
    node = cast(dict[str, Any], schema)
    metadata = node.get("metadata") or {}
    allowed = metadata.get(_ALLOWED_CONTROLS, allowed)
    exempt = metadata.get(_MY_NUMBER_EXEMPT, exempt)
    kind = node.get("type")
    if kind == "str":
        return _no_my_number_in(core_schema.no_info_after_validator_function(
            _NoControls(allowed) if allowed else _NO_CONTROLS, schema
        ), exempt)
    if kind in _SCALARS:
        return _no_my_number_in(schema, exempt)
    if kind == "int":
        bounded = dict(node)
        if "lt" in bounded or "le" in bounded:
            bounded["le"] = min(bounded.pop("le", INT64_MAX), bounded.pop("lt", INT64_MAX + 1) - 1, INT64_MAX)
        else:
            bounded["le"] = INT64_MAX
        if "gt" in bounded or "ge" in bounded:
            bounded["ge"] = max(bounded.pop("ge", INT64_MIN), bounded.pop("gt", INT64_MIN - 1) + 1, INT64_MIN)
        else:
            bounded["ge"] = INT64_MIN
        return _no_my_number_in(cast(CoreSchema, bounded), exempt)
    if kind == "any":
        return core_schema.no_info_after_validator_function(_storable_json_exempt if exempt else _storable_json, schema)
    if kind in _OPAQUE:
        return schema
    if kind in ("function-after", "function-before") and (
        isinstance(node["function"].get("function"), _NoControls) or node["function"].get("function") is _no_my_number
    ):
        return schema  # guarded already (the schema of a nested ApiModel met again)
    if kind in ("function-before", "function-wrap", "function-plain"):
        # A validator of the model's own sees the raw value first (and may echo it in its error, or
        # turn it into something else): the My Number check goes in front of it too.
        return _no_my_number_in(_guarded_inner(node, allowed, exempt), exempt)
    return _guarded_inner(node, allowed, exempt)


def _guarded_inner(node: dict[str, Any], allowed: str, exempt: bool) -> CoreSchema:
    """``_guarded`` of what a schema node holds (inner schemas, fields, choices)."""
    kind = node.get("type")
    changed: dict[str, Any] = {}
    for key in _INNER:
        inner = node.get(key)
        if isinstance(inner, dict):
            new = _guarded(cast(CoreSchema, inner), allowed, exempt)
            if new is not inner:
                changed[key] = new
        elif isinstance(inner, list):
            items = [_guarded(item, allowed, exempt) for item in inner]
            if any(a is not b for a, b in zip(items, inner, strict=True)):
                changed[key] = items
    if kind == "model-fields":
        fields = {name: _guarded(field, allowed, exempt) for name, field in node["fields"].items()}
        if any(fields[name] is not field for name, field in node["fields"].items()):
            changed["fields"] = fields
    elif kind == "union":
        old: list[Any] = node["choices"]  # each a schema or a (schema, label) pair
        choices = [
            (_guarded(c[0], allowed, exempt), c[1]) if isinstance(c, tuple) else _guarded(c, allowed, exempt)
            for c in old
        ]
        if any(_schema_of(a) is not _schema_of(b) for a, b in zip(choices, old, strict=True)):
            changed["choices"] = choices
    elif kind == "tagged-union":
        tagged = {tag: _guarded(choice, allowed, exempt) for tag, choice in node["choices"].items()}
        if any(tagged[tag] is not choice for tag, choice in node["choices"].items()):
            changed["choices"] = tagged
    return cast(CoreSchema, {**node, **changed}) if changed else cast(CoreSchema, node)


def _schema_of(choice: Any) -> Any:
    return choice[0] if isinstance(choice, tuple) else choice


def _guarded_model(schema: CoreSchema, cls: type[BaseModel]) -> CoreSchema:
    """The model's schema with its fields guarded; model validators wrap it, and are kept."""
    node = cast(dict[str, Any], schema)
    if node.get("type") == "model" and node.get("cls") is cls:
        fields = _guarded(node["schema"])
        return schema if fields is node["schema"] else cast(CoreSchema, {**node, "schema": fields})
    if str(node.get("type", "")).startswith("function-") and "schema" in node:
        inner = _guarded_model(node["schema"], cls)
        return schema if inner is node["schema"] else cast(CoreSchema, {**node, "schema": inner})
    return schema  # a reference to the model, whose own schema is guarded where it is defined


class ApiModel(BaseModel):
    """Base of request bodies: unknown fields are an error, not silently dropped; every str refuses
    control characters (a field opts in to some with ``AllowControls``, e.g. ``MultilineText``) and
    every int is bound to PostgreSQL's ``bigint`` (tighter where the field says so), so what passes
    can be stored; no scalar and no free JSON holds a My Number (a field opts out only with
    ``MyNumberExempt``). The checks are put into the model's core schema once, when the class is made."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: type[BaseModel], handler: GetCoreSchemaHandler, /) -> CoreSchema:
        return _guarded_model(handler(source), cls)


#: How far a list may be paged: any further is a 422, never a database error.
MAX_OFFSET = 1_000_000
#: The ``offset`` query parameter of every paged list.
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Items to skip")]


class Problem(BaseModel):
    """RFC 9457 problem details, as documented in OpenAPI."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    code: str
    instance: str | None = None


def problem(status: int, code: str, title: str, detail: str | None = None, **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"https://nichiiki.jp/problems/{code}", "title": title, "status": status, "code": code,
    }
    if detail is not None:
        body["detail"] = detail
    body.update({k: v for k, v in extra.items() if v is not None})
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON)


PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem, "content": {PROBLEM_JSON: {}}} for status in (400, 401, 403, 404, 409, 413, 415, 422)
}


class Readiness:
    """Checks that /readyz runs (database, broker...), each returning True when healthy."""

    def __init__(self) -> None:
        self.checks: dict[str, Callable[[], Awaitable[bool]]] = {}

    async def run(self) -> dict[str, bool]:
        results: dict[str, bool] = {}
        for name, check in self.checks.items():
            try:
                results[name] = await check()
            except Exception:
                results[name] = False
        return results


def create_app(
    *,
    service: str,
    settings: Settings,
    routers: Sequence[APIRouter],
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None,
    readiness: Readiness | None = None,
    description: str = "",
    hot_paths: Sequence[Middleware] = (),
    hot_writes: Sequence[Callable[..., Awaitable[Response]]] = (),
    form_paths: Collection[str] = (),
) -> FastAPI:
    """The service's app. ``hot_paths``: plain ASGI handlers for the few requests that must skip
    FastAPI's routing and dependency machinery; they sit inside ``Observe`` and ``BodyGuard`` (ids,
    metrics and limits as for every request) and hand everything else on. ``hot_writes``: endpoints
    of write routes served the same way in their plain case (``shared.kit.hot_writes``). ``form_paths``: the exact
    paths that also take ``application/x-www-form-urlencoded`` bodies (OAuth 2.0 protocol endpoints)."""
    app = FastAPI(
        title=f"Nichiiki {service.replace('_', ' ')}",
        version="1.0.0",
        description=description,
        lifespan=_closing_rate_limiter(lifespan),
        responses=PROBLEM_RESPONSES,
        docs_url=None,  # /docs and /redoc are served from the kit's own assets (_serve_docs)
        redoc_url=None,
        # The kit traces, counts and logs every request itself (``Observe``): FastAPI's own
        # OpenTelemetry spans, metrics and logs would double them wherever a provider is installed,
        # and asking whether one is costs every request (three provider look-ups: 4 % of a
        # verification, profiled).
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.state.settings = settings
    tracing.configure_tracing(service)  # once per process (each HTTP worker builds its app)
    # Refuses to build an app outside development without a token issuer (a clear start-up error).
    app.state.verifier = TokenVerifier(settings, service)
    app.state.service = service
    app.state.readiness = readiness or Readiness()
    registry = AppRegistry()  # with the process and GC metrics; summed over workers (shared.kit.metrics)
    app.state.metrics_registry = registry
    app.state.rate_limiter = RateLimiter(settings, registry=registry)
    requests = Counter(
        "http_requests_total", "HTTP requests", ["method", "route", "status"], registry=registry
    )
    latency = Histogram(
        "http_request_duration_seconds", "HTTP request latency", ["method", "route"], registry=registry,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    )

    _install_problem_handlers(app)

    ops = APIRouter(tags=["operations"])

    @ops.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": service}

    @ops.get("/readyz")
    async def readyz() -> JSONResponse:
        checks = await app.state.readiness.run()
        ready = all(checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    @ops.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(registry.render(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(ops)
    _serve_docs(app)
    for router in routers:
        app.include_router(router)

    # Each add wraps the previous: BodyGuard runs first, then Observe, the hot paths in their order,
    # the hot writes, FastAPI. (Added once the routes are in: the hot writes are planned from them.)
    if hot_writes:
        # Here, not at the top: hot writes build on use_case, which builds on the runtime, which uses this module.
        from shared.kit.hot_writes import HotWrites, plan

        app.add_middleware(HotWrites, routes=plan(app, hot_writes), verifier=app.state.verifier)
    for hot_path in reversed(hot_paths):
        app.add_middleware(hot_path.cls, *hot_path.args, **hot_path.kwargs)
    app.add_middleware(Observe, requests=requests, latency=latency)
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes, form_paths=form_paths)
    return app


#: Swagger UI and ReDoc, vendored (shared/kit/static/README.md): municipal terminals on closed
#: networks reach no CDN, so each service serves the pages' scripts itself.
DOCS_ASSETS = Path(__file__).parent / "static"
DOCS_STATIC = "/docs/static"


def _serve_docs(app: FastAPI) -> None:
    app.mount(DOCS_STATIC, StaticFiles(directory=DOCS_ASSETS), name="docs-static")

    def urls(request: Request) -> tuple[str, str]:
        root = str(request.scope.get("root_path", "")).rstrip("/")
        return f"{root}{app.openapi_url}", f"{root}{DOCS_STATIC}"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        openapi, static = urls(request)
        return get_swagger_ui_html(
            openapi_url=openapi, title=f"{app.title} — Swagger UI",
            swagger_js_url=f"{static}/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url=f"{static}/swagger-ui/swagger-ui.css",
            swagger_favicon_url=f"{static}/swagger-ui/favicon-32x32.png",
            # Authorize keeps the token across reloads; no call to the public validator service.
            swagger_ui_parameters={"persistAuthorization": True, "validatorUrl": None},
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        openapi, static = urls(request)
        return get_redoc_html(
            openapi_url=openapi, title=f"{app.title} — ReDoc", redoc_js_url=f"{static}/redoc/redoc.standalone.js",
            redoc_favicon_url=f"{static}/swagger-ui/favicon-32x32.png", with_google_fonts=False,
        )


def _closing_rate_limiter(
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None,
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The service's lifespan, then the rate limiter's Redis client closed."""

    @asynccontextmanager
    async def run(app: FastAPI) -> AsyncIterator[None]:
        try:
            if lifespan is None:
                async with _mirrored_metrics(app):
                    yield
            else:
                async with lifespan(app), _mirrored_metrics(app):
                    yield
        finally:
            await app.state.rate_limiter.close()

    return run


@asynccontextmanager
async def _mirrored_metrics(app: FastAPI) -> AsyncIterator[None]:
    """With several workers, this worker's scrape-time metrics copied where every worker's
    ``/metrics`` sums them (``shared.kit.metrics``); nothing to do with one."""
    registry: AppRegistry = app.state.metrics_registry
    if not registry.multiprocess:
        yield
        return
    task = asyncio.create_task(Mirror(registry).run(), name="metrics-mirror")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        process_exited()


def _install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def domain_error(request: Request, error: DomainError) -> JSONResponse:
        return refusal(error, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        refused = [_redacted(loc) for e in error.errors() if (loc := _my_number_loc(e)) is not None]
        if refused:
            return my_number_refusal(refused, request.url.path)
        errors = [
            {"loc": _redacted(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in error.errors()
        ]
        if any(e["type"] == "json_invalid" for e in errors):
            return problem(400, "malformed-json", "The body is not valid JSON", errors[0]["msg"], errors=errors)
        return problem(
            422, "invalid-request", "The request does not match the schema",
            "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors), errors=errors,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not-found", 405: "method-not-allowed", 413: "body-too-large", 415: "unsupported-media-type"}
        return problem(
            error.status_code, code.get(error.status_code, f"http-{error.status_code}"),
            str(error.detail), instance=request.url.path,
        )

    async def unavailable(request: Request, error: Exception) -> JSONResponse:
        return unavailable_response(error, request.url.path)

    for transient in TRANSIENT_ERRORS:
        app.add_exception_handler(transient, unavailable)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        return failure_response(error, request.url.path)


def _my_number_loc(error: Any) -> list[Any] | None:
    """Where a validation error found a My Number, if it is about one: the kit's own check refused a
    value, or an unknown member, an enum or a union's tag (refused as such before any check saw
    them) held one."""
    loc = list(error.get("loc", ()))
    kind = error.get("type")
    if kind == _MY_NUMBER_ERROR:
        return loc
    if kind == "extra_forbidden" and find_my_number(error.get("input")) is not None:
        return loc
    if kind in _FIXED_VALUES:
        if scalar_looks_like_my_number(error.get("input")):
            return loc
        context = error.get("ctx") or {}
        if scalar_looks_like_my_number(context.get("tag")):  # a tagged union's: loc is the union's
            return [*loc, str(context.get("discriminator", "")).strip("'")]
    return loc if any(isinstance(step, str) and looks_like_my_number(step) for step in loc) else None


_MEMBER_NAME = "(a member name)"


def _redacted(loc: Sequence[Any]) -> list[Any]:
    """A location without the member names that hold a My Number (a location is echoed back)."""
    return [_MEMBER_NAME if isinstance(step, str) and looks_like_my_number(step) else step for step in loc]


def my_number_refusal(locs: Sequence[Sequence[Any]], path: str | None) -> JSONResponse:
    """The 422 ``my-number-not-allowed`` problem naming where each value was (never the value);
    ``locs`` start with where (``body``, ``query``, ``path``), as FastAPI's do."""
    first = list(locs[0])
    where = str(first[0]) if first else "body"
    json_path = "$" + "".join(f"[{step}]" if isinstance(step, int) else f".{step}" for step in first[1:])
    detail = refusal_detail(where, json_path)
    log.info("request refused", code=MyNumberNotAllowed.code, detail=detail)
    errors = [{"loc": list(loc), "msg": "a My Number is never accepted", "type": _MY_NUMBER_ERROR} for loc in locs]
    return problem(422, MyNumberNotAllowed.code, MyNumberNotAllowed.title, detail, instance=path, errors=errors)


def refusal(error: DomainError, path: str) -> JSONResponse:
    """The problem+json answer to a refused request."""
    log.info("request refused", code=error.code, detail=error.detail)
    response = problem(error.status, error.code, error.title, error.detail, instance=path, **error.extra)
    response.headers.update(error.headers)
    return response


def unavailable_response(error: Exception, path: str) -> JSONResponse:
    # The database or broker is away: nothing was committed, and a retry will work later.
    log.warning("request failed on a transient fault", path=path, error=repr(error))
    response = problem(
        503, "service-unavailable", "Temporarily unavailable", "a backing server is unavailable; retry shortly",
        instance=path,
    )
    response.headers["Retry-After"] = "1"
    return response


def failure_response(error: Exception, path: str) -> JSONResponse:
    """503 for a transient fault, else a logged 500: never a bare traceback."""
    if is_transient(error):
        return unavailable_response(error, path)
    log.exception("unhandled error", path=path)
    return problem(500, "internal-error", "Internal error", "the error was logged", instance=path)


#: Probed every few seconds by orchestrators and Prometheus: their access lines are DEBUG.
_QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})


class Observe:
    """Request id, correlation id, trace, access log and metrics for every request (plain ASGI: it
    is on the hot path).

    The ids are bound to every log line of the request and the correlation id is kept in
    ``request.state.correlation_id`` for the events the request causes. A server span covers the
    request (the child of an incoming ``traceparent``); the events its use case emits continue it.
    One access line per request: method, route template (never the raw path, which may hold ids,
    nor the query), status, duration and the caller's role; no personal data.
    """

    def __init__(self, app: ASGIApp, requests: Counter, latency: Histogram) -> None:
        self.app = app
        self.requests = requests
        self.latency = latency
        # Each label set's child, looked up once: ``labels()`` takes a lock and builds a key per call.
        self._counted: dict[tuple[str, str, str], Any] = {}
        self._timed: dict[tuple[str, str], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1") or str(uuid.uuid4())
        correlation_id = headers.get(b"x-correlation-id", b"").decode("latin-1") or request_id
        state = scope.setdefault("state", {})
        state["correlation_id"] = correlation_id
        status = 500
        started = time.perf_counter()
        method = scope["method"]
        span = _server_span(method, scope, headers)
        ids = {"request_id": request_id, "correlation_id": correlation_id}
        if span is not None and span.get_span_context().is_valid:
            ids["trace_id"] = f"{span.get_span_context().trace_id:032x}"

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        def name_the_span() -> None:  # the route template is known once routed, the status once sent
            assert span is not None
            _finish_server_span(span, method, getattr(scope.get("route"), "path", "unmatched"), status)

        tokens = bind_contextvars(**ids)  # as ``shared.kit.logging.bound_context``, without its generator
        try:
            if span is None:  # no tracing here: spare every request the context manager
                await self.app(scope, receive, send_with_id)
            else:
                with tracing.ending(span, before_end=name_the_span):
                    await self.app(scope, receive, send_with_id)
        finally:
            try:
                elapsed = time.perf_counter() - started
                route = getattr(scope.get("route"), "path", "unmatched")
                labels = (method, route, str(status))
                counted = self._counted.get(labels)
                if counted is None:
                    counted = self._counted[labels] = self.requests.labels(*labels)
                counted.inc()
                timed = self._timed.get((method, route))
                if timed is None:
                    timed = self._timed[(method, route)] = self.latency.labels(method, route)
                timed.observe(elapsed)
                (log.debug if route in _QUIET_ROUTES else log.info)(
                    "request", method=method, route=route, status=status, duration_ms=round(elapsed * 1000, 2),
                    principal_kind=state.get("principal_kind", "none"),
                )
            finally:
                reset_contextvars(**tokens)


def _server_span(method: str, scope: Scope, headers: dict[bytes, bytes]) -> tracing.Span | None:
    """The request's server span; without a recording provider, only an incoming trace context
    (kept current, so the request's events carry it on) or nothing."""
    traceparent = headers.get(b"traceparent")
    incoming = None
    if traceparent is not None:
        tracestate = headers.get(b"tracestate")
        incoming = tracing.from_headers([("traceparent", traceparent)] + (
            [("tracestate", tracestate)] if tracestate is not None else []
        ))
    if not tracing.recording():
        return None if incoming is None else tracing.remote_span(incoming)
    return tracing.start_span(
        method, kind=tracing.SpanKind.SERVER, parent=incoming, detached=True,
        attributes={"http.request.method": method, "url.scheme": str(scope.get("scheme", "http"))},
    )


def _finish_server_span(span: tracing.Span, method: str, route: str, status: int) -> None:
    if not span.is_recording():
        return
    span.update_name(f"{method} {route}")  # the template, known once routed (never the raw path)
    span.set_attribute("http.route", route)
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        tracing.failed(span, f"HTTP {status}")


class BodyGuard:
    """Refuses, before any route sees them: a path or query string with a control character (422:
    a path or query parameter may reach SQL, and PostgreSQL cannot store NUL) or a My Number (422
    ``my-number-not-allowed``: a query may be logged, kept in a search or sent on), oversized bodies
    (413) and non-JSON bodies (415), but form bodies on the ``form_paths`` the app names (``"*"``:
    every path, for an app of HTML forms such as the console)."""

    def __init__(self, app: ASGIApp, max_bytes: int, form_paths: Collection[str] = ()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.form_paths = frozenset(form_paths)
        self.forms_everywhere = "*" in self.form_paths
        self._segment_of = _CleanPaths()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        unstorable = _unstorable_target(scope)
        if unstorable is not None:
            where, detail = unstorable
            response = problem(
                422, "invalid-request", "The request does not match the schema", f"{'.'.join(where)}: {detail}",
                errors=[{"loc": where, "msg": detail, "type": "control_character"}],
            )
            await response(scope, _no_receive, send)
            return
        holding = _my_number_target(scope, self._segment_of)
        if holding is not None:
            path = scope.get("path", "")
            if holding[0] == "path":  # the problem's instance must not echo it either
                segments = path.split("/")
                path = "/".join([*segments[: int(holding[1])], "*", *segments[int(holding[1]) + 1:]])
            await my_number_refusal([holding], path)(scope, _no_receive, send)
            return
        if scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(scope, send, 413, "body-too-large", f"the body exceeds {self.max_bytes} bytes")
            return
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if (
            length not in (None, b"0")
            and content_type not in (b"application/json", b"")
            and not (content_type == _FORM and (self.forms_everywhere or scope.get("path") in self.form_paths))
        ):
            await self._refuse(
                scope, send, 415, "unsupported-media-type", "send the body as application/json"
            )
            return
        received = 0

        async def guarded_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, guarded_receive, send)
        except _BodyTooLarge:
            await self._refuse(scope, send, 413, "body-too-large", f"the body exceeds {self.max_bytes} bytes")

    @staticmethod
    async def _refuse(scope: Scope, send: Send, status: int, code: str, detail: str) -> None:
        titles = {413: "The body is too large", 415: "Unsupported media type"}
        response = problem(status, code, titles[status], detail, instance=scope.get("path"))
        await response(scope, _no_receive, send)


class _BodyTooLarge(Exception):
    pass


# What in a raw query string decodes to a control character (Starlette decodes it as latin-1, then
# the percent escapes as UTF-8): a raw control byte, or the escape of a C0 control, DEL or a C1
# control's UTF-8. One search of the bytes passes nearly every query string.
_CONTROL_IN_QUERY = re.compile(rb"[\x00-\x1f\x7f-\x9f]|%[01][0-9A-Fa-f]|%7[Ff]|%[Cc]2%[89][0-9A-Fa-f]")


def _unstorable_target(scope: Scope) -> tuple[list[str], str] | None:
    """Where the path or the query holds a control character (as the app would decode them), and what."""
    path: str = scope.get("path", "")
    if (found := _CONTROL.search(path)) is not None:
        return ["path"], _control_detail(found)
    raw: bytes = scope.get("query_string", b"")
    if raw and _CONTROL_IN_QUERY.search(raw) is not None:
        text = raw.decode("latin-1")  # as Starlette decodes it
        for name, value in parse_qsl(text, keep_blank_values=True):
            if (found := _CONTROL.search(value)) is not None and _CONTROL.search(name) is None:
                return ["query", name], _control_detail(found)
        if (found := _CONTROL.search(unquote(text))) is not None:
            return ["query"], _control_detail(found)
    return None


#: The kid of a value sealed for a partner (shared/contracts/sealed.py: ``partner_kid``), as
#: ``GET /v1/keys/{kid}`` of the partner gateway takes it.
_PARTNER_KID = re.compile(r"partner:[a-z][a-z0-9]{1,31}:[0-9a-f]{64}")


def _my_number_segment(path: str) -> int | None:
    """The index of the first path segment holding a My Number (one segment is one value, so no two
    are read as one), or None."""
    if might_hold_my_number(path):
        for index, segment in enumerate(path.split("/")):
            # A partner kid (``partner:<code>:<HMAC hex>``) is a pseudonym, not a number anyone wrote;
            # about 1 in 300 holds twelve digits with a valid check digit by chance.
            if looks_like_my_number(segment) and not _PARTNER_KID.fullmatch(segment):
                return index
    return None


class _CleanPaths:
    """``_my_number_segment`` remembering the paths found clean: a path with twelve digits or more (a
    certificate number) costs about 10 µs to check, and the hottest routes ask the same paths again
    and again. A path holding a My Number is never kept (it is refused, and no copy stays here)."""

    __slots__ = ("_clean", "size")

    def __init__(self, size: int = 10_000) -> None:
        self._clean: set[str] = set()
        self.size = size

    def __call__(self, path: str) -> int | None:
        if path in self._clean:
            return None
        index = _my_number_segment(path)
        if index is None:
            if len(self._clean) >= self.size:
                self._clean.clear()  # crude but bounded
            self._clean.add(path)
        return index


def _my_number_target(
    scope: Scope, segment_of: Callable[[str], int | None] = _my_number_segment
) -> list[str | int] | None:
    """Where the path or the query holds a My Number (as the app would decode them): a path segment
    by its index, a query value by its name."""
    index = segment_of(scope.get("path", ""))
    if index is not None:
        return ["path", index]
    raw: bytes = scope.get("query_string", b"")
    # Cheap first: fewer than 12 digits, nothing escaped and nothing beyond ASCII hold no My Number.
    if len(raw) >= 12 and (b"%" in raw or not raw.isascii() or sum(map(raw.count, b"0123456789")) >= 12):
        for name, value in parse_qsl(raw.decode("latin-1"), keep_blank_values=True):  # as Starlette decodes it
            if looks_like_my_number(name):
                return ["query", _MEMBER_NAME]
            if looks_like_my_number(value):
                return ["query", name]
    return None


def _control_detail(found: re.Match[str]) -> str:
    return f"control characters are not allowed (U+{ord(found.group()):04X})"


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}

