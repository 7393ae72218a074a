"""The donation rules, without a database."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import uuid
from datetime import UTC, date, datetime
from typing import Any

import pytest
from pydantic import ValidationError
from pypdf import PdfReader

from services.donation import domain
from services.donation.domain import (
    CompanyDetails,
    Donation,
    DonorFacts,
    DonorYear,
    DonorYearState,
    LedgerEntry,
    PaymentConfirmation,
    PersonDetails,
    Receipt,
)
from services.donation.handlers import ensure_donation_access, ensure_donor_access
from services.donation.receipt_pdf import ReceiptDocument, render_receipt
from services.donation.schemas import DonationConfirmation
from services.donation.store import Sql
from shared.contracts.formats import ProgramId
from shared.kit.auth import Principal, Role
from shared.kit.clock import japan_date
from shared.kit.errors import DomainError, Forbidden
from shared.reference import find_municipality_by_full_name

SHIRAHAMA = "304018"
TANABE = find_municipality_by_full_name("和歌山県田辺市").code
SANJO = find_municipality_by_full_name("新潟県三条市").code
MINATO = find_municipality_by_full_name("東京都港区").code
SAPPORO_CHUO = find_municipality_by_full_name("北海道札幌市中央区").code
SAPPORO = find_municipality_by_full_name("北海道札幌市").code
HOKKAIDO = find_municipality_by_full_name("北海道").code
TOKYO = find_municipality_by_full_name("東京都").code
MIYAKI = find_municipality_by_full_name("佐賀県みやき町").code
MUSASHINO = find_municipality_by_full_name("東京都武蔵野市").code
KODAIRA = find_municipality_by_full_name("東京都小平市").code
HAKONE = find_municipality_by_full_name("神奈川県箱根町").code
WAKAYAMA = find_municipality_by_full_name("和歌山県").code
SHIRAHAMA_PLAN = f"sample-{SHIRAHAMA}"
TANABE_PLAN = f"sample-{TANABE}"
WAKAYAMA_PLAN = "300004-machi-hito-shigoto"
TODAY = date(2026, 11, 26)
PERSON = DonorFacts("individual")


def request(**overrides: Any) -> DonationConfirmation:
    values: dict[str, Any] = {
        "payment_reference": "pay-1", "municipality_code": SHIRAHAMA, "kind": "hometown_tax", "amount": 10_000,
        "payment_date": "2026-11-20",
        "donor": {"type": "individual", "name": "山田 太郎", "address": "東京都千代田区1-1"},
    }
    values.update(overrides)
    return DonationConfirmation.model_validate(values)


def confirmation(**overrides: Any) -> PaymentConfirmation:
    """The domain's command, as the API layer makes it from a request body."""
    return request(**overrides).to_domain()


def refused(error: type[DomainError], confirmation: PaymentConfirmation, donor: DonorFacts = PERSON) -> None:
    with pytest.raises(error):
        domain.plan_donation(confirmation, donor, TODAY)


def test_a_hometown_tax_donation_gets_a_receipt_and_counts_for_one_stop() -> None:
    plan = domain.plan_donation(confirmation(payment_date="2025-12-31"), PERSON, TODAY)
    assert (plan.unit, plan.earmark, plan.calendar_year) == ("jpy", "general", 2025)
    assert plan.issues_receipt and plan.counts_for_one_stop
    assert plan.ledger == (LedgerEntry("donation", 10_000),)


def test_dual_residence_money_and_miles_are_transferred_to_the_program() -> None:
    earmarked = domain.plan_donation(confirmation(earmark="dual_residence"), PERSON, TODAY)
    assert earmarked.ledger == (LedgerEntry("donation", 10_000), LedgerEntry("transfer", -10_000))
    miles = domain.plan_donation(confirmation(kind="miles", amount=7_500), PERSON, TODAY)
    assert (miles.unit, miles.earmark, miles.issues_receipt, miles.counts_for_one_stop) == (
        "miles", "dual_residence", False, False,
    )
    named = domain.plan_donation(confirmation(program_id="jal-dual-residence-miles"), PERSON, TODAY)
    assert named.earmark == "dual_residence"
    # The subsidy service's own id of the program's budget in this municipality is accepted too.
    ours = ProgramId.format("jal-dual-residence-miles", SHIRAHAMA)
    domain.plan_donation(confirmation(program_id=ours), PERSON, TODAY)
    refused(domain.UnknownProgram, confirmation(program_id=ProgramId.format("jal-dual-residence-miles", TANABE)))
    # Not of the subsidy service's form: refused as unknown, never split on a guess.
    for malformed in ("jal-dual-residence-miles@", f"jal-dual-residence-miles@{SHIRAHAMA}@{SHIRAHAMA}",
                      f"JAL-DUAL-RESIDENCE-MILES@{SHIRAHAMA}", f"@{SHIRAHAMA}"):
        refused(domain.UnknownProgram, confirmation(program_id=malformed))


def test_the_payment_date_may_be_today_in_japan_but_not_later() -> None:
    # 2026-11-26 15:30 UTC is already 27 November in Japan.
    japan_today = japan_date(datetime(2026, 11, 26, 15, 30, tzinfo=UTC))
    assert japan_today == date(2026, 11, 27)
    domain.plan_donation(confirmation(payment_date="2026-11-27"), PERSON, japan_today)
    refused(domain.PaymentDateInFuture, confirmation(payment_date="2026-11-27"))


def test_amounts_are_positive() -> None:
    refused(domain.NonPositiveAmount, confirmation(amount=0))
    refused(domain.NonPositiveAmount, confirmation(amount=-1))


def test_corporate_rules() -> None:
    company = DonorFacts("company", MINATO)
    ok = domain.plan_donation(
        confirmation(kind="corporate", amount=100_000, project="観光振興", revitalisation_plan_id=SHIRAHAMA_PLAN),
        company, TODAY,
    )
    assert ok.issues_receipt and not ok.counts_for_one_stop and not ok.special_deduction
    assert ok.revitalisation_plan is not None and ok.revitalisation_plan.municipality_code == SHIRAHAMA
    refused(domain.CorporateDonationBelowMinimum,
            confirmation(kind="corporate", amount=99_999, revitalisation_plan_id=SHIRAHAMA_PLAN), company)
    # The project is free text now; the plan is what the rules check.
    refused(domain.CorporatePlanRequired, confirmation(kind="corporate", amount=100_000, project="p"), company)
    refused(domain.DonorKindMismatch, confirmation(kind="corporate", amount=100_000, project="p"), PERSON)
    refused(domain.DonorKindMismatch, confirmation(), company)
    at_home = DonorFacts("company", SHIRAHAMA)
    refused(domain.CorporateDonationToHeadOffice,
            confirmation(kind="corporate", amount=100_000, project="p"), at_home)
    refused(domain.CorporateDonationToHeadOffice,
            confirmation(kind="corporate", amount=100_000, project="p", municipality_code="300004"), at_home)
    in_ward = DonorFacts("company", SAPPORO_CHUO)
    for recipient in (SAPPORO, HOKKAIDO):
        refused(domain.CorporateDonationToHeadOffice,
                confirmation(kind="corporate", amount=100_000, project="p", municipality_code=recipient), in_ward)
    # Another town of the same prefecture is fine.
    domain.plan_donation(confirmation(kind="corporate", amount=100_000, project="p", municipality_code=TANABE,
                                      revitalisation_plan_id=TANABE_PLAN), at_home, TODAY)


# ---------------------------------------------------------------------------- designation (指定制度)


def test_a_hometown_tax_donation_to_tokyo_is_an_ordinary_donation_without_one_stop() -> None:
    # The old behaviour: 東京都 got a ふるさと納税 receipt and counted for (and took) the one-stop exception.
    plan = domain.plan_donation(confirmation(municipality_code=TOKYO), PERSON, TODAY)
    assert plan.issues_receipt  # money received is receipted ...
    assert not plan.special_deduction and not plan.counts_for_one_stop  # ... but never as ふるさと納税
    with pytest.raises(domain.MunicipalityNotDesignated) as error:
        domain.plan_donation(confirmation(municipality_code=TOKYO, one_stop_requested=True), PERSON, TODAY)
    assert error.value.code == "municipality-not-designated"
    assert error.value.extra["not_designated_from"] == "2019-06-01"
    assert error.value.extra["not_designated_until"] is None
    # Before the designation system (June 2019) every local government received ふるさと納税.
    assert domain.plan_donation(confirmation(municipality_code=TOKYO, payment_date="2019-05-31"), PERSON,
                                TODAY).special_deduction


def test_a_designated_municipality_gives_the_special_deduction() -> None:
    plan = domain.plan_donation(confirmation(one_stop_requested=True), PERSON, TODAY)  # 白浜町
    assert plan.special_deduction and plan.counts_for_one_stop


@pytest.mark.parametrize(
    ("payment_date", "designated"),
    [
        ("2019-05-31", True),  # before the designation system
        ("2019-06-01", False),  # not designated in the first designation
        ("2020-07-02", False),
        ("2020-07-03", True),  # designated after the Supreme Court judgment
        ("2025-09-29", True),
        ("2025-09-30", False),  # revoked for two years
        ("2026-11-20", False),
    ],
)
def test_a_municipality_excluded_for_periods(payment_date: str, designated: bool) -> None:
    # みやき町: excluded 2019-06-01 – 2020-07-02, designated again, revoked from 2025-09-30.
    plan = domain.plan_donation(confirmation(municipality_code=MIYAKI, payment_date=payment_date), PERSON, TODAY)
    assert (plan.special_deduction, plan.counts_for_one_stop) == (designated, designated)


def test_no_one_stop_application_for_a_donation_without_the_special_deduction() -> None:
    donation = _donation(municipality_code=TOKYO, special_deduction=False)
    with pytest.raises(domain.MunicipalityNotDesignated):
        donation.check_application(date(2026, 1, 5), TODAY)
    _donation().check_application(date(2026, 1, 5), TODAY)


def test_the_receipt_of_an_ordinary_donation_never_promises_the_special_deduction() -> None:
    at = datetime(2026, 2, 1, tzinfo=UTC)
    receipt = Receipt(
        number=f"{TOKYO}-2025-000001", donation_id=uuid.uuid4(), municipality_code=TOKYO, calendar_year=2025,
        donor_id=uuid.uuid4(), donor_name="n", donor_address="a", amount_jpy=10_000, donation_date=date(2025, 12, 1),
        issued_at=at, status="issued", cancelled_at=None, reissue_count=0, last_reissued_at=None,
        donor_resident_id=None, donor_type="individual", kind="hometown_tax", project=None, special_deduction=False,
    )
    assert "ふるさと納税の対象外" in receipt.kind_label and receipt.note == domain.NOT_DESIGNATED_NOTE
    designated = dataclasses.replace(receipt, special_deduction=True)
    assert (designated.kind_label, designated.note) == ("ふるさと納税", None)


# ---------------------------------------------------------------------------- corporate (企業版)


def _corporate(code: str, plan_id: str | None, payment_date: str = "2025-12-01") -> PaymentConfirmation:
    return confirmation(kind="corporate", amount=1_000_000, municipality_code=code, payment_date=payment_date,
                        revitalisation_plan_id=plan_id)


def test_corporate_donations_never_go_to_tokyo() -> None:
    with pytest.raises(domain.CorporateRecipientExcluded) as error:
        domain.plan_donation(_corporate(TOKYO, None), DonorFacts("company", SHIRAHAMA), TODAY)
    assert error.value.extra["reason"] == "non-recipient-prefecture"


def test_corporate_donations_never_go_to_a_metropolitan_non_recipient_of_allocation_tax() -> None:
    # 武蔵野市 receives no local allocation tax (FY2023 on) and lies in the 既成市街地.
    with pytest.raises(domain.CorporateRecipientExcluded) as error:
        domain.plan_donation(_corporate(MUSASHINO, None), DonorFacts("company", SHIRAHAMA), TODAY)
    assert error.value.extra == {"municipality_code": MUSASHINO, "fiscal_year": 2025,
                                 "reason": "metropolitan-non-recipient"}
    # 小平市 became a non-recipient in FY2024: in FY2023 (March 2024) the rule did not exclude it (it
    # has no certified plan on file, so the next rule answers).
    elsewhere = DonorFacts("company", SHIRAHAMA)
    refused(domain.CorporateRecipientExcluded, _corporate(KODAIRA, None, "2024-04-01"), elsewhere)
    refused(domain.CorporatePlanRequired, _corporate(KODAIRA, None, "2024-03-31"), elsewhere)
    # A non-recipient outside the metropolitan zones (箱根町) may receive corporate donations.
    refused(domain.CorporatePlanRequired, _corporate(HAKONE, None), elsewhere)


def test_a_corporate_donation_funds_a_plan_certified_for_its_fiscal_year() -> None:
    company = DonorFacts("company", MINATO)
    # 和歌山県まち・ひと・しごと創生推進計画: certified 2025-03-31 for FY2025 on.
    ok = domain.plan_donation(_corporate(WAKAYAMA, WAKAYAMA_PLAN, "2025-04-01"), company, TODAY)
    assert ok.revitalisation_plan is not None and not ok.revitalisation_plan.sample
    with pytest.raises(domain.RevitalisationPlanNotCertified) as error:
        domain.plan_donation(_corporate(WAKAYAMA, WAKAYAMA_PLAN, "2025-03-31"), company, TODAY)  # FY2024
    assert error.value.extra == {"plan_id": WAKAYAMA_PLAN, "fiscal_year": 2024}
    # A sample plan runs FY2024–FY2028.
    refused(domain.RevitalisationPlanNotCertified, _corporate(SHIRAHAMA, SHIRAHAMA_PLAN, "2024-03-31"), company)
    with pytest.raises(domain.RevitalisationPlanNotCertified):
        domain.plan_donation(_corporate(SHIRAHAMA, SHIRAHAMA_PLAN, "2029-04-01"), company, date(2029, 4, 1))
    domain.plan_donation(_corporate(SHIRAHAMA, SHIRAHAMA_PLAN, "2029-03-31"), company, date(2029, 4, 1))
    # Another municipality's plan, or a plan that does not exist.
    refused(domain.UnknownRevitalisationPlanId, _corporate(TANABE, SHIRAHAMA_PLAN), company)
    refused(domain.UnknownRevitalisationPlanId, _corporate(SHIRAHAMA, "no-such-plan"), company)
    # Only a corporate donation names a plan.
    refused(domain.RevitalisationPlanNotApplicable, confirmation(revitalisation_plan_id=SHIRAHAMA_PLAN))


def test_fiscal_years_begin_in_april() -> None:
    assert (domain.fiscal_year(date(2026, 3, 31)), domain.fiscal_year(date(2026, 4, 1))) == (2025, 2026)


def test_recipients_are_local_governments() -> None:
    refused(domain.UnknownMunicipalityCode, confirmation(municipality_code="999999"))
    refused(domain.UnknownMunicipalityCode, confirmation(municipality_code="abc"))
    refused(domain.NotADonationRecipient, confirmation(municipality_code=SAPPORO_CHUO))
    assert domain.recipient("300004").is_prefecture
    assert domain.issuer_title(domain.recipient(SHIRAHAMA)) == "白浜町長"
    assert domain.issuer_title(domain.recipient("300004")) == "和歌山県知事"


def test_miles_and_programs() -> None:
    refused(domain.NoMileProgram, confirmation(kind="miles", municipality_code=SANJO))
    refused(domain.MilesMustFundProgram, confirmation(kind="miles", earmark="general"))
    refused(domain.UnknownProgram, confirmation(program_id="nope"))
    refused(domain.UnknownProgram, confirmation(program_id="jal-dual-residence-miles", municipality_code=SANJO))
    iki = find_municipality_by_full_name("長崎県壱岐市").code  # JAL miles and a ferry fare discount
    refused(domain.UnknownProgram, confirmation(kind="miles", municipality_code=iki, program_id="iki-island-routes"))
    domain.plan_donation(confirmation(municipality_code=iki, program_id="iki-island-routes"), PERSON, TODAY)
    refused(domain.ProgramRequiresDualResidenceEarmark,
            confirmation(program_id="jal-dual-residence-miles", earmark="general"))
    refused(domain.OneStopNotApplicable, confirmation(kind="miles", one_stop_requested=True))


def test_one_stop_void_on_the_sixth_municipality_and_the_donor_is_told_once() -> None:
    five = frozenset(f"00000{i}" for i in range(5))
    six = five | {"000009"}
    assert domain.one_stop_decision(DonorYear(five, requested=True, voided=False, announced=False)) == (
        domain.OneStopDecision(void=False, announce=False)
    )
    assert domain.one_stop_decision(DonorYear(six, requested=True, voided=False, announced=False)) == (
        domain.OneStopDecision(void=True, announce=True)
    )
    assert domain.one_stop_decision(DonorYear(six, requested=True, voided=True, announced=True)) == (
        domain.OneStopDecision(void=False, announce=False)
    )
    # Never asked: voided silently, told when they first ask.
    assert domain.one_stop_decision(DonorYear(six, requested=False, voided=False, announced=False)) == (
        domain.OneStopDecision(void=True, announce=False)
    )
    assert domain.one_stop_decision(DonorYear(six, requested=True, voided=True, announced=False)) == (
        domain.OneStopDecision(void=False, announce=True)
    )


def test_applications_after_10_january_are_late_and_void_years_void_them() -> None:
    assert domain.one_stop_deadline(2025) == date(2026, 1, 10)
    assert domain.application_status(2025, date(2026, 1, 10), year_voided=False) == "valid"
    assert domain.application_status(2025, date(2026, 1, 11), year_voided=False) == "late"
    assert domain.application_status(2025, date(2025, 12, 1), year_voided=True) == "void"
    with pytest.raises(domain.ReceivedDateInFuture):
        domain.check_application(kind="hometown_tax", refunded=False, payment_date=date(2025, 1, 1),
                                 received_on=date(2026, 11, 27), today=TODAY)
    with pytest.raises(domain.ReceivedBeforePayment):
        domain.check_application(kind="hometown_tax", refunded=False, payment_date=date(2025, 6, 1),
                                 received_on=date(2025, 5, 31), today=TODAY)
    with pytest.raises(domain.OneStopNotApplicable):
        domain.check_application(kind="corporate", refunded=False, payment_date=date(2025, 6, 1),
                                 received_on=date(2025, 7, 1), today=TODAY)
    with pytest.raises(domain.DonationRefunded):
        domain.check_application(kind="hometown_tax", refunded=True, payment_date=date(2025, 6, 1),
                                 received_on=date(2025, 7, 1), today=TODAY)


def test_a_refund_reverses_donation_and_transfer() -> None:
    entries = [LedgerEntry("donation", 5_000), LedgerEntry("transfer", -5_000)]
    reversal = domain.refund_entries(entries)
    assert reversal == (LedgerEntry("refund", -5_000), LedgerEntry("transfer_reversal", 5_000))
    assert sum(e.amount for e in [*entries, *reversal]) == 0


def my_number_refusals(data: dict[str, Any]) -> list[tuple[int | str, ...]]:
    with pytest.raises(ValidationError) as caught:
        DonationConfirmation.model_validate(data)
    return [e["loc"] for e in caught.value.errors() if e["type"] == "my_number_not_allowed"]


# 123456789018: a valid My Number (check digit 8); the kit's filter is tested in tests/unit/test_my_number.py
@pytest.mark.parametrize(
    "value",
    [
        "123456789018", "1234-5678-9018", "1234 5678 9018", "１２３４５６７８９０１８", "番号123456789018です",
        123456789018,
    ],
)
def test_a_my_number_is_refused_in_a_confirmation(value: object) -> None:
    assert my_number_refusals({"project": value}) == [("project",)]


@pytest.mark.parametrize(
    "value", ["1234567890123", "03-1234-5678", "090-1234-5678", "〒649-2211", "12345678901", "2026-01-10"],
)
def test_other_numbers_pass(value: object) -> None:
    assert my_number_refusals({"project": value}) == []


def test_only_the_payment_providers_own_reference_may_be_twelve_digits() -> None:
    assert my_number_refusals({"payment_reference": "123456789018"}) == []


def test_donor_identity_ignores_spacing_and_width() -> None:
    a = PersonDetails(name="山田　太郎", address="東京都千代田区１－２")
    b = PersonDetails(name="山田 太郎", address="東京都千代田区1-2")
    assert domain.donor_key(a) == domain.donor_key(b)
    resident = PersonDetails(name="x", address="y", resident_id="r-1")
    assert domain.donor_key(resident) == "resident:r-1"
    numbered = CompanyDetails(name="株式会社A", head_office_code=MINATO, corporate_number="1234567890123")
    assert domain.donor_key(numbered) == "company:1234567890123"
    with pytest.raises(domain.UnknownMunicipalityCode):
        domain.check_donor_details(CompanyDetails(name="B", head_office_code="000000"))
    with pytest.raises(domain.UnknownMunicipalityCode):
        domain.new_donor(CompanyDetails(name="B", head_office_code="000000"), uuid.uuid4(), datetime.now(UTC))
    company = domain.new_donor(numbered, uuid.uuid4(), datetime.now(UTC))
    assert (company.type, company.head_office_code, company.resident_id) == ("company", MINATO, None)


def test_either_donor_details_or_a_donor_id() -> None:
    domain.check_one_donor(confirmation())
    domain.check_one_donor(confirmation(donor=None, donor_id=str(uuid.uuid4())))
    for wrong in (confirmation(donor=None), confirmation(donor_id=str(uuid.uuid4()))):
        with pytest.raises(domain.DonorRequired):
            domain.check_one_donor(wrong)


def test_a_notification_is_compared_on_the_hash_recorded_before_the_domain_had_its_own_command() -> None:
    # Rows recorded earlier carry the SHA-256 of the request body's JSON: a re-notification of such
    # a payment must still be recognised as the same (200), not as a conflict (409).
    for body in (
        request(), request(donor=None, donor_id=str(uuid.uuid4()), earmark="dual_residence"),
        request(kind="corporate", amount=200_000, project="観光", payment_date="2025-01-02", one_stop_requested=False,
                donor={"type": "company", "name": "株式会社", "head_office_code": MINATO, "corporate_number": None}),
        request(program_id="jal-dual-residence-miles", one_stop_requested=True,
                donor={"type": "individual", "name": "名", "address": "住所", "resident_id": "r", "email": "a@b.jp"}),
    ):
        # Those bodies had no revitalisation_plan_id (it came with issue #19).
        recorded = body.model_dump(mode="json", exclude={"revitalisation_plan_id"})
        before = hashlib.sha256(json.dumps(recorded, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        assert body.to_domain().content_hash() == before
    assert confirmation().content_hash() != confirmation(amount=10_001).content_hash()
    named = {plan: confirmation(revitalisation_plan_id=plan).content_hash() for plan in ("a", "b")}
    assert named["a"] != named["b"]


def test_access_to_a_donors_data() -> None:
    ensure_donor_access(Principal("admin", Role.ADMIN), None)
    ensure_donor_access(Principal("r-1", Role.RESIDENT), "r-1")
    for principal, linked in [
        (Principal("r-2", Role.RESIDENT), "r-1"), (Principal("r-1", Role.RESIDENT), None),
        (Principal("s", Role.STAFF, municipality=SHIRAHAMA), "r-1"),
    ]:
        with pytest.raises(Forbidden):
            ensure_donor_access(principal, linked)
    ensure_donation_access(Principal("s", Role.STAFF, municipality=SHIRAHAMA), SHIRAHAMA, None)
    with pytest.raises(Forbidden):
        ensure_donation_access(Principal("s", Role.STAFF, municipality=TANABE), SHIRAHAMA, None)


def _donation(**changes: Any) -> Donation:
    values: dict[str, Any] = {
        "id": uuid.uuid4(), "payment_reference": "p", "request_hash": "h", "municipality_code": SHIRAHAMA,
        "donor_id": uuid.uuid4(), "donor_name": "n", "donor_resident_id": None, "kind": "hometown_tax",
        "unit": "jpy", "amount": 10_000, "earmark": "general", "program_id": None, "project": None,
        "payment_date": date(2025, 12, 20), "calendar_year": 2025, "one_stop_requested": False,
        "receipt_number": f"{SHIRAHAMA}-2025-000001", "received_at": datetime(2025, 12, 20, tzinfo=UTC),
        "special_deduction": True,
    }
    values.update(changes)
    return Donation(**values)


def test_a_donation_recorded_with_a_person_on_file_names_that_person() -> None:
    # The statement that records a donation finds a person named by the notification, or creates
    # them with the id sent: the donation is the one on file's.
    confirmed = confirmation()
    assert confirmed.donor is not None
    plan = domain.plan_donation(confirmed, PERSON, TODAY)
    now = datetime(2026, 11, 26, tzinfo=UTC)
    sent = domain.new_donor(confirmed.donor, uuid.uuid4(), now)
    record = domain.new_donation(confirmed, plan, sent, uuid.uuid4(), now)
    on_file = domain.Donor(
        id=uuid.uuid4(), type="individual", name="山田 太郎", address="東京都", resident_id="r-1", email=None,
        head_office_code=None, corporate_number=None, created_at=now,
    )
    donation = Donation.recorded(record, on_file, f"{SHIRAHAMA}-2026-000001")
    assert (donation.donor_id, donation.donor_name, donation.donor_resident_id) == (on_file.id, "山田 太郎", "r-1")


def test_a_donation_is_refunded_once_and_then_takes_no_application() -> None:
    at = datetime(2026, 1, 5, tzinfo=UTC)
    refunded = _donation().refund("reversed", at)
    assert (refunded.refunded, refunded.refunded_at, refunded.refund_reason) == (True, at, "reversed")
    with pytest.raises(domain.AlreadyRefunded):
        refunded.refund("again", at)
    with pytest.raises(domain.DonationRefunded):
        refunded.check_application(date(2026, 1, 5), TODAY)
    _donation().check_application(date(2026, 1, 5), TODAY)


def test_an_application_is_valid_late_or_void_by_its_year() -> None:
    donation = _donation()
    at = datetime(2026, 1, 12, tzinfo=UTC)
    open_year = DonorYearState(requested=True, voided_at=None, announced=False)
    void_year = DonorYearState(requested=True, voided_at=at, announced=True)
    on_time = domain.OneStopApplication.receive(
        donation, domain.ApplicationReceived(date(2026, 1, 10), verified=True), open_year, uuid.uuid4(), at
    )
    assert (on_time.status, on_time.verified_at, on_time.calendar_year) == ("valid", at, 2025)
    late = domain.OneStopApplication.receive(
        donation, domain.ApplicationReceived(date(2026, 1, 11)), open_year, uuid.uuid4(), at
    )
    assert (late.status, late.verified_at) == ("late", None)
    void = domain.OneStopApplication.receive(
        donation, domain.ApplicationReceived(date(2025, 12, 21)), void_year, uuid.uuid4(), at
    )
    assert void.status == "void"
    assert (domain.NOT_REQUESTED.status, open_year.status, void_year.status) == ("not_requested", "valid", "void")
    assert open_year.with_municipalities(["a", "b"], requested=False) == DonorYear(
        frozenset({"a", "b"}), requested=False, voided=False, announced=False
    )


def test_a_receipt_is_reissued_under_its_number_unless_cancelled() -> None:
    at = datetime(2026, 2, 1, tzinfo=UTC)
    receipt = Receipt(
        number=f"{SHIRAHAMA}-2025-000001", donation_id=uuid.uuid4(), municipality_code=SHIRAHAMA, calendar_year=2025,
        donor_id=uuid.uuid4(), donor_name="n", donor_address="a", amount_jpy=10_000, donation_date=date(2025, 12, 1),
        issued_at=at, status="issued", cancelled_at=None, reissue_count=1, last_reissued_at=None,
        donor_resident_id=None, donor_type="individual", kind="hometown_tax", project=None,
    )
    again = receipt.reissue(at)
    assert (again.number, again.reissue_count, again.last_reissued_at) == (receipt.number, 2, at)
    cancelled = dataclasses.replace(receipt, status="cancelled")
    with pytest.raises(domain.ReceiptCancelled):
        cancelled.reissue(at)
    with pytest.raises(domain.ReceiptCancelled):
        cancelled.check_printable()
    assert domain.is_receipt_number(receipt.number) and not domain.is_receipt_number("304018-2025-1")
    # An erased donor's receipt is the municipality's record only: never printed or issued again.
    erased = dataclasses.replace(receipt, donor_erased=True)
    for issue in (lambda: erased.reissue(at), erased.check_printable):
        with pytest.raises(domain.DonorErased) as refused:
            issue()
        assert refused.value.status == 410 and refused.value.code == "donor-erased"


@pytest.mark.parametrize(
    ("calendar_year", "first_erasable"),
    [
        # Paid in 2025: lowers the 2026 fiscal year's resident tax, kept 5 years after that year
        # closes (31 March 2027), so through 31 March 2032.
        (2025, date(2032, 4, 1)),
        (2026, date(2033, 4, 1)),
    ],
)
def test_a_receipt_is_kept_five_years_after_the_fiscal_year_of_the_tax_it_lowered(
    calendar_year: int, first_erasable: date
) -> None:
    assert domain.retention_ends(calendar_year) == first_erasable
    assert domain.retention_ends(calendar_year, years=10) == first_erasable.replace(year=first_erasable.year + 5)
    # The day before, the year is not yet erasable; on the day it is (dates in Japan).
    assert domain.last_erasable_year(first_erasable) == calendar_year
    assert domain.last_erasable_year(date(first_erasable.year, 3, 31)) == calendar_year - 1
    assert domain.last_erasable_year(date(first_erasable.year, 12, 31)) == calendar_year


def test_an_erased_donor_keeps_nothing_without_a_receipt_and_is_named_no_more() -> None:
    assert domain.erasable_from([]) is None
    assert domain.erasable_from([2024, 2026, 2025]) == date(2033, 4, 1)
    details = PersonDetails(name="山田 太郎", address="東京都千代田区1-1", resident_id="res-1", email="t@example.jp")
    unlinked = details.unlinked()
    assert (unlinked.resident_id, unlinked.email) == (None, None)
    assert (unlinked.name, unlinked.address) == (details.name, details.address)
    assert domain.donor_key(unlinked) == "individual:山田太郎|東京都千代田区1-1"
    at = datetime(2026, 2, 1, tzinfo=UTC)
    donor = domain.Donor(
        id=uuid.uuid4(), type="individual", name="", address=None, resident_id=None, email=None,
        head_office_code=None, corporate_number=None, created_at=at, erased_at=at,
    )
    with pytest.raises(domain.DonorErased):
        donor.check_usable()
    company = dataclasses.replace(donor, type="company", name="株式会社", head_office_code=MINATO, erased_at=None)
    company.check_usable()
    with pytest.raises(domain.DonorIsACompany):
        company.check_erasable()


def test_statements_bind_parameters_by_name() -> None:
    statement = Sql.of("SELECT :b::text, :a WHERE x = :b AND y::int = 1 -- note: a comment")
    assert statement.text == "SELECT $1::text, $2 WHERE x = $1 AND y::int = 1 -- note: a comment"
    assert statement.names == ("b", "a")
    assert statement.args({"a": 1, "b": 2}) == [2, 1]
    with pytest.raises(TypeError):
        statement.args({"a": 1})
    with pytest.raises(TypeError):
        statement.args({"a": 1, "b": 2, "c": 3})
    assert statement.args_of(LedgerEntry("donation", 5), b="x", a=0) == ["x", 0]
    assert Sql.of("SELECT :entry, :amount").args_of(LedgerEntry("refund", -5)) == ["refund", -5]


def test_the_receipt_pdf_shows_what_a_receipt_shows() -> None:
    pdf = render_receipt(
        ReceiptDocument(
            number="304018-2026-000042", donor_name="株式会社テスト", donor_address="東京都港区", donor_is_company=True,
            municipality_name="和歌山県白浜町", issuer="白浜町長", donation_date=date(2026, 12, 31), amount_jpy=100_000,
            kind_label="企業版ふるさと納税（地方創生応援税制）", project="観光振興事業", issued_on=date(2026, 12, 31),
            reissue_count=0, reissued_on=None,
        )
    )
    reader = PdfReader(io.BytesIO(pdf))
    assert len(reader.pages) == 1
    assert abs(float(reader.pages[0].mediabox.width) - 595.28) < 1  # A4
    text = reader.pages[0].extract_text()
    for shown in ("寄附金受領証明書", "¥100,000", "株式会社テスト", "御中", "2026年12月31日", "観光振興事業",
                  "304018-2026-000042"):
        assert shown in text
    assert domain.yen(1_234_567) == "¥1,234,567"
