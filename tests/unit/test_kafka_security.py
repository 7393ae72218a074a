"""Every protocol and mechanism reaches aiokafka, FastStream and confluent-kafka as each expects
(clients built, never connected), and a contradictory configuration is refused when it is read."""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path
from typing import Any

import confluent_kafka
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from faststream.kafka import KafkaBroker
from faststream.security import BaseSecurity, SASLScram256, SASLScram512

from shared.kit.kafka_security import (
    SASL_MECHANISMS,
    SECURITY_PROTOCOLS,
    KafkaConnection,
    KafkaSecurityError,
    SaslMechanism,
    SecurityProtocol,
)
from shared.kit.settings import Settings

BOOTSTRAP = "127.0.0.1:1"  # never dialled: nothing here connects


@pytest.fixture(scope="module")
def cafile(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real CA certificate (PEM): the SSL contexts load it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = tmp_path_factory.mktemp("ca") / "ca.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def _connection(protocol: SecurityProtocol, mechanism: SaslMechanism, cafile: str) -> KafkaConnection:
    sasl = protocol.startswith("SASL_")
    return KafkaConnection(
        BOOTSTRAP, protocol, mechanism,
        username="svc-subsidy" if sasl else None, password="s3cret" if sasl else None,
        cafile=cafile if protocol in ("SSL", "SASL_SSL") else None,
    )


COMBINATIONS = [(p, m) for p in SECURITY_PROTOCOLS for m in SASL_MECHANISMS]


def _assert_aiokafka_client(client: Any, connection: KafkaConnection) -> None:
    """The low-level client every aiokafka class builds carries the security as given."""
    assert client._bootstrap_servers == BOOTSTRAP
    assert client._security_protocol == connection.security_protocol
    if connection.tls:
        assert isinstance(client._ssl_context, ssl.SSLContext)
        assert client._ssl_context.verify_mode == ssl.CERT_REQUIRED
        assert client._ssl_context.check_hostname
        # the deployment's CA is loaded: the context trusts exactly that one certificate authority
        assert [ca["subject"] for ca in client._ssl_context.get_ca_certs()] == [((("commonName", "test CA"),),)]
    else:
        assert client._ssl_context is None
    if connection.sasl:
        assert client._sasl_mechanism == connection.sasl_mechanism
        assert client._sasl_plain_username == "svc-subsidy"
        assert client._sasl_plain_password == "s3cret"


@pytest.mark.parametrize(("protocol", "mechanism"), COMBINATIONS)
async def test_aiokafka_clients_get_the_security(protocol: SecurityProtocol, mechanism: SaslMechanism,
                                                 cafile: str) -> None:
    connection = _connection(protocol, mechanism, cafile)
    producer = AIOKafkaProducer(**connection.aiokafka_kwargs(), acks="all")
    consumer = AIOKafkaConsumer(**connection.aiokafka_kwargs(), enable_auto_commit=False)
    admin = AIOKafkaAdminClient(**connection.aiokafka_kwargs())
    try:
        for client in (producer.client, consumer._client, admin._client):
            _assert_aiokafka_client(client, connection)
    finally:
        await consumer.stop()  # never started: only releases what the constructor made
        await admin.close()


@pytest.mark.parametrize(("protocol", "mechanism"), COMBINATIONS)
def test_faststream_broker_gets_the_security(protocol: SecurityProtocol, mechanism: SaslMechanism,
                                             cafile: str) -> None:
    connection = _connection(protocol, mechanism, cafile)
    security = connection.faststream_security()
    expected_type = {
        "PLAINTEXT": type(None), "SSL": BaseSecurity,
        "SASL_PLAINTEXT": SASLScram512 if mechanism == "SCRAM-SHA-512" else SASLScram256,
        "SASL_SSL": SASLScram512 if mechanism == "SCRAM-SHA-512" else SASLScram256,
    }[protocol]
    assert type(security) is expected_type
    broker = KafkaBroker(connection.bootstrap, security=security, logger=None)
    # what FastStream hands to aiokafka's producer and to every subscriber's consumer
    consumer_kwargs = broker.config.broker_config.builder.keywords  # type: ignore[attr-defined]  # a partial
    for kwargs in (broker._connection_kwargs, consumer_kwargs):
        assert kwargs.get("security_protocol", "PLAINTEXT") == protocol
        if connection.tls:
            assert isinstance(kwargs["ssl_context"], ssl.SSLContext)
        else:
            assert kwargs.get("ssl_context") is None
        if connection.sasl:
            assert kwargs["sasl_mechanism"] == mechanism
            assert kwargs["sasl_plain_username"] == "svc-subsidy"
            assert kwargs["sasl_plain_password"] == "s3cret"
        else:
            assert "sasl_plain_username" not in kwargs


@pytest.mark.parametrize(("protocol", "mechanism"), COMBINATIONS)
def test_confluent_kafka_accepts_the_config(protocol: SecurityProtocol, mechanism: SaslMechanism,
                                            cafile: str) -> None:
    connection = _connection(protocol, mechanism, cafile)
    config = connection.confluent_config()
    assert config["security.protocol"] == protocol.lower()
    assert ("sasl.mechanisms" in config) == connection.sasl
    assert config.get("ssl.ca.location") == (cafile if connection.tls else None)
    if connection.sasl:
        assert (config["sasl.mechanisms"], config["sasl.username"], config["sasl.password"]) == (
            mechanism, "svc-subsidy", "s3cret",
        )
    # librdkafka checks every property (name, value, the CA file, SCRAM support) when the client is made
    producer = confluent_kafka.Producer({**config, "socket.connection.setup.timeout.ms": 1000})
    consumer = confluent_kafka.Consumer({**config, "group.id": "jal.test"})
    consumer.close()
    producer.flush(0)
    with pytest.raises(confluent_kafka.KafkaException):  # and would refuse a wrong one: the check is real
        confluent_kafka.Producer({**config, "security.protocol": "sasl_tls"})


@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "SASL_SSL"])
@pytest.mark.parametrize(("username", "password", "missing"), [
    (None, "s3cret", ["NICHIIKI_KAFKA_SASL_USERNAME"]),
    ("svc-subsidy", None, ["NICHIIKI_KAFKA_SASL_PASSWORD"]),
    ("", "", ["NICHIIKI_KAFKA_SASL_USERNAME", "NICHIIKI_KAFKA_SASL_PASSWORD"]),
])
def test_sasl_without_credentials_is_a_configuration_error(
    protocol: SecurityProtocol, username: str | None, password: str | None, missing: list[str],
) -> None:
    with pytest.raises(KafkaSecurityError) as refused:
        KafkaConnection(BOOTSTRAP, protocol, username=username, password=password)
    for name in missing:
        assert name in str(refused.value)


def test_sasl_without_credentials_is_refused_from_the_settings() -> None:
    settings = Settings(
        kafka_bootstrap="kafka:9092", partner_kafka_bootstrap="edge:9092",
        partner_kafka_security_protocol="SASL_SSL", partner_kafka_sasl_username="svc-partner_gateway",
    )
    assert KafkaConnection.internal(settings).security_protocol == "PLAINTEXT"
    with pytest.raises(KafkaSecurityError, match="NICHIIKI_PARTNER_KAFKA_SASL_PASSWORD"):
        KafkaConnection.edge(settings)


@pytest.mark.parametrize("protocol", ["PLAINTEXT", "SSL"])
def test_credentials_a_protocol_would_not_use_are_refused(protocol: SecurityProtocol, cafile: str) -> None:
    """A forgotten SASL_SSL must not quietly connect unauthenticated."""
    with pytest.raises(KafkaSecurityError, match="SASL_SSL"):
        KafkaConnection(BOOTSTRAP, protocol, username="svc-subsidy", password="s3cret",
                        cafile=cafile if protocol == "SSL" else None)


@pytest.mark.parametrize("protocol", ["PLAINTEXT", "SASL_PLAINTEXT"])
def test_a_ca_file_without_tls_is_refused(protocol: SecurityProtocol, cafile: str) -> None:
    sasl = {"username": "u", "password": "p"} if protocol == "SASL_PLAINTEXT" else {}
    with pytest.raises(KafkaSecurityError, match="NICHIIKI_KAFKA_SSL_CAFILE"):
        KafkaConnection(BOOTSTRAP, protocol, cafile=cafile, **sasl)  # type: ignore[arg-type]


def test_a_missing_ca_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KafkaSecurityError, match="no such file"):
        KafkaConnection(BOOTSTRAP, "SSL", cafile=str(tmp_path / "nowhere.crt"))


def test_unknown_protocol_or_mechanism_is_refused() -> None:
    with pytest.raises(KafkaSecurityError, match="SECURITY_PROTOCOL"):
        KafkaConnection(BOOTSTRAP, "SASL_TLS")  # type: ignore[arg-type]
    with pytest.raises(KafkaSecurityError, match="SASL_MECHANISM"):
        KafkaConnection(BOOTSTRAP, "SASL_SSL", "PLAIN", username="u", password="p")  # type: ignore[arg-type]


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch, cafile: str) -> None:
    for name, value in {
        "NICHIIKI_KAFKA_BOOTSTRAP": "kafka:9092", "NICHIIKI_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "NICHIIKI_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256", "NICHIIKI_KAFKA_SASL_USERNAME": "svc-subsidy",
        "NICHIIKI_KAFKA_SASL_PASSWORD": "s3cret", "NICHIIKI_KAFKA_SSL_CAFILE": cafile,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("NICHIIKI_PARTNER_KAFKA_BOOTSTRAP", raising=False)
    settings = Settings()
    assert "s3cret" not in repr(settings)  # a secret, never logged with the settings
    internal = KafkaConnection.internal(settings)
    assert internal == KafkaConnection("kafka:9092", "SASL_SSL", "SCRAM-SHA-256", "svc-subsidy", "s3cret", cafile)
    assert "s3cret" not in repr(internal)
    # no edge bootstrap of its own: the edge is the internal cluster, reached the same way
    assert KafkaConnection.edge(settings) == internal
    assert KafkaConnection.of(settings, "edge") == internal


def test_the_edge_has_its_own_security(cafile: str) -> None:
    settings = Settings(
        kafka_bootstrap="kafka:9092", kafka_security_protocol="SASL_SSL", kafka_sasl_username="svc-partner_gateway",
        kafka_sasl_password="inside", kafka_ssl_cafile=cafile,
        partner_kafka_bootstrap="edge.example:9094", partner_kafka_security_protocol="SSL",
        partner_kafka_ssl_cafile=cafile,
    )
    edge = KafkaConnection.of(settings, "edge")
    assert (edge.bootstrap, edge.security_protocol, edge.username, edge.password) == (
        "edge.example:9094", "SSL", None, None,
    )
    assert edge.source == "NICHIIKI_PARTNER_KAFKA"
    assert KafkaConnection.of(settings, "internal").password == "inside"
    with pytest.raises(ValueError, match="unknown Kafka cluster"):
        KafkaConnection.of(settings, "elsewhere")
