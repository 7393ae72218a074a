"""Transactional outbox: the state change and its events commit together, or neither does.

``Outbox.add`` inserts the event in the caller's transaction. The relay publishes pending rows with
``acks=all`` and then records its progress. A crash between publishing and recording re-sends on
restart: delivery is at-least-once and consumers deduplicate by ``ce_id``. Only one relay per
database publishes at a time (an advisory lock), which keeps per-key order across replicas.

Progress is a snapshot of the database's transactions, not a mark on each row (kit migration 006):
every row whose transaction (its ``xid``) the *relayed* snapshot sees is on the broker. A round takes
a newer snapshot and publishes, in id order, the rows of the transactions it sees and the relayed one
does not (those that committed in between, in commit order from one round to the next), then makes
it the relayed one: one row written per round instead of an update of every published row. A round
with more rows than one read takes goes in pages of ``batch_size`` (``upto``, ``after_id``).

A record's W3C Trace Context (``traceparent``, ``tracestate``) is kept in columns of its
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
#: How long the progress of a round at a trickle of commits waits to be stored by the next commit's
#: round (saving the round trip that stores it alone). Only the record of progress waits, not any
#: record; a crash in between re-sends the round's rows, which consumers' inboxes drop.
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
#: The progress so far stored (when ``$5``: the round before moved it), and the next page read: the
#: rows of the transactions that snapshot ``upto`` (``$3``, or this statement's own snapshot for a new
#: round) sees and ``relayed`` (``$2``) does not, with an id above ``$4``, in id order. One statement,
#: one round trip. A row's transaction id is never below the lowest one a snapshot does not see
#: (``pg_snapshot_xmin``), nor at or above the first it has not seen begin (``pg_snapshot_xmax``): the
#: index on ``xid`` takes the read to the rows in between. ``upto`` comes back with the rows (and
#: alone, on a row of NULLs, when there are none).
_STORE_AND_READ = f"""
    WITH stored AS (
        UPDATE outbox_relay
        SET relayed = $2::text::pg_snapshot, upto = $3::text::pg_snapshot, after_id = $4 WHERE $5
    ), round AS (
        SELECT coalesce($3::text::pg_snapshot, pg_current_snapshot()) AS upto
    )
    SELECT round.upto::text AS upto, page.* FROM round LEFT JOIN LATERAL (
        SELECT {_COLUMNS} FROM outbox
        WHERE xid >= pg_snapshot_xmin($2::text::pg_snapshot) AND xid < pg_snapshot_xmax(round.upto)
          AND pg_visible_in_snapshot(xid, round.upto) AND NOT pg_visible_in_snapshot(xid, $2::text::pg_snapshot)
          AND id > coalesce($4::bigint, 0)
        ORDER BY id LIMIT $1
    ) page ON true
"""
_BACKLOG = """
    SELECT count(*) AS rows, extract(epoch FROM now() - min(created_at)) AS age FROM outbox
    WHERE xid >= pg_snapshot_xmin($1::text::pg_snapshot) AND NOT pg_visible_in_snapshot(xid, $1::text::pg_snapshot)
      AND NOT (pg_visible_in_snapshot(xid, coalesce($2::text::pg_snapshot, $1::text::pg_snapshot))
               AND id <= coalesce($3::bigint, 0))
"""
_STORE = "UPDATE outbox_relay SET relayed = $1::text::pg_snapshot, upto = $2::text::pg_snapshot, after_id = $3"


@dataclass(frozen=True, slots=True)
class RelayProgress:
    """Which rows are on the broker: those whose transaction ``relayed`` sees, and, in the round under
    way (``upto``: the snapshot it reads up to), those with an id up to ``after_id``. Snapshots as
    PostgreSQL writes them (``xmin:xmax:xip,...``)."""

    relayed: str
    upto: str | None = None
    after_id: int | None = None


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
        # Storing progress need not wait for the WAL flush: progress lost in a database crash only
        # re-sends the rows, which consumers' inboxes drop. The relay's next round waits less.
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
            row = await conn.fetchrow("SELECT relayed::text, upto::text, after_id FROM outbox_relay")
            assert row is not None  # kit migration 006 inserts it
            progress = RelayProgress(row["relayed"], row["upto"], row["after_id"])
            # Progress made and not yet stored: the next round's read stores it in the same statement
            # (one round trip a round instead of two), under load and at a trickle of commits alike;
            # it is stored alone only once no commit came for ``MARK_LINGER_S``.
            unstored = False
            while not self._stopping:
                if progress.upto is None:
                    # A new round: it sees every commit so far. The pages of a round see only those
                    # before it began, so a wake during them is kept for the round after.
                    self._wake.clear()
                if time.monotonic() - self._last_sample >= self.sample_interval_s:
                    await self._sample_backlog(conn, progress)
                progress, published, unstored = await self._relay_batch(conn, progress, unstored)
                if progress.upto is not None:
                    continue  # a round in pages: straight on
                if not self._wake.is_set():
                    if not published:
                        await self._sleep(self.poll_interval_s)
                        continue
                    if not await self._sleep(MARK_LINGER_S):
                        await self._store(conn, progress)
                        unstored = False
                        # A commit after this quiet spell goes out at once, without gathering.
                        await self._sleep(self.poll_interval_s)
                        continue
                # Commits keep coming: let the next few land too, so that one round (a read, a
                # produce) takes them together.
                await asyncio.sleep(GATHER_S)
            if unstored:  # stopping: store what went out, or the next leader sends it again
                await self._store(conn, progress)
        finally:
            self.is_leader = False
            self.backlog = self.oldest_age_s = None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), timeout=2)

    async def _relay_batch(
        self, conn: Connection, progress: RelayProgress, unstored: bool
    ) -> tuple[RelayProgress, int, bool]:
        """Store ``progress`` if ``unstored`` (the round before moved it) and publish the next page of
        pending rows: the progress after it, how many rows went out, and whether that is unstored."""
        found = await conn.fetch(
            _STORE_AND_READ, self.batch_size, progress.relayed, progress.upto, progress.after_id, unstored
        )
        upto: str = found[0]["upto"]
        rows = [row for row in found if row["id"] is not None]
        if len(rows) < self.batch_size:  # the round's last page: everything ``upto`` sees is out
            after = RelayProgress(upto)
        else:
            after = RelayProgress(progress.relayed, upto, rows[-1]["id"])
        if not rows:
            # Nothing new: only the snapshot moved, which need not be stored (the next read from the
            # stored one finds no more rows, only a longer stretch of the index to look at).
            return after, 0, unstored
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
        return after, len(rows), True

    async def _sample_backlog(self, conn: Connection, progress: RelayProgress) -> None:
        """Count the rows not yet relayed (before this round sends them: a gauge of what waits)."""
        row = await conn.fetchrow(_BACKLOG, progress.relayed, progress.upto, progress.after_id)
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

    async def _store(self, conn: Connection, progress: RelayProgress) -> None:
        await conn.execute(_STORE, progress.relayed, progress.upto, progress.after_id)

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
    value = await conn.fetchval("SELECT count(*) FROM outbox_pending")
    return int(value)
