"""Composition root of the partner gateway: runtime, consumers, cache sync, HTTP routes.

Start order: migrations and the partner seed (before any consumer runs, so no event meets an
empty partner table), the Redis client, then the kit runtime (relay, consumers) and the cache
sync task, which first rebuilds Redis from PostgreSQL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from prometheus_client import Counter
from starlette.middleware import Middleware

from services.partner_gateway import api
from services.partner_gateway.auth import ApiKeyCache
from services.partner_gateway.cache import REDIS_STATE, VerificationCache, open_redis, sync_verification_cache
from services.partner_gateway.consumers import build_router
from services.partner_gateway.handlers import SERVICE, Gateway, PartnerDirectory, seed_partners
from shared.contracts.topics import CERTIFICATES, GRANTS, RESIDENTS
from shared.kit.http import create_app as create_service_app
from shared.kit.service import ConsumerSpec, ServiceRuntime
from shared.kit.settings import Settings, get_settings

MIGRATIONS = Path(__file__).parent / "migrations"

DESCRIPTION = """\
What airlines, railways and ferries may see of certified dual residents: a consented feed per
partner (`partner.<code>.v1`, Kafka), on-demand certificate verification, and the record of every
delivery (APPI Art. 29). Partners authenticate with an `X-Api-Key` the gateway issues or a bearer
JWT with role `partner`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    partners = PartnerDirectory()
    runtime = ServiceRuntime(
        SERVICE,
        migrations=MIGRATIONS,
        consumers=[ConsumerSpec(build_router(partners), [RESIDENTS, CERTIFICATES, GRANTS])],
        prepare=[lambda rt: load_partners(rt, partners)],
        background=[sync_verification_cache],
        settings=settings,
    )
    verification = VerificationCache(runtime)
    runtime.state["verification"] = verification
    gateway = Gateway(runtime, partners, ApiKeyCache(runtime), verification)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.state[REDIS_STATE] = open_redis(settings)
        try:
            async with runtime.lifespan(app):
                yield
        finally:
            client = runtime.state.pop(REDIS_STATE, None)
            if client is not None:
                await client.aclose()

    app = create_service_app(
        service=SERVICE, settings=settings, routers=[api.router], lifespan=lifespan,
        readiness=runtime.readiness, description=DESCRIPTION,
        hot_paths=[Middleware(api.VerificationHotPath, gateway=gateway)],
    )
    app.state.gateway = gateway
    verification.lookups = Counter(
        "partner_gateway_verifications_total", "Certificate verifications by where the answer came from",
        ["source"], registry=app.state.metrics_registry,
    )
    return app


async def load_partners(runtime: ServiceRuntime, partners: PartnerDirectory) -> None:
    """Seed the partners (idempotent) before the consumers that route by them start."""
    async with runtime.pool.acquire() as conn:
        partners.replace(await seed_partners(conn))
