"""The identity provider over the real database and Redis: discovery and JWKS, tokens verified
with PyJWT against the served keys, sign-in and its refusals, the lockout, TOTP for staff (and
enrolment), client credentials, refresh-token rotation and reuse, sign-out, key rotation.

The module shares one running service (development accounts seeded) whose clock tests may move
forward (``h.clock.offset``, put back after each test). A TOTP code is good once per account, so
tests that sign staff in make their own staff accounts or use a later time step.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import httpx
import jwt
import pyotp
import pytest
from fastapi import FastAPI
from pydantic import SecretStr
from redis.asyncio import Redis

from services.identity.development import DEMO_TOTP_SECRET
from services.identity.domain import BAD_CREDENTIALS, LOCKED, TOTP_REQUIRED, TOTP_WRONG
from services.identity.main import create_app
from shared.contracts.topics import SERVICES
from shared.kit.clock import Clock, utc_now
from shared.kit.settings import Settings
from tests.support import service_client

pytestmark = pytest.mark.stack

ISSUER = "http://identity.test"
SHIRAHAMA = "304018"
ADMIN = {"username": "admin@nichiiki.example", "password": "nichiiki-dev-admin-pass"}
REVIEWER = {"username": "reviewer@shirahama.example", "password": "nichiiki-dev-reviewer-pass"}
#: Every platform service's audience is in a full token (the identity service's own too).
SERVICE_AUDIENCES = {f"nichiiki-{s.replace('_', '-')}" for s in SERVICES} | {"nichiiki-identity"}


class MovableClock:
    """The real time plus an offset tests move forward."""

    def __init__(self) -> None:
        self.offset = timedelta(0)
        self.clock = Clock(lambda: utc_now() + self.offset)

    def now(self) -> datetime:
        return self.clock.now()


@dataclass
class Harness:
    settings: Settings
    client: httpx.AsyncClient
    app: FastAPI
    clock: MovableClock
    redis: Redis

    @property
    def pool(self) -> asyncpg.Pool:
        pool: asyncpg.Pool = self.app.state.runtime.pool
        return pool

    async def token(self, form: dict[str, str], **kwargs: Any) -> httpx.Response:
        return await self.client.post("/oauth/token", data=form, **kwargs)

    async def sign_in(self, username: str, password: str, **extra: str) -> dict[str, Any]:
        response = await self.token({"grant_type": "password", "username": username, "password": password, **extra})
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    async def admin(self) -> dict[str, str]:
        return bearer_of(await self.sign_in(**ADMIN))

    async def resident(self, password: str = "a long resident password") -> tuple[str, str, str]:
        """A new resident: (account id, e-mail, password)."""
        email = f"resident-{uuid.uuid4().hex[:10]}@example.jp"
        response = await self.client.post("/v1/accounts/residents", json={"email": email, "password": password})
        assert response.status_code == 201, response.text
        return response.json()["account_id"], email, password

    async def staff(self, municipality: str = SHIRAHAMA, staff_role: str = "reviewer") -> tuple[str, str, str]:
        """A new staff account made by the admin (TOTP not enrolled yet): (account id, e-mail, password)."""
        email, password = f"staff-{uuid.uuid4().hex[:10]}@example.jp", "a long staff password"
        response = await self.client.post("/v1/accounts", headers=await self.admin(), json={
            "email": email, "password": password, "role": "staff", "municipality": municipality,
            "staff_role": staff_role,
        })
        assert response.status_code == 201, response.text
        return response.json()["account_id"], email, password

    async def verify(self, token: str, audience: str = "nichiiki-registration") -> dict[str, Any]:
        """The claims of a token, verified as a service would: the served JWKS, issuer, audience, lifetime."""
        keys = jwt.PyJWKSet.from_dict((await self.client.get("/jwks.json")).json())
        kid = jwt.get_unverified_header(token)["kid"]
        key = next(k for k in keys.keys if k.key_id == kid)
        claims: dict[str, Any] = jwt.decode(
            token, key.key, algorithms=["ES256"], audience=audience, issuer=ISSUER,
            leeway=self.clock.offset,  # a token issued at the service's moved clock is valid from then on
            options={"require": ["exp", "nbf", "iat", "iss", "sub", "aud", "jti", "role"]},
        )
        return claims


def bearer_of(answer: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {answer['access_token']}"}


def code_at(secret: str, at: datetime) -> str:
    return pyotp.TOTP(secret).at(at)


#: The module signs in far more often than people do: its shared service's sign-in limits are out
#: of the way (``test_sign_in_is_rate_limited_per_account`` checks them on a service of its own).
UNLIMITED_SIGN_IN = {
    "rate_limit_sign_in_account_per_min": 60_000, "rate_limit_sign_in_account_burst": 10_000,
    "rate_limit_sign_in_ip_per_min": 60_000, "rate_limit_sign_in_ip_burst": 10_000,
    "rate_limit_public_per_min": 60_000, "rate_limit_public_burst": 10_000,
}


def issued_by(settings: Settings) -> Settings:
    """The session's settings (development: the seed runs) with this module's issuer."""
    assert settings.env == "development"
    return settings.model_copy(update={"oidc_issuer": ISSUER, **UNLIMITED_SIGN_IN})


@pytest.fixture(scope="module")
async def h(settings: Settings) -> AsyncIterator[Harness]:
    clock = MovableClock()
    app = create_app(issued_by(settings), clock=clock.clock)
    assert settings.redis_url is not None
    redis = Redis.from_url(settings.redis_url, decode_responses=True)
    async with service_client(app) as client:
        yield Harness(settings, client, app, clock, redis)
    await redis.aclose()


@pytest.fixture(autouse=True)
def _clock_back(h: Harness) -> Iterator[None]:
    yield
    h.clock.offset = timedelta(0)


def assert_oauth_error(response: httpx.Response, status: int, error: str, description: str | None = None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error, body
    if description is not None:
        assert body["error_description"] == description
    assert response.headers["cache-control"] == "no-store"


# --- discovery and keys --------------------------------------------------------------------------


async def test_discovery_names_the_issuer_endpoints_and_es256(h: Harness) -> None:
    response = await h.client.get("/.well-known/openid-configuration")
    assert response.status_code == 200
    document = response.json()
    assert document["issuer"] == ISSUER
    assert document["jwks_uri"] == f"{ISSUER}/jwks.json"
    assert document["token_endpoint"] == f"{ISSUER}/oauth/token"
    assert document["revocation_endpoint"] == f"{ISSUER}/oauth/revoke"
    assert set(document["grant_types_supported"]) == {"password", "client_credentials", "refresh_token"}
    assert document["id_token_signing_alg_values_supported"] == ["ES256"]
    keys = (await h.client.get("/jwks.json")).json()["keys"]
    assert keys
    for key in keys:
        assert (key["kty"], key["crv"], key["use"], key["alg"]) == ("EC", "P-256", "sig", "ES256")
        assert key["kid"] and "d" not in key  # public halves only


# --- residents -----------------------------------------------------------------------------------


async def test_a_resident_signs_up_and_signs_in_with_a_verifiable_token(h: Harness) -> None:
    account_id, email, password = await h.resident()
    assert account_id.startswith("res-") and len(account_id) == 36
    response = await h.token({"grant_type": "password", "username": email.upper(), "password": password})
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    answer = response.json()
    assert (answer["token_type"], answer["expires_in"]) == ("Bearer", 900)
    assert answer["refresh_token"]
    claims = await h.verify(answer["access_token"])
    assert set(claims) == {"iss", "sub", "aud", "exp", "nbf", "iat", "jti", "sid", "role", "amr"}
    assert (claims["sub"], claims["role"], claims["amr"]) == (account_id, "resident", ["pwd"])
    assert set(claims["aud"]) == SERVICE_AUDIENCES
    assert claims["exp"] - claims["iat"] == 900 and claims["nbf"] == claims["iat"]
    assert abs(claims["iat"] - utc_now().timestamp()) < 60
    assert jwt.get_unverified_header(answer["access_token"])["alg"] == "ES256"
    # Another sign-in is another session and another token id.
    again = await h.verify((await h.sign_in(email, password))["access_token"])
    assert again["sid"] != claims["sid"] and again["jti"] != claims["jti"]
    # The token works on the identity service's own API.
    me = await h.client.get("/v1/accounts/me", headers=bearer_of(answer))
    assert me.status_code == 200 and me.json()["account_id"] == account_id and me.json()["email"] == email
    h.clock.offset = timedelta(minutes=15)  # the access token has expired
    expired = await h.client.get("/v1/accounts/me", headers=bearer_of(answer))
    assert expired.status_code == 401 and "expired" in expired.json()["detail"]


async def test_sign_up_refuses_weak_passwords_and_taken_emails(h: Harness) -> None:
    email = f"weak-{uuid.uuid4().hex[:8]}@example.jp"
    for password, code in (("short pass", "weak-password"), (email, "weak-password")):
        response = await h.client.post("/v1/accounts/residents", json={"email": email, "password": password})
        assert response.status_code == 422 and response.json()["code"] == code, response.text
    response = await h.client.post("/v1/accounts/residents", json={"email": "nobody", "password": "x" * 12})
    assert response.json()["code"] == "invalid-email"
    _, taken, _ = await h.resident()
    response = await h.client.post("/v1/accounts/residents",
                                   json={"email": taken.upper(), "password": "another long password"})
    assert response.status_code == 409 and response.json()["code"] == "email-taken"


async def test_wrong_passwords_and_unknown_names_get_the_same_refusal(h: Harness) -> None:
    _, email, _ = await h.resident()
    wrong = await h.token({"grant_type": "password", "username": email, "password": "not the password"})
    unknown = await h.token({"grant_type": "password", "username": "nobody@example.jp", "password": "whatever!!"})
    malformed = await h.token({"grant_type": "password", "username": "not an email", "password": "whatever!!"})
    for response in (wrong, unknown, malformed):
        assert_oauth_error(response, 400, "invalid_grant", BAD_CREDENTIALS)
    assert_oauth_error(await h.token({"grant_type": "password", "username": email}), 400, "invalid_request")
    assert_oauth_error(await h.token({"grant_type": "implicit"}), 400, "unsupported_grant_type")
    assert_oauth_error(await h.token({}), 400, "invalid_request")
    # JSON is not how OAuth parameters come: an OAuth error, not the kit's 415.
    as_json = await h.client.post("/oauth/token", json={"grant_type": "password"})
    assert_oauth_error(as_json, 400, "invalid_request")
    # Parameters are sent once.
    twice = await h.client.post("/oauth/token", content=b"grant_type=password&grant_type=password",
                                headers={"content-type": "application/x-www-form-urlencoded"})
    assert_oauth_error(twice, 400, "invalid_request")
    # Only the OAuth endpoints take form bodies.
    form_elsewhere = await h.client.post("/v1/accounts/residents", data={"email": "x@example.jp"})
    assert form_elsewhere.status_code == 415


# --- lockout -------------------------------------------------------------------------------------


async def test_five_failures_within_fifteen_minutes_lock_the_account_for_fifteen_minutes(h: Harness) -> None:
    account_id, email, password = await h.resident()
    wrong = {"grant_type": "password", "username": email, "password": "not the password"}
    for _ in range(4):
        assert_oauth_error(await h.token(wrong), 400, "invalid_grant", BAD_CREDENTIALS)
    assert await h.pool.fetchval("SELECT count(*) FROM sign_in_failures WHERE account_id = $1", account_id) == 4
    assert_oauth_error(await h.token(wrong), 400, "invalid_grant", LOCKED)
    # Locked: the right password is refused too, without a word about the password.
    right = {"grant_type": "password", "username": email, "password": password}
    assert_oauth_error(await h.token(right), 400, "invalid_grant", LOCKED)
    locked_until = await h.pool.fetchval("SELECT locked_until FROM accounts WHERE account_id = $1", account_id)
    assert timedelta(minutes=14) < locked_until - utc_now() <= timedelta(minutes=15)
    h.clock.offset = timedelta(minutes=14, seconds=50)
    assert_oauth_error(await h.token(right), 400, "invalid_grant", LOCKED)
    h.clock.offset = timedelta(minutes=15, seconds=1)
    response = await h.token(right)
    assert response.status_code == 200, response.text
    assert await h.pool.fetchval("SELECT locked_until FROM accounts WHERE account_id = $1", account_id) is None


async def test_a_success_resets_the_count_and_old_failures_fall_out_of_the_window(h: Harness) -> None:
    account_id, email, password = await h.resident()
    wrong = {"grant_type": "password", "username": email, "password": "not the password"}
    for _ in range(4):
        assert_oauth_error(await h.token(wrong), 400, "invalid_grant", BAD_CREDENTIALS)
    await h.sign_in(email, password)
    assert await h.pool.fetchval("SELECT count(*) FROM sign_in_failures WHERE account_id = $1", account_id) == 0
    for _ in range(4):
        assert_oauth_error(await h.token(wrong), 400, "invalid_grant", BAD_CREDENTIALS)
    h.clock.offset = timedelta(minutes=16)  # the four are older than the window now
    assert_oauth_error(await h.token(wrong), 400, "invalid_grant", BAD_CREDENTIALS)
    await h.sign_in(email, password)


# --- staff and TOTP ------------------------------------------------------------------------------


async def test_seeded_staff_must_pass_totp(h: Harness) -> None:
    assert_oauth_error(await h.token({"grant_type": "password", **REVIEWER}), 400, "invalid_grant", TOTP_REQUIRED)
    assert_oauth_error(await h.token({"grant_type": "password", **REVIEWER, "totp": "000000"}), 400,
                       "invalid_grant", TOTP_WRONG)
    # A later step than any earlier test of this module may have used.
    h.clock.offset = timedelta(seconds=90)
    code = code_at(DEMO_TOTP_SECRET, h.clock.now())
    answer = await h.sign_in(**REVIEWER, totp=code)
    claims = await h.verify(answer["access_token"], audience="nichiiki-certification")
    assert set(claims) == {"iss", "sub", "aud", "exp", "nbf", "iat", "jti", "sid", "role", "amr", "municipality",
                           "staff_role"}
    assert (claims["sub"], claims["role"], claims["municipality"], claims["staff_role"], claims["amr"]) == (
        "dev-shirahama-reviewer", "staff", SHIRAHAMA, "reviewer", ["pwd", "otp"]
    )
    # A code is good once.
    assert_oauth_error(await h.token({"grant_type": "password", **REVIEWER, "totp": code}), 400, "invalid_grant",
                       TOTP_WRONG)


async def test_staff_enrol_totp_with_an_enrolment_only_sign_in(h: Harness) -> None:
    account_id, email, password = await h.staff(staff_role="manager")
    first = await h.sign_in(email, password)
    assert first["totp_enrolment_required"] is True and "refresh_token" not in first
    # Good for the identity service alone: no other service's audience.
    assert jwt.decode(first["access_token"], options={"verify_signature": False})["aud"] == ["nichiiki-identity"]
    with pytest.raises(jwt.InvalidAudienceError):
        await h.verify(first["access_token"], audience="nichiiki-certification")

    started = await h.client.post("/v1/accounts/me/totp", headers=bearer_of(first))
    assert started.status_code == 201, started.text
    secret = started.json()["secret"]
    assert started.json()["otpauth_uri"].startswith(f"otpauth://totp/Nichiiki:{email}?secret={secret}")
    now = h.clock.now()
    wrong = await h.client.post("/v1/accounts/me/totp/confirm", headers=bearer_of(first), json={"code": "000000"})
    assert wrong.status_code == 422 and wrong.json()["code"] == "invalid-totp-code"
    confirmed = await h.client.post("/v1/accounts/me/totp/confirm", headers=bearer_of(first),
                                    json={"code": code_at(secret, now)})
    assert confirmed.status_code == 200 and confirmed.json()["totp_enabled"] is True
    again = await h.client.post("/v1/accounts/me/totp", headers=bearer_of(first))
    assert again.status_code == 409 and again.json()["code"] == "totp-already-enabled"

    assert_oauth_error(await h.token({"grant_type": "password", "username": email, "password": password}), 400,
                       "invalid_grant", TOTP_REQUIRED)
    full = await h.sign_in(email, password, totp=code_at(secret, now + timedelta(seconds=30)))
    claims = await h.verify(full["access_token"], audience="nichiiki-certification")
    assert (claims["sub"], claims["staff_role"], claims["amr"]) == (account_id, "manager", ["pwd", "otp"])
    assert full["refresh_token"]

    # A lost phone: the admin resets TOTP, and the next sign-in is for enrolment only again.
    reset = await h.client.post(f"/v1/accounts/{account_id}/totp/reset", headers=await h.admin())
    assert reset.status_code == 200 and reset.json()["totp_enabled"] is False
    assert (await h.sign_in(email, password))["totp_enrolment_required"] is True
    missing = await h.client.post("/v1/accounts/usr-nobody/totp/reset", headers=await h.admin())
    assert missing.status_code == 404
    assert (await h.client.post(f"/v1/accounts/{account_id}/totp/reset", headers=bearer_of(full))).status_code == 403


async def test_a_wrong_totp_code_counts_towards_the_lock(h: Harness) -> None:
    _, email, password = await h.staff()
    enrol = bearer_of(await h.sign_in(email, password))
    secret = (await h.client.post("/v1/accounts/me/totp", headers=enrol)).json()["secret"]
    now = h.clock.now()
    assert (await h.client.post("/v1/accounts/me/totp/confirm", headers=enrol,
                                json={"code": code_at(secret, now)})).status_code == 200
    wrong = {"grant_type": "password", "username": email, "password": password, "totp": "000000"}
    for _ in range(4):
        assert_oauth_error(await h.token(wrong), 400, "invalid_grant", TOTP_WRONG)
    assert_oauth_error(await h.token(wrong), 400, "invalid_grant", LOCKED)
    right = {"grant_type": "password", "username": email, "password": password,
             "totp": code_at(secret, now + timedelta(seconds=30))}
    assert_oauth_error(await h.token(right), 400, "invalid_grant", LOCKED)


async def test_a_resident_may_enrol_totp_and_then_needs_it(h: Harness) -> None:
    _, email, password = await h.resident()
    signed_in = bearer_of(await h.sign_in(email, password))
    secret = (await h.client.post("/v1/accounts/me/totp", headers=signed_in)).json()["secret"]
    now = h.clock.now()
    assert (await h.client.post("/v1/accounts/me/totp/confirm", headers=signed_in,
                                json={"code": code_at(secret, now)})).status_code == 200
    assert_oauth_error(await h.token({"grant_type": "password", "username": email, "password": password}), 400,
                       "invalid_grant", TOTP_REQUIRED)
    answer = await h.sign_in(email, password, totp=code_at(secret, now + timedelta(seconds=30)))
    assert (await h.verify(answer["access_token"]))["amr"] == ["pwd", "otp"]


async def test_seeded_readers_carry_their_claims(h: Harness) -> None:
    prefecture = await h.verify((await h.sign_in("reader@pref.wakayama.example", "nichiiki-dev-prefecture-pass"))
                                ["access_token"])
    assert (prefecture["role"], prefecture["prefecture"]) == ("prefecture", "300004")
    ministry = await h.verify((await h.sign_in("reader@mlit.example", "nichiiki-dev-ministry-pass"))["access_token"])
    assert ministry["role"] == "ministry" and "prefecture" not in ministry and "municipality" not in ministry
    admin = await h.verify((await h.sign_in(**ADMIN))["access_token"])
    assert (admin["sub"], admin["role"]) == ("dev-admin", "admin")


async def test_admin_api_is_for_admins(h: Harness) -> None:
    _, email, password = await h.resident()
    resident = bearer_of(await h.sign_in(email, password))
    body = {"email": f"x-{uuid.uuid4().hex[:6]}@example.jp", "password": "a long staff password", "role": "ministry"}
    assert (await h.client.post("/v1/accounts", headers=resident, json=body)).status_code == 403
    assert (await h.client.post("/v1/accounts", json=body)).status_code == 401
    bad = await h.client.post("/v1/accounts", headers=await h.admin(), json={**body, "role": "staff"})
    assert bad.status_code == 422 and bad.json()["code"] == "invalid-account"
    made = await h.client.post("/v1/accounts", headers=await h.admin(), json=body)
    assert made.status_code == 201 and made.json()["role"] == "ministry"


# --- client credentials --------------------------------------------------------------------------


async def test_partners_and_the_payment_provider_sign_in_with_client_credentials(h: Harness) -> None:
    basic = await h.token({"grant_type": "client_credentials"}, auth=("partner-jal", "nichiiki-dev-jal-secret"))
    assert basic.status_code == 200, basic.text
    assert "refresh_token" not in basic.json()
    claims = await h.verify(basic.json()["access_token"], audience="nichiiki-partner-gateway")
    assert set(claims) == {"iss", "sub", "aud", "exp", "nbf", "iat", "jti", "role", "partner"}
    assert (claims["sub"], claims["role"], claims["partner"]) == ("partner-jal", "partner", "jal")
    assert claims["exp"] - claims["iat"] == 900
    posted = await h.token({"grant_type": "client_credentials", "client_id": "payment-provider",
                            "client_secret": "nichiiki-dev-payment-secret"})
    provider = await h.verify(posted.json()["access_token"], audience="nichiiki-donation")
    assert (provider["sub"], provider["role"]) == ("payment-provider", "payment_provider")
    assert "partner" not in provider and "sid" not in provider

    wrong = await h.token({"grant_type": "client_credentials"}, auth=("partner-jal", "nichiiki-dev-ana-secret"))
    assert_oauth_error(wrong, 401, "invalid_client")
    assert wrong.headers["www-authenticate"].startswith("Basic")
    assert_oauth_error(await h.token({"grant_type": "client_credentials", "client_id": "nobody",
                                      "client_secret": "x"}), 401, "invalid_client")
    assert_oauth_error(await h.token({"grant_type": "client_credentials"}), 401, "invalid_client")

    # A client the admin registers signs in with the secret shown once.
    client_id = f"partner-ana-{uuid.uuid4().hex[:6]}"
    made = await h.client.post("/v1/clients", headers=await h.admin(),
                               json={"client_id": client_id, "role": "partner", "partner": "ana"})
    assert made.status_code == 201, made.text
    secret = made.json()["client_secret"]
    assert await h.pool.fetchval("SELECT secret_hash LIKE '$argon2id$%' FROM clients WHERE client_id = $1", client_id)
    fresh = await h.token({"grant_type": "client_credentials"}, auth=(client_id, secret))
    assert (await h.verify(fresh.json()["access_token"], audience="nichiiki-partner-gateway"))["partner"] == "ana"
    # Which partners exist is the gateway's (partners register there at run time); a malformed code is refused here.
    malformed = await h.client.post("/v1/clients", headers=await h.admin(),
                                    json={"client_id": "partner-x", "role": "partner", "partner": "Jet Star!"})
    assert malformed.status_code == 422 and malformed.json()["code"] == "invalid-client"


# --- refresh tokens and sign-out -----------------------------------------------------------------


async def revoked(h: Harness, sid: str) -> tuple[str | None, int]:
    key = f"nichiiki:revoked-session:{sid}"
    value = await h.redis.get(key)
    return None if value is None else str(value), int(await h.redis.ttl(key))


async def test_refresh_tokens_rotate_and_a_reused_one_revokes_the_session(h: Harness) -> None:
    _, email, password = await h.resident()
    first = await h.sign_in(email, password)
    sid = (await h.verify(first["access_token"]))["sid"]
    rotated = await h.token({"grant_type": "refresh_token", "refresh_token": first["refresh_token"]})
    assert rotated.status_code == 200, rotated.text
    second = rotated.json()
    assert second["refresh_token"] != first["refresh_token"]
    claims = await h.verify(second["access_token"])
    assert claims["sid"] == sid and claims["amr"] == ["pwd"]
    third = await h.token({"grant_type": "refresh_token", "refresh_token": second["refresh_token"]})
    assert third.status_code == 200

    # The first token again: someone holds a copy. The whole session ends, for both holders.
    reused = await h.token({"grant_type": "refresh_token", "refresh_token": first["refresh_token"]})
    assert_oauth_error(reused, 400, "invalid_grant")
    assert "revoked" in reused.json()["error_description"]
    latest = await h.token({"grant_type": "refresh_token", "refresh_token": third.json()["refresh_token"]})
    assert_oauth_error(latest, 400, "invalid_grant")
    value, ttl = await revoked(h, sid)
    assert value == "1" and 3500 < ttl <= 3600
    assert await h.pool.fetchval("SELECT revoked_reason FROM sessions WHERE session_id = $1", sid) == (
        "refresh_token_reused"
    )
    assert_oauth_error(await h.token({"grant_type": "refresh_token", "refresh_token": "nonsense"}), 400,
                       "invalid_grant")


async def test_sign_out_revokes_the_session_everywhere(h: Harness) -> None:
    _, email, password = await h.resident()
    answer = await h.sign_in(email, password)
    other = await h.sign_in(email, password)  # another device: stays signed in
    sid = (await h.verify(answer["access_token"]))["sid"]
    assert await revoked(h, sid) == (None, -2)

    response = await h.client.post("/oauth/revoke", data={"token": answer["refresh_token"]})
    assert response.status_code == 200, response.text
    value, ttl = await revoked(h, sid)
    assert value == "1" and 3500 < ttl <= 3600
    assert_oauth_error(await h.token({"grant_type": "refresh_token", "refresh_token": answer["refresh_token"]}),
                       400, "invalid_grant")
    assert (await h.client.get("/v1/accounts/me", headers=bearer_of(answer))).status_code == 401
    assert (await h.client.get("/v1/accounts/me", headers=bearer_of(other))).status_code == 200

    # Signing out with the access token works too; an unknown or repeated token is no error (RFC 7009).
    other_sid = (await h.verify(other["access_token"]))["sid"]
    assert (await h.client.post("/oauth/revoke", data={"token": other["access_token"]})).status_code == 200
    assert (await revoked(h, other_sid))[0] == "1"
    refused = await h.token({"grant_type": "refresh_token", "refresh_token": other["refresh_token"]})
    assert_oauth_error(refused, 400, "invalid_grant")
    assert (await h.client.post("/oauth/revoke", data={"token": other["access_token"]})).status_code == 200
    assert (await h.client.post("/oauth/revoke", data={"token": "unknown"})).status_code == 200
    assert_oauth_error(await h.client.post("/oauth/revoke", data={}), 400, "invalid_request")


# --- signing keys --------------------------------------------------------------------------------


async def test_a_rotated_key_stays_published_until_its_tokens_expired(h: Harness) -> None:
    _, email, password = await h.resident()
    before = (await h.sign_in(email, password))["access_token"]
    old_kid = jwt.get_unverified_header(before)["kid"]
    rotated = await h.client.post("/v1/signing-keys/rotate", headers=await h.admin())
    assert rotated.status_code == 201, rotated.text
    new_kid = rotated.json()["kid"]
    assert rotated.json()["retired_kid"] == old_kid and new_kid != old_kid
    kids = [key["kid"] for key in (await h.client.get("/jwks.json")).json()["keys"]]
    assert kids[0] == new_kid and old_kid in kids

    after = (await h.sign_in(email, password))["access_token"]
    assert jwt.get_unverified_header(after)["kid"] == new_kid
    assert (await h.verify(after))["sub"] == (await h.verify(before))["sub"]  # the old token still verifies

    # Once every token the old key signed has expired (an hour, plus skew), it is no longer published.
    h.clock.offset = timedelta(minutes=64)
    assert old_kid in [key["kid"] for key in (await h.client.get("/jwks.json")).json()["keys"]]
    h.clock.offset = timedelta(minutes=66)
    kids = [key["kid"] for key in (await h.client.get("/jwks.json")).json()["keys"]]
    assert old_kid not in kids and new_kid in kids
    assert (await h.client.post("/v1/signing-keys/rotate", headers=bearer_of(await h.sign_in(email, password)))
            ).status_code == 403


async def test_a_restart_keeps_the_keys_and_the_seed_is_idempotent(h: Harness, settings: Settings) -> None:
    keys_before = (await h.client.get("/jwks.json")).json()["keys"]
    accounts = await h.pool.fetchval("SELECT count(*) FROM accounts WHERE created_by = 'development-seed'")
    again = create_app(issued_by(settings), clock=h.clock.clock)
    async with service_client(again) as client:
        assert (await client.get("/jwks.json")).json()["keys"] == keys_before
        count = await again.state.runtime.pool.fetchval(
            "SELECT count(*) FROM accounts WHERE created_by = 'development-seed'"
        )
        assert count == accounts == 7


# --- rate limits ---------------------------------------------------------------------------------


async def test_sign_in_is_rate_limited_per_account(h: Harness, settings: Settings) -> None:
    """Past the account's sign-in burst, even the right password is answered 429 with Retry-After,
    before any password is checked; another account still signs in. Public sign-up is limited per IP."""
    limited = issued_by(settings).model_copy(update={
        "topic_prefix": f"{settings.topic_prefix}limits-{uuid.uuid4().hex[:6]}.",  # buckets of its own
        "rate_limit_sign_in_account_per_min": 1, "rate_limit_sign_in_account_burst": 3,
        "rate_limit_public_per_min": 1, "rate_limit_public_burst": 2,
    })
    account_id, email, password = await h.resident()
    async with service_client(create_app(limited, clock=h.clock.clock)) as client:
        wrong = {"grant_type": "password", "username": email, "password": "not the password"}
        for _ in range(3):
            assert_oauth_error(await client.post("/oauth/token", data=wrong), 400, "invalid_grant", BAD_CREDENTIALS)
        for form in (wrong, {**wrong, "username": email.upper(), "password": password}):
            refused = await client.post("/oauth/token", data=form)
            assert refused.status_code == 429, refused.text
            assert refused.json()["code"] == "rate-limited"
            assert 1 <= int(refused.headers["retry-after"]) <= 60
        # Refused before the password was checked: only the three failures count towards the lock.
        assert await h.pool.fetchval("SELECT count(*) FROM sign_in_failures WHERE account_id = $1", account_id) == 3
        other = await client.post("/oauth/token", data={"grant_type": "password", **ADMIN})
        assert other.status_code == 200, other.text

        signed_up = [
            (await client.post("/v1/accounts/residents", json={
                "email": f"limited-{uuid.uuid4().hex[:8]}@example.jp", "password": "a long resident password",
            })).status_code
            for _ in range(3)
        ]
        assert signed_up == [201, 201, 429]


# --- production bootstrap ------------------------------------------------------------------------

PRODUCTION_ISSUER = "http://identity.production.test"


class RecordingLog:
    """Stands in for the handlers' logger: every call as (level, event, fields)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        def record(event: str, *args: Any, **fields: Any) -> None:
            self.calls.append((level, event, fields))

        return record


async def test_production_bootstraps_its_first_admin_once(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.identity import handlers
    from services.identity.main import IdentityConfig
    from shared.kit.auth import Role, mint_token

    production = settings.model_copy(update={
        "env": "production", "oidc_issuer": PRODUCTION_ISSUER, "db_prefix": f"{settings.db_prefix}prod",
        "keyring_master_key": SecretStr("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"),  # production needs one
        **UNLIMITED_SIGN_IN,
    })
    email, password = "first.admin@pref.example.lg.jp", "a long bootstrap passphrase"
    recorder = RecordingLog()
    monkeypatch.setattr(handlers, "log", recorder)
    app = create_app(production, config=IdentityConfig(bootstrap_admin_email=email, bootstrap_admin_password=password))
    async with service_client(app) as client:
        pool: asyncpg.Pool = app.state.runtime.pool
        admins = await pool.fetch("SELECT account_id, email, created_by FROM accounts WHERE role = 'admin'")
        assert [(a["email"], a["created_by"]) for a in admins] == [(email, "bootstrap")]
        assert await pool.fetchval("SELECT count(*) FROM accounts") == 1  # no development seed here
        assert (await client.get("/.well-known/openid-configuration")).json()["issuer"] == PRODUCTION_ISSUER

        answer = await client.post("/oauth/token", data={"grant_type": "password", "username": email,
                                                         "password": password})
        assert answer.status_code == 200, answer.text
        claims = jwt.decode(answer.json()["access_token"], options={"verify_signature": False})
        assert (claims["iss"], claims["sub"], claims["role"]) == (PRODUCTION_ISSUER, admins[0]["account_id"], "admin")
        made = await client.post("/v1/accounts", headers=bearer_of(answer.json()), json={
            "email": "reader@mlit.example.go.jp", "password": "a long ministry password", "role": "ministry",
        })
        assert made.status_code == 201, made.text
        # Production: the development credentials and the development key are refused.
        seeded = await client.post("/oauth/token", data={"grant_type": "password", **ADMIN})
        assert_oauth_error(seeded, 400, "invalid_grant", BAD_CREDENTIALS)
        development = mint_token(production, subject="dev-admin", role=Role.ADMIN)
        refused = await client.get("/v1/accounts/me", headers={"Authorization": f"Bearer {development}"})
        assert refused.status_code == 401, refused.text

    created = [fields for _, event, fields in recorder.calls if event.startswith("bootstrap admin account created")]
    assert created == [{"account": admins[0]["account_id"], "email": email}]
    assert all(password not in repr(call) for call in recorder.calls)

    # A restart, even with other bootstrap variables: an admin exists, nobody else is made one.
    again = create_app(production, config=IdentityConfig(
        bootstrap_admin_email="second.admin@pref.example.lg.jp", bootstrap_admin_password="another long passphrase",
    ))
    async with service_client(again) as client:
        pool = again.state.runtime.pool
        assert await pool.fetchval("SELECT array_agg(email) FROM accounts WHERE role = 'admin'") == [email]
        signed_in = await client.post("/oauth/token", data={"grant_type": "password", "username": email,
                                                            "password": password})
        assert signed_in.status_code == 200, signed_in.text


async def test_a_half_configured_bootstrap_refuses_to_start(settings: Settings) -> None:
    from services.identity.main import IdentityConfig
    from shared.kit.auth import ConfigurationError

    production = settings.model_copy(update={
        "env": "production", "oidc_issuer": PRODUCTION_ISSUER, "db_prefix": f"{settings.db_prefix}half",
    })
    app = create_app(production, config=IdentityConfig(bootstrap_admin_email="admin@pref.example.lg.jp"))
    with pytest.raises(ConfigurationError, match="NICHIIKI_IDENTITY_BOOTSTRAP_ADMIN_PASSWORD"):
        async with service_client(app):
            pass
