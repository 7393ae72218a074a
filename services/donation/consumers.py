"""What the service consumes: ``registration.erasures.v1``, a resident's erasure
(``ResidentErased``), which erases their donor record (``handlers.erase_resident``).

Thin: the handler runs in the consumer's transaction (the inbox has claimed the event, so a
redelivery never gets here; a replay after the inbox forgot it finds the donor erased already and
changes nothing). Every other event of the topic is skipped: donation keeps no projection of
residents, and nothing it consumes could write a person back.
"""

from __future__ import annotations

from services.donation import handlers
from shared.contracts.registration import ResidentErased
from shared.kit.consumer import EventRouter, HandlerContext

router = EventRouter()


@router.on(ResidentErased)
async def resident_erased(ctx: HandlerContext, event: ResidentErased) -> None:
    await handlers.erase_resident(ctx, event, ctx.clock.now())
