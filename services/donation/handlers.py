"""Use cases of the donation service: load, decide (``domain``), save (``store``), emit (outbox).

Each state change is one transaction. The payment confirmation, the hot path of the year-end
peak, is kept short: a donor upsert, one statement that records the donation with its receipt
number, receipt, ledger rows and one-stop count, and its events, then commit. The receipt
counter's row lock is taken as late as possible and held only until that commit.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
import structlog
from pydantic import BaseModel

from shared.contracts.donation import (
    DonationReceived,
    DonationRefunded,
    OneStopExceptionVoided,
    ReceiptIssued,
)
from shared.contracts.topics import DONATIONS
from shared.kit import idempotency
from shared.kit.auth import Principal
from shared.kit.db import Connection
from shared.kit.service import ServiceRuntime, UnitOfWork
from shared.reference import municipality

from . import domain, store
from .domain import (
    AlreadyRefunded,
    DonationNotFound,
    DonorFacts,
    DonorNotFound,
    DonorRequired,
    DonorYear,
    OneStopApplicationExists,
    OneStopApplicationNotFound,
    PaymentReferenceConflict,
    ReceiptCancelled,
    ReceiptNotFound,
    UnknownDonor,
)
from .receipt_pdf import ReceiptDocument, render_receipt
from .schemas import (
    CompanyDonor,
    DonationConfirmation,
    DonationPage,
    DonationView,
    DonorSummary,
    DonorView,
    FundBalance,
    FundsView,
    IndividualDonor,
    LedgerEntryView,
    LedgerPage,
    OneStopApplicationReceived,
    OneStopApplicationView,
    OneStopStatus,
    ReceiptView,
)

log = structlog.get_logger(__name__)

V = TypeVar("V", bound=BaseModel)
_PAYMENT_REFERENCE_KEY = "donations_payment_reference_key"
_KIND_LABELS = {"hometown_tax": "ふるさと納税", "corporate": "企業版ふるさと納税（地方創生応援税制）"}


@dataclass(frozen=True, slots=True)
class Confirmation:
    #: False when the payment reference was already recorded with the same content.
    created: bool
    donation: DonationView


@dataclass(frozen=True, slots=True)
class DonorRegistration:
    created: bool
    donor: DonorView


def _now() -> datetime:
    return datetime.now(UTC)


# ---------------------------------------------------------------------------- payment confirmation


async def confirm_donation(
    runtime: ServiceRuntime,
    confirmation: DonationConfirmation,
    *,
    correlation_id: str | None = None,
    now: datetime | None = None,
) -> Confirmation:
    """Record a confirmed payment once: donation, receipt, ledger, one-stop count, events."""
    now = now or _now()
    today = domain.today_in_japan(now)
    if (confirmation.donor is None) == (confirmation.donor_id is None):
        raise DonorRequired("send either donor details or donor_id")
    plan: domain.DonationPlan | None = None
    if confirmation.donor is not None:  # everything is known: refuse before touching the database
        plan = domain.plan_donation(confirmation, domain.check_donor_details(confirmation.donor), today)
    request_hash = _hash(confirmation.model_dump(mode="json"))
    donation_id = uuid.uuid4()
    try:
        async with runtime.transaction(correlation_id) as uow:
            if confirmation.donor is not None:
                donor_row = await _upsert_donor(uow, confirmation.donor, now)
            else:
                assert confirmation.donor_id is not None
                found = await store.lock_donor(uow.conn, confirmation.donor_id)
                if found is None:
                    raise UnknownDonor(f"no donor {confirmation.donor_id}")
                donor_row = found
            if plan is None:
                facts = DonorFacts(donor_row["type"], donor_row["head_office_code"])
                plan = domain.plan_donation(confirmation, facts, today)
            view = await _record(uow, confirmation, plan, donor_row, donation_id, request_hash, now)
    except asyncpg.UniqueViolationError as error:
        if error.constraint_name != _PAYMENT_REFERENCE_KEY:
            raise
        return await _confirmed_before(runtime, confirmation.payment_reference, request_hash)
    log.info(
        "donation recorded", donation_id=view.id, municipality=view.municipality_code,
        receipt=view.receipt_number, kind=view.kind,
    )
    return Confirmation(created=True, donation=view)


async def _record(
    uow: UnitOfWork,
    confirmation: DonationConfirmation,
    plan: domain.DonationPlan,
    donor_row: store.Record,
    donation_id: uuid.UUID,
    request_hash: str,
    now: datetime,
) -> DonationView:
    code = plan.municipality.code
    donor_id: uuid.UUID = donor_row["id"]
    resident_id: str | None = donor_row["resident_id"]
    await uow.emit(
        DONATIONS,
        DonationReceived(
            donation_id=str(donation_id), municipality_code=code, donor_id=str(donor_id), resident_id=resident_id,
            kind=plan.kind, unit=plan.unit, amount=confirmation.amount, earmark=plan.earmark,
            program_id=confirmation.program_id, payment_date=confirmation.payment_date,
            calendar_year=plan.calendar_year, received_at=now,
        ),
        subject=str(donation_id), key=code,
    )
    row = await store.record_donation(
        uow.conn,
        donation_id=donation_id, payment_reference=confirmation.payment_reference, request_hash=request_hash,
        municipality_code=code, donor_id=donor_id, kind=plan.kind, unit=plan.unit, amount=confirmation.amount,
        earmark=plan.earmark, program_id=confirmation.program_id, project=confirmation.project,
        payment_date=confirmation.payment_date, calendar_year=plan.calendar_year,
        one_stop_requested=confirmation.one_stop_requested, received_at=now,
        donor_name=donor_row["name"],
        donor_address=domain.receipt_address(donor_row["type"], donor_row["address"], donor_row["head_office_code"]),
        issues_receipt=plan.issues_receipt, ledger=plan.ledger, counts_for_one_stop=plan.counts_for_one_stop,
    )
    receipt_number: str | None = row["receipt_number"]
    if receipt_number is not None:
        await uow.emit(
            DONATIONS,
            ReceiptIssued(
                receipt_number=receipt_number, donation_id=str(donation_id), municipality_code=code,
                donor_id=str(donor_id), resident_id=resident_id, amount_jpy=confirmation.amount,
                calendar_year=plan.calendar_year, issued_at=now,
            ),
            subject=str(donation_id), key=code,
        )
    if plan.counts_for_one_stop:
        earlier: list[str] = list(row["earlier_municipalities"])
        municipalities = earlier if code in earlier else [*earlier, code]
        year = DonorYear(
            municipalities=frozenset(municipalities), requested=bool(row["one_stop_requested"]),
            voided=row["voided"], announced=row["announced"],
        )
        await _apply_one_stop(uow, donor_id, resident_id, plan.calendar_year, year, municipalities, code, now)
    return DonationView(
        id=str(donation_id), payment_reference=confirmation.payment_reference, municipality_code=code,
        municipality_name=plan.municipality.full_name, donor_id=str(donor_id), donor_name=donor_row["name"],
        kind=plan.kind, unit=plan.unit, amount=confirmation.amount, earmark=plan.earmark,
        program_id=confirmation.program_id, project=confirmation.project, payment_date=confirmation.payment_date,
        calendar_year=plan.calendar_year, one_stop_requested=confirmation.one_stop_requested,
        receipt_number=receipt_number, received_at=now, status="confirmed",
    )


async def _apply_one_stop(
    uow: UnitOfWork,
    donor_id: uuid.UUID,
    resident_id: str | None,
    calendar_year: int,
    year: DonorYear,
    municipalities: list[str],
    key: str,
    now: datetime,
) -> None:
    decision = domain.one_stop_decision(year)
    if decision.void:
        await store.void_donor_year(uow.conn, donor_id, calendar_year, now)
        log.info("one-stop exception voided", donor_id=str(donor_id), year=calendar_year)
    if decision.announce:
        await store.mark_void_announced(uow.conn, donor_id, calendar_year, now)
        state = await store.donor_year(uow.conn, donor_id, calendar_year)
        voided_at: datetime = state["voided_at"] if state is not None and state["voided_at"] else now
        await uow.emit(
            DONATIONS,
            OneStopExceptionVoided(
                donor_id=str(donor_id), resident_id=resident_id, calendar_year=calendar_year,
                municipality_codes=municipalities, voided_at=voided_at,
            ),
            subject=str(donor_id), key=key,
        )


async def _confirmed_before(runtime: ServiceRuntime, payment_reference: str, request_hash: str) -> Confirmation:
    """The payment was recorded already: the same notification again is that donation, anything else a 409."""
    async with runtime.pool.acquire() as conn:
        row = await store.donation_by_reference(conn, payment_reference)
    if row is None:  # cannot happen: the unique violation means it committed
        raise RuntimeError(f"payment {payment_reference} conflicted but is not recorded")
    if row["request_hash"] != request_hash:
        raise PaymentReferenceConflict(
            f"payment {payment_reference} was confirmed as donation {row['id']} with different content",
            donation_id=str(row["id"]),
        )
    log.info("duplicate payment notification", donation_id=str(row["id"]))
    return Confirmation(created=False, donation=_donation_view(row))


# ---------------------------------------------------------------------------- donors


async def register_donor(
    runtime: ServiceRuntime, details: IndividualDonor | CompanyDonor, *, correlation_id: str | None = None
) -> DonorRegistration:
    domain.check_donor_details(details)
    async with runtime.transaction(correlation_id) as uow:
        row = await _upsert_donor(uow, details, _now())
    return DonorRegistration(created=bool(row["created"]), donor=_donor_view(row))


async def _upsert_donor(uow: UnitOfWork, details: IndividualDonor | CompanyDonor, now: datetime) -> store.Record:
    if isinstance(details, IndividualDonor):
        resident_id, head_office_code, corporate_number = details.resident_id, None, None
    else:
        resident_id, head_office_code, corporate_number = None, details.head_office_code, details.corporate_number
    return await store.upsert_donor(
        uow.conn,
        new_id=uuid.uuid4(), donor_key=domain.donor_key(details), donor_type=details.type, name=details.name,
        address=details.address, resident_id=resident_id, email=details.email,
        head_office_code=head_office_code, corporate_number=corporate_number, now=now,
    )


async def get_donor(runtime: ServiceRuntime, principal: Principal, donor_id: uuid.UUID) -> DonorView:
    async with runtime.pool.acquire() as conn:
        row = await store.donor(conn, donor_id)
    if row is None:
        raise DonorNotFound(f"no donor {donor_id}")
    domain.ensure_donor_access(principal, row["resident_id"])
    return _donor_view(row)


async def donor_of_resident(runtime: ServiceRuntime, principal: Principal, resident_id: str) -> DonorView:
    domain.ensure_donor_access(principal, resident_id)
    async with runtime.pool.acquire() as conn:
        row = await store.donor_of_resident(conn, resident_id)
    if row is None:
        raise DonorNotFound(f"resident {resident_id} has made no donation")
    return _donor_view(row)


async def donor_summary(
    runtime: ServiceRuntime, principal: Principal, donor_id: uuid.UUID, year: int | None
) -> DonorSummary:
    year = year or domain.today_in_japan(_now()).year
    async with runtime.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        donor_row = await store.donor(conn, donor_id)
        if donor_row is None:
            raise DonorNotFound(f"no donor {donor_id}")
        domain.ensure_donor_access(principal, donor_row["resident_id"])
        donations = await store.donor_donations(conn, donor_id, year)
        municipalities = await store.donor_year_municipalities(conn, donor_id, year)
        state = await store.donor_year(conn, donor_id, year)
        applications = await store.applications_of_donor_year(conn, donor_id, year)
    requested = bool(state and state["one_stop_requested"])
    voided_at = state["voided_at"] if state else None
    views = [_donation_view(row) for row in donations]
    confirmed = [v for v in views if v.status == "confirmed"]
    return DonorSummary(
        donor_id=str(donor_id), year=year, donations=views,
        total_jpy=sum(v.amount for v in confirmed if v.unit == "jpy"),
        total_miles=sum(v.amount for v in confirmed if v.unit == "miles"),
        one_stop=OneStopStatus(
            requested=requested,
            status="void" if voided_at else ("valid" if requested else "not_requested"),
            municipality_count=len(municipalities), municipalities=municipalities,
            limit=domain.ONE_STOP_MUNICIPALITY_LIMIT, voided_at=voided_at,
            applications=[_application_view(a) for a in applications],
        ),
    )


# ---------------------------------------------------------------------------- donations


async def get_donation(runtime: ServiceRuntime, principal: Principal, donation_id: uuid.UUID) -> DonationView:
    async with runtime.pool.acquire() as conn:
        row = await store.donation(conn, donation_id)
    if row is None:
        raise DonationNotFound(f"no donation {donation_id}")
    domain.ensure_donation_access(principal, row["municipality_code"], row["donor_resident_id"])
    return _donation_view(row)


async def refund_donation(
    runtime: ServiceRuntime,
    donation_id: uuid.UUID,
    reason: str,
    *,
    idempotency_key: str | None = None,
    correlation_id: str | None = None,
) -> DonationView:
    """The payment was reversed: reverse the ledger, cancel the receipt (its number stays used)."""
    now = _now()
    async with runtime.transaction(correlation_id) as uow:
        scope = f"refund:{donation_id}"
        replayed = await _replay(uow, scope, idempotency_key, {"reason": reason}, DonationView)
        if replayed is not None:
            return replayed
        row = await store.donation(uow.conn, donation_id, lock=True)
        if row is None:
            raise DonationNotFound(f"no donation {donation_id}")
        if row["refunded_at"] is not None:
            raise AlreadyRefunded(f"donation {donation_id} was refunded at {row['refunded_at'].isoformat()}")
        reversal = domain.refund_entries(await store.donation_ledger(uow.conn, donation_id))
        await store.mark_refunded(uow.conn, donation_id, reason, now)
        if row["receipt_number"] is not None:
            await store.cancel_receipt(uow.conn, donation_id, now)
        await store.add_ledger_entries(
            uow.conn, municipality_code=row["municipality_code"], earmark=row["earmark"], unit=row["unit"],
            donation_id=donation_id, program_id=row["program_id"], entries=reversal, now=now,
        )
        if row["kind"] == "hometown_tax":
            await store.release_donor_municipality(
                uow.conn, row["donor_id"], row["calendar_year"], row["municipality_code"]
            )
        await uow.emit(
            DONATIONS,
            DonationRefunded(
                donation_id=str(donation_id), municipality_code=row["municipality_code"],
                donor_id=str(row["donor_id"]), resident_id=row["donor_resident_id"], unit=row["unit"],
                amount=row["amount"], earmark=row["earmark"], receipt_number=row["receipt_number"], refunded_at=now,
            ),
            subject=str(donation_id), key=row["municipality_code"],
        )
        view = _donation_view(row).model_copy(
            update={"status": "refunded", "refunded_at": now, "refund_reason": reason}
        )
        await _remember(uow, scope, idempotency_key, {"reason": reason}, view)
    log.info("donation refunded", donation_id=str(donation_id))
    return view


# ---------------------------------------------------------------------------- one-stop applications


async def receive_one_stop_application(
    runtime: ServiceRuntime,
    principal: Principal,
    donation_id: uuid.UUID,
    application: OneStopApplicationReceived,
    *,
    idempotency_key: str | None = None,
    correlation_id: str | None = None,
) -> OneStopApplicationView:
    now = _now()
    body = application.model_dump(mode="json")
    async with runtime.transaction(correlation_id) as uow:
        scope = f"one-stop:{donation_id}"
        replayed = await _replay(uow, scope, idempotency_key, body, OneStopApplicationView)
        if replayed is not None:
            return replayed
        row = await store.donation(uow.conn, donation_id, lock=True)
        if row is None:
            raise DonationNotFound(f"no donation {donation_id}")
        principal.ensure_municipality(row["municipality_code"])
        domain.check_application(
            kind=row["kind"], refunded=row["refunded_at"] is not None, payment_date=row["payment_date"],
            received_on=application.received_on, today=domain.today_in_japan(now),
        )
        donor_id: uuid.UUID = row["donor_id"]
        year: int = row["calendar_year"]
        state = await store.request_one_stop(uow.conn, donor_id, year)  # locks the donor-year
        created = await store.insert_application(
            uow.conn, application_id=uuid.uuid4(), donation_id=donation_id, donor_id=donor_id, year=year,
            municipality_code=row["municipality_code"], received_on=application.received_on,
            verified=application.verified,
            status=domain.application_status(year, application.received_on, state["voided"]), now=now,
        )
        if created is None:
            raise OneStopApplicationExists(f"donation {donation_id} already has a one-stop application")
        await store.mark_one_stop_requested(uow.conn, donation_id)
        municipalities = await store.donor_year_municipalities(uow.conn, donor_id, year)
        await _apply_one_stop(
            uow, donor_id, row["donor_resident_id"], year,
            DonorYear(frozenset(municipalities), requested=True, voided=state["voided"], announced=state["announced"]),
            municipalities, row["municipality_code"], now,
        )
        view = _application_view(created)
        await _remember(uow, scope, idempotency_key, body, view)
    return view


async def verify_one_stop_application(
    runtime: ServiceRuntime, principal: Principal, donation_id: uuid.UUID
) -> OneStopApplicationView:
    async with runtime.transaction() as uow:
        row = await store.donation(uow.conn, donation_id)
        if row is None:
            raise DonationNotFound(f"no donation {donation_id}")
        principal.ensure_municipality(row["municipality_code"])
        updated = await store.verify_application(uow.conn, donation_id, _now())
        if updated is None:
            raise OneStopApplicationNotFound(f"donation {donation_id} has no one-stop application")
    return _application_view(updated)


# ---------------------------------------------------------------------------- receipts


async def get_receipt(runtime: ServiceRuntime, principal: Principal, number: str) -> ReceiptView:
    return _receipt_view(await _readable_receipt(runtime, principal, number))


async def receipt_pdf(runtime: ServiceRuntime, principal: Principal, number: str) -> bytes:
    row = await _readable_receipt(runtime, principal, number)
    if row["status"] == "cancelled":
        raise ReceiptCancelled(f"receipt {number} was cancelled; it is not printed")
    target = municipality(row["municipality_code"])
    document = ReceiptDocument(
        number=row["number"], donor_name=row["donor_name"], donor_address=row["donor_address"],
        donor_is_company=row["donor_type"] == "company", municipality_name=target.full_name,
        issuer=domain.issuer_title(target), donation_date=row["donation_date"], amount_jpy=row["amount_jpy"],
        kind_label=_KIND_LABELS.get(row["kind"], row["kind"]), project=row["project"],
        issued_on=domain.today_in_japan(row["issued_at"]), reissue_count=row["reissue_count"],
        reissued_on=domain.today_in_japan(row["last_reissued_at"]) if row["last_reissued_at"] else None,
    )
    return await asyncio.to_thread(render_receipt, document)


async def reissue_receipt(
    runtime: ServiceRuntime,
    principal: Principal,
    number: str,
    *,
    idempotency_key: str | None = None,
    correlation_id: str | None = None,
) -> ReceiptView:
    """Record a re-issue (the same number, counted and dated); the PDF then says 再発行."""
    async with runtime.transaction(correlation_id) as uow:
        scope = f"reissue:{number}"
        replayed = await _replay(uow, scope, idempotency_key, {}, ReceiptView)
        if replayed is not None:
            return replayed
        row = await _receipt_row(uow.conn, principal, number)
        if row["status"] == "cancelled":
            raise ReceiptCancelled(f"receipt {number} was cancelled; it cannot be re-issued")
        await store.record_reissue(uow.conn, number, _now())
        updated = await store.receipt(uow.conn, number)
        assert updated is not None
        view = _receipt_view(updated)
        await _remember(uow, scope, idempotency_key, {}, view)
    return view


async def _readable_receipt(runtime: ServiceRuntime, principal: Principal, number: str) -> store.Record:
    async with runtime.pool.acquire() as conn:
        return await _receipt_row(conn, principal, number)


async def _receipt_row(conn: Connection, principal: Principal, number: str) -> store.Record:
    row = await store.receipt(conn, number) if domain.RECEIPT_NUMBER.fullmatch(number) else None
    if row is None:
        raise ReceiptNotFound(f"no receipt {number}")
    domain.ensure_donation_access(principal, row["municipality_code"], row["donor_resident_id"])
    return row


# ---------------------------------------------------------------------------- staff views


async def municipality_donations(
    runtime: ServiceRuntime, principal: Principal, code: str, year: int | None, limit: int, offset: int
) -> DonationPage:
    _ensure_staff_of(principal, code)
    async with runtime.pool.acquire() as conn:
        rows, total = await store.municipality_donations(conn, code, year, limit, offset)
    return DonationPage(items=[_donation_view(r) for r in rows], total=total, limit=limit, offset=offset)


async def funds(runtime: ServiceRuntime, principal: Principal, code: str) -> FundsView:
    _ensure_staff_of(principal, code)
    async with runtime.pool.acquire() as conn:
        rows = await store.fund_balances(conn, code)
    return FundsView(municipality_code=code, funds=[FundBalance(**dict(r)) for r in rows])


async def ledger(runtime: ServiceRuntime, principal: Principal, code: str, limit: int, offset: int) -> LedgerPage:
    _ensure_staff_of(principal, code)
    async with runtime.pool.acquire() as conn:
        rows, total = await store.ledger_entries(conn, code, limit, offset)
    items = [
        LedgerEntryView(**{**dict(r), "donation_id": str(r["donation_id"]) if r["donation_id"] else None})
        for r in rows
    ]
    return LedgerPage(items=items, total=total, limit=limit, offset=offset)


CSV_COLUMNS = (
    "receipt_number", "donation_id", "payment_reference", "payment_date", "kind", "unit", "amount", "earmark",
    "program_id", "project", "donor_type", "donor_name", "donor_address", "one_stop_requested",
    "one_stop_status", "received_at", "refunded_at", "receipt_status", "reissue_count",
)


def export_donations_csv(
    runtime: ServiceRuntime, principal: Principal, code: str, year: int
) -> AsyncIterator[list[object]]:
    """A municipality's donations of one calendar year as CSV (UTF-8 with BOM), streamed from a cursor.

    Access is checked now, before the response starts; rows are read from one consistent snapshot.
    """
    _ensure_staff_of(principal, code)

    async def rows() -> AsyncIterator[list[object]]:
        async with runtime.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            async for row in store.export_donations(conn, code, year):
                yield [row[column if column != "donation_id" else "id"] for column in CSV_COLUMNS]

    return rows()


def _ensure_staff_of(principal: Principal, code: str) -> None:
    domain.known_municipality(code)
    principal.ensure_municipality(code)


# ---------------------------------------------------------------------------- idempotency and views


def _hash(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


async def _replay(uow: UnitOfWork, scope: str, key: str | None, body: Any, model: type[V]) -> V | None:
    if key is None:
        return None
    stored = await idempotency.replay(uow.conn, scope, key, idempotency.request_hash(body))
    return None if stored is None else model.model_validate(stored.body)


async def _remember(uow: UnitOfWork, scope: str, key: str | None, body: Any, view: BaseModel) -> None:
    if key is not None:
        await idempotency.remember(
            uow.conn, scope, key, idempotency.request_hash(body), 200, view.model_dump(mode="json")
        )


def _donor_view(row: store.Record) -> DonorView:
    return DonorView(
        id=str(row["id"]), type=row["type"], name=row["name"], address=row["address"],
        resident_id=row["resident_id"], email=row["email"], head_office_code=row["head_office_code"],
        corporate_number=row["corporate_number"], created_at=row["created_at"],
    )


def _donation_view(row: store.Record) -> DonationView:
    return DonationView(
        id=str(row["id"]), payment_reference=row["payment_reference"], municipality_code=row["municipality_code"],
        municipality_name=municipality(row["municipality_code"]).full_name, donor_id=str(row["donor_id"]),
        donor_name=row["donor_name"], kind=row["kind"], unit=row["unit"], amount=row["amount"],
        earmark=row["earmark"], program_id=row["program_id"], project=row["project"],
        payment_date=row["payment_date"], calendar_year=row["calendar_year"],
        one_stop_requested=row["one_stop_requested"], receipt_number=row["receipt_number"],
        received_at=row["received_at"], status="refunded" if row["refunded_at"] else "confirmed",
        refunded_at=row["refunded_at"], refund_reason=row["refund_reason"],
    )


def _receipt_view(row: store.Record) -> ReceiptView:
    return ReceiptView(
        number=row["number"], donation_id=str(row["donation_id"]), municipality_code=row["municipality_code"],
        municipality_name=municipality(row["municipality_code"]).full_name, calendar_year=row["calendar_year"],
        donor_id=str(row["donor_id"]), donor_name=row["donor_name"], donor_address=row["donor_address"],
        amount_jpy=row["amount_jpy"], donation_date=row["donation_date"], issued_at=row["issued_at"],
        status=row["status"], cancelled_at=row["cancelled_at"], reissue_count=row["reissue_count"],
        last_reissued_at=row["last_reissued_at"],
    )


def _application_view(row: store.Record) -> OneStopApplicationView:
    return OneStopApplicationView(
        id=str(row["id"]), donation_id=str(row["donation_id"]), donor_id=str(row["donor_id"]),
        municipality_code=row["municipality_code"], calendar_year=row["calendar_year"],
        received_on=row["received_on"], verified=row["verified"], verified_at=row["verified_at"],
        status=row["status"], recorded_at=row["recorded_at"],
    )
