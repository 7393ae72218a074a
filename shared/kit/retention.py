"""Retention: every runtime deletes the kit's old rows in the background.

Three tables grow with traffic and are only needed for a while:

- the inbox (``inbox.py``): a handled event's row must outlive every way the event can reach the
  consumer again — its topic's retention (a group reset to earliest), then a replay of a dead letter
  of it (``nichiiki dlq replay`` sends it to every consumer of its topic), each plus a segment,
  since Kafka deletes whole segments. ``check_settings`` refuses a shorter inbox retention at
  start-up. A parked row is what a replay of its dead letter needs: it is kept at least until the
  dead letter may have left the DLQ (with the start-up rule, the inbox retention is always longer);
- idempotency keys (``idempotency.py``): kept for the window a client may retry a write with its key;
- published outbox rows: nothing reads them after the broker's ack; kept a while for inspection.

Each DELETE takes at most ``retention_batch_size`` rows and commits on its own, so a round never
holds many row locks for long; rows are found through the age indexes of migration 004. One replica
of a service prunes at a time (a session advisory lock per service, on a connection of the round's
own); a replica that does not get it skips the round.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
import structlog

from shared.kit.auth import ConfigurationError
from shared.kit.db import Connection
from shared.kit.settings import Settings

log = structlog.get_logger(__name__)

#: The tables pruned, as the ``table`` label of ``nichiiki_rows_pruned_total`` names them.
TABLES = ("inbox", "idempotency_keys", "outbox")
#: The advisory lock's class ("RETN"); its second key is the service's name, hashed.
_LOCK_CLASS = 0x5245_544E


def redelivery_window(settings: Settings) -> timedelta:
    """The longest an event can come to a consumer again after it first did: on its topic, then
    replayed from the dead-letter topic; each keeps a record up to a segment past its retention."""
    ms = settings.kafka_retention_ms + settings.kafka_dlq_retention_ms + 2 * settings.kafka_segment_ms
    return timedelta(milliseconds=ms)


def check_settings(settings: Settings) -> None:
    """Refuse an inbox retention shorter than the redelivery window (a redelivery would apply twice)."""
    window = redelivery_window(settings)
    if timedelta(days=settings.inbox_retention_days) < window:
        raise ConfigurationError(
            f"NICHIIKI_INBOX_RETENTION_DAYS={settings.inbox_retention_days:g} is shorter than the "
            f"{window / timedelta(days=1):g} days an event can be delivered again "
            "(NICHIIKI_KAFKA_RETENTION_MS + NICHIIKI_KAFKA_DLQ_RETENTION_MS + 2 × NICHIIKI_KAFKA_SEGMENT_MS): "
            "a consumer would forget an event the broker still holds and apply its redelivery twice. "
            "Raise it, or lower the topics' retention first"
        )


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How old a row of each kind must be to go."""

    inbox: timedelta
    #: Parked inbox rows: never before their dead letter may have left the DLQ.
    parked: timedelta
    idempotency_keys: timedelta
    outbox_published: timedelta
    batch_size: int = 5000

    @classmethod
    def of(cls, settings: Settings) -> RetentionPolicy:
        inbox = timedelta(days=settings.inbox_retention_days)
        dead_letters = timedelta(milliseconds=settings.kafka_dlq_retention_ms + settings.kafka_segment_ms)
        return cls(
            inbox=inbox,
            parked=max(inbox, dead_letters),
            idempotency_keys=timedelta(hours=settings.idempotency_retention_hours),
            outbox_published=timedelta(hours=settings.outbox_published_retention_hours),
            batch_size=settings.retention_batch_size,
        )


# Each statement deletes up to $2 rows older than $1. The age is checked again on the rows
# themselves: a row changed since the inner SELECT saw it (a parked event claimed by its replay
# gets a new ``received_at``) is re-checked on its new version and kept.
_PRUNE = {
    "inbox": """
        DELETE FROM inbox WHERE (consumer, event_id) IN (
            SELECT consumer, event_id FROM inbox WHERE received_at < now() - $1::interval AND status = $3 LIMIT $2
        ) AND received_at < now() - $1::interval AND status = $3
    """,
    "idempotency_keys": """
        DELETE FROM idempotency_keys WHERE (scope, key) IN (
            SELECT scope, key FROM idempotency_keys WHERE created_at < now() - $1::interval LIMIT $2
        ) AND created_at < now() - $1::interval
    """,
    "outbox": """
        DELETE FROM outbox WHERE id IN (
            SELECT id FROM outbox WHERE published_at < now() - $1::interval LIMIT $2
        ) AND published_at < now() - $1::interval
    """,
}


async def prune(conn: Connection, service: str, policy: RetentionPolicy) -> dict[str, int] | None:
    """One round on ``conn`` (outside a transaction): rows deleted per table, or None when another
    replica of ``service`` is pruning."""
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1, hashtext($2))", _LOCK_CLASS, service):
        return None
    try:
        size = policy.batch_size
        return {
            "inbox": await _prune_table(conn, "inbox", policy.inbox, size, "done")
            + await _prune_table(conn, "inbox", policy.parked, size, "parked"),
            "idempotency_keys": await _prune_table(conn, "idempotency_keys", policy.idempotency_keys, size),
            "outbox": await _prune_table(conn, "outbox", policy.outbox_published, size),
        }
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1, hashtext($2))", _LOCK_CLASS, service)


async def _prune_table(
    conn: Connection, table: str, older_than: timedelta, batch_size: int, *status: str
) -> int:
    deleted = 0
    while True:
        result: str = await conn.execute(_PRUNE[table], older_than, batch_size, *status)  # commits on its own
        count = int(result.split()[-1])
        deleted += count
        if count < batch_size:
            return deleted


class RetentionJob:
    """Prunes a service's database every ``interval_s`` (the first round at once); counts what went."""

    def __init__(self, dsn: str, service: str, policy: RetentionPolicy, *, interval_s: float) -> None:
        self.dsn = dsn
        self.service = service
        self.policy = policy
        self.interval_s = interval_s
        #: Rows this process deleted, per table (``nichiiki_rows_pruned_total``).
        self.pruned = dict.fromkeys(TABLES, 0)
        #: Rounds this process ran, and rounds it skipped because another replica was pruning.
        self.rounds = 0
        self.skipped = 0

    async def run(self) -> None:
        """Prune until cancelled; a failed round (database away) is tried again next interval."""
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("retention round failed; tried again next interval", error=repr(error))
            await asyncio.sleep(self.interval_s)

    async def run_once(self) -> dict[str, int] | None:
        """One round; what it deleted per table, or None if another replica holds the lock."""
        # A connection of its own: the session lock ends with it, whatever happens to the round.
        conn: Connection = await asyncpg.connect(self.dsn)
        try:
            deleted = await prune(conn, self.service, self.policy)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), timeout=2)
        if deleted is None:
            self.skipped += 1
            return None
        self.rounds += 1
        for table, count in deleted.items():
            self.pruned[table] += count
        if any(deleted.values()):
            log.info("old rows pruned", **deleted)
        return deleted
