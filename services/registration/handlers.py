"""Use cases: load, decide (domain), save (store), emit (outbox) — one transaction each.

Every HTTP write runs through the kit's runner (``Write.run``): the permission check first, then an
``Idempotency-Key`` replay or the change, its stored answer and its events in one transaction.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import date, datetime, timedelta
from typing import Any

import structlog

from services.registration import domain, exports, store
from services.registration.attestation import AttestationVerifier
from services.registration.domain import (
    ActivityPick,
    Consent,
    Contact,
    DesignatedActivity,
    IdentityVerification,
    Registration,
    Resident,
    Tier,
)
from services.registration.sample_activities import sample_catalogue
from services.registration.views import (
    ExpiryRun,
    RegistrationPage,
    as_json,
    catalogue_view,
    consent_view,
    designated_activity_view,
    listed_view,
    registration_detail,
    registration_view,
    resident_view,
)
from shared.contracts import registration as events
from shared.contracts.reasons import RejectionReason
from shared.contracts.registration import ConsentPurpose, RegistrationStatus
from shared.contracts.sealed import Sealed, resident_subject
from shared.contracts.topics import ERASURES, RESIDENTS
from shared.kit import csv_export
from shared.kit.auth import Principal, Role
from shared.kit.clock import japan_date
from shared.kit.db import Connection
from shared.kit.erasure import forget_responses_about, record_erased
from shared.kit.service import ServiceRuntime, UnitOfWork
from shared.kit.use_case import Outcome, Write, checked_target
from shared.reference import municipality, prefecture_of

log = structlog.get_logger(__name__)


def _new_id() -> str:
    return str(uuid.uuid4())


# --- Events --------------------------------------------------------------------------------------


async def _sealed_contact(runtime: ServiceRuntime, resident_id: str, c: Contact) -> Sealed:
    """The contact as events carry it: sealed with the person's data key, so that erasing the key
    makes every copy unreadable (topics, dead letters, backups). Sealed inside the use case, before
    the outbox write: no plaintext contact is ever written to the outbox."""
    return await runtime.keyring.seal(
        resident_subject(resident_id),
        events.Contact(
            name=c.name, name_kana=c.name_kana, email=c.email, phone=c.phone, preferred_language=c.preferred_language
        ),
    )


async def _prepare_sealing(runtime: ServiceRuntime, resident_id: str) -> None:
    """Fetch (or make) the person's data key before the transaction: it is a round trip to the
    keyring's own database, which no locked resident row, pooled connection or shared batch should
    wait on; sealing in the use case then finds it cached. Only a head start: whatever fails here
    (an erased person has no key; a fault) the use case meets again and answers as before."""
    with contextlib.suppress(Exception):
        await runtime.keyring.key_for_sealing(resident_subject(resident_id))


async def _emit_registered(
    uow: UnitOfWork, resident: Resident, contact: Sealed, r: Registration, derived_prefecture: Registration | None,
    consents: Sequence[Consent], now: datetime,
) -> None:
    """One event for the registration and the prefecture's it brought (a second one would cost every
    consumer of the topic a record of its own for what the first one already implies)."""
    await uow.emit(
        RESIDENTS,
        events.ResidentRegistered(
            resident_id=resident.id, registration_id=r.id, municipality_code=r.municipality_code,
            prefecture_code=r.prefecture_code, tier=r.tier, status=r.status,
            legal_address_code=resident.legal_address_code, contact=contact,
            consents=[events.ConsentState(purpose=c.purpose, partner=c.partner, granted=c.granted, at=c.at)
                      for c in consents],
            registered_at=now,
            derived_prefecture_registration_id=None if derived_prefecture is None else derived_prefecture.id,
        ),
        subject=resident.id,
    )


async def _emit_withdrawn(uow: UnitOfWork, r: Registration, now: datetime) -> None:
    await uow.emit(
        RESIDENTS,
        events.RegistrationWithdrawn(
            resident_id=r.resident_id, registration_id=r.id, municipality_code=r.municipality_code, withdrawn_at=now
        ),
        subject=r.resident_id,
    )


async def _release_derived_prefecture(
    uow: UnitOfWork, ended: Registration, remaining: Sequence[Registration], now: datetime
) -> None:
    """Withdraw the derived prefecture registration once no municipal one in the prefecture is live."""
    if ended.is_prefecture:
        return
    derived = domain.derived_prefecture_to_release(ended.prefecture_code, remaining)
    if derived is not None:
        withdrawn = replace(derived, status="withdrawn")
        await store.save_registration(uow.conn, withdrawn, now)
        await _emit_withdrawn(uow, withdrawn, now)


def _with(registrations: Sequence[Registration], changed: Registration) -> list[Registration]:
    return [changed if r.id == changed.id else r for r in registrations]


# --- Residents -----------------------------------------------------------------------------------


async def create_resident(
    write: Write,
    details: Contact,
    date_of_birth: date,
    legal_address_code: str,
    consents: Sequence[tuple[ConsentPurpose, str | None]],
) -> Outcome:
    now = write.runtime.clock.now()
    resident = domain.new_resident(write.principal.subject, details, date_of_birth, legal_address_code, now)
    wanted = list(dict.fromkeys(consents))
    await _check_consent_targets(write.runtime, wanted)

    async def act(uow: UnitOfWork) -> Outcome:
        if not await store.insert_resident(uow.conn, resident):
            if await store.resident_status(uow.conn, resident.id) == "erased":
                raise domain.ResidentErased(
                    f"the account {resident.id} was erased; a new account needs a new identity"
                )
            raise domain.ResidentExists(f"resident {resident.id} already has an account")
        granted = [Consent(purpose, partner, True, now) for purpose, partner in wanted]
        for consent in granted:
            await store.set_consent(uow.conn, resident.id, consent)
            await _emit_consent(uow, resident.id, consent)
        log.info("resident created", resident_id=resident.id)
        return Outcome(201, as_json(resident_view(resident, [], granted)))

    return await write.run(act)


async def get_resident(runtime: ServiceRuntime, resident_id: str) -> dict[str, Any]:
    async with runtime.pool.acquire() as conn:
        resident = await store.get_resident(conn, resident_id)
        if resident is None:
            raise domain.ResidentNotFound(f"no resident {resident_id}")
        registrations = await store.registrations_of(conn, resident_id)
        consents = await store.consents_of(conn, resident_id)
    return as_json(resident_view(resident, registrations, consents))


async def update_contact(write: Write, resident_id: str, changes: dict[str, Any]) -> Outcome:
    """Change name, reading, e-mail, phone or language; other services learn it from ContactChanged."""

    async def act(uow: UnitOfWork) -> Outcome:
        now = write.runtime.clock.now()
        resident = await _lock_resident(uow.conn, resident_id)
        old = resident.contact
        new = domain.contact(
            changes.get("name", old.name), changes.get("name_kana", old.name_kana), changes.get("email", old.email),
            changes.get("phone", old.phone),
            changes.get("preferred_language", old.preferred_language),
        )
        if new != old:
            await store.update_contact(uow.conn, resident_id, new, now)
            sealed = await _sealed_contact(write.runtime, resident_id, new)
            await uow.emit(
                RESIDENTS, events.ContactChanged(resident_id=resident_id, contact=sealed, at=now), subject=resident_id
            )
            resident = replace(resident, contact=new)
        registrations = await store.registrations_of(uow.conn, resident_id)
        consents = await store.consents_of(uow.conn, resident_id)
        return Outcome(200, as_json(resident_view(resident, registrations, consents)))

    return await write.run(act)


async def erase_resident(write: Write, resident_id: str) -> Outcome:
    """The erasure request: destroy the person's data key, blank their data here and tell every
    service (a repeat is a no-op).

    The key is shredded *before* the transaction commits, under the resident's row lock. Erasure
    is final, so a key destroyed by an attempt that then rolls back (a transient fault, a crash) is
    still the right outcome: the runner's retry, or the client's repeat, finds the row active, the
    key already gone (``shred`` is idempotent) and completes the rest; meanwhile nothing new can
    be sealed for the person (``SubjectErased``). The other order could commit the erasure, tell
    every service, and then lose the shredding to a crash: every sealed copy of the contact in
    every topic would stay readable with nothing left to retry it. A repeat of a completed erasure
    shreds again as well (a no-op), which would heal even that.
    """
    keyring = write.runtime.keyring

    async def act(uow: UnitOfWork) -> Outcome:
        now = write.runtime.clock.now()
        resident = await store.lock_resident(uow.conn, resident_id)
        if resident is None:
            if await store.resident_status(uow.conn, resident_id) == "erased":
                await keyring.shred(resident_subject(resident_id))
                return Outcome(204)
            raise domain.ResidentNotFound(f"no resident {resident_id}")
        await keyring.shred(resident_subject(resident_id))
        await store.erase_resident(uow.conn, resident_id, prefecture_of(resident.legal_address_code).code, now)
        await record_erased(uow.conn, resident_id, now)
        # The person's own stored answers and any other caller's (an admin's, staff's) that name them.
        await forget_responses_about(uow.conn, resident_id)
        await exports.forget_exports(uow.conn, resident_id)
        await uow.emit(
            RESIDENTS, events.ResidentWithdrawn(resident_id=resident_id, withdrawn_at=now), subject=resident_id
        )
        await uow.emit(ERASURES, events.ResidentErased(resident_id=resident_id, withdrawn_at=now), subject=resident_id)
        log.info("resident erased", resident_id=resident_id)
        # The erasure's own key is stored after this (an empty 204, nothing personal in it).
        return Outcome(204)

    return await write.run(act)


async def _lock_resident(conn: Connection, resident_id: str) -> Resident:
    resident = await store.lock_resident(conn, resident_id)
    if resident is None:
        raise domain.ResidentNotFound(f"no resident {resident_id}")
    return resident


# --- Registrations -------------------------------------------------------------------------------


def _attested(
    verifier: AttestationVerifier, attestation: str | None, resident: Resident, now: datetime
) -> IdentityVerification | None:
    """The verification an attestation proves for this resident now (checked in the write, so that an
    Idempotency-Key replay answers the first response even once the attestation has expired)."""
    if attestation is None:
        return None
    claims = verifier.claims(attestation)
    return domain.check_attestation(claims, resident_id=resident.id, date_of_birth=resident.date_of_birth, now=now)


async def _record_identity(uow: UnitOfWork, resident_id: str, identity: IdentityVerification, now: datetime) -> str:
    """Store the verification; an attestation already used (by any request) is refused."""
    verification_id = _new_id()
    if not await store.insert_identity(uow.conn, verification_id, resident_id, identity, now):
        raise domain.AttestationReplayed(
            f"attestation {identity.attestation_id} of {identity.provider} was already used: verify the identity again"
        )
    return verification_id


async def register(
    write: Write,
    resident_id: str,
    municipality_code: str,
    tier: Tier,
    attestation: str | None,
    activities: Sequence[ActivityPick],
    verifier: AttestationVerifier,
) -> Outcome:
    """Register with a municipality (and so its prefecture), or ask to upgrade a basic one to premium."""
    domain.registrable(municipality_code)  # a bad code is refused before any lock is taken

    async def act(uow: UnitOfWork) -> Outcome:
        now = write.runtime.clock.now()
        # In a batch, one statement locks the batch's residents (``store.LOCK_FOR_REGISTRATION``).
        locked = await store.LOCK_FOR_REGISTRATION(uow.conn, resident_id)
        if locked is None:
            raise domain.ResidentNotFound(f"no resident {resident_id}")
        resident, existing = locked.resident, locked.registrations
        identity = _attested(verifier, attestation, resident, now)
        catalogue = await store.designated_activities(uow.conn, (a.activity_id for a in activities))
        plan = domain.plan_registration(
            resident_id=resident_id, legal_address_code=resident.legal_address_code, existing=existing,
            target_code=municipality_code, tier=tier, identity=identity, activities=activities, catalogue=catalogue,
            now=now, new_id=_new_id,
        )
        registration = plan.registration
        if plan.new_rows:  # in a batch, one INSERT for the batch's rows (``store.INSERT``)
            await store.INSERT(uow.conn, plan.new_rows)
        if plan.review is not None:
            verification_id = None
            if identity is not None:
                verification_id = await _record_identity(uow, resident_id, identity, now)
            await store.insert_review(uow.conn, _new_id(), registration.id, plan.review, verification_id,
                                      activities, now)
        if plan.is_new:  # a derived prefecture registration comes only with a new one
            contact = await _sealed_contact(write.runtime, resident_id, resident.contact)
            await _emit_registered(uow, resident, contact, registration, plan.derived_prefecture, locked.consents,
                                   now)
        if plan.review is not None:
            await _emit_premium_requested(uow, registration, activities, now)
        log.info("registered", resident_id=resident_id, registration_id=registration.id,
                 municipality=registration.municipality_code, tier=tier, review=plan.review)
        view = registration_view(registration, plan.prefecture_registration_id)
        return Outcome(201 if plan.is_new else 200, as_json(view))

    await _prepare_sealing(write.runtime, resident_id)
    # Under load, registrations share transactions (shared/kit/group_commit.py); the answer is the same.
    # One resident's registrations never share one: each decides on what the one before wrote.
    return await write.run(act, group_commit=True, batch_key=resident_id)


async def _emit_premium_requested(
    uow: UnitOfWork, r: Registration, activities: Sequence[ActivityPick], now: datetime
) -> None:
    # The count of distinct designated activities only: which ones a person did is theirs (erased with
    # them here), and an event once published cannot be erased.
    await uow.emit(
        RESIDENTS,
        events.PremiumRequested(
            resident_id=r.resident_id, registration_id=r.id, municipality_code=r.municipality_code,
            activity_count=len({a.activity_id for a in activities}), requested_at=now,
        ),
        subject=r.resident_id,
    )


async def _load_registration(conn: Connection, registration_id: str) -> Registration:
    registration = await store.get_registration(conn, registration_id)
    if registration is None:
        raise domain.RegistrationNotFound(f"no registration {registration_id}")
    return registration


async def _lock_for_change(conn: Connection, registration: Registration) -> list[Registration]:
    """Lock the owner (if not erased) and read their registrations afresh."""
    await store.lock_resident(conn, registration.resident_id)
    return await store.registrations_of(conn, registration.resident_id)


def _current(registrations: Sequence[Registration], registration_id: str) -> Registration:
    return next(r for r in registrations if r.id == registration_id)


def _registration_for_staff(
    principal: Principal, registration_id: str
) -> Callable[[UnitOfWork], Awaitable[Registration]]:
    """Only the municipality's staff (or an admin) decide on its registrations."""
    return checked_target(
        lambda conn: _load_registration(conn, registration_id),
        lambda registration: principal.ensure_municipality(registration.municipality_code),
    )


def _registration_for_owner(
    principal: Principal, registration_id: str
) -> Callable[[UnitOfWork], Awaitable[Registration]]:
    """Only the person (or an admin) renews or withdraws their registration."""
    return checked_target(
        lambda conn: _load_registration(conn, registration_id),
        lambda registration: principal.ensure_resident(registration.resident_id),
    )


async def get_registration(runtime: ServiceRuntime, principal: Principal, registration_id: str) -> dict[str, Any]:
    async with runtime.pool.acquire() as conn:
        registration = await _load_registration(conn, registration_id)
        _ensure_may_see(principal, registration)
        reviews = await store.reviews_of(conn, registration_id)
    if principal.role is Role.RESIDENT:  # the person sees the decisions, not who made them or the staff's notes
        reviews = [replace(review, decided_by=None, note=None) for review in reviews]
    return as_json(registration_detail(registration, reviews))


def _ensure_may_see(principal: Principal, registration: Registration) -> None:
    if principal.role is Role.STAFF:
        principal.ensure_municipality(registration.municipality_code)
    else:
        principal.ensure_resident(registration.resident_id)


async def approve(write: Write, registration_id: str) -> Outcome:
    principal = write.principal

    async def act(uow: UnitOfWork, loaded: Registration) -> Outcome:
        now = write.runtime.clock.now()
        registration = _current(await _lock_for_change(uow.conn, loaded), registration_id)
        approved = domain.approve(registration, now)
        assert approved.valid_until is not None
        await store.save_registration(uow.conn, approved, now)
        await store.decide_review(uow.conn, registration_id, "approved", now, decided_by=principal.subject,
                                  valid_until=approved.valid_until)
        await uow.emit(
            RESIDENTS,
            events.PremiumApproved(
                resident_id=approved.resident_id, registration_id=approved.id,
                municipality_code=approved.municipality_code, valid_until=approved.valid_until, decided_at=now,
            ),
            subject=approved.resident_id,
        )
        log.info("premium approved", registration_id=registration_id, kind=registration.pending_review,
                 staff=principal.subject, valid_until=str(approved.valid_until))
        return Outcome(200, as_json(registration_view(approved)))

    return await write.run(act, authorise=_registration_for_staff(principal, registration_id))


async def reject(write: Write, registration_id: str, reason: RejectionReason, note: str | None = None) -> Outcome:
    """The review keeps the code and the staff note; the event carries the code only."""
    principal = write.principal

    async def act(uow: UnitOfWork, loaded: Registration) -> Outcome:
        now = write.runtime.clock.now()
        registrations = await _lock_for_change(uow.conn, loaded)
        registration = _current(registrations, registration_id)
        rejected = domain.reject(registration)
        await store.save_registration(uow.conn, rejected, now)
        await store.decide_review(uow.conn, registration_id, "rejected", now, decided_by=principal.subject,
                                  reason=reason, note=note)
        await uow.emit(
            RESIDENTS,
            events.PremiumRejected(
                resident_id=rejected.resident_id, registration_id=rejected.id,
                municipality_code=rejected.municipality_code, reason=reason, decided_at=now,
            ),
            subject=rejected.resident_id,
        )
        if not rejected.is_live:
            await _release_derived_prefecture(uow, rejected, _with(registrations, rejected), now)
        log.info("premium rejected", registration_id=registration_id, kind=registration.pending_review,
                 staff=principal.subject)
        return Outcome(200, as_json(registration_view(rejected)))

    return await write.run(act, authorise=_registration_for_staff(principal, registration_id))


async def renew(
    write: Write, registration_id: str, activities: Sequence[ActivityPick], attestation: str | None,
    verifier: AttestationVerifier,
) -> Outcome:
    """Ask for one more premium year with this year's activities (reviewed like a first request); an
    attestation, when sent, records a fresh identity verification with it."""

    async def act(uow: UnitOfWork, loaded: Registration) -> Outcome:
        now = write.runtime.clock.now()
        registration = _current(await _lock_for_change(uow.conn, loaded), registration_id)
        catalogue = await store.designated_activities(uow.conn, (a.activity_id for a in activities))
        domain.plan_renewal(registration, activities, catalogue, now)
        verification_id = None
        if attestation is not None:
            resident = await _lock_resident(uow.conn, registration.resident_id)
            identity = _attested(verifier, attestation, resident, now)
            assert identity is not None
            verification_id = await _record_identity(uow, registration.resident_id, identity, now)
        await store.insert_review(uow.conn, _new_id(), registration_id, "renewal", verification_id, activities, now)
        await _emit_premium_requested(uow, registration, activities, now)
        log.info("premium renewal requested", registration_id=registration_id)
        return Outcome(200, as_json(registration_view(replace(registration, pending_review="renewal"))))

    return await write.run(act, authorise=_registration_for_owner(write.principal, registration_id))


async def withdraw_registration(write: Write, registration_id: str) -> Outcome:
    """End one registration; the derived prefecture one ends with the last municipal one in it."""

    async def act(uow: UnitOfWork, loaded: Registration) -> Outcome:
        now = write.runtime.clock.now()
        registrations = await _lock_for_change(uow.conn, loaded)
        registration = _current(registrations, registration_id)
        if not domain.check_withdrawable(registration, registrations):
            return Outcome(200, as_json(registration_view(registration)))
        withdrawn = replace(registration, status="withdrawn", pending_review=None)
        await store.save_registration(uow.conn, withdrawn, now)
        if registration.pending_review is not None:
            await store.decide_review(uow.conn, registration_id, "cancelled", now)
        await _emit_withdrawn(uow, withdrawn, now)
        await _release_derived_prefecture(uow, withdrawn, _with(registrations, withdrawn), now)
        log.info("registration withdrawn", registration_id=registration_id)
        return Outcome(200, as_json(registration_view(withdrawn)))

    return await write.run(act, authorise=_registration_for_owner(write.principal, registration_id))


# --- Designated activities (each municipality's catalogue) ---------------------------------------


async def seed_sample_catalogue(runtime: ServiceRuntime) -> None:
    """A ``prepare`` step: the demo towns' sample catalogues (``sample_activities``), once; entries
    that exist stay as staff left them."""
    entries = sample_catalogue(runtime.clock.now())
    async with runtime.transaction() as uow:
        added = await store.insert_missing_designated_activities(uow.conn, entries)
    if added:
        log.info("sample catalogues of designated activities seeded", entries=added)


async def public_catalogue(runtime: ServiceRuntime, municipality_code: str) -> dict[str, Any]:
    """A municipality's published designated activities (an empty list: it has designated none)."""
    code = domain.registrable(municipality_code).code
    async with runtime.pool.acquire() as conn:
        entries = await store.catalogue_of(conn, code)
    return as_json(catalogue_view(code, entries))


async def create_designated_activity(write: Write, entry: DesignatedActivity) -> Outcome:
    async def act(uow: UnitOfWork) -> Outcome:
        if not await store.insert_designated_activity(uow.conn, entry):
            raise domain.DesignatedActivityExists(
                f"{entry.municipality_code}'s catalogue already has {entry.code!r} (a retired entry keeps its code)"
            )
        log.info("designated activity published", activity_id=entry.id, staff=write.principal.subject)
        return Outcome(201, as_json(designated_activity_view(entry)))

    return await write.run(act)


def _designated_for_manager(
    principal: Principal, activity_id: str
) -> Callable[[UnitOfWork], Awaitable[DesignatedActivity]]:
    """Only the municipality's managers (or an admin) change its catalogue."""

    async def load(conn: Connection) -> DesignatedActivity:
        entry = await store.get_designated_activity(conn, activity_id, lock=True)
        if entry is None:
            raise domain.DesignatedActivityNotFound(f"no designated activity {activity_id}")
        return entry

    return checked_target(load, lambda entry: principal.ensure_municipality(entry.municipality_code))


async def change_designated_activity(write: Write, activity_id: str, changes: dict[str, Any]) -> Outcome:
    async def act(uow: UnitOfWork, entry: DesignatedActivity) -> Outcome:
        changed = domain.change_designated_activity(entry, changes, write.runtime.clock.now())
        if changed != entry:
            await store.save_designated_activity(uow.conn, changed)
            log.info("designated activity changed", activity_id=activity_id, staff=write.principal.subject)
        return Outcome(200, as_json(designated_activity_view(changed)))

    return await write.run(act, authorise=_designated_for_manager(write.principal, activity_id))


async def retire_designated_activity(write: Write, activity_id: str) -> Outcome:
    """Retire an entry: no pick dated from today on counts; requests already made keep it."""

    async def act(uow: UnitOfWork, entry: DesignatedActivity) -> Outcome:
        retired = domain.retire_designated_activity(entry, write.runtime.clock.now())
        if retired is None:
            return Outcome(200, as_json(designated_activity_view(entry)))
        await store.save_designated_activity(uow.conn, retired)
        log.info("designated activity retired", activity_id=activity_id, staff=write.principal.subject)
        return Outcome(200, as_json(designated_activity_view(retired)))

    return await write.run(act, authorise=_designated_for_manager(write.principal, activity_id))


# --- Staff lists ---------------------------------------------------------------------------------


def staff_filter(
    principal: Principal,
    municipality_code: str | None,
    tier: Tier | None = None,
    status: RegistrationStatus | None = None,
    q: str | None = None,
    awaiting_review: bool | None = None,
) -> store.RegistrationFilter:
    """The filter of a staff list, after checking that the principal may see that municipality."""
    code = municipality_code or principal.municipality
    if code is None:
        raise domain.MunicipalityRequired("pass ?municipality=<6-digit code>")
    domain.municipality_from_code(code)
    principal.ensure_municipality(code)
    name = " ".join(q.split()) if q and q.strip() else None
    return store.RegistrationFilter(
        municipality_code=code, tier=tier, status=status, name=name,
        kana=domain.kana_search_term(name) if name else None, awaiting_review=awaiting_review,
    )


async def list_registrations(
    runtime: ServiceRuntime, registration_filter: store.RegistrationFilter, limit: int, offset: int,
    after: str | None = None,
) -> dict[str, Any]:
    async with runtime.pool.acquire() as conn:
        items, total = await store.search_registrations(conn, registration_filter, limit, offset, after)
    page = RegistrationPage(items=[listed_view(i) for i in items], total=total, limit=limit, offset=offset)
    return as_json(page)


async def export_registrations(
    runtime: ServiceRuntime, registration_filter: store.RegistrationFilter
) -> AsyncIterator[list[tuple[str, ...]]]:
    """Every matching registration as CSV cells, a page at a time (keyset, ``csv_export.PAGE_ROWS`` a
    page): each page on a connection borrowed for it and returned before its rows are sent, so a slow
    download holds no pooled connection and no snapshot."""
    name = municipality(registration_filter.municipality_code).full_name
    after: store.RegistrationKey | None = None
    while True:
        async with runtime.pool.acquire() as conn:
            page = await store.export_page(conn, registration_filter, name, after, csv_export.PAGE_ROWS)
        yield page.rows
        if page.next_after is None:
            return
        after = page.next_after


# --- Consents ------------------------------------------------------------------------------------


async def _emit_consent(uow: UnitOfWork, resident_id: str, consent: Consent) -> None:
    await uow.emit(
        RESIDENTS,
        events.ConsentChanged(
            resident_id=resident_id, purpose=consent.purpose, partner=consent.partner, granted=consent.granted,
            at=consent.at,
        ),
        subject=resident_id,
    )


async def _check_consent_targets(
    runtime: ServiceRuntime, targets: Sequence[tuple[ConsentPurpose, str | None]]
) -> None:
    """The partners are the seed and those registered through the gateway (the projection of
    ``gateway.partners.v1``), read only when a partner beyond the seed is named."""
    named = domain.partners_beyond_seed(targets)
    registered: set[str] = set()
    if named:
        async with runtime.pool.acquire() as conn:
            registered = await store.registered_partner_codes(conn, named)
    for purpose, partner in targets:
        domain.check_consent_target(purpose, partner, registered)


async def grant_consent(write: Write, resident_id: str, purpose: ConsentPurpose, partner: str | None) -> Outcome:
    await _check_consent_targets(write.runtime, [(purpose, partner)])

    async def act(uow: UnitOfWork) -> Outcome:
        await _lock_resident(uow.conn, resident_id)
        current = await store.current_consent(uow.conn, resident_id, purpose, partner)
        if current is not None and current.granted:
            return Outcome(200, as_json(consent_view(current)))
        consent = Consent(purpose, partner, True, write.runtime.clock.now())
        await store.set_consent(uow.conn, resident_id, consent)
        await _emit_consent(uow, resident_id, consent)
        return Outcome(200, as_json(consent_view(consent)))

    return await write.run(act)


async def revoke_consent(write: Write, resident_id: str, purpose: ConsentPurpose, partner: str | None) -> Outcome:
    """A revocation is an event too; revoking what is already revoked changes nothing."""
    await _check_consent_targets(write.runtime, [(purpose, partner)])

    async def act(uow: UnitOfWork) -> Outcome:
        await _lock_resident(uow.conn, resident_id)
        current = await store.current_consent(uow.conn, resident_id, purpose, partner)
        if current is None:
            raise domain.ConsentNotFound(f"consent {purpose!r} (partner {partner}) was never given")
        if not current.granted:
            return Outcome(200, as_json(consent_view(current)))
        consent = Consent(purpose, partner, False, write.runtime.clock.now())
        await store.set_consent(uow.conn, resident_id, consent)
        await _emit_consent(uow, resident_id, consent)
        return Outcome(200, as_json(consent_view(consent)))

    return await write.run(act)


async def list_consents(runtime: ServiceRuntime, resident_id: str) -> list[dict[str, Any]]:
    async with runtime.pool.acquire() as conn:
        if await store.get_resident(conn, resident_id) is None:
            raise domain.ResidentNotFound(f"no resident {resident_id}")
        consents = await store.consents_of(conn, resident_id)
    return [as_json(consent_view(c)) for c in consents]


# --- Maintenance ---------------------------------------------------------------------------------


async def expire_premiums(runtime: ServiceRuntime, batch_size: int = 200) -> dict[str, Any]:
    """Expire premium registrations past their validity: each once, even with several replicas.

    The claim (``UPDATE ... WHERE status = 'active' AND valid_until < today``) and the events commit
    in one transaction per batch, and residents another replica is expiring are skipped, not waited for.
    """
    expired_total = 0
    while True:
        async with runtime.transaction() as uow:
            expired, more = await _expire_batch(uow, runtime, batch_size)
        expired_total += expired
        if not more:
            break
    return as_json(ExpiryRun(expired=expired_total))


async def expire_premiums_now(write: Write, batch_size: int = 200) -> Outcome:
    """The admin's run of the expiry job: every batch in the request's one transaction."""

    async def act(uow: UnitOfWork) -> Outcome:
        expired_total, more = 0, True
        while more:
            expired, more = await _expire_batch(uow, write.runtime, batch_size)
            expired_total += expired
        return Outcome(200, as_json(ExpiryRun(expired=expired_total)))

    return await write.run(act)


async def _expire_batch(uow: UnitOfWork, runtime: ServiceRuntime, batch_size: int) -> tuple[int, bool]:
    """Expire one batch of due premium registrations; returns how many, and whether to go on."""
    now = runtime.clock.now()
    today = japan_date(now)
    resident_ids = await store.lock_residents_with_due_premiums(uow.conn, today, batch_size)
    if not resident_ids:
        return 0, False
    expired = await store.claim_due_premiums(uow.conn, resident_ids, today, now)
    for registration in expired:
        assert registration.valid_until is not None
        await uow.emit(
            RESIDENTS,
            events.PremiumExpired(
                resident_id=registration.resident_id, registration_id=registration.id,
                municipality_code=registration.municipality_code,
                expired_on=registration.valid_until + timedelta(days=1),
            ),
            subject=registration.resident_id,
        )
    for resident_id in sorted({r.resident_id for r in expired}):
        remaining = await store.registrations_of(uow.conn, resident_id)
        for ended in [r for r in expired if r.resident_id == resident_id]:
            await _release_derived_prefecture(uow, ended, remaining, now)
            remaining = await store.registrations_of(uow.conn, resident_id)
    if expired:
        log.info("premium registrations expired", count=len(expired))
    return len(expired), bool(expired) and len(resident_ids) >= batch_size


async def purge_relayed_events_of_erased(runtime: ServiceRuntime) -> int:
    async with runtime.pool.acquire() as conn:
        return await store.purge_relayed_events_of_erased(conn)
