"""The launcher's supervisor (shared/cli/supervise.py): a service that dies comes back ready,
``nichiiki restart`` restarts one, and one that keeps dying is given up on, with a message.

The service runs as the launcher runs it: its own ``python -m services.<name>`` process over the
session's servers (the fleet of the end-to-end tests); the supervisor ticks in a thread, as it
ticks in the launcher's main loop.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from shared.cli import _restart
from shared.cli.fleet import ServiceFleet
from shared.cli.processes import ServiceProcess
from shared.cli.supervise import RestartPolicy, Supervisor, describe_exit, request_restart
from shared.kit.settings import Settings
from shared.stack.backends import Backends
from shared.stack.ports import free_port

SERVICE = "donation"


class Said:
    """What the supervisor said, line by line, as ``(what, message)``."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def __call__(self, what: str, message: str) -> None:
        with self._lock:
            self.lines.append((what, message))

    def about(self, name: str) -> list[str]:
        with self._lock:
            return [message for what, message in self.lines if what == name]


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not within {timeout} s")


def ready(process: ServiceProcess) -> bool:
    try:
        return httpx.get(f"{process.url}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def supervised(
    settings: Settings, backends: Backends, tmp_path: Path
) -> Iterator[tuple[ServiceFleet, Supervisor, Said, Settings]]:
    """One service started as the launcher does, under a supervisor that writes the run file the
    ``nichiiki restart`` command reads (this test process stands in for the launcher)."""
    fleet = ServiceFleet(settings, backends, tmp_path / "logs")
    fleet.start([SERVICE])
    said = Said()
    state = settings.model_copy(update={"state_dir": tmp_path})
    process = fleet.processes[SERVICE][0]

    def write_run_file() -> None:
        entry = {"pid": process.pid, "url": process.url, "log": str(process.log_path)}
        entry["state"] = supervisor.states()[SERVICE]
        (tmp_path / "run.json").write_text(json.dumps({"pid": os.getpid(), "env": {}, "services": {SERVICE: entry}}))

    supervisor = Supervisor(
        [process], say=said, state_dir=tmp_path, on_change=write_run_file,
        policy=RestartPolicy(first_delay_s=0.5, max_delay_s=2.0, stable_after_s=60, give_up_after=5),
    )
    write_run_file()
    stop = threading.Event()

    def tick() -> None:
        while not stop.is_set():
            supervisor.tick()
            time.sleep(0.1)

    ticking = threading.Thread(target=tick, daemon=True)
    ticking.start()
    try:
        yield fleet, supervisor, said, state
    finally:
        stop.set()
        ticking.join(10)
        fleet.stop()


def test_a_killed_service_comes_back_ready_and_restart_restarts_it(
    supervised: tuple[ServiceFleet, Supervisor, Said, Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    fleet, supervisor, said, state = supervised
    process = fleet.processes[SERVICE][0]
    killed = process.pid
    fleet.kill(SERVICE)  # SIGKILL: nothing graceful

    wait_for(lambda: any("ready again" in m for m in said.about(SERVICE)), 60, "ready again after the kill")
    assert process.pid != killed and ready(process)
    first = said.about(SERVICE)[0]
    assert "killed by SIGKILL" in first and "restarting in 0.5 s" in first, said.lines

    # `nichiiki restart`: asked through the state directory, it waits for the new process's /readyz.
    before = process.pid
    assert _restart(state, SERVICE, timeout_s=60) == 0
    assert process.pid != before and ready(process)
    assert f"{SERVICE} restarted: pid {before} → {process.pid}" in capsys.readouterr().out
    assert "restarting on request" in said.about(SERVICE)
    assert supervisor.watched[SERVICE].failures == 0  # a restart asked for is no failure


def test_a_service_that_keeps_dying_is_given_up_on_and_restart_tries_again(tmp_path: Path) -> None:
    doomed = ServiceProcess(
        "doomed", free_port(), {}, tmp_path / "doomed.log", argv=[sys.executable, "-c", "raise SystemExit(3)"],
    )
    doomed.start()
    said = Said()
    supervisor = Supervisor(
        [doomed], say=said, state_dir=tmp_path,
        policy=RestartPolicy(first_delay_s=0.1, max_delay_s=0.3, stable_after_s=30, give_up_after=4),
    )
    deadline = time.monotonic() + 15
    while not supervisor.watched["doomed"].given_up and time.monotonic() < deadline:
        supervisor.tick()
        time.sleep(0.02)
    messages = said.about("doomed")
    failures = [m for m in messages if m.startswith("exited with code 3")]
    assert len(failures) == 4, messages
    # Backoff doubles up to the cap, and the last failure gives up, pointing at the log and the command.
    assert [m.split("restarting in ")[1].split(" s")[0] for m in failures[:3]] == ["0.1", "0.2", "0.3"]
    assert "GIVEN UP after 4 failures in a row" in failures[3] and "./nichiiki restart doomed" in failures[3]
    assert supervisor.states() == {"doomed": "given up"}
    given_up_at = len(messages)
    for _ in range(5):
        supervisor.tick()
    assert len(said.about("doomed")) == given_up_at  # given up: left alone, no more lines

    request_restart(tmp_path, "doomed")  # what `nichiiki restart doomed` does
    supervisor.tick()
    revived = said.about("doomed")[given_up_at:given_up_at + 2]
    assert revived == ["restarting on request", f"restarted (pid {doomed.pid})"]
    assert not supervisor.watched["doomed"].given_up and not (tmp_path / "control" / "restart-doomed").exists()


def test_backoff_starts_over_after_a_service_stayed_up() -> None:
    now = [0.0]
    process = ServiceProcess("flaky", 1, {}, Path("/dev/null"))
    supervisor = Supervisor([process], say=lambda *_: None, clock=lambda: now[0], policy=RestartPolicy())
    watched = supervisor.watched["flaky"]
    delays: list[float] = []
    for up_s in (1, 1, 1, 100, 1):
        now[0] += up_s
        watched.started_at, watched.restart_at = now[0] - up_s, None
        supervisor._failed(watched, now[0])
        assert watched.restart_at is not None
        delays.append(watched.restart_at - now[0])
    assert delays == [1, 2, 4, 1, 2]
    assert describe_exit(-9) == "killed by SIGKILL" and describe_exit(2) == "exited with code 2"
