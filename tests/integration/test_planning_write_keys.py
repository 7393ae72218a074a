"""Planning's writes under an Idempotency-Key: a repeat answers the first response, only to the caller
who sent it; another caller reusing the key gets its own answer; a changed request under the same
key is a 422 (``tests.support.assert_key_scoped``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from services.planning.handlers import seeded_plan_id
from services.planning.main import create_app
from shared.kit.settings import Settings
from shared.reference import municipalities, municipalities_with_plan
from tests.integration.test_planning import CONTENT, Harness, ok
from tests.support import assert_key_scoped, bearer, service_client

COVERED = {
    "POST /v1/plans",
    "POST /v1/plans/{plan_id}/consultation",
    "POST /v1/plans/{plan_id}/adopt",
    "POST /v1/plans/{plan_id}/amendments",
    "POST /v1/plans/{plan_id}/withdraw",
    "POST /v1/corporations",
    "POST /v1/corporations/{corporation_id}/designate",
    "POST /v1/corporations/{corporation_id}/reports",
    "POST /v1/corporations/{corporation_id}/revoke",
    "POST /v1/corporations/{corporation_id}/proposals",
    "POST /v1/proposals/{proposal_id}/answer",
    "POST /v1/councils",
    "POST /v1/councils/{council_id}/members",
    "POST /v1/councils/{council_id}/meetings",
}
NAGANO_TOWN_WITH_PLAN = "202151"  # 長野県塩尻市 (seeded plan)
OTHER = "202011"  # 長野県長野市: the other caller's municipality


def _free_towns() -> Iterator[str]:
    """長野県 municipalities without a plan in the seed (長野県's covers them), one per test that needs one;
    岡谷市 and 長野市 are left to the other tests."""
    planned = municipalities_with_plan()
    for code, m in sorted(municipalities().items()):
        if code.startswith("20") and not m.is_prefecture and code not in planned and code not in ("202045", OTHER):
            yield code


TOWNS = _free_towns()


@pytest.fixture(scope="module")
async def h(settings: Settings) -> AsyncIterator[Harness]:
    app = create_app(settings)
    async with service_client(app) as client:
        yield Harness(settings, client, app)


async def draft(h: Harness, code: str) -> Any:
    return await ok(await h.client.post(
        "/v1/plans", json={"level": "municipality", "municipality_code": code, "content": CONTENT},
        headers=h.manager(code)), 201)


async def consulted(h: Harness, code: str) -> Any:
    plan = await draft(h, code)
    return await ok(await h.client.post(f"/v1/plans/{plan['plan_id']}/consultation", json={},
                                        headers=h.manager(code)))


async def corporation(h: Harness, code: str, *, designated: bool = True) -> str:
    applied = await ok(await h.client.post("/v1/corporations", json={"municipality_code": code, "name": "(株)鍵"},
                                           headers=h.reviewer(code)), 201)
    if designated:
        await ok(await h.client.post(f"/v1/corporations/{applied['corporation_id']}/designate",
                                     headers=h.manager(code)))
    return str(applied["corporation_id"])


async def test_plan_keys_belong_to_the_bodys_manager(h: Harness) -> None:
    town, changed_town = next(TOWNS), next(TOWNS)
    body = {"level": "municipality", "municipality_code": town, "content": CONTENT}
    first = await assert_key_scoped(
        h.client, "POST", "/v1/plans", owner=h.manager(town), other=h.manager(OTHER), body=body,
        changed_body={**body, "content": {**CONTENT, "area": "市の北部"}},
    )
    plan_id = first.json()["plan_id"]
    await assert_key_scoped(
        h.client, "POST", f"/v1/plans/{plan_id}/consultation", owner=h.manager(town), other=h.manager(OTHER),
        body={}, changed_body={"meeting_id": "mtg-none"},
    )
    # a body has one live plan: the changed request is another body's plan, so the owner is an admin
    other_plan = (await consulted(h, changed_town))["plan_id"]
    adopted = await assert_key_scoped(
        h.client, "POST", f"/v1/plans/{plan_id}/adopt", owner=bearer(h.settings, "admin"), other=h.manager(OTHER),
        changed_path=f"/v1/plans/{other_plan}/adopt",
    )
    assert adopted.json()["status"] == "adopted"
    await assert_key_scoped(
        h.client, "POST", f"/v1/plans/{plan_id}/amendments", owner=h.manager(town), other=h.manager(OTHER),
        body={"content": CONTENT}, changed_body={"content": {**CONTENT, "area": "中心市街地"}},
    )
    await assert_key_scoped(
        h.client, "POST", f"/v1/plans/{plan_id}/withdraw", owner=h.manager(town), other=h.manager(OTHER),
        body={"reason_code": "policy_ended"}, changed_body={"reason_code": "other"},
    )


async def test_corporation_keys_belong_to_the_municipalitys_staff(h: Harness) -> None:
    town = NAGANO_TOWN_WITH_PLAN
    body = {"municipality_code": town, "name": "(株)塩尻ワーク"}
    await assert_key_scoped(
        h.client, "POST", "/v1/corporations", owner=h.reviewer(town), other=h.reviewer(OTHER), body=body,
        changed_body={**body, "name": "(株)塩尻ライフ"},
    )
    applicant, another = await corporation(h, town, designated=False), await corporation(h, town, designated=False)
    await assert_key_scoped(
        h.client, "POST", f"/v1/corporations/{applicant}/designate", owner=h.manager(town), other=h.manager(OTHER),
        changed_path=f"/v1/corporations/{another}/designate",
    )
    report = {"period_from": "2026-04-01", "period_until": "2026-09-30", "summary": "相談 3件"}
    await assert_key_scoped(
        h.client, "POST", f"/v1/corporations/{applicant}/reports", owner=h.reviewer(town), other=h.reviewer(OTHER),
        body=report, changed_body={**report, "summary": "相談 4件"},
    )
    proposal = {"kind": "change", "plan_id": seeded_plan_id(town), "summary": "交流拠点の追加"}
    made = await assert_key_scoped(
        h.client, "POST", f"/v1/corporations/{applicant}/proposals", owner=h.reviewer(town),
        other=h.reviewer(OTHER), body=proposal, changed_body={**proposal, "summary": "別案"},
    )
    answer = {"decision": "declined", "reason_code": "already_addressed"}
    await assert_key_scoped(
        h.client, "POST", f"/v1/proposals/{made.json()['proposal_id']}/answer", owner=h.manager(town),
        other=h.manager(OTHER), body=answer, changed_body={**answer, "reason_code": "other"},
    )
    await assert_key_scoped(
        h.client, "POST", f"/v1/corporations/{applicant}/revoke", owner=h.manager(town), other=h.manager(OTHER),
        body={"reason_code": "corporation_request"}, changed_body={"reason_code": "dissolved"},
    )


async def test_council_keys_belong_to_the_municipalitys_staff(h: Harness) -> None:
    town = NAGANO_TOWN_WITH_PLAN
    body = {"municipality_code": town, "name": "塩尻市特定居住促進協議会", "members": [{"kind": "municipality",
                                                                                "name": "塩尻市"}]}
    formed = await assert_key_scoped(
        h.client, "POST", "/v1/councils", owner=h.manager(town), other=h.manager(OTHER), body=body,
        changed_body={**body, "name": "塩尻市協議会"},
    )
    council_id = formed.json()["council_id"]
    await assert_key_scoped(
        h.client, "POST", f"/v1/councils/{council_id}/members", owner=h.manager(town), other=h.manager(OTHER),
        body={"kind": "resident", "name": "住民委員"}, changed_body={"kind": "resident", "name": "別の委員"},
    )
    meeting = {"agenda": "計画の変更について", "minutes_summary": "継続審議", "plan_id": seeded_plan_id(town)}
    await assert_key_scoped(
        h.client, "POST", f"/v1/councils/{council_id}/meetings", owner=h.reviewer(town), other=h.reviewer(OTHER),
        body=meeting, changed_body={**meeting, "minutes_summary": "了承"},
    )
