"""The partner gateway as the bridge between the clusters: partners' trips in, their feeds out.

A partner writes trips to its own ``partner.<code>.trips.v1`` on the partner-facing cluster (the
edge); the gateway forwards each inside on ``gateway.trips.v1`` as the partner of that topic, and
the subsidy service counts it. The gateway and subsidy run in this process on topics and databases
of their own; partners are played by producing to and reading from the edge.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

import asyncpg
import httpx
import pytest
import pytest_asyncio
from aiokafka import ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient

from services.partner_gateway import store as gateway_store
from services.partner_gateway.domain import new_pseudonym_key
from services.partner_gateway.handlers import partner_topics
from services.partner_gateway.main import create_app as create_gateway
from services.subsidy.config import SubsidySettings
from services.subsidy.main import create_app as create_subsidy
from shared.contracts.base import EventData
from shared.contracts.certification import CertificateIssued
from shared.contracts.common import SealedMembership
from shared.contracts.formats import CertificateNumber
from shared.contracts.partners import PartnerGrant, TripAccepted, TripReported, certificate_of_key
from shared.contracts.registration import ConsentState, Contact, ResidentRegistered
from shared.contracts.sealed import Sealed, resident_subject
from shared.contracts.subsidy import GrantRedeemed, GrantRedemptionRejected
from shared.contracts.topics import (
    CORE_TOPICS,
    GATEWAY_TRIPS,
    PARTNER_CODES,
    Cluster,
    cluster_of,
    dead_letter_topics,
    partner_feed,
    partner_trips,
)
from shared.kit.clock import SYSTEM_CLOCK
from shared.kit.envelope import Envelope, new_envelope, parse_envelope
from shared.kit.kafka_admin import ensure_topics
from shared.kit.kafka_security import KafkaConnection
from shared.kit.keyring import Keyring
from shared.kit.my_number import check_digit
from shared.kit.settings import Settings
from shared.reference import prefecture_of
from shared.stack.backends import Backends
from tests.conftest import make_settings
from tests.support import bearer, eventually, produce, read_topic, service_client

pytestmark = pytest.mark.stack

Record: TypeAlias = "ConsumerRecord[bytes, bytes]"

TODAY = SYSTEM_CLOCK.today()
SHIRAHAMA = "304018"  # JAL only
SUSAKI = "392065"  # ANA only
JAL_PROGRAM = "jal-dual-residence-miles@304018"
ANA_PROGRAM = "ana-dual-residence-fare@392065"
#: What a partner must never read: the resident's identity and contact (keys of any record's JSON).
PERSONAL_FIELDS = {
    "name", "name_kana", "kana", "email", "e_mail", "phone", "address", "legal_address_code", "birth_date",
    "date_of_birth", "contact", "resident_id",
}


@dataclass
class Platform:
    settings: Settings
    gateway: httpx.AsyncClient
    subsidy: httpx.AsyncClient
    gateway_pool: asyncpg.Pool
    subsidy_pool: asyncpg.Pool
    keyring: Keyring

    async def seal(self, resident: str, value: str | Contact) -> Sealed:
        """Sealed under the resident's key, as registration and certification send it."""
        return await self.keyring.seal(resident_subject(resident), value)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def platform(backends: Backends, run_id: str) -> AsyncIterator[Platform]:
    settings = make_settings(backends, f"{run_id}trp")
    gateway_app = create_gateway(settings)
    subsidy_app = create_subsidy(settings, SubsidySettings(sweep_interval_s=3600))
    async with service_client(gateway_app) as gateway, service_client(subsidy_app) as subsidy:
        yield Platform(
            settings, gateway, subsidy, gateway_app.state.runtime.pool, subsidy_app.state.runtime.pool,
            gateway_app.state.runtime.keyring,
        )


# --- builders ------------------------------------------------------------------------------------


def uid() -> str:
    return uuid.uuid4().hex[:8]


def a_my_number() -> str:
    """Twelve digits whose last is the My Number check digit of the first eleven."""
    first = f"{uuid.uuid4().int % 10**11:011d}"
    return f"{first}{check_digit(first)}"


def certificate(
    municipality: str, resident: str, partner: str, member_number: Sealed | None = None
) -> CertificateIssued:
    number = CertificateNumber.format(municipality, TODAY.year, uuid.uuid4().int % CertificateNumber.MAX_SEQUENCE + 1)
    return CertificateIssued(
        certificate_number=number, resident_id=resident, municipality_code=municipality,
        valid_from=TODAY - timedelta(days=30), valid_until=TODAY + timedelta(days=334), status="valid",
        partners=[SealedMembership(partner=partner, member_number=member_number)], application_id=f"app-{uid()}",
        issued_at=datetime.now(UTC),
    )


async def registered(
    p: Platform, resident: str, municipality: str, partner: str
) -> tuple[ResidentRegistered, Contact]:
    """The registration (its contact sealed, as registration sends it) and the contact in clear."""
    now = datetime.now(UTC)
    contact = Contact(name="二地域 花子", name_kana="ニチイキ ハナコ", email=f"hanako-{uid()}@example.jp",
                      phone="090-1234-5678")
    return ResidentRegistered(
        resident_id=resident, registration_id=f"reg-{uid()}", municipality_code=municipality,
        prefecture_code=prefecture_of(municipality).code, tier="basic", status="active", legal_address_code="131016",
        contact=await p.seal(resident, contact),
        consents=[ConsentState(purpose="share_certificate", partner=partner, granted=True, at=now)],
        registered_at=now,
    ), contact


def report(grant_id: str, number: str, *, partner: str | None = None, trip_id: str | None = None,
           discount: int | None = None, days_ago: int = 2) -> TripReported:
    return TripReported(
        partner=partner, grant_id=grant_id, certificate_number=number, trip_id=trip_id or f"T-{uid()}",
        trip_kind="round_trip", travelled_on=TODAY - timedelta(days=days_ago), discount_jpy=discount,
        reported_at=datetime.now(UTC),
    )


# --- the partner's side and the upstream services' ---------------------------------------------------


async def report_trips(p: Platform, topic_of: str, *trips: TripReported, correlation_id: str | None = None,
                       ) -> list[Envelope]:
    """Write trips to partner ``topic_of``'s trip topic on the edge, as its own client would."""
    envelopes = [new_envelope(f"partner-{topic_of}", t, subject=t.trip_id, key=t.grant_id,
                              correlation_id=correlation_id) for t in trips]
    topic = p.settings.topic(partner_trips(topic_of).name)
    await produce(p.settings, topic, [(e.key, e.data, e.headers()) for e in envelopes])
    return envelopes


async def publish(p: Platform, source: str, data: EventData, subject: str) -> None:
    envelope = new_envelope(source, data, subject=subject)
    await produce(p.settings, p.settings.topic(data.event_topic), [(envelope.key, envelope.data, envelope.headers())])


async def granted(p: Platform, issued: CertificateIssued, program_id: str) -> asyncpg.Record:
    """The grant subsidy made for the certificate (publishes the certificate first)."""
    await publish(p, "certification", issued, issued.certificate_number)
    query = "SELECT * FROM grants WHERE certificate_number = $1 AND program_id = $2"

    async def made() -> bool:
        return await p.subsidy_pool.fetchrow(query, issued.certificate_number, program_id) is not None

    await eventually(made, timeout=20)
    row = await p.subsidy_pool.fetchrow(query, issued.certificate_number, program_id)
    assert row is not None
    return row


async def forwarded(p: Platform, until_trip: str) -> dict[str, tuple[Record, dict[str, Any]]]:
    """What the gateway forwarded inside (trip id → record, data), read until ``until_trip`` is there."""

    def by_trip(records: list[Record]) -> dict[str, tuple[Record, dict[str, Any]]]:
        found = {}
        for record in records:
            envelope = parse_envelope(record.headers, record.value, record.key)
            if envelope.type == TripAccepted.event_type:
                data = json.loads(envelope.data)
                found[data["trip_id"]] = (record, data)
        return found

    records = await read_topic(
        p.settings, p.settings.topic(GATEWAY_TRIPS.name), until=lambda rs: until_trip in by_trip(rs), timeout=20
    )
    return by_trip(records)


async def parked(p: Platform, dlq: str, trip_ids: set[str]) -> dict[str, dict[str, bytes]]:
    """The dead letters of ``dlq`` (internal) of these trips: trip id → headers (waits for all)."""

    def ours(records: list[Record]) -> dict[str, dict[str, bytes]]:
        found = {}
        for record in records:
            trip_id = json.loads(record.value or b"{}").get("trip_id")
            if trip_id in trip_ids:
                found[trip_id] = dict(record.headers)
        return found

    records = await read_topic(p.settings, p.settings.topic(dlq), until=lambda rs: len(ours(rs)) >= len(trip_ids),
                               timeout=20)
    found = ours(records)
    assert set(found) == trip_ids, f"parked: {sorted(found)} of {sorted(trip_ids)}"
    return found


async def subsidy_events(p: Platform, event_type: str, trip_id: str) -> list[dict[str, Any]]:
    rows = await p.subsidy_pool.fetch(
        "SELECT payload FROM outbox WHERE header_values[array_position(header_names, 'ce_type')] = $1::bytea",
        event_type.encode(),
    )
    return [d for d in (json.loads(r["payload"]) for r in rows) if d.get("trip_id") == trip_id]


async def budget(p: Platform, program_id: str) -> dict[str, int]:
    row = await p.subsidy_pool.fetchrow(
        """
        SELECT b.available,
               (SELECT coalesce(sum(reserved_delta), 0) FROM budget_ledger l WHERE l.program_id = b.program_id)
                   AS reserved,
               (SELECT coalesce(sum(spent_delta), 0) FROM budget_ledger l WHERE l.program_id = b.program_id)
                   AS spent,
               (SELECT count(*) FROM budget_ledger l WHERE l.program_id = b.program_id) AS entries
        FROM budgets b WHERE b.program_id = $1
        """,
        program_id,
    )
    assert row is not None
    return {k: int(v) for k, v in dict(row).items()}


def grant_state(row: asyncpg.Record) -> tuple[Any, ...]:
    return row["status"], row["legs_counted"], row["remaining"], row["drawn"]


# --- tests -----------------------------------------------------------------------------------------


async def test_a_trip_on_jals_topic_is_forwarded_as_jals(platform: Platform) -> None:
    grant_id, number = f"G-{uid()}", f"NCH-{uid()}"
    unnamed = report(grant_id, number)  # the topic says who reports: the record need not
    named = report(grant_id, number, partner="jal")
    sent = await report_trips(platform, "jal", unnamed, named)

    found = await forwarded(platform, named.trip_id)
    for trip, envelope in zip((unnamed, named), sent, strict=True):
        record, data = found[trip.trip_id]
        assert record.key == grant_id.encode()  # keyed by grant id, as subsidy's trips are partitioned
        assert data == {**trip.model_dump(mode="json"), "partner": "jal"}
        headers = dict(record.headers)
        assert headers["ce_source"] == b"/nichiiki/partner_gateway"
        assert headers["ce_causationid"] == str(envelope.id).encode()


async def test_a_record_on_jals_topic_claiming_ana_is_parked_and_never_forwarded(platform: Platform) -> None:
    grant_id, number = f"G-{uid()}", f"NCH-{uid()}"
    claim = report(grant_id, number, partner="ana")
    after = report(grant_id, number)  # same key, same partition: handled after the claim
    await report_trips(platform, "jal", claim, after)

    dead = await parked(platform, partner_trips("jal").dlq, {claim.trip_id})
    reason = dead[claim.trip_id]["dlq_reason"].decode()
    assert reason.startswith("TripClaimsAnotherPartner: trip-claims-another-partner:")
    assert "names partner 'ana'" in reason
    assert dead[claim.trip_id]["dlq_topic"] == platform.settings.topic(partner_trips("jal").name).encode()
    found = await forwarded(platform, after.trip_id)
    assert claim.trip_id not in found and found[after.trip_id][1]["partner"] == "jal"


async def test_a_my_number_in_a_trip_is_parked_at_the_gateway(platform: Platform) -> None:
    my_number = a_my_number()
    grant_id, number = f"G-{uid()}", f"NCH-{uid()}"
    in_trip_id = report(grant_id, number, trip_id=f"JL-{my_number}")
    in_number = report(grant_id, f"NCH {my_number[:4]}-{my_number[4:8]}-{my_number[8:]}")  # separators too
    in_correlation = report(grant_id, number)
    after = report(grant_id, number)
    await report_trips(platform, "jal", in_trip_id, in_number)
    await report_trips(platform, "jal", in_correlation, correlation_id=f"case {my_number}")
    await report_trips(platform, "jal", after)

    dead = await parked(platform, partner_trips("jal").dlq, {in_trip_id.trip_id, in_number.trip_id,
                                                             in_correlation.trip_id})
    for headers in dead.values():
        reason = headers["dlq_reason"]
        assert reason.startswith(b"MyNumberNotAllowed: my-number-not-allowed")
        assert my_number.encode() not in reason  # the refusal says where, never what
    found = await forwarded(platform, after.trip_id)
    assert not {in_trip_id.trip_id, in_number.trip_id, in_correlation.trip_id} & set(found)


async def test_jal_cannot_move_anas_budget_by_any_route(platform: Platform) -> None:
    """HTTP with JAL's token, or JAL's trip topic with or without naming ANA: ANA's grant and
    budget stay as they were; the same trip on ANA's own topic is counted (the route works)."""
    resident = f"res-{uid()}"
    issued = certificate(SUSAKI, resident, "ana", await platform.seal(resident, "AMC-1"))
    ana_grant = await granted(platform, issued, ANA_PROGRAM)
    number, grant_id = issued.certificate_number, ana_grant["grant_id"]
    before, budget_before = grant_state(ana_grant), await budget(platform, ANA_PROGRAM)

    # HTTP: the answer to a grant that does not exist.
    jal_token = bearer(platform.settings, "partner", partner="jal")
    body = {"grant_id": grant_id, "certificate_number": number, "trip_id": f"H-{uid()}", "trip_kind": "round_trip",
            "travelled_on": (TODAY - timedelta(days=1)).isoformat(), "discount_jpy": 5000}
    response = await platform.subsidy.post("/v1/redemptions", json=body, headers=jal_token)
    assert response.status_code == 404 and response.json()["code"] == "unknown-grant"
    nobody = await platform.subsidy.post("/v1/redemptions", json=body | {"grant_id": f"G-{uid()}"},
                                         headers=jal_token)
    assert nobody.status_code == 404 and nobody.json()["code"] == "unknown-grant"

    # Kafka: on JAL's topic as JAL (forwarded, then refused by subsidy as an unknown grant), naming
    # ANA (parked at the gateway), and a grant id nobody issued (the same answer as ANA's).
    as_jal = report(grant_id, number, discount=5000)
    posing = report(grant_id, number, partner="ana", discount=5000)
    unknown = report(f"G-{uid()}", number, discount=5000)
    await report_trips(platform, "jal", as_jal, posing, unknown)
    at_gateway = await parked(platform, partner_trips("jal").dlq, {posing.trip_id})
    assert b"trip-claims-another-partner" in at_gateway[posing.trip_id]["dlq_reason"]
    at_subsidy = await parked(platform, GATEWAY_TRIPS.dlq, {as_jal.trip_id, unknown.trip_id})
    for trip in (as_jal, unknown):
        assert at_subsidy[trip.trip_id]["dlq_reason"] == (
            f"UnknownGrant: no grant {trip.grant_id} for certificate {number} (and no program of this partner for it)"
        ).encode()
    for trip in (as_jal, posing):
        for event in (GrantRedeemed, GrantRedemptionRejected):
            assert await subsidy_events(platform, event.event_type, trip.trip_id) == []
    row = await platform.subsidy_pool.fetchrow("SELECT * FROM grants WHERE grant_id = $1", grant_id)
    assert row is not None and grant_state(row) == before
    assert await budget(platform, ANA_PROGRAM) == budget_before
    assert await platform.subsidy_pool.fetchval("SELECT count(*) FROM trips WHERE grant_id = $1", grant_id) == 0

    # ANA's own trip on its own topic moves its grant: the refusals above were not for want of a route.
    own = report(grant_id, number, discount=5000)
    await report_trips(platform, "ana", own)

    async def counted() -> bool:
        return bool(await subsidy_events(platform, GrantRedeemed.event_type, own.trip_id))

    await eventually(counted, timeout=20)
    [redeemed] = await subsidy_events(platform, GrantRedeemed.event_type, own.trip_id)
    assert redeemed["partner"] == "ana" and redeemed["amount"] == 5000
    assert (await budget(platform, ANA_PROGRAM))["spent"] == budget_before["spent"] + 5000


async def test_a_partner_connecting_to_the_edge_finds_only_partner_topics(platform: Platform) -> None:
    settings = platform.settings
    edge = KafkaConnection.edge(settings)
    assert edge.bootstrap != settings.kafka_bootstrap  # the tests' edge is a broker of its own
    admin = AIOKafkaAdminClient(**edge.aiokafka_kwargs(), request_timeout_ms=10_000)
    await admin.start()
    try:
        topics = set(await admin.list_topics())
    finally:
        await admin.close()
    ours = {t.removeprefix(settings.topic_prefix) for t in topics if t.startswith(settings.topic_prefix)}
    assert ours >= {partner_feed("jal").name, partner_trips("jal").name, partner_feed("ana").name}
    # Every topic there (of every test module) is a partner's feed or trips topic; nothing internal.
    for name in topics - {t for t in topics if t.startswith("__")}:
        # test prefixes (``t1234.``, and nested ones a test adds for topics of its own) end before "partner."
        unprefixed = name[name.index("partner."):] if "partner." in name else name
        assert cluster_of(unprefixed) == "edge", name
        assert not name.endswith(".dlq"), name
    internal = {settings.topic(t.name) for t in (*CORE_TOPICS, *dead_letter_topics())}
    assert not internal & topics


def _keys(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield key
            yield from _keys(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from _keys(inner)


async def test_no_record_on_any_partner_feed_carries_personal_data(platform: Platform) -> None:
    """The JAL journey over both clusters (registration, certificate, grant, four round trips on
    JAL's topic, the miles credited), then every record of every partner's feed is read."""
    resident = f"res-{uid()}"
    registration, contact = await registered(platform, resident, SHIRAHAMA, "jal")
    await publish(platform, "registration", registration, resident)
    issued = certificate(SHIRAHAMA, resident, "jal", await platform.seal(resident, "JMB-777"))
    grant = await granted(platform, issued, JAL_PROGRAM)
    number, grant_id = issued.certificate_number, grant["grant_id"]
    trips = [report(grant_id, number, days_ago=20 - 4 * i) for i in range(4)]
    await report_trips(platform, "jal", *trips)

    def redeemed(records: list[Record]) -> list[dict[str, Any]]:
        grants = [json.loads(r.value) for r in records if r.value is not None and certificate_of_key(r.key.decode())
                  == number and dict(r.headers).get("ce_type") == PartnerGrant.event_type.encode()]
        return [g for g in grants if g["state"] == "redeemed"]

    jal_feed = platform.settings.topic(partner_feed("jal").name)
    records = await read_topic(platform.settings, jal_feed, until=lambda rs: len(redeemed(rs)) >= 4, timeout=30)
    assert sorted(g["trip_id"] for g in redeemed(records)) == sorted(t.trip_id for t in trips)
    assert sorted(g["amount"] for g in redeemed(records)) == [0, 0, 0, 30_000]  # credited once, at the fourth

    # The member number too: sealed for JAL, it is never readable on a feed.
    personal = [resident, "JMB-777", contact.name, contact.name_kana, contact.email, contact.phone or "",
                json.dumps(contact.name)[1:-1], json.dumps(contact.name_kana)[1:-1]]
    checked = 0
    for code in PARTNER_CODES:
        topic = platform.settings.topic(partner_feed(code).name)
        feed = records if code == "jal" else await read_topic(platform.settings, topic, until=lambda rs: False,
                                                              timeout=1.5)
        for record in feed:
            raw = (record.value or b"") + b"".join(v for _, v in record.headers)
            assert not [s for s in personal if s.encode() in raw], (code, record.key)
            if record.value is None:  # a tombstone
                continue
            data = json.loads(record.value)
            assert not PERSONAL_FIELDS & set(_keys(data)), (code, data)
            checked += 1
    assert checked >= 6  # the certificate, the grant and its four redemptions at least


# --- partners registered at run time: their trips are read without a restart -------------------------


async def register_partner(p: Platform) -> str:
    code = f"kf{uid()}"
    response = await p.gateway.post("/v1/partners", headers=bearer(p.settings, "admin", f"admin-{uid()}"), json={
        "code": code, "name": "Kochi test ferry", "kind": "ferry", "member_number_format": "^KF[0-9]{6}$",
    })
    assert response.status_code == 201, response.text
    assert response.json()["trips_topic"] == partner_trips(code).name
    return code


async def test_a_partner_registered_at_run_time_has_its_trips_forwarded_without_a_restart(
    platform: Platform,
) -> None:
    code = await register_partner(platform)
    trip = report(f"G-{uid()}", f"NCH-{uid()}")
    await report_trips(platform, code, trip)

    found = await forwarded(platform, trip.trip_id)
    record, data = found[trip.trip_id]
    assert data == {**trip.model_dump(mode="json"), "partner": code}
    assert record.key == trip.grant_id.encode()
    # and as that partner only: a record on its topic claiming JAL is parked
    claim = report(f"G-{uid()}", f"NCH-{uid()}", partner="jal")
    await report_trips(platform, code, claim)
    dead = await parked(platform, partner_trips(code).dlq, {claim.trip_id})
    assert b"trip-claims-another-partner" in dead[claim.trip_id]["dlq_reason"]


async def test_a_partner_registered_through_another_replica_has_its_trips_forwarded(platform: Platform) -> None:
    """Another replica registered it: this one learns it from the database (the periodic reload)
    and subscribes to its trips topic, which that replica created."""
    code = f"kf{uid()}"
    async with platform.gateway_pool.acquire() as conn:
        assert await gateway_store.register_partner(
            conn, code=code, name="Other replica's ferry", kind="ferry", member_number_format="^KF[0-9]{6}$",
            feed_transport="http", programs=(), new_key=new_pseudonym_key(), registered_by="admin-elsewhere",
        )
    await ensure_topics(platform.settings, partner_topics([code]))
    trip = report(f"G-{uid()}", f"NCH-{uid()}")
    await report_trips(platform, code, trip)

    records = await read_topic(  # the reload (10 s), then the watchdog's re-subscription (2 s)
        platform.settings, platform.settings.topic(GATEWAY_TRIPS.name), timeout=40,
        until=lambda rs: any(trip.trip_id.encode() in (r.value or b"") for r in rs),
    )
    [data] = [json.loads(r.value) for r in records if r.value is not None and trip.trip_id.encode() in r.value]
    assert data["partner"] == code


async def topics_on(settings: Settings, cluster: Cluster) -> set[str]:
    admin = AIOKafkaAdminClient(**KafkaConnection.of(settings, cluster).aiokafka_kwargs(), request_timeout_ms=10_000)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


async def test_a_registered_partners_topics_the_broker_lost_are_made_again(platform: Platform) -> None:
    """A broker that lost the topics of a partner registered at run time (the embedded one, restarted)
    has them made again by the gateway, and the partner's trips are read again."""
    code = await register_partner(platform)
    settings = platform.settings
    clusters: tuple[Cluster, ...] = ("edge", "internal")
    ours = {c: {settings.topic(t.name) for t in partner_topics([code]) if t.cluster == c} for c in clusters}
    for cluster, names in ours.items():
        admin = AIOKafkaAdminClient(**KafkaConnection.of(settings, cluster).aiokafka_kwargs())
        await admin.start()
        try:
            await admin.delete_topics(sorted(names))
        finally:
            await admin.close()
        assert not names & await topics_on(settings, cluster)

    async def made_again() -> bool:
        return all([names <= await topics_on(settings, cluster) for cluster, names in ours.items()])

    await eventually(made_again, timeout=30)
    trip = report(f"G-{uid()}", f"NCH-{uid()}")
    await report_trips(platform, code, trip)
    found = await forwarded(platform, trip.trip_id)
    assert found[trip.trip_id][1]["partner"] == code
