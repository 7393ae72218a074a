"""Inbox: a consumer records each event id in the same transaction as its state change.

A redelivered event finds its row and changes nothing. Rows of events parked on the DLQ are
marked 'parked' with the id of their dead letter; only a replay of that dead letter (``nichiiki dlq
replay``, which names it in a ``dlq_replay`` header) claims the row again and re-runs the event,
once. Any other redelivery of a parked record (a group reset to earliest, a rebalance's re-read) is
acknowledged as handled: no second run and no second dead letter.

Rows are deleted by age (``shared/kit/retention.py``), never before the broker could deliver the
event again.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import NamedTuple

from shared.kit.db import Connection

#: The header a dead letter carries its own id in (the consumer sets it when it parks a record).
DEAD_LETTER_ID_HEADER = "dlq_id"
#: The header a replayed record carries: the id of the dead letter it was replayed from.
REPLAY_HEADER = "dlq_replay"
#: What a replay of a dead letter without an id (parked before they had one) claims with: it re-runs
#: only rows parked without an id as well.
UNNAMED_DEAD_LETTER = uuid.UUID(int=0)


class Claim(NamedTuple):
    """One event a consumer is about to handle."""

    event_id: uuid.UUID
    topic: str
    #: The dead letter this record is a replay of (``replay_of(headers)``); None: not a replay.
    replay_of: uuid.UUID | None = None


def replay_of(headers: Sequence[tuple[str, bytes]]) -> uuid.UUID | None:
    """The dead letter a record was replayed from, if it is a replay (see ``REPLAY_HEADER``)."""
    for name, value in headers:
        if name == REPLAY_HEADER:
            try:
                return uuid.UUID(value.decode())
            except ValueError:
                return UNNAMED_DEAD_LETTER  # a replay all the same: of a dead letter without an id
    return None


async def claim(
    conn: Connection, consumer: str, event_id: uuid.UUID, topic: str, replay: uuid.UUID | None = None
) -> bool:
    """Record the event as handled; False if this consumer has handled (or parked) it already.

    A parked row is claimed again only by a replay of its dead letter (``replay``)."""
    return bool(await claim_many(conn, consumer, [Claim(event_id, topic, replay)]))


async def mark_parked(conn: Connection, consumer: str, event_id: uuid.UUID, dead_letter_id: uuid.UUID) -> None:
    await conn.execute(
        "UPDATE inbox SET status = 'parked', dead_letter_id = $3 WHERE consumer = $1 AND event_id = $2",
        consumer, event_id, dead_letter_id,
    )


async def claim_many(conn: Connection, consumer: str, events: Sequence[Claim]) -> set[uuid.UUID]:
    """Record a batch of events in one statement; return the ids this consumer is to handle now:
    those it had not seen, and parked ones that come as a replay of their dead letter.

    ``events`` must not repeat an id (one statement cannot update the same row twice).
    """
    if not events:
        return set()
    ids, topics = [claim.event_id for claim in events], [claim.topic for claim in events]
    if all(claim.replay_of is None for claim in events):
        # The common case: nothing is a replay, so nothing seen before is handled again.
        rows = await conn.fetch(_CLAIM, consumer, ids, topics)
    else:
        rows = await conn.fetch(_CLAIM_WITH_REPLAYS, consumer, ids, topics, [claim.replay_of for claim in events])
    return {row["event_id"] for row in rows}


_CLAIM = """
    INSERT INTO inbox (consumer, event_id, topic, status)
    SELECT $1, batch.event_id, batch.topic, 'done' FROM unnest($2::uuid[], $3::text[]) AS batch(event_id, topic)
    ON CONFLICT (consumer, event_id) DO NOTHING
    RETURNING event_id
"""
# A parked row is taken back only by the replay of the dead letter that parked it (or by any replay
# when the row predates dead-letter ids): a replay that parks again gets a new dead letter, so a
# re-read of the first replay does not run the event a third time.
_CLAIM_WITH_REPLAYS = """
    WITH batch AS (
        SELECT * FROM unnest($2::uuid[], $3::text[], $4::uuid[]) AS batch(event_id, topic, replay_of)
    )
    INSERT INTO inbox AS seen (consumer, event_id, topic, status)
    SELECT $1, batch.event_id, batch.topic, 'done' FROM batch
    ON CONFLICT (consumer, event_id) DO UPDATE SET status = 'done', received_at = now()
        WHERE seen.status = 'parked' AND EXISTS (
            SELECT 1 FROM batch
            WHERE batch.event_id = seen.event_id AND batch.replay_of IS NOT NULL
              AND (seen.dead_letter_id IS NULL OR seen.dead_letter_id = batch.replay_of)
        )
    RETURNING event_id
"""
