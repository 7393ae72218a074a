"""What the subsidy service consumes: certificates, donations and erasures (one group), trips (another).

Trips get a consumer group of their own so that a burst of partner reports never delays the
grants of newly issued certificates, and the other way round. Issued and renewed certificates are
handled set-based (issue #9: ≥ 1,000 events/s): a run of them is projected in one statement and
only those of towns with travel programs are granted one by one.

Trips come from the partner gateway (``gateway.trips.v1``): partners write them to their own topic
on the partner-facing cluster, and the gateway forwards each as the partner of that topic (a record
naming another partner, or holding a My Number anywhere, is parked there and never reaches us).
Over HTTP the kit refuses a My Number the same way.
"""

from __future__ import annotations

from services.subsidy import handlers
from shared.contracts.certification import (
    CertificateExpired,
    CertificateIssued,
    CertificateRenewed,
    CertificateRevoked,
)
from shared.contracts.donation import DonationReceived, DonationRefunded
from shared.contracts.partners import PartnerRegistered, TripAccepted
from shared.contracts.registration import ResidentErased
from shared.kit.consumer import EventRouter, HandlerContext, Run

certificates_and_donations = EventRouter()
trips = EventRouter()


@certificates_and_donations.on_many(CertificateIssued, CertificateRenewed)
async def on_certificates_granted(run: Run[handlers.GrantingEvent]) -> None:
    await handlers.grant_certificates(run, run.clock.today())


@certificates_and_donations.on(CertificateRevoked, CertificateExpired)
async def on_certificate_closed(ctx: HandlerContext, event: CertificateRevoked | CertificateExpired) -> None:
    await handlers.close_certificate(ctx, event, ctx.clock.today())


@certificates_and_donations.on(ResidentErased)
async def on_resident_erased(ctx: HandlerContext, event: ResidentErased) -> None:
    # registration.erasures.v1: the erasure, alone on its topic.
    await handlers.erase_resident(ctx, event, ctx.clock.today())


@certificates_and_donations.on(DonationReceived)
async def on_donation_received(ctx: HandlerContext, event: DonationReceived) -> None:
    await handlers.credit_donation(ctx, event, ctx.clock.today())


@certificates_and_donations.on(DonationRefunded)
async def on_donation_refunded(ctx: HandlerContext, event: DonationRefunded) -> None:
    await handlers.refund_donation(ctx, event)


@trips.on(TripAccepted)
async def on_trip_accepted(ctx: HandlerContext, event: TripAccepted) -> None:
    # ``partner``: the gateway's, from the topic the partner wrote to (never the partner's own say).
    report = handlers.TripReport(
        partner=event.partner, grant_id=event.grant_id, certificate_number=event.certificate_number,
        trip_id=event.trip_id, trip_kind=event.trip_kind, travelled_on=event.travelled_on,
        discount_jpy=event.discount_jpy, reported_at=event.reported_at,
    )
    await handlers.report_trip(ctx, report, "kafka", ctx.clock.today())


@certificates_and_donations.on_many(PartnerRegistered)
async def partners_registered(run: Run[PartnerRegistered]) -> None:
    # gateway.partners.v1: partners beyond the seed, for which programmes may be created.
    await handlers.record_registered_partners(run.conn, [event for _, event in run])
