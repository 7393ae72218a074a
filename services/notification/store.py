"""All SQL of the notification service (asyncpg, no ORM)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from services.notification.domain import ConsentUpdate, ContactUpdate
from shared.contracts.common import Language
from shared.kit.db import Connection

# -- the contact projection -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resident:
    resident_id: str
    name: str | None
    email: str | None
    language: Language
    email_consent: bool
    bounced_email: str | None
    withdrawn_at: datetime | None

    @property
    def can_receive_email(self) -> bool:
        return self.withdrawn_at is None and self.email_consent and bool(self.email)

    @property
    def address_bounced(self) -> bool:
        return self.email is not None and self.bounced_email is not None and (
            self.email.strip().lower() == self.bounced_email.strip().lower()
        )


_RESIDENT_COLUMNS = "resident_id, name, email, preferred_language, email_consent, bounced_email, withdrawn_at"


def _resident(row: asyncpg.Record) -> Resident:
    return Resident(
        resident_id=row["resident_id"], name=row["name"], email=row["email"], language=row["preferred_language"],
        email_consent=row["email_consent"], bounced_email=row["bounced_email"], withdrawn_at=row["withdrawn_at"],
    )


async def get_resident(conn: Connection, resident_id: str) -> Resident | None:
    row = await conn.fetchrow(f"SELECT {_RESIDENT_COLUMNS} FROM residents WHERE resident_id = $1", resident_id)
    return _resident(row) if row is not None else None


async def residents_by_id(conn: Connection, resident_ids: list[str]) -> dict[str, Resident]:
    rows = await conn.fetch(
        f"SELECT {_RESIDENT_COLUMNS} FROM residents WHERE resident_id = ANY($1::text[])", resident_ids
    )
    return {row["resident_id"]: _resident(row) for row in rows}


async def save_and_read_residents(
    conn: Connection, contacts: Mapping[str, ContactUpdate], consents: Mapping[str, ConsentUpdate],
    resident_ids: Sequence[str],
) -> dict[str, Resident]:
    """Record how to reach each resident in ``contacts`` and each e-mail consent unless a later one
    is already recorded (a stale copy changes nothing), never for an erased resident (an erasure is
    final: their tombstone stays a tombstone, whatever is replayed after it); and read the residents
    ``resident_ids`` as they are after both. One statement: one round trip for a chunk of registrations.

    One upsert carries both updates (a statement may touch a row once): a NULL name means "no new
    contact", a NULL consent time "no new consent" (neither is ever NULL in an update). The rows it
    did not change are read from the statement's snapshot, which they are as of now."""
    ids = sorted(set(contacts) | set(consents))  # in resident order: transactions lock shared rows in one order
    given = [(r, contacts.get(r), consents.get(r)) for r in ids]
    rows = await conn.fetch(
        f"""
        WITH saved AS (
            INSERT INTO residents (resident_id, name, email, preferred_language, email_consent, email_consent_at)
            SELECT resident_id, name, email, coalesce(language, 'ja'), coalesce(granted, false), at
            FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::boolean[], $6::timestamptz[])
                 AS g (resident_id, name, email, language, granted, at)
            ON CONFLICT (resident_id) DO UPDATE SET
                name = CASE WHEN EXCLUDED.name IS NOT NULL THEN EXCLUDED.name ELSE residents.name END,
                email = CASE WHEN EXCLUDED.name IS NOT NULL THEN EXCLUDED.email ELSE residents.email END,
                preferred_language = CASE WHEN EXCLUDED.name IS NOT NULL THEN EXCLUDED.preferred_language
                                          ELSE residents.preferred_language END,
                -- a new address gets a fresh chance; the refused one stays refused
                bounced_email = CASE WHEN EXCLUDED.name IS NULL OR lower(residents.email) = lower(EXCLUDED.email)
                                     THEN residents.bounced_email END,
                bounce_reason = CASE WHEN EXCLUDED.name IS NULL OR lower(residents.email) = lower(EXCLUDED.email)
                                     THEN residents.bounce_reason END,
                -- a stale consent (a later one is recorded) changes nothing
                email_consent = CASE WHEN EXCLUDED.email_consent_at IS NOT NULL AND (
                                          residents.email_consent_at IS NULL
                                          OR residents.email_consent_at <= EXCLUDED.email_consent_at)
                                     THEN EXCLUDED.email_consent ELSE residents.email_consent END,
                email_consent_at = CASE WHEN EXCLUDED.email_consent_at IS NOT NULL AND (
                                             residents.email_consent_at IS NULL
                                             OR residents.email_consent_at <= EXCLUDED.email_consent_at)
                                        THEN EXCLUDED.email_consent_at ELSE residents.email_consent_at END,
                updated_at = now()
            WHERE residents.withdrawn_at IS NULL AND (
                EXCLUDED.name IS NOT NULL
                OR (EXCLUDED.email_consent_at IS NOT NULL AND (
                    residents.email_consent_at IS NULL OR residents.email_consent_at <= EXCLUDED.email_consent_at)))
            RETURNING {_RESIDENT_COLUMNS}
        )
        SELECT {_RESIDENT_COLUMNS} FROM saved WHERE resident_id = ANY($7::text[])
        UNION ALL
        SELECT {_RESIDENT_COLUMNS} FROM residents
        WHERE resident_id = ANY($7::text[]) AND resident_id NOT IN (SELECT resident_id FROM saved)
        """,
        ids,
        [c.name if c is not None else None for _, c, _ in given],
        [c.email if c is not None else None for _, c, _ in given],
        [c.language if c is not None else None for _, c, _ in given],
        [k.granted if k is not None else None for _, _, k in given],
        [k.at if k is not None else None for _, _, k in given],
        list(resident_ids),
    )
    return {row["resident_id"]: _resident(row) for row in rows}


@dataclass(frozen=True, slots=True)
class Erasure:
    messages: int
    emails: int


async def erase_resident(conn: Connection, resident_id: str, withdrawn_at: datetime) -> Erasure:
    """Delete the inbox (rendered messages, with the name in them) and every e-mail, sent or not
    (subject, body, the address it went to, the server's last answer), and keep only a tombstone
    of the resident: no name, no address, no consent, no bounce."""
    messages = await conn.execute("DELETE FROM messages WHERE resident_id = $1", resident_id)
    emails = await conn.execute("DELETE FROM email_outbox WHERE resident_id = $1", resident_id)
    await conn.execute(
        """
        INSERT INTO residents (resident_id, withdrawn_at) VALUES ($1, $2)
        ON CONFLICT (resident_id) DO UPDATE SET
            name = NULL, email = NULL, preferred_language = 'ja', email_consent = false,
            email_consent_at = EXCLUDED.withdrawn_at, bounced_email = NULL, bounce_reason = NULL,
            withdrawn_at = EXCLUDED.withdrawn_at, updated_at = now()
        """,
        resident_id, withdrawn_at,
    )
    return Erasure(_count(messages), _count(emails))


async def record_bounce(conn: Connection, resident_id: str, address: str, reason: str) -> None:
    await conn.execute(
        """
        UPDATE residents SET bounced_email = $2, bounce_reason = $3, updated_at = now()
        WHERE resident_id = $1 AND lower(email) = lower($2)
        """,
        resident_id, address, reason,
    )


# -- the inbox ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewMessage:
    id: uuid.UUID
    resident_id: str
    kind: str
    language: Language
    subject: str
    body: str
    source_event_id: uuid.UUID
    source_event_type: str


async def insert_messages_and_emails(
    conn: Connection, messages: Sequence[NewMessage], email_ids: Sequence[uuid.UUID | None],
    wake_channel: str | None,
) -> dict[uuid.UUID, datetime]:
    """Add the messages, in order, then the e-mail of each message added whose ``email_ids`` entry is not
    None (under that row id), then wake the senders on ``wake_channel`` if any was queued: one
    statement. The creation time of each message added (not of one whose event already produced
    its message, nor its e-mail).

    The wake-up may be sent by several statements of a transaction: PostgreSQL delivers a channel's
    identical notifications of one transaction once, at commit."""
    rows = await conn.fetch(
        """
        WITH given AS (
            SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                                 $7::uuid[], $8::text[], $9::uuid[])
                 WITH ORDINALITY AS m (id, resident_id, kind, language, subject, body, source_event_id,
                                       source_event_type, email_id, position)
        ), added AS (
            INSERT INTO messages (id, resident_id, kind, language, subject, body, source_event_id, source_event_type)
            SELECT id, resident_id, kind, language, subject, body, source_event_id, source_event_type
            FROM given
            ORDER BY position  -- created_at is the statement clock: rows are stamped in this order
            ON CONFLICT (source_event_id, resident_id) DO NOTHING
            RETURNING id, created_at
        ), queued AS (
            INSERT INTO email_outbox
                (id, resident_id, kind, language, subject, body, source_event_id, source_event_type)
            SELECT g.email_id, g.resident_id, g.kind, g.language, g.subject, g.body, g.source_event_id,
                   g.source_event_type
            FROM given g JOIN added USING (id)
            WHERE g.email_id IS NOT NULL
            ORDER BY g.position
            ON CONFLICT (source_event_id, channel, resident_id) DO NOTHING
            RETURNING 1
        ), woken AS (
            SELECT pg_notify($10::text, '') FROM (SELECT FROM queued LIMIT 1) AS any_queued
            WHERE $10::text IS NOT NULL
        )
        SELECT id, created_at, (SELECT count(*) FROM woken) AS woken  -- woken: named, so that it runs
        FROM added
        """,
        *_message_columns(messages), list(email_ids), wake_channel,
    )
    return {row["id"]: row["created_at"] for row in rows}


def _message_columns(messages: Sequence[NewMessage]) -> list[list[Any]]:
    return [
        [m.id for m in messages], [m.resident_id for m in messages], [m.kind for m in messages],
        [m.language for m in messages], [m.subject for m in messages], [m.body for m in messages],
        [m.source_event_id for m in messages], [m.source_event_type for m in messages],
    ]


_MESSAGE_COLUMNS = "id, resident_id, kind, language, subject, body, source_event_type, created_at, read_at"


async def list_messages(
    conn: Connection | asyncpg.Pool, resident_id: str, *, unread: bool | None, limit: int, offset: int
) -> tuple[list[dict[str, Any]], int]:
    where = "resident_id = $1"
    if unread is True:
        where += " AND read_at IS NULL"
    elif unread is False:
        where += " AND read_at IS NOT NULL"
    rows = await conn.fetch(
        f"""
        SELECT {_MESSAGE_COLUMNS}, count(*) OVER () AS total FROM messages WHERE {where}
        ORDER BY created_at DESC, id DESC LIMIT $2 OFFSET $3
        """,
        resident_id, limit, offset,
    )
    if rows:
        total = int(rows[0]["total"])
    else:
        total = int(await conn.fetchval(f"SELECT count(*) FROM messages WHERE {where}", resident_id))
    return [{k: v for k, v in row.items() if k != "total"} for row in rows], total


async def unread_count(conn: Connection | asyncpg.Pool, resident_id: str) -> int:
    value = await conn.fetchval(
        "SELECT count(*) FROM messages WHERE resident_id = $1 AND read_at IS NULL", resident_id
    )
    return int(value)


async def lock_message(conn: Connection, resident_id: str, message_id: uuid.UUID) -> bool:
    """Whether the resident has this message; it is locked until the transaction ends (an erasure
    running now waits, or has erased it already)."""
    found = await conn.fetchval(
        "SELECT true FROM messages WHERE id = $1 AND resident_id = $2 FOR UPDATE", message_id, resident_id
    )
    return found is not None


async def mark_read(conn: Connection | asyncpg.Pool, resident_id: str, message_id: uuid.UUID) -> dict[str, Any] | None:
    """Mark the message read (the first read time stays); None if the resident has no such message."""
    row = await conn.fetchrow(
        f"""
        UPDATE messages SET read_at = coalesce(read_at, now())
        WHERE id = $1 AND resident_id = $2
        RETURNING {_MESSAGE_COLUMNS}
        """,
        message_id, resident_id,
    )
    return dict(row.items()) if row is not None else None


# -- e-mails -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClaimedEmail:
    id: uuid.UUID
    resident_id: str
    kind: str
    language: Language
    subject: str
    body: str
    source_event_id: uuid.UUID
    source_event_type: str
    attempts: int
    #: The resident as of the claim (None if erased meanwhile).
    resident: Resident | None


async def claim_due_emails(conn: Connection, limit: int, lease: timedelta) -> list[ClaimedEmail]:
    """Take due rows for this sender: 'sending', one more attempt, and a lease until which no one else may.

    Rows locked by another sender's claim are skipped, so two replicas never take the same row; a
    row whose lease ran out (its sender died mid-send) is due again.
    """
    async with conn.transaction():
        rows = await conn.fetch(
            """
            WITH due AS (
                SELECT id FROM email_outbox
                WHERE status IN ('pending', 'sending') AND next_attempt_at <= now()
                ORDER BY next_attempt_at, created_at
                LIMIT $1
                FOR UPDATE SKIP LOCKED
            )
            UPDATE email_outbox e SET
                status = 'sending', attempts = e.attempts + 1, last_attempt_at = now(),
                next_attempt_at = now() + $2::interval
            FROM due WHERE e.id = due.id
            RETURNING e.id, e.resident_id, e.kind, e.language, e.subject, e.body, e.source_event_id,
                      e.source_event_type, e.attempts
            """,
            limit, lease,
        )
        residents = await residents_by_id(conn, list({row["resident_id"] for row in rows}))
    return [
        ClaimedEmail(
            id=row["id"], resident_id=row["resident_id"], kind=row["kind"], language=row["language"],
            subject=row["subject"], body=row["body"], source_event_id=row["source_event_id"],
            source_event_type=row["source_event_type"], attempts=row["attempts"],
            resident=residents.get(row["resident_id"]),
        )
        for row in sorted(rows, key=lambda r: (r["resident_id"], r["id"]))
    ]


async def mark_sending_recipient(conn: Connection | asyncpg.Pool, email: ClaimedEmail, recipient: str) -> bool:
    """Record the address this attempt goes to, just before connecting (still ours?)."""
    result = await conn.execute(
        "UPDATE email_outbox SET recipient = $3 WHERE id = $1 AND status = 'sending' AND attempts = $2",
        email.id, email.attempts, recipient,
    )
    return _count(result) == 1


async def finish_email(
    conn: Connection | asyncpg.Pool, email: ClaimedEmail, status: str, error: str | None = None
) -> datetime | None:
    """Close this attempt as sent, failed or cancelled; None if the claim is no longer ours."""
    finished: datetime | None = await conn.fetchval(
        """
        UPDATE email_outbox SET status = $3, finished_at = now(), last_error = coalesce($4, last_error)
        WHERE id = $1 AND status = 'sending' AND attempts = $2
        RETURNING finished_at
        """,
        email.id, email.attempts, status, error,
    )
    return finished


async def retry_email_later(
    conn: Connection | asyncpg.Pool, email: ClaimedEmail, delay: timedelta, error: str
) -> bool:
    result = await conn.execute(
        """
        UPDATE email_outbox SET status = 'pending', next_attempt_at = now() + $3::interval, last_error = $4
        WHERE id = $1 AND status = 'sending' AND attempts = $2
        """,
        email.id, email.attempts, delay, error,
    )
    return _count(result) == 1


async def release_claims(conn: Connection | asyncpg.Pool, emails: list[ClaimedEmail]) -> None:
    """Give back rows this sender claimed but never tried (shutting down): due again at once."""
    for email in emails:
        await conn.execute(
            """
            UPDATE email_outbox SET status = 'pending', attempts = attempts - 1, next_attempt_at = now()
            WHERE id = $1 AND status = 'sending' AND attempts = $2
            """,
            email.id, email.attempts,
        )


async def seconds_until_next_due(conn: Connection | asyncpg.Pool) -> float | None:
    value = await conn.fetchval(
        """
        SELECT extract(epoch FROM min(next_attempt_at) - now()) FROM email_outbox
        WHERE status IN ('pending', 'sending')
        """
    )
    return float(value) if value is not None else None


async def list_emails(
    conn: Connection | asyncpg.Pool, resident_id: str, *, limit: int, offset: int
) -> tuple[list[dict[str, Any]], int]:
    rows = await conn.fetch(
        """
        SELECT id, kind, language, status, attempts, last_error, source_event_type, created_at,
               last_attempt_at, next_attempt_at, finished_at, count(*) OVER () AS total
        FROM email_outbox WHERE resident_id = $1
        ORDER BY created_at DESC, id DESC LIMIT $2 OFFSET $3
        """,
        resident_id, limit, offset,
    )
    if rows:
        total = int(rows[0]["total"])
    else:
        total = int(await conn.fetchval("SELECT count(*) FROM email_outbox WHERE resident_id = $1", resident_id))
    return [{k: v for k, v in row.items() if k != "total"} for row in rows], total


def _count(command_tag: str) -> int:
    return int(command_tag.split()[-1])
