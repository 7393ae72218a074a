"""Platform settings: every knob is an environment variable with the ``NICHIIKI_`` prefix.

Unset servers mean "the embedded default": the launcher starts its own broker, PostgreSQL and
Redis and passes their addresses down to the services through these same variables.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.contracts.topics import SERVICES

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Every service of the platform, in start-up order, with its local HTTP port.
SERVICE_PORTS: dict[str, int] = {
    "registration": 8101,
    "certification": 8102,
    "subsidy": 8103,
    "donation": 8104,
    "notification": 8105,
    "partner_gateway": 8106,
    "identity": 8107,
    "planning": 8109,
    "insights": 8110,
    "listings": 8111,
    "console": 8108,
}
# The services are listed once (``SERVICES``); this map only gives them their ports.
if tuple(SERVICE_PORTS) != SERVICES:
    raise RuntimeError(f"SERVICE_PORTS lists {tuple(SERVICE_PORTS)}, not SERVICES {SERVICES} in order")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NICHIIKI_", extra="ignore")

    kafka_bootstrap: str | None = None
    #: The partner-facing cluster (the edge): only partner topics. Unset: the internal cluster's
    #: bootstrap (one cluster behind ACLs); the local stack starts a second embedded broker.
    partner_kafka_bootstrap: str | None = None
    pg_dsn: str | None = None
    redis_url: str | None = None
    smtp_url: str | None = None

    #: Prefix of every service database; tests use a per-session prefix to stay isolated.
    db_prefix: str = "nichiiki"
    #: Prefix of every topic name and consumer group; tests isolate runs with it.
    topic_prefix: str = ""

    state_dir: Path = REPO_ROOT / ".state"
    #: ``development`` (what ``./nichiiki start`` and the tests set) also accepts tokens signed with
    #: the development key below; anything else accepts only the OIDC issuer's (and needs one).
    env: str = "production"
    #: The OpenID Connect issuer whose JWKS signs every token (the embedded identity service,
    #: Keycloak, Entra ID...); required outside development.
    oidc_issuer: str | None = None
    #: The audience every service accepts instead of its own ``nichiiki-<service>`` (Microsoft Entra ID
    #: puts the API application's id in ``aud``, one for every service).
    oidc_audience: str | None = None
    #: Where this issuer puts the claims the services read, when not under their own names: a JSON
    #: object, e.g. ``{"municipality": "extension_<app>_municipality"}`` (docs/identity.md).
    oidc_claim_map: dict[str, str] = Field(default_factory=dict)
    #: The longest a token may live (``exp - iat``): a stolen token is worth little for long.
    token_max_lifetime_s: int = Field(default=3600, ge=60, le=86_400)
    #: The development key (HS256) and issuer of ``nichiiki token``: refused outside development.
    jwt_secret: str = Field(default="nichiiki-development-secret-change-me-0123456789", min_length=32)
    jwt_issuer: str = "nichiiki-development"

    #: The key store of crypto-shredding (``shared/kit/keyring.py``): its own database (default
    #: ``<prefix>_keyring`` on the platform's server; give it credentials of its own in production),
    #: the key-encryption key that wraps every data key (32 bytes, base64url; required outside
    #: development), and how long a process may keep a key it has read (an erasure reaches every
    #: process within this long).
    keyring_dsn: SecretStr | None = None
    keyring_master_key: SecretStr | None = None
    keyring_cache_s: float = Field(default=30.0, ge=0, le=300)

    log_format: str = "console"  # console | json
    log_level: str = "INFO"

    http_host: str = "127.0.0.1"
    http_port: int | None = None
    http_workers: int = 1
    #: Shifts every fixed local port of `nichiiki start` (services and embedded servers), so a
    #: second platform (a test, a colleague's) can run beside the first on one machine.
    port_offset: int = 0
    max_body_bytes: int = 64 * 1024

    # Consumer tuning: a fetch that finds nothing waits this long on the broker. Shorter costs
    # every idle consumer and the broker CPU (an empty fetch each time); longer delays a record
    # that lands on another partition of the fetch (docs/architecture.md, "Latency"). The
    # session timeout bounds group joins.
    kafka_fetch_max_wait_ms: int = 60
    kafka_session_timeout_ms: int = 10_000
    kafka_heartbeat_interval_ms: int = 1_000
    kafka_max_poll_interval_ms: int = 300_000
    consumer_batch_size: int = 500
    #: An idle consumer (no records for a second) pauses this long between fetches: the embedded
    #: broker burns CPU all the while a fetch waits on it (``consumer.IDLE_AFTER_S``). The first
    #: record after a quiet spell may wait this long per hop; 0 keeps a fetch waiting at all times.
    consumer_idle_rest_ms: int = 400
    #: Offsets of applied batches are committed at most this often, not after every batch: a commit
    #: is a broker round trip on the consumer's path and about 0.35 ms of CPU, and the inbox makes
    #: re-reading the uncommitted tail after a crash harmless.
    consumer_commit_interval_ms: int = 100
    consumer_max_attempts: int = 3
    outbox_batch_size: int = 500
    outbox_poll_interval_s: float = 1.0
    #: Freeze the start-up heap out of the garbage collector's view (see ``ServiceRuntime.start``);
    #: off where one process starts many runtimes, as the tests do.
    gc_freeze_after_start: bool = True
    #: A consumer without an assignment for this long is kept out of its group: /readyz reports its
    #: group and the runtime asks the broker to release a departed group leader (``group_join``). On
    #: the embedded broker a join takes half the session timeout and a sync up to 0.8 of it.
    consumer_join_timeout_ms: int = 30_000

    # Retention (``shared/kit/retention.py``): every runtime deletes the kit's old rows in the
    # background, a batch per statement, one replica at a time. The inbox must remember an event as
    # long as the broker can hand it over again, or that redelivery would apply it a second time.
    #: The event topics' ``retention.ms`` (the variable deploy/kafka/setup.sh creates them with): a
    #: consumer group reset to earliest reads this far back.
    kafka_retention_ms: int = Field(default=14 * 86_400_000, gt=0)
    #: The dead-letter topics' ``retention.ms``: a replay brings an event back to every consumer of
    #: its topic up to this long after it was parked.
    kafka_dlq_retention_ms: int = Field(default=30 * 86_400_000, gt=0)
    #: Kafka deletes whole segments, so a record outlives ``retention.ms`` by up to one segment's
    #: span (``segment.ms``: Kafka's default, a week, on the platform's topics).
    kafka_segment_ms: int = Field(default=7 * 86_400_000, ge=0)
    #: Inbox rows, handled and parked: refused at start-up under the longest an event can come back
    #: (its topic's retention and a segment, then its dead letter's and a segment: 58 days).
    inbox_retention_days: float = Field(default=60, gt=0)
    #: ``Idempotency-Key``s: the window the platform promises a client to retry a write with its key
    #: and get the first answer (24 h, as payment APIs do); a later repeat runs as a new request.
    idempotency_retention_hours: float = Field(default=24, gt=0)
    #: Published outbox rows: nothing reads them after the broker's ack (a re-send comes only from
    #: rows not yet marked), so they are kept only a while for inspection.
    outbox_published_retention_hours: float = Field(default=1, ge=0)
    retention_interval_s: float = Field(default=600, gt=0)
    #: Rows per DELETE: each statement holds its row locks for milliseconds, never a long lock.
    retention_batch_size: int = Field(default=5000, ge=1)

    # Rate limits (``shared/kit/rate_limit.py``): a rate and a burst (how many may come at once) per
    # kind of caller; refused with 429 and Retry-After. Redis down: not limited (a warning).
    rate_limit_enabled: bool = True
    #: Sign-in (``POST /oauth/token``) per account (username or client id) and per client IP.
    rate_limit_sign_in_account_per_min: float = Field(default=10, gt=0)
    rate_limit_sign_in_account_burst: int = Field(default=10, ge=1)
    rate_limit_sign_in_ip_per_min: float = Field(default=60, gt=0)
    rate_limit_sign_in_ip_burst: int = Field(default=30, ge=1)
    #: Partner API writes and reads (subsidy ``POST /v1/redemptions``...) per partner.
    rate_limit_partner_per_s: float = Field(default=50, gt=0)
    rate_limit_partner_burst: int = Field(default=100, ge=1)
    #: Certificate verification at the partner gateway per partner (every key of the partner together).
    rate_limit_verify_per_s: float = Field(default=200, gt=0)
    rate_limit_verify_burst: int = Field(default=400, ge=1)
    #: Routes anyone may call without a credential (public verification), per client IP.
    rate_limit_public_per_min: float = Field(default=120, gt=0)
    rate_limit_public_burst: int = Field(default=30, ge=1)
    #: The verification hot path takes this much of its rate from Redis at a time (one Redis call
    #: per lease, not per request); leased tokens not used within a second are dropped.
    rate_limit_lease_s: float = Field(default=0.05, gt=0, le=1)
    #: Take the client IP from the last ``X-Forwarded-For`` entry (only behind a proxy that sets it).
    rate_limit_trust_forwarded_for: bool = False

    # Kafka security (``shared/kit/kafka_security.py``), each cluster on its own: ``kafka_*`` the internal
    # cluster, ``partner_kafka_*`` the partner-facing one (used only with its own bootstrap; without it
    # the edge is the internal cluster and these of the internal one apply). SASL needs a username and
    # a password; SSL and SASL_SSL verify the broker against ``..._ssl_cafile`` (else the system CAs).
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256"] = "SCRAM-SHA-512"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    partner_kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    partner_kafka_sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256"] = "SCRAM-SHA-512"
    partner_kafka_sasl_username: str | None = None
    partner_kafka_sasl_password: SecretStr | None = None
    partner_kafka_ssl_cafile: Path | None = None

    def service_port(self, service: str) -> int:
        return SERVICE_PORTS[service] + self.port_offset

    def database_dsn(self, service: str) -> str:
        """The DSN of one service's own database, derived from the one platform DSN."""
        if self.pg_dsn is None:
            raise RuntimeError("NICHIIKI_PG_DSN is not set and no embedded PostgreSQL was started")
        return with_database(self.pg_dsn, self.database_name(service))

    def database_name(self, service: str) -> str:
        return f"{self.db_prefix}_{service}"

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def require_kafka(self) -> str:
        if self.kafka_bootstrap is None:
            raise RuntimeError("NICHIIKI_KAFKA_BOOTSTRAP is not set and no embedded broker was started")
        return self.kafka_bootstrap

    def require_partner_kafka(self) -> str:
        """The edge cluster's bootstrap: its own, else the internal cluster's (isolated by ACLs)."""
        return self.partner_kafka_bootstrap or self.require_kafka()

    def bootstrap_of(self, cluster: str) -> str:
        return self.require_partner_kafka() if cluster == "edge" else self.require_kafka()


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


def database_of(dsn: str) -> str:
    """The database a DSN names (its query may hold slashes: ``?host=/run/postgresql``)."""
    return urlsplit(dsn).path.lstrip("/")


@cache
def get_settings() -> Settings:
    return Settings()
