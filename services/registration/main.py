"""Composition root: the runtime (database, the sample catalogues of designated activities, outbox
relay, the consumer of registered partners, premium-expiry job) and the HTTP routes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog
from fastapi import FastAPI

from services.registration import api, consumers, export_api, exports, handlers
from services.registration.attestation import AttestationVerifier
from shared.contracts.topics import EXPORT_PARTS, GATEWAY_PARTNERS
from shared.kit.consumer import EventRouter
from shared.kit.http import create_app as create_http_app
from shared.kit.service import BackgroundTask, ConsumerSpec, ServiceRuntime
from shared.kit.settings import Settings, get_settings

log = structlog.get_logger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"


def maintenance(interval_s: float) -> BackgroundTask:
    """Every ``interval_s``: expire premium registrations past their validity (safe with several
    replicas) and drop relayed outbox rows of erased residents."""

    async def premium_expiry(runtime: ServiceRuntime) -> None:
        while True:
            try:
                await handlers.expire_premiums(runtime)
                await handlers.purge_relayed_events_of_erased(runtime)
            except Exception:
                log.exception("maintenance round failed; retrying next round")
            await asyncio.sleep(interval_s)

    return premium_expiry


def create_app(
    settings: Settings | None = None, *, maintenance_interval_s: float = 60.0, identity_verifiers: str | None = None
) -> FastAPI:
    """``identity_verifiers``: the trusted identity-verification providers (``{issuer: JWKS}`` JSON), in
    place of ``NICHIIKI_IDENTITY_VERIFIER_JWKS``."""
    settings = settings or get_settings()
    attestations = AttestationVerifier.from_settings(settings, identity_verifiers)
    runtime = ServiceRuntime(
        "registration", migrations=MIGRATIONS, background=[maintenance(maintenance_interval_s)], settings=settings,
        # The demo towns' sample catalogues of designated activities (premium requests pick from them).
        prepare=[handlers.seed_sample_catalogue],
        # Partners registered through the gateway: consents may name them (the seed is PARTNER_CODES).
        consumers=[
            # ... and each service's part of a resident's data export.
            ConsumerSpec(
                EventRouter.combined(consumers.router, exports.parts_router), [GATEWAY_PARTNERS, EXPORT_PARTS]
            ),
        ],
    )
    app = create_http_app(
        service="registration",
        settings=settings,
        routers=[api.router, export_api.router],
        lifespan=runtime.lifespan,
        readiness=runtime.readiness,
        hot_writes=[api.register],  # the registrations of a whole campaign arrive here
        description=(
            "ふるさと住民登録 (furusato resident registration): accounts, registrations with municipalities "
            "(basic and premium), premium review, consents and erasure. Events: registration.residents.v1."
        ),
    )
    app.state.attestations = attestations
    return app
