"""Keeping the launcher's services up: restart one that dies, with backoff, and say so.

``nichiiki start`` runs a :class:`Supervisor` over its service processes. A service that exits is
started again after a delay that doubles per failure (1 s → 30 s); one that then stays up a while
(60 s) starts from the first delay again on its next failure. A service that fails too often in a
row (5 failures less than 60 s apart) is given up on: it would only fill its log. Each event is one
line: which service, its exit code, what happens next.

``nichiiki restart <service>`` asks the running launcher through a file in the state directory
(``control/restart-<service>``): the supervisor stops the service gracefully and starts it at once
(also one it had given up on), then the command waits for the new process's ``/readyz``.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from shared.cli.processes import ServiceProcess

#: How a line is said: (what, message), as the launcher prints its steps.
Say = Callable[[str, str], None]


@dataclass(frozen=True)
class RestartPolicy:
    first_delay_s: float = 1.0
    max_delay_s: float = 30.0
    #: Up at least this long, a process counts as having started well: its next failure is a first one.
    stable_after_s: float = 60.0
    #: This many failures in a row, each after less than ``stable_after_s`` up: give up.
    give_up_after: int = 5


@dataclass
class Watched:
    process: ServiceProcess
    started_at: float
    delay_s: float
    #: Failures in a row (each came before the process was up ``stable_after_s``).
    failures: int = 0
    restart_at: float | None = None
    given_up: bool = False
    awaiting_ready: bool = False
    restarts: int = 0

    @property
    def state(self) -> str:
        if self.given_up:
            return "given up"
        if self.restart_at is not None:
            return "restarting"
        return "starting" if self.awaiting_ready else "running"


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exited"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def control_dir(state_dir: Path) -> Path:
    return state_dir / "control"


def request_restart(state_dir: Path, service: str) -> None:
    """Ask the running launcher to restart ``service`` (its supervisor picks the request up)."""
    folder = control_dir(state_dir)
    folder.mkdir(parents=True, exist_ok=True)
    request = folder / f"restart-{service}"
    partial = request.with_suffix(".tmp")
    partial.write_text(str(time.time()))
    partial.replace(request)  # the supervisor never sees a half-written request


class Supervisor:
    """Watches service processes; ``tick()`` (the launcher calls it every few tenths of a second)
    restarts what died and what was asked for, and notices when a restarted one is ready again."""

    def __init__(
        self, processes: Sequence[ServiceProcess], *, say: Say, state_dir: Path | None = None,
        policy: RestartPolicy | None = None, on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy or RestartPolicy()
        self.clock = clock
        now = clock()
        # Up since it was started (the launcher waited for every service before supervising).
        self.watched = {p.name: Watched(p, p.started_at or now, self.policy.first_delay_s) for p in processes}
        self.say = say
        self.state_dir = state_dir
        self.on_change = on_change

    def states(self) -> dict[str, str]:
        return {name: watched.state for name, watched in self.watched.items()}

    def tick(self) -> None:
        self._take_requests()
        now = self.clock()
        for name, watched in self.watched.items():
            process = watched.process
            if watched.given_up:
                continue
            if watched.restart_at is None and not process.is_running():
                self._failed(watched, now)
            elif watched.restart_at is not None and now >= watched.restart_at:
                self._start(watched, now, "restarted")
            elif watched.awaiting_ready and process.is_running() and _ready(process):
                watched.awaiting_ready = False
                self.say(name, f"ready again at {process.url} (pid {process.pid})")
                self.on_change()

    def restart_now(self, name: str) -> None:
        """Stop the service gracefully (if it runs) and start it again, forgetting its failures."""
        watched = self.watched[name]
        self.say(name, "restarting on request")
        watched.process.stop()
        watched.failures, watched.given_up, watched.delay_s = 0, False, self.policy.first_delay_s
        self._start(watched, self.clock(), "restarted")

    def _failed(self, watched: Watched, now: float) -> None:
        process, policy = watched.process, self.policy
        up_s = now - watched.started_at
        if up_s >= policy.stable_after_s:
            watched.failures, watched.delay_s = 0, policy.first_delay_s
        watched.failures += 1
        watched.awaiting_ready = False
        what = f"{describe_exit(process.exit_code)} after {up_s:.1f} s up"
        if watched.failures >= policy.give_up_after:
            watched.given_up = True
            self.say(process.name, f"{what} — GIVEN UP after {watched.failures} failures in a row; see "
                                   f"{process.log_path}, then `./nichiiki restart {process.name}`")
        else:
            watched.restart_at = now + watched.delay_s
            self.say(process.name, f"{what}; restarting in {watched.delay_s:g} s (see {process.log_path})")
            watched.delay_s = min(watched.delay_s * 2, policy.max_delay_s)
        self.on_change()

    def _start(self, watched: Watched, now: float, verb: str) -> None:
        watched.process.start()
        watched.started_at, watched.restart_at, watched.awaiting_ready = now, None, True
        watched.restarts += 1
        self.say(watched.process.name, f"{verb} (pid {watched.process.pid})")
        self.on_change()

    def _take_requests(self) -> None:
        if self.state_dir is None:
            return
        folder = control_dir(self.state_dir)
        if not folder.is_dir():
            return
        for request in sorted(folder.glob("restart-*")):
            if request.suffix == ".tmp":
                continue
            request.unlink(missing_ok=True)
            name = request.name.removeprefix("restart-")
            if name in self.watched:
                self.restart_now(name)
            else:
                self.say(name, "restart asked for, but no such service runs here")


def _ready(process: ServiceProcess) -> bool:
    try:
        return httpx.get(f"{process.url}/readyz", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


def wait_restarted(
    read_running: Callable[[], dict[str, Any] | None], service: str, old_pid: int | None, *, timeout_s: float,
) -> tuple[dict[str, Any], float]:
    """Wait until the launcher's run file names a new process for ``service`` and it is ready;
    return its entry and the seconds it took. Raises TimeoutError (with what was last seen)."""
    started = time.monotonic()
    deadline = started + timeout_s
    seen = "no new process yet"
    while time.monotonic() < deadline:
        running = read_running()
        if running is None:
            raise RuntimeError("the launcher stopped")
        info = running["services"].get(service, {})
        if info.get("pid") not in (None, old_pid):
            seen = f"pid {info['pid']} not ready"
            try:
                if httpx.get(f"{info['url']}/readyz", timeout=1.0).status_code == 200:
                    return info, time.monotonic() - started
            except httpx.HTTPError:
                pass
        if info.get("state") == "given up":
            raise RuntimeError(f"{service} keeps exiting; see {info.get('log')}")
        time.sleep(0.2)
    raise TimeoutError(f"{service} not ready after {timeout_s:.0f} s ({seen})")
