"""Use cases of the donation service: load, decide (``domain``), save (``store``), emit (outbox).

Every HTTP write runs through the kit's runner (``Write.run``): the permission check first, then
an Idempotency-Key replay scoped to the caller, then one transaction. The payment confirmation,
the hot path of the year-end peak, is kept short: one statement that finds or creates the donor (a
person; a company is found first) and records the donation with its receipt number, receipt, ledger
rows and one-stop count, then its events, then commit. The receipt counter's row lock is taken last
in that statement, after the donor's, and held only until that commit. Under load, concurrent
confirmations share a transaction and that statement (``store.RECORD``): one per batch, which raises
each municipality-year's counter once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import structlog

from shared.contracts.donation import (
    DonationReceived,
    DonationRefunded,
    OneStopExceptionVoided,
)
from shared.contracts.registration import ResidentErased
from shared.contracts.topics import DONATIONS
from shared.kit.auth import Principal, Role
from shared.kit.clock import japan_date
from shared.kit.csv_export import keyset_rows
from shared.kit.db import Connection
from shared.kit.erasure import forget_responses_about, is_erased, record_erased
from shared.kit.errors import Forbidden
from shared.kit.service import ServiceRuntime, UnitOfWork
from shared.kit.use_case import Outcome, Work, Write
from shared.reference import municipality

from . import domain, store
from .domain import (
    NOT_REQUESTED,
    ApplicationReceived,
    CompanyDetails,
    Donation,
    DonationNotFound,
    DonationPlan,
    Donor,
    DonorDetails,
    DonorNotFound,
    NewDonor,
    OneStopApplication,
    OneStopApplicationExists,
    OneStopApplicationNotFound,
    PaymentConfirmation,
    PaymentReferenceConflict,
    PersonDetails,
    Receipt,
    ReceiptNotFound,
    UnknownDonor,
)
from .receipt_pdf import ReceiptDocument, render_receipt
from .schemas import (
    DonationPage,
    DonationView,
    DonorErasureView,
    DonorSummary,
    DonorView,
    FundBalance,
    FundsView,
    LedgerEntryView,
    LedgerPage,
    OneStopApplicationView,
    OneStopStatus,
    ReceiptView,
)

log = structlog.get_logger(__name__)

CSV_COLUMNS = (
    "receipt_number", "donation_id", "payment_reference", "payment_date", "kind", "unit", "amount", "earmark",
    "program_id", "project", "donor_type", "donor_name", "donor_address", "one_stop_requested",
    "one_stop_status", "received_at", "refunded_at", "receipt_status", "reissue_count", "special_deduction",
    "revitalisation_plan_id",
)


# ---------------------------------------------------------------------------- access


def ensure_donor_access(principal: Principal, donor_resident_id: str | None) -> None:
    """A donor's own data: admin, or the resident the donor record is linked to."""
    if principal.role is Role.ADMIN:
        return
    if principal.role is Role.RESIDENT and donor_resident_id is not None and principal.subject == donor_resident_id:
        return
    raise Forbidden("only the donor (a resident linked to this donor) or an admin")


def ensure_donation_access(principal: Principal, municipality_code: str, donor_resident_id: str | None) -> None:
    """A donation or its receipt: admin, staff of its municipality, or its donor."""
    if principal.role is Role.STAFF:
        principal.ensure_municipality(municipality_code)
        return
    ensure_donor_access(principal, donor_resident_id)


# ---------------------------------------------------------------------------- events


async def _apply_one_stop(
    work: Work, donation: Donation, year: domain.DonorYear, municipalities: list[str], at: datetime,
    voided_at: datetime | None,
) -> None:
    """Void the donor-year and tell the donor, as the one-stop rules decide."""
    decision = domain.one_stop_decision(year)
    if decision.void:
        await store.void_donor_year(work.conn, donation.donor_id, donation.calendar_year, at)
        log.info("one-stop exception voided", donor_id=str(donation.donor_id), year=donation.calendar_year)
    if decision.announce:
        await store.mark_void_announced(work.conn, donation.donor_id, donation.calendar_year, at)
        await work.emit(
            DONATIONS,
            OneStopExceptionVoided(
                donor_id=str(donation.donor_id), resident_id=donation.donor_resident_id,
                calendar_year=donation.calendar_year, municipality_codes=municipalities,
                voided_at=voided_at or at,
            ),
            subject=str(donation.donor_id), key=donation.municipality_code,
        )


# ---------------------------------------------------------------------------- erasure


async def erase_resident(work: Work, event: ResidentErased, at: datetime) -> None:
    """Erasure: the resident's donor record loses everything but what its receipts must keep.

    Recorded in the erased-residents ledger in the same transaction, so a payment notification
    naming the resident later is recorded unlinked (``confirm_donation``)."""
    conn = work.conn
    await record_erased(conn, event.resident_id, at)
    for donor in await store.lock_donors_of_resident(conn, event.resident_id):
        await _erase(conn, donor.id, at)
    await forget_responses_about(conn, event.resident_id)
    log.info("resident withdrawn: donor data erased", resident_id=event.resident_id)


async def _erase(conn: Connection, donor_id: uuid.UUID, at: datetime) -> Donor | None:
    """Erase one donor (None when erased already) and the stored write responses about them."""
    erased = await store.erase_donor(conn, donor_id, at)
    # A stored response names the donor id (donations, receipts, applications): it may hold the
    # name and address, a copy the law does not ask to keep.
    await forget_responses_about(conn, str(donor_id))
    return erased


@dataclass(frozen=True, slots=True)
class PurgeRound:
    """One round of the retention job: how many receipts it blanked, and donors it finished."""

    ran: bool
    receipts: int = 0
    donors: int = 0


#: The advisory lock of the retention job ("DNRP"): one replica runs a round at a time.
_PURGE_LOCK = 0x444E_5250


# ---------------------------------------------------------------------------- the service


class DonationService:
    def __init__(self, runtime: ServiceRuntime, *, retention_years: int = domain.DEFAULT_RETENTION_YEARS) -> None:
        self.runtime = runtime
        self.clock = runtime.clock
        self.retention_years = retention_years

    # payment confirmation (the hot path)

    async def confirm_donation(self, write: Write, confirmation: PaymentConfirmation) -> Outcome:
        """Record a confirmed payment once: donation, receipt, ledger, one-stop count, events.

        201 with the new donation; the same payment again with the same content is 200 with the
        first donation, with other content a 409."""
        now = self.clock.now()
        today = japan_date(now)
        domain.check_one_donor(confirmation)
        known: DonationPlan | None = None
        if confirmation.donor is not None:  # everything is known: refuse before touching the database
            known = domain.plan_donation(confirmation, domain.check_donor_details(confirmation.donor), today)
        donation_id = uuid.uuid4()

        async def act(work: UnitOfWork) -> Outcome:
            donor: Donor | NewDonor
            if known is not None:
                assert confirmation.donor is not None
                details = await _unless_erased(work.conn, confirmation.donor)
                # The donor on file stays as the donor or an admin left it: a confirmation only names it.
                donor = domain.new_donor(details, uuid.uuid4(), now)
                if isinstance(details, CompanyDetails):  # its receipt address needs the record on file first
                    donor, _ = await store.find_or_create_donor(work.conn, donor)
                # else a person is found or created by the statement that records the donation
                plan = known
            else:
                assert confirmation.donor_id is not None
                found = await store.lock_donor(work.conn, confirmation.donor_id)
                if found is None:
                    raise UnknownDonor(f"no donor {confirmation.donor_id}")
                found.check_usable()
                donor = found
                plan = domain.plan_donation(confirmation, donor.facts, today)
            donation = await self._record(work, domain.new_donation(confirmation, plan, donor, donation_id, now), donor)
            log.info("donation recorded", donation_id=str(donation.id), municipality=donation.municipality_code,
                     receipt=donation.receipt_number, kind=donation.kind)
            return Outcome(201, _donation_view(donation).model_dump(mode="json"))

        try:
            # Under load, confirmations share transactions (shared/kit/group_commit.py): a hot municipality's
            # receipt counter is then locked once per batch.
            return await write.run(act, group_commit=True)
        except asyncpg.UniqueViolationError as error:
            if error.constraint_name != store.PAYMENT_REFERENCE_KEY:
                raise
        # Recorded already (the unique index refused this attempt, which rolled back and gave its
        # receipt number back): the same notification again is that donation, anything else a 409.
        return Outcome(200, (await self._confirmed_before(confirmation)).model_dump(mode="json"))

    async def _record(self, work: Work, record: domain.NewDonation, named: Donor | NewDonor) -> Donation:
        # In a group-commit batch, one statement records the batch's confirmations (``store.RECORD``).
        recorded = await store.RECORD(work.conn, record)
        if recorded.donor is not None:  # found or created with the donation: its id, not the one sent
            donor = recorded.donor
        else:
            assert isinstance(named, Donor)
            donor = named
        code = record.municipality_code
        subject, donor_id = str(record.id), str(donor.id)
        await work.emit(
            DONATIONS,
            DonationReceived(
                donation_id=subject, municipality_code=code, donor_id=donor_id, resident_id=donor.resident_id,
                kind=record.kind, unit=record.unit, amount=record.amount, earmark=record.earmark,
                program_id=record.program_id, payment_date=record.payment_date, calendar_year=record.calendar_year,
                received_at=record.received_at, special_deduction=record.special_deduction,
                revitalisation_plan_id=record.revitalisation_plan_id,
                # Issued with the donation (a money donation's): one act, one event.
                receipt_number=recorded.receipt_number,
            ),
            subject=subject, key=code,
        )
        donation = Donation.recorded(record, donor, recorded.receipt_number)
        if recorded.year is not None:
            municipalities = recorded.municipalities(code)
            await _apply_one_stop(
                work, donation, recorded.year.with_municipalities(municipalities), municipalities,
                record.received_at, recorded.year.voided_at,
            )
        return donation

    async def _confirmed_before(self, confirmation: PaymentConfirmation) -> DonationView:
        async with self.runtime.pool.acquire() as conn:
            donation = await store.donation_by_reference(conn, confirmation.payment_reference)
        if donation is None:  # cannot happen: the unique violation means it committed
            raise RuntimeError(f"payment {confirmation.payment_reference} conflicted but is not recorded")
        if donation.request_hash != confirmation.content_hash():
            raise PaymentReferenceConflict(
                f"payment {confirmation.payment_reference} was confirmed as donation {donation.id} "
                "with different content",
                donation_id=str(donation.id),
            )
        log.info("duplicate payment notification", donation_id=str(donation.id))
        return _donation_view(donation)

    # donors

    async def register_donor(self, write: Write, details: DonorDetails) -> Outcome:
        """Find or create a donor by identity: 201 new, 200 existing (details updated)."""
        domain.check_donor_details(details)

        async def act(work: UnitOfWork) -> Outcome:
            donor, created = await store.upsert_donor(
                work.conn, domain.new_donor(await _unless_erased(work.conn, details), uuid.uuid4(), self.clock.now())
            )
            return Outcome(201 if created else 200, _donor_view(donor).model_dump(mode="json"))

        return await write.run(act)

    async def erase_donor(self, write: Write, donor_id: uuid.UUID) -> Outcome:
        """Erase a donor on request (APPI Art. 35): what the receipts must keep stays until its period
        ends. Erasing an erased donor answers the same again."""
        principal = write.principal

        async def authorise(work: UnitOfWork) -> Donor:
            donor = await store.lock_donor(work.conn, donor_id)
            if donor is None:
                raise DonorNotFound(f"no donor {donor_id}")
            # Managers act for donors of their municipality: one who gave to it.
            if principal.role is not Role.ADMIN and not await store.donor_gave_to(
                work.conn, donor_id, principal.municipality or ""
            ):
                raise Forbidden(f"donor {donor_id} gave nothing to {principal.municipality}")
            return donor

        async def act(work: UnitOfWork, donor: Donor) -> Outcome:
            donor.check_erasable()
            now = self.clock.now()
            erased = await _erase(work.conn, donor.id, now) if not donor.erased else None
            if erased is not None:
                log.info("donor erased on request", donor_id=str(donor_id))
            kept = await store.receipt_years(work.conn, donor_id)
            view = DonorErasureView(
                donor_id=str(donor_id), erased_at=erased.erased_at if erased else donor.erased_at,
                erasable_from=domain.erasable_from(kept, self.retention_years),
            )
            return Outcome(200, view.model_dump(mode="json"))

        return await write.run(act, authorise=authorise)

    async def purge_retained_records(self, batch_size: int = 1000) -> PurgeRound:
        """The retention job's round: blank the kept donor name and address of erased donors'
        receipts whose period has ended (today in Japan). One replica at a time (an advisory lock
        for the round's transaction); each receipt is blanked and logged once."""
        now = self.clock.now()
        last_year = domain.last_erasable_year(japan_date(now), self.retention_years)
        receipts = donors = 0
        while True:
            async with self.runtime.transaction() as work:
                if not await work.conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _PURGE_LOCK):
                    # Another replica runs a round now: it finds what is due.
                    return PurgeRound(ran=bool(receipts), receipts=receipts, donors=donors)
                purged = await store.purge_retained_receipts(work.conn, last_year, now, batch_size)
            receipts += purged.receipts
            donors += len(purged.donors)
            if purged.receipts:
                log.info(
                    "retention ended: receipts of erased donors purged", receipts=purged.receipts,
                    donors_done=[str(d) for d in purged.donors], through_year=last_year,
                )
            if purged.receipts < batch_size:
                return PurgeRound(ran=True, receipts=receipts, donors=donors)

    async def get_donor(self, principal: Principal, donor_id: uuid.UUID) -> DonorView:
        async with self.runtime.pool.acquire() as conn:
            donor = await store.donor(conn, donor_id)
        if donor is None:
            raise DonorNotFound(f"no donor {donor_id}")
        ensure_donor_access(principal, donor.resident_id)
        return _donor_view(donor)

    async def donor_of_resident(self, principal: Principal, resident_id: str) -> DonorView:
        ensure_donor_access(principal, resident_id)
        async with self.runtime.pool.acquire() as conn:
            donor = await store.donor_of_resident(conn, resident_id)
        if donor is None:
            raise DonorNotFound(f"resident {resident_id} has made no donation")
        return _donor_view(donor)

    async def donor_summary(self, principal: Principal, donor_id: uuid.UUID, year: int | None) -> DonorSummary:
        year = year or self.clock.today().year
        async with self.runtime.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            donor = await store.donor(conn, donor_id)
            if donor is None:
                raise DonorNotFound(f"no donor {donor_id}")
            ensure_donor_access(principal, donor.resident_id)
            donations = await store.donor_donations(conn, donor_id, year)
            municipalities = await store.donor_year_municipalities(conn, donor_id, year)
            state = await store.donor_year(conn, donor_id, year) or NOT_REQUESTED
            applications = await store.applications_of_donor_year(conn, donor_id, year)
        confirmed = [d for d in donations if not d.refunded]
        return DonorSummary(
            donor_id=str(donor_id), year=year, donations=[_donation_view(d) for d in donations],
            total_jpy=sum(d.amount for d in confirmed if d.unit == "jpy"),
            total_miles=sum(d.amount for d in confirmed if d.unit == "miles"),
            one_stop=OneStopStatus(
                requested=state.requested, status=state.status, municipality_count=len(municipalities),
                municipalities=municipalities, limit=domain.ONE_STOP_MUNICIPALITY_LIMIT, voided_at=state.voided_at,
                applications=[_application_view(a) for a in applications],
            ),
        )

    # donations

    async def get_donation(self, principal: Principal, donation_id: uuid.UUID) -> DonationView:
        async with self.runtime.pool.acquire() as conn:
            donation = await store.donation(conn, donation_id)
        if donation is None:
            raise DonationNotFound(f"no donation {donation_id}")
        ensure_donation_access(principal, donation.municipality_code, donation.donor_resident_id)
        return _donation_view(donation)

    def _donation_to_change(
        self, donation_id: uuid.UUID, check: Callable[[Donation], None] | None = None, *, lock: bool = True
    ) -> Callable[[UnitOfWork], Awaitable[Donation]]:
        """The donation, locked for the change, once ``check`` says who asks may change it."""

        async def authorise(work: UnitOfWork) -> Donation:
            donation = await store.donation(work.conn, donation_id, lock=lock)
            if donation is None:
                raise DonationNotFound(f"no donation {donation_id}")
            if check is not None:
                check(donation)
            return donation

        return authorise

    async def refund_donation(self, write: Write, donation_id: uuid.UUID, reason: str) -> Outcome:
        """The payment was reversed: reverse the ledger, cancel the receipt (its number stays used)."""

        async def act(work: UnitOfWork, donation: Donation) -> Outcome:
            conn = work.conn
            now = self.clock.now()
            refunded = donation.refund(reason, now)
            reversal = domain.refund_entries(await store.donation_ledger(conn, donation_id))
            await store.mark_refunded(conn, refunded)
            if refunded.receipt_number is not None:
                await store.cancel_receipt(conn, donation_id, now)
            await store.add_ledger_entries(conn, refunded, reversal, now)
            if refunded.kind == "hometown_tax" and refunded.special_deduction:  # only those were counted
                await store.release_donor_municipality(conn, refunded)
            await work.emit(
                DONATIONS,
                DonationRefunded(
                    donation_id=str(donation_id), municipality_code=refunded.municipality_code,
                    donor_id=str(refunded.donor_id), resident_id=refunded.donor_resident_id, unit=refunded.unit,
                    amount=refunded.amount, earmark=refunded.earmark, receipt_number=refunded.receipt_number,
                    refunded_at=now,
                ),
                subject=str(donation_id), key=refunded.municipality_code,
            )
            log.info("donation refunded", donation_id=str(donation_id))
            return Outcome(200, _donation_view(refunded).model_dump(mode="json"))

        # Refunds come from the payment provider (the admin role of the route): any donation.
        return await write.run(act, authorise=self._donation_to_change(donation_id))

    # one-stop applications

    async def receive_one_stop_application(
        self, write: Write, donation_id: uuid.UUID, received: ApplicationReceived
    ) -> Outcome:
        """The donation's municipality received the donor's one-stop application."""
        principal = write.principal

        async def act(work: UnitOfWork, donation: Donation) -> Outcome:
            conn = work.conn
            now = self.clock.now()
            donation.check_application(received.received_on, japan_date(now))
            year = await store.request_one_stop(conn, donation.donor_id, donation.calendar_year)  # locks the year
            application = OneStopApplication.receive(donation, received, year, uuid.uuid4(), now)
            if not await store.insert_application(conn, application):
                raise OneStopApplicationExists(f"donation {donation_id} already has a one-stop application")
            await store.mark_one_stop_requested(conn, donation_id)
            municipalities = await store.donor_year_municipalities(conn, donation.donor_id, donation.calendar_year)
            await _apply_one_stop(
                work, donation, year.with_municipalities(municipalities, requested=True), municipalities, now,
                year.voided_at,
            )
            return Outcome(201, _application_view(application).model_dump(mode="json"))

        return await write.run(
            act, authorise=self._donation_to_change(donation_id, _of_municipality(principal))
        )

    async def verify_one_stop_application(self, write: Write, donation_id: uuid.UUID) -> Outcome:
        """The application's identity documents were checked (only the fact is recorded)."""
        principal = write.principal

        async def act(work: UnitOfWork, donation: Donation) -> Outcome:
            verified = await store.verify_application(work.conn, donation_id, self.clock.now())
            if verified is None:
                raise OneStopApplicationNotFound(f"donation {donation_id} has no one-stop application")
            return Outcome(200, _application_view(verified).model_dump(mode="json"))

        return await write.run(
            act, authorise=self._donation_to_change(donation_id, _of_municipality(principal), lock=False)
        )

    # receipts

    async def get_receipt(self, principal: Principal, number: str) -> ReceiptView:
        async with self.runtime.pool.acquire() as conn:
            receipt = await _readable_receipt(conn, principal, number)
        return _receipt_view(receipt)

    async def receipt_pdf(self, principal: Principal, number: str) -> bytes:
        async with self.runtime.pool.acquire() as conn:
            receipt = await _readable_receipt(conn, principal, number)
        receipt.check_printable()
        target = municipality(receipt.municipality_code)
        document = ReceiptDocument(
            number=receipt.number, donor_name=receipt.donor_name, donor_address=receipt.donor_address,
            donor_is_company=receipt.donor_type == "company", municipality_name=target.full_name,
            issuer=domain.issuer_title(target), donation_date=receipt.donation_date, amount_jpy=receipt.amount_jpy,
            kind_label=receipt.kind_label, project=receipt.project, plan_name=receipt.plan_name, note=receipt.note,
            issued_on=japan_date(receipt.issued_at), reissue_count=receipt.reissue_count,
            reissued_on=japan_date(receipt.last_reissued_at) if receipt.last_reissued_at else None,
        )
        return await asyncio.to_thread(render_receipt, document)

    async def reissue_receipt(self, write: Write, number: str) -> Outcome:
        """Record a re-issue (the same number, counted and dated); the PDF then says 再発行."""
        principal = write.principal

        async def authorise(work: UnitOfWork) -> Receipt:
            # Who may read the receipt may re-issue it; its row is locked against a refund meanwhile.
            return await _readable_receipt(work.conn, principal, number, lock=True)

        async def act(work: UnitOfWork, receipt: Receipt) -> Outcome:
            reissued = receipt.reissue(self.clock.now())
            await store.save_reissue(work.conn, reissued)
            return Outcome(200, _receipt_view(reissued).model_dump(mode="json"))

        return await write.run(act, authorise=authorise)

    # staff views

    async def municipality_donations(
        self, principal: Principal, code: str, year: int | None, limit: int, offset: int
    ) -> DonationPage:
        _ensure_staff_of(principal, code)
        async with self.runtime.pool.acquire() as conn:
            donations, total = await store.municipality_donations(conn, code, year, limit, offset)
        return DonationPage(items=[_donation_view(d) for d in donations], total=total, limit=limit, offset=offset)

    async def funds(self, principal: Principal, code: str) -> FundsView:
        domain.known_municipality(code)
        principal.ensure_reads_municipality(code)  # balances are figures: prefecture and ministry too
        async with self.runtime.pool.acquire() as conn:
            balances = await store.fund_balances(conn, code)
        return FundsView(
            municipality_code=code,
            funds=[
                FundBalance(earmark=b.earmark, unit=b.unit, donated=b.donated, refunded=b.refunded,
                            transferred=b.transferred, balance=b.balance)
                for b in balances
            ],
        )

    async def ledger(self, principal: Principal, code: str, limit: int, offset: int) -> LedgerPage:
        _ensure_staff_of(principal, code)
        async with self.runtime.pool.acquire() as conn:
            rows, total = await store.ledger_entries(conn, code, limit, offset)
        items = [
            LedgerEntryView(
                id=r.id, earmark=r.earmark, unit=r.unit, entry=r.entry, amount=r.amount,
                donation_id=str(r.donation_id) if r.donation_id else None, program_id=r.program_id,
                recorded_at=r.recorded_at,
            )
            for r in rows
        ]
        return LedgerPage(items=items, total=total, limit=limit, offset=offset)

    def export_donations_csv(self, principal: Principal, code: str, year: int) -> AsyncIterator[list[object]]:
        """A municipality's donations of one calendar year as CSV rows, a page at a time.

        Access is checked now, before the response starts; no connection is held between pages.
        """
        _ensure_staff_of(principal, code)
        pool = self.runtime.pool

        async def page(conn: Connection, after: int | None, limit: int) -> list[tuple[int, domain.ExportedDonation]]:
            return await store.export_donations(conn, code, year, after, limit)

        async def rows() -> AsyncIterator[list[object]]:
            async for _, line in keyset_rows(pool, page, lambda numbered: numbered[0]):
                yield [getattr(line, column) for column in CSV_COLUMNS]

        return rows()


async def _unless_erased(conn: Connection, details: DonorDetails) -> DonorDetails:
    """A person named by an erased resident's id is recorded unlinked and without e-mail: the
    money must be recorded, with what its receipt shows, but the person is not linked again."""
    if (
        isinstance(details, PersonDetails) and details.resident_id is not None
        and await is_erased(conn, details.resident_id)
    ):
        log.info("donation names an erased resident: recorded unlinked")
        return details.unlinked()
    return details


def _of_municipality(principal: Principal) -> Callable[[Donation], None]:
    """Staff of the donation's municipality (or an admin) act on it."""

    def check(donation: Donation) -> None:
        principal.ensure_municipality(donation.municipality_code)

    return check


async def _readable_receipt(
    conn: Connection, principal: Principal, number: str, *, lock: bool = False
) -> Receipt:
    receipt = await store.receipt(conn, number, lock=lock) if domain.is_receipt_number(number) else None
    if receipt is None:
        raise ReceiptNotFound(f"no receipt {number}")
    ensure_donation_access(principal, receipt.municipality_code, receipt.donor_resident_id)
    return receipt


def _ensure_staff_of(principal: Principal, code: str) -> None:
    domain.known_municipality(code)
    principal.ensure_municipality(code)


# ---------------------------------------------------------------------------- views


def _donor_view(donor: Donor) -> DonorView:
    return DonorView(
        id=str(donor.id), type=donor.type, name=donor.name, address=donor.address, resident_id=donor.resident_id,
        email=donor.email, head_office_code=donor.head_office_code, corporate_number=donor.corporate_number,
        created_at=donor.created_at, erased_at=donor.erased_at,
    )


def _donation_view(d: Donation) -> DonationView:
    return DonationView(
        id=str(d.id), payment_reference=d.payment_reference, municipality_code=d.municipality_code,
        municipality_name=municipality(d.municipality_code).full_name, donor_id=str(d.donor_id),
        donor_name=d.donor_name, kind=d.kind, unit=d.unit, amount=d.amount, earmark=d.earmark,
        program_id=d.program_id, project=d.project, payment_date=d.payment_date, calendar_year=d.calendar_year,
        one_stop_requested=d.one_stop_requested, receipt_number=d.receipt_number, received_at=d.received_at,
        status="refunded" if d.refunded else "confirmed", refunded_at=d.refunded_at, refund_reason=d.refund_reason,
        special_deduction=d.special_deduction, revitalisation_plan_id=d.revitalisation_plan_id,
    )


def _receipt_view(r: Receipt) -> ReceiptView:
    return ReceiptView(
        number=r.number, donation_id=str(r.donation_id), municipality_code=r.municipality_code,
        municipality_name=municipality(r.municipality_code).full_name, calendar_year=r.calendar_year,
        donor_id=str(r.donor_id), donor_name=r.donor_name, donor_address=r.donor_address, amount_jpy=r.amount_jpy,
        donation_date=r.donation_date, issued_at=r.issued_at, status=r.status, cancelled_at=r.cancelled_at,
        reissue_count=r.reissue_count, last_reissued_at=r.last_reissued_at, kind=r.kind,
        special_deduction=r.special_deduction, revitalisation_plan_id=r.revitalisation_plan_id,
    )


def _application_view(a: OneStopApplication) -> OneStopApplicationView:
    return OneStopApplicationView(
        id=str(a.id), donation_id=str(a.donation_id), donor_id=str(a.donor_id), municipality_code=a.municipality_code,
        calendar_year=a.calendar_year, received_on=a.received_on, verified=a.verified, verified_at=a.verified_at,
        status=a.status, recorded_at=a.recorded_at,
    )

