"""A consumer group the broker keeps everyone out of is joined again by the kit, offsets kept.

The embedded broker (Tansu) keeps a group's leader through a LeaveGroup while the group is forming:
when the two members of a group stop gracefully and the leader leaves last, the empty group keeps a
leader that is gone, and every later JoinGroup is answered with it and every SyncGroup refused
(docs/faults.md, ``shared/kit/group_join.py``). Subsidy's trip consumers are such a group.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer
from faststream.kafka import KafkaBroker

from shared.contracts.topics import Topic
from shared.kit.consumer import EventConsumer, EventRouter, HandlerContext
from shared.kit.envelope import new_envelope
from shared.kit.group_join import release_departed_leader
from shared.kit.kafka_admin import ensure_topics
from shared.kit.migrations import migrate_service
from shared.kit.outbox import Outbox, notify_channel
from shared.kit.service import ConsumerSpec, ServiceRuntime
from shared.kit.settings import Settings, with_database
from shared.stack.backends import Backends
from tests.conftest import make_settings
from tests.support import Ping, RawRecord, eventually, produce

pytestmark = pytest.mark.timeout(120)

#: Past this a member that has not joined is kept out (a join takes ~1 s at the tests' 2 s session).
JOIN_TIMEOUT_MS = 5_000
#: How long a plain client is given to join the group that the broker keeps it out of.
KEPT_OUT_S = 6.0


def ping(sequence: int) -> RawRecord:
    envelope = new_envelope("tests", Ping(subject=f"r-{sequence}", sequence=sequence), subject=f"r-{sequence}")
    return envelope.key, envelope.data, envelope.headers()


def pings_router() -> EventRouter:
    router = EventRouter()

    @router.on(Ping)
    async def record_ping(ctx: HandlerContext, event: Ping) -> None:
        await ctx.conn.execute("INSERT INTO pings VALUES ($1, $2)", event.subject, event.sequence)

    return router


async def kept_out(settings: Settings, topic: str, group: str) -> bool:
    """Whether a plain client (not the kit) fails to join ``group`` within ``KEPT_OUT_S``."""
    plain = AIOKafkaConsumer(
        topic, bootstrap_servers=settings.kafka_bootstrap, group_id=group, enable_auto_commit=False,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
    )
    try:
        await asyncio.wait_for(plain.start(), KEPT_OUT_S)  # aiokafka's start returns once it joined
        return False
    except TimeoutError:
        return True
    finally:
        await plain.stop()


async def test_a_group_whose_leader_left_last_is_joined_again_from_its_committed_offsets(
    backends: Backends, run_id: str, tmp_path: Path
) -> None:
    s = make_settings(backends, run_id, consumer_join_timeout_ms=JOIN_TIMEOUT_MS)
    service, name = f"rejoin_{uuid.uuid4().hex[:6]}", "rejoin-trips"
    topic = Topic(f"test.rejoin.{uuid.uuid4().hex[:8]}.v1", 4, "subject", "tests")
    await ensure_topics(s, [topic])
    full_topic, group = s.topic(topic.name), s.topic(f"nichiiki.{name}")
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    (migrations / "001_pings.sql").write_text("CREATE TABLE pings (subject text, sequence int);\n")
    dsn = s.database_dsn(service)
    await migrate_service(dsn, with_database(s.pg_dsn or "", "postgres"), s.database_name(service), migrations)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
    try:
        # First life: two members of one group (as subsidy's trip consumers), each on its own
        # broker client so they can stop in a chosen order. The first to join leads the group.
        outbox = Outbox(notify_channel(s.database_name(service)))
        members = [
            EventConsumer(service=service, settings=s, pool=pool, outbox=outbox, router=pings_router(),
                          topics=[topic], name=name)
            for _ in range(2)
        ]
        clients = [KafkaBroker(s.require_kafka(), logger=None) for _ in members]
        for member, client in zip(members, clients, strict=True):
            member.attach(client)
            await client.start()
        await produce(s, full_topic, [ping(n) for n in range(1, 5)])

        async def first_four_applied() -> bool:
            return int(await pool.fetchval("SELECT count(*) FROM pings")) == 4

        await eventually(first_four_applied)
        # A graceful stop as ServiceRuntime.stop does it (offsets committed, then the group left),
        # the leader last: the broker keeps the departed leader, and nobody can join any more.
        for member in members:
            member.stop()
            await member.flush_commits()
        for client in reversed(clients):
            await client.stop()
        assert await kept_out(s, full_topic, group), "the broker let a client into the group: not reproduced"

        await produce(s, full_topic, [ping(n) for n in range(5, 9)])  # sent while nobody consumes

        # Second life: the same group in a service runtime. Its start waits for the joins; it must
        # get in by itself, and say on /readyz that the group kept it out meanwhile.
        spec = ConsumerSpec(pings_router(), [topic], name=name)
        runtime = ServiceRuntime(service, migrations=migrations, consumers=[spec, spec], settings=s)
        start = asyncio.create_task(runtime.start())
        reported_out = False
        try:
            async with asyncio.timeout(60):
                while not start.done():
                    checks = await runtime.readiness.run()
                    reported_out = reported_out or checks.get(f"consumer group {group}") is False
                    await asyncio.sleep(0.1)
                await start

            async def all_eight_applied() -> bool:
                return int(await pool.fetchval("SELECT count(*) FROM pings")) == 8

            await eventually(all_eight_applied, timeout=30)
            assert reported_out, "/readyz never reported the group that kept the consumers out"
            assert all((await runtime.readiness.run()).values())
            rows = await pool.fetch("SELECT sequence FROM pings ORDER BY sequence")
            assert [row["sequence"] for row in rows] == list(range(1, 9))  # each once
            # The group's committed offsets were kept: the events of the first life were not read
            # again (nor was anything skipped: the four sent meanwhile were applied).
            assert sum(c.stats.handled for c in runtime.consumers) == 4
            assert sum(c.stats.duplicates for c in runtime.consumers) == 0
        finally:
            if not start.done():
                start.cancel()
            await runtime.stop()
    finally:
        await pool.close()


async def test_the_release_leaves_a_group_whose_leader_is_a_member_alone(settings: Settings) -> None:
    topic = Topic(f"test.rejoin.{uuid.uuid4().hex[:8]}.v1", 2, "subject", "tests")
    await ensure_topics(settings, [topic])
    full_topic, group = settings.topic(topic.name), settings.topic(f"nichiiki.rejoin-{uuid.uuid4().hex[:6]}")
    member = AIOKafkaConsumer(
        full_topic, bootstrap_servers=settings.kafka_bootstrap, group_id=group, enable_auto_commit=False,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
        auto_offset_reset="earliest",
    )
    await member.start()
    try:
        outcome = await release_departed_leader(
            settings.require_kafka(), group, [full_topic], session_timeout_ms=settings.kafka_session_timeout_ms
        )
        assert not outcome.released
        assert outcome.outcome == "the group's leader is a live member"
        # The probe's join and leave were a rebalance like any other: the member still consumes.
        await produce(settings, full_topic, [ping(1)])
        offsets: list[int] = []

        async def read() -> bool:
            batches = await member.getmany(timeout_ms=200)
            offsets.extend(record.offset for batch in batches.values() for record in batch)
            return bool(offsets)

        await eventually(read, timeout=20)
        assert offsets == [0]
    finally:
        await member.stop()
