"""Inbox and dead letters over the real broker and database."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from faststream.kafka import KafkaBroker

from shared.contracts.acls import DLQ_REPLAY_GROUP
from shared.contracts.topics import Topic
from shared.kit.consumer import EventConsumer, EventRouter, HandlerContext
from shared.kit.dead_letters import replay_dead_letters
from shared.kit.envelope import new_envelope
from shared.kit.outbox import Outbox, OutboxRelay
from shared.kit.settings import Settings
from tests.support import Ping, eventually, fresh_database, fresh_topic, produce, read_topic


@contextlib.asynccontextmanager
async def consuming(
    settings: Settings, topic: str, fail_on: set[int] | None = None
) -> AsyncIterator[tuple[EventConsumer, asyncpg.Pool]]:
    """A consumer that records each ping in a table; pings whose sequence is in ``fail_on`` fail."""
    dsn = await fresh_database(settings, "consumer")
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
    await pool.execute("CREATE TABLE pings (subject text, sequence int)")
    router = EventRouter()

    @router.on(Ping)
    async def record_ping(ctx: HandlerContext, ping: Ping) -> None:
        if fail_on is not None and ping.sequence in fail_on:
            raise ValueError(f"cannot handle sequence {ping.sequence}")
        await ctx.conn.execute("INSERT INTO pings VALUES ($1, $2)", ping.subject, ping.sequence)

    outbox = Outbox("outbox_consumer_test")
    # The consumer's topic names are already prefixed: hand it an unprefixed Topic.
    unprefixed = Topic(topic.removeprefix(settings.topic_prefix), 3, "key", "tests")
    consumer = EventConsumer(
        service="tests", settings=settings, pool=pool, outbox=outbox, router=router, topics=[unprefixed],
        name=f"tests-{topic}",
    )
    broker = KafkaBroker(settings.require_kafka(), logger=None)
    consumer.attach(broker)
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    relay = OutboxRelay(dsn, outbox.channel, producer, poll_interval_s=0.05)
    import asyncio

    relay_task = asyncio.create_task(relay.run())
    await broker.start()
    try:
        yield consumer, pool
    finally:
        await broker.stop()
        relay.stop()
        await relay_task
        await producer.stop()
        await pool.close()


def ping_record(subject: str, sequence: int) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
    envelope = new_envelope("tests", Ping(subject=subject, sequence=sequence), subject=subject)
    return envelope.key, envelope.data, envelope.headers()


async def test_the_same_event_twice_applies_once(settings: Settings) -> None:
    topic = await fresh_topic(settings)
    async with consuming(settings, topic) as (consumer, pool):
        twice = ping_record("r-1", 1)
        await produce(settings, topic, [twice, twice, ping_record("r-1", 2), twice])

        async def applied() -> bool:
            return consumer.stats.handled + consumer.stats.duplicates >= 4

        await eventually(applied)
        rows = await pool.fetch("SELECT subject, sequence FROM pings ORDER BY sequence")
        assert [(r["subject"], r["sequence"]) for r in rows] == [("r-1", 1), ("r-1", 2)]
        assert consumer.stats.duplicates == 2
        assert await pool.fetchval("SELECT count(*) FROM inbox WHERE status = 'done'") == 2


async def test_a_poison_record_is_parked_with_its_reason_and_the_stream_moves_on(settings: Settings) -> None:
    topic = await fresh_topic(settings)
    async with consuming(settings, topic) as (_, pool):
        key, _, headers = ping_record("r-2", 1)
        await produce(settings, topic, [(key, b"{not json", headers), ping_record("r-2", 2)])

        async def next_one_applied() -> bool:
            return bool(await pool.fetchval("SELECT count(*) FROM pings WHERE sequence = 2"))

        await eventually(next_one_applied)
        dead = await read_topic(settings, topic + ".dlq", until=lambda r: len(r) >= 1)
        assert len(dead) == 1
        headers_of_dead = dict(dead[0].headers)
        assert b"does not match" in headers_of_dead["dlq_reason"]
        assert headers_of_dead["dlq_service"] == f"tests-{topic}".encode()
        assert headers_of_dead["dlq_topic"] == topic.encode()
        assert headers_of_dead["ce_type"] == b"jp.nichiiki.tests.ping.v1"  # original headers kept
        assert dead[0].value == b"{not json"

        async def outbox_drained() -> bool:  # marked right after the broker's ack
            return int(await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")) == 0

        await eventually(outbox_drained)


async def test_a_record_with_a_header_that_is_not_utf8_is_parked_and_the_stream_moves_on(settings: Settings) -> None:
    # FastStream's batch parser read every header as UTF-8: such a record failed its whole batch,
    # again and again, before the kit could park it; the partition stood still.
    topic = await fresh_topic(settings)
    async with consuming(settings, topic) as (_, pool):
        key, value, headers = ping_record("r-3", 1)
        garbled = [(k, b"\xff\xfe" if k == "ce_subject" else v) for k, v in headers]
        await produce(settings, topic, [(key, value, garbled), ping_record("r-3", 2)])

        async def next_one_applied() -> bool:
            return bool(await pool.fetchval("SELECT count(*) FROM pings WHERE sequence = 2"))

        await eventually(next_one_applied)
        dead = await read_topic(settings, topic + ".dlq", until=lambda r: len(r) >= 1)
        assert len(dead) == 1
        assert dict(dead[0].headers)["dlq_reason"] == b"header ce_subject is not UTF-8"
        assert await pool.fetchval("SELECT count(*) FROM pings") == 1


async def test_a_failing_handler_is_retried_then_parked_and_replay_applies_it_after_the_fix(
    settings: Settings,
) -> None:
    topic = await fresh_topic(settings)
    failing = {13}
    async with consuming(settings, topic, fail_on=failing) as (consumer, pool):
        poison = ping_record("r-3", 13)
        await produce(settings, topic, [ping_record("r-3", 12), poison, ping_record("r-3", 14)])

        async def others_applied() -> bool:
            return await pool.fetchval("SELECT count(*) FROM pings") == 2 and consumer.stats.parked == 1

        await eventually(others_applied)
        dead = await read_topic(settings, topic + ".dlq", until=lambda r: len(r) >= 1)
        assert b"cannot handle sequence 13 (after 3 attempts)" in dict(dead[0].headers)["dlq_reason"]
        assert await pool.fetchval("SELECT status FROM inbox WHERE topic = $1 AND status = 'parked'", topic)

        # The parked record delivered again, as after a group reset to earliest (the handler still
        # fails): acknowledged as handled, neither run nor parked a second time.
        await produce(settings, topic, [poison])

        async def redelivery_acknowledged() -> bool:
            return consumer.stats.duplicates == 1

        await eventually(redelivery_acknowledged)
        assert consumer.stats.parked == 1
        assert await pool.fetchval("SELECT count(*) FROM outbox WHERE topic = $1", topic + ".dlq") == 1

        failing.clear()  # the fix is deployed
        assert await replay_dead_letters(settings, topic + ".dlq") == 1
        # Its progress is kept by the group the ops ACL allows (shared.contracts.acls).
        assert await group_offsets(settings, settings.topic(DLQ_REPLAY_GROUP), topic + ".dlq") == {0: 1}

        async def replayed() -> bool:
            return bool(await pool.fetchval("SELECT count(*) FROM pings WHERE sequence = 13"))

        await eventually(replayed)
        assert await pool.fetchval("SELECT count(*) FROM inbox WHERE status = 'parked'") == 0
        assert await pool.fetchval("SELECT count(*) FROM pings WHERE sequence = 13") == 1
        assert await replay_dead_letters(settings, topic + ".dlq") == 0  # nothing new to replay

        # One parked after a replay is the next replay's (the group's commit is where it starts).
        failing.add(15)
        await produce(settings, topic, [ping_record("r-3", 15)])

        async def parked_again() -> bool:
            return consumer.stats.parked == 2

        await eventually(parked_again)
        failing.clear()
        assert await replay_dead_letters(settings, topic + ".dlq") == 1

        async def fifteen_applied() -> bool:
            return bool(await pool.fetchval("SELECT count(*) FROM pings WHERE sequence = 15"))

        await eventually(fifteen_applied)


async def committed_offsets(settings: Settings, consumer: EventConsumer) -> dict[int, int]:
    """Partition → committed offset of the consumer's group on its one-partition topic."""
    return await group_offsets(settings, consumer.group_id, consumer.topics[0])


async def group_offsets(settings: Settings, group: str, topic: str) -> dict[int, int]:
    """Partition → committed offset of ``group`` on the one-partition ``topic``."""
    from aiokafka import TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group, partitions=[TopicPartition(topic, 0)])
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}


async def _handled(consumer: Any, count: int) -> bool:
    return bool(consumer.stats.handled >= count)


async def test_offsets_are_committed_once_per_interval_not_per_batch(settings: Settings) -> None:
    topic = await fresh_topic(settings, partitions=1)
    async with consuming(settings, topic) as (consumer, _):
        # The consumer takes part first (under load its join can outlast the whole send), then the
        # rest come one send at a time: several batches within one commit interval.
        await produce(settings, topic, [ping_record("r-4", 0)])
        await eventually(lambda: _handled(consumer, 1), timeout=60)
        await produce(settings, topic, [ping_record("r-4", i) for i in range(1, 20)])

        async def all_committed() -> bool:
            return consumer.stats.handled == 20 and await committed_offsets(settings, consumer) == {0: 20}

        await eventually(all_committed)  # the interval (100 ms) passed and the tail was committed
        assert consumer.stats.batches > 1
        assert consumer.stats.commits < consumer.stats.batches


async def test_a_graceful_stop_commits_what_was_applied(settings: Settings) -> None:
    topic = await fresh_topic(settings, partitions=1)
    lazy = settings.model_copy(update={"consumer_commit_interval_ms": 60_000})
    async with consuming(lazy, topic) as (consumer, _):
        await produce(settings, topic, [ping_record("r-5", i) for i in range(5)])

        async def applied() -> bool:
            return consumer.stats.handled == 5

        await eventually(applied)
        assert consumer.stats.commits == 0  # not yet: the interval is a minute
        assert await committed_offsets(settings, consumer) == {}
        consumer.stop()
        await consumer.flush_commits()
        assert await committed_offsets(settings, consumer) == {0: 5}
        assert consumer.stats.commits == 1
