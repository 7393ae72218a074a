"""The servers every service needs — two brokers, PostgreSQL, Redis — embedded or external.

An address set in the environment (``NICHIIKI_KAFKA_BOOTSTRAP``, ``NICHIIKI_PARTNER_KAFKA_BOOTSTRAP``,
``NICHIIKI_PG_DSN``, ``NICHIIKI_REDIS_URL``) is used as it is; anything unset is started here as a
child process. The partner-facing broker (the edge) is a second embedded broker when the internal
one is embedded too; beside an external cluster it defaults to that cluster (isolated by ACLs).
The platform launcher and the test harness both start their backends through this one function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import structlog

from shared.kit.settings import Settings
from shared.stack.broker import EmbeddedBroker
from shared.stack.postgres import EmbeddedPostgres
from shared.stack.redis import EmbeddedRedis

log = structlog.get_logger(__name__)

#: Fixed local ports of the embedded servers when the platform runs (tests pick free ones).
PLATFORM_PORTS = {"broker": 19092, "edge_broker": 19093, "postgres": 15432, "redis": 16379, "smtp": 10025}


@dataclass
class Backends:
    kafka_bootstrap: str
    pg_dsn: str
    redis_url: str
    partner_kafka_bootstrap: str = ""
    broker: EmbeddedBroker | None = None
    edge_broker: EmbeddedBroker | None = None
    postgres: EmbeddedPostgres | None = None
    redis: EmbeddedRedis | None = None
    started: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, str]:
        return {
            "kafka": f"{self.kafka_bootstrap} ({'embedded Tansu' if self.broker else 'external'})",
            "kafka edge": f"{self.partner_kafka_bootstrap} ({'embedded Tansu' if self.edge_broker else 'external'}; "
            "partner topics only)",
            "postgres": f"{self.pg_dsn} ({'embedded' if self.postgres else 'external'})",
            "redis": f"{self.redis_url} ({'embedded' if self.redis else 'external'})",
        }

    def env(self) -> dict[str, str]:
        """The variables that point a child service process at these servers."""
        return {
            "NICHIIKI_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "NICHIIKI_PARTNER_KAFKA_BOOTSTRAP": self.partner_kafka_bootstrap,
            "NICHIIKI_PG_DSN": self.pg_dsn,
            "NICHIIKI_REDIS_URL": self.redis_url,
        }

    def stop(self) -> None:
        for server in (self.redis, self.edge_broker, self.broker, self.postgres):
            if server is not None:
                server.stop()


def start_backends(state_dir: Path, settings: Settings, *, fixed_ports: bool) -> Backends:
    """Start what the settings do not point at; data of the embedded PostgreSQL stays in state_dir."""
    logs = state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    broker = edge_broker = postgres = redis = None

    def port(name: str) -> int | None:
        return PLATFORM_PORTS[name] + settings.port_offset if fixed_ports else None

    try:
        if settings.pg_dsn is None:
            postgres = EmbeddedPostgres(state_dir / "postgres", port=port("postgres"), log_path=logs / "postgres.log")
            postgres.start()
        if settings.kafka_bootstrap is None:
            broker = EmbeddedBroker(port=port("broker"), log_path=logs / "broker.log")
            broker.start()
            if settings.partner_kafka_bootstrap is None:
                edge_broker = EmbeddedBroker(port=port("edge_broker"), log_path=logs / "edge-broker.log")
                edge_broker.start()
        if settings.redis_url is None:
            redis = EmbeddedRedis(state_dir / "redis", port=port("redis"), log_path=logs / "redis.log")
            redis.start()
    except BaseException:
        for server in (redis, edge_broker, broker, postgres):
            if server is not None:
                server.stop()
        raise
    kafka_bootstrap = settings.kafka_bootstrap or (broker.bootstrap if broker else "")
    return Backends(
        kafka_bootstrap=kafka_bootstrap,
        partner_kafka_bootstrap=settings.partner_kafka_bootstrap or (
            edge_broker.bootstrap if edge_broker else kafka_bootstrap
        ),
        edge_broker=edge_broker,
        pg_dsn=settings.pg_dsn or (postgres.dsn if postgres else ""),
        redis_url=settings.redis_url or (redis.url if redis else ""),
        broker=broker,
        postgres=postgres,
        redis=redis,
    )
