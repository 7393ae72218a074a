"""What a batch costs the consumer: how records are polled into batches, and what a batch that has
nothing for this consumer (or writes nothing) leaves undone."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from shared.contracts.topics import Topic
from shared.kit import consumer as kit_consumer
from shared.kit.consumer import EventConsumer, EventRouter, HandlerContext, _BatchPoll
from shared.kit.envelope import new_envelope
from shared.kit.outbox import Outbox
from shared.kit.settings import Settings
from tests.support import Ping, broker_record, envelope_record, fresh_database, query_logging_pool

TP = TopicPartition("t", 0)


class Polls:
    """The aiokafka consumer as a poll sees it: ``getmany`` answers in turn, each call noted."""

    def __init__(self, answers: Sequence[list[int]]) -> None:
        self.answers = list(answers)
        self.calls: list[int] = []

    async def getmany(self, *, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Any]]:
        self.calls.append(timeout_ms)
        offsets = self.answers.pop(0) if self.answers else []
        if not offsets:
            return {}
        return {TP: [broker_record(TP.topic, offset, b"k", b"v", []) for offset in offsets]}


async def test_a_poll_that_finds_nothing_listens_the_whole_time_and_never_sleeps_after() -> None:
    polls = Polls([[]])
    begun = time.monotonic()
    assert await _BatchPoll(500)(polls) == ()
    # the one wait is the broker client's, listening; FastStream's own poll then slept as long, deaf
    assert polls.calls == [kit_consumer.POLL_TIMEOUT_MS]
    assert time.monotonic() - begun < 0.05


async def test_a_poll_hands_over_what_was_fetched_at_once() -> None:
    polls = Polls([[1, 2]])
    begun = time.monotonic()
    assert [r.offset for r in await _BatchPoll(500)(polls)] == [1, 2]
    assert len(polls.calls) == 1 and time.monotonic() - begun < 0.05


class CountingRelay:
    is_leader = True

    def __init__(self) -> None:
        self.wakes = 0

    def wake(self) -> None:
        self.wakes += 1


class NoPool:
    def acquire(self) -> Any:
        raise AssertionError("a batch with nothing for this consumer must not open a transaction")


def other_record(offset: int) -> ConsumerRecord[bytes, bytes]:
    """A record of a type this consumer does not handle; its time is not even readable."""
    envelope = new_envelope("tests", Ping(subject="s", sequence=offset), subject="s")
    headers = [(k, b"yesterday" if k == "ce_time" else v) for k, v in envelope.headers()]
    headers = [(k, b"jp.nichiiki.tests.other.v1" if k == "ce_type" else v) for k, v in headers]
    return broker_record("t", offset, envelope.key, envelope.data, headers)


async def test_records_of_types_nobody_here_handles_are_skipped_unread_without_a_transaction() -> None:
    consumer = EventConsumer(
        service="tests", settings=Settings(), pool=NoPool(), outbox=Outbox("unused"),  # type: ignore[arg-type]
        router=EventRouter(), topics=[Topic("t", 1, "key", "tests")],
    )
    await consumer.handle_batch([other_record(offset) for offset in range(3)])
    assert (consumer.stats.skipped, consumer.stats.parked, consumer.stats.batches) == (3, 0, 1)


async def test_a_batch_that_emits_nothing_wakes_no_relay_and_one_that_emits_does(settings: Settings) -> None:
    dsn = await fresh_database(settings, "consumer_batches")
    statements: list[str] = []
    pool = await query_logging_pool(dsn, lambda query: statements.append(query.query))
    try:
        await pool.execute("CREATE TABLE pings (subject text, sequence int)")
        router = EventRouter()

        @router.on(Ping)
        async def record_ping(ctx: HandlerContext, ping: Ping) -> None:
            await ctx.conn.execute("INSERT INTO pings VALUES ($1, $2)", ping.subject, ping.sequence)
            if ping.sequence >= 10:
                await ctx.emit(Topic("echoes", 1, "key", "tests"), ping, subject=ping.subject)

        relay = CountingRelay()
        outbox = Outbox("outbox_consumer_batches")
        outbox.local_relay = relay  # type: ignore[assignment]
        consumer = EventConsumer(
            service="tests", settings=settings, pool=pool, outbox=outbox, router=router,
            topics=[Topic("t", 1, "key", "tests")], name="tests-batches",
        )

        def ping(sequence: int) -> ConsumerRecord[bytes, bytes]:
            return envelope_record("t", sequence, new_envelope("tests", Ping(subject="s", sequence=sequence),
                                                               subject="s"))

        await consumer.handle_batch([ping(1), ping(2), other_record(3)])
        assert relay.wakes == 0
        assert await pool.fetchval("SELECT count(*) FROM pings") == 2
        await consumer.handle_batch([ping(10), ping(4)])
        assert relay.wakes == 1  # the echo is in the outbox: its relay looks at once
        assert await pool.fetchval("SELECT count(*) FROM outbox") == 1
        assert (consumer.stats.handled, consumer.stats.skipped) == (4, 1)
    finally:
        await pool.close()
