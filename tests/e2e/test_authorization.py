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

from services.planning.handlers import seeded_corporation_id, seeded_plan_id
from shared.contracts.topics import FRONTS, SERVICES
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
# A front (the console) takes no bearer token and has no database: people reach it with a session
# cookie. Its pages have entries below all the same (who the console lets through), checked per
# role in-process by tests/unit/test_console_pages.py and in a browser by tests/e2e/test_console.py.
APPS = tuple(dict.fromkeys(app for app in APPS if app not in FRONTS))


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


#: The console's pages: who it lets through (everyone else: a sign-in redirect without a session, 403
#: with one). Staff pages are any staff member's (the services then show their own municipality's
#: part only, and refuse another's objects); the forms that decide, manage or move money are the
#: roles the services allow. "other_staff" is staff of another municipality: let into the pages, then
#: refused by the services (journey 2 of tests/e2e/test_console.py).
SIGNED_OUT = frozenset({*ACTORS, "public"})
STAFF_PAGES = STAFF - {"admin"} | {"other_staff"}
DECIDE_FORMS = DECIDE - {"admin"} | {"other_staff"}
MANAGE_FORMS = MANAGE - {"admin"} | {"other_staff"}
MY_PAGES = frozenset({"resident", "other_resident"})
CONSOLE_PAGES: dict[str, frozenset[str]] = {
    "GET /": SIGNED_OUT, "GET /signin": SIGNED_OUT, "POST /signin": SIGNED_OUT, "GET /signup": SIGNED_OUT,
    "POST /signup": SIGNED_OUT, "POST /signout": SIGNED_OUT, "GET /lang/{code}": SIGNED_OUT,
    "GET /fonts/ipaexg.ttf": SIGNED_OUT,
    **{f"GET /insights{page}": STAFF_PAGES | {"prefecture", "other_prefecture", "ministry", "admin"} for page in (
        "", "/registrations", "/certificates", "/programmes", "/donations", "/relationship-population",
        "/{table}.csv",
    )},
    "GET /public/insights": SIGNED_OUT,
    **{f"GET /staff{page}": STAFF_PAGES for page in (
        "", "/applications", "/applications.csv", "/applications/{application_id}", "/registrations",
        "/registrations/{registration_id}", "/residents", "/residents.csv", "/certificates", "/certificates.csv",
        "/certificates/expiring", "/certificates/{number}", "/donations", "/donations.csv",
        "/receipts/{number}.pdf", "/programs", "/programs/{program_id}", "/programs/{program_id}/ledger.csv",
        "/deliveries", "/deliveries.csv", "/catalogue", "/catalogue/{activity_id}",
    )},
    "POST /staff/applications/{application_id}/approve": DECIDE_FORMS,
    "POST /staff/applications/{application_id}/reject": DECIDE_FORMS,
    "POST /staff/registrations/{registration_id}/{decision}": DECIDE_FORMS,
    "POST /staff/receipts/{number}/reissue": DECIDE_FORMS,
    "POST /staff/donations/{donation_id}/one-stop": DECIDE_FORMS,
    "POST /staff/certificates/{number}/{action}": MANAGE_FORMS,
    "POST /staff/programs/{program_id}/budget": MANAGE_FORMS,
    # the catalogue of designated activities: every staff member reads it, managers change it
    "POST /staff/catalogue": MANAGE_FORMS,
    "POST /staff/catalogue/{activity_id}": MANAGE_FORMS,
    "POST /staff/catalogue/{activity_id}/retire": MANAGE_FORMS,
    **{f"GET /my{page}": MY_PAGES for page in (
        "", "/premium", "/apply", "/certificates", "/inbox", "/consents", "/deliveries", "/export",
        "/export/{export_id}/archive.{kind}", "/withdraw",
    )},
    **{f"POST /my{page}": MY_PAGES for page in (
        "/profile", "/registrations", "/premium", "/apply", "/inbox/{notification_id}/read", "/consents",
        "/consents/revoke", "/export", "/withdraw",
    )},
}

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
        # The resident's data export (APPI Art. 33): theirs alone.
        "POST /v1/residents/{resident_id}/exports": OWNER,
        "GET /v1/residents/{resident_id}/exports/{export_id}": OWNER,
        "GET /v1/residents/{resident_id}/exports/{export_id}/archive.json": OWNER,
        "GET /v1/residents/{resident_id}/exports/{export_id}/archive.pdf": OWNER,
        "GET /v1/registrations": STAFF,
        "GET /v1/registrations/export.csv": STAFF,
        "GET /v1/registrations/{registration_id}": STAFF | {"resident"},
        "POST /v1/registrations/{registration_id}/approve": DECIDE,
        "POST /v1/registrations/{registration_id}/reject": DECIDE,
        "POST /v1/registrations/{registration_id}/renew": OWNER,
        "DELETE /v1/registrations/{registration_id}": OWNER,
        "POST /v1/admin/premium-expiry": ADMIN,
        # the municipality's catalogue of designated activities: its managers designate, anyone reads
        "GET /v1/public/municipalities/{code}/activities": PUBLIC,
        "POST /v1/municipalities/{code}/activities": MANAGE,
        "PATCH /v1/activities/{activity_id}": MANAGE,
        "POST /v1/activities/{activity_id}/retire": MANAGE,
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
        # erasure on request: a manager of a municipality the donor gave to (白浜町), or an admin
        "DELETE /v1/donors/{donor_id}": MANAGE,
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
        # the key of the member numbers sealed for JAL about the resident: JAL's, and 404 to ANA
        "GET /v1/keys/{kid}": frozenset({"partner"}),
        # the resident's own provision record (APPI Art. 33); other staff see their municipality's part
        "GET /v1/residents/{resident_id}/deliveries": STAFF | {"resident", "other_staff"},
    }),
    **_service("planning", {
        # the municipality's managers decide (the mayor's acts); reviewers record what arrives
        "POST /v1/plans": MANAGE,
        "GET /v1/plans/{plan_id}": FIGURES,
        "POST /v1/plans/{plan_id}/consultation": MANAGE,
        "POST /v1/plans/{plan_id}/adopt": MANAGE,
        "POST /v1/plans/{plan_id}/amendments": MANAGE,
        "POST /v1/plans/{plan_id}/withdraw": MANAGE,
        "GET /v1/municipalities/{code}/plans": FIGURES,
        "POST /v1/corporations": DECIDE,
        "GET /v1/corporations/{corporation_id}": FIGURES,
        "POST /v1/corporations/{corporation_id}/designate": MANAGE,
        "POST /v1/corporations/{corporation_id}/reports": DECIDE,
        "POST /v1/corporations/{corporation_id}/revoke": MANAGE,
        "POST /v1/corporations/{corporation_id}/proposals": DECIDE,
        "GET /v1/municipalities/{code}/corporations": FIGURES,
        "POST /v1/proposals/{proposal_id}/answer": MANAGE,
        "GET /v1/municipalities/{code}/proposals": FIGURES,
        "POST /v1/councils": MANAGE,
        # member names and minutes: the municipality's staff only
        "GET /v1/councils/{council_id}": STAFF,
        "POST /v1/councils/{council_id}/members": MANAGE,
        "POST /v1/councils/{council_id}/meetings": DECIDE,
        "GET /v1/municipalities/{code}/councils": FIGURES,
        # adopted plans and designated corporations are public (no token)
        "GET /v1/public/plans": PUBLIC,
        "GET /v1/public/plans/{plan_id}": PUBLIC,
        "GET /v1/public/corporations": PUBLIC,
    }),
    **_service("insights", {
        # figures of the reader's own scope (staff: their municipality; prefecture readers: their
        # prefecture; the ministry and admins: all), each table also as CSV
        **{f"GET /v1/insights/{table}{suffix}": FIGURES | {"other_staff", "other_prefecture"}
           for table in ("registrations", "registrations/monthly", "certificates", "programmes", "donations",
                         "relationship-population", "kpis") for suffix in ("", ".csv")},
        # public tables: counts of people under 10 withheld
        "GET /v1/public/insights/registrations": PUBLIC,
        "GET /v1/public/insights/relationship-population": PUBLIC,
        "GET /v1/public/insights/kpis": PUBLIC,
        "POST /v1/insights/rebuild": ADMIN,
    }),
    **_service("listings", {
        # the municipality's staff record and publish listings (for it or a corporation it designated)
        "POST /v1/listings": DECIDE,
        "GET /v1/listings": STAFF,
        "GET /v1/listings/{listing_id}": STAFF,
        "POST /v1/listings/{listing_id}/publish": DECIDE,
        "POST /v1/listings/{listing_id}/withdraw": DECIDE,
        "GET /v1/listings/{listing_id}/interests": STAFF,
        "POST /v1/listings/{listing_id}/interests/{resident_id}/contact-deliveries": DECIDE,
        # a resident's interests, "interested" and the record of their contact given: theirs
        "GET /v1/residents/{resident_id}/listing-interests": OWNER,
        "PUT /v1/residents/{resident_id}/listing-interests": OWNER,
        "DELETE /v1/residents/{resident_id}/listing-interests": OWNER,
        "GET /v1/residents/{resident_id}/interested-listings": OWNER,
        "PUT /v1/residents/{resident_id}/interested-listings/{listing_id}": OWNER,
        "DELETE /v1/residents/{resident_id}/interested-listings/{listing_id}": OWNER,
        "GET /v1/residents/{resident_id}/listing-deliveries": OWNER,
        # published listings are public (no token)
        "GET /v1/public/listings": PUBLIC,
        "GET /v1/public/listings/{listing_id}": PUBLIC,
    }),
    **_service("console", CONSOLE_PAGES),
}

#: Refusals that must look like "no such thing" (404), never a 403 that confirms it exists.
HIDDEN = {
    ("partner_gateway GET /v1/certificates/{number}", "other_partner"),
    ("partner_gateway GET /v1/keys/{kid}", "other_partner"),
    ("subsidy POST /v1/redemptions", "other_partner"),
}

#: Allowed writes that end what later checks use: sent last, in this order.
DESTRUCTIVE = (
    "donation POST /v1/donations/{donation_id}/refund",
    "donation DELETE /v1/donors/{donor_id}",
    "certification POST /v1/certificates/{number}/revoke",
    "planning POST /v1/corporations/{corporation_id}/revoke",
    "planning POST /v1/plans/{plan_id}/withdraw",
    "listings POST /v1/listings/{listing_id}/withdraw",
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
    from services.console.main import create_app as console_app

    apps = {**_apps(settings), "console": console_app(settings)}
    found = {f"{service} {method} {path}" for service, app in apps.items() for method, path in routes_of(app)}
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
                return {**common, "registration_id": self.ids["registration"], "purpose": "email",
                        "export_id": self.ids["export"], "activity_id": self.ids["activity"]}
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
                return {"number": self.ids["certificate"], "code": "jal", "key_id": self.ids["api_key"],
                        "kid": self.ids["kid"], "resident_id": self.resident}
            case "identity":
                return {"account_id": self.resident}
            case "planning":
                return {"code": SHIRAHAMA, "plan_id": seeded_plan_id(SHIRAHAMA),
                        "corporation_id": self.ids["corporation"], "proposal_id": self.ids["proposal"],
                        "council_id": self.ids["council"]}
            case "listings":
                return {"resident_id": self.resident, "listing_id": self.ids["listing"]}
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
                "activities": [{"activity_id": self.ids["activity"], "date": today}]},
            "registration POST /v1/municipalities/{code}/activities": {
                "code": f"authz-{tag}", "name_ja": "authz", "name_en": "authz", "kind": "other"},
            "registration PATCH /v1/activities/{activity_id}": {"season": f"authz {tag}"},
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
            "planning POST /v1/plans": {"level": "municipality", "municipality_code": SHIRAHAMA, "content": {}},
            "planning POST /v1/plans/{plan_id}/consultation": {},
            "planning POST /v1/plans/{plan_id}/amendments": {"content": {"area": "authz"}},
            "planning POST /v1/plans/{plan_id}/withdraw": {"reason_code": "other"},
            "planning POST /v1/corporations": {"municipality_code": SHIRAHAMA, "name": f"authz {tag}"},
            "planning POST /v1/corporations/{corporation_id}/reports": {
                "period_from": today, "period_until": today, "summary": "authz"},
            "planning POST /v1/corporations/{corporation_id}/revoke": {"reason_code": "other"},
            "planning POST /v1/corporations/{corporation_id}/proposals": {
                "kind": "change", "plan_id": seeded_plan_id(SHIRAHAMA), "summary": "authz"},
            "planning POST /v1/proposals/{proposal_id}/answer": {"decision": "accepted", "reason_code": "other"},
            "planning POST /v1/councils": {"municipality_code": SHIRAHAMA, "name": "authz"},
            "planning POST /v1/councils/{council_id}/members": {"kind": "resident", "name": "authz"},
            "planning POST /v1/councils/{council_id}/meetings": {"agenda": "authz"},
            "listings POST /v1/listings": self.listing_body(),
            "listings POST /v1/listings/{listing_id}/withdraw": {"reason_code": "other"},
            "listings PUT /v1/residents/{resident_id}/listing-interests": {"kinds": ["vacant_house"]},
            "listings PUT /v1/residents/{resident_id}/interested-listings/{listing_id}": {"share_contact": True},
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
            "listings GET /v1/listings": {"municipality": SHIRAHAMA},
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

    def listing_body(self) -> dict[str, Any]:
        today = japan_today()
        return {
            "kind": "vacant_house", "municipality_code": SHIRAHAMA, "area": "堅田", "title": "authz",
            "summary": "authz", "available_from": today.isoformat(),
            "expires_on": (today + timedelta(days=30)).isoformat(),
            "owner_consent": {"owner_name": "authz", "consented_on": today.isoformat(), "method": "written"},
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
    export = await _json(await c["registration"].post(f"/v1/residents/{world.resident}/exports", headers=h(r, "")), 202)
    world.ids["export"] = export["export_id"]
    activity = await _json(await c["registration"].post(
        f"/v1/municipalities/{SHIRAHAMA}/activities", headers=h("manager", ""),
        json={"code": "authz-cleanup", "name_ja": "浜の清掃", "name_en": "Beach clean-up", "kind": "environment"}), 201)
    world.ids["activity"] = activity["id"]

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
    # The kid of JAL's sealed member number about the resident (the feed's, read as JAL).
    feed = await _json(await c["partner_gateway"].get("/v1/feed", headers=h("partner", "")), 200)
    world.ids["kid"] = next(
        r["value"]["member_number"]["kid"] for r in feed["records"]
        if r["subject"] == world.ids["certificate"] and r["value"] and r["value"].get("member_number")
    )
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
    # planning: 白浜町's council, and a proposal of a corporation the town designated (JAL, seeded)
    planning, manager = c["planning"], h("manager", "")
    world.ids["corporation"] = seeded_corporation_id(SHIRAHAMA, "日本航空(株)")
    council = await _json(await planning.post(
        "/v1/councils", json={"municipality_code": SHIRAHAMA, "name": "白浜町特定居住促進協議会"},
        headers=manager), 201)
    world.ids["council"] = council["council_id"]
    proposal = await _json(await planning.post(
        f"/v1/corporations/{world.ids['corporation']}/proposals",
        json={"kind": "change", "plan_id": seeded_plan_id(SHIRAHAMA), "summary": "authz"}, headers=manager), 201)
    world.ids["proposal"] = proposal["proposal_id"]
    # listings: a published vacant house the resident said "interested" in, consenting to give their contact
    listings = c["listings"]
    listing = await _json(await listings.post("/v1/listings", json=world.listing_body(), headers=manager), 201)
    world.ids["listing"] = listing["listing_id"]
    await _json(await listings.post(f"/v1/listings/{listing['listing_id']}/publish", headers=manager), 200)
    await _json(await listings.put(f"/v1/residents/{world.resident}/interested-listings/{listing['listing_id']}",
                                   json={"share_contact": True}, headers=h(r, "")), 200)
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
    none = await subsidy.post("/v1/redemptions", json=world.trip_body(f"no-such-{uuid.uuid4()}"), headers=ana)
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
    # The console's pages take a session, not a token: tests/unit/test_console_pages.py checks them per role.
    order = [key for key in sorted(MATRIX) if key not in DESTRUCTIVE and not key.startswith("console ")]
    order += list(DESTRUCTIVE)
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
    assert calls > len(order) and not problems, "\n".join(problems)


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
