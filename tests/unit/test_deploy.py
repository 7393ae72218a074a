"""The deployment files, checked by reading them (no Docker needed)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.contracts.topics import SERVICES

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
INIT_SQL = ROOT / "deploy" / "postgres" / "init.sql"

ENV_VARS = {
    "NICHIIKI_KAFKA_BOOTSTRAP": "kafka:9092",
    "NICHIIKI_PG_DSN": "postgresql://nichiiki:nichiiki@postgres:5432/nichiiki",
    "NICHIIKI_REDIS_URL": "redis://redis:6379/0",
    "NICHIIKI_SMTP_URL": "smtp://mailpit:1025",
    # production: tokens only from the identity service, never the development key
    "NICHIIKI_ENV": "production",
    "NICHIIKI_OIDC_ISSUER": "http://identity:8000",
    "NICHIIKI_LOG_FORMAT": "json",
    # the healthcheck and the port mapping need the server on all interfaces, port 8000
    "NICHIIKI_HTTP_HOST": "0.0.0.0",
    "NICHIIKI_HTTP_PORT": "8000",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def _container(compose: dict[str, Any], service: str) -> dict[str, Any]:
    """The compose entry running ``services.<service>`` (compose names use dashes, modules underscores)."""
    name = service.replace("_", "-")
    assert name in compose["services"], f"no container for {service}"
    entry = compose["services"][name]
    assert isinstance(entry, dict)
    return entry


def _environment(entry: dict[str, Any]) -> dict[str, str]:
    environment = entry.get("environment", {})
    if isinstance(environment, list):
        return dict(item.split("=", 1) for item in environment)
    return {key: str(value) for key, value in environment.items()}


def _depends_on(entry: dict[str, Any]) -> dict[str, Any]:
    depends_on = entry.get("depends_on", {})
    if isinstance(depends_on, list):
        return {name: {} for name in depends_on}
    assert isinstance(depends_on, dict)
    return depends_on


def _command(entry: dict[str, Any]) -> list[str]:
    command = entry["command"]
    return command.split() if isinstance(command, str) else [str(part) for part in command]


@pytest.mark.parametrize("service", SERVICES)
def test_service_is_built_from_the_shared_dockerfile(compose: dict[str, Any], service: str) -> None:
    entry = _container(compose, service)
    build = entry["build"]
    assert isinstance(build, dict)
    assert (ROOT / build.get("context", ".")).resolve() == ROOT
    assert (ROOT / build.get("context", ".") / build["dockerfile"]).resolve() == DOCKERFILE


@pytest.mark.parametrize("service", SERVICES)
def test_service_runs_its_module(compose: dict[str, Any], service: str) -> None:
    assert _command(_container(compose, service)) == ["python", "-m", f"services.{service}"]


@pytest.mark.parametrize("service", SERVICES)
def test_service_environment(compose: dict[str, Any], service: str) -> None:
    environment = _environment(_container(compose, service))
    assert "NICHIIKI_JWT_SECRET" not in environment  # the development key has no place in a deployment
    for name, expected in ENV_VARS.items():
        assert environment.get(name), f"{service}: {name} is not set"
        if expected is not None:
            assert environment[name] == expected, name


@pytest.mark.parametrize("service", SERVICES)
def test_service_waits_for_healthy_infrastructure(compose: dict[str, Any], service: str) -> None:
    depends_on = _depends_on(_container(compose, service))
    for dependency in ("kafka", "postgres", "redis"):
        assert dependency in depends_on, f"{service} does not depend on {dependency}"
        assert depends_on[dependency].get("condition") == "service_healthy"
        assert "healthcheck" in compose["services"][dependency]


def test_notification_waits_for_mailpit(compose: dict[str, Any]) -> None:
    assert _depends_on(_container(compose, "notification"))["mailpit"]["condition"] == "service_healthy"


@pytest.mark.parametrize("service", SERVICES)
def test_service_healthcheck_calls_healthz(compose: dict[str, Any], service: str) -> None:
    test = _container(compose, service)["healthcheck"]["test"]
    text = " ".join(test) if isinstance(test, list) else test
    assert "python" in text
    assert "urllib" in text
    assert "http://127.0.0.1:8000/healthz" in text or "http://localhost:8000/healthz" in text


def test_service_ports_in_order(compose: dict[str, Any]) -> None:
    for offset, service in enumerate(SERVICES, start=1):
        ports = [str(port) for port in _container(compose, service)["ports"]]
        assert ports == [f"{8100 + offset}:8000"], service


def test_kafka_runs_in_kraft_mode(compose: dict[str, Any]) -> None:
    kafka = compose["services"]["kafka"]
    assert str(kafka["image"]).startswith("apache/kafka:")
    environment = _environment(kafka)
    assert set(environment["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "KAFKA_ZOOKEEPER_CONNECT" not in environment
    node_id = environment["KAFKA_NODE_ID"]
    assert environment["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{node_id}@")
    assert environment["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    assert "PLAINTEXT://kafka:9092" in environment["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert environment["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"


def test_infrastructure_images(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert str(services["postgres"]["image"]).startswith("postgres:16")
    assert str(services["redis"]["image"]).startswith("redis:7")
    assert str(services["mailpit"]["image"]).startswith("axllent/mailpit")
    mailpit_ports = {str(port).split(":")[-1] for port in services["mailpit"]["ports"]}
    assert {"1025", "8025"} <= mailpit_ports


def test_postgres_runs_the_init_sql(compose: dict[str, Any]) -> None:
    postgres = compose["services"]["postgres"]
    environment = _environment(postgres)
    assert environment["POSTGRES_USER"] == "nichiiki"
    assert environment["POSTGRES_PASSWORD"] == "nichiiki"
    assert environment["POSTGRES_DB"] == "nichiiki"
    mounts = [str(volume).split(":") for volume in postgres["volumes"]]
    init = [mount for mount in mounts if mount[1].startswith("/docker-entrypoint-initdb.d/")]
    assert len(init) == 1
    assert (ROOT / init[0][0]).resolve() == INIT_SQL


def test_init_sql_creates_every_service_database() -> None:
    sql = INIT_SQL.read_text(encoding="utf-8")
    created = set(re.findall(r"^\s*CREATE DATABASE\s+(\w+)", sql, flags=re.IGNORECASE | re.MULTILINE))
    assert created == {f"nichiiki_{service}" for service in SERVICES}


def test_dockerfile_runs_as_non_root() -> None:
    assert DOCKERFILE.is_file()
    text = DOCKERFILE.read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines()]
    assert "python:3.11-slim" in text
    assert re.search(r"pip install\s+\.(\s|$)", text, flags=re.MULTILINE), "the project is not pip-installed"
    assert "EXPOSE 8000" in lines
    # the final stage (after the last FROM) switches to a user other than root
    last_from = max(index for index, line in enumerate(lines) if line.startswith("FROM "))
    users = [line.split(None, 1)[1] for line in lines[last_from:] if line.startswith("USER ")]
    assert users, "the final stage sets no USER"
    assert users[-1].split(":")[0] not in {"root", "0"}
