"""What the service consumes: ``registration.residents.v1``, for one event only — a resident's
withdrawal (``ResidentWithdrawn``), which erases their donor record (``handlers.withdraw_resident``).

Thin: the handler runs in the consumer's transaction (the inbox has claimed the event, so a
redelivery never gets here; a replay after the inbox forgot it finds the donor erased already and
changes nothing). Every other event of the topic is skipped: donation keeps no projection of
residents, and nothing it consumes could write a person back.
"""

from __future__ import annotations

from services.donation import handlers
from shared.contracts.registration import ResidentWithdrawn
from shared.kit.consumer import EventRouter, HandlerContext

router = EventRouter()


@router.on(ResidentWithdrawn)
async def resident_withdrawn(ctx: HandlerContext, event: ResidentWithdrawn) -> None:
    await handlers.withdraw_resident(ctx, event, ctx.clock.now())
