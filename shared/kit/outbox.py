"""Transactional outbox: the state change and its events commit together, or neither does.

``Outbox.add`` inserts the event in the caller's transaction. The relay publishes pending rows in
id order with ``acks=all`` and marks them published. A crash between publishing and marking
re-sends on restart: delivery is at-least-once and consumers deduplicate by ``ce_id``. Only one
relay per database publishes at a time (an advisory lock), which keeps per-key order across
replicas. A record's W3C Trace Context (``traceparent``, ``tracestate``) is kept in columns of its
own and sent as those headers again (``shared.kit.tracing``).

Waking the relay: when this process's relay is the leader, whoever commits an outbox write calls
``Outbox.committed()`` and the relay wakes in-process. Only when the leader lives in another
process (a second worker or replica) does the write add a ``pg_notify``, which PostgreSQL delivers
on commit. NOTIFY is not free: PostgreSQL lets one NOTIFY-sending transaction commit at a time
across the whole server, which measured 1,977 → 869 commits/s over 8 connections. The relay
also polls (``outbox_poll_interval_s``) as a backstop.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from shared.contracts.topics import DLQ_SUFFIX
from shared.kit.db import Connection
from shared.kit.envelope import Envelope
from shared.kit.errors import is_transient

log = structlog.get_logger(__name__)

_RELAY_LOCK_ID = 0x4F55_5442  # "OUTB"
#: How long rows published at a trickle of commits wait to be marked by the next commit's round
#: (saving the round trip that marks them alone). Only the mark waits, not any record; a crash in
#: between re-sends them, which consumers' inboxes drop.
MARK_LINGER_S = 0.05
#: While commits keep coming (one woke the relay during its last round or within ``MARK_LINGER_S``
#: of it), the relay waits this long before its next round, so that it reads and produces several
#: commits' rows together: at most this much latency per event for fewer rounds. A commit after a
#: quiet spell goes out at once; a backlog (full rounds) is relayed without a pause.
GATHER_S = 0.002


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
    #: Place the record on the partition of this key instead of its own (same partitioner), so
    #: records with different compaction keys keep one order; None: by ``key``.
    partition_key: bytes | None = None


class Outbox:
    """Writes events into the outbox table inside the caller's transaction."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        #: The relay of this process, if any: woken directly while it leads (see the module doc).
        self.local_relay: OutboxRelay | None = None

    async def add(self, conn: Connection, topic: str, envelope: Envelope) -> None:
        await self.add_record(
            conn, OutgoingRecord(topic, envelope.key, envelope.headers(), envelope.data, str(envelope.id))
        )

    async def add_record(self, conn: Connection, record: OutgoingRecord) -> None:
        await self.add_many(conn, [record])

    async def add_many(self, conn: Connection, records: Sequence[OutgoingRecord]) -> None:
        """Write records in the caller's transaction, in order (one pipelined statement)."""
        if not records:
            return
        if not conn.is_in_transaction():
            raise RuntimeError("Outbox writes must run inside the business transaction")
        notify = not self.relay_is_local()
        if len(records) == 1:
            row = _row(records[0])
            if notify:
                await conn.execute(_INSERT_AND_NOTIFY, *row, self.channel)  # one round trip
            else:
                await conn.execute(_INSERT, *row)
            return
        # Several (a group commit's batch, a consumer's chunk): one statement over arrays, which
        # costs the server and asyncpg less per row than an ``executemany`` running it once per row.
        columns = _columns(records)
        if notify:
            await conn.execute(_INSERT_MANY_AND_NOTIFY, *columns, self.channel)  # delivered on commit
        else:
            await conn.execute(_INSERT_MANY, *columns)

    def relay_is_local(self) -> bool:
        return self.local_relay is not None and self.local_relay.is_leader

    def committed(self) -> None:
        """Call after a transaction that may have written here committed: the local relay looks."""
        if self.local_relay is not None:
            self.local_relay.wake()


_INSERT = """
    INSERT INTO outbox (event_id, topic, key, header_names, header_values, payload, partition_key, traceparent,
                        tracestate)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
    ON CONFLICT (event_id) DO NOTHING
"""
_INSERT_AND_NOTIFY = f"WITH written AS ({_INSERT}) SELECT pg_notify($10, '')"
#: The records as columns (``_columns``). The header values of every record are one flat array, and
#: a record's own are the slice ``[first:last]`` of it (records carry different numbers of headers,
#: and PostgreSQL's arrays cannot be ragged); its header names are the slice ``[names_first:
#: names_last]`` of the names, where records with the same names share one slice (most of a batch's
#: records carry the same attributes: asyncpg spends about half a microsecond per array element, and
#: PostgreSQL walks a long array to slice it; measured 2 µs less client and at 200-500 records 5-13 µs
#: less server CPU per record).
#: Rows are inserted in the records' order (the outbox id, the relay's order, is taken in that
#: order); a record whose event is already there, or repeated among the records, is kept once, as
#: one insert per record would.
_INSERT_MANY = """
    INSERT INTO outbox (event_id, topic, key, header_names, header_values, payload, partition_key, traceparent,
                        tracestate)
    SELECT r.event_id, r.topic, r.key, ($4::text[])[r.names_first:r.names_last], ($5::bytea[])[r.first:r.last],
           r.payload, r.partition_key, r.traceparent, r.tracestate
    FROM unnest($1::uuid[], $2::text[], $3::bytea[], $6::bytea[], $7::bytea[], $8::text[], $9::text[],
                $10::int[], $11::int[], $12::int[], $13::int[]) WITH ORDINALITY
         AS r (event_id, topic, key, payload, partition_key, traceparent, tracestate, first, last, names_first,
               names_last, n)
    ORDER BY r.n
    ON CONFLICT (event_id) DO NOTHING
"""
_INSERT_MANY_AND_NOTIFY = f"WITH written AS ({_INSERT_MANY}) SELECT pg_notify($14, '')"
_TRACEPARENT, _TRACESTATE = "traceparent", "tracestate"


def _row(r: OutgoingRecord) -> tuple[object, ...]:
    """The row of a record: its Trace Context headers go to columns of their own."""
    names, values, traceparent, tracestate = _split(r.headers)
    return (r.event_id, r.topic, r.key, names, values, r.value, r.partition_key, traceparent, tracestate)


def _split(headers: Sequence[tuple[str, bytes]]) -> tuple[list[str], list[bytes], str | None, str | None]:
    """A record's headers as stored: names, values, and the Trace Context apart."""
    names: list[str] = []
    values: list[bytes] = []
    traceparent = tracestate = None
    for name, value in headers:
        if name == _TRACEPARENT:
            traceparent = value.decode("latin-1")
        elif name == _TRACESTATE:
            tracestate = value.decode("latin-1")
        else:
            names.append(name)
            values.append(value)
    return names, values, traceparent, tracestate


def _columns(records: Sequence[OutgoingRecord]) -> tuple[list[Any], ...]:
    """The parameters of ``_INSERT_MANY``: a column per field, every record's header values in one
    flat array with the record's slice of it (1-based, inclusive; ``first > last`` where it has
    none), and each distinct list of header names once, with each record's slice of those."""
    names: list[str] = []
    values: list[bytes] = []
    traceparents: list[str | None] = []
    tracestates: list[str | None] = []
    firsts: list[int] = []
    lasts: list[int] = []
    names_firsts: list[int] = []
    names_lasts: list[int] = []
    #: Each distinct list of names: its slice of ``names``.
    slices: dict[tuple[str, ...], tuple[int, int]] = {}
    for record in records:
        own_names, own_values, traceparent, tracestate = _split(record.headers)
        firsts.append(len(values) + 1)
        values += own_values
        lasts.append(len(values))
        key = tuple(own_names)
        names_slice = slices.get(key)
        if names_slice is None:
            names_slice = slices[key] = (len(names) + 1, len(names) + len(own_names))
            names += own_names
        names_firsts.append(names_slice[0])
        names_lasts.append(names_slice[1])
        traceparents.append(traceparent)
        tracestates.append(tracestate)
    return (
        [r.event_id for r in records], [r.topic for r in records], [r.key for r in records], names, values,
        [r.value for r in records], [r.partition_key for r in records], traceparents, tracestates, firsts, lasts,
        names_firsts, names_lasts,
    )


def _headers(row: asyncpg.Record) -> list[tuple[str, bytes]]:
    headers = list(zip(row["header_names"], row["header_values"], strict=True))
    if row["traceparent"] is not None:
        headers.append((_TRACEPARENT, row["traceparent"].encode("latin-1")))
        if row["tracestate"] is not None:
            headers.append((_TRACESTATE, row["tracestate"].encode("latin-1")))
    return headers


_COLUMNS = "id, topic, key, header_names, header_values, payload, partition_key, traceparent, tracestate"
_READ = f"SELECT {_COLUMNS} FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT $1"
#: The rows of the round before marked, and the next pending ones read, in one statement. The read
#: sees the table as it was before the statement (the mark is not visible to it): it skips those rows.
_MARK_AND_READ = f"""
    WITH marked AS (UPDATE outbox SET published_at = now() WHERE id = ANY($2::bigint[]))
    SELECT {_COLUMNS} FROM outbox WHERE published_at IS NULL AND id <> ALL($2::bigint[]) ORDER BY id LIMIT $1
"""


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
        edge_producer: AIOKafkaProducer | None = None,
        is_edge: Callable[[str], bool] | None = None,
        sample_interval_s: float = 5.0,
    ) -> None:
        self.dsn = dsn
        self.channel = channel
        self.producer = producer
        #: Records whose topic ``is_edge`` go to the partner-facing cluster, through this producer.
        self.edge_producer = edge_producer
        self.is_edge = is_edge or (lambda topic: False)
        self.batch_size = batch_size
        self.poll_interval_s = poll_interval_s
        self.recover = recover
        self._wake = asyncio.Event()
        self._stopping = False
        self.published = 0
        #: Dead letters published, per dead-letter topic (as named on the broker).
        self.dead_letters: dict[str, int] = {}
        self.is_leader = False
        #: Times this relay asked for the lead (once a poll interval while another leads).
        self.standby_rounds = 0
        #: Rows not yet relayed and the age of the oldest (seconds), sampled by the leader at most
        #: every ``sample_interval_s``; None while this relay does not lead.
        self.backlog: int | None = None
        self.oldest_age_s: float | None = None
        self.sample_interval_s = sample_interval_s
        self._last_sample = 0.0

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

    def wake(self) -> None:
        self._wake.set()

    async def _run_connected(self) -> None:
        # Marking rows published need not wait for the WAL flush: a mark lost in a database crash
        # only re-sends the rows, which consumers' inboxes drop. The relay's next round waits less.
        conn: Connection = await asyncpg.connect(self.dsn, server_settings={"synchronous_commit": "off"})
        try:
            await conn.add_listener(self.channel, self._on_notify)
            while not self._stopping:
                self.standby_rounds += 1
                if await conn.fetchval("SELECT pg_try_advisory_lock($1)", _RELAY_LOCK_ID):
                    break
                # Another replica relays; stand by. A wake (this process committed, a NOTIFY) found
                # on the way would otherwise end every wait at once: a tight loop of round trips.
                self._wake.clear()
                await self._sleep(self.poll_interval_s)
            self.is_leader = True
            # Rows published and not yet marked: the next round's read marks them in the same
            # statement (one round trip a round instead of two), under load and at a trickle of
            # commits alike; they are marked alone only once no commit came for ``MARK_LINGER_S``.
            unmarked: list[int] = []
            while not self._stopping:
                self._wake.clear()
                if time.monotonic() - self._last_sample >= self.sample_interval_s:
                    await self._sample_backlog(conn, unmarked)
                unmarked = await self._relay_batch(conn, unmarked)
                if len(unmarked) >= self.batch_size:
                    continue  # a backlog: straight on
                if not self._wake.is_set():
                    if not unmarked:
                        await self._sleep(self.poll_interval_s)
                        continue
                    if not await self._sleep(MARK_LINGER_S):
                        await self._mark_published(conn, unmarked)
                        unmarked = []
                        # A commit after this quiet spell goes out at once, without gathering.
                        await self._sleep(self.poll_interval_s)
                        continue
                # Commits keep coming: let the next few land too, so that one round (a read, a
                # produce) takes them together.
                await asyncio.sleep(GATHER_S)
            if unmarked:  # stopping: mark what went out, or the next leader sends it again
                await self._mark_published(conn, unmarked)
        finally:
            self.is_leader = False
            self.backlog = self.oldest_age_s = None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), timeout=2)

    async def _relay_batch(self, conn: Connection, unmarked: list[int]) -> list[int]:
        """Mark ``unmarked`` (published by the round before) and publish the next pending rows; the
        ids of the rows published, for the caller to mark."""
        if unmarked:
            rows = await conn.fetch(_MARK_AND_READ, self.batch_size, unmarked)
        else:
            rows = await conn.fetch(_READ, self.batch_size)
        if not rows:
            return []
        placement = _Placement()
        futures = [
            await producer.send(
                row["topic"],
                value=row["payload"],
                key=row["key"],
                partition=await placement.partition(
                    producer, row["topic"], row["key"] if row["partition_key"] is None else row["partition_key"]
                ),
                headers=_headers(row),
            )
            for row in rows
            for producer in (self._producer_for(row["topic"]),)
        ]
        # Wait for every ack before marking any row: a partial failure re-sends the whole batch.
        await asyncio.gather(*futures)
        self.published += len(rows)
        for row in rows:
            if row["topic"].endswith(DLQ_SUFFIX):
                self.dead_letters[row["topic"]] = self.dead_letters.get(row["topic"], 0) + 1
        return [row["id"] for row in rows]

    async def _sample_backlog(self, conn: Connection, unmarked: Sequence[int] = ()) -> None:
        """Count the rows not yet relayed (before this round sends them: a gauge of what waits);
        ``unmarked`` went out already."""
        row = await conn.fetchrow(
            "SELECT count(*) AS rows, extract(epoch FROM now() - min(created_at)) AS age FROM outbox"
            " WHERE published_at IS NULL AND id <> ALL($1::bigint[])",
            list(unmarked),
        )
        assert row is not None
        self.backlog = int(row["rows"])
        self.oldest_age_s = max(float(row["age"]), 0.0) if row["age"] is not None else 0.0
        self._last_sample = time.monotonic()

    def _producer_for(self, topic: str) -> AIOKafkaProducer:
        if not self.is_edge(topic):
            return self.producer
        if self.edge_producer is None:
            raise RuntimeError(f"{topic} lives on the partner-facing cluster, and this relay has no producer there")
        return self.edge_producer

    async def _mark_published(self, conn: Connection, ids: list[int]) -> None:
        await conn.execute("UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])", ids)

    async def _sleep(self, seconds: float) -> bool:
        """Wait until woken or ``seconds`` passed; whether it was woken."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
        return self._wake.is_set()

    def _on_notify(self, *_: object) -> None:
        self._wake.set()


class _Placement:
    """Where a relay round's records go: the partition the Kafka default partitioner picks (murmur2
    of the record's partition key, or else of its key; the Java clients' choice too), computed here
    rather than by the producer, whose pure-Python murmur2 costs about 15 µs a record: ``murmur2``
    reads whole words, and a key is hashed once a round (a use case's events share their key). A
    record without a key is left to the producer, which picks a partition at random."""

    def __init__(self) -> None:
        self._partitions: dict[str, list[int]] = {}
        self._chosen: dict[tuple[str, bytes], int] = {}

    async def partition(self, producer: AIOKafkaProducer, topic: str, key: bytes | None) -> int | None:
        if key is None:
            return None
        chosen = self._chosen.get((topic, key))
        if chosen is None:
            partitions = self._partitions.get(topic)
            if partitions is None:
                partitions = self._partitions[topic] = sorted(await producer.partitions_for(topic))
            chosen = self._chosen[(topic, key)] = partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]
        return chosen


_WORDS = [struct.Struct(f"<{n}I") for n in range(64)]


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (``Utils.murmur2`` of the Java client), as ``aiokafka.partitioner.murmur2``
    computes it, several times faster: whole little-endian words at once, masks only where needed."""
    length = len(data)
    m = 0x5BD1E995
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    count = length >> 2
    words = _WORDS[count] if count < len(_WORDS) else struct.Struct(f"<{count}I")
    for k in words.unpack_from(data):
        k = (k * m) & 0xFFFFFFFF
        k = ((k ^ (k >> 24)) * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail = length & 3
    if tail:
        end = length & ~3
        if tail == 3:
            h ^= data[end + 2] << 16
        if tail >= 2:
            h ^= data[end + 1] << 8
        h = ((h ^ data[end]) * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    return h ^ (h >> 15)


async def pending_count(conn: Connection | asyncpg.Pool) -> int:
    value = await conn.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
    return int(value)
