"""Every event delivered twice, out of order across topics: the final state is the once-only one.

For subsidy, partner gateway and notification, a scenario is a list of upstream events in phases.
Each scenario runs twice, on fresh database and topic prefixes of its own (so the two runs share
nothing), with the service in-process:

- run A publishes every event once, in order, each handled before the next is published;
- run B publishes every event twice: the interleaving across topics, and across keys of one
  topic, is shuffled, the order per key within a topic is kept (Kafka's only order guarantee),
  and each second copy goes anywhere after its first (a redelivery, a re-send from an outbox).

Both runs wait until the service is quiescent (its groups committed to the end of their topics,
its outbox relayed), then read the final state through the service's own API and compare it,
normalised: ids the service generates at random (grant ids, pseudonyms, message ids) and
timestamps are left out. The seed of run B's shuffle is in every failure message
(``NICHIIKI_REDELIVERY_SEED`` replays one).

Where the design allows no reordering, the scenario keeps a phase barrier, and says why:

- subsidy: trips name a grant id, which exists only after the grant is issued, so trips come in a
  second phase (with the grant ids of that run), shuffled with more certificate and donation events;
- notification: a decision that arrives before the resident's registration is written with a
  generic greeting and no e-mail (documented), so registrations and contact changes come first.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import murmur2
from fastapi import FastAPI

from services.subsidy.config import SubsidySettings
from shared.contracts.base import EventData
from shared.contracts.certification import (
    ApplicationRejected,
    ApplicationSubmitted,
    CertificateExpiring,
    CertificateIssued,
    CertificateRenewed,
    CertificateRevoked,
)
from shared.contracts.common import SealedMembership
from shared.contracts.donation import DonationReceived, DonationRefunded, OneStopExceptionVoided
from shared.contracts.formats import CertificateNumber, ProgramId
from shared.contracts.partners import TripAccepted, certificate_of_key, grant_key
from shared.contracts.registration import (
    ConsentChanged,
    ConsentState,
    Contact,
    ContactChanged,
    PremiumApproved,
    PremiumRequested,
    ResidentRegistered,
    ResidentWithdrawn,
)
from shared.contracts.sealed import Sealed, resident_subject
from shared.contracts.subsidy import (
    GrantCancelled,
    GrantIssued,
    GrantRedeemed,
    GrantRedemptionRejected,
    GrantWaitlisted,
)
from shared.contracts.topics import (
    APPLICATIONS,
    CERTIFICATES,
    DONATIONS,
    GATEWAY_TRIPS,
    GRANTS,
    PARTNER_CODES,
    PARTNER_FEED,
    RESIDENTS,
    Topic,
    partner_feed,
)
from shared.kit.clock import SYSTEM_CLOCK
from shared.kit.consumer import EventConsumer
from shared.kit.envelope import Envelope, new_envelope
from shared.kit.keyring import open_with
from shared.kit.settings import Settings
from shared.reference import prefecture_of
from shared.stack.backends import Backends
from tests.conftest import make_settings
from tests.support import bearer, caught_up, envelope_sealed_for, membership, seal_for_tests, service_client

pytestmark = [pytest.mark.stack, pytest.mark.timeout(240)]

SEED = int(os.environ.get("NICHIIKI_REDELIVERY_SEED") or random.randrange(10**6))
TODAY = SYSTEM_CLOCK.today()
T0 = datetime(TODAY.year, TODAY.month, TODAY.day, 1, 0, tzinfo=UTC) - timedelta(days=3)
IKI = "422100"  # JAL (30,000 miles) and Kyushu Yusen (1,000,000 yen)
SHIRAHAMA = "304018"  # JAL only
SOURCES = {
    RESIDENTS.name: "registration", APPLICATIONS.name: "certification", CERTIFICATES.name: "certification",
    GRANTS.name: "subsidy", DONATIONS.name: "donation", GATEWAY_TRIPS.name: "partner_gateway",
}
Item = tuple[Topic, Envelope]


def at(minutes: int) -> datetime:
    """A fixed instant of the scenario (events carry it, so both runs see the same facts)."""
    return T0 + timedelta(minutes=minutes)


def event(topic: Topic, data: EventData, subject: str, key: str | None = None, *, minute: int = 0) -> Item:
    return topic, new_envelope(SOURCES[topic.name], data, subject=subject, key=key, time=at(minute))


# --- One run: a service on fresh prefixes ---------------------------------------------------------


@dataclass
class Run:
    label: str
    service: str
    app: FastAPI
    client: httpx.AsyncClient
    settings: Settings

    @property
    def pool(self) -> asyncpg.Pool:
        pool: asyncpg.Pool = self.app.state.runtime.pool
        return pool

    def auth(self, role: str, subject: str | None = None, **claims: str) -> dict[str, str]:
        return bearer(self.settings, role, subject, **claims)

    async def get(self, path: str, role: str = "admin", subject: str | None = None, **claims: str) -> Any:
        response = await self.client.get(path, headers=self.auth(role, subject, **claims))
        assert response.status_code == 200, f"{path}: {response.status_code} {response.text}"
        return response.json()


def build_app(service: str, settings: Settings) -> FastAPI:
    if service == "subsidy":
        from services.subsidy.main import create_app as subsidy_app

        return subsidy_app(settings, SubsidySettings(sweep_interval_s=3600))
    if service == "notification":
        from services.notification.main import create_app as notification_app

        return notification_app(settings)
    from services.partner_gateway.main import create_app as gateway_app

    return gateway_app(settings)


@asynccontextmanager
async def running(backends: Backends, run_id: str, service: str, label: str) -> AsyncIterator[Run]:
    settings = make_settings(backends, f"{run_id}{label}{uuid.uuid4().hex[:5]}")
    app = build_app(service, settings)
    async with service_client(app) as client:
        yield Run(label, service, app, client, settings)


#: What besides the outbox must be drained before a service is quiescent.
DRAINED = {"partner_gateway": "SELECT count(*) FROM verify_cache_queue"}


async def quiescent(run: Run, timeout: float = 60.0) -> None:
    """Every consumer group of the run committed to the end of its topics; nothing left to relay."""
    await caught_up(run.app, also_empty=DRAINED.get(run.service), timeout=timeout)


async def publish(run: Run, items: list[Item]) -> None:
    """In the given order, each acknowledged before the next is sent."""
    producer = AIOKafkaProducer(bootstrap_servers=run.settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for topic, envelope in items:
            await producer.send_and_wait(
                run.settings.topic(topic.name), value=envelope.data, key=envelope.key, headers=envelope.headers()
            )
    finally:
        await producer.stop()


def twice_interleaved(items: list[Item], rng: random.Random) -> list[Item]:
    """Every item twice; per (topic, key) the first copies keep their order, each second copy comes
    anywhere after its first; the queues of all keys and topics are interleaved at random."""
    queues: dict[tuple[str, bytes | None], list[Item]] = {}
    for item in items:
        queues.setdefault((item[0].name, item[1].key), []).append(item)
    for name, queue in queues.items():
        doubled = list(queue)
        for item in queue:
            first = next(i for i, x in enumerate(doubled) if x is item)
            doubled.insert(rng.randint(first + 1, len(doubled)), item)
        queues[name] = doubled
    merged: list[Item] = []
    while queues:
        # weighted by what is left, so that long queues do not bunch up at the end
        keys = list(queues)
        name = rng.choices(keys, weights=[len(queues[k]) for k in keys])[0]
        merged.append(queues[name].pop(0))
        if not queues[name]:
            del queues[name]
    return merged


Phase = Callable[[Run], Awaitable[list[Item]]]
State = Callable[[Run], Awaitable[Any]]


def seen(run: Run) -> dict[str, int]:
    """What the run's consumers made of the records they got (handled, skipped as duplicates...)."""
    consumers: list[EventConsumer] = run.app.state.runtime.consumers
    fields = ("handled", "duplicates", "skipped", "parked")
    return {f: sum(getattr(c.stats, f) for c in consumers) for f in fields}


async def sealed_items(run: Run, phase: Phase) -> list[Item]:
    """The phase's events with their personal fields sealed with the run's own key store, as the
    upstream service would have sealed them (each run has its own: the services open them there)."""
    keyring = run.app.state.runtime.keyring
    return [(topic, await envelope_sealed_for(keyring, envelope)) for topic, envelope in await phase(run)]


async def once_in_order(run: Run, phases: list[Phase]) -> None:
    published = 0
    for phase in phases:
        for item in await sealed_items(run, phase):
            await publish(run, [item])
            await quiescent(run)
            published += 1
    counts = seen(run)  # (a rebalance may redeliver a batch even here: duplicates are not counted on)
    assert counts["parked"] == 0 and counts["handled"] + counts["skipped"] >= published, counts


async def twice_shuffled(run: Run, phases: list[Phase], rng: random.Random) -> list[str]:
    order: list[str] = []
    for phase in phases:
        items = twice_interleaved(await sealed_items(run, phase), rng)
        order += [f"{topic.name.split('.')[1]}:{env.type.split('.')[-2]}:{env.subject}" for topic, env in items]
        await publish(run, items)
        await quiescent(run)
    # every record got there twice: the second copies were recognised (or skipped, like the first)
    counts = seen(run)
    assert counts["parked"] == 0 and counts["duplicates"] > 0, counts
    assert sum(counts.values()) >= len(order), counts
    return order


async def compare_runs(
    backends: Backends, run_id: str, service: str, phases: list[Phase], state: State
) -> tuple[Any, Any]:
    rng = random.Random(SEED)

    async def run_a() -> Any:
        async with running(backends, run_id, service, "a") as run:
            await once_in_order(run, phases)
            return await state(run)

    async def run_b() -> tuple[Any, list[str]]:
        async with running(backends, run_id, service, "b") as run:
            order = await twice_shuffled(run, phases, rng)
            return await state(run), order

    once, (twice, order) = await asyncio.gather(run_a(), run_b())
    assert twice == once, f"{service}: the final states differ (seed {SEED}); run B's order was {order}"
    return once, twice


def constant(items: list[Item]) -> Phase:
    async def phase(run: Run) -> list[Item]:
        return items

    return phase


# --- Upstream facts --------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def new_number(code: str) -> str:
    return CertificateNumber.format(code, TODAY.year, random.randint(1, CertificateNumber.MAX_SEQUENCE))


def members(resident_id: str, *partners: str, **numbers: str) -> list[SealedMembership]:
    """The memberships of a certificate event, member numbers sealed for the resident (with the test
    key here, with the run's key store when published: ``sealed_items``)."""
    return [membership(p, numbers.get(p), resident_id=resident_id) for p in partners]


def contact(resident_id: str, name: str, kana: str, email: str, language: str = "ja") -> Sealed:
    """A contact as registration publishes it: sealed for the resident (see ``members``)."""
    return seal_for_tests(resident_subject(resident_id), Contact(
        name=name, name_kana=kana, email=email, preferred_language="en" if language == "en" else "ja",
    ))


def cert_fields(number: str, resident_id: str, partners: list[SealedMembership], **kw: Any) -> dict[str, Any]:
    valid_from: date = kw.pop("valid_from", TODAY - timedelta(days=10))
    return {
        "certificate_number": number, "resident_id": resident_id,
        "municipality_code": CertificateNumber.parse(number).municipality_code,
        "valid_from": valid_from, "valid_until": kw.pop("valid_until", valid_from + timedelta(days=364)),
        "status": kw.pop("status", "valid"), "partners": partners,
    }


def issued(number: str, resident_id: str, partners: list[SealedMembership], minute: int) -> Item:
    data = CertificateIssued(**cert_fields(number, resident_id, partners), application_id=f"app-{number[-6:]}",
                             issued_at=at(minute))
    return event(CERTIFICATES, data, number, minute=minute)


def revoked(number: str, resident_id: str, partners: list[SealedMembership], minute: int) -> Item:
    data = CertificateRevoked(**cert_fields(number, resident_id, partners, status="revoked"),
                              reason="the resident moved away", revoked_at=at(minute))
    return event(CERTIFICATES, data, number, minute=minute)


def registered(
    resident_id: str, code: str, minute: int, *, shares: tuple[str, ...] = (), email: bool = False,
    language: str = "ja", tier: str = "basic", status: str = "active",
) -> Item:
    consents = [ConsentState(purpose="share_certificate", partner=p, granted=True, at=at(minute)) for p in shares]
    if email:
        consents.append(ConsentState(purpose="email", granted=True, at=at(minute)))
    data = ResidentRegistered.model_validate({
        "resident_id": resident_id, "registration_id": f"reg-{resident_id}", "municipality_code": code,
        "prefecture_code": prefecture_of(code).code, "tier": tier, "status": status, "legal_address_code": "131016",
        "contact": contact(resident_id, "山田 花子", "ヤマダ ハナコ", f"{resident_id}@example.jp", language),
        "consents": consents, "registered_at": at(minute),
    })
    return event(RESIDENTS, data, resident_id, minute=minute)


def share(resident_id: str, partner: str, granted: bool, minute: int) -> Item:
    data = ConsentChanged(
        resident_id=resident_id, purpose="share_certificate", partner=partner, granted=granted, at=at(minute)
    )
    return event(RESIDENTS, data, resident_id, minute=minute)


# --- Subsidy: certificates + donations + trips ----------------------------------------------------


def donation(donation_id: str, minute: int, *, unit: str, amount: int, earmark: str = "dual_residence",
             program_id: str | None = None, kind: str = "hometown_tax") -> Item:
    data = DonationReceived.model_validate({
        "donation_id": donation_id, "municipality_code": IKI, "donor_id": f"donor-{donation_id}", "kind": kind,
        "unit": unit, "amount": amount, "earmark": earmark, "program_id": program_id, "payment_date": TODAY,
        "calendar_year": TODAY.year, "received_at": at(minute),
    })
    return event(DONATIONS, data, donation_id, IKI, minute=minute)


async def subsidy_state(run: Run) -> dict[str, Any]:
    programs = (await run.get(f"/v1/municipalities/{IKI}/programs"))["items"]
    grants: list[dict[str, Any]] = []
    ledger: list[dict[str, Any]] = []
    for program in programs:
        grants += (await run.get(f"/v1/programs/{program['program_id']}/grants?limit=500"))["items"]
        ledger += (await run.get(f"/v1/programs/{program['program_id']}/ledger?limit=500"))["items"]
    trips = (await run.get(f"/v1/municipalities/{IKI}/redemptions?limit=500"))["items"]
    # grant ids are random: name each grant by what makes it unique (certificate, program, year)
    names = {g["grant_id"]: f"{g['certificate_number']}/{g['program_id']}/{g['period_from']}" for g in grants}
    for g in grants:
        for volatile in ("grant_id", "waitlist_seq", "waitlisted_at", "issued_at", "closed_at"):
            g.pop(volatile)
    for entry in ledger:
        for volatile in ("entry_id", "created_at", "actor"):
            entry.pop(volatile)
        if entry["kind"] == "reserve":
            # "grant issued" or "issued from the waitlist": how it got there, which the order decides
            entry.pop("reason")
    for trip in trips:
        trip.pop("recorded_at")
    text = json.dumps({"programs": programs, "grants": grants, "ledger": ledger, "trips": trips}, sort_keys=True)
    for grant_id, name in names.items():
        text = text.replace(grant_id, name)
    state: dict[str, Any] = json.loads(text)
    for key in ("grants", "ledger", "trips"):
        state[key].sort(key=lambda row: json.dumps(row, sort_keys=True))
    return state


async def test_subsidy_redelivered_and_reordered_ends_where_the_once_only_run_ends(
    backends: Backends, run_id: str
) -> None:
    r1, r2, r3 = new_id("res"), new_id("res"), new_id("res")
    c1, c2, c3 = new_number(IKI), new_number(IKI), new_number(IKI)
    m1 = members(r1, "jal", "kyushuyusen", jal="123456789")
    m2, m3 = members(r2, "jal", jal="987654321"), members(r3, "kyushuyusen")
    d1, d2, d3, d4 = (new_id("don") for _ in range(4))
    first = [
        # two JAL grants of 30,000 miles on a 30,000 budget, and a 30,000-mile donation: whichever comes
        # first, one of them may wait; both end issued
        issued(c1, r1, m1, 1), issued(c2, r2, m2, 2),
        donation(d1, 3, unit="miles", amount=30_000, kind="miles", program_id="jal-dual-residence-miles"),
        donation(d2, 4, unit="jpy", amount=100_000, earmark="general"),  # not for dual residence: ignored
        donation(d3, 5, unit="jpy", amount=50_000),  # earmarked: the yen program of Iki
        issued(c3, r3, m3, 6), revoked(c3, r3, m3, 7),
        event(DONATIONS, DonationRefunded.model_validate({
            "donation_id": d3, "municipality_code": IKI, "donor_id": f"donor-{d3}", "unit": "jpy", "amount": 50_000,
            "earmark": "dual_residence", "refunded_at": at(8),
        }), d3, IKI, minute=8),
        event(CERTIFICATES, CertificateExpiring(**cert_fields(c1, r1, m1), days_left=30), c1, minute=9),  # ignored
    ]

    async def trips_phase(run: Run) -> list[Item]:
        grants = (await run.get(f"/v1/residents/{r1}/grants"))["items"]
        jal = next(g["grant_id"] for g in grants if g["partner"] == "jal")
        ferry = next(g["grant_id"] for g in grants if g["partner"] == "kyushuyusen")

        def trip(partner: str, grant_id: str, trip_id: str, days_ago: int, kind: str = "round_trip",
                 discount: int | None = None, minute: int = 20) -> Item:
            data = TripAccepted.model_validate({
                "partner": partner, "grant_id": grant_id, "certificate_number": c1, "trip_id": trip_id,
                "trip_kind": kind, "travelled_on": TODAY - timedelta(days=days_ago), "discount_jpy": discount,
                "reported_at": at(minute),
            })
            # as the partner gateway forwards a trip (the partner stamped from the partner's own topic)
            return event(GATEWAY_TRIPS, data, trip_id, grant_id, minute=minute)

        return [
            trip("jal", jal, "jl-1", 8), trip("jal", jal, "jl-2", 6),
            trip("jal", jal, "jl-2", 6, minute=21),  # the same report again, under a new event id
            trip("jal", jal, "jl-3", 4),
            trip("jal", jal, "jl-3", 3, minute=22),  # the trip id reused with other details: refused
            trip("jal", jal, "jl-4", 2),  # the fourth round trip: the miles are credited
            trip("jal", jal, "jl-5", 1),  # one too many
            trip("kyushuyusen", ferry, "ky-1", 1, kind="one_way", discount=5_000),
            # meanwhile: c2 is revoked (its grant is released) and another donation arrives
            revoked(c2, r2, m2, 30),
            donation(d4, 31, unit="miles", amount=10_000, kind="miles", program_id="jal-dual-residence-miles"),
        ]

    once, _ = await compare_runs(backends, run_id, "subsidy", [constant(first), trips_phase], subsidy_state)

    # and that state is the one the scenario calls for
    budgets = {ProgramId.parse(p["program_id"]).reference: p["budgets"][0] for p in once["programs"]}
    jal, ferry = budgets["jal-dual-residence-miles"], budgets["iki-island-routes"]
    assert (jal["available"], jal["reserved"], jal["spent"], jal["balanced"]) == (40_000, 0, 30_000, True)
    assert (ferry["reserved"], ferry["spent"], ferry["balanced"]) == (120_000 - 5_000, 5_000, True)
    assert ferry["available"] == 1_000_000 - 120_000 + 50_000 - 50_000
    statuses = sorted((g["certificate_number"], g["partner"], g["status"]) for g in once["grants"])
    assert statuses == sorted([
        (c1, "jal", "completed"), (c1, "kyushuyusen", "issued"), (c2, "jal", "cancelled"),
        (c3, "kyushuyusen", "cancelled"),
    ])
    outcomes = sorted((t["trip_id"], t["accepted"], t["reason"]) for t in once["trips"])
    assert outcomes == [
        ("jl-1", True, None), ("jl-2", True, None), ("jl-3", True, None), ("jl-4", True, None),
        ("jl-5", False, "over_count"), ("ky-1", True, None),
    ]


# --- Partner gateway: consents + certificates + grants --------------------------------------------


def grant(kind: type[EventData], grant_id: str, number: str, resident_id: str, minute: int, **extra: Any) -> Item:
    town = CertificateNumber.parse(number).municipality_code
    fields: dict[str, Any] = {
        "grant_id": grant_id, "program_id": ProgramId.format("jal-dual-residence-miles", town), "partner": "jal",
        "mechanism": "mileage_grant", "certificate_number": number, "resident_id": resident_id,
        "municipality_code": town,
    }
    return event(GRANTS, kind.model_validate(fields | extra), grant_id, number, minute=minute)


async def read_feed(run: Run, partner: str) -> list[tuple[bytes, bytes | None]]:
    """Every (key, value) of a partner's topic, in offset order per partition."""
    return [(key, value) for _, key, value in await read_feed_partitions(run, partner)]


async def read_feed_partitions(run: Run, partner: str) -> list[tuple[int, bytes, bytes | None]]:
    """Every (partition, key, value) of a partner's topic, in offset order per partition."""
    topic = run.settings.topic(partner_feed(partner).name)
    # the feeds are on the partner-facing cluster
    consumer = AIOKafkaConsumer(bootstrap_servers=run.settings.require_partner_kafka(), enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        records: list[tuple[int, bytes, bytes | None]] = []
        for tp in tps:
            while await consumer.position(tp) < ends[tp]:
                batch = await consumer.getmany(tp, timeout_ms=200)
                records += [(tp.partition, r.key, r.value) for r in batch.get(tp, [])]
        return records
    finally:
        await consumer.stop()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


async def opened_member_number(run: Run, partner: str, sealed: dict[str, str] | None) -> str | None:
    """A feed record's member number as the partner opens it: sealed for it (a ciphertext of its
    own in each run), with the key the gateway's ``GET /v1/keys/{kid}`` gives it (docs/partners.md)."""
    if sealed is None:
        return None
    assert sealed["kid"].startswith(f"partner:{partner}:"), sealed
    response = await run.client.get(f"/v1/keys/{sealed['kid']}", headers=run.auth("partner", partner=partner))
    assert response.status_code == 200, f"{sealed['kid']}: {response.status_code} {response.text}"
    return open_with(_unb64(response.json()["k"]), Sealed.model_validate(sealed)).decode()


async def gateway_state(run: Run, numbers: list[str], residents: list[str]) -> dict[str, Any]:
    """What each partner can verify, and what each partner's feed leaves it knowing.

    The feed is folded as a partner keeps it: per certificate, the latest certificate record and its
    grants by id (key ``<number>/grants/<grant id>``); a withdrawal or the certificate's tombstone
    forgets the certificate with its grants, a grant's tombstone forgets the grant. The pseudonym
    is checked against the partner's key and replaced by the resident id; ``changed_at`` (when the
    partner's basis changed, which the order decides) is left out; member numbers are opened as the
    partner opens them (each run seals them anew).
    """
    rows = await run.pool.fetch("SELECT code, pseudonym_key FROM partners")
    keys = {r["code"]: bytes(r["pseudonym_key"]) for r in rows}
    state: dict[str, Any] = {}
    for partner in PARTNER_CODES:
        refs = {hmac.new(keys[partner], r.encode(), hashlib.sha256).hexdigest(): r for r in residents}
        verified: dict[str, Any] = {}
        for number in numbers:
            response = await run.client.get(f"/v1/certificates/{number}", headers=run.auth("partner", partner=partner))
            verified[number] = (response.status_code, response.json())
        view: dict[str, dict[str, Any]] = {}
        for raw_key, value in await read_feed(run, partner):
            key = raw_key.decode()
            number = certificate_of_key(key)
            if value is None:
                if key == number:
                    view.pop(number, None)
                else:
                    view.get(number, {"grants": {}})["grants"].pop(key.removeprefix(grant_key(number, "")), None)
                continue
            record = json.loads(value)
            assert number == record["certificate_number"] and (
                key == grant_key(number, record["grant_id"]) if "grant_id" in record else key == number
            ), (key, record)
            record["resident_ref"] = refs[record["resident_ref"]]  # a pseudonym of someone else fails here
            record.pop("changed_at")
            if "reason" in record and "grant_id" not in record:  # partner.withdrawal
                view.pop(number, None)
            elif "grant_id" in record:
                view.setdefault(number, {"certificate": None, "grants": {}})["grants"][record["grant_id"]] = record
            else:
                view.setdefault(number, {"certificate": None, "grants": {}})["certificate"] = record
        for known in view.values():
            for record in [known["certificate"], *known["grants"].values()]:
                if record is not None:
                    record["member_number"] = await opened_member_number(run, partner, record["member_number"])
        state[partner] = {"verified": verified, "view": view}
    return state


async def test_partner_gateway_redelivered_and_reordered_ends_where_the_once_only_run_ends(
    backends: Backends, run_id: str
) -> None:
    r1, r2, r3, r4, r5, r6 = (new_id("res") for _ in range(6))
    c1, c5 = new_number(IKI), new_number(IKI)
    c2, c3, c4, c6 = (new_number(SHIRAHAMA) for _ in range(4))
    m1 = members(r1, "jal", "kyushuyusen", jal="123456789", kyushuyusen="K42")

    def jal(resident_id: str) -> list[SealedMembership]:
        return members(resident_id, "jal")

    g1, g2 = new_id("gr"), new_id("gr")
    events = [
        registered(r1, IKI, 1, shares=("jal", "kyushuyusen")),
        registered(r2, SHIRAHAMA, 2, shares=("jal",)),
        registered(r3, SHIRAHAMA, 3),  # no share consent: the certificate's membership is the consent
        registered(r4, SHIRAHAMA, 4, shares=("jal",)),
        registered(r5, IKI, 5, shares=("jal",)),
        issued(c1, r1, m1, 10), issued(c2, r2, jal(r2), 11), issued(c3, r3, jal(r3), 12),
        issued(c4, r4, jal(r4), 13), issued(c5, r5, jal(r5), 14),
        issued(c6, r6, members(r6, "ana"), 15),  # ANA has no program in Shirahama: nobody sees it
        grant(GrantIssued, g1, c1, r1, 20, unit="miles", reserved=30_000, window_from=TODAY,
              window_until=TODAY + timedelta(days=121), issued_at=at(20)),
        grant(GrantIssued, g2, c2, r2, 21, unit="miles", reserved=30_000, window_from=TODAY,
              window_until=TODAY + timedelta(days=121), issued_at=at(21)),
        share(r2, "jal", False, 30),  # r2 stops sharing with JAL: JAL must end up knowing nothing of c2
        share(r5, "jal", False, 31), share(r5, "jal", True, 32),  # r5 stops, then shares again
        event(RESIDENTS, ResidentWithdrawn(resident_id=r4, withdrawn_at=at(33)), r4, minute=33),
        revoked(c3, r3, jal(r3), 34),
        event(CERTIFICATES, CertificateRenewed(**cert_fields(c1, r1, m1, valid_until=TODAY + timedelta(days=700)),
                                               renewed_at=at(35)), c1, minute=35),
        grant(GrantRedeemed, g1, c1, r1, 36, trip_id="jl-1", unit="miles", amount=0, trips_counted=2,
              completed=False, redeemed_at=at(36)),
        grant(GrantRedemptionRejected, g1, c1, r1, 37, trip_id="jl-9", reason="outside_window", detail="too late",
              rejected_at=at(37)),
    ]
    numbers, residents = [c1, c2, c3, c4, c5, c6], [r1, r2, r3, r4, r5]

    async def state(run: Run) -> dict[str, Any]:
        return await gateway_state(run, numbers, residents)

    once, _ = await compare_runs(backends, run_id, "partner_gateway", [constant(events)], state)

    jal_view, ferry_view = once["jal"]["view"], once["kyushuyusen"]["view"]
    assert sorted(jal_view) == sorted([c1, c3, c5]) and sorted(ferry_view) == [c1]
    assert jal_view[c1]["certificate"]["valid_until"] == (TODAY + timedelta(days=700)).isoformat()
    assert jal_view[c1]["certificate"]["member_number"] == "123456789"  # sealed for JAL, opened with its key
    assert ferry_view[c1]["certificate"]["member_number"] == "K42"
    assert {g["state"] for g in jal_view[c1]["grants"].values()} == {"redemption_rejected"}
    assert jal_view[c3]["certificate"]["status"] == "revoked"
    assert {n: s for n, (s, _) in once["jal"]["verified"].items()} == {
        c1: 200, c2: 404, c3: 200, c4: 404, c5: 200, c6: 404,
    }
    assert all(status == 404 for status, _ in once["ana"]["verified"].values())


# --- Notification: residents, applications, certificates, grants, donations ----------------------


async def notification_state(run: Run, residents: list[str]) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for resident in residents:
        inbox = (await run.get(f"/v1/residents/{resident}/notifications?limit=100"))["items"]
        emails = (await run.get(f"/v1/residents/{resident}/emails?limit=100"))["items"]
        for row in inbox + emails:
            for volatile in ("id", "created_at", "read_at", "updated_at", "sent_at", "next_attempt_at"):
                row.pop(volatile, None)
        state[resident] = {
            "inbox": sorted(inbox, key=lambda m: json.dumps(m, sort_keys=True)),
            "emails": sorted(emails, key=lambda m: json.dumps(m, sort_keys=True)),
        }
    return state


async def test_notification_redelivered_and_reordered_ends_where_the_once_only_run_ends(
    backends: Backends, run_id: str
) -> None:
    r1, r2, r3, r4 = (new_id("res") for _ in range(4))
    c1, c2, c4 = new_number(SHIRAHAMA), new_number(IKI), new_number(SHIRAHAMA)
    a1, a2 = new_id("app"), new_id("app")
    g1, g2 = new_id("gr"), new_id("gr")

    def jal(resident_id: str) -> list[SealedMembership]:
        return members(resident_id, "jal")

    residents_first = [
        registered(r1, SHIRAHAMA, 1, email=True),
        registered(r2, IKI, 2),
        event(RESIDENTS, ContactChanged(
            resident_id=r2, contact=contact(r2, "Jane Roe", "ジェーン ロウ", f"{r2}@example.com", "en"), at=at(3),
        ), r2, minute=3),
        registered(r3, SHIRAHAMA, 4, tier="premium", status="pending_review", email=True),
        event(RESIDENTS, PremiumRequested(resident_id=r3, registration_id=f"reg-{r3}", municipality_code=SHIRAHAMA,
                                          activity_count=3, requested_at=at(5)), r3, minute=5),
        event(RESIDENTS, PremiumApproved(resident_id=r3, registration_id=f"reg-{r3}", municipality_code=SHIRAHAMA,
                                         valid_until=TODAY + timedelta(days=365), decided_at=at(6)), r3, minute=6),
        registered(r4, SHIRAHAMA, 7, email=True),
        event(RESIDENTS, ResidentWithdrawn(resident_id=r4, withdrawn_at=at(8)), r4, minute=8),
        event(RESIDENTS, ConsentChanged(resident_id=r1, purpose="email", granted=True, at=at(9)), r1, minute=9),
    ]
    decisions = [
        event(APPLICATIONS, ApplicationSubmitted(
            application_id=a1, resident_id=r1, municipality_code=SHIRAHAMA, primary_residence_code="131016",
            planned_stay_days=90, housing_basis="rented", submitted_at=at(10)), a1, minute=10),
        event(APPLICATIONS, ApplicationSubmitted(
            application_id=a2, resident_id=r2, municipality_code=IKI, primary_residence_code="131016",
            planned_stay_days=30, housing_basis="hotel", submitted_at=at(11)), a2, minute=11),
        event(APPLICATIONS, ApplicationRejected(
            application_id=a2, resident_id=r2, municipality_code=IKI, reason="stay too short", decided_at=at(12),
        ), a2, minute=12),
        issued(c1, r1, jal(r1), 13), issued(c2, r2, jal(r2), 14),
        event(CERTIFICATES, CertificateExpiring(**cert_fields(c2, r2, jal(r2)), days_left=30), c2, minute=15),
        revoked(c2, r2, jal(r2), 16),
        revoked(c4, r4, jal(r4), 17),  # about a withdrawn resident: dropped
        grant(GrantIssued, g1, c1, r1, 18, unit="miles", reserved=30_000, window_from=TODAY,
              window_until=TODAY + timedelta(days=121), issued_at=at(18)),
        grant(GrantRedeemed, g1, c1, r1, 19, trip_id="jl-4", unit="miles", amount=30_000, trips_counted=8,
              completed=True, redeemed_at=at(19)),
        grant(GrantWaitlisted, g2, c2, r2, 20, unit="miles", needed=30_000, position=1, waitlisted_at=at(20)),
        grant(GrantCancelled, g2, c2, r2, 21, unit="miles", released=0, reason="certificate revoked",
              cancelled_at=at(21)),
        event(DONATIONS, DonationReceived(
            donation_id="don-42", municipality_code=SHIRAHAMA, donor_id="donor-1", resident_id=r1,
            kind="hometown_tax", unit="jpy", amount=30_000, earmark="general", payment_date=TODAY,
            calendar_year=TODAY.year, received_at=at(22), receipt_number="R-000042"), "don-42", SHIRAHAMA,
            minute=22),
        event(DONATIONS, OneStopExceptionVoided(
            donor_id="donor-1", resident_id=r1, calendar_year=TODAY.year,
            municipality_codes=[SHIRAHAMA, IKI, "016331", "302066", "304069", "372081"], voided_at=at(23),
        ), "donor-1", SHIRAHAMA, minute=23),
    ]
    residents = [r1, r2, r3, r4]

    async def state(run: Run) -> dict[str, Any]:
        return await notification_state(run, residents)

    once, _ = await compare_runs(
        backends, run_id, "notification", [constant(residents_first), constant(decisions)], state
    )

    kinds = {r: sorted(m["kind"] for m in once[r]["inbox"]) for r in residents}
    assert kinds == {
        r1: sorted(["registration_confirmed", "application_received", "certificate_issued", "grant_issued",
                    "grant_redeemed", "receipt_issued", "one_stop_voided"]),
        r2: sorted(["registration_confirmed", "application_received", "application_rejected", "certificate_issued",
                    "certificate_expiring", "certificate_revoked", "grant_waitlisted", "grant_cancelled"]),
        r3: ["premium_approved", "premium_requested"],
        r4: [],
    }
    assert {m["language"] for m in once[r2]["inbox"] if m["kind"] != "registration_confirmed"} == {"en"}
    assert len(once[r1]["emails"]) == len(once[r1]["inbox"]) and once[r2]["emails"] == []


# --- Found by the comparison: order-dependent partner views, and the compacted feed ---------------


async def in_each_order(
    backends: Backends, run_id: str, service: str, orders: list[list[Item]], state: State
) -> list[Any]:
    """Each list of events once, in its order, on a run of its own; the final state of each."""

    async def one(items: list[Item], label: str) -> Any:
        async with running(backends, run_id, service, label) as run:
            await once_in_order(run, [constant(items)])
            return await state(run)

    return list(await asyncio.gather(*(one(items, f"o{i}") for i, items in enumerate(orders))))


async def test_partner_gateway_consent_given_again_ends_the_same_whenever_the_grant_arrives(
    backends: Backends, run_id: str
) -> None:
    r, c, g = new_id("res"), new_number(IKI), new_id("gr")
    registration, certificate = registered(r, IKI, 1, shares=("jal",)), issued(c, r, members(r, "jal"), 2)
    the_grant = grant(GrantIssued, g, c, r, 3, unit="miles", reserved=30_000, window_from=TODAY,
                      window_until=TODAY + timedelta(days=121), issued_at=at(3))
    consent_back = [share(r, "jal", False, 4), share(r, "jal", True, 5)]

    async def state(run: Run) -> dict[str, Any]:
        return await gateway_state(run, [c], [r])

    grant_first, grant_last = await in_each_order(backends, run_id, "partner_gateway", [
        [registration, certificate, the_grant, *consent_back],  # the order things happened in
        [registration, certificate, *consent_back, the_grant],  # the grants topic lagging behind
    ], state)
    assert list(grant_last["jal"]["view"][c]["grants"]) == [g]
    assert grant_first == grant_last


def compacted(records: list[tuple[int, bytes, bytes | None]]) -> dict[str, tuple[int, Any]]:
    """What log compaction leaves of a partner feed: the last value of each key (None: a tombstone,
    kept until ``delete.retention.ms``), with the key's partition."""
    latest: dict[str, tuple[int, Any]] = {}
    for partition, key, value in records:
        name = key.decode()
        assert latest.get(name, (partition,))[0] == partition, f"{name} is on more than one partition"
        latest[name] = (partition, None if value is None else json.loads(value))
    return latest


def partition_of(key: str) -> int:
    """Where the default partitioner (murmur2) puts a key on a partner feed."""
    return int(murmur2(key.encode()) & 0x7FFFFFFF) % PARTNER_FEED.partitions


def number_apart_from(code: str, grant_ids: list[str], taken: set[int]) -> str:
    """A certificate number whose grants' own keys would land on another partition than its own,
    and whose partition no certificate in ``taken`` has: so only placement by the certificate
    number puts the grants with their certificate."""
    while True:
        number = new_number(code)
        home = partition_of(number)
        if home not in taken and all(partition_of(grant_key(number, g)) != home for g in grant_ids):
            return number


async def test_a_compacted_partner_feed_keeps_each_certificate_and_grant_and_forgets_a_withdrawn_person(
    backends: Backends, run_id: str
) -> None:
    """Issue #5: certificate and grant records no longer share a key, so compaction (the latest record
    per key) leaves the certificate and each grant; forgetting a person tombstones every key of theirs."""
    r1, r2 = new_id("res"), new_id("res")
    g1, g2, g3, g4 = (new_id("gr") for _ in range(4))
    c1 = number_apart_from(SHIRAHAMA, [g1, g2, g4], set())
    c2 = number_apart_from(SHIRAHAMA, [g3], {partition_of(c1)})
    window: dict[str, Any] = {"unit": "miles", "window_from": TODAY, "window_until": TODAY + timedelta(days=121)}

    def issued_grant(grant_id: str, number: str, resident: str, minute: int) -> Item:
        return grant(GrantIssued, grant_id, number, resident, minute, reserved=30_000, issued_at=at(minute), **window)

    def keys_of(latest: dict[str, tuple[int, Any]], number: str) -> dict[str, Any]:
        return {key: value for key, (_, value) in latest.items() if certificate_of_key(key) == number}

    async with running(backends, run_id, "partner_gateway", "k") as run:

        async def feed_after(*items: Item) -> tuple[dict[str, tuple[int, Any]], list[tuple[int, bytes, bytes | None]]]:
            await once_in_order(run, [constant(list(items))])
            records = await read_feed_partitions(run, "jal")
            return compacted(records), records

        # Certificates and grants; c1 renewed after its grants, and g1 redeemed after g2 was issued.
        latest, _ = await feed_after(
            registered(r1, SHIRAHAMA, 1, shares=("jal",)), registered(r2, SHIRAHAMA, 2, shares=("jal",)),
            issued(c1, r1, members(r1, "jal", jal="JMB-1"), 3), issued(c2, r2, members(r2, "jal"), 4),
            issued_grant(g1, c1, r1, 5), issued_grant(g2, c1, r1, 6), issued_grant(g3, c2, r2, 7),
            grant(GrantRedeemed, g1, c1, r1, 8, trip_id="jl-1", unit="miles", amount=0, trips_counted=2,
                  completed=False, redeemed_at=at(8)),
            event(CERTIFICATES, CertificateRenewed(
                **cert_fields(c1, r1, members(r1, "jal", jal="JMB-1"), valid_until=TODAY + timedelta(days=700)),
                renewed_at=at(9)), c1, minute=9),
        )
        assert set(keys_of(latest, c1)) == {c1, grant_key(c1, g1), grant_key(c1, g2)}, latest
        assert set(keys_of(latest, c2)) == {c2, grant_key(c2, g3)}, latest
        certificate = latest[c1][1]
        assert certificate["status"] == "valid"
        assert await opened_member_number(run, "jal", certificate["member_number"]) == "JMB-1"  # sealed for JAL
        assert certificate["valid_until"] == (TODAY + timedelta(days=700)).isoformat()
        assert latest[c2][1]["status"] == "valid"
        assert {g: latest[grant_key(c1, g)][1]["state"] for g in (g1, g2)} == {g1: "redeemed", g2: "issued"}
        assert latest[grant_key(c2, g3)][1]["state"] == "issued"
        assert latest[grant_key(c1, g1)][1]["resident_ref"] == certificate["resident_ref"]
        # Each grant on its certificate's partition (not where its own key would go), each certificate on its own.
        for number in (c1, c2):
            assert {partition for key, (partition, _) in latest.items() if certificate_of_key(key) == number} == {
                partition_of(number)
            }
        assert partition_of(c1) != partition_of(c2)

        # r1 revokes JAL's consent: a withdrawal, then every key of r1 ends in a tombstone; r2 untouched.
        latest, records = await feed_after(share(r1, "jal", False, 10))
        assert keys_of(latest, c1) == {c1: None, grant_key(c1, g1): None, grant_key(c1, g2): None}
        assert all(value is not None for value in keys_of(latest, c2).values())
        tail = [(k.decode(), v is None) for _, k, v in records if certificate_of_key(k.decode()) == c1][-4:]
        assert tail == [(c1, False), (grant_key(c1, g1), True), (grant_key(c1, g2), True), (c1, True)], tail

        # Consent given again: the certificate and each grant's latest state, under their own keys again.
        latest, _ = await feed_after(share(r1, "jal", True, 11))
        again = keys_of(latest, c1)
        assert again[c1]["status"] == "valid" and again[c1]["valid_until"] == certificate["valid_until"]
        assert {g: again[grant_key(c1, g)]["state"] for g in (g1, g2)} == {g1: "redeemed", g2: "issued"}

        # Both residents withdraw (r1 after a consent given again, r2 straight from the first
        # delivery); later events about them send nothing, not even a new grant's key.
        latest, records = await feed_after(
            event(RESIDENTS, ResidentWithdrawn(resident_id=r1, withdrawn_at=at(12)), r1, minute=12),
            event(RESIDENTS, ResidentWithdrawn(resident_id=r2, withdrawn_at=at(13)), r2, minute=13),
            grant(GrantCancelled, g2, c1, r1, 14, unit="miles", released=30_000, reason="withdrawn",
                  cancelled_at=at(14)),
            issued_grant(g4, c1, r1, 15),
            revoked(c2, r2, members(r2, "jal"), 16),
        )
        assert keys_of(latest, c1) == {c1: None, grant_key(c1, g1): None, grant_key(c1, g2): None}
        assert keys_of(latest, c2) == {c2: None, grant_key(c2, g3): None}
        for number in (c1, c2):  # and the withdrawal is the last record of theirs with a value
            last = [json.loads(v) for _, k, v in records if certificate_of_key(k.decode()) == number and v][-1]
            assert last["reason"] == "resident_withdrawn", last
