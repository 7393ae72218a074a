"""The subsidy rules without I/O: parameters, windows, trips, ledger arithmetic, donations."""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from services.subsidy.config import SubsidySettings
from services.subsidy.domain import (
    Accepted,
    AmountNotConvertible,
    CertificateState,
    CertificateYear,
    DiscountParameters,
    FareProduct,
    FundingCandidate,
    GrantState,
    HeldGrant,
    InvalidAmount,
    InvalidDiscount,
    InvalidProgramParameters,
    InvalidProgramPeriod,
    MileageParameters,
    Parameters,
    Program,
    ProgramPeriodInPast,
    Refused,
    Trip,
    UnitMismatch,
    VoucherParameters,
    certificate_years,
    check_discount,
    check_program_period,
    check_programme_terms,
    choose_program_for_donation,
    convert_to_program_unit,
    convert_top_up,
    decide_trip,
    ledger_deltas,
    one_region_conflict,
    parse_parameters,
    resolve_program_id,
    seed_program,
)
from shared.reference import travel_program

TODAY = date(2026, 11, 27)
MILEAGE = MileageParameters(
    required_round_trips=4, max_one_ways=4, miles_per_one_way=7500, window_days=122, jpy_per_mile=2
)
VOUCHER = VoucherParameters(voucher_jpy=5000, max_one_ways=8)
DISCOUNT = DiscountParameters(discount_percent=50, max_discount_jpy=10_000, max_one_ways=4)


def program(parameters: Parameters, **overrides: object) -> Program:
    mechanism = {MileageParameters: "mileage_grant", VoucherParameters: "fare_voucher"}.get(
        type(parameters), "fare_discount"
    )
    values: dict[str, object] = {
        "program_id": "p@304018", "title": "t", "partner": "jal", "municipality_code": "304018",
        "mechanism": mechanism, "unit": "miles" if mechanism == "mileage_grant" else "jpy",
        "parameters": parameters, "active_from": date(2025, 4, 1), "active_until": date(2031, 3, 31),
    }
    values.update(overrides)
    return Program(**values)  # type: ignore[arg-type]


def grant(parameters: Parameters, **overrides: object) -> GrantState:
    p = program(parameters)
    values: dict[str, object] = {
        "grant_id": "g", "program_id": p.program_id, "certificate_number": "C-1", "resident_id": "r",
        "municipality_code": "304018", "partner": "jal", "mechanism": p.mechanism, "unit": p.unit,
        "member_number": None, "status": "issued", "value": p.grant_value, "remaining": p.grant_value,
        "legs_counted": 0, "window_from": TODAY - timedelta(days=30), "window_until": TODAY + timedelta(days=30),
        "waitlist_seq": None,
    }
    values.update(overrides)
    return GrantState(**values)  # type: ignore[arg-type]


CERTIFICATE = CertificateState("C-1", "r", "304018", TODAY - timedelta(days=30), TODAY + timedelta(days=334), "valid")


def test_the_jal_program_of_shirahama_is_seeded_with_the_demo_numbers() -> None:
    seeded = seed_program(travel_program("jal-dual-residence-miles"), "304018", SubsidySettings().seed_defaults())
    assert seeded.program_id == "jal-dual-residence-miles@304018"
    assert seeded.partner == "jal" and seeded.unit == "miles"
    assert seeded.parameters == MILEAGE
    assert seeded.grant_value == 30_000  # 4 one-ways × 7,500 miles: one resident's worth at the opening balance


def test_other_reference_programs_seed_with_illustrative_caps() -> None:
    defaults = SubsidySettings().seed_defaults()
    voucher = seed_program(travel_program("jr-east-sanjo-shinkansen"), "152048", defaults)
    assert voucher.parameters == VOUCHER and voucher.grant_value == 40_000
    discount = seed_program(travel_program("ana-dual-residence-fare"), "392065", defaults)
    assert isinstance(discount.parameters, DiscountParameters)
    assert discount.grant_value == defaults.max_discount_jpy * defaults.discount_max_one_ways


@pytest.mark.parametrize(
    "raw",
    [
        {"required_round_trips": 0, "max_one_ways": 4, "miles_per_one_way": 7500, "window_days": 122},
        {"required_round_trips": 4, "max_one_ways": 4, "miles_per_one_way": -7500, "window_days": 122},
        {"required_round_trips": 4, "max_one_ways": 4, "miles_per_one_way": "7500", "window_days": 122},
        {"required_round_trips": 4, "max_one_ways": 4, "miles_per_one_way": 7500.5, "window_days": 122},
        {"required_round_trips": 4, "max_one_ways": 4, "miles_per_one_way": 7500, "window_days": 0},
        {"required_round_trips": 4, "max_one_ways": 4, "miles_per_one_way": 7500},
        {"required_round_trips": 4, "max_one_ways": 4, "miles_per_one_way": 7500, "window_days": 1, "x": 1},
        {"required_round_trips": True, "max_one_ways": 4, "miles_per_one_way": 7500, "window_days": 122},
    ],
)
def test_mileage_parameters_that_make_no_sense_are_refused(raw: dict[str, object]) -> None:
    with pytest.raises(InvalidProgramParameters):
        parse_parameters("mileage_grant", raw)


def test_program_periods_must_be_ordered_and_not_over() -> None:
    check_program_period(TODAY, TODAY, TODAY)
    with pytest.raises(InvalidProgramPeriod):
        check_program_period(TODAY, TODAY - timedelta(days=1), TODAY - timedelta(days=5))
    with pytest.raises(ProgramPeriodInPast):
        check_program_period(date(2024, 1, 1), TODAY - timedelta(days=1), TODAY)


def test_the_window_runs_from_the_certificate_year_start_and_is_capped() -> None:
    jal = program(MILEAGE)
    start = date(2025, 9, 1)
    year = CertificateYear(start, date(2026, 8, 31))
    assert jal.window_for(year) == (start, date(2025, 12, 31))  # 122 days, September to December
    assert jal.window_for(CertificateYear(start, date(2025, 10, 31))) == (start, date(2025, 10, 31))
    ended = program(MILEAGE, active_until=date(2025, 10, 1))
    assert ended.window_for(year) == (start, date(2025, 10, 1))  # capped at the program
    assert program(VOUCHER).window_for(year) == (start, date(2026, 8, 31))
    assert ended.window_for(CertificateYear(date(2025, 11, 1), date(2026, 10, 31))) is None


def test_certificate_years_count_from_valid_from_and_renewals_add_years() -> None:
    start = date(2025, 3, 1)
    assert certificate_years(start, date(2026, 2, 28), today=start) == [CertificateYear(start, date(2026, 2, 28))]
    renewed = certificate_years(start, date(2027, 2, 28), today=date(2026, 2, 1))
    assert renewed == [
        CertificateYear(start, date(2026, 2, 28)), CertificateYear(date(2026, 3, 1), date(2027, 2, 28)),
    ]
    # years already over are not granted any more; a short last year ends with the certificate
    assert certificate_years(start, date(2026, 6, 30), today=date(2026, 3, 2)) == [
        CertificateYear(date(2026, 3, 1), date(2026, 6, 30)),
    ]
    leap = certificate_years(date(2024, 2, 29), date(2026, 1, 1), today=date(2024, 3, 1))
    assert leap[0].end == date(2025, 2, 27) and leap[1].start == date(2025, 2, 28)


def test_mileage_credits_once_after_n_round_trips() -> None:
    g = grant(MILEAGE)
    trip = Trip("round_trip", TODAY - timedelta(days=1))
    for legs in (2, 4, 6):
        decision = decide_trip(grant(MILEAGE, legs_counted=legs - 2), CERTIFICATE, trip, MILEAGE, TODAY)
        assert decision == Accepted(0, legs, completed=False)
    assert decide_trip(grant(MILEAGE, legs_counted=6), CERTIFICATE, trip, MILEAGE, TODAY) == Accepted(
        30_000, 8, completed=True
    )
    # one-ways count half a round trip
    assert decide_trip(grant(MILEAGE, legs_counted=7), CERTIFICATE, Trip("one_way", TODAY), MILEAGE, TODAY) == (
        Accepted(30_000, 8, completed=True)
    )
    assert decide_trip(g, CERTIFICATE, Trip("one_way", TODAY), MILEAGE, TODAY) == Accepted(0, 1, completed=False)
    done = grant(MILEAGE, status="completed", remaining=0, legs_counted=8)
    assert isinstance(refused := decide_trip(done, CERTIFICATE, trip, MILEAGE, TODAY), Refused)
    assert refused.reason == "over_count"


def test_vouchers_draw_a_fixed_amount_up_to_the_count() -> None:
    assert decide_trip(grant(VOUCHER), CERTIFICATE, Trip("one_way", TODAY), VOUCHER, TODAY) == Accepted(
        5000, 1, completed=False
    )
    assert decide_trip(grant(VOUCHER), CERTIFICATE, Trip("round_trip", TODAY), VOUCHER, TODAY) == Accepted(
        10_000, 2, completed=False
    )
    last = grant(VOUCHER, legs_counted=7, remaining=5000)
    assert decide_trip(last, CERTIFICATE, Trip("one_way", TODAY), VOUCHER, TODAY) == Accepted(5000, 8, completed=True)
    over = decide_trip(last, CERTIFICATE, Trip("round_trip", TODAY), VOUCHER, TODAY)
    assert isinstance(over, Refused) and over.reason == "over_count"


def test_discounts_draw_the_reported_amount_under_the_cap_and_release_the_rest_when_used_up() -> None:
    assert decide_trip(grant(DISCOUNT), CERTIFICATE, Trip("one_way", TODAY, 7000), DISCOUNT, TODAY) == Accepted(
        7000, 1, completed=False
    )
    over_cap = decide_trip(grant(DISCOUNT), CERTIFICATE, Trip("one_way", TODAY, 10_001), DISCOUNT, TODAY)
    assert isinstance(over_cap, Refused) and over_cap.reason == "over_count"
    assert decide_trip(grant(DISCOUNT), CERTIFICATE, Trip("round_trip", TODAY, 20_000), DISCOUNT, TODAY) == Accepted(
        20_000, 2, completed=False
    )
    last = grant(DISCOUNT, legs_counted=3, remaining=40_000 - 3 * 6000)
    assert decide_trip(last, CERTIFICATE, Trip("one_way", TODAY, 5000), DISCOUNT, TODAY) == Accepted(
        5000, 4, completed=True, release=40_000 - 3 * 6000 - 5000
    )


@pytest.mark.parametrize(
    ("certificate_status", "grant_status", "travelled", "reason"),
    [
        ("revoked", "cancelled", 0, "certificate_revoked"),
        ("expired", "expired", 0, "certificate_expired"),
        ("valid", "issued", 400, "certificate_expired"),
        ("valid", "waitlisted", 0, "grant_not_active"),
        ("valid", "issued", -31, "outside_window"),
        ("valid", "issued", 31, "outside_window"),
        ("valid", "issued", 3, "outside_window"),  # in the future
    ],
)
def test_trips_are_refused_with_the_reason(
    certificate_status: str, grant_status: str, travelled: int, reason: str
) -> None:
    certificate = CertificateState(
        "C-1", "r", "304018", TODAY - timedelta(days=30), TODAY + timedelta(days=334), certificate_status  # type: ignore[arg-type]
    )
    g = grant(VOUCHER, status=grant_status, window_until=TODAY + timedelta(days=30))
    decision = decide_trip(g, certificate, Trip("one_way", TODAY + timedelta(days=travelled)), VOUCHER, TODAY)
    assert isinstance(decision, Refused) and decision.reason == reason


def test_only_discount_trips_carry_a_positive_discount() -> None:
    check_discount("fare_discount", 1)
    check_discount("fare_voucher", None)
    for mechanism, discount in (("fare_discount", None), ("fare_discount", 0), ("fare_discount", -5),
                                ("fare_voucher", 100), ("mileage_grant", 100)):
        with pytest.raises(InvalidDiscount):
            check_discount(mechanism, discount)  # type: ignore[arg-type]


def test_ledger_kinds_move_the_budget_columns() -> None:
    assert ledger_deltas("top_up", 10) == (10, 0, 0)
    assert ledger_deltas("reserve", 10) == (-10, 10, 0)
    assert ledger_deltas("draw", 10) == (0, -10, 10)
    assert ledger_deltas("release", 10) == (10, -10, 0)
    assert ledger_deltas("debit", 10) == (-10, 0, 0)
    with pytest.raises(ValueError):
        ledger_deltas("top_up", 0)


def test_yen_convert_to_whole_miles_for_a_miles_budget() -> None:
    jal = program(MILEAGE)
    assert convert_to_program_unit(jal, "jpy", 60_001).credited == 30_000
    assert convert_to_program_unit(jal, "jpy", 60_001).remainder == 1
    assert convert_to_program_unit(jal, "miles", 5).credited == 5
    assert convert_top_up(jal, "jpy", 60_000) == 30_000
    with pytest.raises(AmountNotConvertible):
        convert_top_up(jal, "jpy", 3)
    with pytest.raises(UnitMismatch):
        convert_to_program_unit(program(VOUCHER), "miles", 5)
    for bad in (0, -1):
        with pytest.raises(InvalidAmount):
            convert_top_up(jal, "miles", bad)


def test_a_donation_naming_no_program_goes_where_grants_wait_longest() -> None:
    miles = program(MILEAGE, program_id="jal@422100")
    ferry = program(DISCOUNT, program_id="iki@422100")
    other_ferry = program(DISCOUNT, program_id="aaa@422100")
    candidates = [FundingCandidate(miles, 5), FundingCandidate(ferry, 9), FundingCandidate(other_ferry, None)]
    assert choose_program_for_donation(candidates, "miles", TODAY) is miles
    # yen: same-unit programs first, the longest waiting queue before a program with none
    assert choose_program_for_donation(candidates, "jpy", TODAY) is ferry
    assert choose_program_for_donation([FundingCandidate(miles, None)], "jpy", TODAY) is miles
    assert choose_program_for_donation([FundingCandidate(ferry, None)], "miles", TODAY) is None
    assert resolve_program_id("jal-dual-residence-miles", "304018") == "jal-dual-residence-miles@304018"
    assert resolve_program_id("x@304018", "302066") == "x@304018"
    assert resolve_program_id("x@3040", "302066") == "x@3040"  # no program of ours: the lookup finds none


# --- programme terms as the partners publish them (issue #19, rule 5) ------------------------------


def test_ana_is_seeded_with_fixed_fares_and_a_participant_cap_not_a_percentage() -> None:
    defaults = SubsidySettings().seed_defaults()
    susaki = seed_program(travel_program("ana-dual-residence-fare"), "392065", defaults)  # 高知県須崎市
    assert isinstance(susaki.parameters, DiscountParameters) and susaki.parameters.discount_percent is None
    assert susaki.fare_products == (FareProduct("羽田–高知", 11_000),) and susaki.participant_cap == 100
    chizu = seed_program(travel_program("ana-dual-residence-fare"), "313289", defaults)  # 鳥取県智頭町
    assert chizu.fare_products == () and chizu.participant_cap == 100
    ferry = seed_program(travel_program("sado-kisen-ferry"), "152242", defaults)
    assert isinstance(ferry.parameters, DiscountParameters) and ferry.parameters.discount_percent == 30
    assert ferry.participant_cap is None and not ferry.one_region_per_year
    jal = seed_program(travel_program("jal-dual-residence-miles"), "304018", defaults)
    assert jal.one_region_per_year and jal.participant_cap is None


def test_a_fare_discount_is_a_percentage_or_fixed_fares_for_capped_participants() -> None:
    percent = parse_parameters("fare_discount", {"discount_percent": 30, "max_discount_jpy": 1, "max_one_ways": 1})
    fixed = parse_parameters("fare_discount", {"max_discount_jpy": 1, "max_one_ways": 1})
    check_programme_terms("fare_discount", percent, (), None)
    check_programme_terms("fare_discount", fixed, (FareProduct("羽田–高知", 11_000),), 10)
    with pytest.raises(InvalidProgramParameters):  # neither: no percentage and no cap
        check_programme_terms("fare_discount", fixed, (FareProduct("羽田–高知", 11_000),), None)
    with pytest.raises(InvalidProgramParameters):  # both
        check_programme_terms("fare_discount", percent, (FareProduct("羽田–高知", 11_000),), 10)
    with pytest.raises(InvalidProgramParameters):
        check_programme_terms("fare_discount", fixed, (FareProduct("羽田–高知", 0),), 10)
    with pytest.raises(InvalidProgramParameters):
        check_programme_terms("mileage_grant", MILEAGE, (FareProduct("羽田–高知", 11_000),), None)


def _program(**terms: object) -> Program:
    base = seed_program(travel_program("jal-dual-residence-miles"), "304018", SubsidySettings().seed_defaults())
    return Program(**{**{f: getattr(base, f) for f in base.__dataclass_fields__}, **terms})


def test_the_participant_cap_fills_the_program() -> None:
    capped = _program(participant_cap=2)
    assert not capped.is_full(0) and not capped.is_full(1) and capped.is_full(2)
    assert not _program(participant_cap=None).is_full(10_000)


def test_a_jal_grant_is_made_in_one_region_per_certificate_year() -> None:
    jal = _program(one_region_per_year=True)
    window = (TODAY, TODAY + timedelta(days=121))
    shirahama = HeldGrant("g1", "304018", "issued", TODAY - timedelta(days=10), TODAY + timedelta(days=111))
    assert one_region_conflict(jal, "422100", window, [shirahama]) == shirahama  # 壱岐市 too: refused
    assert one_region_conflict(jal, "304018", window, [shirahama]) is None  # the same town: its own rule
    used_up = HeldGrant("g2", "304018", "completed", *window)
    assert one_region_conflict(jal, "422100", window, [used_up]) == used_up
    cancelled = HeldGrant("g3", "304018", "cancelled", *window)
    assert one_region_conflict(jal, "422100", window, [cancelled]) is None
    last_year = HeldGrant("g4", "304018", "completed", TODAY - timedelta(days=400), TODAY - timedelta(days=279))
    assert one_region_conflict(jal, "422100", window, [last_year]) is None  # another certificate year
    assert one_region_conflict(_program(one_region_per_year=False), "422100", window, [shirahama]) is None
