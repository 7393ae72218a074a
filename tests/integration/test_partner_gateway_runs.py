"""The gateway's set-based consumers (consent and certificate runs) over real PostgreSQL.

One batch of mixed events must end exactly where applying the same events one at a time ends: the
projection, the entitlements, the delivery record, the cache queue and the partner feed records
(in order, with their keys and partition keys). Each way runs on a fresh database of its own, with
the same partner pseudonym keys, through ``EventConsumer.handle_batch`` with crafted records.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiokafka import ConsumerRecord

from services.partner_gateway import handlers, store
from services.partner_gateway.consumers import build_router
from services.partner_gateway.domain import GrantEvent
from services.partner_gateway.handlers import SERVICE, PartnerDirectory, seed_partners
from services.partner_gateway.main import MIGRATIONS
from shared.contracts.base import EventData
from shared.contracts.certification import CertificateIssued, CertificateRenewed, CertificateRevoked
from shared.contracts.common import PartnerMembership
from shared.contracts.partners import PartnerCertificate, PartnerGrant, PartnerWithdrawal, grant_key
from shared.contracts.registration import (
    ConsentChanged,
    ConsentState,
    Contact,
    ResidentRegistered,
    ResidentWithdrawn,
)
from shared.contracts.subsidy import GrantIssued
from shared.contracts.topics import CERTIFICATES, DLQ_SUFFIX, GRANTS, RESIDENTS, Topic
from shared.kit.consumer import EventConsumer, HandlerContext, in_time_order
from shared.kit.envelope import new_envelope
from shared.kit.outbox import Outbox
from shared.kit.settings import Settings
from shared.reference import prefecture_of
from tests.support import broker_record, query_logging_pool, service_database

pytestmark = pytest.mark.stack

SHIRAHAMA = "304018"  # JAL only
IKI = "422100"  # JAL and Kyushu Yusen
ATAMI = "222054"  # no travel program
T0 = datetime(2026, 4, 1, 9, 0, tzinfo=UTC)
VALID_FROM, VALID_UNTIL = date(2026, 4, 1), date(2027, 3, 31)
SOURCES = {RESIDENTS.name: "registration", CERTIFICATES.name: "certification", GRANTS.name: "subsidy"}


def at(minute: int) -> datetime:
    return T0 + timedelta(minutes=minute)


# --- A gateway database and its consumer ---------------------------------------------------------


@dataclass
class GatewayDb:
    pool: asyncpg.Pool
    consumer: EventConsumer
    #: Every statement the pool's connections ran (asyncpg's query logger), for counting.
    queries: list[str]


async def gateway_db(settings: Settings, label: str, keys: dict[str, bytes] | None = None) -> GatewayDb:
    """A fresh gateway database (migrated, partners seeded; with these pseudonym keys if given) and
    the gateway's consumer on it, not attached to any broker."""
    dsn = await service_database(settings, label, MIGRATIONS)
    queries: list[str] = []
    pool = await query_logging_pool(dsn, lambda logged: queries.append(logged.query), max_size=2)
    async with pool.acquire() as conn:
        await seed_partners(conn)
        for code, key in (keys or {}).items():
            await conn.execute("UPDATE partners SET pseudonym_key = $2 WHERE code = $1", code, key)
        partners = PartnerDirectory(await store.load_partners(conn))
    consumer = EventConsumer(
        service=SERVICE, settings=settings, pool=pool, outbox=Outbox(f"outbox_{label}"),
        router=build_router(partners), topics=[RESIDENTS, CERTIFICATES, GRANTS],
    )
    return GatewayDb(pool, consumer, queries)


@pytest.fixture
async def gateway(settings: Settings) -> AsyncIterator[GatewayDb]:
    db = await gateway_db(settings, "gwruns")
    try:
        yield db
    finally:
        await db.pool.close()


@pytest.fixture
async def two_gateways(settings: Settings) -> AsyncIterator[tuple[GatewayDb, GatewayDb]]:
    """A gateway fed whole batches and one fed one event per batch, with the same partner keys."""
    batched = await gateway_db(settings, "gwruns_batch")
    keys = {r["code"]: bytes(r["pseudonym_key"]) for r in await batched.pool.fetch("SELECT * FROM partners")}
    one_by_one = await gateway_db(settings, "gwruns_single", keys)
    try:
        yield batched, one_by_one
    finally:
        await batched.pool.close()
        await one_by_one.pool.close()


# --- Upstream events as the broker hands them over ----------------------------------------------


class Records:
    """Consumer records in the order they are made (record time), one partition per topic."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.offsets: dict[str, int] = {}
        self.clock = 0

    def __call__(self, topic: Topic, data: EventData, subject: str) -> ConsumerRecord[bytes, bytes]:
        envelope = new_envelope(SOURCES[topic.name], data, subject=subject)
        name = self.settings.topic(topic.name)
        return self._next(name, envelope.key, envelope.data, envelope.headers())

    def again(self, record: ConsumerRecord[bytes, bytes]) -> ConsumerRecord[bytes, bytes]:
        """The same event once more, later on its topic (a producer's retry, say)."""
        assert record.value is not None
        return self._next(record.topic, record.key, record.value, list(record.headers))

    def _next(
        self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]
    ) -> ConsumerRecord[bytes, bytes]:
        offset = self.offsets.get(topic, 0)
        self.offsets[topic] = offset + 1
        self.clock += 1
        return broker_record(topic, offset, key, value, headers, timestamp_ms=1_000 + self.clock)


def new_number(municipality: str) -> str:
    return f"NCH-{municipality}-2026-{uuid.uuid4().int % 10**6:06d}"


def new_resident() -> str:
    return f"res-{uuid.uuid4().hex[:12]}"


def members(*partners: str, **member_numbers: str) -> list[PartnerMembership]:
    return [PartnerMembership(partner=p, member_number=member_numbers.get(p)) for p in partners]


def certificate_fields(number: str, resident_id: str, partners: list[PartnerMembership], status: str) -> dict[str, Any]:
    return {
        "certificate_number": number, "resident_id": resident_id, "municipality_code": number[4:10],
        "valid_from": VALID_FROM, "valid_until": VALID_UNTIL, "status": status, "partners": partners,
    }


def issued(number: str, resident_id: str, partners: list[PartnerMembership], minute: int) -> CertificateIssued:
    return CertificateIssued(**certificate_fields(number, resident_id, partners, "valid"),
                             application_id=f"app-{number[-6:]}", issued_at=at(minute))


def revoked(number: str, resident_id: str, partners: list[PartnerMembership], minute: int) -> CertificateRevoked:
    return CertificateRevoked(**certificate_fields(number, resident_id, partners, "revoked"),
                              reason="moved away", revoked_at=at(minute))


def renewed(number: str, resident_id: str, partners: list[PartnerMembership], minute: int) -> CertificateRenewed:
    return CertificateRenewed(**certificate_fields(number, resident_id, partners, "valid"), renewed_at=at(minute))


def registered(resident_id: str, consents: list[tuple[str, bool]], minute: int) -> ResidentRegistered:
    return ResidentRegistered(
        resident_id=resident_id, registration_id=f"reg-{resident_id[-8:]}", municipality_code=SHIRAHAMA,
        prefecture_code=prefecture_of(SHIRAHAMA).code, tier="basic", status="active", legal_address_code="131016",
        contact=Contact(name="山田 太郎", name_kana="ヤマダ タロウ", email="taro@example.jp", phone="090-0000-0000"),
        consents=[ConsentState(purpose="share_certificate", partner=p, granted=g, at=at(minute)) for p, g in consents],
        registered_at=at(minute),
    )


def consent(resident_id: str, partner: str | None, granted: bool, minute: int) -> ConsentChanged:
    return ConsentChanged(resident_id=resident_id, purpose="share_certificate", partner=partner, granted=granted,
                          at=at(minute))


def grant_issued(grant_id: str, number: str, resident_id: str, minute: int) -> GrantIssued:
    return GrantIssued(
        grant_id=grant_id, program_id="jal-dual-residence-miles", partner="jal", mechanism="mileage_grant",
        certificate_number=number, resident_id=resident_id, municipality_code=number[4:10], unit="miles",
        reserved=30_000, window_from=VALID_FROM, window_until=VALID_FROM + timedelta(days=122),
        member_number="NOT-SHOWN", issued_at=at(minute),
    )


# --- What a gateway database ends with ------------------------------------------------------------


async def end_state(db: GatewayDb, causes: dict[str, int]) -> dict[str, Any]:
    """Every table the consumer writes, without what differs between two runs by nature (generated
    ids, versions, times of writing); outgoing event ids are replaced by their outbox position and
    incoming ones (``causes``) by their position in the batch."""
    pool = db.pool
    outbox = await pool.fetch(
        "SELECT event_id, topic, key, partition_key, header_names, header_values, payload FROM outbox ORDER BY id"
    )
    sent = {str(row["event_id"]): f"out-{i}" for i, row in enumerate(outbox)}
    ids = causes | sent

    def feed_record(row: asyncpg.Record) -> dict[str, Any]:
        headers = dict(zip(row["header_names"], (v.decode() for v in row["header_values"]), strict=True))
        if row["topic"].endswith(DLQ_SUFFIX):
            return {"topic": row["topic"], "subject": headers["ce_subject"], "dead_letter": ids[headers["ce_id"]],
                    "reason": headers["dlq_reason"]}
        return {
            "topic": row["topic"], "key": row["key"], "partition_key": row["partition_key"],
            "type": headers.get("ce_type"), "subject": headers["ce_subject"],
            "cause": ids[headers["ce_causationid"]], "correlation": ids[headers["ce_correlationid"]],
            "data": None if row["payload"] is None else json.loads(row["payload"]),
        }

    def rows(records: Sequence[asyncpg.Record], *drop: str) -> list[dict[str, Any]]:
        return [{k: v for k, v in dict(r).items() if k not in drop} for r in records]

    deliveries = rows(await pool.fetch("SELECT * FROM deliveries ORDER BY id"), "id", "delivered_at")
    for row in deliveries:
        row["event_id"], row["cause_event_id"] = ids[str(row["event_id"])], ids[str(row["cause_event_id"])]
    return {
        "feed": [feed_record(row) for row in outbox],
        "deliveries": deliveries,
        "entitlements": rows(await pool.fetch("SELECT * FROM entitlements ORDER BY partner, certificate_number"),
                             "version"),
        "cache_queue": sorted((r["partner"], r["certificate_number"])
                              for r in await pool.fetch("SELECT * FROM verify_cache_queue")),
        "consents": rows(await pool.fetch("SELECT * FROM share_consents ORDER BY resident_id, partner")),
        "certificates": rows(await pool.fetch("SELECT * FROM certificates ORDER BY certificate_number")),
        "withdrawn": rows(await pool.fetch("SELECT * FROM withdrawn_residents ORDER BY resident_id")),
        "held_grants": rows(await pool.fetch("SELECT * FROM held_grants ORDER BY id"), "id", "held_at"),
        "grant_states": rows(await pool.fetch("SELECT * FROM grant_states ORDER BY partner, grant_id"), "last_seq"),
        "feed_grant_keys": rows(await pool.fetch("SELECT * FROM feed_grant_keys ORDER BY seq"), "seq"),
    }


def incoming_ids(records: Sequence[ConsumerRecord[bytes, bytes]]) -> dict[str, int]:
    """ce_id → position of its first copy."""
    return {dict(r.headers)["ce_id"].decode(): i for i, r in reversed(list(enumerate(records)))}


def records_of(state: dict[str, Any], number: str) -> list[tuple[str | None, bytes, bytes | None]]:
    """(type, key, partition key) of the feed records about one certificate, in outbox order."""
    return [(r["type"], r["key"], r["partition_key"]) for r in state["feed"] if r["subject"] == number]


# --- The tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("poison", [False, True], ids=["whole batch", "one event per savepoint"])
async def test_a_mixed_batch_ends_where_one_event_at_a_time_ends(
    settings: Settings, two_gateways: tuple[GatewayDb, GatewayDb], monkeypatch: pytest.MonkeyPatch, poison: bool
) -> None:
    """With a poison event in the batch, the batch fails and is re-run one event per savepoint:
    each consent or certificate event is then a run of one, whose records go straight to the outbox."""
    batched, one_by_one = two_gateways
    if poison:
        apply_grant_event = handlers.apply_grant_event

        async def failing(ctx: HandlerContext, partners: PartnerDirectory, event: GrantEvent) -> None:
            if event.grant_id == "gr-poison":
                raise ValueError("poison")
            await apply_grant_event(ctx, partners, event)

        monkeypatch.setattr(handlers, "apply_grant_event", failing)
    record = Records(settings)
    r1, r2, r3, r4, r5, r6, r7, r8, r9 = (new_resident() for _ in range(9))
    c1, c2, c3, c6, c8, c9, c10 = (new_number(SHIRAHAMA) for _ in range(7))
    c4, c7, c5 = new_number(IKI), new_number(IKI), new_number(ATAMI)
    g1, g4, g8 = "gr-one", "gr-four", "gr-eight"

    before = [
        # r4 shares c4 with both partners by membership alone, and JAL has a grant on it.
        record(CERTIFICATES, issued(c4, r4, members("jal", "kyushuyusen", jal="JMB-4"), 1), c4),
        record(GRANTS, grant_issued(g4, c4, r4, 2), g4),
        record(GRANTS, grant_issued(g8, c8, r8, 3), g8),  # held: c8 is not known yet
        record(CERTIFICATES, issued(c9, r9, members("jal"), 4), c9),
    ]
    batch = [
        # a run of consents: new residents (no certificate yet) and r4, who holds c4
        (first := record(RESIDENTS, registered(r1, [("jal", True)], 10), r1)),
        record(RESIDENTS, registered(r2, [], 11), r2),
        record(RESIDENTS, registered(r3, [("jal", False)], 12), r3),
        record(RESIDENTS, consent(r4, "jal", False, 13), r4),  # withdrawal of c4 and g4's key from JAL
        record(RESIDENTS, consent(r4, "kyushuyusen", False, 14), r4),
        record.again(first),  # a duplicate
        record(RESIDENTS, consent(r4, "jal", True, 15), r4),  # c4 and g4 sent to JAL again
        record(RESIDENTS, consent(r4, "jal", False, 14), r4),  # older than the one on record: ignored
        record(RESIDENTS, consent(r3, None, True, 16), r3),  # names no partner: allows nothing
        # a run of certificate events
        (c1_issued := record(CERTIFICATES, issued(c1, r1, members("jal", jal="JMB-1"), 20), c1)),  # consented
        record(CERTIFICATES, issued(c2, r2, members("jal"), 21), c2),  # no consent: the membership is one
        record(CERTIFICATES, issued(c3, r3, members("jal"), 22), c3),  # consent revoked: nothing
        record(CERTIFICATES, issued(c5, r5, members("jal"), 23), c5),  # no travel program: nothing
        record(CERTIFICATES, issued(c6, r6, members("jal"), 24), c6),
        record(CERTIFICATES, issued(c8, r8, members("jal", jal="JMB-8"), 25), c8),  # releases g8
        record(CERTIFICATES, revoked(c6, r6, members("jal"), 26), c6),  # same run: after its issue
        record(CERTIFICATES, renewed(c9, r9, [], 27), c9),  # JAL dropped: withdrawal
        record.again(c1_issued),  # a duplicate
        *([record(GRANTS, grant_issued("gr-poison", c1, r1, 29), "gr-poison")] if poison else []),
        # one at a time: a grant and an erasure split the runs
        record(GRANTS, grant_issued(g1, c1, r1, 30), g1),
        record(RESIDENTS, ResidentWithdrawn(resident_id=r2, withdrawn_at=at(31)), r2),
        record(CERTIFICATES, issued(c10, r2, members("jal"), 32), c10),  # of a withdrawn resident: dropped
        record(CERTIFICATES, issued(c7, r7, members("jal", "kyushuyusen"), 33), c7),
        record(RESIDENTS, consent(r7, "kyushuyusen", False, 34), r7),  # c7 withdrawn from Kyushu Yusen
    ]
    for db in (batched, one_by_one):
        for earlier in before:
            await db.consumer.handle_batch([earlier])
    batched.queries.clear()
    await batched.consumer.handle_batch(batch)
    # Without a poison, the batch applied in one go (not re-run event by event after a failure).
    assert any(q.startswith("SAVEPOINT") for q in batched.queries) == poison
    for one in in_time_order(batch):  # the order the batch is handled in
        await one_by_one.consumer.handle_batch([one])

    causes = incoming_ids(before + batch)
    state = await end_state(batched, causes)
    assert state == await end_state(one_by_one, causes)
    stats = batched.consumer.stats
    assert (stats.handled, stats.duplicates, stats.parked) == (len(before) + len(batch) - 2 - poison, 2, poison)

    # What that common end is, partner by partner and certificate by certificate.
    cert, withdrawal, grant = PartnerCertificate.event_type, PartnerWithdrawal.event_type, PartnerGrant.event_type
    jal, ferry = settings.topic("partner.jal.v1"), settings.topic("partner.kyushuyusen.v1")
    b = str.encode
    assert records_of(state, c1) == [(cert, b(c1), None), (grant, b(grant_key(c1, g1)), b(c1))]
    assert records_of(state, c2) == [(cert, b(c2), None), (withdrawal, b(c2), None), (None, b(c2), None)]
    assert records_of(state, c6) == [(cert, b(c6), None), (cert, b(c6), None)]
    assert [r["data"]["status"] for r in state["feed"] if r["subject"] == c6] == ["valid", "revoked"]
    assert records_of(state, c8) == [(cert, b(c8), None), (grant, b(grant_key(c8, g8)), b(c8))]
    assert records_of(state, c9)[1:] == [(withdrawal, b(c9), None), (None, b(c9), None)]
    assert records_of(state, c3) == records_of(state, c5) == records_of(state, c10) == []
    c4_records = [(r["topic"], r["type"], r["key"]) for r in state["feed"] if r["subject"] == c4]
    assert c4_records == [
        (jal, cert, b(c4)), (ferry, cert, b(c4)), (jal, grant, b(grant_key(c4, g4))),  # before the batch
        (jal, withdrawal, b(c4)), (jal, None, b(grant_key(c4, g4))), (jal, None, b(c4)),
        (ferry, withdrawal, b(c4)), (ferry, None, b(c4)),
        (jal, cert, b(c4)), (jal, grant, b(grant_key(c4, g4))),  # consent given again
    ]
    assert [(r["topic"], r["type"]) for r in state["feed"] if r["subject"] == c7] == [
        (jal, cert), (ferry, cert), (ferry, withdrawal), (ferry, None),
    ]
    active = {(e["partner"], e["certificate_number"]): e for e in state["entitlements"] if e["active"]}
    assert sorted(active) == sorted([("jal", c1), ("jal", c4), ("jal", c6), ("jal", c7), ("jal", c8)])
    assert active[("jal", c1)]["consent_source"] == "registration_consent"
    assert active[("jal", c1)]["programs"] == ["jal-dual-residence-miles"]
    assert active[("jal", c1)]["member_number"] == "JMB-1" and active[("jal", c1)]["resident_id"] == r1
    assert active[("jal", c6)]["status"] == "revoked" and active[("jal", c8)]["member_number"] == "JMB-8"
    [c1_delivery, g1_delivery] = [d for d in state["deliveries"] if d["certificate_number"] == c1]
    assert c1_delivery["items"] == [
        "certificate_number", "status", "valid_from", "valid_until", "municipality_code", "programs",
        "resident_ref", "member_number", "changed_at",
    ]
    assert g1_delivery["record_type"] == grant and "grant_id" in g1_delivery["items"]
    # One delivery row per feed record, in the same order.
    assert [d["event_id"] for d in state["deliveries"]] == [
        f"out-{i}" for i, r in enumerate(state["feed"]) if "dead_letter" not in r
    ]
    poisoned = [causes[dict(r.headers)["ce_id"].decode()] for r in batch if r.key == b"gr-poison"]
    assert [r["dead_letter"] for r in state["feed"] if "dead_letter" in r] == poisoned
    assert state["held_grants"] == []


async def test_a_run_costs_a_few_statements_whatever_its_length(settings: Settings, gateway: GatewayDb) -> None:
    async def statements(batch: list[ConsumerRecord[bytes, bytes]]) -> int:
        gateway.queries.clear()
        await gateway.consumer.handle_batch(batch)
        return len(gateway.queries)

    counts: dict[int, tuple[int, int]] = {}  # events in the batch → statements (consents, certificates)
    for size in (3, 10, 200):  # the first batch also warms asyncpg up (type introspection per statement)
        record = Records(settings)
        residents = [new_resident() for _ in range(size)]
        consents = [record(RESIDENTS, registered(r, [("jal", True)], 1), r) for r in residents]
        numbers = [new_number(SHIRAHAMA) for _ in residents]  # JAL serves Shirahama: feed records too
        certificates = [
            record(CERTIFICATES, issued(n, r, members("jal", jal=f"JMB-{i}"), 2), n)
            for i, (n, r) in enumerate(zip(numbers, residents, strict=True))
        ]
        counts[size] = (await statements(consents), await statements(certificates))
        sent = await gateway.pool.fetchval(
            "SELECT count(*) FROM deliveries WHERE certificate_number = ANY($1::text[])", numbers
        )
        assert sent == size

    # As many for 10 events as for 200: BEGIN, the inbox, the run's reads and writes (4 for consents,
    # 8 for certificates), the outbox and its NOTIFY (no local relay here), COMMIT, the pool's reset.
    assert counts[200] == counts[10] == (8, 14)
