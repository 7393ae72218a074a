"""`nichiiki start` / `status` / `stop` as a user runs them, on a fresh state folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from shared.kit.settings import REPO_ROOT


def _cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=timeout, check=False,
    )


def test_start_status_stop_leaves_no_process_behind(tmp_path: Path) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("NICHIIKI_")},
        "NICHIIKI_STATE_DIR": str(tmp_path / "state"),
        # Beside a platform a developer may be running, and below the ports ``free_port`` hands the other
        # tests' servers (from 12,000 below the ephemeral range: 20,768 here): 1,700 put the broker on
        # 20,792, where another test's server once already listened.
        "NICHIIKI_PORT_OFFSET": "1000",
    }
    launcher = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "start"], cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE, text=True,
    )
    output: list[str] = []
    try:
        assert launcher.stderr is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = launcher.stderr.readline()
            if not line and launcher.poll() is not None:
                break
            output.append(line)
            if "Nichiiki is running" in line:
                break
        assert any("Nichiiki is running" in line for line in output), "".join(output)
        run = json.loads((tmp_path / "state" / "run.json").read_text())
        pids = [info["pid"] for info in run["services"].values()] + [p for p in run["servers"].values() if p]
        assert all(psutil.pid_exists(pid) for pid in pids)

        status = _cli("status", env=env)
        assert status.returncode == 0, status.stdout + status.stderr
        for name in run["services"]:
            assert f"{name}" in status.stdout and "ready" in status.stdout

        stopped = _cli("stop", env=env)
        assert stopped.returncode == 0 and "stopped" in stopped.stdout
        launcher.wait(30)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0
    time.sleep(0.2)
    alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"processes left behind: {alive}"
    assert not (tmp_path / "state" / "run.json").exists()
    assert (tmp_path / "state" / "postgres" / "PG_VERSION").exists()  # data kept for the next start
