"""A fleet of service processes over given servers, as in production: each service its own process.

Used by the end-to-end and fault-injection tests and the benchmarks: services can be killed (SIGKILL) and
restarted; the servers (broker, PostgreSQL) can be restarted under them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from shared.cli.processes import ServiceProcess, available_services
from shared.kit.settings import Settings
from shared.stack.backends import Backends
from shared.stack.ports import free_port


def service_env(settings: Settings, backends: Backends, smtp_url: str | None) -> dict[str, str]:
    env = {
        **backends.env(),
        "NICHIIKI_DB_PREFIX": settings.db_prefix,
        "NICHIIKI_TOPIC_PREFIX": settings.topic_prefix,
        "NICHIIKI_JWT_SECRET": settings.jwt_secret,
        "NICHIIKI_ENV": settings.env,
        "NICHIIKI_KAFKA_SESSION_TIMEOUT_MS": str(settings.kafka_session_timeout_ms),
        "NICHIIKI_KAFKA_HEARTBEAT_INTERVAL_MS": str(settings.kafka_heartbeat_interval_ms),
        "NICHIIKI_KAFKA_FETCH_MAX_WAIT_MS": str(settings.kafka_fetch_max_wait_ms),
        "NICHIIKI_CONSUMER_IDLE_REST_MS": str(settings.consumer_idle_rest_ms),
        "NICHIIKI_OUTBOX_POLL_INTERVAL_S": str(settings.outbox_poll_interval_s),
        "NICHIIKI_LOG_FORMAT": "json",
        "NICHIIKI_LOG_LEVEL": "INFO",
    }
    if settings.oidc_issuer:
        env["NICHIIKI_OIDC_ISSUER"] = settings.oidc_issuer
    if smtp_url:
        env["NICHIIKI_SMTP_URL"] = smtp_url
    return env


@dataclass
class ServiceFleet:
    settings: Settings
    backends: Backends
    log_dir: Path
    smtp_url: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    #: Environment for one service's processes only, over ``extra_env`` (e.g. its HTTP workers).
    service_env: dict[str, dict[str, str]] = field(default_factory=dict)
    processes: dict[str, list[ServiceProcess]] = field(default_factory=dict)
    #: The first identity replica's port, chosen before any service starts (it is in the issuer URL).
    identity_port: int | None = None

    def start(self, names: Iterable[str] | None = None, *, replicas: int = 1) -> None:
        wanted = list(names) if names is not None else available_services()
        if "identity" in wanted and not self.settings.oidc_issuer and "NICHIIKI_OIDC_ISSUER" not in self.extra_env:
            # The issuer is the identity service's own URL: every service (and it) must know it first.
            self.identity_port = free_port()
            self.extra_env["NICHIIKI_OIDC_ISSUER"] = f"http://127.0.0.1:{self.identity_port}"
        for name in wanted:
            for _ in range(replicas):
                self.add_replica(name)
        for name in wanted:
            for process in self.processes[name]:
                process.wait_ready(timeout=90)

    def add_replica(self, name: str) -> ServiceProcess:
        replicas = self.processes.setdefault(name, [])
        env = {**service_env(self.settings, self.backends, self.smtp_url), **self.extra_env,
               **self.service_env.get(name, {})}
        if name == "console":  # a front: it calls the services started before it (SERVICES order)
            env["NICHIIKI_CONSOLE_SERVICE_URLS"] = json.dumps(
                {other: self.url(other) for other in self.processes if other != "console" and self.processes[other]}
            )
        port = self.identity_port if name == "identity" and not replicas and self.identity_port else free_port()
        process = ServiceProcess(name, port, env, self.log_dir / f"{name}-{len(replicas)}.log")
        process.start()
        replicas.append(process)
        return process

    def url(self, name: str, replica: int = 0) -> str:
        return self.processes[name][replica].url

    def client(self, name: str, replica: int = 0) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url(name, replica), timeout=15)

    def kill(self, name: str, replica: int = 0) -> None:
        self.processes[name][replica].kill()

    def restart(self, name: str, replica: int = 0) -> None:
        process = self.processes[name][replica]
        process.stop()
        process.start()
        process.wait_ready(timeout=90)

    def wait_all_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        for replicas in self.processes.values():
            for process in replicas:
                process.wait_ready(timeout=max(1.0, deadline - time.monotonic()))

    def stop(self) -> None:
        for replicas in self.processes.values():
            for process in replicas:
                process.stop()

    def logs(self, name: str, replica: int = 0) -> str:
        return self.processes[name][replica].log_path.read_text(errors="replace")
