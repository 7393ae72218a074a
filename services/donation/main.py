"""Composition root of the donation service: runtime (database, migrations, outbox relay) and routes."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from shared.kit.clock import SYSTEM_CLOCK, Clock
from shared.kit.http import create_app as create_http_app
from shared.kit.service import ServiceRuntime
from shared.kit.settings import Settings, get_settings

from .api import router
from .handlers import DonationService

SERVICE = "donation"
MIGRATIONS = Path(__file__).parent / "migrations"


def create_app(settings: Settings | None = None, *, pool_size: int = 10, clock: Clock | None = None) -> FastAPI:
    """The donation app; tests pass their settings and may pass a clock (today in Japan)."""
    settings = settings or get_settings()
    runtime = ServiceRuntime(
        SERVICE, migrations=MIGRATIONS, settings=settings, pool_size=pool_size, clock=clock or SYSTEM_CLOCK
    )
    app = create_http_app(
        service=SERVICE,
        settings=settings,
        routers=[router],
        lifespan=runtime.lifespan,
        readiness=runtime.readiness,
        description=(
            "Hometown-tax (ふるさと納税), corporate and mile donations to municipalities: donation receipts with a "
            "gapless number per municipality and year, refunds, the yearly one-stop exception counts and each "
            "municipality's fund ledger per earmark. Events: donation.donations.v1."
        ),
    )
    app.state.donation = DonationService(runtime)
    return app
