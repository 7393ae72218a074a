"""Insights' store applies a run of changes set-based (one statement per stretch of one kind) and
leaves exactly the rows that applying each change alone, in order, leaves: repeated keys, erasure
and every kind of change included."""

from __future__ import annotations

from datetime import UTC, date, datetime

import asyncpg
from asyncpg.connection import LoggedQuery

from services.insights import handlers, store
from services.insights.domain import Change, Op
from services.insights.main import MIGRATIONS
from shared.contracts.certification import CertificateIssued
from shared.kit.settings import Settings
from tests.support import query_logging_pool, service_database

SHIRAHAMA, WAKAYAMA = "304018", "300004"
D1, D2, D3 = date(2026, 1, 10), date(2026, 2, 10), date(2026, 3, 10)


def reg(registration: str, resident: str | None, status: str = "active", tier: str = "basic") -> Change:
    return Change("register", (registration, resident, SHIRAHAMA, WAKAYAMA, tier, status, D1))


def cert(number: str, resident: str | None, status: str, issued_on: date | None) -> Change:
    return Change("certificate", (number, resident, SHIRAHAMA, WAKAYAMA, status, D1, D3, issued_on))


def grant(op: Op, grant_id: str, *extra: object) -> Change:
    return Change(op, (grant_id, "jal-miles@304018", "jal", "mileage_grant", SHIRAHAMA, WAKAYAMA, "miles", *extra))


#: Every kind, with keys that repeat inside a stretch (a set-based statement may touch a row once).
CHANGES = [
    reg("g1", "r1"), reg("g1", "r1"), reg("g2", "r2", "pending_review"), reg("g3", "r3", "pending_review"),
    reg("g4", "r4", "pending_review", "premium"),
    Change("approve_premium", ("g2",)), Change("approve_premium", ("g2",)),
    Change("reject_premium", ("g3",)), Change("reject_premium", ("g4",)),
    Change("end_registration", ("g1", "withdrawn", D2)), Change("end_registration", ("g1", "expired", D3)),
    Change("end_registration", ("g2", "expired", D3)),
    cert("c1", "r1", "valid", D1), cert("c1", "r1", "expiring", None), cert("c2", "r2", "valid", D1),
    cert("c1", "r1", "revoked", None),
    Change("erase", ("r2", D2)),
    cert("c2", None, "revoked", None), reg("g5", None),
    Change("end_registration", ("g5", "withdrawn", D2)),
    grant("grant_waitlisted", "w1"), grant("grant_waitlisted", "w1"), grant("grant_issued", "w1", 30000),
    grant("grant_issued", "w1", 99999), grant("grant_issued", "w2", 20000),
    Change("redemption", ("w2", "t1", "jal-miles@304018", SHIRAHAMA, WAKAYAMA, "miles", 7500, D2, False)),
    Change("redemption", ("w2", "t1", "jal-miles@304018", SHIRAHAMA, WAKAYAMA, "miles", 7500, D2, False)),
    Change("redemption", ("w2", "t2", "jal-miles@304018", SHIRAHAMA, WAKAYAMA, "miles", 7500, D2, True)),
    Change("grant_ended", ("w1", "cancelled")), Change("grant_ended", ("w1", "expired")),
    Change("grant_ended", ("w2", "expired")),
    Change("donation", ("d1", SHIRAHAMA, WAKAYAMA, "hometown_tax", "jpy", 10000, "general", D1)),
    Change("donation", ("d1", SHIRAHAMA, WAKAYAMA, "hometown_tax", "jpy", 99999, "general", D1)),
    Change("donation", ("d2", SHIRAHAMA, WAKAYAMA, "hometown_tax", "jpy", 30000, "dual_residence", D2)),
    Change("refund", ("d2",)), Change("refund", ("d2",)),
    Change("plan_adopted", ("p1", "municipality", SHIRAHAMA, WAKAYAMA, D1)),
    Change("plan_adopted", ("p1", "municipality", SHIRAHAMA, WAKAYAMA, D2)),
    Change("plan_withdrawn", ("p1", D2)), Change("plan_withdrawn", ("p1", D3)),
    Change("designated", ("k1", SHIRAHAMA, WAKAYAMA, D1)), Change("designated", ("k1", SHIRAHAMA, WAKAYAMA, D2)),
    Change("corporation_revoked", ("k1", D2)), Change("corporation_revoked", ("k1", D3)),
]


async def tables(conn: asyncpg.Connection[asyncpg.Record]) -> dict[str, list[tuple[object, ...]]]:
    return {
        table: [tuple(row) for row in await conn.fetch(f"SELECT * FROM {table} ORDER BY 1, 2")]
        for table in store.PROJECTION_TABLES
    }


async def test_a_run_applied_at_once_leaves_the_rows_of_each_change_applied_alone(settings: Settings) -> None:
    together = await asyncpg.connect(await service_database(settings, "insstore", MIGRATIONS))
    alone = await asyncpg.connect(await service_database(settings, "insstore", MIGRATIONS))
    try:
        async with together.transaction():
            await store.apply(together, CHANGES)
        for change in CHANGES:
            async with alone.transaction():
                await store.apply(alone, [change])
        expected = await tables(alone)
        assert await tables(together) == expected
        # What the changes say, so the comparison is not of two empty or two equally wrong sets.
        assert expected["registrations"] == [
            ("g1", "r1", SHIRAHAMA, WAKAYAMA, "basic", "withdrawn", D1, D2),
            ("g2", None, SHIRAHAMA, WAKAYAMA, "premium", "expired", D1, D3),  # ended before the erasure
            ("g3", "r3", SHIRAHAMA, WAKAYAMA, "basic", "rejected", D1, None),
            ("g4", "r4", SHIRAHAMA, WAKAYAMA, "premium", "rejected", D1, None),
            ("g5", None, SHIRAHAMA, WAKAYAMA, "basic", "withdrawn", D1, D2),
        ]
        assert expected["certificates"] == [
            ("c1", "r1", SHIRAHAMA, WAKAYAMA, "revoked", D1, D3, D1),
            ("c2", None, SHIRAHAMA, WAKAYAMA, "revoked", D1, D3, D1),
        ]
        assert [(g[0], g[7], g[8], g[9]) for g in expected["grants"]] == [
            ("w1", "cancelled", True, 30000), ("w2", "completed", True, 20000),
        ]
        assert [(r[1], r[6]) for r in expected["redemptions"]] == [("t1", 7500), ("t2", 7500)]
        assert [(d[0], d[5], d[8]) for d in expected["donations"]] == [("d1", 10000, False), ("d2", 30000, True)]
        assert expected["plans"] == [("p1", "municipality", SHIRAHAMA, WAKAYAMA, D1, D2)]
        assert expected["corporations"] == [("k1", SHIRAHAMA, WAKAYAMA, D1, D2)]
    finally:
        await together.close()
        await alone.close()


async def test_a_burst_of_registrations_is_one_statement(settings: Settings) -> None:
    statements: list[LoggedQuery] = []
    pool = await query_logging_pool(await service_database(settings, "insstore", MIGRATIONS), statements.append)
    try:
        changes = [reg(f"g{i}", f"r{i}") for i in range(500)] + [
            cert(f"c{i}", f"r{i}", "valid", D1) for i in range(500)
        ]
        async with pool.acquire() as conn, conn.transaction():
            statements.clear()
            await store.apply(conn, changes)
        # The logger also sees BEGIN, COMMIT and asyncpg's type introspection: only writes count.
        writes = [q for q in statements if q.query.startswith(("INSERT", "UPDATE"))]
        assert [q.query.split()[:3] for q in writes] == [
            ["INSERT", "INTO", "registrations"], ["INSERT", "INTO", "certificates"],
        ]
        # Each ran once with a column per parameter (an ``executemany`` would carry 500 rows instead).
        assert [[len(column) for column in q.args] for q in writes] == [[500] * 7, [500] * 8]
        assert await pool.fetchval("SELECT count(*) FROM registrations") == 500
        assert await pool.fetchval("SELECT count(*) FROM certificates") == 500
    finally:
        await pool.close()



async def test_a_run_reads_its_generation_and_the_erased_in_one_round_trip(settings: Settings) -> None:
    statements: list[LoggedQuery] = []
    pool = await query_logging_pool(await service_database(settings, "insstore", MIGRATIONS), statements.append)
    try:
        await pool.execute(
            "INSERT INTO kit_erased_residents (resident_id, erased_at) VALUES ('gone', '2026-02-01T00:00:00Z')"
        )
        events = [certificate("c-gone", "gone"), certificate("c-here", "here")]
        async with pool.acquire() as conn, conn.transaction():
            statements.clear()
            await handlers.project(conn, 1, events)
        # Before its writes, one statement: the generation (share-locked) and the erased, together.
        reads = [q.query for q in statements if "insights_state" in q.query or "kit_erased_residents" in q.query]
        assert len(reads) == 1 and "FOR SHARE" in reads[0] and "kit_erased_residents" in reads[0], reads
        rows = await pool.fetch("SELECT certificate_number, resident_id FROM certificates ORDER BY 1")
        assert [tuple(row) for row in rows] == [("c-gone", None), ("c-here", "here")]
        async with pool.acquire() as conn, conn.transaction():
            await handlers.project(conn, 0, [certificate("c-stale", "here")])  # a rebuild moved past generation 0
        assert await pool.fetchval("SELECT count(*) FROM certificates") == 2
    finally:
        await pool.close()


def certificate(number: str, resident_id: str) -> CertificateIssued:
    return CertificateIssued(
        certificate_number=number, resident_id=resident_id, municipality_code=SHIRAHAMA,
        valid_from=D1, valid_until=D3, status="valid", partners=[], application_id=f"app-{number}",
        issued_at=datetime(2026, 1, 10, 9, 0, tzinfo=UTC),
    )
