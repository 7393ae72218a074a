"""Partner gateway over the real broker, PostgreSQL and Redis: feeds, verification, credentials, records.

Upstream services are simulated by publishing their contract events to the (prefixed) topics.
Partners are played with their own Kafka client (confluent-kafka / librdkafka).
"""

from __future__ import annotations

import asyncio
import base64
import csv
import hashlib
import hmac
import io
import json
import random
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import jsonschema  # type: ignore[import-untyped]
import pytest
from aiokafka.partitioner import murmur2
from confluent_kafka import Consumer, KafkaError
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fastapi import FastAPI
from redis.asyncio import Redis

from services.partner_gateway.api import VerificationHotPath
from services.partner_gateway.main import create_app
from shared.contracts.base import EVENT_MODELS, EventData
from shared.contracts.catalog import json_schema
from shared.contracts.certification import (
    CertificateExpired,
    CertificateIssued,
    CertificateRenewed,
    CertificateRevoked,
)
from shared.contracts.common import SealedMembership
from shared.contracts.formats import CertificateNumber
from shared.contracts.partners import (
    PartnerCertificate,
    PartnerGrant,
    PartnerWithdrawal,
    certificate_of_key,
    grant_key,
)
from shared.contracts.registration import (
    ConsentChanged,
    ConsentState,
    ResidentRegistered,
    ResidentWithdrawn,
)
from shared.contracts.sealed import Sealed, resident_subject
from shared.contracts.subsidy import GrantCancelled, GrantIssued, GrantRedeemed
from shared.contracts.topics import CERTIFICATES, GRANTS, PARTNER_FEED, RESIDENTS, Topic
from shared.kit.clock import SYSTEM_CLOCK
from shared.kit.envelope import Envelope, new_envelope, parse_envelope
from shared.kit.keyring import Keyring
from shared.kit.my_number import check_digit
from shared.kit.settings import Settings
from shared.reference import prefecture_of
from tests.support import bearer, eventually, produce, read_topic, service_client

SHIRAHAMA = "304018"  # JAL only
IKI = "422100"  # JAL and Kyushu Yusen
SUSAKI = "392065"  # ANA only
TODAY = SYSTEM_CLOCK.today()
FORBIDDEN_FIELDS = {"name", "name_kana", "address", "birth_date", "email", "phone", "contact", "resident_id"}

pytestmark = pytest.mark.stack


# --- The running gateway -------------------------------------------------------------------------


@dataclass
class Gateway:
    app: FastAPI
    client: httpx.AsyncClient
    settings: Settings
    keys: dict[str, str]  # partner → API key issued in this module

    @property
    def pool(self) -> Any:
        return self.app.state.runtime.pool

    def key(self, partner: str) -> dict[str, str]:
        return {"X-Api-Key": self.keys[partner]}

    @property
    def keyring(self) -> Keyring:
        keyring: Keyring = self.app.state.runtime.keyring
        return keyring


@pytest.fixture(scope="module")
async def gw(settings: Settings) -> AsyncIterator[Gateway]:
    app = create_app(settings)
    async with service_client(app) as client:
        keys: dict[str, str] = {}
        for partner in ("jal", "ana", "kyushuyusen"):
            response = await client.post(
                f"/v1/partners/{partner}/api-keys", json={"label": "tests"}, headers=bearer(settings, "admin")
            )
            assert response.status_code == 201, response.text
            keys[partner] = response.json()["api_key"]
        yield Gateway(app, client, settings, keys)


# --- Upstream events -----------------------------------------------------------------------------


def new_number(municipality: str) -> str:
    return CertificateNumber.format(municipality, 2026, random.randint(1, CertificateNumber.MAX_SEQUENCE))


def new_resident() -> str:
    # 11 hex digits: never twelve digits in a row, the shape of a My Number, which the guard refuses
    return f"res-{uuid.uuid4().hex[:11]}"


def memberships(*partners: str) -> list[SealedMembership]:
    """Memberships without member numbers (``members``: with them, sealed)."""
    return [SealedMembership(partner=p) for p in partners]


async def members(gw: Gateway, resident_id: str, *partners: str, **member_numbers: str) -> list[SealedMembership]:
    """Memberships with their member numbers sealed under the resident's key, as certification sends them."""
    return [
        SealedMembership(
            partner=p,
            member_number=None if p not in member_numbers
            else await gw.keyring.seal(resident_subject(resident_id), member_numbers[p]),
        )
        for p in partners
    ]


def unopened_contact(resident_id: str) -> Sealed:
    """A sealed contact the gateway never opens (it reads only the consents of a registration)."""
    return Sealed(kid=resident_subject(resident_id), iv="AAAAAAAAAAAAAAAA", ct="bm90IG9wZW5lZCBoZXJl")


async def opened_by_partner(gw: Gateway, partner: str, sealed: dict[str, Any]) -> str:
    """What the partner reads in a sealed member number: its key from ``GET /v1/keys/{kid}``, then
    AES-256-GCM with the kid as additional data (docs/partners.md)."""
    response = await gw.client.get(f"/v1/keys/{sealed['kid']}", headers=gw.key(partner))
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["kid"] == sealed["kid"] and body["alg"] == "A256GCM"

    def unb64(text: str) -> bytes:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

    plain = AESGCM(unb64(body["k"])).decrypt(unb64(sealed["iv"]), unb64(sealed["ct"]), sealed["kid"].encode())
    return plain.decode()


def certificate_fields(
    number: str, resident_id: str, partners: list[SealedMembership], *, status: str = "valid",
    valid_from: date = TODAY - timedelta(days=1), valid_until: date = TODAY + timedelta(days=364),
) -> dict[str, Any]:
    return {
        "certificate_number": number, "resident_id": resident_id,
        "municipality_code": CertificateNumber.parse(number).municipality_code,
        "valid_from": valid_from, "valid_until": valid_until, "status": status, "partners": partners,
    }


def issued(number: str, resident_id: str, partners: list[SealedMembership], **kw: Any) -> CertificateIssued:
    return CertificateIssued(
        **certificate_fields(number, resident_id, partners, **kw), application_id=f"app-{uuid.uuid4().hex[:8]}",
        issued_at=datetime.now(UTC),
    )


def registered(resident_id: str, municipality: str, consents: list[tuple[str, bool]]) -> ResidentRegistered:
    now = datetime.now(UTC)
    return ResidentRegistered(
        resident_id=resident_id, registration_id=f"reg-{uuid.uuid4().hex[:8]}", municipality_code=municipality,
        prefecture_code=prefecture_of(municipality).code, tier="basic", status="active", legal_address_code="131016",
        contact=unopened_contact(resident_id),
        consents=[ConsentState(purpose="share_certificate", partner=p, granted=g, at=now) for p, g in consents],
        registered_at=now,
    )


def consent(resident_id: str, partner: str | None, granted: bool) -> ConsentChanged:
    return ConsentChanged(
        resident_id=resident_id, purpose="share_certificate", partner=partner, granted=granted, at=datetime.now(UTC)
    )


def new_grant_id() -> str:
    return f"gr-{uuid.uuid4().hex[:8]}"


def grant_issued(
    number: str, resident_id: str, partner: str, program: str, grant_id: str | None = None
) -> GrantIssued:
    return GrantIssued(
        grant_id=grant_id or new_grant_id(), program_id=program, partner=partner, mechanism="mileage_grant",
        certificate_number=number, resident_id=resident_id,
        municipality_code=CertificateNumber.parse(number).municipality_code, unit="miles",
        reserved=30000, window_from=TODAY, window_until=TODAY + timedelta(days=122),
        member_number=None, issued_at=datetime.now(UTC),
    )


SOURCES = {RESIDENTS.name: "registration", CERTIFICATES.name: "certification", GRANTS.name: "subsidy"}


async def publish(gw: Gateway, topic: Topic, data: EventData, subject: str, *, settle: bool = True) -> Envelope:
    envelope = new_envelope(SOURCES[topic.name], data, subject=subject)
    await produce(gw.settings, gw.settings.topic(topic.name), [(envelope.key, envelope.data, envelope.headers())])
    if settle:
        await settled(gw, envelope)
    return envelope


async def settled(gw: Gateway, envelope: Envelope) -> None:
    """The gateway handled the event (inbox row) and relayed everything it caused (empty outbox)."""

    async def done() -> bool:
        handled = await gw.pool.fetchval("SELECT 1 FROM inbox WHERE event_id = $1", envelope.id)
        pending = await gw.pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        return bool(handled) and pending == 0

    await eventually(done, timeout=20)


# --- Reading partner feeds -------------------------------------------------------------------------


@dataclass(frozen=True)
class FeedRecord:
    key: str
    value: bytes | None
    headers: dict[str, str]
    partition: int = -1

    @property
    def type(self) -> str | None:
        return self.headers.get("ce_type")

    def data(self) -> dict[str, Any]:
        assert self.value is not None
        parsed: dict[str, Any] = json.loads(self.value)
        return parsed


async def feed(gw: Gateway, partner: str, number: str, *, count: int, timeout: float = 10.0) -> list[FeedRecord]:
    """The records of one certificate on a partner's topic, its grants' included (keys ``number`` and
    ``number/grants/<id>``), in order (waits for ``count`` of them)."""
    topic = gw.settings.topic(f"partner.{partner}.v1")

    def mine(records: list[Any]) -> list[Any]:
        return [r for r in records if certificate_of_key(r.key.decode()) == number]

    records = mine(await read_topic(gw.settings, topic, until=lambda rs: len(mine(rs)) >= count, timeout=timeout))
    assert len({r.partition for r in records}) <= 1, "a certificate's records are on one partition"
    return [
        FeedRecord(r.key.decode(), r.value, {k: v.decode() for k, v in r.headers}, r.partition)
        for r in sorted(records, key=lambda r: r.offset)
    ]


def partition_of(key: str) -> int:
    """Where the default partitioner (murmur2) puts a key on a partner feed."""
    return int(murmur2(key.encode()) & 0x7FFFFFFF) % PARTNER_FEED.partitions


def number_apart_from(municipality: str, grant_ids: list[str]) -> str:
    """A certificate number whose grants' own keys would go to another partition than the number:
    only placement by the certificate number puts those grants with their certificate."""
    while True:
        number = new_number(municipality)
        if all(partition_of(grant_key(number, g)) != partition_of(number) for g in grant_ids):
            return number


async def partner_key(gw: Gateway, partner: str) -> bytes:
    return bytes(await gw.pool.fetchval("SELECT pseudonym_key FROM partners WHERE code = $1", partner))


def ref(key: bytes, resident_id: str) -> str:
    return hmac.new(key, resident_id.encode(), hashlib.sha256).hexdigest()


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["code"] == code
    return body


# --- Partners and credentials --------------------------------------------------------------------


async def test_partners_are_seeded_from_the_travel_programs_once(gw: Gateway) -> None:
    response = await gw.client.get("/v1/partners", headers=bearer(gw.settings, "admin"))
    assert response.status_code == 200
    body = response.json()
    partners = {p["code"]: p for p in body["items"]}
    assert set(partners) == {"jal", "ana", "jreast", "sadokisen", "kyushuyusen"}
    assert partners["jal"]["kind"] == "airline" and partners["sadokisen"]["kind"] == "ferry"
    assert partners["jal"]["programs"] == [
        {"program_id": "jal-dual-residence-miles",
         "municipality_codes": sorted(["016331", "302066", SHIRAHAMA, "304069", "372081", IKI])}
    ]
    assert "pseudonym_key" not in response.text
    keys = {r["code"]: bytes(r["pseudonym_key"]) for r in await gw.pool.fetch("SELECT * FROM partners")}
    assert all(len(k) == 32 for k in keys.values()) and len(set(keys.values())) == 5

    # Seeding again (a restart, a second replica) keeps every key: resident references stay stable.
    from services.partner_gateway.handlers import seed_partners

    async with gw.pool.acquire() as conn:
        await seed_partners(conn)
    again = {r["code"]: bytes(r["pseudonym_key"]) for r in await gw.pool.fetch("SELECT * FROM partners")}
    assert again == keys
    assert await gw.pool.fetchval("SELECT count(*) FROM partner_programs WHERE partner = 'ana'") == 9


async def test_api_keys_are_issued_once_stored_hashed_and_revocable(gw: Gateway) -> None:
    admin = bearer(gw.settings, "admin")
    response = await gw.client.post("/v1/partners/jreast/api-keys", json={"label": "booking"}, headers=admin)
    assert response.status_code == 201
    assert response.headers["cache-control"] == "no-store"
    created = response.json()
    secret = created["api_key"]
    assert created["partner"] == "jreast" and secret.startswith(created["prefix"])
    row = await gw.pool.fetchrow("SELECT * FROM partner_api_keys WHERE id = $1", uuid.UUID(created["id"]))
    assert row["key_hash"] == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in json.dumps({k: str(v) for k, v in dict(row).items()})
    listed = await gw.client.get("/v1/partners", headers=admin)
    assert secret not in listed.text and created["id"] in listed.text

    number = new_number("152048")
    unknown = await gw.client.get(f"/v1/certificates/{number}", headers={"X-Api-Key": secret})
    assert_problem(unknown, 404, "certificate-not-found")  # authenticated: the key works

    revoked = await gw.client.delete(f"/v1/partners/jreast/api-keys/{created['id']}", headers=admin)
    assert revoked.status_code == 204
    after = await gw.client.get(f"/v1/certificates/{number}", headers={"X-Api-Key": secret})
    assert_problem(after, 401, "invalid-api-key")
    revoked_at = await gw.pool.fetchval("SELECT revoked_at FROM partner_api_keys WHERE id = $1", row["id"])
    again = await gw.client.delete(f"/v1/partners/jreast/api-keys/{created['id']}", headers=admin)
    assert again.status_code == 204
    assert await gw.pool.fetchval("SELECT revoked_at FROM partner_api_keys WHERE id = $1", row["id"]) == revoked_at


async def test_bad_requests_on_the_admin_endpoints_write_nothing(gw: Gateway) -> None:
    admin = bearer(gw.settings, "admin")
    before = await gw.pool.fetchval("SELECT count(*) FROM partner_api_keys")
    assert_problem(await gw.client.post("/v1/partners/lufthansa/api-keys", headers=admin), 404, "partner-not-found")
    assert_problem(
        await gw.client.post("/v1/partners/jal/api-keys", json={"label": "x", "role": "admin"}, headers=admin),
        422, "invalid-request",
    )
    assert_problem(await gw.client.post("/v1/partners/jal/api-keys", headers=gw.key("jal")), 403, "forbidden")
    assert_problem(
        await gw.client.post("/v1/partners/jal/api-keys", headers=bearer(gw.settings, "partner", partner="jal")),
        403, "forbidden",
    )
    assert_problem(
        await gw.client.post(
            "/v1/partners/jal/api-keys", headers=bearer(gw.settings, "staff", municipality=SHIRAHAMA)
        ),
        403, "forbidden",
    )
    assert_problem(await gw.client.post("/v1/partners/jal/api-keys"), 401, "unauthenticated")
    assert_problem(
        await gw.client.post("/v1/partners/jal/api-keys", headers={"Authorization": "Bearer not-a-jwt"}),
        401, "unauthenticated",
    )
    assert await gw.pool.fetchval("SELECT count(*) FROM partner_api_keys") == before

    jal_key = await gw.pool.fetchval("SELECT id FROM partner_api_keys WHERE partner = 'jal' LIMIT 1")
    assert_problem(await gw.client.delete(f"/v1/partners/ana/api-keys/{jal_key}", headers=admin), 404,
                   "api-key-not-found")
    assert_problem(await gw.client.delete(f"/v1/partners/jal/api-keys/{uuid.uuid4()}", headers=admin), 404,
                   "api-key-not-found")
    assert_problem(await gw.client.delete("/v1/partners/jal/api-keys/not-a-uuid", headers=admin), 422,
                   "invalid-request")
    assert_problem(await gw.client.delete(f"/v1/partners/jal/api-keys/{jal_key}", headers=gw.key("jal")), 403,
                   "forbidden")
    assert await gw.pool.fetchval("SELECT count(*) FROM partner_api_keys WHERE revoked_at IS NOT NULL "
                                  "AND id = $1", jal_key) == 0


# --- The feeds -------------------------------------------------------------------------------------


async def test_a_certificate_reaches_exactly_the_partners_that_serve_it_and_were_consented(gw: Gateway) -> None:
    resident = new_resident()
    await publish(gw, RESIDENTS, registered(resident, SHIRAHAMA, [("jal", True)]), resident)
    # White beach town: only JAL runs a program there, so ANA gets nothing although it is listed.
    shirahama = new_number(SHIRAHAMA)
    certified_as = await members(gw, resident, "jal", "ana", jal="JMB-1234")
    await publish(gw, CERTIFICATES, issued(shirahama, resident, certified_as), shirahama)
    # Iki: JAL and Kyushu Yusen run programs, but the resident consented to JAL only.
    iki = new_number(IKI)
    await publish(gw, CERTIFICATES, issued(iki, resident, memberships("jal")), iki)

    jal_key = await partner_key(gw, "jal")
    [record] = await feed(gw, "jal", shirahama, count=1)
    assert record.type == PartnerCertificate.event_type
    assert record.headers["ce_subject"] == shirahama and record.headers["ce_source"] == "/nichiiki/partner_gateway"
    data = record.data()
    assert data == {
        "certificate_number": shirahama, "status": "valid", "valid_from": str(TODAY - timedelta(days=1)),
        "valid_until": str(TODAY + timedelta(days=364)), "municipality_code": SHIRAHAMA,
        "programs": ["jal-dual-residence-miles"], "resident_ref": ref(jal_key, resident),
        "member_number": data["member_number"], "changed_at": data["changed_at"],
    }
    assert resident.encode() not in (record.value or b"")
    # Sealed for JAL about this resident: the raw record holds no readable member number.
    assert data["member_number"]["kid"] == f"partner:jal:{ref(jal_key, resident)}"
    assert b"JMB-1234" not in (record.value or b"")
    assert await opened_by_partner(gw, "jal", data["member_number"]) == "JMB-1234"
    [iki_record] = await feed(gw, "jal", iki, count=1)
    assert iki_record.data()["member_number"] is None
    assert iki_record.data()["resident_ref"] == data["resident_ref"]  # stable for one partner

    for partner, number in (("ana", shirahama), ("kyushuyusen", iki), ("kyushuyusen", shirahama), ("ana", iki)):
        assert await feed(gw, partner, number, count=1, timeout=1.0) == []
    rows = await gw.pool.fetch(
        "SELECT partner, certificate_number FROM deliveries WHERE certificate_number = ANY($1)", [shirahama, iki]
    )
    assert sorted((r["partner"], r["certificate_number"]) for r in rows) == sorted(
        [("jal", shirahama), ("jal", iki)]
    )


async def test_references_are_unlinkable_across_partners(gw: Gateway) -> None:
    resident = new_resident()
    number = new_number(IKI)
    await publish(gw, CERTIFICATES, issued(number, resident, memberships("jal", "kyushuyusen")), number)
    [jal] = await feed(gw, "jal", number, count=1)
    [kyushu] = await feed(gw, "kyushuyusen", number, count=1)
    assert jal.data()["resident_ref"] == ref(await partner_key(gw, "jal"), resident)
    assert kyushu.data()["resident_ref"] == ref(await partner_key(gw, "kyushuyusen"), resident)
    assert jal.data()["resident_ref"] != kyushu.data()["resident_ref"]
    assert kyushu.data()["programs"] == ["iki-island-routes"] and jal.data()["programs"] == ["jal-dual-residence-miles"]


async def test_consent_revoked_sends_withdrawal_then_tombstone_and_nothing_after(gw: Gateway) -> None:
    resident = new_resident()
    number = new_number(IKI)
    certified_as = await members(gw, resident, "jal", "kyushuyusen", jal="JMB-9")
    await publish(gw, CERTIFICATES, issued(number, resident, certified_as), number)
    revoke = await publish(gw, RESIDENTS, consent(resident, "jal", False), resident)

    records = await feed(gw, "jal", number, count=3)
    assert [r.type for r in records] == [PartnerCertificate.event_type, PartnerWithdrawal.event_type, None]
    withdrawal = records[1].data()
    assert withdrawal["reason"] == "consent_revoked"
    assert withdrawal["resident_ref"] == records[0].data()["resident_ref"]
    assert records[2].value is None and records[2].key == number  # the tombstone
    verify = await gw.client.get(f"/v1/certificates/{number}", headers=gw.key("jal"))
    assert_problem(verify, 404, "certificate-not-found")
    ok = await gw.client.get(f"/v1/certificates/{number}", headers=gw.key("kyushuyusen"))
    assert ok.status_code == 200  # the other partner's consent stands

    # The same revocation again (redelivery) and later events: nothing more for JAL.
    consumer = gw.app.state.runtime.consumers[0]
    duplicates = consumer.stats.duplicates
    await produce(gw.settings, gw.settings.topic(RESIDENTS.name), [(revoke.key, revoke.data, revoke.headers())])

    async def seen_again() -> bool:
        return bool(consumer.stats.duplicates > duplicates)

    await eventually(seen_again)
    renewed = CertificateRenewed(
        **certificate_fields(number, resident, memberships("jal", "kyushuyusen"), valid_until=TODAY + timedelta(400)),
        renewed_at=datetime.now(UTC),
    )
    await publish(gw, CERTIFICATES, renewed, number)
    await publish(gw, GRANTS, grant_issued(number, resident, "jal", "jal-dual-residence-miles"), number)
    assert len(await feed(gw, "jal", number, count=4, timeout=1.5)) == 3
    assert len(await feed(gw, "kyushuyusen", number, count=2)) == 2
    kinds = await gw.pool.fetch(
        "SELECT record_type, consent_source FROM deliveries WHERE partner = 'jal' AND certificate_number = $1 "
        "ORDER BY id", number,
    )
    assert [(k["record_type"], k["consent_source"]) for k in kinds] == [
        (PartnerCertificate.event_type, "certificate_membership"),
        (PartnerWithdrawal.event_type, "consent_revocation"),
        ("tombstone", "consent_revocation"),
    ]


async def test_a_revocation_that_comes_first_keeps_the_certificate_from_the_partner(gw: Gateway) -> None:
    resident = new_resident()
    await publish(gw, RESIDENTS, registered(resident, IKI, [("jal", True), ("kyushuyusen", False)]), resident)
    number = new_number(IKI)
    await publish(gw, CERTIFICATES, issued(number, resident, memberships("jal", "kyushuyusen")), number)
    assert len(await feed(gw, "jal", number, count=1)) == 1
    assert await feed(gw, "kyushuyusen", number, count=1, timeout=1.0) == []
    assert await gw.pool.fetchval(
        "SELECT consent_source FROM deliveries WHERE partner = 'jal' AND certificate_number = $1", number
    ) == "registration_consent"

    # Consent given again later: the partner gets the certificate as it stands.
    await publish(gw, RESIDENTS, consent(resident, "kyushuyusen", True), resident)
    [record] = await feed(gw, "kyushuyusen", number, count=1)
    assert record.data()["status"] == "valid"


async def test_a_membership_dropped_at_renewal_withdraws_the_certificate(gw: Gateway) -> None:
    resident = new_resident()
    number = new_number(IKI)
    await publish(gw, CERTIFICATES, issued(number, resident, memberships("jal", "kyushuyusen")), number)
    renewed = CertificateRenewed(
        **certificate_fields(number, resident, memberships("jal")), renewed_at=datetime.now(UTC)
    )
    await publish(gw, CERTIFICATES, renewed, number)
    records = await feed(gw, "kyushuyusen", number, count=3)
    assert [r.type for r in records] == [PartnerCertificate.event_type, PartnerWithdrawal.event_type, None]
    assert len(await feed(gw, "jal", number, count=2)) == 2


async def test_resident_withdrawal_reaches_every_partner_and_erases_the_projection(gw: Gateway) -> None:
    resident = new_resident()
    await publish(gw, RESIDENTS, registered(resident, IKI, [("jal", True)]), resident)
    number = new_number(IKI)
    certified_as = await members(gw, resident, "jal", "kyushuyusen", jal="JMB-7")
    await publish(gw, CERTIFICATES, issued(number, resident, certified_as), number)
    await publish(gw, RESIDENTS, ResidentWithdrawn(resident_id=resident, withdrawn_at=datetime.now(UTC)), resident)

    for partner in ("jal", "kyushuyusen"):
        records = await feed(gw, partner, number, count=3)
        assert [r.type for r in records] == [PartnerCertificate.event_type, PartnerWithdrawal.event_type, None]
        assert records[1].data()["reason"] == "resident_withdrawn"
    assert await gw.pool.fetchval("SELECT count(*) FROM certificates WHERE resident_id = $1", resident) == 0
    assert await gw.pool.fetchval("SELECT count(*) FROM share_consents WHERE resident_id = $1", resident) == 0
    rows = await gw.pool.fetch("SELECT * FROM entitlements WHERE certificate_number = $1", number)
    assert [(r["resident_id"], r["member_number"], r["active"]) for r in rows] == [(None, None, False)] * 2

    revoked = CertificateRevoked(
        **certificate_fields(number, resident, memberships("jal", "kyushuyusen"), status="revoked"),
        reason="withdrawn", revoked_at=datetime.now(UTC),
    )
    await publish(gw, CERTIFICATES, revoked, number)
    await publish(gw, RESIDENTS, consent(resident, "jal", True), resident)
    assert len(await feed(gw, "jal", number, count=4, timeout=1.5)) == 3
    assert await gw.pool.fetchval("SELECT count(*) FROM certificates WHERE resident_id = $1", resident) == 0


async def test_grants_flow_to_their_partner_only_and_may_come_before_the_certificate(gw: Gateway) -> None:
    resident = new_resident()
    grant_id = new_grant_id()
    number = number_apart_from(IKI, [grant_id])
    early = grant_issued(number, resident, "jal", "jal-dual-residence-miles", grant_id)
    await publish(gw, GRANTS, early, number)  # the certificate is not known yet: held
    assert await gw.pool.fetchval("SELECT count(*) FROM held_grants WHERE certificate_number = $1", number) == 1
    not_consented = grant_issued(number, resident, "kyushuyusen", "iki-island-routes")
    await publish(gw, GRANTS, not_consented, number)
    certified_as = await members(gw, resident, "jal", jal="JMB-5")
    await publish(gw, CERTIFICATES, issued(number, resident, certified_as), number)
    redeemed = GrantRedeemed(
        grant_id=early.grant_id, program_id=early.program_id, partner="jal", mechanism="mileage_grant",
        certificate_number=number, resident_id=resident, municipality_code=IKI, trip_id="JL-0101",
        unit="miles", amount=7500, trips_counted=1, completed=False, redeemed_at=datetime.now(UTC),
    )
    await publish(gw, GRANTS, redeemed, number)

    records = await feed(gw, "jal", number, count=3)
    assert [r.type for r in records] == [
        PartnerCertificate.event_type, PartnerGrant.event_type, PartnerGrant.event_type,
    ]
    # Keyed per grant (compaction keeps the certificate and each grant), on the certificate's partition.
    assert [r.key for r in records] == [number, f"{number}/grants/{grant_id}", f"{number}/grants/{grant_id}"]
    assert {r.partition for r in records} == {partition_of(number)}
    assert all(r.headers["ce_subject"] == number for r in records)
    issued_grant, redeemed_grant = records[1].data(), records[2].data()
    assert issued_grant["state"] == "issued" and issued_grant["amount"] == 30000 and issued_grant["unit"] == "miles"
    # The number consented for JAL, nothing else; sealed for JAL as on the certificate.
    assert await opened_by_partner(gw, "jal", issued_grant["member_number"]) == "JMB-5"
    assert issued_grant["resident_ref"] == records[0].data()["resident_ref"]
    assert redeemed_grant["state"] == "redeemed" and redeemed_grant["trip_id"] == "JL-0101"
    assert await feed(gw, "kyushuyusen", number, count=1, timeout=1.0) == []
    assert await gw.pool.fetchval("SELECT count(*) FROM held_grants WHERE certificate_number = $1", number) == 0


async def test_forgetting_a_certificate_tombstones_every_grant_key_the_partner_was_sent(gw: Gateway) -> None:
    resident = new_resident()
    g1, g2, g3 = new_grant_id(), new_grant_id(), new_grant_id()
    number = number_apart_from(IKI, [g1, g2, g3])
    await publish(gw, CERTIFICATES, issued(number, resident, memberships("jal", "kyushuyusen")), number)
    await publish(gw, GRANTS, grant_issued(number, resident, "jal", "jal-dual-residence-miles", g1), number)
    await publish(gw, GRANTS, grant_issued(number, resident, "jal", "jal-dual-residence-miles", g2), number)
    await publish(gw, GRANTS, grant_issued(number, resident, "kyushuyusen", "iki-island-routes", g3), number)
    k1, k2, k3 = (grant_key(number, g) for g in (g1, g2, g3))
    await publish(gw, RESIDENTS, consent(resident, "jal", False), resident)

    records = await feed(gw, "jal", number, count=7)
    assert [(r.key, r.type) for r in records] == [
        (number, PartnerCertificate.event_type), (k1, PartnerGrant.event_type), (k2, PartnerGrant.event_type),
        (number, PartnerWithdrawal.event_type), (k1, None), (k2, None), (number, None),
    ]
    assert all(r.value is None for r in records[4:])
    assert {r.partition for r in records} == {partition_of(number)}
    for tombstone in records[4:]:
        assert tombstone.headers["ce_subject"] == number and "ce_type" not in tombstone.headers
        assert tombstone.headers["ce_causationid"] == records[3].headers["ce_causationid"]
    assert [(r.key, r.type) for r in await feed(gw, "kyushuyusen", number, count=2)] == [
        (number, PartnerCertificate.event_type), (k3, PartnerGrant.event_type),
    ]
    assert await gw.pool.fetchval(
        "SELECT count(*) FROM feed_grant_keys WHERE partner = 'jal' AND certificate_number = $1", number
    ) == 0

    # Consent given again: the certificate and each grant's latest state under their keys; then the
    # resident withdraws: every key each partner holds ends in a tombstone.
    cancelled = GrantCancelled(
        grant_id=g2, program_id="jal-dual-residence-miles", partner="jal", mechanism="mileage_grant",
        certificate_number=number, resident_id=resident, municipality_code=IKI, unit="miles", released=30000,
        reason="the resident asked", cancelled_at=datetime.now(UTC),
    )
    await publish(gw, GRANTS, cancelled, number)  # while JAL may not see it: remembered, not sent
    await publish(gw, RESIDENTS, consent(resident, "jal", True), resident)
    await publish(gw, RESIDENTS, ResidentWithdrawn(resident_id=resident, withdrawn_at=datetime.now(UTC)), resident)
    records = await feed(gw, "jal", number, count=14)
    assert [(r.key, r.type) for r in records[7:]] == [
        (number, PartnerCertificate.event_type), (k1, PartnerGrant.event_type), (k2, PartnerGrant.event_type),
        (number, PartnerWithdrawal.event_type), (k1, None), (k2, None), (number, None),
    ]
    assert records[9].data()["state"] == "cancelled" and records[10].data()["reason"] == "resident_withdrawn"
    assert records[9].data()["reason"] == "other"  # an older event's free text is never forwarded
    ferry = await feed(gw, "kyushuyusen", number, count=5)
    assert [(r.key, r.type) for r in ferry] == [
        (number, PartnerCertificate.event_type), (k3, PartnerGrant.event_type),
        (number, PartnerWithdrawal.event_type), (k3, None), (number, None),
    ]
    for partner_records in (records, ferry):  # what compaction leaves: a tombstone under every key
        latest = {r.key: r.value for r in partner_records}
        assert set(latest.values()) == {None}, latest
    assert await gw.pool.fetchval("SELECT count(*) FROM feed_grant_keys WHERE certificate_number = $1", number) == 0

    rows = await gw.pool.fetch(
        "SELECT record_type, items, consent_source, event_id FROM deliveries "
        "WHERE partner = 'jal' AND certificate_number = $1 ORDER BY id", number,
    )
    assert [str(r["event_id"]) for r in rows] == [r.headers["ce_id"] for r in records]
    assert [(r["record_type"], r["items"]) for r in rows if r["record_type"] == "tombstone"] == [
        ("tombstone", ["certificate_number", "grant_id"]), ("tombstone", ["certificate_number", "grant_id"]),
        ("tombstone", ["certificate_number"]),
    ] * 2
    assert [r["consent_source"] for r in rows if r["record_type"] == "tombstone"] == (
        ["consent_revocation"] * 3 + ["resident_withdrawal"] * 3
    )


async def test_a_redelivered_certificate_event_changes_nothing(gw: Gateway) -> None:
    resident = new_resident()
    number = new_number(SHIRAHAMA)
    envelope = await publish(gw, CERTIFICATES, issued(number, resident, memberships("jal")), number)
    consumer = gw.app.state.runtime.consumers[0]
    duplicates = consumer.stats.duplicates
    again = [(envelope.key, envelope.data, envelope.headers())]
    await produce(gw.settings, gw.settings.topic(CERTIFICATES.name), again)

    async def seen_again() -> bool:
        return bool(consumer.stats.duplicates > duplicates)

    await eventually(seen_again)
    assert len(await feed(gw, "jal", number, count=2, timeout=1.5)) == 1
    assert await gw.pool.fetchval("SELECT count(*) FROM deliveries WHERE certificate_number = $1", number) == 1


# --- JAL's own client ----------------------------------------------------------------------------


def consume_as_partner(
    bootstrap: str, topic: str, group: str, until: Callable[[list[FeedRecord]], bool] | None, timeout: float
) -> list[FeedRecord]:
    """What a partner's own librdkafka consumer sees: a consumer group, from the earliest offset.

    Reads until ``until`` holds, or (``until`` None) until every assigned partition reached its end.
    """
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
        "enable.auto.commit": True, "session.timeout.ms": 6000, "fetch.wait.max.ms": 50,
        "enable.partition.eof": True,
    })
    consumer.subscribe([topic])
    records: list[FeedRecord] = []
    at_end: set[int] = set()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if until is not None and until(records):
                return records
            assigned = {p.partition for p in consumer.assignment()}
            if until is None and assigned and assigned <= at_end:
                return records
            message = consumer.poll(0.2)
            if message is None:
                continue
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    at_end.add(message.partition() or 0)
                    continue
                raise RuntimeError(str(error))
            at_end.discard(message.partition() or 0)
            raw_headers = message.headers() or []
            pairs = raw_headers.items() if isinstance(raw_headers, dict) else raw_headers
            headers = {k: v.decode() if isinstance(v, bytes) else (v or "") for k, v in pairs}
            key = message.key()
            assert isinstance(key, bytes)
            value = message.value()
            records.append(
                FeedRecord(key.decode(), bytes(value) if value is not None else None, headers, message.partition() or 0)
            )
    finally:
        consumer.close()
    raise AssertionError(f"the partner's consumer did not finish within {timeout} s ({len(records)} records)")


async def test_jal_reads_its_feed_with_its_own_client_and_every_record_fits_the_schema(gw: Gateway) -> None:
    ana_resident = new_resident()
    ana_number = new_number(SUSAKI)
    await publish(gw, CERTIFICATES, issued(ana_number, ana_resident, memberships("ana", "jal")), ana_number)
    resident = new_resident()
    number = new_number(SHIRAHAMA)
    certified_as = await members(gw, resident, "jal", jal="JMB-42")
    await publish(gw, CERTIFICATES, issued(number, resident, certified_as), number)
    await publish(gw, GRANTS, grant_issued(number, resident, "jal", "jal-dual-residence-miles"), number)
    expired = CertificateExpired(
        **certificate_fields(number, resident, await members(gw, resident, "jal", jal="JMB-42"), status="expired"),
        expired_on=TODAY,
    )
    await publish(gw, CERTIFICATES, expired, number)
    await publish(gw, RESIDENTS, consent(resident, "jal", False), resident)

    def has_tombstone(records: list[FeedRecord]) -> bool:
        return any(r.key == number and r.value is None for r in records)

    topic = gw.settings.topic("partner.jal.v1")
    records = await asyncio.to_thread(
        consume_as_partner, gw.settings.require_partner_kafka(), topic, f"jal-{uuid.uuid4().hex[:6]}",
        has_tombstone, 30.0,
    )
    assert has_tombstone(records)
    for record in records:  # every record on JAL's topic, from every test so far
        # ce_subject: the certificate number; the key: the same, or <number>/grants/<grant id>
        assert record.headers["ce_subject"] == certificate_of_key(record.key)
        if record.value is None:
            assert "ce_type" not in record.headers
            continue
        model = EVENT_MODELS[record.headers["ce_type"]]
        assert model in (PartnerCertificate, PartnerGrant, PartnerWithdrawal)
        jsonschema.validate(record.data(), json_schema(model))
        assert not FORBIDDEN_FIELDS & set(record.data())
        assert record.headers["ce_subject"] == record.data()["certificate_number"]
        data = record.data()
        expected = grant_key(data["certificate_number"], data["grant_id"]) if model is PartnerGrant else None
        assert record.key == (expected or data["certificate_number"])
        assert parse_envelope(
            [(k, v.encode()) for k, v in record.headers.items()], record.value, record.key.encode()
        ).type == model.event_type
    mine = [r for r in records if certificate_of_key(r.key) == number]
    assert [r.type for r in mine] == [
        PartnerCertificate.event_type, PartnerGrant.event_type, PartnerCertificate.event_type,
        PartnerWithdrawal.event_type, None, None,
    ]
    assert mine[2].data()["status"] == "expired"
    assert [r.key for r in mine[4:]] == [mine[1].key, number]  # the grant's tombstone, then the certificate's
    assert {r.partition for r in mine} == {partition_of(number)}

    # ANA's client, reading its whole topic, sees its own resident and nothing of the JAL-only one.
    ana = await asyncio.to_thread(
        consume_as_partner, gw.settings.require_partner_kafka(), gw.settings.topic("partner.ana.v1"),
        f"ana-{uuid.uuid4().hex[:6]}", None, 30.0,
    )
    assert ana_number in {r.key for r in ana}
    assert ana_number not in {r.key for r in records}  # Susaki is not JAL's, though JAL was listed
    ana_ref = ref(await partner_key(gw, "ana"), resident)
    assert [r for r in ana if r.key == number or (r.value and ana_ref.encode() in r.value)] == []


# --- Verification ----------------------------------------------------------------------------------


async def test_verification_answers_the_entitled_partner_only(gw: Gateway) -> None:
    resident = new_resident()
    number = new_number(IKI)
    certified_as = await members(gw, resident, "jal", jal="JMB-1")
    await publish(gw, CERTIFICATES, issued(number, resident, certified_as), number)

    response = await gw.client.get(f"/v1/certificates/{number}", headers=gw.key("jal"))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "certificate_number": number, "valid": True, "status": "valid",
        "valid_from": str(TODAY - timedelta(days=1)), "valid_until": str(TODAY + timedelta(days=364)),
        "municipality_code": IKI, "programs": ["jal-dual-residence-miles"], "checked_on": str(TODAY),
    }
    by_jwt = await gw.client.get(f"/v1/certificates/{number}", headers=bearer(gw.settings, "partner", partner="jal"))
    assert by_jwt.json() == response.json()

    # Kyushu Yusen serves Iki but was not consented; ANA does not serve Iki: both as if unknown.
    unknown_number = new_number(IKI)
    unknown = assert_problem(
        await gw.client.get(f"/v1/certificates/{unknown_number}", headers=gw.key("jal")), 404, "certificate-not-found"
    )
    for partner in ("kyushuyusen", "ana"):
        other = assert_problem(
            await gw.client.get(f"/v1/certificates/{number}", headers=gw.key(partner)), 404, "certificate-not-found"
        )
        assert json.dumps(other).replace(number, "N") == json.dumps(unknown).replace(unknown_number, "N")

    for malformed in ("NCH-422100-2026-12345", "nch-422100-2026-123456", "NCH-４２２１００-2026-123456", "42",
                      "NCH-422100-2026-000000"):  # no sequence 0 is ever issued (the shared parser refuses it)
        assert_problem(
            await gw.client.get(f"/v1/certificates/{malformed}", headers=gw.key("jal")), 422,
            "malformed-certificate-number",
        )


async def test_the_verification_hot_path_answers_as_the_documented_route_and_hands_on_the_rest(gw: Gateway) -> None:
    number = new_number(IKI)
    await publish(gw, CERTIFICATES, issued(number, new_resident(), memberships("jal")), number)
    hot = await gw.client.get(f"/v1/certificates/{number}", headers=gw.key("jal"))
    assert hot.status_code == 200 and hot.headers["x-request-id"]
    assert hot.headers["cache-control"] == "no-store"

    # The same request through what the hot path wraps: FastAPI's own routing and error handling.
    layer: Any = gw.app.middleware_stack
    while not isinstance(layer, VerificationHotPath):
        layer = layer.app
    inner = layer.app

    async def fastapi_only(scope: Any, receive: Any, send: Any) -> None:
        await inner({**scope, "app": gw.app}, receive, send)  # as Starlette's own entry sets it

    routed = httpx.AsyncClient(transport=httpx.ASGITransport(app=fastapi_only), base_url="http://service")
    async with routed:
        documented = await routed.get(f"/v1/certificates/{number}", headers=gw.key("jal"))
        refused = await routed.get(f"/v1/certificates/{number}")
    assert documented.status_code == 200 and documented.json() == hot.json()
    assert documented.headers["cache-control"] == hot.headers["cache-control"]
    assert_problem(await gw.client.get(f"/v1/certificates/{number}"), 401, refused.json()["code"])

    # Not the verification route: FastAPI answers (405 for another method, 404 for other paths).
    assert (await gw.client.post(f"/v1/certificates/{number}", headers=gw.key("jal"), json={})).status_code == 405
    assert_problem(await gw.client.get(f"/v1/certificates/{number}/x", headers=gw.key("jal")), 404, "not-found")
    metrics = (await gw.client.get("/metrics")).text
    assert 'http_requests_total{method="GET",route="/v1/certificates/{number}",status="200"}' in metrics


async def test_revoked_expired_and_out_of_window_certificates_are_answered_not_valid(gw: Gateway) -> None:
    resident = new_resident()
    revoked_number, expired_number, lapsed_number, future_number = (new_number(SHIRAHAMA) for _ in range(4))
    await publish(gw, CERTIFICATES, issued(revoked_number, resident, memberships("jal")), revoked_number)
    revoked = CertificateRevoked(
        **certificate_fields(revoked_number, resident, memberships("jal"), status="revoked"),
        reason="moved away", revoked_at=datetime.now(UTC),
    )
    await publish(gw, CERTIFICATES, revoked, revoked_number)
    expired = CertificateExpired(
        **certificate_fields(expired_number, resident, memberships("jal"), status="expired",
                             valid_from=TODAY - timedelta(400), valid_until=TODAY - timedelta(1)),
        expired_on=TODAY,
    )
    await publish(gw, CERTIFICATES, expired, expired_number)
    lapsed = issued(lapsed_number, resident, memberships("jal"), valid_from=TODAY - timedelta(400),
                    valid_until=TODAY - timedelta(1))
    await publish(gw, CERTIFICATES, lapsed, lapsed_number)
    future = issued(future_number, resident, memberships("jal"), valid_from=TODAY + timedelta(1))
    await publish(gw, CERTIFICATES, future, future_number)

    expected = {revoked_number: "revoked", expired_number: "expired", lapsed_number: "expired",
                future_number: "valid"}
    for number, status in expected.items():
        response = await gw.client.get(f"/v1/certificates/{number}", headers=gw.key("jal"))
        assert response.status_code == 200, response.text
        assert (response.json()["valid"], response.json()["status"]) == (False, status), number


async def test_verification_credentials(gw: Gateway) -> None:
    number = new_number(SHIRAHAMA)
    url = f"/v1/certificates/{number}"
    assert_problem(await gw.client.get(url), 401, "unauthenticated")
    assert_problem(await gw.client.get(url, headers={"X-Api-Key": "nchk_forged"}), 401, "invalid-api-key")
    assert_problem(await gw.client.get(url, headers={"Authorization": "Bearer x.y.z"}), 401, "unauthenticated")
    assert_problem(await gw.client.get(url, headers={"Authorization": "Basic amFsOmphbA=="}), 401, "unauthenticated")
    assert_problem(
        await gw.client.get(url, headers=bearer(gw.settings, "partner", partner="lufthansa")), 401, "unknown-partner"
    )
    for role, claims in (("staff", {"municipality": SHIRAHAMA}), ("admin", {}), ("resident", {})):
        assert_problem(await gw.client.get(url, headers=bearer(gw.settings, role, **claims)), 403, "forbidden")
    # A malformed number is refused only after authentication: strangers learn nothing.
    assert_problem(await gw.client.get("/v1/certificates/nope"), 401, "unauthenticated")


# --- The delivery record ---------------------------------------------------------------------------


async def test_the_delivery_record_for_admin_and_the_municipality_staff(gw: Gateway) -> None:
    resident = new_resident()
    await publish(gw, RESIDENTS, registered(resident, IKI, [("jal", True)]), resident)
    iki = new_number(IKI)
    certified_as = await members(gw, resident, "jal", "kyushuyusen", jal="JMB-3")
    await publish(gw, CERTIFICATES, issued(iki, resident, certified_as), iki)
    shirahama = new_number(SHIRAHAMA)
    await publish(gw, CERTIFICATES, issued(shirahama, resident, memberships("jal")), shirahama)
    jal_ref = ref(await partner_key(gw, "jal"), resident)

    admin = bearer(gw.settings, "admin")
    response = await gw.client.get(
        "/v1/deliveries", params={"partner": "jal", "from": str(TODAY - timedelta(1)), "to": str(TODAY + timedelta(1)),
                                  "limit": 1000},
        headers=admin,
    )
    assert response.status_code == 200
    page = response.json()
    assert page["total"] >= 2 and {i["partner"] for i in page["items"]} == {"jal"}
    [row] = [i for i in page["items"] if i["certificate_number"] == iki]
    assert row["resident_ref"] == jal_ref and row["municipality_code"] == IKI
    assert row["record_type"] == PartnerCertificate.event_type
    assert set(row["items"]) == {
        "certificate_number", "status", "valid_from", "valid_until", "municipality_code", "programs",
        "resident_ref", "member_number", "changed_at",
    }
    assert (row["consent_purpose"], row["consent_source"]) == ("share_certificate", "registration_consent")
    event_ids = {r.headers["ce_id"] for r in await feed(gw, "jal", iki, count=1)}
    assert row["event_id"] in event_ids
    [shirahama_row] = [i for i in page["items"] if i["certificate_number"] == shirahama]
    assert "member_number" not in shirahama_row["items"]

    staff = bearer(gw.settings, "staff", municipality=IKI)
    mine = (await gw.client.get("/v1/deliveries", params={"limit": 1000}, headers=staff)).json()
    assert mine["items"] and {i["municipality_code"] for i in mine["items"]} == {IKI}
    assert {(i["partner"], i["certificate_number"]) for i in mine["items"]} >= {("jal", iki), ("kyushuyusen", iki)}
    assert_problem(await gw.client.get("/v1/deliveries", params={"municipality": SHIRAHAMA}, headers=staff), 403,
                   "forbidden")
    empty = await gw.client.get("/v1/deliveries", params={"to": str(TODAY - timedelta(30))}, headers=admin)
    assert empty.json()["total"] == 0
    paged = (await gw.client.get("/v1/deliveries", params={"limit": 1, "offset": 1}, headers=admin)).json()
    assert len(paged["items"]) == 1 and paged["total"] >= 4

    export = await gw.client.get("/v1/deliveries.csv", params={"partner": "jal"}, headers=staff)
    assert export.status_code == 200
    assert export.headers["content-type"] == "text/csv; charset=utf-8"
    assert export.headers["content-disposition"].startswith("attachment")
    assert export.text.startswith("\ufeff")
    table = list(csv.DictReader(io.StringIO(export.text.lstrip("\ufeff"))))
    assert table and {r["partner"] for r in table} == {"jal"} and {r["municipality_code"] for r in table} == {IKI}
    jal_iki = [r for r in table if r["certificate_number"] == iki]
    assert jal_iki[0]["resident_ref"] == jal_ref and "member_number" in jal_iki[0]["items"].split(" ")
    total = (await gw.client.get("/v1/deliveries", params={"partner": "jal"}, headers=staff)).json()["total"]
    assert len(table) == total


async def test_bad_requests_on_the_delivery_record(gw: Gateway) -> None:
    admin = bearer(gw.settings, "admin")
    for path in ("/v1/deliveries", "/v1/deliveries.csv"):
        assert_problem(await gw.client.get(path, headers=gw.key("jal")), 403, "forbidden")
        assert_problem(await gw.client.get(path, headers=bearer(gw.settings, "partner", partner="jal")), 403,
                       "forbidden")
        assert_problem(await gw.client.get(path, headers=bearer(gw.settings, "resident")), 403, "forbidden")
        assert_problem(await gw.client.get(path), 401, "unauthenticated")
        assert_problem(await gw.client.get(path, params={"from": "2026-02-01", "to": "2026-01-01"}, headers=admin),
                       422, "invalid-period")
        assert_problem(await gw.client.get(path, params={"partner": "lufthansa"}, headers=admin), 422,
                       "unknown-partner")
        assert_problem(await gw.client.get(path, params={"from": "yesterday"}, headers=admin), 422, "invalid-request")
        assert_problem(await gw.client.get(path, params={"municipality": "12"}, headers=admin), 422,
                       "invalid-request")
    assert_problem(await gw.client.get("/v1/deliveries", params={"limit": 0}, headers=admin), 422, "invalid-request")


# --- The Redis verification cache --------------------------------------------------------------------


def redis_client(settings: Settings) -> Redis:
    return Redis.from_url(settings.redis_url or "")


def cache_key(settings: Settings, partner: str, number: str) -> str:
    return f"{settings.topic_prefix}verify:{partner}:{number}"


async def lookups(client: httpx.AsyncClient, source: str) -> float:
    metrics = (await client.get("/metrics")).text
    for line in metrics.splitlines():
        if line.startswith(f'partner_gateway_verifications_total{{source="{source}"}}'):
            return float(line.split()[-1])
    return 0.0


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def cached(redis: Redis, key: str, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    found: dict[str, Any] = {}

    async def present() -> bool:
        raw = await redis.get(key)
        if raw is None:
            return False
        found.clear()
        found.update(json.loads(raw))
        return check(found)

    await eventually(present, timeout=10)
    return found


async def test_the_consumer_keeps_redis_current_after_each_commit(gw: Gateway) -> None:
    resident = new_resident()
    number = new_number(IKI)
    key = cache_key(gw.settings, "jal", number)
    async with redis_client(gw.settings) as redis:
        await publish(gw, CERTIFICATES, issued(number, resident, memberships("jal")), number)
        entry = await cached(redis, key, lambda e: e["entitled"])  # written without any request
        assert entry["v"] > 0 and entry["programs"] == ["jal-dual-residence-miles"] and "valid" not in entry
        assert await redis.get(cache_key(gw.settings, "kyushuyusen", number)) is None

        from_redis = await lookups(gw.client, "redis")
        response = await gw.client.get(f"/v1/certificates/{number}", headers=gw.key("jal"))
        assert response.status_code == 200 and response.json()["valid"] is True
        assert await lookups(gw.client, "redis") == from_redis + 1

        revoked = CertificateRevoked(
            **certificate_fields(number, resident, memberships("jal"), status="revoked"), reason="fraud",
            revoked_at=datetime.now(UTC),
        )
        await publish(gw, CERTIFICATES, revoked, number)
        await cached(redis, key, lambda e: e.get("status") == "revoked" and e["v"] > entry["v"])
        response = await gw.client.get(f"/v1/certificates/{number}", headers=gw.key("jal"))
        assert (response.json()["valid"], response.json()["status"]) == (False, "revoked")

        await publish(gw, RESIDENTS, consent(resident, "jal", False), resident)
        await cached(redis, key, lambda e: not e["entitled"])
        assert 0 < await redis.ttl(key) <= 86_400
        assert_problem(await gw.client.get(f"/v1/certificates/{number}", headers=gw.key("jal")), 404,
                       "certificate-not-found")


async def test_a_cold_cache_falls_back_to_postgresql_and_repopulates(gw: Gateway) -> None:
    number = new_number(SHIRAHAMA)
    key = cache_key(gw.settings, "jal", number)
    async with redis_client(gw.settings) as redis:
        unknown = await gw.client.get(f"/v1/certificates/{number}", headers=gw.key("jal"))
        assert_problem(unknown, 404, "certificate-not-found")
        assert json.loads(await redis.get(key) or "null") == {"v": 0, "entitled": False}  # a short-lived negative entry
        assert 0 < await redis.ttl(key) <= 60

        await publish(gw, CERTIFICATES, issued(number, new_resident(), memberships("jal")), number)
        await cached(redis, key, lambda e: e["entitled"])  # the newer entry replaced the negative one

        await redis.delete(key)  # cold
        from_db = await lookups(gw.client, "database")
        response = await gw.client.get(f"/v1/certificates/{number}", headers=gw.key("jal"))
        assert response.status_code == 200 and response.json()["certificate_number"] == number
        assert await lookups(gw.client, "database") == from_db + 1
        assert json.loads(await redis.get(key) or "null")["entitled"] is True  # repopulated


async def test_redis_down_falls_back_and_the_cache_is_rebuilt_when_it_returns(gw: Gateway) -> None:
    runtime = gw.app.state.runtime
    working = runtime.state["redis"]
    runtime.state["redis"] = Redis.from_url(f"redis://127.0.0.1:{closed_port()}/0", socket_connect_timeout=0.2)
    number = new_number(SHIRAHAMA)
    try:
        await publish(gw, CERTIFICATES, issued(number, new_resident(), memberships("jal")), number)
        for _ in range(3):
            response = await gw.client.get(f"/v1/certificates/{number}", headers=gw.key("jal"))
            assert response.status_code == 200 and response.json()["valid"] is True
        assert_problem(await gw.client.get(f"/v1/certificates/{number}", headers=gw.key("ana")), 404,
                       "certificate-not-found")
    finally:
        down = runtime.state["redis"]
        runtime.state["redis"] = working
        await down.aclose()
    async with redis_client(gw.settings) as redis:
        # Changed while Redis was away and never asked for since: the sync caught up by itself.
        await cached(redis, cache_key(gw.settings, "jal", number), lambda e: e["entitled"])


async def test_a_gateway_started_without_redis_serves_from_postgresql_and_the_next_start_rebuilds(
    backends: Any, run_id: str
) -> None:
    from tests.conftest import make_settings

    isolated = make_settings(backends, run_id + "pg", redis_url=f"redis://127.0.0.1:{closed_port()}/0")
    app = create_app(isolated)
    number = new_number(SHIRAHAMA)
    async with service_client(app) as client:
        gw = Gateway(app, client, isolated, {})
        key = (await client.post("/v1/partners/jal/api-keys", headers=bearer(isolated, "admin"))).json()["api_key"]
        await publish(gw, CERTIFICATES, issued(number, new_resident(), memberships("jal")), number)
        response = await client.get(f"/v1/certificates/{number}", headers={"X-Api-Key": key})
        assert response.status_code == 200 and response.json()["valid"] is True
        assert await lookups(client, "database") >= 1

    with_redis = isolated.model_copy(update={"redis_url": backends.redis_url})
    async with redis_client(with_redis) as redis:
        assert await redis.get(cache_key(with_redis, "jal", number)) is None
        app = create_app(with_redis)
        async with service_client(app) as client:
            entry = await cached(redis, cache_key(with_redis, "jal", number), lambda e: e["entitled"])
            assert entry["certificate_number"] == number
            assert app.state.gateway.verification.rebuilt >= 1
            response = await client.get(f"/v1/certificates/{number}", headers={"X-Api-Key": key})
            assert response.status_code == 200
            assert await lookups(client, "redis") == 1 and await lookups(client, "database") == 0


# --- Privacy: sealed member numbers, the partners' keys, erasure, the resident's record (issue 17) --


async def test_the_key_endpoint_serves_only_the_partners_own_live_references(gw: Gateway) -> None:
    resident = new_resident()
    number = new_number(IKI)
    certified_as = await members(gw, resident, "jal", "kyushuyusen", jal="JMB-11", kyushuyusen="KY-22")
    await publish(gw, CERTIFICATES, issued(number, resident, certified_as), number)
    [jal] = await feed(gw, "jal", number, count=1)
    [kyushu] = await feed(gw, "kyushuyusen", number, count=1)
    jal_sealed, kyushu_sealed = jal.data()["member_number"], kyushu.data()["member_number"]
    assert await opened_by_partner(gw, "jal", jal_sealed) == "JMB-11"
    assert await opened_by_partner(gw, "kyushuyusen", kyushu_sealed) == "KY-22"

    # Another partner's kid, a made-up reference, a malformed kid: the same 404, nothing revealed.
    made_up = f"partner:jal:{'0' * 64}"
    # A reference holding twelve digits with a My Number check digit (1 in ~300 do): still a kid, a 404.
    first = "12345678901"
    looks_like_a_my_number = f"partner:jal:a{first}{check_digit(first)}b{'c' * 50}"
    for partner, kid in (("kyushuyusen", jal_sealed["kid"]), ("jal", made_up), ("jal", "resident:" + resident),
                         ("jal", looks_like_a_my_number)):
        response = await gw.client.get(f"/v1/keys/{kid}", headers=gw.key(partner))
        assert_problem(response, 404, "partner-key-not-found")
    # Partners only; and the key opens nothing sealed for another partner.
    staff = bearer(gw.settings, "staff", municipality=IKI)
    assert_problem(await gw.client.get(f"/v1/keys/{jal_sealed['kid']}", headers=staff), 403, "forbidden")
    key = (await gw.client.get(f"/v1/keys/{jal_sealed['kid']}", headers=gw.key("jal"))).json()["k"]
    with pytest.raises(InvalidTag):
        AESGCM(base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))).decrypt(
            base64.urlsafe_b64decode(kyushu_sealed["iv"] + "=="), base64.urlsafe_b64decode(kyushu_sealed["ct"] + "=="),
            kyushu_sealed["kid"].encode(),
        )

    # Consent revoked for JAL: JAL is told to forget, and its key is no longer handed out.
    await publish(gw, RESIDENTS, consent(resident, "jal", False), resident)
    assert_problem(await gw.client.get(f"/v1/keys/{jal_sealed['kid']}", headers=gw.key("jal")), 404,
                   "partner-key-not-found")
    assert await opened_by_partner(gw, "kyushuyusen", kyushu_sealed) == "KY-22"


async def test_erasure_kills_the_keys_and_leaves_only_the_pseudonymous_record(gw: Gateway) -> None:
    resident = new_resident()
    await publish(gw, RESIDENTS, registered(resident, IKI, [("jal", True)]), resident)
    number = new_number(IKI)
    grant_id = new_grant_id()
    await publish(gw, CERTIFICATES, issued(number, resident, await members(gw, resident, "jal", jal="JMB-77")), number)
    await publish(gw, GRANTS, grant_issued(number, resident, "jal", "jal-dual-residence-miles", grant_id), number)
    [certificate, grant] = await feed(gw, "jal", number, count=2)
    kid = certificate.data()["member_number"]["kid"]
    assert await opened_by_partner(gw, "jal", grant.data()["member_number"]) == "JMB-77"
    logged = await gw.pool.fetch("SELECT value FROM partner_feed_log WHERE subject = $1", number)
    assert logged and all(b"JMB-77" not in bytes(r["value"]) for r in logged)  # the HTTP feed: sealed too

    # Registration destroys the resident's key, then announces the withdrawal.
    await gw.keyring.shred(resident_subject(resident))
    await publish(gw, RESIDENTS, ResidentWithdrawn(resident_id=resident, withdrawn_at=datetime.now(UTC)), resident)

    assert_problem(await gw.client.get(f"/v1/keys/{kid}", headers=gw.key("jal")), 404, "partner-key-not-found")
    assert await gw.keyring.partner_key(resident_subject(resident), kid) is None
    assert await gw.pool.fetchval("SELECT count(*) FROM kit_erased_residents WHERE resident_id = $1", resident) == 1
    for table in ("certificates", "share_consents", "grant_states", "held_grants", "entitlements"):
        found = await gw.pool.fetchval(f"SELECT count(*) FROM {table} WHERE resident_id = $1", resident)
        assert found == 0, table
    assert await gw.pool.fetchval(
        "SELECT count(*) FROM entitlements WHERE certificate_number = $1 AND member_number IS NOT NULL", number
    ) == 0
    # The HTTP feed log keeps the withdrawal and the tombstones (a partner must learn to forget), no more.
    kinds = await gw.pool.fetch("SELECT event_type, value IS NULL AS tombstone FROM partner_feed_log "
                                "WHERE subject = $1 ORDER BY id", number)
    assert [(k["event_type"], k["tombstone"]) for k in kinds] == [
        (PartnerWithdrawal.event_type, False), (None, True), (None, True),
    ]
    # The delivery record stays (APPI), pseudonymous: no resident id, no member number anywhere in it.
    rows = await gw.pool.fetch("SELECT * FROM deliveries WHERE certificate_number = $1", number)
    assert len(rows) == 5 and all(resident not in str(dict(r)) and "JMB-77" not in str(dict(r)) for r in rows)


async def test_late_events_about_an_erased_resident_send_nothing(gw: Gateway) -> None:
    resident = new_resident()
    number = new_number(IKI)
    await publish(gw, CERTIFICATES, issued(number, resident, memberships("jal")), number)
    late = issued(number, resident, await members(gw, resident, "jal", jal="JMB-5"))  # sealed before the erasure
    await gw.keyring.shred(resident_subject(resident))
    await publish(gw, RESIDENTS, ResidentWithdrawn(resident_id=resident, withdrawn_at=datetime.now(UTC)), resident)
    assert len(await feed(gw, "jal", number, count=3)) == 3  # certificate, withdrawal, tombstone

    # A late (or replayed, or re-read from earliest) certificate event and grant: nothing more.
    consumer = gw.app.state.runtime.consumers[0]
    parked = consumer.stats.parked
    await publish(gw, CERTIFICATES, late, number)
    await publish(gw, GRANTS, grant_issued(number, resident, "jal", "jal-dual-residence-miles"), number)
    await publish(gw, RESIDENTS, consent(resident, "jal", True), resident)
    assert len(await feed(gw, "jal", number, count=4, timeout=1.5)) == 3
    assert consumer.stats.parked == parked  # dropped, not dead-lettered
    assert await gw.pool.fetchval("SELECT count(*) FROM certificates WHERE certificate_number = $1", number) == 0


async def test_a_sealed_number_that_no_longer_opens_is_dropped_before_the_withdrawal_arrives(gw: Gateway) -> None:
    resident = new_resident()
    number = new_number(IKI)
    event = issued(number, resident, await members(gw, resident, "jal", jal="JMB-6"))
    # The key is gone (registration erased the resident) but the withdrawal has not been read here yet.
    await gw.keyring.shred(resident_subject(resident))
    consumer = gw.app.state.runtime.consumers[0]
    parked = consumer.stats.parked
    await publish(gw, CERTIFICATES, event, number)
    assert await feed(gw, "jal", number, count=1, timeout=1.5) == []
    assert consumer.stats.parked == parked
    assert await gw.pool.fetchval("SELECT count(*) FROM certificates WHERE certificate_number = $1", number) == 0


async def test_the_resident_sees_every_delivery_of_their_data(gw: Gateway) -> None:
    resident = new_resident()
    await publish(gw, RESIDENTS, registered(resident, IKI, [("jal", True)]), resident)
    iki = new_number(IKI)
    certified_as = await members(gw, resident, "jal", "kyushuyusen", jal="JMB-8")
    await publish(gw, CERTIFICATES, issued(iki, resident, certified_as), iki)
    shirahama = new_number(SHIRAHAMA)
    await publish(gw, CERTIFICATES, issued(shirahama, resident, memberships("jal")), shirahama)
    await publish(gw, RESIDENTS, consent(resident, "kyushuyusen", False), resident)
    other = new_resident()
    other_number = new_number(IKI)
    await publish(gw, CERTIFICATES, issued(other_number, other, memberships("jal")), other_number)

    path = f"/v1/residents/{resident}/deliveries"
    own = await gw.client.get(path, headers=bearer(gw.settings, "resident", subject=resident))
    assert own.status_code == 200, own.text
    page = own.json()
    seen = [(i["partner"], i["certificate_number"], i["record_type"], i["consent_source"]) for i in page["items"]]
    assert seen == [
        ("jal", iki, PartnerCertificate.event_type, "registration_consent"),
        ("kyushuyusen", iki, PartnerCertificate.event_type, "certificate_membership"),
        ("jal", shirahama, PartnerCertificate.event_type, "registration_consent"),
        ("kyushuyusen", iki, PartnerWithdrawal.event_type, "consent_revocation"),
        ("kyushuyusen", iki, "tombstone", "consent_revocation"),
    ]
    assert page["total"] == 5
    first = page["items"][0]
    assert "member_number" in first["items"] and first["partner_name"]
    assert first["consent_purpose"] == "share_certificate"
    assert "resident_ref" not in first and "member_number" not in first  # the items' names, not their values

    paged = (await gw.client.get(path, params={"limit": 2, "offset": 2},
                                 headers=bearer(gw.settings, "admin"))).json()
    assert [i["certificate_number"] for i in paged["items"]] == [shirahama, iki] and paged["total"] == 5
    staff = (await gw.client.get(path, headers=bearer(gw.settings, "staff", municipality=SHIRAHAMA))).json()
    assert {i["certificate_number"] for i in staff["items"]} == {shirahama} and staff["total"] == 1
    assert_problem(await gw.client.get(path, headers=bearer(gw.settings, "resident", subject=other)), 403,
                   "forbidden")
    assert_problem(await gw.client.get(path, headers=gw.key("jal")), 403, "forbidden")

    # The record outlives the erasure (legal retention), still found by the resident's id.
    await publish(gw, RESIDENTS, ResidentWithdrawn(resident_id=resident, withdrawn_at=datetime.now(UTC)), resident)
    after = (await gw.client.get(path, headers=bearer(gw.settings, "admin"))).json()
    assert after["total"] == 5 + 4  # JAL told to forget both certificates: a withdrawal and a tombstone each
