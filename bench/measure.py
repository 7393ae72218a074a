"""Measuring tools for the benchmarks: latency percentiles, paced load, process memory."""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import psutil


@dataclass
class Latencies:
    samples_ms: list[float] = field(default_factory=list)

    def add(self, seconds: float) -> None:
        self.samples_ms.append(seconds * 1000)

    def percentile(self, p: float) -> float:
        if not self.samples_ms:
            return float("nan")
        ordered = sorted(self.samples_ms)
        index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))
        return ordered[index]

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def p99(self) -> float:
        return self.percentile(99)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples_ms) if self.samples_ms else float("nan")


@dataclass
class LoadResult:
    offered_per_s: float | None
    completed: int
    errors: int
    seconds: float
    latencies: Latencies

    @property
    def rate(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0


async def paced(
    operation: Callable[[int], Awaitable[None]], *, rate_per_s: float, total: int, max_in_flight: int = 512
) -> LoadResult:
    """Open-loop load: start one operation every 1/rate seconds, whatever the previous ones do.

    Latency is measured from each operation's *scheduled* start, so a system that falls behind
    shows it in the percentiles instead of hiding it (no coordinated omission).
    """
    latencies = Latencies()
    errors = 0
    completed = 0
    semaphore = asyncio.Semaphore(max_in_flight)
    started = time.perf_counter()

    async def one(index: int, scheduled: float) -> None:
        nonlocal errors, completed
        async with semaphore:
            try:
                await operation(index)
                completed += 1
                latencies.add(time.perf_counter() - scheduled)
            except Exception:
                errors += 1

    tasks = []
    for index in range(total):
        scheduled = started + index / rate_per_s
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(index, scheduled)))
    await asyncio.gather(*tasks)
    return LoadResult(rate_per_s, completed, errors, time.perf_counter() - started, latencies)


async def saturate(
    operation: Callable[[int], Awaitable[None]], *, total: int, concurrency: int
) -> LoadResult:
    """Closed-loop load: ``concurrency`` workers back to back; measures the sustainable rate."""
    return await saturate_for(operation, seconds=math.inf, concurrency=concurrency, limit=total)


async def saturate_for(
    operation: Callable[[int], Awaitable[None]], *, seconds: float, concurrency: int, limit: int
) -> LoadResult:
    """Closed-loop load for about ``seconds``: ``concurrency`` workers back to back, none starting an
    operation after the deadline (at most ``limit`` in all). The window lasts as long on a slow machine
    as on a fast one, and the rate counts only whole operations: completed over the time they took."""
    latencies = Latencies()
    errors = 0
    completed = 0
    counter = iter(range(limit))
    started = time.perf_counter()
    deadline = started + seconds

    async def worker() -> None:
        nonlocal errors, completed
        for index in counter:
            begun = time.perf_counter()
            if begun >= deadline:
                return
            try:
                await operation(index)
                completed += 1
                latencies.add(time.perf_counter() - begun)
            except Exception:
                errors += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return LoadResult(None, completed, errors, time.perf_counter() - started, latencies)


class PeakMemory:
    """Samples the resident set size of some processes in the background; keeps each one's peak.

    ``pids`` is read at every sample, so a service restarted during the run (other pid) is followed.
    A service of several HTTP workers is a supervisor and its worker children: its figure is the
    largest one process of them, as with one worker.
    """

    #: Finding children reads every process of the machine (tens of ms): once every few seconds, for all.
    CHILDREN_EVERY_S = 5.0

    def __init__(self, pids: Callable[[], dict[str, int]], interval_s: float = 0.1) -> None:
        self.pids = pids
        self.interval_s = interval_s
        self.peak_bytes: dict[str, int] = dict.fromkeys(pids(), 0)
        self._task: asyncio.Task[None] | None = None
        self._children: dict[int, list[psutil.Process]] = {}
        self._children_at = float("-inf")

    def _processes(self, pid: int) -> list[psutil.Process]:
        now = time.monotonic()
        if now - self._children_at > self.CHILDREN_EVERY_S:
            self._children_at = now
            self._children = {}
            for process in psutil.process_iter(["ppid"]):
                self._children.setdefault(process.info["ppid"], []).append(process)
        with contextlib.suppress(psutil.Error):
            return [psutil.Process(pid), *self._children.get(pid, [])]
        return []

    def _sample(self) -> None:
        for name, pid in self.pids().items():
            for process in self._processes(pid):
                with contextlib.suppress(psutil.Error):
                    self.peak_bytes[name] = max(self.peak_bytes.get(name, 0), int(process.memory_info().rss))

    async def _run(self) -> None:
        while True:
            self._sample()
            await asyncio.sleep(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self._sample()
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()
        self._sample()


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}/s"


def ratio(value: float, limit: float) -> str:
    return f"{value / limit:.1%}" if limit else "n/a"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)
