"""Confirmations recorded by one statement per group-commit batch (``store.RECORD``).

The batch statement must leave exactly what recording the same donations one by one leaves: the
same receipt numbers (gapless, in recording order), donations, ledger rows, donor-years and
municipalities, and answer each donation what its own statement would have. Through the service,
a batch's repeats (a donor, a payment reference), a failing confirmation and the one-stop rule
answer as they do one by one.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, date, datetime
from typing import Any

import asyncpg
import httpx
import pytest
from asyncpg.connection import LoggedQuery

from services.donation import domain, store
from services.donation.domain import (
    CompanyDetails,
    Donor,
    NewDonation,
    PaymentConfirmation,
    PersonDetails,
    RecordedDonation,
)
from services.donation.main import MIGRATIONS, create_app
from shared.contracts.base import EventData
from shared.contracts.donation import DonationReceived, OneStopExceptionVoided
from shared.kit.db import Connection
from shared.kit.settings import Settings
from shared.reference import find_municipality_by_full_name
from tests.support import OpenPool, PooledStatements, bearer, in_transaction, service_client, service_pools, tables_rows

SHIRAHAMA = "304018"  # 和歌山県白浜町 (JAL mileage program)
TANABE = find_municipality_by_full_name("和歌山県田辺市").code
SUSAMI = find_municipality_by_full_name("和歌山県すさみ町").code
KAMISHIHORO = find_municipality_by_full_name("北海道上士幌町").code
MITOYO = find_municipality_by_full_name("香川県三豊市").code
IKI = find_municipality_by_full_name("長崎県壱岐市").code
SANJO = find_municipality_by_full_name("新潟県三条市").code
MINATO = find_municipality_by_full_name("東京都港区").code

AT = datetime(2026, 1, 10, 3, 0, tzinfo=UTC)
TODAY = date(2026, 1, 10)
#: What one statement for a batch starts with (``store._RECORD_MANY``).
BATCH_STATEMENT = "WITH input AS"


def confirmation(
    reference: str, code: str, amount: int = 10_000, *, kind: str = "hometown_tax", paid: str = "2025-06-01",
    donor: PersonDetails | CompanyDetails | None = None, donor_id: uuid.UUID | None = None, **extra: Any,
) -> PaymentConfirmation:
    return PaymentConfirmation(
        payment_reference=reference, municipality_code=code, kind=kind,  # type: ignore[arg-type]
        amount=amount, payment_date=date.fromisoformat(paid), donor=donor, donor_id=donor_id, **extra,
    )


def for_person(confirmed: PaymentConfirmation, number: int) -> NewDonation:
    assert isinstance(confirmed.donor, PersonDetails)
    plan = domain.plan_donation(confirmed, domain.check_donor_details(confirmed.donor), TODAY)
    person = domain.new_donor(confirmed.donor, uuid.UUID(int=number), AT)
    return domain.new_donation(confirmed, plan, person, uuid.UUID(int=1_000 + number), AT)


def for_donor(confirmed: PaymentConfirmation, donor: Donor, number: int) -> NewDonation:
    plan = domain.plan_donation(confirmed, donor.facts, TODAY)
    return domain.new_donation(confirmed, plan, donor, uuid.UUID(int=1_000 + number), AT)


ROKUKO = PersonDetails("関 六子", "東京都千代田区千代田1-1", resident_id="res-rokuko")
JIRO = PersonDetails("大阪 次郎", "大阪府大阪市北区梅田1-2")
COMPANY = CompanyDetails("株式会社バッチ", MINATO)
KNOWN = PersonDetails("登録 花子", "東京都港区芝公園4-2")


async def history(conn: Connection) -> tuple[Donor, Donor]:
    """What both databases hold before the batch: a donor with five municipalities in 2025, one with
    a donation to Sanjō, a company and a person on file."""
    number = 1
    for code in (SHIRAHAMA, TANABE, SUSAMI, KAMISHIHORO, MITOYO):
        number += 1
        await store.record_donation(
            conn, for_person(confirmation(f"h-{number}", code, one_stop_requested=True, donor=ROKUKO), number)
        )
    await store.record_donation(conn, for_person(confirmation("h-jiro", SANJO, donor=JIRO), 50))
    company, _ = await store.find_or_create_donor(conn, domain.new_donor(COMPANY, uuid.UUID(int=60), AT))
    known, _ = await store.upsert_donor(conn, domain.new_donor(KNOWN, uuid.UUID(int=61), AT))
    return company, known


def batch(company: Donor, known: Donor) -> list[NewDonation]:
    """Every kind of confirmation, no donor or payment twice."""
    return [
        # the sixth municipality of a donor's year (its one-stop exception goes)
        for_person(confirmation("b-rokuko", IKI, donor=ROKUKO), 100),
        for_person(confirmation("b-jiro", SANJO, 20_000, donor=JIRO), 101),  # a municipality again
        for_person(confirmation("b-new-1", SANJO, 30_000, donor=PersonDetails("新 一郎", "京都府京都市1")), 102),
        for_person(confirmation("b-new-2", TANABE, paid="2024-12-31",  # another year
                                donor=PersonDetails("新 二郎", "京都府京都市2")), 103),
        for_donor(confirmation("b-company", TANABE, 1_000_000, kind="corporate", donor_id=company.id,
                               revitalisation_plan_id=f"sample-{TANABE}"), company, 104),
        for_donor(confirmation("b-miles", SHIRAHAMA, 7_500, kind="miles", donor_id=known.id), known, 105),
        for_person(confirmation("b-program", SHIRAHAMA, 20_000, program_id="jal-dual-residence-miles",
                                donor=PersonDetails("新 三郎", "京都府京都市3")), 106),
        for_person(confirmation("b-new-4", SANJO, 40_000, one_stop_requested=True,
                                donor=PersonDetails("新 四郎", "京都府京都市4")), 107),
    ]


SNAPSHOT = {
    "donors": "SELECT * FROM donors ORDER BY id",
    "donations": "SELECT * FROM donations ORDER BY seq",
    "receipts": "SELECT * FROM receipts ORDER BY number",
    "fund_ledger": "SELECT * FROM fund_ledger ORDER BY id",
    "donor_years": "SELECT * FROM donor_years ORDER BY donor_id, calendar_year",
    "donor_year_municipalities": "SELECT * FROM donor_year_municipalities ORDER BY donor_id, calendar_year, "
                                 "municipality_code",
    "receipt_counters": "SELECT * FROM receipt_counters ORDER BY municipality_code, calendar_year",
}


async def snapshot(pool: asyncpg.Pool) -> dict[str, list[dict[str, Any]]]:
    return await tables_rows(pool, SNAPSHOT)


@pytest.fixture
async def open_pool(settings: Settings) -> AsyncIterator[OpenPool]:
    async with service_pools(settings, MIGRATIONS) as opened:
        yield opened


async def test_one_statement_for_a_batch_records_what_one_by_one_records(open_pool: OpenPool) -> None:
    statements: list[LoggedQuery] = []
    batched, one_by_one = await open_pool("batch_many", statements.append), await open_pool("batch_one")
    answers: list[list[RecordedDonation]] = []
    ran: list[str] = []
    for pool, many in ((batched, True), (one_by_one, False)):
        async with pool.acquire() as conn, conn.transaction():
            company, known = await history(conn)
        statements.clear()
        async with pool.acquire() as conn, conn.transaction():
            donations = batch(company, known)
            if many:
                answers.append(await store.record_donations(conn, donations))
            else:
                answers.append([await store.record_donation(conn, d) for d in donations])
        # (asyncpg's own type introspection runs once per connection and type)
        ran = ran or [
            s.split()[0] for s in in_transaction(statements) if "typeinfo_tree" not in s and "'jit'" not in s
        ]

    assert ran == ["WITH"], "one statement for the batch"
    assert answers[0] == answers[1]
    assert [a.receipt_number for a in answers[0]] == [
        f"{IKI}-2025-000001", f"{SANJO}-2025-000002", f"{SANJO}-2025-000003", f"{TANABE}-2024-000001",
        f"{TANABE}-2025-000002", None, f"{SHIRAHAMA}-2025-000002", f"{SANJO}-2025-000004",
    ]
    sixth = answers[0][0]
    # (all recorded at AT: in code order)
    assert sixth.earlier_municipalities == tuple(sorted((SHIRAHAMA, TANABE, SUSAMI, KAMISHIHORO, MITOYO)))
    assert sixth.year is not None and sixth.year.requested
    assert answers[0][1].donor is not None and answers[0][1].donor.id == uuid.UUID(int=50), "the donor on file"
    assert await snapshot(batched) == await snapshot(one_by_one)


async def test_a_payment_reference_on_file_fails_the_batch_statement_and_leaves_nothing(open_pool: OpenPool) -> None:
    pool = await open_pool("batch_duplicate")
    async with pool.acquire() as conn, conn.transaction():
        company, known = await history(conn)
    before = await snapshot(pool)
    donations = batch(company, known)
    # a payment recorded in the history
    again = for_person(confirmation("h-jiro", SANJO, donor=PersonDetails("別 人", "京都府京都市9")), 200)
    async with pool.acquire() as conn:
        with pytest.raises(asyncpg.UniqueViolationError) as refused:
            async with conn.transaction():
                await store.record_donations(conn, [*donations[:3], again])
    assert refused.value.constraint_name == store.PAYMENT_REFERENCE_KEY
    assert await snapshot(pool) == before


def test_a_donor_or_payment_twice_does_not_share_a_run() -> None:
    donor = Donor(uuid.uuid4(), "individual", "x", "y", None, None, None, None, AT)
    first = for_person(confirmation("k-1", SANJO, donor=JIRO), 1)
    keys = [
        store.RECORD.keys(first),
        store.RECORD.keys(for_person(confirmation("k-2", TANABE, donor=JIRO), 2)),  # the same person
        store.RECORD.keys(for_person(confirmation("k-1", TANABE, donor=ROKUKO), 3)),  # the same payment
        store.RECORD.keys(for_donor(confirmation("k-4", SANJO, donor_id=donor.id), donor, 4)),
    ]
    assert set(keys[0]) & set(keys[1]) and set(keys[0]) & set(keys[2])
    assert not set(keys[0]) & set(keys[3]) and not set(keys[1]) & set(keys[2])


# ---------------------------------------------------------------------------- through the service


@pytest.fixture(scope="module")
async def client(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, asyncpg.Pool, Any]]:
    app = create_app(settings)
    async with service_client(app) as http:
        yield http, app.state.runtime.pool, app.state.runtime


def person(name: str, resident_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "individual", "name": name, "address": f"東京都千代田区1-{uuid.uuid4().hex[:6]}"}
    if resident_id is not None:
        body["resident_id"] = resident_id
    return body


def body(code: str, amount: int, paid: str, donor: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "payment_reference": f"pay-{uuid.uuid4().hex}", "municipality_code": code, "kind": "hometown_tax",
        "amount": amount, "payment_date": paid, "donor": donor or person(f"同時 {uuid.uuid4().hex[:6]}"), **extra,
    }


async def post_all(http: httpx.AsyncClient, admin: dict[str, str], bodies: Sequence[dict[str, Any]]) -> list[Any]:
    return list(await asyncio.gather(*(http.post("/v1/donations", json=b, headers=admin) for b in bodies)))


async def test_concurrent_confirmations_share_one_statement_and_answer_as_one_by_one(
    client: tuple[httpx.AsyncClient, asyncpg.Pool, Any], settings: Settings,
) -> None:
    http, pool, runtime = client
    admin = bearer(settings, "admin", subject="payments-batches")
    year = "2021"
    rokuko = person("関 六子", resident_id=f"res-{uuid.uuid4().hex[:8]}")
    for code in (SHIRAHAMA, TANABE, SUSAMI, KAMISHIHORO, MITOYO):
        made = await http.post("/v1/donations", json=body(code, 10_000, f"{year}-03-01", rokuko,
                                                          one_stop_requested=True), headers=admin)
        assert made.status_code == 201, made.text
    repeated_donor = person("二度 目")
    fresh = [body(SANJO, 2_000 + i, f"{year}-12-0{1 + i % 9}") for i in range(20)]
    requests = [
        *fresh[:5],
        body(IKI, 10_000, f"{year}-08-01", rokuko),  # the sixth municipality: the year is void, and told
        body(SANJO, 5_000, f"{year}-05-05", repeated_donor),
        *fresh[5:12],
        body(SANJO, 5_500, f"{year}-05-06", repeated_donor),  # the donor twice: alone, after the statement
        *fresh[12:],
    ]

    async with PooledStatements(pool) as statements:
        responses = await post_all(http, admin, requests)

    assert [r.status_code for r in responses] == [201] * len(requests), [r.text for r in responses]
    batches = runtime.group_commits["POST /v1/donations"]
    shared = statements.count(BATCH_STATEMENT)
    assert 1 <= shared <= batches.batches, "the batches' confirmations did not share a statement"
    assert statements.count("WITH donor AS") < len(requests) / 2, "most confirmations ran one by one"
    # Sanjō's receipts of the year: 1..n in recording order, each answered with its own.
    rows = await pool.fetch(
        """
        SELECT d.id::text, r.sequence, r.number FROM donations d JOIN receipts r ON r.donation_id = d.id
        WHERE d.municipality_code = $1 AND d.calendar_year = $2 ORDER BY d.seq
        """,
        SANJO, int(year),
    )
    assert [r["sequence"] for r in rows] == list(range(1, 23))
    answered = {r.json()["id"]: r.json()["receipt_number"] for r in responses}
    assert {r["id"]: r["number"] for r in rows} == {i: n for i, n in answered.items() if n.startswith(SANJO)}
    twice = [r.json() for r, b in zip(responses, requests, strict=True) if b["donor"] == repeated_donor]
    assert len({t["donor_id"] for t in twice}) == 1
    assert await pool.fetchval(
        "SELECT donations FROM donor_year_municipalities WHERE donor_id = $1 AND calendar_year = $2",
        uuid.UUID(twice[0]["donor_id"]), int(year),
    ) == 2
    # The sixth municipality voided the year, and told it once; every donation told its events once.
    sixth = responses[5].json()
    assert await pool.fetchval(
        "SELECT voided_at IS NOT NULL AND void_announced_at IS NOT NULL FROM donor_years"
        " WHERE donor_id = $1 AND calendar_year = $2", uuid.UUID(sixth["donor_id"]), int(year),
    )
    assert await events_of(pool, DonationReceived, list(answered)) == len(requests)
    # Each receipt travels in its donation's event (one act, one event), none in an event of its own.
    assert await events_of(pool, DonationReceived, list(answered.values())) == len(requests)
    assert await events_of(pool, OneStopExceptionVoided, [sixth["donor_id"]]) == 1


async def test_repeats_conflicts_and_refusals_in_a_batch_answer_as_alone(
    client: tuple[httpx.AsyncClient, asyncpg.Pool, Any], settings: Settings,
) -> None:
    http, pool, _ = client
    admin = bearer(settings, "admin", subject="payments-batches")
    year = "2020"
    first = body(SANJO, 1_000, f"{year}-01-01")
    on_file = await http.post("/v1/donations", json=first, headers=admin)
    assert on_file.status_code == 201
    twice = body(SANJO, 3_000, f"{year}-02-02")
    unknown = {**body(SANJO, 6_000, f"{year}-05-06"), "donor": None, "donor_id": str(uuid.uuid4())}
    fresh = [body(SANJO, 2_000 + i, f"{year}-12-01") for i in range(10)]
    requests = [
        *fresh[:3],
        {**first, "amount": 1_001},  # the payment on file with another content: 409
        first,  # the same again: 200 with the first donation
        twice, *fresh[3:6], twice,  # a new payment twice in the batch: one donation
        unknown,  # nobody on file
        *fresh[6:],
    ]

    responses = await post_all(http, admin, requests)

    statuses = [r.status_code for r in responses]
    assert statuses[3:5] == [409, 200] and responses[4].json() == on_file.json(), statuses
    assert sorted(statuses[5:10:4]) == [200, 201] and responses[5].json() == responses[9].json()
    assert responses[requests.index(unknown)].json()["code"] == "unknown-donor"
    assert statuses.count(201) == len(fresh) + 1
    numbers = await pool.fetch(
        """
        SELECT r.sequence FROM donations d JOIN receipts r ON r.donation_id = d.id
        WHERE d.municipality_code = $1 AND d.calendar_year = $2 ORDER BY d.seq
        """,
        SANJO, int(year),
    )
    assert [r["sequence"] for r in numbers] == list(range(1, len(fresh) + 3))


async def events_of(pool: asyncpg.Pool, model: type[EventData], mentioning: Sequence[str]) -> int:
    """Events of a type in the outbox that mention one of these ids."""
    return int(await pool.fetchval(
        "SELECT count(*) FROM outbox WHERE $1::bytea = ANY (header_values)"
        " AND EXISTS (SELECT 1 FROM unnest($2::text[]) AS i WHERE position(convert_to(i, 'UTF8') IN payload) > 0)",
        model.event_type.encode(), list(mentioning),
    ))
