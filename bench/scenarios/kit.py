"""The kit's consumer path, which every service's consumers run on."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bench.kit import consumer_throughput

if TYPE_CHECKING:
    from bench.run import BenchContext, ScenarioResult


async def run(ctx: BenchContext) -> ScenarioResult:
    from bench.run import Metric, ScenarioResult

    result = await consumer_throughput(ctx.settings, events=ctx.scale(20_000, 4_000))
    return ScenarioResult(
        "Kit: consume → inbox + state + outbox in one transaction → commit offsets",
        [Metric("events through the consumer path (4 partitions, batches of ≤500)", result.rate, "events/s",
                limit="pg_commit_1_conn", target="≥ 1,000 events/s", met=result.rate >= 1000)],
        [f"{result.events:,} events; a handler that upserts one row and emits one event per input event."],
    )
