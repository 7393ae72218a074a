"""``python -m bench``: every scenario plus the raw limits of this machine, in one run, one report.

Backends are embedded (started here, in a temporary folder) unless ``NICHIIKI_KAFKA_BOOTSTRAP`` /
``NICHIIKI_PG_DSN`` / ``NICHIIKI_REDIS_URL`` name external servers. Services run as their own
processes, as in production; their peak memory is sampled through the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import pkgutil
import platform
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psutil

import bench.scenarios
from bench.measure import PeakMemory
from bench.raw import RawLimits, measure_all
from shared.cli.fleet import ServiceFleet
from shared.cli.processes import LOCAL_SERVICE_ENV
from shared.kit.auth import Role, mint_token
from shared.kit.logging import configure_logging
from shared.kit.settings import REPO_ROOT, Settings
from shared.stack.backends import Backends, start_backends
from shared.stack.smtp_sink import SmtpSink


@dataclass
class Metric:
    name: str
    value: float
    unit: str
    #: The raw limit this figure is divided by (a RawLimits field), if any.
    limit: str | None = None
    target: str | None = None
    met: bool | None = None


@dataclass
class ScenarioResult:
    title: str
    metrics: list[Metric] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class BenchContext:
    settings: Settings
    backends: Backends
    fleet: ServiceFleet
    limits: RawLimits
    quick: bool

    def headers(self, role: str, subject: str | None = None, **claims: str) -> dict[str, str]:
        token = mint_token(
            self.settings, subject=subject or f"{role}-{uuid.uuid4().hex[:8]}", role=Role(role),
            municipality=claims.get("municipality"), partner=claims.get("partner"),
        )
        return {"Authorization": f"Bearer {token}"}

    def scale(self, full: int, quick: int) -> int:
        return quick if self.quick else full


Scenario = Callable[[BenchContext], Awaitable[ScenarioResult]]


def discover() -> dict[str, Scenario]:
    """Every scenario module's ``run``, by name; those that restart services (``RESHAPES_FLEET``) last,
    so that however their restore goes, no other scenario runs on a fleet they changed."""
    found: dict[str, Scenario] = {}
    last: dict[str, Scenario] = {}
    for module in pkgutil.iter_modules(bench.scenarios.__path__):
        loaded = importlib.import_module(f"bench.scenarios.{module.name}")
        run = getattr(loaded, "run", None)
        if run is not None:
            (last if getattr(loaded, "RESHAPES_FLEET", False) else found)[module.name] = run
    return {**found, **last}


#: One partner offers thousands of requests a second here: the limiters run (their cost is measured)
#: but far above what any scenario offers.
BENCH_RATE_LIMITS = {
    f"NICHIIKI_RATE_LIMIT_{name}": "1000000"
    for name in ("VERIFY_PER_S", "VERIFY_BURST", "PARTNER_PER_S", "PARTNER_BURST")
}


async def run_all(args: argparse.Namespace) -> str:
    scenarios = discover()
    chosen = [name for name in scenarios if not args.only or name in args.only]
    workdir = Path(tempfile.mkdtemp(prefix="nichiiki-bench-"))
    # The benchmark runs its own platform on this machine with development tokens.
    env_settings = Settings(env="development")
    backends = start_backends(workdir, env_settings, fixed_ports=False)
    sink = SmtpSink(workdir / "mailbox")
    sink.start()
    run_id = "b" + uuid.uuid4().hex[:6]
    settings = env_settings.model_copy(update={
        **{k.removeprefix("NICHIIKI_").lower(): v for k, v in backends.env().items()},
        "db_prefix": f"nichiiki_{run_id}", "topic_prefix": f"{run_id}.", "smtp_url": sink.url,
        "kafka_session_timeout_ms": 4000, "kafka_heartbeat_interval_ms": 1000,
    })
    fleet = ServiceFleet(settings, backends, workdir / "logs", smtp_url=sink.url,
                         extra_env={"NICHIIKI_LOG_LEVEL": "WARNING", **BENCH_RATE_LIMITS},
                         service_env=LOCAL_SERVICE_ENV)
    results: list[ScenarioResult] = []
    started = time.perf_counter()
    try:
        limits = await measure_all(backends.kafka_bootstrap, backends.pg_dsn, backends.redis_url)
        fleet.start()
        with PeakMemory(lambda: {name: p[0].pid or 0 for name, p in fleet.processes.items()}) as memory:
            context = BenchContext(settings, backends, fleet, limits, args.quick)
            for name in chosen:
                sys.stderr.write(f"bench: {name}...\n")
                results.append(await scenarios[name](context))
        return render(results, limits, memory.peak_bytes, backends, time.perf_counter() - started, args.quick)
    finally:
        fleet.stop()
        sink.stop()
        backends.stop()


def render(
    results: list[ScenarioResult], limits: RawLimits, memory: dict[str, int], backends: Backends,
    seconds: float, quick: bool,
) -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `python -m bench{' --quick' if quick else ''}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC "
        f"in {seconds:.0f} s. Every figure was measured in the same run as the raw limits it is compared with.",
        "",
        "## Machine and backends",
        "",
        f"- {os.cpu_count()} cores ({cpu}), {psutil.virtual_memory().total / 2**30:.0f} GiB memory, "
        f"Python {platform.python_version()} ({os.path.realpath(sys.executable)}), "
        f"{platform.system()} {platform.release()}",
        *(f"- {name}: {where}" for name, where in backends.describe().items()),
        "- services: one process each (uvicorn, one worker; the console two workers), the load generator on "
        "the same machine",
        "",
        "## Raw limits (same run)",
        "",
        "| what | rate |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in limits.rows()),
    ]
    for result in results:
        lines += ["", f"## {result.title}", "", "| metric | value | raw limit | ratio | target | met |",
                  "|---|---|---|---|---|---|"]
        for metric in result.metrics:
            limit_value = getattr(limits, metric.limit) if metric.limit else None
            ratio = f"{metric.value / limit_value:.1%}" if limit_value else ""
            limit_text = f"{limit_value:,.0f} ({metric.limit})" if limit_value else ""
            met = "" if metric.met is None else ("yes" if metric.met else "**no**")
            digits = 2 if metric.unit == "×" else 1  # a ratio of rates: 1.04× is not 1.0×
            lines.append(
                f"| {metric.name} | {metric.value:,.{digits}f} {metric.unit} | {limit_text} | {ratio} | "
                f"{metric.target or ''} | {met} |"
            )
        lines += [f"- {note}" for note in result.notes]
    lines += ["", "## Peak memory per service process", "", "| service | peak RSS |", "|---|---|"]
    lines += [f"| {name} | {value / 2**20:.0f} MiB |" for name, value in sorted(memory.items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller loads, for a smoke run")
    parser.add_argument("--only", nargs="*", help="scenario names (default: all)")
    parser.add_argument("--out", default=str(REPO_ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    configure_logging("bench", fmt="console", level="WARNING")
    report = asyncio.run(run_all(args))
    Path(args.out).write_text(report, encoding="utf-8")
    sys.stdout.write(report)
