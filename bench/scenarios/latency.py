"""End-to-end decision latency (issue 9): HTTP approve at certification → JAL's record on partner.jal.v1.

The path: certification's transaction (certificate + outbox) → its relay → certification.certificates.v1
→ the partner gateway's consumer (entitlement + delivery record + outbox, one transaction) → its relay →
partner.jal.v1, where a watcher plays JAL. A second watcher on the certificates topic splits the time
at the hop between the two services.

Set-up outside the timed window: residents registered (basic) with one of the five towns with a plan
where JAL runs a program, consenting to share with JAL, each with an application submitted. The
approvals go round robin over the five towns, as decisions spread over towns (one town's approvals
share a certificate-number counter row; the certification scenario measures that case).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from bench.measure import Latencies, paced, saturate
from bench.scenarios._common import CpuMeter
from bench.scenarios._http import (
    JAL_TOWNS,
    HttpPool,
    Schedule,
    TopicWatcher,
    cpu_note,
    describe,
    field_of,
    idle_cpu,
    settle,
    subject_of,
    submitted_applications,
    wait_consumers_caught_up,
)
from shared.contracts.certification import CertificateIssued
from shared.contracts.partners import PartnerCertificate
from shared.contracts.topics import APPLICATIONS, CERTIFICATES, GRANTS, RESIDENTS, partner_feed

if TYPE_CHECKING:
    from bench.run import BenchContext, ScenarioResult

RATE = 50.0


async def run(ctx: BenchContext) -> ScenarioResult:
    from bench.run import Metric, ScenarioResult

    warm = 20
    fixed = ctx.scale(750, 200)  # 15 s (quick: 4 s) at 50/s
    registration = HttpPool(ctx.fleet.url("registration"), size=64)
    certification = HttpPool(ctx.fleet.url("certification"), size=64)
    to_jal = TopicWatcher(
        ctx.settings, ctx.settings.topic(partner_feed("jal").name), subject_of(PartnerCertificate.event_type)
    )
    issued = TopicWatcher(
        ctx.settings, ctx.settings.topic(CERTIFICATES.name), field_of(CertificateIssued.event_type, "application_id")
    )
    staff = {town: ctx.headers("staff", municipality=town) for town in JAL_TOWNS}
    try:
        started = time.perf_counter()
        towns = [JAL_TOWNS[i % len(JAL_TOWNS)] for i in range(warm + fixed)]
        pending = await submitted_applications(ctx, registration, certification, towns)
        setup_s = time.perf_counter() - started
        await settle(ctx, RESIDENTS, APPLICATIONS)  # the setup's e-mails are not the decisions' cost
        await to_jal.start()
        await issued.start()

        async def decide(index: int) -> tuple[float, float, float]:
            """Approve; (answered, certificate event seen, JAL record seen)."""
            application = pending[index]
            _, body = await certification.request(
                "POST", f"/v1/applications/{application.application_id}/approve",
                headers=staff[application.municipality], ok=(201,),
            )
            answered = time.perf_counter()
            number = str(json.loads(body)["certificate_number"])
            at_jal = await to_jal.wait(number)
            return answered, await issued.wait(application.application_id), at_jal

        async def warm_up(index: int) -> None:
            await decide(index)

        await saturate(warm_up, total=warm, concurrency=4)
        idle = await idle_cpu()

        schedule = Schedule(RATE)
        answers, first_hop = Latencies(), Latencies()

        async def at_rate(index: int) -> None:
            answered, certificate_seen, record_seen = await decide(warm + index)
            answers.add(answered - schedule.of(index))
            first_hop.add(certificate_seen - schedule.of(index))
            schedule.record(index, record_seen)

        cpu = CpuMeter()
        load = await paced(at_rate, rate_per_s=RATE, total=fixed)
        spent = cpu.stop()
        e2e = schedule.latencies
        drained = await wait_consumers_caught_up(ctx, CERTIFICATES)
        await wait_consumers_caught_up(ctx, GRANTS)
    finally:
        await issued.stop()
        await to_jal.stop()
        await registration.close()
        await certification.close()

    rate = load.completed / load.seconds if load.seconds else 0.0
    return ScenarioResult(
        "End-to-end decision latency: HTTP approve at certification → JAL's record on partner.jal.v1",
        [
            Metric(f"decisions/s at {RATE:.0f}/s offered (end to end)", rate, "/s", limit="pg_commit_1_conn",
                   target=f"{RATE:.0f}/s sustained", met=load.errors == 0 and rate >= 0.97 * RATE),
            Metric(f"p50 approve → partner record at {RATE:.0f}/s", e2e.p50, "ms"),
            Metric(f"p99 approve → partner record at {RATE:.0f}/s", e2e.p99, "ms", target="< 200 ms",
                   met=e2e.p99 < 200 and load.errors == 0),
        ],
        [
            f"{fixed:,} approvals offered open-loop at {RATE:.0f}/s, round robin over {', '.join(JAL_TOWNS)} "
            f"({load.errors} errors). From each approval's scheduled start: HTTP answer {describe(answers)}; "
            f"CertificateIssued seen on the certificates topic {describe(first_hop)}; JAL's partner.certificate "
            f"record seen {describe(e2e)}.",
            cpu_note(spent, load.seconds, load.completed, "decision", idle),
            f"Set-up outside the timed window ({setup_s:.0f} s): {len(pending):,} residents created, registered "
            "(basic) with the town and consenting to share with JAL, each with one application submitted. The "
            "subsidy service grants (or waitlists) JAL's mileage program for each certificate during the window; "
            f"every consumer of the certificates had caught up {drained:.1f} s after the load.",
            "Seen = aiokafka consumers in the load generator (all partitions assigned before the load, "
            "fetch_max_wait_ms 10). Client: keep-alive HTTP/1.1 over asyncio, in the same process, same machine.",
        ],
    )
