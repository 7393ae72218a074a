"""Donation: confirmed payments/s over HTTP with receipt numbers and fund ledger, spread and hot.

Each ``POST /v1/donations`` (admin token, as the payment-provider integration) is one
transaction in the service: donor upsert, receipt counter, donation, receipt, ledger rows,
one-stop count and one outbox event. Spread over every city, town and village without a travel
program, then all to one hot municipality, whose receipt-counter row serialises its confirmations.
Afterwards the receipt numbers are read back from the donation database: per municipality and
calendar year they must be exactly 1..n in recording order.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

import asyncpg

from bench.measure import LoadResult, saturate
from bench.scenarios._common import CpuMeter
from bench.scenarios._events import (
    HttpStatusError,
    LeanHttp,
    RoundTripProbe,
    cpu_note,
    machine_load,
    plain_municipalities,
    settle,
    today_in_japan,
)
from shared.reference import municipalities

if TYPE_CHECKING:
    from bench.run import BenchContext, ScenarioResult

CONCURRENCY = 32
#: Seconds each timed window aims at (sized from the warm-up's rate, so a slow or busy machine
#: does not stretch the run; the counts are bounded both ways).
SPREAD_S = 20.0
HOT_S = 12.0
#: 新潟県長岡市 (a city without a travel program; no other scenario donates to it).
HOT = "152021"


def spread_municipalities() -> list[str]:
    """Every city, town and village without a travel program, but the hot one."""
    return [code for code in plain_municipalities() if code != HOT]


class Donations:
    """Confirmed hometown-tax donations to ``POST /v1/donations``, each request's bytes built ahead of a
    timed window (the scale-out scenario confirms them too)."""

    def __init__(self, http: LeanHttp, admin: dict[str, str]) -> None:
        self.http = http
        self.admin = admin
        #: Payment references are unique per run: a repeated one is the same donation, not a new one.
        self.tag = uuid.uuid4().hex[:8]
        self.paid_on = today_in_japan().isoformat()

    def request(self, reference: str, code: str, index: int) -> bytes:
        return self.http.build("POST", "/v1/donations", headers=self.admin, body={
            "payment_reference": f"pay-{self.tag}-{reference}",
            "municipality_code": code,
            "kind": "hometown_tax",
            "amount": 10_000 + (index % 10) * 5_000,
            "payment_date": self.paid_on,
            "donor": {
                "type": "individual", "name": f"寄附 太郎{reference}",
                "address": f"東京都千代田区千代田1-{index % 997}-{reference}",
            },
        })


async def confirm_all(http: LeanHttp, requests: Sequence[bytes], concurrency: int = CONCURRENCY) -> LoadResult:
    """Closed loop: ``concurrency`` clients sending the prepared requests, each expecting a new donation."""

    async def confirm(index: int) -> None:
        status, _ = await http.send(requests[index])
        if status != 201:
            raise HttpStatusError(status, b"expected a new donation")

    return await saturate(confirm, total=len(requests), concurrency=concurrency)


async def run(ctx: BenchContext) -> ScenarioResult:
    from bench.run import Metric, ScenarioResult

    spread_codes = spread_municipalities()
    http = LeanHttp(ctx.fleet.url("donation"), size=CONCURRENCY)
    request = Donations(http, ctx.headers("admin")).request

    async def drive(requests: list[bytes]) -> LoadResult:
        return await confirm_all(http, requests)

    notes: list[str] = []
    try:
        warm = [request(f"w{i}", spread_codes[-1 - i % 50], i) for i in range(ctx.scale(400, 100))]
        warm_rate = (await drive(warm)).rate  # connections, pools, caches; sizes the windows; not reported
        spread_total = ctx.scale(min(20_000, max(1_500, round(warm_rate * SPREAD_S))), 900)
        hot_total = ctx.scale(min(10_000, max(800, round(warm_rate * HOT_S))), 500)
        spread_requests = [request(f"s{i}", spread_codes[i % len(spread_codes)], i) for i in range(spread_total)]
        hot_requests = [request(f"h{i}", HOT, i) for i in range(hot_total)]

        waited, _ = await settle(ctx)
        meter = CpuMeter()
        async with RoundTripProbe(ctx.settings.database_dsn("donation")) as spread_probe:
            spread = await drive(spread_requests)
        spread_cpu = meter.stop()
        spread_wall = meter.wall
        after_spread, idle = await settle(ctx)
        notes.append(
            f"spread: {spread.completed:,} donations over {min(spread_total, len(spread_codes)):,} municipalities "
            f"(cities, towns and villages without a travel program), {CONCURRENCY} concurrent requests, "
            f"{spread.errors} errors, latency p50 {spread.latencies.p50:.1f} ms / p99 {spread.latencies.p99:.1f} ms; "
            f"= {spread.rate / ctx.limits.pg_commit_8_conn:.1%} of pg_commit_8_conn; {spread_probe.describe()}. "
            + cpu_note(spread_cpu, spread_wall, max(1, spread.completed), "donation")
        )
        notes.append(
            f"downstream (subsidy, insights and notification each consume donation.received) caught up "
            f"{after_spread:.1f} s after the spread window{'' if idle else ' (NOT idle when the wait gave up)'}; "
            "their consumers ran during the window and share its CPU."
        )

        meter = CpuMeter()
        async with RoundTripProbe(ctx.settings.database_dsn("donation")) as hot_probe:
            hot = await drive(hot_requests)
        hot_cpu = meter.stop()
        hot_wall = meter.wall
        after_hot, idle = await settle(ctx)
        town = municipalities()[HOT].full_name
        notes.append(
            f"hot: {hot.completed:,} donations to {town} ({HOT}), one receipt counter row, {CONCURRENCY} concurrent, "
            f"{hot.errors} errors, latency p50 {hot.latencies.p50:.1f} ms / p99 {hot.latencies.p99:.1f} ms; "
            f"= {hot.rate / ctx.limits.pg_commit_8_conn:.1%} of pg_commit_8_conn; {hot_probe.describe()}; "
            f"downstream caught up {after_hot:.1f} s later. "
            + cpu_note(hot_cpu, hot_wall, max(1, hot.completed), "donation")
        )
    finally:
        await http.close()

    check = await check_receipts(ctx)
    notes.append(
        f"receipts read back from the donation database: {check.receipts:,} receipts in "
        f"{check.groups:,} municipality-years; {check.bad_groups} with a gap, a duplicate or a number out of "
        f"recording order; {check.money_without_receipt} money donations without a receipt; fund ledger "
        f"{'equals' if check.ledger_matches else 'DIFFERS FROM'} the donations (¥{check.donated:,})."
    )
    notes.append(
        f"before the windows the platform was left to settle ({waited:.1f} s); {machine_load()} at the end "
        "(the machine is shared)."
    )
    return ScenarioResult(
        "Donation: confirmed payments with receipt numbers and fund ledger (HTTP, admin token)",
        [
            Metric(f"donations/s spread over {min(spread_total, len(spread_codes)):,} municipalities", spread.rate,
                   "donations/s", limit="pg_commit_1_conn", target="≥ 1,400/s", met=spread.rate >= 1_400),
            Metric("donations/s to one hot municipality", hot.rate, "donations/s", limit="pg_commit_1_conn",
                   target="≥ 600/s", met=hot.rate >= 600),
            Metric("municipality-years with a receipt gap, duplicate or misorder", check.bad_groups,
                   "municipality-years", target="0 (gapless 1..n)",
                   met=check.bad_groups == 0 and check.money_without_receipt == 0 and check.ledger_matches),
        ],
        notes,
    )


class ReceiptCheck:
    def __init__(self) -> None:
        self.groups = 0
        self.receipts = 0
        self.bad_groups = 0
        self.money_without_receipt = 0
        self.donated = 0
        self.ledger_matches = False


async def check_receipts(ctx: BenchContext) -> ReceiptCheck:
    """Receipts per (municipality, year) are exactly 1..n, in the order the donations were recorded."""
    check = ReceiptCheck()
    conn = await asyncpg.connect(ctx.settings.database_dsn("donation"))
    try:
        rows = await conn.fetch(
            """
            SELECT r.municipality_code, r.calendar_year, count(*) AS n,
                   count(DISTINCT r.sequence) AS distinct_numbers, min(r.sequence) AS first, max(r.sequence) AS last,
                   count(*) FILTER (WHERE r.number <> r.municipality_code || '-' || r.calendar_year || '-'
                                    || lpad(r.sequence::text, greatest(6, length(r.sequence::text)), '0')) AS misnamed,
                   count(*) FILTER (WHERE r.in_order <> r.sequence) AS out_of_order
            FROM (
                SELECT r.*, row_number() OVER (PARTITION BY r.municipality_code, r.calendar_year
                                               ORDER BY d.seq) AS in_order
                FROM receipts r JOIN donations d ON d.id = r.donation_id
            ) r
            GROUP BY 1, 2
            """
        )
        check.groups = len(rows)
        check.receipts = sum(row["n"] for row in rows)
        check.bad_groups = sum(
            1 for row in rows
            if not (row["first"] == 1 and row["last"] == row["n"] == row["distinct_numbers"]
                    and row["misnamed"] == 0 and row["out_of_order"] == 0)
        )
        check.money_without_receipt = await conn.fetchval(
            "SELECT count(*) FROM donations d WHERE d.unit = 'jpy' "
            "AND NOT EXISTS (SELECT 1 FROM receipts r WHERE r.donation_id = d.id)"
        )
        donated = await conn.fetchval("SELECT coalesce(sum(amount), 0) FROM donations WHERE unit = 'jpy'")
        ledger = await conn.fetchval(
            "SELECT coalesce(sum(amount), 0) FROM fund_ledger WHERE unit = 'jpy' AND entry = 'donation'"
        )
        check.donated = int(donated)
        check.ledger_matches = donated == ledger
    finally:
        await conn.close()
    return check
