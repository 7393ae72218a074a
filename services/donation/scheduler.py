"""The retention job: a background loop on every replica; the database makes each purge happen once.

Every ``interval_s`` (the first round one interval after the start: retention periods end on
1 April, nothing is urgent at boot) it erases the donor name and address that erased donors'
receipts kept while the law asked for them (``DonationService.purge_retained_records``).
"""

from __future__ import annotations

import asyncio

import structlog

from services.donation.handlers import DonationService
from shared.kit.errors import is_transient
from shared.kit.service import BackgroundTask, ServiceRuntime

log = structlog.get_logger(__name__)


def retention_scheduler(interval_s: float, retention_years: int) -> BackgroundTask:
    """Every ``interval_s``: purge what the receipts of erased donors kept past its period."""

    async def retention_scheduler(runtime: ServiceRuntime) -> None:
        service = DonationService(runtime, retention_years=retention_years)
        while True:
            await asyncio.sleep(interval_s)
            try:
                await service.purge_retained_records()
                runtime.state["retention_rounds"] = runtime.state.get("retention_rounds", 0) + 1
            except asyncio.CancelledError:
                raise
            except Exception as error:
                # The next round retries: a round's transaction rolls back whole, nothing is half done.
                if is_transient(error):
                    log.warning("retention round interrupted", error=repr(error))
                else:
                    log.exception("retention round failed")

    return retention_scheduler
