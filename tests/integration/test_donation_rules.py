"""Issue #19, rules 2 and 3, through HTTP: ふるさと納税 designation and 企業版ふるさと納税 plans.

Before the fix a hometown-tax donation to 東京都 (never designated) got a ふるさと納税 receipt, counted
towards the donor's five one-stop municipalities and took a one-stop application; a corporate
donation funded any free-text project of any local government.
"""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import AsyncIterator

import pytest
from pypdf import PdfReader

from services.donation.main import create_app
from shared.contracts.donation import DonationReceived
from shared.kit.settings import Settings
from shared.reference import find_municipality_by_full_name
from tests.integration.test_donation import (
    MINATO,
    SHIRAHAMA,
    Service,
    company,
    counts,
    donation,
    events_about,
    person,
    problem,
)
from tests.support import service_client

# Only this module donates to these (receipt counters and donor-years stay its own).
TOKYO = find_municipality_by_full_name("東京都").code
MIYAKI = find_municipality_by_full_name("佐賀県みやき町").code
WAKAYAMA = find_municipality_by_full_name("和歌山県").code
MUSASHINO = find_municipality_by_full_name("東京都武蔵野市").code
DESIGNATED = [
    find_municipality_by_full_name(name).code
    for name in ("青森県弘前市", "岩手県遠野市", "秋田県男鹿市", "山形県酒田市", "福島県会津若松市")
]
WAKAYAMA_PLAN = "300004-machi-hito-shigoto"


@pytest.fixture(scope="module")
async def service(settings: Settings) -> AsyncIterator[Service]:
    app = create_app(settings)
    async with service_client(app) as client:
        yield Service(app, client, app.state.runtime.pool, settings)


def pdf_text(content: bytes) -> str:
    return "".join(page.extract_text() for page in PdfReader(io.BytesIO(content)).pages)


async def test_a_hometown_tax_payment_to_tokyo_is_an_ordinary_donation_never_a_one_stop_one(
    service: Service,
) -> None:
    donor = person("東京 花子")
    paid = await service.confirm(donation(TOKYO, 30_000, payment_date="2025-11-01", donor=donor))
    # The money is recorded and receipted (a gift to a local government), but not as ふるさと納税.
    assert paid["special_deduction"] is False and paid["receipt_number"].startswith(f"{TOKYO}-2025-")
    receipt = await service.client.get(f"/v1/receipts/{paid['receipt_number']}", headers=service.admin)
    assert receipt.status_code == 200 and receipt.json()["special_deduction"] is False
    pdf = await service.client.get(f"/v1/receipts/{paid['receipt_number']}.pdf", headers=service.admin)
    text = pdf_text(pdf.content).replace("\n", "")
    assert "ふるさと納税の対象外" in text and "特例控除" in text and "ワンストップ特例" in text
    received = (await events_about(service.settings, paid["id"], expected=1, model=DonationReceived))[0]
    assert received.decode(DonationReceived).special_deduction is False
    # Not one of the donor's one-stop municipalities.
    donor_id = uuid.UUID(paid["donor_id"])
    assert await service.pool.fetchval(
        "SELECT count(*) FROM donor_year_municipalities WHERE donor_id = $1", donor_id
    ) == 0

    # No one-stop application is taken for it (the old behaviour answered 201), and nothing is written.
    before = await counts(service.pool)
    staff = service.staff(TOKYO)
    response = await service.client.post(
        f"/v1/donations/{paid['id']}/one-stop", json={"received_on": "2026-01-05"}, headers=staff
    )
    problem(response, 422, "municipality-not-designated")
    assert response.json()["not_designated_from"] == "2019-06-01"
    # Nor a one-stop request with the payment.
    problem(
        await service.client.post(
            "/v1/donations", json=donation(TOKYO, payment_date="2025-11-02", one_stop_requested=True),
            headers=service.admin,
        ),
        422, "municipality-not-designated",
    )
    assert await counts(service.pool) == before


async def test_a_sixth_municipality_that_is_not_designated_does_not_void_the_one_stop_exception(
    service: Service,
) -> None:
    donor = person("一 寄附者")
    first = await service.confirm(
        donation(DESIGNATED[0], payment_date="2025-10-01", donor=donor, one_stop_requested=True)
    )
    for code in DESIGNATED[1:]:
        await service.confirm(donation(code, payment_date="2025-10-02", donor=donor, one_stop_requested=True))
    tokyo = await service.confirm(donation(TOKYO, payment_date="2025-10-03", donor=donor))
    assert tokyo["special_deduction"] is False
    summary = await service.client.get(
        f"/v1/donors/{first['donor_id']}/summary", params={"year": 2025}, headers=service.admin
    )
    one_stop = summary.json()["one_stop"]
    assert (one_stop["status"], one_stop["municipality_count"]) == ("valid", 5)
    assert TOKYO not in one_stop["municipalities"]


@pytest.mark.parametrize(
    ("payment_date", "designated"),
    [("2020-01-10", False), ("2021-01-10", True), ("2025-10-01", False)],
)
async def test_a_municipality_excluded_for_periods(service: Service, payment_date: str, designated: bool) -> None:
    # みやき町: not designated 2019-06-01 – 2020-07-02, designated again, revoked from 2025-09-30.
    paid = await service.confirm(donation(MIYAKI, payment_date=payment_date))
    assert paid["special_deduction"] is designated
    application = await service.client.post(
        f"/v1/donations/{paid['id']}/one-stop", json={"received_on": payment_date}, headers=service.staff(MIYAKI)
    )
    if designated:
        assert application.status_code == 201, application.text
    else:
        problem(application, 422, "municipality-not-designated")


async def test_a_designated_municipality_receipt_serves_the_special_deduction(service: Service) -> None:
    paid = await service.confirm(donation(DESIGNATED[0], payment_date="2025-12-01", one_stop_requested=True))
    assert paid["special_deduction"] is True
    pdf = await service.client.get(f"/v1/receipts/{paid['receipt_number']}.pdf", headers=service.admin)
    text = pdf_text(pdf.content)
    assert "ふるさと納税" in text and "対象外" not in text
    export = await service.client.get(
        f"/v1/municipalities/{DESIGNATED[0]}/donations.csv", params={"year": 2025}, headers=service.admin
    )
    rows = list(csv.DictReader(io.StringIO(export.content.decode("utf-8-sig"))))
    assert {row["special_deduction"] for row in rows if row["donation_id"] == paid["id"]} == {"true"}


async def test_a_corporate_donation_funds_a_plan_certified_for_the_fiscal_year(service: Service) -> None:
    before = await counts(service.pool)
    refused = [
        # (from a company outside Tokyo: its head office would be refused first)
        (donation(TOKYO, 1_000_000, kind="corporate", donor=company(SHIRAHAMA)), "corporate-recipient-excluded"),
        (donation(MUSASHINO, 1_000_000, kind="corporate", donor=company(SHIRAHAMA)), "corporate-recipient-excluded"),
        # Certified on 2025-03-31 for FY2025 on: a payment in FY2024 is refused.
        (donation(WAKAYAMA, 1_000_000, kind="corporate", donor=company(), payment_date="2025-03-31",
                  revitalisation_plan_id=WAKAYAMA_PLAN), "revitalisation-plan-not-certified"),
        (donation(WAKAYAMA, 1_000_000, kind="corporate", donor=company(), revitalisation_plan_id=None),
         "corporate-plan-required"),
    ]
    for body, code in refused:
        problem(await service.client.post("/v1/donations", json=body, headers=service.admin), 422, code)
    assert await counts(service.pool) == before

    paid = await service.confirm(
        donation(WAKAYAMA, 1_000_000, kind="corporate", donor=company(MINATO), payment_date="2025-04-01",
                 project="関係人口の創出", revitalisation_plan_id=WAKAYAMA_PLAN)
    )
    assert (paid["revitalisation_plan_id"], paid["special_deduction"]) == (WAKAYAMA_PLAN, False)
    events = await events_about(service.settings, paid["id"], expected=1)
    assert [e.type for e in events] == [DonationReceived.event_type]
    received = events[0].decode(DonationReceived)
    assert (received.revitalisation_plan_id, received.receipt_number) == (WAKAYAMA_PLAN, paid["receipt_number"])
    pdf = await service.client.get(f"/v1/receipts/{paid['receipt_number']}.pdf", headers=service.admin)
    text = pdf_text(pdf.content)
    assert "和歌山県まち・ひと・しごと創生推進計画" in text and "関係人口の創出" in text


async def test_refunding_a_donation_without_the_special_deduction_leaves_the_one_stop_count_alone(
    service: Service,
) -> None:
    # The same donor gives to みやき町 the day before its revocation (counted) and the day it begins
    # (not counted); refunding the second must not take みやき町 off the donor's year.
    donor = person("二 寄附者")
    counted = await service.confirm(donation(MIYAKI, payment_date="2025-09-29", donor=donor))
    ordinary = await service.confirm(donation(MIYAKI, payment_date="2025-09-30", donor=donor))
    assert (counted["special_deduction"], ordinary["special_deduction"]) == (True, False)
    refund = await service.client.post(
        f"/v1/donations/{ordinary['id']}/refund", json={"reason": "取消"}, headers=service.admin
    )
    assert refund.status_code == 200, refund.text
    assert await service.pool.fetchval(
        "SELECT donations FROM donor_year_municipalities WHERE donor_id = $1 AND calendar_year = 2025",
        uuid.UUID(counted["donor_id"]),
    ) == 1
