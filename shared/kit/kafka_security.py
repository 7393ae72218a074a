"""How every Kafka client of the platform connects: bootstrap, TLS and SASL, from the settings, once.

Two clusters, each configured on its own (``shared.kit.settings``): the internal one
(``NICHIIKI_KAFKA_*``) and the partner-facing edge (``NICHIIKI_PARTNER_KAFKA_*``). Without a bootstrap
of its own the edge *is* the internal cluster (isolation by ACLs) and is reached with the internal
connection. Three client libraries take the same connection in their own shape: aiokafka (producer,
consumer, admin, the low-level client), FastStream's ``KafkaBroker`` (a ``faststream.security``
object) and confluent-kafka (a librdkafka configuration dictionary).

A misconfiguration is refused when the connection is built, never found at the first handshake:
SASL without a username or a password, and credentials or a CA file that the protocol would
silently not use (a forgotten ``SASL_SSL`` must not connect in plain text).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from aiokafka.helpers import create_ssl_context
from faststream.security import BaseSecurity, SASLScram256, SASLScram512

from shared.kit.settings import Settings

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["SCRAM-SHA-512", "SCRAM-SHA-256"]
SECURITY_PROTOCOLS: tuple[SecurityProtocol, ...] = get_args(SecurityProtocol)
SASL_MECHANISMS: tuple[SaslMechanism, ...] = get_args(SaslMechanism)

_SASL = ("SASL_PLAINTEXT", "SASL_SSL")
_TLS = ("SSL", "SASL_SSL")


class KafkaSecurityError(ValueError):
    """The Kafka security settings contradict each other or miss something (a configuration error)."""


@dataclass(frozen=True, slots=True)
class KafkaConnection:
    """One cluster as one principal sees it: where it is and how to authenticate."""

    bootstrap: str
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism = "SCRAM-SHA-512"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    cafile: str | None = None
    #: The settings these came from, named in errors (``NICHIIKI_KAFKA`` or ``NICHIIKI_PARTNER_KAFKA``).
    source: str = field(default="NICHIIKI_KAFKA", compare=False)

    def __post_init__(self) -> None:
        s = self.source
        if self.security_protocol not in SECURITY_PROTOCOLS:
            raise KafkaSecurityError(
                f"{s}_SECURITY_PROTOCOL={self.security_protocol!r}: not one of {SECURITY_PROTOCOLS}"
            )
        if self.sasl_mechanism not in SASL_MECHANISMS:
            raise KafkaSecurityError(f"{s}_SASL_MECHANISM={self.sasl_mechanism!r}: not one of {SASL_MECHANISMS}")
        if self.sasl:
            missing = [name for name, value in (("USERNAME", self.username), ("PASSWORD", self.password)) if not value]
            if missing:
                raise KafkaSecurityError(
                    f"{s}_SECURITY_PROTOCOL={self.security_protocol} needs "
                    + " and ".join(f"{s}_SASL_{name}" for name in missing)
                )
        elif self.username or self.password:
            raise KafkaSecurityError(
                f"{s}_SASL_USERNAME/PASSWORD are set but {s}_SECURITY_PROTOCOL={self.security_protocol} "
                "would not use them: set SASL_SSL (or SASL_PLAINTEXT)"
            )
        if self.cafile is not None and not self.tls:
            raise KafkaSecurityError(
                f"{s}_SSL_CAFILE is set but {s}_SECURITY_PROTOCOL={self.security_protocol} is not encrypted: "
                "set SSL or SASL_SSL"
            )
        if self.cafile is not None and not Path(self.cafile).is_file():
            raise KafkaSecurityError(f"{s}_SSL_CAFILE={self.cafile}: no such file")

    @property
    def sasl(self) -> bool:
        return self.security_protocol in _SASL

    @property
    def tls(self) -> bool:
        return self.security_protocol in _TLS

    # -- from the settings ----------------------------------------------------------------------

    @classmethod
    def internal(cls, settings: Settings) -> KafkaConnection:
        """The internal cluster: every service topic."""
        password = settings.kafka_sasl_password
        return cls(
            settings.require_kafka(), settings.kafka_security_protocol, settings.kafka_sasl_mechanism,
            settings.kafka_sasl_username, password.get_secret_value() if password is not None else None,
            str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile is not None else None,
            source="NICHIIKI_KAFKA",
        )

    @classmethod
    def edge(cls, settings: Settings) -> KafkaConnection:
        """The partner-facing cluster; without a bootstrap of its own, the internal one (same principal)."""
        if settings.partner_kafka_bootstrap in (None, settings.kafka_bootstrap):
            return cls.internal(settings)
        assert settings.partner_kafka_bootstrap is not None  # for mypy: excluded just above
        password = settings.partner_kafka_sasl_password
        return cls(
            settings.partner_kafka_bootstrap, settings.partner_kafka_security_protocol,
            settings.partner_kafka_sasl_mechanism, settings.partner_kafka_sasl_username,
            password.get_secret_value() if password is not None else None,
            str(settings.partner_kafka_ssl_cafile) if settings.partner_kafka_ssl_cafile is not None else None,
            source="NICHIIKI_PARTNER_KAFKA",
        )

    @classmethod
    def of(cls, settings: Settings, cluster: str) -> KafkaConnection:
        """The connection to ``cluster`` (``internal`` or ``edge``, as ``Topic.cluster`` names it)."""
        if cluster == "edge":
            return cls.edge(settings)
        if cluster == "internal":
            return cls.internal(settings)
        raise ValueError(f"unknown Kafka cluster {cluster!r}")

    # -- in each client library's shape --------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext | None:
        """A verifying client context (hostname checked) for SSL and SASL_SSL, else None."""
        return create_ssl_context(cafile=self.cafile) if self.tls else None

    def aiokafka_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``AIOKafkaProducer``, ``AIOKafkaConsumer``, ``AIOKafkaAdminClient`` and
        ``AIOKafkaClient``: add the client's own tuning beside them."""
        kwargs: dict[str, Any] = {"bootstrap_servers": self.bootstrap, "security_protocol": self.security_protocol}
        if self.tls:
            kwargs["ssl_context"] = self.ssl_context()
        if self.sasl:
            kwargs.update(
                sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.username,
                sasl_plain_password=self.password,
            )
        return kwargs

    def faststream_security(self) -> BaseSecurity | None:
        """The ``security=`` of FastStream's ``KafkaBroker`` (which turns it into the same aiokafka arguments)."""
        context = self.ssl_context()
        if self.sasl:
            assert self.username is not None and self.password is not None  # checked in __post_init__
            scram = SASLScram512 if self.sasl_mechanism == "SCRAM-SHA-512" else SASLScram256
            return scram(self.username, self.password, ssl_context=context, use_ssl=self.tls)
        if self.tls:
            return BaseSecurity(ssl_context=context, use_ssl=True)
        return None

    def confluent_config(self) -> dict[str, str]:
        """The librdkafka properties of a confluent-kafka ``Producer``/``Consumer``/``AdminClient``: add
        the client's own (``group.id``...) beside them."""
        config = {"bootstrap.servers": self.bootstrap, "security.protocol": self.security_protocol.lower()}
        if self.tls:
            # librdkafka verifies the broker's certificate and host name by default (since 1.9/2.0)
            config["ssl.endpoint.identification.algorithm"] = "https"
            if self.cafile is not None:
                config["ssl.ca.location"] = self.cafile
        if self.sasl:
            assert self.username is not None and self.password is not None
            config.update({
                "sasl.mechanisms": self.sasl_mechanism, "sasl.username": self.username,
                "sasl.password": self.password,
            })
        return config
