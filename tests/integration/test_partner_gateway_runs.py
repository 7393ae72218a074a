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
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from services.partner_gateway import handlers, store
from services.partner_gateway.consumers import build_router
from services.partner_gateway.domain import GrantEvent
from services.partner_gateway.handlers import SERVICE, PartnerDirectory, seed_partners
from services.partner_gateway.main import MIGRATIONS
from shared.contracts.base import EventData
from shared.contracts.certification import CertificateIssued, CertificateRenewed, CertificateRevoked
from shared.contracts.common import SealedMembership
from shared.contracts.formats import CertificateNumber
from shared.contracts.partners import PartnerCertificate, PartnerGrant, PartnerWithdrawal, grant_key
from shared.contracts.registration import (
    ConsentChanged,
    ConsentState,
    ResidentRegistered,
    ResidentWithdrawn,
)
from shared.contracts.sealed import Sealed, resident_subject
from shared.contracts.subsidy import GrantIssued
from shared.contracts.topics import CERTIFICATES, DLQ_SUFFIX, GRANTS, RESIDENTS
from shared.kit.consumer import EventConsumer, HandlerContext
from shared.kit.db import Connection
from shared.kit.envelope import Envelope
from shared.kit.keyring import Keyring
from shared.kit.outbox import Outbox
from shared.kit.settings import Settings
from shared.reference import prefecture_of
from tests.support import (
    BrokerRecord,
    EventFeed,
    OpenPool,
    QueryLog,
    assert_batch_is_one_by_one,
    service_pools,
    table_rows,
)

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


async def gateway_consumer(settings: Settings, pool: asyncpg.Pool, keyring: Keyring) -> EventConsumer:
    """The gateway's consumer on a database (routing by the partners seeded there), not attached to any broker."""
    partners = PartnerDirectory(await store.load_partners(pool))
    return EventConsumer(
        service=SERVICE, settings=settings, pool=pool, outbox=Outbox("outbox_gwruns"),
        router=build_router(partners), topics=[RESIDENTS, CERTIFICATES, GRANTS], keyring=keyring,
    )


@pytest.fixture
async def keyring(settings: Settings) -> AsyncIterator[Keyring]:
    keys = Keyring.from_settings(settings)
    yield keys
    await keys.close()


@pytest.fixture
async def pools(settings: Settings) -> AsyncIterator[OpenPool]:
    """Fresh gateway databases (migrated, partners seeded), all with the first one's partner
    pseudonym keys (so that two of them send the same partner references)."""
    keys: dict[str, bytes] = {}

    async def seed(conn: Connection) -> None:
        await seed_partners(conn)
        for code, key in keys.items():
            await conn.execute("UPDATE partners SET pseudonym_key = $2 WHERE code = $1", code, key)
        keys.update({r["code"]: bytes(r["pseudonym_key"]) for r in await conn.fetch("SELECT * FROM partners")})

    async with service_pools(settings, MIGRATIONS, seed=seed, max_size=2) as open_pool:
        yield open_pool


# --- Upstream events as the broker hands them over ----------------------------------------------


class Upstream(EventFeed):
    """Upstream events in the order they are made (record time), each sent by the service that owns its topic."""

    def __call__(self, data: EventData, subject: str) -> Envelope:
        """The event as its service publishes it, on its topic."""
        return self.add(data, subject=subject, source=SOURCES[data.event_topic])


def new_number(municipality: str) -> str:
    return CertificateNumber.format(municipality, 2026, uuid.uuid4().int % CertificateNumber.MAX_SEQUENCE + 1)


def new_resident() -> str:
    # 11 hex digits: never twelve digits in a row, the shape of a My Number, which the guard refuses
    return f"res-{uuid.uuid4().hex[:11]}"


def members(*partners: str) -> list[SealedMembership]:
    """Memberships without member numbers (``sealed_members``: with them)."""
    return [SealedMembership(partner=p) for p in partners]


async def sealed_members(
    keyring: Keyring, resident_id: str, *partners: str, **member_numbers: str
) -> list[SealedMembership]:
    """Memberships with member numbers sealed under the resident's key, as certification sends them."""
    return [
        SealedMembership(
            partner=p,
            member_number=None if p not in member_numbers
            else await keyring.seal(resident_subject(resident_id), member_numbers[p]),
        )
        for p in partners
    ]


def certificate_fields(number: str, resident_id: str, partners: list[SealedMembership], status: str) -> dict[str, Any]:
    return {
        "certificate_number": number, "resident_id": resident_id,
        "municipality_code": CertificateNumber.parse(number).municipality_code,
        "valid_from": VALID_FROM, "valid_until": VALID_UNTIL, "status": status, "partners": partners,
    }


def issued(number: str, resident_id: str, partners: list[SealedMembership], minute: int) -> CertificateIssued:
    return CertificateIssued(**certificate_fields(number, resident_id, partners, "valid"),
                             application_id=f"app-{number[-6:]}", issued_at=at(minute))


def revoked(number: str, resident_id: str, partners: list[SealedMembership], minute: int) -> CertificateRevoked:
    return CertificateRevoked(**certificate_fields(number, resident_id, partners, "revoked"),
                              reason="moved away", revoked_at=at(minute))


def renewed(number: str, resident_id: str, partners: list[SealedMembership], minute: int) -> CertificateRenewed:
    return CertificateRenewed(**certificate_fields(number, resident_id, partners, "valid"), renewed_at=at(minute))


def registered(resident_id: str, consents: list[tuple[str, bool]], minute: int) -> ResidentRegistered:
    return ResidentRegistered(
        resident_id=resident_id, registration_id=f"reg-{resident_id[-8:]}", municipality_code=SHIRAHAMA,
        prefecture_code=prefecture_of(SHIRAHAMA).code, tier="basic", status="active", legal_address_code="131016",
        # Sealed upstream; the gateway never opens a contact.
        contact=Sealed(kid=resident_subject(resident_id), iv="AAAAAAAAAAAAAAAA", ct="bm90IG9wZW5lZA"),
        consents=[ConsentState(purpose="share_certificate", partner=p, granted=g, at=at(minute)) for p, g in consents],
        registered_at=at(minute),
    )


def consent(resident_id: str, partner: str | None, granted: bool, minute: int) -> ConsentChanged:
    return ConsentChanged(resident_id=resident_id, purpose="share_certificate", partner=partner, granted=granted,
                          at=at(minute))


def grant_issued(grant_id: str, number: str, resident_id: str, minute: int) -> GrantIssued:
    return GrantIssued(
        grant_id=grant_id, program_id="jal-dual-residence-miles", partner="jal", mechanism="mileage_grant",
        certificate_number=number, resident_id=resident_id,
        municipality_code=CertificateNumber.parse(number).municipality_code, unit="miles",
        reserved=30_000, window_from=VALID_FROM, window_until=VALID_FROM + timedelta(days=122),
        member_number=None, issued_at=at(minute),
    )


# --- What a gateway database ends with ------------------------------------------------------------


def kid_only(data: dict[str, Any]) -> dict[str, Any]:
    """A record with its sealed member number reduced to the kid (the nonce differs by nature)."""
    sealed = data.get("member_number")
    return data if not isinstance(sealed, dict) else {**data, "member_number": {"kid": sealed["kid"]}}


async def end_state(pool: asyncpg.Pool, causes: dict[str, int]) -> dict[str, Any]:
    """Every table the consumer writes, without what differs between two runs by nature (generated
    ids, versions, times of writing); outgoing event ids are replaced by their outbox position and
    incoming ones (``causes``) by their position in the batch."""
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
            "data": None if row["payload"] is None else kid_only(json.loads(row["payload"])),
        }

    deliveries = await table_rows(pool, "SELECT * FROM deliveries ORDER BY id", "id", "delivered_at")
    for row in deliveries:
        row["event_id"], row["cause_event_id"] = ids[str(row["event_id"])], ids[str(row["cause_event_id"])]
    return {
        "feed": [feed_record(row) for row in outbox],
        "deliveries": deliveries,
        "entitlements": await table_rows(pool, "SELECT * FROM entitlements ORDER BY partner, certificate_number",
                                         "version"),
        "cache_queue": sorted((r["partner"], r["certificate_number"])
                              for r in await pool.fetch("SELECT * FROM verify_cache_queue")),
        "consents": await table_rows(pool, "SELECT * FROM share_consents ORDER BY resident_id, partner"),
        "certificates": await table_rows(pool, "SELECT * FROM certificates ORDER BY certificate_number"),
        "erased": await table_rows(pool, "SELECT * FROM kit_erased_residents ORDER BY resident_id"),
        "held_grants": await table_rows(pool, "SELECT * FROM held_grants ORDER BY id", "id", "held_at"),
        "grant_states": await table_rows(pool, "SELECT * FROM grant_states ORDER BY partner, grant_id", "last_seq"),
        "feed_grant_keys": await table_rows(pool, "SELECT * FROM feed_grant_keys ORDER BY seq", "seq"),
    }


def incoming_ids(records: Sequence[BrokerRecord]) -> dict[str, int]:
    """ce_id → position of its first copy."""
    return {dict(r.headers)["ce_id"].decode(): i for i, r in reversed(list(enumerate(records)))}


def records_of(state: dict[str, Any], number: str) -> list[tuple[str | None, bytes, bytes | None]]:
    """(type, key, partition key) of the feed records about one certificate, in outbox order."""
    return [(r["type"], r["key"], r["partition_key"]) for r in state["feed"] if r["subject"] == number]


# --- The tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("poison", [False, True], ids=["whole batch", "one event per savepoint"])
async def test_a_mixed_batch_ends_where_one_event_at_a_time_ends(
    settings: Settings, pools: OpenPool, keyring: Keyring, monkeypatch: pytest.MonkeyPatch, poison: bool
) -> None:
    """With a poison event in the batch, the batch fails and is re-run one event per savepoint:
    each consent or certificate event is then a run of one, whose records go straight to the outbox."""
    if poison:
        apply_grant_event = handlers.apply_grant_event

        async def failing(ctx: HandlerContext, partners: PartnerDirectory, event: GrantEvent) -> None:
            if event.grant_id == "gr-poison":
                raise ValueError("poison")
            await apply_grant_event(ctx, partners, event)

        monkeypatch.setattr(handlers, "apply_grant_event", failing)
    r1, r2, r3, r4, r5, r6, r7, r8, r9 = (new_resident() for _ in range(9))
    c1, c2, c3, c6, c8, c9, c10 = (new_number(SHIRAHAMA) for _ in range(7))
    c4, c7, c5 = new_number(IKI), new_number(IKI), new_number(ATAMI)
    g1, g4, g8 = "gr-one", "gr-four", "gr-eight"

    before, batch = Upstream(settings), Upstream(settings)
    # r4 shares c4 with both partners by membership alone, and JAL has a grant on it.
    before(issued(c4, r4, await sealed_members(keyring, r4, "jal", "kyushuyusen", jal="JMB-4"), 1), c4)
    before(grant_issued(g4, c4, r4, 2), g4)
    before(grant_issued(g8, c8, r8, 3), g8)  # held: c8 is not known yet
    before(issued(c9, r9, members("jal"), 4), c9)

    # a run of consents: new residents (no certificate yet) and r4, who holds c4
    first = batch(registered(r1, [("jal", True)], 10), r1)
    batch(registered(r2, [], 11), r2)
    batch(registered(r3, [("jal", False)], 12), r3)
    batch(consent(r4, "jal", False, 13), r4)  # withdrawal of c4 and g4's key from JAL
    batch(consent(r4, "kyushuyusen", False, 14), r4)
    batch.again(first)  # a duplicate
    batch(consent(r4, "jal", True, 15), r4)  # c4 and g4 sent to JAL again
    batch(consent(r4, "jal", False, 14), r4)  # older than the one on record: ignored
    batch(consent(r3, None, True, 16), r3)  # names no partner: allows nothing
    # a run of certificate events
    c1_issued = batch(issued(c1, r1, await sealed_members(keyring, r1, "jal", jal="JMB-1"), 20), c1)  # consented
    batch(issued(c2, r2, members("jal"), 21), c2)  # no consent: the membership is one
    batch(issued(c3, r3, members("jal"), 22), c3)  # consent revoked: nothing
    batch(issued(c5, r5, members("jal"), 23), c5)  # no travel program: nothing
    batch(issued(c6, r6, members("jal"), 24), c6)
    batch(issued(c8, r8, await sealed_members(keyring, r8, "jal", jal="JMB-8"), 25), c8)  # releases g8
    batch(revoked(c6, r6, members("jal"), 26), c6)  # same run: after its issue
    batch(renewed(c9, r9, [], 27), c9)  # JAL dropped: withdrawal
    batch.again(c1_issued)  # a duplicate
    if poison:
        batch(grant_issued("gr-poison", c1, r1, 29), "gr-poison")
    # one at a time: a grant and an erasure split the runs
    batch(grant_issued(g1, c1, r1, 30), g1)
    batch(ResidentWithdrawn(resident_id=r2, withdrawn_at=at(31)), r2)
    batch(issued(c10, r2, members("jal"), 32), c10)  # of a withdrawn resident: dropped
    batch(issued(c7, r7, members("jal", "kyushuyusen"), 33), c7)
    batch(consent(r7, "kyushuyusen", False, 34), r7)  # c7 withdrawn from Kyushu Yusen

    causes = incoming_ids(before.records + batch.records)
    outcome = await assert_batch_is_one_by_one(
        pools, lambda pool: gateway_consumer(settings, pool, keyring), history=before.records, batch=batch.records,
        snapshot=lambda pool: end_state(pool, causes), label="gwruns",
        # A parked event may be claimed again (for replays): the batch again would park it twice.
        repeat=not poison,
    )
    # Without a poison, the batch applied in one go (not re-run event by event after a failure).
    assert any(q.query.startswith("SAVEPOINT") for q in outcome.statements) == poison
    state, stats = outcome.snapshot, outcome.stats
    # The batch (history is applied by another consumer), then, without a poison, all of it again.
    size = len(batch.records)
    assert (stats.handled, stats.duplicates, stats.parked) == (size - 2 - poison, 2 + (0 if poison else size), poison)

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
    # On the feed, sealed for JAL about r1 (the certificate and its grant alike).
    c1_sealed = [r["data"]["member_number"] for r in state["feed"] if r["subject"] == c1]
    assert c1_sealed == [{"kid": f"partner:jal:{active[('jal', c1)]['resident_ref']}"}] * 2
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
    poisoned = [causes[dict(r.headers)["ce_id"].decode()] for r in batch.records if r.key == b"gr-poison"]
    assert [r["dead_letter"] for r in state["feed"] if "dead_letter" in r] == poisoned
    assert state["held_grants"] == []


async def test_a_run_costs_a_few_statements_whatever_its_length(
    settings: Settings, pools: OpenPool, keyring: Keyring
) -> None:
    log = QueryLog()
    # One connection: each statement's types are looked up once per connection (asyncpg's
    # introspection, three statements a type), so a second connection would add them to a count.
    pool = await pools("gwruns", log, max_size=1)
    consumer = await gateway_consumer(settings, pool, keyring)

    async def statements(feed: EventFeed) -> int:
        return len(await log.of_batch(consumer, feed.records))

    counts: dict[int, tuple[int, int]] = {}  # events in the batch → statements (consents, certificates)
    for size in (3, 10, 200):  # the first batch also warms asyncpg up (type introspection per statement)
        consents, certificates = Upstream(settings), Upstream(settings)
        residents = [new_resident() for _ in range(size)]
        for r in residents:
            consents(registered(r, [("jal", True)], 1), r)
        numbers = [new_number(SHIRAHAMA) for _ in residents]  # JAL serves Shirahama: feed records too
        for i, (n, r) in enumerate(zip(numbers, residents, strict=True)):
            certificates(issued(n, r, await sealed_members(keyring, r, "jal", jal=f"JMB-{i}"), 2), n)
        counts[size] = (await statements(consents), await statements(certificates))
        sent = await pool.fetchval(
            "SELECT count(*) FROM deliveries WHERE certificate_number = ANY($1::text[])", numbers
        )
        assert sent == size

    # As many for 10 events as for 200: BEGIN, the inbox, the run's reads and writes (4 for consents,
    # 8 for certificates), the outbox with its NOTIFY in one statement (no local relay here), COMMIT,
    # the pool's reset.
    assert counts[200] == counts[10] == (8, 13)
