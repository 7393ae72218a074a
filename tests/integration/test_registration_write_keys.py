"""Every write of the registration service runs through the kit's runner: an Idempotency-Key is the
caller's own (another caller with the same key never gets the first answer), a repeat is replayed,
and the same key for another request is refused. Erasure forgets the person's stored answers."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from services.registration.main import create_app
from shared.kit.service import ServiceRuntime
from shared.kit.settings import Settings
from tests.integration.test_registration_support import (
    IKI,
    SHIRAHAMA,
    TANABE,
    activities,
    admin_auth,
    assert_problem,
    create_resident,
    new_resident_id,
    premium,
    register,
    resident_auth,
    staff_auth,
    today,
)
from tests.support import assert_key_scoped, service_client

COVERED: set[str] = {
    "POST /v1/residents",
    "PATCH /v1/residents/{resident_id}",
    "DELETE /v1/residents/{resident_id}",
    "POST /v1/residents/{resident_id}/registrations",
    "POST /v1/residents/{resident_id}/consents",
    "DELETE /v1/residents/{resident_id}/consents/{purpose}",
    "POST /v1/registrations/{registration_id}/approve",
    "POST /v1/registrations/{registration_id}/reject",
    "POST /v1/registrations/{registration_id}/renew",
    "DELETE /v1/registrations/{registration_id}",
    "POST /v1/admin/premium-expiry",
    "POST /v1/residents/{resident_id}/exports",
    "POST /v1/municipalities/{code}/activities",
    "PATCH /v1/activities/{activity_id}",
    "POST /v1/activities/{activity_id}/retire",
}


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


def hanako_body(**overrides: object) -> dict[str, object]:
    body: dict[str, object] = {
        "name": "山田 花子", "name_kana": "ヤマダ ハナコ", "email": "hanako.yamada@example.jp",
        "date_of_birth": "1988-04-12", "legal_address_code": "131016",
    }
    body.update(overrides)
    return body


async def pending_premium(client: httpx.AsyncClient, settings: Settings, municipality: str) -> str:
    resident_id = await create_resident(client, settings)
    return str((await register(client, settings, resident_id, premium(municipality, resident_id)))["id"])


# --- Residents -----------------------------------------------------------------------------------


async def test_create_resident(client: httpx.AsyncClient, settings: Settings) -> None:
    owner, other = resident_auth(settings, new_resident_id()), resident_auth(settings, new_resident_id())
    first = await assert_key_scoped(
        client, "POST", "/v1/residents", owner=owner, other=other, body=hanako_body(),
        changed_body=hanako_body(name="山田 太郎"),
    )
    assert first.status_code == 201


async def test_change_contact(client: httpx.AsyncClient, settings: Settings) -> None:
    resident_id = await create_resident(client, settings)
    first = await assert_key_scoped(
        client, "PATCH", f"/v1/residents/{resident_id}", owner=resident_auth(settings, resident_id),
        other=resident_auth(settings, new_resident_id()), body={"phone": "090-1111-2222"},
        changed_body={"phone": "090-3333-4444"},
    )
    assert first.json()["phone"] == "090-1111-2222"


async def test_erase_resident(client: httpx.AsyncClient, settings: Settings) -> None:
    # An admin erases (so the same key can name another resident: the resident may only name themself).
    erased, spared = await create_resident(client, settings), await create_resident(client, settings)
    first = await assert_key_scoped(
        client, "DELETE", f"/v1/residents/{erased}", owner=admin_auth(settings),
        other=resident_auth(settings, new_resident_id()), changed_path=f"/v1/residents/{spared}",
    )
    assert first.status_code == 204
    spared_view = await client.get(f"/v1/residents/{spared}", headers=resident_auth(settings, spared))
    assert spared_view.status_code == 200


async def test_request_export(client: httpx.AsyncClient, settings: Settings) -> None:
    # An admin asks (so the same key can name another resident: the resident may only name themself).
    asked, other = await create_resident(client, settings), await create_resident(client, settings)
    first = await assert_key_scoped(
        client, "POST", f"/v1/residents/{asked}/exports", owner=admin_auth(settings),
        other=resident_auth(settings, new_resident_id()), changed_path=f"/v1/residents/{other}/exports",
    )
    assert first.status_code == 202 and first.json()["resident_id"] == asked
    view = await client.get(f"/v1/residents/{asked}/exports/{first.json()['export_id']}",
                            headers=resident_auth(settings, asked))
    assert view.status_code == 200 and view.json()["status"] == "gathering"


# --- Registrations -------------------------------------------------------------------------------


async def test_register(client: httpx.AsyncClient, settings: Settings) -> None:
    resident_id = await create_resident(client, settings)
    first = await assert_key_scoped(
        client, "POST", f"/v1/residents/{resident_id}/registrations", owner=resident_auth(settings, resident_id),
        other=resident_auth(settings, new_resident_id()), body={"municipality_code": SHIRAHAMA},
        changed_body={"municipality_code": TANABE},
    )
    assert first.status_code == 201 and first.json()["municipality_code"] == SHIRAHAMA


async def test_approve(client: httpx.AsyncClient, settings: Settings) -> None:
    registration_id, another_id = [await pending_premium(client, settings, SHIRAHAMA) for _ in range(2)]
    first = await assert_key_scoped(
        client, "POST", f"/v1/registrations/{registration_id}/approve", owner=staff_auth(settings, SHIRAHAMA),
        other=staff_auth(settings, TANABE), changed_path=f"/v1/registrations/{another_id}/approve",
    )
    assert first.json()["status"] == "active" and first.json()["tier"] == "premium"


async def test_reject(client: httpx.AsyncClient, settings: Settings) -> None:
    registration_id = await pending_premium(client, settings, SHIRAHAMA)
    first = await assert_key_scoped(
        client, "POST", f"/v1/registrations/{registration_id}/reject", owner=staff_auth(settings, SHIRAHAMA),
        other=staff_auth(settings, TANABE), body={"reason_code": "activity_not_confirmed"},
        changed_body={"reason_code": "activity_not_confirmed", "note": "別の理由"},
    )
    assert first.json()["status"] == "rejected"


async def test_renew(client: httpx.AsyncClient, settings: Settings) -> None:
    resident_id = await create_resident(client, settings)
    registration_id = (await register(client, settings, resident_id, premium(SHIRAHAMA, resident_id)))["id"]
    approved = await client.post(
        f"/v1/registrations/{registration_id}/approve", headers=staff_auth(settings, SHIRAHAMA)
    )
    assert approved.status_code == 200, approved.text
    # Approved today: this validity year's activities are today's.
    first = await assert_key_scoped(
        client, "POST", f"/v1/registrations/{registration_id}/renew", owner=resident_auth(settings, resident_id),
        other=resident_auth(settings, new_resident_id()), body={"activities": activities(0, 0, 0)},
        changed_body={"activities": activities(0, 0, 0, start=3)},
    )
    assert first.json()["awaiting_review"] == "renewal"


async def test_withdraw_registration(client: httpx.AsyncClient, settings: Settings) -> None:
    resident_id = await create_resident(client, settings)
    withdrawn = (await register(client, settings, resident_id, {"municipality_code": SHIRAHAMA}))["id"]
    kept = (await register(client, settings, resident_id, {"municipality_code": TANABE}))["id"]
    first = await assert_key_scoped(
        client, "DELETE", f"/v1/registrations/{withdrawn}", owner=resident_auth(settings, resident_id),
        other=resident_auth(settings, new_resident_id()), changed_path=f"/v1/registrations/{kept}",
    )
    assert first.json()["status"] == "withdrawn"


# --- Consents ------------------------------------------------------------------------------------


async def test_grant_consent(client: httpx.AsyncClient, settings: Settings) -> None:
    resident_id = await create_resident(client, settings)
    first = await assert_key_scoped(
        client, "POST", f"/v1/residents/{resident_id}/consents", owner=resident_auth(settings, resident_id),
        other=resident_auth(settings, new_resident_id()), body={"purpose": "newsletter"},
        changed_body={"purpose": "email"},
    )
    assert first.json()["granted"] is True


async def test_revoke_consent(client: httpx.AsyncClient, settings: Settings) -> None:
    resident_id = await create_resident(
        client, settings, consents=[{"purpose": "newsletter"}, {"purpose": "email"}]
    )
    first = await assert_key_scoped(
        client, "DELETE", f"/v1/residents/{resident_id}/consents/newsletter",
        owner=resident_auth(settings, resident_id), other=resident_auth(settings, new_resident_id()),
        changed_path=f"/v1/residents/{resident_id}/consents/email",
    )
    assert first.json()["granted"] is False


# --- Operations ----------------------------------------------------------------------------------


async def test_premium_expiry(client: httpx.AsyncClient, settings: Settings, pool: asyncpg.Pool) -> None:
    # One premium past its validity: the owner's run expires it, another admin's run finds nothing.
    registration_id = await pending_premium(client, settings, IKI)
    approved = await client.post(f"/v1/registrations/{registration_id}/approve", headers=staff_auth(settings, IKI))
    assert approved.status_code == 200, approved.text
    await pool.execute(
        "UPDATE registrations SET valid_until = $2 WHERE id = $1", registration_id, today() - timedelta(days=1)
    )
    first = await assert_key_scoped(
        client, "POST", "/v1/admin/premium-expiry", owner=admin_auth(settings), other=admin_auth(settings),
        changed_path="/v1/admin/premium-expiry?again=1",
    )
    assert first.json()["expired"] >= 1
    assert await pool.fetchval("SELECT status FROM registrations WHERE id = $1", registration_id) == "expired"


# --- Designated activities -----------------------------------------------------------------------


def designated_activity(code: str) -> dict[str, object]:
    return {"code": code, "name_ja": "棚田の田植え", "name_en": "Rice planting", "kind": "farming"}


async def published_activity(client: httpx.AsyncClient, settings: Settings, town: str) -> str:
    response = await client.post(f"/v1/municipalities/{town}/activities",
                                 json=designated_activity(f"keys-{uuid.uuid4().hex[:8]}"),
                                 headers=staff_auth(settings, town))
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def test_publish_designated_activity(client: httpx.AsyncClient, settings: Settings) -> None:
    code = f"keys-{uuid.uuid4().hex[:8]}"
    first = await assert_key_scoped(
        client, "POST", f"/v1/municipalities/{SHIRAHAMA}/activities", owner=staff_auth(settings, SHIRAHAMA),
        other=staff_auth(settings, TANABE), body=designated_activity(code),
        changed_body=designated_activity(f"{code}-2"),
    )
    assert first.status_code == 201 and first.json()["id"] == f"{SHIRAHAMA}-{code}"


async def test_change_designated_activity(client: httpx.AsyncClient, settings: Settings) -> None:
    activity_id = await published_activity(client, settings, SHIRAHAMA)
    first = await assert_key_scoped(
        client, "PATCH", f"/v1/activities/{activity_id}", owner=staff_auth(settings, SHIRAHAMA),
        other=staff_auth(settings, TANABE), body={"season": "5月"}, changed_body={"season": "6月"},
    )
    assert first.json()["season"] == "5月"


async def test_retire_designated_activity(client: httpx.AsyncClient, settings: Settings) -> None:
    activity_id, another_id = [await published_activity(client, settings, SHIRAHAMA) for _ in range(2)]
    first = await assert_key_scoped(
        client, "POST", f"/v1/activities/{activity_id}/retire", owner=staff_auth(settings, SHIRAHAMA),
        other=staff_auth(settings, TANABE), changed_path=f"/v1/activities/{another_id}/retire",
    )
    assert first.json()["status"] == "retired"


# --- Erasure forgets stored answers --------------------------------------------------------------


async def test_erasure_forgets_the_persons_keys_and_admin_answers_holding_their_contact(
    client: httpx.AsyncClient, settings: Settings, pool: asyncpg.Pool
) -> None:
    resident_id, bystander = await create_resident(client, settings), await create_resident(client, settings)
    me, admin = resident_auth(settings, resident_id), admin_auth(settings)
    phone = "090-8765-4321"
    mine = await client.post(f"/v1/residents/{resident_id}/consents", json={"purpose": "newsletter"},
                             headers={**me, "Idempotency-Key": str(uuid.uuid4())})
    by_admin = await client.patch(f"/v1/residents/{resident_id}", json={"phone": phone},
                                  headers={**admin, "Idempotency-Key": str(uuid.uuid4())})
    theirs = await client.patch(f"/v1/residents/{bystander}", json={"phone": "090-1212-3434"},
                                headers={**admin, "Idempotency-Key": str(uuid.uuid4())})
    assert (mine.status_code, by_admin.status_code, theirs.status_code) == (200, 200, 200)
    stored = "SELECT count(*) FROM idempotency_keys WHERE starts_with(scope, $1) OR body->>'id' = $2"
    assert await pool.fetchval(stored, f"{resident_id} ", resident_id) == 2
    assert await pool.fetchval("SELECT count(*) FROM idempotency_keys WHERE body::text LIKE $1", f"%{phone}%") == 1

    erasure_key = str(uuid.uuid4())
    erased = await client.delete(f"/v1/residents/{resident_id}", headers={**me, "Idempotency-Key": erasure_key})
    assert erased.status_code == 204

    # Only the erasure's own answer is left (an empty 204); nothing stored holds the contact.
    left = await pool.fetch(
        "SELECT scope, status_code, body FROM idempotency_keys WHERE starts_with(scope, $1) OR body->>'id' = $2",
        f"{resident_id} ", resident_id,
    )
    assert [(row["scope"], row["status_code"], row["body"]) for row in left] == [
        (f"{resident_id} resident DELETE /v1/residents/{{resident_id}}", 204, "null")
    ]
    assert await pool.fetchval("SELECT count(*) FROM idempotency_keys WHERE body::text LIKE $1", f"%{phone}%") == 0
    # The bystander's answer stored for the same admin stays.
    assert await pool.fetchval("SELECT count(*) FROM idempotency_keys WHERE body->>'id' = $1", bystander) == 1
    again = await client.delete(f"/v1/residents/{resident_id}", headers={**me, "Idempotency-Key": erasure_key})
    assert again.status_code == 204 and again.headers.get("Idempotent-Replayed") == "true"
    assert_problem(await client.get(f"/v1/residents/{resident_id}", headers=me), 404, "resident-not-found")
