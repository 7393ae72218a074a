"""Certification (issue 4): approvals end to end, HTTP approve → ``CertificateIssued`` on the topic.

Set-up, outside the timed windows: residents registered (basic) with the town they apply to,
through the registration service, consenting to share with JAL; once the certification service
knows them (it refuses unknown residents with 409 ``resident-not-yet-known``), each submits an
application. The timed part is the staff's ``POST /v1/applications/{id}/approve`` until a watcher
on ``certification.certificates.v1`` sees the ``CertificateIssued`` of that application.

Two offered loads at the target rate: every approval for 白浜町 (one town's staff approving 50 a
second, the worst case: one certificate-number counter row), and the same rate spread over the
five towns with a plan where JAL runs a program. The maximum is measured for one town.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from bench.measure import Latencies, LoadResult, paced, saturate
from bench.scenarios._common import CpuMeter
from bench.scenarios._http import (
    JAL_TOWNS,
    SHIRAHAMA,
    HttpPool,
    Pending,
    Schedule,
    TopicWatcher,
    cpu_note,
    describe,
    field_of,
    idle_cpu,
    settle,
    submitted_applications,
    wait_consumers_caught_up,
)
from shared.contracts.certification import CertificateIssued
from shared.contracts.topics import APPLICATIONS, CERTIFICATES, RESIDENTS

if TYPE_CHECKING:
    from bench.run import BenchContext, ScenarioResult

RATE = 50.0


class Approvals:
    def __init__(self, ctx: BenchContext, http: HttpPool, watcher: TopicWatcher) -> None:
        self.http = http
        self.watcher = watcher
        self.staff = {town: ctx.headers("staff", municipality=town) for town in JAL_TOWNS}

    async def one(self, pending: Pending) -> float:
        """Approve; returns when the answer came, after the event has been seen."""
        await self.http.request(
            "POST", f"/v1/applications/{pending.application_id}/approve", headers=self.staff[pending.municipality],
            ok=(201,),
        )
        answered = time.perf_counter()
        await self.watcher.wait(pending.application_id)
        return answered

    async def closed_loop(
        self, applications: Sequence[Pending], concurrency: int, answers: Latencies | None = None
    ) -> LoadResult:
        async def approve(index: int) -> None:
            begun = time.perf_counter()
            answered = await self.one(applications[index])
            if answers is not None:
                answers.add(answered - begun)

        return await saturate(approve, total=len(applications), concurrency=concurrency)

    async def at_rate(self, applications: Sequence[Pending]) -> tuple[LoadResult, Latencies, Latencies]:
        """Open loop at RATE: (load, end-to-end latencies, HTTP answer latencies), both from the scheduled start."""
        schedule = Schedule(RATE)
        answers = Latencies()

        async def approve(index: int) -> None:
            answered = await self.one(applications[index])
            answers.add(answered - schedule.of(index))
            schedule.record(index, self.watcher.seen[applications[index].application_id])

        load = await paced(approve, rate_per_s=RATE, total=len(applications))
        return load, schedule.latencies, answers


async def run(ctx: BenchContext) -> ScenarioResult:
    from bench.run import Metric, ScenarioResult

    warm, serial = 20, ctx.scale(30, 20)
    fixed = ctx.scale(750, 200)  # 15 s (quick: 4 s) at 50/s
    spread = ctx.scale(400, 150)
    burst = ctx.scale(400, 200)
    concurrency = 16
    registration = HttpPool(ctx.fleet.url("registration"), size=64)
    certification = HttpPool(ctx.fleet.url("certification"), size=64)
    watcher = TopicWatcher(
        ctx.settings, ctx.settings.topic(CERTIFICATES.name), field_of(CertificateIssued.event_type, "application_id")
    )
    try:
        started = time.perf_counter()
        towns = [SHIRAHAMA] * (warm + serial + fixed + burst) + [JAL_TOWNS[i % len(JAL_TOWNS)] for i in range(spread)]
        pending = await submitted_applications(ctx, registration, certification, towns)
        one_town = [p for p in pending if p.municipality == SHIRAHAMA][: warm + serial + fixed + burst]
        taken = set(one_town)
        spread_out = [p for p in pending if p not in taken]
        setup_s = time.perf_counter() - started
        await settle(ctx, RESIDENTS, APPLICATIONS)  # the setup's e-mails are not the approvals' cost
        await watcher.start()
        approvals = Approvals(ctx, certification, watcher)

        await approvals.closed_loop(one_town[:warm], 4)
        answer_alone = Latencies()
        alone = await approvals.closed_loop(one_town[warm : warm + serial], 1, answer_alone)
        idle = await idle_cpu()

        cpu = CpuMeter()
        steady, e2e, answers = await approvals.at_rate(one_town[warm + serial : warm + serial + fixed])
        steady_cpu = cpu.stop()
        await wait_consumers_caught_up(ctx, CERTIFICATES)

        wide, wide_e2e, wide_answers = await approvals.at_rate(spread_out)
        await wait_consumers_caught_up(ctx, CERTIFICATES)

        cpu = CpuMeter()
        peak = await approvals.closed_loop(one_town[warm + serial + fixed :], concurrency)
        peak_cpu = cpu.stop()
        drained = await wait_consumers_caught_up(ctx, CERTIFICATES)
    finally:
        await watcher.stop()
        await registration.close()
        await certification.close()

    rate = steady.completed / steady.seconds if steady.seconds else 0.0
    wide_rate = wide.completed / wide.seconds if wide.seconds else 0.0
    towns_text = ", ".join(JAL_TOWNS)
    return ScenarioResult(
        "Certification: staff approval, HTTP POST approve → CertificateIssued on certification.certificates.v1",
        [
            Metric(f"approvals/s at {RATE:.0f}/s offered, one town (end to end)", rate, "/s",
                   limit="pg_commit_1_conn", target=f"{RATE:.0f}/s sustained",
                   met=steady.errors == 0 and rate >= 0.97 * RATE),
            Metric(f"p50 latency at {RATE:.0f}/s, one town (scheduled start → event seen)", e2e.p50, "ms"),
            Metric(f"p99 latency at {RATE:.0f}/s, one town (scheduled start → event seen)", e2e.p99, "ms",
                   target="< 150 ms", met=e2e.p99 < 150 and steady.errors == 0),
            Metric(f"approvals/s at {RATE:.0f}/s offered, {len(JAL_TOWNS)} towns (end to end)", wide_rate, "/s",
                   limit="pg_commit_1_conn", target=f"{RATE:.0f}/s sustained",
                   met=wide.errors == 0 and wide_rate >= 0.97 * RATE),
            Metric(f"p99 latency at {RATE:.0f}/s, {len(JAL_TOWNS)} towns (scheduled start → event seen)",
                   wide_e2e.p99, "ms", target="< 150 ms", met=wide_e2e.p99 < 150 and wide.errors == 0),
            Metric("maximum, approvals/s, one town (end to end)", peak.rate, "/s", limit="pg_commit_1_conn"),
            Metric("maximum, approvals/s, one town (end to end)", peak.rate, "/s",
                   limit="kafka_produce_one_at_a_time"),
        ],
        [
            f"One town (白浜町 {SHIRAHAMA}): {fixed:,} approvals offered open-loop at {RATE:.0f}/s "
            f"({steady.errors} errors); end to end {describe(e2e)}; the HTTP answer alone {describe(answers)} "
            "(both from the scheduled start).",
            cpu_note(steady_cpu, steady.seconds, steady.completed, "approval", idle) + " (one town, fixed load)",
            f"{len(JAL_TOWNS)} towns ({towns_text}, round robin): {spread:,} approvals at {RATE:.0f}/s "
            f"({wide.errors} errors); end to end {describe(wide_e2e)}; the HTTP answer alone {describe(wide_answers)}.",
            f"Unloaded (one at a time, {serial} approvals): end to end {describe(alone.latencies)}; the HTTP answer "
            f"alone {describe(answer_alone)}.",
            f"Maximum: {burst:,} approvals for one town by {concurrency} closed-loop staff clients, each waiting for "
            f"the event before the next approval; {peak.errors} errors; per approval {describe(peak.latencies)}. "
            "Approvals of one town and year all take the same certificate-number counter row (gapless numbers), "
            "held from the increment to the commit.",
            cpu_note(peak_cpu, peak.seconds, peak.completed, "approval", idle) + " (maximum)",
            f"Set-up outside the timed windows ({setup_s:.0f} s): {len(pending):,} residents created and registered "
            "(basic, with the town applied to, share_certificate with JAL) through the registration service, then "
            "one application each once certification knew them. Consumers downstream of the certificates "
            f"(subsidy, notification, partner gateway) caught up {drained:.1f} s after the maximum.",
            "Event seen = an aiokafka consumer in the load generator (all partitions assigned before the load, "
            "fetch_max_wait_ms 10). Client: keep-alive HTTP/1.1 over asyncio, in the same process, same machine.",
        ],
    )
