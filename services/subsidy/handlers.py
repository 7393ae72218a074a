"""Use cases of the subsidy service: load, decide (domain), save (store), emit (outbox).

Each function runs inside one unit of work (the kit's ``Work``) — an HTTP write run by the kit's
runner (``UnitOfWork``) or a consumer batch (``HandlerContext``) — so its state changes, ledger
rows and outgoing events commit together or not at all. Business dates ("today", in Japan) are
passed in from the runtime's clock; event times are the kit's ``utc_now``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, Literal

import structlog

from services.subsidy import store
from services.subsidy.config import SubsidySettings
from services.subsidy.domain import (
    UNIT_OF,
    Accepted,
    CertificateState,
    CertificateYear,
    Channel,
    Decision,
    DuplicateTrip,
    FareProduct,
    GrantState,
    InvalidAmount,
    LedgerKind,
    Program,
    ProgramExists,
    Refused,
    Trip,
    UnitMismatch,
    UnknownGrant,
    UnknownPartner,
    UnknownProgram,
    certificate_years,
    check_discount,
    check_program_period,
    check_programme_terms,
    choose_program_for_donation,
    convert_to_program_unit,
    convert_top_up,
    decide_trip,
    one_region_conflict,
    parse_parameters,
    resolve_program_id,
    seed_program,
    trips_fingerprint,
    waitlisted_window_over,
)
from shared.contracts.base import EventData
from shared.contracts.certification import (
    CertificateExpired,
    CertificateIssued,
    CertificateRenewed,
    CertificateRevoked,
)
from shared.contracts.common import SealedMembership
from shared.contracts.donation import DonationReceived, DonationRefunded
from shared.contracts.partners import PartnerRegistered, TripKind
from shared.contracts.reasons import RESIDENT_WITHDRAWN, BudgetChangeReason, revocation_reason
from shared.contracts.registration import ResidentErased
from shared.contracts.sealed import Sealed
from shared.contracts.subsidy import (
    BudgetChanged,
    BudgetUnit,
    GrantCancelled,
    GrantExpired,
    GrantIssued,
    GrantRedeemed,
    GrantRedemptionRejected,
    GrantWaitlisted,
    Mechanism,
    RedemptionRefusal,
)
from shared.contracts.topics import BUDGETS, GRANTS, PARTNER_CODES
from shared.kit.clock import utc_now
from shared.kit.consumer import Run
from shared.kit.db import Connection
from shared.kit.erasure import erased_among, forget_responses_about, is_erased, record_erased
from shared.kit.keyring import Keyring
from shared.kit.use_case import Work
from shared.reference import travel_programs

log = structlog.get_logger(__name__)


# --- programs and budgets -------------------------------------------------------------------------


async def seed_programs(work: Work, config: SubsidySettings) -> list[str]:
    """One program per (reference program, municipality), with an opening balance; idempotent."""
    created: list[str] = []
    defaults = config.seed_defaults()
    for reference in travel_programs():
        for code in reference.municipality_codes:
            program = seed_program(reference, code, defaults)
            if not await store.insert_program(work.conn, program, created_by="seed"):
                continue
            created.append(program.program_id)
            opening = config.opening_balance(program.unit)
            if opening > 0:
                await _credit(work, program, "opening", opening, reason="opening balance (illustrative)", actor="seed")
    if created:
        log.info("travel programs seeded", programs=len(created))
    return created


@dataclass(frozen=True, slots=True)
class ProgramDraft:
    program_id: str
    title: str
    partner: str
    municipality_code: str
    mechanism: Mechanism
    parameters: dict[str, Any]
    active_from: date
    active_until: date
    opening_budget: int
    fare_products: tuple[FareProduct, ...] = ()
    participant_cap: int | None = None
    one_region_per_year: bool = False


async def create_program(work: Work, draft: ProgramDraft, actor: str, today: date) -> Program:
    parameters = parse_parameters(draft.mechanism, draft.parameters)
    check_programme_terms(draft.mechanism, parameters, draft.fare_products, draft.participant_cap)
    # The partners are the seed and those registered through the gateway (gateway.partners.v1).
    if draft.partner not in PARTNER_CODES and not await store.is_registered_partner(work.conn, draft.partner):
        raise UnknownPartner(f"partner: no partner {draft.partner!r} (not seeded, not registered through the gateway)",
                             field="partner")
    check_program_period(draft.active_from, draft.active_until, today)
    if draft.opening_budget < 0:
        raise InvalidAmount(f"opening_budget must be zero or a positive integer, not {draft.opening_budget}")
    program = Program(
        program_id=draft.program_id, title=draft.title, partner=draft.partner,
        municipality_code=draft.municipality_code, mechanism=draft.mechanism, unit=UNIT_OF[draft.mechanism],
        parameters=parameters, active_from=draft.active_from, active_until=draft.active_until,
        fare_products=draft.fare_products, participant_cap=draft.participant_cap,
        one_region_per_year=draft.one_region_per_year,
    )
    if not await store.insert_program(work.conn, program, created_by=actor):
        raise ProgramExists(f"program {draft.program_id} exists")
    if draft.opening_budget > 0:
        await _credit(work, program, "opening", draft.opening_budget, reason="opening balance", actor=actor)
    log.info("program created", program_id=program.program_id, actor=actor)
    return program


async def load_program(conn: Connection, program_id: str) -> Program:
    program = await store.program(conn, program_id)
    if program is None:
        raise UnknownProgram(f"no program {program_id}")
    return program


@dataclass(frozen=True, slots=True)
class TopUpResult:
    program_id: str
    unit: BudgetUnit
    credited: int
    entry_id: int
    available: int
    reserved: int
    spent: int
    issued_from_waitlist: list[str]


async def top_up(
    work: Work, program: Program, actor: str, unit: BudgetUnit, amount: int, reason: str, today: date
) -> TopUpResult:
    """Credit a program the caller may top up (the HTTP runner's ``authorise`` checked that)."""
    credited = convert_top_up(program, unit, amount)
    movement = await _credit(work, program, "top_up", credited, reason=reason or "top-up", actor=actor)
    issued = await promote_waitlist(work, program, today)
    budget = await store.lock_budget(work.conn, program.program_id, program.unit)  # held since the credit
    assert budget is not None
    ledger = await store.ledger_sums(work.conn, program.program_id, program.unit)
    return TopUpResult(
        program.program_id, program.unit, credited, movement.entry_id, budget.available, ledger.reserved,
        ledger.spent, [grant_id for grant_id, _ in issued],
    )


async def _credit(
    work: Work, program: Program, kind: LedgerKind, amount: int, *, reason: str, actor: str | None = None,
    donation_id: str | None = None,
) -> store.Movement:
    movement = await store.move_budget(
        work.conn, program.program_id, program.unit, kind, amount, donation_id=donation_id, reason=reason,
        actor=actor,
    )
    if movement is None:  # a credit cannot overdraw; only a missing budget row gets here
        raise RuntimeError(f"program {program.program_id} has no {program.unit} budget")
    await _budget_changed(work, program, amount, movement.available, _CREDIT_REASONS.get(kind, "other"))
    return movement


#: The published code of each kind of credit: the ledger keeps the words (a staff top-up's own),
#: the event only the code.
_CREDIT_REASONS: dict[LedgerKind, BudgetChangeReason] = {
    "opening": "opening_balance", "top_up": "top_up", "donation": "donation",
}


async def _budget_changed(
    work: Work, program: Program, delta: int, balance: int, reason: BudgetChangeReason
) -> None:
    await work.emit(
        BUDGETS,
        BudgetChanged(
            program_id=program.program_id, municipality_code=program.municipality_code, unit=program.unit,
            delta=delta, balance=balance, reason=reason, changed_at=utc_now(),
        ),
        subject=program.program_id,
    )


async def promote_waitlist(work: Work, program: Program, today: date) -> list[tuple[str, int]]:
    """Issue waitlisted grants strictly in arrival order while the budget covers the next one;
    grants whose window ended while they waited expire instead. Returns (grant id, reserved)."""
    budget = await store.lock_budget(work.conn, program.program_id, program.unit)
    if budget is None:
        return []
    available = budget.available
    issued: list[tuple[str, int]] = []
    while True:
        waiting = await store.lock_waitlist(work.conn, program.program_id, limit=100)
        for grant in waiting:
            if waitlisted_window_over(grant.window_until, today):
                await _close(work, grant, "expired", "the window ended on the waitlist", expired_on=today)
                continue
            if grant.value > available:
                return issued
            if program.is_full(await store.participants(work.conn, program.program_id)):
                return issued  # a place frees when a participant's grant ends
            movement = await store.move_budget(
                work.conn, program.program_id, program.unit, "reserve", grant.value, grant_id=grant.grant_id,
                reason="issued from the waitlist",
            )
            if movement is None:
                return issued
            available = movement.available
            now = utc_now()
            await store.issue_waitlisted(work.conn, grant.grant_id, now)
            await _emit_issued(work, grant, now)
            issued.append((grant.grant_id, grant.value))
            log.info("waitlisted grant issued", grant_id=grant.grant_id, program_id=program.program_id)
        if len(waiting) < 100:
            return issued


# --- grants from certificates ---------------------------------------------------------------------


def _grant_fields(grant: GrantState, partner: str | None = None) -> dict[str, Any]:
    return {
        "grant_id": grant.grant_id, "program_id": grant.program_id, "partner": partner or grant.partner,
        "mechanism": grant.mechanism, "certificate_number": grant.certificate_number,
        "resident_id": grant.resident_id, "municipality_code": grant.municipality_code,
    }


async def _emit_grant(work: Work, grant: GrantState, event: EventData) -> None:
    await work.emit(GRANTS, event, subject=grant.grant_id, key=grant.certificate_number)


async def _emit_issued(work: Work, grant: GrantState, now: datetime) -> None:
    await _emit_grant(
        work, grant,
        GrantIssued(
            **_grant_fields(grant), unit=grant.unit, reserved=grant.value, window_from=grant.window_from,
            window_until=grant.window_until, member_number=grant.member_number, issued_at=now,
        ),
    )


GrantingEvent = CertificateIssued | CertificateRenewed
ClosingEvent = CertificateRevoked | CertificateExpired


async def grant_certificates(run: Run[GrantingEvent], today: date) -> None:
    """A run of issued and renewed certificates, each with its own unit of work (one transaction):
    one statement projects them all and one reads the programs of their towns; only certificates of
    towns with programs go on to be granted, one by one in order (budget locks, waitlist)."""
    conn = run.conn
    # A certificate of an erased resident (a late event, a replayed dead letter, a group reset to
    # earliest) is neither projected nor granted: nothing about them is written again.
    erased = await erased_among(conn, (event.resident_id for event in run.events))
    live = [(work, event) for work, event in run if event.resident_id not in erased]
    if len(live) < len(run):
        log.info("certificate events of erased residents dropped", dropped=len(run) - len(live))
    # Granting never reads the projection, so writing it first (each certificate as its last event
    # left it) changes nothing for the grants that follow.
    await store.upsert_certificates(conn, [_certificate_row(event) for _, event in live])
    valid = [(work, event) for work, event in live if event.status == "valid"]
    if not valid:
        return
    programs = await store.programs_of_municipalities(conn, {event.municipality_code for _, event in valid})
    for work, event in valid:
        if event.municipality_code in programs:
            await grant_certificate(work, event, programs[event.municipality_code], today)


async def grant_certificate(work: Work, event: GrantingEvent, programs: Sequence[Program], today: date) -> None:
    """Grant every active program of the certificate's town (``programs``) whose partner the
    resident consented to; the certificate is projected already."""
    certificate = _certificate_state(event)
    members: dict[str, Sealed | None] = {}
    for membership in event.partners:
        members.setdefault(membership.partner, membership.member_number)
    years = certificate_years(certificate.valid_from, certificate.valid_until, today)
    for program in programs:
        if program.partner in members and program.is_active_on(today):
            for year in years:
                await _grant_program(work, program, certificate, year, members[program.partner], today)


def _certificate_state(event: GrantingEvent | ClosingEvent) -> CertificateState:
    return CertificateState(
        event.certificate_number, event.resident_id, event.municipality_code, event.valid_from, event.valid_until,
        event.status,
    )


def _certificate_row(event: GrantingEvent | ClosingEvent) -> store.CertificateRow:
    partners: Sequence[SealedMembership] = event.partners
    return store.CertificateRow(_certificate_state(event), partners)


async def _grant_program(
    work: Work, program: Program, certificate: CertificateState, year: CertificateYear,
    member_number: Sealed | None, today: date,
) -> None:
    """One grant per certificate, program and certificate year: issued if the budget covers it and
    nobody waits before it, waitlisted otherwise."""
    bound = log.bind(
        program_id=program.program_id, certificate_number=certificate.certificate_number, year_start=year.start
    )
    window = program.window_for(year)
    if window is None or window[1] < today:
        bound.info("no grant: nothing is left of the window", window=window)
        return
    if program.one_region_per_year:
        # One region per resident and certificate year (JAL): the resident's grants under the scheme
        # are read under a lock of theirs, so two towns' certificates arriving at once grant once.
        await store.lock_scheme_of_resident(work.conn, certificate.resident_id, program.scheme)
        held = await store.held_grants(work.conn, certificate.resident_id, program.scheme)
        conflict = one_region_conflict(program, certificate.municipality_code, window, held)
        if conflict is not None:
            bound.info("no grant: the resident has this program in another region for the year",
                       held_grant_id=conflict.grant_id, held_in=conflict.municipality_code)
            return
    # The budget row lock serialises grants of one program: the waitlist check, the participant
    # count and the reservation below see the same budget.
    budget = await store.lock_budget(work.conn, program.program_id, program.unit)
    if budget is None:
        raise RuntimeError(f"program {program.program_id} has no budget row")
    if await store.grant_exists(work.conn, certificate.certificate_number, program.program_id, year.start):
        bound.info("already granted for this certificate year")
        return
    grant_id = str(uuid.uuid4())
    now = utc_now()
    value = program.grant_value
    fits = (
        budget.available >= value
        and not await store.program_has_waitlist(work.conn, program.program_id)
        # Fixed fares are for a limited number of participants (ANA): a full program waitlists.
        and not program.is_full(await store.participants(work.conn, program.program_id))
    )
    status: Literal["issued", "waitlisted"] = "issued" if fits else "waitlisted"
    seq = await store.insert_grant(
        work.conn, grant_id=grant_id, program=program, certificate=certificate, period_from=year.start,
        member_number=member_number, status=status, window=window, now=now,
    )
    grant = GrantState(
        grant_id=grant_id, program_id=program.program_id, certificate_number=certificate.certificate_number,
        resident_id=certificate.resident_id, municipality_code=certificate.municipality_code,
        partner=program.partner, mechanism=program.mechanism, unit=program.unit, member_number=member_number,
        status=status, value=value, remaining=value if fits else 0, legs_counted=0, window_from=window[0],
        window_until=window[1], waitlist_seq=seq,
    )
    if fits:
        movement = await store.move_budget(
            work.conn, program.program_id, program.unit, "reserve", value, grant_id=grant_id, reason="grant issued"
        )
        if movement is None:
            raise RuntimeError("the locked budget no longer covers the grant")
        await _emit_issued(work, grant, now)
        bound.info("grant issued", grant_id=grant_id, reserved=value)
        return
    assert seq is not None
    position = await store.waitlist_position(work.conn, program.program_id, seq)
    await _emit_grant(
        work, grant,
        GrantWaitlisted(**_grant_fields(grant), unit=program.unit, needed=value, position=position, waitlisted_at=now),
    )
    bound.info("grant waitlisted", grant_id=grant_id, needed=value, position=position)


async def close_certificate(work: Work, event: ClosingEvent, today: date) -> None:
    """Cancel (revoked) or expire (expired) the certificate's open grants and release what they hold."""
    if await is_erased(work.conn, event.resident_id):
        # The erasure closed their grants already (and nothing about them is written again).
        log.info("certificate event of an erased resident dropped", certificate_number=event.certificate_number)
        return
    await store.upsert_certificates(work.conn, [_certificate_row(event)])
    if await store.forget_withdrawn_member_numbers(work.conn, event.certificate_number, event.partners):
        log.info("member numbers erased from grants", certificate_number=event.certificate_number)
    if isinstance(event, CertificateRevoked):
        status: Literal["cancelled", "expired"] = "cancelled"
        # A code of the published list, never the revocation's words: the cancellation goes on to
        # the partner and the resident. (An older revocation's free text reads as "other".)
        revoked_for = revocation_reason(event.reason)
        reason = "resident_withdrawn" if revoked_for == RESIDENT_WITHDRAWN else "certificate_revoked"
        expired_on = None
    else:
        status, reason, expired_on = "expired", "certificate expired", event.expired_on
    touched: dict[str, bool] = {}
    for grant in await store.lock_open_grants_of_certificate(work.conn, event.certificate_number):
        released = await _close(work, grant, status, reason, expired_on=expired_on)
        touched[grant.program_id] = touched.get(grant.program_id, False) or released > 0
    for program_id in sorted(p for p, released in touched.items() if released):
        await promote_waitlist(work, await load_program(work.conn, program_id), today)


async def erase_resident(work: Work, event: ResidentErased, today: date) -> None:
    """The resident withdrew with erasure: end what is open, erase what is personal, remember it.

    Their open grants are cancelled (``resident_withdrawn``) and release their reservations here,
    since the certificate's revocation may arrive after this and would then be dropped. The member
    numbers of every grant of theirs, ended ones too, and of their certificates are erased; grants,
    trips and ledger rows stay with random ids and amounts only (the budget's accounts). Stored
    responses about them go too."""
    conn = work.conn
    if not await record_erased(conn, event.resident_id, event.withdrawn_at):
        return  # erased before (the same withdrawal sent again)
    released: set[str] = set()
    for grant in await store.lock_open_grants_of_resident(conn, event.resident_id):
        if await _close(work, grant, "cancelled", RESIDENT_WITHDRAWN) > 0:
            released.add(grant.program_id)
    for program_id in sorted(released):
        await promote_waitlist(work, await load_program(conn, program_id), today)
    grants, certificates = await store.erase_resident(conn, event.resident_id)
    responses = await forget_responses_about(conn, event.resident_id)
    log.info("resident erased", resident_id=event.resident_id, grants=grants, certificates=certificates,
             stored_responses=responses)


async def readable_grants(keyring: Keyring, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Grant rows as staff and the resident read them: each member number opened (one key lookup for
    the page); None once the resident was erased."""
    sealed = [None if item["member_number"] is None else Sealed.model_validate_json(item["member_number"])
              for item in items]
    opened = await keyring.open_many(sealed)
    return [
        {**item, "member_number": None if number is None else number.decode()}
        for item, number in zip(items, opened, strict=True)
    ]


async def _close(
    work: Work, grant: GrantState, status: Literal["cancelled", "expired"], reason: str, *,
    expired_on: date | None = None,
) -> int:
    """Close an open grant, return its reservation to the budget, say so; returns what was released."""
    now = utc_now()
    released = grant.remaining if grant.status == "issued" else 0
    if released:
        movement = await store.move_budget(
            work.conn, grant.program_id, grant.unit, "release", released, grant_id=grant.grant_id, reason=reason
        )
        if movement is None:
            raise RuntimeError(f"budget of {grant.program_id} holds less than grant {grant.grant_id} reserved")
        program = await load_program(work.conn, grant.program_id)
        await _budget_changed(
            work, program, released, movement.available, "grant_cancelled" if status == "cancelled" else "grant_expired"
        )
    await store.close_grant(work.conn, grant.grant_id, status, released, reason, now)
    event: EventData
    if status == "cancelled":
        event = GrantCancelled(
            **_grant_fields(grant), unit=grant.unit, released=released, reason=reason, cancelled_at=now
        )
    else:
        event = GrantExpired(
            **_grant_fields(grant), unit=grant.unit, released=released, expired_on=expired_on or now.date()
        )
    await _emit_grant(work, grant, event)
    log.info("grant closed", grant_id=grant.grant_id, status=status, released=released)
    return released


async def expire_lapsed_grants(work: Work, today: date, batch: int = 100) -> int:
    """Expire open grants whose window ended before ``today`` (one batch); returns how many."""
    grants = await store.lock_lapsed_grants(work.conn, today, batch)
    programs: set[str] = set()
    for grant in grants:
        released = await _close(
            work, grant, "expired", "the window ended", expired_on=grant.window_until + timedelta(days=1)
        )
        if released:
            programs.add(grant.program_id)
    for program_id in sorted(programs):
        await promote_waitlist(work, await load_program(work.conn, program_id), today)
    return len(grants)


# --- donations ------------------------------------------------------------------------------------


async def credit_donation(work: Work, donation: DonationReceived, today: date) -> None:
    """A donation for dual residence (earmarked, in miles, or naming a program) raises a budget."""
    if donation.earmark != "dual_residence" and donation.unit != "miles" and donation.program_id is None:
        return
    if await store.donation_seen(work.conn, donation.donation_id):
        return  # the same donation re-sent under a new event id
    bound = log.bind(donation_id=donation.donation_id, municipality_code=donation.municipality_code)

    async def unallocated(note: str) -> None:
        bound.warning("donation not credited to any program", note=note)
        await store.record_donation(
            work.conn, donation_id=donation.donation_id, municipality_code=donation.municipality_code,
            program_id=None, unit=donation.unit, amount=donation.amount, credited=0, remainder=0,
            status="unallocated", note=note, received_at=donation.received_at,
        )

    if donation.amount <= 0:
        return await unallocated(f"amount {donation.amount} is not positive")
    program: Program | None
    if donation.program_id is not None:
        program = await store.program(work.conn, resolve_program_id(donation.program_id, donation.municipality_code))
        if program is None or program.municipality_code != donation.municipality_code:
            return await unallocated(f"no program {donation.program_id} in {donation.municipality_code}")
    else:
        candidates = await store.funding_candidates(work.conn, donation.municipality_code)
        program = choose_program_for_donation(candidates, donation.unit, today)
        if program is None:
            return await unallocated(f"no active program takes {donation.unit}")
    try:
        conversion = convert_to_program_unit(program, donation.unit, donation.amount)
    except UnitMismatch as error:
        return await unallocated(error.detail)
    if conversion.credited <= 0:
        return await unallocated(f"{donation.amount} {donation.unit} is less than one {program.unit[:-1]}")
    await store.record_donation(
        work.conn, donation_id=donation.donation_id, municipality_code=donation.municipality_code,
        program_id=program.program_id, unit=donation.unit, amount=donation.amount, credited=conversion.credited,
        remainder=conversion.remainder, status="credited", note="", received_at=donation.received_at,
    )
    await _credit(
        work, program, "donation", conversion.credited, donation_id=donation.donation_id,
        reason=f"donation {donation.donation_id} ({donation.kind}, {donation.amount} {donation.unit})",
    )
    bound.info("donation credited", program_id=program.program_id, credited=conversion.credited)
    await promote_waitlist(work, program, today)


async def refund_donation(work: Work, refund: DonationRefunded) -> None:
    """Take a refunded donation back out of what is still unreserved; reserved grants stay whole."""
    credit = await store.lock_donation(work.conn, refund.donation_id)
    if credit is None or credit.status != "credited" or credit.program_id is None:
        return
    program = await load_program(work.conn, credit.program_id)
    budget = await store.lock_budget(work.conn, program.program_id, program.unit)
    debit = min(credit.credited, budget.available if budget else 0)
    if debit > 0:
        movement = await store.move_budget(
            work.conn, program.program_id, program.unit, "debit", debit, donation_id=refund.donation_id,
            reason=f"donation {refund.donation_id} refunded",
        )
        assert movement is not None  # the budget row is locked and holds at least ``debit``
        await _budget_changed(work, program, -debit, movement.available, "donation_refunded")
    shortfall = credit.credited - debit
    note = f"; refunded {debit}" + (f", {shortfall} already reserved for grants" if shortfall else "")
    await store.mark_donation_refunded(work.conn, refund.donation_id, debit, note)
    if shortfall:
        log.warning("refund exceeds the unreserved budget", donation_id=refund.donation_id, shortfall=shortfall)


# --- trips ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TripReport:
    partner: str
    grant_id: str
    certificate_number: str
    trip_id: str
    trip_kind: TripKind
    travelled_on: date
    discount_jpy: int | None
    reported_at: datetime

    @property
    def fingerprint(self) -> tuple[str, str, str, date, int | None]:
        return trips_fingerprint(
            self.grant_id, self.certificate_number, self.trip_kind, self.travelled_on, self.discount_jpy
        )


@dataclass(frozen=True, slots=True)
class TripOutcome:
    trip: store.TripRecord
    duplicate: bool

    def as_json(self) -> dict[str, Any]:
        t = self.trip
        return {
            "partner": t.partner, "trip_id": t.trip_id, "grant_id": t.grant_id, "program_id": t.program_id,
            "accepted": t.accepted, "reason": t.reason, "detail": t.detail, "unit": t.unit, "amount": t.amount,
            "trips_counted": t.trips_counted, "completed": t.completed, "duplicate": self.duplicate,
        }


async def report_trip(work: Work, report: TripReport, channel: Channel, today: date) -> TripOutcome:
    """Count one reported trip against its grant, once per (partner, trip id).

    Over HTTP, reports that cannot be about this partner's grant (unknown grant, another
    partner's grant, a reused trip id, a malformed discount) are refused as problems and nothing
    is written; over Kafka the rejection event is the answer (or the dead-letter topic when
    there is no grant to answer about). Another partner's grant is answered on both channels
    exactly as a grant that does not exist.
    """
    conn = work.conn
    context = await store.trip_context(conn, report.grant_id, report.partner, report.trip_id)
    if context is None:
        existing = await store.find_trip(conn, report.partner, report.trip_id)
        if existing is not None:
            return await _repeated_trip(work, report, existing, channel)
        return await _unknown_grant(work, report, channel)
    if context.existing is not None:
        return await _repeated_trip(work, report, context.existing, channel)
    grant = context.grant
    if grant.certificate_number != report.certificate_number:
        return await _unknown_grant(work, report, channel)
    if grant.partner != report.partner:
        # The same answer as for a grant that does not exist, over HTTP and Kafka alike: a partner
        # never learns that another partner's grant id is real (a "wrong partner" rejection would
        # name the other partner's program on the reporter's feed).
        return await _unknown_grant(work, report, channel)
    check_discount(grant.mechanism, report.discount_jpy)
    certificate = context.certificate
    if grant.status != "issued":  # it may have just been closed: read the certificate afresh
        certificate = await store.certificate(conn, grant.certificate_number) or certificate
    trip = Trip(report.trip_kind, report.travelled_on, report.discount_jpy)
    decision: Decision = decide_trip(grant, certificate, trip, context.parameters, today)
    record = _trip_record(report, grant.program_id, grant.unit, grant.legs_counted, decision)
    now = utc_now()
    count = (
        store.GrantCount(decision.legs_counted, decision.amount, decision.release, decision.completed)
        if isinstance(decision, Accepted) else None
    )
    if not await store.record_trip(
        conn, record, municipality_code=grant.municipality_code, reported_at=report.reported_at, channel=channel,
        count=count, now=now,
    ):
        # A twin with this (partner, trip id) committed while we waited for the grant's lock.
        twin = await store.find_trip(conn, report.partner, report.trip_id)
        assert twin is not None
        return await _repeated_trip(work, report, twin, channel)
    if isinstance(decision, Accepted):
        await _emit_grant(
            work, grant,
            GrantRedeemed(
                **_grant_fields(grant), trip_id=report.trip_id, unit=grant.unit, amount=decision.amount,
                trips_counted=decision.legs_counted, completed=decision.completed, redeemed_at=now,
            ),
        )
        if decision.release:
            await _release_unused(work, grant, report.trip_id, decision.release, today)
    else:
        await _emit_rejection(work, grant, report, decision.reason, decision.detail)
    return TripOutcome(record, duplicate=False)


def _trip_record(
    report: TripReport, program_id: str | None, unit: str | None, legs_before: int, decision: Decision
) -> store.TripRecord:
    accepted = isinstance(decision, Accepted)
    return store.TripRecord(
        partner=report.partner, trip_id=report.trip_id, grant_id=report.grant_id, program_id=program_id,
        certificate_number=report.certificate_number, trip_kind=report.trip_kind, travelled_on=report.travelled_on,
        discount_jpy=report.discount_jpy, accepted=accepted,
        reason=None if isinstance(decision, Accepted) else decision.reason,
        detail="" if isinstance(decision, Accepted) else decision.detail, unit=unit,
        amount=decision.amount if isinstance(decision, Accepted) else 0,
        trips_counted=decision.legs_counted if isinstance(decision, Accepted) else legs_before,
        completed=decision.completed if isinstance(decision, Accepted) else False,
    )


async def _release_unused(work: Work, grant: GrantState, trip_id: str, amount: int, today: date) -> None:
    """A used-up discount grant hands back what its envelope did not need."""
    reason = "grant used up: unused envelope released"
    movement = await store.move_budget(
        work.conn, grant.program_id, grant.unit, "release", amount, grant_id=grant.grant_id, trip_id=trip_id,
        reason=reason,
    )
    if movement is None:  # a release only adds to what is available
        raise RuntimeError(f"program {grant.program_id} has no {grant.unit} budget")
    program = await load_program(work.conn, grant.program_id)
    await _budget_changed(work, program, amount, movement.available, "grant_used_up")
    await promote_waitlist(work, program, today)


async def _emit_rejection(
    work: Work, grant: GrantState, report: TripReport, reason: RedemptionRefusal, detail: str
) -> None:
    # The reporting partner is the one answered (for an unknown grant, the stand-in's partner).
    await _emit_grant(
        work, grant,
        GrantRedemptionRejected(
            **_grant_fields(grant, partner=report.partner), trip_id=report.trip_id, reason=reason, detail=detail,
            rejected_at=utc_now(),
        ),
    )
    log.info("trip refused", grant_id=grant.grant_id, trip_id=report.trip_id, reason=reason)


async def _repeated_trip(
    work: Work, report: TripReport, existing: store.TripRecord, channel: Channel
) -> TripOutcome:
    """The same report again is acknowledged with its first outcome; a reused trip id is refused."""
    if report.fingerprint == trips_fingerprint(
        existing.grant_id, existing.certificate_number, existing.trip_kind, existing.travelled_on,
        existing.discount_jpy,
    ):
        return TripOutcome(existing, duplicate=True)
    detail = (
        f"trip {report.trip_id} was reported before for grant {existing.grant_id}, "
        f"{existing.trip_kind} on {existing.travelled_on}"
    )
    if channel == "http":
        raise DuplicateTrip(detail)
    known = await store.lock_grant(work.conn, report.grant_id)
    if known is None:
        raise DuplicateTrip(detail + "; the grant reported now is unknown")
    await _emit_rejection(work, known[0], report, "duplicate_trip", detail)
    return TripOutcome(existing, duplicate=True)


async def _unknown_grant(work: Work, report: TripReport, channel: Channel) -> TripOutcome:
    detail = f"no grant {report.grant_id} for certificate {report.certificate_number}"
    if channel == "http":
        raise UnknownGrant(detail)
    # Kafka: answer on the grants topic when we know enough to say whose grant it would be.
    certificate = await store.certificate(work.conn, report.certificate_number)
    program = None
    if certificate is not None:
        programs = await store.programs_of_municipality(work.conn, certificate.municipality_code)
        program = next((p for p in programs if p.partner == report.partner), None)
    if certificate is None or program is None:
        raise UnknownGrant(detail + " (and no program of this partner for it)")
    refusal = Refused("unknown_grant", detail)
    record = _trip_record(report, program.program_id, program.unit, 0, refusal)
    if not await store.record_trip(
        work.conn, record, municipality_code=certificate.municipality_code, reported_at=report.reported_at,
        channel=channel,
    ):
        twin = await store.find_trip(work.conn, report.partner, report.trip_id)
        assert twin is not None
        return await _repeated_trip(work, report, twin, channel)
    stand_in = GrantState(
        grant_id=report.grant_id, program_id=program.program_id, certificate_number=report.certificate_number,
        resident_id=certificate.resident_id, municipality_code=certificate.municipality_code,
        partner=report.partner, mechanism=program.mechanism, unit=program.unit, member_number=None,
        status="cancelled", value=1, remaining=0, legs_counted=0, window_from=certificate.valid_from,
        window_until=certificate.valid_until, waitlist_seq=None,
    )
    await _emit_rejection(work, stand_in, report, "unknown_grant", detail)
    return TripOutcome(record, duplicate=False)


# --- Partners registered through the gateway (gateway.partners.v1) -------------------------------


async def record_registered_partners(conn: Connection, events: Sequence[PartnerRegistered]) -> None:
    """The projection programmes are checked against: partners beyond the seed (latest event of a code wins)."""
    latest: dict[str, PartnerRegistered] = {}
    for event in events:
        if event.code not in latest or latest[event.code].registered_at <= event.registered_at:
            latest[event.code] = event
    await store.save_registered_partners(conn, [(e.code, e.name, e.registered_at) for e in latest.values()])
    log.info("registered partners recorded", partners=sorted(latest))
