"""Subsidy: redemptions/s end to end with the budget ledger, over HTTP and over Kafka.

Set-up (not timed): an admin creates a JR East fare-voucher program in 新潟県上越市 (no
reference program there, so no other scenario touches it) with a budget for every grant; one
``CertificateIssued`` per resident, sharing with JR East, is published on the certificates
topic as the certification service would, and the scenario waits for the grants to be issued.

Timed: one-way trips reported by the partner, spread over the grants: first ``POST
/v1/redemptions`` with a JR East partner token (closed loop), then ``TripAccepted`` records
pre-published on ``gateway.trips.v1`` (as the partner gateway forwards JR East's trips) until the
last one is recorded. Each accepted trip is one transaction: trip row, grant draw, ledger row,
``grant.redeemed`` in the outbox.

Afterwards (not timed) the grants are used up and every grant gets two more trips at once over
HTTP: all must be refused as over the count. Then the subsidy database is read back: every
budget equals the sum of its ledger, reserved and spent equal the grants' remaining and drawn.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import asyncpg

from bench.measure import Latencies, LoadResult, saturate
from bench.scenarios._common import CpuMeter
from bench.scenarios._events import (
    HttpStatusError,
    LeanHttp,
    RoundTripProbe,
    certificate_issued,
    cpu_note,
    machine_load,
    publish,
    settle,
    today_in_japan,
)
from shared.contracts.formats import ProgramId
from shared.contracts.partners import TripAccepted
from shared.contracts.topics import CERTIFICATES, GATEWAY_TRIPS
from shared.kit.envelope import new_envelope

if TYPE_CHECKING:
    from bench.run import BenchContext, ScenarioResult

#: 新潟県上越市: a city without a reference travel program.
TOWN = "152226"
PARTNER = "jreast"
VOUCHER_JPY = 1_000
CONCURRENCY = 32


async def run(ctx: BenchContext) -> ScenarioResult:
    from bench.run import Metric, ScenarioResult

    tag = uuid.uuid4().hex[:8]
    grants_wanted = ctx.scale(150, 40)
    legs = ctx.scale(12, 10)  # per grant: half over HTTP, half over Kafka, then two refused
    http_per_grant = legs // 2
    kafka_per_grant = legs - http_per_grant
    program_id = ProgramId.format(f"bench-voucher-{tag}", TOWN)
    today = today_in_japan()
    http = LeanHttp(ctx.fleet.url("subsidy"), size=CONCURRENCY)
    notes: list[str] = []
    try:
        await http.json("POST", "/v1/programs", headers=ctx.headers("admin"), body={
            "program_id": program_id, "title": "bench: JR East fare voucher", "partner": PARTNER,
            "municipality_code": TOWN, "mechanism": "fare_voucher",
            "parameters": {"voucher_jpy": VOUCHER_JPY, "max_one_ways": legs},
            "active_from": today.isoformat(), "active_until": (today + timedelta(days=730)).isoformat(),
            "opening_budget": grants_wanted * legs * VOUCHER_JPY,
        })
        grants = await issue_grants(ctx, tag, program_id, grants_wanted)
        waited, _ = await settle(ctx)

        partner = ctx.headers("partner", partner=PARTNER)
        requests = [
            http.build("POST", "/v1/redemptions", headers=partner, body={
                "grant_id": grants[i % len(grants)].grant_id,
                "certificate_number": grants[i % len(grants)].certificate_number,
                "trip_id": f"{tag}-h{i}", "trip_kind": "one_way", "travelled_on": today.isoformat(),
            })
            for i in range(http_per_grant * len(grants))
        ]

        async def redeem(index: int) -> None:
            _, body = await http.send(requests[index], ok=(201,))
            if not json.loads(body)["accepted"]:
                raise HttpStatusError(201, body)

        meter = CpuMeter()
        async with RoundTripProbe(ctx.settings.database_dsn("subsidy")) as probe:
            over_http = await saturate(redeem, total=len(requests), concurrency=CONCURRENCY)
        http_cpu = meter.stop()
        http_wall = meter.wall
        after_http, _ = await settle(ctx)
        notes.append(
            f"HTTP: {over_http.completed:,} accepted trips over {len(grants)} grants, {CONCURRENCY} concurrent "
            f"requests, {over_http.errors} errors, latency p50 {over_http.latencies.p50:.1f} ms / p99 "
            f"{over_http.latencies.p99:.1f} ms; downstream (notification, partner gateway) caught up "
            f"{after_http:.1f} s later; {probe.describe()}. "
            + cpu_note(http_cpu, http_wall, max(1, over_http.completed), "trip")
        )

        over_kafka, kafka_cpu_note = await kafka_trips(ctx, tag, program_id, grants, kafka_per_grant)
        after_kafka, _ = await settle(ctx)
        notes.append(
            f"Kafka: {over_kafka.completed:,} TripReported records (key grant id) published at once and all "
            f"recorded in {over_kafka.seconds:.2f} s from the first send; {over_kafka.errors} not recorded or refused; "
            f"downstream caught up {after_kafka:.1f} s later. " + kafka_cpu_note
        )

        refused, accepted_over = await overdraft_probe(ctx, http, tag, grants)
        await settle(ctx)
    finally:
        await http.close()

    ledger = await check_ledger(ctx, program_id)
    expected_spent = len(grants) * legs * VOUCHER_JPY
    notes.append(
        f"over the count: {refused:,} extra trips (2 per grant, concurrent) refused, {accepted_over} accepted. "
        f"Program {program_id}: spent ¥{ledger.spent:,} (expected ¥{expected_spent:,}), "
        f"available ¥{ledger.available:,}, reserved ¥{ledger.reserved:,}; over the whole subsidy database "
        f"{ledger.budgets} budgets, {ledger.mismatches} where a balance differs from its ledger, "
        f"{ledger.overdrawn_grants} grants over their count or value."
    )
    notes.append(
        f"ratio to pg_commit_8_conn: HTTP {over_http.rate / ctx.limits.pg_commit_8_conn:.1%}, Kafka "
        f"{over_kafka.rate / ctx.limits.pg_commit_8_conn:.1%}. Set-up: {len(grants)} certificates → grants "
        f"(waited {waited:.1f} s to settle before the windows); {machine_load()} at the end (shared machine)."
    )
    clean = (
        ledger.mismatches == 0 and ledger.overdrawn_grants == 0 and accepted_over == 0
        and ledger.spent == expected_spent and ledger.available >= 0
    )
    return ScenarioResult(
        "Subsidy: redemptions with the budget ledger (JR East fare voucher)",
        [
            Metric("redemptions/s over HTTP (POST /v1/redemptions, partner token)", over_http.rate,
                   "trips/s", limit="pg_commit_1_conn", target="≥ 300/s", met=over_http.rate >= 300),
            Metric("redemptions/s over Kafka (TripReported → recorded)", over_kafka.rate, "trips/s",
                   limit="pg_commit_1_conn", target="≥ 300/s", met=over_kafka.rate >= 300),
            Metric("overdrafts and ledger ≠ balance after the run", ledger.mismatches + ledger.overdrawn_grants
                   + accepted_over, "cases", target="0", met=clean),
        ],
        notes,
    )


@dataclass(frozen=True, slots=True)
class Grant:
    grant_id: str
    certificate_number: str


async def issue_grants(ctx: BenchContext, tag: str, program_id: str, count: int) -> list[Grant]:
    """Certificates sharing with the partner → one issued grant each (set-up, waits for all)."""
    envelopes = [
        certificate_issued(f"BENCH-S-{tag}-{i:05d}", str(uuid.uuid4()), TOWN, partners=[PARTNER])
        for i in range(count)
    ]
    await publish(ctx.settings, CERTIFICATES, envelopes)
    conn = await asyncpg.connect(ctx.settings.database_dsn("subsidy"))
    try:
        deadline = time.monotonic() + 120
        while True:
            rows = await conn.fetch(
                "SELECT grant_id, certificate_number FROM grants WHERE program_id = $1 AND status = 'issued'",
                program_id,
            )
            if len(rows) >= count:
                return [Grant(row["grant_id"], row["certificate_number"]) for row in rows]
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(rows)} of {count} grants issued for {program_id}")
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


async def kafka_trips(
    ctx: BenchContext, tag: str, program_id: str, grants: list[Grant], per_grant: int,
) -> tuple[LoadResult, str]:
    """Publish every trip at once; time from the first send until the last one is recorded."""
    now = datetime.now(UTC)
    today = today_in_japan()
    envelopes = []
    for i in range(per_grant * len(grants)):
        grant = grants[i % len(grants)]
        trip = TripAccepted(
            partner=PARTNER, grant_id=grant.grant_id, certificate_number=grant.certificate_number,
            trip_id=f"{tag}-k{i}", trip_kind="one_way", travelled_on=today, reported_at=now,
        )
        envelopes.append(new_envelope("partner_gateway", trip, subject=trip.trip_id, key=grant.grant_id))
    conn = await asyncpg.connect(ctx.settings.database_dsn("subsidy"))
    count_sql = (
        "SELECT count(*) FILTER (WHERE accepted) AS accepted, count(*) AS recorded FROM trips "
        "WHERE program_id = $1 AND channel = 'kafka'"
    )
    try:
        meter = CpuMeter()
        async with RoundTripProbe(ctx.settings.database_dsn("subsidy")) as probe:
            started = time.perf_counter()
            sending = asyncio.create_task(publish(ctx.settings, GATEWAY_TRIPS, envelopes))
            deadline = time.monotonic() + 180
            accepted = recorded = 0
            while time.monotonic() < deadline:
                row = await conn.fetchrow(count_sql, program_id)
                assert row is not None
                accepted, recorded = int(row["accepted"]), int(row["recorded"])
                if recorded >= len(envelopes):
                    break
                await asyncio.sleep(0.05)
            seconds = time.perf_counter() - started
            await sending
        spent = meter.stop()
        wall = meter.wall
    finally:
        await conn.close()
    result = LoadResult(None, accepted, len(envelopes) - accepted, seconds, Latencies())
    return result, f"{probe.describe()}. " + cpu_note(spent, wall, max(1, recorded), "trip")


async def overdraft_probe(ctx: BenchContext, http: LeanHttp, tag: str, grants: list[Grant]) -> tuple[int, int]:
    """Two concurrent trips per used-up grant: every one must be refused (over the count)."""
    partner = ctx.headers("partner", partner=PARTNER)
    today = today_in_japan().isoformat()
    requests = [
        http.build("POST", "/v1/redemptions", headers=partner, body={
            "grant_id": grant.grant_id, "certificate_number": grant.certificate_number,
            "trip_id": f"{tag}-x{n}-{i}", "trip_kind": "one_way", "travelled_on": today,
        })
        for i, grant in enumerate(grants) for n in range(2)
    ]
    refused = accepted = 0

    async def probe(index: int) -> None:
        nonlocal refused, accepted
        _, body = await http.send(requests[index], ok=(201,))
        outcome = json.loads(body)
        if outcome["accepted"]:
            accepted += 1
        elif outcome["reason"] == "over_count":
            refused += 1

    await saturate(probe, total=len(requests), concurrency=CONCURRENCY)
    return refused, accepted


@dataclass
class LedgerCheck:
    budgets: int = 0
    mismatches: int = 0
    overdrawn_grants: int = 0
    available: int = 0
    reserved: int = 0
    spent: int = 0


async def check_ledger(ctx: BenchContext, program_id: str) -> LedgerCheck:
    check = LedgerCheck()
    conn = await asyncpg.connect(ctx.settings.database_dsn("subsidy"))
    try:
        rows = await conn.fetch(
            """
            SELECT b.program_id, b.unit, b.available,
                   coalesce(l.available, 0) AS ledger_available, coalesce(l.reserved, 0) AS ledger_reserved,
                   coalesce(l.spent, 0) AS ledger_spent,
                   coalesce(g.remaining, 0) AS grants_remaining, coalesce(g.drawn, 0) AS grants_drawn
            FROM budgets b
            LEFT JOIN (
                SELECT program_id, unit, sum(available_delta) AS available, sum(reserved_delta) AS reserved,
                       sum(spent_delta) AS spent
                FROM budget_ledger GROUP BY 1, 2
            ) l USING (program_id, unit)
            LEFT JOIN (
                SELECT program_id, unit, sum(remaining) AS remaining, sum(drawn) AS drawn FROM grants GROUP BY 1, 2
            ) g USING (program_id, unit)
            """
        )
        check.budgets = len(rows)
        for row in rows:
            if (row["available"] != row["ledger_available"] or row["ledger_reserved"] != row["grants_remaining"]
                    or row["ledger_spent"] != row["grants_drawn"] or row["available"] < 0):
                check.mismatches += 1
            if row["program_id"] == program_id:
                check.available = int(row["available"])
                check.reserved = int(row["ledger_reserved"])
                check.spent = int(row["ledger_spent"])
        check.overdrawn_grants = int(await conn.fetchval(
            """
            SELECT count(*) FROM grants g JOIN programs p USING (program_id)
            WHERE g.drawn > g.value OR g.remaining < 0
               OR (p.parameters ? 'max_one_ways' AND g.legs_counted > (p.parameters->>'max_one_ways')::int)
            """
        ))
    finally:
        await conn.close()
    return check
