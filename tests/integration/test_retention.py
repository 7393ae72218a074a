"""Retention of the kit's tables, and parked inbox rows that stay parked until their replay."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import asyncpg
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from shared.kit.auth import ConfigurationError
from shared.kit.consumer import EventConsumer, EventRouter, HandlerContext, Run
from shared.kit.envelope import new_envelope
from shared.kit.inbox import DEAD_LETTER_ID_HEADER, REPLAY_HEADER
from shared.kit.metrics import EventMetrics
from shared.kit.outbox import Outbox
from shared.kit.retention import RetentionJob, RetentionPolicy, check_settings, redelivery_window
from shared.kit.service import ServiceRuntime
from shared.kit.settings import Settings, with_database
from tests.support import Ping, envelope_record, eventually, fresh_database

DAY = timedelta(days=1)
HOUR = timedelta(hours=1)


async def add_inbox_row(pool: asyncpg.Pool, status: str, age: timedelta) -> uuid.UUID:
    event_id = uuid.uuid4()
    await pool.execute(
        """
        INSERT INTO inbox (consumer, event_id, topic, status, received_at)
        VALUES ('c', $1, 't', $2, now() - $3::interval)
        """,
        event_id, status, age,
    )
    return event_id


async def add_idempotency_key(pool: asyncpg.Pool, age: timedelta) -> str:
    key = uuid.uuid4().hex
    await pool.execute(
        """
        INSERT INTO idempotency_keys (scope, key, request_hash, status_code, body, created_at)
        VALUES ('someone POST /v1/things', $1, 'h', 201, '{}', now() - $2::interval)
        """,
        key, age,
    )
    return key


async def add_outbox_row(pool: asyncpg.Pool, age: timedelta, *, published: bool) -> uuid.UUID:
    event_id = uuid.uuid4()
    await pool.execute(
        """
        INSERT INTO outbox (event_id, topic, key, header_names, header_values, payload, created_at, published_at)
        VALUES ($1, 't', NULL, '{}', '{}', 'x', now() - $2::interval, CASE WHEN $3 THEN now() - $2::interval END)
        """,
        event_id, age, published,
    )
    return event_id


def runtime_of(job: RetentionJob) -> SimpleNamespace:
    """What the metrics read of a runtime that runs ``job`` and nothing else."""
    return SimpleNamespace(consumers=[], relay_or_none=None, state={}, retention=job)


def scraped_pruned(runtime: object) -> dict[str, float]:
    """``nichiiki_rows_pruned_total`` by table, as /metrics exports it."""
    registry = CollectorRegistry()
    registry.register(EventMetrics(cast(Any, runtime)))
    values: dict[str, float] = {}
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith("nichiiki_rows_pruned_total{"):
            labels, value = line.split("} ")
            values[labels.split('table="')[1].rstrip('"')] = float(value)
    return values


async def test_rows_past_their_window_go_and_the_rest_stay(settings: Settings) -> None:
    dsn = await fresh_database(settings, "retention")
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        # A short inbox window, so that parked rows (kept until their dead letter has left the DLQ)
        # visibly outlive handled ones; a batch of two, so that a table takes several statements.
        policy = RetentionPolicy(
            inbox=DAY, parked=37 * DAY, idempotency_keys=24 * HOUR, outbox_published=HOUR, batch_size=2
        )
        old_done = {await add_inbox_row(pool, "done", 2 * DAY) for _ in range(3)}
        new_done = await add_inbox_row(pool, "done", HOUR)
        parked_young = await add_inbox_row(pool, "parked", 2 * DAY)
        parked_expired = await add_inbox_row(pool, "parked", 38 * DAY)
        old_key, new_key = await add_idempotency_key(pool, 25 * HOUR), await add_idempotency_key(pool, 23 * HOUR)
        sent_long_ago = await add_outbox_row(pool, 2 * HOUR, published=True)
        sent_just_now = await add_outbox_row(pool, timedelta(minutes=10), published=True)
        never_sent = await add_outbox_row(pool, 10 * DAY, published=False)

        job = RetentionJob(dsn, "retention-test", policy, interval_s=3600)
        assert await job.run_once() == {"inbox": 4, "idempotency_keys": 1, "outbox": 1}

        inbox_left = {r["event_id"] for r in await pool.fetch("SELECT event_id FROM inbox")}
        assert inbox_left == {new_done, parked_young}
        assert not old_done & inbox_left and parked_expired not in inbox_left
        assert {r["key"] for r in await pool.fetch("SELECT key FROM idempotency_keys")} == {new_key}
        assert old_key != new_key
        outbox_left = {r["event_id"] for r in await pool.fetch("SELECT event_id FROM outbox")}
        assert outbox_left == {sent_just_now, never_sent}  # a row not yet relayed is never pruned
        assert sent_long_ago not in outbox_left

        # Nothing left to prune: a second round deletes nothing, and the counter keeps its sum.
        assert await job.run_once() == {"inbox": 0, "idempotency_keys": 0, "outbox": 0}
        assert scraped_pruned(runtime_of(job)) == {"inbox": 4.0, "idempotency_keys": 1.0, "outbox": 1.0}
        assert (job.rounds, job.skipped) == (2, 0)
    finally:
        await pool.close()


async def test_two_replicas_prune_one_at_a_time(settings: Settings) -> None:
    dsn = await fresh_database(settings, "retention_lock")
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    policy = RetentionPolicy(inbox=DAY, parked=DAY, idempotency_keys=HOUR, outbox_published=HOUR, batch_size=10)
    first, second = (RetentionJob(dsn, "retention-lock", policy, interval_s=3600) for _ in range(2))
    other_service = RetentionJob(dsn, "another-service", policy, interval_s=3600)
    try:
        old = [await add_inbox_row(pool, "done", 2 * DAY) for _ in range(25)]
        # Hold one old row, so that the first replica's round stops in the middle, holding the lock.
        async with pool.acquire() as holder, holder.transaction():
            await holder.execute("SELECT 1 FROM inbox WHERE event_id = $1 FOR UPDATE", old[0])
            first_round = asyncio.create_task(first.run_once())

            async def first_is_pruning() -> bool:
                waiting = await pool.fetchval(
                    """
                    SELECT count(*) FROM pg_stat_activity
                    WHERE datname = current_database() AND wait_event_type = 'Lock'
                      AND query LIKE '%DELETE FROM inbox%'
                    """
                )
                return bool(waiting)

            await eventually(first_is_pruning)
            assert await second.run_once() is None  # the other replica skips this round
            assert (second.rounds, second.skipped) == (0, 1)
            assert await pool.fetchval("SELECT count(*) FROM inbox") > 0
        result = await first_round
        assert result is not None and result["inbox"] == 25
        assert await pool.fetchval("SELECT count(*) FROM inbox") == 0
        assert scraped_pruned(runtime_of(first))["inbox"] == 25
        assert scraped_pruned(runtime_of(second))["inbox"] == 0
        # The lock is per service, and it is released after the round: the next one gets it.
        assert await second.run_once() == {"inbox": 0, "idempotency_keys": 0, "outbox": 0}
        assert await other_service.run_once() is not None
    finally:
        await pool.close()


def test_an_inbox_that_forgets_before_the_broker_does_is_refused(settings: Settings) -> None:
    defaults = {name: Settings.model_fields[name].default for name in (
        "kafka_retention_ms", "kafka_dlq_retention_ms", "kafka_segment_ms", "inbox_retention_days",
    )}
    settings = settings.model_copy(update=defaults)  # whatever this environment sets
    check_settings(settings)  # the defaults: 60 days against 14 + 30 + 2 × 7
    assert redelivery_window(settings) == 58 * DAY
    assert RetentionPolicy.of(settings).parked >= timedelta(days=37)  # until the dead letter has gone
    with pytest.raises(ConfigurationError, match="NICHIIKI_INBOX_RETENTION_DAYS=30 is shorter than the 58 days"):
        check_settings(settings.model_copy(update={"inbox_retention_days": 30}))
    # Longer-lived topics need a longer inbox.
    with pytest.raises(ConfigurationError, match="shorter than the 74 days"):
        check_settings(settings.model_copy(update={"kafka_retention_ms": 30 * 86_400_000}))


async def test_a_runtime_refuses_to_start_with_a_short_inbox_retention(settings: Settings, tmp_path: Path) -> None:
    short = settings.model_copy(update={"inbox_retention_days": 7})
    runtime = ServiceRuntime("retention_refused", migrations=tmp_path, settings=short)
    with pytest.raises(ConfigurationError, match="NICHIIKI_INBOX_RETENTION_DAYS=7"):
        await runtime.start()
    # Refused before anything ran: not even its database was made.
    conn = await asyncpg.connect(with_database(settings.pg_dsn or "", "postgres"))
    try:
        assert not await conn.fetchval(
            "SELECT 1 FROM pg_database WHERE datname = $1", short.database_name("retention_refused")
        )
    finally:
        await conn.close()


async def test_every_runtime_prunes_in_the_background(settings: Settings, tmp_path: Path) -> None:
    often = settings.model_copy(update={"retention_interval_s": 0.1})
    runtime = ServiceRuntime(f"retention_{uuid.uuid4().hex[:6]}", migrations=tmp_path, settings=often)
    await runtime.start()
    try:
        stale = await add_inbox_row(runtime.pool, "done", 61 * DAY)
        fresh = await add_inbox_row(runtime.pool, "done", 59 * DAY)
        await add_idempotency_key(runtime.pool, 25 * HOUR)

        async def pruned() -> bool:
            job = runtime.retention  # a round may have begun before the rows were there: both counted
            return job is not None and job.pruned["inbox"] == 1 and job.pruned["idempotency_keys"] == 1

        await eventually(pruned)
        left = {r["event_id"] for r in await runtime.pool.fetch("SELECT event_id FROM inbox")}
        assert stale not in left and fresh in left
        assert scraped_pruned(runtime)["inbox"] == 1
    finally:
        await runtime.stop()


# --- Parked rows stay parked: only the replay of their dead letter runs them again ---------------


def ping_consumer(
    pool: asyncpg.Pool, settings: Settings, failing: set[int], *, many: bool
) -> tuple[EventConsumer, list[int]]:
    """A consumer that records pings in a table, and every handler call's ping in the list it
    returns with it; pings in ``failing`` fail.
    ``many``: through a set-based handler (``router.on_many``) instead of one at a time."""
    router = EventRouter()
    calls: list[int] = []

    async def record(conn: Any, ping: Ping) -> None:
        calls.append(ping.sequence)
        if ping.sequence in failing:
            raise ValueError(f"cannot handle sequence {ping.sequence}")
        await conn.execute("INSERT INTO pings VALUES ($1, $2)", ping.subject, ping.sequence)

    if many:
        @router.on_many(Ping)
        async def record_run(run: Run[Ping]) -> None:
            for _, ping in run:
                await record(run.conn, ping)
    else:
        @router.on(Ping)
        async def record_one(ctx: HandlerContext, ping: Ping) -> None:
            await record(ctx.conn, ping)

    consumer = EventConsumer(
        service="tests", settings=settings, pool=pool, outbox=Outbox("outbox_parked_test"), router=router,
        topics=[], name="parked-test",
    )
    return consumer, calls


async def dead_letters(pool: asyncpg.Pool) -> list[dict[str, bytes]]:
    rows = await pool.fetch("SELECT header_names, header_values FROM outbox WHERE topic LIKE '%.dlq' ORDER BY id")
    return [dict(zip(row["header_names"], row["header_values"], strict=True)) for row in rows]


@pytest.mark.parametrize("many", [False, True], ids=["one-at-a-time", "set-based"])
async def test_a_redelivered_parked_record_is_not_run_again_but_its_replay_is(settings: Settings, many: bool) -> None:
    dsn = await fresh_database(settings, "parked")
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        await pool.execute("CREATE TABLE pings (subject text, sequence int)")
        failing = {2}
        consumer, calls = ping_consumer(pool, settings, failing, many=many)
        topic = "test.parked.v1"
        poison = new_envelope("tests", Ping(subject="p", sequence=2), subject="p")
        fine = new_envelope("tests", Ping(subject="p", sequence=1), subject="p")
        await consumer.handle_batch([envelope_record(topic, 0, fine), envelope_record(topic, 1, poison)])
        assert consumer.stats.parked == 1
        [dead] = await dead_letters(pool)
        dead_letter_id = uuid.UUID(dead[DEAD_LETTER_ID_HEADER].decode())
        assert await pool.fetchval("SELECT dead_letter_id FROM inbox WHERE event_id = $1", poison.id) == dead_letter_id
        runs_when_parked = calls.count(2)

        # A group reset to earliest: both records again, in one batch and one by one.
        again = [envelope_record(topic, 0, fine), envelope_record(topic, 1, poison)]
        await consumer.handle_batch(again)
        for record in again:
            await consumer.handle_batch([record])
        assert calls.count(2) == runs_when_parked  # never run again
        assert consumer.stats.parked == 1 and len(await dead_letters(pool)) == 1  # no second dead letter
        assert consumer.stats.duplicates == 4
        assert await pool.fetchval("SELECT status FROM inbox WHERE event_id = $1", poison.id) == "parked"

        # The fix is deployed and the dead letter replayed (with the original beside it, as a group
        # that is re-reading would see both): it runs once, then is done.
        failing.clear()
        replay = envelope_record(topic, 2, poison)
        replay.headers.append((REPLAY_HEADER, str(dead_letter_id).encode()))
        await consumer.handle_batch([envelope_record(topic, 1, poison), replay])
        assert calls.count(2) == runs_when_parked + 1
        assert await pool.fetchval("SELECT count(*) FROM pings WHERE sequence = 2") == 1
        assert await pool.fetchval("SELECT status FROM inbox WHERE event_id = $1", poison.id) == "done"
        # ... and a re-read of the replay changes nothing.
        await consumer.handle_batch([replay])
        assert calls.count(2) == runs_when_parked + 1
    finally:
        await pool.close()


async def test_a_replay_that_parks_again_is_not_run_by_a_reread_of_that_replay(settings: Settings) -> None:
    dsn = await fresh_database(settings, "parked_twice")
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        await pool.execute("CREATE TABLE pings (subject text, sequence int)")
        consumer, calls = ping_consumer(pool, settings, {5}, many=False)
        topic = "test.parked.v1"
        poison = new_envelope("tests", Ping(subject="q", sequence=5), subject="q")
        await consumer.handle_batch([envelope_record(topic, 0, poison)])
        [first] = await dead_letters(pool)

        # Replayed before the fix: parked again, under a new dead letter.
        replay = envelope_record(topic, 1, poison)
        replay.headers.append((REPLAY_HEADER, first[DEAD_LETTER_ID_HEADER]))
        await consumer.handle_batch([replay])
        assert consumer.stats.parked == 2
        again, second = await dead_letters(pool)
        assert second[DEAD_LETTER_ID_HEADER] != first[DEAD_LETTER_ID_HEADER]
        assert REPLAY_HEADER not in second  # a dead letter never carries a replay mark onwards
        runs = calls.count(5)

        # A re-read of the first replay is not the second dead letter's replay: nothing runs.
        await consumer.handle_batch([replay])
        assert calls.count(5) == runs and consumer.stats.parked == 2
        assert await dead_letters(pool) == [again, second]
    finally:
        await pool.close()
