"""Registration over the real broker and database: accounts, registrations, premium review, events."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
from asyncpg.connection import LoggedQuery
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI

from services.registration.main import create_app
from shared.contracts.registration import (
    PremiumApproved,
    PremiumExpired,
    PremiumRejected,
    PremiumRequested,
    RegistrationWithdrawn,
    ResidentRegistered,
)
from shared.kit.service import ServiceRuntime
from shared.kit.settings import Settings
from shared.reference import check_digit
from shared.stack.identity_verifier import DEVELOPMENT_ISSUER, attest
from tests.integration.test_registration_support import (
    HOME,
    IKI,
    KAMISHIHORO,
    MITOYO,
    SHIRAHAMA,
    SUSAMI,
    TANABE,
    WAKAYAMA,
    activities,
    admin_auth,
    assert_problem,
    create_resident,
    decoded,
    events_of,
    hanako,
    identity,
    new_resident_id,
    of_type,
    one,
    opened_contact,
    premium,
    register,
    resident_auth,
    snapshot,
    staff_auth,
    today,
)
from tests.support import eventually, service_client


@pytest.fixture(scope="module")
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(settings, maintenance_interval_s=3600)
    yield application


@pytest.fixture(scope="module")
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with service_client(app) as http:
        yield http


@pytest.fixture(scope="module")
def pool(app: FastAPI, client: httpx.AsyncClient) -> asyncpg.Pool:
    runtime: ServiceRuntime = app.state.runtime
    return runtime.pool


def add_years(day: date, years: int) -> date:
    try:
        return day.replace(year=day.year + years)
    except ValueError:
        return day.replace(year=day.year + years, day=28)


# --- Accounts ------------------------------------------------------------------------------------


async def test_an_account_is_created_for_the_tokens_subject(
    client: httpx.AsyncClient, settings: Settings, pool: asyncpg.Pool
) -> None:
    resident_id = new_resident_id()
    response = await client.post(
        "/v1/residents",
        json=hanako(name="山田　花子", name_kana="やまだ　はなこ", consents=[{"purpose": "email"}]),
        headers=resident_auth(settings, resident_id),
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["id"] == resident_id
    assert body["name"] == "山田 花子"
    assert body["name_kana"] == "ヤマダ ハナコ"  # readings are kept in katakana
    assert [c["purpose"] for c in body["consents"]] == ["email"]
    row = await one(pool, "SELECT * FROM residents WHERE id = $1", resident_id)
    assert row["status"] == "active" and row["legal_address_code"] == HOME
    assert row["date_of_birth"] == date(1988, 4, 12)

    again = await client.post("/v1/residents", json=hanako(), headers=resident_auth(settings, resident_id))
    assert_problem(again, 409, "resident-exists")

    mine = await client.get(f"/v1/residents/{resident_id}", headers=resident_auth(settings, resident_id))
    assert mine.status_code == 200 and mine.json()["email"] == "hanako.yamada@example.jp"
    other = await client.get(f"/v1/residents/{resident_id}", headers=resident_auth(settings, new_resident_id()))
    assert_problem(other, 403, "forbidden")
    staff = await client.get(f"/v1/residents/{resident_id}", headers=staff_auth(settings, SHIRAHAMA))
    assert_problem(staff, 403, "forbidden")
    anonymous = await client.get(f"/v1/residents/{resident_id}")
    assert_problem(anonymous, 401, "unauthenticated")


def _unknown_code() -> str:
    return "99999" + str(check_digit("99999"))


BAD_ACCOUNTS: list[tuple[str, dict[str, Any], int, str]] = [
    ("invalid e-mail", {"email": "hanako@@example"}, 422, "invalid-email"),
    ("e-mail without domain", {"email": "hanako"}, 422, "invalid-email"),
    ("birth date in the future", {"date_of_birth": (date.today() + timedelta(days=3)).isoformat()}, 422,
     "birth-date-in-future"),
    ("kanji reading", {"name_kana": "山田 花子"}, 422, "invalid-kana"),
    ("latin reading", {"name_kana": "Yamada Hanako"}, 422, "invalid-kana"),
    ("only a long vowel mark", {"name_kana": "ー"}, 422, "invalid-kana"),
    ("empty name", {"name": "   "}, 422, "invalid-name"),
    ("phone with letters", {"phone": "090-CALL-ME"}, 422, "invalid-phone"),
    ("malformed legal address", {"legal_address_code": "13101"}, 422, "malformed-municipality-code"),
    ("wrong check digit", {"legal_address_code": "131017"}, 422, "malformed-municipality-code"),
    ("unknown legal address", {"legal_address_code": _unknown_code()}, 422, "unknown-municipality"),
    ("a prefecture as legal address", {"legal_address_code": "130001"}, 422, "invalid-legal-address"),
    ("My Number as phone", {"phone": "1234-5678-9018"}, 422, "my-number-not-allowed"),
    ("My Number in the name", {"name": "山田 花子 123456789018"}, 422, "my-number-not-allowed"),
    ("full-width My Number", {"name_kana": "１２３４ ５６７８ ９０１８"}, 422, "my-number-not-allowed"),
    ("My Number nested", {"consents": [{"purpose": "share_certificate", "partner": "123456789018"}]}, 422,
     "my-number-not-allowed"),
    ("unknown field", {"my_number": "x"}, 422, "invalid-request"),
    ("My Number as a member name", {"1234-5678-9018": "x"}, 422, "my-number-not-allowed"),
    ("unknown language", {"preferred_language": "fr"}, 422, "invalid-request"),
    ("consent per partner without partner", {"consents": [{"purpose": "share_certificate"}]}, 422,
     "consent-partner-required"),
    ("unknown partner", {"consents": [{"purpose": "share_certificate", "partner": "zipair"}]}, 422,
     "unknown-partner"),
    ("partner on a general consent", {"consents": [{"purpose": "email", "partner": "jal"}]}, 422,
     "consent-partner-not-allowed"),
]


@pytest.mark.parametrize(("case", "overrides", "status", "code"), BAD_ACCOUNTS, ids=[c[0] for c in BAD_ACCOUNTS])
async def test_a_bad_account_is_refused_and_nothing_is_written(
    client: httpx.AsyncClient, settings: Settings, pool: asyncpg.Pool,
    case: str, overrides: dict[str, Any], status: int, code: str,
) -> None:
    before = await snapshot(pool)
    response = await client.post(
        "/v1/residents", json=hanako(**overrides), headers=resident_auth(settings, new_resident_id())
    )
    problem = assert_problem(response, status, code)
    if code == "my-number-not-allowed":
        assert "123456789018" not in response.text and "１２３４" not in response.text  # never echoed
        assert problem["detail"].startswith("the body value at $")
    assert await snapshot(pool) == before


async def test_an_international_phone_number_is_not_a_my_number(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    resident_id = await create_resident(client, settings, phone="+81-90-1234-5678")
    response = await client.get(f"/v1/residents/{resident_id}", headers=resident_auth(settings, resident_id))
    assert response.json()["phone"] == "+81-90-1234-5678"


async def test_http_guards_answer_problems(client: httpx.AsyncClient, settings: Settings, pool: asyncpg.Pool) -> None:
    before = await snapshot(pool)
    headers = resident_auth(settings, new_resident_id())
    too_big = await client.post("/v1/residents", content=b'{"name": "' + b"a" * 70_000 + b'"}',
                                headers={**headers, "content-type": "application/json"})
    assert_problem(too_big, 413, "body-too-large")
    not_json = await client.post("/v1/residents", content=b"{name: hanako",
                                 headers={**headers, "content-type": "application/json"})
    assert_problem(not_json, 400, "malformed-json")
    plain = await client.post("/v1/residents", content=b"name=hanako",
                              headers={**headers, "content-type": "text/plain"})
    assert_problem(plain, 415, "unsupported-media-type")
    form = await client.post("/v1/residents", data={"name": "hanako"}, headers=headers)
    assert_problem(form, 415, "unsupported-media-type")
    a_list = await client.post("/v1/residents", json=[hanako()], headers=headers)
    assert_problem(a_list, 422, "invalid-request")
    empty = await client.post("/v1/residents", headers=headers)
    assert_problem(empty, 422, "invalid-request")
    unauthenticated = await client.post("/v1/residents", json=hanako())
    assert_problem(unauthenticated, 401, "unauthenticated")
    staff = await client.post("/v1/residents", json=hanako(), headers=staff_auth(settings, SHIRAHAMA))
    assert_problem(staff, 403, "forbidden")
    assert await snapshot(pool) == before


# --- Basic registration --------------------------------------------------------------------------


async def test_registering_with_a_municipality_registers_with_its_prefecture(
    client: httpx.AsyncClient, settings: Settings, pool: asyncpg.Pool
) -> None:
    resident_id = await create_resident(client, settings)
    response = await client.post(
        f"/v1/residents/{resident_id}/registrations", json={"municipality_code": SHIRAHAMA},
        headers=resident_auth(settings, resident_id),
    )
    assert response.status_code == 201, response.text
    town = response.json()
    assert (town["tier"], town["status"], town["municipality_name"]) == ("basic", "active", "和歌山県白浜町")
    rows = await pool.fetch(
        "SELECT * FROM registrations WHERE resident_id = $1 ORDER BY derived_from NULLS FIRST", resident_id
    )
    assert [(r["municipality_code"], r["tier"], r["status"]) for r in rows] == [
        (SHIRAHAMA, "basic", "active"), (WAKAYAMA, "basic", "active"),
    ]
    assert rows[1]["derived_from"] == town["id"] and town["prefecture_registration_id"] == rows[1]["id"]

    # One event for both: the prefecture's registration travels in the municipality's.
    events = await events_of(settings, pool, resident_id, 1)
    assert [e.type for e in events] == [ResidentRegistered.event_type]
    first = decoded(events[0], ResidentRegistered, resident_id)
    assert (first.registration_id, first.municipality_code, first.prefecture_code) == (town["id"], SHIRAHAMA, WAKAYAMA)
    assert first.derived_prefecture_registration_id == rows[1]["id"]
    assert first.status == "active" and first.legal_address_code == HOME
    second = first.registrations()[1]
    assert (second.registration_id, second.municipality_code, second.tier, second.status) == (
        rows[1]["id"], WAKAYAMA, "basic", "active")
    contact = await opened_contact(settings, first.contact)  # sealed with the person's key
    assert contact is not None and first.contact.kid == f"resident:{resident_id}"
    assert contact.name == "山田 花子" and contact.name_kana == "ヤマダ ハナコ"
    assert contact.email == "hanako.yamada@example.jp" and contact.phone == "090-1234-5678"
    assert contact.preferred_language == "ja"

    # A second town in the same prefecture reuses the prefecture registration.
    tanabe = await register(client, settings, resident_id, {"municipality_code": TANABE})
    assert tanabe["prefecture_registration_id"] == rows[1]["id"]
    assert await pool.fetchval("SELECT count(*) FROM registrations WHERE resident_id = $1", resident_id) == 3
    events = await events_of(settings, pool, resident_id, 2)
    tanabe_event = decoded(events[1], ResidentRegistered, resident_id)
    assert len(events) == 2 and tanabe_event.municipality_code == TANABE
    assert tanabe_event.derived_prefecture_registration_id is None and len(tanabe_event.registrations()) == 1

    # The same municipality twice is a conflict, and nothing is written.
    before = await snapshot(pool)
    duplicate = await client.post(
        f"/v1/residents/{resident_id}/registrations", json={"municipality_code": SHIRAHAMA},
        headers=resident_auth(settings, resident_id),
    )
    assert_problem(duplicate, 409, "already-registered")
    prefecture_again = await client.post(
        f"/v1/residents/{resident_id}/registrations", json={"municipality_code": WAKAYAMA},
        headers=resident_auth(settings, resident_id),
    )
    assert_problem(prefecture_again, 409, "already-registered")
    assert await snapshot(pool) == before


async def test_registering_directly_with_a_prefecture_derives_nothing(
    client: httpx.AsyncClient, settings: Settings, pool: asyncpg.Pool
) -> None:
    resident_id = await create_resident(client, settings)
    body = await register(client, settings, resident_id, {"municipality_code": WAKAYAMA})
    assert body["prefecture_registration_id"] is None and body["derived_from"] is None
    town = await register(client, settings, resident_id, {"municipality_code": SHIRAHAMA})
    assert town["prefecture_registration_id"] == body["id"]  # the direct one serves as the prefecture row
    assert await pool.fetchval("SELECT count(*) FROM registrations WHERE resident_id = $1", resident_id) == 2


def _unsigned(resident_id: str) -> str:
    """An ``alg: none`` JWS of otherwise valid claims."""
    now = int(datetime.now(UTC).timestamp())
    claims = {"iss": DEVELOPMENT_ISSUER, "sub": resident_id, "iat": now, "exp": now + 300,
              "jti": str(uuid.uuid4()), "method": "jpki", "verified_at": now}
    return jwt.encode(claims, "", algorithm="none")


def _minutes_ago(minutes: int) -> datetime:
    return datetime.now(UTC) - timedelta(minutes=minutes)


#: (case, the body for the resident registering, status, problem code)
BAD_REGISTRATIONS: list[tuple[str, Callable[[str], dict[str, Any]], int, str]] = [
    ("malformed code", lambda _: {"municipality_code": "30401"}, 422, "malformed-municipality-code"),
    ("letters", lambda _: {"municipality_code": "30401X"}, 422, "malformed-municipality-code"),
    ("wrong check digit", lambda _: {"municipality_code": "304019"}, 422, "malformed-municipality-code"),
    ("unknown code", lambda _: {"municipality_code": _unknown_code()}, 422, "unknown-municipality"),
    ("a designated city's ward", lambda _: {"municipality_code": "141011"}, 422, "municipality-not-registrable"),
    ("a northern territories village", lambda _: {"municipality_code": "016951"}, 422,
     "municipality-not-registrable"),
    ("unknown tier", lambda _: {"municipality_code": SHIRAHAMA, "tier": "gold"}, 422, "invalid-request"),
    ("basic with activities", lambda _: {"municipality_code": SHIRAHAMA, "activities": activities(1, 2, 3)}, 422,
     "proof-not-for-basic"),
    ("premium in the home municipality", lambda r: premium(HOME, r), 422, "premium-in-home-municipality"),
    ("premium without attestation", lambda r: premium(SHIRAHAMA, r, attestation=None), 422, "identity-not-verified"),
    # A client can no longer state its own JPKI result, with or without an attestation beside it.
    ("self-claimed jpki", lambda r: premium(SHIRAHAMA, r, attestation=None, identity=identity()), 422,
     "identity-not-attested"),
    ("self-claimed jpki beside an attestation", lambda r: premium(SHIRAHAMA, r, identity=identity()), 422,
     "identity-not-attested"),
    ("attestation of another resident", lambda r: premium(SHIRAHAMA, r, attestation=attest(new_resident_id())), 422,
     "attestation-subject-mismatch"),
    ("attestation of another birth date",
     lambda r: premium(SHIRAHAMA, r, attestation=attest(r, birthdate=date(1990, 1, 1))), 422,
     "attestation-subject-mismatch"),
    ("expired attestation", lambda r: premium(SHIRAHAMA, r, attestation=attest(r, now=_minutes_ago(20))), 422,
     "attestation-expired"),
    ("attestation living an hour",
     lambda r: premium(SHIRAHAMA, r, attestation=attest(r, ttl=timedelta(hours=1))), 422, "attestation-invalid"),
    ("attestation signed with another key",
     lambda r: premium(SHIRAHAMA, r, attestation=attest(r, key=ec.generate_private_key(ec.SECP256R1()))), 422,
     "attestation-invalid"),
    ("attestation of an untrusted provider",
     lambda r: premium(SHIRAHAMA, r, attestation=attest(r, issuer="https://verifier.example")), 422,
     "attestation-invalid"),
    ("unsigned attestation", lambda r: premium(SHIRAHAMA, r, attestation=_unsigned(r)), 422, "attestation-invalid"),
    ("attestation of another method", lambda r: premium(SHIRAHAMA, r, attestation=attest(r, "password")), 422,
     "attestation-invalid"),
    ("not a JWS", lambda r: premium(SHIRAHAMA, r, attestation="not a signed attestation"), 422, "invalid-request"),
    ("identity verified two years ago",
     lambda r: premium(SHIRAHAMA, r, attestation=attest(r, verified_at=_minutes_ago(2 * 366 * 24 * 60))), 422,
     "identity-verification-invalid"),
    ("two activities", lambda r: premium(SHIRAHAMA, r, activities=activities(5, 6)), 422, "not-enough-activities"),
    ("one designated activity on three days",
     lambda r: premium(SHIRAHAMA, r, activities=[{**activities(d)[0], "document_ref": None} for d in (1, 2, 3)]),
     422, "not-enough-activities"),
    # Activities are picked from the municipality's catalogue of designated activities.
    ("a freely named activity", lambda r: premium(SHIRAHAMA, r, activities=[
        *activities(5, 6), {"name": "棚田の草刈り", "date": date.today().isoformat()}]), 422,
     "activity-not-designated"),
    ("a name beside the pick", lambda r: premium(SHIRAHAMA, r, activities=[
        *activities(5, 6), {**activities(7, start=2)[0], "name": "棚田の草刈り"}]), 422, "activity-not-designated"),
    ("an activity no municipality designated", lambda r: premium(SHIRAHAMA, r, activities=[
        *activities(5, 6), {"activity_id": f"{SHIRAHAMA}-no-such-activity", "date": date.today().isoformat()}]),
     422, "unknown-activity"),
    ("another municipality's activity", lambda r: premium(SHIRAHAMA, r, activities=[
        *activities(5, 6), *activities(7, municipality=TANABE, start=2)]), 422, "activity-of-another-municipality"),
    ("an activity needing evidence without it", lambda r: premium(SHIRAHAMA, r, activities=[
        {**a, "document_ref": None} for a in activities(5, 6, 7)]), 422, "activity-evidence-required"),
    ("an activity in the future", lambda r: premium(SHIRAHAMA, r, activities=activities(5, 6, -3)), 422,
     "activity-out-of-range"),
    ("an activity over a year ago", lambda r: premium(SHIRAHAMA, r, activities=activities(5, 6, 400)), 422,
     "activity-out-of-range"),
    ("My Number as a document", lambda r: premium(SHIRAHAMA, r, activities=[
        *activities(5, 6), {**activities(0, start=2)[0], "document_ref": "1234 5678 9018"}]),
     422, "my-number-not-allowed"),
    ("My Number as certificate serial",
     lambda r: premium(SHIRAHAMA, r, identity=identity(certificate_serial="123456789018")), 422,
     "my-number-not-allowed"),
]


@pytest.mark.parametrize(
    ("case", "body", "status", "code"), BAD_REGISTRATIONS, ids=[c[0] for c in BAD_REGISTRATIONS]
)
async def test_a_bad_registration_is_refused_and_nothing_is_written(
    client: httpx.AsyncClient, settings: Settings, pool: asyncpg.Pool,
    case: str, body: Callable[[str], dict[str, Any]], status: int, code: str,
) -> None:
    resident_id = await create_resident(client, settings)
    before = await snapshot(pool)
    response = await client.post(
        f"/v1/residents/{resident_id}/registrations", json=body(resident_id),
        headers=resident_auth(settings, resident_id),
    )
    assert_problem(response, status, code)
    assert await snapshot(pool) == before


async def test_registration_needs_the_account_and_its_owner(
    client: httpx.AsyncClient, settings: Settings, pool: asyncpg.Pool
) -> None:
    before = await snapshot(pool)
    nobody = new_resident_id()
    missing = await client.post(f"/v1/residents/{nobody}/registrations", json={"municipality_code": SHIRAHAMA},
                                headers=resident_auth(settings, nobody))
    assert_problem(missing, 404, "resident-not-found")
    resident_id = await create_resident(client, settings)
    before = await snapshot(pool)
    someone_else = await client.post(f"/v1/residents/{resident_id}/registrations",
                                     json={"municipality_code": SHIRAHAMA}, headers=resident_auth(settings, nobody))
    assert_problem(someone_else, 403, "forbidden")
    staff = await client.post(f"/v1/residents/{resident_id}/registrations", json={"municipality_code": SHIRAHAMA},
                              headers=staff_auth(settings, SHIRAHAMA))
    assert_problem(staff, 403, "forbidden")
    assert await snapshot(pool) == before


# --- Premium -------------------------------------------------------------------------------------


async def test_premium_is_reviewed_by_the_municipality(
    client: httpx.AsyncClient, settings: Settings, pool: asyncpg.Pool
) -> None:
    resident_id = await create_resident(client, settings)
    requested = await register(client, settings, resident_id, premium(SHIRAHAMA, resident_id))
    assert (requested["tier"], requested["status"], requested["awaiting_review"]) == (
        "premium", "pending_review", "initial")
    registration_id = requested["id"]

    # Only what the attestation establishes is stored: method, time, provider and attestation id.
    verification = await one(pool,
        "SELECT * FROM identity_verifications WHERE resident_id = $1", resident_id
    )
    assert set(dict(verification)) == {
        "id", "resident_id", "method", "verified_at", "certificate_serial", "subject_ref", "recorded_at",
        "provider", "attestation_id"}
    assert (verification["method"], verification["provider"]) == ("jpki", DEVELOPMENT_ISSUER)

    staff = await client.get(f"/v1/registrations/{registration_id}", headers=staff_auth(settings, SHIRAHAMA))
    assert staff.status_code == 200
    review = staff.json()["reviews"][0]
    assert (review["kind"], review["status"], review["identity_method"]) == ("initial", "pending", "jpki")
    assert len(review["activities"]) == 3

    before = await snapshot(pool)
    other_town = await client.post(f"/v1/registrations/{registration_id}/approve",
                                   headers=staff_auth(settings, TANABE))
    assert_problem(other_town, 403, "forbidden")
    prefecture_staff = await client.post(f"/v1/registrations/{registration_id}/approve",
                                         headers=staff_auth(settings, WAKAYAMA))
    assert_problem(prefecture_staff, 403, "forbidden")
    the_person = await client.post(f"/v1/registrations/{registration_id}/approve",
                                   headers=resident_auth(settings, resident_id))
    assert_problem(the_person, 403, "forbidden")
    assert await snapshot(pool) == before

    approved = await client.post(f"/v1/registrations/{registration_id}/approve",
                                 headers=staff_auth(settings, SHIRAHAMA))
    assert approved.status_code == 200, approved.text
    expected_until = add_years(today(), 1)
    assert approved.json()["status"] == "active" and approved.json()["valid_until"] == expected_until.isoformat()

    before = await snapshot(pool)
    twice = await client.post(f"/v1/registrations/{registration_id}/approve", headers=staff_auth(settings, SHIRAHAMA))
    assert_problem(twice, 409, "already-decided")
    reject_after = await client.post(f"/v1/registrations/{registration_id}/reject", json={"reason_code": "other"},
                                     headers=staff_auth(settings, SHIRAHAMA))
    assert_problem(reject_after, 409, "already-decided")
    assert await snapshot(pool) == before

    decided = await one(pool, "SELECT * FROM premium_reviews WHERE registration_id = $1", registration_id)
    assert decided["status"] == "approved" and decided["decided_by"] and decided["valid_until"] == expected_until
    seen_by_staff = await client.get(f"/v1/registrations/{registration_id}", headers=staff_auth(settings, SHIRAHAMA))
    assert seen_by_staff.json()["reviews"][0]["decided_by"] == decided["decided_by"]  # audit: who decided
    seen_by_person = await client.get(f"/v1/registrations/{registration_id}",
                                      headers=resident_auth(settings, resident_id))
    assert seen_by_person.json()["reviews"][0]["decided_by"] is None

    events = await events_of(settings, pool, resident_id, 3)
    assert [e.type for e in events] == [
        ResidentRegistered.event_type, PremiumRequested.event_type, PremiumApproved.event_type,
    ]
    registered = decoded(events[0], ResidentRegistered, resident_id)
    assert (registered.tier, registered.status) == ("premium", "pending_review")
    derived = registered.registrations()[1]  # the derived prefecture row: basic and active at once
    assert (derived.municipality_code, derived.tier, derived.status) == (WAKAYAMA, "basic", "active")
    assert decoded(events[1], PremiumRequested, resident_id).activity_count == 3
    approval = decoded(events[2], PremiumApproved, resident_id)
    assert (approval.registration_id, approval.valid_until) == (registration_id, expected_until)


async def test_an_attested_identity_is_recorded_and_each_attestation_is_used_once(
    client: httpx.AsyncClient, settings: Settings, pool: asyncpg.Pool
) -> None:
    resident_id = await create_resident(client, settings)
    me = resident_auth(settings, resident_id)
    verified_at = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=2)
    jti = str(uuid.uuid4())
    token = attest(resident_id, verified_at=verified_at, birthdate=date(1988, 4, 12), jti=jti)
    key, body = {**me, "Idempotency-Key": str(uuid.uuid4())}, premium(SHIRAHAMA, resident_id, attestation=token)
    first = await client.post(f"/v1/residents/{resident_id}/registrations", json=body, headers=key)
    assert first.status_code == 201, first.text
    assert (first.json()["status"], first.json()["awaiting_review"]) == ("pending_review", "initial")

    # The verification is recorded with the review: method, provider, when it was made.
    recorded = await one(pool, "SELECT * FROM identity_verifications WHERE resident_id = $1", resident_id)
    assert (recorded["method"], recorded["provider"], recorded["attestation_id"], recorded["verified_at"]) == (
        "jpki", DEVELOPMENT_ISSUER, jti, verified_at)
    detail = await client.get(f"/v1/registrations/{first.json()['id']}", headers=staff_auth(settings, SHIRAHAMA))
    review = detail.json()["reviews"][0]
    assert (review["identity_method"], review["identity_provider"]) == ("jpki", DEVELOPMENT_ISSUER)
    assert datetime.fromisoformat(review["identity_verified_at"]) == verified_at

    # The same request under the same key is the first answer again, not a replayed attestation.
    repeat = await client.post(f"/v1/residents/{resident_id}/registrations", json=body, headers=key)
    assert repeat.status_code == 201 and repeat.headers["Idempotent-Replayed"] == "true"
    assert repeat.json() == first.json()

    # Any other request with the same attestation is refused, and writes nothing.
    before = await snapshot(pool)
    again = await client.post(f"/v1/residents/{resident_id}/registrations",
                              json=premium(TANABE, resident_id, attestation=token), headers=me)
    assert_problem(again, 409, "attestation-replayed")
    assert await snapshot(pool) == before
    approved = await client.post(f"/v1/registrations/{first.json()['id']}/approve",
                                 headers=staff_auth(settings, SHIRAHAMA))
    assert approved.status_code == 200, approved.text
    before = await snapshot(pool)
    renewal = await client.post(f"/v1/registrations/{first.json()['id']}/renew",
                                json={"activities": activities(0, 0, 0), "attestation": token}, headers=me)
    assert_problem(renewal, 409, "attestation-replayed")
    self_claimed = await client.post(f"/v1/registrations/{first.json()['id']}/renew",
                                     json={"activities": activities(0, 0, 0), "identity": identity()}, headers=me)
    assert_problem(self_claimed, 422, "identity-not-attested")
    assert await snapshot(pool) == before

    # A fresh attestation renews, and records a second verification.
    renewed = await client.post(f"/v1/registrations/{first.json()['id']}/renew",
                                json={"activities": activities(0, 0, 0), "attestation": attest(resident_id)},
                                headers=me)
    assert renewed.status_code == 200, renewed.text
    assert await pool.fetchval(
        "SELECT count(*) FROM identity_verifications WHERE resident_id = $1 AND provider = $2",
        resident_id, DEVELOPMENT_ISSUER) == 2


async def test_one_attestation_sent_twice_at_once_is_used_once(
    client: httpx.AsyncClient, settings: Settings, pool: asyncpg.Pool
) -> None:
    resident_id = await create_resident(client, settings)
    token = attest(resident_id)
    responses = await asyncio.gather(*[
        client.post(f"/v1/residents/{resident_id}/registrations",
                    json=premium(code, resident_id, attestation=token), headers=resident_auth(settings, resident_id))
        for code in (SHIRAHAMA, KAMISHIHORO)
    ])
    assert sorted(r.status_code for r in responses) == [201, 409]
    assert_problem(next(r for r in responses if r.status_code == 409), 409, "attestation-replayed")
    assert await pool.fetchval(
        "SELECT count(*) FROM premium_reviews pr JOIN registrations r ON r.id = pr.registration_id "
        "WHERE r.resident_id = $1", resident_id) == 1


async def test_a_rejection_ends_the_request_and_its_derived_prefecture_registration(
    client: httpx.AsyncClient, settings: Settings, pool: asyncpg.Pool
) -> None:
    resident_id = await create_resident(client, settings)
    requested = await register(client, settings, resident_id, premium(KAMISHIHORO, resident_id))
    before = await snapshot(pool)
    # A reason is a code of the published list: none, free text or an unknown code is refused.
    for body in ({"reason": ""}, {"reason": "活動の記録が確認できませんでした"}, {"reason_code": "活動不足"},
                 {"reason_code": "certificate_revoked"}, {"note": "活動不足"}):
        no_reason = await client.post(f"/v1/registrations/{requested['id']}/reject", json=body,
                                      headers=staff_auth(settings, KAMISHIHORO))
        assert_problem(no_reason, 422, "invalid-request")
    assert await snapshot(pool) == before
    rejected = await client.post(
        f"/v1/registrations/{requested['id']}/reject",
        json={"reason_code": "activity_not_confirmed", "note": "活動の記録が確認できませんでした"},
        headers=staff_auth(settings, KAMISHIHORO),
    )
    assert rejected.status_code == 200 and rejected.json()["status"] == "rejected"
    # The review keeps the code and the note; staff see both, the person the code only.
    review = (await client.get(f"/v1/registrations/{requested['id']}",
                               headers=staff_auth(settings, KAMISHIHORO))).json()["reviews"][0]
    assert (review["reason"], review["note"]) == ("activity_not_confirmed", "活動の記録が確認できませんでした")
    own = await client.get(f"/v1/registrations/{requested['id']}", headers=resident_auth(settings, resident_id))
    assert own.json()["reviews"][0]["reason"] == "activity_not_confirmed" and "活動の記録" not in own.text
    statuses = await pool.fetch(
        "SELECT municipality_code, status FROM registrations WHERE resident_id = $1", resident_id
    )
    assert {(r["municipality_code"], r["status"]) for r in statuses} == {
        (KAMISHIHORO, "rejected"), ("010006", "withdrawn")}
    events = await events_of(settings, pool, resident_id, 4)
    assert [e.type for e in events[-2:]] == [PremiumRejected.event_type, RegistrationWithdrawn.event_type]
    assert decoded(events[-2], PremiumRejected, resident_id).reason == "activity_not_confirmed"
    assert "活動の記録" not in events[-2].data.decode()  # the note never leaves the service
    assert decoded(events[-1], RegistrationWithdrawn, resident_id).municipality_code == "010006"
    # A rejected request does not block a new one.
    again = await register(client, settings, resident_id, premium(KAMISHIHORO, resident_id))
    assert again["status"] == "pending_review"


async def test_at_most_three_premium_registrations_even_when_requested_at_once(
    client: httpx.AsyncClient, settings: Settings, pool: asyncpg.Pool
) -> None:
    resident_id = await create_resident(client, settings)
    responses = await asyncio.gather(*[
        client.post(f"/v1/residents/{resident_id}/registrations", json=premium(code, resident_id),
                    headers=resident_auth(settings, resident_id))
        for code in (SHIRAHAMA, KAMISHIHORO, MITOYO, IKI)
    ])
    assert sorted(r.status_code for r in responses) == [201, 201, 201, 409]
    assert_problem(next(r for r in responses if r.status_code == 409), 409, "premium-limit-reached")
    count = await pool.fetchval(
        "SELECT count(*) FROM registrations WHERE resident_id = $1 AND tier = 'premium'", resident_id
    )
    assert count == 3
    # Basic registrations are not limited.
    await register(client, settings, resident_id, {"municipality_code": SUSAMI})


async def test_a_basic_registration_is_upgraded_after_review(
    client: httpx.AsyncClient, settings: Settings, pool: asyncpg.Pool
) -> None:
    resident_id = await create_resident(client, settings)
    basic = await register(client, settings, resident_id, {"municipality_code": MITOYO})
    response = await client.post(f"/v1/residents/{resident_id}/registrations", json=premium(MITOYO, resident_id),
                                 headers=resident_auth(settings, resident_id))
    assert response.status_code == 200, response.text  # the same registration, now under review
    upgrade = response.json()
    assert (upgrade["id"], upgrade["tier"], upgrade["status"], upgrade["awaiting_review"]) == (
        basic["id"], "basic", "active", "upgrade")
    again = await client.post(f"/v1/residents/{resident_id}/registrations", json=premium(MITOYO, resident_id),
                              headers=resident_auth(settings, resident_id))
    assert_problem(again, 409, "already-registered")
    approved = await client.post(f"/v1/registrations/{basic['id']}/approve", headers=staff_auth(settings, MITOYO))
    assert (approved.json()["tier"], approved.json()["status"]) == ("premium", "active")
    events = await events_of(settings, pool, resident_id, 3)
    assert [e.type for e in events] == [
        ResidentRegistered.event_type, PremiumRequested.event_type, PremiumApproved.event_type,
    ]


async def test_renewal_needs_a_new_activity_record(
    client: httpx.AsyncClient, settings: Settings, pool: asyncpg.Pool
) -> None:
    resident_id = await create_resident(client, settings)
    requested = await register(client, settings, resident_id, premium(SUSAMI, resident_id))
    registration_id = requested["id"]
    await client.post(f"/v1/registrations/{registration_id}/approve", headers=staff_auth(settings, SUSAMI))
    # Pretend the year is nearly over: it began 300 days ago.
    began = today() - timedelta(days=300)
    await pool.execute(
        "UPDATE registrations SET valid_from = $2, valid_until = $3 WHERE id = $1",
        registration_id, began, add_years(began, 1),
    )
    before = await snapshot(pool)
    old_record = await client.post(f"/v1/registrations/{registration_id}/renew",
                                   json={"activities": activities(10, 20, 330, municipality=SUSAMI)},
                                   headers=resident_auth(settings, resident_id))
    assert_problem(old_record, 422, "activity-out-of-range")
    too_few = await client.post(f"/v1/registrations/{registration_id}/renew",
                                json={"activities": activities(10, 20, municipality=SUSAMI)},
                                headers=resident_auth(settings, resident_id))
    assert_problem(too_few, 422, "not-enough-activities")
    assert await snapshot(pool) == before

    renewal = await client.post(f"/v1/registrations/{registration_id}/renew",
                                json={"activities": activities(10, 50, 200, municipality=SUSAMI, start=3)},
                                headers=resident_auth(settings, resident_id))
    assert renewal.status_code == 200, renewal.text
    assert (renewal.json()["status"], renewal.json()["awaiting_review"]) == ("active", "renewal")
    pending = await client.post(f"/v1/registrations/{registration_id}/renew",
                                json={"activities": activities(1, 2, 3, municipality=SUSAMI)},
                                headers=resident_auth(settings, resident_id))
    assert_problem(pending, 409, "review-pending")
    approved = await client.post(f"/v1/registrations/{registration_id}/approve", headers=staff_auth(settings, SUSAMI))
    # An early renewal keeps the days left: one more year after the current one.
    assert approved.json()["valid_until"] == add_years(add_years(began, 1), 1).isoformat()
    events = await events_of(settings, pool, resident_id, 5)
    assert [e.type for e in events[-2:]] == [PremiumRequested.event_type, PremiumApproved.event_type]

    basic_id = (await register(client, settings, resident_id, {"municipality_code": SHIRAHAMA}))["id"]
    not_premium = await client.post(f"/v1/registrations/{basic_id}/renew", json={"activities": activities(1, 2, 3)},
                                    headers=resident_auth(settings, resident_id))
    assert_problem(not_premium, 409, "not-renewable")


async def test_premium_expires_once_after_its_year(
    client: httpx.AsyncClient, settings: Settings, pool: asyncpg.Pool
) -> None:
    resident_id = await create_resident(client, settings)
    requested = await register(client, settings, resident_id, premium(IKI, resident_id))
    await client.post(f"/v1/registrations/{requested['id']}/approve", headers=staff_auth(settings, IKI))
    renewal = await client.post(f"/v1/registrations/{requested['id']}/renew",
                                json={"activities": activities(0, 0, 0, municipality=IKI)},
                                headers=resident_auth(settings, resident_id))
    assert renewal.json()["awaiting_review"] == "renewal"
    yesterday = today() - timedelta(days=1)
    await pool.execute("UPDATE registrations SET valid_until = $2 WHERE id = $1", requested["id"], yesterday)

    forbidden = await client.post("/v1/admin/premium-expiry", headers=staff_auth(settings, IKI))
    assert_problem(forbidden, 403, "forbidden")
    runs = await asyncio.gather(*[
        client.post("/v1/admin/premium-expiry", headers=admin_auth(settings)) for _ in range(3)
    ])
    assert sum(r.json()["expired"] for r in runs) == 1
    row = await one(pool, "SELECT status, ended_at FROM registrations WHERE id = $1", requested["id"])
    assert row["status"] == "expired" and row["ended_at"] is not None
    # The renewal not decided in time lapses with it.
    late = await client.post(f"/v1/registrations/{requested['id']}/approve", headers=staff_auth(settings, IKI))
    assert_problem(late, 409, "already-decided")

    events = await events_of(settings, pool, resident_id, 6)
    expired = of_type(events, PremiumExpired)
    assert len(expired) == 1
    data = decoded(expired[0], PremiumExpired, resident_id)
    assert (data.registration_id, data.expired_on) == (requested["id"], today())
    prefecture = decoded(of_type(events, RegistrationWithdrawn)[0], RegistrationWithdrawn, resident_id)
    assert prefecture.municipality_code == "420000"  # 長崎県, derived from 壱岐市 alone


async def test_a_second_replica_expires_premiums_in_the_background(
    client: httpx.AsyncClient, settings: Settings, pool: asyncpg.Pool
) -> None:
    resident_id = await create_resident(client, settings)
    requested = await register(client, settings, resident_id, premium(TANABE, resident_id))
    await client.post(f"/v1/registrations/{requested['id']}/approve", headers=staff_auth(settings, TANABE))
    await pool.execute(
        "UPDATE registrations SET valid_until = $2 WHERE id = $1", requested["id"], today() - timedelta(days=3)
    )
    replica = create_app(settings, maintenance_interval_s=0.1)
    async with service_client(replica):

        async def expired() -> bool:
            status = await pool.fetchval("SELECT status FROM registrations WHERE id = $1", requested["id"])
            return bool(status == "expired")

        await eventually(expired, timeout=20)
        await asyncio.sleep(0.5)  # a few more rounds of both replicas: still one event
    events = await events_of(settings, pool, resident_id, 4)
    assert len(of_type(events, PremiumExpired)) == 1


# --- Idempotency ---------------------------------------------------------------------------------


async def test_a_repeated_post_with_the_same_key_returns_the_first_result(
    client: httpx.AsyncClient, settings: Settings, pool: asyncpg.Pool
) -> None:
    resident_id = new_resident_id()
    headers = {**resident_auth(settings, resident_id), "Idempotency-Key": "create-1"}
    first = await client.post("/v1/residents", json=hanako(), headers=headers)
    second = await client.post("/v1/residents", json=hanako(), headers=headers)
    assert (first.status_code, second.status_code) == (201, 201)
    assert first.json() == second.json() and second.headers["Idempotent-Replayed"] == "true"
    reused = await client.post("/v1/residents", json=hanako(name="山田 太郎"), headers=headers)
    assert_problem(reused, 422, "idempotency-key-reused")
    bad_key = await client.post("/v1/residents", json=hanako(), headers={**headers, "Idempotency-Key": "a key"})
    assert_problem(bad_key, 422, "invalid-idempotency-key")
    # The kit's header is bounded: a longer key is refused as a request not matching the schema.
    too_long = await client.post("/v1/residents", json=hanako(), headers={**headers, "Idempotency-Key": "x" * 300})
    assert too_long.status_code == 422

    register_headers = {**resident_auth(settings, resident_id), "Idempotency-Key": "register-1"}
    body = premium(SHIRAHAMA, resident_id)
    attempts = await asyncio.gather(*[
        client.post(f"/v1/residents/{resident_id}/registrations", json=body, headers=register_headers)
        for _ in range(3)
    ])
    assert {a.status_code for a in attempts} == {201}
    assert len({a.json()["id"] for a in attempts}) == 1
    assert await pool.fetchval("SELECT count(*) FROM registrations WHERE resident_id = $1", resident_id) == 2
    assert await pool.fetchval(
        "SELECT count(*) FROM premium_reviews pr JOIN registrations r ON r.id = pr.registration_id "
        "WHERE r.resident_id = $1", resident_id) == 1
    registration_id = attempts[0].json()["id"]

    staff = {**staff_auth(settings, SHIRAHAMA), "Idempotency-Key": "approve-1"}
    approvals = [await client.post(f"/v1/registrations/{registration_id}/approve", headers=staff) for _ in range(2)]
    assert [a.status_code for a in approvals] == [200, 200] and approvals[0].json() == approvals[1].json()
    without_key = await client.post(f"/v1/registrations/{registration_id}/approve",
                                    headers=staff_auth(settings, SHIRAHAMA))
    assert_problem(without_key, 409, "already-decided")

    events = await events_of(settings, pool, resident_id, 3)
    assert [e.type for e in events] == [
        ResidentRegistered.event_type, PremiumRequested.event_type, PremiumApproved.event_type,
    ]


async def test_a_basic_registration_is_three_statements_in_its_transaction_and_one_keyring_statement_before(
    app: FastAPI, client: httpx.AsyncClient, settings: Settings
) -> None:
    # The hot path of issue 22: the data key fetched or made before the transaction (one statement on
    # the keyring's database), then BEGIN, the resident locked with their registrations and consents,
    # both registrations in one insert, the outbox write, COMMIT. A new round trip costs every registration.
    runtime: ServiceRuntime = app.state.runtime
    resident_id = await create_resident(client, settings)
    statements: list[str] = []

    def logged(query: LoggedQuery) -> None:
        # asyncpg's own type introspection runs once per connection and type, not per request.
        if "typeinfo_tree" not in query.query and "'jit'" not in query.query:
            statements.append(" ".join(query.query.split()[:3]))

    keyring = await runtime.keyring._connections()
    pools = (keyring, runtime.pool)
    for pool in pools:
        held = [await pool.acquire() for _ in range(pool.get_max_size())]
        for conn in held:
            conn.add_query_logger(logged)
        for conn in held:
            await pool.release(conn)
    try:
        await register(client, settings, resident_id, {"municipality_code": SHIRAHAMA})
    finally:
        for pool in pools:
            held = [await pool.acquire() for _ in range(pool.get_max_size())]
            for conn in held:
                conn.remove_query_logger(logged)
            for conn in held:
                await pool.release(conn)
    assert statements == [
        "WITH wanted (subject,", "BEGIN;", "SELECT * FROM", "INSERT INTO registrations", "INSERT INTO outbox",
        "COMMIT;",
    ], statements
