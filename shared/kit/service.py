"""The composition root every service shares: database, migrations, broker, outbox relay, consumers.

A service builds one ``ServiceRuntime`` with its migrations folder and its consumers, and hands
``runtime.lifespan`` to its FastAPI app. Start order: database and migrations, ``prepare`` steps
(seeding reference rows), topics, producer and outbox relay, consumers, background tasks. Stop
order is the reverse, so in-flight batches finish and commit before the connections close.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import structlog
from aiokafka import AIOKafkaProducer
from fastapi import FastAPI
from faststream.kafka import KafkaBroker

import shared.kit.kafka_client  # noqa: F401  (topics are never auto-created)
from shared.contracts.base import EventData
from shared.contracts.topics import Cluster, Topic, cluster_of
from shared.kit import tracing
from shared.kit.clock import SYSTEM_CLOCK, Clock
from shared.kit.consumer import EventConsumer, EventRouter
from shared.kit.db import Connection
from shared.kit.envelope import Envelope, new_envelope
from shared.kit.group_commit import GroupCommit
from shared.kit.group_join import release_departed_leader
from shared.kit.http import Readiness
from shared.kit.kafka_admin import ensure_topics, platform_topics
from shared.kit.kafka_security import KafkaConnection
from shared.kit.keyring import Keyring
from shared.kit.metrics import EventMetrics, prepare_multiprocess
from shared.kit.migrations import migrate_service
from shared.kit.outbox import Outbox, OutboxRelay, OutgoingRecord, notify_channel
from shared.kit.retention import RetentionJob, RetentionPolicy, check_settings
from shared.kit.settings import Settings, get_settings, with_database

log = structlog.get_logger(__name__)

BackgroundTask = Callable[["ServiceRuntime"], Awaitable[None]]

#: How often a service checks that the broker still has its topics (see ``_watch_broker``).
WATCHDOG_INTERVAL_S = 2.0


@dataclass(frozen=True)
class ConsumerSpec:
    router: EventRouter
    topics: Sequence[Topic]
    name: str | None = None
    #: Which cluster its topics are on: partner topics are on the edge (the gateway reads trips there).
    cluster: Cluster = "internal"
    #: Topics found at run time: asked at every (re)subscription in place of ``topics`` (flag the
    #: consumer's ``needs_resubscribe`` when they changed; the watchdog then re-subscribes it).
    topics_of: Callable[[], Sequence[Topic]] | None = None
    #: Batches start at most this often (seconds) while records keep coming: what comes meanwhile is
    #: fetched after, with the rest. For a consumer no one waits on by the millisecond, fewer and larger
    #: batches at a moderate rate (a batch's transaction, fetch and round trips cost the same whatever
    #: its size); a backlog (full batches) goes on at once; 0 starts each batch as soon as records come.
    pace_s: float = 0.0
    #: Idle, it rests at most this long between listens (the setting ``consumer_idle_rest_ms`` caps it
    #: for all): the first record after a quiet second waits up to the rest and one listen per hop.
    idle_rest_max_s: float = float("inf")


@dataclass
class UnitOfWork:
    """One transaction of an HTTP use case: state changes and outgoing events commit together.

    Emitted events are written to the outbox in one statement just before the commit (in emit
    order), so a use case pays one round trip for its events however many it emits.
    """

    conn: Connection
    runtime: ServiceRuntime
    correlation_id: str | None = None
    emitted: list[Envelope] = field(default_factory=list)
    _pending: list[OutgoingRecord] = field(default_factory=list)

    async def emit(self, topic: Topic, data: EventData, *, subject: str, key: str | None = None) -> Envelope:
        traced = tracing.current_headers()  # the use case's span: the consumers' spans continue it
        envelope = new_envelope(
            self.runtime.service, data, subject=subject, key=key, correlation_id=self.correlation_id,
            traceparent=traced.traceparent if traced else None, tracestate=traced.tracestate if traced else None,
        )
        self._pending.append(OutgoingRecord(
            self.runtime.settings.topic(topic.name), envelope.key, envelope.headers(), envelope.data, str(envelope.id)
        ))
        self.emitted.append(envelope)
        return envelope

    async def flush(self) -> None:
        """Write the emitted events to the outbox (the runtime does this before committing)."""
        await self.runtime.outbox.add_many(self.conn, self.take_pending())

    def take_pending(self) -> list[OutgoingRecord]:
        """The events emitted and not yet written: a group commit writes a batch's in one go."""
        pending, self._pending = self._pending, []
        return pending


class ServiceRuntime:
    def __init__(
        self,
        service: str,
        *,
        migrations: Path,
        consumers: Sequence[ConsumerSpec] = (),
        prepare: Sequence[BackgroundTask] = (),
        background: Sequence[BackgroundTask] = (),
        settings: Settings | None = None,
        pool_size: int = 10,
        clock: Clock = SYSTEM_CLOCK,
        edge: bool = False,
    ) -> None:
        self.service = service
        #: The service's one clock (instants in UTC, dates in Japan); tests hand in a fixed one.
        self.clock = clock
        #: Whether this service talks to the partner-facing cluster (only the partner gateway does).
        self.edge = edge
        self.settings = settings or get_settings()
        self.migrations = migrations
        self.consumer_specs = consumers
        self.prepare = prepare
        self.background = background
        self.pool_size = pool_size
        self.dsn = self.settings.database_dsn(service)
        self.outbox = Outbox(notify_channel(self.settings.database_name(service)))
        self.readiness = Readiness()
        self.consumers: list[EventConsumer] = []
        self.state: dict[str, Any] = {}  # service-specific singletons (redis client, caches...)
        #: The group commits of the use cases that share transactions, by operation (``Write.run``).
        self.group_commits: dict[str, GroupCommit[Any]] = {}
        self._pool: asyncpg.Pool | None = None
        self._keyring: Keyring | None = None
        self._producer: AIOKafkaProducer | None = None
        self._edge_producer: AIOKafkaProducer | None = None
        self._brokers: list[KafkaBroker] = []
        self._relay: OutboxRelay | None = None
        #: Deletes the kit's old rows (inbox, idempotency keys, published outbox rows) in the background.
        self.retention: RetentionJob | None = None
        self._tasks: list[asyncio.Task[None]] = []
        #: Per consumer group: the release under way or last tried, and when (``_release_stuck_groups``).
        self._releases: dict[str, tuple[float, asyncio.Task[None]]] = {}

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError(f"{self.service} runtime is not started")
        return self._pool

    @property
    def keyring(self) -> Keyring:
        """The key store of crypto-shredding (connects on first use)."""
        if self._keyring is None:
            self._keyring = Keyring.from_settings(self.settings)
        return self._keyring

    @property
    def relay_or_none(self) -> OutboxRelay | None:
        return self._relay

    @property
    def relay(self) -> OutboxRelay:
        if self._relay is None:
            raise RuntimeError(f"{self.service} runtime is not started")
        return self._relay

    async def start(self) -> None:
        s = self.settings
        check_settings(s)  # before anything runs: an inbox that forgets too soon applies events twice
        admin_dsn = with_database(s.pg_dsn or "", "postgres")
        applied = await migrate_service(self.dsn, admin_dsn, s.database_name(self.service), self.migrations)
        self._pool = await asyncpg.create_pool(
            self.dsn, min_size=2, max_size=self.pool_size, reset=_keep_session,
        )
        for step in self.prepare:  # seed data the consumers and routes rely on
            await step(self)
        await ensure_topics(s)
        self._producer = _relay_producer(KafkaConnection.internal(s))
        await self._producer.start()
        if self.edge:
            # One cluster behind ACLs (no edge bootstrap of its own): the same producer serves both.
            separate = KafkaConnection.edge(s) != KafkaConnection.internal(s)
            self._edge_producer = _relay_producer(KafkaConnection.edge(s)) if separate else self._producer
            if separate:
                await self._edge_producer.start()
        self._relay = OutboxRelay(
            self.dsn, self.outbox.channel, self._producer,
            batch_size=s.outbox_batch_size, poll_interval_s=s.outbox_poll_interval_s,
            recover=self._recreate_topics, edge_producer=self._edge_producer,
            is_edge=lambda topic: cluster_of(topic.removeprefix(s.topic_prefix)) == "edge",
        )
        self.outbox.local_relay = self._relay
        self._spawn(self._relay.run(), "outbox-relay")
        self.retention = RetentionJob(self.dsn, self.service, RetentionPolicy.of(s), interval_s=s.retention_interval_s)
        self._spawn(self.retention.run(), "retention")
        if self.consumer_specs:
            self.consumers = [
                EventConsumer(
                    service=self.service, settings=s, pool=self.pool, outbox=self.outbox,
                    router=spec.router, topics=spec.topics, name=spec.name, clock=self.clock,
                    cluster=spec.cluster, topics_of=spec.topics_of, keyring=self.keyring, pace_s=spec.pace_s,
                    idle_rest_max_s=spec.idle_rest_max_s,
                )
                for spec in self.consumer_specs
            ]
            for group in dict.fromkeys(c.group_id for c in self.consumers):  # false: a member kept out
                self.readiness.checks[f"consumer group {group}"] = functools.partial(self._group_joinable, group)
            await self._subscribe()
            self._spawn(self._watch_broker(), "broker-watchdog")
        for task in self.background:
            self._spawn(task(self), getattr(task, "__name__", "background"))
        self.readiness.checks["database"] = self._database_ready
        self.readiness.checks["broker"] = self._broker_ready
        # Everything made so far lives as long as the process: take it out of the collector's
        # view, so a full collection (tens of ms over ~100k start-up objects, a stall every
        # request in flight waits out) only walks what requests and events allocate.
        if s.gc_freeze_after_start:
            gc.collect()
            gc.freeze()
        log.info("service started", migrations_applied=len(applied), consumers=len(self.consumers))

    async def stop(self) -> None:
        for consumer in self.consumers:
            consumer.stop()
            await consumer.flush_commits()
        for broker in self._brokers:
            await broker.stop()  # waits for the batch in hand to commit (and its offsets)
        if self._relay is not None:
            self._relay.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, timeout=5)
        if self._edge_producer is not None and self._edge_producer is not self._producer:
            await self._edge_producer.stop()
        if self._producer is not None:
            await self._producer.stop()
        if self._pool is not None:
            await self._pool.close()
        if self._keyring is not None:
            await self._keyring.close()
        log.info("service stopped")

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        app.state.runtime = self
        registry = getattr(app.state, "metrics_registry", None)
        if registry is not None:
            registry.register(EventMetrics(self))
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    @contextlib.asynccontextmanager
    async def transaction(self, correlation_id: str | None = None) -> AsyncIterator[UnitOfWork]:
        async with self.pool.acquire() as conn, conn.transaction():
            work = UnitOfWork(conn, self, correlation_id)
            yield work
            await work.flush()
        self.outbox.committed()

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background task failed", task=name)

        self._tasks.append(asyncio.create_task(guarded(), name=f"{self.service}:{name}"))

    async def _subscribe(self) -> None:
        brokers: dict[str, KafkaBroker] = {}
        for consumer in self.consumers:
            consumer.needs_resubscribe = False
            if consumer.cluster not in brokers:
                connection = KafkaConnection.of(self.settings, consumer.cluster)
                brokers[consumer.cluster] = KafkaBroker(
                    connection.bootstrap, security=connection.faststream_security(), logger=None
                )
            consumer.attach(brokers[consumer.cluster])
        self._brokers = list(brokers.values())  # stop() closes them even if their start never finished
        # aiokafka's start returns once the member joined its group: a group the broker keeps
        # everyone out of would hold it (and the service's start) for ever, so watch the joins.
        guard = asyncio.create_task(self._guard_joins())
        try:
            for broker in self._brokers:
                await broker.start()
        finally:
            guard.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await guard

    async def _guard_joins(self) -> None:
        while True:
            await asyncio.sleep(min(WATCHDOG_INTERVAL_S, self.settings.consumer_join_timeout_ms / 4000))
            self._release_stuck_groups()

    def _release_stuck_groups(self) -> None:
        """Past ``consumer_join_timeout_ms`` without getting into its group, a consumer has the
        broker asked to release a departed leader (``group_join``), once per timeout per group."""
        limit_s = self.settings.consumer_join_timeout_ms / 1000
        now = time.monotonic()
        for consumer in self.consumers:
            waited = consumer.waiting_to_join_s()
            last = self._releases.get(consumer.group_id)
            if waited < limit_s or (last is not None and (now - last[0] < limit_s or not last[1].done())):
                continue
            task = asyncio.create_task(self._release(consumer, waited), name=f"{self.service}:group-release")
            self._releases[consumer.group_id] = (now, task)
            self._tasks.append(task)  # cancelled by stop()

    async def _release(self, consumer: EventConsumer, waited_s: float) -> None:
        group = consumer.group_id
        log.warning(
            "a consumer cannot join its group; asking the broker to release a departed leader",
            group=group, waited_s=round(waited_s, 1),
        )
        topics = sorted({t for c in self.consumers if c.group_id == group for t in c.topics})
        try:
            outcome = await release_departed_leader(
                KafkaConnection.of(self.settings, consumer.cluster), group, topics,
                session_timeout_ms=self.settings.kafka_session_timeout_ms,
            )
        except Exception as error:
            log.warning("releasing the group's leader failed; tried again later", group=group, error=repr(error))
            return
        log.info("group release done", group=group, released=outcome.released, outcome=outcome.outcome)

    async def _group_joinable(self, group: str) -> bool:
        """Not ready while a member of ``group`` has been kept out longer than the join timeout."""
        limit_s = self.settings.consumer_join_timeout_ms / 1000
        return all(c.waiting_to_join_s() < limit_s for c in self.consumers if c.group_id == group)

    async def _watch_broker(self) -> None:
        """Re-subscribe when the broker lost its state (its topics, or our group's offsets).

        A Kafka cluster keeps both across restarts, so this fires only with the in-memory
        embedded broker or after a cluster was rebuilt; the inbox makes the re-read harmless.
        """
        # Only its own internal topics: under ACLs a service sees no other, and would find them "lost".
        expected = {
            self.settings.topic(t.name) for t in platform_topics()
            if t.cluster == "internal" and (self.service in t.producers or self.service in t.consumers)
        }
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            self._release_stuck_groups()
            try:
                lost_topics = await self._topics_missing(expected) and bool(await ensure_topics(self.settings))
            except Exception as error:
                log.info("broker not reachable from the watchdog", error=repr(error))
                continue
            if lost_topics or any(c.needs_resubscribe for c in self.consumers):
                log.warning("the broker lost its state: re-subscribing the consumers", topics_recreated=lost_topics)
                for broker in self._brokers:
                    try:
                        await asyncio.wait_for(broker.stop(), timeout=15)
                    except Exception as error:
                        log.warning("old subscription did not stop cleanly", error=repr(error))
                await self._subscribe()
                log.info("consumers re-subscribed")

    async def _topics_missing(self, expected: set[str]) -> bool:
        """One metadata request over the producer's connection (a new admin client costs a
        connection and a bootstrap each time, on the event loop the requests share)."""
        if self._producer is None:
            return False
        cluster = await self._producer.client.fetch_all_metadata()
        return not expected <= cluster.topics()

    async def _recreate_topics(self) -> None:
        await ensure_topics(self.settings)

    async def _database_ready(self) -> bool:
        return bool(await asyncio.wait_for(self.pool.fetchval("SELECT 1"), timeout=2))

    async def _broker_ready(self) -> bool:
        if self._producer is None:
            return False
        await asyncio.wait_for(self._producer.client.force_metadata_update(), timeout=2)
        return bool(self._producer.client.cluster.brokers())


def _relay_producer(connection: KafkaConnection) -> AIOKafkaProducer:
    # No linger: a relay round queues all its rows without yielding to the loop (``send`` only
    # suspends on a full batch), so they leave batched anyway; a linger only delays each round.
    return AIOKafkaProducer(
        **connection.aiokafka_kwargs(), acks="all", linger_ms=0, max_batch_size=256 * 1024,
        request_timeout_ms=10_000, retry_backoff_ms=100,
    )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Skip asyncpg's reset on release (one round trip per request and batch).

    asyncpg still rolls back an open transaction; the reset would also drop session advisory
    locks and LISTENs, which only ever live on dedicated connections here, never pooled ones.
    """


def serve(service: str, settings: Settings | None = None) -> None:
    """Run one service: HTTP, and with it (through the lifespan) its consumers and relay.

    ``NICHIIKI_HTTP_WORKERS`` > 1 runs that many processes of the service; they share the
    consumer group (partitions are split between them) and elect one outbox relay.
    """
    import uvicorn

    from shared.kit.logging import configure_logging

    s = settings or get_settings()
    configure_logging(service, fmt=s.log_format, level=s.log_level)
    # Several workers: each writes its metrics to files there, and /metrics sums them (shared.kit.metrics).
    prepare_multiprocess(s.http_workers)
    os.environ[_SERVED_SERVICE] = service  # inherited by the workers: _served_app builds their app
    uvicorn.run(
        "shared.kit.service:_served_app", factory=True, workers=s.http_workers,
        host=s.http_host, port=s.http_port or s.service_port(service),
        log_config=None, access_log=False, timeout_graceful_shutdown=10,
    )


_SERVED_SERVICE = "NICHIIKI_SERVED_SERVICE"


def _served_app() -> FastAPI:
    """The app of one served process. Worker processes are spawned and run no ``__main__``: the
    logging ``serve`` set up is theirs only if set up here again (otherwise they log every line at
    DEBUG in the console format, whatever ``NICHIIKI_LOG_LEVEL`` and ``NICHIIKI_LOG_FORMAT`` say)."""
    import importlib

    from shared.kit.logging import configure_logging

    service = os.environ[_SERVED_SERVICE]
    s = get_settings()
    configure_logging(service, fmt=s.log_format, level=s.log_level)
    app: FastAPI = importlib.import_module(f"services.{service}.main").create_app()
    return app

