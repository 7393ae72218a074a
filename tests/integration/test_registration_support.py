"""Helpers shared by the registration service's integration tests (no tests here)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jsonschema  # type: ignore[import-untyped]

from services.registration.sample_activities import COMMON
from shared.contracts.base import EventData
from shared.contracts.registration import Contact
from shared.contracts.sealed import Sealed
from shared.contracts.topics import RESIDENTS, Topic
from shared.kit.clock import SYSTEM_CLOCK
from shared.kit.envelope import Envelope, parse_envelope
from shared.kit.keyring import Keyring
from shared.kit.outbox import pending_count
from shared.kit.settings import Settings
from shared.stack.identity_verifier import attest
from tests.support import bearer, eventually, read_topic

SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "contracts" / "schemas"

#: Every table of the service, the kit's included: a refused request must change none of them.
TABLES = (
    "residents", "registrations", "identity_verifications", "premium_reviews", "premium_activities", "consents",
    "consent_log", "outbox", "idempotency_keys", "designated_activities",
)

HOME = "131016"  # 東京都千代田区
SHIRAHAMA = "304018"  # 和歌山県白浜町
WAKAYAMA = "300004"  # 和歌山県
TANABE = "302066"  # 和歌山県田辺市
SUSAMI = "304069"  # 和歌山県すさみ町
KAMISHIHORO = "016331"  # 北海道上士幌町
MITOYO = "372081"  # 香川県三豊市
IKI = "422100"  # 長崎県壱岐市


def today() -> date:
    return SYSTEM_CLOCK.today()


def new_resident_id() -> str:
    return str(uuid.uuid4())  # a canonical UUID, like a real token subject: never mistaken for a My Number


def resident_auth(settings: Settings, resident_id: str) -> dict[str, str]:
    return bearer(settings, "resident", subject=resident_id)


def staff_auth(settings: Settings, municipality: str) -> dict[str, str]:
    return bearer(settings, "staff", municipality=municipality)


def admin_auth(settings: Settings) -> dict[str, str]:
    return bearer(settings, "admin")


def hanako(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "山田 花子",
        "name_kana": "ヤマダ ハナコ",
        "email": "hanako.yamada@example.jp",
        "phone": "090-1234-5678",
        "date_of_birth": "1988-04-12",
        "legal_address_code": HOME,
        "preferred_language": "ja",
    }
    body.update(overrides)
    return body


def identity(**overrides: Any) -> dict[str, Any]:
    """A JPKI result as clients stated it themselves before attestations (now refused)."""
    body: dict[str, Any] = {
        "method": "jpki",
        "verified_at": (datetime.now(UTC) - timedelta(days=2)).isoformat(),
        "certificate_serial": "JPKI-SIGN-7F3A90C2",
        "subject_ref": "jpki-subject-4be1d2",
    }
    body.update(overrides)
    return body


def activities(*days_ago: int, municipality: str = SHIRAHAMA, start: int = 0) -> list[dict[str, Any]]:
    """Picks of the municipality's sample catalogue (seeded by the service): one per day given, each of
    the next entry from ``start`` on, each with a document reference."""
    return [
        {"activity_id": f"{municipality}-{COMMON[(start + i) % len(COMMON)].code}",
         "date": (today() - timedelta(days=d)).isoformat(), "document_ref": f"doc-{uuid.uuid4().hex[:8]}"}
        for i, d in enumerate(days_ago)
    ]


def premium(municipality: str, resident_id: str, **overrides: Any) -> dict[str, Any]:
    """A premium request of ``resident_id`` with a fresh attestation of the development provider and
    three activities of the municipality's sample catalogue."""
    body: dict[str, Any] = {
        "municipality_code": municipality, "tier": "premium", "attestation": attest(resident_id),
        "activities": activities(10, 40, 90, municipality=municipality),
    }
    body.update(overrides)
    return body


async def create_resident(
    client: httpx.AsyncClient, settings: Settings, resident_id: str | None = None, **overrides: Any
) -> str:
    resident_id = resident_id or new_resident_id()
    response = await client.post(
        "/v1/residents", json=hanako(**overrides), headers=resident_auth(settings, resident_id)
    )
    assert response.status_code == 201, response.text
    return resident_id


async def register(
    client: httpx.AsyncClient, settings: Settings, resident_id: str, body: dict[str, Any]
) -> dict[str, Any]:
    response = await client.post(
        f"/v1/residents/{resident_id}/registrations", json=body, headers=resident_auth(settings, resident_id)
    )
    assert response.status_code in (200, 201), response.text
    result: dict[str, Any] = response.json()
    return result


async def one(pool: asyncpg.Pool, query: str, *args: Any) -> asyncpg.Record:
    row = await pool.fetchrow(query, *args)
    assert row is not None, query
    return row


async def snapshot(pool: asyncpg.Pool) -> dict[str, int]:
    return {table: int(await pool.fetchval(f"SELECT count(*) FROM {table}")) for table in TABLES}


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body: dict[str, Any] = response.json()
    assert body["code"] == code, body
    assert body["status"] == status
    return body


async def relayed(pool: asyncpg.Pool) -> None:
    """Wait until the outbox relay has published everything written so far."""

    async def empty() -> bool:
        return await pending_count(pool) == 0

    await eventually(empty, timeout=20)


async def events_of(
    settings: Settings, pool: asyncpg.Pool, resident_id: str, expected: int, on: Topic = RESIDENTS
) -> list[Envelope]:
    """Every event keyed by this resident on ``on``, once the relay has published all of them."""
    await relayed(pool)
    key = resident_id.encode()
    topic = settings.topic(on.name)

    def enough(records: list[Any]) -> bool:
        return sum(1 for r in records if r.key == key) >= expected

    records = await read_topic(settings, topic, until=enough, timeout=20)
    # One key, one partition: the records are in the order they were emitted.
    events = [parse_envelope(r.headers, r.value, r.key) for r in records if r.key == key]
    assert len(events) >= expected, f"{[e.type for e in events]} of {resident_id}, expected {expected}"
    return events


def decoded(envelope: Envelope, model: type[EventData], resident_id: str) -> Any:
    """The event's data after checking the envelope and both the model and the published JSON Schema."""
    assert envelope.type == model.event_type
    assert envelope.key == resident_id.encode()
    assert envelope.subject == resident_id
    assert envelope.source == "/nichiiki/registration"
    schema = json.loads((SCHEMAS / f"{model.event_type}.json").read_text(encoding="utf-8"))
    jsonschema.validate(json.loads(envelope.data), schema)
    return envelope.decode(model)


def of_type(envelopes: list[Envelope], model: type[EventData]) -> list[Envelope]:
    return [e for e in envelopes if e.type == model.event_type]


async def opened_contact(settings: Settings, sealed: Sealed) -> Contact | None:
    """A contact as another service opens it from an event: with a key store of its own (its own
    cache); None once the person's key is shredded."""
    keyring = Keyring.from_settings(settings)
    try:
        plaintext = await keyring.open(sealed)
    finally:
        await keyring.close()
    return None if plaintext is None else Contact.model_validate_json(plaintext)
