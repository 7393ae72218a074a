"""All SQL of the registration service (asyncpg, no ORM).

Locking order, everywhere: the resident's row first (``lock_resident``), then their registrations.
Every use case that changes a person's registrations takes that lock, so the duplicate and
premium-limit rules hold under concurrent requests and the expiry job never deadlocks with them.
Many residents at once (a registration batch, the expiry job) are locked in id order, in one statement.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import asyncpg

from services.registration.domain import (
    ActivityPick,
    Consent,
    Contact,
    DesignatedActivity,
    IdentityVerification,
    Registration,
    Resident,
    ReviewKind,
    Tier,
)
from shared.contracts.registration import ConsentPurpose, RegistrationStatus
from shared.kit.db import Connection
from shared.kit.group_commit import SharedStep

_ENDED = ("rejected", "expired", "withdrawn")


# --- Residents -----------------------------------------------------------------------------------


def _resident(row: asyncpg.Record) -> Resident:
    return Resident(
        id=row["id"],
        contact=Contact(row["name"], row["name_kana"], row["email"], row["phone"], row["preferred_language"]),
        date_of_birth=row["date_of_birth"],
        legal_address_code=row["legal_address_code"],
        created_at=row["created_at"],
    )


async def insert_resident(conn: Connection, resident: Resident) -> bool:
    """Create the account; False if the id is taken (by an active account or an erased one)."""
    c = resident.contact
    inserted = await conn.fetchval(
        """
        INSERT INTO residents (id, status, name, name_kana, email, phone, date_of_birth, legal_address_code,
                               preferred_language, created_at, updated_at)
        VALUES ($1, 'active', $2, $3, $4, $5, $6, $7, $8, $9, $9)
        ON CONFLICT (id) DO NOTHING
        RETURNING id
        """,
        resident.id, c.name, c.name_kana, c.email, c.phone, resident.date_of_birth, resident.legal_address_code,
        c.preferred_language, resident.created_at,
    )
    return inserted is not None


async def get_resident(conn: Connection, resident_id: str) -> Resident | None:
    row = await conn.fetchrow("SELECT * FROM residents WHERE id = $1 AND status = 'active'", resident_id)
    return _resident(row) if row is not None else None


async def lock_resident(conn: Connection, resident_id: str) -> Resident | None:
    """The active resident, locked for the rest of the transaction (None if absent or erased)."""
    row = await conn.fetchrow(
        "SELECT * FROM residents WHERE id = $1 AND status = 'active' FOR UPDATE", resident_id
    )
    return _resident(row) if row is not None else None


@dataclass(frozen=True, slots=True)
class LockedResident:
    """An active resident, locked, with their registrations and consents as they are under the lock."""

    resident: Resident
    registrations: list[Registration]
    consents: list[Consent]


async def lock_resident_for_registration(conn: Connection, resident_id: str) -> LockedResident | None:
    """``lock_resident``, ``registrations_of`` and ``consents_of`` in one round trip (the function of
    migration 008 reads after taking the lock); None if absent or erased."""
    row = await conn.fetchrow("SELECT * FROM lock_resident_for_registration($1)", resident_id)
    return _locked(row) if row is not None else None


def _locked(row: asyncpg.Record) -> LockedResident:
    return LockedResident(
        _resident(row),
        [_registration(r) for r in row["registrations"]],
        [Consent(c["purpose"], c["partner"] or None, c["granted"], c["changed_at"]) for c in row["consents"]],
    )


async def lock_residents_for_registration(
    conn: Connection, resident_ids: Sequence[str]
) -> list[LockedResident | None]:
    """``lock_resident_for_registration`` for many residents in one round trip (the function of
    migration 009 locks them in id order, so two batches cannot deadlock), answered in the given
    order; None for an id without an active resident."""
    rows = await conn.fetch("SELECT * FROM lock_residents_for_registration($1::text[])", list(resident_ids))
    found = {row["id"]: _locked(row) for row in rows}
    return [found.get(resident_id) for resident_id in resident_ids]


def _one_resident(resident_id: str) -> tuple[Hashable, ...]:
    return (resident_id,)


#: The resident locked with their registrations and consents: concurrent registrations of a
#: group-commit batch share one statement (``shared/kit/group_commit.py``). One resident's requests
#: never share a batch (the handler's ``batch_key``); the key here is a second guard.
LOCK_FOR_REGISTRATION: SharedStep[str, LockedResident | None] = SharedStep(
    "lock residents for registration", lock_residents_for_registration, lock_resident_for_registration,
    _one_resident,
)


async def resident_status(conn: Connection, resident_id: str) -> str | None:
    status: str | None = await conn.fetchval("SELECT status FROM residents WHERE id = $1", resident_id)
    return status


async def update_contact(conn: Connection, resident_id: str, contact: Contact, now: datetime) -> None:
    await conn.execute(
        """
        UPDATE residents SET name = $2, name_kana = $3, email = $4, phone = $5, preferred_language = $6,
                             updated_at = $7
        WHERE id = $1
        """,
        resident_id, contact.name, contact.name_kana, contact.email, contact.phone, contact.preferred_language, now,
    )


async def erase_resident(conn: Connection, resident_id: str, prefecture_code: str, now: datetime) -> None:
    """Blank every personal value of the person in this service; keep what statistics need.

    Kept: the resident id (the key other services already hold), registrations' municipality, tier,
    status and dates, activity dates, consent history. Blanked or removed: name, reading, e-mail,
    phone, birth date, the legal address below its prefecture, JPKI references, activity names and
    documents, rejection reasons and the staff's notes, and relayed outbox rows of the person (their
    contact in them is sealed, and unreadable once the key is shredded; deleting them is hygiene). The
    handler shreds the key and forgets stored idempotent responses (``shared.kit.erasure``).
    """
    await conn.execute(
        """
        UPDATE residents SET status = 'erased', name = NULL, name_kana = NULL, email = NULL, phone = NULL,
                             date_of_birth = NULL, legal_address_code = $2, updated_at = $3, erased_at = $3
        WHERE id = $1
        """,
        resident_id, prefecture_code, now,
    )
    await conn.execute(
        """
        UPDATE registrations SET status = 'withdrawn', ended_at = $2, updated_at = $2
        WHERE resident_id = $1 AND status IN ('active', 'pending_review')
        """,
        resident_id, now,
    )
    await conn.execute(
        """
        UPDATE premium_reviews pr SET status = CASE WHEN pr.status = 'pending' THEN 'cancelled' ELSE pr.status END,
                                      reason = CASE WHEN pr.reason IS NULL THEN NULL ELSE '(erased)' END,
                                      note = NULL,
                                      decided_at = CASE WHEN pr.status = 'pending' THEN $2 ELSE pr.decided_at END
        FROM registrations r WHERE r.id = pr.registration_id AND r.resident_id = $1
        """,
        resident_id, now,
    )
    await conn.execute(
        """
        UPDATE premium_activities pa SET name = NULL, document_ref = NULL, activity_id = NULL
        FROM premium_reviews pr JOIN registrations r ON r.id = pr.registration_id
        WHERE pa.review_id = pr.id AND r.resident_id = $1
        """,
        resident_id,
    )
    await conn.execute(
        "UPDATE identity_verifications SET certificate_serial = NULL, subject_ref = NULL WHERE resident_id = $1",
        resident_id,
    )
    await conn.execute("DELETE FROM consents WHERE resident_id = $1", resident_id)
    await purge_relayed_events_of(conn, resident_id)


async def purge_relayed_events_of(conn: Connection, resident_id: str) -> int:
    """Delete the person's already relayed outbox rows (their payloads may carry the contact)."""
    result: str = await conn.execute(
        "DELETE FROM outbox WHERE key = $1 AND published_at IS NOT NULL", resident_id.encode()
    )
    return int(result.split()[-1])


async def purge_relayed_events_of_erased(conn: Connection) -> int:
    """Relayed outbox rows of erased residents that were still pending when the erasure committed."""
    result: str = await conn.execute(
        """
        DELETE FROM outbox o
        WHERE o.published_at IS NOT NULL AND o.key IS NOT NULL AND EXISTS (
            SELECT 1 FROM residents p WHERE p.id = convert_from(o.key, 'UTF8') AND p.status = 'erased'
        )
        """
    )
    return int(result.split()[-1])


# --- Registrations -------------------------------------------------------------------------------

_REGISTRATION_COLUMNS = """
    r.id, r.resident_id, r.municipality_code, r.prefecture_code, r.tier, r.status, r.derived_from,
    r.registered_at, r.valid_from, r.valid_until, pr.kind AS pending_review
"""
_PENDING_JOIN = "LEFT JOIN premium_reviews pr ON pr.registration_id = r.id AND pr.status = 'pending'"


def _registration(row: asyncpg.Record) -> Registration:
    return Registration(
        id=row["id"], resident_id=row["resident_id"], municipality_code=row["municipality_code"],
        prefecture_code=row["prefecture_code"], tier=row["tier"], status=row["status"],
        derived_from=row["derived_from"], registered_at=row["registered_at"], valid_from=row["valid_from"],
        valid_until=row["valid_until"], pending_review=row["pending_review"],
    )


async def registrations_of(conn: Connection, resident_id: str) -> list[Registration]:
    rows = await conn.fetch(
        f"""
        SELECT {_REGISTRATION_COLUMNS} FROM registrations r {_PENDING_JOIN}
        WHERE r.resident_id = $1 ORDER BY r.registered_at, r.id
        """,
        resident_id,
    )
    return [_registration(row) for row in rows]


async def get_registration(conn: Connection, registration_id: str) -> Registration | None:
    row = await conn.fetchrow(
        f"SELECT {_REGISTRATION_COLUMNS} FROM registrations r {_PENDING_JOIN} WHERE r.id = $1", registration_id
    )
    return _registration(row) if row is not None else None


#: Each row's parameters, in ``insert_registrations``' column order (``updated_at`` is ``registered_at``).
_REGISTRATION_ROW = "(${0}, ${1}, ${2}, ${3}, ${4}, ${5}, ${6}, ${7}, ${8}, ${9}, ${7})"


async def insert_registrations(conn: Connection, registrations: Sequence[Registration]) -> None:
    """Insert registrations in one statement (a municipal one and its derived prefecture one: the
    foreign key of ``derived_from`` is checked at the end of the statement)."""
    if not registrations:
        return
    values = ", ".join(_REGISTRATION_ROW.format(*range(10 * i + 1, 10 * i + 11)) for i in range(len(registrations)))
    await conn.execute(
        f"""
        INSERT INTO registrations (id, resident_id, municipality_code, prefecture_code, tier, status, derived_from,
                                   registered_at, valid_from, valid_until, updated_at)
        VALUES {values}
        """,
        *(value for r in registrations for value in (
            r.id, r.resident_id, r.municipality_code, r.prefecture_code, r.tier, r.status, r.derived_from,
            r.registered_at, r.valid_from, r.valid_until,
        )),
    )


async def insert_many_registrations(conn: Connection, batches: Sequence[Sequence[Registration]]) -> list[None]:
    """``insert_registrations`` for the rows of many requests, in one statement (column arrays: one
    statement text whatever the batch's size); no two requests of one resident (``INSERT``'s keys)."""
    rows = [r for registrations in batches for r in registrations]
    if rows:
        await conn.execute(
            """
            INSERT INTO registrations (id, resident_id, municipality_code, prefecture_code, tier, status, derived_from,
                                       registered_at, valid_from, valid_until, updated_at)
            SELECT i.*, i.registered_at FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                                                  $6::text[], $7::text[], $8::timestamptz[], $9::date[], $10::date[])
                AS i (id, resident_id, municipality_code, prefecture_code, tier, status, derived_from, registered_at,
                      valid_from, valid_until)
            """,
            [r.id for r in rows], [r.resident_id for r in rows], [r.municipality_code for r in rows],
            [r.prefecture_code for r in rows], [r.tier for r in rows], [r.status for r in rows],
            [r.derived_from for r in rows], [r.registered_at for r in rows], [r.valid_from for r in rows],
            [r.valid_until for r in rows],
        )
    return [None] * len(batches)


def _residents_of(registrations: Sequence[Registration]) -> set[Hashable]:
    return {r.resident_id for r in registrations}


#: A request's new registrations: a group-commit batch's share one INSERT (one resident's requests
#: never share it: the second must see the first's rows).
INSERT: SharedStep[Sequence[Registration], None] = SharedStep(
    "insert registrations", insert_many_registrations, insert_registrations, _residents_of
)


async def save_registration(conn: Connection, registration: Registration, now: datetime) -> None:
    """Store a registration's tier, status and validity as the domain decided them."""
    r = registration
    await conn.execute(
        """
        UPDATE registrations SET tier = $2, status = $3, valid_from = $4, valid_until = $5, updated_at = $6,
                                 ended_at = CASE WHEN $3 = ANY($7::text[]) THEN coalesce(ended_at, $6) END
        WHERE id = $1
        """,
        r.id, r.tier, r.status, r.valid_from, r.valid_until, now, list(_ENDED),
    )


async def insert_identity(
    conn: Connection, verification_id: str, resident_id: str, identity: IdentityVerification, now: datetime
) -> bool:
    """Record an attested verification; False if its attestation (provider, jti) was used before.

    The unique index decides, in the request's transaction: of two requests with one attestation,
    the second waits for the first and inserts nothing once it commits."""
    inserted = await conn.fetchval(
        """
        INSERT INTO identity_verifications (id, resident_id, method, verified_at, provider, attestation_id,
                                            recorded_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7)
        ON CONFLICT (provider, attestation_id) DO NOTHING
        RETURNING id
        """,
        verification_id, resident_id, identity.method, identity.verified_at, identity.provider,
        identity.attestation_id, now,
    )
    return inserted is not None


async def insert_review(
    conn: Connection,
    review_id: str,
    registration_id: str,
    kind: ReviewKind,
    identity_verification_id: str | None,
    activities: Sequence[ActivityPick],
    now: datetime,
) -> None:
    await conn.execute(
        """
        INSERT INTO premium_reviews (id, registration_id, kind, status, identity_verification_id, requested_at)
        VALUES ($1, $2, $3, 'pending', $4, $5)
        """,
        review_id, registration_id, kind, identity_verification_id, now,
    )
    await conn.executemany(
        """
        INSERT INTO premium_activities (review_id, position, activity_id, activity_date, document_ref)
        VALUES ($1, $2, $3, $4, $5)
        """,
        [(review_id, i, a.activity_id, a.on, a.document_ref) for i, a in enumerate(activities)],
    )


async def decide_review(
    conn: Connection,
    registration_id: str,
    status: str,
    now: datetime,
    *,
    decided_by: str | None = None,
    reason: str | None = None,
    note: str | None = None,
    valid_until: date | None = None,
) -> None:
    """Close the pending review of a registration (approved, rejected or cancelled); ``reason`` is a
    code of the published list, ``note`` the staff's own words (kept here only)."""
    await conn.execute(
        """
        UPDATE premium_reviews SET status = $2, decided_at = $3, decided_by = $4, reason = $5, valid_until = $6,
                                   note = $7
        WHERE registration_id = $1 AND status = 'pending'
        """,
        registration_id, status, now, decided_by, reason, valid_until, note,
    )


@dataclass(frozen=True, slots=True)
class ReviewedActivity:
    """An activity of a review: the catalogue entry picked, or the free-text name of a request made
    before catalogues (both None once the person's data is erased)."""

    on: date
    document_ref: str | None
    entry: DesignatedActivity | None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class ReviewRecord:
    id: str
    kind: ReviewKind
    status: str
    requested_at: datetime
    decided_at: datetime | None
    decided_by: str | None
    reason: str | None
    note: str | None
    identity_method: str | None
    identity_verified_at: datetime | None
    activities: list[ReviewedActivity]
    identity_provider: str | None = None


async def reviews_of(conn: Connection, registration_id: str) -> list[ReviewRecord]:
    rows = await conn.fetch(
        """
        SELECT pr.id, pr.kind, pr.status, pr.requested_at, pr.decided_at, pr.decided_by, pr.reason, pr.note,
               iv.method, iv.verified_at, iv.provider,
               coalesce(array_agg(pa.name ORDER BY pa.position) FILTER (WHERE pa.review_id IS NOT NULL), '{}')
                   AS activity_names,
               coalesce(array_agg(pa.activity_date ORDER BY pa.position) FILTER (WHERE pa.review_id IS NOT NULL),
                        '{}') AS activity_dates,
               coalesce(array_agg(pa.document_ref ORDER BY pa.position) FILTER (WHERE pa.review_id IS NOT NULL),
                        '{}') AS activity_documents,
               coalesce(array_agg(pa.activity_id ORDER BY pa.position) FILTER (WHERE pa.review_id IS NOT NULL),
                        '{}') AS activity_ids
        FROM premium_reviews pr
        LEFT JOIN identity_verifications iv ON iv.id = pr.identity_verification_id
        LEFT JOIN premium_activities pa ON pa.review_id = pr.id
        WHERE pr.registration_id = $1
        GROUP BY pr.id, iv.method, iv.verified_at, iv.provider
        ORDER BY pr.requested_at, pr.id
        """,
        registration_id,
    )
    entries = await designated_activities(
        conn, {activity_id for row in rows for activity_id in row["activity_ids"] if activity_id is not None}
    )
    return [
        ReviewRecord(
            id=row["id"], kind=row["kind"], status=row["status"], requested_at=row["requested_at"],
            decided_at=row["decided_at"], decided_by=row["decided_by"], reason=row["reason"], note=row["note"],
            identity_method=row["method"], identity_verified_at=row["verified_at"],
            identity_provider=row["provider"],
            activities=[
                ReviewedActivity(on, document, entries.get(activity_id) if activity_id else None, name)
                for name, on, document, activity_id in zip(
                    row["activity_names"], row["activity_dates"], row["activity_documents"], row["activity_ids"],
                    strict=True,
                )
            ],
        )
        for row in rows
    ]


async def lock_residents_with_due_premiums(conn: Connection, today: date, limit: int) -> list[str]:
    """Residents with a premium registration past its validity, locked; rows another replica holds are skipped."""
    rows = await conn.fetch(
        """
        SELECT id FROM residents
        WHERE id IN (
            SELECT resident_id FROM registrations
            WHERE status = 'active' AND tier = 'premium' AND valid_until < $1
            LIMIT $2
        )
        ORDER BY id
        FOR UPDATE SKIP LOCKED
        """,
        today, limit,
    )
    return [row["id"] for row in rows]


async def claim_due_premiums(
    conn: Connection, resident_ids: list[str], today: date, now: datetime
) -> list[Registration]:
    """Expire these residents' premium registrations past their validity; return them as they are now."""
    rows = await conn.fetch(
        """
        UPDATE registrations r SET status = 'expired', ended_at = $3, updated_at = $3
        WHERE r.resident_id = ANY($1::text[]) AND r.status = 'active' AND r.tier = 'premium' AND r.valid_until < $2
        RETURNING r.id, r.resident_id, r.municipality_code, r.prefecture_code, r.tier, r.status, r.derived_from,
                  r.registered_at, r.valid_from, r.valid_until, NULL::text AS pending_review
        """,
        resident_ids, today, now,
    )
    # A renewal not decided in time lapses with the registration: the person asks again.
    await conn.execute(
        """
        UPDATE premium_reviews SET status = 'cancelled', decided_at = $2
        WHERE registration_id = ANY($1::text[]) AND status = 'pending'
        """,
        [row["id"] for row in rows], now,
    )
    return [_registration(row) for row in rows]


# --- Consents ------------------------------------------------------------------------------------


async def consents_of(conn: Connection, resident_id: str) -> list[Consent]:
    rows = await conn.fetch(
        """
        SELECT purpose, partner, granted, changed_at FROM consents WHERE resident_id = $1
        ORDER BY purpose, partner
        """,
        resident_id,
    )
    return [Consent(row["purpose"], row["partner"] or None, row["granted"], row["changed_at"]) for row in rows]


async def current_consent(
    conn: Connection, resident_id: str, purpose: ConsentPurpose, partner: str | None
) -> Consent | None:
    row = await conn.fetchrow(
        "SELECT granted, changed_at FROM consents WHERE resident_id = $1 AND purpose = $2 AND partner = $3",
        resident_id, purpose, partner or "",
    )
    return Consent(purpose, partner, row["granted"], row["changed_at"]) if row is not None else None


async def set_consent(conn: Connection, resident_id: str, consent: Consent) -> None:
    await conn.execute(
        """
        INSERT INTO consents (resident_id, purpose, partner, granted, changed_at) VALUES ($1, $2, $3, $4, $5)
        ON CONFLICT (resident_id, purpose, partner) DO UPDATE SET granted = $4, changed_at = $5
        """,
        resident_id, consent.purpose, consent.partner or "", consent.granted, consent.at,
    )
    await conn.execute(
        "INSERT INTO consent_log (resident_id, purpose, partner, granted, at) VALUES ($1, $2, $3, $4, $5)",
        resident_id, consent.purpose, consent.partner or "", consent.granted, consent.at,
    )


# --- Staff lists ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RegistrationFilter:
    municipality_code: str
    tier: Tier | None = None
    status: RegistrationStatus | None = None
    name: str | None = None  # a substring of the name
    kana: str | None = None  # a substring of the reading, in katakana
    awaiting_review: bool | None = None


@dataclass(frozen=True, slots=True)
class ListedRegistration:
    registration: Registration
    name: str | None
    name_kana: str | None
    email: str | None
    phone: str | None
    preferred_language: str


def _like(term: str) -> str:
    return "%" + term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _where(f: RegistrationFilter) -> tuple[str, list[Any]]:
    """Only the conditions the filter sets: `$n IS NULL OR ...` would keep a generic plan off the
    indexes, and a count that needs no join (no name, no review filter) skips both joins."""
    clauses = ["r.municipality_code = $1"]
    args: list[Any] = [f.municipality_code]

    def arg(value: object) -> str:
        args.append(value)
        return f"${len(args)}"

    if f.tier is not None:
        clauses.append(f"r.tier = {arg(f.tier)}")
    if f.status is not None:
        clauses.append(f"r.status = {arg(f.status)}")
    if f.name:
        name = _like(f.name)
        clauses.append(f"(p.name ILIKE {arg(name)} OR p.name_kana ILIKE {arg(_like(f.kana) if f.kana else name)})")
    if f.awaiting_review is not None:
        clauses.append(f"(pr.kind IS NOT NULL) = {arg(f.awaiting_review)}")
    return "WHERE " + " AND ".join(clauses), args


_LISTED_COLUMNS = f"{_REGISTRATION_COLUMNS}, p.name, p.name_kana, p.email, p.phone, p.preferred_language"
_LISTED_FROM = f"FROM registrations r JOIN residents p ON p.id = r.resident_id {_PENDING_JOIN}"


def _listed(row: asyncpg.Record) -> ListedRegistration:
    return ListedRegistration(
        _registration(row), row["name"], row["name_kana"], row["email"], row["phone"], row["preferred_language"]
    )


async def search_registrations(
    conn: Connection, f: RegistrationFilter, limit: int, offset: int, after: str | None = None
) -> tuple[list[ListedRegistration], int]:
    """A page of the list; ``after``: only registrations after that one in the list's order (keyset:
    a deep page is an index range, where OFFSET reads and drops every row before it)."""
    where, args = _where(f)
    people = "JOIN residents p ON p.id = r.resident_id" if f.name else ""
    pending = _PENDING_JOIN if f.awaiting_review is not None else ""
    total = await conn.fetchval(f"SELECT count(*) FROM registrations r {people} {pending} {where}", *args)
    n = len(args)
    keyset = (
        "" if after is None else
        f" AND (r.registered_at, r.id) > (SELECT registered_at, id FROM registrations WHERE id = ${n + 3})"
    )
    rows = await conn.fetch(
        f"SELECT {_LISTED_COLUMNS} {_LISTED_FROM} {where}{keyset} ORDER BY r.registered_at, r.id "
        f"LIMIT ${n + 1} OFFSET ${n + 2}",
        *args, limit, offset, *(() if after is None else (after,)),
    )
    return [_listed(row) for row in rows], int(total)


#: Where a listing stands: the last row's (registered_at, id), the list's unique order.
RegistrationKey = tuple[datetime, str]


def registration_key(item: ListedRegistration) -> RegistrationKey:
    return item.registration.registered_at, item.registration.id


async def registrations_after(
    conn: Connection, f: RegistrationFilter, after: RegistrationKey | None, limit: int
) -> list[ListedRegistration]:
    """The next ``limit`` matching registrations after ``after`` in the list's order (keyset: an
    index range scan however deep, where OFFSET reads and drops every row before it)."""
    where, args = _where(f)
    if after is not None:
        where += f" AND (r.registered_at, r.id) > (${len(args) + 1}, ${len(args) + 2})"
        args = [*args, *after]
    rows = await conn.fetch(
        f"SELECT {_LISTED_COLUMNS} {_LISTED_FROM} {where} ORDER BY r.registered_at, r.id LIMIT ${len(args) + 1}",
        *args, limit,
    )
    return [_listed(row) for row in rows]


def _cell(expression: str) -> str:
    """A text column as the CSV cell the kit's ``csv_export.cell`` makes of it: NULL empty, and a value
    a spreadsheet would run as a formula (``= + - @``, tab, CR) kept as text behind a quote."""
    return (f"COALESCE(CASE WHEN left({expression}, 1) IN ('=', '+', '-', '@', E'\\t', E'\\r') "
            f"THEN '''' || {expression} ELSE {expression} END, '')")


def _japan_time(expression: str) -> str:
    """ISO 8601 in Japan time, as ``datetime.astimezone(JAPAN).isoformat()`` writes it."""
    local = f"({expression} AT TIME ZONE 'Asia/Tokyo')"
    return (f"""COALESCE(to_char({local}, 'YYYY-MM-DD"T"HH24:MI:SS') || CASE WHEN date_trunc('second', {local}) """
            f"= {local} THEN '' ELSE to_char({local}, '.US') END || '+09:00', '')")


def _iso_date(expression: str) -> str:
    return f"COALESCE(to_char({expression}, 'YYYY-MM-DD'), '')"


#: The export's cells, formatted by PostgreSQL: the CSV of 100,000 registrations is then the csv
#: module's bulk ``writerows`` per page, not Python work per cell on the service's one event loop
#: (which the pages of 20 browsing staff waited behind).
_EXPORT_CELLS = ", ".join([
    _cell("r.id"), _cell("r.resident_id"), "r.municipality_code", "{municipality_name}", "r.tier", "r.status",
    _japan_time("r.registered_at"), _iso_date("r.valid_from"), _iso_date("r.valid_until"),
    "COALESCE(pr.kind, '')", _cell("p.name"), _cell("p.name_kana"), _cell("p.email"), _cell("p.phone"),
    _cell("p.preferred_language"),
])


@dataclass(frozen=True, slots=True)
class ExportPage:
    """A page of the export: its rows as CSV cells, and where the next page starts (None: the last)."""

    rows: list[tuple[str, ...]]
    next_after: RegistrationKey | None


async def export_page(
    conn: Connection, f: RegistrationFilter, municipality_name: str, after: RegistrationKey | None, limit: int
) -> ExportPage:
    """The next ``limit`` matching registrations after ``after`` (keyset, as ``registrations_after``),
    as the text cells of the export's columns (``api.CSV_COLUMNS``)."""
    where, args = _where(f)
    if after is not None:
        where += f" AND (r.registered_at, r.id) > (${len(args) + 1}, ${len(args) + 2})"
        args = [*args, *after]
    args.append(municipality_name)
    cells = _EXPORT_CELLS.replace("{municipality_name}", f"${len(args)}::text")
    rows = await conn.fetch(
        f"SELECT r.registered_at AS key_at, r.id AS key_id, {cells} {_LISTED_FROM} {where} "
        f"ORDER BY r.registered_at, r.id LIMIT ${len(args) + 1}",
        *args, limit,
    )
    last = (rows[-1]["key_at"], rows[-1]["key_id"]) if len(rows) == limit else None
    return ExportPage([tuple(row.values())[2:] for row in rows], last)


# --- Partners registered through the partner gateway (gateway.partners.v1) -----------------------


async def save_registered_partners(conn: Connection, rows: Sequence[tuple[str, str, datetime]]) -> None:
    """Upsert (code, name, registered at); a later registration of a code wins."""
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


async def registered_partner_codes(conn: Connection, codes: Iterable[str]) -> set[str]:
    """Which of these codes are partners registered through the gateway."""
    rows = await conn.fetch("SELECT code FROM registered_partners WHERE code = ANY($1::text[])", list(codes))
    return {row["code"] for row in rows}


# --- Designated activities (each municipality's catalogue) ---------------------------------------


def _designated(row: asyncpg.Record) -> DesignatedActivity:
    return DesignatedActivity(
        id=row["id"], municipality_code=row["municipality_code"], code=row["code"], name_ja=row["name_ja"],
        name_en=row["name_en"], kind=row["kind"], season=row["season"], evidence_required=row["evidence_required"],
        status=row["status"], sample=row["sample"], created_at=row["created_at"], updated_at=row["updated_at"],
        retired_at=row["retired_at"],
    )


_DESIGNATED_INSERT = """
    INSERT INTO designated_activities (id, municipality_code, code, name_ja, name_en, kind, season,
                                       evidence_required, status, sample, created_at, updated_at, retired_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
    ON CONFLICT (id) DO NOTHING
    RETURNING id
"""


def _designated_values(a: DesignatedActivity) -> tuple[object, ...]:
    return (a.id, a.municipality_code, a.code, a.name_ja, a.name_en, a.kind, a.season, a.evidence_required,
            a.status, a.sample, a.created_at, a.updated_at, a.retired_at)


async def insert_designated_activity(conn: Connection, entry: DesignatedActivity) -> bool:
    """Publish an entry; False if the municipality already has one with this code (retired ones too)."""
    return await conn.fetchval(_DESIGNATED_INSERT, *_designated_values(entry)) is not None


async def insert_missing_designated_activities(conn: Connection, entries: Sequence[DesignatedActivity]) -> int:
    """Insert the entries not there yet (the sample seed: entries staff changed or retired stay)."""
    inserted = 0
    for entry in entries:
        inserted += await insert_designated_activity(conn, entry)
    return inserted


async def get_designated_activity(
    conn: Connection, activity_id: str, *, lock: bool = False
) -> DesignatedActivity | None:
    row = await conn.fetchrow(
        f"SELECT * FROM designated_activities WHERE id = $1{' FOR UPDATE' if lock else ''}", activity_id
    )
    return _designated(row) if row is not None else None


async def designated_activities(conn: Connection, activity_ids: Iterable[str]) -> dict[str, DesignatedActivity]:
    """The entries with these ids, of any municipality and status (a missing id is absent)."""
    ids = sorted(set(activity_ids))
    if not ids:
        return {}
    rows = await conn.fetch("SELECT * FROM designated_activities WHERE id = ANY($1::text[])", ids)
    return {row["id"]: _designated(row) for row in rows}


async def catalogue_of(conn: Connection, municipality_code: str) -> list[DesignatedActivity]:
    """The municipality's published entries, by kind and code."""
    rows = await conn.fetch(
        """
        SELECT * FROM designated_activities WHERE municipality_code = $1 AND status = 'published'
        ORDER BY kind, code
        """,
        municipality_code,
    )
    return [_designated(row) for row in rows]


async def save_designated_activity(conn: Connection, entry: DesignatedActivity) -> None:
    await conn.execute(
        """
        UPDATE designated_activities SET name_ja = $2, name_en = $3, kind = $4, season = $5, evidence_required = $6,
                                         status = $7, sample = $8, updated_at = $9, retired_at = $10
        WHERE id = $1
        """,
        entry.id, entry.name_ja, entry.name_en, entry.kind, entry.season, entry.evidence_required, entry.status,
        entry.sample, entry.updated_at, entry.retired_at,
    )
