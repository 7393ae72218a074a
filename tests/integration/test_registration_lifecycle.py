"""Registration over the real broker and database: consents, contact, withdrawal, erasure, staff lists."""

from __future__ import annotations

import csv
import io
import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from services.registration import handlers
from services.registration.main import create_app
from shared.contracts.partners import PartnerRegistered
from shared.contracts.registration import (
    ConsentChanged,
    ContactChanged,
    RegistrationWithdrawn,
    ResidentErased,
    ResidentRegistered,
    ResidentWithdrawn,
)
from shared.contracts.topics import ERASURES, GATEWAY_PARTNERS
from shared.kit.envelope import new_envelope
from shared.kit.service import ServiceRuntime
from shared.kit.settings import Settings
from tests.integration.test_registration_support import (
    SHIRAHAMA,
    TABLES,
    TANABE,
    WAKAYAMA,
    activities,
    admin_auth,
    assert_problem,
    create_resident,
    decoded,
    events_of,
    hanako,
    new_resident_id,
    of_type,
    one,
    opened_contact,
    premium,
    register,
    relayed,
    resident_auth,
    snapshot,
    staff_auth,
)
from tests.support import eventually, produce, service_client

SADO = "152242"  # 新潟県佐渡市: only the staff-list test registers here
SANJO = "152048"  # 新潟県三条市


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


# --- Consents ------------------------------------------------------------------------------------


async def test_consents_are_granted_and_revoked_and_both_are_events(
    client: httpx.AsyncClient, settings: Settings, pool: asyncpg.Pool
) -> None:
    resident_id = await create_resident(
        client, settings, consents=[{"purpose": "email"}, {"purpose": "share_certificate", "partner": "jal"}]
    )
    me = resident_auth(settings, resident_id)
    granted = await client.post(f"/v1/residents/{resident_id}/consents", json={"purpose": "newsletter"},
                                headers={**me, "Idempotency-Key": "newsletter"})
    assert granted.status_code == 200 and granted.json()["granted"] is True
    replay = await client.post(f"/v1/residents/{resident_id}/consents", json={"purpose": "newsletter"},
                               headers={**me, "Idempotency-Key": "newsletter"})
    assert replay.json() == granted.json()
    already = await client.post(f"/v1/residents/{resident_id}/consents", json={"purpose": "newsletter"}, headers=me)
    assert already.status_code == 200 and already.json()["at"] == granted.json()["at"]  # unchanged, no event

    revoked = await client.delete(f"/v1/residents/{resident_id}/consents/share_certificate?partner=jal", headers=me)
    assert revoked.status_code == 200 and revoked.json()["granted"] is False
    again = await client.delete(f"/v1/residents/{resident_id}/consents/share_certificate?partner=jal", headers=me)
    assert again.status_code == 200 and again.json()["at"] == revoked.json()["at"]

    before = await snapshot(pool)
    never = await client.delete(f"/v1/residents/{resident_id}/consents/share_certificate?partner=ana", headers=me)
    assert_problem(never, 404, "consent-not-found")
    no_partner = await client.delete(f"/v1/residents/{resident_id}/consents/share_certificate", headers=me)
    assert_problem(no_partner, 422, "consent-partner-required")
    unknown_purpose = await client.delete(f"/v1/residents/{resident_id}/consents/telemarketing", headers=me)
    assert_problem(unknown_purpose, 422, "invalid-request")
    unknown_partner = await client.post(f"/v1/residents/{resident_id}/consents",
                                        json={"purpose": "share_certificate", "partner": "zipair"}, headers=me)
    assert_problem(unknown_partner, 422, "unknown-partner")
    someone_else = await client.post(f"/v1/residents/{resident_id}/consents", json={"purpose": "email"},
                                     headers=resident_auth(settings, new_resident_id()))
    assert_problem(someone_else, 403, "forbidden")
    assert await snapshot(pool) == before

    listed = await client.get(f"/v1/residents/{resident_id}/consents", headers=me)
    assert {(c["purpose"], c["partner"], c["granted"]) for c in listed.json()} == {
        ("email", None, True), ("share_certificate", "jal", False), ("newsletter", None, True)}
    assert await pool.fetchval("SELECT count(*) FROM consent_log WHERE resident_id = $1", resident_id) == 4

    await register(client, settings, resident_id, {"municipality_code": SHIRAHAMA})
    events = await events_of(settings, pool, resident_id, 5)
    changes = [decoded(e, ConsentChanged, resident_id) for e in of_type(events, ConsentChanged)]
    assert [(c.purpose, c.partner, c.granted) for c in changes] == [
        ("email", None, True), ("share_certificate", "jal", True), ("newsletter", None, True),
        ("share_certificate", "jal", False),
    ]
    registered = decoded(of_type(events, ResidentRegistered)[0], ResidentRegistered, resident_id)
    assert {(c.purpose, c.partner, c.granted) for c in registered.consents} == {
        ("email", None, True), ("share_certificate", "jal", False), ("newsletter", None, True)}


async def test_a_partner_registered_through_the_gateway_can_be_consented_to(
    client: httpx.AsyncClient, settings: Settings, pool: asyncpg.Pool
) -> None:
    """Unknown until gateway.partners.v1 announces it (registration's consumer keeps the list); then
    a consent at sign-up, a grant and a revocation name it like a seeded partner."""
    code = f"kf{uuid.uuid4().hex[:8]}"
    resident_id = await create_resident(client, settings)
    me = resident_auth(settings, resident_id)
    share = {"purpose": "share_certificate", "partner": code}
    before = await client.post(f"/v1/residents/{resident_id}/consents", json=share, headers=me)
    assert_problem(before, 422, "unknown-partner")

    announced = PartnerRegistered(
        code=code, name="Kochi test ferry", kind="ferry", member_number_format="^KF[0-9]{6}$", feed_transport="http",
        registered_at=datetime.now(UTC),
    )
    envelope = new_envelope("partner_gateway", announced, subject=code, key=code)
    await produce(settings, settings.topic(GATEWAY_PARTNERS.name), [(envelope.key, envelope.data, envelope.headers())])

    async def known() -> bool:
        return bool(await pool.fetchval("SELECT 1 FROM registered_partners WHERE code = $1", code))

    await eventually(known, timeout=20)
    granted = await client.post(f"/v1/residents/{resident_id}/consents", json=share, headers=me)
    assert granted.status_code == 200 and granted.json()["granted"] is True, granted.text
    revoked = await client.delete(f"/v1/residents/{resident_id}/consents/share_certificate",
                                  params={"partner": code}, headers=me)
    assert revoked.status_code == 200 and revoked.json()["granted"] is False, revoked.text
    at_sign_up = await create_resident(client, settings, consents=[share])
    listed = await client.get(f"/v1/residents/{at_sign_up}/consents", headers=resident_auth(settings, at_sign_up))
    assert [(c["purpose"], c["partner"], c["granted"]) for c in listed.json()] == [("share_certificate", code, True)]


# --- Contact -------------------------------------------------------------------------------------


async def test_a_contact_change_is_published(
    client: httpx.AsyncClient, settings: Settings, pool: asyncpg.Pool
) -> None:
    resident_id = await create_resident(client, settings)
    me = resident_auth(settings, resident_id)
    before = await snapshot(pool)
    for body, code in [
        ({"name_kana": "Hanako"}, "invalid-kana"),
        ({"email": "not-an-email"}, "invalid-email"),
        ({"phone": "0120 1234 5672"}, "my-number-not-allowed"),
        ({"name": None}, "invalid-request"),
        ({"date_of_birth": "1990-01-01"}, "invalid-request"),
    ]:
        response = await client.patch(f"/v1/residents/{resident_id}", json=body, headers=me)
        assert_problem(response, 422, code)
    assert await snapshot(pool) == before

    unchanged = await client.patch(f"/v1/residents/{resident_id}", json={"email": "hanako.yamada@example.jp"},
                                   headers=me)
    assert unchanged.status_code == 200
    changed = await client.patch(
        f"/v1/residents/{resident_id}",
        json={"email": "hanako@shirahama.example.jp", "name_kana": "やまだ はなこ", "phone": None,
              "preferred_language": "en"},
        headers=me,
    )
    assert changed.status_code == 200, changed.text
    assert (changed.json()["email"], changed.json()["phone"]) == ("hanako@shirahama.example.jp", None)
    events = await events_of(settings, pool, resident_id, 1)
    assert len(events) == 1
    change = decoded(events[0], ContactChanged, resident_id)
    contact = await opened_contact(settings, change.contact)
    assert contact is not None
    assert contact.email == "hanako@shirahama.example.jp" and contact.name_kana == "ヤマダ ハナコ"
    assert contact.phone is None and contact.preferred_language == "en"


# --- Withdrawal of one registration --------------------------------------------------------------


async def test_withdrawing_registrations_releases_the_derived_prefecture_last(
    client: httpx.AsyncClient, settings: Settings, pool: asyncpg.Pool
) -> None:
    resident_id = await create_resident(client, settings)
    me = resident_auth(settings, resident_id)
    town = await register(client, settings, resident_id, {"municipality_code": SHIRAHAMA})
    city = await register(client, settings, resident_id, {"municipality_code": TANABE})
    prefecture_id = town["prefecture_registration_id"]

    before = await snapshot(pool)
    derived = await client.delete(f"/v1/registrations/{prefecture_id}", headers=me)
    assert_problem(derived, 409, "derived-registration")
    someone_else = await client.delete(f"/v1/registrations/{town['id']}",
                                       headers=resident_auth(settings, new_resident_id()))
    assert_problem(someone_else, 403, "forbidden")
    staff = await client.delete(f"/v1/registrations/{town['id']}", headers=staff_auth(settings, SHIRAHAMA))
    assert_problem(staff, 403, "forbidden")
    missing = await client.delete(f"/v1/registrations/{uuid.uuid4()}", headers=me)
    assert_problem(missing, 404, "registration-not-found")
    assert await snapshot(pool) == before

    first = await client.delete(f"/v1/registrations/{town['id']}", headers=me)
    assert first.status_code == 200 and first.json()["status"] == "withdrawn"
    assert await pool.fetchval("SELECT status FROM registrations WHERE id = $1", prefecture_id) == "active"
    await client.delete(f"/v1/registrations/{city['id']}", headers=me)
    assert await pool.fetchval("SELECT status FROM registrations WHERE id = $1", prefecture_id) == "withdrawn"
    repeat = await client.delete(f"/v1/registrations/{city['id']}", headers=me)
    assert repeat.status_code == 200  # already withdrawn: nothing more happens

    events = await events_of(settings, pool, resident_id, 5)
    withdrawn = [decoded(e, RegistrationWithdrawn, resident_id) for e in of_type(events, RegistrationWithdrawn)]
    assert [(w.registration_id, w.municipality_code) for w in withdrawn] == [
        (town["id"], SHIRAHAMA), (city["id"], TANABE), (prefecture_id, WAKAYAMA)]

    # A withdrawn registration may be made again; a pending premium request withdrawn cancels its review.
    pending = await register(client, settings, resident_id, premium(SHIRAHAMA, resident_id))
    await client.delete(f"/v1/registrations/{pending['id']}", headers=me)
    review = await pool.fetchval("SELECT status FROM premium_reviews WHERE registration_id = $1", pending["id"])
    assert review == "cancelled"
    closed = await client.post(f"/v1/registrations/{pending['id']}/approve", headers=staff_auth(settings, SHIRAHAMA))
    assert_problem(closed, 409, "already-decided")


# --- Erasure -------------------------------------------------------------------------------------


def _random_katakana(length: int) -> str:
    return "".join(chr(random.randint(0x30A2, 0x30F3)) for _ in range(length))


async def test_erasure_leaves_no_personal_data(
    client: httpx.AsyncClient, settings: Settings, pool: asyncpg.Pool, app: FastAPI
) -> None:
    tag = uuid.uuid4().hex[:8]
    personal = {
        "name": f"消去 花子{tag}",
        "name_kana": f"ショウキョ {_random_katakana(10)}",
        "email": f"erase-{tag}@example.jp",
        "phone": f"080-{random.randint(1000, 9999)}-{random.randint(1000, 9999)}",
    }
    resident_id = await create_resident(client, settings, **personal)
    me = resident_auth(settings, resident_id)
    created_again = await client.post("/v1/residents", json=hanako(**personal),
                                      headers={**me, "Idempotency-Key": f"create-{tag}"})
    assert_problem(created_again, 409, "resident-exists")
    await client.post(f"/v1/residents/{resident_id}/consents",
                      json={"purpose": "share_certificate", "partner": "jal"},
                      headers={**me, "Idempotency-Key": str(uuid.uuid4())})
    documents = [f"DOC-{tag}-{i}" for i in range(3)]
    premium_body = premium(
        SHIRAHAMA, resident_id,
        activities=[{**a, "document_ref": d} for a, d in zip(activities(3, 30, 60), documents, strict=True)],
    )
    approved = await register(client, settings, resident_id, premium_body)
    await client.post(f"/v1/registrations/{approved['id']}/approve",
                      headers={**staff_auth(settings, SHIRAHAMA), "Idempotency-Key": str(uuid.uuid4())})
    rejected = await register(client, settings, resident_id, premium(TANABE, resident_id))
    reason = f"{personal['name']}さんの記録が不足"
    await client.post(f"/v1/registrations/{rejected['id']}/reject",
                      json={"reason_code": "activity_not_confirmed", "note": reason},
                      headers=staff_auth(settings, TANABE))
    await client.patch(f"/v1/residents/{resident_id}", json={"phone": personal["phone"]}, headers=me)

    staff_view = await client.get(f"/v1/registrations?municipality={SHIRAHAMA}&q={tag}",
                                  headers=staff_auth(settings, SHIRAHAMA))
    assert staff_view.json()["total"] == 1

    erased = await client.delete(f"/v1/residents/{resident_id}", headers=me)
    assert erased.status_code == 204
    await relayed(pool)
    await handlers.purge_relayed_events_of_erased(app.state.runtime)  # what the maintenance job does

    # Not one column of one row of any table holds a personal value any more.
    secrets = [*personal.values(), *documents, reason, tag]
    for table in TABLES:
        rows = await pool.fetch(f"SELECT t::text AS row FROM {table} t")
        for row in rows:
            text = row["row"]
            if table == "outbox":  # payloads are bytea: look at their text too
                continue
            leaked = [s for s in secrets if s in text]
            assert not leaked, f"{table} still holds {leaked}: {text}"
    for payload in await pool.fetch("SELECT convert_from(payload, 'UTF8') AS p FROM outbox"):
        assert not [s for s in secrets if s in payload["p"]]

    person = await one(pool, "SELECT * FROM residents WHERE id = $1", resident_id)
    assert person["status"] == "erased"
    assert [person[c] for c in ("name", "name_kana", "email", "phone", "date_of_birth")] == [None] * 5
    assert person["legal_address_code"] == "130001"  # coarsened to 東京都 for statistics
    registrations = await pool.fetch("SELECT * FROM registrations WHERE resident_id = $1", resident_id)
    assert {r["status"] for r in registrations} <= {"withdrawn", "rejected"} and len(registrations) == 3
    assert {r["municipality_code"] for r in registrations} == {SHIRAHAMA, TANABE, WAKAYAMA}
    for verification in await pool.fetch("SELECT * FROM identity_verifications WHERE resident_id = $1", resident_id):
        assert verification["certificate_serial"] is None and verification["subject_ref"] is None
        # How and by whom the identity was verified stays (the attestation id is no personal data).
        assert verification["verified_at"] is not None and verification["provider"] is not None
    picked = await pool.fetch(
        "SELECT pa.* FROM premium_activities pa JOIN premium_reviews pr ON pr.id = pa.review_id "
        "JOIN registrations r ON r.id = pr.registration_id WHERE r.resident_id = $1", resident_id
    )
    assert len(picked) == 6  # three picks for 白浜町, three for 田辺市
    for activity in picked:
        # Which designated activities the person picked is theirs too: only the dates stay.
        assert activity["activity_id"] is None and activity["document_ref"] is None and activity["activity_date"]
        assert activity["name"] is None
    assert await pool.fetchval("SELECT count(*) FROM consents WHERE resident_id = $1", resident_id) == 0
    assert await pool.fetchval(
        "SELECT count(*) FROM idempotency_keys WHERE starts_with(scope, $1)", resident_id) == 0
    # The staff's stored answer of the approval named the person: forgotten too.
    assert await pool.fetchval(
        "SELECT count(*) FROM idempotency_keys WHERE strpos(body::text, $1) > 0", resident_id) == 0
    assert await pool.fetchval(
        "SELECT count(*) FROM kit_erased_residents WHERE resident_id = $1", resident_id) == 1

    # Every service is told, once; a repeated request changes nothing.
    assert (await client.delete(f"/v1/residents/{resident_id}", headers=me)).status_code == 204
    records = await events_of(settings, pool, resident_id, 1)
    withdrawals = of_type(records, ResidentWithdrawn)
    assert len(withdrawals) == 1
    withdrawn = decoded(withdrawals[0], ResidentWithdrawn, resident_id)
    assert withdrawn.resident_id == resident_id
    # ... and the same erasure, alone, for the services that read no registrations.
    erasures = await events_of(settings, pool, resident_id, 1, on=ERASURES)
    assert [e.type for e in erasures] == [ResidentErased.event_type]
    erased = decoded(erasures[0], ResidentErased, resident_id)
    assert (erased.resident_id, erased.withdrawn_at) == (resident_id, withdrawn.withdrawn_at)
    assert_problem(await client.get(f"/v1/residents/{resident_id}", headers=me), 404, "resident-not-found")
    assert_problem(await client.post(f"/v1/residents/{resident_id}/registrations",
                                     json={"municipality_code": SHIRAHAMA}, headers=me), 404, "resident-not-found")

    # The id stays a tombstone (other services keep one too): coming back needs a new identity.
    assert_problem(await client.post("/v1/residents", json=hanako(), headers=me), 409, "resident-erased")


async def test_the_contact_on_the_topic_is_sealed_and_unreadable_after_the_erasure(
    client: httpx.AsyncClient, settings: Settings, pool: asyncpg.Pool, app: FastAPI
) -> None:
    """Every copy of the contact on registration.residents.v1 (and so in every retained record and
    dead letter) is sealed with the person's key: plaintext never reaches the topic, and once the
    erasure shreds the key no copy opens, in any process."""
    tag = uuid.uuid4().hex[:8]
    personal = {
        "name": f"封印 花子{tag}", "name_kana": f"フウイン {_random_katakana(8)}",
        "email": f"sealed-{tag}@example.jp", "phone": f"080-{random.randint(1000, 9999)}-{random.randint(1000, 9999)}",
    }
    resident_id = await create_resident(client, settings, **personal)
    me = resident_auth(settings, resident_id)
    await register(client, settings, resident_id, {"municipality_code": SHIRAHAMA})
    changed = await client.patch(f"/v1/residents/{resident_id}", json={"email": f"new-{personal['email']}"},
                                 headers=me)
    assert changed.status_code == 200, changed.text
    records = await events_of(settings, pool, resident_id, 2)  # the town (and its prefecture), the change
    sealed = [decoded(e, ResidentRegistered, resident_id).contact for e in of_type(records, ResidentRegistered)]
    sealed += [decoded(e, ContactChanged, resident_id).contact for e in of_type(records, ContactChanged)]
    assert len(sealed) == 2
    plaintexts = [value.encode() for value in (*personal.values(), f"new-{personal['email']}", tag)]
    for record in records:
        assert not [p for p in plaintexts if p in record.data], record.data  # the raw record value
    opened = [await opened_contact(settings, value) for value in sealed]
    assert [c.name if c else None for c in opened] == [personal["name"]] * 2
    assert opened[-1] is not None and opened[-1].email == f"new-{personal['email']}"

    assert (await client.delete(f"/v1/residents/{resident_id}", headers=me)).status_code == 204
    # Read again from the topic, as a consumer reset to earliest or a dead-letter replay would.
    again = await events_of(settings, pool, resident_id, 3)
    assert of_type(again, ResidentWithdrawn)
    assert [await opened_contact(settings, value) for value in sealed] == [None] * 2
    runtime: ServiceRuntime = app.state.runtime
    assert await runtime.keyring.open_many(sealed) == [None] * 2
    # Nothing can be sealed for them again: a late write finds the account gone, not a fresh key.
    assert_problem(await client.patch(f"/v1/residents/{resident_id}", json={"phone": None}, headers=me),
                   404, "resident-not-found")


async def test_erasure_is_for_the_person_or_admin(
    client: httpx.AsyncClient, settings: Settings, pool: asyncpg.Pool
) -> None:
    resident_id = await create_resident(client, settings)
    before = await snapshot(pool)
    for headers in (staff_auth(settings, SHIRAHAMA), resident_auth(settings, new_resident_id())):
        assert_problem(await client.delete(f"/v1/residents/{resident_id}", headers=headers), 403, "forbidden")
    nobody = new_resident_id()
    assert_problem(await client.delete(f"/v1/residents/{nobody}", headers=resident_auth(settings, nobody)), 404,
                   "resident-not-found")
    assert await snapshot(pool) == before
    assert (await client.delete(f"/v1/residents/{resident_id}", headers=admin_auth(settings))).status_code == 204


# --- Staff lists ---------------------------------------------------------------------------------


async def test_staff_list_search_and_export_their_municipality(
    client: httpx.AsyncClient, settings: Settings, pool: asyncpg.Pool
) -> None:
    hanako_id = await create_resident(client, settings)
    jiro_id = await create_resident(client, settings, name="佐藤 次郎", name_kana="サトウ ジロウ",
                                    email="jiro.sato@example.jp")
    ichiro_id = await create_resident(client, settings, name="鈴木 一郎", name_kana="スズキ イチロウ",
                                      email="ichiro@example.jp")
    sly_id = await create_resident(client, settings, name="=HYPERLINK(\"http://x\")", name_kana="ワル",
                                   email="sly@example.jp", phone="+81-3-1234-5678")
    await register(client, settings, hanako_id, {"municipality_code": SADO})
    await register(client, settings, jiro_id, premium(SADO, jiro_id))
    withdrawn = await register(client, settings, ichiro_id, {"municipality_code": SADO})
    await client.delete(f"/v1/registrations/{withdrawn['id']}", headers=resident_auth(settings, ichiro_id))
    await register(client, settings, sly_id, {"municipality_code": SADO})
    staff = staff_auth(settings, SADO)

    async def listed(query: str) -> dict[str, Any]:
        response = await client.get(f"/v1/registrations?{query}", headers=staff)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    everything = await listed("")  # staff default to their own municipality
    assert everything["total"] == 4 and len(everything["items"]) == 4
    assert {i["municipality_code"] for i in everything["items"]} == {SADO}
    first_page, second_page = await listed("limit=3&offset=0"), await listed("limit=3&offset=3")
    assert (len(first_page["items"]), len(second_page["items"]), second_page["total"]) == (3, 1, 4)
    assert {i["id"] for i in first_page["items"]} | {i["id"] for i in second_page["items"]} == {
        i["id"] for i in everything["items"]}
    assert [i["name"] for i in (await listed("tier=premium"))["items"]] == ["佐藤 次郎"]
    assert [i["name"] for i in (await listed(f"municipality={SADO}&status=withdrawn"))["items"]] == ["鈴木 一郎"]
    assert [i["awaiting_review"] for i in (await listed("awaiting_review=true"))["items"]] == ["initial"]
    assert [i["name"] for i in (await listed("q=やまだ"))["items"]] == ["山田 花子"]  # hiragana finds katakana
    assert [i["name"] for i in (await listed("q=ｻﾄｳ"))["items"]] == ["佐藤 次郎"]  # so does half-width
    assert [i["name"] for i in (await listed("q=鈴木"))["items"]] == ["鈴木 一郎"]
    assert (await listed("q=%25"))["total"] == 0  # "%" is a character, not a wildcard
    assert (await listed("q=次郎&tier=basic"))["total"] == 0

    admin = await client.get(f"/v1/registrations?municipality={SADO}", headers=admin_auth(settings))
    assert admin.json()["total"] == 4
    assert_problem(await client.get("/v1/registrations", headers=admin_auth(settings)), 422,
                   "municipality-required")
    other_town = await client.get(f"/v1/registrations?municipality={SADO}", headers=staff_auth(settings, SANJO))
    assert_problem(other_town, 403, "forbidden")
    assert_problem(await client.get("/v1/registrations?municipality=15224", headers=staff), 422,
                   "malformed-municipality-code")
    assert_problem(await client.get("/v1/registrations", headers=resident_auth(settings, hanako_id)), 403,
                   "forbidden")
    assert_problem(await client.get("/v1/registrations?q=1234-5678-9018", headers=staff), 422,
                   "my-number-not-allowed")
    assert_problem(await client.get("/v1/registrations?limit=1000", headers=staff), 422, "invalid-request")
    assert_problem(await client.get("/v1/registrations?status=lost", headers=staff), 422, "invalid-request")

    export = await client.get("/v1/registrations/export.csv", headers=staff)
    assert export.status_code == 200
    assert export.headers["content-type"] == "text/csv; charset=utf-8"
    assert export.headers["content-disposition"].startswith(f'attachment; filename="registrations-{SADO}.csv"')
    assert export.content.startswith(b"\xef\xbb\xbf")
    rows = list(csv.DictReader(io.StringIO(export.content.decode("utf-8-sig"))))
    assert len(rows) == 4
    by_name = {r["name"]: r for r in rows}
    assert by_name["山田 花子"]["name_kana"] == "ヤマダ ハナコ"
    assert by_name["山田 花子"]["municipality_name"] == "新潟県佐渡市"
    assert by_name["佐藤 次郎"]["status"] == "pending_review"
    assert "'=HYPERLINK(\"http://x\")" in by_name  # a formula is exported as text
    assert by_name["'=HYPERLINK(\"http://x\")"]["phone"] == "'+81-3-1234-5678"
    premium_only = await client.get("/v1/registrations/export.csv?tier=premium", headers=staff)
    assert len(list(csv.DictReader(io.StringIO(premium_only.content.decode("utf-8-sig"))))) == 1
    assert_problem(await client.get(f"/v1/registrations/export.csv?municipality={SADO}",
                                    headers=staff_auth(settings, SANJO)), 403, "forbidden")


async def test_a_registration_is_shown_to_its_person_and_its_municipality(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    resident_id = await create_resident(client, settings)
    registration = await register(client, settings, resident_id, {"municipality_code": TANABE})
    path = f"/v1/registrations/{registration['id']}"
    assert (await client.get(path, headers=resident_auth(settings, resident_id))).status_code == 200
    assert (await client.get(path, headers=staff_auth(settings, TANABE))).status_code == 200
    assert (await client.get(path, headers=admin_auth(settings))).status_code == 200
    assert_problem(await client.get(path, headers=staff_auth(settings, SHIRAHAMA)), 403, "forbidden")
    assert_problem(await client.get(path, headers=resident_auth(settings, new_resident_id())), 403, "forbidden")
    assert_problem(await client.get(f"/v1/registrations/{uuid.uuid4()}", headers=admin_auth(settings)), 404,
                   "registration-not-found")
