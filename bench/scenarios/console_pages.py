"""Staff pages at municipal volume (issue 18): a municipality with 10,000 waiting certification
applications and 100,000 registrations, 20 staff browsing at once.

Set-up outside the timed window: the volume is written with SQL (``generate_series``) straight into
the running services' own databases, after their migrations, as rows their APIs read like any other
(HTTP would take minutes for 110,000 rows); then VACUUM ANALYZE, as autovacuum would after a load.

Timed: 20 staff clients, each walking the pages in turn for a fixed time — the review queue (first
page, a filtered page, a deep keyset page near its end), an application's detail, the registrations
list (first and deep keyset page, the premium requests awaiting review), a registration's detail —
while one of them downloads the CSV of all 100,000 registrations. Targets: p95 under 300 ms per page
type. The services' endpoints are measured; when the console runs in the fleet (and the identity
service seeds its development staff), its pages too: a console page is the service calls plus render.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import asyncpg
import httpx

from bench.measure import Latencies
from bench.scenarios._http import HttpPool
from shared.kit.db import Connection

if TYPE_CHECKING:
    from bench.run import BenchContext, Metric, ScenarioResult

#: 和歌山県白浜町: the development staff accounts of the identity service are its staff.
TOWN = "304018"
TOWN_PREFECTURE = "30"
TARGET_P95_MS = 300.0
STAFF = 20
#: Valid certificates of the town, for the expiring list (the console once read them all to find those).
CERTIFICATES = 2_000


async def seed_registrations(conn: Connection, municipality: str, prefecture: str, count: int,
                             *, pending_every: int = 100, tag: str | None = None) -> None:
    """``count`` residents each registered with ``municipality`` (basic; every ``pending_every``-th a
    premium request awaiting review), spread over the past three years: valid rows of the
    registration service's own schema, written in three statements."""
    tag = tag or uuid.uuid4().hex[:8]
    await conn.execute(
        """
        INSERT INTO residents (id, status, name, name_kana, email, phone, date_of_birth, legal_address_code,
                               preferred_language, created_at, updated_at)
        SELECT 'bench-' || $1::text || '-' || n, 'active', '山田 花子' || n, 'ヤマダ ハナコ', 'r' || n || '@example.jp',
               '090' || lpad(n::text, 8, '0'), date '1980-01-01' + (n % 9000), '131016', 'ja',
               now() - interval '3 years', now() - interval '3 years'
        FROM generate_series(1, $2::int) AS n
        """,
        tag, count,
    )
    await conn.execute(
        """
        INSERT INTO registrations (id, resident_id, municipality_code, prefecture_code, tier, status,
                                   registered_at, updated_at)
        SELECT 'bench-reg-' || $1::text || '-' || n, 'bench-' || $1::text || '-' || n, $3, $4,
               CASE WHEN n % $5 = 0 THEN 'premium' ELSE 'basic' END,
               CASE WHEN n % $5 = 0 THEN 'pending_review' ELSE 'active' END,
               -- a few rows share each second: the list's order needs its id as the tie-break
               now() - interval '3 years' + (n / 3) * interval '1 second', now()
        FROM generate_series(1, $2::int) AS n
        """,
        tag, count, municipality, prefecture, pending_every,
    )
    await conn.execute(
        """
        INSERT INTO premium_reviews (id, registration_id, kind, status, requested_at)
        SELECT 'bench-review-' || $1::text || '-' || n, 'bench-reg-' || $1::text || '-' || n, 'initial', 'pending',
               now()
        FROM generate_series($3::int, $2::int, $3::int) AS n
        """,
        tag, count, pending_every,
    )


async def seed_applications(conn: Connection, municipality: str, count: int) -> None:
    """``count`` submitted certification applications to ``municipality``, one per resident, oldest
    first over the past months (rows of the certification service's own schema)."""
    tag = uuid.uuid4().hex[:8]
    await conn.execute(
        """
        INSERT INTO applications (application_id, resident_id, municipality_code, primary_residence_code,
                                  planned_stay_days, housing_basis, address_there, partners, status, submitted_at)
        SELECT gen_random_uuid()::text, 'bench-' || $1::text || '-' || n, $2, '131016', 30 + n % 300,
               (ARRAY['owned', 'rented', 'trial_residence', 'shared_house', 'hotel'])[1 + n % 5],
               '白浜町1番地' || n, '[]'::jsonb, 'submitted',
               now() - interval '180 days' + (n / 2) * interval '1 second'
        FROM generate_series(1, $3::int) AS n
        """,
        tag, municipality, count,
    )


async def seed_certificates(conn: Connection, municipality: str, count: int) -> None:
    """``count`` valid certificates of ``municipality`` (their applications approved), their validity
    ending over the next year, so about a twelfth expire within 30 days; their expiry notices marked
    sent, so the scheduler sends none during the run."""
    tag = uuid.uuid4().hex[:8]
    await conn.execute(
        """
        WITH approved AS (
            INSERT INTO applications (application_id, resident_id, municipality_code, primary_residence_code,
                                      planned_stay_days, housing_basis, address_there, partners, status,
                                      submitted_at, decided_at)
            SELECT 'bench-approved-' || $1::text || '-' || n, 'bench-holder-' || $1::text || '-' || n, $2, '131016',
                   60, 'rented', '白浜町2番地' || n, '[]'::jsonb, 'approved', now() - interval '400 days',
                   now() - interval '300 days'
            FROM generate_series(1, $3::int) AS n
            RETURNING application_id, resident_id
        )
        INSERT INTO certificates (certificate_number, municipality_code, year, sequence, application_id, resident_id,
                                  valid_from, valid_until, status, issued_at, issued_by, expiring_sent_at)
        SELECT 'NCH-' || $2 || '-2020-' || lpad(row_number() OVER (ORDER BY application_id)::text, 6, '0'), $2,
               2020, row_number() OVER (ORDER BY application_id), application_id, resident_id,
               current_date - 300, current_date + (row_number() OVER (ORDER BY application_id) % 365)::int,
               'valid', now() - interval '300 days', 'bench', now()
        FROM approved
        """,
        tag, municipality, count,
    )


async def _seed(ctx: BenchContext, registrations: int, applications: int) -> float:
    started = time.perf_counter()
    conn = await asyncpg.connect(ctx.settings.database_dsn("registration"))
    try:
        await seed_registrations(conn, TOWN, TOWN_PREFECTURE, registrations)
        await conn.execute("VACUUM ANALYZE residents, registrations, premium_reviews")
    finally:
        await conn.close()
    conn = await asyncpg.connect(ctx.settings.database_dsn("certification"))
    try:
        await seed_applications(conn, TOWN, applications)
        await seed_certificates(conn, TOWN, CERTIFICATES)
        await conn.execute("VACUUM ANALYZE applications, certificates")
    finally:
        await conn.close()
    return time.perf_counter() - started


@dataclass
class Pages:
    """Latencies per page type."""

    timings: dict[str, Latencies] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    async def time(self, name: str, call: Awaitable[object]) -> None:
        started = time.perf_counter()
        try:
            await call
        except Exception:  # counted, the run goes on
            self.errors[name] = self.errors.get(name, 0) + 1
            return
        self.timings.setdefault(name, Latencies()).add(time.perf_counter() - started)


async def _ids(ctx: BenchContext) -> tuple[list[str], str, list[str], str]:
    """Application ids to open, the id before the queue's last page, registration ids, and the
    registration before the list's last page."""
    conn = await asyncpg.connect(ctx.settings.database_dsn("certification"))
    try:
        applications = [r["application_id"] for r in await conn.fetch(
            "SELECT application_id FROM applications WHERE municipality_code = $1 AND status = 'submitted' "
            "ORDER BY submitted_at, application_id", TOWN)]
    finally:
        await conn.close()
    conn = await asyncpg.connect(ctx.settings.database_dsn("registration"))
    try:
        registrations = [r["id"] for r in await conn.fetch(
            "SELECT id FROM registrations WHERE municipality_code = $1 ORDER BY registered_at, id", TOWN)]
    finally:
        await conn.close()
    return applications, applications[-50], registrations, registrations[-50]


async def _browse_services(ctx: BenchContext, seconds: float) -> Pages:
    applications, deep_application, registrations, deep_registration = await _ids(ctx)
    certification = HttpPool(ctx.fleet.url("certification"), size=STAFF, timeout_s=30)
    registration = HttpPool(ctx.fleet.url("registration"), size=STAFF, timeout_s=30)
    staff = ctx.headers("staff", municipality=TOWN)
    pages = Pages()
    q = f"municipality={TOWN}&limit=50"
    walk: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("queue: first page", lambda: certification.request("GET", f"/v1/applications?{q}", headers=staff)),
        ("queue: filtered (rented)",
         lambda: certification.request("GET", f"/v1/applications?{q}&housing_basis=rented", headers=staff)),
        ("queue: deep page (keyset)",
         lambda: certification.request("GET", f"/v1/applications?{q}&after={deep_application}", headers=staff)),
        ("application detail", lambda: certification.request(
            "GET", f"/v1/applications/{random.choice(applications)}", headers=staff)),
        ("registrations: first page", lambda: registration.request("GET", f"/v1/registrations?{q}", headers=staff)),
        ("registrations: deep page (keyset)", lambda: registration.request(
            "GET", f"/v1/registrations?{q}&after={deep_registration}", headers=staff)),
        ("registrations: awaiting review", lambda: registration.request(
            "GET", f"/v1/registrations?{q}&awaiting_review=true", headers=staff)),
        ("registration detail", lambda: registration.request(
            "GET", f"/v1/registrations/{random.choice(registrations)}", headers=staff)),
    ]
    deadline = time.perf_counter() + seconds

    async def staff_member(index: int) -> None:
        step = index
        while time.perf_counter() < deadline:
            name, call = walk[step % len(walk)]
            await pages.time(f"service {name}", call())
            step += 1

    await asyncio.gather(*(staff_member(i) for i in range(STAFF)))
    return pages


async def _csv_download(ctx: BenchContext) -> tuple[int, int, float]:
    """Rows, bytes and seconds of the CSV of every registration of the town."""
    staff = ctx.headers("staff", municipality=TOWN)
    started = time.perf_counter()
    size = lines = 0
    async with httpx.AsyncClient(base_url=ctx.fleet.url("registration"), timeout=300) as client, client.stream(
        "GET", "/v1/registrations/export.csv", params={"municipality": TOWN}, headers=staff
    ) as response:
        response.raise_for_status()
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            lines += chunk.count(b"\n")
    return lines - 1, size, time.perf_counter() - started


async def _console_session(ctx: BenchContext) -> httpx.AsyncClient | None:
    """A console client signed in as 白浜町's reviewer (the identity service's development staff), or
    None when the fleet runs no console."""
    if not ctx.fleet.processes.get("console") or not ctx.fleet.processes.get("identity"):
        return None
    import re

    import pyotp

    client = httpx.AsyncClient(base_url=ctx.fleet.url("console"), timeout=30, limits=httpx.Limits(
        max_connections=STAFF, max_keepalive_connections=STAFF))
    form = await client.get("/signin")
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
    response = await client.post("/signin", data={
        "username": "reviewer@shirahama.example", "password": "nichiiki-dev-reviewer-pass",
        "totp": pyotp.TOTP("NICHIIKIDEMOSTAFFTOTPSECRET23456").now(), "csrf": csrf.group(1) if csrf else "",
    })
    if response.status_code not in (200, 303) or "nichiiki_console" not in client.cookies:
        await client.aclose()
        raise RuntimeError(f"console sign-in refused: {response.status_code} {response.text[:300]}")
    return client


async def _browse_console(ctx: BenchContext, client: httpx.AsyncClient, seconds: float) -> Pages:
    applications, deep_application, registrations, deep_registration = await _ids(ctx)
    pages = Pages()

    async def page(path: str) -> None:
        response = await client.get(path)
        response.raise_for_status()

    walk: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("queue: first page", lambda: page("/staff/applications")),
        ("queue: filtered (rented)", lambda: page("/staff/applications?housing_basis=rented")),
        # The pager's "next" link near the queue's end: keyset, numbered by its offset.
        ("queue: deep page (keyset)", lambda: page(f"/staff/applications?after={deep_application}&offset=9950")),
        ("application detail", lambda: page(f"/staff/applications/{random.choice(applications)}")),
        ("residents list", lambda: page("/staff/residents")),
        ("residents list: deep page (keyset)",
         lambda: page(f"/staff/residents?after={deep_registration}&offset=99950")),
        ("certificates expiring in 30 days", lambda: page("/staff/certificates/expiring")),
        ("home (four services at once)", lambda: page("/staff")),
        ("registrations awaiting review", lambda: page("/staff/registrations")),
        ("registration detail", lambda: page(f"/staff/registrations/{random.choice(registrations)}")),
    ]
    deadline = time.perf_counter() + seconds

    async def staff_member(index: int) -> None:
        step = index
        while time.perf_counter() < deadline:
            name, call = walk[step % len(walk)]
            await pages.time(f"console {name}", call())
            step += 1

    await asyncio.gather(*(staff_member(i) for i in range(STAFF)))
    return pages


def _metrics(pages: Pages) -> list[Metric]:
    from bench.run import Metric

    metrics = []
    for name, latencies in pages.timings.items():
        p95 = latencies.percentile(95)
        metrics.append(Metric(f"{name}, p50", latencies.p50, "ms"))
        metrics.append(Metric(f"{name}, p95 ({len(latencies.samples_ms)} pages)", p95, "ms",
                              target=f"< {TARGET_P95_MS:.0f} ms", met=p95 < TARGET_P95_MS))
    return metrics


async def run(ctx: BenchContext) -> ScenarioResult:
    from bench.run import Metric, ScenarioResult

    registrations, applications = 100_000, 10_000  # the volume, quick or not
    seconds = ctx.scale(30, 10)
    seeded_s = await _seed(ctx, registrations, applications)
    # Warm the services' statement caches and the pages' buffers, as a morning's first pages would.
    await _browse_services(ctx, 2)

    download = asyncio.create_task(_csv_download(ctx))
    pages = await _browse_services(ctx, seconds)
    rows, size, csv_s = await download
    notes = [
        f"seeded {registrations:,} registrations (1% premium awaiting review) and {applications:,} waiting "
        f"applications for 白浜町 in {seeded_s:.1f} s (SQL generate_series into the services' own databases)",
        f"{STAFF} staff clients, each walking the page types in turn for {seconds} s; the CSV download ran "
        "alongside them",
    ]
    if pages.errors:
        notes.append(f"errors: {pages.errors}")
    metrics = _metrics(pages)
    metrics += [
        Metric(f"CSV of every registration ({rows:,} rows, {size / 2**20:.1f} MiB), rate", rows / csv_s, "rows/s"),
        Metric("CSV of every registration, time", csv_s, "s"),
    ]
    console = await _console_session(ctx)
    if console is None:
        notes.append("the console is not part of this fleet: its pages were not measured")
    else:
        try:
            await _browse_console(ctx, console, 2)
            console_pages = await _browse_console(ctx, console, seconds)
        finally:
            await console.aclose()
        metrics += _metrics(console_pages)
        if console_pages.errors:
            notes.append(f"console errors: {console_pages.errors}")
    return ScenarioResult(
        "Staff pages at municipal volume: 10,000 waiting applications, 100,000 registrations, 20 staff",
        metrics=metrics, notes=notes,
    )
