"""Which events the service listens to; each handler is one line into ``handlers``."""

from __future__ import annotations

from services.notification import handlers
from shared.contracts.base import EventData
from shared.contracts.certification import (
    ApplicationRejected,
    ApplicationSubmitted,
    CertificateExpired,
    CertificateExpiring,
    CertificateIssued,
    CertificateRenewed,
    CertificateRevoked,
)
from shared.contracts.donation import DonationReceived, OneStopExceptionVoided
from shared.contracts.listings import ListingDigestDue
from shared.contracts.registration import (
    ConsentChanged,
    ContactChanged,
    PremiumApproved,
    PremiumRejected,
    PremiumRequested,
    ResidentRegistered,
    ResidentWithdrawn,
)
from shared.contracts.subsidy import GrantCancelled, GrantIssued, GrantRedeemed, GrantWaitlisted
from shared.contracts.topics import APPLICATIONS, CERTIFICATES, DONATIONS, GRANTS, LISTING_DIGESTS, RESIDENTS
from shared.kit.consumer import EventRouter, HandlerContext, Run

TOPICS = (RESIDENTS, APPLICATIONS, CERTIFICATES, GRANTS, DONATIONS, LISTING_DIGESTS)

router = EventRouter()


@router.on_many(
    ResidentRegistered, ConsentChanged,
    PremiumRequested, PremiumApproved, PremiumRejected,
    ApplicationSubmitted, ApplicationRejected,
    CertificateIssued, CertificateRenewed, CertificateExpiring, CertificateExpired, CertificateRevoked,
    GrantIssued, GrantWaitlisted, GrantRedeemed, GrantCancelled,
    DonationReceived, OneStopExceptionVoided,
)
async def on_registration_consent_or_decision(run: Run[EventData]) -> None:
    """Keep the contact projection and tell residents about every decision, a run at a time (the
    event's type decides the message)."""
    await handlers.apply_events(run)


@router.on(ContactChanged)
async def on_contact_changed(ctx: HandlerContext, event: ContactChanged) -> None:
    await handlers.contact_changed(ctx, event)


@router.on(ResidentWithdrawn)
async def on_resident_withdrawn(ctx: HandlerContext, event: ResidentWithdrawn) -> None:
    await handlers.resident_withdrawn(ctx, event)


@router.on(ListingDigestDue)
async def on_listing_digest(ctx: HandlerContext, event: ListingDigestDue) -> None:
    """listings.digests.v1: new listings the resident asked for, told once (the message is keyed by
    the digest event, like every other)."""
    await handlers.listing_digest(ctx, event)
