"""Poison events on every consumed topic, and replaying dead letters, over the real stack.

Each (topic, consuming service) pair of ``shared.contracts.topics`` gets three records it cannot
read, published on one key just before a valid event:

- headers that are not a CloudEvent (``ce_time`` is no time), so the envelope cannot be parsed;
- valid CloudEvents headers with a value that is not JSON;
- a valid envelope whose data breaks the contract (a required field is missing).

All three must be parked on ``<topic>.dlq`` by that service's consumer (``dlq_service`` names it,
``dlq_reason`` says why, the original key, value and ``ce_*`` headers travel along), and the valid
event behind them must still be applied: the stream goes on.

Replay, through real services and ``shared.kit.dead_letters.replay_dead_letters``:

- a trip reported before the subsidy service knows its certificate cannot be answered and is
  parked; once the certificate has arrived, the replay answers it (``unknown_grant``), once;
- a certificate event that subsidy could not apply because of a bug (a handler that raises,
  patched in, then "fixed") is parked by subsidy while notification and partner gateway apply it;
  after the fix the replay makes subsidy apply it once, and the other two skip the replayed record.

The services run in-process (``service_client``) on topic and database prefixes of this module,
so no other test module sees these records.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka import ConsumerRecord
from fastapi import FastAPI

from services.subsidy import handlers as subsidy_handlers
from services.subsidy.config import SubsidySettings
from shared.contracts.base import EVENT_MODELS, EventData
from shared.contracts.certification import ApplicationSubmitted, CertificateIssued
from shared.contracts.donation import DonationReceived
from shared.contracts.formats import CertificateNumber, ProgramId
from shared.contracts.listings import DigestEntry, ListingDigestDue
from shared.contracts.partners import PartnerCertificate, PartnerGrant, PartnerRegistered, TripAccepted, TripReported
from shared.contracts.planning import CorporationDesignated, PlanAdopted, PlanContent
from shared.contracts.privacy import ExportPartProvided, ExportRequested
from shared.contracts.registration import ConsentState, Contact, ResidentErased, ResidentRegistered
from shared.contracts.sealed import resident_subject
from shared.contracts.subsidy import GrantIssued, GrantRedemptionRejected
from shared.contracts.topics import (
    ALL_TOPICS,
    APPLICATIONS,
    CERTIFICATES,
    CORPORATIONS,
    DONATIONS,
    ERASURES,
    EXPORT_PARTS,
    EXPORT_REQUESTS,
    GATEWAY_PARTNERS,
    GATEWAY_TRIPS,
    GRANTS,
    LISTING_DIGESTS,
    PARTNER_CODES,
    PLANS,
    RESIDENTS,
    SERVICES,
    Topic,
    partner_of_topic,
    partner_trips,
)
from shared.kit.clock import SYSTEM_CLOCK
from shared.kit.consumer import EventConsumer
from shared.kit.dead_letters import replay_dead_letters
from shared.kit.envelope import Envelope, new_envelope
from shared.kit.keyring import Keyring
from shared.kit.settings import Settings
from shared.reference import prefecture_of
from shared.stack.backends import Backends
from tests.conftest import make_settings
from tests.support import (
    bearer,
    envelope_sealed_for,
    eventually,
    membership,
    produce,
    read_topic,
    seal_for_tests,
    service_client,
)
from tests.support import caught_up as support_caught_up

pytestmark = [pytest.mark.stack, pytest.mark.timeout(240)]

TODAY = SYSTEM_CLOCK.today()
NOW = datetime.now(UTC)
SHIRAHAMA = "304018"  # JAL only
NAGANO = "202011"  # plans and support corporations (no grant or certificate here uses it)
ANA_TOWNS = ("392065", "393061", "393410", "393649", "314030", "313726")  # ANA fare discount, 1,000,000 yen each
SOURCES = {
    RESIDENTS.name: "registration", ERASURES.name: "registration", APPLICATIONS.name: "certification",
    CERTIFICATES.name: "certification",
    GRANTS.name: "subsidy", DONATIONS.name: "donation", GATEWAY_TRIPS.name: "partner_gateway",
    GATEWAY_PARTNERS.name: "partner_gateway", EXPORT_REQUESTS.name: "registration",
    EXPORT_PARTS.name: "subsidy",  # one of the services that answer exports
    PLANS.name: "planning", CORPORATIONS.name: "planning", LISTING_DIGESTS.name: "listings",
    # each partner writes its own trips topic (on the partner-facing cluster)
    **{partner_trips(code).name: code for code in PARTNER_CODES},
}


# --- The running services --------------------------------------------------------------------------


@dataclass
class Service:
    name: str
    app: FastAPI
    client: httpx.AsyncClient
    settings: Settings

    @property
    def pool(self) -> asyncpg.Pool:
        pool: asyncpg.Pool = self.app.state.runtime.pool
        return pool

    def consumer_of(self, topic: Topic) -> EventConsumer:
        """The consumer (group) of this service that reads ``topic``."""
        full = self.settings.topic(topic.name)
        consumers: list[EventConsumer] = self.app.state.runtime.consumers
        return next(c for c in consumers if full in c.topics)

    def auth(self, role: str, subject: str | None = None, **claims: str) -> dict[str, str]:
        return bearer(self.settings, role, subject, **claims)


def build_app(name: str, settings: Settings) -> FastAPI:
    if name == "subsidy":
        from services.subsidy.main import create_app as subsidy_app

        return subsidy_app(settings, SubsidySettings(sweep_interval_s=3600, trip_consumers=1))
    if name == "certification":
        from services.certification.main import create_app as certification_app

        return certification_app(settings)
    if name == "notification":
        from services.notification.main import create_app as notification_app

        return notification_app(settings)
    if name == "registration":
        from services.registration.main import create_app as registration_app

        return registration_app(settings, maintenance_interval_s=3600)
    if name == "donation":
        from services.donation.main import create_app as donation_app

        return donation_app(settings)
    if name == "identity":
        from services.identity.main import create_app as identity_app

        return identity_app(settings)
    if name == "insights":
        from services.insights.main import create_app as insights_app

        return insights_app(settings)
    if name == "listings":
        from services.listings.main import ListingsConfig
        from services.listings.main import create_app as listings_app

        return listings_app(settings, config=ListingsConfig(sweep_interval_s=3600))
    from services.partner_gateway.main import create_app as gateway_app

    return gateway_app(settings)


@dataclass
class Stack:
    settings: Settings
    services: dict[str, Service]

    def __getitem__(self, name: str) -> Service:
        return self.services[name]

    @property
    def keyring(self) -> Keyring:
        """The key store the stack's services share: events are sealed with it as upstream seals them."""
        keyring: Keyring = next(iter(self.services.values())).app.state.runtime.keyring
        return keyring


async def start_stack(exits: AsyncExitStack, settings: Settings, names: list[str]) -> Stack:
    services: dict[str, Service] = {}
    for name in names:
        app = build_app(name, settings)
        client = await exits.enter_async_context(service_client(app))
        services[name] = Service(name, app, client, settings)
    return Stack(settings, services)


@pytest.fixture(scope="module")
async def poison_stack(own_backends: Backends, run_id: str) -> AsyncIterator[Stack]:
    """Every consuming service, on servers of this module: these tests wait on group commits, and
    here they wait on no other module's topics and groups."""
    async with AsyncExitStack() as exits:
        yield await start_stack(
            exits, make_settings(own_backends, f"{run_id}poi"),
            [
                "certification", "subsidy", "notification", "partner_gateway", "registration", "donation", "identity",
                "insights", "listings",
            ],
        )


@pytest.fixture(scope="module")
async def replay_stack(own_backends: Backends, run_id: str) -> AsyncIterator[Stack]:
    """The services of the replay tests, on prefixes of their own: their DLQs hold no poison."""
    async with AsyncExitStack() as exits:
        yield await start_stack(
            exits, make_settings(own_backends, f"{run_id}rpl"), ["subsidy", "notification", "partner_gateway"]
        )


# --- Events ----------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    # 11 hex digits: never twelve digits in a row, the shape of a My Number, which the guard refuses
    return f"{prefix}-{uuid.uuid4().hex[:11]}"


def new_number(code: str) -> str:
    return CertificateNumber.format(code, TODAY.year, random.randint(1, CertificateNumber.MAX_SEQUENCE))


def registered(resident_id: str, *, share_with: str | None = None) -> ResidentRegistered:
    """Its contact sealed with the test key: ``publish`` seals it with the stack's key store."""
    consents = [ConsentState(purpose="share_certificate", partner=share_with, granted=True, at=NOW)]
    return ResidentRegistered(
        resident_id=resident_id, registration_id=new_id("reg"), municipality_code=SHIRAHAMA,
        prefecture_code=prefecture_of(SHIRAHAMA).code, tier="basic", status="active", legal_address_code="131016",
        contact=seal_for_tests(resident_subject(resident_id), Contact(
            name="山田 花子", name_kana="ヤマダ ハナコ", email=f"{resident_id}@example.jp",
        )),
        consents=consents if share_with else [], registered_at=NOW,
    )


def certificate(number: str, resident_id: str, partner: str, member_number: str | None = None) -> CertificateIssued:
    return CertificateIssued(
        certificate_number=number, resident_id=resident_id,
        municipality_code=CertificateNumber.parse(number).municipality_code,
        valid_from=TODAY - timedelta(days=10), valid_until=TODAY + timedelta(days=354), status="valid",
        partners=[membership(partner, member_number, resident_id=resident_id)],
        application_id=new_id("app"), issued_at=NOW,
    )


def grant_issued(number: str, resident_id: str) -> GrantIssued:
    return GrantIssued(
        grant_id=new_id("gr"), program_id=ProgramId.format("jal-dual-residence-miles", SHIRAHAMA), partner="jal",
        mechanism="mileage_grant", certificate_number=number, resident_id=resident_id, municipality_code=SHIRAHAMA,
        unit="miles", reserved=30_000, window_from=TODAY, window_until=TODAY + timedelta(days=121), issued_at=NOW,
    )


def envelope_for(topic: Topic, data: EventData, subject: str, key: str | None = None) -> Envelope:
    return new_envelope(SOURCES[topic.name], data, subject=subject, key=key)


async def sealed(stack: Stack, envelope: Envelope) -> Envelope:
    """The envelope as upstream publishes it: its personal fields sealed with the stack's key store
    (same id), so the consuming services can open them."""
    return await envelope_sealed_for(stack.keyring, envelope)


async def publish(stack: Stack, topic: Topic, *envelopes: Envelope) -> None:
    settings = stack.settings
    ready = [await sealed(stack, e) for e in envelopes]
    await produce(settings, settings.topic(topic.name), [(e.key, e.data, e.headers()) for e in ready])


# --- Poison --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Poison:
    """A record the consumer cannot read, and the words its dead-letter reason must contain."""

    label: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    reason: str

    @property
    def event_id(self) -> str:
        return dict(self.headers)["ce_id"].decode()


def poisons_like(valid: Envelope) -> list[Poison]:
    """Three unreadable records on the valid event's key, of the valid event's type."""
    assert valid.key is not None

    def headers() -> list[tuple[str, bytes]]:
        return [(k, str(uuid.uuid4()).encode()) if k == "ce_id" else (k, v) for k, v in valid.headers()]

    bad_time = [(k, b"yesterday" if k == "ce_time" else v) for k, v in headers()]
    data = json.loads(valid.data)
    fields = EVENT_MODELS[valid.type].model_fields
    missing = next(k for k in data if fields[k].is_required())  # an id, in every contract here
    del data[missing]
    return [
        Poison("not-a-cloudevent", valid.key, valid.data, bad_time, "ce_time"),
        Poison("not-json", valid.key, b"\x00\xff{not json", headers(), "does not match"),
        Poison("breaks-the-contract", valid.key, json.dumps(data).encode(), headers(), missing),
    ]


async def dead_letters(
    settings: Settings, topic: Topic, event_ids: set[str], service: str, *, timeout: float = 40.0
) -> dict[str, ConsumerRecord[bytes, bytes]]:
    """The records of ``<topic>.dlq`` that ``service`` parked, by their ``ce_id``, once all are there."""

    def mine(records: list[ConsumerRecord[bytes, bytes]]) -> dict[str, ConsumerRecord[bytes, bytes]]:
        found: dict[str, ConsumerRecord[bytes, bytes]] = {}
        for record in records:
            headers = dict(record.headers)
            event_id = headers.get("ce_id", b"").decode()
            if event_id in event_ids and headers.get("dlq_service") == service.encode():
                found[event_id] = record
        return found

    records = await read_topic(
        settings, settings.topic(topic.dlq), until=lambda rs: len(mine(rs)) >= len(event_ids), timeout=timeout
    )
    return mine(records)


# --- What "applied" means for each pair -----------------------------------------------------------


async def messages(svc: Service, resident_id: str, kind: str) -> list[dict[str, Any]]:
    response = await svc.client.get(
        f"/v1/residents/{resident_id}/notifications", headers=svc.auth("resident", resident_id)
    )
    assert response.status_code == 200, response.text
    return [m for m in response.json()["items"] if m["kind"] == kind]


async def has_row(svc: Service, sql: str, *args: Any) -> bool:
    return bool(await svc.pool.fetchval(sql, *args))


async def resident_grants(svc: Service, resident_id: str) -> list[dict[str, Any]]:
    response = await svc.client.get(f"/v1/residents/{resident_id}/grants", headers=svc.auth("resident", resident_id))
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


async def trips_of(svc: Service, code: str) -> list[dict[str, Any]]:
    response = await svc.client.get(
        f"/v1/municipalities/{code}/redemptions", headers=svc.auth("staff", municipality=code)
    )
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


Check = Callable[[], Awaitable[bool]]


@dataclass
class Pair:
    """One consumed topic and one service that consumes it (``valid_event`` knows what to send it)."""

    topic: Topic
    service: str


PAIRS = [
    Pair(RESIDENTS, "certification"), Pair(RESIDENTS, "notification"), Pair(RESIDENTS, "partner_gateway"),
    Pair(CERTIFICATES, "subsidy"), Pair(CERTIFICATES, "notification"), Pair(CERTIFICATES, "partner_gateway"),
    Pair(APPLICATIONS, "notification"),
    Pair(GRANTS, "notification"), Pair(GRANTS, "partner_gateway"),
    Pair(DONATIONS, "subsidy"), Pair(DONATIONS, "notification"),
    Pair(GATEWAY_TRIPS, "subsidy"),
    *[Pair(partner_trips(code), "partner_gateway") for code in PARTNER_CODES],
    Pair(GATEWAY_PARTNERS, "certification"), Pair(GATEWAY_PARTNERS, "subsidy"), Pair(GATEWAY_PARTNERS, "registration"),
    Pair(ERASURES, "subsidy"), Pair(ERASURES, "donation"), Pair(ERASURES, "identity"),
    Pair(RESIDENTS, "insights"), Pair(RESIDENTS, "listings"),
    Pair(CERTIFICATES, "insights"), Pair(CERTIFICATES, "listings"),
    Pair(GRANTS, "insights"), Pair(DONATIONS, "insights"),
    *[Pair(EXPORT_REQUESTS, s) for s in EXPORT_REQUESTS.consumers],
    Pair(EXPORT_PARTS, "registration"),
    Pair(PLANS, "certification"), Pair(PLANS, "insights"),
    Pair(CORPORATIONS, "insights"), Pair(CORPORATIONS, "listings"),
    Pair(LISTING_DIGESTS, "notification"),
]


def test_every_consumed_topic_and_consuming_service_is_covered() -> None:
    declared = {(t.name, c) for t in ALL_TOPICS for c in t.consumers if c in SERVICES}
    assert declared == {(p.topic.name, p.service) for p in PAIRS}


async def valid_event(stack: Stack, pair: Pair, index: int) -> tuple[Envelope, Check]:
    """The valid event published after the poison, and the check that the service applied it."""
    svc = stack[pair.service]
    rid = new_id("res")
    match (pair.topic.name, pair.service):
        case (RESIDENTS.name, "certification"):
            env = envelope_for(RESIDENTS, registered(rid), rid)
            return env, lambda: has_row(svc, "SELECT 1 FROM residents WHERE resident_id = $1", rid)
        case (RESIDENTS.name, "notification"):
            env = envelope_for(RESIDENTS, registered(rid), rid)

            async def confirmed() -> bool:
                return len(await messages(svc, rid, "registration_confirmed")) == 1

            return env, confirmed
        case (RESIDENTS.name, "partner_gateway"):
            env = envelope_for(RESIDENTS, registered(rid, share_with="jal"), rid)
            return env, lambda: has_row(
                svc, "SELECT granted FROM share_consents WHERE resident_id = $1 AND partner = 'jal'", rid
            )
        case (CERTIFICATES.name, "subsidy"):
            number = new_number(ANA_TOWNS[0])
            env = envelope_for(CERTIFICATES, certificate(number, rid, "ana"), number)

            async def granted() -> bool:
                return [g["certificate_number"] for g in await resident_grants(svc, rid)] == [number]

            return env, granted
        case (CERTIFICATES.name, "notification"):
            number = new_number(ANA_TOWNS[1])
            env = envelope_for(CERTIFICATES, certificate(number, rid, "ana"), number)

            async def told() -> bool:
                return len(await messages(svc, rid, "certificate_issued")) == 1

            return env, told
        case (CERTIFICATES.name, "partner_gateway"):
            number = new_number(SHIRAHAMA)
            env = envelope_for(CERTIFICATES, certificate(number, rid, "jal"), number)

            async def verified() -> bool:
                response = await svc.client.get(
                    f"/v1/certificates/{number}", headers=svc.auth("partner", partner="jal")
                )
                return response.status_code == 200 and response.json()["valid"] is True

            return env, verified
        case (APPLICATIONS.name, "notification"):
            app_id = new_id("app")
            submitted = ApplicationSubmitted(
                application_id=app_id, resident_id=rid, municipality_code=SHIRAHAMA, primary_residence_code="131016",
                planned_stay_days=60, housing_basis="rented", submitted_at=NOW,
            )
            env = envelope_for(APPLICATIONS, submitted, app_id)

            async def received() -> bool:
                return len(await messages(svc, rid, "application_received")) == 1

            return env, received
        case (GRANTS.name, "notification"):
            number = new_number(SHIRAHAMA)
            grant = grant_issued(number, rid)
            env = envelope_for(GRANTS, grant, grant.grant_id, number)

            async def grant_told() -> bool:
                return len(await messages(svc, rid, "grant_issued")) == 1

            return env, grant_told
        case (GRANTS.name, "partner_gateway"):
            number = new_number(SHIRAHAMA)
            grant = grant_issued(number, rid)
            env = envelope_for(GRANTS, grant, grant.grant_id, number)
            # its certificate is not known yet: the gateway holds the grant until it is
            return env, lambda: has_row(svc, "SELECT 1 FROM held_grants WHERE event_id = $1", env.id)
        case (DONATIONS.name, "subsidy"):
            code, donation_id = ANA_TOWNS[2], new_id("don")
            donation = DonationReceived(
                donation_id=donation_id, municipality_code=code, donor_id=new_id("donor"), kind="hometown_tax",
                unit="jpy", amount=50_000, earmark="dual_residence", payment_date=TODAY, calendar_year=TODAY.year,
                received_at=NOW,
            )
            env = envelope_for(DONATIONS, donation, donation_id, code)
            return env, lambda: has_row(
                svc, "SELECT 1 FROM donation_credits WHERE donation_id = $1 AND status = 'credited'", donation_id
            )
        case (DONATIONS.name, "notification"):
            code, donation_id = ANA_TOWNS[3], new_id("don")
            receipt = DonationReceived(
                donation_id=donation_id, municipality_code=code, donor_id=new_id("donor"), resident_id=rid,
                kind="hometown_tax", unit="jpy", amount=10_000, earmark="general", payment_date=TODAY,
                calendar_year=TODAY.year, received_at=NOW, receipt_number=f"R-{index:06d}",
            )
            env = envelope_for(DONATIONS, receipt, donation_id, code)

            async def receipt_told() -> bool:
                return len(await messages(svc, rid, "receipt_issued")) == 1

            return env, receipt_told
        case (GATEWAY_TRIPS.name, "subsidy"):
            code = ANA_TOWNS[4]
            number = new_number(code)
            # the trip needs a grant: the certificate comes first (on its own topic)
            first = envelope_for(CERTIFICATES, certificate(number, rid, "ana"), number)
            await publish(stack, CERTIFICATES, first)
            await eventually(lambda: _has_grant(svc, rid), timeout=40)
            grant_id = (await resident_grants(svc, rid))[0]["grant_id"]
            trip_id = new_id("trip")
            accepted = TripAccepted(
                partner="ana", grant_id=grant_id, certificate_number=number, trip_id=trip_id, trip_kind="one_way",
                travelled_on=TODAY, discount_jpy=3_000, reported_at=NOW,
            )
            env = envelope_for(GATEWAY_TRIPS, accepted, trip_id, grant_id)

            async def counted() -> bool:
                return [(t["trip_id"], t["accepted"]) for t in await trips_of(svc, code)] == [(trip_id, True)]

            return env, counted
        case (ERASURES.name, "subsidy" | "donation" | "identity"):
            # these only hear the erasure: it is remembered, so nothing about the resident is written again
            env = envelope_for(ERASURES, ResidentErased(resident_id=rid, withdrawn_at=NOW), rid)
            return env, lambda: has_row(svc, "SELECT 1 FROM kit_erased_residents WHERE resident_id = $1", rid)
        case (RESIDENTS.name, "insights"):
            env = envelope_for(RESIDENTS, registered(rid), rid)
            return env, lambda: has_row(svc, "SELECT 1 FROM registrations WHERE resident_id = $1", rid)
        case (RESIDENTS.name, "listings"):
            env = envelope_for(RESIDENTS, registered(rid), rid)
            return env, lambda: has_row(svc, "SELECT 1 FROM resident_registrations WHERE resident_id = $1", rid)
        case (CERTIFICATES.name, "insights" | "listings"):
            number = new_number(SHIRAHAMA)
            env = envelope_for(CERTIFICATES, certificate(number, rid, "jal"), number)
            table = "certificates" if pair.service == "insights" else "resident_certificates"
            return env, lambda: has_row(
                svc, f"SELECT 1 FROM {table} WHERE certificate_number = $1 AND resident_id = $2", number, rid
            )
        case (GRANTS.name, "insights"):
            number = new_number(SHIRAHAMA)
            grant = grant_issued(number, rid)
            env = envelope_for(GRANTS, grant, grant.grant_id, number)
            return env, lambda: has_row(
                svc, "SELECT 1 FROM grants WHERE grant_id = $1 AND status = 'active'", grant.grant_id
            )
        case (DONATIONS.name, "insights"):
            code, donation_id = ANA_TOWNS[1], new_id("don")
            donation = DonationReceived(
                donation_id=donation_id, municipality_code=code, donor_id=new_id("donor"), kind="hometown_tax",
                unit="jpy", amount=30_000, earmark="dual_residence", payment_date=TODAY, calendar_year=TODAY.year,
                received_at=NOW,
            )
            env = envelope_for(DONATIONS, donation, donation_id, code)
            return env, lambda: has_row(svc, "SELECT 1 FROM donations WHERE donation_id = $1", donation_id)
        case (EXPORT_REQUESTS.name, _):
            # every service answers with its part (empty for a resident it does not know), once
            export_id = new_id("exp")
            requested = ExportRequested(export_id=export_id, resident_id=rid, requested_at=NOW)
            env = envelope_for(EXPORT_REQUESTS, requested, rid)

            async def answered() -> bool:
                parts = await outbox_events(svc, ExportPartProvided, export_id=export_id)
                return [p["service"] for p in parts] == [pair.service]

            return env, answered
        case (EXPORT_PARTS.name, "registration"):
            # registration keeps a part only of an export it was asked for
            export_id = new_id("exp")
            await svc.pool.execute(
                "INSERT INTO data_exports (export_id, resident_id, requested_at) VALUES ($1, $2, $3)",
                export_id, rid, NOW,
            )
            provided = ExportPartProvided(
                export_id=export_id, resident_id=rid, service="subsidy", provided_at=NOW,
                part=seal_for_tests(resident_subject(rid), json.dumps({"grants": []})),
            )
            env = envelope_for(EXPORT_PARTS, provided, rid)
            return env, lambda: has_row(
                svc, "SELECT 1 FROM data_export_parts WHERE export_id = $1 AND service = 'subsidy'", export_id
            )
        case (PLANS.name, "certification" | "insights"):
            # a municipal plan adopted: certification moves the town's scheme to a plan basis, insights counts it
            plan_id, code = new_id("plan"), NAGANO
            adopted = PlanAdopted(
                plan_id=plan_id, level="municipality", municipality_code=code,
                prefecture_code=prefecture_of(code).code, version=1, name="長野市特定居住促進計画",
                covers_dual_residence=True, content=PlanContent(area="市内全域"), adopted_on=TODAY,
            )
            env = envelope_for(PLANS, adopted, plan_id)
            if pair.service == "insights":
                return env, lambda: has_row(svc, "SELECT 1 FROM plans WHERE plan_id = $1", plan_id)
            return env, lambda: has_row(
                svc, "SELECT 1 FROM audit_trail WHERE action = 'plan.adopted' AND details->>'plan_id' = $1", plan_id
            )
        case (CORPORATIONS.name, "insights" | "listings"):
            corporation_id = new_id("corp")
            designated = CorporationDesignated(
                corporation_id=corporation_id, municipality_code=NAGANO, name="一般社団法人 二地域支援",
                services=["housing"], designated_on=TODAY,
            )
            env = envelope_for(CORPORATIONS, designated, corporation_id)
            return env, lambda: has_row(svc, "SELECT 1 FROM corporations WHERE corporation_id = $1", corporation_id)
        case (LISTING_DIGESTS.name, "notification"):
            digest = ListingDigestDue(
                digest_id=new_id("dig"), resident_id=rid, cadence="immediate", due_at=NOW,
                listings=[DigestEntry(
                    listing_id=new_id("lst"), kind="trial_stay", municipality_code=NAGANO, title="お試し住宅",
                    available_from=TODAY,
                )],
            )
            env = envelope_for(LISTING_DIGESTS, digest, rid)

            async def digested() -> bool:
                return len(await messages(svc, rid, "listing_digest")) == 1

            return env, digested
        case (name, "partner_gateway") if partner_of_topic(name) is not None:
            # a partner's trip (the gateway only forwards it: no grant needed for that)
            partner, trip_id, grant_id = partner_of_topic(name), new_id("trip"), new_id("gr")
            report = TripReported(
                grant_id=grant_id, certificate_number=new_number(SHIRAHAMA), trip_id=trip_id, trip_kind="one_way",
                travelled_on=TODAY, reported_at=NOW,
            )
            env = envelope_for(pair.topic, report, trip_id, grant_id)

            async def forwarded() -> bool:
                return len(await outbox_events(svc, TripAccepted, trip_id=trip_id, partner=partner)) == 1

            return env, forwarded
        case (GATEWAY_PARTNERS.name, _):
            # a partner registered through the gateway: each consumer keeps it in its partner list
            code = f"kf{uuid.uuid4().hex[:10]}"
            announced = PartnerRegistered(
                code=code, name="Poison test ferry", kind="ferry", member_number_format="^KF[0-9]{6}$",
                feed_transport="http", registered_at=NOW,
            )
            env = envelope_for(GATEWAY_PARTNERS, announced, code, code)
            return env, lambda: has_row(svc, "SELECT 1 FROM registered_partners WHERE code = $1", code)
    raise AssertionError(f"no valid event for {pair}")


async def _has_grant(svc: Service, resident_id: str) -> bool:
    return len(await resident_grants(svc, resident_id)) == 1


@pytest.mark.parametrize(
    "pair", PAIRS, ids=[f"{p.topic.name.split('.')[1]}->{p.service}" for p in PAIRS]
)
async def test_poison_is_parked_with_its_reason_and_the_next_event_is_applied(
    poison_stack: Stack, pair: Pair
) -> None:
    settings = poison_stack.settings
    svc = poison_stack[pair.service]
    consumer = svc.consumer_of(pair.topic)
    valid, applied = await valid_event(poison_stack, pair, PAIRS.index(pair))
    valid = await sealed(poison_stack, valid)
    poisons = poisons_like(valid)

    await produce(
        settings, settings.topic(pair.topic.name),
        [(p.key, p.value, p.headers) for p in poisons] + [(valid.key, valid.data, valid.headers())],
    )

    # the stream goes on: the event right behind the poison is applied
    await eventually(applied, timeout=40)

    # every poison record is on the DLQ, parked by this service, with the reason and the original record
    parked = await dead_letters(settings, pair.topic, {p.event_id for p in poisons}, consumer.name)
    assert consumer.name.startswith(pair.service)
    for poison in poisons:
        record = parked.get(poison.event_id)
        assert record is not None, f"{poison.label} was not parked by {consumer.name}"
        headers = dict(record.headers)
        reason = headers["dlq_reason"].decode()
        assert poison.reason in reason, f"{poison.label}: {reason}"
        assert headers["dlq_topic"].decode() == settings.topic(pair.topic.name)
        assert headers["dlq_offset"].isdigit() and headers["dlq_partition"].isdigit()
        assert record.key == poison.key
        assert record.value == poison.value
        assert [(k, v) for k, v in record.headers if k.startswith("ce_")] == [
            (k, v) for k, v in poison.headers if k.startswith("ce_")
        ]

    # readable envelopes that failed are marked parked in the inbox (a replay may apply them), the valid one done
    rows = await svc.pool.fetch(
        "SELECT event_id::text AS id, status FROM inbox WHERE consumer = $1 AND event_id = ANY($2::uuid[])",
        consumer.name, [uuid.UUID(p.event_id) for p in poisons[1:]] + [valid.id],
    )
    assert {r["id"]: r["status"] for r in rows} == {
        poisons[1].event_id: "parked", poisons[2].event_id: "parked", str(valid.id): "done",
    }
    # and still applied as it should be (the checks that count say: exactly once)
    assert await applied()


# --- Replay --------------------------------------------------------------------------------------


async def outbox_events(svc: Service, event: type[EventData], **match: object) -> list[dict[str, Any]]:
    rows = await svc.pool.fetch(
        "SELECT payload FROM outbox WHERE header_values[array_position(header_names, 'ce_type')] = $1::bytea",
        event.event_type.encode(),
    )
    found = [json.loads(r["payload"]) for r in rows]
    return [e for e in found if all(e.get(k) == v for k, v in match.items())]


async def test_a_trip_parked_before_its_certificate_is_answered_once_after_replay(replay_stack: Stack) -> None:
    settings = replay_stack.settings
    subsidy = replay_stack["subsidy"]
    trips = subsidy.consumer_of(GATEWAY_TRIPS)
    code, rid = ANA_TOWNS[5], new_id("res")
    number = new_number(code)
    grant_id, trip_id = new_id("gr"), new_id("trip")
    trip = envelope_for(GATEWAY_TRIPS, TripAccepted(
        partner="ana", grant_id=grant_id, certificate_number=number, trip_id=trip_id, trip_kind="round_trip",
        travelled_on=TODAY, discount_jpy=4_000, reported_at=NOW,
    ), trip_id, grant_id)

    # the certificate is not known yet: nobody to answer on the grants topic, so the trip is parked
    await publish(replay_stack, GATEWAY_TRIPS, trip)
    parked = await dead_letters(settings, GATEWAY_TRIPS, {str(trip.id)}, trips.name)
    assert "UnknownGrant" in dict(parked[str(trip.id)].headers)["dlq_reason"].decode()
    assert await subsidy.pool.fetchval("SELECT status FROM inbox WHERE event_id = $1", trip.id) == "parked"
    assert await trips_of(subsidy, code) == []

    # the fix: the certificate arrives (and gets its own grant, under another id)
    await publish(replay_stack, CERTIFICATES, envelope_for(CERTIFICATES, certificate(number, rid, "ana"), number))
    await eventually(lambda: _has_grant(subsidy, rid), timeout=40)

    assert await replay_dead_letters(settings, settings.topic(GATEWAY_TRIPS.dlq)) == 1

    async def answered() -> bool:
        return len(await trips_of(subsidy, code)) == 1

    await eventually(answered, timeout=40)
    [recorded] = await trips_of(subsidy, code)
    assert (recorded["trip_id"], recorded["accepted"], recorded["reason"]) == (trip_id, False, "unknown_grant")
    # the replayed record again (a redelivery) and a second replay change nothing
    await publish(replay_stack, GATEWAY_TRIPS, trip)
    assert await replay_dead_letters(settings, settings.topic(GATEWAY_TRIPS.dlq), idle_s=0.5) == 0
    await caught_up(subsidy)
    assert len(await trips_of(subsidy, code)) == 1
    assert len(await outbox_events(subsidy, GrantRedemptionRejected, trip_id=trip_id)) == 1
    assert await subsidy.pool.fetchval("SELECT status FROM inbox WHERE event_id = $1", trip.id) == "done"


async def caught_up(svc: Service, timeout: float = 40.0) -> None:
    await support_caught_up(svc.app, timeout=timeout, interval=0.1)


async def test_an_event_parked_by_a_bug_is_applied_once_after_the_fix_and_others_skip_it(
    replay_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = replay_stack.settings
    subsidy, notification = replay_stack["subsidy"], replay_stack["notification"]
    gateway = replay_stack["partner_gateway"]
    code, rid = ANA_TOWNS[0], new_id("res")
    number = new_number(code)
    issued = envelope_for(CERTIFICATES, certificate(number, rid, "ana", "1234567890"), number)

    async def bug(*args: object, **kwargs: object) -> None:
        raise RuntimeError("bug: grants are broken in this release")

    monkeypatch.setattr(subsidy_handlers, "grant_certificate", bug)
    await publish(replay_stack, CERTIFICATES, issued)

    # subsidy retries, then parks it; notification and the partner gateway apply it meanwhile
    parked = await dead_letters(settings, CERTIFICATES, {str(issued.id)}, "subsidy")
    reason = dict(parked[str(issued.id)].headers)["dlq_reason"].decode()
    assert "RuntimeError: bug: grants are broken" in reason and "after 3 attempts" in reason
    assert await resident_grants(subsidy, rid) == []

    async def told() -> bool:
        return len(await messages(notification, rid, "certificate_issued")) == 1

    async def delivered(record: type[EventData]) -> int:
        return int(await gateway.pool.fetchval(
            "SELECT count(*) FROM deliveries WHERE certificate_number = $1 AND partner = 'ana' AND record_type = $2",
            number, record.event_type,
        ))

    async def gateway_delivered() -> bool:
        return await delivered(PartnerCertificate) == 1

    await eventually(told, timeout=40)
    await eventually(gateway_delivered, timeout=40)

    # the fix is deployed, the dead letters are replayed
    monkeypatch.undo()
    assert await replay_dead_letters(settings, settings.topic(CERTIFICATES.dlq)) == 1

    async def granted() -> bool:
        return [g["certificate_number"] for g in await resident_grants(subsidy, rid)] == [number]

    await eventually(granted, timeout=40)
    await caught_up(subsidy)
    await caught_up(notification)
    await caught_up(gateway)
    # the replayed certificate event was skipped by the two that had applied it ...
    assert len(await messages(notification, rid, "certificate_issued")) == 1
    assert await delivered(PartnerCertificate) == 1
    # ... while the grant that subsidy now issued reached them both, once
    assert len(await messages(notification, rid, "grant_issued")) == 1
    assert await delivered(PartnerGrant) == 1
    assert len(await outbox_events(subsidy, GrantIssued, certificate_number=number)) == 1
    for svc in (subsidy, notification, gateway):
        status = await svc.pool.fetchval(
            "SELECT status FROM inbox WHERE consumer = $1 AND event_id = $2", svc.consumer_of(CERTIFICATES).name,
            issued.id,
        )
        assert status == "done", svc.name
