"""Composition root: the runtime (database, outbox relay, the consumer of registered partners,
premium-expiry job) and the HTTP routes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog
from fastapi import FastAPI

from services.registration import api, consumers, handlers
from services.registration.attestation import AttestationVerifier
from shared.contracts.topics import GATEWAY_PARTNERS
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
        # Partners registered through the gateway: consents may name them (the seed is PARTNER_CODES).
        consumers=[ConsumerSpec(consumers.router, [GATEWAY_PARTNERS])],
    )
    app = create_http_app(
        service="registration",
        settings=settings,
        routers=[api.router],
        lifespan=runtime.lifespan,
        readiness=runtime.readiness,
        description=(
            "ふるさと住民登録 (furusato resident registration): accounts, registrations with municipalities "
            "(basic and premium), premium review, consents and erasure. Events: registration.residents.v1."
        ),
    )
    app.state.attestations = attestations
    return app
