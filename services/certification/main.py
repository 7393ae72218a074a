"""Composition root: settings, runtime (database, outbox, consumer, scheduler), HTTP app."""

from __future__ import annotations

from pathlib import Path

import structlog
from fastapi import FastAPI
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.certification import consumers, store
from services.certification.api import router
from services.certification.domain import seed_schemes
from services.certification.export import EXPORT_TABLES
from services.certification.handlers import CertificationService
from services.certification.scheduler import expiry_scheduler
from shared.contracts.topics import EXPORT_REQUESTS, GATEWAY_PARTNERS, PLANS, RESIDENTS
from shared.kit.clock import SYSTEM_CLOCK, Clock
from shared.kit.consumer import BACKGROUND_PACE_S, EventRouter
from shared.kit.data_export import export_router
from shared.kit.http import create_app as create_http_app
from shared.kit.service import ConsumerSpec, ServiceRuntime
from shared.kit.settings import Settings, get_settings
from shared.reference import SPECIFIC_RESIDENCE_PLAN, plans, travel_programs

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
        consumers=[
            ConsumerSpec(
                EventRouter.combined(consumers.router, export_router(SERVICE, EXPORT_TABLES)),
                [RESIDENTS, GATEWAY_PARTNERS, EXPORT_REQUESTS, PLANS], name=config.consumer_name,
                pace_s=BACKGROUND_PACE_S,
            ),
        ],
        prepare=[seed_municipality_rules],
        background=[expiry_scheduler(config.expiry_interval_s)],
        settings=settings,
        clock=clock or SYSTEM_CLOCK,
    )

    app = create_http_app(
        service=SERVICE, settings=settings, routers=[router], lifespan=runtime.lifespan, readiness=runtime.readiness,
        description=(
            "Dual-resident certification (二地域居住者の証明): a person with a furusato registration applies to a "
            "municipality with a certification scheme (under its specific residence promotion plan or a model "
            "project), its staff approve or reject the application, "
            "and certificates are issued, renewed, revoked and expire. "
            "Events: certification.applications.v1, certification.certificates.v1."
        ),
    )
    app.state.certification = CertificationService(runtime, retry_after_s=config.resident_retry_after_s)

    return app


async def seed_municipality_rules(runtime: ServiceRuntime) -> None:
    """The reference schemes: a plan basis for every town with an adopted 特定居住促進計画, a
    model-project basis for every other town of a travel programme (rows that exist stay as edited).

    The plans themselves are the planning service's (``planning.plans.v1``); this seed only lets a
    fresh database certify before those events have been read."""
    adopted = {
        plan.municipality_code: plan.adopted_on
        for plan in plans()
        if plan.level == "municipality" and plan.plan == SPECIFIC_RESIDENCE_PLAN
    }
    programme_towns = [code for programme in travel_programs() for code in programme.municipality_codes]
    async with runtime.pool.acquire() as conn:
        added = await store.seed_rules(conn, seed_schemes(adopted, programme_towns))
    if added:
        log.info("certification schemes seeded", added=added)
