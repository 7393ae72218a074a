"""The deployment files, checked by reading them (no Docker needed)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, pkcs12

from shared.contracts.acls import password_variable, principals, service_principal, username
from shared.contracts.topics import BACKENDS, FRONTS, SERVICES
from shared.kit.kafka_security import KafkaConnection

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
INIT_SQL = ROOT / "deploy" / "postgres" / "init.sql"
COMPOSE_SCHEMA = ROOT / "deploy" / "schema" / "compose-spec.json"
CADDYFILE = ROOT / "deploy" / "ingress" / "Caddyfile"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
SERVICE_PY = ROOT / "shared" / "kit" / "service.py"
CERTS = ROOT / "deploy" / "kafka" / "certs.sh"

ENV_VARS = {
    "NICHIIKI_KAFKA_BOOTSTRAP": "kafka:9092",
    # every service authenticates with its own SCRAM user over TLS, the broker checked against the CA
    "NICHIIKI_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "NICHIIKI_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    "NICHIIKI_KAFKA_SSL_CAFILE": "/etc/nichiiki/kafka/ca.crt",
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
    wanted = ENV_VARS
    if service in FRONTS:  # no database and no Kafka client of its own: none of their settings either
        backend_only = ("NICHIIKI_KAFKA_", "NICHIIKI_PG_", "NICHIIKI_SMTP_")
        wanted = {k: v for k, v in ENV_VARS.items() if not k.startswith(backend_only)}
        assert not {k for k in environment if k.startswith(backend_only)}
    for name, expected in wanted.items():
        assert environment.get(name), f"{service}: {name} is not set"
        if expected is not None:
            assert environment[name] == expected, name


@pytest.mark.parametrize("service", SERVICES)
def test_service_waits_for_healthy_infrastructure(compose: dict[str, Any], service: str) -> None:
    depends_on = _depends_on(_container(compose, service))
    for dependency in ("kafka", "postgres", "redis") if service in BACKENDS else ("redis", "identity"):
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


def _host_ports(entry: dict[str, Any]) -> list[str]:
    """The host side of every published port (short ``[ip:]host:container`` or long syntax)."""
    published = []
    for port in entry.get("ports", []):
        if isinstance(port, dict):
            if "published" in port:
                published.append(str(port["published"]))
        elif match := re.fullmatch(r"(?:[\d.]+:)?(\$\{[^}]+\}|[\d-]+):[\d-]+(?:/\w+)?", str(port)):
            published.append(match[1])
    return published


#: what publishes a port on the host: one of each, never scaled (Kafka's EXTERNAL listener is for partners)
PUBLISHERS = {"ingress", "kafka", "mailpit", "prometheus", "grafana"}


@pytest.mark.parametrize("service", SERVICES)
def test_a_scalable_service_publishes_no_host_port(compose: dict[str, Any], service: str) -> None:
    """`docker compose up --scale <service>=3` starts three replicas: a fixed host port (or a fixed
    container name) would make the second one fail to start."""
    entry = _container(compose, service)
    assert "ports" not in entry, f"{service} publishes {entry['ports']}: reach it through the ingress"
    assert "container_name" not in entry
    assert "hostname" not in entry  # each replica keeps its own


def test_only_the_ingress_and_single_instances_publish_ports(compose: dict[str, Any]) -> None:
    publishing = {name for name, entry in compose["services"].items() if _host_ports(entry)}
    assert publishing == PUBLISHERS
    hosts = [port for name in publishing for port in _host_ports(compose["services"][name])]
    assert len(hosts) == len(set(hosts)), hosts  # no two on the same host port
    assert _host_ports(compose["services"]["ingress"]) == ["${NICHIIKI_INGRESS_PORT:-8080}"]


def test_the_host_port_check_is_real() -> None:
    assert _host_ports({"ports": ["8101:8000", "127.0.0.1:9000:9000", {"target": 80, "published": 8080}]}) == [
        "8101", "9000", "8080",
    ]
    assert _host_ports({"ports": ["8000"]}) == []  # an ephemeral host port: scaling is fine
    assert _host_ports({"ports": ["${PORT:-8080}:80"]}) == ["${PORT:-8080}"]


def _routes(caddyfile: str) -> dict[str, tuple[str, str]]:
    """``/<prefix>`` → (the prefix its block strips, the service name whose replicas serve it)."""
    blocks = re.findall(
        r"^\thandle (/[\w-]+)/\* \{\n\t\turi strip_prefix (\S+)\n\t\trespond /metrics 404\n"
        r"\t\treverse_proxy \{\n\t\t\tdynamic a \{\n\t\t\t\tname ([\w-]+)\n\t\t\t\tport 8000\n",
        caddyfile, flags=re.MULTILINE,
    )
    return {prefix: (stripped, name) for prefix, stripped, name in blocks}


def test_the_ingress_routes_every_service_to_all_its_replicas(compose: dict[str, Any]) -> None:
    caddyfile = CADDYFILE.read_text(encoding="utf-8")
    routes = _routes(caddyfile)
    names = [name.replace("_", "-") for name in BACKENDS]
    assert routes == {f"/{name}": (f"/{name}", name) for name in names}
    assert all(name in compose["services"] for name in names)
    # upstreams from DNS (every replica, looked up again), never a fixed address; the console at /
    assert caddyfile.count("dynamic a {") == len(BACKENDS) + len(FRONTS)
    assert "\t\t\t\tname console\n" in caddyfile
    assert caddyfile.count("respond /metrics 404") == len(BACKENDS) + 1  # metrics stay inside
    ingress = compose["services"]["ingress"]
    assert "./deploy/ingress/Caddyfile:/etc/caddy/Caddyfile:ro" in ingress["volumes"]
    assert "http://127.0.0.1/healthz" in " ".join(ingress["healthcheck"]["test"])
    assert "handle /healthz {" in caddyfile


@pytest.mark.skipif(shutil.which("caddy") is None, reason="needs caddy (Debian's package) to validate the Caddyfile")
def test_caddy_accepts_the_caddyfile() -> None:
    checked = subprocess.run(
        ["caddy", "validate", "--adapter", "caddyfile", "--config", str(CADDYFILE)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert checked.returncode == 0, checked.stderr[-2000:]


def _seconds(duration: str) -> float:
    """A compose duration (``1m30s``, ``45s``, ``500ms``) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(number) * units[unit] for number, unit in parts)


def test_stop_grace_covers_the_graceful_shutdown(compose: dict[str, Any]) -> None:
    """The budget, read from the code: uvicorn's drain, the wait for each background task, the producer's
    flush (its request timeout), and 15 s for the batch in hand and the pool's close."""
    code = SERVICE_PY.read_text(encoding="utf-8")
    drain = int(re.findall(r"timeout_graceful_shutdown=(\d+)", code)[0])
    task_wait = int(re.findall(r"asyncio\.wait_for\(task, timeout=(\d+)\)", code)[0])
    flush = int(re.findall(r"request_timeout_ms=([\d_]+)", code)[0].replace("_", "")) / 1000
    budget = drain + task_wait + flush + 15
    for service in SERVICES:
        grace = _seconds(str(_container(compose, service).get("stop_grace_period", "10s")))
        assert grace >= budget, f"{service}: stop_grace_period {grace}s < the shutdown path's {budget}s"
    assert _seconds("1m30s") == 90 and _seconds("500ms") == 0.5


def test_every_health_gated_dependency_has_a_healthcheck(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, entry in services.items():
        for dependency, condition in _depends_on(entry).items():
            assert dependency in services, (name, dependency)
            if condition.get("condition") == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits for {dependency}, which has no check"


def test_prometheus_scrapes_every_replica_of_every_service(compose: dict[str, Any]) -> None:
    config = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for service in SERVICES:
        name = service.replace("_", "-")
        sd = jobs[name]["dns_sd_configs"]  # the job label is the compose name, as the dashboards group by it
        assert sd == [{"names": [name], "type": "A", "port": 8000, "refresh_interval": "15s"}], name
    prometheus = compose["services"]["prometheus"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]


def test_grafana_is_provisioned_with_prometheus_and_the_dashboards(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = dict(str(v).rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"] if str(v).startswith("./"))
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090" and source["isDefault"]
    assert "prometheus" in compose["services"]
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "nichiiki.yaml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]  # the folder it loads is mounted
    assert (GRAFANA / "dashboards").is_dir()
    environment = _environment(grafana)
    assert environment["GF_SECURITY_ADMIN_PASSWORD"].startswith("${NICHIIKI_GRAFANA_ADMIN_PASSWORD:?")


def test_kafka_runs_in_kraft_mode(compose: dict[str, Any]) -> None:
    kafka = compose["services"]["kafka"]
    assert str(kafka["image"]).startswith("apache/kafka:")
    environment = _environment(kafka)
    assert set(environment["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "KAFKA_ZOOKEEPER_CONNECT" not in environment
    node_id = environment["KAFKA_NODE_ID"]
    assert environment["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{node_id}@")
    assert environment["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    assert "CLIENTS://kafka:9092" in environment["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert environment["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"


#: an exact release: a tag with at least major.minor.patch (``v1.21.8``, ``16.9-bookworm``), or a digest
PINNED = re.compile(r"^[\w./-]+(:v?\d+\.\d+\.\d+[\w.-]*)?(@sha256:[0-9a-f]{64})?$")


def _pinned(image: str) -> bool:
    if re.match(r"^postgres:\d+\.\d+(-\w+)?$", image):  # PostgreSQL's releases are major.minor
        return True
    match = PINNED.match(image)
    return bool(match and (match[1] or match[2]))


def test_every_image_is_pinned_to_an_exact_release(compose: dict[str, Any]) -> None:
    services = compose["services"]
    images = {name: str(entry["image"]) for name, entry in services.items() if "image" in entry}
    assert {"kafka", "postgres", "redis", "mailpit", "ingress", "prometheus", "grafana"} <= set(images)
    assert not [f"{name}: {image}" for name, image in images.items() if not _pinned(image)]
    assert images["postgres"].startswith("postgres:16.") and images["redis"].startswith("redis:7.")
    assert images["mailpit"].startswith("axllent/mailpit:v1.")
    for entry in services.values():  # everything else is built from the one Dockerfile
        assert "image" in entry or entry["build"]["dockerfile"] == "deploy/Dockerfile"


def test_the_pin_check_is_real() -> None:
    assert not _pinned("axllent/mailpit:latest")
    assert not _pinned("postgres:16")
    assert not _pinned("postgres:16-bookworm")
    assert _pinned("postgres:16.9-bookworm")
    assert not _pinned("redis:7.4")
    assert not _pinned("caddy")
    assert _pinned("axllent/mailpit:v1.21.8")
    assert _pinned("python:3.11.13-slim-bookworm@sha256:" + "0" * 64)
    assert _pinned("grafana/grafana@sha256:" + "a" * 64)


def test_mailpit_takes_mail_inside_and_shows_it_outside(compose: dict[str, Any]) -> None:
    mailpit = compose["services"]["mailpit"]
    assert _host_ports(mailpit) == ["8025"]  # the UI; SMTP (1025) is for notification only
    assert _environment(_container(compose, "notification"))["NICHIIKI_SMTP_URL"] == "smtp://mailpit:1025"


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
    # a front has no database; the key store of crypto-shredding is one for all (docs/privacy.md)
    assert created == {f"nichiiki_{service}" for service in BACKENDS} | {"nichiiki_keyring"}


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]]  # (INSTRUCTION, arguments), continuation lines joined


def dockerfile_stages(text: str) -> tuple[dict[str, str], list[Stage]]:
    """The global ARGs (before the first FROM) and the stages, with ``${ARG}`` in FROM resolved."""
    joined = re.sub(r"\\\n", " ", text)
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for raw in joined.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif instruction == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], parts[0])
            stages.append(Stage(base, parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else None, []))
        else:
            assert stages, f"{instruction} before any FROM"
            stages[-1].instructions.append((instruction, rest))
    return args, stages


def test_the_image_is_multi_stage_non_root_and_pinned() -> None:
    _, stages = dockerfile_stages(DOCKERFILE.read_text(encoding="utf-8"))
    assert len(stages) >= 2, "a build stage and a runtime stage"
    build, final = stages[0], stages[-1]
    for stage in stages:  # an exact Python release, and the digest of its image
        assert re.fullmatch(r"python:3\.\d+\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", stage.base), stage.base
    # the final stage takes the venv from the build stage and nothing from the build context but that
    copies = [rest for kind, rest in final.instructions if kind == "COPY"]
    assert copies == [f"--from={build.name} /opt/venv /opt/venv"]
    assert not [rest for kind, rest in final.instructions if kind == "RUN" and "pip install" in rest]
    users = [rest for kind, rest in final.instructions if kind == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    uid = users[-1].split(":")[0]
    assert any(kind == "RUN" and f"--uid {uid}" in rest for kind, rest in final.instructions)
    assert ("EXPOSE", "8000") in final.instructions
    (healthcheck,) = [rest for kind, rest in final.instructions if kind == "HEALTHCHECK"]
    assert "http://127.0.0.1:8000/healthz" in healthcheck


def test_the_image_installs_the_runtime_lock_with_hashes_and_nothing_else() -> None:
    _, stages = dockerfile_stages(DOCKERFILE.read_text(encoding="utf-8"))
    build = stages[0]
    runs = [rest for kind, rest in build.instructions if kind == "RUN"]
    installs = [run for run in runs if "pip install" in run]
    locked = [run for run in installs if "-r requirements/runtime.txt" in run]
    assert len(locked) == 1
    assert "--require-hashes" in locked[0] and "--only-binary :all:" in locked[0]
    # the project itself adds no dependency: everything came from the lock
    for run in installs:
        if run is not locked[0]:
            assert "--no-deps" in run and "--no-build-isolation" in run, run
            assert not re.search(r"\[(local|dev)", run)
    assert ("COPY", "requirements/runtime.txt requirements/runtime.txt") in build.instructions
    assert not [rest for kind, rest in build.instructions if kind == "COPY" and "dev.txt" in rest]
    assert not [run for run in runs if "apt-get" in run]  # no compiler: wheels only


def test_the_build_context_leaves_the_local_tree_out() -> None:
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    assert ignore[ignore.index("*")] == "*"
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    assert allowed == {"pyproject.toml", "requirements/runtime.txt", "shared/", "services/"}


def test_the_dockerfile_parser_is_real() -> None:
    args, stages = dockerfile_stages(
        "ARG IMAGE=python:3.11.13-slim-bookworm\nFROM ${IMAGE} AS build\nRUN a \\\n  b\nFROM ${IMAGE}\nUSER root\n"
    )
    assert args == {"IMAGE": "python:3.11.13-slim-bookworm"}
    assert [(s.base, s.name) for s in stages] == [("python:3.11.13-slim-bookworm", "build"),
                                                  ("python:3.11.13-slim-bookworm", None)]
    assert stages[0].instructions == [("RUN", "a    b")]


# --- the compose file against the Compose Specification ---------------------------------------------------


def test_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    assert schema["$schema"].startswith("https://json-schema.org/draft-07/")  # the validator below
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose), key=str)
    assert not errors, [f"{e.json_path}: {e.message}" for e in errors]
    assert (COMPOSE_SCHEMA.parent / "LICENSE.compose-spec").is_file()


def test_the_schema_check_is_real(compose: dict[str, Any]) -> None:
    broken = {**compose, "services": {**compose["services"], "kafka": {**compose["services"]["kafka"], "ports": 9094}}}
    schema = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    assert list(jsonschema.Draft7Validator(schema).iter_errors(broken))


# --- Kafka security ---------------------------------------------------------------------------------------


def _listeners(environment: dict[str, str]) -> dict[str, str]:
    return dict(item.split(":", 1) for item in environment["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))


def test_kafka_listeners_are_authenticated_and_encrypted(compose: dict[str, Any]) -> None:
    environment = _environment(compose["services"]["kafka"])
    protocols = _listeners(environment)
    assert protocols == {"CLIENTS": "SASL_SSL", "EXTERNAL": "SASL_SSL", "INTERNAL": "SSL", "CONTROLLER": "SSL"}
    listened = {item.split("://")[0] for item in environment["KAFKA_LISTENERS"].split(",")}
    assert listened == set(protocols)
    assert environment["KAFKA_SASL_ENABLED_MECHANISMS"] == "SCRAM-SHA-512"
    for name in ("CLIENTS", "EXTERNAL"):  # each SASL listener has its server-side login module
        jaas = environment[f"KAFKA_LISTENER_NAME_{name}_SCRAM___SHA___512_SASL_JAAS_CONFIG"]
        assert jaas.startswith("org.apache.kafka.common.security.scram.ScramLoginModule required")
    for name in ("INTERNAL", "CONTROLLER"):  # certificate-only listeners: a client certificate of the CA
        assert environment[f"KAFKA_LISTENER_NAME_{name}_SSL_CLIENT_AUTH"] == "required"
    assert environment["KAFKA_INTER_BROKER_LISTENER_NAME"] == "INTERNAL"
    # the image's start script wants its own secrets layout for listeners named "...SSL://": none is
    assert "SSL://" not in environment["KAFKA_ADVERTISED_LISTENERS"]
    assert [str(p) for p in compose["services"]["kafka"]["ports"]] == ["9094:9094"]  # EXTERNAL only


def test_kafka_authorises_by_acls_with_no_default_allow(compose: dict[str, Any]) -> None:
    environment = _environment(compose["services"]["kafka"])
    assert environment["KAFKA_AUTHORIZER_CLASS_NAME"] == "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
    assert environment["KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"] == "false"
    assert set(environment["KAFKA_SUPER_USERS"].split(";")) == {"User:CN=kafka", "User:CN=kafka-setup"}
    assert environment["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


def _volume_names(entry: dict[str, Any]) -> dict[str, str]:
    """Named volumes (not bind mounts) an entry mounts → where."""
    return {
        str(v).split(":")[0]: str(v).split(":")[1] for v in entry.get("volumes", []) if not str(v).startswith(".")
    }


def test_tls_material_reaches_only_who_needs_it(compose: dict[str, Any]) -> None:
    services = compose["services"]
    certs = _volume_names(services["kafka-certs"])
    assert set(certs) == {"kafka-ca", "kafka-ca-private", "kafka-broker-secrets", "kafka-setup-secrets"}
    assert _volume_names(services["kafka"]) == {
        "kafka-data": "/var/lib/kafka/data", "kafka-broker-secrets": "/etc/kafka/secrets",
    }
    assert _volume_names(services["kafka-setup"]) == {"kafka-setup-secrets": "/etc/kafka/setup"}
    for service in BACKENDS:
        assert _volume_names(_container(compose, service)) == {"kafka-ca": "/etc/nichiiki/kafka"}, service
    for service in FRONTS:  # no Kafka client: no CA either
        assert _volume_names(_container(compose, service)) == {}, service
    assert _depends_on(services["kafka"])["kafka-certs"]["condition"] == "service_completed_successfully"
    assert _depends_on(services["kafka-setup"])["kafka"]["condition"] == "service_healthy"


@pytest.mark.parametrize("service", BACKENDS)
def test_service_connects_as_its_own_kafka_user(compose: dict[str, Any], service: str) -> None:
    entry = _container(compose, service)
    environment = _environment(entry)
    principal = service_principal(service)
    assert environment["NICHIIKI_KAFKA_SASL_USERNAME"] == username(principal)
    assert environment["NICHIIKI_KAFKA_SASL_PASSWORD"].startswith("${" + password_variable(principal) + ":?")
    assert "NICHIIKI_PARTNER_KAFKA_BOOTSTRAP" not in environment  # one cluster: the edge is behind ACLs
    assert _depends_on(entry)["kafka-setup"]["condition"] == "service_completed_successfully"


def test_the_setup_job_runs_the_generated_script_with_every_password(compose: dict[str, Any]) -> None:
    setup = compose["services"]["kafka-setup"]
    assert _command(setup) == ["bash", "/deploy/kafka/setup.sh"]
    assert "./deploy/kafka:/deploy/kafka:ro" in [str(v) for v in setup["volumes"]]
    environment = _environment(setup)
    for principal in principals():
        variable = password_variable(principal)
        assert environment[variable] == "${" + variable + ":?set the Kafka credentials in .env (docs/deploy-kafka.md)}"
    assert environment["KAFKA_SETUP_BOOTSTRAP"] == "kafka:9091"  # the mutual-TLS listener
    assert _command(compose["services"]["kafka-certs"]) == ["bash", "/deploy/kafka/certs.sh"]


def _serve_tls_once(context: ssl.SSLContext) -> tuple[int, threading.Thread]:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        with listener:
            connection, _ = listener.accept()
            try:
                with context.wrap_socket(connection, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                pass  # the client refused us: its side of the test says so

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return port, thread


@pytest.mark.skipif(shutil.which("keytool") is None, reason="needs keytool (a JRE), as the kafka-certs job has")
def test_the_generated_certificates_are_what_clients_verify(tmp_path: Path) -> None:
    """deploy/kafka/certs.sh really makes a CA and a broker certificate our clients accept for the names
    they dial (kafka, localhost), and a setup certificate for CN=kafka-setup; run twice, it keeps them."""
    dirs = {name: tmp_path / name for name in ("CA_DIR", "CA_PRIVATE_DIR", "BROKER_DIR", "SETUP_DIR")}
    env = {"PATH": os.environ["PATH"], "NICHIIKI_KAFKA_KEYSTORE_PASSWORD": "keystore-pass",
           "CERT_OWNER": f"{os.getuid()}:{os.getgid()}", **{k: str(v) for k, v in dirs.items()}}
    made = subprocess.run(["bash", str(CERTS)], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert made.returncode == 0, made.stderr
    again = subprocess.run(["bash", str(CERTS)], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert "already made" in again.stdout

    def load(path: Path) -> tuple[Any, Any, list[Any]]:
        key, cert, chain = pkcs12.load_key_and_certificates(path.read_bytes(), b"keystore-pass")
        return key, cert, chain

    key, cert, chain = load(dirs["BROKER_DIR"] / "kafka.keystore.p12")
    assert cert.subject.rfc4514_string() == "CN=kafka"
    _, setup_cert, _ = load(dirs["SETUP_DIR"] / "kafka-setup.keystore.p12")
    assert setup_cert.subject.rfc4514_string() == "CN=kafka-setup"
    pem = tmp_path / "broker.pem"
    pem.write_bytes(
        key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        + cert.public_bytes(Encoding.PEM) + b"".join(c.public_bytes(Encoding.PEM) for c in chain)
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pem)
    cafile = str(dirs["CA_DIR"] / "ca.crt")
    client = KafkaConnection("kafka:9092", "SASL_SSL", username="u", password="p", cafile=cafile).ssl_context()
    assert client is not None
    for name in ("kafka", "localhost"):
        port, thread = _serve_tls_once(server)
        with socket.create_connection(("127.0.0.1", port)) as raw, client.wrap_socket(raw, server_hostname=name) as tls:
            peer = tls.getpeercert()
            assert peer is not None and peer["subject"] == ((("commonName", "kafka"),),)
            tls.send(b"x")
        thread.join(5)
    port, thread = _serve_tls_once(server)  # a name the certificate does not carry is refused
    with socket.create_connection(("127.0.0.1", port)) as raw, pytest.raises(ssl.SSLCertVerificationError):
        client.wrap_socket(raw, server_hostname="kafka.elsewhere.example")
    thread.join(5)
