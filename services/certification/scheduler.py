"""The expiry scheduler: a background loop on every replica; the database makes each notice go out once."""

from __future__ import annotations

import asyncio

import structlog

from services.certification.handlers import CertificationService
from shared.kit.errors import is_transient
from shared.kit.service import BackgroundTask, ServiceRuntime

log = structlog.get_logger(__name__)


def expiry_scheduler(interval_s: float) -> BackgroundTask:
    """Every ``interval_s``: send due ``certificate.expiring`` notices and expire ended certificates."""

    async def expiry_scheduler(runtime: ServiceRuntime) -> None:
        service = CertificationService(runtime)
        while True:
            try:
                await service.sweep_expiry()
                runtime.state["expiry_sweeps"] = runtime.state.get("expiry_sweeps", 0) + 1
            except asyncio.CancelledError:
                raise
            except Exception as error:
                # The next round retries; claims roll back with their transaction, so nothing is lost.
                if is_transient(error):
                    log.warning("expiry sweep interrupted", error=repr(error))
                else:
                    log.exception("expiry sweep failed")
            await asyncio.sleep(interval_s)

    return expiry_scheduler
