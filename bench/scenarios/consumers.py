"""The consumer side of every service: events/s through inbox → state → outbox in one transaction.

Two bursts are pre-published as the producing services would (pipelined), and every consuming
service reads its own copy at the same time, as in production (one topic, one consumer group per
service, all on this machine):

1. ``ResidentRegistered`` (basic, active, sharing with JAL, no e-mail consent) on the residents
   topic → certification (resident projection, registration, share consent), notification (contact
   projection, inbox message, its share of an ``InboxMessagesDelivered``) and the partner gateway (share
   consent);
2. ``CertificateIssued`` for the same residents, sharing with JAL, in a municipality without a
   travel program → subsidy (certificate projection; no grant), notification (inbox message) and
   the partner gateway (the partner's feed record through its outbox).

Each consumer is timed from the first send to the poll of its ``/metrics`` that saw the whole burst
handled (the counter moves when a batch commits, so the clock cannot start at its first movement
without leaving the first batch out); the inbox table of each service is then checked for every event.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING

from bench.scenarios._common import CpuMeter
from bench.scenarios._events import (
    Progress,
    RoundTripProbe,
    baselines,
    certificate_issued,
    cpu_note,
    inbox_count,
    machine_load,
    publish,
    resident_registered,
    sealing_keys,
    settle,
    watch_consumers,
)
from shared.contracts.topics import CERTIFICATES, RESIDENTS, Topic
from shared.kit.envelope import Envelope

if TYPE_CHECKING:
    from bench.run import BenchContext, Metric, ScenarioResult

#: 静岡県熱海市: no travel program, and no other scenario registers residents there.
TOWN = "222054"
TARGET = 1_000
#: Insights reads every topic and only counts: its own target (issue #20).
TARGETS = {"insights": 3_000}
#: Consumers whose name is not the service's: insights' group carries its read model's generation
#: (a fresh platform is at generation 1; docs/services/insights.md).
CONSUMER_NAMES = {"insights": "insights-g1"}


async def run(ctx: BenchContext) -> ScenarioResult:
    from bench.run import ScenarioResult

    tag = uuid.uuid4().hex[:8]
    count = ctx.scale(10_000, 1_000)
    residents = [str(uuid.uuid4()) for _ in range(count)]
    metrics: list[Metric] = []
    notes: list[str] = []
    waited, _ = await settle(ctx)

    keys = await sealing_keys(ctx.settings, residents)  # before the window, as registration has them
    registered = [
        resident_registered(rid, TOWN, email=f"c{i}-{tag}@consumers.bench.example.jp", keys=keys, share_with=["jal"])
        for i, rid in enumerate(residents)
    ]
    await burst(ctx, "residents", RESIDENTS, registered,
                ["certification", "notification", "partner_gateway", "insights"], metrics, notes)
    certified = [
        certificate_issued(f"BENCH-C-{tag}-{i:05d}", rid, TOWN, partners=["jal"])
        for i, rid in enumerate(residents)
    ]
    await burst(ctx, "certificates", CERTIFICATES, certified,
                ["subsidy", "notification", "partner_gateway", "insights"], metrics, notes)
    notes.append(
        f"{count:,} events per burst, batches of ≤ {ctx.settings.consumer_batch_size} records, one transaction "
        f"per batch; the platform was left to settle {waited:.1f} s before. {machine_load()} at the end "
        "(shared machine). The services consume side by side, as in production, so each rate is what one "
        "service achieved while the others consumed the same burst (insights, the read model of issue #20, "
        "beside them). The certificates are for 静岡県熱海市, "
        "which has no travel program: subsidy only projects them (grants are timed in the subsidy scenario)."
    )
    return ScenarioResult("Consumers: events/s per service, inbox + state + outbox in one transaction", metrics,
                          notes)


async def burst(
    ctx: BenchContext, label: str, topic: Topic, envelopes: list[Envelope], services: list[str],
    metrics: list[Metric], notes: list[str],
) -> None:
    from bench.run import Metric

    progresses = [Progress(service, CONSUMER_NAMES.get(service, service), len(envelopes)) for service in services]
    await baselines(ctx, progresses)
    meter = CpuMeter()
    async with RoundTripProbe(ctx.settings.database_dsn(services[0])) as probe:
        started = time.perf_counter()
        sending = asyncio.create_task(publish(ctx.settings, topic, envelopes))
        await watch_consumers(ctx, progresses, started_at=started, timeout_s=240)
        sent_in = await sending
    spent = meter.stop()
    wall = meter.wall
    settled, _ = await settle(ctx)
    ids = [str(e.id) for e in envelopes]
    applied = {p.service: await inbox_count(ctx, p.service, p.consumer, ids) for p in progresses}
    for p in progresses:
        metrics.append(Metric(
            f"{p.service} ← {topic.name} ({envelopes[0].type.split('.')[-2]})", p.rate, "events/s",
            limit="pg_commit_1_conn", target=f"≥ {TARGETS.get(p.service, TARGET):,} events/s",
            met=p.rate >= TARGETS.get(p.service, TARGET),
        ))
    timings = ", ".join(
        f"{p.service} all applied at {p.seconds:.2f} s (first batch at {((p.first_at or started) - started):.2f} s; "
        f"{applied[p.service]:,}/{len(envelopes):,} in its inbox)"
        for p in progresses
    )
    notes.append(
        f"{label}: {len(envelopes):,} events published in {sent_in:.2f} s; from the first send: {timings}; "
        f"aggregate {sum(p.expected for p in progresses) / max(p.seconds for p in progresses):,.0f} events/s over "
        f"the {len(progresses)}; settled {settled:.1f} s after; {probe.describe()}. "
        + cpu_note(spent, wall, len(envelopes), "event")
    )
