"""Partners as data (issue 16): a partner registered through the gateway's admin API, without a
restart, is one a resident may consent to through registration, is accepted by certification with
its own member-number format, receives its first certificate over Kafka (the edge) and over the
HTTP feed, which no other partner can read, and the HTTP feed's long poll answers with a record
written while it waits.

The gateway, registration and certification run in-process on the real brokers and database; the
resident signs up, registers and consents through registration's API.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.certification.main import CertificationConfig
from services.certification.main import create_app as certification_app
from services.partner_gateway.main import create_app as gateway_app
from services.registration.main import create_app as registration_app
from shared.kit.settings import Settings
from tests.support import bearer, eventually, read_topic, service_client

pytestmark = pytest.mark.stack

SHIRAHAMA = "304018"
CHIYODA = "131016"
FORMAT = "^KF[0-9]{6}$"


@dataclass
class Platform:
    settings: Settings
    gateway: httpx.AsyncClient
    certification: httpx.AsyncClient
    registration: httpx.AsyncClient
    gateway_pool: Any
    certification_pool: Any
    registration_pool: Any


async def opened(p: Platform, credential: dict[str, str], sealed: dict[str, str]) -> str:
    """A sealed member number as the partner opens it: its key (``GET /v1/keys/{kid}``), then
    AES-256-GCM with the kid as additional data (docs/partners.md)."""
    response = await p.gateway.get(f"/v1/keys/{sealed['kid']}", headers=credential)
    assert response.status_code == 200, response.text

    def unb64(text: str) -> bytes:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

    key = unb64(response.json()["k"])
    return AESGCM(key).decrypt(unb64(sealed["iv"]), unb64(sealed["ct"]), sealed["kid"].encode()).decode()


@pytest.fixture(scope="module")
async def platform(settings: Settings) -> AsyncIterator[Platform]:
    gateway = gateway_app(settings)
    certification = certification_app(settings, config=CertificationConfig(expiry_interval_s=3600))
    registration = registration_app(settings, maintenance_interval_s=3600)
    async with (
        service_client(gateway) as gw, service_client(certification) as cert, service_client(registration) as reg,
    ):
        yield Platform(
            settings, gw, cert, reg, gateway.state.runtime.pool, certification.state.runtime.pool,
            registration.state.runtime.pool,
        )


def admin(settings: Settings) -> dict[str, str]:
    return bearer(settings, "admin", f"admin-{uuid.uuid4().hex[:6]}")


async def register_partner(p: Platform, code: str) -> dict[str, Any]:
    response = await p.gateway.post("/v1/partners", headers=admin(p.settings), json={
        "code": code, "name": "Kochi test ferry", "kind": "ferry", "member_number_format": FORMAT, "feed": "http",
        "programs": [{"program_id": f"{code}-fares@{SHIRAHAMA}", "municipality_codes": [SHIRAHAMA]}],
    })
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def sign_up_and_consent(p: Platform, resident: str, code: str) -> None:
    """Through registration's API: the account, a basic registration with 白浜町, then the consent
    to share the certificate with the partner registered at run time."""
    me = bearer(p.settings, "resident", resident)
    account = await p.registration.post("/v1/residents", headers=me, json={
        "name": "山田 花子", "name_kana": "ヤマダ ハナコ", "email": f"{resident}@example.jp",
        "date_of_birth": "1988-04-12", "legal_address_code": CHIYODA, "preferred_language": "ja",
    })
    assert account.status_code == 201, account.text
    registered = await p.registration.post(
        f"/v1/residents/{resident}/registrations", headers=me, json={"municipality_code": SHIRAHAMA, "tier": "basic"}
    )
    assert registered.status_code == 201, registered.text
    # A partner nobody registered is still refused: the check is against the seed and the registered.
    never = await p.registration.post(f"/v1/residents/{resident}/consents", headers=me, json={
        "purpose": "share_certificate", "partner": f"zz{uuid.uuid4().hex[:6]}",
    })
    assert never.status_code == 422 and never.json()["code"] == "unknown-partner", never.text
    consent = await p.registration.post(f"/v1/residents/{resident}/consents", headers=me, json={
        "purpose": "share_certificate", "partner": code,
    })
    assert consent.status_code == 200 and consent.json()["granted"] is True, consent.text


def application(code: str, member_number: str) -> dict[str, Any]:
    return {
        "municipality_code": SHIRAHAMA, "planned_stay_days": 60, "housing_basis": "rented",
        "address_there": "和歌山県西牟婁郡白浜町1234-5", "primary_residence_code": CHIYODA,
        "partners": [{"partner": code, "member_number": member_number}],
    }


async def read_feed(p: Platform, headers: dict[str, str], after: str = "0", wait: float = 0) -> httpx.Response:
    return await p.gateway.get("/v1/feed", params={"after": after, "wait": wait}, headers=headers, timeout=40)


async def test_a_registered_partner_gets_its_certificates_over_kafka_and_http_without_a_restart(
    platform: Platform,
) -> None:
    p = platform
    code = f"kf{uuid.uuid4().hex[:8]}"
    registered = await register_partner(p, code)
    key = {"X-Api-Key": registered["api_key"]}
    assert registered["feed_topic"] == f"partner.{code}.v1" and registered["kafka"]["credentials"] is None
    assert "SASL" in registered["kafka"]["note"]  # the embedded broker: said plainly, nothing pretended

    # Registration and certification learn the partner (gateway.partners.v1); certification
    # enforces its member-number format.
    async def known() -> bool:
        query = "SELECT 1 FROM registered_partners WHERE code = $1"
        return bool(await p.certification_pool.fetchval(query, code)) and bool(
            await p.registration_pool.fetchval(query, code)
        )

    await eventually(known, timeout=20)
    resident = f"res-{uuid.uuid4().hex[:10]}"
    await sign_up_and_consent(p, resident, code)

    async def consent_known() -> bool:
        return bool(await p.certification_pool.fetchval(
            "SELECT granted FROM share_consents WHERE resident_id = $1 AND partner = $2", resident, code
        ))

    await eventually(consent_known, timeout=20)
    as_resident = bearer(p.settings, "resident", resident)
    bad = await p.certification.post("/v1/applications", json=application(code, "12345678"), headers=as_resident)
    assert bad.status_code == 422 and bad.json()["code"] == "invalid-member-number", bad.text
    unknown = await p.certification.post(
        "/v1/applications", json=application(f"zz{uuid.uuid4().hex[:6]}", "KF123456"), headers=as_resident
    )
    assert unknown.status_code == 422 and unknown.json()["code"] == "unknown-partner", unknown.text
    applied = await p.certification.post("/v1/applications", json=application(code, "KF123456"), headers=as_resident)
    assert applied.status_code == 201, applied.text
    approved = await p.certification.post(
        f"/v1/applications/{applied.json()['application_id']}/approve", headers=bearer(p.settings, "staff",
                                                                                      municipality=SHIRAHAMA),
    )
    assert approved.status_code == 201, approved.text
    number = approved.json()["certificate_number"]

    # Over HTTP: the certificate record, waited for with a long poll.
    started = time.monotonic()
    page = await read_feed(p, key, wait=20)
    assert page.status_code == 200, page.text
    records = page.json()["records"]
    assert [r["key"] for r in records] == [number] and time.monotonic() - started < 20
    first = records[0]
    assert first["type"] == "jp.nichiiki.partner.certificate.v2" and first["subject"] == number
    assert first["value"]["programs"] == [f"{code}-fares@{SHIRAHAMA}"]
    assert page.json()["next"] == first["cursor"]
    # The member number is sealed for this partner on the HTTP feed too; its key opens it.
    sealed = first["value"]["member_number"]
    assert "KF123456" not in json.dumps(first) and sealed["kid"] == f"partner:{code}:{first['value']['resident_ref']}"
    assert await opened(p, key, sealed) == "KF123456"

    # Over Kafka, on the edge: the same record (same ce_id, key and value).
    topic = p.settings.topic(f"partner.{code}.v1")
    kafka = await read_topic(p.settings, topic, until=lambda rs: len(rs) >= 1, timeout=20)
    assert [(r.key.decode(), dict(r.headers)["ce_id"].decode()) for r in kafka] == [(number, first["id"])]
    assert kafka[0].value is not None and first["value"] == json.loads(kafka[0].value)

    # The delivery record (APPI) has the one delivery, whichever way the partner reads it.
    delivered = await p.gateway_pool.fetch("SELECT event_id FROM deliveries WHERE partner = $1", code)
    assert [str(row["event_id"]) for row in delivered] == [first["id"]]

    # Another partner's credential never reads this feed: its own (none of these records).
    for other in ({"X-Api-Key": (await issue_key(p, "jal"))}, bearer(p.settings, "partner", partner="ana")):
        theirs = await read_feed(p, other)
        assert theirs.status_code == 200
        assert all(r["subject"] != number for r in theirs.json()["records"])
    assert (await read_feed(p, {"X-Api-Key": "nchk_not-a-key"})).status_code == 401
    assert (await read_feed(p, admin(p.settings))).status_code == 403

    # The long poll answers with a record written while it waits: the consent revoked (through
    # registration), so a withdrawal then the certificate's tombstone (served, value null).
    cursor = page.json()["next"]
    waiting = asyncio.create_task(read_feed(p, key, after=cursor, wait=20))
    await asyncio.sleep(1.0)
    assert not waiting.done()
    started = time.monotonic()
    revoked = await p.registration.delete(
        f"/v1/residents/{resident}/consents/share_certificate", params={"partner": code}, headers=as_resident
    )
    assert revoked.status_code == 200 and revoked.json()["granted"] is False, revoked.text
    answered = await waiting
    assert answered.status_code == 200 and time.monotonic() - started < 15
    later = answered.json()["records"]
    assert later[0]["type"] == "jp.nichiiki.partner.withdrawal.v1" and later[0]["key"] == number
    assert int(later[0]["cursor"]) > int(cursor)
    rest = (await read_feed(p, key, after=later[-1]["cursor"], wait=5)).json()["records"] if len(later) == 1 else []
    tombstone = (later + rest)[1]
    assert tombstone["key"] == number and tombstone["value"] is None and tombstone["type"] is None


async def issue_key(p: Platform, partner: str) -> str:
    response = await p.gateway.post(f"/v1/partners/{partner}/api-keys", json={"label": "onboarding"},
                                    headers=admin(p.settings))
    assert response.status_code == 201, response.text
    secret: str = response.json()["api_key"]
    return secret


async def test_a_registration_with_an_unbounded_or_unanchored_format_is_refused(platform: Platform) -> None:
    p = platform
    for pattern in ("[0-9]{8}", "^[0-9]+$", "^(a|b)*$", "^[0-9]{65}$", "^([$"):
        response = await p.gateway.post("/v1/partners", headers=admin(p.settings), json={
            "code": f"kf{uuid.uuid4().hex[:8]}", "name": "x", "kind": "bus", "member_number_format": pattern,
        })
        assert response.status_code == 422, (pattern, response.text)
        assert response.json()["code"] in ("invalid-member-number-format", "validation-error"), response.text
    taken = await p.gateway.post("/v1/partners", headers=admin(p.settings), json={
        "code": "jal", "name": "again", "kind": "airline", "member_number_format": "^[0-9]{9}$",
    })
    assert taken.status_code == 409 and taken.json()["code"] == "partner-exists"
