"""What the gateway consumes (thin: each event becomes one use-case call in the batch's transaction).

``registration.residents.v1``: share_certificate consents (at registration and changed later) and
withdrawal; ``certification.certificates.v1``: issued, renewed, revoked, expired (``expiring``
changes nothing a partner sees and is not routed); ``subsidy.grants.v1``: every grant event.
"""

from __future__ import annotations

from services.partner_gateway import handlers
from services.partner_gateway.domain import GRANT_EVENTS, SHARE_PURPOSE, GrantEvent, ShareConsent
from services.partner_gateway.handlers import CertificateEvent, PartnerDirectory
from shared.contracts.certification import (
    CertificateExpired,
    CertificateIssued,
    CertificateRenewed,
    CertificateRevoked,
)
from shared.contracts.registration import ConsentChanged, ResidentRegistered, ResidentWithdrawn
from shared.kit.consumer import EventRouter, HandlerContext


def build_router(partners: PartnerDirectory) -> EventRouter:
    router = EventRouter()

    @router.on(ResidentRegistered)
    async def resident_registered(ctx: HandlerContext, event: ResidentRegistered) -> None:
        for consent in event.consents:
            if consent.purpose == SHARE_PURPOSE:
                await handlers.apply_share_consent(
                    ctx, partners, event.resident_id, consent.partner, ShareConsent(consent.granted, consent.at)
                )

    @router.on(ConsentChanged)
    async def consent_changed(ctx: HandlerContext, event: ConsentChanged) -> None:
        if event.purpose == SHARE_PURPOSE:
            await handlers.apply_share_consent(
                ctx, partners, event.resident_id, event.partner, ShareConsent(event.granted, event.at)
            )

    @router.on(ResidentWithdrawn)
    async def resident_withdrawn(ctx: HandlerContext, event: ResidentWithdrawn) -> None:
        await handlers.apply_resident_withdrawn(ctx, partners, event.resident_id, event.withdrawn_at)

    @router.on(CertificateIssued, CertificateRenewed, CertificateRevoked, CertificateExpired)
    async def certificate_changed(ctx: HandlerContext, event: CertificateEvent) -> None:
        await handlers.apply_certificate_event(ctx, partners, event)

    @router.on(*GRANT_EVENTS)
    async def grant_changed(ctx: HandlerContext, event: GrantEvent) -> None:
        await handlers.apply_grant_event(ctx, partners, event)

    return router
