"""All SQL of the donation service (asyncpg, no ORM): domain objects in, domain objects out.

Statements name their parameters (``:name``); ``Sql`` turns them into asyncpg's ``$n`` once, at
import, and binds values by name, so a statement of twenty values reads as its columns do.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from shared.kit.db import Connection
from shared.kit.group_commit import SharedStep

from .domain import (
    Donation,
    Donor,
    DonorYearState,
    ExportedDonation,
    FundBalance,
    LedgerEntry,
    LedgerRow,
    NewDonation,
    NewDonor,
    OneStopApplication,
    Receipt,
    RecordedDonation,
)

#: The unique index a second notification of one payment runs into.
PAYMENT_REFERENCE_KEY = "donations_payment_reference_key"

# ``:name`` but not a ``::type`` cast.
_PARAMETER = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")


@dataclass(frozen=True, slots=True)
class Sql:
    """A statement written with named parameters, as asyncpg runs it (``$1``, ``$2``...)."""

    text: str
    names: tuple[str, ...]

    @classmethod
    def of(cls, text: str) -> Sql:
        names: list[str] = []

        def number(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in names:
                names.append(name)
            return f"${names.index(name) + 1}"

        return cls(_PARAMETER.sub(number, text), tuple(names))

    def args(self, values: Mapping[str, Any]) -> list[Any]:
        """The values in parameter order (every name must have one; extra values are an error too)."""
        unknown = values.keys() - set(self.names)
        if unknown:
            raise TypeError(f"the statement has no parameter {sorted(unknown)}")
        try:
            return [values[name] for name in self.names]
        except KeyError as missing:
            raise TypeError(f"no value for :{missing.args[0]}") from None

    def args_of(self, source: object, **values: Any) -> list[Any]:
        """The values in parameter order, each from ``values`` or else the attribute of ``source``."""
        return [values[name] if name in values else getattr(source, name) for name in self.names]


# ---------------------------------------------------------------------------- donors

_DONOR_COLUMNS = (
    "id, type, name, address, resident_id, email, head_office_code, corporate_number, created_at, erased_at"
)


def _donor(row: asyncpg.Record, prefix: str = "") -> Donor:
    return Donor(
        id=row[prefix + "id"], type=row[prefix + "type"], name=row[prefix + "name"], address=row[prefix + "address"],
        resident_id=row[prefix + "resident_id"], email=row[prefix + "email"],
        head_office_code=row[prefix + "head_office_code"], corporate_number=row[prefix + "corporate_number"],
        created_at=row[prefix + "created_at"], erased_at=row[prefix + "erased_at"],
    )


_UPSERT_DONOR = Sql.of(
    f"""
    INSERT INTO donors AS d (id, donor_key, type, name, address, resident_id, email,
                             head_office_code, corporate_number, created_at, updated_at)
    VALUES (:id, :donor_key, :type, :name, :address, :resident_id, :email,
            :head_office_code, :corporate_number, :at, :at)
    ON CONFLICT (donor_key) DO UPDATE SET
        name = EXCLUDED.name,
        address = coalesce(EXCLUDED.address, d.address),
        email = coalesce(EXCLUDED.email, d.email),
        head_office_code = coalesce(EXCLUDED.head_office_code, d.head_office_code),
        updated_at = EXCLUDED.updated_at
    RETURNING {_DONOR_COLUMNS}, (xmax = 0) AS created
    """
)


async def upsert_donor(conn: Connection, donor: NewDonor) -> tuple[Donor, bool]:
    """Find the donor by identity or create it (True); the latest details win. Locks the donor's
    row until commit, which serialises one donor's confirmations (the one-stop count needs that)."""
    row = await conn.fetchrow(_UPSERT_DONOR.text, *_UPSERT_DONOR.args_of(donor))
    assert row is not None
    return _donor(row), bool(row["created"])


_FIND_OR_CREATE_DONOR = Sql.of(
    f"""
    INSERT INTO donors AS d (id, donor_key, type, name, address, resident_id, email,
                             head_office_code, corporate_number, created_at, updated_at)
    VALUES (:id, :donor_key, :type, :name, :address, :resident_id, :email,
            :head_office_code, :corporate_number, :at, :at)
    ON CONFLICT (donor_key) DO UPDATE SET donor_key = d.donor_key
    RETURNING {_DONOR_COLUMNS}, (xmax = 0) AS created
    """
)


async def find_or_create_donor(conn: Connection, donor: NewDonor) -> tuple[Donor, bool]:
    """Find the donor by identity, unchanged, or create it (True). For payment confirmations: the
    provider names a donor but never rewrites one on file (only the donor or an admin does,
    ``upsert_donor``). The no-op update locks the row until commit, as ``upsert_donor`` does."""
    row = await conn.fetchrow(_FIND_OR_CREATE_DONOR.text, *_FIND_OR_CREATE_DONOR.args_of(donor))
    assert row is not None
    return _donor(row), bool(row["created"])


async def lock_donor(conn: Connection, donor_id: uuid.UUID) -> Donor | None:
    row = await conn.fetchrow(f"SELECT {_DONOR_COLUMNS} FROM donors WHERE id = $1 FOR NO KEY UPDATE", donor_id)
    return None if row is None else _donor(row)


async def donor(conn: Connection, donor_id: uuid.UUID) -> Donor | None:
    row = await conn.fetchrow(f"SELECT {_DONOR_COLUMNS} FROM donors WHERE id = $1", donor_id)
    return None if row is None else _donor(row)


async def donor_of_resident(conn: Connection, resident_id: str) -> Donor | None:
    row = await conn.fetchrow(
        f"SELECT {_DONOR_COLUMNS} FROM donors WHERE resident_id = $1 ORDER BY created_at LIMIT 1", resident_id
    )
    return None if row is None else _donor(row)


# ---------------------------------------------------------------------------- erasure


async def lock_donors_of_resident(conn: Connection, resident_id: str) -> list[Donor]:
    rows = await conn.fetch(
        f"SELECT {_DONOR_COLUMNS} FROM donors WHERE resident_id = $1 ORDER BY id FOR NO KEY UPDATE", resident_id
    )
    return [_donor(r) for r in rows]


async def donor_gave_to(conn: Connection, donor_id: uuid.UUID, municipality_code: str) -> bool:
    """Whether the donor has a donation (refunded or not) to the municipality."""
    return bool(await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM donations WHERE donor_id = $1 AND municipality_code = $2)",
        donor_id, municipality_code,
    ))


_ERASE_DONOR = Sql.of(
    f"""
    WITH reasons AS (
        -- Staff free text about the person goes with them; the refund itself (date, ledger) stays.
        UPDATE donations SET refund_reason = NULL WHERE donor_id = :id AND refund_reason IS NOT NULL
    )
    UPDATE donors SET name = '', address = NULL, email = NULL, resident_id = NULL, corporate_number = NULL,
                      donor_key = 'erased:' || id::text, erased_at = :at, updated_at = :at,
                      -- without a receipt nothing is kept: the erasure is complete now
                      purged_at = CASE WHEN EXISTS (SELECT 1 FROM receipts r WHERE r.donor_id = :id)
                                       THEN NULL ELSE :at::timestamptz END
    WHERE id = :id AND erased_at IS NULL
    RETURNING {_DONOR_COLUMNS}
    """
)


async def erase_donor(conn: Connection, donor_id: uuid.UUID, at: datetime) -> Donor | None:
    """Erase the donor's personal data but what their receipts keep; None when erased already.

    The donor key becomes ``erased:<id>``, so no later payment notification finds the record again."""
    row = await conn.fetchrow(_ERASE_DONOR.text, *_ERASE_DONOR.args({"id": donor_id, "at": at}))
    return None if row is None else _donor(row)


async def receipt_years(conn: Connection, donor_id: uuid.UUID) -> list[int]:
    """The calendar years of the donor's receipts whose donor name and address are still kept."""
    rows = await conn.fetch(
        "SELECT DISTINCT calendar_year FROM receipts WHERE donor_id = $1 AND purged_at IS NULL", donor_id
    )
    return [r["calendar_year"] for r in rows]


@dataclass(frozen=True, slots=True)
class PurgedReceipts:
    receipts: int
    #: Donors whose last kept receipt this was: nothing about them is kept any more.
    donors: list[uuid.UUID]


async def purge_retained_receipts(
    conn: Connection, last_year: int, at: datetime, batch_size: int = 1000
) -> PurgedReceipts:
    """Blank the donor name and address of erased donors' receipts of ``last_year`` or before (their
    retention has ended), at most ``batch_size`` of them. Each receipt is purged once: a concurrent
    run skips the rows this one holds and finds them purged after its commit."""
    rows = await conn.fetch(
        """
        WITH due AS (
            SELECT r.number FROM donors o JOIN receipts r ON r.donor_id = o.id
            WHERE o.erased_at IS NOT NULL AND o.purged_at IS NULL AND r.purged_at IS NULL
              AND r.calendar_year <= $1
            ORDER BY r.number LIMIT $3
            FOR NO KEY UPDATE OF r SKIP LOCKED
        )
        UPDATE receipts r SET donor_name = '', donor_address = '', purged_at = $2
        FROM due WHERE r.number = due.number AND r.purged_at IS NULL
        RETURNING r.donor_id
        """,
        last_year, at, batch_size,
    )
    touched = sorted({r["donor_id"] for r in rows})
    done = await conn.fetch(
        """
        UPDATE donors o SET purged_at = $2
        WHERE o.id = ANY($1::uuid[]) AND o.purged_at IS NULL
          AND NOT EXISTS (SELECT 1 FROM receipts r WHERE r.donor_id = o.id AND r.purged_at IS NULL)
        RETURNING o.id
        """,
        touched, at,
    )
    return PurgedReceipts(receipts=len(rows), donors=[r["id"] for r in done])


# ---------------------------------------------------------------------------- donations

# Donation, receipt number and receipt, ledger rows and the donor-year's one-stop count in one
# statement; ``{donor}`` is the donor's CTE (``id``, ``receipt_name``, ``receipt_address``). Each
# part reads the donor first, so a donor's row lock (one donor's confirmations queue on it) is
# waited for before the receipt counter's row is locked: the hot counter is never held waiting.
_RECORD_TEMPLATE = """
    WITH {donor}, counter AS (
        -- The receipt number: the municipality-year's counter row, locked until commit.
        INSERT INTO receipt_counters AS c (municipality_code, calendar_year, last_number)
        SELECT :municipality_code, :calendar_year, 1 FROM donor WHERE :issues_receipt::boolean
        ON CONFLICT (municipality_code, calendar_year) DO UPDATE SET last_number = c.last_number + 1
        RETURNING last_number
    ), donation AS (
        -- Reads the counter first, so seq (the recording order) is drawn under the counter's lock.
        INSERT INTO donations (id, payment_reference, request_hash, municipality_code, donor_id, kind, unit,
                               amount, earmark, program_id, project, payment_date, calendar_year,
                               one_stop_requested, received_at, special_deduction, revitalisation_plan_id)
        SELECT :id, :payment_reference, :request_hash, :municipality_code, donor.id, :kind, :unit,
               :amount, :earmark, :program_id, :project, :payment_date, :calendar_year,
               :one_stop_requested, :received_at, :special_deduction, :revitalisation_plan_id
        FROM donor LEFT JOIN counter ON true
        RETURNING id, seq
    ), receipt AS (
        INSERT INTO receipts (number, municipality_code, calendar_year, sequence, donation_id, donor_id,
                              donor_name, donor_address, amount_jpy, donation_date, issued_at)
        SELECT :municipality_code || '-' || :calendar_year::text || '-'
                   || lpad(n::text, greatest(6, length(n::text)), '0'),
               :municipality_code, :calendar_year, n, donation.id, donor.id, donor.receipt_name,
               donor.receipt_address, :amount, :payment_date, :received_at
        FROM (SELECT last_number AS n FROM counter) AS issued, donation, donor
        RETURNING number
    ), ledger AS (
        INSERT INTO fund_ledger (municipality_code, earmark, unit, entry, amount, donation_id, program_id,
                                 recorded_at)
        SELECT :municipality_code, :earmark, :unit, e.entry, e.amount, :id, :program_id, :received_at
        FROM unnest(:ledger_entries::text[], :ledger_amounts::bigint[]) AS e (entry, amount)
    ), donor_year AS (
        INSERT INTO donor_years AS y (donor_id, calendar_year, one_stop_requested)
        SELECT donor.id, :calendar_year, :one_stop_requested FROM donor WHERE :counts_for_one_stop::boolean
        ON CONFLICT (donor_id, calendar_year)
            DO UPDATE SET one_stop_requested = y.one_stop_requested OR EXCLUDED.one_stop_requested
        RETURNING one_stop_requested, voided_at, void_announced_at IS NOT NULL AS announced
    ), donor_municipality AS (
        INSERT INTO donor_year_municipalities AS m (donor_id, calendar_year, municipality_code, donations,
                                                    first_donation_at)
        SELECT donor.id, :calendar_year, :municipality_code, 1, :received_at FROM donor
        WHERE :counts_for_one_stop::boolean
        ON CONFLICT (donor_id, calendar_year, municipality_code) DO UPDATE SET donations = m.donations + 1
    )
    SELECT receipt.number AS receipt_number,
           donor_year.one_stop_requested, donor_year.voided_at, donor_year.announced,
           -- the statement's snapshot: the municipalities before this donation
           CASE WHEN :counts_for_one_stop::boolean THEN ARRAY(
               SELECT m.municipality_code FROM donor_year_municipalities m
               WHERE m.donor_id = donor.id AND m.calendar_year = :calendar_year
               ORDER BY m.first_donation_at, m.municipality_code
           ) END AS earlier_municipalities{returning}
    FROM donor CROSS JOIN donation LEFT JOIN receipt ON true LEFT JOIN donor_year ON true
"""

#: The donor is known (found and locked before: a donor id, or a company).
_RECORD_DONATION = Sql.of(_RECORD_TEMPLATE.format(
    donor="""donor AS (
        SELECT :donor_id::uuid AS id, :donor_name::text AS receipt_name, :donor_address::text AS receipt_address
    )""",
    returning="",
))

#: A person named by the notification is found by identity, unchanged, or created, in the same
#: statement (as ``find_or_create_donor``: the no-op update locks the row until commit); the
#: receipt shows the record on file: a person's name and address (an individual's address is
#: never null before erasure, and an erased donor's key is never matched again).
_RECORD_DONATION_AND_DONOR = Sql.of(_RECORD_TEMPLATE.format(
    donor=f"""donor AS (
        INSERT INTO donors AS d (id, donor_key, type, name, address, resident_id, email,
                                 head_office_code, corporate_number, created_at, updated_at)
        VALUES (:new_donor_id, :donor_key, 'individual', :new_donor_name, :new_donor_address,
                :new_donor_resident_id, :new_donor_email, NULL, NULL, :new_donor_at, :new_donor_at)
        ON CONFLICT (donor_key) DO UPDATE SET donor_key = d.donor_key
        RETURNING {_DONOR_COLUMNS}, name AS receipt_name, coalesce(address, '') AS receipt_address
    )""",
    returning="".join(f", donor.{column} AS donor_{column}" for column in _DONOR_COLUMNS.replace(" ", "").split(",")),
))


async def record_donation(conn: Connection, donation: NewDonation) -> RecordedDonation:
    """Donation, receipt number and receipt, ledger rows and the donor-year's one-stop count in one
    statement (one round trip); with ``donation.new_donor``, the donor found or created too.
    Raises UniqueViolationError (``PAYMENT_REFERENCE_KEY``) when the payment reference exists."""
    ledger = {
        "ledger_entries": [e.entry for e in donation.ledger], "ledger_amounts": [e.amount for e in donation.ledger],
    }
    person = donation.new_donor
    if person is None:
        row = await conn.fetchrow(_RECORD_DONATION.text, *_RECORD_DONATION.args_of(donation, **ledger))
    else:
        statement = _RECORD_DONATION_AND_DONOR
        row = await conn.fetchrow(statement.text, *statement.args_of(
            donation, **ledger, new_donor_id=person.id, donor_key=person.donor_key, new_donor_name=person.name,
            new_donor_address=person.address, new_donor_resident_id=person.resident_id,
            new_donor_email=person.email, new_donor_at=person.at,
        ))
    assert row is not None
    year = None
    if donation.counts_for_one_stop:
        year = DonorYearState(
            requested=row["one_stop_requested"], voided_at=row["voided_at"], announced=row["announced"]
        )
    return RecordedDonation(
        receipt_number=row["receipt_number"], year=year,
        earlier_municipalities=tuple(row["earlier_municipalities"] or ()),
        donor=None if person is None else _donor(row, prefix="donor_"),
    )


# Many donations in one statement: what ``_RECORD_TEMPLATE`` does for one, for a batch of
# confirmations (``record_donations``). Inputs are columns (one array each) numbered by ``ord``, the
# order the confirmations arrived in; no two share a donor or a payment reference (``RECORD``'s keys).
# Row locks are taken in one order: the persons' rows (by donor key; a known donor was locked before),
# then each municipality-year's counter once (by code and year), raised by its count in the batch.
_RECORD_MANY = Sql.of(f"""
    WITH input AS (
        SELECT * FROM unnest(
            :id::uuid[], :payment_reference::text[], :request_hash::text[], :municipality_code::text[],
            :donor_id::uuid[], :donor_name::text[], :donor_address::text[], :kind::text[], :unit::text[],
            :amount::bigint[], :earmark::text[], :program_id::text[], :project::text[], :payment_date::date[],
            :calendar_year::integer[], :one_stop_requested::boolean[], :received_at::timestamptz[],
            :issues_receipt::boolean[], :counts_for_one_stop::boolean[], :special_deduction::boolean[],
            :revitalisation_plan_id::text[], :new_donor_id::uuid[], :donor_key::text[], :new_donor_name::text[],
            :new_donor_address::text[], :new_donor_resident_id::text[], :new_donor_email::text[],
            :new_donor_at::timestamptz[]
        ) WITH ORDINALITY AS i (
            id, payment_reference, request_hash, municipality_code, donor_id, donor_name, donor_address, kind, unit,
            amount, earmark, program_id, project, payment_date, calendar_year, one_stop_requested, received_at,
            issues_receipt, counts_for_one_stop, special_deduction, revitalisation_plan_id, new_donor_id, donor_key,
            new_donor_name, new_donor_address, new_donor_resident_id, new_donor_email, new_donor_at, ord
        )
    ), person AS (
        INSERT INTO donors AS d (id, donor_key, type, name, address, resident_id, email,
                                 head_office_code, corporate_number, created_at, updated_at)
        SELECT new_donor_id, donor_key, 'individual', new_donor_name, new_donor_address, new_donor_resident_id,
               new_donor_email, NULL, NULL, new_donor_at, new_donor_at
        FROM input WHERE donor_key IS NOT NULL ORDER BY donor_key
        ON CONFLICT (donor_key) DO UPDATE SET donor_key = d.donor_key
        RETURNING {_DONOR_COLUMNS}, donor_key
    ), donor AS (
        SELECT i.ord, coalesce(p.id, i.donor_id) AS id,
               CASE WHEN p.id IS NULL THEN i.donor_name ELSE p.name END AS receipt_name,
               CASE WHEN p.id IS NULL THEN i.donor_address ELSE coalesce(p.address, '') END AS receipt_address
        FROM input i LEFT JOIN person p ON p.donor_key = i.donor_key
    ), wanted AS (
        -- Reads every donor first: the donors' row locks are held before a counter's is taken.
        SELECT i.municipality_code, i.calendar_year, count(*) AS issued
        FROM input i JOIN donor USING (ord) WHERE i.issues_receipt
        GROUP BY i.municipality_code, i.calendar_year
    ), counter AS (
        INSERT INTO receipt_counters AS c (municipality_code, calendar_year, last_number)
        SELECT municipality_code, calendar_year, issued FROM wanted ORDER BY municipality_code, calendar_year
        ON CONFLICT (municipality_code, calendar_year) DO UPDATE SET last_number = c.last_number + EXCLUDED.last_number
        RETURNING municipality_code, calendar_year, last_number
    ), numbered AS (
        -- The batch's numbers of a municipality-year, in input order, end at its counter's new last.
        SELECT i.ord, c.last_number - w.issued
                      + row_number() OVER (PARTITION BY i.municipality_code, i.calendar_year ORDER BY i.ord) AS n
        FROM input i JOIN wanted w USING (municipality_code, calendar_year)
                     JOIN counter c USING (municipality_code, calendar_year)
        WHERE i.issues_receipt
    ), donation AS (
        -- Reads the counters first, so seq (the recording order) is drawn under their locks, in input order.
        INSERT INTO donations (id, payment_reference, request_hash, municipality_code, donor_id, kind, unit,
                               amount, earmark, program_id, project, payment_date, calendar_year,
                               one_stop_requested, received_at, special_deduction, revitalisation_plan_id)
        SELECT i.id, i.payment_reference, i.request_hash, i.municipality_code, donor.id, i.kind, i.unit,
               i.amount, i.earmark, i.program_id, i.project, i.payment_date, i.calendar_year,
               i.one_stop_requested, i.received_at, i.special_deduction, i.revitalisation_plan_id
        FROM input i JOIN donor USING (ord) LEFT JOIN numbered USING (ord)
        ORDER BY i.ord
        RETURNING id
    ), receipt AS (
        INSERT INTO receipts (number, municipality_code, calendar_year, sequence, donation_id, donor_id,
                              donor_name, donor_address, amount_jpy, donation_date, issued_at)
        SELECT i.municipality_code || '-' || i.calendar_year::text || '-'
                   || lpad(numbered.n::text, greatest(6, length(numbered.n::text)), '0'),
               i.municipality_code, i.calendar_year, numbered.n, donation.id, donor.id, donor.receipt_name,
               donor.receipt_address, i.amount, i.payment_date, i.received_at
        FROM numbered JOIN input i USING (ord) JOIN donor USING (ord) JOIN donation ON donation.id = i.id
        ORDER BY numbered.ord
        RETURNING donation_id, number
    ), ledger AS (
        INSERT INTO fund_ledger (municipality_code, earmark, unit, entry, amount, donation_id, program_id,
                                 recorded_at)
        SELECT i.municipality_code, i.earmark, i.unit, e.entry, e.amount, i.id, i.program_id, i.received_at
        FROM unnest(:ledger_ord::bigint[], :ledger_entry::text[], :ledger_amount::bigint[])
                 WITH ORDINALITY AS e (ord, entry, amount, line)
             JOIN input i USING (ord)
        ORDER BY e.line
    ), donor_year AS (
        INSERT INTO donor_years AS y (donor_id, calendar_year, one_stop_requested)
        SELECT donor.id, i.calendar_year, i.one_stop_requested FROM input i JOIN donor USING (ord)
        WHERE i.counts_for_one_stop
        ON CONFLICT (donor_id, calendar_year)
            DO UPDATE SET one_stop_requested = y.one_stop_requested OR EXCLUDED.one_stop_requested
        RETURNING donor_id, calendar_year, one_stop_requested, voided_at, void_announced_at IS NOT NULL AS announced
    ), donor_municipality AS (
        INSERT INTO donor_year_municipalities AS m (donor_id, calendar_year, municipality_code, donations,
                                                    first_donation_at)
        SELECT donor.id, i.calendar_year, i.municipality_code, 1, i.received_at FROM input i JOIN donor USING (ord)
        WHERE i.counts_for_one_stop
        ON CONFLICT (donor_id, calendar_year, municipality_code) DO UPDATE SET donations = m.donations + 1
    )
    SELECT i.counts_for_one_stop, receipt.number AS receipt_number,
           y.one_stop_requested, y.voided_at, y.announced,
           -- the statement's snapshot: the municipalities before this donation (no donor twice in a batch)
           CASE WHEN i.counts_for_one_stop THEN ARRAY(
               SELECT m.municipality_code FROM donor_year_municipalities m
               WHERE m.donor_id = donor.id AND m.calendar_year = i.calendar_year
               ORDER BY m.first_donation_at, m.municipality_code
           ) END AS earlier_municipalities,
           p.id IS NOT NULL AS found,
           {", ".join(f"p.{column} AS donor_{column}" for column in _DONOR_COLUMNS.replace(" ", "").split(","))}
    FROM input i JOIN donor USING (ord) JOIN donation ON donation.id = i.id
         LEFT JOIN receipt ON receipt.donation_id = i.id
         LEFT JOIN donor_year y ON i.counts_for_one_stop AND y.donor_id = donor.id AND y.calendar_year = i.calendar_year
         LEFT JOIN person p ON p.donor_key = i.donor_key
    ORDER BY i.ord
""")

#: ``NewDonation`` fields bound column-wise by ``_RECORD_MANY`` (the new donor's come from ``new_donor``).
_MANY_FIELDS = tuple(
    name for name in _RECORD_MANY.names
    if not name.startswith(("new_donor_", "ledger_")) and name != "donor_key"
)


async def record_donations(conn: Connection, donations: Sequence[NewDonation]) -> list[RecordedDonation]:
    """``record_donation`` for many donations in one statement, numbered in the given order.

    No two may share a donor or a payment reference (``RECORD`` runs a repeat alone, after);
    raises UniqueViolationError when a payment reference exists."""
    values: dict[str, list[Any]] = {name: [] for name in _RECORD_MANY.names}
    for ord_, donation in enumerate(donations, start=1):
        for name in _MANY_FIELDS:
            values[name].append(getattr(donation, name))
        person = donation.new_donor
        if person is not None:
            values["donor_id"][-1] = None  # found or created by the statement
        values["new_donor_id"].append(None if person is None else person.id)
        values["donor_key"].append(None if person is None else person.donor_key)
        values["new_donor_name"].append(None if person is None else person.name)
        values["new_donor_address"].append(None if person is None else person.address)
        values["new_donor_resident_id"].append(None if person is None else person.resident_id)
        values["new_donor_email"].append(None if person is None else person.email)
        values["new_donor_at"].append(None if person is None else person.at)
        for entry in donation.ledger:
            values["ledger_ord"].append(ord_)
            values["ledger_entry"].append(entry.entry)
            values["ledger_amount"].append(entry.amount)
    rows = await conn.fetch(_RECORD_MANY.text, *_RECORD_MANY.args(values))
    return [
        RecordedDonation(
            receipt_number=row["receipt_number"],
            year=DonorYearState(
                requested=row["one_stop_requested"], voided_at=row["voided_at"], announced=row["announced"]
            ) if row["counts_for_one_stop"] else None,
            earlier_municipalities=tuple(row["earlier_municipalities"] or ()),
            donor=_donor(row, prefix="donor_") if row["found"] else None,
        )
        for row in rows
    ]


def _donation_keys(donation: NewDonation) -> tuple[Hashable, ...]:
    donor = donation.donor_id if donation.new_donor is None else donation.new_donor.donor_key
    return ("donor", donor), ("payment", donation.payment_reference)


#: Recording a confirmation: concurrent ones of a group-commit batch share one statement
#: (``shared/kit/group_commit.py``); a donor's or payment's repeat runs alone, after the first.
RECORD: SharedStep[NewDonation, RecordedDonation] = SharedStep(
    "record donations", record_donations, record_donation, _donation_keys
)


_VOID_DONOR_YEAR = Sql.of(
    """
    WITH year AS (
        UPDATE donor_years SET voided_at = :at
        WHERE donor_id = :donor_id AND calendar_year = :year AND voided_at IS NULL
    )
    UPDATE one_stop_applications SET status = 'void', voided_at = :at
    WHERE donor_id = :donor_id AND calendar_year = :year AND status <> 'void'
    """
)


async def void_donor_year(conn: Connection, donor_id: uuid.UUID, year: int, at: datetime) -> None:
    """The year is void, and so is every application of it."""
    await conn.execute(_VOID_DONOR_YEAR.text, *_VOID_DONOR_YEAR.args({"donor_id": donor_id, "year": year, "at": at}))


async def mark_void_announced(conn: Connection, donor_id: uuid.UUID, year: int, at: datetime) -> None:
    await conn.execute(
        "UPDATE donor_years SET void_announced_at = $3 WHERE donor_id = $1 AND calendar_year = $2",
        donor_id, year, at,
    )


async def donor_year_municipalities(conn: Connection, donor_id: uuid.UUID, year: int) -> list[str]:
    rows = await conn.fetch(
        """
        SELECT municipality_code FROM donor_year_municipalities
        WHERE donor_id = $1 AND calendar_year = $2 ORDER BY first_donation_at, municipality_code
        """,
        donor_id, year,
    )
    return [r["municipality_code"] for r in rows]


_YEAR_COLUMNS = "one_stop_requested, voided_at, void_announced_at IS NOT NULL AS announced"


def _year(row: asyncpg.Record) -> DonorYearState:
    return DonorYearState(requested=row["one_stop_requested"], voided_at=row["voided_at"], announced=row["announced"])


async def request_one_stop(conn: Connection, donor_id: uuid.UUID, year: int) -> DonorYearState:
    """Record that the donor asked for the exception this year; returns the donor-year (locked)."""
    row = await conn.fetchrow(
        f"""
        INSERT INTO donor_years AS y (donor_id, calendar_year, one_stop_requested) VALUES ($1, $2, true)
        ON CONFLICT (donor_id, calendar_year) DO UPDATE SET one_stop_requested = true
        RETURNING {_YEAR_COLUMNS}
        """,
        donor_id, year,
    )
    assert row is not None
    return _year(row)


async def donor_year(conn: Connection, donor_id: uuid.UUID, year: int) -> DonorYearState | None:
    row = await conn.fetchrow(
        f"SELECT {_YEAR_COLUMNS} FROM donor_years WHERE donor_id = $1 AND calendar_year = $2", donor_id, year
    )
    return None if row is None else _year(row)


_DONATION_VIEW = """
SELECT d.id, d.payment_reference, d.request_hash, d.municipality_code, d.donor_id,
       -- an erased donor's name only as its receipt keeps it (the legal record), while it does
       CASE WHEN o.erased_at IS NULL THEN o.name ELSE coalesce(r.donor_name, '') END AS donor_name,
       o.resident_id AS donor_resident_id, d.kind, d.unit, d.amount, d.earmark, d.program_id, d.project,
       d.payment_date, d.calendar_year, d.one_stop_requested, r.number AS receipt_number, d.received_at,
       d.refunded_at, d.refund_reason, d.special_deduction, d.revitalisation_plan_id
FROM donations d JOIN donors o ON o.id = d.donor_id LEFT JOIN receipts r ON r.donation_id = d.id
"""


def _donation(row: asyncpg.Record) -> Donation:
    return Donation(
        id=row["id"], payment_reference=row["payment_reference"], request_hash=row["request_hash"],
        municipality_code=row["municipality_code"], donor_id=row["donor_id"], donor_name=row["donor_name"],
        donor_resident_id=row["donor_resident_id"], kind=row["kind"], unit=row["unit"], amount=row["amount"],
        earmark=row["earmark"], program_id=row["program_id"], project=row["project"],
        payment_date=row["payment_date"], calendar_year=row["calendar_year"],
        one_stop_requested=row["one_stop_requested"], receipt_number=row["receipt_number"],
        received_at=row["received_at"], refunded_at=row["refunded_at"], refund_reason=row["refund_reason"],
        special_deduction=row["special_deduction"], revitalisation_plan_id=row["revitalisation_plan_id"],
    )


async def donation(conn: Connection, donation_id: uuid.UUID, *, lock: bool = False) -> Donation | None:
    lock_clause = " FOR NO KEY UPDATE OF d" if lock else ""
    row = await conn.fetchrow(_DONATION_VIEW + " WHERE d.id = $1" + lock_clause, donation_id)
    return None if row is None else _donation(row)


async def donation_by_reference(conn: Connection, payment_reference: str) -> Donation | None:
    row = await conn.fetchrow(_DONATION_VIEW + " WHERE d.payment_reference = $1", payment_reference)
    return None if row is None else _donation(row)


_MUNICIPALITY_DONATIONS = Sql.of(
    _DONATION_VIEW
    + """
    WHERE d.municipality_code = :code AND (:year::integer IS NULL OR d.calendar_year = :year)
    ORDER BY d.calendar_year, d.seq LIMIT :limit OFFSET :offset
    """
)
_COUNT_MUNICIPALITY_DONATIONS = Sql.of(
    "SELECT count(*) FROM donations d"
    " WHERE d.municipality_code = :code AND (:year::integer IS NULL OR d.calendar_year = :year)"
)


async def municipality_donations(
    conn: Connection, municipality_code: str, year: int | None, limit: int, offset: int
) -> tuple[list[Donation], int]:
    where = {"code": municipality_code, "year": year}
    rows = await conn.fetch(
        _MUNICIPALITY_DONATIONS.text, *_MUNICIPALITY_DONATIONS.args({**where, "limit": limit, "offset": offset})
    )
    total = await conn.fetchval(_COUNT_MUNICIPALITY_DONATIONS.text, *_COUNT_MUNICIPALITY_DONATIONS.args(where))
    return [_donation(r) for r in rows], int(total)


async def donor_donations(conn: Connection, donor_id: uuid.UUID, year: int) -> list[Donation]:
    rows = await conn.fetch(
        _DONATION_VIEW + " WHERE d.donor_id = $1 AND d.calendar_year = $2 ORDER BY d.seq", donor_id, year
    )
    return [_donation(r) for r in rows]


async def export_donations(
    conn: Connection, municipality_code: str, year: int, after: int | None, limit: int
) -> list[tuple[int, ExportedDonation]]:
    """The next ``limit`` donations of a municipality-year after recording number ``after``, each with
    its number (seq: the keyset of a download read page by page)."""
    rows = await conn.fetch(
        """
        SELECT d.seq, r.number AS receipt_number, d.id AS donation_id, d.payment_reference, d.payment_date, d.kind,
               d.unit, d.amount, d.earmark, d.program_id, d.project, o.type AS donor_type,
               CASE WHEN o.erased_at IS NULL THEN o.name ELSE coalesce(r.donor_name, '') END AS donor_name,
               coalesce(r.donor_address, o.address) AS donor_address, d.one_stop_requested,
               a.status AS one_stop_status, d.received_at, d.refunded_at, r.status AS receipt_status,
               r.reissue_count, d.special_deduction, d.revitalisation_plan_id
        FROM donations d
        JOIN donors o ON o.id = d.donor_id
        LEFT JOIN receipts r ON r.donation_id = d.id
        LEFT JOIN one_stop_applications a ON a.donation_id = d.id
        WHERE d.municipality_code = $1 AND d.calendar_year = $2 AND d.seq > $3
        ORDER BY d.seq LIMIT $4
        """,
        municipality_code, year, -1 if after is None else after, limit,
    )
    return [(row["seq"], ExportedDonation(**{k: v for k, v in row.items() if k != "seq"})) for row in rows]


# ---------------------------------------------------------------------------- refunds


async def mark_refunded(conn: Connection, donation: Donation) -> None:
    await conn.execute(
        "UPDATE donations SET refunded_at = $2, refund_reason = $3 WHERE id = $1",
        donation.id, donation.refunded_at, donation.refund_reason,
    )


async def cancel_receipt(conn: Connection, donation_id: uuid.UUID, at: datetime) -> None:
    await conn.execute(
        "UPDATE receipts SET status = 'cancelled', cancelled_at = $2 WHERE donation_id = $1", donation_id, at
    )


async def donation_ledger(conn: Connection, donation_id: uuid.UUID) -> list[LedgerEntry]:
    rows = await conn.fetch("SELECT entry, amount FROM fund_ledger WHERE donation_id = $1 ORDER BY id", donation_id)
    return [LedgerEntry(r["entry"], r["amount"]) for r in rows]


_ADD_LEDGER_ENTRIES = Sql.of(
    """
    INSERT INTO fund_ledger (municipality_code, earmark, unit, entry, amount, donation_id, program_id, recorded_at)
    SELECT :municipality_code, :earmark, :unit, e.entry, e.amount, :id, :program_id, :at
    FROM unnest(:entries::text[], :amounts::bigint[]) AS e (entry, amount)
    """
)


async def add_ledger_entries(
    conn: Connection, donation: Donation, entries: Sequence[LedgerEntry], at: datetime
) -> None:
    """Rows of the donation's fund (its municipality, earmark and unit), recorded at ``at``."""
    await conn.execute(
        _ADD_LEDGER_ENTRIES.text,
        *_ADD_LEDGER_ENTRIES.args_of(
            donation, at=at, entries=[e.entry for e in entries], amounts=[e.amount for e in entries]
        ),
    )


_RELEASE_DONOR_MUNICIPALITY = Sql.of(
    """
    WITH counted AS (
        UPDATE donor_year_municipalities SET donations = donations - 1
        WHERE donor_id = :donor_id AND calendar_year = :calendar_year AND municipality_code = :municipality_code
          AND donations > 1
        RETURNING 1
    )
    DELETE FROM donor_year_municipalities
    WHERE donor_id = :donor_id AND calendar_year = :calendar_year AND municipality_code = :municipality_code
      AND donations = 1 AND NOT EXISTS (SELECT 1 FROM counted)
    """
)


async def release_donor_municipality(conn: Connection, donation: Donation) -> None:
    """A refunded hometown-tax donation no longer counts towards the donor-year's municipalities."""
    await conn.execute(_RELEASE_DONOR_MUNICIPALITY.text, *_RELEASE_DONOR_MUNICIPALITY.args_of(donation))


# ---------------------------------------------------------------------------- receipts

_RECEIPT_COLUMNS = """
       r.number, r.donation_id, r.municipality_code, r.calendar_year, r.donor_id, r.donor_name, r.donor_address,
       r.amount_jpy, r.donation_date, r.issued_at, r.status, r.cancelled_at, r.reissue_count, r.last_reissued_at,
       o.resident_id AS donor_resident_id, o.type AS donor_type, d.kind, d.project,
       o.erased_at IS NOT NULL AS donor_erased, r.purged_at, d.special_deduction, d.revitalisation_plan_id
"""


def _receipt(row: asyncpg.Record) -> Receipt:
    return Receipt(
        number=row["number"], donation_id=row["donation_id"], municipality_code=row["municipality_code"],
        calendar_year=row["calendar_year"], donor_id=row["donor_id"], donor_name=row["donor_name"],
        donor_address=row["donor_address"], amount_jpy=row["amount_jpy"], donation_date=row["donation_date"],
        issued_at=row["issued_at"], status=row["status"], cancelled_at=row["cancelled_at"],
        reissue_count=row["reissue_count"], last_reissued_at=row["last_reissued_at"],
        donor_resident_id=row["donor_resident_id"], donor_type=row["donor_type"], kind=row["kind"],
        project=row["project"], donor_erased=row["donor_erased"], purged_at=row["purged_at"],
        special_deduction=row["special_deduction"], revitalisation_plan_id=row["revitalisation_plan_id"],
    )


async def receipt(conn: Connection, number: str, *, lock: bool = False) -> Receipt | None:
    row = await conn.fetchrow(
        f"""
        SELECT {_RECEIPT_COLUMNS}
        FROM receipts r JOIN donors o ON o.id = r.donor_id JOIN donations d ON d.id = r.donation_id
        WHERE r.number = $1 {"FOR NO KEY UPDATE OF r" if lock else ""}
        """,
        number,
    )
    return None if row is None else _receipt(row)


async def save_reissue(conn: Connection, receipt: Receipt) -> None:
    await conn.execute(
        "UPDATE receipts SET reissue_count = $2, last_reissued_at = $3 WHERE number = $1",
        receipt.number, receipt.reissue_count, receipt.last_reissued_at,
    )


# ---------------------------------------------------------------------------- one-stop applications

_APPLICATION_COLUMNS = (
    "id, donation_id, donor_id, municipality_code, calendar_year, received_on, verified, verified_at, status, "
    "recorded_at"
)


def _application(row: asyncpg.Record) -> OneStopApplication:
    return OneStopApplication(
        id=row["id"], donation_id=row["donation_id"], donor_id=row["donor_id"],
        municipality_code=row["municipality_code"], calendar_year=row["calendar_year"],
        received_on=row["received_on"], verified=row["verified"], verified_at=row["verified_at"],
        status=row["status"], recorded_at=row["recorded_at"],
    )


_INSERT_APPLICATION = Sql.of(
    """
    INSERT INTO one_stop_applications (id, donation_id, donor_id, calendar_year, municipality_code,
                                       received_on, recorded_at, verified, verified_at, status, voided_at)
    VALUES (:id, :donation_id, :donor_id, :calendar_year, :municipality_code, :received_on, :recorded_at,
            :verified, :verified_at, :status, CASE WHEN :status::text = 'void' THEN :recorded_at::timestamptz END)
    ON CONFLICT (donation_id) DO NOTHING
    """
)


async def insert_application(conn: Connection, application: OneStopApplication) -> bool:
    """False when the donation already has an application."""
    status = await conn.execute(_INSERT_APPLICATION.text, *_INSERT_APPLICATION.args_of(application))
    return status == "INSERT 0 1"


async def verify_application(conn: Connection, donation_id: uuid.UUID, at: datetime) -> OneStopApplication | None:
    row = await conn.fetchrow(
        f"""
        UPDATE one_stop_applications SET verified = true, verified_at = coalesce(verified_at, $2)
        WHERE donation_id = $1 RETURNING {_APPLICATION_COLUMNS}
        """,
        donation_id, at,
    )
    return None if row is None else _application(row)


async def applications_of_donor_year(conn: Connection, donor_id: uuid.UUID, year: int) -> list[OneStopApplication]:
    rows = await conn.fetch(
        f"""
        SELECT {_APPLICATION_COLUMNS} FROM one_stop_applications
        WHERE donor_id = $1 AND calendar_year = $2 ORDER BY recorded_at, id
        """,
        donor_id, year,
    )
    return [_application(r) for r in rows]


async def mark_one_stop_requested(conn: Connection, donation_id: uuid.UUID) -> None:
    await conn.execute("UPDATE donations SET one_stop_requested = true WHERE id = $1", donation_id)


# ---------------------------------------------------------------------------- funds


async def fund_balances(conn: Connection, municipality_code: str) -> list[FundBalance]:
    rows = await conn.fetch(
        """
        SELECT earmark, unit,
               coalesce(sum(amount) FILTER (WHERE entry = 'donation'), 0)::bigint AS donated,
               coalesce(-sum(amount) FILTER (WHERE entry = 'refund'), 0)::bigint AS refunded,
               coalesce(-sum(amount) FILTER (WHERE entry IN ('transfer', 'transfer_reversal')), 0)::bigint
                   AS transferred,
               sum(amount)::bigint AS balance
        FROM fund_ledger WHERE municipality_code = $1
        GROUP BY earmark, unit ORDER BY earmark, unit
        """,
        municipality_code,
    )
    return [
        FundBalance(
            earmark=r["earmark"], unit=r["unit"], donated=r["donated"], refunded=r["refunded"],
            transferred=r["transferred"], balance=r["balance"],
        )
        for r in rows
    ]


async def ledger_entries(
    conn: Connection, municipality_code: str, limit: int, offset: int
) -> tuple[list[LedgerRow], int]:
    rows = await conn.fetch(
        """
        SELECT id, earmark, unit, entry, amount, donation_id, program_id, recorded_at
        FROM fund_ledger WHERE municipality_code = $1 ORDER BY id LIMIT $2 OFFSET $3
        """,
        municipality_code, limit, offset,
    )
    total = await conn.fetchval("SELECT count(*) FROM fund_ledger WHERE municipality_code = $1", municipality_code)
    items = [
        LedgerRow(
            id=r["id"], earmark=r["earmark"], unit=r["unit"], entry=r["entry"], amount=r["amount"],
            donation_id=r["donation_id"], program_id=r["program_id"], recorded_at=r["recorded_at"],
        )
        for r in rows
    ]
    return items, int(total)
