"""What the service consumes: ``registration.residents.v1`` into its resident projection,
``gateway.partners.v1`` (partners registered through the gateway) into its partner list, and
``planning.plans.v1`` (municipal plans adopted and withdrawn) into the towns' certification schemes.

Thin: each handler hands the events to their use case in the consumer's transaction (the inbox has
claimed them, so a redelivery never gets here). Registrations, their changes and consents are
applied set-based, a run of them in a few statements (issue #9: ≥ 1,000 events/s); a withdrawal,
rare and far-reaching, one at a time. Contact changes are not routed: this service keeps no
contact data.
"""

from __future__ import annotations

from services.certification import handlers
from services.certification.domain import ProjectionEvent
from shared.contracts.partners import PartnerRegistered
from shared.contracts.planning import PlanAdopted, PlanWithdrawn
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
from shared.kit.consumer import EventRouter, HandlerContext, Run

router = EventRouter()


@router.on_many(
    ResidentRegistered, PremiumRequested, PremiumApproved, PremiumRejected, PremiumExpired, RegistrationWithdrawn,
    ConsentChanged,
)
async def projection_events(run: Run[ProjectionEvent]) -> None:
    # One handler for all of them keeps runs long: the kit splits a run where the handler changes.
    await handlers.record_projection_events(run.conn, [(event, ctx.envelope.time) for ctx, event in run])


@router.on(ResidentWithdrawn)
async def resident_withdrawn(ctx: HandlerContext, event: ResidentWithdrawn) -> None:
    await handlers.withdraw_resident(ctx, event, ctx.envelope.time)


@router.on(PlanAdopted, PlanWithdrawn)
async def plan_changed(ctx: HandlerContext, event: PlanAdopted | PlanWithdrawn) -> None:
    # planning.plans.v1: a municipal plan moves the town's certification scheme to or from a plan basis.
    await handlers.record_plan_event(ctx, event, ctx.envelope.time)


@router.on_many(PartnerRegistered)
async def partners_registered(run: Run[PartnerRegistered]) -> None:
    # gateway.partners.v1: the partners applications may name beyond the seed, and their formats.
    await handlers.record_registered_partners(run.conn, [event for _, event in run])
