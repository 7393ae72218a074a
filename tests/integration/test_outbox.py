from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from shared.kit import outbox as outbox_module
from shared.kit.db import Connection
from shared.kit.envelope import new_envelope, parse_envelope
from shared.kit.outbox import Outbox, OutboxRelay, OutgoingRecord, pending_count
from shared.kit.settings import Settings
from tests.support import Ping, eventually, fresh_database, fresh_topic, read_topic

CHANNEL = "outbox_test"


@contextlib.asynccontextmanager
async def running(relay: OutboxRelay) -> AsyncIterator[OutboxRelay]:
    task = asyncio.create_task(relay.run())
    try:
        yield relay
    finally:
        relay.stop()
        await asyncio.wait_for(task, 10)


@pytest.fixture
async def producer(settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=2)
    await producer.start()
    yield producer
    await producer.stop()


async def add(conn: Connection, outbox: Outbox, topic: str, subject: str, sequence: int) -> str:
    envelope = new_envelope("tests", Ping(subject=subject, sequence=sequence), subject=subject)
    await outbox.add(conn, topic, envelope)
    return str(envelope.id)


def ids(records: list) -> list[str]:  # type: ignore[type-arg]
    return [str(parse_envelope(r.headers, r.value, r.key).id) for r in records]


async def test_a_rolled_back_transaction_publishes_nothing(settings: Settings, producer: AIOKafkaProducer) -> None:
    dsn, topic = await fresh_database(settings, "outbox"), await fresh_topic(settings)
    outbox = Outbox(CHANNEL)
    conn = await asyncpg.connect(dsn)
    try:
        with contextlib.suppress(RuntimeError):
            async with conn.transaction():
                await add(conn, outbox, topic, "a", 1)
                raise RuntimeError("the business rule failed after the event was written")
        async with conn.transaction():
            kept = await add(conn, outbox, topic, "a", 2)
        async with running(OutboxRelay(dsn, CHANNEL, producer, poll_interval_s=0.05)) as relay:
            records = await read_topic(settings, topic, until=lambda r: len(r) >= 1)
            await asyncio.sleep(0.3)  # a second record would have arrived by now
            records = await read_topic(settings, topic, until=lambda r: len(r) >= 2, timeout=0.5)
            assert relay.published == 1
        assert ids(records) == [kept]
        assert await pending_count(conn) == 0
    finally:
        await conn.close()


class CrashAfterPublish(OutboxRelay):
    """Dies once between publishing a batch and marking it, like a process killed at that instant."""

    crashed = False

    async def _mark_published(self, conn: Connection, row_ids: list[int]) -> None:
        if not self.crashed:
            CrashAfterPublish.crashed = True
            raise RuntimeError("killed between publish and mark")
        await super()._mark_published(conn, row_ids)


async def test_a_crash_between_publish_and_mark_re_sends(settings: Settings, producer: AIOKafkaProducer) -> None:
    dsn, topic = await fresh_database(settings, "outbox"), await fresh_topic(settings)
    outbox = Outbox(CHANNEL)
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            written = [await add(conn, outbox, topic, f"k{i}", i) for i in range(5)]
        async with running(CrashAfterPublish(dsn, CHANNEL, producer, poll_interval_s=0.05)):
            records = await read_topic(settings, topic, until=lambda r: len(r) >= 10)
        assert sorted(ids(records)) == sorted(written * 2)  # every event twice: at-least-once
        assert await pending_count(conn) == 0
    finally:
        await conn.close()


async def test_order_per_key_holds_and_the_relay_wakes_on_commit(
    settings: Settings, producer: AIOKafkaProducer
) -> None:
    dsn, topic = await fresh_database(settings, "outbox"), await fresh_topic(settings)
    outbox = Outbox(CHANNEL)
    pool = await asyncpg.create_pool(dsn, min_size=3, max_size=3)
    # Polling every 30 s: anything delivered sooner was woken by NOTIFY.
    relay = OutboxRelay(dsn, CHANNEL, producer, batch_size=7, poll_interval_s=30)
    try:
        async with running(relay):
            await asyncio.sleep(0.3)  # the relay is listening

            async def write_key(subject: str) -> None:
                for sequence in range(40):
                    async with pool.acquire() as conn, conn.transaction():
                        await add(conn, outbox, topic, subject, sequence)

            await asyncio.gather(*(write_key(s) for s in ("alpha", "beta", "gamma")))
            records = await read_topic(settings, topic, until=lambda r: len(r) >= 120, timeout=10)
        by_key: dict[str, list[int]] = {}
        for record in records:
            ping = parse_envelope(record.headers, record.value, record.key).decode(Ping)
            by_key.setdefault(ping.subject, []).append(ping.sequence)
        assert by_key == {s: list(range(40)) for s in ("alpha", "beta", "gamma")}
    finally:
        await pool.close()


async def test_only_one_relay_publishes_at_a_time(settings: Settings, producer: AIOKafkaProducer) -> None:
    dsn = await fresh_database(settings, "outbox")
    first = OutboxRelay(dsn, CHANNEL, producer, poll_interval_s=0.05)
    second = OutboxRelay(dsn, CHANNEL, producer, poll_interval_s=0.05)
    async with running(first), running(second):
        await asyncio.sleep(0.5)
        assert [first.is_leader, second.is_leader].count(True) == 1


async def test_a_tombstone_goes_out_with_a_null_value(settings: Settings, producer: AIOKafkaProducer) -> None:
    dsn, topic = await fresh_database(settings, "outbox"), await fresh_topic(settings)
    outbox = Outbox(CHANNEL)
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await outbox.add_record(conn, OutgoingRecord(topic, b"NCH-304018-2026-000001", [], None, str(uuid.uuid4())))
        async with running(OutboxRelay(dsn, CHANNEL, producer, poll_interval_s=0.05)):
            records = await read_topic(settings, topic, until=lambda r: len(r) >= 1)
        assert records[0].key == b"NCH-304018-2026-000001"
        assert records[0].value is None
    finally:
        await conn.close()


async def test_a_leading_relay_in_this_process_is_woken_directly_without_notify(
    settings: Settings, producer: AIOKafkaProducer
) -> None:
    dsn, topic = await fresh_database(settings, "outbox"), await fresh_topic(settings)
    outbox = Outbox(CHANNEL)
    relay = OutboxRelay(dsn, CHANNEL, producer, poll_interval_s=30)  # anything sooner was woken
    outbox.local_relay = relay
    heard: list[str] = []
    listener = await asyncpg.connect(dsn)
    await listener.add_listener(CHANNEL, lambda *args: heard.append(str(args[2])))
    conn = await asyncpg.connect(dsn)
    try:
        async with running(relay):
            for _ in range(100):
                if relay.is_leader:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)  # past the relay's first look at the (empty) table
            async with conn.transaction():
                written = await add(conn, outbox, topic, "a", 1)
            outbox.committed()
            records = await read_topic(settings, topic, until=lambda r: len(r) >= 1, timeout=5)
        assert ids(records) == [written]
        assert heard == []  # no NOTIFY: it would serialize commits server-wide
    finally:
        await conn.close()
        await listener.close()


async def test_a_record_with_a_partition_key_shares_that_keys_partition(
    settings: Settings, producer: AIOKafkaProducer
) -> None:
    dsn, topic = await fresh_database(settings, "outbox"), await fresh_topic(settings, partitions=6)
    outbox = Outbox(CHANNEL)
    numbers = [f"NCH-304018-2026-{n:06d}".encode() for n in range(1, 13)]
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await outbox.add_many(conn, [
                record
                for number in numbers
                for record in (
                    OutgoingRecord(topic, number, [], b"certificate", str(uuid.uuid4())),
                    OutgoingRecord(topic, number + b"/grant/1", [], b"grant", str(uuid.uuid4()), partition_key=number),
                )
            ])
        async with running(OutboxRelay(dsn, CHANNEL, producer, poll_interval_s=0.05)):
            records = await read_topic(settings, topic, until=lambda r: len(r) >= 24)
        partition_of = {r.key: r.partition for r in records}
        assert {partition_of[n] for n in numbers} != {partition_of[numbers[0]]}  # keys do spread
        for number in numbers:
            assert partition_of[number + b"/grant/1"] == partition_of[number]
    finally:
        await conn.close()


async def test_a_standing_by_relay_woken_asks_for_the_lead_once_a_poll_interval(
    settings: Settings, producer: AIOKafkaProducer
) -> None:
    """A second worker's relay stands by while the first leads. Its process commits outbox rows and
    hears NOTIFYs, which wake it: before, a wake left set made every wait end at once, and the
    standby asked PostgreSQL for the lead in a tight loop (a fifth of a core each, found by the bench)."""
    dsn = await fresh_database(settings, "outbox")
    async with running(OutboxRelay(dsn, CHANNEL, producer, poll_interval_s=0.2)) as leader:
        await eventually_leading(leader)
        async with running(OutboxRelay(dsn, CHANNEL, producer, poll_interval_s=0.2)) as standby:
            await asyncio.sleep(0.3)
            standby.wake()  # this process committed an outbox write
            before = standby.standby_rounds
            await asyncio.sleep(1.0)
            assert not standby.is_leader
            assert 1 <= standby.standby_rounds - before <= 7, standby.standby_rounds - before


async def eventually_leading(relay: OutboxRelay) -> None:
    for _ in range(100):
        if relay.is_leader:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the relay never took the lead")


class CountingMarks(OutboxRelay):
    """Counts the statements that only mark rows published (a round trip each)."""

    marks = 0

    async def _mark_published(self, conn: Connection, row_ids: list[int]) -> None:
        self.marks += 1
        await super()._mark_published(conn, row_ids)


async def test_under_load_a_round_marks_the_rounds_before_in_its_read(
    settings: Settings, producer: AIOKafkaProducer
) -> None:
    """A backlog of 62 rows, 5 a round: each round's read marks the round before's rows in the same
    statement, and only the last (2 rows) marks alone before the relay waits. Every row goes out once."""
    dsn, topic = await fresh_database(settings, "outbox"), await fresh_topic(settings)
    outbox = Outbox(CHANNEL)
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            written = [await add(conn, outbox, topic, f"k{i % 3}", i) for i in range(62)]
        relay = CountingMarks(dsn, CHANNEL, producer, batch_size=5, poll_interval_s=30)
        async with running(relay):
            records = await read_topic(settings, topic, until=lambda r: len(r) >= 62)
            for _ in range(100):
                if await pending_count(conn) == 0:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)  # a record sent twice would have arrived by now
            records = await read_topic(settings, topic, until=lambda r: len(r) > 62, timeout=0.5)
        assert sorted(ids(records)) == sorted(written), "each row once"
        assert relay.published == 62
        assert relay.marks == 1, relay.marks  # 13 rounds: 12 marked by the next round's read
        assert await pending_count(conn) == 0
    finally:
        await conn.close()


async def test_at_a_trickle_of_commits_a_round_marks_the_round_before_in_its_read(
    settings: Settings, producer: AIOKafkaProducer
) -> None:
    """Commits one at a time, each soon after the one before (as at 200 registrations/s): every
    round's read marks the round before's row in the same statement; only the last marks alone,
    once no commit came for a while. Every row goes out once and ends marked."""
    dsn, topic = await fresh_database(settings, "outbox"), await fresh_topic(settings)
    outbox = Outbox(CHANNEL)  # the relay hears of each commit by its NOTIFY
    conn = await asyncpg.connect(dsn)
    try:
        relay = CountingMarks(dsn, CHANNEL, producer, poll_interval_s=30)
        async with running(relay):
            await eventually_leading(relay)
            written = []
            for i in range(10):
                async with conn.transaction():
                    written.append(await add(conn, outbox, topic, f"k{i}", i))
                await asyncio.sleep(0.01)
            records = await read_topic(settings, topic, until=lambda r: len(r) >= 10)
            for _ in range(100):
                if await pending_count(conn) == 0:
                    break
                await asyncio.sleep(0.05)
            assert await pending_count(conn) == 0
        assert sorted(ids(records)) == sorted(written), "each row once"
        assert relay.published == 10
        # Alone each time, it was 10; a commit late on a busy machine may leave a row or two to mark alone.
        assert relay.marks <= 3, relay.marks
    finally:
        await conn.close()


class CountingRounds(OutboxRelay):
    """Counts the rounds that published something, and when each did."""

    rounds: list[tuple[float, int]]

    async def _relay_batch(self, conn: Connection, unmarked: list[int]) -> list[int]:
        published = await super()._relay_batch(conn, unmarked)
        if published:
            self.rounds = [*getattr(self, "rounds", []), (time.monotonic(), len(published))]
        return published


async def test_while_commits_keep_coming_a_round_gathers_them_and_after_a_quiet_spell_one_goes_at_once(
    settings: Settings, producer: AIOKafkaProducer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit after a quiet spell is relayed at once. One that comes soon after a round waits
    ``GATHER_S`` for the next: the commits of that pause go out in one round (here a long pause, so
    the timings are clear on a busy machine)."""
    monkeypatch.setattr(outbox_module, "GATHER_S", 0.4)
    monkeypatch.setattr(outbox_module, "MARK_LINGER_S", 1.0)  # the next commit surely comes "soon after"
    dsn, topic = await fresh_database(settings, "outbox"), await fresh_topic(settings)
    outbox = Outbox(CHANNEL)
    conn = await asyncpg.connect(dsn)

    async def commit(sequence: int) -> float:
        async with conn.transaction():
            await add(conn, outbox, topic, f"k{sequence}", sequence)
        return time.monotonic()

    try:
        relay = CountingRounds(dsn, CHANNEL, producer, poll_interval_s=30)
        async with running(relay):
            await eventually_leading(relay)
            alone = await commit(1)
            await eventually(lambda: _published(relay, 1), timeout=5)
            assert relay.rounds[0][0] - alone < 0.3, "after a quiet spell, at once"
            first = await commit(2)  # soon after that round: it gathers
            await commit(3)
            await commit(4)
            await eventually(lambda: _published(relay, 4), timeout=5)
        assert [rows for _, rows in relay.rounds] == [1, 3], relay.rounds
        assert relay.rounds[1][0] - first >= 0.4
    finally:
        await conn.close()


async def _published(relay: OutboxRelay, rows: int) -> bool:
    return relay.published >= rows


@pytest.mark.parametrize("relay_here", [True, False], ids=["relay-here", "relay-elsewhere"])
async def test_records_written_together_are_stored_as_one_at_a_time_would_store_them(
    settings: Settings, producer: AIOKafkaProducer, relay_here: bool
) -> None:
    """``add_many`` writes several records in one statement over arrays: each keeps its own headers
    (records carry different numbers of them, none at all, Trace Context or not), the records'
    order is the outbox's order, and an event already there or repeated is kept once. A relay in
    another process hears of them by a NOTIFY in the same statement."""
    dsn = await fresh_database(settings, "outbox")
    outbox = Outbox(CHANNEL)
    if relay_here:
        outbox.local_relay = OutboxRelay(dsn, CHANNEL, producer)  # leads, never run
        outbox.local_relay.is_leader = True
    heard: list[str] = []
    listener = await asyncpg.connect(dsn)
    await listener.add_listener(CHANNEL, lambda *args: heard.append(args[2]))
    ids_ = [str(uuid.uuid4()) for _ in range(5)]
    records = [
        OutgoingRecord("t.a", b"k1", [("ce_id", b"1"), ("traceparent", b"00-ab-cd-01"), ("ce_type", b"x")], b"v1",
                       ids_[0]),
        OutgoingRecord("t.b", None, [], None, ids_[1], partition_key=b"k1"),  # a tombstone without headers
        OutgoingRecord("t.a", b"k3", [("traceparent", b"00-ef-01-01"), ("tracestate", b"a=1")], b"v3", ids_[2]),
        OutgoingRecord("t.a", b"k4", [("ce_id", b"4")], b"v4", ids_[3]),
        OutgoingRecord("t.a", b"again", [("ce_id", b"5")], b"repeated", ids_[3]),  # the same event again
        OutgoingRecord("t.a", b"k5", [("n", b"1"), ("m", b"2")], b"v5", ids_[4]),
    ]
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await outbox.add_record(conn, OutgoingRecord("t.a", b"k0", [("ce_id", b"0")], b"first", ids_[4]))
        async with conn.transaction():
            await outbox.add_many(conn, records)
        rows = await conn.fetch(
            "SELECT event_id::text, topic, key, header_names, header_values, payload, partition_key, traceparent,"
            " tracestate FROM outbox ORDER BY id"
        )
        await asyncio.sleep(0.2)
    finally:
        await conn.close()
        await listener.close()
    assert heard == ([] if relay_here else [CHANNEL, CHANNEL])
    assert [tuple(row) for row in rows] == [
        (ids_[4], "t.a", b"k0", ["ce_id"], [b"0"], b"first", None, None, None),  # already there: kept as it was
        (ids_[0], "t.a", b"k1", ["ce_id", "ce_type"], [b"1", b"x"], b"v1", None, "00-ab-cd-01", None),
        (ids_[1], "t.b", None, [], [], None, b"k1", None, None),
        (ids_[2], "t.a", b"k3", [], [], b"v3", None, "00-ef-01-01", "a=1"),
        (ids_[3], "t.a", b"k4", ["ce_id"], [b"4"], b"v4", None, None, None),
    ]
