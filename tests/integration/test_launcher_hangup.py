"""The launcher's hangup: a closed terminal stops the platform in order, as Ctrl-C does.

The services and servers run in sessions of their own (a terminal's signals reach the launcher
only), so a launcher that died of the hangup would leave them all running. The launcher here is
``start_platform`` itself with one stand-in service instead of the platform's (its stop is what
this is about; ``tests/e2e/test_platform.py`` starts and stops the real one).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from shared.cli.processes import is_alive
from shared.kit.settings import REPO_ROOT

_LAUNCHER = """
import sys
from pathlib import Path
from shared.cli import platform
from shared.cli.processes import ServiceProcess
from shared.kit.settings import Settings

state = Path(sys.argv[1])

def start(self):
    process = ServiceProcess("stand-in", 0, {}, state / "stand-in.log",
                             argv=[sys.executable, "-c", "import time; time.sleep(120)"])
    process.start()
    self.services.append(process)
    print("pid", process.pid, flush=True)

platform.Platform.start = start
sys.exit(platform.start_platform(Settings(state_dir=state)))
"""


def _launch(tmp_path: Path, *, ignore_hangup: bool = False) -> tuple[subprocess.Popen[bytes], int]:
    launcher = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, str(tmp_path)], cwd=REPO_ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        # As a terminal starts it (SIGHUP's default), or as `nohup` does (ignored): either way set here,
        # since an ignored SIGHUP is inherited through exec and this suite may itself run under nohup.
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN if ignore_hangup else signal.SIG_DFL),
    )
    assert launcher.stdout is not None
    line = launcher.stdout.readline()
    assert line.startswith(b"pid "), line
    return launcher, int(line.split()[1])


def _cleanup(launcher: subprocess.Popen[bytes], service: int) -> None:
    """After a failure: nothing left behind (the service's pid is not ours to kill once it is gone)."""
    if is_alive(service):
        with contextlib.suppress(ProcessLookupError):
            os.kill(service, signal.SIGKILL)
    if launcher.poll() is None:
        launcher.kill()
    launcher.wait(10)


def test_a_closed_terminal_stops_the_services_in_order(tmp_path: Path) -> None:
    launcher, service = _launch(tmp_path)
    try:
        assert launcher.stdout is not None and launcher.stderr is not None
        # The terminal is gone: what the launcher writes while it stops has nowhere to go.
        launcher.stdout.close()
        launcher.stderr.close()
        os.killpg(launcher.pid, signal.SIGHUP)
        launcher.wait(30)
        assert launcher.returncode >= 0, f"the launcher died of signal {-launcher.returncode}"
        assert not is_alive(service), "the service was left running"
    finally:
        _cleanup(launcher, service)


def test_under_nohup_a_hangup_leaves_the_platform_running(tmp_path: Path) -> None:
    launcher, service = _launch(tmp_path, ignore_hangup=True)
    try:
        os.killpg(launcher.pid, signal.SIGHUP)
        time.sleep(0.5)
        assert launcher.poll() is None and is_alive(service)
        launcher.send_signal(signal.SIGTERM)  # `nichiiki stop`
        assert launcher.wait(30) == 0
        assert not is_alive(service)
    finally:
        _cleanup(launcher, service)
