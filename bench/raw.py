"""The raw limits of this machine and these backends, measured in the same run as the scenarios.

Every scenario figure in the report is divided by one of these, so a result reads as "what share
of what the broker / database / Redis alone can do here", which survives noisy, shared machines.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

import asyncpg
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.measure import Latencies


@dataclass
class RawLimits:
    kafka_produce_pipelined: float = 0.0
    kafka_produce_one_at_a_time: float = 0.0
    kafka_consume_batched: float = 0.0
    kafka_hop_p99_ms: float = 0.0
    pg_commit_1_conn: float = 0.0
    pg_commit_8_conn: float = 0.0
    pg_rows_100_per_tx_8_conn: float = 0.0
    redis_get_one_at_a_time: float = 0.0
    redis_get_pipelined: float = 0.0

    def rows(self) -> list[tuple[str, str]]:
        return [
            ("Kafka produce, pipelined (linger 5 ms)", f"{self.kafka_produce_pipelined:,.0f} msg/s"),
            ("Kafka produce, one send_and_wait at a time", f"{self.kafka_produce_one_at_a_time:,.0f} msg/s"),
            ("Kafka consume, getmany(500) + commit per batch", f"{self.kafka_consume_batched:,.0f} msg/s"),
            ("Kafka one event produce → consume, p99 (fetch wait 20 ms)", f"{self.kafka_hop_p99_ms:.1f} ms"),
            ("PostgreSQL single-row commit, 1 connection", f"{self.pg_commit_1_conn:,.0f} tx/s"),
            ("PostgreSQL single-row commit, 8 connections", f"{self.pg_commit_8_conn:,.0f} tx/s"),
            ("PostgreSQL 100-row transactions, 8 connections", f"{self.pg_rows_100_per_tx_8_conn:,.0f} rows/s"),
            ("Redis GET one at a time", f"{self.redis_get_one_at_a_time:,.0f} ops/s"),
            ("Redis GET pipelined by 100", f"{self.redis_get_pipelined:,.0f} ops/s"),
        ]


async def measure_kafka(bootstrap: str, limits: RawLimits, messages: int = 30_000) -> None:
    topic = f"bench.raw.{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, 4, 1)])
    await admin.close()
    value = b"x" * 200
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=256 * 1024)
    await producer.start()
    try:
        started = time.perf_counter()
        futures = [await producer.send(topic, value, key=str(i % 64).encode()) for i in range(messages)]
        await asyncio.gather(*futures)
        limits.kafka_produce_pipelined = messages / (time.perf_counter() - started)
    finally:
        await producer.stop()
    unlingered = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    await unlingered.start()
    try:
        count = 1_500
        started = time.perf_counter()
        for i in range(count):
            await unlingered.send_and_wait(topic, value, key=str(i).encode())
        limits.kafka_produce_one_at_a_time = count / (time.perf_counter() - started)
    finally:
        await unlingered.stop()

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=f"{topic}.g", auto_offset_reset="earliest",
        enable_auto_commit=False, session_timeout_ms=2000, heartbeat_interval_ms=500, fetch_max_wait_ms=20,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    try:
        total = messages + 1_500
        seen = 0
        first_batch_at: float | None = None
        while seen < total:
            batches = await consumer.getmany(timeout_ms=1000, max_records=500)
            if batches and first_batch_at is None:
                first_batch_at = time.perf_counter()
            seen += sum(len(b) for b in batches.values())
            if batches:
                await consumer.commit()
        limits.kafka_consume_batched = seen / (time.perf_counter() - (first_batch_at or time.perf_counter()))
    finally:
        await consumer.stop()
    limits.kafka_hop_p99_ms = await _kafka_hop(bootstrap, topic)


async def _kafka_hop(bootstrap: str, topic: str, samples: int = 200) -> float:
    hop_topic = topic + ".hop"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(hop_topic, 1, 1)])
    await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    consumer = AIOKafkaConsumer(
        hop_topic, bootstrap_servers=bootstrap, group_id=f"{hop_topic}.g", auto_offset_reset="earliest",
        session_timeout_ms=2000, heartbeat_interval_ms=500, fetch_max_wait_ms=20,
    )
    await producer.start()
    await consumer.start()
    latencies = Latencies()
    try:
        await producer.send_and_wait(hop_topic, b"warm-up")
        await consumer.getone()
        for _ in range(samples):
            sent = time.perf_counter()
            await producer.send_and_wait(hop_topic, b"ping")
            await consumer.getone()
            latencies.add(time.perf_counter() - sent)
    finally:
        await consumer.stop()
        await producer.stop()
    return latencies.p99


async def measure_postgres(dsn: str, limits: RawLimits) -> None:
    table = f"bench_raw_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(dsn)
    await admin.execute(f"CREATE TABLE {table} (id bigserial PRIMARY KEY, payload text NOT NULL)")
    try:
        count = 2_000
        started = time.perf_counter()
        for _ in range(count):
            await admin.execute(f"INSERT INTO {table} (payload) VALUES ($1)", "x" * 100)
        limits.pg_commit_1_conn = count / (time.perf_counter() - started)

        pool = await asyncpg.create_pool(dsn, min_size=8, max_size=8)
        try:
            per_connection = 800

            async def single_rows() -> None:
                async with pool.acquire() as conn:
                    for _ in range(per_connection):
                        await conn.execute(f"INSERT INTO {table} (payload) VALUES ($1)", "x" * 100)

            started = time.perf_counter()
            await asyncio.gather(*(single_rows() for _ in range(8)))
            limits.pg_commit_8_conn = 8 * per_connection / (time.perf_counter() - started)

            batches_per_connection = 25
            rows = [("x" * 100,) for _ in range(100)]

            async def hundred_rows() -> None:
                async with pool.acquire() as conn:
                    for _ in range(batches_per_connection):
                        async with conn.transaction():
                            await conn.executemany(f"INSERT INTO {table} (payload) VALUES ($1)", rows)

            started = time.perf_counter()
            await asyncio.gather(*(hundred_rows() for _ in range(8)))
            limits.pg_rows_100_per_tx_8_conn = 8 * batches_per_connection * 100 / (time.perf_counter() - started)
        finally:
            await pool.close()
    finally:
        await admin.execute(f"DROP TABLE {table}")
        await admin.close()


async def measure_redis(url: str, limits: RawLimits) -> None:
    client = aioredis.from_url(url)
    key = f"bench:raw:{uuid.uuid4().hex[:8]}"
    try:
        await client.set(key, b"x" * 300)
        count = 4_000
        started = time.perf_counter()
        for _ in range(count):
            await client.get(key)
        limits.redis_get_one_at_a_time = count / (time.perf_counter() - started)
        rounds = 200
        started = time.perf_counter()
        for _ in range(rounds):
            pipe = client.pipeline(transaction=False)
            for _ in range(100):
                pipe.get(key)
            await pipe.execute()
        limits.redis_get_pipelined = rounds * 100 / (time.perf_counter() - started)
    finally:
        await client.delete(key)
        await client.aclose()


async def measure_all(bootstrap: str, pg_dsn: str, redis_url: str) -> RawLimits:
    limits = RawLimits()
    await measure_kafka(bootstrap, limits)
    await measure_postgres(pg_dsn, limits)
    await measure_redis(redis_url, limits)
    return limits
