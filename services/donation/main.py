"""Composition root of the donation service: settings, runtime (database, migrations, outbox relay,
the residents consumer, the retention job) and routes."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.contracts.topics import ERASURES, EXPORT_REQUESTS
from shared.kit.clock import SYSTEM_CLOCK, Clock
from shared.kit.consumer import EventRouter
from shared.kit.data_export import export_router
from shared.kit.http import create_app as create_http_app
from shared.kit.service import ConsumerSpec, ServiceRuntime
from shared.kit.settings import Settings, get_settings

from . import consumers
from .api import confirm_donation, router
from .domain import DEFAULT_RETENTION_YEARS
from .export import EXPORT_TABLES
from .handlers import DonationService
from .scheduler import retention_scheduler

SERVICE = "donation"
MIGRATIONS = Path(__file__).parent / "migrations"


class DonationConfig(BaseSettings):
    """This service's own knobs (``NICHIIKI_DONATION_*``)."""

    model_config = SettingsConfigDict(env_prefix="NICHIIKI_DONATION_", extra="ignore")

    #: Years an erased donor's receipts keep their name and address after the fiscal year of the
    #: tax the donation lowered (domain.py, "erasure and legal retention"): 5, or the
    #: municipality's rules if longer.
    retention_years: int = Field(default=DEFAULT_RETENTION_YEARS, ge=5, le=30)
    #: How often each replica runs the retention job (one round at a time across replicas).
    retention_interval_s: float = Field(default=3600.0, gt=0)
    #: The consumer group / inbox name of the residents consumer.
    consumer_name: str = Field(default=SERVICE, pattern=r"^[a-z0-9_.-]{1,100}$")


def create_app(
    settings: Settings | None = None, *, pool_size: int = 10, clock: Clock | None = None,
    config: DonationConfig | None = None,
) -> FastAPI:
    """The donation app; tests pass their settings and may pass a clock (today in Japan) and config."""
    settings = settings or get_settings()
    config = config or DonationConfig()
    runtime = ServiceRuntime(
        SERVICE,
        migrations=MIGRATIONS,
        consumers=[
            ConsumerSpec(
                EventRouter.combined(consumers.router, export_router(SERVICE, EXPORT_TABLES)),
                [ERASURES, EXPORT_REQUESTS], name=config.consumer_name,
            ),
        ],
        background=[retention_scheduler(config.retention_interval_s, config.retention_years)],
        settings=settings,
        pool_size=pool_size,
        clock=clock or SYSTEM_CLOCK,
    )
    app = create_http_app(
        service=SERVICE,
        settings=settings,
        routers=[router],
        lifespan=runtime.lifespan,
        readiness=runtime.readiness,
        hot_writes=[confirm_donation],  # every payment the provider confirms arrives here
        description=(
            "Hometown-tax (ふるさと納税), corporate and mile donations to municipalities: donation receipts with a "
            "gapless number per municipality and year, refunds, the yearly one-stop exception counts and each "
            "municipality's fund ledger per earmark. A donor is erased when their resident withdraws or on "
            "request; receipts keep what the law asks until its period ends. Events: donation.donations.v1; "
            "consumes registration.erasures.v1 (erasures)."
        ),
    )
    app.state.donation = DonationService(runtime, retention_years=config.retention_years)
    return app
