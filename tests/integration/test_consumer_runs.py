"""Set-based handlers: a run of consecutive events in one call, order and exactly-once kept."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg
from aiokafka import ConsumerRecord

from shared.contracts.base import EventData
from shared.contracts.topics import DLQ_SUFFIX
from shared.kit.consumer import EventConsumer, EventRouter, HandlerContext, distinct_runs
from shared.kit.envelope import new_envelope
from shared.kit.outbox import Outbox
from shared.kit.settings import Settings
from tests.support import TEST_TOPIC, Ping, envelope_record, fresh_database


class Pause(EventData, name="tests.pause", topic=TEST_TOPIC):
    subject: str


def record(data: EventData, offset: int, subject: str) -> ConsumerRecord[bytes, bytes]:
    return envelope_record(TEST_TOPIC.name, offset, new_envelope("tests", data, subject=subject))


async def consumer_with_runs(
    settings: Settings, runs: list[list[int]], fail_on: int | None = None
) -> tuple[EventConsumer, asyncpg.Pool]:
    """Pings are applied set-based (one INSERT per run), pauses one at a time, in one table."""
    pool = await asyncpg.create_pool(await fresh_database(settings, "runs"), min_size=1, max_size=2)
    await pool.execute("CREATE TABLE applied (position serial, what text)")
    router = EventRouter()

    @router.on_many(Ping)
    async def pings(items: Sequence[tuple[HandlerContext, Ping]]) -> None:
        if any(ping.sequence == fail_on for _, ping in items):
            raise ValueError(f"cannot handle sequence {fail_on}")
        runs.append([ping.sequence for _, ping in items])
        await items[0][0].conn.execute(
            "INSERT INTO applied (what) SELECT 'ping ' || s"
            " FROM unnest($1::int[]) WITH ORDINALITY AS t(s, n) ORDER BY n",
            [ping.sequence for _, ping in items],
        )

    @router.on(Pause)
    async def pause(ctx: HandlerContext, event: Pause) -> None:
        await ctx.conn.execute("INSERT INTO applied (what) VALUES ('pause')")

    consumer = EventConsumer(
        service="tests", settings=settings, pool=pool, outbox=Outbox("outbox_runs_test"), router=router,
        topics=[TEST_TOPIC], name="tests-runs",
    )
    return consumer, pool


async def applied(pool: asyncpg.Pool) -> list[str]:
    return [row["what"] for row in await pool.fetch("SELECT what FROM applied ORDER BY position")]


async def test_consecutive_events_reach_a_set_based_handler_as_runs_in_order(settings: Settings) -> None:
    runs: list[list[int]] = []
    consumer, pool = await consumer_with_runs(settings, runs)
    try:
        one = record(Ping(subject="a", sequence=1), 0, "a")
        batch = [
            one, record(Ping(subject="b", sequence=2), 1, "b"),
            record(Pause(subject="c"), 2, "c"),
            record(Ping(subject="d", sequence=3), 3, "d"), one, record(Ping(subject="e", sequence=4), 5, "e"),
        ]
        await consumer.handle_batch(batch)
        await consumer.handle_batch(batch)  # the whole batch again: nothing is applied twice

        assert runs == [[1, 2], [3, 4]]  # the pause between splits the run; the copy of 1 is not in it
        assert await applied(pool) == ["ping 1", "ping 2", "pause", "ping 3", "ping 4"]
        assert (consumer.stats.handled, consumer.stats.duplicates) == (5, 7)
    finally:
        await pool.close()


async def test_a_failing_event_in_a_run_is_parked_alone_and_the_others_apply(settings: Settings) -> None:
    runs: list[list[int]] = []
    consumer, pool = await consumer_with_runs(settings, runs, fail_on=2)
    try:
        await consumer.handle_batch([record(Ping(subject=s, sequence=i), i, s) for i, s in enumerate("abc", 1)])

        assert runs == [[1], [3]]  # re-run one event per savepoint: each a run of one
        assert await applied(pool) == ["ping 1", "ping 3"]
        dead = await pool.fetch("SELECT topic, header_names, header_values FROM outbox")
        assert [row["topic"] for row in dead] == [TEST_TOPIC.name + DLQ_SUFFIX]
        reason = dict(zip(dead[0]["header_names"], dead[0]["header_values"], strict=True))["dlq_reason"]
        assert b"cannot handle sequence 2" in reason
        assert consumer.stats.parked == 1
    finally:
        await pool.close()


def test_distinct_runs_split_where_a_key_repeats() -> None:
    keys = ["a", "b", "a", "c", "b", "b"]
    assert [list(run) for run in distinct_runs(keys, key=str)] == [["a", "b"], ["a", "c", "b"], ["b"]]
    assert list(distinct_runs([], key=str)) == []
