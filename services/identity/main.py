"""Composition root of the identity provider: settings, runtime (database, signing key, development
seed), the Redis client that announces sign-outs, HTTP app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

from fastapi import FastAPI
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.asyncio import Redis

from services.identity import api, consumers
from services.identity.domain import audiences
from services.identity.handlers import REDIS_STATE, SERVICE, IdentityService, Provider
from shared.contracts.topics import ERASURES, SERVICES
from shared.kit.auth import ConfigurationError, current_principal
from shared.kit.clock import SYSTEM_CLOCK, Clock
from shared.kit.http import create_app as create_http_app
from shared.kit.service import ConsumerSpec, ServiceRuntime
from shared.kit.settings import SERVICE_PORTS, Settings, get_settings

MIGRATIONS = Path(__file__).parent / "migrations"
#: The service's local port (``shared/kit/settings.py`` lists it once the platform starts it).
DEFAULT_PORT = 8107

DESCRIPTION = """\
The platform's embedded OpenID Connect provider: residents sign up and sign in with a password
(TOTP optional), municipal staff with a password and TOTP, readers and admins with a password,
partners and the payment provider with client credentials. Access tokens are ES256 JWTs (15
minutes) verified by every service against `/jwks.json`; refresh tokens rotate; `/oauth/revoke`
signs a session out everywhere. A prefecture may use its own provider instead (docs/identity.md).
"""


class IdentityConfig(BaseSettings):
    """This service's own knobs (``NICHIIKI_IDENTITY_*``)."""

    model_config = SettingsConfigDict(env_prefix="NICHIIKI_IDENTITY_", extra="ignore")

    #: Encrypts the signing keys' private halves in the database (PKCS#8, best available encryption).
    key_passphrase: str | None = None
    #: The first admin of a production platform, made at start-up while no admin account exists
    #: (``NICHIIKI_IDENTITY_BOOTSTRAP_ADMIN_EMAIL`` / ``_PASSWORD``; empty counts as unset).
    bootstrap_admin_email: str | None = None
    bootstrap_admin_password: str | None = None


def issuer_of(settings: Settings) -> str:
    """``NICHIIKI_OIDC_ISSUER`` (without a trailing slash, as the services compare it), else this
    service's local URL (development)."""
    if settings.oidc_issuer:
        return settings.oidc_issuer.rstrip("/")
    return f"http://127.0.0.1:{SERVICE_PORTS.get(SERVICE, DEFAULT_PORT) + settings.port_offset}"


def create_app(
    settings: Settings | None = None, *, config: IdentityConfig | None = None, clock: Clock | None = None
) -> FastAPI:
    """The identity app; tests pass their settings and a clock. ``NICHIIKI_ENV=development`` seeds the
    development accounts and clients (services/identity/development.py)."""
    settings = settings or get_settings()
    config = config or IdentityConfig()
    provider = Provider(
        issuer=issuer_of(settings), audience=audiences([*SERVICES, SERVICE]),
        max_token_lifetime=timedelta(seconds=settings.token_max_lifetime_s), key_passphrase=config.key_passphrase,
    )
    holder: dict[str, IdentityService] = {}

    async def ensure_signing_key(runtime: ServiceRuntime) -> None:
        await holder["service"].ensure_signing_key()

    async def seed_development(runtime: ServiceRuntime) -> None:
        if settings.env == "development":
            await holder["service"].seed_development()

    async def bootstrap_admin(runtime: ServiceRuntime) -> None:
        if settings.env == "development":
            return  # the development seed has its admin
        email, password = config.bootstrap_admin_email or None, config.bootstrap_admin_password or None
        if email and password:
            await holder["service"].bootstrap_admin(email, password)
        elif email or password:
            raise ConfigurationError(
                "set both NICHIIKI_IDENTITY_BOOTSTRAP_ADMIN_EMAIL and NICHIIKI_IDENTITY_BOOTSTRAP_ADMIN_PASSWORD, "
                "or neither"
            )

    runtime = ServiceRuntime(
        SERVICE, migrations=MIGRATIONS, prepare=[ensure_signing_key, seed_development, bootstrap_admin],
        settings=settings, clock=clock or SYSTEM_CLOCK,
        # A resident's erasure closes their account.
        consumers=[ConsumerSpec(consumers.router, [ERASURES])],
    )
    service = holder["service"] = IdentityService(runtime, provider)

    async def ping_redis() -> bool:
        client: Redis | None = runtime.state.get(REDIS_STATE)
        return client is not None and bool(await client.ping())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.redis_url is None:
            raise RuntimeError("the identity service announces sign-outs in Redis: set NICHIIKI_REDIS_URL")
        runtime.state[REDIS_STATE] = Redis.from_url(
            settings.redis_url, socket_connect_timeout=1.0, socket_timeout=1.0, health_check_interval=30
        )
        runtime.readiness.checks["redis"] = ping_redis
        try:
            async with runtime.lifespan(app):
                yield
        finally:
            client = runtime.state.pop(REDIS_STATE, None)
            if client is not None:
                await client.aclose()

    app = create_http_app(
        service=SERVICE, settings=settings, routers=[api.oauth, api.router], lifespan=lifespan,
        readiness=runtime.readiness, description=DESCRIPTION, form_paths=api.FORM_PATHS,
    )
    app.state.identity = service
    # Its own tokens are verified here, not fetched over HTTP from itself (api.identity_principal).
    app.dependency_overrides[current_principal] = api.identity_principal
    return app
