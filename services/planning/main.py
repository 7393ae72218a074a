"""Composition root: settings, runtime (database, outbox, the reference seed), HTTP app."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.planning.api import router
from services.planning.domain import DEFAULT_ANSWER_DAYS
from services.planning.handlers import PlanningService, seed_reference
from shared.kit.clock import SYSTEM_CLOCK, Clock
from shared.kit.http import create_app as create_http_app
from shared.kit.service import ServiceRuntime
from shared.kit.settings import Settings, get_settings

SERVICE = "planning"
MIGRATIONS = Path(__file__).parent / "migrations"


class PlanningConfig(BaseSettings):
    """This service's own knobs (``NICHIIKI_PLANNING_*``)."""

    model_config = SettingsConfigDict(env_prefix="NICHIIKI_PLANNING_", extra="ignore")

    #: Days a municipality has to answer a support corporation's proposal.
    answer_days: int = Field(default=DEFAULT_ANSWER_DAYS, ge=1, le=365)


def create_app(
    settings: Settings | None = None, *, config: PlanningConfig | None = None, clock: Clock | None = None
) -> FastAPI:
    """The planning app; tests pass their settings, config and a clock."""
    settings = settings or get_settings()
    config = config or PlanningConfig()
    runtime = ServiceRuntime(
        SERVICE, migrations=MIGRATIONS, prepare=[seed_reference], settings=settings, clock=clock or SYSTEM_CLOCK,
    )
    app = create_http_app(
        service=SERVICE, settings=settings, routers=[router], lifespan=runtime.lifespan, readiness=runtime.readiness,
        description=(
            "Plans (広域的地域活性化基盤整備計画, 特定居住促進計画) with their versions and lifecycle, support "
            "corporations (特定居住支援法人) with their supervision and proposals, councils (特定居住促進協議会). "
            "Adopted plans and designated corporations are public under /v1/public. "
            "Events: planning.plans.v1, planning.corporations.v1, planning.councils.v1."
        ),
    )
    app.state.planning = PlanningService(runtime, answer_days=config.answer_days)
    return app
