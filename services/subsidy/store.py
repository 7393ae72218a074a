"""All SQL of the subsidy service (asyncpg, no ORM).

Lock order, everywhere: a trip row, then grant rows (by grant id), then budget rows (by program
id). Budget movements are one statement that updates the budget row only if it stays
non-negative and writes the ledger row from the same update, so a reservation or a draw can
never overdraw the budget, however many run at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, cast

import asyncpg

from services.subsidy.domain import (
    CertificateState,
    FareProduct,
    FundingCandidate,
    GrantState,
    GrantStatus,
    HeldGrant,
    LedgerKind,
    Parameters,
    Program,
    ledger_deltas,
    parse_parameters,
)
from shared.contracts.common import SealedMembership
from shared.contracts.sealed import Sealed
from shared.contracts.subsidy import BudgetUnit, Mechanism
from shared.kit.db import Connection

# --- programs -------------------------------------------------------------------------------------

_PROGRAM_COLUMNS = (
    "program_id, reference_program, title, partner, municipality_code, mechanism, unit, parameters, "
    "active_from, active_until, fare_products, participant_cap, one_region_per_year"
)


def _program(row: asyncpg.Record) -> Program:
    mechanism = cast(Mechanism, row["mechanism"])
    return Program(
        program_id=row["program_id"],
        title=row["title"],
        partner=row["partner"],
        municipality_code=row["municipality_code"],
        mechanism=mechanism,
        unit=cast(BudgetUnit, row["unit"]),
        parameters=parse_parameters(mechanism, json.loads(row["parameters"])),
        active_from=row["active_from"],
        active_until=row["active_until"],
        reference_program=row["reference_program"],
        fare_products=tuple(
            FareProduct(route=item["route"], fare_jpy=item["fare_jpy"]) for item in json.loads(row["fare_products"])
        ),
        participant_cap=row["participant_cap"],
        one_region_per_year=row["one_region_per_year"],
    )


async def insert_program(conn: Connection, program: Program, created_by: str) -> bool:
    """Insert the program and its (empty) budget; False if the id is taken."""
    inserted = await conn.fetchval(
        """
        INSERT INTO programs (program_id, reference_program, title, partner, municipality_code, mechanism,
                              unit, parameters, active_from, active_until, created_by, fare_products,
                              participant_cap, one_region_per_year)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, $10, $11, $12::jsonb, $13, $14)
        ON CONFLICT (program_id) DO NOTHING
        RETURNING true
        """,
        program.program_id, program.reference_program, program.title, program.partner,
        program.municipality_code, program.mechanism, program.unit,
        json.dumps(program.parameters.model_dump(exclude_none=True)), program.active_from,
        program.active_until, created_by,
        json.dumps([{"route": f.route, "fare_jpy": f.fare_jpy} for f in program.fare_products], ensure_ascii=False),
        program.participant_cap, program.one_region_per_year,
    )
    if not inserted:
        return False
    await conn.execute("INSERT INTO budgets (program_id, unit) VALUES ($1, $2)", program.program_id, program.unit)
    return True


async def program(conn: Connection, program_id: str) -> Program | None:
    row = await conn.fetchrow(f"SELECT {_PROGRAM_COLUMNS} FROM programs WHERE program_id = $1", program_id)
    return _program(row) if row is not None else None


async def programs_of_municipality(conn: Connection, municipality_code: str) -> list[Program]:
    return (await programs_of_municipalities(conn, [municipality_code])).get(municipality_code, [])


async def programs_of_municipalities(conn: Connection, municipality_codes: Iterable[str]) -> dict[str, list[Program]]:
    """The programs of each of these towns that has any (in program id order)."""
    rows = await conn.fetch(
        f"""
        SELECT {_PROGRAM_COLUMNS} FROM programs WHERE municipality_code = ANY($1::text[])
        ORDER BY municipality_code, program_id
        """,
        list(set(municipality_codes)),
    )
    programs: dict[str, list[Program]] = {}
    for row in rows:
        programs.setdefault(row["municipality_code"], []).append(_program(row))
    return programs


async def funding_candidates(conn: Connection, municipality_code: str) -> list[FundingCandidate]:
    rows = await conn.fetch(
        f"""
        SELECT {_PROGRAM_COLUMNS},
               (SELECT min(g.waitlist_seq) FROM grants g
                 WHERE g.program_id = p.program_id AND g.status = 'waitlisted') AS waiting_since
        FROM programs p WHERE municipality_code = $1 ORDER BY program_id
        """,
        municipality_code,
    )
    return [FundingCandidate(_program(row), row["waiting_since"]) for row in rows]


# --- budgets and ledger ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Budget:
    program_id: str
    unit: BudgetUnit
    available: int


def _budget(row: asyncpg.Record) -> Budget:
    return Budget(row["program_id"], row["unit"], row["available"])


async def lock_budget(conn: Connection, program_id: str, unit: BudgetUnit) -> Budget | None:
    # NO KEY UPDATE: waits for other reservations and credits, not for draws (their ledger rows
    # only take the KEY SHARE lock of their foreign key).
    row = await conn.fetchrow(
        "SELECT program_id, unit, available FROM budgets WHERE program_id = $1 AND unit = $2 FOR NO KEY UPDATE",
        program_id, unit,
    )
    return _budget(row) if row is not None else None


async def budgets_of_program(conn: Connection, program_id: str) -> list[Budget]:
    rows = await conn.fetch(
        "SELECT program_id, unit, available FROM budgets WHERE program_id = $1 ORDER BY unit", program_id
    )
    return [_budget(row) for row in rows]


@dataclass(frozen=True, slots=True)
class Movement:
    entry_id: int
    available: int


async def move_budget(
    conn: Connection,
    program_id: str,
    unit: BudgetUnit,
    kind: LedgerKind,
    amount: int,
    *,
    grant_id: str | None = None,
    trip_id: str | None = None,
    donation_id: str | None = None,
    reason: str = "",
    actor: str | None = None,
) -> Movement | None:
    """Move what is available and write the ledger row in one statement; None if it would overdraw.

    Draws never come here: they leave ``available`` alone (see ``record_trip``).
    """
    if kind == "draw":
        raise ValueError("draws are recorded with the trip, not on the budget row")
    available, reserved, spent = ledger_deltas(kind, amount)
    row = await conn.fetchrow(
        """
        WITH moved AS (
            UPDATE budgets SET available = available + $3, updated_at = now()
             WHERE program_id = $1 AND unit = $2 AND available + $3 >= 0
            RETURNING available
        ), entry AS (
            INSERT INTO budget_ledger (program_id, unit, kind, amount, available_delta, reserved_delta,
                                       spent_delta, grant_id, trip_id, donation_id, reason, actor)
            SELECT $1, $2, $6, $7, $3, $4, $5, $8, $9, $10, $11, $12 FROM moved
            RETURNING entry_id
        )
        SELECT entry.entry_id, moved.available FROM moved, entry
        """,
        program_id, unit, available, reserved, spent, kind, amount, grant_id, trip_id, donation_id,
        reason, actor,
    )
    if row is None:
        return None
    return Movement(row["entry_id"], row["available"])


@dataclass(frozen=True, slots=True)
class LedgerSums:
    available: int
    reserved: int
    spent: int
    entries: int
    by_kind: dict[str, int]


async def ledger_sums(conn: Connection | asyncpg.Pool, program_id: str, unit: BudgetUnit) -> LedgerSums:
    rows = await conn.fetch(
        """
        SELECT kind, count(*) AS entries, sum(amount) AS amount, sum(available_delta) AS available,
               sum(reserved_delta) AS reserved, sum(spent_delta) AS spent
        FROM budget_ledger WHERE program_id = $1 AND unit = $2 GROUP BY kind ORDER BY kind
        """,
        program_id, unit,
    )
    return LedgerSums(
        available=sum(int(r["available"]) for r in rows),
        reserved=sum(int(r["reserved"]) for r in rows),
        spent=sum(int(r["spent"]) for r in rows),
        entries=sum(int(r["entries"]) for r in rows),
        by_kind={r["kind"]: int(r["amount"]) for r in rows},
    )


@dataclass(frozen=True, slots=True)
class GrantSums:
    remaining: int  # what open grants still hold: the budget's reserved part
    drawn: int  # what grants drew: the budget's spent part


async def grant_sums(conn: Connection | asyncpg.Pool, program_id: str) -> GrantSums:
    row = await conn.fetchrow(
        "SELECT coalesce(sum(remaining), 0) AS remaining, coalesce(sum(drawn), 0) AS drawn "
        "FROM grants WHERE program_id = $1",
        program_id,
    )
    assert row is not None
    return GrantSums(int(row["remaining"]), int(row["drawn"]))


async def ledger_page(
    conn: Connection, program_id: str, limit: int, offset: int
) -> tuple[list[dict[str, Any]], int]:
    total = await conn.fetchval("SELECT count(*) FROM budget_ledger WHERE program_id = $1", program_id)
    rows = await conn.fetch(
        """
        SELECT entry_id, unit, kind, amount, available_delta, reserved_delta, spent_delta, grant_id, trip_id,
               donation_id, reason, actor, created_at
        FROM budget_ledger WHERE program_id = $1 ORDER BY entry_id LIMIT $2 OFFSET $3
        """,
        program_id, limit, offset,
    )
    return [dict(row) for row in rows], int(total)


# --- certificates ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CertificateRow:
    state: CertificateState
    partners: Sequence[SealedMembership]


async def upsert_certificates(conn: Connection, rows: Sequence[CertificateRow]) -> None:
    """Project certificates in one statement; a certificate given twice is written as its last row
    (one INSERT ... ON CONFLICT may touch a row only once)."""
    last = {row.state.certificate_number: row for row in rows}
    ordered = [last[number] for number in sorted(last)]  # rows locked in one order, whoever writes
    states = [row.state for row in ordered]
    await conn.execute(
        """
        INSERT INTO certificates (certificate_number, resident_id, municipality_code, valid_from, valid_until,
                                  status, partners)
        SELECT c.certificate_number, c.resident_id, c.municipality_code, c.valid_from, c.valid_until, c.status,
               c.partners::jsonb
        FROM unnest($1::text[], $2::text[], $3::text[], $4::date[], $5::date[], $6::text[], $7::text[])
            AS c(certificate_number, resident_id, municipality_code, valid_from, valid_until, status, partners)
        ON CONFLICT (certificate_number) DO UPDATE SET
            resident_id = EXCLUDED.resident_id, municipality_code = EXCLUDED.municipality_code,
            valid_from = EXCLUDED.valid_from, valid_until = EXCLUDED.valid_until, status = EXCLUDED.status,
            partners = EXCLUDED.partners, updated_at = now()
        """,
        [s.certificate_number for s in states], [s.resident_id for s in states],
        [s.municipality_code for s in states], [s.valid_from for s in states], [s.valid_until for s in states],
        [s.status for s in states], [_memberships_json(row.partners) for row in ordered],
    )


def _memberships_json(partners: Sequence[SealedMembership]) -> str:
    return json.dumps([p.model_dump(mode="json") for p in partners])


def _sealed(raw: str | None) -> Sealed | None:
    """A member number as stored: the ``Sealed`` JSON the certificate carried (jsonb comes as text)."""
    return None if raw is None else Sealed.model_validate_json(raw)


def _sealed_json(value: Sealed | None) -> str | None:
    return None if value is None else value.model_dump_json()


async def certificate(conn: Connection, certificate_number: str) -> CertificateState | None:
    row = await conn.fetchrow(
        "SELECT certificate_number, resident_id, municipality_code, valid_from, valid_until, status "
        "FROM certificates WHERE certificate_number = $1",
        certificate_number,
    )
    if row is None:
        return None
    return CertificateState(
        row["certificate_number"], row["resident_id"], row["municipality_code"], row["valid_from"],
        row["valid_until"], row["status"],
    )


# --- grants ---------------------------------------------------------------------------------------

_GRANT_COLUMNS = (
    "grant_id, program_id, certificate_number, resident_id, municipality_code, partner, mechanism, unit, "
    "member_number, status, value, remaining, legs_counted, window_from, window_until, waitlist_seq"
)
_GRANT_COLUMNS_OF_G = ", ".join(f"g.{column.strip()}" for column in _GRANT_COLUMNS.split(","))


def _grant(row: asyncpg.Record) -> GrantState:
    return GrantState(
        grant_id=row["grant_id"], program_id=row["program_id"], certificate_number=row["certificate_number"],
        resident_id=row["resident_id"], municipality_code=row["municipality_code"], partner=row["partner"],
        mechanism=row["mechanism"], unit=row["unit"], member_number=_sealed(row["member_number"]),
        status=row["status"],
        value=row["value"], remaining=row["remaining"], legs_counted=row["legs_counted"],
        window_from=row["window_from"], window_until=row["window_until"], waitlist_seq=row["waitlist_seq"],
    )


async def grant_exists(conn: Connection, certificate_number: str, program_id: str, period_from: date) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT true FROM grants WHERE certificate_number = $1 AND program_id = $2 AND period_from = $3",
            certificate_number, program_id, period_from,
        )
    )


async def participants(conn: Connection, program_id: str) -> int:
    """The residents holding a place in the program: a grant issued or used up (callers hold the budget lock)."""
    count = await conn.fetchval(
        "SELECT count(DISTINCT resident_id) FROM grants WHERE program_id = $1 AND status IN ('issued', 'completed')",
        program_id,
    )
    return int(count)


async def lock_scheme_of_resident(conn: Connection, resident_id: str, scheme: str) -> None:
    """Serialise the grants of one resident under one scheme (two towns' certificates may arrive at once)."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"{resident_id}/{scheme}")


async def held_grants(conn: Connection, resident_id: str, scheme: str) -> list[HeldGrant]:
    """The resident's grants under a scheme (its reference program, or the program itself), in any town."""
    rows = await conn.fetch(
        """
        SELECT g.grant_id, g.municipality_code, g.status, g.window_from, g.window_until
        FROM grants g JOIN programs p ON p.program_id = g.program_id
        WHERE g.resident_id = $1 AND COALESCE(p.reference_program, p.program_id) = $2
        """,
        resident_id, scheme,
    )
    return [
        HeldGrant(r["grant_id"], r["municipality_code"], r["status"], r["window_from"], r["window_until"])
        for r in rows
    ]


async def program_has_waitlist(conn: Connection, program_id: str) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT true FROM grants WHERE program_id = $1 AND status = 'waitlisted' LIMIT 1", program_id
        )
    )


async def insert_grant(
    conn: Connection,
    *,
    grant_id: str,
    program: Program,
    certificate: CertificateState,
    period_from: date,
    member_number: Sealed | None,
    status: GrantStatus,
    window: tuple[date, date],
    now: datetime,
) -> int | None:
    """Insert an issued or waitlisted grant; returns its waitlist arrival number if waitlisted."""
    waitlisted = status == "waitlisted"
    seq: int | None = await conn.fetchval(
        """
        INSERT INTO grants (grant_id, program_id, certificate_number, period_from, resident_id, municipality_code,
                            partner, mechanism, unit, member_number, status, value, remaining, window_from,
                            window_until, waitlist_seq, waitlisted_at, issued_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb, $11, $12, $13, $14, $15,
                CASE WHEN $16 THEN nextval('waitlist_arrival') END,
                CASE WHEN $16 THEN $17::timestamptz END, CASE WHEN $16 THEN NULL ELSE $17::timestamptz END)
        RETURNING waitlist_seq
        """,
        grant_id, program.program_id, certificate.certificate_number, period_from, certificate.resident_id,
        certificate.municipality_code, program.partner, program.mechanism, program.unit,
        _sealed_json(member_number), status, program.grant_value, 0 if waitlisted else program.grant_value,
        window[0], window[1], waitlisted, now,
    )
    return seq


async def forget_withdrawn_member_numbers(
    conn: Connection, certificate_number: str, partners: Sequence[SealedMembership]
) -> int:
    """Keep on the certificate's grants only the member numbers of partners the certificate still
    carries one for (a withdrawn resident's certificate comes back without them). Each event seals
    afresh, so what is compared is whether there is a number, not its ciphertext."""
    numbered = sorted({p.partner for p in partners if p.member_number is not None})
    result: str = await conn.execute(
        """
        UPDATE grants SET member_number = NULL
        WHERE certificate_number = $1 AND member_number IS NOT NULL AND NOT (partner = ANY($2::text[]))
        """,
        certificate_number, numbered,
    )
    return int(result.split()[-1])


async def lock_open_grants_of_resident(conn: Connection, resident_id: str) -> list[GrantState]:
    rows = await conn.fetch(
        f"""
        SELECT {_GRANT_COLUMNS} FROM grants
        WHERE resident_id = $1 AND status IN ('issued', 'waitlisted')
        ORDER BY grant_id FOR UPDATE
        """,
        resident_id,
    )
    return [_grant(row) for row in rows]


async def erase_resident(conn: Connection, resident_id: str) -> tuple[int, int]:
    """What this service holds about an erased resident beyond ids and amounts: the member numbers
    of all their grants (ended ones too) and of their certificates; (grants, certificates) changed.
    Grants, trips and ledger rows stay, with random ids only: they are the budget's accounts."""
    grants: str = await conn.execute(
        "UPDATE grants SET member_number = NULL WHERE resident_id = $1 AND member_number IS NOT NULL", resident_id
    )
    certificates: str = await conn.execute(
        """
        UPDATE certificates
        SET partners = COALESCE(
                (SELECT jsonb_agg(jsonb_build_object('partner', p->>'partner', 'member_number', NULL))
                 FROM jsonb_array_elements(partners) AS p),
                '[]'::jsonb),
            updated_at = now()
        WHERE resident_id = $1
        """,
        resident_id,
    )
    return int(grants.split()[-1]), int(certificates.split()[-1])


async def waitlist_position(conn: Connection, program_id: str, seq: int) -> int:
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM grants WHERE program_id = $1 AND status = 'waitlisted' AND waitlist_seq <= $2",
            program_id, seq,
        )
    )


async def lock_grant(conn: Connection, grant_id: str) -> tuple[GrantState, Parameters] | None:
    """The grant, locked, with its program's parameters (programs never change once created)."""
    row = await conn.fetchrow(
        f"""
        SELECT {_GRANT_COLUMNS_OF_G}, p.parameters FROM grants g JOIN programs p ON p.program_id = g.program_id
        WHERE g.grant_id = $1 FOR UPDATE OF g
        """,
        grant_id,
    )
    if row is None:
        return None
    return _grant(row), parse_parameters(row["mechanism"], json.loads(row["parameters"]))


async def lock_open_grants_of_certificate(conn: Connection, certificate_number: str) -> list[GrantState]:
    rows = await conn.fetch(
        f"""
        SELECT {_GRANT_COLUMNS} FROM grants
        WHERE certificate_number = $1 AND status IN ('issued', 'waitlisted')
        ORDER BY grant_id FOR UPDATE
        """,
        certificate_number,
    )
    return [_grant(row) for row in rows]


async def lock_waitlist(conn: Connection, program_id: str, limit: int = 200) -> list[GrantState]:
    rows = await conn.fetch(
        f"""
        SELECT {_GRANT_COLUMNS} FROM grants
        WHERE program_id = $1 AND status = 'waitlisted'
        ORDER BY waitlist_seq LIMIT $2 FOR UPDATE
        """,
        program_id, limit,
    )
    return [_grant(row) for row in rows]


async def lock_lapsed_grants(conn: Connection, today: date, limit: int) -> list[GrantState]:
    rows = await conn.fetch(
        f"""
        SELECT {_GRANT_COLUMNS} FROM grants
        WHERE status IN ('issued', 'waitlisted') AND window_until < $1
        ORDER BY grant_id LIMIT $2 FOR UPDATE SKIP LOCKED
        """,
        today, limit,
    )
    return [_grant(row) for row in rows]


async def issue_waitlisted(conn: Connection, grant_id: str, now: datetime) -> None:
    await conn.execute(
        "UPDATE grants SET status = 'issued', remaining = value, issued_at = $2 WHERE grant_id = $1",
        grant_id, now,
    )


async def close_grant(
    conn: Connection, grant_id: str, status: GrantStatus, released: int, reason: str, now: datetime
) -> None:
    await conn.execute(
        """
        UPDATE grants SET status = $2, remaining = remaining - $3, released = released + $3, closed_at = $5,
                          close_reason = $4
        WHERE grant_id = $1
        """,
        grant_id, status, released, reason, now,
    )


_GRANT_VIEW = (
    "grant_id, program_id, certificate_number, period_from, resident_id, municipality_code, partner, mechanism, "
    "unit, member_number, status, value, remaining, drawn, released, legs_counted, window_from, window_until, "
    "waitlist_seq, waitlisted_at, issued_at, closed_at, close_reason"
)


async def grants_of_program(
    conn: Connection, program_id: str, status: str | None, limit: int, offset: int
) -> tuple[list[dict[str, Any]], int]:
    total = await conn.fetchval(
        "SELECT count(*) FROM grants WHERE program_id = $1 AND ($2::text IS NULL OR status = $2)",
        program_id, status,
    )
    rows = await conn.fetch(
        f"""
        SELECT {_GRANT_VIEW} FROM grants WHERE program_id = $1 AND ($2::text IS NULL OR status = $2)
        ORDER BY created_at, grant_id LIMIT $3 OFFSET $4
        """,
        program_id, status, limit, offset,
    )
    return [dict(row) for row in rows], int(total)


async def grants_of_resident(
    conn: Connection, resident_id: str, municipality_code: str | None, limit: int, offset: int
) -> tuple[list[dict[str, Any]], int]:
    total = await conn.fetchval(
        "SELECT count(*) FROM grants WHERE resident_id = $1 AND ($2::text IS NULL OR municipality_code = $2)",
        resident_id, municipality_code,
    )
    rows = await conn.fetch(
        f"""
        SELECT {_GRANT_VIEW} FROM grants
        WHERE resident_id = $1 AND ($2::text IS NULL OR municipality_code = $2)
        ORDER BY created_at, grant_id LIMIT $3 OFFSET $4
        """,
        resident_id, municipality_code, limit, offset,
    )
    return [dict(row) for row in rows], int(total)


async def grant_counts(conn: Connection, program_id: str) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT status, count(*) AS n FROM grants WHERE program_id = $1 GROUP BY status", program_id
    )
    return {row["status"]: int(row["n"]) for row in rows}


# --- trips ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TripRecord:
    partner: str
    trip_id: str
    grant_id: str
    program_id: str | None
    certificate_number: str
    trip_kind: str
    travelled_on: date
    discount_jpy: int | None
    accepted: bool
    reason: str | None
    detail: str
    unit: str | None
    amount: int
    trips_counted: int
    completed: bool


_TRIP_COLUMN_NAMES = (
    "partner", "trip_id", "grant_id", "program_id", "certificate_number", "trip_kind", "travelled_on",
    "discount_jpy", "accepted", "reason", "detail", "unit", "amount", "trips_counted", "completed",
)
_TRIP_COLUMNS = ", ".join(_TRIP_COLUMN_NAMES)


async def find_trip(conn: Connection, partner: str, trip_id: str) -> TripRecord | None:
    row = await conn.fetchrow(
        f"SELECT {_TRIP_COLUMNS} FROM trips WHERE partner = $1 AND trip_id = $2", partner, trip_id
    )
    return TripRecord(**dict(row)) if row is not None else None


@dataclass(frozen=True, slots=True)
class TripContext:
    grant: GrantState
    parameters: Parameters
    certificate: CertificateState
    #: The trip already recorded under this (partner, trip id), if any.
    existing: TripRecord | None


async def trip_context(conn: Connection, grant_id: str, partner: str, trip_id: str) -> TripContext | None:
    """The grant (locked), its program's parameters, its certificate and any trip recorded under
    this (partner, trip id), in one round trip. None if there is no such grant.

    The certificate is read with the statement's snapshot: if the grant's lock had to be waited
    for, it may predate what that wait was for — callers re-read it unless the grant is issued.
    """
    row = await conn.fetchrow(
        f"""
        SELECT {_GRANT_COLUMNS_OF_G}, p.parameters, c.valid_from AS c_valid_from, c.valid_until AS c_valid_until,
               c.status AS c_status, {", ".join(f"t.{c} AS t_{c}" for c in _TRIP_COLUMN_NAMES)}
        FROM grants g
        JOIN programs p ON p.program_id = g.program_id
        JOIN certificates c ON c.certificate_number = g.certificate_number
        LEFT JOIN trips t ON t.partner = $2 AND t.trip_id = $3
        WHERE g.grant_id = $1
        FOR UPDATE OF g
        """,
        grant_id, partner, trip_id,
    )
    if row is None:
        return None
    grant = _grant(row)
    certificate = CertificateState(
        grant.certificate_number, grant.resident_id, grant.municipality_code, row["c_valid_from"],
        row["c_valid_until"], row["c_status"],
    )
    existing = (
        TripRecord(**{c: row[f"t_{c}"] for c in _TRIP_COLUMN_NAMES}) if row["t_trip_id"] is not None else None
    )
    return TripContext(grant, parse_parameters(grant.mechanism, json.loads(row["parameters"])), certificate, existing)


@dataclass(frozen=True, slots=True)
class GrantCount:
    """What an accepted trip does to its grant: legs counted, drawn, released, used up."""

    legs_counted: int
    drawn: int
    released: int
    completed: bool


async def record_trip(
    conn: Connection,
    record: TripRecord,
    *,
    municipality_code: str | None,
    reported_at: datetime,
    channel: str,
    count: GrantCount | None = None,
    now: datetime | None = None,
) -> bool:
    """Record the trip and its outcome and, if accepted, count it on the grant and write the draw's
    ledger row — one statement. False (and nothing written) if a twin with this (partner, trip id)
    got there first."""
    apply = count is not None and record.accepted
    count = count or GrantCount(0, 0, 0, False)
    inserted = await conn.fetchval(
        f"""
        WITH recorded AS (
            INSERT INTO trips ({_TRIP_COLUMNS}, municipality_code, reported_at, channel)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)
            ON CONFLICT (partner, trip_id) DO NOTHING
            RETURNING trip_id
        ), counted AS (
            UPDATE grants
               SET legs_counted = $20::int, remaining = remaining - $21::bigint - $22::bigint,
                   drawn = drawn + $21::bigint, released = released + $22::bigint,
                   status = CASE WHEN $23::boolean THEN 'completed' ELSE status END,
                   closed_at = CASE WHEN $23::boolean THEN $24::timestamptz ELSE closed_at END,
                   close_reason = CASE WHEN $23::boolean THEN 'used up' ELSE close_reason END
             WHERE grant_id = $3 AND $19::boolean AND EXISTS (SELECT 1 FROM recorded)
            RETURNING program_id, unit, mechanism
        ), drawn AS (
            INSERT INTO budget_ledger (program_id, unit, kind, amount, available_delta, reserved_delta, spent_delta,
                                       grant_id, trip_id, reason)
            SELECT program_id, unit, 'draw', $21::bigint, 0, -$21::bigint, $21::bigint, $3, $2,
                   CASE WHEN mechanism = 'mileage_grant' THEN 'miles credited' ELSE 'trip' END
            FROM counted WHERE $21::bigint > 0
        )
        SELECT EXISTS (SELECT 1 FROM recorded)
        """,
        record.partner, record.trip_id, record.grant_id, record.program_id, record.certificate_number,
        record.trip_kind, record.travelled_on, record.discount_jpy, record.accepted, record.reason, record.detail,
        record.unit, record.amount, record.trips_counted, record.completed, municipality_code, reported_at,
        channel, apply, count.legs_counted, count.drawn, count.released,
        count.completed, now,
    )
    return bool(inserted)


_REDEMPTION_VIEW = (
    "recorded_at, reported_at, partner, trip_id, program_id, grant_id, certificate_number, trip_kind, travelled_on, "
    "discount_jpy, accepted, reason, detail, unit, amount, trips_counted, completed, channel"
)


async def redemptions_page(
    conn: Connection, municipality_code: str, program_id: str | None, limit: int, offset: int
) -> tuple[list[dict[str, Any]], int]:
    total = await conn.fetchval(
        "SELECT count(*) FROM trips WHERE municipality_code = $1 AND ($2::text IS NULL OR program_id = $2)",
        municipality_code, program_id,
    )
    rows = await conn.fetch(
        f"""
        SELECT {_REDEMPTION_VIEW} FROM trips
        WHERE municipality_code = $1 AND ($2::text IS NULL OR program_id = $2)
        ORDER BY recorded_at, partner, trip_id LIMIT $3 OFFSET $4
        """,
        municipality_code, program_id, limit, offset,
    )
    return [dict(row) for row in rows], int(total)


#: Where a listing of reported trips stands: the last row's (recorded_at, partner, trip_id), unique.
TripKey = tuple[datetime, str, str]


def trip_key(row: asyncpg.Record) -> TripKey:
    return row["recorded_at"], row["partner"], row["trip_id"]


async def redemptions_after(
    conn: Connection, municipality_code: str, after: TripKey | None, limit: int
) -> list[asyncpg.Record]:
    """The next ``limit`` trips reported under the municipality's programs after ``after``, oldest
    first (keyset: a download reads them page by page)."""
    where = "municipality_code = $1"
    args: list[object] = [municipality_code]
    if after is not None:
        where += " AND (recorded_at, partner, trip_id) > ($2, $3, $4)"
        args += after
    rows: list[asyncpg.Record] = await conn.fetch(
        f"SELECT {_REDEMPTION_VIEW} FROM trips WHERE {where} "
        f"ORDER BY recorded_at, partner, trip_id LIMIT ${len(args) + 1}",
        *args, limit,
    )
    return rows


# --- donations ------------------------------------------------------------------------------------


async def record_donation(
    conn: Connection,
    *,
    donation_id: str,
    municipality_code: str,
    program_id: str | None,
    unit: str,
    amount: int,
    credited: int,
    remainder: int,
    status: str,
    note: str,
    received_at: datetime,
) -> bool:
    """Record what became of a donation; False if it was recorded before (nothing to do)."""
    inserted = await conn.fetchval(
        """
        INSERT INTO donation_credits (donation_id, municipality_code, program_id, unit, amount, credited, remainder,
                                      status, note, received_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
        ON CONFLICT (donation_id) DO NOTHING
        RETURNING true
        """,
        donation_id, municipality_code, program_id, unit, amount, credited, remainder, status, note, received_at,
    )
    return bool(inserted)


async def donation_seen(conn: Connection, donation_id: str) -> bool:
    return bool(await conn.fetchval("SELECT true FROM donation_credits WHERE donation_id = $1", donation_id))


@dataclass(frozen=True, slots=True)
class DonationCredit:
    donation_id: str
    program_id: str | None
    credited: int
    status: str


async def lock_donation(conn: Connection, donation_id: str) -> DonationCredit | None:
    row = await conn.fetchrow(
        "SELECT donation_id, program_id, credited, status FROM donation_credits WHERE donation_id = $1 FOR UPDATE",
        donation_id,
    )
    return DonationCredit(**dict(row)) if row is not None else None


async def mark_donation_refunded(conn: Connection, donation_id: str, refunded: int, note: str) -> None:
    await conn.execute(
        "UPDATE donation_credits SET status = 'refunded', refunded = $2, note = note || $3 WHERE donation_id = $1",
        donation_id, refunded, note,
    )


# --- Partners registered through the gateway ------------------------------------------------------


async def save_registered_partners(conn: Connection, rows: Sequence[tuple[str, str, datetime]]) -> None:
    if not rows:
        return
    await conn.execute(
        """
        INSERT INTO registered_partners (code, name, registered_at)
        SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[])
        ON CONFLICT (code) DO UPDATE SET name = excluded.name, registered_at = excluded.registered_at
        WHERE registered_partners.registered_at <= excluded.registered_at
        """,
        [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
    )


async def is_registered_partner(conn: Connection, code: str) -> bool:
    return bool(await conn.fetchval("SELECT 1 FROM registered_partners WHERE code = $1", code))
