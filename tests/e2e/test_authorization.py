"""Who may call what (issue 15): one matrix entry per route of every service, checked in-process.

``MATRIX`` names, for every route of every app (found by walking the apps' routes, as
``tests/unit/test_http_dependencies.py`` does), the actors that may call it; every other actor is
refused. A route without an entry fails ``test_every_route_has_a_matrix_entry``.

The actors: the resident who owns the world's objects and another resident; 白浜町's (304018) staff
as reviewer, manager and auditor, and a manager of another municipality (千代田区); prefecture
readers of 和歌山県 (白浜町's prefecture) and of 東京都; the ministry; partner JAL (whose grant and
certificate these are) and ANA; the payment provider; an admin. The token attacks: no token, an
expired one, one for other services only, one signed with another key, an unsigned (``alg: none``)
one, and, in production mode, a development (HS256) token.

Every service runs in-process once for the module (consumers and relays included) on a database
and topic prefix of its own, over a small world built through the APIs: a resident registered with
白浜町, an approved application and its certificate, the JAL grant that followed, the certificate on
JAL's verification, a hometown-tax donation with its receipt, a notification, a JAL API key. Path
parameters name these real objects. Then, in this order:

1. every refused (route, actor) and every attack: 401/403, or 404 where existence must not show
   (another partner's grant or certificate), never a 2xx, and every table of the service's database
   and its outbox is unchanged (``tests/e2e/test_fuzz.py``'s fingerprint);
2. every allowed (route, actor): neither 401 nor 403 (nor a 5xx); writes that end things
   (refund, revoke, withdraw, erase) go last so the others still find their objects.
"""

from __future__ import annotations

import contextlib
import random
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
import pytest_asyncio
from fastapi import FastAPI

from shared.contracts.topics import SERVICES
from shared.kit.auth import Role, TokenVerifier, audience, mint_token
from shared.kit.clock import JAPAN
from shared.kit.settings import Settings
from shared.stack.backends import Backends
from tests.conftest import make_settings
from tests.e2e.test_fuzz import build_app, changed_tables, fingerprint_sees_a_change, fingerprint_sql
from tests.support import bearer, caught_up, eventually, service_client
from tests.unit.test_auth import ISSUER, Issuer
from tests.unit.test_http_dependencies import api_routes

pytestmark = [pytest.mark.stack, pytest.mark.timeout(240)]

SHIRAHAMA = "304018"  # 和歌山県白浜町
OTHER_TOWN = "131016"  # 東京都千代田区
WAKAYAMA = "300004"
TOKYO = "130001"
JAL_PROGRAM = f"jal-dual-residence-miles@{SHIRAHAMA}"
PASSWORD = "a-long-enough-passphrase-42"


def japan_today() -> date:
    """The services date trips and payments by the Japanese calendar."""
    return datetime.now(JAPAN).date()

def _identity_exists() -> bool:
    try:
        import services.identity.main  # noqa: F401
    except ImportError:
        return False
    return True


#: Every app: the platform's services and, once it exists, the identity provider.
APPS: tuple[str, ...] = (*SERVICES, "identity") if _identity_exists() else tuple(SERVICES)


# --- The matrix ------------------------------------------------------------------------------------

ACTORS = (
    "resident", "other_resident", "reviewer", "manager", "auditor", "other_staff", "prefecture",
    "other_prefecture", "ministry", "partner", "other_partner", "payment_provider", "admin",
)
ATTACKS = ("no_token", "expired", "wrong_audience", "wrong_key", "alg_none")

ADMIN = frozenset({"admin"})
OWNER = frozenset({"resident", "admin"})
STAFF = frozenset({"reviewer", "manager", "auditor", "admin"})  # every staff read: auditors too
DECIDE = frozenset({"reviewer", "manager", "admin"})  # approve and reject
MANAGE = frozenset({"manager", "admin"})  # revoke, renew, rules, money
FIGURES = STAFF | {"prefecture", "ministry"}  # non-personal figures of the municipality
EVERYONE = frozenset(ACTORS)
#: Answered without a token (health, readiness, metrics, the API documentation): attacks do not apply.
PUBLIC = frozenset({*ACTORS, "public"})
OPERATIONS = {f"GET {path}": PUBLIC for path in ("/healthz", "/readyz", "/metrics", "/docs", "/redoc")}


def _service(name: str, routes: dict[str, frozenset[str]]) -> dict[str, frozenset[str]]:
    return {f"{name} {route}": allowed for route, allowed in {**OPERATIONS, **routes}.items()}


MATRIX: dict[str, frozenset[str]] = {
    **_service("registration", {
        "POST /v1/residents": frozenset({"resident", "other_resident"}),  # one's own account
        "GET /v1/residents/{resident_id}": OWNER,
        "PATCH /v1/residents/{resident_id}": OWNER,
        "DELETE /v1/residents/{resident_id}": OWNER,
        "POST /v1/residents/{resident_id}/registrations": OWNER,
        "GET /v1/residents/{resident_id}/consents": OWNER,
        "POST /v1/residents/{resident_id}/consents": OWNER,
        "DELETE /v1/residents/{resident_id}/consents/{purpose}": OWNER,
        "GET /v1/registrations": STAFF,
        "GET /v1/registrations/export.csv": STAFF,
        "GET /v1/registrations/{registration_id}": STAFF | {"resident"},
        "POST /v1/registrations/{registration_id}/approve": DECIDE,
        "POST /v1/registrations/{registration_id}/reject": DECIDE,
        "POST /v1/registrations/{registration_id}/renew": OWNER,
        "DELETE /v1/registrations/{registration_id}": OWNER,
        "POST /v1/admin/premium-expiry": ADMIN,
    }),
    **_service("certification", {
        "POST /v1/applications": frozenset({"resident", "other_resident"}),  # one's own application
        "GET /v1/applications": STAFF,
        "GET /v1/applications/{application_id}": STAFF | {"resident"},
        "POST /v1/applications/{application_id}/approve": DECIDE,
        "POST /v1/applications/{application_id}/reject": DECIDE,
        "GET /v1/certificates/{number}": STAFF | {"resident"},
        "POST /v1/certificates/{number}/renew": MANAGE,
        "POST /v1/certificates/{number}/revoke": MANAGE,
        # staff of any municipality may ask: they see only their own municipality's part
        "GET /v1/residents/{resident_id}/applications": STAFF | {"resident", "other_staff"},
        "GET /v1/residents/{resident_id}/certificates": STAFF | {"resident", "other_staff"},
        # the published rules and plans: anyone signed in
        "GET /v1/municipalities": EVERYONE,
        "GET /v1/municipalities/{code}/rules": EVERYONE,
        "PUT /v1/municipalities/{code}/rules": MANAGE,
        "POST /v1/municipalities/{code}/plan": ADMIN,
        "GET /v1/municipalities/{code}/certificates": STAFF,
        "GET /v1/municipalities/{code}/certificates.csv": STAFF,
        "GET /v1/municipalities/{code}/audit": STAFF,
    }),
    **_service("subsidy", {
        "POST /v1/programs": ADMIN,
        "GET /v1/programs/{program_id}": FIGURES,
        "GET /v1/programs/{program_id}/ledger": STAFF,
        "GET /v1/programs/{program_id}/grants": STAFF,
        "POST /v1/programs/{program_id}/budget": MANAGE,
        "GET /v1/municipalities/{code}/programs": FIGURES,
        "GET /v1/residents/{resident_id}/grants": STAFF | {"resident", "other_staff"},
        "POST /v1/redemptions": frozenset({"partner"}),
        "GET /v1/municipalities/{code}/redemptions": STAFF,
        "GET /v1/municipalities/{code}/redemptions.csv": STAFF,
    }),
    **_service("donation", {
        "POST /v1/donations": frozenset({"payment_provider", "admin"}),
        "GET /v1/donations/{donation_id}": STAFF | {"resident"},
        "POST /v1/donations/{donation_id}/refund": frozenset({"payment_provider", "admin"}),
        "POST /v1/donations/{donation_id}/one-stop": DECIDE,
        "POST /v1/donations/{donation_id}/one-stop/verify": DECIDE,
        "POST /v1/donors": ADMIN,
        "GET /v1/donors/{donor_id}": OWNER,
        "GET /v1/donors/{donor_id}/summary": OWNER,
        "GET /v1/residents/{resident_id}/donor": OWNER,
        "GET /v1/receipts/{number}.pdf": STAFF | {"resident"},
        "GET /v1/receipts/{number}": STAFF | {"resident"},
        "POST /v1/receipts/{number}/reissue": DECIDE | {"resident"},
        "GET /v1/municipalities/{code}/donations": STAFF,
        "GET /v1/municipalities/{code}/donations.csv": STAFF,
        "GET /v1/municipalities/{code}/funds": FIGURES,
        "GET /v1/municipalities/{code}/funds/ledger": STAFF,
    }),
    **_service("notification", {
        "GET /v1/residents/{resident_id}/notifications": OWNER,
        "GET /v1/residents/{resident_id}/notifications/unread-count": OWNER,
        "POST /v1/residents/{resident_id}/notifications/{notification_id}/read": frozenset({"resident"}),
        "GET /v1/residents/{resident_id}/emails": OWNER,
    }),
    **({} if "identity" not in APPS else _service("identity", {
        # the OpenID Connect protocol: discovery and keys are public, the token and revocation
        # endpoints authenticate the client or the token in their form, never by a bearer token
        "GET /.well-known/openid-configuration": PUBLIC,
        "GET /jwks.json": PUBLIC,
        "POST /oauth/token": PUBLIC,
        "POST /oauth/revoke": PUBLIC,
        "POST /v1/accounts/residents": PUBLIC,  # self sign-up
        "POST /v1/accounts": ADMIN,
        "GET /v1/accounts/me": EVERYONE,
        "POST /v1/accounts/me/totp": EVERYONE,
        "POST /v1/accounts/me/totp/confirm": EVERYONE,
        "POST /v1/accounts/{account_id}/totp/reset": ADMIN,
        "POST /v1/clients": ADMIN,
        "POST /v1/signing-keys/rotate": ADMIN,
    })),
    **_service("partner_gateway", {
        "GET /v1/certificates/{number}": frozenset({"partner"}),
        "GET /v1/partners": ADMIN,
        "POST /v1/partners": ADMIN,
        "GET /v1/feed": frozenset({"partner", "other_partner"}),  # each its own feed: the credential's partner
        "POST /v1/partners/{code}/api-keys": ADMIN,
        "DELETE /v1/partners/{code}/api-keys/{key_id}": ADMIN,
        "GET /v1/deliveries": STAFF,
        "GET /v1/deliveries.csv": STAFF,
    }),
}

#: Refusals that must look like "no such thing" (404), never a 403 that confirms it exists.
HIDDEN = {
    ("partner_gateway GET /v1/certificates/{number}", "other_partner"),
    ("subsidy POST /v1/redemptions", "other_partner"),
}

#: Allowed writes that end what later checks use: sent last, in this order.
DESTRUCTIVE = (
    "donation POST /v1/donations/{donation_id}/refund",
    "certification POST /v1/certificates/{number}/revoke",
    "partner_gateway DELETE /v1/partners/{code}/api-keys/{key_id}",
    "registration DELETE /v1/registrations/{registration_id}",
    "registration DELETE /v1/residents/{resident_id}",
)


def _build(service: str, settings: Settings) -> FastAPI:
    if service == "identity":
        from services.identity.main import create_app as identity_app

        return identity_app(settings)
    return build_app(service, settings)


def _apps(settings: Settings) -> dict[str, FastAPI]:
    return {service: _build(service, settings) for service in APPS}


def routes_of(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every route of the app."""
    return sorted({(method, route.path) for route in api_routes(app.routes) for method in route.methods or ()})


def test_every_route_has_a_matrix_entry() -> None:
    # Building an app connects to nothing: a DSN that is never dialled will do.
    settings = Settings(pg_dsn="postgresql://nobody@127.0.0.1:1/none", redis_url="redis://127.0.0.1:1/0",
                        env="development")
    found = {
        f"{service} {method} {path}" for service, app in _apps(settings).items() for method, path in routes_of(app)
    }
    assert sorted(found - set(MATRIX)) == [], "routes without an entry in MATRIX"
    assert sorted(set(MATRIX) - found) == [], "MATRIX entries of routes that no longer exist"
    assert all(allowed <= PUBLIC for allowed in MATRIX.values())


# --- The world -------------------------------------------------------------------------------------


@dataclass
class World:
    settings: Settings
    apps: dict[str, FastAPI]
    clients: dict[str, httpx.AsyncClient]
    resident: str
    other_resident: str
    member_number: str
    ids: dict[str, str] = field(default_factory=dict)
    rules: dict[str, Any] = field(default_factory=dict)

    def headers(self, actor: str, service: str) -> dict[str, str]:
        s = self.settings

        def bearer_of(role: str, subject: str, **claims: str) -> dict[str, str]:
            return bearer(s, role, subject, services=APPS, **claims)

        match actor:
            case "resident":
                return bearer_of("resident", self.resident)
            case "other_resident":
                return bearer_of("resident", self.other_resident)
            case "reviewer" | "manager" | "auditor":
                return bearer_of("staff", f"staff-{actor}", municipality=SHIRAHAMA, staff_role=actor)
            case "other_staff":
                return bearer_of("staff", "staff-chiyoda", municipality=OTHER_TOWN, staff_role="manager")
            case "prefecture":
                return bearer_of("prefecture", "reader-wakayama", prefecture=WAKAYAMA)
            case "other_prefecture":
                return bearer_of("prefecture", "reader-tokyo", prefecture=TOKYO)
            case "partner":
                return bearer_of("partner", "client-jal", partner="jal")
            case "other_partner":
                return bearer_of("partner", "client-ana", partner="ana")
            case "public":
                return {}
            case "ministry" | "payment_provider" | "admin":
                return bearer_of(actor, f"{actor}-1")
        return {"Authorization": f"Bearer {self.attack(actor, service)}"} if actor != "no_token" else {}

    def attack(self, kind: str, service: str) -> str:
        """A token that is wrong in one way only."""
        s = self.settings
        everywhere = [audience(app) for app in APPS]
        if kind == "expired":  # 10 minutes past its expiry (the leeway is 30 s)
            return mint_token(s, subject="admin-1", role=Role.ADMIN, ttl=timedelta(minutes=-10), audiences=everywhere)
        if kind == "wrong_audience":  # good for every other service
            return mint_token(s, subject="admin-1", role=Role.ADMIN,
                              audiences=[audience(other) for other in APPS if other != service])
        if kind == "wrong_key":
            other = s.model_copy(update={"jwt_secret": "another-key-" + "x" * 40})
            return mint_token(other, subject="admin-1", role=Role.ADMIN, audiences=everywhere)
        if kind == "alg_none":
            valid = mint_token(s, subject="admin-1", role=Role.ADMIN, audiences=everywhere)
            claims = jwt.decode(valid, options={"verify_signature": False})
            return jwt.encode(claims, "", algorithm="none")
        raise AssertionError(kind)

    def params(self, service: str) -> dict[str, str]:
        common = {"resident_id": self.resident, "code": SHIRAHAMA}
        match service:
            case "registration":
                return {**common, "registration_id": self.ids["registration"], "purpose": "email"}
            case "certification":
                return {**common, "application_id": self.ids["application"], "number": self.ids["certificate"]}
            case "subsidy":
                return {**common, "program_id": JAL_PROGRAM}
            case "donation":
                return {**common, "donation_id": self.ids["donation"], "donor_id": self.ids["donor"],
                        "number": self.ids["receipt"]}
            case "notification":
                return {**common, "notification_id": self.ids["notification"]}
            case "partner_gateway":
                return {"number": self.ids["certificate"], "code": "jal", "key_id": self.ids["api_key"]}
            case "identity":
                return {"account_id": self.resident}
        raise AssertionError(service)

    def request(self, key: str) -> dict[str, Any]:
        """httpx arguments of the route's request in this world (a valid body where it takes one)."""
        service, method, path = key.split(" ")
        today = japan_today().isoformat()
        tag = uuid.uuid4().hex[:8]
        bodies: dict[str, Any] = {
            "registration POST /v1/residents": self.account_body(),
            "registration PATCH /v1/residents/{resident_id}": {"phone": "090-0000-1111"},
            "registration POST /v1/residents/{resident_id}/registrations": {"municipality_code": SHIRAHAMA},
            "registration POST /v1/residents/{resident_id}/consents": {"purpose": "email"},
            "registration POST /v1/registrations/{registration_id}/reject": {"reason_code": "documents_incomplete"},
            "registration POST /v1/registrations/{registration_id}/renew": {
                "activities": [{"name": "浜の清掃", "date": today}]},
            "certification POST /v1/applications": self.application_body(),
            "certification POST /v1/applications/{application_id}/reject": {"reason_code": "documents_incomplete"},
            "certification POST /v1/certificates/{number}/revoke": {"reason_code": "not_residing"},
            "certification PUT /v1/municipalities/{code}/rules": self.rules,
            "subsidy POST /v1/programs": {
                "program_id": f"authz-{uuid.uuid4().hex[:8]}@{SHIRAHAMA}", "title": "authz", "partner": "jal",
                "municipality_code": SHIRAHAMA, "mechanism": "mileage_grant",
                "parameters": {"required_round_trips": 4, "max_one_ways": 4, "miles_per_one_way": 7500,
                               "window_days": 122},
                "active_from": today, "active_until": (japan_today() + timedelta(days=100)).isoformat(),
            },
            "subsidy POST /v1/programs/{program_id}/budget": {"unit": "miles", "amount": 1000, "reason": "authz"},
            "subsidy POST /v1/redemptions": self.trip_body(),
            "donation POST /v1/donations": self.donation_body("authz-allowed"),
            "donation POST /v1/donations/{donation_id}/refund": {"reason": "payment reversed"},
            "donation POST /v1/donations/{donation_id}/one-stop": {"received_on": today},
            "donation POST /v1/donors": {"type": "individual", "name": "山田 花子", "address": "東京都千代田区1-1",
                                         "resident_id": self.resident},
            "partner_gateway POST /v1/partners/{code}/api-keys": {"label": "authz"},
            "partner_gateway POST /v1/partners": {
                "code": f"authz{tag}", "name": "authz ferry", "kind": "ferry", "member_number_format": "^[0-9]{8}$",
                "feed": "http"},
            "identity POST /v1/accounts/residents": {"email": f"authz-{tag}@example.jp", "password": PASSWORD},
            "identity POST /v1/accounts": {
                "email": f"authz-staff-{tag}@example.jp", "password": PASSWORD, "role": "staff",
                "municipality": SHIRAHAMA, "staff_role": "auditor"},
            "identity POST /v1/accounts/me/totp/confirm": {"code": "000000"},
            "identity POST /v1/clients": {"client_id": f"authz-{tag}", "role": "partner", "partner": "jal"},
        }
        queries: dict[str, dict[str, str]] = {
            "registration GET /v1/registrations": {"municipality": SHIRAHAMA},
            "registration GET /v1/registrations/export.csv": {"municipality": SHIRAHAMA},
            "certification GET /v1/applications": {"municipality": SHIRAHAMA},
            "donation GET /v1/municipalities/{code}/donations.csv": {"year": str(japan_today().year)},
            "partner_gateway GET /v1/deliveries": {"municipality": SHIRAHAMA},
            "partner_gateway GET /v1/deliveries.csv": {"municipality": SHIRAHAMA},
        }
        url = path.format(**self.params(service)) if "{" in path else path
        arguments: dict[str, Any] = {"method": method, "url": url, "params": queries.get(key)}
        if key in bodies:
            arguments["json"] = bodies[key]
        return arguments

    def account_body(self) -> dict[str, Any]:
        return {
            "name": "山田 花子", "name_kana": "ヤマダ ハナコ", "email": f"hanako.{self.resident[:8]}@example.jp",
            "date_of_birth": "1985-06-15", "legal_address_code": OTHER_TOWN,
            "consents": [{"purpose": "email"}, {"purpose": "share_certificate", "partner": "jal"}],
        }

    def application_body(self) -> dict[str, Any]:
        return {
            "municipality_code": SHIRAHAMA, "planned_stay_days": 90, "housing_basis": "rented",
            "address_there": "和歌山県西牟婁郡白浜町 (賃貸住宅)", "primary_residence_code": OTHER_TOWN,
            "partners": [{"partner": "jal", "member_number": self.member_number}],
        }

    def trip_body(self, grant_id: str | None = None) -> dict[str, Any]:
        return {
            "grant_id": grant_id or self.ids["grant"], "certificate_number": self.ids["certificate"],
            "trip_id": f"JL-{uuid.uuid4().hex[:8]}", "trip_kind": "one_way", "travelled_on": japan_today().isoformat(),
        }

    def donation_body(self, reference: str, **donor: str) -> dict[str, Any]:
        return {
            "payment_reference": reference, "municipality_code": SHIRAHAMA, "kind": "hometown_tax",
            "amount": 10_000, "payment_date": japan_today().isoformat(),
            "donor": {"type": "individual", "name": "山田 花子", "address": "東京都千代田区1-1",
                      "resident_id": self.resident, **donor},
        }


async def _json(response: httpx.Response, *ok: int) -> Any:
    assert response.status_code in ok, f"{response.request.method} {response.request.url}: {response.text}"
    return response.json()


async def _until(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Poll ``check`` (→ a value or None) until it gives a value."""
    found: list[Any] = []

    async def done() -> bool:
        value = await check()
        if value is not None:
            found.append(value)
        return bool(found)

    try:
        await eventually(done, timeout=timeout, interval=0.1)
    except AssertionError:
        raise AssertionError(f"{what} did not happen within {timeout} s") from None
    return found[0]


async def build_world(world: World) -> None:
    c, h = world.clients, world.headers
    r = "resident"
    await _json(await c["registration"].post("/v1/residents", json=world.account_body(), headers=h(r, "")), 201)
    registration = await _json(await c["registration"].post(
        f"/v1/residents/{world.resident}/registrations", json={"municipality_code": SHIRAHAMA, "tier": "basic"},
        headers=h(r, "")), 201)
    world.ids["registration"] = registration["id"]

    async def applied() -> Any:  # the registration's events are on their way to certification
        answer = await c["certification"].post("/v1/applications", json=world.application_body(), headers=h(r, ""))
        return answer.json() if answer.status_code == 201 else None

    world.ids["application"] = (await _until("the application", applied))["application_id"]
    certificate = await _json(await c["certification"].post(
        f"/v1/applications/{world.ids['application']}/approve", headers=h("manager", "")), 201)
    world.ids["certificate"] = certificate["certificate_number"]
    world.rules = {
        name: value for name, value in (await _json(
            await c["certification"].get(f"/v1/municipalities/{SHIRAHAMA}/rules", headers=h(r, "")), 200)).items()
        if name in ("min_stay_days", "housing_bases", "validity_days", "required_registration")
    }

    async def granted() -> Any:
        page = await _json(await c["subsidy"].get(f"/v1/residents/{world.resident}/grants", headers=h(r, "")), 200)
        return next((g["grant_id"] for g in page["items"] if g["program_id"] == JAL_PROGRAM), None)

    world.ids["grant"] = await _until("the JAL grant", granted)

    async def verifiable() -> Any:
        answer = await c["partner_gateway"].get(f"/v1/certificates/{world.ids['certificate']}",
                                                headers=h("partner", ""))
        return True if answer.status_code == 200 else None

    await _until("JAL's verification of the certificate", verifiable)
    donation = await _json(await c["donation"].post(
        "/v1/donations", json=world.donation_body("authz-world"), headers=h("payment_provider", "")), 201)
    world.ids |= {"donation": donation["id"], "donor": donation["donor_id"], "receipt": donation["receipt_number"]}

    async def notified() -> Any:
        page = await _json(await c["notification"].get(
            f"/v1/residents/{world.resident}/notifications", headers=h(r, "")), 200)
        return page["items"][0]["id"] if page["items"] else None

    world.ids["notification"] = await _until("a notification", notified)
    key = await _json(await c["partner_gateway"].post(
        "/v1/partners/jal/api-keys", json={"label": "authz"}, headers=h("admin", "")), 201)
    world.ids["api_key"] = key["id"]
    for _ in range(2):  # one service's events reach another: until every queue is empty twice over
        for app in world.apps.values():
            await caught_up(app)


@pytest.fixture(scope="module")
def authz_settings(backends: Backends, run_id: str) -> Settings:
    # Under the session's prefix, so the session's clean-up drops these databases too.
    return make_settings(backends, f"{run_id}az")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(authz_settings: Settings) -> AsyncIterator[World]:
    apps = _apps(authz_settings)
    async with contextlib.AsyncExitStack() as stack:
        clients = {service: await stack.enter_async_context(service_client(app)) for service, app in apps.items()}
        made = World(
            authz_settings, apps, clients, resident=str(uuid.uuid4()), other_resident=str(uuid.uuid4()),
            member_number=f"{random.randrange(10**8, 10**9)}",
        )
        await build_world(made)
        yield made


# --- Refused -------------------------------------------------------------------------------------


@dataclass
class Fingerprint:
    pool: asyncpg.Pool
    query: str
    state: str = ""

    @classmethod
    async def of(cls, app: FastAPI) -> Fingerprint:
        pool: asyncpg.Pool = app.state.runtime.pool
        taken = cls(pool, await fingerprint_sql(pool))
        taken.state = await pool.fetchval(taken.query)
        await fingerprint_sees_a_change(pool, taken.query, taken.state)  # so "unchanged" means something
        return taken

    async def changed(self) -> list[str]:
        now: str = await self.pool.fetchval(self.query)
        changed, self.state = changed_tables(self.state, now), now
        return changed


def _keys(service: str) -> list[str]:
    return sorted(key for key in MATRIX if key.startswith(f"{service} "))


async def _check_refused(world: World, key: str, actor: str, fingerprint: Fingerprint, problems: list[str]) -> None:
    service = key.split(" ")[0]
    response = await world.clients[service].request(**world.request(key), headers=world.headers(actor, service))
    status = response.status_code
    if actor in ATTACKS:
        expected: tuple[int, ...] = (401,)
    elif (key, actor) in HIDDEN:
        expected = (404,)
    else:
        expected = (403, 404)
    if status not in expected:
        problems.append(f"{key} as {actor}: {status}, expected {expected}: {response.text[:160]}")
    if changed := await fingerprint.changed():
        problems.append(f"{key} as {actor}: refused with {status} yet changed {changed}")


@pytest.mark.parametrize("service", APPS)
async def test_token_attacks_are_401_and_change_nothing(world: World, service: str) -> None:
    fingerprint = await Fingerprint.of(world.apps[service])
    problems: list[str] = []
    checked = 0
    for key in _keys(service):
        if "public" in MATRIX[key]:
            continue
        for attack in ATTACKS:
            await _check_refused(world, key, attack, fingerprint, problems)
            checked += 1
    assert checked and not problems, "\n".join(problems)


@pytest.mark.parametrize("service", APPS)
async def test_refused_actors_are_refused_and_change_nothing(world: World, service: str) -> None:
    fingerprint = await Fingerprint.of(world.apps[service])
    problems: list[str] = []
    for key in _keys(service):
        for actor in ACTORS:
            if actor not in MATRIX[key]:
                await _check_refused(world, key, actor, fingerprint, problems)
    assert not problems, "\n".join(problems)


# --- What a refusal must not reveal, what a confirmation must not rewrite ----------------------------


async def test_another_partners_grant_is_answered_as_one_that_does_not_exist(world: World) -> None:
    subsidy = world.clients["subsidy"]
    ana = world.headers("other_partner", "subsidy")
    fingerprint = await Fingerprint.of(world.apps["subsidy"])
    theirs = await subsidy.post("/v1/redemptions", json=world.trip_body(), headers=ana)
    none = await subsidy.post("/v1/redemptions", json=world.trip_body(f"no-such-{uuid.uuid4().hex}"), headers=ana)
    assert (theirs.status_code, theirs.json()["code"]) == (none.status_code, none.json()["code"]) == (
        404, "unknown-grant"), theirs.text
    assert await fingerprint.changed() == []
    gateway = world.clients["partner_gateway"]
    ana_gateway = world.headers("other_partner", "partner_gateway")
    jal_certificate = await gateway.get(f"/v1/certificates/{world.ids['certificate']}", headers=ana_gateway)
    unknown = await gateway.get(f"/v1/certificates/{world.ids['certificate'][:-6]}999999", headers=ana_gateway)
    assert (jal_certificate.status_code, jal_certificate.json()["code"]) == (
        unknown.status_code, unknown.json()["code"]), (jal_certificate.text, unknown.text)


async def test_a_payment_confirmation_never_rewrites_the_donor_on_file(world: World) -> None:
    donation, resident = world.clients["donation"], world.headers("resident", "donation")
    before = await _json(await donation.get(f"/v1/residents/{world.resident}/donor", headers=resident), 200)
    body = world.donation_body(f"authz-{uuid.uuid4().hex[:8]}", name="偽名 太郎", address="大阪府大阪市北区1-1",
                               email="someone.else@example.jp")
    confirmed = await _json(await donation.post(
        "/v1/donations", json=body, headers=world.headers("payment_provider", "donation")), 201)
    assert confirmed["donor_id"] == before["id"]  # the confirmation names the resident's donor…
    after = await _json(await donation.get(f"/v1/residents/{world.resident}/donor", headers=resident), 200)
    assert after == before  # …and leaves their record as it was
    # the donor's record is changed by an admin (or the donor): that still works
    moved = "和歌山県西牟婁郡白浜町1-1"
    admin_update = await donation.post("/v1/donors", headers=world.headers("admin", "donation"), json={
        "type": "individual", "name": "山田 花子", "address": moved, "resident_id": world.resident})
    assert admin_update.status_code == 200 and admin_update.json()["address"] == moved


# --- Allowed -------------------------------------------------------------------------------------


async def test_allowed_actors_are_let_through(world: World) -> None:
    order = [key for key in sorted(MATRIX) if key not in DESTRUCTIVE] + list(DESTRUCTIVE)
    problems: list[str] = []
    calls = 0
    for key in order:
        service = key.split(" ")[0]
        # the admin last: an owner's own request is the one that matters where the first one ends a thing
        for actor in sorted(MATRIX[key] - {"public"}, key=lambda a: a == "admin"):
            response = await world.clients[service].request(**world.request(key), headers=world.headers(actor, service))
            calls += 1
            if response.status_code in (401, 403) or response.status_code >= 500:
                problems.append(f"{key} as {actor}: {response.status_code} {response.text[:200]}")
    assert calls > len(MATRIX) and not problems, "\n".join(problems)


# --- Production mode -----------------------------------------------------------------------------


async def test_in_production_only_the_issuers_tokens_are_accepted(authz_settings: Settings) -> None:
    """A service outside development refuses the development key's tokens on every route, and
    accepts its issuer's (ES256 from the JWKS). Refusal comes before any database work, so the app
    answers without starting its runtime."""
    settings = authz_settings.model_copy(update={"env": "production", "oidc_issuer": ISSUER, "redis_url": None})
    app = build_app("certification", settings)
    issuer = Issuer()
    app.state.verifier = TokenVerifier(settings, "certification", http=httpx.AsyncClient(transport=issuer.transport()))
    development = {"Authorization": f"Bearer {mint_token(settings, subject='admin-1', role=Role.ADMIN)}"}
    problems = []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service") as client:
        for method, path in routes_of(app):
            if "public" in MATRIX[f"certification {method} {path}"]:
                continue
            url = path.format(application_id="a-1", number="NCH-304018-2025-000001", resident_id="r-1",
                              code=SHIRAHAMA)
            answer = await client.request(method, url, headers=development)
            if answer.status_code != 401:
                problems.append(f"{method} {path}: {answer.status_code} {answer.text[:120]}")
        # the issuer's own token passes authentication: the invalid query is what is refused
        token = issuer.token(role="admin", sub="admin-1", municipality=None, staff_role=None)
        accepted = await client.get("/v1/municipalities?limit=0", headers={"Authorization": f"Bearer {token}"})
    assert not problems, "\n".join(problems)
    assert accepted.status_code == 422, accepted.text
