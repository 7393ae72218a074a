"""Composition root: settings, runtime (database, the consumer of the current generation, the
generation follower), HTTP app."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.insights.api import router
from services.insights.consumers import TOPICS, make_router
from services.insights.handlers import InsightsService
from shared.kit.clock import SYSTEM_CLOCK, Clock
from shared.kit.http import create_app as create_http_app
from shared.kit.service import ConsumerSpec, ServiceRuntime
from shared.kit.settings import Settings, get_settings

SERVICE = "insights"
MIGRATIONS = Path(__file__).parent / "migrations"


class InsightsConfig(BaseSettings):
    """This service's own knobs (``NICHIIKI_INSIGHTS_*``)."""

    model_config = SettingsConfigDict(env_prefix="NICHIIKI_INSIGHTS_", extra="ignore")

    #: The consumer group / inbox name before ``-g<generation>``.
    consumer_name: str = Field(default=SERVICE, pattern=r"^[a-z0-9_.-]{1,90}$")
    #: How often a replica checks whether a rebuild (at any replica) started a new generation.
    follow_interval_s: float = Field(default=1.0, gt=0)


def create_app(
    settings: Settings | None = None, *, config: InsightsConfig | None = None, clock: Clock | None = None
) -> FastAPI:
    """The insights app; tests pass their settings, config and a clock."""
    settings = settings or get_settings()
    config = config or InsightsConfig()
    runtime = ServiceRuntime(
        SERVICE, migrations=MIGRATIONS,
        # Replaced at start by the generation the database is at (``InsightsService.prepare``).
        consumers=[ConsumerSpec(make_router(1), TOPICS, name=f"{config.consumer_name}-g1")],
        settings=settings, clock=clock or SYSTEM_CLOCK,
    )
    service = InsightsService(
        runtime, router_for=make_router, topics=TOPICS, consumer_name=config.consumer_name,
        follow_interval_s=config.follow_interval_s,
    )
    runtime.prepare = [service.prepare]
    runtime.background = [service.follow]
    app = create_http_app(
        service=SERVICE, settings=settings, routers=[router], lifespan=runtime.lifespan, readiness=runtime.readiness,
        description=(
            "The national picture: registrations, certificates, travel grants, donations, plans and support "
            "corporations against the 600 + 600 KPIs, and relationship population, per municipality, prefecture "
            "and month, as JSON and CSV; public tables withhold counts of people under 10. A read model of "
            "registration.residents.v1, certification.certificates.v1, subsidy.grants.v1, donation.donations.v1, "
            "planning.plans.v1 and planning.corporations.v1, rebuildable from the earliest offsets."
        ),
    )
    app.state.insights = service
    return app
