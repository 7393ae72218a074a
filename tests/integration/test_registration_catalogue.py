"""Each municipality's catalogue of designated activities (自治体が指定する担い手活動) through HTTP:
published by its managers, read by anyone, and the only activities a premium request may name."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from services.registration import handlers
from services.registration.main import create_app
from services.registration.sample_activities import COMMON, SHIRAHAMA_ONLY, sample_towns
from shared.contracts.registration import PremiumRequested
from shared.kit.rate_limit import public_limit
from shared.kit.service import ServiceRuntime
from shared.kit.settings import Settings
from tests.integration.test_registration_support import (
    HOME,
    MITOYO,
    SHIRAHAMA,
    TANABE,
    activities,
    assert_problem,
    create_resident,
    decoded,
    events_of,
    of_type,
    premium,
    register,
    resident_auth,
    snapshot,
    today,
)
from tests.support import bearer, service_client
from tests.unit.test_http_dependencies import api_routes, calls

KOFU = "314030"  # 鳥取県江府町: only the seed test changes its catalogue


@pytest.fixture(scope="module")
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    yield create_app(settings, maintenance_interval_s=3600)


@pytest.fixture(scope="module")
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with service_client(app) as http:
        yield http


@pytest.fixture(scope="module")
def pool(app: FastAPI, client: httpx.AsyncClient) -> asyncpg.Pool:
    runtime: ServiceRuntime = app.state.runtime
    return runtime.pool


def staff(settings: Settings, municipality: str, role: str = "manager") -> dict[str, str]:
    return bearer(settings, "staff", municipality=municipality, staff_role=role)


def new_entry(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "code": f"rice-planting-{uuid.uuid4().hex[:6]}", "name_ja": "棚田の田植え", "name_en": "Rice planting",
        "kind": "farming", "season": "5月", "evidence_required": False,
    }
    body.update(overrides)
    return body


async def publish(client: httpx.AsyncClient, settings: Settings, town: str, **overrides: Any) -> dict[str, Any]:
    response = await client.post(f"/v1/municipalities/{town}/activities", json=new_entry(**overrides),
                                 headers=staff(settings, town))
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def catalogue(client: httpx.AsyncClient, town: str) -> dict[str, dict[str, Any]]:
    response = await client.get(f"/v1/public/municipalities/{town}/activities")  # no token
    assert response.status_code == 200, response.text
    return {item["id"]: item for item in response.json()["items"]}


# --- Reading a catalogue -------------------------------------------------------------------------


async def test_anyone_reads_a_towns_published_sample_catalogue(client: httpx.AsyncClient) -> None:
    shirahama = await catalogue(client, SHIRAHAMA)
    seeded = {f"{SHIRAHAMA}-{a.code}" for a in (*COMMON, *SHIRAHAMA_ONLY)}
    assert seeded <= set(shirahama)
    ume = shirahama[f"{SHIRAHAMA}-ume-harvest"]
    assert (ume["name_ja"], ume["kind"], ume["kind_ja"], ume["evidence_required"], ume["sample"], ume["status"]) == (
        "梅の収穫の手伝い", "farming", "農作業・援農", True, True, "published")
    for town in sample_towns():  # every programme town has enough designated activities for premium
        assert len(await catalogue(client, town)) >= 3
    assert await catalogue(client, HOME) == {}  # 千代田区 designated none
    assert_problem(await client.get("/v1/public/municipalities/304019/activities"), 422,
                   "malformed-municipality-code")
    assert_problem(await client.get("/v1/public/municipalities/141011/activities"), 422,
                   "municipality-not-registrable")


def test_the_public_catalogue_is_rate_limited_per_client(app: FastAPI) -> None:
    route = next(r for r in api_routes(app.routes) if r.path == "/v1/public/municipalities/{code}/activities")
    assert public_limit in set(calls(route.dependant))


# --- Managing a catalogue ------------------------------------------------------------------------


async def test_managers_publish_change_and_retire_entries(
    client: httpx.AsyncClient, settings: Settings, pool: asyncpg.Pool
) -> None:
    manager = staff(settings, TANABE)
    entry = await publish(client, settings, TANABE, evidence_required=True)
    assert entry["id"] == f"{TANABE}-{entry['code']}" and entry["status"] == "published" and not entry["sample"]
    assert (await catalogue(client, TANABE))[entry["id"]]["name_ja"] == "棚田の田植え"

    before = await snapshot(pool)
    path = f"/v1/municipalities/{TANABE}/activities"
    assert_problem(await client.post(path, json=new_entry(code=entry["code"]), headers=manager), 409, "activity-exists")
    assert_problem(await client.post(path, json=new_entry(code="Rice Planting"), headers=manager), 422,
                   "invalid-activity-code")
    assert_problem(await client.post(path, json=new_entry(name_ja="\u3000"), headers=manager), 422,
                   "invalid-activity-name")
    assert_problem(await client.post(path, json=new_entry(kind="sightseeing"), headers=manager), 422,
                   "invalid-request")
    # Reviewers and auditors read; managers of the town (or an admin) designate.
    for role in ("reviewer", "auditor"):
        assert_problem(await client.post(path, json=new_entry(), headers=staff(settings, TANABE, role)), 403,
                       "forbidden")
    assert_problem(await client.post(path, json=new_entry(), headers=staff(settings, SHIRAHAMA)), 403, "forbidden")
    entry_path = f"/v1/activities/{entry['id']}"
    assert_problem(await client.patch(entry_path, json={"name_ja": "別名"}, headers=staff(settings, SHIRAHAMA)), 403,
                   "forbidden")
    assert_problem(await client.post(f"{entry_path}/retire", headers=staff(settings, SHIRAHAMA)), 403, "forbidden")
    assert_problem(await client.patch(entry_path, json={"name_ja": None}, headers=manager), 422, "invalid-request")
    assert_problem(await client.patch(f"/v1/activities/{TANABE}-no-such", json={"name_ja": "x"}, headers=manager),
                   404, "activity-not-found")
    assert await snapshot(pool) == before

    changed = await client.patch(entry_path, json={"name_ja": "棚田の田植え・稲刈り", "season": None,
                                                   "evidence_required": False}, headers=manager)
    assert changed.status_code == 200, changed.text
    assert (changed.json()["name_ja"], changed.json()["season"], changed.json()["evidence_required"]) == (
        "棚田の田植え・稲刈り", None, False)
    assert (await catalogue(client, TANABE))[entry["id"]]["name_ja"] == "棚田の田植え・稲刈り"

    retired = await client.post(f"{entry_path}/retire", headers=manager)
    assert retired.status_code == 200 and retired.json()["status"] == "retired" and retired.json()["retired_at"]
    assert entry["id"] not in await catalogue(client, TANABE)
    again = await client.post(f"{entry_path}/retire", headers=manager)
    assert again.status_code == 200 and again.json()["retired_at"] == retired.json()["retired_at"]
    assert_problem(await client.patch(entry_path, json={"name_ja": "再開"}, headers=manager), 409,
                   "activity-already-retired")
    # A retired entry keeps its code: publishing the code again is refused (picks refer to the entry).
    assert_problem(await client.post(path, json=new_entry(code=entry["code"]), headers=manager), 409, "activity-exists")


async def test_the_sample_seed_runs_once_and_keeps_what_staff_changed(
    app: FastAPI, client: httpx.AsyncClient, settings: Settings, pool: asyncpg.Pool
) -> None:
    entry_id = f"{KOFU}-cleanup"
    changed = await client.patch(f"/v1/activities/{entry_id}", json={"name_ja": "天の川の清掃"},
                                 headers=staff(settings, KOFU))
    assert changed.status_code == 200 and changed.json()["sample"] is False  # the town's own entry now
    count = await pool.fetchval("SELECT count(*) FROM designated_activities")
    await handlers.seed_sample_catalogue(app.state.runtime)  # what every start does
    assert await pool.fetchval("SELECT count(*) FROM designated_activities") == count
    kept = await pool.fetchrow("SELECT name_ja, sample FROM designated_activities WHERE id = $1", entry_id)
    assert kept is not None and (kept["name_ja"], kept["sample"]) == ("天の川の清掃", False)


# --- Premium picks from the catalogue ------------------------------------------------------------


async def test_a_premium_request_names_designated_activities_and_staff_see_the_entries(
    client: httpx.AsyncClient, settings: Settings, pool: asyncpg.Pool
) -> None:
    own = await publish(client, settings, MITOYO, name_ja="父母ヶ浜の清掃", name_en="Chichibugahama clean-up",
                        kind="environment", evidence_required=True)
    resident_id = await create_resident(client, settings)
    picks = [
        *activities(10, 40, municipality=MITOYO),
        {"activity_id": own["id"], "date": (today() - timedelta(days=5)).isoformat(), "document_ref": "photo-1"},
        {"activity_id": own["id"], "date": (today() - timedelta(days=6)).isoformat(), "document_ref": "photo-2"},
    ]
    requested = await register(client, settings, resident_id, premium(MITOYO, resident_id, activities=picks))
    assert requested["awaiting_review"] == "initial"

    detail = await client.get(f"/v1/registrations/{requested['id']}", headers=staff(settings, MITOYO, "reviewer"))
    assert detail.status_code == 200, detail.text
    shown = detail.json()["reviews"][0]["activities"]
    assert [a["activity_id"] for a in shown] == [p["activity_id"] for p in picks]
    assert shown[2]["name"] == "父母ヶ浜の清掃" and shown[2]["document_ref"] == "photo-1"
    assert (shown[2]["activity"]["kind"], shown[2]["activity"]["evidence_required"]) == ("environment", True)
    assert shown[0]["activity"]["sample"] is True
    # Four picks, three distinct designated activities: the event counts those, and names none.
    events = await events_of(settings, pool, resident_id, 2)
    requested_event = decoded(of_type(events, PremiumRequested)[0], PremiumRequested, resident_id)
    assert requested_event.activity_count == 3
    assert own["id"] not in requested_event.model_dump_json()

    # Retired after the request: the review still shows the entry, as retired.
    await client.post(f"/v1/activities/{own['id']}/retire", headers=staff(settings, MITOYO))
    later = await client.get(f"/v1/registrations/{requested['id']}", headers=resident_auth(settings, resident_id))
    assert later.json()["reviews"][0]["activities"][2]["activity"]["status"] == "retired"


async def test_a_retired_activity_counts_only_when_done_before_it_was_retired(
    client: httpx.AsyncClient, settings: Settings, pool: asyncpg.Pool
) -> None:
    entry = await publish(client, settings, SHIRAHAMA)
    retired = await client.post(f"/v1/activities/{entry['id']}/retire", headers=staff(settings, SHIRAHAMA))
    assert retired.status_code == 200
    resident_id = await create_resident(client, settings)

    def with_entry(days_ago: int) -> dict[str, Any]:
        return premium(SHIRAHAMA, resident_id, activities=[
            *activities(10, 40), {"activity_id": entry["id"], "date": (today() - timedelta(days=days_ago)).isoformat()}
        ])

    before = await snapshot(pool)
    done_today = await client.post(f"/v1/residents/{resident_id}/registrations", json=with_entry(0),
                                   headers=resident_auth(settings, resident_id))
    assert_problem(done_today, 422, "activity-retired")
    assert await snapshot(pool) == before
    # Done yesterday, while it was designated: it counts.
    requested = await register(client, settings, resident_id, with_entry(1))
    assert requested["awaiting_review"] == "initial"


async def test_a_renewal_picks_from_the_registrations_own_catalogue(
    client: httpx.AsyncClient, settings: Settings, pool: asyncpg.Pool
) -> None:
    resident_id = await create_resident(client, settings)
    requested = await register(client, settings, resident_id, premium(TANABE, resident_id))
    approved = await client.post(f"/v1/registrations/{requested['id']}/approve", headers=staff(settings, TANABE))
    assert approved.status_code == 200, approved.text
    me = resident_auth(settings, resident_id)
    before = await snapshot(pool)
    elsewhere = await client.post(f"/v1/registrations/{requested['id']}/renew",
                                  json={"activities": activities(0, 0, 0)}, headers=me)  # 白浜町's
    assert_problem(elsewhere, 422, "activity-of-another-municipality")
    free_text = await client.post(f"/v1/registrations/{requested['id']}/renew", json={"activities": [
        {"name": f"活動{i}", "date": today().isoformat()} for i in range(3)]}, headers=me)
    assert_problem(free_text, 422, "activity-not-designated")
    assert await snapshot(pool) == before
    renewed = await client.post(f"/v1/registrations/{requested['id']}/renew",
                                json={"activities": activities(0, 0, 0, municipality=TANABE)}, headers=me)
    assert renewed.status_code == 200 and renewed.json()["awaiting_review"] == "renewal"
