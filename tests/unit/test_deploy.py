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
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, pkcs12

from shared.contracts.acls import password_variable, principals, service_principal, username
from shared.contracts.topics import SERVICES
from shared.kit.kafka_security import KafkaConnection

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
INIT_SQL = ROOT / "deploy" / "postgres" / "init.sql"
COMPOSE_SCHEMA = ROOT / "deploy" / "schema" / "compose-spec.json"
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
    assert "CLIENTS://kafka:9092" in environment["KAFKA_ADVERTISED_LISTENERS"].split(",")
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


# --- the compose file against the Compose Specification ---------------------------------------------------


def test_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(compose), key=str)
    assert not errors, [f"{e.json_path}: {e.message}" for e in errors]
    assert (COMPOSE_SCHEMA.parent / "LICENSE.compose-spec").is_file()


def test_the_schema_check_is_real(compose: dict[str, Any]) -> None:
    broken = {**compose, "services": {**compose["services"], "kafka": {**compose["services"]["kafka"], "ports": 9094}}}
    schema = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    assert list(jsonschema.Draft202012Validator(schema).iter_errors(broken))


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
    for service in SERVICES:
        assert _volume_names(_container(compose, service)) == {"kafka-ca": "/etc/nichiiki/kafka"}, service
    assert _depends_on(services["kafka"])["kafka-certs"]["condition"] == "service_completed_successfully"
    assert _depends_on(services["kafka-setup"])["kafka"]["condition"] == "service_healthy"


@pytest.mark.parametrize("service", SERVICES)
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
