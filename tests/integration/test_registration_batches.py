"""Registrations of a group-commit batch share the resident lock and the insert (``store.LOCK_FOR_REGISTRATION``,
``store.INSERT``).

The batch statements must read and leave exactly what the one-by-one statements do, row for row.
Through the service, a batch's repeats of a resident (who must decide on what the first wrote), an
unknown or erased resident and premium requests answer as they do one by one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from asyncpg.connection import LoggedQuery

from services.registration import store
from services.registration.domain import Consent, Contact, Registration, Resident
from services.registration.main import MIGRATIONS, create_app
from shared.contracts.registration import PremiumRequested, ResidentRegistered
from shared.kit.db import Connection
from shared.kit.group_commit import CAREFUL_S
from shared.kit.settings import Settings
from tests.integration.test_registration_support import (
    HOME,
    IKI,
    KAMISHIHORO,
    MITOYO,
    SHIRAHAMA,
    SUSAMI,
    TANABE,
    WAKAYAMA,
    assert_problem,
    create_resident,
    new_resident_id,
    premium,
    resident_auth,
)
from tests.support import OpenPool, PooledStatements, in_transaction, service_client, service_pools, tables_rows

AT = datetime(2026, 1, 10, 3, 0, tzinfo=UTC)
#: What the batch statements start with (the one-write forms: ``lock_resident_for_registration(``
#: and ``INSERT ... VALUES``).
LOCK_MANY = "SELECT * FROM lock_residents_for_registration("
LOCK_ONE = "SELECT * FROM lock_resident_for_registration("
INSERT_MANY = "INSERT INTO registrations (id, resident_id, municipality_code, prefecture_code, tier, status, " \
              "derived_from, registered_at, valid_from, valid_until, updated_at) SELECT"


def resident(resident_id: str, name: str) -> Resident:
    return Resident(resident_id, Contact(name, "テスト", f"{resident_id}@example.jp", None, "ja"), date(1980, 1, 1),
                    HOME, AT)


def registration(
    number: int, resident_id: str, code: str, prefecture: str, *, derived_from: str | None = None, **extra: Any
) -> Registration:
    return Registration(f"reg-{number}", resident_id, code, prefecture, extra.pop("tier", "basic"),
                        extra.pop("status", "active"), derived_from, AT + timedelta(minutes=number), **extra)


async def history(conn: Connection) -> None:
    """Both databases before the batch: Ichiro with a Shirahama registration (and its derived
    prefecture one), a premium request under review and consents; Jiro with none; Saburo erased."""
    for rid, name in (("res-ichiro", "一 郎"), ("res-jiro", "次 郎"), ("res-saburo", "三 郎")):
        assert await store.insert_resident(conn, resident(rid, name))
    await store.insert_registrations(conn, [
        registration(1, "res-ichiro", SHIRAHAMA, WAKAYAMA),
        registration(2, "res-ichiro", WAKAYAMA, WAKAYAMA, derived_from="reg-1"),
        registration(3, "res-ichiro", KAMISHIHORO, "010006", tier="premium", status="pending_review"),
    ])
    await store.insert_review(conn, "review-3", "reg-3", "initial", None, [], AT)
    await store.set_consent(conn, "res-ichiro", Consent("email", None, True, AT))
    await store.set_consent(conn, "res-ichiro", Consent("share_certificate", "jal", False, AT))
    await store.erase_resident(conn, "res-saburo", "13", AT)


BATCH_ROWS: list[list[Registration]] = [
    [registration(10, "res-ichiro", TANABE, WAKAYAMA)],  # its prefecture registration reused
    [registration(11, "res-jiro", SUSAMI, WAKAYAMA, tier="premium", status="pending_review"),
     registration(12, "res-jiro", WAKAYAMA, WAKAYAMA, derived_from="reg-11")],
]

SNAPSHOT = {
    "registrations": "SELECT * FROM registrations ORDER BY id",
    "residents": "SELECT * FROM residents ORDER BY id",
}


async def snapshot(pool: asyncpg.Pool) -> dict[str, list[dict[str, Any]]]:
    return await tables_rows(pool, SNAPSHOT)


@pytest.fixture
async def open_pool(settings: Settings) -> AsyncIterator[OpenPool]:
    async with service_pools(settings, MIGRATIONS) as opened:
        yield opened


def ran(statements: Sequence[LoggedQuery]) -> list[str]:
    # (asyncpg's own type introspection runs once per connection and type)
    return [" ".join(s.split()) for s in in_transaction(statements) if "typeinfo_tree" not in s and "'jit'" not in s]


async def test_one_lock_and_one_insert_for_a_batch_read_and_leave_what_one_by_one_do(open_pool: OpenPool) -> None:
    statements: list[LoggedQuery] = []
    batched, one_by_one = await open_pool("regbatch_many", statements.append), await open_pool("regbatch_one")
    wanted = ["res-jiro", "res-ichiro", "res-nobody", "res-saburo"]  # not in id order
    locked: list[list[store.LockedResident | None]] = []
    for pool, many in ((batched, True), (one_by_one, False)):
        async with pool.acquire() as conn, conn.transaction():
            await history(conn)
        statements.clear()
        async with pool.acquire() as conn, conn.transaction():
            if many:
                locked.append(await store.lock_residents_for_registration(conn, wanted))
                await store.insert_many_registrations(conn, BATCH_ROWS)
            else:
                locked.append([await store.lock_resident_for_registration(conn, rid) for rid in wanted])
                for rows in BATCH_ROWS:
                    await store.insert_registrations(conn, rows)
        if many:
            lock, insert = ran(statements)  # one statement each for the batch
            assert lock.startswith(LOCK_MANY) and insert.startswith(INSERT_MANY), (lock, insert)

    assert locked[0] == locked[1]
    jiro, ichiro, nobody, erased = locked[0]
    assert nobody is None and erased is None, "no active resident: absent or erased"
    assert jiro is not None and jiro.registrations == [] and jiro.consents == []
    assert ichiro is not None and [r.id for r in ichiro.registrations] == ["reg-1", "reg-2", "reg-3"]
    assert ichiro.registrations[2].pending_review == "initial" and len(ichiro.consents) == 2
    assert await snapshot(batched) == await snapshot(one_by_one)


async def test_the_batch_lock_takes_the_residents_rows_in_id_order(settings: Settings) -> None:
    # Another transaction holds the middle resident: the batch has locked the first in id order and
    # waits for the middle, the last not locked yet. Every batch locks in that one order, so two
    # batches cannot deadlock on each other's residents.
    async with service_pools(settings, MIGRATIONS, max_size=3) as open_pool:
        pool = await open_pool("regbatch_order")
        async with pool.acquire() as conn, conn.transaction():
            for rid in ("res-a", "res-m", "res-z"):
                await store.insert_resident(conn, resident(rid, "順番"))
        async with pool.acquire() as holder, pool.acquire() as batch, pool.acquire() as observer:
            async with holder.transaction():
                await holder.execute("SELECT 1 FROM residents WHERE id = 'res-m' FOR UPDATE")
                transaction = batch.transaction()
                await transaction.start()
                locking = asyncio.create_task(
                    store.lock_residents_for_registration(batch, ["res-z", "res-m", "res-a"])
                )
                for _ in range(200):
                    waiting = await observer.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND query LIKE '%lock_residents_for_registration%'"
                    )
                    if waiting:
                        break
                    await asyncio.sleep(0.02)
                async with observer.transaction():
                    free = await observer.fetch(
                        "SELECT id FROM residents WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE SKIP LOCKED",
                        ["res-a", "res-m", "res-z"],
                    )
                assert [r["id"] for r in free] == ["res-z"], "res-a locked first, res-m awaited, res-z not yet"
            locked = await locking
            await transaction.rollback()
    assert [r.resident.id for r in locked if r is not None] == ["res-z", "res-m", "res-a"]


# ---------------------------------------------------------------------------- through the service


@pytest.fixture(scope="module")
async def client(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, asyncpg.Pool, Any]]:
    app = create_app(settings, maintenance_interval_s=3600)
    async with service_client(app) as http:
        yield http, app.state.runtime.pool, app.state.runtime


async def post_all(
    http: httpx.AsyncClient, settings: Settings, requests: Sequence[tuple[str, dict[str, Any]]]
) -> list[httpx.Response]:
    return list(await asyncio.gather(*(
        http.post(f"/v1/residents/{rid}/registrations", json=body, headers=resident_auth(settings, rid))
        for rid, body in requests
    )))


async def events(pool: asyncpg.Pool, model: Any, resident_id: str, mentioning: str = "") -> int:
    """Events of a type in the outbox keyed by this resident (and mentioning this text)."""
    return int(await pool.fetchval(
        "SELECT count(*) FROM outbox WHERE key = $1 AND $2::bytea = ANY (header_values)"
        " AND position(convert_to($3, 'UTF8') IN payload) > 0",
        resident_id.encode(), model.event_type.encode(), mentioning,
    ))


async def test_concurrent_registrations_share_the_lock_and_the_insert(
    client: tuple[httpx.AsyncClient, asyncpg.Pool, Any], settings: Settings
) -> None:
    http, pool, runtime = client
    residents = [await create_resident(http, settings) for _ in range(24)]

    async with PooledStatements(pool) as statements:
        responses = await post_all(http, settings, [(rid, {"municipality_code": SHIRAHAMA}) for rid in residents])

    assert [r.status_code for r in responses] == [201] * len(residents), [r.text for r in responses]
    batches = runtime.group_commits["POST /v1/residents/{resident_id}/registrations"]
    assert 1 <= statements.count(LOCK_MANY) <= batches.batches, "the batches' residents did not share a lock"
    assert 1 <= statements.count(INSERT_MANY) <= batches.batches, "the batches' rows did not share an insert"
    assert statements.count(LOCK_ONE) < len(residents) / 2, "most registrations locked one by one"
    for rid, response in zip(residents, responses, strict=True):
        answer = response.json()
        assert answer["resident_id"] == rid and answer["municipality_code"] == SHIRAHAMA
        rows = await pool.fetch(
            "SELECT id, municipality_code, derived_from FROM registrations WHERE resident_id = $1 ORDER BY id", rid
        )
        assert sorted((r["municipality_code"], r["derived_from"]) for r in rows) == [
            (WAKAYAMA, answer["id"]), (SHIRAHAMA, None),
        ]
        assert answer["prefecture_registration_id"] in {r["id"] for r in rows}
        # One event, carrying the prefecture registration it brought.
        assert await events(pool, ResidentRegistered, rid) == 1
        assert await events(pool, ResidentRegistered, rid, answer["prefecture_registration_id"]) == 1


async def test_a_residents_premium_requests_in_a_batch_decide_one_after_another(
    client: tuple[httpx.AsyncClient, asyncpg.Pool, Any], settings: Settings
) -> None:
    # The second request of a resident reads after the first wrote (else each of four would find
    # two premium places and a fourth would be granted); nothing in the batch fails but the fourth.
    http, pool, _ = client
    fresh = [await create_resident(http, settings) for _ in range(12)]
    premium_one, limited = await create_resident(http, settings), await create_resident(http, settings)
    basic = {"municipality_code": SHIRAHAMA}
    requests: list[tuple[str, dict[str, Any]]] = [
        *((rid, basic) for rid in fresh[:6]),
        (premium_one, premium(KAMISHIHORO, premium_one)),
        *((limited, premium(code, limited)) for code in (SHIRAHAMA, KAMISHIHORO, MITOYO, IKI)),
        *((rid, basic) for rid in fresh[6:]),
    ]

    async with PooledStatements(pool) as statements:
        responses = await post_all(http, settings, requests)

    assert statements.count(LOCK_MANY) >= 1, "the batch's residents did not share a lock"
    answered = dict(zip([rid for rid, _ in requests], responses, strict=True))
    for rid in fresh:
        assert answered[rid].status_code == 201, answered[rid].text
    requested = answered[premium_one]
    assert requested.status_code == 201, requested.text
    assert requested.json()["status"] == "pending_review" and requested.json()["awaiting_review"] == "initial"
    assert await pool.fetchval(
        "SELECT count(*) FROM premium_reviews WHERE registration_id = $1 AND status = 'pending'",
        requested.json()["id"],
    ) == 1
    assert await events(pool, PremiumRequested, premium_one) == 1

    mine = [r for (rid, _), r in zip(requests, responses, strict=True) if rid == limited]
    assert sorted(r.status_code for r in mine) == [201, 201, 201, 409], [r.text for r in mine]
    assert_problem(next(r for r in mine if r.status_code == 409), 409, "premium-limit-reached")
    assert await pool.fetchval(
        "SELECT count(*) FROM registrations WHERE resident_id = $1 AND tier = 'premium'", limited
    ) == 3
    assert await events(pool, PremiumRequested, limited) == 3


async def test_repeats_and_unknown_and_erased_residents_in_a_batch_answer_as_alone(
    client: tuple[httpx.AsyncClient, asyncpg.Pool, Any], settings: Settings
) -> None:
    http, pool, _ = client
    await asyncio.sleep(CAREFUL_S)  # the refusal of the test before ran writes in savepoints for a while
    fresh = [await create_resident(http, settings) for _ in range(12)]
    twice, prefecture = await create_resident(http, settings), await create_resident(http, settings)
    erased = await create_resident(http, settings)
    gone = await http.delete(f"/v1/residents/{erased}", headers=resident_auth(settings, erased))
    assert gone.status_code == 204, gone.text
    unknown = new_resident_id()
    basic = {"municipality_code": SHIRAHAMA}
    requests: list[tuple[str, dict[str, Any]]] = [
        *((rid, basic) for rid in fresh[:4]),
        (twice, basic), (prefecture, {"municipality_code": TANABE}),
        (unknown, basic), (erased, basic),
        *((rid, basic) for rid in fresh[4:8]),
        (twice, basic),  # the same municipality again: decided on the first's registration, refused
        (prefecture, {"municipality_code": SUSAMI}),  # the same prefecture: the first's derived one reused
        *((rid, basic) for rid in fresh[8:]),
    ]

    async with PooledStatements(pool) as statements:
        responses = await post_all(http, settings, requests)

    def answers(rid: str) -> list[httpx.Response]:
        return [r for (who, _), r in zip(requests, responses, strict=True) if who == rid]

    assert statements.count(LOCK_MANY) >= 1, "the batch's residents did not share a lock"
    for rid in fresh:
        assert [r.status_code for r in answers(rid)] == [201], answers(rid)[0].text
    first, second = sorted(answers(twice), key=lambda r: r.status_code)
    assert first.status_code == 201 and second.status_code == 409, (first.text, second.text)
    assert_problem(second, 409, "already-registered")
    assert await pool.fetchval("SELECT count(*) FROM registrations WHERE resident_id = $1", twice) == 2
    assert await events(pool, ResidentRegistered, twice) == 1

    tanabe, susami = answers(prefecture)
    assert (tanabe.status_code, susami.status_code) == (201, 201), (tanabe.text, susami.text)
    derived = await pool.fetch(
        "SELECT id FROM registrations WHERE resident_id = $1 AND municipality_code = $2", prefecture, WAKAYAMA
    )
    assert len(derived) == 1, "one prefecture registration, derived by the first, reused by the second"
    shared = {tanabe.json()["prefecture_registration_id"], susami.json()["prefecture_registration_id"]}
    assert shared == {derived[0]["id"]}
    assert await events(pool, ResidentRegistered, prefecture) == 2
    assert await events(pool, ResidentRegistered, prefecture, derived[0]["id"]) == 1  # brought by the first only

    for rid in (unknown, erased):
        assert_problem(answers(rid)[0], 404, "resident-not-found")
