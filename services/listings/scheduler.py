"""The sweep: a background loop on every replica; row locks make each expiry and digest happen once."""

from __future__ import annotations

import asyncio

import structlog

from services.listings.handlers import ListingsService
from shared.kit.errors import is_transient
from shared.kit.service import BackgroundTask, ServiceRuntime

log = structlog.get_logger(__name__)


def listings_sweep(interval_s: float, batch: int = 5000) -> BackgroundTask:
    """Every ``interval_s``: expire listings past their day, send due digests, prune old delivery records."""

    async def listings_sweep(runtime: ServiceRuntime) -> None:
        service = ListingsService(runtime, sweep_batch=batch)
        while True:
            try:
                await service.sweep()
                runtime.state["sweeps"] = runtime.state.get("sweeps", 0) + 1
            except asyncio.CancelledError:
                raise
            except Exception as error:
                # The next round retries; claims roll back with their transaction, so nothing is lost.
                if is_transient(error):
                    log.warning("listings sweep interrupted", error=repr(error))
                else:
                    log.exception("listings sweep failed")
            await asyncio.sleep(interval_s)

    return listings_sweep
