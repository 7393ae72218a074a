"""Metrics: the registry every app gets (process and GC metrics kept, component counters), /metrics
with two real HTTP workers summing both, and the relay's backlog, oldest age and dead-letter counts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaProducer
from fastapi import APIRouter, FastAPI
from prometheus_client import Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shared.kit.http import create_app
from shared.kit.kafka_security import KafkaConnection
from shared.kit.metrics import AppRegistry, EventMetrics, OutcomeCounters
from shared.kit.outbox import OutboxRelay
from shared.kit.settings import Settings
from tests.support import eventually, fresh_database, fresh_topic

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Pings:
    served: int = field(default=1)  # every worker reports 1: the sum is the number of workers


def two_worker_app() -> FastAPI:
    """The app each of the two uvicorn workers builds: the kit's app, a route telling its pid, and a
    scrape-time counter of its own (mirrored across workers)."""
    router = APIRouter()

    @router.get("/pid")
    async def pid() -> dict[str, int]:
        return {"pid": os.getpid()}

    app = create_app(service="registration", settings=Settings(), routers=[router])
    app.state.metrics_registry.register(OutcomeCounters("nichiiki_test_workers", "workers", Pings))
    return app


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


@dataclass
class Stats:
    sent: int = 0
    failed: int = 0


def registry_samples(registry: AppRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(registry.render().decode())
        for s in family.samples
    }


def test_an_app_registry_exports_process_gc_and_platform_metrics() -> None:
    names = {name for name, _ in registry_samples(AppRegistry())}
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"} <= names
    assert "python_gc_objects_collected_total" in names and "python_info" in names


def test_component_counters_are_read_at_scrape_time_by_outcome() -> None:
    registry, stats = AppRegistry(), Stats()
    registry.register(OutcomeCounters("nichiiki_email_messages", "e-mails", lambda: stats))
    stats.sent, stats.failed = 3, 1
    found = registry_samples(registry)
    assert found[("nichiiki_email_messages_total", (("outcome", "sent"),))] == 3
    assert found[("nichiiki_email_messages_total", (("outcome", "failed"),))] == 1


def test_scrape_time_collectors_are_set_aside_for_the_mirror_and_metric_objects_are_not() -> None:
    registry = AppRegistry()
    component = OutcomeCounters("nichiiki_things", "things", Stats)
    registry.register(component)
    Counter("nichiiki_requests", "requests", registry=registry).inc()
    assert component in registry.scrape_time
    assert not any(isinstance(c, Counter) for c in registry.scrape_time)
    assert registry.multiprocess is False  # this test process runs one worker
    assert b"nichiiki_requests_total 1.0" in generate_latest(registry)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_metrics_with_two_workers_sum_the_counters_of_both(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "NICHIIKI_ENV": "development"}
    server = subprocess.Popen(  # noqa: ASYNC220 (started once, then only awaited over HTTP)
        [sys.executable, "-m", "uvicorn", "tests.integration.test_metrics:two_worker_app", "--factory",
         "--workers", "2", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        pids: set[int] = set()
        sent = 0
        deadline = time.monotonic() + 60
        # A new connection per request: the two workers accept from one socket, so both serve some.
        async with httpx.AsyncClient(base_url=base, limits=httpx.Limits(max_keepalive_connections=0)) as client:
            while len(pids) < 2 and time.monotonic() < deadline:
                try:
                    answers = await asyncio.gather(*(client.get("/pid") for _ in range(20)))
                except httpx.TransportError:
                    await asyncio.sleep(0.2)  # not listening yet
                    continue
                sent += len(answers)
                pids |= {a.json()["pid"] for a in answers}
            assert len(pids) == 2, "both workers served requests"

            async def summed() -> bool:
                found = samples((await client.get("/metrics")).text)
                return found.get(("nichiiki_test_workers_total", (("outcome", "served"),))) == 2

            await eventually(summed, timeout=10, interval=0.2)  # the mirror copies every second
            for _ in range(4):  # whichever worker answers, the sums are the same
                found = samples((await client.get("/metrics")).text)
                requests = found[("http_requests_total", (("method", "GET"), ("route", "/pid"), ("status", "200")))]
                assert requests == sent
                assert found[("nichiiki_test_workers_total", (("outcome", "served"),))] == 2
                memory = {labels for name, labels in found if name == "process_resident_memory_bytes"}
                assert {dict(labels)["pid"] for labels in memory} == {str(p) for p in pids}
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        assert server.stderr is not None
        server.stderr.close()


@pytest.mark.stack
async def test_the_relay_samples_its_backlog_and_counts_dead_letters(settings: Settings) -> None:
    dsn = await fresh_database(settings, "metrics")
    topic = await fresh_topic(settings, partitions=1)
    conn = await asyncpg.connect(dsn)
    producer = AIOKafkaProducer(**KafkaConnection.internal(settings).aiokafka_kwargs(), acks="all")
    await producer.start()
    relay = OutboxRelay(dsn, "unused", producer, poll_interval_s=0.05, sample_interval_s=0.0)
    runtime: Any = SimpleNamespace(consumers=[], relay_or_none=relay, state={})
    try:
        await conn.executemany(
            "INSERT INTO outbox (event_id, topic, key, header_names, header_values, payload, created_at)"
            " VALUES (gen_random_uuid(), $1, 'k', '{}', '{}', 'v', now() - interval '30 seconds')",
            [(topic,), (topic,), (topic + ".dlq",)],
        )
        async with asyncio.timeout(5):
            await relay._sample_backlog(conn)
        assert relay.backlog == 3 and relay.oldest_age_s is not None and 29 <= relay.oldest_age_s < 60
        task = asyncio.create_task(relay.run())
        try:
            await eventually(lambda: _true(relay.published == 3), timeout=15)
            await eventually(lambda: _true(relay.backlog == 0), timeout=5)
        finally:
            relay.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 5)
        found = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in EventMetrics(runtime).collect() for s in family.samples
        }
        assert found[("nichiiki_dead_letters_total", (("topic", topic + ".dlq"),))] == 1
        assert ("nichiiki_dead_letters_total", (("topic", topic),)) not in found
        assert found[("nichiiki_outbox_published_total", ())] == 3
    finally:
        await producer.stop()
        await conn.close()


async def _true(value: bool) -> bool:
    return value
