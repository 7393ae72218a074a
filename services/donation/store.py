"""All SQL of the donation service (asyncpg, no ORM)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import date, datetime

import asyncpg

from shared.kit.db import Connection

from .domain import LedgerEntry

Record = asyncpg.Record

# ---------------------------------------------------------------------------- donors

_DONOR_COLUMNS = (
    "id, type, name, address, resident_id, email, head_office_code, corporate_number, created_at"
)


async def upsert_donor(
    conn: Connection,
    *,
    new_id: uuid.UUID,
    donor_key: str,
    donor_type: str,
    name: str,
    address: str | None,
    resident_id: str | None,
    email: str | None,
    head_office_code: str | None,
    corporate_number: str | None,
    now: datetime,
) -> Record:
    """Find the donor by identity or create it; the latest details win. Locks the donor's row until
    commit, which serialises one donor's confirmations (the one-stop count needs that)."""
    row = await conn.fetchrow(
        f"""
        INSERT INTO donors AS d (id, donor_key, type, name, address, resident_id, email,
                                 head_office_code, corporate_number, created_at, updated_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10)
        ON CONFLICT (donor_key) DO UPDATE SET
            name = EXCLUDED.name,
            address = coalesce(EXCLUDED.address, d.address),
            email = coalesce(EXCLUDED.email, d.email),
            head_office_code = coalesce(EXCLUDED.head_office_code, d.head_office_code),
            updated_at = EXCLUDED.updated_at
        RETURNING {_DONOR_COLUMNS}, (xmax = 0) AS created
        """,
        new_id, donor_key, donor_type, name, address, resident_id, email, head_office_code, corporate_number, now,
    )
    assert row is not None
    return row


async def lock_donor(conn: Connection, donor_id: uuid.UUID) -> Record | None:
    return await conn.fetchrow(
        f"SELECT {_DONOR_COLUMNS} FROM donors WHERE id = $1 FOR NO KEY UPDATE", donor_id
    )


async def donor(conn: Connection, donor_id: uuid.UUID) -> Record | None:
    return await conn.fetchrow(f"SELECT {_DONOR_COLUMNS} FROM donors WHERE id = $1", donor_id)


async def donor_of_resident(conn: Connection, resident_id: str) -> Record | None:
    return await conn.fetchrow(
        f"SELECT {_DONOR_COLUMNS} FROM donors WHERE resident_id = $1 ORDER BY created_at LIMIT 1", resident_id
    )


# ---------------------------------------------------------------------------- donations

_RECORD_DONATION = """
WITH counter AS (
    -- The receipt number: the municipality-year's counter row, locked until commit.
    INSERT INTO receipt_counters AS c (municipality_code, calendar_year, last_number)
    SELECT $3, $12, 1 WHERE $18::boolean
    ON CONFLICT (municipality_code, calendar_year) DO UPDATE SET last_number = c.last_number + 1
    RETURNING last_number
), donation AS (
    -- Reads the counter first, so seq (the recording order) is drawn under the counter's lock.
    INSERT INTO donations (id, payment_reference, request_hash, municipality_code, donor_id, kind, unit,
                           amount, earmark, program_id, project, payment_date, calendar_year,
                           one_stop_requested, received_at)
    SELECT $1, $2, $17, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14
    FROM (SELECT 1) AS one LEFT JOIN counter ON true
    RETURNING id, seq
), receipt AS (
    INSERT INTO receipts (number, municipality_code, calendar_year, sequence, donation_id, donor_id,
                          donor_name, donor_address, amount_jpy, donation_date, issued_at)
    SELECT $3 || '-' || $12::text || '-' || lpad(n::text, greatest(6, length(n::text)), '0'),
           $3, $12, n, donation.id, $4, $15, $16, $7, $11, $14
    FROM (SELECT last_number AS n FROM counter) AS issued, donation
    RETURNING number
), ledger AS (
    INSERT INTO fund_ledger (municipality_code, earmark, unit, entry, amount, donation_id, program_id, recorded_at)
    SELECT $3, $8, $6, e.entry, e.amount, $1, $9, $14
    FROM unnest($19::text[], $20::bigint[]) AS e (entry, amount)
), donor_year AS (
    INSERT INTO donor_years AS y (donor_id, calendar_year, one_stop_requested)
    SELECT $4, $12, $13 WHERE $21::boolean
    ON CONFLICT (donor_id, calendar_year)
        DO UPDATE SET one_stop_requested = y.one_stop_requested OR EXCLUDED.one_stop_requested
    RETURNING one_stop_requested, voided_at IS NOT NULL AS voided, void_announced_at IS NOT NULL AS announced
), donor_municipality AS (
    INSERT INTO donor_year_municipalities AS m (donor_id, calendar_year, municipality_code, donations,
                                                first_donation_at)
    SELECT $4, $12, $3, 1, $14 WHERE $21::boolean
    ON CONFLICT (donor_id, calendar_year, municipality_code) DO UPDATE SET donations = m.donations + 1
)
SELECT donation.seq, receipt.number AS receipt_number,
       donor_year.one_stop_requested, coalesce(donor_year.voided, false) AS voided,
       coalesce(donor_year.announced, false) AS announced,
       -- the statement's snapshot: the municipalities before this donation
       CASE WHEN $21::boolean THEN ARRAY(
           SELECT municipality_code FROM donor_year_municipalities
           WHERE donor_id = $4 AND calendar_year = $12 ORDER BY first_donation_at, municipality_code
       ) END AS earlier_municipalities
FROM donation LEFT JOIN receipt ON true LEFT JOIN donor_year ON true
"""


async def record_donation(
    conn: Connection,
    *,
    donation_id: uuid.UUID,
    payment_reference: str,
    request_hash: str,
    municipality_code: str,
    donor_id: uuid.UUID,
    kind: str,
    unit: str,
    amount: int,
    earmark: str,
    program_id: str | None,
    project: str | None,
    payment_date: date,
    calendar_year: int,
    one_stop_requested: bool,
    received_at: datetime,
    donor_name: str,
    donor_address: str,
    issues_receipt: bool,
    ledger: Sequence[LedgerEntry],
    counts_for_one_stop: bool,
) -> Record:
    """Donation, receipt number and receipt, ledger rows and the donor-year's one-stop count in one
    statement (one round trip). Raises UniqueViolationError when the payment reference exists."""
    row = await conn.fetchrow(
        _RECORD_DONATION,
        donation_id, payment_reference, municipality_code, donor_id, kind, unit, amount, earmark,
        program_id, project, payment_date, calendar_year, one_stop_requested, received_at,
        donor_name, donor_address, request_hash, issues_receipt,
        [e.entry for e in ledger], [e.amount for e in ledger], counts_for_one_stop,
    )
    assert row is not None
    return row


async def void_donor_year(conn: Connection, donor_id: uuid.UUID, year: int, now: datetime) -> None:
    await conn.execute(
        "UPDATE donor_years SET voided_at = $3 WHERE donor_id = $1 AND calendar_year = $2 AND voided_at IS NULL",
        donor_id, year, now,
    )
    await conn.execute(
        """
        UPDATE one_stop_applications SET status = 'void', voided_at = $3
        WHERE donor_id = $1 AND calendar_year = $2 AND status <> 'void'
        """,
        donor_id, year, now,
    )


async def mark_void_announced(conn: Connection, donor_id: uuid.UUID, year: int, now: datetime) -> None:
    await conn.execute(
        "UPDATE donor_years SET void_announced_at = $3 WHERE donor_id = $1 AND calendar_year = $2",
        donor_id, year, now,
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


async def request_one_stop(conn: Connection, donor_id: uuid.UUID, year: int) -> Record:
    """Record that the donor asked for the exception this year; returns the donor-year (locked)."""
    row = await conn.fetchrow(
        """
        INSERT INTO donor_years AS y (donor_id, calendar_year, one_stop_requested) VALUES ($1, $2, true)
        ON CONFLICT (donor_id, calendar_year) DO UPDATE SET one_stop_requested = true
        RETURNING voided_at IS NOT NULL AS voided, void_announced_at IS NOT NULL AS announced
        """,
        donor_id, year,
    )
    assert row is not None
    return row


async def donor_year(conn: Connection, donor_id: uuid.UUID, year: int) -> Record | None:
    return await conn.fetchrow(
        "SELECT one_stop_requested, voided_at FROM donor_years WHERE donor_id = $1 AND calendar_year = $2",
        donor_id, year,
    )


_DONATION_VIEW = """
SELECT d.id, d.payment_reference, d.request_hash, d.municipality_code, d.donor_id, o.name AS donor_name,
       o.resident_id AS donor_resident_id, d.kind, d.unit, d.amount, d.earmark, d.program_id, d.project,
       d.payment_date, d.calendar_year, d.one_stop_requested, r.number AS receipt_number, d.received_at,
       d.refunded_at, d.refund_reason, d.seq
FROM donations d JOIN donors o ON o.id = d.donor_id LEFT JOIN receipts r ON r.donation_id = d.id
"""


async def donation(conn: Connection, donation_id: uuid.UUID, *, lock: bool = False) -> Record | None:
    lock_clause = " FOR NO KEY UPDATE OF d" if lock else ""
    return await conn.fetchrow(_DONATION_VIEW + " WHERE d.id = $1" + lock_clause, donation_id)


async def donation_by_reference(conn: Connection, payment_reference: str) -> Record | None:
    return await conn.fetchrow(_DONATION_VIEW + " WHERE d.payment_reference = $1", payment_reference)


async def municipality_donations(
    conn: Connection, municipality_code: str, year: int | None, limit: int, offset: int
) -> tuple[list[Record], int]:
    where = " WHERE d.municipality_code = $1 AND ($2::integer IS NULL OR d.calendar_year = $2)"
    rows = await conn.fetch(
        _DONATION_VIEW + where + " ORDER BY d.calendar_year, d.seq LIMIT $3 OFFSET $4",
        municipality_code, year, limit, offset,
    )
    total = await conn.fetchval(
        "SELECT count(*) FROM donations d" + where, municipality_code, year
    )
    return list(rows), int(total)


async def donor_donations(conn: Connection, donor_id: uuid.UUID, year: int) -> list[Record]:
    return list(
        await conn.fetch(
            _DONATION_VIEW + " WHERE d.donor_id = $1 AND d.calendar_year = $2 ORDER BY d.seq", donor_id, year
        )
    )


async def export_donations(
    conn: Connection, municipality_code: str, year: int, prefetch: int = 1000
) -> AsyncIterator[Record]:
    """Every donation of a municipality-year in recording order (a cursor: run in a transaction)."""
    cursor = conn.cursor(
        """
        SELECT r.number AS receipt_number, d.id, d.payment_reference, d.payment_date, d.kind, d.unit, d.amount,
               d.earmark, d.program_id, d.project, o.type AS donor_type, o.name AS donor_name,
               coalesce(r.donor_address, o.address) AS donor_address, d.one_stop_requested,
               a.status AS one_stop_status, d.received_at, d.refunded_at, r.status AS receipt_status,
               r.reissue_count
        FROM donations d
        JOIN donors o ON o.id = d.donor_id
        LEFT JOIN receipts r ON r.donation_id = d.id
        LEFT JOIN one_stop_applications a ON a.donation_id = d.id
        WHERE d.municipality_code = $1 AND d.calendar_year = $2
        ORDER BY d.seq
        """,
        municipality_code, year, prefetch=prefetch,
    )
    async for row in cursor:
        yield row


# ---------------------------------------------------------------------------- refunds


async def mark_refunded(conn: Connection, donation_id: uuid.UUID, reason: str, now: datetime) -> None:
    await conn.execute(
        "UPDATE donations SET refunded_at = $2, refund_reason = $3 WHERE id = $1", donation_id, now, reason
    )


async def cancel_receipt(conn: Connection, donation_id: uuid.UUID, now: datetime) -> None:
    await conn.execute(
        "UPDATE receipts SET status = 'cancelled', cancelled_at = $2 WHERE donation_id = $1", donation_id, now
    )


async def donation_ledger(conn: Connection, donation_id: uuid.UUID) -> list[LedgerEntry]:
    rows = await conn.fetch("SELECT entry, amount FROM fund_ledger WHERE donation_id = $1 ORDER BY id", donation_id)
    return [LedgerEntry(r["entry"], r["amount"]) for r in rows]


async def add_ledger_entries(
    conn: Connection,
    *,
    municipality_code: str,
    earmark: str,
    unit: str,
    donation_id: uuid.UUID,
    program_id: str | None,
    entries: Sequence[LedgerEntry],
    now: datetime,
) -> None:
    await conn.execute(
        """
        INSERT INTO fund_ledger (municipality_code, earmark, unit, entry, amount, donation_id, program_id, recorded_at)
        SELECT $1, $2, $3, e.entry, e.amount, $4, $5, $6 FROM unnest($7::text[], $8::bigint[]) AS e (entry, amount)
        """,
        municipality_code, earmark, unit, donation_id, program_id, now,
        [e.entry for e in entries], [e.amount for e in entries],
    )


async def release_donor_municipality(
    conn: Connection, donor_id: uuid.UUID, year: int, municipality_code: str
) -> None:
    """A refunded hometown-tax donation no longer counts towards the donor-year's municipalities."""
    await conn.execute(
        """
        WITH counted AS (
            UPDATE donor_year_municipalities SET donations = donations - 1
            WHERE donor_id = $1 AND calendar_year = $2 AND municipality_code = $3 AND donations > 1
            RETURNING 1
        )
        DELETE FROM donor_year_municipalities
        WHERE donor_id = $1 AND calendar_year = $2 AND municipality_code = $3 AND donations = 1
          AND NOT EXISTS (SELECT 1 FROM counted)
        """,
        donor_id, year, municipality_code,
    )


# ---------------------------------------------------------------------------- receipts

_RECEIPT_VIEW = """
SELECT r.number, r.donation_id, r.municipality_code, r.calendar_year, r.donor_id, r.donor_name, r.donor_address,
       r.amount_jpy, r.donation_date, r.issued_at, r.status, r.cancelled_at, r.reissue_count, r.last_reissued_at,
       o.resident_id AS donor_resident_id, o.type AS donor_type, d.kind, d.project
FROM receipts r JOIN donors o ON o.id = r.donor_id JOIN donations d ON d.id = r.donation_id
"""


async def receipt(conn: Connection, number: str) -> Record | None:
    return await conn.fetchrow(_RECEIPT_VIEW + " WHERE r.number = $1", number)


async def record_reissue(conn: Connection, number: str, now: datetime) -> None:
    await conn.execute(
        "UPDATE receipts SET reissue_count = reissue_count + 1, last_reissued_at = $2 WHERE number = $1",
        number, now,
    )


# ---------------------------------------------------------------------------- one-stop applications

_APPLICATION_COLUMNS = (
    "id, donation_id, donor_id, municipality_code, calendar_year, received_on, verified, verified_at, status, "
    "recorded_at"
)


async def insert_application(
    conn: Connection,
    *,
    application_id: uuid.UUID,
    donation_id: uuid.UUID,
    donor_id: uuid.UUID,
    year: int,
    municipality_code: str,
    received_on: date,
    verified: bool,
    status: str,
    now: datetime,
) -> Record | None:
    """The application, or None when the donation already has one."""
    return await conn.fetchrow(
        f"""
        INSERT INTO one_stop_applications (id, donation_id, donor_id, calendar_year, municipality_code,
                                           received_on, recorded_at, verified, verified_at, status, voided_at)
        VALUES ($1, $2, $3, $4, $5, $6, $9::timestamptz, $7::boolean, CASE WHEN $7::boolean THEN $9::timestamptz END,
                $8::text, CASE WHEN $8::text = 'void' THEN $9::timestamptz END)
        ON CONFLICT (donation_id) DO NOTHING
        RETURNING {_APPLICATION_COLUMNS}
        """,
        application_id, donation_id, donor_id, year, municipality_code, received_on, verified, status, now,
    )


async def verify_application(conn: Connection, donation_id: uuid.UUID, now: datetime) -> Record | None:
    return await conn.fetchrow(
        f"""
        UPDATE one_stop_applications SET verified = true, verified_at = coalesce(verified_at, $2)
        WHERE donation_id = $1 RETURNING {_APPLICATION_COLUMNS}
        """,
        donation_id, now,
    )


async def application_of_donation(conn: Connection, donation_id: uuid.UUID) -> Record | None:
    return await conn.fetchrow(
        f"SELECT {_APPLICATION_COLUMNS} FROM one_stop_applications WHERE donation_id = $1", donation_id
    )


async def applications_of_donor_year(conn: Connection, donor_id: uuid.UUID, year: int) -> list[Record]:
    return list(
        await conn.fetch(
            f"""
            SELECT {_APPLICATION_COLUMNS} FROM one_stop_applications
            WHERE donor_id = $1 AND calendar_year = $2 ORDER BY recorded_at, id
            """,
            donor_id, year,
        )
    )


async def mark_one_stop_requested(conn: Connection, donation_id: uuid.UUID) -> None:
    await conn.execute("UPDATE donations SET one_stop_requested = true WHERE id = $1", donation_id)


# ---------------------------------------------------------------------------- funds


async def fund_balances(conn: Connection, municipality_code: str) -> list[Record]:
    return list(
        await conn.fetch(
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
    )


async def ledger_entries(
    conn: Connection, municipality_code: str, limit: int, offset: int
) -> tuple[list[Record], int]:
    rows = await conn.fetch(
        """
        SELECT id, earmark, unit, entry, amount, donation_id, program_id, recorded_at
        FROM fund_ledger WHERE municipality_code = $1 ORDER BY id LIMIT $2 OFFSET $3
        """,
        municipality_code, limit, offset,
    )
    total = await conn.fetchval("SELECT count(*) FROM fund_ledger WHERE municipality_code = $1", municipality_code)
    return list(rows), int(total)
