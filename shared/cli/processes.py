"""Service processes: each service runs as its own ``python -m services.<name>`` child process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from shared.kit.settings import REPO_ROOT, SERVICE_PORTS

#: Environment for one service's processes on one machine, over the platform's. The console serves
#: every staff page through one event loop: two workers, as production runs two replicas of it; with
#: one, 20 staff's pages queued in its loop while the services answered in time (docs/benchmarks.md).
LOCAL_SERVICE_ENV: dict[str, dict[str, str]] = {"console": {"NICHIIKI_HTTP_WORKERS": "2"}}


def available_services() -> list[str]:
    """Services that exist in this checkout (a folder with ``__main__.py``), in start-up order."""
    return [name for name in SERVICE_PORTS if (REPO_ROOT / "services" / name / "__main__.py").exists()]


def is_alive(pid: int) -> bool:
    """True while the process runs (a zombie waiting for its parent to reap it has stopped)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


@dataclass
class ServiceProcess:
    name: str
    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    #: The command to run instead of ``python -m services.<name>`` (tests: a process that dies).
    argv: list[str] | None = None
    #: When the current process was started (``time.monotonic()``; 0: never).
    started_at: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env, "NICHIIKI_HTTP_PORT": str(self.port)}
        self.started_at = time.monotonic()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv or [sys.executable, "-m", f"services.{self.name}"],
                cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches the launcher only; it stops us in order
            )

    @property
    def exit_code(self) -> int | None:
        """The exit code once it stopped (negative: the signal that killed it); None while it runs."""
        return self.process.poll() if self.process else None

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.is_running():
                raise RuntimeError(f"{self.name} exited during start-up; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f} s; see {self.log_path}")

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # graceful: finish the batch in hand, commit, stop
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def kill(self) -> None:
        """SIGKILL, for fault injection: no graceful anything."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
