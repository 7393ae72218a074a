"""The browser the console's tests drive (tests/e2e/test_console.py): Debian's ``chromium`` and
``chromium-driver``, with a Japanese font. ``nichiiki test`` installs them with apt-get when they are
missing and it runs as root; otherwise it says how, and the browser tests fail (never skip)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

PACKAGES = ("chromium", "chromium-driver", "fonts-noto-cjk")


def browser_present() -> bool:
    return bool((shutil.which("chromium") or shutil.which("chromium-browser")) and shutil.which("chromedriver"))


def ensure_browser() -> int:
    """0 when Chromium and its driver are there (installed now if need be), else 1 with the reason."""
    if browser_present():
        return 0
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        sys.stderr.write(
            "the console's browser tests need Chromium and its driver: run `sudo apt-get install -y "
            f"{' '.join(PACKAGES)}` (Debian/Ubuntu), or put chromium and chromedriver on PATH\n"
        )
        return 1
    sys.stderr.write(f"installing {' '.join(PACKAGES)} with apt-get (the console's browser tests)\n")
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(install, env=environment, check=False).returncode != 0:
        subprocess.run(["apt-get", "update"], env=environment, check=False)
        if subprocess.run(install, env=environment, check=False).returncode != 0:
            sys.stderr.write("apt-get could not install Chromium: the browser tests will fail\n")
            return 1
    return 0 if browser_present() else 1
