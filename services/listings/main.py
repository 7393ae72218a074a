"""Composition root: settings, runtime (database, outbox, consumer, sweep), HTTP app."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.listings import consumers
from services.listings.api import router
from services.listings.export import EXPORT_TABLES
from services.listings.handlers import ListingsService
from services.listings.scheduler import listings_sweep
from shared.contracts.topics import EXPORT_REQUESTS
from shared.kit.clock import SYSTEM_CLOCK, Clock
from shared.kit.consumer import BACKGROUND_PACE_S, EventRouter
from shared.kit.data_export import export_router
from shared.kit.http import create_app as create_http_app
from shared.kit.service import ConsumerSpec, ServiceRuntime
from shared.kit.settings import Settings, get_settings

SERVICE = "listings"
MIGRATIONS = Path(__file__).parent / "migrations"


class ListingsConfig(BaseSettings):
    """This service's own knobs (``NICHIIKI_LISTINGS_*``)."""

    model_config = SettingsConfigDict(env_prefix="NICHIIKI_LISTINGS_", extra="ignore")

    #: How often each replica expires listings and sends due digests ("immediate" digests wait at
    #: most this long).
    sweep_interval_s: float = Field(default=30.0, gt=0)
    #: Listings expired and matches digested per sweep transaction.
    sweep_batch: int = Field(default=5000, ge=1, le=100_000)


def create_app(
    settings: Settings | None = None, *, config: ListingsConfig | None = None, clock: Clock | None = None
) -> FastAPI:
    """The listings app; tests pass their settings, config and a clock."""
    settings = settings or get_settings()
    config = config or ListingsConfig()
    runtime = ServiceRuntime(
        SERVICE,
        migrations=MIGRATIONS,
        consumers=[ConsumerSpec(
            EventRouter.combined(consumers.router, export_router(SERVICE, EXPORT_TABLES)),
            [*consumers.TOPICS, EXPORT_REQUESTS], pace_s=BACKGROUND_PACE_S,
        )],
        background=[listings_sweep(config.sweep_interval_s, config.sweep_batch)],
        settings=settings,
        clock=clock or SYSTEM_CLOCK,
    )
    app = create_http_app(
        service=SERVICE, settings=settings, routers=[router], lifespan=runtime.lifespan, readiness=runtime.readiness,
        description=(
            "Listings for dual residents (空き家, お試し居住, なりわい, コミュニティ, coworking, 保育園留学) "
            "published by municipalities and their support corporations; vacant houses and trial stays only "
            "with the owner's consent. Residents' interests and digests of matching listings; \"interested\" "
            "with the resident's consent to give the owner their contact, each provision recorded. Published "
            "listings are public under /v1/public. Events: listings.listings.v1, listings.digests.v1."
        ),
    )
    app.state.listings = ListingsService(runtime, sweep_batch=config.sweep_batch)
    return app
