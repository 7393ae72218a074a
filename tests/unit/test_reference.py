from __future__ import annotations

import itertools
from collections import Counter
from datetime import date
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from shared import reference
from shared.reference import (
    AmbiguousMunicipality,
    MunicipalityCode,
    UnknownMunicipality,
    check_digit,
    find_municipality,
    find_municipality_by_full_name,
    is_valid_code,
    municipalities,
    municipalities_with_plan,
    municipality,
    plans,
    prefecture_of,
    prefectures,
    support_corporations,
    travel_program,
    travel_programs,
)


class _Request(BaseModel):
    municipality_code: MunicipalityCode


def _unknown_valid_code() -> str:
    """The first code with a correct check digit that is not in the table."""
    known = municipalities()
    for number in range(1000, 100000):
        code5 = f"{number:05d}"
        code6 = code5 + str(check_digit(code5))
        if code6 not in known:
            return code6
    raise AssertionError("every code exists")


# --- municipalities -----------------------------------------------------------------------------


def test_counts_match_the_readme() -> None:
    table = municipalities()
    kinds = Counter(entry.kind for entry in table.values())
    assert len(table) == 1965
    assert kinds["prefecture"] == 47
    assert kinds["city"] == 792
    assert kinds["town"] == 743
    assert kinds["village"] == 189  # 183 村 + the 6 北方領土 villages
    assert kinds["ward"] == 23  # 特別区
    assert kinds["designated_ward"] == 171
    northern = [entry for entry in table.values() if entry.northern_territories]
    assert len(northern) == 6
    assert all(entry.kind == "village" and entry.prefecture == "北海道" for entry in northern)
    proper = [
        entry
        for entry in table.values()
        if entry.kind in ("city", "town", "village", "ward") and not entry.northern_territories
    ]
    assert len(proper) == 1741
    assert sum(entry.designated_city for entry in table.values()) == 20
    assert len(prefectures()) == 47
    assert prefectures()[0].name == "北海道"
    assert prefectures()[-1].name == "沖縄県"


def test_every_code_passes_the_check_digit() -> None:
    for code, entry in municipalities().items():
        assert code == entry.code
        assert len(code) == 6
        assert entry.code5 == code[:5]
        assert is_valid_code(code), code
        assert int(code[5]) == check_digit(entry.code5)


def test_codes_keep_leading_zeros() -> None:
    hokkaido = municipality("010006")
    assert hokkaido.kind == "prefecture"
    assert hokkaido.code5 == "01000"
    assert municipality("011002").name == "札幌市"


def test_prefecture_code_is_the_prefecture_row() -> None:
    table = municipalities()
    for entry in table.values():
        prefecture = table[entry.prefecture_code]
        assert prefecture.kind == "prefecture"
        assert prefecture.prefecture == entry.prefecture
        assert prefecture_of(entry.code) == prefecture


def test_designated_wards_point_at_their_city() -> None:
    table = municipalities()
    for entry in table.values():
        if entry.kind == "designated_ward":
            assert entry.parent_code is not None
            parent = table[entry.parent_code]
            assert parent.designated_city
            assert entry.name.startswith(parent.name)
        else:
            assert entry.parent_code is None


def test_check_digit_examples() -> None:
    assert check_digit("30000") == 4
    assert check_digit("30401") == 8
    assert is_valid_code("300004")
    assert not is_valid_code("300005")
    assert not is_valid_code("30000")
    assert not is_valid_code("3000040")
    assert not is_valid_code("３００００４")  # full-width digits
    with pytest.raises(ValueError, match="5 digits"):
        check_digit("3000")


def test_shirahama_resolves_with_its_prefecture() -> None:
    shirahama = find_municipality("和歌山県", "白浜町")
    assert shirahama.code == "304018"
    assert shirahama.kind == "town"
    assert shirahama.full_name == "和歌山県白浜町"
    assert shirahama.prefecture_code == "300004"
    wakayama = prefecture_of(shirahama.code)
    assert wakayama.code == "300004"
    assert wakayama.name == "和歌山県"
    assert wakayama.full_name == "和歌山県"
    assert find_municipality_by_full_name("和歌山県白浜町") == shirahama
    assert find_municipality_by_full_name("和歌山県") == wakayama


def test_two_tomari_villages_are_ambiguous() -> None:
    with pytest.raises(AmbiguousMunicipality) as raised:
        find_municipality("北海道", "泊村")
    codes = {candidate.code for candidate in raised.value.candidates}
    assert len(codes) == 2
    assert {municipality(code).northern_territories for code in codes} == {True, False}


def test_unknown_lookups_raise_unknown_municipality() -> None:
    with pytest.raises(UnknownMunicipality, match="unknown municipality code"):
        municipality(_unknown_valid_code())
    with pytest.raises(KeyError):
        municipality("abc")
    with pytest.raises(UnknownMunicipality):
        find_municipality("和歌山県", "存在しない町")
    with pytest.raises(UnknownMunicipality):
        find_municipality_by_full_name("白浜町")
    with pytest.raises(UnknownMunicipality):
        prefecture_of("999999")


# --- the pydantic type --------------------------------------------------------------------------


def test_municipality_code_accepts_a_known_code() -> None:
    assert _Request(municipality_code="304018").municipality_code == "304018"
    parsed = _Request.model_validate_json('{"municipality_code": "010006"}')
    assert parsed.municipality_code == "010006"
    assert parsed.model_dump_json() == '{"municipality_code":"010006"}'


@pytest.mark.parametrize("value", ["30401", "3040180", "30401a", " 304018", "304018 ", "３０４０１８", ""])
def test_municipality_code_rejects_a_wrong_format(value: str) -> None:
    with pytest.raises(ValidationError, match="must be 6 digits"):
        _Request(municipality_code=value)


@pytest.mark.parametrize("value", [304018, 304018.0, b"304018", None])
def test_municipality_code_accepts_strings_only(value: object) -> None:
    with pytest.raises(ValidationError, match="must be a string of 6 digits"):
        _Request.model_validate({"municipality_code": value})
    with pytest.raises(ValidationError):
        _Request.model_validate_json('{"municipality_code": 304018}')


def test_municipality_code_rejects_a_wrong_check_digit() -> None:
    for wrong in "0123456789":
        if wrong == "8":
            continue
        with pytest.raises(ValidationError, match=r"check digit .* does not match"):
            _Request(municipality_code="30401" + wrong)


def test_municipality_code_rejects_an_unknown_code() -> None:
    code = _unknown_valid_code()
    assert is_valid_code(code)
    with pytest.raises(ValidationError, match="unknown municipality code"):
        _Request(municipality_code=code)


def test_municipality_code_json_schema() -> None:
    schema = _Request.model_json_schema()["properties"]["municipality_code"]
    assert schema["type"] == "string"
    assert schema["pattern"] == "^[0-9]{6}$"


# --- plans and support corporations -------------------------------------------------------------


def test_plans_resolve_to_codes() -> None:
    all_plans = plans()
    municipal = [plan for plan in all_plans if plan.level == "municipality"]
    prefectural = [plan for plan in all_plans if plan.level == "prefecture"]
    assert len(municipal) == 28
    assert len(prefectural) == 20
    for plan in municipal:
        assert plan.municipality is not None
        entry = municipality(plan.municipality_code)
        assert (entry.prefecture, entry.name) == (plan.prefecture, plan.municipality)
        assert plan.plan == reference.SPECIFIC_RESIDENCE_PLAN
    for plan in prefectural:
        assert plan.municipality is None
        entry = municipality(plan.municipality_code)
        assert entry.kind == "prefecture"
        assert entry.name == plan.prefecture
        assert plan.plan == reference.REGIONAL_BASE_PLAN
    assert all(date(2025, 1, 1) <= plan.adopted_on <= date(2025, 12, 31) for plan in all_plans)


def test_shirahama_has_a_plan() -> None:
    with_plan = municipalities_with_plan()
    assert len(with_plan) == 28
    assert find_municipality("和歌山県", "白浜町").code in with_plan
    assert municipality("300004").code not in with_plan  # a prefectural plan is not a 特定居住促進計画
    assert "304018" not in municipalities_with_plan(as_of=date(2025, 7, 9))
    assert "304018" in municipalities_with_plan(as_of=date(2025, 7, 10))


def test_plans_returns_a_fresh_list() -> None:
    first = plans()
    first.clear()
    assert len(plans()) == 48


def test_support_corporations_resolve() -> None:
    corporations = support_corporations()
    assert len(corporations) == 51
    for corporation in corporations:
        entry = municipality(corporation.municipality_code)
        assert (entry.prefecture, entry.name) == (corporation.prefecture, corporation.municipality)
    shirahama = {c.corporation for c in corporations if c.municipality_code == "304018"}
    assert shirahama == {"日本航空(株)", "オーエス(株)"}


# --- travel programs ----------------------------------------------------------------------------


def test_jal_program() -> None:
    jal = travel_program("jal-dual-residence-miles")
    assert jal.partner == "JAL"
    assert jal.partner_code == "jal"
    assert jal.partner_kind == "airline"
    assert jal.mechanism == "mileage_grant"
    assert len(jal.municipality_codes) == 6
    assert [municipality(code).full_name for code in jal.municipality_codes] == [
        "北海道上士幌町",
        "和歌山県田辺市",
        "和歌山県白浜町",
        "和歌山県すさみ町",
        "香川県三豊市",
        "長崎県壱岐市",
    ]
    assert dict(jal.demo_parameters) == {"miles_per_one_way": 7500, "max_one_ways": 4, "window_days": 122}


def test_travel_programs() -> None:
    programs = {program.program_id: program for program in travel_programs()}
    assert len(programs) == 5
    assert {program.partner_code for program in programs.values()} == {
        "jal",
        "ana",
        "jreast",
        "sadokisen",
        "kyushuyusen",
    }
    assert len(programs["ana-dual-residence-fare"].municipality_codes) == 9
    # ANA sells fixed fares to a limited number of participants: a cap (illustrative), no percentage.
    assert dict(programs["ana-dual-residence-fare"].demo_parameters) == {"participant_cap": 100}
    assert dict(programs["jr-east-sanjo-shinkansen"].demo_parameters) == {
        "voucher_jpy": 5000,
        "max_one_ways": 8,
    }
    assert programs["jr-east-sanjo-shinkansen"].partner_kind == "rail"
    assert programs["jr-east-sanjo-shinkansen"].mechanism == "fare_voucher"
    assert programs["sado-kisen-ferry"].municipality_codes == (find_municipality("新潟県", "佐渡市").code,)
    for program in programs.values():
        for code in program.municipality_codes:
            assert is_valid_code(code)
            assert code in municipalities()
    with pytest.raises(KeyError):
        travel_program("no-such-program")


def test_demo_parameters_are_read_only() -> None:
    jal = travel_program("jal-dual-residence-miles")
    with pytest.raises(TypeError):
        jal.demo_parameters["max_one_ways"] = 99  # type: ignore[index]
    assert hash(jal) == hash(travel_program("jal-dual-residence-miles"))


def test_parse_demo_parameters() -> None:
    assert reference.parse_demo_parameters("a=1 (x); b = 20; prose only; c=1.5; d=-3") == {
        "a": 1,
        "b": 20,
        "d": -3,
    }
    assert reference.parse_demo_parameters("") == {}


# --- hometown tax -------------------------------------------------------------------------------


def test_tokyo_is_never_designated_and_every_other_period_is_sourced_and_closed_in_order() -> None:
    periods = reference.not_designated_periods()
    tokyo = find_municipality("東京都", "東京都").code
    assert [p for p in periods if p.end is None] == [p for p in periods if p.municipality_code == tokyo]
    assert reference.not_designated_on(tokyo, date(2019, 6, 1)) is not None
    assert reference.not_designated_on(tokyo, date(2019, 5, 31)) is None  # the system began in June 2019
    by_code: dict[str, list[reference.NotDesignatedPeriod]] = {}
    for period in periods:
        assert period.source.startswith("http")
        assert period.start >= date(2019, 6, 1)
        assert period.end is None or period.end >= period.start
        by_code.setdefault(period.municipality_code, []).append(period)
    for listed in by_code.values():  # no overlap: みやき町 has two periods, six years apart
        listed.sort(key=lambda p: p.start)
        for earlier, later in itertools.pairwise(listed):
            assert earlier.end is not None and earlier.end < later.start
    assert len(by_code[find_municipality("佐賀県", "みやき町").code]) == 2
    # The demo's town is designated.
    assert reference.not_designated_on(find_municipality("和歌山県", "白浜町").code, date(2026, 12, 1)) is None


def test_non_recipients_of_allocation_tax() -> None:
    tokyo = find_municipality("東京都", "東京都").code
    entry = reference.allocation_tax_non_recipient(tokyo, 2026)
    assert entry is not None and entry.metropolitan_zone == "whole"
    kodaira = find_municipality("東京都", "小平市").code
    assert reference.allocation_tax_non_recipient(kodaira, 2023) is None
    assert reference.allocation_tax_non_recipient(kodaira, 2024) is not None
    hakone = reference.allocation_tax_non_recipient(find_municipality("神奈川県", "箱根町").code, 2025)
    assert hakone is not None and hakone.metropolitan_zone == "none"
    # Only 東京都 among the prefectures.
    prefecture_codes = {p.code for p in prefectures()}
    assert {n.municipality_code for n in reference.allocation_tax_non_recipients()} & prefecture_codes == {tokyo}


def test_every_programme_municipality_has_a_revitalisation_plan_on_file() -> None:
    plans = reference.revitalisation_plans()
    assert len({p.plan_id for p in plans}) == len(plans)
    with_plan = {p.municipality_code for p in plans}
    for program in travel_programs():
        assert set(program.municipality_codes) <= with_plan, program.program_id
    wakayama = reference.revitalisation_plan("300004-machi-hito-shigoto")
    assert (wakayama.sample, wakayama.certified_on, wakayama.from_fiscal_year) == (False, date(2025, 3, 31), 2025)
    for plan in plans:
        # A sample plan says so in its name and its source; a real one cites where it was published.
        assert plan.sample == plan.plan_id.startswith("sample-") == ("サンプル" in plan.name)
        assert plan.source.startswith("http") or plan.sample
    with pytest.raises(KeyError):
        reference.revitalisation_plan("no-such-plan")


# --- packaging ----------------------------------------------------------------------------------


def test_data_is_bundled_in_the_package() -> None:
    data = Path(reference.__file__).parent / "data"
    for name in (
        "municipalities.csv", "plans.csv", "support_corporations.csv", "travel_programs.csv",
        "hometown_tax_designation.csv", "local_allocation_tax_non_recipients.csv", "regional_revitalisation_plans.csv",
    ):
        assert (data / name).is_file()


def test_programme_terms_as_the_partners_publish_them() -> None:
    """JAL: one region per resident and certificate year; ANA: fixed fares per prefecture (domain brief:
    羽田–高知 ¥11,000, 羽田–佐賀 ¥14,000; 鳥取県's fares are not in our sources)."""
    programs = {program.program_id: program for program in travel_programs()}
    assert [p for p, program in programs.items() if program.one_region_per_year] == ["jal-dual-residence-miles"]
    ana = programs["ana-dual-residence-fare"]
    susaki, kanzaki, chizu = (find_municipality(*name).code for name in
                              (("高知県", "須崎市"), ("佐賀県", "神埼市"), ("鳥取県", "智頭町")))
    assert [(f.route, f.fare_jpy) for f in ana.fare_products_for(susaki)] == [("羽田–高知", 11000)]
    assert [(f.route, f.fare_jpy) for f in ana.fare_products_for(kanzaki)] == [("羽田–佐賀", 14000)]
    assert ana.fare_products_for(chizu) == ()
    assert all(not program.fare_products for p, program in programs.items() if p != "ana-dual-residence-fare")
