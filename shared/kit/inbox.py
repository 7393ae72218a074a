"""Inbox: a consumer records each event id in the same transaction as its state change.

A redelivered event finds its row and changes nothing. Rows of events parked on the DLQ are
marked 'parked', so replaying them from the DLQ (after a fix) applies them once.
"""

from __future__ import annotations

import uuid

from shared.kit.db import Connection


async def claim(conn: Connection, consumer: str, event_id: uuid.UUID, topic: str) -> bool:
    """Record the event as handled; False if this consumer has handled it already."""
    row = await conn.fetchval(
        """
        INSERT INTO inbox (consumer, event_id, topic, status) VALUES ($1, $2, $3, 'done')
        ON CONFLICT (consumer, event_id) DO UPDATE SET status = 'done', received_at = now()
            WHERE inbox.status = 'parked'
        RETURNING 1
        """,
        consumer, event_id, topic,
    )
    return row is not None


async def mark_parked(conn: Connection, consumer: str, event_id: uuid.UUID) -> None:
    await conn.execute(
        "UPDATE inbox SET status = 'parked' WHERE consumer = $1 AND event_id = $2", consumer, event_id
    )


async def claim_many(conn: Connection, consumer: str, events: list[tuple[uuid.UUID, str]]) -> set[uuid.UUID]:
    """Record a batch of events in one statement; return the ids this consumer had not handled yet.

    ``events`` must not repeat an id (one statement cannot update the same row twice).
    """
    if not events:
        return set()
    rows = await conn.fetch(
        """
        INSERT INTO inbox (consumer, event_id, topic, status)
        SELECT $1, batch.event_id, batch.topic, 'done' FROM unnest($2::uuid[], $3::text[]) AS batch(event_id, topic)
        ON CONFLICT (consumer, event_id) DO UPDATE SET status = 'done', received_at = now()
            WHERE inbox.status = 'parked'
        RETURNING event_id
        """,
        consumer, [event_id for event_id, _ in events], [topic for _, topic in events],
    )
    return {row["event_id"] for row in rows}
