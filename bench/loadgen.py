"""A load generator in a process of its own: open-loop GETs at a fixed rate, latencies as JSON.

``python -m bench.loadgen --url URL --rate N --header 'Name: value' < paths`` reads one path per
line, requests them at ``rate`` per second (open loop, latency from each request's scheduled
start, as ``bench.measure.paced``) and prints ``{"completed", "errors", "seconds", "latencies_ms",
"loop_lag_ms", "send_late_ms", "cpu_s"}`` (``cpu_s``: this process's CPU seconds over the load).
Used where the figure to resolve is a few milliseconds: the scenario's own process also runs Kafka
consumers and bookkeeping, whose pauses would be measured as the server's.

It must offer thousands of requests a second on a core it shares with the server, so it is lean:
keep-alive HTTP/1.1 connections as ``asyncio.Protocol``s (no task, stream or timeout per request),
one request in flight per connection, every request due at a tick (1 ms) sent at that tick. A request
finding no idle connection opens one (its latency includes the connect), or past ``MAX_CONNECTIONS``
waits for one. ``send_late_ms``: how long after its scheduled start the generator got to each
request (its own lateness: timer ticks, its loop).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

#: uvicorn closes keep-alive connections idle for 5 s: never reuse one idle this long.
IDLE_S = 3.0
#: Connections opened before the clock starts (most runs never need more).
WARM_CONNECTIONS = 16
#: At most this many connections (so requests in flight); requests due beyond them wait in order.
MAX_CONNECTIONS = 128
#: A request not answered this long after its scheduled start is an error.
TIMEOUT_S = 10.0
#: The shortest wait between sends: requests due within it go out together.
TICK_S = 0.001
#: Loop-lag sampling period.
LAG_PERIOD_S = 0.005

Done = Callable[["_Connection", int], None]


class _Connection(asyncio.Protocol):
    """One keep-alive connection; ``on_done(self, status)`` per response (status 0: failed)."""

    def __init__(self, on_done: Done) -> None:
        self.on_done = on_done
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.busy = False
        self.closed = False
        self.used_at = time.monotonic()
        self.scheduled = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass

    def send(self, message: bytes, scheduled: float) -> None:
        assert self.transport is not None
        self.busy = True
        self.scheduled = scheduled
        self.transport.write(message)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        length = 0
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + 17: stop if stop >= 0 else len(head)])
        elif b"\r\ntransfer-encoding:" in head:
            self._fail()  # the verification answers carry a length; anything else is not expected here
            return
        if len(self.buffer) < end + 4 + length:
            return
        status = int(head[9:12])
        del self.buffer[: end + 4 + length]
        keep = b"\r\nconnection: close" not in head
        self.busy = False
        self.used_at = time.monotonic()
        if not keep:
            self.close()
        self.on_done(self, status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.busy:
            self._fail()

    def _fail(self) -> None:
        busy, self.busy = self.busy, False
        self.close()
        if busy:
            self.on_done(self, 0)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class LoadGenerator:
    def __init__(self, url: str, headers: dict[str, str], paths: list[str]) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        self.messages = [
            f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{extra}\r\n".encode() for path in paths
        ]
        self.idle: list[_Connection] = []
        self.connections = 0
        self.waiting: deque[tuple[int, float]] = deque()
        self.latencies_ms: list[float] = []
        self.send_late_ms: list[float] = []
        self.errors = 0
        self.outstanding = 0
        self.all_done = asyncio.Event()

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        self.connections += 1
        try:
            _, connection = await loop.create_connection(lambda: _Connection(self._done), self.host, self.port)
        except OSError:
            self.connections -= 1
            raise
        return connection

    def _done(self, connection: _Connection, status: int) -> None:
        if status == 200:
            self.latencies_ms.append((time.perf_counter() - connection.scheduled) * 1000)
        else:
            self.errors += 1
        if connection.closed:
            self.connections -= 1
        elif self.waiting:
            index, scheduled = self.waiting.popleft()
            connection.send(self.messages[index], scheduled)
        else:
            self.idle.append(connection)  # last in, first out: a few connections stay hot
        self.outstanding -= 1
        if self.outstanding == 0:
            self.all_done.set()

    def _idle_connection(self) -> _Connection | None:
        now = time.monotonic()
        while self.idle:
            connection = self.idle.pop()
            if not connection.closed and now - connection.used_at < IDLE_S:
                return connection
            connection.close()
            self.connections -= 1
        return None

    def _send(self, index: int, scheduled: float) -> None:
        self.outstanding += 1
        self.all_done.clear()
        # The generator's own lateness (its timer, its loop); waiting for a connection the server
        # still holds is the server's, and counts in the latency only.
        self.send_late_ms.append((time.perf_counter() - scheduled) * 1000)
        connection = self._idle_connection()
        message = self.messages[index]
        if connection is not None:
            connection.send(message, scheduled)
        elif self.connections < MAX_CONNECTIONS:
            asyncio.get_running_loop().create_task(self._send_on_new(message, scheduled))
        else:
            self.waiting.append((index, scheduled))

    async def _send_on_new(self, message: bytes, scheduled: float) -> None:
        try:
            connection = await self._open()
        except OSError:
            self.errors += 1
            self.outstanding -= 1
            if self.outstanding == 0:
                self.all_done.set()
            return
        connection.send(message, scheduled)

    async def warm(self) -> None:
        """Open connections (and ask each one path) before the clock starts."""
        opened = [await self._open() for _ in range(WARM_CONNECTIONS)]
        for index, connection in enumerate(opened):
            self.outstanding += 1
            connection.send(self.messages[index % len(self.messages)], time.perf_counter())
        await asyncio.wait_for(self.all_done.wait(), TIMEOUT_S)
        self.latencies_ms.clear()
        self.send_late_ms.clear()
        self.errors = 0

    async def run(self, rate: float) -> float:
        """Send every request at its time (open loop); the seconds from the first to the last answer."""
        total = len(self.messages)
        interval = 1.0 / rate
        started = time.perf_counter()
        index = 0
        while index < total:
            now = time.perf_counter()
            while index < total and started + index * interval <= now:
                self._send(index, started + index * interval)
                index += 1
            if index < total:
                # Never less than a tick: the loop's timers have millisecond resolution, and a shorter
                # sleep returns at once, spinning a core through the gaps between requests.
                await asyncio.sleep(max(TICK_S, started + index * interval - time.perf_counter()))
        if self.outstanding:
            try:
                await asyncio.wait_for(self.all_done.wait(), TIMEOUT_S)
            except TimeoutError:
                self.errors += self.outstanding
        return time.perf_counter() - started


async def _loop_lag(lags: list[float]) -> None:
    """How late this process's event loop runs, sampled every ``LAG_PERIOD_S``."""
    while True:
        started = time.perf_counter()
        await asyncio.sleep(LAG_PERIOD_S)
        lags.append(max(0.0, time.perf_counter() - started - LAG_PERIOD_S) * 1000)


async def run(url: str, rate: float, headers: dict[str, str], paths: list[str]) -> dict[str, object]:
    generator = LoadGenerator(url, headers, paths)
    await generator.warm()
    lags: list[float] = []
    sampler = asyncio.get_running_loop().create_task(_loop_lag(lags))
    cpu = time.process_time()
    try:
        seconds = await generator.run(rate)
        cpu = time.process_time() - cpu
    finally:
        sampler.cancel()
        for connection in generator.idle:
            connection.close()
    return {
        "completed": len(generator.latencies_ms), "errors": generator.errors, "seconds": seconds,
        "latencies_ms": generator.latencies_ms, "loop_lag_ms": lags, "send_late_ms": generator.send_late_ms,
        "cpu_s": cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--header", action="append", default=[])
    args = parser.parse_args()
    headers = dict(h.split(": ", 1) for h in args.header)
    paths = [line.strip() for line in sys.stdin if line.strip()]
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    sys.stdout.write(json.dumps(asyncio.run(run(args.url, args.rate, headers, paths))) + "\n")


if __name__ == "__main__":
    main()
