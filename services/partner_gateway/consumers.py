"""What the gateway consumes (thin: each event, or run of consecutive consent or certificate events,
becomes one use-case call in the batch's transaction).

``registration.residents.v1``: share_certificate consents (at registration and changed later) and
withdrawal; ``certification.certificates.v1``: issued, renewed, revoked, expired (``expiring``
changes nothing a partner sees and is not routed); ``subsidy.grants.v1``: every grant event.

On the partner-facing cluster, a router of its own (``build_trips_router``): each partner's
``partner.<code>.trips.v1``, where only ``TripReported`` is routed. The partner is the topic's;
anything else a partner writes there is not handled.
"""

from __future__ import annotations

from services.partner_gateway import handlers
from services.partner_gateway.domain import GRANT_EVENTS, SHARE_PURPOSE, GrantEvent, ShareConsent
from services.partner_gateway.handlers import CertificateEvent, ConsentChange, PartnerDirectory
from shared.contracts.certification import (
    CertificateExpired,
    CertificateIssued,
    CertificateRenewed,
    CertificateRevoked,
)
from shared.contracts.partners import TripReported
from shared.contracts.registration import ConsentChanged, ResidentRegistered, ResidentWithdrawn
from shared.kit.consumer import EventRouter, HandlerContext, Run

ResidentEvent = ResidentRegistered | ConsentChanged


def build_router(partners: PartnerDirectory) -> EventRouter:
    router = EventRouter()

    # Consents and certificate events are applied set-based: a run of them in a few statements.
    @router.on_many(ResidentRegistered, ConsentChanged)
    async def share_consents_changed(run: Run[ResidentEvent]) -> None:
        changes = [change for ctx, event in run for change in _changes(ctx, event)]
        await handlers.apply_share_consents(partners, changes)

    @router.on(ResidentWithdrawn)
    async def resident_withdrawn(ctx: HandlerContext, event: ResidentWithdrawn) -> None:
        await handlers.apply_resident_withdrawn(ctx, partners, event.resident_id, event.withdrawn_at)

    @router.on_many(CertificateIssued, CertificateRenewed, CertificateRevoked, CertificateExpired)
    async def certificates_changed(run: Run[CertificateEvent]) -> None:
        await handlers.apply_certificate_events(partners, run)

    @router.on(*GRANT_EVENTS)
    async def grant_changed(ctx: HandlerContext, event: GrantEvent) -> None:
        await handlers.apply_grant_event(ctx, partners, event)

    return router


def build_trips_router(partners: PartnerDirectory) -> EventRouter:
    """Partners' trip reports: each forwarded inside as the partner of the topic it came from."""
    router = EventRouter()

    @router.on(TripReported)
    async def trip_reported(ctx: HandlerContext, event: TripReported) -> None:
        await handlers.forward_trip(ctx, partners, event)

    return router


def _changes(ctx: HandlerContext, event: ResidentEvent) -> list[ConsentChange]:
    """The share_certificate consents an event states, in its order."""
    if isinstance(event, ConsentChanged):
        states = [(event.purpose, event.partner, event.granted, event.at)]
    else:
        states = [(c.purpose, c.partner, c.granted, c.at) for c in event.consents]
    return [
        ConsentChange(ctx, event.resident_id, partner, ShareConsent(granted, at))
        for purpose, partner, granted, at in states if purpose == SHARE_PURPOSE
    ]
