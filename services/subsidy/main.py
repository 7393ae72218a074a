"""Composition root of the subsidy service: runtime, consumers, the grant sweeper, HTTP routes.

Start order (the kit's): migrations, then the programs are seeded from the reference data (a
``prepare`` step: idempotent, before any consumer runs, so the first certificate already finds its
programs), relay, consumers, and the sweeper that expires grants whose window has ended.
"""

from __future__ import annotations

import asyncio
from datetime import date
from pathlib import Path

import structlog
from fastapi import FastAPI

from services.subsidy import api, consumers, handlers
from services.subsidy.config import SubsidySettings
from services.subsidy.export import EXPORT_TABLES
from shared.contracts.topics import CERTIFICATES, DONATIONS, ERASURES, EXPORT_REQUESTS, GATEWAY_PARTNERS, GATEWAY_TRIPS
from shared.kit.consumer import BACKGROUND_PACE_S, EventRouter
from shared.kit.data_export import export_router
from shared.kit.http import create_app as create_http_app
from shared.kit.service import ConsumerSpec, ServiceRuntime
from shared.kit.settings import Settings, get_settings

log = structlog.get_logger(__name__)

SERVICE = "subsidy"
MIGRATIONS = Path(__file__).parent / "migrations"


def create_app(settings: Settings | None = None, config: SubsidySettings | None = None) -> FastAPI:
    settings = settings or get_settings()
    config = config or SubsidySettings()

    async def seed_travel_programs(runtime: ServiceRuntime) -> None:
        await seed(runtime, config)

    async def sweep_lapsed_grants(runtime: ServiceRuntime) -> None:
        """Expire grants whose window has ended and release their reservations, every few minutes."""
        while True:
            try:
                while await expire_lapsed_grants(runtime) > 0:
                    pass
            except Exception:
                log.exception("sweeping lapsed grants failed")
            await asyncio.sleep(config.sweep_interval_s)

    runtime = ServiceRuntime(
        SERVICE,
        migrations=MIGRATIONS,
        consumers=[
            ConsumerSpec(
                EventRouter.combined(consumers.certificates_and_donations, export_router(SERVICE, EXPORT_TABLES)),
                [CERTIFICATES, DONATIONS, GATEWAY_PARTNERS, ERASURES, EXPORT_REQUESTS], name=SERVICE,
                pace_s=BACKGROUND_PACE_S,
            ),
            # Trips partners reported, as the partner gateway accepted them (the partner stamped from
            # the partner's own topic); several members of one group handle the partitions in parallel.
            *[ConsumerSpec(consumers.trips, [GATEWAY_TRIPS], name=f"{SERVICE}-trips")] * config.trip_consumers,
        ],
        prepare=[seed_travel_programs],
        background=[sweep_lapsed_grants],
        settings=settings,
        pool_size=config.pool_size,
    )
    app = create_http_app(
        service=SERVICE,
        settings=settings,
        routers=[api.router],
        lifespan=runtime.lifespan,
        readiness=runtime.readiness,
        description="Travel programs, budgets (JPY and miles) with their ledger, grants and redemptions.",
    )
    app.state.subsidy_config = config
    return app


async def seed(runtime: ServiceRuntime, config: SubsidySettings) -> list[str]:
    """Seed the travel programs (after the migrations, before the consumers); idempotent."""
    async with runtime.transaction() as uow:
        # one seeder at a time when replicas start together
        await uow.conn.execute("SELECT pg_advisory_xact_lock(hashtext('subsidy:seed'))")
        return await handlers.seed_programs(uow, config)


async def expire_lapsed_grants(runtime: ServiceRuntime, today: date | None = None) -> int:
    """One batch of the sweeper in its own transaction; returns how many grants it expired."""
    async with runtime.transaction() as uow:
        return await handlers.expire_lapsed_grants(uow, today or runtime.clock.today())
