"""Staff pages at municipal volume (issue 18): a municipality with 10,000 waiting certification
applications and 100,000 registrations, 20 staff browsing at once.

Set-up outside the timed window: the volume is written with SQL (``generate_series``) straight into
the running services' own databases, after their migrations, as rows their APIs read like any other
(HTTP would take minutes for 110,000 rows); then VACUUM ANALYZE, as autovacuum would after a load.

Timed: 20 staff clients, each walking the pages in turn — the review queue (first page, a filtered
page, a deep keyset page near its end), an application's detail, the registrations list (first and
deep keyset page, the premium requests awaiting review), a registration's detail — while one of them
downloads the CSV of all 100,000 registrations. The services' endpoints are measured; when the console
runs in the fleet (and the identity service seeds its development staff), its pages too: a console
page is the service calls plus render.

Two walks, each reported:

- **Paced (the target applies here)**: "20 staff browsing at once" are people, who read a page before
  the next click. Each staff member waits a think time after every page: 0.5 s plus an exponential
  with mean 1.5 s (mean 2 s, never under 0.5 s), from a seeded ``random.Random`` per staff member, so
  runs offer the same load. The walk lasts until every page type has about ``PACED_SAMPLES`` pages.
  Target: p95 under 300 ms per page type.
- **Without pause (stress, no target)**: the same 20 clients firing the next page the instant the last
  one returns (closed loop, zero think time), for a fixed time: the most 20 sessions can ask of the
  machine, where a page mostly queues for a core.
"""

from __future__ import annotations

import asyncio
import os
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
#: A staff member's think time between pages (module doc): at least this, plus an exponential ...
THINK_MIN_S = 0.5
#: ... with this mean, so the mean think time is 2 s.
THINK_EXTRA_MEAN_S = 1.5
THINK_SEED = 18
#: Pages per page type the paced walk aims for (quick, full).
PACED_SAMPLES = (100, 300)
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
    #: When each page over the target started (``perf_counter``): bunched in a few seconds, they are
    #: stalls of the machine; spread over the walk, steady queueing.
    slow_starts: list[float] = field(default_factory=list)
    #: The 1-minute load average when the walk started and ended (the machine is shared).
    load: tuple[float, float] = (0.0, 0.0)
    seconds: float = 0.0

    async def time(self, name: str, call: Awaitable[object]) -> None:
        started = time.perf_counter()
        try:
            await call
        except Exception:  # counted, the run goes on
            self.errors[name] = self.errors.get(name, 0) + 1
            return
        elapsed = time.perf_counter() - started
        self.timings.setdefault(name, Latencies()).add(elapsed)
        if elapsed * 1000 >= TARGET_P95_MS:
            self.slow_starts.append(started)

    def summary(self, walk: str) -> str:
        """The walk's conditions and how its slow pages fall in time, for the notes."""
        pages = sum(len(latencies.samples_ms) for latencies in self.timings.values())
        seconds_hit = len({int(started) for started in self.slow_starts})
        return (
            f"{walk}: {pages:,} pages in {self.seconds:.0f} s, load average {self.load[0]:.1f} → {self.load[1]:.1f}; "
            f"{len(self.slow_starts)} pages took {TARGET_P95_MS:.0f} ms or more, started within {seconds_hit} "
            f"distinct seconds"
        )


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


Walk = list[tuple[str, Callable[[], Awaitable[object]]]]


def think_time(rng: random.Random) -> float:
    """Seconds a staff member reads a page before the next click (module doc)."""
    return THINK_MIN_S + rng.expovariate(1 / THINK_EXTRA_MEAN_S)


def paced_seconds(page_types: int, samples: int) -> float:
    """How long the paced walk runs for about ``samples`` pages of each of ``page_types``: each staff
    member opens a page per think time plus its answer (taken as 0.2 s)."""
    per_page_s = THINK_MIN_S + THINK_EXTRA_MEAN_S + 0.2
    return samples * page_types * per_page_s / STAFF * 1.1


async def _walk(pages: Pages, prefix: str, walk: Walk, seconds: float, *, paced: bool) -> None:
    """``STAFF`` clients walking the page types in turn for ``seconds``, each starting at a different
    one; ``paced``: each waits a think time after every page."""
    deadline = time.perf_counter() + seconds
    pages.seconds = seconds
    load_before = os.getloadavg()[0]

    async def staff_member(index: int) -> None:
        rng = random.Random(THINK_SEED * 1000 + index)
        step = index
        if paced:  # people do not all click at the same instant
            await asyncio.sleep(rng.uniform(0, THINK_MIN_S + THINK_EXTRA_MEAN_S))
        while time.perf_counter() < deadline:
            name, call = walk[step % len(walk)]
            await pages.time(f"{prefix} {name}", call())
            step += 1
            if paced:  # a think time running past the end is cut short: the walk ends on time
                await asyncio.sleep(min(think_time(rng), max(0.0, deadline - time.perf_counter())))

    await asyncio.gather(*(staff_member(i) for i in range(STAFF)))
    pages.load = (load_before, os.getloadavg()[0])


async def _browse_services(ctx: BenchContext, seconds: float | None, *, paced: bool = False) -> Pages:
    """``seconds``: None for as long as the paced walk needs (``paced_seconds``)."""
    applications, deep_application, registrations, deep_registration = await _ids(ctx)
    certification = HttpPool(ctx.fleet.url("certification"), size=STAFF, timeout_s=30)
    registration = HttpPool(ctx.fleet.url("registration"), size=STAFF, timeout_s=30)
    staff = ctx.headers("staff", municipality=TOWN)
    pages = Pages()
    q = f"municipality={TOWN}&limit=50"
    walk: Walk = [
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
    await _walk(pages, "service", walk, seconds or paced_seconds(len(walk), _samples(ctx)), paced=paced)
    return pages


def _samples(ctx: BenchContext) -> int:
    return ctx.scale(PACED_SAMPLES[1], PACED_SAMPLES[0])


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


async def _browse_console(ctx: BenchContext, client: httpx.AsyncClient, seconds: float | None, *,
                          paced: bool = False) -> Pages:
    """``seconds``: None for as long as the paced walk needs (``paced_seconds``)."""
    applications, deep_application, registrations, deep_registration = await _ids(ctx)
    pages = Pages()

    async def page(path: str) -> None:
        response = await client.get(path)
        response.raise_for_status()

    walk: Walk = [
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
    await _walk(pages, "console", walk, seconds or paced_seconds(len(walk), _samples(ctx)), paced=paced)
    return pages


#: Whose own handling time is read from their ``http_request_duration_seconds`` during the console walk.
SERVED_BY = ("console", "certification", "registration", "subsidy")


async def _served(ctx: BenchContext) -> dict[str, dict[float, float]]:
    """Per process of ``SERVED_BY``: its GET requests so far by histogram bucket (upper bound in
    seconds → cumulative count), from its ``/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, dict[float, float]] = {}
    async with httpx.AsyncClient(timeout=10) as client:
        for name in SERVED_BY:
            if not ctx.fleet.processes.get(name):
                continue
            text = (await client.get(f"{ctx.fleet.url(name)}/metrics")).text
            buckets: dict[float, float] = {}
            for family in text_string_to_metric_families(text):
                if family.name != "http_request_duration_seconds":
                    continue
                for sample in family.samples:
                    route = sample.labels.get("route", "")
                    if (sample.name.endswith("_bucket") and sample.labels.get("method") == "GET"
                            and route not in ("/metrics", "/healthz", "/readyz")):
                        bound = float(sample.labels["le"])
                        buckets[bound] = buckets.get(bound, 0.0) + sample.value
            found[name] = buckets
    return found


def served_summary(before: dict[str, dict[float, float]], after: dict[str, dict[float, float]]) -> str:
    """How long each process itself took over its GETs between two ``_served`` readings: requests,
    the bucket its p95 falls in, and how many took 250 ms or more. Set beside the pages' own times,
    it tells a page waiting on a service from one waiting elsewhere (the console's loop, a core)."""
    parts = []
    for name, buckets in after.items():
        delta = {bound: count - before.get(name, {}).get(bound, 0.0) for bound, count in sorted(buckets.items())}
        total = delta.get(float("inf"), 0.0)
        if not total:
            continue
        p95 = next(bound for bound, count in delta.items() if count >= 0.95 * total)
        slow = total - delta.get(0.25, total)
        bound = "over 2.5 s" if p95 == float("inf") else f"≤ {p95 * 1000:.0f} ms"
        parts.append(f"{name} {total:,.0f} requests, p95 {bound}, {slow:,.0f} took 250 ms or more")
    return "; ".join(parts)


def _metrics(pages: Pages, *, paced: bool) -> list[Metric]:
    """Paced: p50 and p95 per page type against the target; without pause: the same, no target."""
    from bench.run import Metric

    metrics = []
    for name, latencies in pages.timings.items():
        p95 = latencies.percentile(95)
        walk = "paced" if paced else "20 clients without pause"
        metrics.append(Metric(f"{name}, {walk}, p50", latencies.p50, "ms"))
        if paced:
            metrics.append(Metric(f"{name}, {walk}, p95 ({len(latencies.samples_ms)} pages)", p95, "ms",
                                  target=f"< {TARGET_P95_MS:.0f} ms", met=p95 < TARGET_P95_MS))
        else:
            metrics.append(Metric(f"{name}, {walk}, p95 ({len(latencies.samples_ms)} pages)", p95, "ms"))
    return metrics


async def run(ctx: BenchContext) -> ScenarioResult:
    from bench.run import Metric, ScenarioResult

    registrations, applications = 100_000, 10_000  # the volume, quick or not
    seconds = ctx.scale(30, 10)
    seeded_s = await _seed(ctx, registrations, applications)
    # Warm the services' statement caches and the pages' buffers, as a morning's first pages would.
    await _browse_services(ctx, 2)

    # One staff member downloads the CSV while the others browse, in each walk.
    download = asyncio.create_task(_csv_download(ctx))
    paced = await _browse_services(ctx, None, paced=True)
    paced_rows, _, paced_csv_s = await download
    download = asyncio.create_task(_csv_download(ctx))
    stress = await _browse_services(ctx, seconds)
    rows, size, csv_s = await download
    notes = [
        f"seeded {registrations:,} registrations (1% premium awaiting review) and {applications:,} waiting "
        f"applications for 白浜町 in {seeded_s:.1f} s (SQL generate_series into the services' own databases)",
        f"paced: {STAFF} staff, each walking the page types in turn with a think time after every page "
        f"({THINK_MIN_S} s plus an exponential with mean {THINK_EXTRA_MEAN_S} s, seeded) for about "
        f"{_samples(ctx)} pages per page type; the target applies to this walk",
        f"without pause: {STAFF} clients walking the same pages back to back for {seconds} s (stress, no target)",
        f"the CSV download ran alongside each walk ({paced_rows:,} rows in {paced_csv_s:.1f} s beside the paced "
        f"walk, {csv_s:.1f} s beside the one without pause)",
    ]
    for walk, pages in (("paced", paced), ("without pause", stress)):
        notes.append(pages.summary(f"service endpoints, {walk}"))
        if pages.errors:
            notes.append(f"errors ({walk}): {pages.errors}")
    metrics = _metrics(paced, paced=True) + _metrics(stress, paced=False)
    metrics += [
        Metric(f"CSV of every registration ({rows:,} rows, {size / 2**20:.1f} MiB), rate, beside 20 clients "
               "without pause", rows / csv_s, "rows/s"),
        Metric("CSV of every registration, time, beside 20 clients without pause", csv_s, "s"),
        Metric("CSV of every registration, time, beside the paced walk", paced_csv_s, "s"),
    ]
    console = await _console_session(ctx)
    if console is None:
        notes.append("the console is not part of this fleet: its pages were not measured")
    else:
        try:
            await _browse_console(ctx, console, 2)
            before = await _served(ctx)
            console_paced = await _browse_console(ctx, console, None, paced=True)
            between = await _served(ctx)
            console_stress = await _browse_console(ctx, console, seconds)
            paced_served, stress_served = served_summary(before, between), served_summary(between, await _served(ctx))
        finally:
            await console.aclose()
        metrics += _metrics(console_paced, paced=True) + _metrics(console_stress, paced=False)
        for walk, pages in (("paced", console_paced), ("without pause", console_stress)):
            notes.append(pages.summary(f"console pages, {walk}"))
            notes.append(f"console pages, {walk}, each process's own time (its latency histogram): "
                         + (paced_served if walk == "paced" else stress_served))
            if pages.errors:
                notes.append(f"console errors ({walk}): {pages.errors}")
    return ScenarioResult(
        "Staff pages at municipal volume: 10,000 waiting applications, 100,000 registrations, 20 staff",
        metrics=metrics, notes=notes,
    )
