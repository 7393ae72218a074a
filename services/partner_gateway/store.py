"""All SQL of the partner gateway (asyncpg, no ORM)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from services.partner_gateway.domain import (
    Certificate,
    ConsentBasis,
    Entitlement,
    FeedTransport,
    Partner,
    PartnerKind,
    ShareConsent,
    WithdrawalReason,
)
from shared.kit.db import Connection

Pool = asyncpg.Pool


#: NOTIFY channel (per database in PostgreSQL) that wakes the verification cache sync on commit.
CACHE_CHANNEL = "partner_gateway_verify_cache"


# --- Partners and API keys ----------------------------------------------------------------------


async def seed_partner(
    conn: Connection, *, code: str, name: str, kind: PartnerKind, programs: Sequence[tuple[str, str]],
    new_key: bytes,
) -> bool:
    """Create or update a partner and its (program, municipality) pairs; True if it was created.

    An existing partner keeps its pseudonym key: changing it would break every resident reference.
    """
    created = await conn.fetchval(
        """
        INSERT INTO partners (code, name, kind, pseudonym_key) VALUES ($1, $2, $3, $4)
        ON CONFLICT (code) DO UPDATE SET name = excluded.name, kind = excluded.kind
        RETURNING (xmax = 0)
        """,
        code, name, kind, new_key,
    )
    await conn.execute(
        """
        DELETE FROM partner_programs p WHERE p.partner = $1
          AND (p.program_id, p.municipality_code) NOT IN (SELECT * FROM unnest($2::text[], $3::text[]))
        """,
        code, [p for p, _ in programs], [m for _, m in programs],
    )
    await conn.execute(
        """
        INSERT INTO partner_programs (partner, program_id, municipality_code)
        SELECT $1, p, m FROM unnest($2::text[], $3::text[]) AS t (p, m)
        ON CONFLICT DO NOTHING
        """,
        code, [p for p, _ in programs], [m for _, m in programs],
    )
    return bool(created)


async def load_partners(conn: Connection | Pool) -> list[Partner]:
    rows = await conn.fetch(
        """
        SELECT p.code, p.name, p.kind, p.pseudonym_key, p.member_number_format, p.feed_transport,
               coalesce(array_agg(pp.program_id ORDER BY pp.program_id)
                        FILTER (WHERE pp.program_id IS NOT NULL), '{}') AS program_ids,
               coalesce(array_agg(pp.municipality_code ORDER BY pp.program_id)
                        FILTER (WHERE pp.program_id IS NOT NULL), '{}') AS municipalities
        FROM partners p LEFT JOIN partner_programs pp ON pp.partner = p.code
        GROUP BY p.code ORDER BY p.code
        """
    )
    partners: list[Partner] = []
    for row in rows:
        programs: dict[str, list[str]] = {}
        for program_id, municipality_code in zip(row["program_ids"], row["municipalities"], strict=True):
            programs.setdefault(municipality_code, []).append(program_id)
        partners.append(
            Partner(
                code=row["code"], name=row["name"], kind=row["kind"],
                programs={m: tuple(sorted(p)) for m, p in programs.items()},
                pseudonym_key=bytes(row["pseudonym_key"]), member_number_format=row["member_number_format"],
                feed_transport=row["feed_transport"],
            )
        )
    return partners


async def register_partner(
    conn: Connection, *, code: str, name: str, kind: PartnerKind, member_number_format: str,
    feed_transport: FeedTransport, programs: Sequence[tuple[str, str]], new_key: bytes, registered_by: str,
) -> bool:
    """Insert a registered partner and its (program, municipality) pairs; False if the code is taken."""
    created = await conn.fetchval(
        """
        INSERT INTO partners (code, name, kind, pseudonym_key, source, member_number_format, feed_transport,
                              registered_by)
        VALUES ($1, $2, $3, $4, 'registered', $5, $6, $7)
        ON CONFLICT (code) DO NOTHING RETURNING true
        """,
        code, name, kind, new_key, member_number_format, feed_transport, registered_by,
    )
    if not created:
        return False
    await conn.execute(
        """
        INSERT INTO partner_programs (partner, program_id, municipality_code)
        SELECT $1, p, m FROM unnest($2::text[], $3::text[]) AS t (p, m) ON CONFLICT DO NOTHING
        """,
        code, [p for p, _ in programs], [m for _, m in programs],
    )
    return True


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: uuid.UUID
    partner: str
    prefix: str
    label: str | None
    created_by: str
    created_at: datetime
    revoked_at: datetime | None


_API_KEY_COLUMNS = "id, partner, prefix, label, created_by, created_at, revoked_at"


def _api_key(row: asyncpg.Record) -> ApiKey:
    return ApiKey(
        id=row["id"], partner=row["partner"], prefix=row["prefix"], label=row["label"],
        created_by=row["created_by"], created_at=row["created_at"], revoked_at=row["revoked_at"],
    )


async def insert_api_key(
    conn: Connection, *, partner: str, key_hash: str, prefix: str, label: str | None, created_by: str
) -> ApiKey:
    row = await conn.fetchrow(
        f"""
        INSERT INTO partner_api_keys (id, partner, key_hash, prefix, label, created_by)
        VALUES ($1, $2, $3, $4, $5, $6) RETURNING {_API_KEY_COLUMNS}
        """,
        uuid.uuid4(), partner, key_hash, prefix, label, created_by,
    )
    assert row is not None
    return _api_key(row)


async def api_key_of(conn: Connection, partner: str, key_id: uuid.UUID) -> ApiKey | None:
    row = await conn.fetchrow(
        f"SELECT {_API_KEY_COLUMNS} FROM partner_api_keys WHERE partner = $1 AND id = $2 FOR UPDATE",
        partner, key_id,
    )
    return None if row is None else _api_key(row)


async def revoke_api_key(conn: Connection, key_id: uuid.UUID, revoked_by: str) -> None:
    await conn.execute(
        "UPDATE partner_api_keys SET revoked_at = now(), revoked_by = $2 WHERE id = $1 AND revoked_at IS NULL",
        key_id, revoked_by,
    )


async def api_keys(conn: Connection | Pool) -> list[ApiKey]:
    rows = await conn.fetch(f"SELECT {_API_KEY_COLUMNS} FROM partner_api_keys ORDER BY partner, created_at")
    return [_api_key(row) for row in rows]


async def active_api_key(conn: Connection | Pool, key_hash: str) -> tuple[uuid.UUID, str] | None:
    row = await conn.fetchrow(
        "SELECT id, partner FROM partner_api_keys WHERE key_hash = $1 AND revoked_at IS NULL", key_hash
    )
    return None if row is None else (row["id"], row["partner"])


# --- Residents and consents ---------------------------------------------------------------------


async def erase_resident(conn: Connection, resident_id: str) -> None:
    """Forget what identifies the resident (their id, member numbers, consents, certificates, grant
    events); keep the pseudonymous entitlements (the verification cache's versions) and the delivery
    record (APPI Art. 30: legally retained, pseudonymous: resident_ref, items, dates)."""
    await conn.execute("DELETE FROM share_consents WHERE resident_id = $1", resident_id)
    await conn.execute("DELETE FROM certificates WHERE resident_id = $1", resident_id)
    await conn.execute("DELETE FROM held_grants WHERE resident_id = $1", resident_id)
    await conn.execute("DELETE FROM grant_states WHERE resident_id = $1", resident_id)
    await conn.execute(
        "UPDATE entitlements SET resident_id = NULL, member_number = NULL WHERE resident_id = $1", resident_id
    )


async def forget_feed_records(conn: Connection, partner: str, number: str, keep: Collection[uuid.UUID]) -> int:
    """Drop the HTTP feed log's records of a certificate (and its grants) but ``keep`` (the withdrawal
    and tombstones just written): a partner reading on or from the beginning still learns to forget
    every key, and the log holds nothing more of the person (their sealed member numbers included)."""
    result: str = await conn.execute(
        "DELETE FROM partner_feed_log WHERE partner = $1 AND subject = $2 AND NOT (event_id = ANY($3::uuid[]))",
        partner, number, list(keep),
    )
    return int(result.split()[-1])


async def share_consents_of(conn: Connection, resident_ids: Collection[str]) -> dict[str, dict[str, ShareConsent]]:
    """resident → partner → the consent on record."""
    rows = await conn.fetch(
        "SELECT resident_id, partner, granted, at FROM share_consents WHERE resident_id = ANY($1::text[])",
        list(resident_ids),
    )
    consents: dict[str, dict[str, ShareConsent]] = {}
    for row in rows:
        consents.setdefault(row["resident_id"], {})[row["partner"]] = ShareConsent(row["granted"], row["at"])
    return consents


async def lock_share_consents(
    conn: Connection, keys: Collection[tuple[str, str]]
) -> dict[tuple[str, str], ShareConsent]:
    """The consents on record for these (resident, partner) pairs, locked until the transaction ends."""
    rows = await conn.fetch(
        """
        SELECT resident_id, partner, granted, at FROM share_consents
        WHERE (resident_id, partner) IN (SELECT * FROM unnest($1::text[], $2::text[]))
        ORDER BY resident_id, partner FOR UPDATE
        """,
        [resident for resident, _ in keys], [partner for _, partner in keys],
    )
    return {(row["resident_id"], row["partner"]): ShareConsent(row["granted"], row["at"]) for row in rows}


async def save_share_consents(conn: Connection, consents: Mapping[tuple[str, str], ShareConsent]) -> None:
    """Upsert (resident, partner) → consent, one statement (each pair once, so no row is touched twice)."""
    if not consents:
        return
    await conn.execute(
        """
        INSERT INTO share_consents (resident_id, partner, granted, at)
        SELECT * FROM unnest($1::text[], $2::text[], $3::boolean[], $4::timestamptz[])
        ON CONFLICT (resident_id, partner) DO UPDATE SET granted = excluded.granted, at = excluded.at
        """,
        [resident for resident, _ in consents], [partner for _, partner in consents],
        [c.granted for c in consents.values()], [c.at for c in consents.values()],
    )


# --- Certificates -------------------------------------------------------------------------------

_CERTIFICATE_COLUMNS = (
    "certificate_number, resident_id, municipality_code, valid_from, valid_until, status, memberships, changed_at"
)


def _certificate(row: asyncpg.Record) -> Certificate:
    memberships = json.loads(row["memberships"])
    return Certificate(
        number=row["certificate_number"], resident_id=row["resident_id"],
        municipality_code=row["municipality_code"], valid_from=row["valid_from"],
        valid_until=row["valid_until"], status=row["status"],
        memberships={m["partner"]: m.get("member_number") for m in memberships},
        changed_at=row["changed_at"],
    )


async def certificate(conn: Connection, number: str) -> Certificate | None:
    row = await conn.fetchrow(f"SELECT {_CERTIFICATE_COLUMNS} FROM certificates WHERE certificate_number = $1", number)
    return None if row is None else _certificate(row)


async def certificate_event_times(conn: Connection, numbers: Collection[str]) -> dict[str, datetime]:
    """The ce_time of the last applied event of each known certificate, locked until the transaction ends."""
    rows = await conn.fetch(
        """
        SELECT certificate_number, event_time FROM certificates WHERE certificate_number = ANY($1::text[])
        ORDER BY certificate_number FOR UPDATE
        """,
        list(numbers),
    )
    return {row["certificate_number"]: row["event_time"] for row in rows}


async def certificates_of_residents(conn: Connection, resident_ids: Collection[str]) -> dict[str, list[Certificate]]:
    """resident → their certificates, by number."""
    rows = await conn.fetch(
        f"""
        SELECT {_CERTIFICATE_COLUMNS} FROM certificates WHERE resident_id = ANY($1::text[])
        ORDER BY certificate_number
        """,
        list(resident_ids),
    )
    certificates: dict[str, list[Certificate]] = {}
    for row in rows:
        certificates.setdefault(row["resident_id"], []).append(_certificate(row))
    return certificates


async def save_certificates(conn: Connection, certificates: Sequence[tuple[Certificate, datetime]]) -> None:
    """Upsert certificates with the ce_time of the event that set them (each number once)."""
    if not certificates:
        return
    columns = zip(
        *(
            (
                cert.number, cert.resident_id, cert.municipality_code, cert.valid_from, cert.valid_until, cert.status,
                json.dumps([{"partner": p, "member_number": n} for p, n in cert.memberships.items()]),
                cert.changed_at, event_time,
            )
            for cert, event_time in certificates
        ),
        strict=True,
    )
    await conn.execute(
        """
        INSERT INTO certificates (certificate_number, resident_id, municipality_code, valid_from, valid_until,
                                  status, memberships, changed_at, event_time)
        SELECT t.number, t.resident_id, t.municipality_code, t.valid_from, t.valid_until, t.status,
               t.memberships::jsonb, t.changed_at, t.event_time
        FROM unnest($1::text[], $2::text[], $3::text[], $4::date[], $5::date[], $6::text[], $7::text[],
                    $8::timestamptz[], $9::timestamptz[])
             AS t (number, resident_id, municipality_code, valid_from, valid_until, status, memberships,
                   changed_at, event_time)
        ON CONFLICT (certificate_number) DO UPDATE SET
            resident_id = excluded.resident_id, municipality_code = excluded.municipality_code,
            valid_from = excluded.valid_from, valid_until = excluded.valid_until, status = excluded.status,
            memberships = excluded.memberships, changed_at = excluded.changed_at, event_time = excluded.event_time
        """,
        *(list(column) for column in columns),
    )


# --- Entitlements -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EntitlementState:
    partner: str
    certificate_number: str
    resident_ref: str
    municipality_code: str
    #: Plaintext while the resident is active (sealed for the partner at each send); None once erased.
    member_number: str | None
    active: bool
    basis: ConsentBasis
    #: None once the resident was erased.
    resident_id: str | None = None


_ENTITLEMENT_STATE = (
    "partner, certificate_number, resident_ref, municipality_code, member_number, active, consent_source, "
    "consent_at, resident_id"
)


def _state(row: asyncpg.Record) -> EntitlementState:
    return EntitlementState(
        partner=row["partner"], certificate_number=row["certificate_number"], resident_ref=row["resident_ref"],
        municipality_code=row["municipality_code"], member_number=row["member_number"], active=row["active"],
        basis=ConsentBasis(row["consent_source"], row["consent_at"]), resident_id=row["resident_id"],
    )


async def resident_of_ref(conn: Connection | Pool, partner: str, resident_ref: str) -> str | None:
    """The resident behind a partner's reference, if the partner is being shown any of their
    certificates now (not withdrawn, not erased)."""
    resident_id: str | None = await conn.fetchval(
        """
        SELECT resident_id FROM entitlements
        WHERE partner = $1 AND resident_ref = $2 AND active AND resident_id IS NOT NULL LIMIT 1
        """,
        partner, resident_ref,
    )
    return resident_id


async def entitlements_of_certificates(
    conn: Connection, numbers: Collection[str]
) -> dict[str, dict[str, EntitlementState]]:
    """certificate number → partner → entitlement, locked until the transaction ends."""
    rows = await conn.fetch(
        f"""
        SELECT {_ENTITLEMENT_STATE} FROM entitlements WHERE certificate_number = ANY($1::text[])
        ORDER BY partner, certificate_number FOR UPDATE
        """,
        list(numbers),
    )
    states: dict[str, dict[str, EntitlementState]] = {}
    for row in rows:
        states.setdefault(row["certificate_number"], {})[row["partner"]] = _state(row)
    return states


async def entitlement_state(conn: Connection, partner: str, number: str) -> EntitlementState | None:
    row = await conn.fetchrow(
        f"SELECT {_ENTITLEMENT_STATE} FROM entitlements WHERE partner = $1 AND certificate_number = $2",
        partner, number,
    )
    return None if row is None else _state(row)


async def active_entitlements_of(conn: Connection, resident_id: str) -> list[EntitlementState]:
    rows = await conn.fetch(
        f"""
        SELECT {_ENTITLEMENT_STATE} FROM entitlements WHERE resident_id = $1 AND active
        ORDER BY partner, certificate_number FOR UPDATE
        """,
        resident_id,
    )
    return [_state(row) for row in rows]


async def save_entitlement(conn: Connection, view: Entitlement, resident_id: str, changed_at: datetime) -> None:
    await save_entitlements(conn, [(view, resident_id, changed_at)])


async def save_entitlements(conn: Connection, views: Sequence[tuple[Entitlement, str, datetime]]) -> None:
    """Make each (view, resident id, changed at) the active entitlement, with a new version each, and
    queue their cache writes: one statement (each (partner, certificate) once)."""
    if not views:
        return
    columns = zip(
        *(
            (
                view.partner, view.certificate_number, resident_id, view.resident_ref, view.municipality_code,
                json.dumps(list(view.programs)), view.member_number, view.status, view.valid_from, view.valid_until,
                view.basis.source, view.basis.at, changed_at,
            )
            for view, resident_id, changed_at in views
        ),
        strict=True,
    )
    await conn.execute(
        """
        WITH saved AS (
            INSERT INTO entitlements (partner, certificate_number, resident_id, resident_ref, municipality_code,
                                      programs, member_number, status, valid_from, valid_until, active,
                                      withdrawn_reason, consent_source, consent_at, changed_at, version)
            SELECT t.partner, t.number, t.resident_id, t.resident_ref, t.municipality_code,
                   ARRAY(SELECT jsonb_array_elements_text(t.programs::jsonb)), t.member_number, t.status,
                   t.valid_from, t.valid_until, true, NULL, t.consent_source, t.consent_at, t.changed_at,
                   nextval('entitlement_version')
            FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                        $8::text[], $9::date[], $10::date[], $11::text[], $12::timestamptz[], $13::timestamptz[])
                 WITH ORDINALITY AS t (partner, number, resident_id, resident_ref, municipality_code, programs,
                                       member_number, status, valid_from, valid_until, consent_source, consent_at,
                                       changed_at, position)
            ORDER BY t.position
            ON CONFLICT (partner, certificate_number) DO UPDATE SET
                resident_id = excluded.resident_id, resident_ref = excluded.resident_ref,
                municipality_code = excluded.municipality_code, programs = excluded.programs,
                member_number = excluded.member_number, status = excluded.status, valid_from = excluded.valid_from,
                valid_until = excluded.valid_until, active = true, withdrawn_reason = NULL,
                consent_source = excluded.consent_source, consent_at = excluded.consent_at,
                changed_at = excluded.changed_at, version = excluded.version
            RETURNING partner, certificate_number
        ), queued AS (
            INSERT INTO verify_cache_queue (partner, certificate_number) SELECT partner, certificate_number FROM saved
        )
        SELECT pg_notify($14, '')
        """,
        *(list(column) for column in columns), CACHE_CHANNEL,
    )


async def withdraw_entitlement(
    conn: Connection, partner: str, number: str, reason: WithdrawalReason, basis: ConsentBasis
) -> None:
    await conn.execute(
        """
        UPDATE entitlements SET active = false, withdrawn_reason = $3, member_number = NULL,
               consent_source = $4, consent_at = $5, changed_at = $5, version = nextval('entitlement_version')
        WHERE partner = $1 AND certificate_number = $2
        """,
        partner, number, reason, basis.source, basis.at,
    )
    await _enqueue_cache(conn, partner, number)


async def _enqueue_cache(conn: Connection, partner: str, number: str) -> None:
    await conn.execute(
        "INSERT INTO verify_cache_queue (partner, certificate_number) VALUES ($1, $2)", partner, number
    )
    await conn.execute("SELECT pg_notify($1, '')", CACHE_CHANNEL)


_VERIFICATION_COLUMNS = (
    "partner, certificate_number, municipality_code, programs, status, valid_from, valid_until, active, version"
)


async def verification_row(conn: Connection | Pool, partner: str, number: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT {_VERIFICATION_COLUMNS} FROM entitlements WHERE partner = $1 AND certificate_number = $2",
        partner, number,
    )
    return row


async def verification_rows_after(
    conn: Connection | Pool, after: tuple[str, str], limit: int
) -> list[asyncpg.Record]:
    """A page of every entitlement, in key order (the start-up rebuild of the cache)."""
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""
        SELECT {_VERIFICATION_COLUMNS} FROM entitlements WHERE (partner, certificate_number) > ($1, $2)
        ORDER BY partner, certificate_number LIMIT $3
        """,
        after[0], after[1], limit,
    )
    return rows


async def take_cache_queue(conn: Connection, limit: int) -> tuple[list[int], list[asyncpg.Record]]:
    """Queued entitlement changes (locked until the caller's transaction ends) and their current rows."""
    queued = await conn.fetch(
        "SELECT id, partner, certificate_number FROM verify_cache_queue ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        limit,
    )
    if not queued:
        return [], []
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""
        SELECT {_VERIFICATION_COLUMNS} FROM entitlements
        WHERE (partner, certificate_number) IN (SELECT * FROM unnest($1::text[], $2::text[]))
        """,
        [q["partner"] for q in queued], [q["certificate_number"] for q in queued],
    )
    return [q["id"] for q in queued], rows


async def delete_cache_queue(conn: Connection, ids: list[int]) -> None:
    await conn.execute("DELETE FROM verify_cache_queue WHERE id = ANY($1::bigint[])", ids)


async def clear_cache_queue(pool: Pool) -> None:
    await pool.execute("DELETE FROM verify_cache_queue")


# --- Grants held for their certificate ----------------------------------------------------------


async def hold_grant(
    conn: Connection, *, number: str, resident_id: str, event_id: uuid.UUID, event_type: str, data: bytes
) -> None:
    await conn.execute(
        """
        INSERT INTO held_grants (certificate_number, resident_id, event_id, event_type, data)
        VALUES ($1, $2, $3, $4, $5) ON CONFLICT (event_id) DO NOTHING
        """,
        number, resident_id, event_id, event_type, data,
    )


async def take_held_grants(
    conn: Connection, numbers: Collection[str]
) -> dict[str, list[tuple[uuid.UUID, str, bytes]]]:
    """certificate number → the grant events held for it, in arrival order; no longer held."""
    rows = await conn.fetch(
        """
        DELETE FROM held_grants WHERE certificate_number = ANY($1::text[])
        RETURNING id, certificate_number, event_id, event_type, data
        """,
        list(numbers),
    )
    held: dict[str, list[tuple[uuid.UUID, str, bytes]]] = {}
    for row in sorted(rows, key=lambda r: r["id"]):
        held.setdefault(row["certificate_number"], []).append((row["event_id"], row["event_type"], bytes(row["data"])))
    return held


async def remember_grant(
    conn: Connection, *, partner: str, grant_id: str, number: str, resident_id: str, event_id: uuid.UUID,
    event_type: str, data: bytes,
) -> None:
    """Keep the grant's latest event (events of one certificate arrive in order: one key)."""
    await conn.execute(
        """
        INSERT INTO grant_states (partner, grant_id, certificate_number, resident_id, event_id, event_type, data)
        VALUES ($1, $2, $3, $4, $5, $6, $7)
        ON CONFLICT (partner, grant_id) DO UPDATE SET
            event_id = EXCLUDED.event_id, event_type = EXCLUDED.event_type, data = EXCLUDED.data,
            last_seq = nextval(pg_get_serial_sequence('grant_states', 'last_seq'))
        """,
        partner, grant_id, number, resident_id, event_id, event_type, data,
    )


async def grant_states(conn: Connection, partner: str, number: str) -> list[tuple[uuid.UUID, str, bytes]]:
    rows = await conn.fetch(
        """
        SELECT event_id, event_type, data FROM grant_states
        WHERE partner = $1 AND certificate_number = $2 ORDER BY last_seq
        """,
        partner, number,
    )
    return [(row["event_id"], row["event_type"], bytes(row["data"])) for row in rows]


# --- Grant keys live on a partner's feed ---------------------------------------------------------


async def grant_key_sent(conn: Connection, partner: str, number: str, grant_id: str) -> None:
    """The partner's feed now holds a grant record under this grant's key (until its tombstone)."""
    await conn.execute(
        """
        INSERT INTO feed_grant_keys (partner, certificate_number, grant_id) VALUES ($1, $2, $3)
        ON CONFLICT DO NOTHING
        """,
        partner, number, grant_id,
    )


async def take_grant_keys(conn: Connection, partner: str, number: str) -> list[str]:
    """The grant ids of the certificate whose keys the partner's feed holds, in first-sent order;
    forgotten here (the caller sends their tombstones in the same transaction)."""
    rows = await conn.fetch(
        "DELETE FROM feed_grant_keys WHERE partner = $1 AND certificate_number = $2 RETURNING grant_id, seq",
        partner, number,
    )
    return [row["grant_id"] for row in sorted(rows, key=lambda r: r["seq"])]


# --- Delivery record (APPI Art. 29) -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivery:
    partner: str
    resident_ref: str
    certificate_number: str
    municipality_code: str
    record_type: str
    items: list[str]
    basis: ConsentBasis
    event_id: uuid.UUID
    cause_event_id: uuid.UUID | None
    #: The record as put on the partner's feed, for the HTTP feed's log (None: not logged).
    record: FeedRecord | None = None


@dataclass(frozen=True, slots=True)
class FeedRecord:
    """One record of a partner's feed as Kafka carries it: key, value (None: tombstone), ce_* headers."""

    key: str
    value: bytes | None
    event_type: str | None
    subject: str
    time: datetime


#: NOTIFY channel that wakes the HTTP feed's long polls: once per transaction that logged records
#: (PostgreSQL folds a transaction's identical notifications into one).
FEED_CHANNEL = "partner_gateway_feed"


async def insert_deliveries(conn: Connection, deliveries: Sequence[Delivery]) -> None:
    """Record deliveries in this order (ids follow it) and their records in the partners' feed log
    (the HTTP feed), in the same order, with one NOTIFY: one statement."""
    if not deliveries:
        return
    columns = zip(
        *(
            (
                d.partner, d.resident_ref, d.certificate_number, d.municipality_code, d.record_type,
                json.dumps(d.items), d.basis.purpose, d.basis.source, d.basis.at, d.event_id, d.cause_event_id,
                d.record is not None, d.record and d.record.key, d.record and d.record.value,
                d.record and d.record.event_type, d.record and d.record.subject, d.record and d.record.time,
            )
            for d in deliveries
        ),
        strict=True,
    )
    await conn.execute(
        """
        WITH t AS (
            SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                                 $8::text[], $9::timestamptz[], $10::uuid[], $11::uuid[], $12::boolean[], $13::text[],
                                 $14::bytea[], $15::text[], $16::text[], $17::timestamptz[])
                 WITH ORDINALITY AS t (partner, resident_ref, number, municipality_code, record_type, items, purpose,
                                       source, at, event_id, cause_event_id, logged, key, value, event_type, subject,
                                       event_time, position)
        ), delivered AS (
            INSERT INTO deliveries (partner, resident_ref, certificate_number, municipality_code, record_type, items,
                                    consent_purpose, consent_source, consent_at, event_id, cause_event_id)
            SELECT t.partner, t.resident_ref, t.number, t.municipality_code, t.record_type,
                   ARRAY(SELECT jsonb_array_elements_text(t.items::jsonb)), t.purpose, t.source, t.at, t.event_id,
                   t.cause_event_id
            FROM t ORDER BY t.position
        ), logged AS (
            INSERT INTO partner_feed_log (partner, key, value, event_type, event_id, subject, event_time)
            SELECT t.partner, t.key, t.value, t.event_type, t.event_id, t.subject, t.event_time
            FROM t WHERE t.logged ORDER BY t.position
        )
        SELECT pg_notify($18, '') WHERE EXISTS (SELECT 1 FROM t WHERE t.logged)
        """,
        *(list(column) for column in columns), FEED_CHANNEL,
    )


@dataclass(frozen=True, slots=True)
class DeliveryFilter:
    partner: str | None = None
    municipality_code: str | None = None
    since: datetime | None = None  # inclusive
    before: datetime | None = None  # exclusive

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        args: list[Any] = []
        for column, op, value in (
            ("partner", "=", self.partner), ("municipality_code", "=", self.municipality_code),
            ("delivered_at", ">=", self.since), ("delivered_at", "<", self.before),
        ):
            if value is not None:
                args.append(value)
                clauses.append(f"{column} {op} ${len(args)}")
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


_DELIVERY_COLUMNS = (
    "id, delivered_at, partner, resident_ref, certificate_number, municipality_code, record_type, items, "
    "consent_purpose, consent_source, consent_at, event_id, cause_event_id"
)


async def deliveries(
    conn: Connection | Pool, where: DeliveryFilter, limit: int, offset: int
) -> tuple[list[asyncpg.Record], int]:
    clause, args = where.where()
    total = int(await conn.fetchval(f"SELECT count(*) FROM deliveries{clause}", *args))
    rows: list[asyncpg.Record] = await conn.fetch(
        f"SELECT {_DELIVERY_COLUMNS} FROM deliveries{clause} "
        f"ORDER BY id LIMIT ${len(args) + 1} OFFSET ${len(args) + 2}",
        *args, limit, offset,
    )
    return rows, total


async def deliveries_after(
    conn: Connection | Pool, where: DeliveryFilter, after: int | None, limit: int
) -> list[asyncpg.Record]:
    """The next ``limit`` matching rows after id ``after``, in id order (keyset, for exports)."""
    clause, args = where.where()
    glue = " AND " if clause else " WHERE "
    rows: list[asyncpg.Record] = await conn.fetch(
        f"SELECT {_DELIVERY_COLUMNS} FROM deliveries{clause}{glue}id > ${len(args) + 1} "
        f"ORDER BY id LIMIT ${len(args) + 2}",
        *args, after or 0, limit,
    )
    return rows


async def resident_deliveries(
    conn: Connection | Pool, refs: Mapping[str, str], municipality_code: str | None, limit: int, offset: int
) -> tuple[list[asyncpg.Record], int]:
    """One resident's deliveries, oldest first: ``refs`` is partner → their reference at that partner
    (the record holds no resident id); ``municipality_code``: only that municipality's (staff)."""
    partners, resident_refs = list(refs), list(refs.values())
    where = (
        "WHERE (resident_ref, partner) IN (SELECT r, p FROM unnest($1::text[], $2::text[]) AS t (r, p))"
        " AND ($3::text IS NULL OR municipality_code = $3)"
    )
    total = int(await conn.fetchval(f"SELECT count(*) FROM deliveries {where}", resident_refs, partners,
                                    municipality_code))
    rows: list[asyncpg.Record] = await conn.fetch(
        f"SELECT {_DELIVERY_COLUMNS} FROM deliveries {where} ORDER BY id LIMIT $4 OFFSET $5",
        resident_refs, partners, municipality_code, limit, offset,
    )
    return rows, total


async def prune_deliveries(conn: Connection | Pool, older_than_days: int) -> int:
    """Delete the delivery records past their legal retention (idempotent: any replica may run it)."""
    result: str = await conn.execute(
        "DELETE FROM deliveries WHERE delivered_at < now() - make_interval(days => $1)", older_than_days
    )
    return int(result.split()[-1])


# --- The partner feed log (HTTP feed) ------------------------------------------------------------


#: One sequencer at a time (a transaction-level advisory lock): positions follow commit order.
_SEQUENCER_LOCK = "partner_gateway:feed-sequencer"


async def sequence_feed(conn: Connection, limit: int = 5000) -> int:
    """Give the committed, not yet sequenced log records their cursor positions, in id order (one
    transaction; the caller holds no other). Rows of a transaction still open are not visible:
    they get later positions once it commits, so a reader past a position never misses a row."""
    async with conn.transaction():
        if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM partner_feed_log WHERE position IS NULL)"):
            return 0
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", _SEQUENCER_LOCK)
        count = await conn.fetchval(
            """
            WITH head AS (
                SELECT coalesce((SELECT max(position) FROM partner_feed_log WHERE position IS NOT NULL), 0) AS top
            ), pending AS (
                SELECT id, row_number() OVER (ORDER BY id) AS n FROM partner_feed_log
                WHERE position IS NULL ORDER BY id LIMIT $1
            ), done AS (
                UPDATE partner_feed_log l SET position = head.top + pending.n, sequenced_at = now()
                FROM pending, head WHERE l.id = pending.id RETURNING 1
            )
            SELECT count(*) FROM done
            """,
            limit,
        )
        return int(count)


async def feed_page(conn: Connection | Pool, partner: str, after: int, limit: int) -> list[asyncpg.Record]:
    """The partner's sequenced records after a position, in position order."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """
        SELECT position, key, value, event_type, event_id, subject, event_time FROM partner_feed_log
        WHERE partner = $1 AND position > $2 AND position IS NOT NULL ORDER BY position LIMIT $3
        """,
        partner, after, limit,
    )
    return rows


async def feed_head(conn: Connection | Pool) -> int:
    return int(await conn.fetchval("SELECT coalesce(max(position), 0) FROM partner_feed_log"))


async def compact_feed_log(conn: Connection | Pool, older_than_s: float) -> int:
    """Drop records superseded by a later record of the same key, sequenced more than ``older_than_s``
    ago (a reader that keeps up sees every record; one that starts over sees the latest per key).
    A tombstone is the latest record of its key, so it stays."""
    result: str = await conn.execute(
        """
        DELETE FROM partner_feed_log old
        WHERE old.position IS NOT NULL AND old.sequenced_at < now() - make_interval(secs => $1)
          AND EXISTS (SELECT 1 FROM partner_feed_log new
                      WHERE new.partner = old.partner AND new.key = old.key AND new.position > old.position)
        """,
        older_than_s,
    )
    return int(result.split()[-1])
