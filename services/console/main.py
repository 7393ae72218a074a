"""Composition root of the console: settings, the Redis session store, one HTTP client for the
services, the pages; ``python -m services.console``.

The console has no database and no Kafka client: it is a front for people over the services'
HTTP APIs, so it needs no ``ServiceRuntime`` (whose work is migrations, a pool, a relay and
consumers). It still is a kit app (``shared.kit.http.create_app``): ``/healthz``, ``/readyz``
(Redis answers), ``/metrics``, request ids and logs like every service.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import structlog
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.asyncio import Redis
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

import shared.fonts
from services.console.clients import ApiError, Services
from services.console.pages import catalogue, insights, public, resident, staff
from services.console.pages.base import Console, CsrfRefused, PageRefused, SignInRequired, problem_errors, viewer_of
from services.console.session import SessionStore
from shared.contracts.topics import BACKENDS
from shared.kit.http import Readiness, problem
from shared.kit.http import create_app as create_http_app
from shared.kit.settings import Settings, get_settings

log = structlog.get_logger(__name__)

SERVICE = "console"
STATIC = Path(__file__).parent / "static"
#: IPAexGothic (shared/fonts): served by the console itself, so pages look right on terminals that
#: have no Japanese font and reach no CDN (municipal closed networks, LGWAN).
FONT = Path(shared.fonts.__file__).parent / "ipaexg.ttf"


class ConsoleConfig(BaseSettings):
    """The console's own knobs (``NICHIIKI_CONSOLE_*``)."""

    model_config = SettingsConfigDict(env_prefix="NICHIIKI_CONSOLE_", extra="ignore")

    #: Where each service answers, as JSON ``{"registration": "http://registration:8000", ...}``; a
    #: service not named is at its local port (``./nichiiki start``).
    service_urls: dict[str, str] = {}
    #: The session cookie's ``Secure`` flag; unset: on everywhere but development (plain-HTTP localhost).
    secure_cookies: bool | None = None
    #: How long a console session lives without use (the provider's own session ends sooner for staff: 12 h).
    session_ttl_s: int = 12 * 3600


def service_urls(settings: Settings, configured: Mapping[str, str]) -> dict[str, str]:
    local = {name: f"http://127.0.0.1:{settings.service_port(name)}" for name in BACKENDS}
    return {**local, **configured}


def create_app(settings: Settings | None = None, *, config: ConsoleConfig | None = None) -> FastAPI:
    settings = settings or get_settings()
    # httpx logs every URL it calls at INFO, resident ids in paths included: the console's own request
    # log (the kit's, by route) is enough, and erased residents must not linger in logs.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    config = config or ConsoleConfig()
    readiness = Readiness()
    holder: dict[str, Console] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.redis_url is None:
            raise RuntimeError("the console keeps its sessions in Redis: set NICHIIKI_REDIS_URL")
        redis = Redis.from_url(settings.redis_url, socket_connect_timeout=1.0, socket_timeout=2.0,
                               health_check_interval=30)
        services = Services(service_urls(settings, config.service_urls))
        console = holder["console"] = app.state.console = Console(
            services=services, sessions=SessionStore(redis, config.session_ttl_s), redis=redis,
            verifier=app.state.verifier,
            secure_cookies=(
                config.secure_cookies if config.secure_cookies is not None else settings.env != "development"
            ),
            development=settings.env == "development",
        )
        readiness.checks["redis"] = lambda: _ping(console.redis)
        try:
            yield
        finally:
            await services.close()
            await redis.aclose()
            await app.state.verifier.close()

    app = create_http_app(
        service=SERVICE, settings=settings, routers=[public.router, staff.router, catalogue.router, resident.router,
                                                 insights.router],
        lifespan=lifespan, readiness=readiness, form_paths=("*",),
        description="The staff console and the resident pages (HTML); no API of its own.",
    )
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/fonts/ipaexg.ttf", include_in_schema=False)
    async def font() -> FileResponse:
        return FileResponse(FONT, media_type="font/ttf", headers={"cache-control": "public, max-age=604800"})

    _install_page_errors(app)
    return app


async def _ping(redis: Redis) -> bool:
    return bool(await redis.ping())


def _install_page_errors(app: FastAPI) -> None:
    """Pages answer people: a refusal is a page in their language, never problem+json."""

    @app.exception_handler(SignInRequired)
    async def sign_in_required(request: Request, error: SignInRequired) -> Response:
        target = f"/signin?next={error.next_path}" + ("&expired=1" if error.expired else "")
        return RedirectResponse(target, status_code=303)

    @app.exception_handler(PageRefused)
    async def page_refused(request: Request, error: PageRefused) -> Response:
        viewer = await viewer_of(request)
        key = "error.not_found_page" if error.status == 404 else "error.forbidden_page"
        return viewer.render("error.html", status=error.status, errors=[("", viewer.t(key))])

    @app.exception_handler(CsrfRefused)
    async def csrf_refused(request: Request, error: CsrfRefused) -> Response:
        viewer = await viewer_of(request)
        return viewer.render("error.html", status=403, errors=[("", viewer.t("error.csrf"))])

    @app.exception_handler(ApiError)
    async def service_refused(request: Request, error: ApiError) -> Response:
        # A page whose reading the service refused (another municipality's object: 403/404).
        viewer = await viewer_of(request)
        status = error.status if error.status < 500 else 502
        if error.status == 401:  # the provider's session ended (signed out elsewhere, expired)
            return await sign_in_required(request, SignInRequired(request.url.path, expired=True))
        return viewer.render("error.html", status=status, errors=problem_errors(error, viewer.lang))

    @app.exception_handler(StarletteHTTPException)
    async def not_found(request: Request, error: StarletteHTTPException) -> Response:
        if not hasattr(request.app.state, "console"):  # before start-up (no sessions yet): the kit's answer
            return problem(error.status_code, f"http-{error.status_code}", str(error.detail), instance=request.url.path)
        viewer = await viewer_of(request)
        key = "error.not_found_page" if error.status_code == 404 else "error.title"
        page: HTMLResponse = viewer.render("error.html", status=error.status_code, errors=[("", viewer.t(key))])
        return page
