"""The partner gateway's writes under an Idempotency-Key: a repeat answers the first response, only
to the admin who sent it; another admin reusing the key gets their own answer; a changed request
under the same key is a 422. An issued key's secret is shown once: its replay answers the key
without it, and the stored answer never holds it."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.integration import test_partner_gateway
from tests.integration.test_partner_gateway import Gateway, assert_problem, new_number
from tests.support import assert_key_scoped, bearer

pytestmark = pytest.mark.stack

#: The gateway of the module's tests (module-scoped: one running gateway for this module).
gw = test_partner_gateway.gw

COVERED = {
    "POST /v1/partners",
    "POST /v1/partners/{code}/api-keys",
    "DELETE /v1/partners/{code}/api-keys/{key_id}",
}


def admin(gw: Gateway) -> dict[str, str]:
    return bearer(gw.settings, "admin", f"admin-{uuid.uuid4().hex[:8]}")


async def issue(gw: Gateway, partner: str, label: str) -> dict[str, str]:
    response = await gw.client.post(f"/v1/partners/{partner}/api-keys", json={"label": label}, headers=admin(gw))
    assert response.status_code == 201, response.text
    created: dict[str, str] = response.json()
    return created


async def key_rows(gw: Gateway, label: str) -> int:
    count: int = await gw.pool.fetchval("SELECT count(*) FROM partner_api_keys WHERE label = $1", label)
    return count


async def test_an_issued_key_is_replayed_to_its_admin_only_and_never_with_its_secret(gw: Gateway) -> None:
    owner, other = admin(gw), admin(gw)
    label = f"booking-{uuid.uuid4().hex[:6]}"
    path = "/v1/partners/sadokisen/api-keys"
    key = f"scope-{uuid.uuid4()}"

    async def send(headers: dict[str, str], body: object, to: str = path) -> httpx.Response:
        return await gw.client.post(to, json=body, headers={**headers, "Idempotency-Key": key})

    first = await send(owner, {"label": label})
    assert first.status_code == 201 and first.headers["cache-control"] == "no-store"
    created = first.json()
    secret = created.pop("api_key")
    assert secret.startswith(created["prefix"]) and created["partner"] == "sadokisen"

    again = await send(owner, {"label": label})
    assert again.status_code == 201 and again.headers.get("Idempotent-Replayed") == "true"
    assert again.json() == created  # the same key's metadata, without the secret
    assert secret not in again.text and "api_key" not in again.json()
    stored = await gw.pool.fetch("SELECT scope, body::text AS body FROM idempotency_keys WHERE key = $1", key)
    assert len(stored) == 1 and secret not in stored[0]["body"]
    assert stored[0]["scope"].endswith(" POST /v1/partners/{code}/api-keys")
    assert await key_rows(gw, label) == 1  # one key issued for the two requests

    # The secret of the first answer works, the replay did not change it.
    unknown = await gw.client.get(f"/v1/certificates/{new_number('152048')}", headers={"X-Api-Key": secret})
    assert_problem(unknown, 404, "certificate-not-found")

    # Another admin with the same key: a fresh key of their own, never the owner's answer.
    theirs = await send(other, {"label": label})
    assert theirs.status_code == 201 and theirs.headers.get("Idempotent-Replayed") is None
    assert theirs.json()["id"] != created["id"] and theirs.json()["api_key"] != secret
    assert await key_rows(gw, label) == 2
    # A partner with the same key is refused before anything is looked up.
    assert_problem(await send(gw.key("jal"), {"label": label}), 403, "forbidden")

    # The owner's key with another request: refused, nothing issued.
    assert_problem(await send(owner, {"label": f"{label}-2"}), 422, "idempotency-key-reused")
    assert_problem(await send(owner, {"label": label}, "/v1/partners/jreast/api-keys"), 422,
                   "idempotency-key-reused")
    assert await key_rows(gw, label) == 2
    assert await gw.pool.fetchval("SELECT count(*) FROM partner_api_keys WHERE label = $1", f"{label}-2") == 0


async def test_a_revocation_key_belongs_to_the_revoking_admin(gw: Gateway) -> None:
    revoked = await issue(gw, "jreast", "to revoke")
    kept = await issue(gw, "jreast", "to keep")
    first = await assert_key_scoped(
        gw.client, "DELETE", f"/v1/partners/jreast/api-keys/{revoked['id']}", owner=admin(gw), other=admin(gw),
        changed_path=f"/v1/partners/jreast/api-keys/{kept['id']}",
    )
    assert first.status_code == 204
    states = {
        str(row["id"]): row["revoked_at"] is not None
        for row in await gw.pool.fetch(
            "SELECT id, revoked_at FROM partner_api_keys WHERE id = ANY($1::uuid[])",
            [uuid.UUID(revoked["id"]), uuid.UUID(kept["id"])],
        )
    }
    assert states == {revoked["id"]: True, kept["id"]: False}  # the refused changed request revoked nothing
    number = new_number("152048")
    assert_problem(await gw.client.get(f"/v1/certificates/{number}", headers={"X-Api-Key": revoked["api_key"]}),
                   401, "invalid-api-key")
    assert_problem(await gw.client.get(f"/v1/certificates/{number}", headers={"X-Api-Key": kept["api_key"]}),
                   404, "certificate-not-found")


async def test_a_revocation_is_authorised_before_any_replay(gw: Gateway) -> None:
    """The key is of this partner before the Idempotency-Key is looked at: another partner's path
    under the same key is a 404, not a replay or a 422."""
    owner = admin(gw)
    target = await issue(gw, "jreast", "authorised first")
    headers = {**owner, "Idempotency-Key": f"scope-{uuid.uuid4()}"}
    assert (await gw.client.delete(f"/v1/partners/jreast/api-keys/{target['id']}", headers=headers)).status_code == 204
    assert_problem(await gw.client.delete(f"/v1/partners/ana/api-keys/{target['id']}", headers=headers), 404,
                   "api-key-not-found")
    assert_problem(await gw.client.delete(f"/v1/partners/jreast/api-keys/{uuid.uuid4()}", headers=headers), 404,
                   "api-key-not-found")


def new_partner(code: str) -> dict[str, object]:
    return {"code": code, "name": f"{code} ferry", "kind": "ferry", "member_number_format": "^[0-9]{8}$",
            "feed": "http"}


async def test_a_registration_is_replayed_to_its_admin_only_and_never_with_its_api_key(gw: Gateway) -> None:
    owner, other = admin(gw), admin(gw)
    code = f"kf{uuid.uuid4().hex[:8]}"
    key = f"scope-{uuid.uuid4()}"

    async def send(headers: dict[str, str], body: object) -> httpx.Response:
        return await gw.client.post("/v1/partners", json=body, headers={**headers, "Idempotency-Key": key})

    first = await send(owner, new_partner(code))
    assert first.status_code == 201, first.text
    assert first.headers["cache-control"] == "no-store"
    created = first.json()
    secret = created.pop("api_key")
    again = await send(owner, new_partner(code))
    assert again.status_code == 201 and again.headers.get("Idempotent-Replayed") == "true"
    assert again.json() == created and secret not in again.text
    stored = await gw.pool.fetch("SELECT body::text AS body FROM idempotency_keys WHERE key = $1", key)
    assert len(stored) == 1 and secret not in stored[0]["body"]
    # Another admin with the same key runs its own request: the partner exists (409), no replay.
    theirs = await send(other, new_partner(code))
    assert theirs.headers.get("Idempotent-Replayed") is None
    assert_problem(theirs, 409, "partner-exists")
    # A partner's credential is refused before anything is looked up.
    assert_problem(await send(gw.key("jal"), new_partner(code)), 403, "forbidden")
    # The owner's key with another request: refused, nothing registered.
    other_code = f"kf{uuid.uuid4().hex[:8]}"
    assert_problem(await send(owner, new_partner(other_code)), 422, "idempotency-key-reused")
    assert await gw.pool.fetchval("SELECT count(*) FROM partners WHERE code = ANY($1::text[])", [code, other_code]) == 1
    assert await gw.pool.fetchval("SELECT count(*) FROM partner_api_keys WHERE partner = $1", code) == 1
