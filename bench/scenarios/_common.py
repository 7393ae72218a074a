"""What every scenario's helpers share: where the CPU went during a window, and reading an HTTP/1.1 response."""

from __future__ import annotations

import asyncio
import contextlib
import time

import psutil

OUTSIDE = "outside this run"
CLIENT = "load generator"


def group_of(process: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        name = process.name()
        if name.startswith("postgres"):
            return "postgres"
        if name.startswith("tansu"):
            return "broker"
        if name.startswith("redis"):
            return "redis"
        command = process.cmdline()
        for part in command:
            if part.startswith("services."):
                return str(part).removeprefix("services.")
            if part == "bench.loadgen":
                return CLIENT
        # A service's HTTP workers (NICHIIKI_HTTP_WORKERS > 1) are multiprocessing children of
        # ``python -m services.<name>``: their CPU is that service's.
        parent = process.parent()
        if parent is not None and any("multiprocessing" in part for part in command):
            return group_of(parent)
    return "other"


def cpu_of(process: psutil.Process) -> float:
    times = process.cpu_times()
    # A postgres backend that exits is reaped by the postmaster: its time moves to children_*.
    return float(times.user + times.system + times.children_user + times.children_system)


class CpuMeter:
    """CPU seconds spent by each part of this run (services, backends, load generator) during a window,
    and by every other process on the machine (other people's work on a shared host)."""

    def __init__(self) -> None:
        self._start = self._sample()
        self._started_at = time.perf_counter()
        #: Wall seconds of the window, set by ``stop``.
        self.wall = 0.0

    @staticmethod
    def _sample() -> tuple[dict[int, tuple[str, float]], float]:
        me = psutil.Process()
        seen: dict[int, tuple[str, float]] = {me.pid: (CLIENT, cpu_of(me))}
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                seen[child.pid] = (group_of(child), cpu_of(child))
        total = psutil.cpu_times()
        busy = float(sum(total)) - float(total.idle) - float(getattr(total, "iowait", 0.0))
        return seen, busy

    def stop(self) -> dict[str, float]:
        """Seconds per group since the start; ``outside this run`` is the rest of the machine's busy time."""
        before, busy_before = self._start
        after, busy_after = self._sample()
        self.wall = time.perf_counter() - self._started_at
        spent: dict[str, float] = {}
        for pid, (group, seconds) in after.items():
            earlier = before.get(pid)
            spent[group] = spent.get(group, 0.0) + seconds - (earlier[1] if earlier is not None else 0.0)
        spent[OUTSIDE] = max(0.0, (busy_after - busy_before) - sum(spent.values()))
        return spent


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """Status, body and whether the connection may be kept, of one HTTP/1.1 response."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length: int | None = None
    chunked = False
    keep = True
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            keep = b"close" not in value.lower()
    if chunked:
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append((await reader.readexactly(size + 2))[:-2])
        return status, b"".join(parts), keep
    if length is None:
        return status, await reader.read(), False
    return status, await reader.readexactly(length), keep
