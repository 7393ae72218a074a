"""Insights over the real broker and database: residents registered through the registration
service's HTTP API and the planning service's reference seed reach insights' figures, which equal
the counts taken from those services' own databases; an erasure leaves counts and no id; a rebuild
from the earliest offsets gives the same figures; grants and donations produced to their topics
add up; public tables withhold small cells; readers see their scope only.

The module runs its own topics and databases (a prefix of its own), so only its events count.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from services.insights.main import create_app as insights_app
from services.planning.main import create_app as planning_app
from services.registration.main import create_app as registration_app
from shared.contracts.base import EventData
from shared.contracts.donation import DonationReceived, DonationRefunded
from shared.contracts.subsidy import GrantIssued, GrantRedeemed, GrantWaitlisted
from shared.kit.envelope import new_envelope
from shared.kit.settings import Settings
from shared.stack.backends import Backends
from tests.conftest import make_settings
from tests.integration.test_registration_support import create_resident, register, resident_auth
from tests.support import bearer, caught_up, eventually, produce, service_client

SHIRAHAMA, TANABE, WAKAYAMA, CHIYODA, TOKYO = "304018", "302066", "300004", "131016", "130001"
AT = datetime(2026, 1, 20, 3, 0, tzinfo=UTC)


@dataclass
class World:
    settings: Settings
    registration: FastAPI
    planning: FastAPI
    insights: FastAPI
    reg: httpx.AsyncClient
    ins: httpx.AsyncClient

    def as_(self, role: str, **claims: str) -> dict[str, str]:
        return bearer(self.settings, role, **claims)


@pytest.fixture(scope="module")
async def w(backends: Backends, run_id: str) -> AsyncIterator[World]:
    settings = make_settings(backends, f"{run_id}in")
    apps = (registration_app(settings, maintenance_interval_s=3600), planning_app(settings), insights_app(settings))
    async with service_client(apps[0]) as reg, service_client(apps[1]), service_client(apps[2]) as ins:
        yield World(settings, *apps, reg, ins)


async def settled(w: World) -> None:
    for app in (w.registration, w.planning, w.insights):
        await caught_up(app)


async def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()


async def send(w: World, *events: tuple[EventData, str]) -> None:
    for event, subject in events:
        envelope = new_envelope("tests", event, subject=subject)
        await produce(w.settings, w.settings.topic(event.event_topic), [(envelope.key, envelope.data,
                                                                         envelope.headers())])


async def figures(w: World) -> dict[str, Any]:
    admin = w.as_("admin")
    out = {}
    for table in ("registrations", "registrations/monthly", "certificates", "programmes", "donations",
                  "relationship-population"):
        out[table] = (await ok(await w.ins.get(f"/v1/insights/{table}", headers=admin)))["rows"]
    kpis = await ok(await w.ins.get("/v1/insights/kpis", headers=admin))
    out["kpis"] = {k: v for k, v in kpis.items() if k != "as_of"}
    return out


async def test_figures_equal_the_owning_services_counts_and_survive_a_rebuild(w: World) -> None:
    residents = [await create_resident(w.reg, w.settings) for _ in range(13)]
    for i, resident in enumerate(residents):
        await register(w.reg, w.settings, resident, {"municipality_code": SHIRAHAMA if i < 11 else TANABE})
    erased = residents[0]
    assert (await w.reg.delete(f"/v1/residents/{erased}", headers=resident_auth(w.settings, erased))).status_code \
        == 204
    grant = {"program_id": "jal-dual-residence-miles@304018", "partner": "jal", "mechanism": "mileage_grant",
             "certificate_number": "NCH-304018-2026-000001", "resident_id": residents[1],
             "municipality_code": SHIRAHAMA}
    await send(
        w,
        (GrantIssued(grant_id="g1", unit="miles", reserved=30000, window_from=date(2026, 1, 1),
                     window_until=date(2026, 5, 1), issued_at=AT, **grant), grant["certificate_number"]),
        (GrantRedeemed(grant_id="g1", trip_id="t1", unit="miles", amount=7500, trips_counted=1, completed=False,
                       redeemed_at=AT, **grant), grant["certificate_number"]),
        (GrantRedeemed(grant_id="g1", trip_id="t2", unit="miles", amount=7500, trips_counted=2, completed=False,
                       redeemed_at=AT, **grant), grant["certificate_number"]),
        (GrantWaitlisted(grant_id="g2", unit="miles", needed=30000, position=1, waitlisted_at=AT,
                         **{**grant, "certificate_number": "NCH-304018-2026-000002"}), "NCH-304018-2026-000002"),
        (DonationReceived(donation_id="d1", municipality_code=SHIRAHAMA, donor_id="x", kind="hometown_tax",
                          unit="jpy", amount=10000, earmark="dual_residence", payment_date=date(2026, 1, 20),
                          calendar_year=2026, received_at=AT), SHIRAHAMA),
        (DonationReceived(donation_id="d2", municipality_code=SHIRAHAMA, donor_id="y", kind="hometown_tax",
                          unit="jpy", amount=30000, earmark="general", payment_date=date(2026, 1, 20),
                          calendar_year=2026, received_at=AT), SHIRAHAMA),
        (DonationRefunded(donation_id="d2", municipality_code=SHIRAHAMA, donor_id="y", unit="jpy", amount=30000,
                          earmark="general", refunded_at=AT), SHIRAHAMA),
    )
    await settled(w)

    # Registrations: what registration's own database counts as active, by area and tier.
    reg_pool = w.registration.state.runtime.pool
    owned = {
        (row["municipality_code"], row["tier"]): row["n"]
        for row in await reg_pool.fetch(
            "SELECT municipality_code, tier, count(*)::int AS n FROM registrations WHERE status = 'active' "
            "GROUP BY municipality_code, tier")
    }
    before = await figures(w)
    seen = {(r["municipality_code"], tier): r[tier] for r in before["registrations"] for tier in ("basic", "premium")
            if r[tier]}
    assert seen == owned
    assert seen[(SHIRAHAMA, "basic")] == 10 and seen[(TANABE, "basic")] == 2
    assert seen[(WAKAYAMA, "basic")] == 12  # the prefecture's own (derived) registrations

    # Relationship population: one person once; the erased person is in no count and no row holds the id.
    shirahama = next(r for r in before["relationship-population"] if r["municipality_code"] == SHIRAHAMA)
    # per 1,000 of 白浜町's 19,753 inhabitants (住民基本台帳, 2025-01-01: shared/reference/data/populations.csv)
    assert (shirahama["registered"], shirahama["people"], shirahama["population"]) == (10, 10, 19_753)
    assert shirahama["per_1000"] == round(10 * 1000 / 19_753, 3) == 0.506
    ins_pool = w.insights.state.runtime.pool
    assert await ins_pool.fetchval("SELECT count(*) FROM registrations WHERE resident_id = $1", erased) == 0
    assert await ins_pool.fetchval("SELECT count(*) FROM registrations WHERE resident_id IS NULL") == 2
    assert await ins_pool.fetchval("SELECT count(*) FROM kit_erased_residents WHERE resident_id = $1", erased) == 1

    # KPIs: planning's own database (its reference seed) against the figures.
    plan_pool = w.planning.state.runtime.pool
    plan_tables = {r["table_name"] for r in await plan_pool.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")}
    assert {"plans", "corporations"} <= plan_tables
    kpis = before["kpis"]
    assert kpis["plans_made"] == 28 and kpis["corporations_made"] == 51
    assert kpis["target"] == 600 and kpis["entry_into_force"] == "2024-11-01"

    # Grants and donations as produced.
    [programme] = [p for p in before["programmes"] if p["program_id"] == grant["program_id"]]
    assert (programme["issued"], programme["waitlisted"], programme["spent"], programme["trips"]) == (1, 1, 15000, 2)
    [donations] = [d for d in before["donations"] if d["municipality_code"] == SHIRAHAMA]
    assert (donations["count"], donations["amount"], donations["refunded"], donations["month"]) == \
        (1, 10000, 1, "2026-01-01")

    # Rebuild: a new generation reads everything again, from the earliest offsets.
    old_group = w.insights.state.runtime.consumers[0].group_id
    rebuilt = await ok(await w.ins.post("/v1/insights/rebuild", headers=w.as_("admin")), 202)
    assert rebuilt["generation"] == 2 and rebuilt["consumer_group"] != old_group

    async def same() -> bool:
        return await figures(w) == before

    try:
        await eventually(same, timeout=30)
    except AssertionError:
        after = await figures(w)
        consumer = w.insights.state.runtime.consumers[0]
        raise AssertionError({k: (before[k], after[k]) for k in before if before[k] != after[k]} | {
            "group": consumer.group_id, "stats": str(consumer.stats), "name": consumer.name}) from None
    await caught_up(w.insights)
    assert await figures(w) == before
    assert w.insights.state.runtime.consumers[0].group_id == rebuilt["consumer_group"]


async def test_readers_see_their_scope_and_csv_is_for_excel(w: World) -> None:
    staff = w.as_("staff", municipality=SHIRAHAMA, staff_role="auditor")
    mine = await ok(await w.ins.get("/v1/insights/registrations", headers=staff))
    assert mine["scope"] == SHIRAHAMA and {r["municipality_code"] for r in mine["rows"]} <= {SHIRAHAMA}
    assert (await w.ins.get(f"/v1/insights/registrations?municipality={TANABE}", headers=staff)).status_code == 403
    reader = w.as_("prefecture", prefecture=WAKAYAMA)
    theirs = await ok(await w.ins.get("/v1/insights/registrations", headers=reader))
    assert theirs["scope"] == WAKAYAMA and all(r["prefecture_code"] == WAKAYAMA for r in theirs["rows"])
    assert (await w.ins.get(f"/v1/insights/registrations?prefecture={TOKYO}", headers=reader)).status_code == 403
    assert (await w.ins.get("/v1/insights/registrations", headers=bearer(w.settings, "resident", str(uuid.uuid4())))
            ).status_code == 403
    csv = await w.ins.get("/v1/insights/registrations.csv", headers=staff)
    assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv")
    text = csv.content.decode("utf-8")
    assert text.startswith("\ufeff都道府県コード,市区町村コード,市区町村名,基本登録")
    assert "\r\n" in text


async def test_public_tables_withhold_small_cells(w: World) -> None:
    body = await ok(await w.ins.get(f"/v1/public/insights/registrations?prefecture={WAKAYAMA}"))
    rows = {r["municipality_code"]: r for r in body["rows"]}
    assert len(rows) == 30  # every municipality of 和歌山県 is listed, data or not
    for row in rows.values():
        assert all(v is None or v >= 10 for k, v in row["values"].items())
        assert sorted(row["suppressed"]) == sorted(k for k, v in row["values"].items() if v is None)
    assert rows[TANABE]["values"]["total"] is None  # 2 people: withheld
    relationship = await ok(await w.ins.get(f"/v1/public/insights/relationship-population?municipality={TANABE}"))
    [row] = relationship["rows"]
    assert row["values"]["people"] is None and row["values"]["per_1000"] is None
    kpis = await ok(await w.ins.get("/v1/public/insights/kpis"))
    assert kpis["target"] == 600
