"""Planning over the real broker and database: the reference seed (20 + 28 plans, 51 corporations) and
its events, the plan lifecycle with versions and the prefectural prerequisite, support corporations
and their proposals, councils and consultation, public and staff reads.

The module shares one running service and database; each test works on municipalities of its own.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from services.planning.handlers import seed_reference, seeded_corporation_id, seeded_plan_id
from services.planning.main import create_app
from shared.contracts.topics import CORPORATIONS, COUNCILS, PLANS
from shared.kit.envelope import Envelope, parse_envelope
from shared.kit.service import ServiceRuntime
from shared.kit.settings import Settings
from tests.support import bearer, caught_up, read_topic, service_client

SHIRAHAMA = "304018"  # 和歌山県白浜町: seeded plan, two seeded corporations (JAL, オーエス)
WAKAYAMA = "300004"
TANABE = "302066"  # 和歌山県田辺市: seeded plan
HACHIOJI = "132012"  # 東京都八王子市: no plan, and 東京都 has none either
TOKYO = "130001"
OKAYAMA_CITY = "331007"  # 岡山県岡山市: no plan; 岡山県 has none
PROBLEM = "application/problem+json"
CONTENT = {
    "area": "町内全域", "basic_policy": "二地域居住者と地域の担い手をつなぐ",
    "residents_sought": "テレワーカー、子育て世帯",
    "base_facilities": ["移住交流拠点"], "convenience_facilities": ["診療所"], "work_facilities": ["コワーキング"],
}


@dataclass
class Harness:
    settings: Settings
    client: httpx.AsyncClient
    app: FastAPI

    @property
    def pool(self) -> asyncpg.Pool:
        runtime: ServiceRuntime = self.app.state.runtime
        return runtime.pool

    def manager(self, code: str = SHIRAHAMA) -> dict[str, str]:
        return bearer(self.settings, "staff", municipality=code, staff_role="manager")

    def reviewer(self, code: str = SHIRAHAMA) -> dict[str, str]:
        return bearer(self.settings, "staff", municipality=code, staff_role="reviewer")

    def reader(self, prefecture: str = WAKAYAMA) -> dict[str, str]:
        return bearer(self.settings, "prefecture", prefecture=prefecture)


@pytest.fixture(scope="module")
async def h(settings: Settings) -> AsyncIterator[Harness]:
    app = create_app(settings)
    async with service_client(app) as client:
        yield Harness(settings, client, app)


async def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()


@dataclass(frozen=True)
class Seen:
    type: str
    subject: str
    data: dict[str, Any]


async def events(settings: Settings, topic: str, key: str, count: int) -> list[Seen]:
    """The events with this key on the topic, in order (waiting until ``count`` of them arrived)."""

    def matching(records: list[Any]) -> list[Envelope]:
        return [parse_envelope(r.headers, r.value, r.key) for r in records if r.key == key.encode()]

    records = await read_topic(settings, settings.topic(topic), until=lambda rs: len(matching(rs)) >= count)
    return [Seen(e.type, e.subject, json.loads(e.data)) for e in matching(records)]


async def plan_through(h: Harness, code: str, level: str = "municipality", **extra: Any) -> Any:
    """A new plan taken to consultation (by the body's manager)."""
    draft = await ok(await h.client.post(
        "/v1/plans", json={"level": level, "municipality_code": code, "content": CONTENT, **extra},
        headers=h.manager(code)), 201)
    assert draft["status"] == "draft" and draft["versions"][0]["status"] == "draft"
    return await ok(await h.client.post(f"/v1/plans/{draft['plan_id']}/consultation", json={},
                                        headers=h.manager(code)))


# --- the seed ----------------------------------------------------------------------------------------


async def test_the_reference_seed_is_public_and_announced(h: Harness) -> None:
    public = h.client  # no token
    prefectural = await ok(await public.get("/v1/public/plans", params={"level": "prefecture", "limit": 200}))
    municipal = await ok(await public.get("/v1/public/plans", params={"level": "municipality", "limit": 200}))
    seeded_prefectures = [p for p in prefectural["items"] if p["plan_id"].startswith("pln-") and
                          p["plan_id"] == seeded_plan_id(p["municipality_code"])]
    seeded_towns = [p for p in municipal["items"] if p["plan_id"] == seeded_plan_id(p["municipality_code"])]
    assert (len(seeded_prefectures), len(seeded_towns)) == (20, 28)
    shirahama = await ok(await public.get(f"/v1/public/plans/{seeded_plan_id(SHIRAHAMA)}"))
    assert shirahama | {"content": None} == {
        "plan_id": "pln-304018", "level": "municipality", "municipality_code": SHIRAHAMA,
        "municipality_name": "和歌山県白浜町", "prefecture_code": WAKAYAMA, "name": "特定居住促進計画",
        "status": "adopted", "covers_dual_residence": False, "adopted_on": "2025-07-10", "version": 1,
        "in_force_from": "2025-07-10", "content": None,
    }
    assert shirahama["content"]["area"] == "和歌山県白浜町"
    corporations = await ok(await public.get("/v1/public/corporations", params={"limit": 200}))
    seeded = [c for c in corporations["items"] if c["corporation_id"] == seeded_corporation_id(
        c["municipality_code"], c["name"])]
    assert len(seeded) == 51
    town = await ok(await public.get("/v1/public/corporations", params={"municipality": SHIRAHAMA}))
    assert {"日本航空(株)", "オーエス(株)"} <= {c["name"] for c in town["items"]}

    adopted = await events(h.settings, PLANS.name, "pln-304018", 1)
    assert adopted[0].type == "jp.nichiiki.planning.plan.adopted.v1"
    assert adopted[0].data["adopted_on"] == "2025-07-10" and adopted[0].data["prefecture_code"] == WAKAYAMA
    jal = seeded_corporation_id(SHIRAHAMA, "日本航空(株)")
    designated = await events(h.settings, CORPORATIONS.name, jal, 1)
    assert designated[0].data == {
        "corporation_id": jal, "municipality_code": SHIRAHAMA, "name": "日本航空(株)", "services": [],
        "designated_on": "2025-08-28",
    }


async def test_seeding_again_adds_and_announces_nothing(h: Harness) -> None:
    before = await h.pool.fetchval("SELECT count(*) FROM outbox")
    rows = await h.pool.fetchval("SELECT (SELECT count(*) FROM plans) + (SELECT count(*) FROM corporations)")
    await seed_reference(h.app.state.runtime)
    assert await h.pool.fetchval("SELECT count(*) FROM outbox") == before
    assert await h.pool.fetchval(
        "SELECT (SELECT count(*) FROM plans) + (SELECT count(*) FROM corporations)") == rows


# --- plans -------------------------------------------------------------------------------------------


async def test_a_municipal_plan_waits_for_its_prefectures_plan(h: Harness) -> None:
    town = await plan_through(h, HACHIOJI)
    refused = await h.client.post(f"/v1/plans/{town['plan_id']}/adopt", headers=h.manager(HACHIOJI))
    assert refused.status_code == 409 and refused.headers["content-type"].startswith(PROBLEM), refused.text
    assert refused.json()["code"] == "prefectural-plan-missing" and refused.json()["prefecture_code"] == TOKYO
    assert "東京都" in refused.json()["detail"]
    # the prefecture's staff (their token names the prefecture's code) adopt its plan first
    prefecture = await plan_through(h, TOKYO, "prefecture", covers_dual_residence=True)
    adopted_prefecture = await ok(await h.client.post(f"/v1/plans/{prefecture['plan_id']}/adopt",
                                                      headers=h.manager(TOKYO)))
    assert adopted_prefecture["name"] == "広域的地域活性化基盤整備計画"
    adopted = await ok(await h.client.post(f"/v1/plans/{town['plan_id']}/adopt", headers=h.manager(HACHIOJI)))
    assert adopted["status"] == "adopted" and adopted["version"] == 1 and adopted["content"]["area"] == "町内全域"

    seen = await events(h.settings, PLANS.name, town["plan_id"], 2)
    assert [e.type for e in seen] == ["jp.nichiiki.planning.plan.consultation_started.v1",
                                      "jp.nichiiki.planning.plan.adopted.v1"]
    assert seen[1].data["content"]["basic_policy"] == CONTENT["basic_policy"]
    assert seen[1].subject == town["plan_id"]


async def test_an_amendment_is_a_new_version_public_only_once_adopted(h: Harness) -> None:
    plan_id = seeded_plan_id(TANABE)
    manager = h.manager(TANABE)
    changed = {**CONTENT, "work_facilities": ["サテライトオフィス"]}
    amending = await ok(await h.client.post(f"/v1/plans/{plan_id}/amendments", json={"content": changed},
                                            headers=manager), 201)
    assert [v["status"] for v in amending["versions"]] == ["in_force", "draft"]
    public = await ok(await h.client.get(f"/v1/public/plans/{plan_id}"))
    assert public["version"] == 1 and public["content"]["work_facilities"] == []
    again = await h.client.post(f"/v1/plans/{plan_id}/amendments", json={"content": changed}, headers=manager)
    assert again.status_code == 409 and again.json()["code"] == "plan-state-conflict"
    await ok(await h.client.post(f"/v1/plans/{plan_id}/consultation", json={}, headers=manager))
    amended = await ok(await h.client.post(f"/v1/plans/{plan_id}/adopt", headers=manager))
    assert amended["status"] == "amended" and amended["version"] == 2
    assert [v["status"] for v in amended["versions"]] == ["superseded", "in_force"]
    public = await ok(await h.client.get(f"/v1/public/plans/{plan_id}"))
    assert public["version"] == 2 and public["content"]["work_facilities"] == ["サテライトオフィス"]
    seen = await events(h.settings, PLANS.name, plan_id, 3)
    assert seen[-1].type == "jp.nichiiki.planning.plan.amended.v1" and seen[-1].data["version"] == 2


async def test_drafts_are_for_staff_and_withdrawn_plans_leave_the_public_list(h: Harness) -> None:
    draft = await ok(await h.client.post(
        "/v1/plans", json={"level": "municipality", "municipality_code": OKAYAMA_CITY, "content": CONTENT},
        headers=h.manager(OKAYAMA_CITY)), 201)
    plan_id = draft["plan_id"]
    assert (await h.client.get(f"/v1/public/plans/{plan_id}")).status_code == 404
    assert (await h.client.get(f"/v1/plans/{plan_id}", headers=h.manager(OKAYAMA_CITY))).status_code == 200
    assert (await h.client.get(f"/v1/plans/{plan_id}", headers=h.manager(SHIRAHAMA))).status_code == 403
    assert (await h.client.get(f"/v1/plans/{plan_id}", headers=h.reader(WAKAYAMA))).status_code == 403
    assert (await h.client.get(f"/v1/plans/{plan_id}", headers=h.reader("330001"))).status_code == 200  # 岡山県
    second = await h.client.post(
        "/v1/plans", json={"level": "municipality", "municipality_code": OKAYAMA_CITY, "content": CONTENT},
        headers=h.manager(OKAYAMA_CITY))
    assert second.status_code == 409 and second.json()["code"] == "plan-already-exists"
    withdrawn = await ok(await h.client.post(f"/v1/plans/{plan_id}/withdraw", json={"reason_code": "entered_in_error"},
                                             headers=h.manager(OKAYAMA_CITY)))
    assert withdrawn["status"] == "withdrawn"
    seen = await events(h.settings, PLANS.name, plan_id, 1)
    assert seen[0].type == "jp.nichiiki.planning.plan.withdrawn.v1" and seen[0].data["reason"] == "entered_in_error"
    # a reviewer records, a manager decides
    refused = await h.client.post(
        "/v1/plans", json={"level": "municipality", "municipality_code": OKAYAMA_CITY, "content": CONTENT},
        headers=h.reviewer(OKAYAMA_CITY))
    assert refused.status_code == 403


async def test_the_prefecture_reader_lists_the_prefectures_plans(h: Harness) -> None:
    page = await ok(await h.client.get(f"/v1/municipalities/{WAKAYAMA}/plans", headers=h.reader(WAKAYAMA)))
    codes = {p["municipality_code"] for p in page["items"]}
    assert {WAKAYAMA, SHIRAHAMA, TANABE, "304069"} <= codes and all(c.startswith("30") for c in codes)
    assert (await h.client.get(f"/v1/municipalities/{WAKAYAMA}/plans", headers=h.reader(TOKYO))).status_code == 403
    ministry = bearer(h.settings, "ministry")
    assert (await h.client.get(f"/v1/municipalities/{SHIRAHAMA}/plans", headers=ministry)).status_code == 200


# --- support corporations and proposals ----------------------------------------------------------------


async def test_a_corporation_applies_is_designated_proposes_and_is_answered(h: Harness) -> None:
    applied = await ok(await h.client.post(
        "/v1/corporations", json={"municipality_code": SHIRAHAMA, "name": "NPO法人白浜ベース",
                                  "services": ["housing", "community"]},
        headers=h.reviewer()), 201)
    corporation_id = applied["corporation_id"]
    assert applied["status"] == "applied"
    early = await h.client.post(f"/v1/corporations/{corporation_id}/proposals",
                                json={"kind": "change", "plan_id": "pln-304018", "summary": "x"}, headers=h.reviewer())
    assert early.status_code == 409 and early.json()["code"] == "corporation-not-designated"
    assert (await h.client.post(f"/v1/corporations/{corporation_id}/designate",
                                headers=h.reviewer())).status_code == 403  # the mayor designates: a manager
    assert (await h.client.post(f"/v1/corporations/{corporation_id}/designate",
                                headers=h.manager(TANABE))).status_code == 403
    designated = await ok(await h.client.post(f"/v1/corporations/{corporation_id}/designate", headers=h.manager()))
    assert designated["status"] == "designated"
    public = await ok(await h.client.get("/v1/public/corporations", params={"municipality": SHIRAHAMA}))
    assert corporation_id in {c["corporation_id"] for c in public["items"]}

    reported = await ok(await h.client.post(
        f"/v1/corporations/{corporation_id}/reports",
        json={"period_from": "2026-04-01", "period_until": "2026-09-30", "summary": "空き家相談 8件、体験住宅 3組"},
        headers=h.reviewer()), 201)
    assert reported["reports"][0]["summary"] == "空き家相談 8件、体験住宅 3組"

    proposal = await ok(await h.client.post(
        f"/v1/corporations/{corporation_id}/proposals",
        json={"kind": "change", "plan_id": "pln-304018", "summary": "拠点施設にシェアハウスを加える"},
        headers=h.reviewer()), 201)
    assert proposal["status"] == "open" and not proposal["overdue"]
    queue = await ok(await h.client.get(f"/v1/municipalities/{SHIRAHAMA}/proposals", params={"status": "open"},
                                        headers=h.reader()))
    assert proposal["proposal_id"] in {p["proposal_id"] for p in queue["items"]}
    answered = await ok(await h.client.post(
        f"/v1/proposals/{proposal['proposal_id']}/answer",
        json={"decision": "accepted", "reason_code": "will_amend_plan", "note": "次回協議会で審議"},
        headers=h.manager()))
    assert (answered["status"], answered["answer_reason"]) == ("accepted", "will_amend_plan")
    twice = await h.client.post(f"/v1/proposals/{proposal['proposal_id']}/answer",
                                json={"decision": "declined", "reason_code": "other"}, headers=h.manager())
    assert twice.status_code == 409 and twice.json()["code"] == "proposal-already-answered"

    revoked = await ok(await h.client.post(
        f"/v1/corporations/{corporation_id}/revoke",
        json={"reason_code": "report_not_submitted", "note": "督促後も未提出"}, headers=h.manager()))
    assert revoked["status"] == "revoked"

    seen = await events(h.settings, CORPORATIONS.name, corporation_id, 5)
    types = [e.type for e in seen]
    assert types == [
        "jp.nichiiki.planning.corporation.designated.v1", "jp.nichiiki.planning.corporation.report_received.v1",
        "jp.nichiiki.planning.proposal.made.v1", "jp.nichiiki.planning.proposal.answered.v1",
        "jp.nichiiki.planning.corporation.revoked.v1",
    ]
    text = " ".join(str(e.data) for e in seen)
    # staff's words stay here
    assert "空き家" not in text and "シェアハウス" not in text and "協議会" not in text and "督促" not in text


# --- councils ----------------------------------------------------------------------------------------


async def test_a_council_consults_on_a_plan(h: Harness) -> None:
    code = "202045"  # 長野県岡谷市: no plan in the seed; 長野県 has one
    council = await ok(await h.client.post("/v1/councils", json={
        "municipality_code": code, "name": "岡谷市特定居住促進協議会",
        "members": [{"kind": "municipality", "name": "岡谷市"}, {"kind": "resident", "name": "山田 花子"},
                    {"kind": "estate_agent", "name": "岡谷不動産"}],
    }, headers=h.manager(code)), 201)
    council_id = council["council_id"]
    await ok(await h.client.post(f"/v1/councils/{council_id}/members",
                                 json={"kind": "chamber_of_commerce", "name": "岡谷商工会議所"},
                                 headers=h.manager(code)), 201)
    draft = await ok(await h.client.post(
        "/v1/plans", json={"level": "municipality", "municipality_code": code, "content": CONTENT},
        headers=h.manager(code)), 201)
    meeting = await ok(await h.client.post(f"/v1/councils/{council_id}/meetings", json={
        "agenda": "特定居住促進計画(案)について", "minutes_summary": "原案了承", "plan_id": draft["plan_id"],
    }, headers=h.reviewer(code)), 201)
    meeting_id = meeting["meetings"][0]["meeting_id"]
    foreign = await h.client.post(f"/v1/plans/{seeded_plan_id(TANABE)}/consultation", json={"meeting_id": meeting_id},
                                  headers=h.manager(TANABE))
    assert foreign.status_code in (409, 422) and foreign.json()["code"] in (
        "meeting-of-another-municipality", "plan-state-conflict")
    consulted = await ok(await h.client.post(f"/v1/plans/{draft['plan_id']}/consultation",
                                             json={"meeting_id": meeting_id}, headers=h.manager(code)))
    assert consulted["versions"][0]["consultation_meeting_id"] == meeting_id
    adopted = await ok(await h.client.post(f"/v1/plans/{draft['plan_id']}/adopt", headers=h.manager(code)))
    assert adopted["status"] == "adopted"  # 長野県's seeded plan covers it

    full = await ok(await h.client.get(f"/v1/councils/{council_id}", headers=h.reviewer(code)))
    assert full["member_counts"] == {"chamber_of_commerce": 1, "estate_agent": 1, "municipality": 1, "resident": 1}
    assert "山田 花子" in {m["name"] for m in full["members"]} and full["meetings"][0]["minutes_summary"] == "原案了承"
    nagano = bearer(h.settings, "prefecture", prefecture="200000")
    assert (await h.client.get(f"/v1/councils/{council_id}", headers=nagano)).status_code == 403
    summary = await ok(await h.client.get(f"/v1/municipalities/{code}/councils", headers=nagano))
    assert "山田" not in str(summary) and summary["items"][0]["member_counts"]["resident"] == 1
    twice = await h.client.post("/v1/councils", json={"municipality_code": code, "name": "二つ目"},
                                headers=h.manager(code))
    assert twice.status_code == 409 and twice.json()["code"] == "council-already-exists"

    seen = await events(h.settings, COUNCILS.name, council_id, 3)
    assert [e.type.rsplit(".", 2)[-2] for e in seen] == ["formed", "membership_changed", "meeting_held"]
    assert seen[0].data["members"] == {"estate_agent": 1, "municipality": 1, "resident": 1}
    assert seen[2].data["plan_id"] == draft["plan_id"] and "原案" not in str([e.data for e in seen])
    plan_events = await events(h.settings, PLANS.name, draft["plan_id"], 2)
    assert plan_events[0].data["meeting_id"] == meeting_id
    await caught_up(h.app)
