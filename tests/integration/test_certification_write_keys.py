"""Certification's writes under an Idempotency-Key: a repeat answers the first response, only to
the caller who sent it; another caller reusing the key gets its own answer; a changed request
under the same key is a 422 (``tests.support.assert_key_scoped``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from services.certification.main import CertificationConfig, create_app
from shared.kit.settings import Settings
from shared.reference import municipalities, municipalities_with_plan
from tests.integration.test_certification import (
    HACHIOJI,
    SHIRAHAMA,
    TANABE,
    FakeClock,
    Harness,
    application_body,
    apply,
    certified,
    new_id,
    register,
)
from tests.support import assert_key_scoped, bearer, service_client

KITAMI = "012084"  # 北海道北見市: has a plan, and no other test uses it

COVERED = {
    "POST /v1/applications",
    "POST /v1/applications/{application_id}/approve",
    "POST /v1/applications/{application_id}/reject",
    "POST /v1/certificates/{number}/renew",
    "POST /v1/certificates/{number}/revoke",
    "PUT /v1/municipalities/{code}/rules",
    "POST /v1/municipalities/{code}/plan",
}


@pytest.fixture(scope="module")
async def h(settings: Settings) -> AsyncIterator[Harness]:
    clock = FakeClock()
    app = create_app(settings, config=CertificationConfig(expiry_interval_s=3600), clock=clock.clock)
    async with service_client(app) as client:
        yield Harness(settings, client, app, clock)


async def test_an_application_key_is_the_applicants_own(h: Harness) -> None:
    applicant, other = new_id(), new_id()
    await register(h, applicant, SHIRAHAMA, TANABE)
    await register(h, other, SHIRAHAMA)
    first = await assert_key_scoped(
        h.client, "POST", "/v1/applications", owner=h.resident(applicant), other=h.resident(other),
        body=application_body(), changed_body=application_body(municipality_code=TANABE),
    )
    assert first.json()["resident_id"] == applicant


async def test_decision_keys_belong_to_the_deciding_staff(h: Harness) -> None:
    for action, body, changed in (
        ("approve", {}, {"valid_until": None}),
        ("reject", {"reason_code": "documents_incomplete"}, {"reason_code": "stay_below_minimum"}),
    ):
        resident = new_id()
        await register(h, resident)
        application = await apply(h, resident)
        first = await assert_key_scoped(
            h.client, "POST", f"/v1/applications/{application['application_id']}/{action}",
            owner=h.staff(SHIRAHAMA), other=h.staff(TANABE), body=body, changed_body=changed,
        )
        assert first.status_code == (201 if action == "approve" else 200)


async def test_certificate_keys_belong_to_the_issuing_staff(h: Harness) -> None:
    for action, body, changed in (
        ("renew", {}, {"valid_until": None}),
        ("revoke", {"reason_code": "not_residing"}, {"reason_code": "not_residing", "note": "虚偽申請"}),
    ):
        resident = new_id()
        await register(h, resident)
        number = (await certified(h, resident))["certificate_number"]
        await assert_key_scoped(
            h.client, "POST", f"/v1/certificates/{number}/{action}",
            owner=h.staff(SHIRAHAMA), other=h.staff(TANABE), body=body, changed_body=changed,
        )


async def test_a_rules_key_belongs_to_the_municipalitys_staff(h: Harness) -> None:
    # A town no other test applies to: the session's certification database is shared by every
    # test file, and stricter rules for Tanabe would refuse other files' applications there.
    rules = {"min_stay_days": 30, "housing_bases": ["owned", "rented"], "validity_days": 365,
             "required_registration": "any_active"}
    await assert_key_scoped(
        h.client, "PUT", f"/v1/municipalities/{KITAMI}/rules", owner=h.staff(KITAMI), other=h.staff(SHIRAHAMA),
        body=rules, changed_body={**rules, "min_stay_days": 31},
    )


async def test_a_plan_key_belongs_to_the_admin_who_sent_it(h: Harness) -> None:
    planned = set(municipalities_with_plan())
    code, changed = [
        c for c, m in sorted(municipalities().items())
        if not m.is_prefecture and c not in planned and c != HACHIOJI and c.startswith("13")
    ][-2:]
    owner, other = bearer(h.settings, "admin"), bearer(h.settings, "admin")
    first = await assert_key_scoped(
        h.client, "POST", f"/v1/municipalities/{code}/plan", owner=owner, other=other,
        body={"adopted_on": "2026-04-01"}, changed_path=f"/v1/municipalities/{changed}/plan",
    )
    assert first.json()["municipality_code"] == code
