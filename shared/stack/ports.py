"""Ports and child processes: the small pieces every embedded server of the local stack shares.

* :func:`free_port` / :func:`port_is_free` / :func:`wait_for_port` deal with TCP ports on 127.0.0.1;
* :class:`ChildServer` is the life cycle (start / stop / kill / restart / context manager) shared
  by the broker, PostgreSQL and Redis wrappers, which only say how to spawn and probe their server;
* :func:`terminate_process` / :func:`kill_process` stop a child server *and everything it spawned*
  (PostgreSQL forks one process per backend), reaping the child so no zombie is left behind;
* :func:`open_log` / :func:`log_tail` handle the optional log file of a child server.

Everything here is synchronous (sockets + polling), so it can be used from the CLI, from plain
pytest fixtures and from scripts alike.
"""

from __future__ import annotations

import contextlib
import random
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO, ClassVar, Self

import psutil
import structlog

__all__ = [
    "LOCALHOST",
    "ChildServer",
    "close_log",
    "free_port",
    "kill_process",
    "log_tail",
    "open_log",
    "port_is_free",
    "terminate_process",
    "wait_for_port",
    "wait_gone",
]

log = structlog.get_logger(__name__)

LOCALHOST = "127.0.0.1"

_POLL_INTERVAL = 0.01


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port nobody listens on right now, below the kernel's ephemeral range.

    A service binds its port only after start-up (migrations, broker), seconds later. A port the
    kernel picked by binding port 0 is an ephemeral one, which an outgoing connection of any
    process (a Kafka or PostgreSQL client) may take in the meantime: seen here as "address already
    in use". Ports below the ephemeral range are never handed to outgoing connections.
    """
    low, _ = _ephemeral_range()
    candidates = list(range(max(1024, low - _BELOW_EPHEMERAL), low))
    random.shuffle(candidates)
    for port in candidates[:200]:
        if port not in _HANDED_OUT and port_is_free(port, host):
            _HANDED_OUT.add(port)  # two picks before either server binds must still differ
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # fall back to the kernel's pick
        sock.bind((host, 0))
        picked: int = sock.getsockname()[1]
        return picked


_HANDED_OUT: set[int] = set()
#: How far below the ephemeral range ``free_port`` looks (clear of the fixed platform ports).
_BELOW_EPHEMERAL = 12_000


def _ephemeral_range() -> tuple[int, int]:
    with contextlib.suppress(OSError, ValueError):
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    return 32768, 60999


def port_is_free(port: int, host: str = LOCALHOST) -> bool:
    """True when nothing accepts connections on ``host:port`` and the port can be bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _accepts(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(
    host: str,
    port: int,
    timeout: float,
    *,
    process: subprocess.Popen[bytes] | None = None,
    name: str | None = None,
) -> None:
    """Block until ``host:port`` accepts TCP connections.

    :param process: when given, fail fast (``RuntimeError``) if that process exits while we wait —
        a server that died on start-up never opens its port, there is no point waiting.
    :param name: what is being waited for, for the error messages.
    :raises TimeoutError: when the port does not accept connections within ``timeout`` seconds.
    """
    what = name or "server"
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"{what} (pid {process.pid}) exited with code {process.returncode} "
                f"before {host}:{port} accepted connections"
            )
        if _accepts(host, port, timeout=0.2):
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: nothing accepted connections on {host}:{port} within {timeout:g} s")
        time.sleep(_POLL_INTERVAL)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        children: list[psutil.Process] = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    return children


def _signal_all(procs: list[psutil.Process], sig: signal.Signals) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)


def _is_gone(proc: psutil.Process) -> bool:
    """Exited: no such process, or a zombie (it holds no resource; its new parent, init, reaps it —
    some container inits take a second or two, which must not slow ``kill()`` down)."""
    try:
        return bool(proc.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process has exited; return those still alive after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if not _is_gone(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(_POLL_INTERVAL)
        alive = [p for p in alive if not _is_gone(p)]
    return alive


def _reap(process: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait for the child to exit (and reap it); True when it did within ``timeout``."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def kill_process(process: subprocess.Popen[bytes], *, name: str = "process") -> None:
    """SIGKILL the child and all its descendants (a crash, for fault tests), then reap them all."""
    descendants = _descendants(process.pid)
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGKILL)
    _signal_all(descendants, signal.SIGKILL)
    process.wait()
    alive = wait_gone(descendants, timeout=5)
    if alive:  # pragma: no cover - SIGKILL cannot be ignored; only an uninterruptible sleep delays it
        log.warning("stack.process.descendants_survived", name=name, pids=[p.pid for p in alive])
    log.debug("stack.process.killed", name=name, pid=process.pid)


def terminate_process(
    process: subprocess.Popen[bytes],
    *,
    sig: signal.Signals = signal.SIGTERM,
    timeout: float = 5.0,
    name: str = "process",
) -> None:
    """Ask the child to shut down with ``sig``; SIGKILL it (and its descendants) after ``timeout``.

    Descendants are collected *before* signalling, so processes the child forked are also waited
    for (and killed if they outlive it): no process is left behind when this returns.
    """
    descendants = _descendants(process.pid)
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        if not _reap(process, timeout):
            log.warning("stack.process.stop_timeout", name=name, pid=process.pid, timeout=timeout)
            kill_process(process, name=name)
            return
    else:
        process.wait()
    # A well-behaved server waits for its children before exiting; anything left is killed.
    alive = wait_gone(descendants, timeout=1.0)
    if alive:
        _signal_all(alive, signal.SIGKILL)
        wait_gone(alive, timeout=5)
    log.debug("stack.process.stopped", name=name, pid=process.pid, returncode=process.returncode)


def open_log(log_path: Path | None) -> IO[bytes] | int:
    """The stdout/stderr target of a child server: ``log_path`` opened for appending, or DEVNULL."""
    if log_path is None:
        return subprocess.DEVNULL
    log_path.parent.mkdir(parents=True, exist_ok=True)
    return log_path.open("ab")


def close_log(target: IO[bytes] | int | None) -> None:
    """Close what :func:`open_log` returned (DEVNULL and None are left alone)."""
    if target is not None and not isinstance(target, int):
        target.close()


def log_tail(log_path: Path | None, lines: int = 20) -> str:
    """The last lines of a child's log file, to make start-up failures self-explanatory."""
    if log_path is None:
        return "(no log_path was given; pass one to see the server's output)"
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return f"(log file {log_path} is not readable)"
    return "\n".join(text.splitlines()[-lines:])


class ChildServer:
    """A server run as a child process on ``127.0.0.1:<port>``; subclasses say how to spawn and probe it.

    The port is chosen once (at construction) and kept across :meth:`restart` and :meth:`kill` +
    :meth:`start`, so clients configured with the address keep working after a fault test.

    Subclasses spawn the server in a session of its own (``start_new_session``), as the launcher
    starts the services: a terminal's Ctrl-C reaches the launcher only, which stops the services
    first and the servers they drain into after, instead of the servers going at the same moment.
    """

    #: Human-readable name used in logs and error messages.
    name: ClassVar[str] = "server"
    #: The signal asking the server for a clean shutdown.
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM
    #: Seconds :meth:`start` waits for the server to be ready.
    start_timeout: ClassVar[float] = 30.0

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self._port = port if port is not None else free_port()
        self._log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_target: IO[bytes] | int | None = None

    # -- hooks -------------------------------------------------------------------------------

    def _prepare(self) -> None:
        """Before spawning (create directories, clean stale state...)."""

    def _spawn(self, output: IO[bytes] | int) -> subprocess.Popen[bytes]:
        raise NotImplementedError

    def _wait_ready(self, process: subprocess.Popen[bytes], deadline: float) -> None:
        """Return once the server answers requests; the default waits for its port."""
        wait_for_port(LOCALHOST, self._port, max(deadline - time.monotonic(), 0.0), process=process, name=self.name)

    def _cleanup(self) -> None:
        """After the process is gone (stopped or killed)."""

    # -- public API --------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def host(self) -> str:
        return LOCALHOST

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    @property
    def pid(self) -> int | None:
        """The pid of the running server process, ``None`` when it is not running."""
        return self._proc.pid if self.is_running() and self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the server and block until it is ready; a no-op when it already runs."""
        if self.is_running():
            return
        self._reset()  # a previous process that died on its own
        started = time.monotonic()
        try:
            self._prepare()
            if not port_is_free(self._port):
                raise RuntimeError(f"cannot start {self.name}: {LOCALHOST}:{self._port} is already in use")
            self._log_target = open_log(self._log_path)
            self._proc = self._spawn(self._log_target)
            self._wait_ready(self._proc, started + self.start_timeout)
        except BaseException as exc:
            spawned = self._proc is not None
            self._abort()
            if spawned and type(exc) in (RuntimeError, TimeoutError):
                raise type(exc)(f"{exc}\n--- {self.name} log tail ---\n{log_tail(self._log_path)}") from exc
            raise
        log.info(
            "stack.started",
            server=self.name,
            pid=self._proc.pid,
            port=self._port,
            seconds=round(time.monotonic() - started, 3),
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Clean shutdown (:attr:`stop_signal`), SIGKILL after ``timeout`` s; the processes are reaped."""
        if self._proc is not None:
            terminate_process(self._proc, sig=self.stop_signal, timeout=timeout, name=self.name)
            log.info("stack.stopped", server=self.name, pid=self._proc.pid, returncode=self._proc.returncode)
        self._reset()

    def kill(self) -> None:
        """SIGKILL the server and its children (a crash, for fault tests); :meth:`start` brings it back."""
        if self._proc is not None:
            kill_process(self._proc, name=self.name)
            log.info("stack.killed", server=self.name, pid=self._proc.pid)
        self._reset()

    def restart(self) -> None:
        """Clean stop then start, on the same port."""
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.is_running() else "stopped"
        return f"<{type(self).__name__} {LOCALHOST}:{self._port} {state}>"

    # -- internals ---------------------------------------------------------------------------

    def _abort(self) -> None:
        if self._proc is not None:
            kill_process(self._proc, name=self.name)
        self._reset()

    def _reset(self) -> None:
        if self._proc is not None and self._proc.poll() is None:  # pragma: no cover - defensive
            kill_process(self._proc, name=self.name)
        self._proc = None
        close_log(self._log_target)
        self._log_target = None
        self._cleanup()
