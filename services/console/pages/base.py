"""What every page shares: who is looking (``Viewer``), their language, their session and its
tokens (refreshed when due), CSRF-checked forms, rendering, paging and the refusals a page turns
into a sign-in redirect or an error page. Pages only orchestrate: read a form, call a service, render.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import structlog
from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from redis.asyncio import Redis

from services.console import i18n
from services.console.clients import ApiError, Services
from services.console.i18n import LANG_COOKIE, Language
from services.console.session import ANONYMOUS_CSRF_COOKIE, COOKIE, Session, SessionStore, same_token
from shared.kit.auth import TokenVerifier, Unauthenticated
from shared.reference import municipality

log = structlog.get_logger(__name__)

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
PAGE_SIZE = 25
#: Where each role lands after signing in.
HOME_OF_ROLE = {"staff": "/staff", "resident": "/my", "prefecture": "/insights", "ministry": "/insights",
                "admin": "/insights"}


@dataclass
class Console:
    """The console's parts, made once by the composition root (``main.create_app``)."""

    services: Services
    sessions: SessionStore
    redis: Redis
    verifier: TokenVerifier
    secure_cookies: bool
    development: bool
    environment: Environment = field(default_factory=lambda: _environment())

    def __post_init__(self) -> None:
        # Templates are compiled once; only in development does each page check them for edits.
        self.environment.auto_reload = self.development


def _environment() -> Environment:
    environment = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]),
                              trim_blocks=True, lstrip_blocks=True, auto_reload=False, cache_size=-1)
    environment.filters["pair_with_town"] = lambda code: (code, f"{_town(code)} ({code})")
    return environment


class SignInRequired(Exception):
    """No session (or it ended): the page sends the browser to sign in, then back."""

    def __init__(self, next_path: str, expired: bool = False) -> None:
        self.next_path, self.expired = next_path, expired


class PageRefused(Exception):
    """The console itself refuses the page (the wrong role): 403, or 404 where existence must not show."""

    def __init__(self, status: int = 403) -> None:
        self.status = status


@dataclass
class Form:
    """A submitted form's fields (the last value of each name; ``getlist`` for repeated names)."""

    pairs: list[tuple[str, str]]

    def get(self, name: str, default: str = "") -> str:
        found = [v for k, v in self.pairs if k == name]
        return found[-1].strip() if found else default

    def raw(self, name: str) -> str:
        found = [v for k, v in self.pairs if k == name]
        return found[-1] if found else ""

    def getlist(self, name: str) -> list[str]:
        return [v for k, v in self.pairs if k == name]

    def kept(self, *secret: str) -> dict[str, str]:
        """What to show again after an error: everything typed but secrets (passwords)."""
        return {k: v for k, v in self.pairs if k not in (*secret, "csrf")}


@dataclass
class Viewer:
    """The person behind a request: language, session (None: not signed in), the console's parts."""

    request: Request
    console: Console
    lang: Language
    session: Session | None

    @property
    def services(self) -> Services:
        return self.console.services

    @property
    def signed_in(self) -> Session:
        assert self.session is not None
        return self.session

    @property
    def municipality(self) -> str:
        code = self.signed_in.municipality
        if code is None:
            raise PageRefused(403)
        return code

    def t(self, key: str, **values: object) -> str:
        return i18n.t(key, self.lang, **values)

    async def token(self) -> str:
        """A live access token of the session: refreshed at the identity provider when due, once
        per session at a time (a refresh token is good once; a second use would end the session)."""
        session = self.signed_in
        if not session.due_for_refresh:
            return session.access_token
        lock = f"nichiiki:console:refreshing:{session.id}"
        if await self.console.redis.set(lock, "1", nx=True, ex=15):
            try:
                await self._refresh(session)
            finally:
                await self.console.redis.delete(lock)
            return session.access_token
        for _ in range(50):  # another request of this session refreshes: take its result
            await asyncio.sleep(0.1)
            fresh = await self.console.sessions.load(session.id)
            if fresh is None:
                break
            if not fresh.due_for_refresh:
                self.session = fresh
                return fresh.access_token
        raise SignInRequired(self.request.url.path, expired=True)

    async def _refresh(self, session: Session) -> None:
        if not session.refresh_token:
            await self.console.sessions.delete(session.id)
            raise SignInRequired(self.request.url.path, expired=True)
        try:
            tokens = await self.services.refresh(session.refresh_token)
            principal = await self.console.verifier.principal(tokens.access_token)
        except (ApiError, Unauthenticated) as error:
            log.info("session refresh refused; signing in again", error=str(error))
            await self.console.sessions.delete(session.id)
            raise SignInRequired(self.request.url.path, expired=True) from None
        session.with_tokens(principal, tokens.access_token, tokens.refresh_token, tokens.expires_in)
        await self.console.sessions.save(session)

    # -- rendering ---------------------------------------------------------------------------

    def csrf(self) -> str:
        if self.session is not None:
            return self.session.csrf
        token: str = self.request.state.anonymous_csrf
        return token

    def render(self, template: str, *, status: int = 200, **context: Any) -> HTMLResponse:
        lang = self.lang
        page = self.console.environment.get_template(template).render(
            lang=lang, viewer=self, session=self.session, csrf=self.csrf(), path=self.request.url.path,
            query=str(self.request.url.query), form=context.pop("form", {}), errors=context.pop("errors", []),
            notice=_notice(self.request.query_params.get("notice")),
            t=lambda key, **values: i18n.t(key, lang, **values),
            label=lambda prefix, value: i18n.label(prefix, value, lang),
            town=_town, idempotency_key=lambda: secrets.token_urlsafe(18), **context,
        )
        # A service that failed or did not answer is the console's bad gateway, whatever it said.
        response = HTMLResponse(page, status_code=502 if status >= 500 else status)
        response.headers["cache-control"] = "no-store"
        if self.session is None and self.request.cookies.get(ANONYMOUS_CSRF_COOKIE) != self.csrf():
            response.set_cookie(ANONYMOUS_CSRF_COOKIE, self.csrf(), max_age=3600, httponly=True, samesite="lax",
                                secure=self.console.secure_cookies, path="/")
        return response

    def refusal(self, error: ApiError, template: str, *, status: int | None = None, **context: Any) -> HTMLResponse:
        """A page again with the service's refusal on top, each field error linked to its input."""
        return self.render(template, status=status or error.status,
                           errors=problem_errors(error, self.lang), **context)


def _town(code: str | None) -> str:
    if not code:
        return ""
    try:
        return municipality(code).full_name
    except Exception:  # an unknown code is shown as it is
        return code


def _notice(key: str | None) -> str | None:
    """A success message after a redirect (``?notice=decide.approved``): only catalogue keys."""
    return key if key and key in i18n.CATALOGUE else None


def problem_errors(error: ApiError, lang: Language) -> list[tuple[str, str]]:
    """The error summary of a refusal: its translated title, and per field the service named, a line
    linked to that field (``#field-<name>``)."""
    title = i18n.problem_title(error.code, error.status, lang)
    out: list[tuple[str, str]] = []
    for item in error.errors:
        loc = [str(part) for part in item.get("loc", []) if str(part) not in ("body", "query", "path")]
        if loc:
            out.append((loc[0], f"{title} ({'.'.join(loc)})"))
    return out or [("", title)]


def redirect(path: str, notice: str | None = None) -> RedirectResponse:
    """After a successful POST: see the result page (303), with a message."""
    target = path + (("&" if "?" in path else "?") + urlencode({"notice": notice}) if notice else "")
    return RedirectResponse(target, status_code=303)


async def viewer_of(request: Request) -> Viewer:
    console: Console = request.app.state.console
    session = await console.sessions.load(request.cookies.get(COOKIE))
    if session is None:
        request.state.anonymous_csrf = request.cookies.get(ANONYMOUS_CSRF_COOKIE) or secrets.token_urlsafe(32)
    return Viewer(request, console, i18n.language_of(request.cookies.get(LANG_COOKIE)), session)


def signed_in(*roles: str) -> Callable[[Request], Awaitable[Viewer]]:
    """A page's dependency: a session of one of ``roles``, else sign in (none) or 403 (another role)."""

    async def dependency(request: Request) -> Viewer:
        viewer = await viewer_of(request)
        if viewer.session is None:
            raise SignInRequired(request.url.path)
        if viewer.session.role not in roles:
            raise PageRefused(403)
        return viewer

    return dependency


async def read_form(request: Request, viewer: Viewer) -> Form:
    """The POSTed form, refused (``PageRefused`` 403) without the CSRF token of this session, or,
    before sign-in, of this browser's CSRF cookie."""
    body = (await request.body()).decode("utf-8", errors="replace")
    form = Form(parse_qsl(body, keep_blank_values=True))
    if not same_token(viewer.csrf() if viewer.session else request.cookies.get(ANONYMOUS_CSRF_COOKIE),
                      form.raw("csrf")):
        raise CsrfRefused()
    return form


class CsrfRefused(Exception):
    """A form without this session's CSRF token (forged, or shown before the session changed)."""


@dataclass(frozen=True, slots=True)
class Pager:
    total: int
    limit: int
    offset: int
    base: str
    query: Mapping[str, str]
    #: The "next" link's keyset: ``after=<the last row's id>`` (the service reads an index range after
    #: it, as fast on page 400 as on page 1); None: ``offset=`` links.
    after: str | None = None

    @property
    def first(self) -> int:
        return min(self.offset + 1, self.total)

    @property
    def last(self) -> int:
        return min(self.offset + self.limit, self.total)

    def link(self, offset: int) -> str:
        return f"{self.base}?{urlencode({**self.query, 'offset': max(offset, 0)})}"

    @property
    def previous(self) -> str | None:
        return self.link(self.offset - self.limit) if self.offset > 0 else None

    @property
    def next(self) -> str | None:
        if self.offset + self.limit >= self.total:
            return None
        if self.after is None:
            return self.link(self.offset + self.limit)
        # ``offset`` beside ``after`` only numbers the rows shown ("9,951–9,975 of 10,000").
        return f"{self.base}?{urlencode({**self.query, 'after': self.after, 'offset': self.offset + self.limit})}"


def pager(request: Request, page: Mapping[str, Any], keys: Iterable[str], *, key: str | None = None) -> Pager:
    """The pager of a list page; ``key``: the rows' id field, for keyset "next" links."""
    query = {k: v for k in keys if (v := request.query_params.get(k))}
    items = page.get("items") or []
    after = str(items[-1][key]) if key and items else None
    return Pager(int(page.get("total", 0)), int(page.get("limit", PAGE_SIZE)), int(page.get("offset", 0)),
                 request.url.path, query, after)


def offset_of(request: Request) -> int:
    raw = request.query_params.get("offset", "0")
    return min(int(raw), 1_000_000) if raw.isdigit() else 0


def after_of(request: Request) -> str | None:
    """The id a keyset "next" link reads after (the services refuse ids longer than 64)."""
    raw = request.query_params.get("after", "").strip()
    return raw if raw and len(raw) <= 64 else None
