"""What the service consumes: ``registration.residents.v1`` into its resident projection.

Thin: each handler hands the event to its use case in the consumer's transaction (the inbox has
claimed the event, so a redelivery never gets here). Contact changes are not routed: this service
keeps no contact data.
"""

from __future__ import annotations

from services.certification import handlers
from shared.contracts.registration import (
    ConsentChanged,
    PremiumApproved,
    PremiumExpired,
    PremiumRejected,
    PremiumRequested,
    RegistrationWithdrawn,
    ResidentRegistered,
    ResidentWithdrawn,
)
from shared.kit.consumer import EventRouter, HandlerContext

router = EventRouter()


@router.on(ResidentRegistered)
async def resident_registered(ctx: HandlerContext, event: ResidentRegistered) -> None:
    await handlers.record_registered(ctx.conn, event, ctx.envelope.time)


@router.on(PremiumRequested, PremiumApproved, PremiumRejected, PremiumExpired, RegistrationWithdrawn)
async def registration_changed(
    ctx: HandlerContext,
    event: PremiumRequested | PremiumApproved | PremiumRejected | PremiumExpired | RegistrationWithdrawn,
) -> None:
    await handlers.record_registration_change(ctx.conn, event, ctx.envelope.time)


@router.on(ConsentChanged)
async def consent_changed(ctx: HandlerContext, event: ConsentChanged) -> None:
    await handlers.record_consent(ctx.conn, event, ctx.envelope.time)


@router.on(ResidentWithdrawn)
async def resident_withdrawn(ctx: HandlerContext, event: ResidentWithdrawn) -> None:
    await handlers.withdraw_resident(ctx, event, ctx.envelope.time)
