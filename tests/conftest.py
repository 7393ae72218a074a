"""The test harness: one set of real backends per session, isolated names per session.

Backends are embedded (Tansu, PostgreSQL, Redis as child processes in a temporary folder) unless
``NICHIIKI_KAFKA_BOOTSTRAP`` / ``NICHIIKI_PG_DSN`` / ``NICHIIKI_REDIS_URL`` name external servers.
Every session uses its own database-name and topic-name prefix, so runs against shared external
servers never see each other's data; the session drops its databases when it ends.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from shared.kit.logging import configure_logging
from shared.kit.settings import Settings, with_database
from shared.stack.backends import Backends, start_backends

configure_logging("tests", fmt="console", level=os.environ.get("NICHIIKI_TEST_LOG_LEVEL", "WARNING"))
# The tests mint development tokens; the production mode has tests of its own (Settings(env=...)).
os.environ["NICHIIKI_ENV"] = "development"


@pytest.fixture(scope="session")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backends]:
    started = start_backends(tmp_path_factory.mktemp("stack"), Settings(), fixed_ports=False)
    yield started
    started.stop()


@pytest.fixture(scope="session")
def run_id() -> str:
    return "t" + uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def settings(backends: Backends, run_id: str) -> Settings:
    return make_settings(backends, run_id)


def make_settings(backends: Backends, run_id: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "kafka_bootstrap": backends.kafka_bootstrap,
        "partner_kafka_bootstrap": backends.partner_kafka_bootstrap,
        "pg_dsn": backends.pg_dsn,
        "redis_url": backends.redis_url,
        "db_prefix": f"nichiiki_{run_id}",
        "topic_prefix": f"{run_id}.",
        # A group join takes about half the session timeout on the embedded broker.
        "kafka_session_timeout_ms": 2000,
        "kafka_heartbeat_interval_ms": 500,
        "kafka_fetch_max_wait_ms": 10,
        # Idle consumers rest between fetches here too, briefly: a test's next event is not kept waiting.
        "consumer_idle_rest_ms": 20,
        "outbox_poll_interval_s": 0.2,
        "log_level": "WARNING",
        "gc_freeze_after_start": False,  # many runtimes share this process
        "env": "development",
    }
    values.update(overrides)
    return Settings.model_validate(values)


@pytest.fixture(scope="session", autouse=True)
async def _drop_session_databases(backends: Backends, run_id: str) -> AsyncIterator[None]:
    yield
    conn = await asyncpg.connect(with_database(backends.pg_dsn, "postgres"))
    try:
        names = await conn.fetch("SELECT datname FROM pg_database WHERE datname LIKE $1", f"nichiiki_{run_id}%")
        for row in names:
            await conn.execute(f'DROP DATABASE IF EXISTS "{row["datname"]}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
