"""The ``nichiiki`` command: start and stop the platform, and the operator's everyday tools."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import timedelta

import httpx

from shared.cli.browser import ensure_browser
from shared.kit.auth import Role, StaffRole, mint_token
from shared.kit.logging import configure_logging
from shared.kit.settings import REPO_ROOT, SERVICE_PORTS, Settings, get_settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nichiiki", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    start = commands.add_parser("start", help="start the whole platform (embedded stack by default)")
    start.add_argument("--demo", action="store_true", help="once it is up, run the resident journey demo on it")
    commands.add_parser("stop", help="stop the running platform")
    restart = commands.add_parser("restart", help="restart one service of the running platform, until ready")
    restart.add_argument("service", choices=list(SERVICE_PORTS))
    restart.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for it to be ready")
    commands.add_parser("status", help="show what runs and whether it is healthy")
    commands.add_parser("demo", help="run the resident journey on the running platform, step by step")
    migrate = commands.add_parser("migrate", help="apply database migrations")
    migrate.add_argument("services", nargs="*", help="services to migrate (default: all)")
    commands.add_parser("topics", help="create every platform topic (idempotent)")
    token = commands.add_parser("token", help="mint a development JWT (NICHIIKI_ENV=development only)")
    token.add_argument("--role", required=True, choices=[role.value for role in Role])
    token.add_argument("--staff-role", default="manager", choices=[role.value for role in StaffRole],
                       help="staff: reviewer, manager or auditor")
    token.add_argument("--prefecture", default=None, help="prefecture reader: the prefecture code")
    token.add_argument("--subject", default=None, help="the principal id (resident id, staff id...)")
    token.add_argument("--municipality", default=None, help="staff: the municipality code")
    token.add_argument("--partner", default=None, help="partner: the partner code (jal, ana...)")
    token.add_argument("--hours", type=float, default=1.0, help="lifetime (at most NICHIIKI_TOKEN_MAX_LIFETIME_S)")
    partner = commands.add_parser("partner", help="partners: register one through the gateway's admin API")
    partner_commands = partner.add_subparsers(dest="partner_command", required=True)
    add = partner_commands.add_parser("add", help="register a partner (POST /v1/partners); prints its API key once")
    add.add_argument("--code", required=True, help="lower-case letters and digits, e.g. kochiferry")
    add.add_argument("--name", required=True)
    add.add_argument("--kind", required=True, choices=["airline", "railway", "rail", "ferry", "bus"])
    add.add_argument("--member-format", required=True, help="anchored, bounded regex, e.g. '^[0-9]{8}$'")
    add.add_argument("--feed", default="http", choices=["http", "kafka"], help="how the partner reads its feed")
    add.add_argument("--program", action="append", default=[], metavar="PROGRAM_ID=CODE[,CODE...]",
                     help="a programme it runs and the municipality codes where (repeatable)")
    add.add_argument("--token", default=None, help="an admin bearer token (default: a development admin token)")
    add.add_argument("--url", default=None, help="the partner gateway (default: the running platform's)")
    dlq = commands.add_parser("dlq", help="dead letters")
    dlq.add_argument("action", choices=["replay"])
    dlq.add_argument("topic", help="the dead-letter topic, e.g. registration.residents.v1.dlq")
    contracts = commands.add_parser("contracts", help="write JSON Schemas and AsyncAPI documents")
    contracts.add_argument("--out", default=str(REPO_ROOT / "docs" / "contracts"))
    test = commands.add_parser("test", help="run lint, types and the whole test suite")
    test.add_argument("pytest_args", nargs=argparse.REMAINDER, help="pytest's own arguments, in place of the defaults")

    words = list(sys.argv[1:] if argv is None else argv)
    # every word after `test` is pytest's, options first included (`test -x`), which argparse refuses
    testing = words[:1] == ["test"]
    args = parser.parse_args(["test"] if testing else words)
    # This command runs the platform on one machine for development: its tokens, the demo and the
    # tests use the development key unless the environment says otherwise.
    os.environ.setdefault("NICHIIKI_ENV", "development")
    settings = get_settings()
    configure_logging("nichiiki", fmt="console", level=os.environ.get("NICHIIKI_LOG_LEVEL", "WARNING"))

    if args.command == "start":
        from shared.cli.platform import start_platform

        return start_platform(settings, demo=args.demo)
    if args.command == "stop":
        return _stop(settings)
    if args.command == "restart":
        return _restart(settings, args.service, args.timeout)
    if args.command == "status":
        return _status(settings)
    if args.command == "demo":
        from shared.cli.demo import run_demo

        return run_demo(_wired(settings))
    if args.command == "migrate":
        return asyncio.run(_migrate(_wired(settings), args.services))
    if args.command == "topics":
        from shared.kit.kafka_admin import ensure_topics

        created = asyncio.run(ensure_topics(_wired(settings)))
        _out(f"{len(created)} topics created" if created else "every topic exists")
        return 0
    if args.command == "token":
        return _token(settings, args)
    if args.command == "partner":
        return _partner_add(settings, args)
    if args.command == "dlq":
        from shared.kit.dead_letters import replay_dead_letters

        sys.stderr.write(f"{args.topic}: replaying (if any is left, the first read waits for the group to form)...\n")
        count = asyncio.run(replay_dead_letters(_wired(settings), args.topic, progress=_progress_line(args.topic)))
        _out(f"{count} dead letters replayed from {args.topic}")
        return 0
    if args.command == "contracts":
        from pathlib import Path

        from shared.contracts.catalog import write_documents

        written = write_documents(Path(args.out))
        _out(f"{len(written)} contract documents written to {args.out}")
        return 0
    if testing:
        return _test(words[1:])
    parser.error(f"unknown command {args.command}")
    return 2


def _wired(settings: Settings) -> Settings:
    from shared.cli.platform import settings_for_running_platform

    wired = settings_for_running_platform(settings)
    if wired.kafka_bootstrap is None or wired.pg_dsn is None:
        raise SystemExit("no running platform and no NICHIIKI_KAFKA_BOOTSTRAP / NICHIIKI_PG_DSN set: `nichiiki start`")
    return wired


def _progress_line(topic: str) -> Callable[[int, int], None]:
    """``n of m replayed`` on stderr: rewritten in place on a terminal, a line per step otherwise."""
    terminal = sys.stderr.isatty()

    def show(done: int, total: int) -> None:
        line = f"{topic}: {done} of {total} replayed"
        sys.stderr.write(f"\r{line}" + ("\n" if done >= total else "") if terminal else line + "\n")
        sys.stderr.flush()

    return show


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _stop(settings: Settings) -> int:
    from shared.cli.platform import read_run_file
    from shared.cli.processes import is_alive

    running = read_run_file(settings)
    if running is None:
        _out("the platform is not running")
        return 0
    pid = int(running["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not is_alive(pid):
            _out("stopped")
            return 0
        time.sleep(0.2)
    _out(f"the launcher (pid {pid}) did not stop within 60 s")
    return 1


def _restart(settings: Settings, service: str, timeout_s: float) -> int:
    """Ask the running launcher to restart a service (shared/cli/supervise.py), then wait for it."""
    from shared.cli.platform import read_run_file
    from shared.cli.supervise import request_restart, wait_restarted

    running = read_run_file(settings)
    if running is None:
        _out("the platform is not running: `./nichiiki start`")
        return 1
    info = running["services"].get(service)
    if info is None:
        _out(f"{service} does not run on this platform")
        return 1
    request_restart(settings.state_dir, service)
    sys.stderr.write(f"{service}: restart asked of the launcher (pid {running['pid']}); waiting until ready...\n")
    try:
        new, seconds = wait_restarted(lambda: read_run_file(settings), service, info.get("pid"), timeout_s=timeout_s)
    except (TimeoutError, RuntimeError) as error:
        _out(f"{service}: {error}")
        return 1
    _out(f"{service} restarted: pid {info.get('pid')} → {new['pid']}, ready at {new['url']} in {seconds:.1f} s")
    return 0


def _status(settings: Settings) -> int:
    from shared.cli.platform import read_run_file

    running = read_run_file(settings)
    if running is None:
        _out("the platform is not running")
        return 1
    _out(f"launcher pid {running['pid']}")
    for key, value in running["env"].items():
        _out(f"  {key:<28} {value}")
    healthy = True
    for name, info in running["services"].items():
        try:
            ready = httpx.get(f"{info['url']}/readyz", timeout=2).json()
            state = "ready" if ready.get("ready") else f"NOT READY {ready.get('checks')}"
        except httpx.HTTPError as error:
            state = f"DOWN ({error.__class__.__name__})"
        healthy = healthy and state == "ready"
        if info.get("state") not in (None, "running"):
            state += f" (launcher: {info['state']})"
        _out(f"  {name:<16} {info['url']:<24} pid {info['pid']:<8} {state}")
    return 0 if healthy else 1


async def _migrate(settings: Settings, services: list[str]) -> int:
    from shared.kit.migrations import migrate_service
    from shared.kit.settings import with_database

    for name in services or list(SERVICE_PORTS):
        folder = REPO_ROOT / "services" / name / "migrations"
        if not folder.exists():
            continue
        applied = await migrate_service(
            settings.database_dsn(name), with_database(settings.pg_dsn or "", "postgres"),
            settings.database_name(name), folder,
        )
        _out(f"{name:<16} {len(applied)} migrations applied")
    return 0


def _token(settings: Settings, args: argparse.Namespace) -> int:
    import uuid

    if settings.env != "development":
        raise SystemExit("nichiiki token mints development tokens: outside NICHIIKI_ENV=development, sign in "
                         "through the identity provider (docs/identity.md)")
    role = Role(args.role)
    subject = args.subject or {
        Role.RESIDENT: str(uuid.uuid4()), Role.STAFF: f"staff-{args.municipality}",
        Role.PARTNER: f"partner-{args.partner}", Role.ADMIN: "admin", Role.PREFECTURE: f"reader-{args.prefecture}",
        Role.MINISTRY: "ministry-reader", Role.PAYMENT_PROVIDER: "payment-provider",
    }[role]
    try:
        token = mint_token(
            settings, subject=subject, role=role, municipality=args.municipality, partner=args.partner,
            prefecture=args.prefecture, staff_role=StaffRole(args.staff_role),
            ttl=timedelta(hours=min(args.hours, settings.token_max_lifetime_s / 3600)),
        )
    except ValueError as error:
        raise SystemExit(str(error)) from error
    _out(token)
    sys.stderr.write(json.dumps({"subject": subject, "role": role.value}) + "\n")
    return 0


def _partner_add(settings: Settings, args: argparse.Namespace) -> int:
    """``nichiiki partner add``: the gateway's admin API with an admin token (``--token``, or a
    development one: NICHIIKI_ENV=development only)."""
    from shared.cli.platform import read_run_file

    token = args.token
    if token is None:
        if settings.env != "development":
            raise SystemExit(
                "pass --token (an admin's bearer token): development tokens only in NICHIIKI_ENV=development"
            )
        token = mint_token(settings, subject="admin-cli", role=Role.ADMIN, ttl=timedelta(minutes=5))
    url = args.url
    if url is None:
        running = read_run_file(settings)
        gateway = (running or {}).get("services", {}).get("partner_gateway")
        url = gateway["url"] if gateway else f"http://127.0.0.1:{settings.service_port('partner_gateway')}"
    programs = []
    for spec in args.program:
        program_id, _, codes = spec.partition("=")
        programs.append({"program_id": program_id, "municipality_codes": [c for c in codes.split(",") if c]})
    body = {
        "code": args.code, "name": args.name, "kind": args.kind, "member_number_format": args.member_format,
        "feed": args.feed, "programs": programs,
    }
    try:
        response = httpx.post(f"{url}/v1/partners", json=body, headers={"Authorization": f"Bearer {token}"},
                              timeout=30)
    except httpx.HTTPError as error:
        raise SystemExit(f"the partner gateway at {url} did not answer: {error}") from error
    _out(json.dumps(response.json(), ensure_ascii=False, indent=2))
    if response.status_code != 201:
        return 1
    sys.stderr.write("the api_key above is shown once: hand it to the partner now\n")
    return 0


#: How the whole suite runs by default (pytest-xdist): by file, as files share module fixtures.
PARALLEL = ["-n", "2", "--dist", "loadfile"]


def _test(pytest_args: list[str]) -> int:
    """Lint, type-check, then every test; the first failure decides the exit code."""
    python = sys.executable
    typed = [
        d for d in ("shared", "services", "tests", "bench", "deploy", "examples") if any((REPO_ROOT / d).rglob("*.py"))
    ]
    steps: list[tuple[str, list[str] | Callable[[], int]]] = [
        ("ruff", [python, "-m", "ruff", "check", "."]),
        ("mypy", [python, "-m", "mypy", *typed]),
        # the console's browser tests drive Chromium: installed here when missing (apt-get, as root)
        ("browser", ensure_browser),
        # the slowest tests listed at the end: what keeps the suite's time in view. Two processes,
        # each with its own backends, a test file each at a time: the suite mostly waits (group
        # joins, restarts, services starting), so two take about half the time even on 2 cores.
        ("pytest", [python, "-m", "pytest", *(pytest_args or [*PARALLEL, "-q", "--durations=25"])]),
    ]
    began = time.monotonic()
    for number, (name, command) in enumerate(steps, start=1):
        sys.stderr.write(f"==> {name} ({number}/{len(steps)})...\n")
        sys.stderr.flush()
        started = time.monotonic()
        returncode = command() if callable(command) else subprocess.run(command, cwd=REPO_ROOT, check=False).returncode
        if returncode != 0:
            sys.stderr.write(f"==> {name} failed (exit {returncode}) after {time.monotonic() - started:.0f} s\n")
            return returncode
        sys.stderr.write(f"==> {name} passed in {time.monotonic() - started:.0f} s\n")
    sys.stderr.write(f"==> all {len(steps)} steps passed in {time.monotonic() - began:.0f} s\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
