"""Composition root: settings, runtime (database, outbox, consumer, scheduler), HTTP app."""

from __future__ import annotations

from pathlib import Path

import structlog
from fastapi import FastAPI
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.certification import consumers, store
from services.certification.api import router
from services.certification.handlers import CertificationService
from services.certification.scheduler import expiry_scheduler
from shared.contracts.topics import GATEWAY_PARTNERS, RESIDENTS
from shared.kit.clock import SYSTEM_CLOCK, Clock
from shared.kit.http import create_app as create_http_app
from shared.kit.service import ConsumerSpec, ServiceRuntime
from shared.kit.settings import Settings, get_settings
from shared.reference import SPECIFIC_RESIDENCE_PLAN, plans

SERVICE = "certification"
MIGRATIONS = Path(__file__).parent / "migrations"

log = structlog.get_logger(__name__)


class CertificationConfig(BaseSettings):
    """This service's own knobs (``NICHIIKI_CERTIFICATION_*``)."""

    model_config = SettingsConfigDict(env_prefix="NICHIIKI_CERTIFICATION_", extra="ignore")

    #: How often each replica runs the expiry sweep.
    expiry_interval_s: float = Field(default=300.0, gt=0)
    #: The consumer group / inbox name; a new name on an empty database rebuilds the projection
    #: by replaying registration.residents.v1 from the beginning.
    consumer_name: str = Field(default=SERVICE, pattern=r"^[a-z0-9_.-]{1,100}$")
    #: The retry hint given when an application's resident is not in the projection yet.
    resident_retry_after_s: int = Field(default=2, ge=1)


def create_app(
    settings: Settings | None = None, *, config: CertificationConfig | None = None, clock: Clock | None = None
) -> FastAPI:
    """The certification app; tests pass their settings, config and a clock ("today" in Japan)."""
    settings = settings or get_settings()
    config = config or CertificationConfig()
    runtime = ServiceRuntime(
        SERVICE,
        migrations=MIGRATIONS,
        consumers=[ConsumerSpec(consumers.router, [RESIDENTS, GATEWAY_PARTNERS], name=config.consumer_name)],
        prepare=[seed_municipality_rules],
        background=[expiry_scheduler(config.expiry_interval_s)],
        settings=settings,
        clock=clock or SYSTEM_CLOCK,
    )

    app = create_http_app(
        service=SERVICE, settings=settings, routers=[router], lifespan=runtime.lifespan, readiness=runtime.readiness,
        description=(
            "Dual-resident certification (二地域居住者の証明): a person with a furusato registration applies to a "
            "municipality with a specific residence promotion plan, its staff approve or reject the application, "
            "and certificates are issued, renewed, revoked and expire. "
            "Events: certification.applications.v1, certification.certificates.v1."
        ),
    )
    app.state.certification = CertificationService(runtime, retry_after_s=config.resident_retry_after_s)

    return app


async def seed_municipality_rules(runtime: ServiceRuntime) -> None:
    """Default rules for every municipality of the plans reference data (rows that exist stay as edited)."""
    adopted = {
        plan.municipality_code: plan.adopted_on
        for plan in plans()
        if plan.level == "municipality" and plan.plan == SPECIFIC_RESIDENCE_PLAN
    }
    async with runtime.pool.acquire() as conn:
        added = await store.seed_rules(conn, adopted)
    if added:
        log.info("municipality rules seeded", added=added)
