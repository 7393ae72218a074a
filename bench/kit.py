"""The consumer side of the kit, and reshaping the bench's fleet of services.

``consumer_throughput``: events/s through envelope → inbox → state → outbox → commit. Every
service's consumer runs on this path, so its rate is the ceiling of each service's consumer. The
handler writes one state row and emits one event, as a typical projection does.

``services_with_env``: some services of the running fleet restarted with other environment (more
HTTP workers: the scale-out scenario), then as they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import asyncpg
from aiokafka import AIOKafkaProducer
from faststream.kafka import KafkaBroker

from shared.cli.fleet import ServiceFleet
from shared.contracts.base import EventData
from shared.contracts.topics import Topic
from shared.kit.consumer import EventConsumer, EventRouter, HandlerContext
from shared.kit.envelope import new_envelope
from shared.kit.kafka_admin import ensure_topics
from shared.kit.kafka_security import KafkaConnection
from shared.kit.migrations import KIT_MIGRATIONS, apply_migrations, ensure_database, load_migrations
from shared.kit.outbox import Outbox, OutboxRelay
from shared.kit.settings import Settings, with_database

BENCH_TOPIC = Topic("bench.kit.in.v1", 4, "subject", "bench", ("bench",))
BENCH_OUT = Topic("bench.kit.out.v1", 4, "subject", "bench", ("bench",))


class BenchEvent(EventData, name="bench.event", topic=BENCH_TOPIC):
    subject: str
    sequence: int


@dataclass
class KitResult:
    events: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds


async def consumer_throughput(settings: Settings, events: int = 20_000) -> KitResult:
    run = uuid.uuid4().hex[:6]
    s = settings.model_copy(update={"topic_prefix": f"bench{run}."})
    await ensure_topics(s, [BENCH_TOPIC, BENCH_OUT, Topic(BENCH_TOPIC.dlq, 1, "key", "bench")])
    database = f"nichiiki_bench_kit_{run}"
    await ensure_database(with_database(s.pg_dsn or "", "postgres"), database)
    dsn = with_database(s.pg_dsn or "", database)
    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=4)
    async with pool.acquire() as conn:
        await apply_migrations(conn, load_migrations(KIT_MIGRATIONS, "kit"))
    await pool.execute("CREATE TABLE IF NOT EXISTS state (subject text PRIMARY KEY, last int)")

    producer = AIOKafkaProducer(**KafkaConnection.internal(s).aiokafka_kwargs(), acks="all", linger_ms=5)
    await producer.start()
    futures = []
    for i in range(events):
        envelope = new_envelope("bench", BenchEvent(subject=f"s{i % 500}", sequence=i), subject=f"s{i % 500}")
        futures.append(await producer.send(
            s.topic(BENCH_TOPIC.name), envelope.data, key=envelope.key, headers=envelope.headers()
        ))
    await asyncio.gather(*futures)

    router = EventRouter()

    @router.on(BenchEvent)
    async def apply(ctx: HandlerContext, event: BenchEvent) -> None:
        await ctx.conn.execute(
            "INSERT INTO state VALUES ($1, $2) ON CONFLICT (subject) DO UPDATE SET last = excluded.last",
            event.subject, event.sequence,
        )
        await ctx.emit(BENCH_OUT, event, subject=event.subject)

    outbox = Outbox("outbox_bench")
    consumer = EventConsumer(
        service="bench", settings=s, pool=pool, outbox=outbox, router=router, topics=[BENCH_TOPIC], name="bench",
    )
    connection = KafkaConnection.internal(s)
    broker = KafkaBroker(connection.bootstrap, security=connection.faststream_security(), logger=None)
    consumer.attach(broker)
    relay = OutboxRelay(dsn, outbox.channel, producer, poll_interval_s=0.2)
    relay_task = asyncio.create_task(relay.run())
    started = time.perf_counter()
    await broker.start()
    # The clock starts when the first batch has committed (the group join before it is not the
    # consumer path); the events of that first batch are not counted either.
    first_at: float | None = None
    counted_from = 0
    while consumer.stats.handled < events:
        if first_at is None and consumer.stats.handled:
            first_at, counted_from = time.perf_counter(), consumer.stats.handled
        await asyncio.sleep(0.005)
    seconds = time.perf_counter() - (first_at or started)
    await broker.stop()
    relay.stop()
    await relay_task
    await producer.stop()
    await pool.close()
    return KitResult(events - counted_from, seconds)


# --- Reshaping the fleet ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Restart:
    """How a restart of some services went: seconds until all had stopped, then until all were ready."""

    stopped_s: float
    ready_s: float
    #: Processes that did not stop within their grace period and were killed.
    killed: int

    def describe(self) -> str:
        killed = f", {self.killed} killed after their grace period" if self.killed else ""
        total = self.stopped_s + self.ready_s
        return f"{total:.0f} s ({self.stopped_s:.0f} s to stop{killed}, {self.ready_s:.0f} s to ready)"


async def restart_with_env(fleet: ServiceFleet, env: Mapping[str, Mapping[str, str]]) -> Restart:
    """Restart every replica of each service named in ``env`` with exactly that service environment
    (over the platform's, as ``ServiceFleet.add_replica`` composes it), on the same port, so URLs held
    by clients and by the console stay right.

    The services stop gracefully (their consumers leave their groups, batches in hand committed), all at
    once, then start together: one at a time would cost each one's start-up in turn.
    """
    started = time.perf_counter()
    processes = [process for name in env for process in fleet.processes.get(name, [])]
    await asyncio.gather(*(asyncio.to_thread(process.stop) for process in processes))
    killed = sum(1 for process in processes if process.exit_code == -signal.SIGKILL)
    stopped = time.perf_counter()
    for name, overrides in env.items():
        previous = fleet.service_env.get(name, {})
        fleet.service_env[name] = dict(overrides)
        for process in fleet.processes.get(name, []):
            # The platform's environment stays; only this service's own entries change.
            base = {key: value for key, value in process.env.items() if key not in previous}
            process.env = {**base, **overrides}
            process.start()
    await asyncio.gather(*(asyncio.to_thread(process.wait_ready, 120) for process in processes))
    return Restart(stopped - started, time.perf_counter() - stopped, killed)


@dataclass
class Reshape:
    """The restart into another environment, and (once the block is left) the one back."""

    there: Restart
    back: Restart | None = None


@contextlib.asynccontextmanager
async def services_with_env(
    fleet: ServiceFleet, env: Mapping[str, Mapping[str, str]], *, restarted: Mapping[str, str] | None = None,
) -> AsyncIterator[Reshape]:
    """Within the block the services named in ``env`` run with that environment of their own (merged over
    what they had); afterwards they run as before. ``restarted``: environment of both restarts, there and
    back (what restarting needs, not what is measured)."""
    before = {name: {**fleet.service_env.get(name, {}), **(restarted or {})} for name in env}
    changed = {name: {**before[name], **overrides} for name, overrides in env.items()}
    reshape = Reshape(await restart_with_env(fleet, changed))
    try:
        yield reshape
    finally:
        reshape.back = await restart_with_env(fleet, before)
