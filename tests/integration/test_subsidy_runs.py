"""Subsidy's certificates applied set-based: one batch of mixed certificate events leaves exactly the
rows and outgoing events that applying them one event per batch leaves, and a run of certificates
in towns without a travel program costs a handful of statements.

The consumer's ``handle_batch`` is called directly with crafted records (as the kit's own run tests
do), on fresh databases with the service's migrations and seeded programs: no broker, no service.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from services.subsidy import consumers, handlers
from services.subsidy.config import SubsidySettings
from services.subsidy.main import MIGRATIONS
from shared.contracts.base import EventData
from shared.contracts.certification import CertificateIssued, CertificateRenewed, CertificateRevoked
from shared.contracts.donation import DonationReceived
from shared.contracts.subsidy import BudgetChanged, GrantIssued, GrantWaitlisted
from shared.contracts.topics import CERTIFICATES, DONATIONS, Topic
from shared.kit.clock import SYSTEM_CLOCK
from shared.kit.consumer import EventConsumer
from shared.kit.db import Connection
from shared.kit.envelope import Envelope, new_envelope
from shared.kit.outbox import Outbox
from shared.kit.settings import Settings
from tests.support import (
    EventFeed,
    OpenPool,
    QueryLog,
    assert_batch_is_one_by_one,
    in_transaction,
    membership,
    service_pools,
    tables_rows,
    without,
)

TODAY = SYSTEM_CLOCK.today()
SHIRAHAMA, SANJO, CHIYODA = "304018", "152048", "131016"  # JAL miles, JR East vouchers, no program
JAL = "jal-dual-residence-miles@304018"  # seeded with 30,000 miles: one grant
JR_EAST = "jr-east-sanjo-shinkansen@152048"  # seeded with 1,000,000 yen: 40,000 a grant
#: What differs between two databases applying the same events: ids and clocks.
VOLATILE = (
    "grant_id", "issued_at", "waitlisted_at", "changed_at", "created_at", "updated_at", "closed_at", "recorded_at",
)


@dataclass
class Seeding:
    """The unit of work of the programs' seeding: their opening balances are not compared."""

    conn: Connection

    async def emit(self, topic: Topic, data: EventData, *, subject: str, key: str | None = None) -> Envelope:
        return new_envelope("subsidy", data, subject=subject, key=key)


def issued(municipality: str, *partners: str, valid_from: date | None = None) -> CertificateIssued:
    start = valid_from or TODAY - timedelta(days=30)
    return CertificateIssued(
        certificate_number=f"C-{municipality}-n{uuid.uuid4().hex[:8]}", resident_id=f"res-{uuid.uuid4().hex[:8]}",
        municipality_code=municipality, valid_from=start, valid_until=start + timedelta(days=364), status="valid",
        partners=[membership(partner=p, member_number="123456789" if p == "jal" else None) for p in partners],
        application_id=f"app-{uuid.uuid4().hex[:8]}", issued_at=datetime.now(UTC),
    )


def renewed(certificate: CertificateIssued) -> CertificateRenewed:
    return CertificateRenewed(
        **certificate.model_dump(exclude={"application_id", "issued_at", "valid_until"}),
        valid_until=certificate.valid_until + timedelta(days=365), renewed_at=datetime.now(UTC),
    )


def revoked(certificate: CertificateIssued) -> CertificateRevoked:
    return CertificateRevoked(
        **certificate.model_dump(exclude={"application_id", "issued_at", "status"}), status="revoked",
        reason="moved away", revoked_at=datetime.now(UTC),
    )


def donation(municipality: str, miles: int) -> DonationReceived:
    return DonationReceived(
        donation_id=f"D-{uuid.uuid4().hex[:8]}", municipality_code=municipality, donor_id="donor-1", kind="miles",
        unit="miles", amount=miles, earmark="dual_residence", payment_date=TODAY, calendar_year=TODAY.year,
        received_at=datetime.now(UTC),
    )


def consumer_on(settings: Settings, pool: asyncpg.Pool) -> EventConsumer:
    return EventConsumer(
        service="subsidy", settings=settings, pool=pool, outbox=Outbox("subsidy_runs_test"),
        router=consumers.certificates_and_donations, topics=[CERTIFICATES, DONATIONS], name="subsidy",
    )


async def seed_programs(conn: Connection) -> None:
    await handlers.seed_programs(Seeding(conn), SubsidySettings())


@pytest.fixture
async def pools(settings: Settings) -> AsyncIterator[OpenPool]:
    """Fresh databases with subsidy's migrations and seeded programs."""
    async with service_pools(settings, MIGRATIONS, seed=seed_programs) as open_pool:
        yield open_pool


async def state(pool: asyncpg.Pool) -> dict[str, list[dict[str, Any]]]:
    """Every row the certificate and donation events write, and the events they send, without ids and clocks."""
    queries = {
        "certificates": "SELECT * FROM certificates ORDER BY certificate_number",
        "grants": "SELECT * FROM grants ORDER BY certificate_number, program_id, period_from",
        "budgets": "SELECT * FROM budgets ORDER BY program_id",
        "ledger": "SELECT * FROM budget_ledger ORDER BY entry_id",
        "donations": "SELECT * FROM donation_credits ORDER BY donation_id",
    }
    rows = await tables_rows(pool, queries, *VOLATILE)
    for row in rows["ledger"]:
        row.pop("entry_id")
    outbox = await pool.fetch("SELECT topic, key, header_names, header_values, payload FROM outbox ORDER BY id")
    rows["outbox"] = [
        {
            "topic": r["topic"], "key": r["key"],
            "type": dict(zip(r["header_names"], r["header_values"], strict=True))["ce_type"],
            "data": without(json.loads(r["payload"]), *VOLATILE),
        }
        for r in outbox
    ]
    return rows


async def test_one_batch_of_mixed_certificates_leaves_what_one_event_per_batch_leaves(
    settings: Settings, pools: OpenPool
) -> None:
    x1, x2, x3 = (issued(SHIRAHAMA, "jal") for _ in range(3))
    y1, y3 = issued(CHIYODA, "jal"), issued(CHIYODA)
    y2 = issued(SHIRAHAMA, "ana")  # the town has no ANA program
    z1 = issued(SANJO, "jreast", "jal")
    feed = EventFeed(settings)
    first = feed.add(x1, subject=x1.certificate_number)  # the only grant the opening 30,000 miles cover
    for certificate in (x2, y1, y2):
        feed.add(certificate, subject=certificate.certificate_number)
    feed.again(first)  # a redelivery
    feed.add(renewed(x1), subject=x1.certificate_number)  # a second certificate year: waitlisted behind x2
    feed.add(donation(SHIRAHAMA, 30_000), subject="donation")  # alone, between runs: issues x2 from the waitlist
    feed.add(x3, subject=x3.certificate_number)
    feed.add(revoked(y1), subject=y1.certificate_number)
    for certificate in (z1, y3):
        feed.add(certificate, subject=certificate.certificate_number)
    feed.add(renewed(y3), subject=y3.certificate_number)

    outcome = await assert_batch_is_one_by_one(
        pools, lambda pool: consumer_on(settings, pool), history=[], batch=feed.records, snapshot=state, label="sub",
    )
    rows, stats = outcome.snapshot, outcome.stats
    assert (stats.handled, stats.duplicates, stats.parked) == (11, 13, 0)  # the batch, then all of it again

    next_year = x1.valid_from.replace(year=x1.valid_from.year + 1)
    assert [(g["certificate_number"], g["program_id"], g["period_from"], g["status"], g["remaining"])
            for g in rows["grants"]] == sorted([
        (x1.certificate_number, JAL, x1.valid_from, "issued", 30_000),
        (x1.certificate_number, JAL, next_year, "waitlisted", 0),
        (x2.certificate_number, JAL, x2.valid_from, "issued", 30_000),  # from the waitlist, by the donation
        (x3.certificate_number, JAL, x3.valid_from, "waitlisted", 0),
        (z1.certificate_number, JR_EAST, z1.valid_from, "issued", 40_000),
    ])
    waitlisted = sorted((g for g in rows["grants"] if g["status"] == "waitlisted"), key=lambda g: g["waitlist_seq"])
    assert [(g["certificate_number"], g["period_from"]) for g in waitlisted] == [
        (x1.certificate_number, next_year), (x3.certificate_number, x3.valid_from)]
    assert {b["program_id"]: b["available"] for b in rows["budgets"]}[JAL] == 0
    assert {b["program_id"]: b["available"] for b in rows["budgets"]}[JR_EAST] == 1_000_000 - 40_000
    assert [(c["certificate_number"], c["status"], c["valid_until"]) for c in rows["certificates"]] == sorted([
        (x1.certificate_number, "valid", x1.valid_until + timedelta(days=365)),
        (x2.certificate_number, "valid", x2.valid_until), (x3.certificate_number, "valid", x3.valid_until),
        (y1.certificate_number, "revoked", y1.valid_until), (y2.certificate_number, "valid", y2.valid_until),
        (y3.certificate_number, "valid", y3.valid_until + timedelta(days=365)),
        (z1.certificate_number, "valid", z1.valid_until),
    ])
    assert [(e["type"].decode(), e["key"].decode()) for e in rows["outbox"]] == [
        (GrantIssued.event_type, x1.certificate_number),
        (GrantWaitlisted.event_type, x2.certificate_number),
        (GrantWaitlisted.event_type, x1.certificate_number),
        (BudgetChanged.event_type, JAL),
        (GrantIssued.event_type, x2.certificate_number),
        (GrantWaitlisted.event_type, x3.certificate_number),
        (GrantIssued.event_type, z1.certificate_number),
    ]


async def test_a_run_of_certificates_without_programs_costs_a_handful_of_statements(
    settings: Settings, pools: OpenPool
) -> None:
    log = QueryLog()
    pool = await pools("sub_statements", log)
    consumer = consumer_on(settings, pool)
    warm_up = EventFeed(settings)  # a connection's first use of a type costs asyncpg an introspection query
    warm_up.add(issued(CHIYODA, "jal"), subject="warm-up")
    await consumer.handle_batch(warm_up.records)
    feed = EventFeed(settings)
    for _ in range(500):
        certificate = issued(CHIYODA, "jal")
        feed.add(certificate, subject=certificate.certificate_number)
    batch = in_transaction(await log.of_batch(consumer, feed.records))

    # Before: 2 per event (the certificate, the town's programs), 1,000 in all.
    assert [" ".join(statement.split()[:3]) for statement in batch] == [
        # The erased among the run's residents (one read), the certificates, the towns' programs.
        "INSERT INTO inbox", "SELECT resident_id FROM", "INSERT INTO certificates",
        "SELECT program_id, reference_program,",
    ]
    assert consumer.stats.handled == 501
    assert await pool.fetchval("SELECT count(*) FROM certificates") == 501
