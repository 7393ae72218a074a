"""What the service consumes, thin: where residents belong (``registration.residents.v1``: their
registrations — ids and municipality codes, never a contact — and their erasure), their valid
certificates (``certification.certificates.v1``: number, resident id, municipality code) and the
designated support corporations (``planning.corporations.v1``).

Events about a resident this service erased are dropped (a late event, a replayed dead letter, a
group reset to earliest): nothing about them is written again.
"""

from __future__ import annotations

from services.listings import handlers, store
from shared.contracts.certification import (
    CertificateExpired,
    CertificateIssued,
    CertificateRenewed,
    CertificateRevoked,
)
from shared.contracts.planning import CorporationDesignated, CorporationRevoked
from shared.contracts.registration import RegistrationWithdrawn, ResidentRegistered, ResidentWithdrawn
from shared.contracts.topics import CERTIFICATES, CORPORATIONS, RESIDENTS
from shared.kit.consumer import EventRouter, HandlerContext, Run

TOPICS = (RESIDENTS, CERTIFICATES, CORPORATIONS)

router = EventRouter()


@router.on_many(ResidentRegistered)
async def registered(run: Run[ResidentRegistered]) -> None:
    # Only the ids and codes: the sealed contact is never opened or kept here. A run holds no erasure
    # (that event ends it), so the one statement's look at the erased (``store``) is exact.
    await handlers.record_registrations(run.conn, [
        (r.registration_id, r.resident_id, r.municipality_code, r.prefecture_code)
        for event in run.events for r in event.registrations() if r.status in ("active", "pending_review")
    ])


@router.on(RegistrationWithdrawn)
async def registration_withdrawn(ctx: HandlerContext, event: RegistrationWithdrawn) -> None:
    await store.delete_registration(ctx.conn, event.registration_id)


@router.on_many(CertificateIssued, CertificateRenewed)
async def certified(run: Run[CertificateIssued | CertificateRenewed]) -> None:
    await store.save_certificates(run.conn, [
        (event.certificate_number, event.resident_id, event.municipality_code) for event in run.events
    ])


@router.on(CertificateRevoked, CertificateExpired)
async def certificate_ended(ctx: HandlerContext, event: CertificateRevoked | CertificateExpired) -> None:
    await store.delete_certificate(ctx.conn, event.certificate_number)


@router.on(CorporationDesignated)
async def corporation_designated(ctx: HandlerContext, event: CorporationDesignated) -> None:
    await store.save_corporation(ctx.conn, event.corporation_id, event.municipality_code, event.name, True)


@router.on(CorporationRevoked)
async def corporation_revoked(ctx: HandlerContext, event: CorporationRevoked) -> None:
    await store.save_corporation(ctx.conn, event.corporation_id, event.municipality_code, None, False)


@router.on(ResidentWithdrawn)
async def resident_withdrawn(ctx: HandlerContext, event: ResidentWithdrawn) -> None:
    await handlers.erase_resident(ctx.conn, event.resident_id, event.withdrawn_at)
