"""One small FastAPI app factory for every service.

Every app has ``/healthz`` (the process answers), ``/readyz`` (its database and broker answer),
``/metrics`` (Prometheus) and OpenAPI; every error is ``application/problem+json`` (RFC 9457)
with a machine-readable ``code``. A malformed body, an unknown field or a wrong type is a 4xx
problem, never a 500. The request id / correlation id is bound to every log line of a request.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.kit.errors import TRANSIENT_ERRORS, DomainError, is_transient
from shared.kit.logging import bound_context
from shared.kit.settings import Settings

log = structlog.get_logger(__name__)

PROBLEM_JSON = "application/problem+json"
_BODY_METHODS = {"POST", "PUT", "PATCH"}


class ApiModel(BaseModel):
    """Base of request bodies: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


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
) -> FastAPI:
    """The service's app. ``hot_paths``: plain ASGI handlers for the few requests that must skip
    FastAPI's routing and dependency machinery; they sit inside ``Observe`` and ``BodyGuard`` (ids,
    metrics and limits as for every request) and hand everything else on."""
    app = FastAPI(
        title=f"Nichiiki {service.replace('_', ' ')}",
        version="1.0.0",
        description=description,
        lifespan=lifespan,
        responses=PROBLEM_RESPONSES,
    )
    app.state.settings = settings
    app.state.service = service
    app.state.readiness = readiness or Readiness()
    registry = CollectorRegistry()
    app.state.metrics_registry = registry
    requests = Counter(
        "http_requests_total", "HTTP requests", ["method", "route", "status"], registry=registry
    )
    latency = Histogram(
        "http_request_duration_seconds", "HTTP request latency", ["method", "route"], registry=registry,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    )

    for hot_path in reversed(hot_paths):  # each add wraps the previous: the first listed runs first
        app.add_middleware(hot_path.cls, *hot_path.args, **hot_path.kwargs)
    app.add_middleware(Observe, requests=requests, latency=latency)
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes)
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
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(ops)
    for router in routers:
        app.include_router(router)
    return app


def _install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def domain_error(request: Request, error: DomainError) -> JSONResponse:
        return refusal(error, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
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


class Observe:
    """Request id, correlation id and metrics for every request (plain ASGI: it is on the hot path).

    The ids are bound to every log line of the request and the correlation id is kept in
    ``request.state.correlation_id`` for the events the request causes.
    """

    def __init__(self, app: ASGIApp, requests: Counter, latency: Histogram) -> None:
        self.app = app
        self.requests = requests
        self.latency = latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1") or str(uuid.uuid4())
        correlation_id = headers.get(b"x-correlation-id", b"").decode("latin-1") or request_id
        scope.setdefault("state", {})["correlation_id"] = correlation_id
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        try:
            with bound_context(request_id=request_id, correlation_id=correlation_id):
                await self.app(scope, receive, send_with_id)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.requests.labels(scope["method"], route, str(status)).inc()
            self.latency.labels(scope["method"], route).observe(time.perf_counter() - started)


class BodyGuard:
    """Refuses oversized and non-JSON bodies before any route sees them (413 / 415)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(scope, send, 413, "body-too-large", f"the body exceeds {self.max_bytes} bytes")
            return
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if (length not in (None, b"0")) and content_type not in (b"application/json", b""):
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


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}

