"""Transactional outbox: the state change and its events commit together, or neither does.

``Outbox.add`` inserts the event in the caller's transaction and NOTIFYs the relay, which wakes
at once (the notification is delivered on commit, never for a rolled-back transaction). The relay
publishes pending rows in id order with ``acks=all`` and marks them published. A crash between
publishing and marking re-sends on restart: delivery is at-least-once and consumers deduplicate
by ``ce_id``. Only one relay per database publishes at a time (an advisory lock), which keeps
per-key order across replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import asyncpg
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from shared.kit.db import Connection
from shared.kit.envelope import Envelope
from shared.kit.errors import is_transient

log = structlog.get_logger(__name__)

_RELAY_LOCK_ID = 0x4F55_5442  # "OUTB"


def notify_channel(database: str) -> str:
    return f"outbox_{database}"[:63]


@dataclass(frozen=True, slots=True)
class OutgoingRecord:
    """A record as it will go to Kafka (DLQ records carry foreign headers, so not always an Envelope)."""

    topic: str
    key: bytes | None
    headers: Sequence[tuple[str, bytes]]
    value: bytes | None  # None: a tombstone, which log compaction uses to forget the key
    event_id: str


class Outbox:
    """Writes events into the outbox table inside the caller's transaction."""

    def __init__(self, channel: str) -> None:
        self.channel = channel

    async def add(self, conn: Connection, topic: str, envelope: Envelope) -> None:
        await self.add_record(
            conn, OutgoingRecord(topic, envelope.key, envelope.headers(), envelope.data, str(envelope.id))
        )

    async def add_record(self, conn: Connection, record: OutgoingRecord) -> None:
        if not conn.is_in_transaction():
            raise RuntimeError("Outbox.add must run inside the business transaction")
        # One round trip: the row, and a wake-up for the relay that PostgreSQL delivers on commit.
        await conn.execute(
            """
            WITH written AS (
                INSERT INTO outbox (event_id, topic, key, header_names, header_values, payload)
                VALUES ($1, $2, $3, $4, $5, $6)
                ON CONFLICT (event_id) DO NOTHING
            )
            SELECT pg_notify($7, '')
            """,
            record.event_id, record.topic, record.key,
            [name for name, _ in record.headers], [value for _, value in record.headers], record.value,
            self.channel,
        )


    async def add_many(self, conn: Connection, records: Sequence[OutgoingRecord]) -> None:
        """Write several records in one pipelined statement and wake the relay once (same transaction)."""
        if not records:
            return
        if not conn.is_in_transaction():
            raise RuntimeError("Outbox.add_many must run inside the business transaction")
        await conn.executemany(
            """
            INSERT INTO outbox (event_id, topic, key, header_names, header_values, payload)
            VALUES ($1, $2, $3, $4, $5, $6)
            ON CONFLICT (event_id) DO NOTHING
            """,
            [
                (r.event_id, r.topic, r.key, [n for n, _ in r.headers], [v for _, v in r.headers], r.value)
                for r in records
            ],
        )
        await conn.execute("SELECT pg_notify($1, '')", self.channel)


class OutboxRelay:
    """Publishes pending outbox rows to Kafka; one leader per database."""

    def __init__(
        self,
        dsn: str,
        channel: str,
        producer: AIOKafkaProducer,
        *,
        batch_size: int = 500,
        poll_interval_s: float = 1.0,
        recover: Callable[[], Awaitable[None]] | None = None,
        prune_after_s: int = 3600,
    ) -> None:
        self.dsn = dsn
        self.channel = channel
        self.producer = producer
        self.batch_size = batch_size
        self.poll_interval_s = poll_interval_s
        self.recover = recover
        self.prune_after_s = prune_after_s
        self._last_prune = 0.0
        self._wake = asyncio.Event()
        self._stopping = False
        self.published = 0
        self.is_leader = False

    async def run(self) -> None:
        """Relay until stopped, reconnecting after database or broker faults."""
        backoff = 0.05
        while not self._stopping:
            try:
                await self._run_connected()
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if isinstance(error, KafkaError) and self.recover is not None:
                    # e.g. an in-memory broker restarted and forgot its topics
                    with contextlib.suppress(Exception):
                        await self.recover()
                if not is_transient(error):
                    log.exception("outbox relay failed")
                else:
                    log.warning("outbox relay interrupted, retrying", error=repr(error), backoff_s=backoff)
                self.is_leader = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def _run_connected(self) -> None:
        conn: Connection = await asyncpg.connect(self.dsn)
        try:
            await conn.add_listener(self.channel, self._on_notify)
            while not self._stopping:
                if await conn.fetchval("SELECT pg_try_advisory_lock($1)", _RELAY_LOCK_ID):
                    break
                await self._sleep(self.poll_interval_s)  # another replica relays; stand by
            self.is_leader = True
            while not self._stopping:
                self._wake.clear()
                sent = await self._relay_batch(conn)
                if time.monotonic() - self._last_prune > 600:
                    await prune_published(conn, self.prune_after_s)
                    self._last_prune = time.monotonic()
                if sent < self.batch_size:
                    await self._sleep(self.poll_interval_s)
        finally:
            self.is_leader = False
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), timeout=2)

    async def _relay_batch(self, conn: Connection) -> int:
        rows = await conn.fetch(
            """
            SELECT id, topic, key, header_names, header_values, payload FROM outbox
            WHERE published_at IS NULL ORDER BY id LIMIT $1
            """,
            self.batch_size,
        )
        if not rows:
            return 0
        futures = [
            await self.producer.send(
                row["topic"],
                value=row["payload"],
                key=row["key"],
                headers=list(zip(row["header_names"], row["header_values"], strict=True)),
            )
            for row in rows
        ]
        # Wait for every ack before marking any row: a partial failure re-sends the whole batch.
        await asyncio.gather(*futures)
        await self._mark_published(conn, [row["id"] for row in rows])
        self.published += len(rows)
        return len(rows)

    async def _mark_published(self, conn: Connection, ids: list[int]) -> None:
        await conn.execute("UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])", ids)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)

    def _on_notify(self, *_: object) -> None:
        self._wake.set()


async def prune_published(pool: Connection | asyncpg.Pool, older_than_s: int = 3600) -> int:
    """Delete published rows older than the given age (kept a while for inspection)."""
    result: str = await pool.execute(
        "DELETE FROM outbox WHERE published_at < now() - make_interval(secs => $1)", older_than_s
    )
    return int(result.split()[-1])


async def pending_count(conn: Connection | asyncpg.Pool) -> int:
    value = await conn.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
    return int(value)
