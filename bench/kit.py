"""The consumer side of the kit: events/s through envelope → inbox → state → outbox → commit.

Every service's consumer runs on this path, so its rate is the ceiling of each service's
consumer. The handler writes one state row and emits one event, as a typical projection does.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

import asyncpg
from aiokafka import AIOKafkaProducer
from faststream.kafka import KafkaBroker

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
