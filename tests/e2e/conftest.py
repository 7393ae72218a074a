"""End-to-end fixtures: the services as their own processes over servers this module owns.

Fault tests kill and restart the broker and PostgreSQL, so they always run on embedded servers
of their own, whatever the environment names (a shared external server is not ours to kill).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.cli.fleet import ServiceFleet
from shared.kit.settings import Settings
from shared.stack.backends import Backends, start_backends
from tests.conftest import make_settings


@pytest.fixture(scope="module")
def own_backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backends]:
    embedded = Settings().model_copy(
        update={"kafka_bootstrap": None, "partner_kafka_bootstrap": None, "pg_dsn": None, "redis_url": None}
    )
    backends = start_backends(tmp_path_factory.mktemp("own-stack"), embedded, fixed_ports=False)
    yield backends
    backends.stop()


@pytest.fixture(scope="module")
def own_settings(own_backends: Backends) -> Settings:
    return make_settings(own_backends, "f" + uuid.uuid4().hex[:7])


def new_fleet(settings: Settings, backends: Backends, logs: Path, smtp_url: str | None = None) -> ServiceFleet:
    return ServiceFleet(settings, backends, logs, smtp_url=smtp_url)
