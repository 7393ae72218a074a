"""Consuming events: envelope → inbox → handler → outbox, one transaction per batch.

The FastStream subscriber fetches a batch (manual acks, a named group, from the earliest offset)
and hands it straight to the consumer; the offsets are committed only after the batch's transaction
commits — not after every batch, but once batches pause for ``consumer_commit_interval_ms``, at
least every ``COMMIT_MAX_DELAY_S`` while they keep coming, and on a graceful stop: the inbox makes
the re-read of an applied but uncommitted tail harmless. Records are handled in fetch order, so per-key
(per-partition) order holds. Faults are sorted three ways:

- transient (database or broker away): the whole batch is retried with backoff, forever;
- a record that cannot be read (headers, JSON, contract): parked on ``<topic>.dlq`` at once;
- a handler that fails: retried a few times, then parked on ``<topic>.dlq`` with the reason.

Parking is itself transactional: the dead letter goes through the outbox and the inbox row is
marked 'parked', so a parked event is neither lost nor applied, and a replay applies it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
import uuid
from collections.abc import Awaitable, Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

import asyncpg
import structlog
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from faststream import AckPolicy
from faststream.kafka import KafkaBroker

from shared.contracts.base import EventData
from shared.contracts.topics import DLQ_SUFFIX, Topic
from shared.kit import inbox, tracing
from shared.kit.clock import SYSTEM_CLOCK, Clock
from shared.kit.db import Connection
from shared.kit.envelope import SPEC_VERSION, Envelope, EnvelopeError, new_envelope, parse_envelope, source_of
from shared.kit.errors import DomainError, is_transient
from shared.kit.group_join import JoinWatch
from shared.kit.logging import bound_context
from shared.kit.offsets import fetch_state, partition_lag
from shared.kit.outbox import Outbox, OutgoingRecord
from shared.kit.settings import Settings

if TYPE_CHECKING:
    from shared.kit.keyring import Keyring

log = structlog.get_logger(__name__)

D = TypeVar("D", bound=EventData)
E = TypeVar("E")
T = TypeVar("T")
Handler = Callable[["HandlerContext", Any], Awaitable[None]]
#: A set-based handler: consecutive events of its types in one batch, each with its own context.
BatchHandler = Callable[["Run[Any]"], Awaitable[None]]

COMMIT_TIMEOUT_S = 10.0
#: While batches keep coming (each within the commit interval of the last), their offsets are
#: committed this often rather than every interval: a commit is a broker round trip and CPU on
#: both sides (measured 6-11 % of a consumer's CPU per batch at 200 registrations/s), and the
#: inbox makes re-reading an applied tail harmless. When batches pause, the interval applies.
COMMIT_MAX_DELAY_S = 1.0
#: How long one poll for a batch listens for records before it asks again (it returns as soon as
#: any come): idle, a consumer wakes this often, not every few milliseconds.
POLL_TIMEOUT_MS = 200
#: Under load (records came within ``LINGER_WHEN_WITHIN_S`` of the last batch), a poll that fetched
#: less than a full batch waits up to this long for the next records and takes them along: a batch
#: costs a transaction and several round trips whatever its size (about 1.3 ms of CPU per batch in
#: notification), and at a steady few hundred events/s each fetch brings a handful. Measured over
#: the embedded broker at 400-800 events/s (issue #22): 30-50 % larger batches, per event 17-19 %
#: less PostgreSQL CPU, 9-13 % less broker CPU (fewer fetches) and 3-10 % less in the consumer's
#: process, for 2-6 ms more hop latency at the median (at most this long). Little effect at the
#: maximum, where batches are large already. Records after a pause and full batches go at once.
LINGER_S = 0.01
LINGER_WHEN_WITHIN_S = 0.01
#: A consumer that found no records for this long is idle: it then rests between fetches (its
#: partitions paused for ``consumer_idle_rest_ms``) instead of keeping a fetch waiting on the broker.
#: The embedded broker spends CPU all the while a fetch waits, in proportion to its partitions
#: (measured: ten idle consumers of a 4-partition topic 0.23 cores at a 60 ms wait, 0.12 at 500 ms,
#: of 1 partition 0.06, of 12 partitions 0.40), so an idle platform of a dozen groups over
#: 2-40 partitions each kept a third of a core of the 2-core machine busy doing nothing.
IDLE_AFTER_S = 1.0
#: The pace of a consumer no one waits on by the millisecond (``ConsumerSpec.pace_s``): a resident's
#: inbox, a KPI, a listing's match are as good a tenth of a second later.
BACKGROUND_PACE_S = 0.1
DLQ_HEADERS = (
    "dlq_reason", "dlq_service", "dlq_topic", "dlq_partition", "dlq_offset", "dlq_time",
    inbox.DEAD_LETTER_ID_HEADER, inbox.REPLAY_HEADER,
)


@dataclass(slots=True)
class HandlerContext:
    """What a handler gets: the open transaction, the incoming envelope and a way to emit events."""

    conn: Connection
    envelope: Envelope
    outbox: Outbox
    service: str
    settings: Settings
    #: Outgoing records of the whole batch, written to the outbox in one go before it commits
    #: (None: write each at once, as the savepoint-per-event path must).
    pending: list[OutgoingRecord] | None = None
    #: The service's clock (the runtime's), for dates the handler decides by.
    clock: Clock = SYSTEM_CLOCK
    #: The topic the event was read from (as named on the broker, prefix included): a partner's
    #: topic says which partner wrote it.
    topic: str = ""
    #: The key store: opens personal data sealed in events (None when the consumer has none).
    keyring: Keyring | None = None
    #: The Trace Context of the event's span: what it emits continues the trace (``shared.kit.tracing``).
    trace: tracing.TraceHeaders | None = None

    async def emit(
        self, topic: Topic, data: EventData, *, subject: str, key: str | None = None,
        partition_key: str | None = None,
    ) -> Envelope:
        """Record an outgoing event caused by the one being handled (same transaction).

        ``partition_key``: put it on that key's partition (see ``OutgoingRecord``)."""
        envelope = new_envelope(
            self.service, data, subject=subject, key=key,
            correlation_id=self._correlation_id(), causation_id=str(self.envelope.id),
            traceparent=self.trace.traceparent if self.trace else None,
            tracestate=self.trace.tracestate if self.trace else None,
        )
        await self.add_record(OutgoingRecord(
            self.settings.topic(topic.name), envelope.key, envelope.headers(), envelope.data, str(envelope.id),
            partition_key=None if partition_key is None else partition_key.encode(),
        ))
        return envelope

    async def tombstone(
        self, topic: Topic, *, subject: str, key: str, partition_key: str | None = None
    ) -> uuid.UUID:
        """Record a null value under ``key``, which log compaction uses to forget it; its event id.

        A tombstone has no type or data, only the CloudEvents attributes that trace it."""
        event_id = uuid.uuid4()
        headers = [
            ("ce_specversion", SPEC_VERSION.encode()),
            ("ce_id", str(event_id).encode()),
            ("ce_source", source_of(self.service).encode()),
            ("ce_subject", subject.encode()),
            ("ce_time", datetime.now(UTC).isoformat().encode()),
            ("ce_correlationid", self._correlation_id().encode()),
            ("ce_causationid", str(self.envelope.id).encode()),
        ]
        if self.trace is not None:
            headers += self.trace.headers()
        await self.add_record(OutgoingRecord(
            self.settings.topic(topic.name), key.encode(), headers, None, str(event_id),
            partition_key=None if partition_key is None else partition_key.encode(),
        ))
        return event_id

    def _correlation_id(self) -> str:
        return self.envelope.correlation_id or str(self.envelope.id)

    async def add_record(self, record: OutgoingRecord) -> None:
        """Record a prepared outgoing record (e.g. a tombstone), in order with the emitted events."""
        if self.pending is not None:
            self.pending.append(record)
        else:
            await self.outbox.add_record(self.conn, record)


class Run(Sequence[tuple[HandlerContext, E]], Generic[E]):
    """A run of consecutive events of one set-based handler's types in a batch, in order, each with
    the context it was received in; what ``router.on_many`` handlers get.

    A run is a sequence of ``(context, event)`` pairs on one open transaction (``conn``). ``split``
    cuts it where a key repeats, for statements that may touch a row only once; ``emit`` records an
    outgoing event caused by one of its events."""

    __slots__ = ("_items",)

    def __init__(self, items: Sequence[tuple[HandlerContext, E]]) -> None:
        if not items:
            raise ValueError("a run has at least one event")
        self._items = items

    @property
    def conn(self) -> Connection:
        return self._items[0][0].conn

    @property
    def settings(self) -> Settings:
        return self._items[0][0].settings

    @property
    def clock(self) -> Clock:
        return self._items[0][0].clock

    @property
    def keyring(self) -> Keyring:
        """The key store (a service whose events carry sealed personal data always has one)."""
        keyring = self._items[0][0].keyring
        if keyring is None:
            raise RuntimeError("this consumer was built without a keyring")
        return keyring

    @property
    def events(self) -> list[E]:
        return [event for _, event in self._items]

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, index: int) -> tuple[HandlerContext, E]: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[tuple[HandlerContext, E]]: ...

    def __getitem__(self, index: int | slice) -> tuple[HandlerContext, E] | Sequence[tuple[HandlerContext, E]]:
        return self._items[index]

    def __iter__(self) -> Iterator[tuple[HandlerContext, E]]:
        return iter(self._items)

    def split(self, key: Callable[[E], Hashable]) -> Iterator[Run[E]]:
        """Consecutive pieces in which no event's key repeats (see ``distinct_runs``)."""
        for piece in distinct_runs(self._items, key=lambda item: key(item[1])):
            yield Run(piece)

    def pieces(self, cut: Callable[[Sequence[tuple[HandlerContext, E]]], Iterator[Sequence[tuple[HandlerContext, E]]]]
               ) -> Iterator[Run[E]]:
        """The pieces a handler's own rule cuts the run into, each a run."""
        for piece in cut(self._items):
            yield Run(piece)

    async def emit(
        self, cause: E, topic: Topic, data: EventData, *, subject: str, key: str | None = None,
        partition_key: str | None = None,
    ) -> Envelope:
        """Record an outgoing event caused by ``cause``, one of this run's events."""
        for context, event in self._items:
            if event is cause:
                return await context.emit(topic, data, subject=subject, key=key, partition_key=partition_key)
        raise ValueError("the cause is not an event of this run")


@dataclass(frozen=True, slots=True)
class Route:
    model: type[EventData]
    #: Either one event at a time (``handler``) or consecutive runs of events (``many``).
    handler: Handler | None = None
    many: BatchHandler | None = None


class EventRouter:
    """Which handler applies which event type; other types on the same topics are skipped."""

    def __init__(self) -> None:
        self._routes: dict[str, Route] = {}

    def on(self, *models: type[EventData]) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            for model in models:
                self._add(Route(model, handler=handler))
            return handler

        return register

    def on_many(self, *models: type[EventData]) -> Callable[[BatchHandler], BatchHandler]:
        """Register a set-based handler: it gets every run of consecutive events of these types in a
        batch at once (in order, each with its own context), so it can apply them in a few
        statements instead of a few per event. Alone in a savepoint, an event comes as a run of one.

        The handler must leave the state that applying the events one by one in that order would;
        ``distinct_runs`` splits a run where a key repeats, for statements that touch a row once."""

        def register(handler: BatchHandler) -> BatchHandler:
            for model in models:
                self._add(Route(model, many=handler))
            return handler

        return register

    @classmethod
    def combined(cls, *routers: EventRouter) -> EventRouter:
        """One router with every route of these: one consumer group (one join, one inbox) for what
        would otherwise be several (a type routed twice is an error)."""
        merged = cls()
        for router in routers:
            for route in router._routes.values():
                merged._add(route)
        return merged

    def _add(self, route: Route) -> None:
        if route.model.event_type in self._routes:
            raise ValueError(f"{route.model.event_type} already has a handler")
        self._routes[route.model.event_type] = route

    def route(self, event_type: str) -> Route | None:
        return self._routes.get(event_type)

    @property
    def event_types(self) -> list[str]:
        return sorted(self._routes)


def distinct_runs(items: Sequence[T], key: Callable[[T], Hashable]) -> Iterator[Sequence[T]]:
    """Consecutive chunks of ``items`` in which no key repeats.

    Applying the chunks in order, each with set-based statements (one ``INSERT ... ON CONFLICT``
    may touch a row only once), is applying the items in order, when an item only touches rows of
    its own key."""
    start, seen = 0, set[Hashable]()
    for index, item in enumerate(items):
        k = key(item)
        if k in seen:
            yield items[start:index]
            start, seen = index, set[Hashable]()
        seen.add(k)
    if start < len(items):
        yield items[start:]


@dataclass
class ConsumerStats:
    batches: int = 0
    handled: int = 0
    duplicates: int = 0
    skipped: int = 0
    parked: int = 0
    retries: int = 0
    #: Offset commits sent: fewer than batches when batches come faster than the commit interval.
    commits: int = 0
    last_batch_at: float = field(default=0.0)


class EventConsumer:
    """One consumer group of one service over a set of topics."""

    def __init__(
        self,
        *,
        service: str,
        settings: Settings,
        pool: asyncpg.Pool,
        outbox: Outbox,
        router: EventRouter,
        topics: Sequence[Topic],
        name: str | None = None,
        clock: Clock = SYSTEM_CLOCK,
        cluster: str = "internal",
        topics_of: Callable[[], Sequence[Topic]] | None = None,
        keyring: Keyring | None = None,
        pace_s: float = 0.0,
        idle_rest_max_s: float = float("inf"),
    ) -> None:
        """``topics_of``: when given, asked for the topics at every (re)subscription instead of
        ``topics``, for a set of topics that grows at run time (set ``needs_resubscribe`` when it did).
        ``pace_s``, ``idle_rest_max_s``: see ``ConsumerSpec``."""
        self.service = service
        self.pace_s = pace_s
        self.idle_rest_max_s = idle_rest_max_s
        self.clock = clock
        #: The cluster its topics are on (``internal``, or ``edge`` for partner topics).
        self.cluster = cluster
        self.name = name or service
        self.settings = settings
        self.keyring = keyring
        self.pool = pool
        self.outbox = outbox
        self.router = router
        fixed = tuple(topics)
        self._topics_of = topics_of or (lambda: fixed)
        #: The topic names of the current subscription (``attach`` asks ``topics_of`` again).
        self.topics = [settings.topic(topic.name) for topic in self._topics_of()]
        self.group_id = settings.topic(f"nichiiki.{self.name}")
        self.stats = ConsumerStats()
        #: Set when offsets cannot be committed (the broker lost the group or the topic): the
        #: runtime then re-subscribes from scratch; the inbox makes re-reading harmless.
        self.needs_resubscribe = False
        self._stopping = False
        #: Applied but not yet committed: partition → the next offset to read; and the client
        #: that read them (a re-subscription brings a new one, and the old offsets are dropped).
        self._uncommitted: dict[TopicPartition, int] = {}
        self._client: Any = None
        self._commit_task: asyncio.Task[None] | None = None
        #: When the last batch was applied (the commit waits for a pause after it).
        self._last_applied_at = 0.0
        #: For the lag metric: the client that hands out batches, and partition → the next offset
        #: to apply (a batch in hand counts as not applied until it commits).
        self._reader: Any = None
        self._applied: dict[TopicPartition, int] = {}

    #: How long this member has been trying to join its group (a new one per subscription).
    join_watch: JoinWatch | None = None

    @property
    def idle_rest_s(self) -> float:
        """How long it rests between listens when idle: the setting (0: never), at most its own cap."""
        return min(self.settings.consumer_idle_rest_ms / 1000, self.idle_rest_max_s)

    def attach(self, broker: KafkaBroker) -> None:
        s = self.settings
        self._uncommitted, self._client = {}, None  # a new subscription re-reads from its group's offsets
        self.topics = [s.topic(topic.name) for topic in self._topics_of()]
        self.join_watch = JoinWatch()
        subscriber = broker.subscriber(
            *self.topics,
            group_id=self.group_id,
            batch=True,
            max_records=s.consumer_batch_size,
            batch_timeout_ms=POLL_TIMEOUT_MS,
            auto_offset_reset="earliest",
            ack_policy=AckPolicy.MANUAL,
            fetch_max_wait_ms=s.kafka_fetch_max_wait_ms,
            session_timeout_ms=s.kafka_session_timeout_ms,
            heartbeat_interval_ms=s.kafka_heartbeat_interval_ms,
            max_poll_interval_ms=s.kafka_max_poll_interval_ms,
            listener=self.join_watch,
            title=f"{self.name}:{','.join(self.topics)}",
        )
        # FastStream's own poll sleeps as long again, deaf, after a poll that found nothing: a short
        # timeout then means a hundred idle wake-ups a second per group, a long one late records.
        # This one only listens (instance attribute: FastStream's consume loop calls it).
        # Resting, it listens two fetch waits: the first fetch's answer comes in time even when a
        # record on another partition of the fetch keeps it waiting the whole wait.
        poll = _BatchPoll(
            s.consumer_batch_size, rest_s=self.idle_rest_s, listen_ms=2 * s.kafka_fetch_max_wait_ms,
            pace_s=self.pace_s,
        )
        setattr(subscriber, "get_msg", poll)  # noqa: B010
        # And each batch goes straight to ``_on_batch`` (see ``_Dispatch``). Registering the handler
        # all the same is what makes FastStream run the consume loop at all.
        setattr(subscriber, "consume_one", _Dispatch(subscriber, self._on_batch))  # noqa: B010
        subscriber(self._on_batch)

    def waiting_to_join_s(self) -> float:
        """Seconds this member has been (re)joining its group without getting in (0: joined)."""
        if self.join_watch is None or self._stopping:
            return 0.0
        return self.join_watch.waiting_s()

    def stop(self) -> None:
        self._stopping = True

    async def flush_commits(self) -> None:
        """Commit the offsets of every applied batch now (a graceful stop calls it)."""
        if self._commit_task is not None and not self._commit_task.done():
            self._commit_task.cancel()
        await self._commit()

    async def _on_batch(self, msg: FetchedBatch) -> None:
        """A fetched batch: its records, the client that fetched them and a way to rewind them."""
        records: tuple[ConsumerRecord[bytes, bytes], ...] = msg.raw_message
        if msg.consumer is not self._reader:
            self._applied, self._reader = {}, msg.consumer
        spans = _partition_spans(records)
        for tp, (first, _) in spans.items():
            self._applied.setdefault(tp, first)
        try:
            await self.handle_batch(records)
        except BaseException:
            await msg.nack()  # rewind: the records come again, nothing is committed past them
            raise
        if msg.consumer is not self._client:
            self._uncommitted, self._client = {}, msg.consumer
        for tp, (_, end) in spans.items():
            self._uncommitted[tp] = max(self._uncommitted.get(tp, 0), end)
            self._applied[tp] = max(self._applied.get(tp, 0), end)
        self._last_applied_at = time.monotonic()
        if self._stopping:
            await self._commit()  # the last batch before the subscription closes
        elif self._commit_task is None or self._commit_task.done():
            self._commit_task = asyncio.create_task(self._commit_soon())

    def lag(self) -> dict[TopicPartition, int]:
        """Records each assigned partition holds past what this consumer applied (no round trip)."""
        return partition_lag(fetch_state(self._reader), self._applied) if self._reader is not None else {}

    async def _commit_soon(self) -> None:
        # A batch applied while a commit is on the wire finds this task still running and starts no
        # other: commit again until nothing is left, or the last batch of a burst stays uncommitted
        # until the next record arrives (seen: a group 3 records short of the end for a minute).
        # Committed once batches pause for an interval, or COMMIT_MAX_DELAY_S after the oldest
        # uncommitted one while they keep coming (never sooner than an interval).
        interval = self.settings.consumer_commit_interval_ms / 1000
        longest = max(interval, COMMIT_MAX_DELAY_S)
        oldest = self._last_applied_at
        while True:
            now = time.monotonic()
            due = min(self._last_applied_at + interval, oldest + longest)
            if now < due:
                await asyncio.sleep(due - now)
                continue  # another batch may have come meanwhile
            oldest = now  # what is left after this commit was applied after it began
            await self._commit()
            if not self._uncommitted or self.needs_resubscribe:
                return

    async def _commit(self) -> None:
        client, pending, self._uncommitted = self._client, self._uncommitted, {}
        if client is None or not pending:
            return
        # A partition handed to another member since is that member's to commit: it re-reads
        # from the last committed offset, and its inbox skips what was applied here.
        assigned = client.assignment()
        offsets = {tp: offset for tp, offset in pending.items() if tp in assigned}
        if not offsets:
            return
        try:
            # aiokafka retries a commit for as long as the coordinator refuses it; a broker that
            # restarted without its state refuses forever, so bound the wait and re-subscribe.
            await asyncio.wait_for(client.commit(offsets), timeout=COMMIT_TIMEOUT_S)
            self.stats.commits += 1
        except (TimeoutError, KafkaError) as error:
            log.warning("offsets could not be committed; the consumer will re-subscribe", error=repr(error))
            self.needs_resubscribe = True

    async def handle_batch(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
        """Apply a batch exactly once, retrying transient faults until they clear."""
        backoff = 0.05
        while True:
            try:
                try:
                    await self._apply(records, isolate=False)
                except Exception as error:
                    if is_transient(error):
                        raise
                    # Some record fails: run again with a savepoint per record to find it.
                    await self._apply(records, isolate=True)
                self.stats.batches += 1
                self.stats.last_batch_at = time.monotonic()
                return
            except Exception as error:
                if not is_transient(error) or self._stopping:
                    raise
                self.stats.retries += 1
                log.warning("batch hit a transient fault, retrying", error=repr(error), backoff_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _apply(self, records: Sequence[ConsumerRecord[bytes, bytes]], *, isolate: bool) -> None:
        counts = ConsumerStats()
        ordered = in_time_order(records)
        if isolate:
            async with self.pool.acquire() as conn, conn.transaction():
                for record in ordered:
                    await self._apply_record(conn, record, counts=counts)
            self.outbox.committed()
        else:
            # Read and route before the transaction: a batch of nothing this consumer handles (nor
            # anything to park) needs none, and one that wrote no outbox row wakes no relay.
            pending: list[OutgoingRecord] = []
            routed: list[tuple[ConsumerRecord[bytes, bytes], Envelope, Route]] = []
            for record in ordered:
                found = self._route(record, counts, pending)
                if isinstance(found, tuple):
                    routed.append((record, *found))
            if routed or pending:
                async with self.pool.acquire() as conn, conn.transaction():
                    await self._apply_batch(conn, routed, pending, counts)
                if pending:
                    self.outbox.committed()
        self.stats.handled += counts.handled
        self.stats.duplicates += counts.duplicates
        self.stats.skipped += counts.skipped
        self.stats.parked += counts.parked

    def _route(
        self, record: ConsumerRecord[bytes, bytes], counts: ConsumerStats, pending: list[OutgoingRecord]
    ) -> tuple[Envelope, Route] | uuid.UUID | None:
        """The record's envelope and the route of its type; None for a record of a type nobody here
        handles; for a record parked as unreadable, the id of its dead letter (put in ``pending``)."""
        # A type nobody here handles is skipped on its ce_type header alone, unread (most records
        # of a shared topic, for most consumers); a record without a readable one is read in full.
        event_type = _event_type(record.headers)
        if event_type is not None and self.router.route(event_type) is None:
            counts.skipped += 1
            return None
        try:
            envelope = parse_envelope(record.headers, record.value, record.key)
        except EnvelopeError as error:
            counts.parked += 1
            return self._park(record, str(error), pending)
        route = self.router.route(envelope.type)
        if route is None:
            counts.skipped += 1
            return None
        return envelope, route

    async def _apply_batch(
        self, conn: Connection, routed: Sequence[tuple[ConsumerRecord[bytes, bytes], Envelope, Route]],
        pending: list[OutgoingRecord], counts: ConsumerStats,
    ) -> None:
        """The common path: one inbox statement and one outbox write for the whole batch (``pending``
        holds its dead letters so far; handlers add what they emit).

        Any handler failure aborts the batch, which is then re-run record by record in savepoints
        (``_apply_record``) to find and park the culprit.
        """
        # One claim per event id: its first copy's topic, and a replay's mark if any copy is one (a
        # group re-reading a parked original beside its replay must not hide the replay).
        claims: dict[uuid.UUID, inbox.Claim] = {}
        for record, envelope, _ in routed:
            # The envelope keeps every header that is not an attribute, in order (the replay mark
            # among them): a scan of those few, not of all the record's headers.
            replay, known = inbox.replay_of(envelope.extra_headers), claims.get(envelope.id)
            if known is None:
                claims[envelope.id] = inbox.Claim(envelope.id, record.topic, replay)
            elif known.replay_of is None and replay is not None:
                claims[envelope.id] = known._replace(replay_of=replay)
        claimed = await inbox.claim_many(conn, self.name, list(claims.values()))
        run: list[tuple[HandlerContext, Any]] = []
        run_spans: list[tracing.Span | None] = []
        run_handler: BatchHandler | None = None
        for record, envelope, route in routed:
            if envelope.id not in claimed:
                counts.duplicates += 1
                continue
            claimed.discard(envelope.id)  # a second copy in the same batch is a duplicate too
            span, traced = self._trace(record, envelope)
            context = HandlerContext(
                conn, envelope, self.outbox, self.service, self.settings, pending, self.clock, record.topic,
                self.keyring, trace=traced,
            )
            if run and route.many is not run_handler:
                await self._apply_run(run_handler, run, run_spans)
                run, run_spans = [], []
            if route.many is not None:
                run_handler = route.many
                run.append((context, envelope.decode(route.model)))
                run_spans.append(span)
            else:
                assert route.handler is not None
                with _event_log_context(envelope, traced), tracing.ending(span):
                    await route.handler(context, envelope.decode(route.model))
            counts.handled += 1
        if run:
            await self._apply_run(run_handler, run, run_spans)
        await self.outbox.add_many(conn, pending)

    def _trace(
        self, record: ConsumerRecord[bytes, bytes], envelope: Envelope
    ) -> tuple[tracing.Span | None, tracing.TraceHeaders | None]:
        """The event's span (one per event, the child of its ``traceparent``) and the Trace Context
        its emitted events carry; without a tracer provider no span, and the event's own context."""
        if envelope.traceparent is None and not tracing.recording():
            return None, None  # the common case without tracing: nothing to parse or start
        return tracing.consumer_span(
            envelope.traceparent, envelope.tracestate, topic=record.topic, partition=record.partition,
            offset=record.offset, group=self.group_id, event_id=str(envelope.id), event_type=envelope.type,
        )

    @staticmethod
    async def _apply_run(
        handler: BatchHandler | None, run: list[tuple[HandlerContext, Any]], spans: list[tracing.Span | None]
    ) -> None:
        """A set-based handler's run: one call handles every event, so its log context lists each
        event and correlation id of the run; each event's span lasts the run."""
        assert handler is not None
        first = run[0][0].envelope
        # Each id turned into text once (a run is up to a batch long).
        event_ids = [str(c.envelope.id) for c, _ in run]
        correlation_ids = list(dict.fromkeys(
            c.envelope.correlation_id or event_id for (c, _), event_id in zip(run, event_ids, strict=True)
        ))
        with bound_context(
            event_id=event_ids[0], event_type=first.type, events=len(run), event_ids=event_ids,
            correlation_id=correlation_ids[0], correlation_ids=correlation_ids,
        ), tracing.ending_all(spans):
            await handler(Run(run))

    async def _apply_record(
        self, conn: Connection, record: ConsumerRecord[bytes, bytes], *, counts: ConsumerStats
    ) -> None:
        """One record in a savepoint of its own: a failing handler is retried, then parked."""
        parked: list[OutgoingRecord] = []
        found = self._route(record, counts, parked)
        if not isinstance(found, tuple):
            await self.outbox.add_many(conn, parked)
            return
        envelope, route = found
        if not await inbox.claim(conn, self.name, envelope.id, record.topic, inbox.replay_of(record.headers)):
            counts.duplicates += 1
            return
        span, traced = self._trace(record, envelope)
        context = HandlerContext(
            conn, envelope, self.outbox, self.service, self.settings, clock=self.clock, topic=record.topic,
            keyring=self.keyring, trace=traced,
        )
        with _event_log_context(envelope, traced), tracing.ending(span):
            reason = await self._apply_isolated(conn, envelope, route, context)
            if reason is None:
                counts.handled += 1
                return
            tracing.failed(span, "parked on the dead-letter topic")
            log.error("event parked on the dead-letter topic", reason=reason, topic=record.topic)
            dead_letter_id = self._park(record, reason, parked)
            await self.outbox.add_many(conn, parked)
            await inbox.mark_parked(conn, self.name, envelope.id, dead_letter_id)
            counts.parked += 1

    async def _apply_isolated(
        self, conn: Connection, envelope: Envelope, route: Route, context: HandlerContext
    ) -> str | None:
        """Run the handler in a savepoint, retrying it; return the reason it finally failed, if it did."""
        for attempt in range(1, self.settings.consumer_max_attempts + 1):
            try:
                async with conn.transaction():
                    event = envelope.decode(route.model)
                    if route.many is not None:
                        await route.many(Run([(context, event)]))
                    else:
                        assert route.handler is not None
                        await route.handler(context, event)
                return None
            except (EnvelopeError, DomainError) as error:
                return f"{type(error).__name__}: {error}"  # a retry cannot change the verdict
            except Exception as error:
                if is_transient(error):
                    raise
                if attempt == self.settings.consumer_max_attempts:
                    return f"{type(error).__name__}: {error} (after {attempt} attempts)"
                log.warning("handler failed, retrying", error=repr(error), attempt=attempt)
                await asyncio.sleep(0.02 * 2**attempt)
        return None  # unreachable: the loop returns

    def _park(
        self, record: ConsumerRecord[bytes, bytes], reason: str, pending: list[OutgoingRecord]
    ) -> uuid.UUID:
        """Add the record's dead letter to ``pending`` (written to the outbox with the rest); its id
        (the replay names it, see ``inbox``)."""
        dead_letter_id = uuid.uuid4()
        headers = [(k, v) for k, v in record.headers if k not in DLQ_HEADERS]
        headers += [
            ("dlq_reason", reason[:2000].encode()),
            ("dlq_service", self.name.encode()),
            ("dlq_topic", record.topic.encode()),
            ("dlq_partition", str(record.partition).encode()),
            ("dlq_offset", str(record.offset).encode()),
            ("dlq_time", datetime.now(UTC).isoformat().encode()),
            (inbox.DEAD_LETTER_ID_HEADER, str(dead_letter_id).encode()),
        ]
        pending.append(OutgoingRecord(
            record.topic + DLQ_SUFFIX, record.key, headers, record.value, str(dead_letter_id)
        ))
        return dead_letter_id


def _event_type(headers: Sequence[tuple[str, bytes]]) -> str | None:
    """The ``ce_type`` header of a record, if it has a readable one."""
    for name, value in headers:
        if name == "ce_type":
            try:
                return value.decode()
            except UnicodeDecodeError:
                return None
    return None


def _event_log_context(
    envelope: Envelope, traced: tracing.TraceHeaders | None
) -> contextlib.AbstractContextManager[None]:
    """Every log line of one event's handling carries its ids (and its trace id, when traced)."""
    ids = {
        "event_id": str(envelope.id), "event_type": envelope.type,
        "correlation_id": envelope.correlation_id or str(envelope.id),
    }
    if traced is not None:
        ids["trace_id"] = traced.trace_id
    return bound_context(**ids)


def _partition_spans(records: Sequence[ConsumerRecord[bytes, bytes]]) -> dict[TopicPartition, tuple[int, int]]:
    """Each partition of a batch: the offset of its first record, and the offset after its last
    (one ``TopicPartition`` per partition, not one per record)."""
    spans: dict[tuple[str, int], tuple[int, int]] = {}
    for record in records:
        key = (record.topic, record.partition)
        span = spans.get(key)
        if span is None:
            spans[key] = (record.offset, record.offset + 1)
        elif record.offset >= span[1]:
            spans[key] = (span[0], record.offset + 1)
    return {TopicPartition(topic, partition): span for (topic, partition), span in spans.items()}


def in_time_order(records: Sequence[ConsumerRecord[bytes, bytes]]) -> list[ConsumerRecord[bytes, bytes]]:
    """A batch in record-time order across partitions and topics, each partition's order kept.

    A batch arrives grouped by partition. Topics have no order between them, but handling, say, a
    resident's registration before the application sent a second later (when both are in one
    batch) spares consumers needless "not known yet" paths. ``heapq.merge`` only ever takes the
    head of each partition, so per-partition (per-key) order holds even if clocks disagree.
    """
    partitions: dict[tuple[str, int], list[ConsumerRecord[bytes, bytes]]] = {}
    for record in records:
        partitions.setdefault((record.topic, record.partition), []).append(record)
    if len(partitions) <= 1:
        return list(records)
    return list(heapq.merge(*partitions.values(), key=lambda record: record.timestamp))


class FetchedBatch:
    """A fetched batch as the kit handles it: its records (``raw_message``, as FastStream names them),
    the client that fetched them (``consumer``), and ``nack``, which rewinds each of its partitions
    to its first record so that nothing is committed past a record that was not applied."""

    __slots__ = ("consumer", "raw_message")

    def __init__(self, records: tuple[ConsumerRecord[bytes, bytes], ...], consumer: Any) -> None:
        self.raw_message = records
        self.consumer = consumer

    async def nack(self) -> None:
        for tp, (first, _) in _partition_spans(self.raw_message).items():
            self.consumer.seek(tp, first)


class _Dispatch:
    """A subscriber's hand-over of each polled batch to the kit, in place of FastStream's own.

    FastStream runs every batch through its middlewares, context scopes, parser, decoder and
    dependency injection, none of which the kit uses (manual acks, no broker middlewares, raw
    records): measured, some 17 % of the CPU a consumer spends on a batch of records it skips.
    What is kept: nothing is handled once the subscriber stops, its lock is held while a batch is
    handled (a graceful stop waits for the batch in hand), and a batch that fails is rewound (by
    ``_on_batch``) and logged, not allowed to end the consume loop."""

    def __init__(self, subscriber: Any, handle: Callable[[FetchedBatch], Awaitable[None]]) -> None:
        self.subscriber = subscriber
        self.handle = handle

    async def __call__(self, records: tuple[ConsumerRecord[bytes, bytes], ...]) -> None:
        subscriber = self.subscriber
        if not subscriber.running:
            return
        with subscriber.lock:
            try:
                await self.handle(FetchedBatch(records, subscriber.consumer))
            except Exception:
                log.exception("batch failed; its records come again")


class _BatchPoll:
    """A subscriber's poll for the next batch: waits up to ``POLL_TIMEOUT_MS`` for records, returning
    as soon as any are fetched, and never sleeps after an empty poll (FastStream's own does). Under
    load a partial batch waits up to ``LINGER_S`` for the next records (see there). Idle (no records
    for ``IDLE_AFTER_S``), it rests ``rest_s`` with its partitions paused before each listen of
    ``listen_ms``: a record that comes while it rests waits until the rest ends. Paced (``pace_s``), a
    poll less than the pace after the last records rests, paused alike, for what is left of the pace,
    unless they were a full batch."""

    def __init__(
        self, max_records: int, linger_s: float = LINGER_S, rest_s: float = 0.0, listen_ms: int = POLL_TIMEOUT_MS,
        pace_s: float = 0.0,
    ) -> None:
        self.max_records = max_records
        self.linger_s = linger_s
        self.rest_s = rest_s
        self.listen_ms = listen_ms
        self.pace_s = pace_s
        #: When the last poll that found records returned, and whether it brought a full batch.
        self._last_records_at = -1e9
        self._last_full = False
        #: Idle is counted from here at first: a consumer that just joined listens at once.
        self._made_at = time.monotonic()
        #: A fault the lingering poll met after records were in hand: raised by the next poll.
        self._deferred: BaseException | None = None

    async def __call__(self, consumer: Any) -> tuple[ConsumerRecord[bytes, bytes], ...]:
        if self._deferred is not None:
            error, self._deferred = self._deferred, None
            raise error
        timeout_ms = POLL_TIMEOUT_MS
        now = time.monotonic()
        if self.rest_s > 0 and now - max(self._last_records_at, self._made_at) >= IDLE_AFTER_S:
            await self._rest(consumer, self.rest_s)
            timeout_ms = self.listen_ms
        elif now - self._last_records_at < self.pace_s and not self._last_full:
            # Paced: what comes meanwhile is fetched after, in one batch with the rest. A backlog (full
            # batches) goes on at once.
            await self._rest(consumer, self.pace_s - (now - self._last_records_at))
        batches = await consumer.getmany(timeout_ms=timeout_ms, max_records=self.max_records)
        records = tuple(itertools.chain.from_iterable(batches.values()))
        if not records:
            return records
        now = time.monotonic()
        busy, self._last_records_at = now - self._last_records_at < LINGER_WHEN_WITHIN_S, now
        if busy and self.linger_s > 0 and len(records) < self.max_records:
            try:
                # Returns as soon as more records come (or with none after the linger); bounded, as a
                # rebalance begun meanwhile would hold the records in hand until it ends.
                more = await asyncio.wait_for(
                    consumer.getmany(
                        timeout_ms=round(self.linger_s * 1000), max_records=self.max_records - len(records)
                    ),
                    self.linger_s * 2,
                )
            except TimeoutError:
                more = {}
            except Exception as error:  # the records in hand go first, as aiokafka's own poll does
                self._deferred, more = error, {}
            # Each partition's records stay in offset order: later ones come after the first part.
            records += tuple(itertools.chain.from_iterable(more.values()))
            self._last_records_at = time.monotonic()
        self._last_full = len(records) >= self.max_records
        return records

    async def _rest(self, consumer: Any, seconds: float) -> None:
        """No fetch while paused: the fetch under way when it pauses ends on the broker, and its
        records, if any, are dropped and fetched again after (the positions do not move)."""
        consumer.pause(*consumer.assignment())
        try:
            await asyncio.sleep(seconds)
        finally:
            # What this member holds now: a rebalance meanwhile leaves a new assignment unpaused.
            consumer.resume(*consumer.paused())


def dead_letter_origin(headers: Sequence[tuple[str, bytes]]) -> tuple[str, list[tuple[str, bytes]]]:
    """The original topic of a dead letter and its original headers (for replay)."""
    origin = dict(headers).get("dlq_topic")
    if origin is None:
        raise ValueError("record has no dlq_topic header: not a dead letter")
    return origin.decode(), [(k, v) for k, v in headers if k not in DLQ_HEADERS]
