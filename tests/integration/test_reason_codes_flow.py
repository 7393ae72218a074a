"""Reason codes across the boundary: a revocation made over HTTP, through subsidy, to a partner feed.

Certification, subsidy and the partner gateway run together here (their own databases and topics).
A staff member revokes a certificate with a reason code and a note of distinctive text: the code
travels (certificate event, grant cancellation, the partner's grant record), the note stays in
certification's audit trail and appears on no partner topic record and in no delivery row.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest_asyncio

from services.certification.main import CertificationConfig
from services.certification.main import create_app as certification_app
from services.partner_gateway.main import create_app as gateway_app
from services.subsidy.config import SubsidySettings
from services.subsidy.main import create_app as subsidy_app
from shared.contracts.certification import CertificateRevoked
from shared.contracts.partners import PartnerCertificate, PartnerGrant, certificate_of_key
from shared.contracts.registration import ConsentState, Contact, ResidentRegistered
from shared.contracts.sealed import resident_subject
from shared.contracts.subsidy import GrantCancelled
from shared.contracts.topics import CERTIFICATES, GRANTS, PARTNER_CODES, RESIDENTS, partner_feed
from shared.kit.envelope import new_envelope
from shared.kit.settings import Settings
from shared.reference import prefecture_of
from shared.stack.backends import Backends
from tests.conftest import make_settings
from tests.support import bearer, eventually, produce, read_topic, seal_for_tests, service_client

SHIRAHAMA = "304018"  # has a plan and a JAL mileage program
CHIYODA = "131016"  # the resident's legal address


@dataclass
class Platform:
    settings: Settings
    certification: httpx.AsyncClient
    pools: dict[str, asyncpg.Pool]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def platform(backends: Backends, run_id: str) -> AsyncIterator[Platform]:
    settings = make_settings(backends, f"{run_id}rsn")
    apps = {
        "certification": certification_app(settings, config=CertificationConfig(expiry_interval_s=3600)),
        "subsidy": subsidy_app(settings, SubsidySettings(sweep_interval_s=3600)),
        "partner_gateway": gateway_app(settings),
    }
    async with AsyncExitStack() as stack:
        clients = {name: await stack.enter_async_context(service_client(app)) for name, app in apps.items()}
        pools = {name: app.state.runtime.pool for name, app in apps.items()}
        yield Platform(settings, clients["certification"], pools)


def registered(resident_id: str) -> ResidentRegistered:
    now = datetime.now(UTC)
    return ResidentRegistered(
        resident_id=resident_id, registration_id=f"reg-{uuid.uuid4().hex[:8]}", municipality_code=SHIRAHAMA,
        prefecture_code=prefecture_of(SHIRAHAMA).code, tier="basic", status="active", legal_address_code=CHIYODA,
        contact=seal_for_tests(
            resident_subject(resident_id),
            Contact(name="山田 花子", name_kana="ヤマダ ハナコ", email=f"{resident_id}@example.jp"),
        ),
        consents=[ConsentState(purpose="share_certificate", partner="jal", granted=True, at=now)],
        registered_at=now,
    )


async def jal_records(p: Platform, number: str, until: Any) -> list[dict[str, Any]]:
    """The JAL feed's records of one certificate (its grants' included), decoded, in offset order."""
    topic = p.settings.topic(partner_feed("jal").name)

    def decoded(records: list[Any]) -> list[dict[str, Any]]:
        mine = [r for r in records if certificate_of_key(r.key.decode()) == number and r.value is not None]
        return [
            {"type": dict(r.headers)["ce_type"].decode(), **json.loads(r.value)}
            for r in sorted(mine, key=lambda r: r.offset)
        ]

    return decoded(await read_topic(p.settings, topic, until=lambda rs: until(decoded(rs)), timeout=40))


async def test_a_staff_note_never_reaches_a_partner_topic_or_the_delivery_record(platform: Platform) -> None:
    p = platform
    resident = f"res-{uuid.uuid4().hex[:10]}"
    staff = bearer(p.settings, "staff", municipality=SHIRAHAMA)
    envelope = new_envelope("registration", registered(resident), subject=resident)
    await produce(p.settings, p.settings.topic(RESIDENTS.name), [(envelope.key, envelope.data, envelope.headers())])

    async def resident_known() -> bool:
        return bool(await p.pools["certification"].fetchval(
            "SELECT 1 FROM resident_registrations WHERE resident_id = $1", resident))

    await eventually(resident_known, timeout=30)
    applied = await p.certification.post("/v1/applications", headers=bearer(p.settings, "resident", resident), json={
        "municipality_code": SHIRAHAMA, "planned_stay_days": 60, "housing_basis": "rented",
        "address_there": "和歌山県西牟婁郡白浜町1234-5", "primary_residence_code": CHIYODA,
        "partners": [{"partner": "jal", "member_number": "123456789"}],
    })
    assert applied.status_code == 201, applied.text
    approved = await p.certification.post(f"/v1/applications/{applied.json()['application_id']}/approve",
                                          headers=staff)
    assert approved.status_code == 201, approved.text
    number = approved.json()["certificate_number"]

    def has(records: list[dict[str, Any]], kind: str, **fields: str) -> bool:
        return any(r["type"] == kind and all(r.get(k) == v for k, v in fields.items()) for r in records)

    # JAL sees the certificate and its grant before anything is revoked.
    await jal_records(p, number, lambda rs: has(rs, PartnerGrant.event_type, state="issued"))

    # An unknown code is refused; the staff's words go in the note.
    note = f"NOTE-{uuid.uuid4()} 入院のため長期不在（精神科）、家族から連絡あり"
    token = note.split()[0]
    for body in ({"reason_code": "hospitalised", "note": note}, {"reason": note}):
        refused = await p.certification.post(f"/v1/certificates/{number}/revoke", json=body, headers=staff)
        assert refused.status_code == 422 and refused.json()["code"] == "invalid-request", refused.text
    revoked = await p.certification.post(f"/v1/certificates/{number}/revoke",
                                         json={"reason_code": "not_residing", "note": note}, headers=staff)
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["revocation_reason"] == "not_residing" and token not in revoked.text

    records = await jal_records(
        p, number,
        lambda rs: has(rs, PartnerGrant.event_type, state="cancelled")
        and has(rs, PartnerCertificate.event_type, status="revoked"),
    )
    [cancelled] = [r for r in records if r["type"] == PartnerGrant.event_type and r["state"] == "cancelled"]
    assert cancelled["reason"] == "certificate_revoked"  # a code of the published list, nothing else

    # The code went every step of the way; the note none of them.
    revocations = await read_topic(p.settings, p.settings.topic(CERTIFICATES.name), until=lambda rs: any(
        dict(r.headers)["ce_type"] == CertificateRevoked.event_type.encode() and r.key == number.encode()
        for r in rs))
    cancellations = await read_topic(p.settings, p.settings.topic(GRANTS.name), until=lambda rs: any(
        dict(r.headers)["ce_type"] == GrantCancelled.event_type.encode() and number.encode() in (r.value or b"")
        for r in rs))
    assert any(b'"reason":"not_residing"' in (r.value or b"") for r in revocations)
    assert any(b'"reason":"certificate_revoked"' in (r.value or b"") for r in cancellations)
    for topic in [CERTIFICATES.name, GRANTS.name, *(partner_feed(code).name for code in PARTNER_CODES)]:
        everything = await read_topic(p.settings, p.settings.topic(topic), until=lambda rs: False, timeout=1.0)
        for record in everything:
            seen = (record.value or b"") + b"".join(value for _, value in record.headers)
            assert token.encode() not in seen and "精神科".encode() not in seen, f"{topic}: {record}"

    # The delivery record (APPI) names what each partner got: never the note.
    deliveries = await p.pools["partner_gateway"].fetch(
        "SELECT d::text AS row FROM deliveries d WHERE certificate_number = $1", number
    )
    assert len(deliveries) >= 4  # certificate and grant, issued then revoked/cancelled
    assert not [d["row"] for d in deliveries if token in d["row"] or "精神科" in d["row"]]
    # Nor does any table of the gateway or subsidy keep it; certification's audit trail does.
    for service in ("partner_gateway", "subsidy"):
        for table in await p.pools[service].fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' "
            "AND table_type = 'BASE TABLE'"
        ):
            rows = await p.pools[service].fetch(f'SELECT t::text AS row FROM "{table["table_name"]}" t')
            assert not [r["row"] for r in rows if token in r["row"]], f"{service}.{table['table_name']}"
        payloads = await p.pools[service].fetch("SELECT convert_from(payload, 'UTF8') AS p FROM outbox")
        assert not [r["p"] for r in payloads if r["p"] and token in r["p"]], f"{service}.outbox"
    audit = await p.pools["certification"].fetchrow(
        "SELECT a.reason, a.details, n.note FROM audit_trail AS a LEFT JOIN audit_notes AS n ON n.audit_id = a.id "
        "WHERE a.target_id = $1 AND a.action = 'certificate.revoked'", number
    )
    # The note is kept beside the audit entry (erasable with the resident), never in the entry itself.
    assert audit is not None and audit["reason"] == "not_residing" and token in audit["note"]
    assert token not in audit["details"]
