"""Every write of the subsidy service runs through the kit's runner: an Idempotency-Key is the
caller's own (another caller with the same key never gets the first answer, and the permission
check runs before any replay), a repeat is replayed, and the same key for another request is refused."""

from __future__ import annotations

import uuid
from datetime import timedelta

from shared.contracts.formats import ProgramId
from shared.contracts.topics import CERTIFICATES
from tests.integration.test_subsidy import (
    PROBLEM,
    TODAY,
    VOUCHER_PARAMETERS,
    Subsidy,
    cert_event,
    certificate_issued,
    create_program,
    http_trip,
    registered_partner,
    subsidy,
    uid,
)
from tests.support import assert_key_scoped, membership

__all__ = ["subsidy"]  # the module-scoped app of the subsidy tests, used here as a fixture

COVERED: set[str] = {
    "POST /v1/programs",
    "POST /v1/programs/{program_id}/budget",
    "POST /v1/redemptions",
}


def program_body(program_id: str) -> dict[str, object]:
    return {
        "program_id": program_id, "title": "test fare voucher", "partner": f"p{uid()}",
        "municipality_code": "152048", "mechanism": "fare_voucher", "parameters": VOUCHER_PARAMETERS,
        "active_from": (TODAY - timedelta(days=30)).isoformat(),
        "active_until": (TODAY + timedelta(days=365)).isoformat(), "opening_budget": 10_000,
    }


async def test_create_program(subsidy: Subsidy) -> None:
    # Another admin with the same key runs its own request: the program exists already (409).
    body = program_body(ProgramId.format(f"test-keys-{uid()}", "152048"))
    changed = program_body(ProgramId.format(f"test-keys-{uid()}", "152048"))
    for program in (body, changed):  # partners beyond the seed, as if registered through the gateway
        await registered_partner(subsidy, str(program["partner"]))
    first = await assert_key_scoped(
        subsidy.client, "POST", "/v1/programs", owner=subsidy.auth("admin"), other=subsidy.auth("admin"),
        body=body, changed_body=changed,
    )
    assert first.status_code == 201 and first.json()["program_id"] == body["program_id"]


async def test_top_up_budget(subsidy: Subsidy) -> None:
    program_id, _ = await create_program(subsidy, "152048", "fare_voucher", VOUCHER_PARAMETERS, 40_000)
    body = {"unit": "jpy", "amount": 1000, "reason": "council decision"}
    first = await assert_key_scoped(
        subsidy.client, "POST", f"/v1/programs/{program_id}/budget",
        owner=subsidy.auth("staff", municipality="152048"), other=subsidy.auth("staff", municipality="304069"),
        body=body, changed_body=body | {"amount": 2000},
    )
    assert first.json()["credited"] == 1000
    # Credited once: the replay, the other town's staff (403) and the reused key (422) changed nothing.
    assert (await subsidy.budget(program_id))["available"] == 41_000


async def test_a_top_up_key_is_checked_for_permission_before_it_is_replayed(subsidy: Subsidy) -> None:
    program_id, _ = await create_program(subsidy, "152048", "fare_voucher", VOUCHER_PARAMETERS, 40_000)
    key = f"k-{uuid.uuid4()}"
    body = {"unit": "jpy", "amount": 500, "reason": "council decision"}
    path = f"/v1/programs/{program_id}/budget"
    staff = subsidy.auth("staff", municipality="152048")
    first = await subsidy.client.post(path, json=body, headers=staff | {"Idempotency-Key": key})
    assert first.status_code == 201, first.text
    outsider = await subsidy.client.post(
        path, json=body, headers=subsidy.auth("staff", municipality="304069") | {"Idempotency-Key": key}
    )
    assert outsider.status_code == 403 and outsider.headers["content-type"].startswith(PROBLEM)
    assert outsider.json()["code"] == "forbidden"
    admin = await subsidy.client.post(path, json=body, headers=subsidy.auth("admin") | {"Idempotency-Key": key})
    assert admin.status_code == 201 and admin.headers.get("Idempotent-Replayed") is None
    assert admin.json()["ledger_entry_id"] != first.json()["ledger_entry_id"]
    assert await subsidy.ledger(program_id) == [("opening", 40_000), ("top_up", 500), ("top_up", 500)]


async def test_report_redemption(subsidy: Subsidy) -> None:
    program_id, partner = await create_program(subsidy, "152048", "fare_voucher", VOUCHER_PARAMETERS, 40_000)
    issued = certificate_issued("152048", [membership(partner=partner)])
    await subsidy.publish(CERTIFICATES, cert_event(issued))
    grant = await subsidy.grant_of(issued.certificate_number, program_id)
    body = http_trip(grant)
    # Another partner reporting on this grant with the same key is refused (404, as for no such grant).
    first = await assert_key_scoped(
        subsidy.client, "POST", "/v1/redemptions", owner=subsidy.auth("partner", partner=partner),
        other=subsidy.auth("partner", partner=f"p{uid()}"), body=body,
        changed_body=body | {"trip_id": f"H-{uid()}"},
    )
    assert first.status_code == 201 and first.json()["accepted"] is True
    assert await subsidy.pool.fetchval("SELECT count(*) FROM trips WHERE grant_id = $1", grant["grant_id"]) == 1
