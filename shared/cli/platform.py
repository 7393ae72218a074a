"""``nichiiki start``: the whole platform on one machine, until Ctrl-C.

Backends first (embedded unless the environment names external servers), then the SMTP sink,
topics, and every service as its own process, each named as it becomes ready; a summary when all
are. Then a supervisor keeps the services up (``shared/cli/supervise.py``: a service that dies is
restarted with backoff; ``nichiiki restart <service>`` restarts one). Ctrl-C (or ``nichiiki stop``
from another terminal, or the terminal closing) stops the services gracefully, then the backends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import structlog

from shared.cli.processes import LOCAL_SERVICE_ENV, ServiceProcess, available_services, is_alive
from shared.cli.supervise import Supervisor, describe_exit
from shared.kit.kafka_admin import ensure_topics
from shared.kit.settings import REPO_ROOT, Settings
from shared.stack.backends import PLATFORM_PORTS, Backends, start_backends
from shared.stack.ports import wait_for_port

log = structlog.get_logger("nichiiki")


def run_file(settings: Settings) -> Path:
    return settings.state_dir / "run.json"


def read_run_file(settings: Settings) -> dict[str, Any] | None:
    path = run_file(settings)
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    if not is_alive(int(data.get("pid", 0))):
        return None  # a stale file from a launcher that died
    return data


def settings_for_running_platform(settings: Settings) -> Settings:
    """Settings that point at the running platform's servers when the environment names none."""
    running = read_run_file(settings)
    if running is None:
        return settings
    env = running["env"]
    return settings.model_copy(update={
        "kafka_bootstrap": settings.kafka_bootstrap or env["NICHIIKI_KAFKA_BOOTSTRAP"],
        "partner_kafka_bootstrap": settings.partner_kafka_bootstrap or env.get("NICHIIKI_PARTNER_KAFKA_BOOTSTRAP"),
        "pg_dsn": settings.pg_dsn or env["NICHIIKI_PG_DSN"],
        "redis_url": settings.redis_url or env["NICHIIKI_REDIS_URL"],
        "smtp_url": settings.smtp_url or env.get("NICHIIKI_SMTP_URL"),
    })


class Platform:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state_dir = settings.state_dir
        self.logs = self.state_dir / "logs"
        self.backends: Backends | None = None
        self.smtp: subprocess.Popen[bytes] | None = None
        self.services: list[ServiceProcess] = []
        self.env: dict[str, str] = {}
        self.supervisor: Supervisor | None = None

    def start(self) -> None:
        started = time.monotonic()
        if read_run_file(self.settings) is not None:
            raise SystemExit(f"the platform is already running (see {run_file(self.settings)}); `nichiiki stop` first")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        _step("backends", "starting brokers, PostgreSQL and Redis (embedded unless set in the environment)...")
        self.backends = start_backends(self.state_dir, self.settings, fixed_ports=True)
        for name, where in self.backends.describe().items():
            _step(name, f"{where}  ready ({time.monotonic() - started:.1f} s)")
        env = self.backends.env()
        env["NICHIIKI_STATE_DIR"] = str(self.state_dir)
        env["NICHIIKI_SMTP_URL"] = self.settings.smtp_url or self._start_smtp_sink()
        env["NICHIIKI_LOG_FORMAT"] = os.environ.get("NICHIIKI_LOG_FORMAT", "json")
        env["NICHIIKI_ENV"] = self.settings.env
        # Every token comes from the embedded identity provider unless the environment names another.
        env["NICHIIKI_OIDC_ISSUER"] = self.settings.oidc_issuer or (
            f"http://127.0.0.1:{self.settings.service_port('identity')}"
        )
        _step("smtp", env["NICHIIKI_SMTP_URL"] + ("" if self.settings.smtp_url else f" (sink: {self.mailbox})"))
        wired = replace_settings(self.settings, env)
        created = asyncio.run(ensure_topics(wired))
        _step("topics", f"{len(created)} created" if created else "all present")
        self.env = env
        self._write_run_file(env)
        names = available_services()
        for name in names:
            own = {k: v for k, v in LOCAL_SERVICE_ENV.get(name, {}).items() if k not in os.environ}
            process = ServiceProcess(name, self.settings.service_port(name), {**env, **own}, self.logs / f"{name}.log")
            process.start()
            self.services.append(process)
        _step("services", f"starting {len(names)}: {', '.join(names)}...")
        for done, process in enumerate(_as_ready(self.services), start=1):
            _step(process.name, f"ready at {process.url}  (OpenAPI {process.url}/docs)  "
                                f"[{done}/{len(names)}, {time.monotonic() - started:.1f} s]")
        self._write_run_file(env)
        _summary(self, env, time.monotonic() - started)

    @property
    def mailbox(self) -> Path:
        return self.state_dir / "mailbox"

    def _start_smtp_sink(self) -> str:
        port = PLATFORM_PORTS["smtp"] + self.settings.port_offset
        with (self.logs / "smtp.log").open("ab") as log_file:
            self.smtp = subprocess.Popen(
                [sys.executable, "-m", "shared.stack.smtp_sink", "--dir", str(self.mailbox), "--port", str(port)],
                cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            )
        wait_for_port("127.0.0.1", port, timeout=10)
        return f"smtp://127.0.0.1:{port}"

    def _write_run_file(self, env: dict[str, str]) -> None:
        states = self.supervisor.states() if self.supervisor else {}
        path = run_file(self.settings)
        partial = path.with_suffix(".tmp")
        partial.write_text(json.dumps({
            "pid": os.getpid(),
            "env": env,
            "services": {
                p.name: {"pid": p.pid, "url": p.url, "log": str(p.log_path), "state": states.get(p.name, "running")}
                for p in self.services
            },
            "servers": self._server_pids(),
            "mailbox": str(self.mailbox),
        }, indent=2))
        partial.replace(path)  # `nichiiki restart` polls it: never let it read half a file

    def _server_pids(self) -> dict[str, int | None]:
        b = self.backends
        return {
            "broker": b.broker.pid if b and b.broker else None,
            "postgres": b.postgres.pid if b and b.postgres else None,
            "redis": b.redis.pid if b and b.redis else None,
            "smtp": self.smtp.pid if self.smtp else None,
        }

    def wait(self) -> None:
        """Block until a stop signal (``_on_stop_signals``), keeping the services up (restarts with backoff)."""
        stop = False

        def request_stop(*_: object) -> None:
            nonlocal stop
            stop = True

        _on_stop_signals(request_stop)
        self.supervisor = Supervisor(
            self.services, say=_step, state_dir=self.state_dir, on_change=lambda: self._write_run_file(self.env),
        )
        while not stop:
            self.supervisor.tick()
            time.sleep(0.3)

    def stop(self) -> None:
        for process in reversed(self.services):
            _step(process.name, "stopping")
            process.stop()
        if self.smtp is not None and self.smtp.poll() is None:
            self.smtp.terminate()
            self.smtp.wait(5)
        if self.backends is not None:
            _step("backends", "stopping")
            self.backends.stop()
        run_file(self.settings).unlink(missing_ok=True)
        _step("platform", "stopped")


def replace_settings(settings: Settings, env: dict[str, str]) -> Settings:
    return settings.model_copy(update={
        "kafka_bootstrap": env["NICHIIKI_KAFKA_BOOTSTRAP"], "pg_dsn": env["NICHIIKI_PG_DSN"],
        "partner_kafka_bootstrap": env.get("NICHIIKI_PARTNER_KAFKA_BOOTSTRAP"),
        "redis_url": env["NICHIIKI_REDIS_URL"], "smtp_url": env.get("NICHIIKI_SMTP_URL"),
    })


def _as_ready(processes: list[ServiceProcess], timeout: float = 120.0) -> Iterator[ServiceProcess]:
    """The processes in the order they become ready (each one named as soon as it is); one that
    exits is named and skipped."""
    waiting = list(processes)
    deadline = time.monotonic() + timeout
    while waiting:
        for process in list(waiting):
            if not process.is_running():
                # Left to the supervisor, which restarts it with backoff (or gives up, and says so).
                _step(process.name, f"{describe_exit(process.exit_code)} during start-up; see {process.log_path}")
                waiting.remove(process)
                continue
            try:
                ready = httpx.get(f"{process.url}/readyz", timeout=1.0).status_code == 200
            except httpx.HTTPError:
                ready = False
            if ready:
                waiting.remove(process)
                yield process
        if waiting and time.monotonic() > deadline:
            names = ", ".join(p.name for p in waiting)
            raise TimeoutError(f"not ready after {timeout:.0f} s: {names}; see {waiting[0].log_path.parent}")
        time.sleep(0.1)


def _step(what: str, message: str) -> None:
    # After a hangup the terminal is gone and writing to it fails: the platform still stops in order.
    with contextlib.suppress(OSError):
        sys.stderr.write(f"  {what:<16} {message}\n")
        sys.stderr.flush()


def _summary(platform: Platform, env: dict[str, str], seconds: float) -> None:
    lines = [
        "",
        f"Nichiiki is running ({seconds:.1f} s to start). Ctrl-C or `./nichiiki stop` stops everything.",
        "",
        *(f"  {p.name:<16} {p.url}/docs" for p in platform.services),
        "",
        f"  kafka            {env['NICHIIKI_KAFKA_BOOTSTRAP']}",
        f"  postgres         {env['NICHIIKI_PG_DSN']}",
        f"  redis            {env['NICHIIKI_REDIS_URL']}",
        f"  smtp             {env['NICHIIKI_SMTP_URL']}",
        f"  logs             {platform.logs}/",
        f"  mailbox          {platform.mailbox}/",
        "",
        f"  sign in          {env['NICHIIKI_OIDC_ISSUER']}/oauth/token (docs/identity.md; development accounts in",
        "                   README.md), e.g. reviewer@shirahama.example with its TOTP",
        "  Try: ./nichiiki status   ./nichiiki token --role staff --municipality 304018  (development only)",
        "",
    ]
    sys.stderr.write("\n".join(lines) + "\n")


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _on_stop_signals(handler: Callable[..., None]) -> None:
    """Ctrl-C, SIGTERM (``nichiiki stop``) and SIGHUP (the terminal closed) all stop the platform in
    order. Unhandled, a hangup would kill the launcher alone and leave the services and servers
    running, each in a session of its own; a SIGHUP already ignored (``nohup``) stays ignored."""
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, handler)


def start_platform(settings: Settings, demo: bool = False) -> int:
    platform = Platform(settings)
    outcome = 0
    try:
        _on_stop_signals(_interrupt)  # during the start-up and the demo: stop what has started so far
        platform.start()
        if demo:
            from shared.cli.demo import run_demo

            outcome = run_demo(settings_for_running_platform(settings))
            _step("demo", "finished" if outcome == 0 else "FAILED (see above); the platform keeps running")
        platform.wait()
    except KeyboardInterrupt:
        pass
    finally:
        _on_stop_signals(lambda *_: None)  # a second signal must not cut the stop short
        platform.stop()
    return outcome

