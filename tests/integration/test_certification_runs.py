"""Certification's resident projection applied set-based: one batch of mixed registration events
leaves exactly the rows that applying them one event per batch leaves, in a handful of statements.

The consumer's ``handle_batch`` is called directly with crafted records (as the kit's own run tests
do), on fresh databases with the service's migrations: no broker, no running service.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from services.certification import consumers
from services.certification.main import MIGRATIONS
from shared.contracts.base import EventData
from shared.contracts.registration import (
    ConsentChanged,
    ConsentState,
    Contact,
    ContactChanged,
    PremiumApproved,
    PremiumRejected,
    PremiumRequested,
    RegistrationWithdrawn,
    ResidentRegistered,
    ResidentWithdrawn,
)
from shared.contracts.sealed import resident_subject
from shared.contracts.topics import RESIDENTS
from shared.kit.consumer import EventConsumer
from shared.kit.envelope import Envelope
from shared.kit.outbox import Outbox
from shared.kit.settings import Settings
from shared.reference import prefecture_of
from tests.support import (
    EventFeed,
    OpenPool,
    QueryLog,
    assert_batch_is_one_by_one,
    in_transaction,
    seal_for_tests,
    service_pools,
)

SHIRAHAMA, TANABE, SUSAMI = "304018", "302066", "304069"
CHIYODA, HACHIOJI = "131016", "132012"  # legal addresses
T0 = datetime(2026, 4, 1, 9, 0, tzinfo=UTC)
PROJECTION = {
    "residents": "resident_id",
    "resident_registrations": "registration_id",
    "share_consents": "resident_id, partner",
}


class Feed:
    """Envelopes in the order the registration service would publish them, each a record of one
    partition (the topic's key is the resident, so one resident's events share a partition)."""

    def __init__(self, settings: Settings) -> None:
        self.feed = EventFeed(settings, "registration")
        self.records = self.feed.records

    def add(self, event: EventData, *, minutes: int) -> Envelope:
        """The event, published at T0 + ``minutes`` (its envelope time: the projection's last_event_at)."""
        resident_id: str = getattr(event, "resident_id")  # noqa: B009
        return self.feed.add(event, subject=resident_id, time=T0 + timedelta(minutes=minutes))

    def again(self, envelope: Envelope) -> None:
        """The same envelope once more (a redelivery): the inbox must skip it."""
        self.feed.again(envelope)


def registered(
    resident_id: str, registration_id: str, municipality: str, *, legal: str = CHIYODA, tier: str = "basic",
    status: str = "active", consents: dict[str, bool] | None = None, minutes: int = 0,
) -> ResidentRegistered:
    at = T0 + timedelta(minutes=minutes)
    return ResidentRegistered(
        resident_id=resident_id, registration_id=registration_id, municipality_code=municipality,
        prefecture_code=prefecture_of(municipality).code, tier=tier, status=status, legal_address_code=legal,
        contact=seal_for_tests(
            resident_subject(resident_id),
            Contact(name="山田 花子", name_kana="ヤマダ ハナコ", email=f"{resident_id}@example.jp"),
        ),
        consents=[
            ConsentState(purpose="share_certificate", partner=partner, granted=granted, at=at)
            for partner, granted in (consents or {}).items()
        ] + [ConsentState(purpose="email", granted=True, at=at)],  # not a consent of ours
        registered_at=at,
    )


def consent(
    resident_id: str, partner: str | None, granted: bool, *, minutes: int, purpose: str = "share_certificate"
) -> ConsentChanged:
    return ConsentChanged(
        resident_id=resident_id, purpose=purpose, partner=partner, granted=granted, at=T0 + timedelta(minutes=minutes)
    )


def consumer_on(settings: Settings, pool: asyncpg.Pool) -> EventConsumer:
    return EventConsumer(
        service="certification", settings=settings, pool=pool, outbox=Outbox("certification_runs_test"),
        router=consumers.router, topics=[RESIDENTS], name="certification",
    )


async def projection(pool: asyncpg.Pool) -> dict[str, list[dict[str, Any]]]:
    return {
        table: [dict(r) for r in await pool.fetch(f"SELECT * FROM {table} ORDER BY {order}")]
        for table, order in PROJECTION.items()
    }


@pytest.fixture
async def pools(settings: Settings) -> AsyncIterator[OpenPool]:
    """Fresh databases with certification's migrations."""
    async with service_pools(settings, MIGRATIONS) as open_pool:
        yield open_pool


def ids() -> dict[str, str]:
    tag = uuid.uuid4().hex[:6]
    names = ("a", "b", "c", "d", "e", "w", "a1", "a2", "a3", "b1", "c1", "e1", "w1", "w2")
    return {name: f"{name}-{tag}" for name in names}


async def test_one_batch_of_mixed_events_leaves_what_one_event_per_batch_leaves(
    settings: Settings, pools: OpenPool
) -> None:
    k = ids()
    history, feed = Feed(settings), Feed(settings)
    # Before the batch: C has a premium registration under review and consented to JAL at 0:10;
    # W registered and withdrew.
    history.add(registered(k["c"], k["c1"], TANABE, tier="premium", status="pending_review",
                           consents={"jal": True}, minutes=10), minutes=10)
    history.add(registered(k["w"], k["w1"], SHIRAHAMA, consents={"jal": True}), minutes=11)
    history.add(ResidentWithdrawn(resident_id=k["w"], withdrawn_at=T0 + timedelta(minutes=12)), minutes=12)

    first = feed.add(registered(k["a"], k["a1"], SHIRAHAMA, consents={"jal": True, "ana": True}, minutes=20),
                     minutes=20)
    feed.add(registered(k["a"], k["a2"], TANABE, legal=HACHIOJI, consents={"ana": True}, minutes=21), minutes=21)
    feed.add(PremiumRequested(resident_id=k["a"], registration_id=k["a1"], municipality_code=SHIRAHAMA,
                              activity_count=3, requested_at=T0), minutes=22)
    feed.add(registered(k["w"], k["w2"], TANABE, consents={"ana": True}, minutes=23), minutes=23)  # too late
    feed.add(consent(k["w"], "jal", True, minutes=24), minutes=24)  # too late as well
    feed.again(first)  # a redelivery of A's first registration
    feed.add(PremiumApproved(resident_id=k["c"], registration_id=k["c1"], municipality_code=TANABE,
                             valid_until=date(2030, 3, 31), decided_at=T0), minutes=25)
    feed.add(consent(k["c"], "jal", False, minutes=5), minutes=26)  # an older fact arriving later: loses
    feed.add(consent(k["a"], "ana", False, minutes=27), minutes=27)
    feed.add(consent(k["a"], "ana", True, minutes=27), minutes=28)  # same time: the later one wins
    feed.add(consent(k["a"], None, False, minutes=29, purpose="email"), minutes=29)  # not ours: touches nothing
    feed.add(ContactChanged(resident_id=k["a"], contact=seal_for_tests(
        resident_subject(k["a"]), Contact(name="x", name_kana="エックス", email="x@example.jp")),
                            at=T0), minutes=30)  # not routed
    # a3: registered, asked to upgrade and refused within the run (the change builds on the run's own state)
    feed.add(registered(k["a"], k["a3"], SUSAMI, minutes=30), minutes=30)
    feed.add(PremiumRequested(resident_id=k["a"], registration_id=k["a3"], municipality_code=SUSAMI,
                              activity_count=2, requested_at=T0), minutes=30)
    feed.add(PremiumRejected(resident_id=k["a"], registration_id=k["a3"], municipality_code=SUSAMI,
                             reason="活動不足", decided_at=T0), minutes=30)
    feed.add(registered(k["b"], k["b1"], SUSAMI, consents={"jal": True}, minutes=31), minutes=31)
    feed.add(ResidentWithdrawn(resident_id=k["b"], withdrawn_at=T0 + timedelta(minutes=32)), minutes=32)
    feed.add(registered(k["b"], k["b1"], SUSAMI, consents={"jal": True}, minutes=33), minutes=33)  # after: ignored
    feed.add(PremiumRequested(resident_id=k["b"], registration_id=k["b1"], municipality_code=SUSAMI,
                              activity_count=1, requested_at=T0), minutes=34)
    feed.add(registered(k["a"], k["a1"], SHIRAHAMA, tier="premium", status="pending_review",
                        consents={"jal": False}, minutes=35), minutes=35)  # a1 registered again, now premium
    feed.add(RegistrationWithdrawn(resident_id=k["a"], registration_id=k["a2"], municipality_code=TANABE,
                                   withdrawn_at=T0), minutes=36)
    feed.add(consent(k["d"], "jal", True, minutes=37), minutes=37)  # D first seen through a consent
    feed.add(PremiumRejected(resident_id=k["e"], registration_id=k["e1"], municipality_code=SHIRAHAMA,
                             reason="活動不足", decided_at=T0), minutes=38)  # E through a change of an unseen one

    outcome = await assert_batch_is_one_by_one(
        pools, lambda pool: consumer_on(settings, pool), history=history.records, batch=feed.records,
        snapshot=projection, label="cert",
    )
    rows, stats = outcome.snapshot, outcome.stats
    assert (stats.handled, stats.skipped, stats.duplicates) == (21, 2, 23)  # the batch, then all of it again

    def minutes(m: int) -> datetime:
        return T0 + timedelta(minutes=m)

    mine = set(k.values())
    assert [(r["resident_id"], r["status"], r["legal_address_code"], r["last_event_at"])
            for r in rows["residents"] if r["resident_id"] in mine] == sorted([
        (k["a"], "active", CHIYODA, minutes(36)),  # the last registration's address; the last event's time
        (k["b"], "withdrawn", None, minutes(32)),
        (k["c"], "active", CHIYODA, minutes(26)),  # the consent that lost still touched the resident
        (k["d"], "active", None, minutes(37)),
        (k["e"], "active", None, minutes(38)),
        (k["w"], "withdrawn", None, minutes(12)),
    ])
    assert [(r["registration_id"], r["resident_id"], r["municipality_code"], r["tier"], r["status"],
             r["premium_status"], r["valid_until"], r["last_event_at"])
            for r in rows["resident_registrations"] if r["resident_id"] in mine] == sorted([
        (k["a1"], k["a"], SHIRAHAMA, "premium", "pending_review", "requested", None, minutes(35)),
        (k["a2"], k["a"], TANABE, "basic", "withdrawn", None, None, minutes(36)),
        (k["a3"], k["a"], SUSAMI, "basic", "active", "rejected", None, minutes(30)),
        (k["c1"], k["c"], TANABE, "premium", "active", "approved", date(2030, 3, 31), minutes(25)),
        (k["e1"], k["e"], SHIRAHAMA, "premium", "rejected", "rejected", None, minutes(38)),
    ])
    assert [(r["resident_id"], r["partner"], r["granted"], r["at"])
            for r in rows["share_consents"] if r["resident_id"] in mine] == sorted([
        (k["a"], "ana", True, minutes(27)),
        (k["a"], "jal", False, minutes(35)),
        (k["c"], "jal", True, minutes(10)),
        (k["d"], "jal", True, minutes(37)),
    ])


async def test_a_run_of_registrations_costs_a_handful_of_statements(
    settings: Settings, pools: OpenPool
) -> None:
    log = QueryLog()
    pool = await pools("cert_statements", log)
    feed = Feed(settings)
    tag = uuid.uuid4().hex[:6]
    for n in range(500):
        # 250 residents, two registrations each (one per municipality), two consents each time
        resident = f"r{n // 2}-{tag}"
        town = SHIRAHAMA if n % 2 else TANABE
        feed.add(registered(resident, f"g{n}-{tag}", town, consents={"jal": True, "ana": n % 2 == 0}, minutes=n),
                 minutes=n)
    consumer = consumer_on(settings, pool)
    warm_up = Feed(settings)  # a connection's first use of a type costs asyncpg an introspection query
    warm_up.add(registered(f"warm-{tag}", f"warm-{tag}", SHIRAHAMA, consents={"jal": True}), minutes=0)
    await consumer.handle_batch(warm_up.records)
    batch = in_transaction(await log.of_batch(consumer, feed.records))

    # Before: 5 per event (resident status, resident, registration, 2 consents), 2,500 in all.
    # Now: the inbox, and one statement that looks up who withdrew and writes residents,
    # registrations and consents of the others.
    assert [" ".join(statement.split()[:3]) for statement in batch] == [
        "INSERT INTO inbox", "WITH withdrawn AS",
    ]
    assert consumer.stats.handled == 501

    async def count(table: str, where: str = "true") -> int:
        return int(await pool.fetchval(f"SELECT count(*) FROM {table} WHERE resident_id LIKE $1 AND {where}",
                                       f"r%-{tag}"))

    assert (await count("residents"), await count("resident_registrations"), await count("share_consents")) == (
        250, 500, 500)
    # ana: granted with the first registration, revoked with the second (jal stays granted)
    assert await count("share_consents", "granted") == 250


async def test_a_run_that_reads_nothing_stored_drops_the_withdrawn_in_its_one_statement(
    settings: Settings, pools: OpenPool
) -> None:
    """Registrations, consents and a change of a registration the run saved itself: folded whole,
    and a withdrawn resident's rows dropped by the statement that writes the others."""
    k = ids()
    history, feed = Feed(settings), Feed(settings)
    history.add(registered(k["c"], k["c1"], TANABE, minutes=10), minutes=10)
    history.add(registered(k["w"], k["w1"], SHIRAHAMA, consents={"jal": True}), minutes=11)
    history.add(ResidentWithdrawn(resident_id=k["w"], withdrawn_at=T0 + timedelta(minutes=12)), minutes=12)

    feed.add(registered(k["a"], k["a1"], SHIRAHAMA, consents={"jal": True}, minutes=20), minutes=20)
    feed.add(registered(k["w"], k["w2"], TANABE, consents={"ana": True}, minutes=21), minutes=21)  # too late
    feed.add(consent(k["w"], "jal", True, minutes=22), minutes=22)  # too late as well
    feed.add(PremiumRequested(resident_id=k["a"], registration_id=k["a1"], municipality_code=SHIRAHAMA,
                              activity_count=3, requested_at=T0), minutes=23)
    feed.add(consent(k["c"], "ana", True, minutes=24), minutes=24)
    feed.add(registered(k["b"], k["b1"], SUSAMI, minutes=25), minutes=25)

    outcome = await assert_batch_is_one_by_one(
        pools, lambda pool: consumer_on(settings, pool), history=history.records, batch=feed.records,
        snapshot=projection, label="cert-live",
    )
    rows = outcome.snapshot

    def minutes(m: int) -> datetime:
        return T0 + timedelta(minutes=m)

    mine = set(k.values())
    assert [(r["resident_id"], r["status"], r["legal_address_code"], r["last_event_at"])
            for r in rows["residents"] if r["resident_id"] in mine] == sorted([
        (k["a"], "active", CHIYODA, minutes(23)),
        (k["b"], "active", CHIYODA, minutes(25)),
        (k["c"], "active", CHIYODA, minutes(24)),
        (k["w"], "withdrawn", None, minutes(12)),  # the tombstone, untouched
    ])
    assert [(r["registration_id"], r["resident_id"], r["status"], r["premium_status"], r["last_event_at"])
            for r in rows["resident_registrations"] if r["resident_id"] in mine] == sorted([
        (k["a1"], k["a"], "active", "requested", minutes(23)),
        (k["b1"], k["b"], "active", None, minutes(25)),
        (k["c1"], k["c"], "active", None, minutes(10)),
    ])
    assert [(r["resident_id"], r["partner"], r["granted"], r["at"])
            for r in rows["share_consents"] if r["resident_id"] in mine] == sorted([
        (k["a"], "jal", True, minutes(20)),
        (k["c"], "ana", True, minutes(24)),
    ])
