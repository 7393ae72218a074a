"""Certification rules without I/O: eligibility, member numbers, numbering, validity, state changes."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from services.certification.domain import (
    MAX_BACKDATED_DAYS,
    MAX_DEFERRED_DAYS,
    Application,
    ApplicationAlreadyDecided,
    ApplicationRequest,
    Certificate,
    CertificateAlreadyRevoked,
    CertificateExpired,
    CertificateNotRenewable,
    DuplicatePartner,
    HousingBasisNotAccepted,
    InvalidMemberNumber,
    InvalidSchemePeriod,
    InvalidValidityPeriod,
    MunicipalityRules,
    NoCertificationScheme,
    NotAMunicipality,
    PartnerConsentMissing,
    PremiumRegistrationRequired,
    PrimaryResidenceSameMunicipality,
    Registration,
    RegistrationNoLongerActive,
    RegistrationRequired,
    RenewalMustExtend,
    RenewalTooEarly,
    Resident,
    ResidentNotYetKnown,
    ResidentWithdrawn,
    SchemeEdit,
    SchemeNotInForce,
    StayBelowMinimum,
    StayDaysOutOfRange,
    UnknownMunicipalityCode,
    UnknownPartner,
    ValidFromTooEarly,
    ValidFromTooLate,
    ValidityEndsInPast,
    ValidityExceedsRules,
    check_against_rules,
    check_applicant,
    check_partners,
    check_request,
    check_still_eligible,
    days_left,
    expired_on,
    expiring_window,
    project_events,
    registration_after,
    registration_registered,
    registrations_to_read,
    scheme_after_plan_event,
    seed_schemes,
    share_consents,
    shared_partners,
    validity_period,
)
from services.certification.views import CSV_COLUMNS, certificate_row
from shared.contracts.common import PartnerMembership
from shared.contracts.registration import (
    ConsentChanged,
    Contact,
    PremiumApproved,
    PremiumExpired,
    PremiumRejected,
    PremiumRequested,
    RegistrationWithdrawn,
    ResidentRegistered,
)
from shared.contracts.sealed import resident_subject
from shared.kit.csv_export import csv_lines
from shared.kit.errors import DomainError
from tests.support import seal_for_tests

SHIRAHAMA, CHIYODA = "304018", "131016"
TODAY = date(2026, 6, 1)
AT = datetime(2026, 6, 1, 3, 0, tzinfo=UTC)
RULES = MunicipalityRules(SHIRAHAMA)


def request(**overrides: Any) -> ApplicationRequest:
    values: dict[str, Any] = {
        "municipality_code": SHIRAHAMA, "planned_stay_days": 60, "housing_basis": "rented",
        "address_there": "白浜町1", "primary_residence_code": CHIYODA,
        "partners": (PartnerMembership(partner="jal", member_number="123456789"),),
    }
    values.update(overrides)
    return ApplicationRequest(**values)


def resident(**overrides: Any) -> Resident:
    values: dict[str, Any] = {
        "resident_id": "r-1", "status": "active", "legal_address_code": CHIYODA,
        "registrations": (Registration("g-1", SHIRAHAMA, "basic", "active"),),
        "consented_partners": frozenset({"jal"}),
    }
    values.update(overrides)
    return Resident(**values)


def memberships(*pairs: tuple[str, str | None]) -> list[PartnerMembership]:
    return [PartnerMembership.model_construct(partner=p, member_number=n) for p, n in pairs]


# --- member numbers and partners -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("partner", "number"),
    [("jal", "123456789"), ("jal", "1234567"), ("jal", None), ("ana", "1234567890"), ("jreast", "AB12"),
     ("sadokisen", "A" * 20), ("kyushuyusen", None)],
)
def test_well_formed_member_numbers_pass(partner: str, number: str | None) -> None:
    check_partners(memberships((partner, number)))


@pytest.mark.parametrize(
    ("partner", "number"),
    [("jal", "12345678"), ("jal", "1234567890"), ("jal", "12345678a"), ("jal", "１２３４５６７８９"),
     ("jal", "123 456 789"), ("ana", "123456789"), ("ana", "12345678901"), ("jreast", "A" * 21),
     ("jreast", "AB-12"), ("jreast", "")],
)
def test_malformed_member_numbers_are_refused(partner: str, number: str) -> None:
    with pytest.raises(InvalidMemberNumber) as refused:
        check_partners(memberships(("kyushuyusen", None), (partner, number)))
    assert refused.value.extra["field"] == "partners[1].member_number"


def test_partners_must_be_known_and_listed_once() -> None:
    with pytest.raises(UnknownPartner):
        check_partners(memberships(("united", None)))
    with pytest.raises(DuplicatePartner):
        check_partners(memberships(("jal", "1234567"), ("jal", "123456789")))


def test_events_carry_only_the_declared_partners_still_consented() -> None:
    declared = [PartnerMembership(partner="jal", member_number="123456789"), PartnerMembership(partner="ana")]
    assert shared_partners(declared, frozenset({"ana", "jreast"})) == [PartnerMembership(partner="ana")]


# --- eligibility ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"municipality_code": "304017"}, UnknownMunicipalityCode),
        ({"primary_residence_code": "12345"}, UnknownMunicipalityCode),
        ({"primary_residence_code": "130001"}, NotAMunicipality),  # 東京都 itself
        ({"primary_residence_code": SHIRAHAMA}, PrimaryResidenceSameMunicipality),
        ({"municipality_code": "011002", "primary_residence_code": "011011"}, PrimaryResidenceSameMunicipality),
        ({"planned_stay_days": 0}, StayDaysOutOfRange),
        ({"planned_stay_days": 367}, StayDaysOutOfRange),
    ],
)
def test_requests_are_checked_before_any_state_is_read(overrides: dict[str, Any], error: type[DomainError]) -> None:
    with pytest.raises(error):
        check_request(request(**overrides))


def test_a_366_day_stay_and_a_designated_ward_elsewhere_pass() -> None:
    check_request(request(planned_stay_days=366, primary_residence_code="011011"))  # 札幌市中央区


def test_the_municipality_rules_apply() -> None:
    with pytest.raises(NoCertificationScheme):
        check_against_rules(request(municipality_code=CHIYODA, primary_residence_code=SHIRAHAMA), None, TODAY)
    with pytest.raises(StayBelowMinimum) as short:
        check_against_rules(request(planned_stay_days=29), RULES, TODAY)
    assert short.value.extra["minimum"] == 30
    assert check_against_rules(request(planned_stay_days=30), RULES, TODAY) == RULES
    with pytest.raises(HousingBasisNotAccepted):
        check_against_rules(
            request(housing_basis="hotel"), MunicipalityRules(SHIRAHAMA, housing_bases=("owned",)), TODAY
        )


def test_an_unknown_resident_is_told_to_retry_and_a_withdrawn_one_is_refused() -> None:
    with pytest.raises(ResidentNotYetKnown) as unknown:
        check_applicant(request(), RULES, None, TODAY, retry_after_s=3)
    assert unknown.value.status == 409 and unknown.value.extra == {"retry_after": 3}
    with pytest.raises(ResidentWithdrawn):
        check_applicant(request(), RULES, resident(status="withdrawn"), TODAY, retry_after_s=3)


def test_the_registered_legal_address_may_not_be_the_municipality() -> None:
    with pytest.raises(PrimaryResidenceSameMunicipality):
        check_applicant(request(), RULES, resident(legal_address_code=SHIRAHAMA), TODAY, retry_after_s=3)


def test_an_active_registration_or_premium_if_the_rules_say_so() -> None:
    premium = MunicipalityRules(SHIRAHAMA, required_registration="premium")
    assert check_applicant(request(), RULES, resident(), TODAY, retry_after_s=1)
    with pytest.raises(PremiumRegistrationRequired):
        check_applicant(request(), premium, resident(), TODAY, retry_after_s=1)
    lapsed = Registration("g-1", SHIRAHAMA, "premium", "active", "approved", valid_until=TODAY - timedelta(days=1))
    with pytest.raises(PremiumRegistrationRequired):
        check_applicant(request(), premium, resident(registrations=(lapsed,)), TODAY, retry_after_s=1)
    current = Registration("g-1", SHIRAHAMA, "premium", "active", "approved", valid_until=TODAY)
    assert check_applicant(request(), premium, resident(registrations=(current,)), TODAY, retry_after_s=1)
    elsewhere = Registration("g-2", "302066", "basic", "active")
    pending = Registration("g-3", SHIRAHAMA, "premium", "pending_review", "requested")
    with pytest.raises(RegistrationRequired):
        check_applicant(request(), RULES, resident(registrations=(elsewhere, pending)), TODAY, retry_after_s=1)


def test_each_listed_partner_needs_the_share_consent() -> None:
    both = request(partners=(PartnerMembership(partner="jal"), PartnerMembership(partner="ana")))
    with pytest.raises(PartnerConsentMissing) as missing:
        check_applicant(both, RULES, resident(), TODAY, retry_after_s=1)
    assert missing.value.extra["partner"] == "ana"


def test_approval_rechecks_the_registration() -> None:
    gone = resident(registrations=(Registration("g-1", SHIRAHAMA, "basic", "withdrawn"),))
    with pytest.raises(RegistrationNoLongerActive):
        check_still_eligible(RULES, gone, TODAY)
    with pytest.raises(ResidentWithdrawn):
        check_still_eligible(RULES, None, TODAY)


# --- the resident projection ---------------------------------------------------------------------


def registered_event(tier: str, status: str) -> ResidentRegistered:
    return ResidentRegistered(
        resident_id="r-1", registration_id="g-1", municipality_code=SHIRAHAMA, prefecture_code="300004",
        tier=tier, status=status, legal_address_code=CHIYODA,
        contact=seal_for_tests(resident_subject("r-1"), Contact(name="山田", name_kana="ヤマダ", email="r@example.jp")),
        registered_at=AT,
    )


def test_a_registration_saves_the_prefecture_registration_it_brought() -> None:
    event = registered_event("premium", "pending_review").model_copy(
        update={"derived_prefecture_registration_id": "g-pref"})
    withdrawn = RegistrationWithdrawn(resident_id="r-1", registration_id="g-pref", municipality_code="300004",
                                      withdrawn_at=AT)
    # Both were saved by the run itself: nothing to read before it.
    assert registrations_to_read([event, withdrawn]) == []
    changes = project_events([(event, AT)], {})
    assert {k: (r.registration.municipality_code, r.registration.tier, r.registration.status)
            for k, r in changes.registrations.items()} == {
        "g-1": (SHIRAHAMA, "premium", "pending_review"), "g-pref": ("300004", "basic", "active")}
    after = project_events([(event, AT), (withdrawn, AT)], {})
    assert after.registrations["g-pref"].registration.status == "withdrawn"
    assert list(after.residents) == ["r-1"]


def test_registration_events_move_the_registration() -> None:
    basic = registration_registered(registered_event("basic", "active"))
    assert (basic.tier, basic.status, basic.premium_status) == ("basic", "active", None)
    pending = registration_registered(registered_event("premium", "pending_review"))
    assert pending.premium_status == "requested" and not pending.is_active(TODAY)
    approved = registration_after(pending, PremiumApproved(
        resident_id="r-1", registration_id="g-1", municipality_code=SHIRAHAMA, valid_until=TODAY, decided_at=AT))
    assert approved.is_active_premium(TODAY) and not approved.is_active_premium(TODAY + timedelta(days=1))
    rejected = PremiumRejected(resident_id="r-1", registration_id="g-1", municipality_code=SHIRAHAMA, reason="x",
                               decided_at=AT)
    assert registration_after(pending, rejected).status == "rejected"
    upgrade = registration_after(basic, PremiumRequested(
        resident_id="r-1", registration_id="g-1", municipality_code=SHIRAHAMA, activity_count=3, requested_at=AT))
    assert registration_after(upgrade, rejected) == Registration("g-1", SHIRAHAMA, "basic", "active", "rejected")
    expired = registration_after(approved, PremiumExpired(
        resident_id="r-1", registration_id="g-1", municipality_code=SHIRAHAMA, expired_on=TODAY))
    assert not expired.is_active(TODAY)
    withdrawn = registration_after(basic, RegistrationWithdrawn(
        resident_id="r-1", registration_id="g-1", municipality_code=SHIRAHAMA, withdrawn_at=AT))
    assert withdrawn.status == "withdrawn"


def test_a_registration_first_seen_through_a_later_event_starts_conservatively() -> None:
    unseen = registration_after(None, PremiumRequested(
        resident_id="r-1", registration_id="g-9", municipality_code=SHIRAHAMA, activity_count=3, requested_at=AT))
    assert not unseen.is_active(TODAY)


def test_only_per_partner_share_certificate_consents_are_kept() -> None:
    facts = [
        ConsentChanged(resident_id="r-1", purpose="share_certificate", partner="jal", granted=True, at=AT),
        ConsentChanged(resident_id="r-1", purpose="email", granted=True, at=AT),
        ConsentChanged(resident_id="r-1", purpose="share_certificate", partner=None, granted=True, at=AT),
    ]
    assert [(c.partner, c.granted) for c in share_consents(facts)] == [("jal", True)]


# --- applications and certificates ---------------------------------------------------------------


def test_a_decided_application_cannot_be_decided_again() -> None:
    application = Application.submit("r-1", request(), AT)
    approved = application.approve(by="staff-1", at=AT, certificate_number="NCH-304018-2026-000001")
    with pytest.raises(ApplicationAlreadyDecided):
        approved.approve(by="staff-1", at=AT, certificate_number="NCH-304018-2026-000002")
    with pytest.raises(ApplicationAlreadyDecided):
        application.reject(by="staff-1", at=AT, reason="documents_incomplete").reject(
            by="staff-1", at=AT, reason="other"
        )


def test_validity_defaults_to_the_municipality_validity_counted_inclusively() -> None:
    assert validity_period(RULES, TODAY, None, None) == (TODAY, date(2027, 5, 31))
    assert validity_period(RULES, date(2027, 3, 1), None, None) == (date(2027, 3, 1), date(2028, 2, 28))
    assert validity_period(RULES, TODAY, date(2026, 5, 2), None) == (date(2026, 5, 2), date(2027, 5, 1))
    assert validity_period(RULES, TODAY, None, date(2026, 12, 31)) == (TODAY, date(2026, 12, 31))
    with pytest.raises(InvalidValidityPeriod):
        validity_period(RULES, TODAY, date(2026, 7, 1), date(2026, 6, 30))
    with pytest.raises(ValidityEndsInPast):
        validity_period(RULES, TODAY, date(2025, 1, 1), date(2026, 5, 31))


def test_validity_is_bounded_by_the_municipality_rules() -> None:
    # valid_until: at most the municipality's validity from valid_from, counted inclusively.
    assert validity_period(RULES, TODAY, None, date(2027, 5, 31)) == (TODAY, date(2027, 5, 31))
    with pytest.raises(ValidityExceedsRules) as exceeded:
        validity_period(RULES, TODAY, None, date(2027, 6, 1))
    assert exceeded.value.code == "validity-exceeds-rules" and exceeded.value.extra["latest"] == "2027-05-31"
    with pytest.raises(ValidityExceedsRules):
        validity_period(RULES, TODAY, None, date(2099, 12, 31))
    short = MunicipalityRules(SHIRAHAMA, validity_days=180)
    assert validity_period(short, TODAY, None, None) == (TODAY, date(2026, 11, 27))
    with pytest.raises(ValidityExceedsRules):
        validity_period(short, TODAY, None, date(2026, 11, 28))
    # valid_from: up to MAX_BACKDATED_DAYS before today, up to MAX_DEFERRED_DAYS after it.
    earliest, latest = TODAY - timedelta(days=MAX_BACKDATED_DAYS), TODAY + timedelta(days=MAX_DEFERRED_DAYS)
    assert validity_period(RULES, TODAY, earliest, None)[0] == earliest
    assert validity_period(RULES, TODAY, latest, None) == (latest, latest + timedelta(days=364))
    with pytest.raises(ValidFromTooEarly) as early:
        validity_period(RULES, TODAY, earliest - timedelta(days=1), None)
    assert early.value.code == "valid-from-too-early" and early.value.status == 422
    with pytest.raises(ValidFromTooLate) as late:
        validity_period(RULES, TODAY, latest + timedelta(days=1), None)
    assert late.value.code == "valid-from-too-late" and late.value.status == 422


def certificate(**overrides: Any) -> Certificate:
    application = Application.submit("r-1", request(), AT)
    issued = Certificate.issue(application, number="NCH-304018-2026-000001", valid_from=TODAY,
                               valid_until=date(2027, 5, 31), by="staff-1", at=AT)
    return replace(issued, **overrides)


def test_renewal_extends_under_the_same_number_and_only_while_valid() -> None:
    renewed = certificate().renew(today=TODAY, validity_days=365, valid_until=None, at=AT)
    assert (renewed.certificate_number, renewed.valid_from, renewed.valid_until) == (
        "NCH-304018-2026-000001", TODAY, date(2028, 5, 30))
    with pytest.raises(RenewalMustExtend):
        certificate().renew(today=TODAY, validity_days=365, valid_until=date(2027, 5, 31), at=AT)
    with pytest.raises(CertificateNotRenewable):
        certificate().renew(today=date(2027, 6, 1), validity_days=365, valid_until=None, at=AT)
    with pytest.raises(CertificateNotRenewable):
        certificate(status="revoked").renew(today=TODAY, validity_days=365, valid_until=None, at=AT)


def test_a_renewal_adds_at_most_one_validity_and_cannot_be_stacked() -> None:
    # At most validity_days after the current valid_until (the renewal's period starts the day after).
    assert certificate().renew(
        today=TODAY, validity_days=365, valid_until=date(2028, 5, 30), at=AT
    ).valid_until == date(2028, 5, 30)
    with pytest.raises(ValidityExceedsRules) as exceeded:
        certificate().renew(today=TODAY, validity_days=365, valid_until=date(2028, 5, 31), at=AT)
    assert exceeded.value.code == "validity-exceeds-rules" and exceeded.value.extra["latest"] == "2028-05-30"
    with pytest.raises(ValidityExceedsRules):
        certificate().renew(today=TODAY, validity_days=365, valid_until=date(2099, 12, 31), at=AT)
    # Renewed once, the validity runs beyond one period from today: a second renewal waits.
    renewed = certificate().renew(today=TODAY, validity_days=365, valid_until=None, at=AT)
    with pytest.raises(RenewalTooEarly) as early:
        renewed.renew(today=TODAY, validity_days=365, valid_until=None, at=AT)
    assert early.value.status == 409 and early.value.extra["renewable_from"] == "2027-06-01"
    again = renewed.renew(today=date(2027, 6, 1), validity_days=365, valid_until=None, at=AT)
    assert again.valid_until == date(2029, 5, 30)


def test_revocation_is_refused_when_revoked_or_expired() -> None:
    revoked = certificate().revoke(today=TODAY, reason="false_statement", at=AT)
    assert (revoked.status, revoked.revocation_reason) == ("revoked", "false_statement")
    with pytest.raises(CertificateAlreadyRevoked):
        revoked.revoke(today=TODAY, reason="other", at=AT)
    with pytest.raises(CertificateExpired):
        certificate().revoke(today=date(2027, 6, 1), reason="other", at=AT)  # past valid_until, not yet swept
    with pytest.raises(CertificateExpired):
        certificate(status="expired").revoke(today=TODAY, reason="other", at=AT)
    assert certificate().revoke(today=date(2027, 5, 31), reason="other", at=AT).status == "revoked"  # the last day


def test_withdrawal_revokes_and_forgets_member_numbers() -> None:
    ended = certificate().revoke_on_withdrawal(AT)
    assert ended.status == "revoked" and ended.revocation_reason == "resident_withdrawn"
    assert ended.partners == (PartnerMembership(partner="jal"),)


def test_expiry_dates() -> None:
    assert expiring_window(TODAY) == (TODAY, date(2026, 7, 1))
    assert days_left(date(2026, 7, 1), TODAY) == 30
    assert expired_on(date(2026, 12, 31)) == date(2027, 1, 1)


async def test_the_csv_export_has_a_bom_and_neutralises_formulas() -> None:
    rows = [certificate_row(certificate(status="revoked", revocation_reason="=HYPERLINK(\"x\")"))]
    text = "".join([chunk async for chunk in csv_lines(CSV_COLUMNS, rows)])
    assert text.startswith("\ufeffcertificate_number,")
    assert "'=HYPERLINK" in text and text.endswith("\r\n")


# --- certification schemes (issue #19: certification is not tied to a plan) ----------------------

IKI = "422100"  # 長崎県壱岐市: JAL and 九州郵船, no 特定居住促進計画


def test_a_town_without_a_plan_certifies_under_a_model_project() -> None:
    """The bug of issue #19: the seed gave only plan towns a scheme, so 壱岐市 refused every application."""
    schemes = {s.municipality_code: s for s in seed_schemes({SHIRAHAMA: date(2025, 3, 1)}, [SHIRAHAMA, IKI, IKI])}
    assert schemes[SHIRAHAMA].legal_basis == "plan" and schemes[SHIRAHAMA].plan_adopted_on == date(2025, 3, 1)
    assert schemes[IKI].legal_basis == "model_project" and schemes[IKI].plan_adopted_on is None
    assert len(schemes) == 2
    iki = request(municipality_code=IKI, primary_residence_code=CHIYODA)
    assert check_against_rules(iki, schemes[IKI], TODAY) == schemes[IKI]


def test_every_programme_town_of_the_reference_has_a_scheme() -> None:
    from shared.reference import municipalities_with_plan, travel_programs

    towns = [code for programme in travel_programs() for code in programme.municipality_codes]
    schemes = {s.municipality_code: s for s in seed_schemes({}, towns)}
    assert set(towns) <= set(schemes)
    assert {c for c, s in schemes.items() if s.legal_basis == "model_project"} == set(towns)
    with_plans = seed_schemes({code: date(2025, 1, 1) for code in municipalities_with_plan()}, towns)
    assert {s.municipality_code for s in with_plans if s.legal_basis == "plan"} == set(municipalities_with_plan())


def test_a_scheme_applies_only_within_its_period() -> None:
    scheme = MunicipalityRules(IKI, legal_basis="model_project", valid_from=TODAY, valid_until=TODAY + timedelta(30))
    iki = request(municipality_code=IKI, primary_residence_code=CHIYODA)
    assert check_against_rules(iki, scheme, TODAY) == scheme
    assert check_against_rules(iki, scheme, TODAY + timedelta(30)) == scheme
    for day in (TODAY - timedelta(1), TODAY + timedelta(31)):
        with pytest.raises(SchemeNotInForce):
            check_against_rules(iki, scheme, day)


def test_staff_edit_rules_and_period_but_not_the_basis() -> None:
    scheme = MunicipalityRules(IKI, legal_basis="model_project")
    edit = SchemeEdit(IKI, 14, ("hotel",), 180, "premium", period=(TODAY, None))
    edited = scheme.edited(edit)
    assert (edited.min_stay_days, edited.housing_bases, edited.validity_days) == (14, ("hotel",), 180)
    assert (edited.valid_from, edited.valid_until, edited.legal_basis) == (TODAY, None, "model_project")
    kept = edited.edited(SchemeEdit(IKI, 30, ("owned",), 365, "any_active"))
    assert kept.valid_from == TODAY  # no period given: the period stays
    with pytest.raises(InvalidSchemePeriod):
        scheme.edited(SchemeEdit(IKI, 30, ("owned",), 365, "any_active", period=(TODAY, TODAY - timedelta(1))))


def test_a_plan_adopted_or_withdrawn_moves_the_basis_and_keeps_the_rules() -> None:
    from shared.contracts.planning import PlanAdopted, PlanContent, PlanWithdrawn

    common = {"plan_id": "plan-1", "level": "municipality", "municipality_code": IKI, "prefecture_code": "420000",
              "version": 1}
    adopted = PlanAdopted(**common, name="壱岐市特定居住促進計画", covers_dual_residence=True, content=PlanContent(),
                          adopted_on=date(2026, 4, 1))
    withdrawn = PlanWithdrawn(**common, reason="policy_ended", withdrawn_on=date(2027, 4, 1))
    own = MunicipalityRules(IKI, min_stay_days=14, legal_basis="model_project")
    on_plan = scheme_after_plan_event(own, IKI, adopted)
    assert on_plan is not None
    assert (on_plan.legal_basis, on_plan.plan_adopted_on, on_plan.plan_source) == ("plan", date(2026, 4, 1), "planning")
    assert on_plan.min_stay_days == 14
    back = scheme_after_plan_event(on_plan, IKI, withdrawn)
    assert back is not None and back.legal_basis == "model_project" and back.plan_adopted_on is None
    assert back.min_stay_days == 14
    assert scheme_after_plan_event(None, IKI, withdrawn) is None
    fresh = scheme_after_plan_event(None, IKI, adopted)
    assert fresh is not None and fresh.legal_basis == "plan" and fresh.min_stay_days == 30
