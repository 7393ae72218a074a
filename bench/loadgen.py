"""A load generator in a process of its own: open-loop GETs at a fixed rate, latencies as JSON.

``python -m bench.loadgen --url URL --rate N --header 'Name: value' < paths`` reads one path per
line, requests them at ``rate`` per second (open loop, latency from each request's scheduled
start, as ``bench.measure.paced``) and prints ``{"completed", "errors", "seconds", "latencies_ms",
"loop_lag_ms"}``. Used where the figure to resolve is a few milliseconds: the scenario's own
process also runs Kafka consumers and bookkeeping, whose pauses would be measured as the server's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from bench.measure import paced
from bench.scenarios._http import HttpPool, LoopLag


async def run(url: str, rate: float, headers: dict[str, str], paths: list[str]) -> dict[str, object]:
    http = HttpPool(url, size=128)
    try:
        for path in paths[: min(len(paths), 64)]:  # open the connections before the clock starts
            await http.request("GET", path, headers=headers)

        async def get(index: int) -> None:
            await http.request("GET", paths[index], headers=headers)

        with LoopLag() as lag:
            result = await paced(get, rate_per_s=rate, total=len(paths))
    finally:
        await http.close()
    return {
        "completed": result.completed, "errors": result.errors, "seconds": result.seconds,
        "latencies_ms": result.latencies.samples_ms, "loop_lag_ms": lag.lags.samples_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
