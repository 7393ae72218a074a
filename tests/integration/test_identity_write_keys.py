"""The identity service's account writes under an Idempotency-Key: a repeat answers the first
response, only to the caller who sent it; another caller reusing the key gets their own answer; a
changed request under the same key is a 422. Secrets (a client's, a TOTP secret) are shown once:
their replay answers without them, and the stored answer never holds them.

The OAuth protocol endpoints (``POST /oauth/token``, ``POST /oauth/revoke``) are not resource
writes and do not run through the use-case runner: they are not listed here."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import httpx
import pytest

from tests.integration import test_identity
from tests.integration.test_identity import ADMIN, Harness, bearer_of, code_at
from tests.support import assert_key_scoped

pytestmark = pytest.mark.stack

#: The identity service of the module's tests (module-scoped: one running service for this module).
h = test_identity.h

COVERED = {
    "POST /v1/accounts/residents",
    "POST /v1/accounts",
    "POST /v1/accounts/me/totp",
    "POST /v1/accounts/me/totp/confirm",
    "POST /v1/accounts/{account_id}/totp/reset",
    "POST /v1/clients",
    "POST /v1/signing-keys/rotate",
}


@pytest.fixture(scope="module")
async def admins(h: Harness) -> tuple[dict[str, str], dict[str, str]]:
    """Two admins: the development one and another the first creates."""
    email = f"admin-{uuid.uuid4().hex[:8]}@example.jp"
    made = await h.client.post("/v1/accounts", headers=await h.admin(), json={
        "email": email, "password": "another admin password", "role": "admin",
    })
    assert made.status_code == 201, made.text
    return await h.admin(), bearer_of(await h.sign_in(email, "another admin password"))


def staff_body(**changes: Any) -> dict[str, Any]:
    return {"email": f"staff-{uuid.uuid4().hex[:8]}@example.jp", "password": "a long staff password",
            "role": "staff", "municipality": "304018", "staff_role": "reviewer", **changes}


async def stored_bodies(h: Harness, key: str) -> list[str]:
    rows = await h.pool.fetch("SELECT body::text AS body FROM idempotency_keys WHERE key = $1", key)
    return [row["body"] for row in rows]


async def test_a_sign_up_key_belongs_to_the_email_signing_up(h: Harness) -> None:
    key = f"scope-{uuid.uuid4()}"
    email = f"signup-{uuid.uuid4().hex[:8]}@example.jp"
    body = {"email": email, "password": "a long resident password"}

    async def send(payload: dict[str, str]) -> httpx.Response:
        return await h.client.post("/v1/accounts/residents", json=payload, headers={"Idempotency-Key": key})

    first = await send(body)
    assert first.status_code == 201, first.text
    again = await send(body)
    assert again.status_code == 201 and again.headers.get("Idempotent-Replayed") == "true"
    assert again.json() == first.json()
    assert await h.pool.fetchval("SELECT count(*) FROM accounts WHERE email = $1", email) == 1
    # Another person with the same key: their own account, never the first one's answer.
    theirs = await send({"email": f"other-{email}", "password": "a long resident password"})
    assert theirs.status_code == 201 and theirs.headers.get("Idempotent-Replayed") is None
    assert theirs.json()["account_id"] != first.json()["account_id"]
    # The same person, the same key, another request: refused, nothing changed.
    changed = await send({**body, "password": "another long password"})
    assert changed.status_code == 422 and changed.json()["code"] == "idempotency-key-reused"
    assert all("password" not in stored for stored in await stored_bodies(h, key))


async def test_an_account_creation_key_belongs_to_its_admin(
    h: Harness, admins: tuple[dict[str, str], dict[str, str]]
) -> None:
    owner, other = admins
    body = staff_body()
    first = await assert_key_scoped(
        h.client, "POST", "/v1/accounts", owner=owner, other=other, body=body,
        changed_body=staff_body(staff_role="auditor"),
    )
    assert first.status_code == 201 and first.json()["email"] == body["email"]


async def test_a_totp_enrolment_key_is_the_callers_and_never_replays_the_secret(h: Harness) -> None:
    key = f"scope-{uuid.uuid4()}"
    _, owner_email, owner_password = await h.resident()
    _, other_email, other_password = await h.resident()
    owner = bearer_of(await h.sign_in(owner_email, owner_password))
    other = bearer_of(await h.sign_in(other_email, other_password))

    async def send(headers: dict[str, str], path: str = "/v1/accounts/me/totp") -> httpx.Response:
        return await h.client.post(path, headers={**headers, "Idempotency-Key": key})

    first = await send(owner)
    assert first.status_code == 201 and first.headers["cache-control"] == "no-store"
    shown = first.json()
    secret = shown.pop("secret")
    shown.pop("otpauth_uri")
    again = await send(owner)
    assert again.status_code == 201 and again.headers.get("Idempotent-Replayed") == "true"
    assert again.json() == shown and secret not in again.text
    assert all(secret not in stored for stored in await stored_bodies(h, key))
    # The replay did not draw another secret: the first one confirms.
    confirmed = await h.client.post("/v1/accounts/me/totp/confirm", headers=owner,
                                    json={"code": code_at(secret, h.clock.now())})
    assert confirmed.status_code == 200, confirmed.text

    theirs = await send(other)
    assert theirs.status_code == 201 and theirs.headers.get("Idempotent-Replayed") is None
    assert theirs.json()["account_id"] != shown["account_id"] and theirs.json()["secret"] != secret
    changed = await send(owner, "/v1/accounts/me/totp?again=1")
    assert changed.status_code == 422 and changed.json()["code"] == "idempotency-key-reused"


async def test_a_totp_confirmation_key_is_the_callers(h: Harness) -> None:
    _, owner_email, owner_password = await h.resident()
    _, other_email, other_password = await h.resident()
    owner = bearer_of(await h.sign_in(owner_email, owner_password))
    other = bearer_of(await h.sign_in(other_email, other_password))
    secret = (await h.client.post("/v1/accounts/me/totp", headers=owner)).json()["secret"]
    now = h.clock.now()
    first = await assert_key_scoped(
        h.client, "POST", "/v1/accounts/me/totp/confirm", owner=owner, other=other,
        body={"code": code_at(secret, now)}, changed_body={"code": code_at(secret, now + timedelta(seconds=30))},
    )
    assert first.json()["totp_enabled"] is True


async def test_a_totp_reset_key_belongs_to_its_admin(
    h: Harness, admins: tuple[dict[str, str], dict[str, str]]
) -> None:
    owner, other = admins
    reset, kept = await h.staff(), await h.staff()
    first = await assert_key_scoped(
        h.client, "POST", f"/v1/accounts/{reset[0]}/totp/reset", owner=owner, other=other,
        changed_path=f"/v1/accounts/{kept[0]}/totp/reset",
    )
    assert first.json()["reset_by"] == "dev-admin"


async def test_a_client_key_belongs_to_its_admin_and_never_replays_the_secret(
    h: Harness, admins: tuple[dict[str, str], dict[str, str]]
) -> None:
    owner, other = admins
    key = f"scope-{uuid.uuid4()}"
    client_id = f"partner-jal-{uuid.uuid4().hex[:6]}"
    body = {"client_id": client_id, "role": "partner", "partner": "jal"}

    async def send(headers: dict[str, str], payload: dict[str, str]) -> httpx.Response:
        return await h.client.post("/v1/clients", json=payload, headers={**headers, "Idempotency-Key": key})

    first = await send(owner, body)
    assert first.status_code == 201 and first.headers["cache-control"] == "no-store"
    created = first.json()
    secret = created.pop("client_secret")
    again = await send(owner, body)
    assert again.status_code == 201 and again.headers.get("Idempotent-Replayed") == "true"
    assert again.json() == created and secret not in again.text
    assert all(secret not in stored for stored in await stored_bodies(h, key))
    signed_in = await h.token({"grant_type": "client_credentials"}, auth=(client_id, secret))
    assert signed_in.status_code == 200, signed_in.text  # the replay did not change the secret

    theirs = await send(other, body)  # another admin: their own attempt (the client exists: 409)
    assert theirs.headers.get("Idempotent-Replayed") is None
    assert theirs.status_code == 409 and theirs.json()["code"] == "client-exists"
    changed = await send(owner, {**body, "partner": "ana"})
    assert changed.status_code == 422 and changed.json()["code"] == "idempotency-key-reused"


async def test_a_rotation_key_belongs_to_its_admin(h: Harness, admins: tuple[dict[str, str], dict[str, str]]) -> None:
    owner, other = admins
    first = await assert_key_scoped(
        h.client, "POST", "/v1/signing-keys/rotate", owner=owner, other=other,
        changed_path="/v1/signing-keys/rotate?again=1",
    )
    kids = [key["kid"] for key in (await h.client.get("/jwks.json")).json()["keys"]]
    assert first.json()["kid"] in kids and first.json()["retired_kid"] in kids
    # The other admin's rotation was its own: a newer key signs now.
    signed = (await h.sign_in(**ADMIN))["access_token"]
    assert kids[0] != first.json()["kid"]
    assert (await h.verify(signed))["role"] == "admin"
