"""The donation service over the real stack: PostgreSQL, the outbox relay and the broker."""

from __future__ import annotations

import asyncio
import csv
import io
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from asyncpg.connection import LoggedQuery
from fastapi import FastAPI
from pypdf import PdfReader

from services.donation.main import create_app
from shared.contracts.base import EventData
from shared.contracts.donation import DonationReceived, DonationRefunded, OneStopExceptionVoided
from shared.contracts.topics import DONATIONS
from shared.kit.envelope import Envelope, parse_envelope
from shared.kit.settings import Settings
from shared.reference import find_municipality_by_full_name
from tests.support import bearer, read_topic, service_client

SHIRAHAMA = "304018"  # 和歌山県白浜町 (JAL mileage program)
TANABE = find_municipality_by_full_name("和歌山県田辺市").code
SUSAMI = find_municipality_by_full_name("和歌山県すさみ町").code
KAMISHIHORO = find_municipality_by_full_name("北海道上士幌町").code
MITOYO = find_municipality_by_full_name("香川県三豊市").code
IKI = find_municipality_by_full_name("長崎県壱岐市").code
SANJO = find_municipality_by_full_name("新潟県三条市").code
SUSAKI = find_municipality_by_full_name("高知県須崎市").code
#: The refund test's own town: it checks the town's whole fund ledger, and other test files share this
#: session's donation database (in any order when the suite runs in parallel).
HIGASHIKAWA = find_municipality_by_full_name("北海道東川町").code
WAKAYAMA_PREFECTURE = find_municipality_by_full_name("和歌山県").code
SAPPORO_CHUO = find_municipality_by_full_name("北海道札幌市中央区").code
SAPPORO = find_municipality_by_full_name("北海道札幌市").code
MINATO = find_municipality_by_full_name("東京都港区").code
TOKYO = find_municipality_by_full_name("東京都").code
MUSASHINO = find_municipality_by_full_name("東京都武蔵野市").code

TABLES = (
    "donors", "donations", "receipts", "fund_ledger", "donor_years", "donor_year_municipalities",
    "one_stop_applications", "outbox", "idempotency_keys",
)


@dataclass
class Service:
    app: FastAPI
    client: httpx.AsyncClient
    pool: asyncpg.Pool
    settings: Settings

    # One subject per caller: an Idempotency-Key is remembered per caller, so a repeat must come
    # from the same one.
    @property
    def admin(self) -> dict[str, str]:
        return bearer(self.settings, "admin", subject="payments-integration")

    def staff(self, municipality: str) -> dict[str, str]:
        return bearer(self.settings, "staff", subject=f"staff-{municipality}", municipality=municipality)

    def resident(self, resident_id: str) -> dict[str, str]:
        return bearer(self.settings, "resident", subject=resident_id)

    async def confirm(self, body: dict[str, Any], expected: int = 201) -> dict[str, Any]:
        response = await self.client.post("/v1/donations", json=body, headers=self.admin)
        assert response.status_code == expected, response.text
        result: dict[str, Any] = response.json()
        return result


@pytest.fixture(scope="module")
async def service(settings: Settings) -> AsyncIterator[Service]:
    app = create_app(settings)
    async with service_client(app) as client:
        yield Service(app, client, app.state.runtime.pool, settings)


def person(name: str = "山田 太郎", *, resident_id: str | None = None, address: str | None = None) -> dict[str, Any]:
    donor: dict[str, Any] = {
        "type": "individual", "name": name, "address": address or f"東京都千代田区千代田1-{uuid.uuid4().hex[:4]}",
    }
    if resident_id is not None:
        donor["resident_id"] = resident_id
    return donor


def company(head_office: str = MINATO, name: str | None = None) -> dict[str, Any]:
    return {"type": "company", "name": name or f"株式会社テスト{uuid.uuid4().hex[:4]}", "head_office_code": head_office}


def donation(
    municipality: str = SHIRAHAMA,
    amount: int = 10_000,
    *,
    kind: str = "hometown_tax",
    payment_date: str = "2026-11-20",
    donor: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "payment_reference": f"pay-{uuid.uuid4().hex}", "municipality_code": municipality, "kind": kind,
        "amount": amount, "payment_date": payment_date,
        "donor": donor if donor is not None else person(),
    }
    if kind == "corporate":
        # Every programme municipality has a (sample) certified plan on file: sample-<code>.
        body["revitalisation_plan_id"] = f"sample-{municipality}"
    body.update(extra)
    return body


async def counts(pool: asyncpg.Pool) -> dict[str, int]:
    result = {table: int(await pool.fetchval(f"SELECT count(*) FROM {table}")) for table in TABLES}
    result["receipt_numbers"] = int(await pool.fetchval("SELECT coalesce(sum(last_number), 0) FROM receipt_counters"))
    return result


def envelopes(records: list[Any]) -> list[Envelope]:
    return [parse_envelope(r.headers, r.value, r.key) for r in records]


async def events_about(
    settings: Settings, text: str, *, expected: int, model: type[EventData] | None = None
) -> list[Envelope]:
    """The donation events whose subject or data mentions ``text`` (waits for ``expected`` of them)."""

    def matching(records: list[Any]) -> list[Envelope]:
        found = [e for e in envelopes(records) if text in e.subject or text.encode() in e.data]
        return [e for e in found if model is None or e.type == model.event_type]

    records = await read_topic(
        settings, settings.topic(DONATIONS.name), until=lambda rs: len(matching(rs)) >= expected, timeout=20
    )
    found = matching(records)
    assert len(found) >= expected, f"{[e.type for e in found]} about {text}, expected {expected}"
    return found


#: The receipt's own event, retired: a receipt travels in its donation's ``DonationReceived``.
RETIRED_RECEIPT_ISSUED = "jp.nichiiki.donation.receipt.issued.v1"


async def outbox_count(pool: asyncpg.Pool, model: type[EventData] | str, text: str) -> int:
    """Events of a type (a model, or a retired type's name) written for ``text`` (the outbox is what
    the relay publishes, exactly once each)."""
    event_type = model if isinstance(model, str) else model.event_type
    return int(
        await pool.fetchval(
            "SELECT count(*) FROM outbox WHERE $1::bytea = ANY (header_values) AND position($2::bytea IN payload) > 0",
            event_type.encode(), text.encode(),
        )
    )


def problem(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    assert response.json()["code"] == code, response.json()


# ---------------------------------------------------------------------------- confirmation


async def test_a_confirmed_payment_records_donation_receipt_ledger_and_events(service: Service) -> None:
    resident_id = f"res-{uuid.uuid4().hex[:8]}"
    body = donation(
        TANABE, 123_456, payment_date="2026-03-03", earmark="dual_residence",
        donor=person("紀州 花子", resident_id=resident_id, address="和歌山県田辺市東陽1-1"),
    )
    created = await service.confirm(body)

    assert created["receipt_number"] == f"{TANABE}-2026-000001"
    assert created["calendar_year"] == 2026 and created["unit"] == "jpy" and created["status"] == "confirmed"
    assert created["municipality_name"] == "和歌山県田辺市"
    donation_id = uuid.UUID(created["id"])
    receipt = await service.pool.fetchrow("SELECT * FROM receipts WHERE donation_id = $1", donation_id)
    assert receipt is not None
    assert receipt["donor_name"] == "紀州 花子" and receipt["donor_address"] == "和歌山県田辺市東陽1-1"
    assert receipt["amount_jpy"] == 123_456 and receipt["donation_date"] == date(2026, 3, 3)
    ledger = await service.pool.fetch(
        "SELECT entry, amount, earmark, unit FROM fund_ledger WHERE donation_id = $1 ORDER BY id", donation_id
    )
    assert [(r["entry"], r["amount"]) for r in ledger] == [("donation", 123_456), ("transfer", -123_456)]
    assert {(r["earmark"], r["unit"]) for r in ledger} == {("dual_residence", "jpy")}

    events = await events_about(service.settings, str(donation_id), expected=1)
    assert [e.type for e in events] == [DonationReceived.event_type]
    received = events[0]
    assert received.key == TANABE.encode() and received.subject == str(donation_id)
    data = received.decode(DonationReceived)
    assert (data.amount, data.unit, data.earmark, data.kind) == (123_456, "jpy", "dual_residence", "hometown_tax")
    assert data.resident_id == resident_id and data.calendar_year == 2026 and data.municipality_code == TANABE
    # The receipt was issued in the same act: it travels in the donation's event, not in one of its own.
    assert data.receipt_number == created["receipt_number"]
    assert await outbox_count(service.pool, RETIRED_RECEIPT_ISSUED, str(donation_id)) == 0

    # The donor sees it; another resident does not.
    own = await service.client.get(f"/v1/donations/{donation_id}", headers=service.resident(resident_id))
    assert own.status_code == 200 and own.json()["receipt_number"] == created["receipt_number"]
    for outsider in (service.resident("other"), service.staff(SHIRAHAMA)):
        problem(await service.client.get(f"/v1/donations/{donation_id}", headers=outsider), 403, "forbidden")
    assert (await service.client.get(f"/v1/donations/{donation_id}", headers=service.staff(TANABE))).status_code == 200


async def test_a_confirmation_is_two_statements_in_one_transaction(service: Service) -> None:
    # The year-end hot path: BEGIN, the one statement that finds or creates the donor and records
    # everything, the outbox write, COMMIT. A new round trip here costs every confirmation of the peak.
    statements: list[str] = []

    def logged(query: LoggedQuery) -> None:
        # asyncpg's own type introspection runs once per connection and type, not per request.
        if "typeinfo_tree" not in query.query and "'jit'" not in query.query:
            statements.append(" ".join(query.query.split()[:3]))

    held = [await service.pool.acquire() for _ in range(service.pool.get_max_size())]
    for conn in held:
        conn.add_query_logger(logged)
    for conn in held:
        await service.pool.release(conn)
    try:
        await service.confirm(donation(SUSAMI, 5_000, payment_date="2025-02-02"))
    finally:
        held = [await service.pool.acquire() for _ in range(service.pool.get_max_size())]
        for conn in held:
            conn.remove_query_logger(logged)
        for conn in held:
            await service.pool.release(conn)
    assert statements == ["BEGIN;", "WITH donor AS", "INSERT INTO outbox", "COMMIT;"], (
        statements
    )


async def test_the_same_payment_reported_twice_is_one_donation(service: Service) -> None:
    body = donation(SUSAMI, 30_000, payment_date="2023-05-01")
    first = await service.confirm(body)
    before = await counts(service.pool)

    again = await service.confirm(body, expected=200)
    concurrent = await asyncio.gather(
        *(service.client.post("/v1/donations", json=body, headers=service.admin) for _ in range(5))
    )

    assert again == first
    assert [r.status_code for r in concurrent] == [200] * 5
    assert {r.json()["id"] for r in concurrent} == {first["id"]}
    assert await counts(service.pool) == before
    assert await outbox_count(service.pool, DonationReceived, first["id"]) == 1
    assert await outbox_count(service.pool, RETIRED_RECEIPT_ISSUED, first["id"]) == 0

    changed = await service.client.post("/v1/donations", json={**body, "amount": 30_001}, headers=service.admin)
    problem(changed, 409, "payment-reference-conflict")
    assert changed.json()["donation_id"] == first["id"]
    elsewhere = await service.client.post(
        "/v1/donations", json={**body, "municipality_code": TANABE}, headers=service.admin
    )
    problem(elsewhere, 409, "payment-reference-conflict")
    assert await counts(service.pool) == before


async def test_two_first_notifications_of_one_payment_race_to_one_donation(service: Service) -> None:
    body = donation(SUSAMI, 7_000, payment_date="2022-08-08")
    responses = await asyncio.gather(
        *(service.client.post("/v1/donations", json=body, headers=service.admin) for _ in range(8))
    )
    assert sorted(r.status_code for r in responses) == [200] * 7 + [201]
    assert len({r.json()["id"] for r in responses}) == 1
    rows = await service.pool.fetch(
        "SELECT r.number FROM donations d JOIN receipts r ON r.donation_id = d.id WHERE d.payment_reference = $1",
        body["payment_reference"],
    )
    assert [r["number"] for r in rows] == [f"{SUSAMI}-2022-000001"]
    assert await service.pool.fetchval(
        "SELECT last_number FROM receipt_counters WHERE municipality_code = $1 AND calendar_year = 2022", SUSAMI
    ) == 1


async def test_receipts_are_gapless_and_in_order_under_50_concurrent_confirmations(service: Service) -> None:
    year = 2024
    # Ten payments recorded first; their conflicting re-notifications below take the counter's
    # lock and then roll back: a rollback must give the number back.
    originals = [donation(SANJO, 1_000 + i, payment_date=f"{year}-12-30") for i in range(10)]
    for body in originals:
        await service.confirm(body)
    fresh = [donation(SANJO, 5_000 + i, payment_date=f"{year}-12-31") for i in range(50)]
    conflicting = [{**body, "amount": body["amount"] + 1} for body in originals]
    requests = fresh[:25] + conflicting + fresh[25:]

    responses = await asyncio.gather(
        *(service.client.post("/v1/donations", json=body, headers=service.admin) for body in requests)
    )

    statuses = [r.status_code for r in responses]
    assert statuses.count(201) == 50 and statuses.count(409) == 10, statuses
    rows = await service.pool.fetch(
        """
        SELECT d.seq, d.amount, r.sequence, r.number FROM donations d JOIN receipts r ON r.donation_id = d.id
        WHERE d.municipality_code = $1 AND d.calendar_year = $2 ORDER BY d.seq
        """,
        SANJO, year,
    )
    numbers = [r["sequence"] for r in rows]
    assert numbers == list(range(1, 61)), numbers  # 1..60 in recording order: no gap, no duplicate
    assert [r["number"] for r in rows] == [f"{SANJO}-{year}-{n:06d}" for n in range(1, 61)]
    assert {r["amount"] for r in rows[10:]} == {body["amount"] for body in fresh}
    assert await service.pool.fetchval(
        "SELECT last_number FROM receipt_counters WHERE municipality_code = $1 AND calendar_year = $2", SANJO, year
    ) == 60


async def test_corporate_and_mile_donations(service: Service) -> None:
    corporate = await service.confirm(
        donation(
            TANABE, 1_000_000, kind="corporate", donor=company(MINATO), project="熊野古道の保全",
            payment_date="2025-07-01",
        )
    )
    assert corporate["receipt_number"].startswith(f"{TANABE}-2025-")
    assert corporate["earmark"] == "general" and corporate["project"] == "熊野古道の保全"
    assert corporate["revitalisation_plan_id"] == f"sample-{TANABE}" and not corporate["special_deduction"]
    received = (await events_about(service.settings, corporate["id"], expected=1, model=DonationReceived))[0].decode(
        DonationReceived
    )
    assert (received.revitalisation_plan_id, received.special_deduction) == (f"sample-{TANABE}", False)

    miles = await service.confirm(donation(SHIRAHAMA, 7_500, kind="miles", payment_date="2025-07-01"))
    assert miles["unit"] == "miles" and miles["earmark"] == "dual_residence" and miles["receipt_number"] is None
    miles_id = uuid.UUID(miles["id"])
    ledger = await service.pool.fetch("SELECT entry, amount, unit FROM fund_ledger WHERE donation_id = $1", miles_id)
    assert sorted((r["entry"], r["amount"], r["unit"]) for r in ledger) == [
        ("donation", 7_500, "miles"), ("transfer", -7_500, "miles"),
    ]
    assert await service.pool.fetchval("SELECT count(*) FROM receipts WHERE donation_id = $1", miles_id) == 0
    events = await events_about(service.settings, miles["id"], expected=1)
    assert [e.type for e in events] == [DonationReceived.event_type]
    received = events[0].decode(DonationReceived)
    assert (received.unit, received.receipt_number) == ("miles", None)

    program = await service.confirm(
        donation(SHIRAHAMA, 20_000, program_id="jal-dual-residence-miles", payment_date="2025-07-02")
    )
    assert program["earmark"] == "dual_residence" and program["program_id"] == "jal-dual-residence-miles"


async def test_donors_are_matched_by_identity(service: Service) -> None:
    address = f"大阪府大阪市北区梅田1-{uuid.uuid4().hex[:4]}"
    first = await service.confirm(donation(SUSAMI, donor=person("大阪 次郎", address=address)))
    second = await service.confirm(donation(TANABE, donor=person("大阪　次郎", address=f" {address} ")))
    assert first["donor_id"] == second["donor_id"]

    resident_id = f"res-{uuid.uuid4().hex[:8]}"
    registered = await service.client.post("/v1/donors", json=person(resident_id=resident_id), headers=service.admin)
    assert registered.status_code == 201
    donor_id = registered.json()["id"]
    again = await service.client.post("/v1/donors", json=person(resident_id=resident_id), headers=service.admin)
    assert again.status_code == 200 and again.json()["id"] == donor_id
    by_id = await service.confirm({**donation(SUSAMI), "donor": None, "donor_id": donor_id})
    assert by_id["donor_id"] == donor_id
    mine = await service.client.get(f"/v1/residents/{resident_id}/donor", headers=service.resident(resident_id))
    assert mine.status_code == 200 and mine.json()["id"] == donor_id
    problem(await service.client.get(f"/v1/donors/{donor_id}", headers=service.resident("someone")), 403, "forbidden")


# ---------------------------------------------------------------------------- bad input


def _bad_inputs() -> list[tuple[str, dict[str, Any], int, str]]:
    tomorrow = (date.today() + timedelta(days=2)).isoformat()
    base = donation()
    return [
        ("zero amount", {**base, "amount": 0}, 422, "amount-not-positive"),
        ("negative amount", {**base, "amount": -5_000}, 422, "amount-not-positive"),
        ("fractional amount", {**base, "amount": 1000.5}, 422, "invalid-request"),
        ("amount as text", {**base, "amount": "1000"}, 422, "invalid-request"),
        ("corporate under ¥100,000",
         donation(TANABE, 99_999, kind="corporate", donor=company(), project="p"), 422,
         "corporate-donation-below-minimum"),
        ("corporate to its head-office town",
         donation(SHIRAHAMA, 500_000, kind="corporate", donor=company(SHIRAHAMA), project="p"), 422,
         "corporate-donation-to-head-office"),
        ("corporate to its head-office prefecture",
         donation(WAKAYAMA_PREFECTURE, 500_000, kind="corporate", donor=company(SHIRAHAMA), project="p"), 422,
         "corporate-donation-to-head-office"),
        ("corporate to the city of its head-office ward",
         donation(SAPPORO, 500_000, kind="corporate", donor=company(SAPPORO_CHUO), project="p"), 422,
         "corporate-donation-to-head-office"),
        ("corporate without a plan",
         donation(TANABE, 500_000, kind="corporate", donor=company(), revitalisation_plan_id=None), 422,
         "corporate-plan-required"),
        ("corporate to 東京都", donation(TOKYO, 500_000, kind="corporate", donor=company(SHIRAHAMA)), 422,
         "corporate-recipient-excluded"),
        ("corporate to a metropolitan non-recipient of allocation tax",
         donation(MUSASHINO, 500_000, kind="corporate", donor=company(SHIRAHAMA)), 422,
         "corporate-recipient-excluded"),
        ("corporate to another town's plan",
         donation(TANABE, 500_000, kind="corporate", donor=company(), revitalisation_plan_id=f"sample-{SUSAMI}"), 422,
         "unknown-revitalisation-plan"),
        ("corporate to a plan not certified in the payment's fiscal year",
         donation(WAKAYAMA_PREFECTURE, 500_000, kind="corporate", donor=company(),
                  revitalisation_plan_id="300004-machi-hito-shigoto", payment_date="2025-03-31"), 422,
         "revitalisation-plan-not-certified"),
        ("a plan named by a hometown-tax donation", donation(revitalisation_plan_id=f"sample-{SHIRAHAMA}"), 422,
         "revitalisation-plan-not-applicable"),
        ("one-stop requested of a municipality not designated", donation(TOKYO, one_stop_requested=True), 422,
         "municipality-not-designated"),
        ("corporate from an individual", donation(TANABE, 500_000, kind="corporate", project="p"), 422,
         "donor-kind-mismatch"),
        ("hometown tax from a company", donation(TANABE, donor=company()), 422, "donor-kind-mismatch"),
        ("unknown municipality", donation("999999"), 422, "unknown-municipality"),
        ("malformed municipality", donation("30401"), 422, "unknown-municipality"),
        ("designated ward", donation(SAPPORO_CHUO), 422, "not-a-donation-recipient"),
        ("unknown head office", donation(TANABE, 500_000, kind="corporate", donor=company("999999"), project="p"),
         422, "unknown-municipality"),
        ("impossible date", {**base, "payment_date": "2026-02-30"}, 422, "invalid-request"),
        ("slashed date", {**base, "payment_date": "2026/01/10"}, 422, "invalid-request"),
        ("date-time", {**base, "payment_date": "2026-01-10T00:00:00"}, 422, "invalid-request"),
        ("numeric date", {**base, "payment_date": 1767225600}, 422, "invalid-request"),
        ("future payment date", {**base, "payment_date": tomorrow}, 422, "payment-date-in-future"),
        ("no donor", {**base, "donor": None}, 422, "donor-required"),
        ("donor and donor id", {**base, "donor_id": str(uuid.uuid4())}, 422, "donor-required"),
        ("unknown donor id", {**base, "donor": None, "donor_id": str(uuid.uuid4())}, 422, "unknown-donor"),
        ("miles to a town without a mileage program", donation(SANJO, 7_500, kind="miles"), 422, "no-mile-program"),
        ("miles earmarked general", donation(SHIRAHAMA, 7_500, kind="miles", earmark="general"), 422,
         "miles-must-fund-program"),
        ("unknown program", donation(SHIRAHAMA, program_id="no-such-program"), 422, "unknown-program"),
        ("program of another municipality", donation(SANJO, program_id="jal-dual-residence-miles"), 422,
         "unknown-program"),
        ("program with general earmark",
         donation(SHIRAHAMA, program_id="jal-dual-residence-miles", earmark="general"), 422,
         "program-requires-dual-residence-earmark"),
        ("one-stop on a corporate donation",
         donation(TANABE, 500_000, kind="corporate", donor=company(), project="p", one_stop_requested=True), 422,
         "one-stop-not-applicable"),
        ("My Number in the donor", donation(donor=person("山田 123456789018")), 422, "my-number-not-allowed"),
        ("My Number under its own field", {**base, "my_number": "1234 5678 9018"}, 422, "my-number-not-allowed"),
        ("full-width My Number", donation(donor=person(address="１２３４５６７８９０１８")), 422,
         "my-number-not-allowed"),
        ("unknown field", {**base, "coupon": "x"}, 422, "invalid-request"),
        ("unknown kind", {**base, "kind": "gift"}, 422, "invalid-request"),
    ]


async def test_bad_input_is_refused_and_nothing_is_written(service: Service) -> None:
    before = await counts(service.pool)
    for label, body, status, code in _bad_inputs():
        response = await service.client.post("/v1/donations", json=body, headers=service.admin)
        assert response.status_code == status, (label, response.text)
        assert response.headers["content-type"].startswith("application/problem+json"), label
        assert response.json()["code"] == code, (label, response.json())
    as_staff = await service.client.post("/v1/donations", json=donation(), headers=service.staff(SHIRAHAMA))
    problem(as_staff, 403, "forbidden")
    problem(await service.client.post("/v1/donations", json=donation()), 401, "unauthenticated")
    malformed = await service.client.post(
        "/v1/donations", content=b"{not json", headers={**service.admin, "content-type": "application/json"}
    )
    problem(malformed, 400, "malformed-json")
    assert await counts(service.pool) == before


# ---------------------------------------------------------------------------- refunds and funds


async def test_a_refund_reverses_the_ledger_cancels_the_receipt_and_is_announced(service: Service) -> None:
    municipality = HIGASHIKAWA
    kept = await service.confirm(donation(municipality, 50_000, payment_date="2026-01-05"))
    refunded = await service.confirm(
        donation(municipality, 80_000, earmark="dual_residence", payment_date="2026-01-06")
    )
    funds = (await service.client.get(f"/v1/municipalities/{municipality}/funds", headers=service.staff(municipality)))
    assert {(f["earmark"], f["balance"], f["transferred"]) for f in funds.json()["funds"]} == {
        ("general", 50_000, 0), ("dual_residence", 0, 80_000),
    }

    response = await service.client.post(
        f"/v1/donations/{refunded['id']}/refund", json={"reason": "card payment reversed"},
        headers={**service.admin, "Idempotency-Key": "refund-1"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "refunded"
    replay = await service.client.post(
        f"/v1/donations/{refunded['id']}/refund", json={"reason": "card payment reversed"},
        headers={**service.admin, "Idempotency-Key": "refund-1"},
    )
    assert replay.status_code == 200 and replay.json() == response.json()
    twice = await service.client.post(
        f"/v1/donations/{refunded['id']}/refund", json={"reason": "again"}, headers=service.admin
    )
    problem(twice, 409, "already-refunded")

    ledger = await service.pool.fetch(
        "SELECT entry, amount FROM fund_ledger WHERE donation_id = $1 ORDER BY id", uuid.UUID(refunded["id"])
    )
    assert [(r["entry"], r["amount"]) for r in ledger] == [
        ("donation", 80_000), ("transfer", -80_000), ("refund", -80_000), ("transfer_reversal", 80_000),
    ]
    funds = (await service.client.get(f"/v1/municipalities/{municipality}/funds", headers=service.admin)).json()
    by_earmark = {f["earmark"]: f for f in funds["funds"]}
    assert by_earmark["dual_residence"] == {
        "earmark": "dual_residence", "unit": "jpy", "donated": 80_000, "refunded": 80_000, "transferred": 0,
        "balance": 0,
    }
    assert by_earmark["general"]["balance"] == 50_000
    # The balance is the ledger's sum, nothing else.
    assert await service.pool.fetchval(
        "SELECT sum(amount) FROM fund_ledger WHERE municipality_code = $1", municipality
    ) == 50_000

    receipt = await service.client.get(f"/v1/receipts/{refunded['receipt_number']}", headers=service.admin)
    assert receipt.json()["status"] == "cancelled" and receipt.json()["cancelled_at"]
    problem(await service.client.get(f"/v1/receipts/{refunded['receipt_number']}.pdf", headers=service.admin),
            409, "receipt-cancelled")
    later = await service.confirm(donation(municipality, 1_000, payment_date="2026-01-07"))
    assert [kept["receipt_number"], refunded["receipt_number"], later["receipt_number"]] == [
        f"{municipality}-2026-{n:06d}" for n in (1, 2, 3)
    ]  # the cancelled number is never reused

    events = await events_about(service.settings, refunded["id"], expected=1, model=DonationRefunded)
    data = events[0].decode(DonationRefunded)
    assert events[0].key == municipality.encode() and events[0].subject == refunded["id"]
    assert (data.amount, data.earmark, data.unit, data.receipt_number) == (
        80_000, "dual_residence", "jpy", refunded["receipt_number"],
    )
    assert await outbox_count(service.pool, DonationRefunded, refunded["id"]) == 1
    problem(
        await service.client.post(f"/v1/donations/{uuid.uuid4()}/refund", json={"reason": "x"}, headers=service.admin),
        404, "donation-not-found",
    )


# ---------------------------------------------------------------------------- receipts


async def test_the_receipt_prints_as_a_japanese_pdf_and_is_reissued_under_its_number(service: Service) -> None:
    resident_id = f"res-{uuid.uuid4().hex[:8]}"
    created = await service.confirm(
        donation(SHIRAHAMA, 1_234_567, payment_date="2026-10-01",
                 donor=person("白浜 一郎", resident_id=resident_id, address="和歌山県西牟婁郡白浜町1番地"))
    )
    number = created["receipt_number"]

    pdf = await service.client.get(f"/v1/receipts/{number}.pdf", headers=service.resident(resident_id))
    assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
    text = PdfReader(io.BytesIO(pdf.content)).pages[0].extract_text()
    for shown in ("寄附金受領証明書", "¥1,234,567", "白浜 一郎", "和歌山県西牟婁郡白浜町1番地", "和歌山県白浜町",
                  "2026年10月1日", number, "白浜町長"):
        assert shown in text, (shown, text)
    assert "再発行（" not in text

    reissued = await service.client.post(f"/v1/receipts/{number}/reissue", headers=service.staff(SHIRAHAMA))
    assert reissued.status_code == 200
    assert reissued.json()["number"] == number and reissued.json()["reissue_count"] == 1
    again = await service.client.post(f"/v1/receipts/{number}/reissue", headers=service.resident(resident_id))
    assert again.json()["reissue_count"] == 2
    reprinted = await service.client.get(f"/v1/receipts/{number}.pdf", headers=service.admin)
    assert "再発行（2回目）" in PdfReader(io.BytesIO(reprinted.content)).pages[0].extract_text()
    assert await service.pool.fetchval(
        "SELECT count(*) FROM receipts WHERE donation_id = $1", uuid.UUID(created["id"])
    ) == 1

    stranger = service.resident("someone-else")
    problem(await service.client.get(f"/v1/receipts/{number}", headers=stranger), 403, "forbidden")
    problem(await service.client.get(f"/v1/receipts/{number}.pdf", headers=service.staff(TANABE)), 403, "forbidden")
    problem(await service.client.get(f"/v1/receipts/{SHIRAHAMA}-1999-000001", headers=service.admin), 404,
            "receipt-not-found")
    problem(await service.client.get("/v1/receipts/nonsense", headers=service.admin), 404, "receipt-not-found")


# ---------------------------------------------------------------------------- staff views


async def test_staff_list_and_export_their_municipalitys_donations(service: Service) -> None:
    municipality = SUSAKI
    bodies = [donation(municipality, 10_000 + i, payment_date="2025-12-31") for i in range(3)]
    bodies.append(donation(municipality, 5_000, payment_date="2026-01-01", donor=person("=HYPERLINK(1)")))
    created = [await service.confirm(body) for body in bodies]
    staff = service.staff(municipality)

    page = await service.client.get(
        f"/v1/municipalities/{municipality}/donations", params={"year": 2025, "limit": 2}, headers=staff
    )
    assert page.status_code == 200
    assert page.json()["total"] == 3 and [d["id"] for d in page.json()["items"]] == [c["id"] for c in created[:2]]
    rest = await service.client.get(
        f"/v1/municipalities/{municipality}/donations", params={"year": 2025, "limit": 2, "offset": 2}, headers=staff
    )
    assert [d["id"] for d in rest.json()["items"]] == [created[2]["id"]]
    everything = await service.client.get(f"/v1/municipalities/{municipality}/donations", headers=staff)
    assert everything.json()["total"] == 4

    export = await service.client.get(
        f"/v1/municipalities/{municipality}/donations.csv", params={"year": 2026}, headers=staff
    )
    assert export.status_code == 200
    assert export.headers["content-type"] == "text/csv; charset=utf-8"
    assert export.headers["content-disposition"].startswith(f'attachment; filename="donations-{municipality}-2026.csv"')
    assert export.content.startswith("\ufeff".encode())
    rows = list(csv.DictReader(io.StringIO(export.content.decode("utf-8-sig"))))
    assert len(rows) == 1
    assert rows[0]["receipt_number"] == f"{municipality}-2026-000001" and rows[0]["amount"] == "5000"
    assert rows[0]["donor_name"] == "'=HYPERLINK(1)"  # never a live spreadsheet formula

    problem(await service.client.get(f"/v1/municipalities/{municipality}/donations", headers=service.staff(TANABE)),
            403, "forbidden")
    problem(await service.client.get(f"/v1/municipalities/{municipality}/donations.csv?year=2026",
                                     headers=service.staff(TANABE)), 403, "forbidden")
    problem(await service.client.get(f"/v1/municipalities/{municipality}/funds", headers=service.resident("r")),
            403, "forbidden")
    problem(await service.client.get("/v1/municipalities/999999/funds", headers=service.admin), 404,
            "municipality-not-found")
    problem(await service.client.get(f"/v1/municipalities/{municipality}/donations.csv", headers=staff), 422,
            "invalid-request")
    ledger = await service.client.get(f"/v1/municipalities/{municipality}/funds/ledger", headers=staff)
    assert ledger.json()["total"] == 4 and {e["entry"] for e in ledger.json()["items"]} == {"donation"}


# ---------------------------------------------------------------------------- one-stop exception


async def _five_municipalities_then_a_sixth(
    service: Service, donor: dict[str, Any], *, requested: bool, year: int = 2025
) -> list[dict[str, Any]]:
    towns = [SHIRAHAMA, TANABE, SUSAMI, KAMISHIHORO, MITOYO]
    made = [
        await service.confirm(
            donation(code, 10_000, payment_date=f"{year}-06-0{i + 1}", donor=donor, one_stop_requested=requested)
        )
        for i, code in enumerate(towns)
    ]
    # A second donation to a municipality already counted does not count again.
    made.append(await service.confirm(donation(SHIRAHAMA, 3_000, payment_date=f"{year}-07-01", donor=donor)))
    summary = await service.client.get(
        f"/v1/donors/{made[0]['donor_id']}/summary", params={"year": year}, headers=service.admin
    )
    assert summary.json()["one_stop"]["municipality_count"] == 5
    assert summary.json()["one_stop"]["status"] == ("valid" if requested else "not_requested")
    return made


async def test_the_sixth_municipality_voids_the_years_one_stop_applications_once(service: Service) -> None:
    resident_id = f"res-{uuid.uuid4().hex[:8]}"
    donor = person("関 六子", resident_id=resident_id)
    made = await _five_municipalities_then_a_sixth(service, donor, requested=True)
    donor_id = made[0]["donor_id"]
    for given in made[:2]:
        applied = await service.client.post(
            f"/v1/donations/{given['id']}/one-stop", json={"received_on": "2025-12-20", "verified": True},
            headers=service.staff(given["municipality_code"]),
        )
        assert applied.status_code == 201, applied.text
        assert applied.json()["status"] == "valid" and applied.json()["verified"] is True

    sixth = await service.confirm(donation(IKI, 10_000, payment_date="2025-08-01", donor=donor))
    statuses = await service.pool.fetch(
        "SELECT status, voided_at FROM one_stop_applications WHERE donor_id = $1", uuid.UUID(donor_id)
    )
    assert [r["status"] for r in statuses] == ["void", "void"] and all(r["voided_at"] for r in statuses)
    # A seventh municipality, and an application received after the year was voided.
    await service.confirm(donation(SANJO, 10_000, payment_date="2025-09-01", donor=donor))
    late_comer = await service.client.post(
        f"/v1/donations/{sixth['id']}/one-stop", json={"received_on": "2025-12-21"}, headers=service.staff(IKI)
    )
    assert late_comer.status_code == 201 and late_comer.json()["status"] == "void"

    events = await events_about(service.settings, donor_id, expected=1, model=OneStopExceptionVoided)
    voided = events[0].decode(OneStopExceptionVoided)
    assert voided.resident_id == resident_id and voided.calendar_year == 2025
    assert voided.municipality_codes == [SHIRAHAMA, TANABE, SUSAMI, KAMISHIHORO, MITOYO, IKI]
    assert events[0].subject == donor_id and events[0].key == IKI.encode()
    assert await outbox_count(service.pool, OneStopExceptionVoided, donor_id) == 1  # told once

    summary = await service.client.get(
        f"/v1/donors/{donor_id}/summary", params={"year": 2025}, headers=service.resident(resident_id)
    )
    assert summary.status_code == 200
    one_stop = summary.json()["one_stop"]
    assert one_stop["status"] == "void" and one_stop["municipality_count"] == 7 and one_stop["voided_at"]
    assert [a["status"] for a in one_stop["applications"]] == ["void", "void", "void"]
    assert len(summary.json()["donations"]) == 8 and summary.json()["total_jpy"] == 73_000
    # Another year of the same donor is untouched.
    other_year = await service.client.get(
        f"/v1/donors/{donor_id}/summary", params={"year": 2026}, headers=service.resident(resident_id)
    )
    assert other_year.json()["one_stop"]["status"] == "not_requested"
    problem(await service.client.get(f"/v1/donors/{donor_id}/summary", headers=service.resident("x")), 403, "forbidden")
    problem(await service.client.get(f"/v1/donors/{donor_id}/summary", headers=service.staff(IKI)), 403, "forbidden")


async def test_a_donor_who_never_asked_is_told_when_they_first_apply_in_a_void_year(service: Service) -> None:
    donor = person("静 かおる", resident_id=f"res-{uuid.uuid4().hex[:8]}")
    made = await _five_municipalities_then_a_sixth(service, donor, requested=False, year=2024)
    donor_id = made[0]["donor_id"]
    await service.confirm(donation(IKI, 10_000, payment_date="2024-08-01", donor=donor))
    assert await service.pool.fetchval(
        "SELECT voided_at IS NOT NULL FROM donor_years WHERE donor_id = $1 AND calendar_year = 2024",
        uuid.UUID(donor_id),
    )
    assert await outbox_count(service.pool, OneStopExceptionVoided, donor_id) == 0

    applied = await service.client.post(
        f"/v1/donations/{made[0]['id']}/one-stop", json={"received_on": "2024-12-01"}, headers=service.admin
    )
    assert applied.json()["status"] == "void"
    second = await service.client.post(
        f"/v1/donations/{made[1]['id']}/one-stop", json={"received_on": "2024-12-01"}, headers=service.admin
    )
    assert second.json()["status"] == "void"
    assert await outbox_count(service.pool, OneStopExceptionVoided, donor_id) == 1
    events = await events_about(service.settings, donor_id, expected=1, model=OneStopExceptionVoided)
    assert len(events[0].decode(OneStopExceptionVoided).municipality_codes) == 6


async def test_one_stop_applications_are_dated_checked_and_never_take_a_my_number(service: Service) -> None:
    donor = person("期限 守")
    december = await service.confirm(donation(SUSAMI, 10_000, payment_date="2025-12-20", donor=donor))
    another = await service.confirm(donation(TANABE, 10_000, payment_date="2025-12-21", donor=donor))
    staff = service.staff(SUSAMI)
    on_time = await service.client.post(
        f"/v1/donations/{december['id']}/one-stop", json={"received_on": "2026-01-10"}, headers=staff
    )
    assert on_time.status_code == 201 and on_time.json()["status"] == "valid" and on_time.json()["verified"] is False
    late = await service.client.post(
        f"/v1/donations/{another['id']}/one-stop", json={"received_on": "2026-01-11"},
        headers={**service.staff(TANABE), "Idempotency-Key": "late-1"},
    )
    assert late.status_code == 201 and late.json()["status"] == "late"
    replay = await service.client.post(
        f"/v1/donations/{another['id']}/one-stop", json={"received_on": "2026-01-11"},
        headers={**service.staff(TANABE), "Idempotency-Key": "late-1"},
    )
    assert replay.status_code == 201 and replay.json() == late.json()
    verified = await service.client.post(f"/v1/donations/{december['id']}/one-stop/verify", headers=staff)
    assert verified.json()["verified"] is True and verified.json()["verified_at"]
    assert await service.pool.fetchval(
        "SELECT one_stop_requested FROM donations WHERE id = $1", uuid.UUID(december["id"])
    )

    before = await counts(service.pool)
    url = f"/v1/donations/{december['id']}/one-stop"
    problem(await service.client.post(url, json={"received_on": "2026-01-09"}, headers=staff), 409,
            "one-stop-application-exists")
    problem(await service.client.post(url, json={"received_on": "2026-01-09"}, headers=service.staff(TANABE)), 403,
            "forbidden")
    assert await counts(service.pool) == before

    fresh = await service.confirm(donation(SUSAMI, 10_000, payment_date="2025-12-22", donor=donor))
    corporate = await service.confirm(
        donation(SUSAMI, 200_000, kind="corporate", donor=company(), project="p", payment_date="2025-12-01")
    )
    before = await counts(service.pool)
    fresh_url = f"/v1/donations/{fresh['id']}/one-stop"
    tomorrow = (date.today() + timedelta(days=2)).isoformat()
    refused = [
        (fresh_url, {"received_on": tomorrow}, staff, 422, "received-date-in-future"),
        (fresh_url, {"received_on": "2025-12-01"}, staff, 422, "received-before-payment"),
        (fresh_url, {"received_on": "2026-01-05", "my_number": "123456789018"}, staff, 422, "my-number-not-allowed"),
        (fresh_url, {"received_on": "10/01/2026"}, staff, 422, "invalid-request"),
        (fresh_url, {"received_on": "2026-01-05"}, service.resident("r"), 403, "forbidden"),
        (f"/v1/donations/{corporate['id']}/one-stop", {"received_on": "2026-01-05"}, staff, 422,
         "one-stop-not-applicable"),
        (f"/v1/donations/{uuid.uuid4()}/one-stop", {"received_on": "2026-01-05"}, staff, 404, "donation-not-found"),
    ]
    for url, body, headers, status, code in refused:
        problem(await service.client.post(url, json=body, headers=headers), status, code)
    assert await counts(service.pool) == before


async def test_receipt_numbers_widen_past_a_million_instead_of_wrapping(service: Service) -> None:
    # 泉佐野市-sized years pass 999,999 receipts; the number must grow a digit, never be truncated.
    await service.pool.execute(
        "INSERT INTO receipt_counters (municipality_code, calendar_year, last_number) VALUES ($1, 2021, 999999)",
        WAKAYAMA_PREFECTURE,
    )
    created = await service.confirm(donation(WAKAYAMA_PREFECTURE, 10_000, payment_date="2021-12-31"))
    assert created["receipt_number"] == f"{WAKAYAMA_PREFECTURE}-2021-1000000"
    fetched = await service.client.get(f"/v1/receipts/{created['receipt_number']}", headers=service.admin)
    assert fetched.status_code == 200 and fetched.json()["municipality_name"] == "和歌山県"
