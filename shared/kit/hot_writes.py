"""Hot writes: the few write routes taken at rates no other route sees, served ahead of FastAPI.

FastAPI's routing and dependency solving cost about 190 µs of CPU per registration (in-process,
handler stubbed), most of it finding the route and resolving the same three dependencies. A hot
write runs the route's own endpoint with those dependencies resolved directly, but only in the plain
case: a usable bearer token whose role the route admits, no query string, a JSON body its model
accepts, a well-formed Idempotency-Key or none. Anything else (no token, a refused role, a body the
model refuses, a My Number, a fault while checking the caller) is handed, body and all, to the
documented route, which answers exactly as it always has. So a hot write cannot answer a bad request
differently, and a good one runs the very endpoint FastAPI would call, with the same arguments.

What a hot write resolves is read from the route FastAPI built (``APIRoute.dependant``) when the
app is made: path parameters (``str``), one body model, the ``Request``, ``WriteRequest``, and
principals through a role check over ``current_principal`` (``require``); the endpoint must answer a
``Response`` itself (FastAPI then applies no response model). A route with anything else (query or
header parameters, other dependencies), or one that an earlier route could shadow, is refused at
start-up with the reason.
"""

from __future__ import annotations

import json
import re
import typing
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, iter_route_contexts
from pydantic import BaseModel
from starlette.convertors import StringConvertor
from starlette.responses import Response
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.kit.auth import Principal, TokenVerifier, current_principal
from shared.kit.use_case import Write, valid_idempotency_key, write_request

log = structlog.get_logger(__name__)

Endpoint = Callable[..., Awaitable[Response]]
#: A role check of the route (``require(...)``'s dependency): the principal, or ``Forbidden``.
RoleCheck = Callable[..., Awaitable[Principal]]


class NotHot(ValueError):
    """The route cannot be served as a hot write (the reason says why): a start-up error."""


@dataclass(frozen=True, slots=True)
class HotRoute:
    """One route's plan: how to resolve each of its endpoint's parameters without FastAPI."""

    method: str
    path: str  # the template: the metrics label and the ``Write``'s operation, as FastAPI's
    pattern: re.Pattern[str]
    endpoint: Endpoint
    body_param: str
    body_model: type[BaseModel]
    principal_params: tuple[tuple[str, RoleCheck | None, str], ...]  # (param, check or None, check's arg)
    write_params: tuple[str, ...]
    request_param: str | None

    @classmethod
    def of(cls, app: FastAPI, endpoint: Endpoint) -> HotRoute:
        routes = [r for r in iter_route_contexts(app.routes) if r.endpoint is endpoint]
        if len(routes) != 1:
            raise NotHot(f"{endpoint.__qualname__}: served by {len(routes)} routes, not one")
        route = routes[0]
        methods, path = route.methods or set(), route.path
        name = f"{'/'.join(sorted(methods))} {path}"
        if len(methods) != 1 or not isinstance(route.original_route, APIRoute) or path is None:
            raise NotHot(f"{name}: one method of one APIRoute only")
        method = next(iter(methods))
        _refuse_shadowed(app, endpoint, path, method, name)
        if route.max_body_size is not None:
            raise NotHot(f"{name}: has a body limit of its own")
        dependant = route.dependant
        if route.dependencies or dependant.query_params or dependant.header_params or dependant.cookie_params:
            raise NotHot(f"{name}: takes query, header or cookie parameters or route dependencies")
        if _special_params(dependant) - {"request_param_name"}:
            raise NotHot(f"{name}: takes {_special_params(dependant)}")
        if not all(isinstance(c, StringConvertor) for c in route.param_convertors.values()):
            raise NotHot(f"{name}: path parameters other than str")
        if any(p.field_info.annotation is not str for p in dependant.path_params):
            raise NotHot(f"{name}: path parameters other than str")
        if len(dependant.body_params) != 1:
            raise NotHot(f"{name}: needs exactly one body parameter")
        body = dependant.body_params[0]
        body_model = body.field_info.annotation
        if not (isinstance(body_model, type) and issubclass(body_model, BaseModel)):
            raise NotHot(f"{name}: the body is not one pydantic model")
        principals: list[tuple[str, RoleCheck | None, str]] = []
        writes: list[str] = []
        for sub in dependant.dependencies:
            assert sub.name is not None
            if sub.call is write_request:
                writes.append(sub.name)
            elif sub.call is current_principal:
                principals.append((sub.name, None, ""))
            elif _is_role_check(sub):
                principals.append((sub.name, sub.call, sub.dependencies[0].name or ""))
            else:
                raise NotHot(f"{name}: depends on {getattr(sub.call, '__qualname__', sub.call)!r}")
        if not principals and not writes:
            raise NotHot(f"{name}: takes no caller (a hot write is always authenticated)")
        answers = typing.get_type_hints(endpoint).get("return")
        if not (isinstance(answers, type) and issubclass(answers, Response)):
            raise NotHot(f"{name}: must answer a Response itself (it answers {answers!r})")
        return cls(
            method=method, path=path, pattern=route.path_regex, endpoint=endpoint,
            body_param=body.name, body_model=body_model, principal_params=tuple(principals),
            write_params=tuple(writes), request_param=dependant.request_param_name,
        )


def _special_params(dependant: Dependant) -> set[str]:
    names = (
        "request_param_name", "websocket_param_name", "http_connection_param_name", "response_param_name",
        "background_tasks_param_name", "security_scopes_param_name",
    )
    return {n for n in names if getattr(dependant, n) is not None}


def _is_role_check(sub: Dependant) -> bool:
    """A dependency of the caller alone, as ``require`` makes: one parameter, ``current_principal``."""
    return (
        len(sub.dependencies) == 1 and sub.dependencies[0].call is current_principal
        and not (sub.path_params or sub.query_params or sub.header_params or sub.cookie_params or sub.body_params)
        and not _special_params(sub)
    )


def _refuse_shadowed(app: FastAPI, endpoint: Endpoint, path: str, method: str, name: str) -> None:
    """FastAPI takes the first route that matches: a hot write must not catch a request an earlier
    route (or a mount) would have taken."""
    for other in iter_route_contexts(app.routes):
        if other.endpoint is endpoint:
            return
        other_path = other.path
        if not isinstance(other_path, str):
            raise NotHot(f"{name}: comes after a route without a path ({other.route!r})")
        if isinstance(other.original_route, Mount):
            if (path + "/").startswith(other_path.rstrip("/") + "/"):
                raise NotHot(f"{name}: under the mount {other_path}")
        elif method in (other.methods or set()) and _may_overlap(other_path, path):
            raise NotHot(f"{name}: {other_path} comes first and may take the same requests")


def _may_overlap(first: str, second: str) -> bool:
    a, b = first.split("/"), second.split("/")
    return len(a) == len(b) and all(
        x == y or _is_param(x) or _is_param(y) for x, y in zip(a, b, strict=True)
    )


def _is_param(segment: str) -> bool:
    return segment.startswith("{") and segment.endswith("}") and ":" not in segment


class HotWrites:
    """Plain ASGI ahead of FastAPI's router (inside ``Observe`` and ``BodyGuard``: ids, metrics and
    limits as for every request): serves its routes' plain requests, hands on everything else."""

    def __init__(self, app: ASGIApp, routes: Sequence[HotRoute], verifier: TokenVerifier) -> None:
        self.app = app
        self.verifier = verifier
        self.by_method: dict[str, tuple[HotRoute, ...]] = {}
        for route in routes:
            self.by_method[route.method] = (*self.by_method.get(route.method, ()), route)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        routes = self.by_method.get(scope["method"], ()) if scope["type"] == "http" else ()
        path: str = scope.get("path", "")
        for route in routes:
            matched = route.pattern.match(path)
            if matched is not None:
                await self._serve(route, matched.groupdict(), scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _serve(
        self, route: HotRoute, path_params: dict[str, str], scope: Scope, receive: Receive, send: Send
    ) -> None:
        raw = await _read_body(receive)
        arguments = await self._arguments(route, path_params, scope, raw) if raw is not None else None
        if arguments is None:  # not the plain case: the documented route answers it
            await self.app(scope, _replaying(raw or b"", receive), send)
            return
        scope["route"] = route  # as FastAPI's router would set it: the metrics label, the operation
        scope["path_params"] = path_params
        try:
            response = await route.endpoint(**arguments)
        except Exception as error:  # answered by the app's own handlers, as the documented route's are
            handler = _handler_of(scope["app"], error)
            if handler is None:
                raise
            response = await handler(Request(scope), error)
        await response(scope, receive, send)

    async def _arguments(
        self, route: HotRoute, path_params: dict[str, str], scope: Scope, raw: bytes
    ) -> dict[str, Any] | None:
        """The endpoint's arguments, or None wherever the documented route must answer instead."""
        if scope.get("query_string"):
            return None
        authorization = idempotency_key = content_type = None
        for name, value in scope["headers"]:  # the first of each, as Starlette's ``Headers.get``
            if name == b"authorization" and authorization is None:
                authorization = value.decode("latin-1")
            elif name == b"idempotency-key" and idempotency_key is None:
                idempotency_key = value.decode("latin-1")
            elif name == b"content-type" and content_type is None:
                content_type = value
        if content_type is None or content_type.split(b";")[0].strip().lower() != b"application/json":
            return None
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        if idempotency_key is not None and not valid_idempotency_key(idempotency_key):
            return None
        try:
            principal = await self.verifier.principal(token)
            body = route.body_model.model_validate_json(raw)
        except Exception:  # refused, or a fault (Redis away): the documented route answers it as ever
            return None
        arguments: dict[str, Any] = dict(path_params)
        arguments[route.body_param] = body
        for param, check, check_arg in route.principal_params:
            if check is None:
                arguments[param] = principal
                continue
            try:
                arguments[param] = await check(**{check_arg: principal})
            except Exception:
                return None
        state = scope.setdefault("state", {})
        state["principal_kind"] = principal.role.value  # the access log's caller kind (never who)
        app = scope["app"]
        if route.write_params:
            write = Write(
                runtime=app.state.runtime,
                principal=principal,
                operation=f"{route.method} {route.path}",
                request=None if idempotency_key is None else {
                    "path": path_of(scope), "query": "", "body": json.loads(raw),
                },
                idempotency_key=idempotency_key,
                correlation_id=state.get("correlation_id"),
            )
            for param in route.write_params:
                arguments[param] = write
        if route.request_param is not None:
            arguments[route.request_param] = Request(scope)
        return arguments


def _handler_of(app: FastAPI, error: Exception) -> Callable[[Request, Exception], Awaitable[Response]] | None:
    for cls in type(error).__mro__:
        handler = app.exception_handlers.get(cls)
        if handler is not None:
            return handler  # type: ignore[return-value]  # the kit's handlers are all async
    return None


def path_of(scope: Scope) -> str:
    path: str = scope.get("path", "")
    return path


async def _read_body(receive: Receive) -> bytes | None:
    """The whole body; None if the client went away first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replaying(raw: bytes, receive: Receive) -> Receive:
    """``receive`` for the documented route: the body already read, then the connection's own."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    return replay


def plan(app: FastAPI, endpoints: Sequence[Endpoint]) -> list[HotRoute]:
    """The plans of ``endpoints``' routes in ``app`` (``NotHot`` for one that cannot be hot)."""
    return [HotRoute.of(app, endpoint) for endpoint in endpoints]
