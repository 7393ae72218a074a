"""Insights' rules: what events change, who reads which scope, small-cell suppression, the KPI line."""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime

import pytest

from services.insights.domain import (
    KPI_DEADLINE,
    OutOfScope,
    RelationshipFigure,
    Scope,
    UnknownArea,
    changes_of,
    kpi_line,
    kpis,
    scope_for,
    suppress,
    with_population,
)
from services.insights.population import population_of, populations
from shared.contracts.registration import RegistrationWithdrawn, ResidentRegistered, ResidentWithdrawn
from shared.contracts.subsidy import GrantRedeemed
from shared.kit.auth import Principal, Role
from shared.reference.municipalities import municipalities
from tests.support import seal_for_tests

SHIRAHAMA, TANABE, WAKAYAMA, TOKYO, CHIYODA = "304018", "302066", "300004", "130001", "131016"
AT = datetime(2025, 12, 31, 16, 30, tzinfo=UTC)  # 2026-01-01 01:30 in Japan


def registered(resident: str, registration: str, code: str = SHIRAHAMA) -> ResidentRegistered:
    return ResidentRegistered(
        resident_id=resident, registration_id=registration, municipality_code=code, prefecture_code=WAKAYAMA,
        tier="basic", status="active", legal_address_code=CHIYODA, contact=seal_for_tests(resident, "x"),
        registered_at=AT,
    )


def test_a_registration_is_dated_by_the_japanese_calendar() -> None:
    [change] = changes_of([registered("r1", "g1")], {})
    assert change.op == "register"
    assert change.args == ("g1", "r1", SHIRAHAMA, WAKAYAMA, "basic", "active", date(2026, 1, 1))


def test_a_registration_counts_the_prefecture_registration_it_brought() -> None:
    event = registered("r1", "g1").model_copy(update={"derived_prefecture_registration_id": "g1-pref"})
    town, prefecture = changes_of([event], {})
    assert town.args == ("g1", "r1", SHIRAHAMA, WAKAYAMA, "basic", "active", date(2026, 1, 1))
    assert prefecture.args == ("g1-pref", "r1", WAKAYAMA, WAKAYAMA, "basic", "active", date(2026, 1, 1))
    # Read again after the person's erasure: both counted, both ended on that day, no id.
    late = changes_of([event], {"r1": date(2026, 2, 1)})
    assert [(c.op, c.args[0]) for c in late] == [
        ("register", "g1"), ("end_registration", "g1"), ("register", "g1-pref"), ("end_registration", "g1-pref")]
    assert late[0].args[1] is None and late[2].args[1] is None


def test_an_erased_resident_leaves_counts_but_never_an_id() -> None:
    erased: dict[str, date] = {}
    changes = changes_of([
        registered("r1", "g1"),
        ResidentWithdrawn(resident_id="r1", withdrawn_at=AT),
        registered("r1", "g2", TANABE),  # a late event about the erased person: counted, without the id
        RegistrationWithdrawn(resident_id="r1", registration_id="g2", municipality_code=TANABE, withdrawn_at=AT),
    ], erased)
    assert [c.op for c in changes] == ["register", "erase", "register", "end_registration", "end_registration"]
    assert changes[0].args[1] == "r1"  # before the erasure; the erase statement clears it
    assert changes[2].args[1] is None
    assert erased == {"r1": date(2026, 1, 1)}


def test_a_resident_known_erased_is_never_written_and_their_registration_ends() -> None:
    # a rebuild reads the registration again after the erasure was recorded
    register, end = changes_of([registered("r9", "g9")], {"r9": date(2026, 2, 3)})
    assert register.args[1] is None
    assert (end.op, end.args) == ("end_registration", ("g9", "withdrawn", date(2026, 2, 3)))


def test_a_redemption_carries_the_amount_and_whether_the_grant_is_used_up() -> None:
    event = GrantRedeemed(
        grant_id="gr1", program_id="jal@304018", partner="jal", mechanism="mileage_grant", certificate_number="N1",
        resident_id="r1", municipality_code=SHIRAHAMA, trip_id="t1", unit="miles", amount=7500, trips_counted=1,
        completed=True, redeemed_at=AT,
    )
    [change] = changes_of([event], {})
    assert "r1" not in change.args  # grants keep no resident
    assert change.args[-3:] == (7500, date(2026, 1, 1), True)


# --- scopes ------------------------------------------------------------------------------------------


def principal(role: Role, **claims: str) -> Principal:
    return Principal(subject="someone", role=role, **claims)  # type: ignore[arg-type]


def test_staff_read_their_municipality_only() -> None:
    staff = principal(Role.STAFF, municipality=SHIRAHAMA)
    assert scope_for(staff, None, None) == Scope(WAKAYAMA, SHIRAHAMA)
    assert scope_for(staff, WAKAYAMA, SHIRAHAMA) == Scope(WAKAYAMA, SHIRAHAMA)
    with pytest.raises(OutOfScope):
        scope_for(staff, None, TANABE)
    with pytest.raises(OutOfScope):
        scope_for(staff, TOKYO, None)


def test_prefecture_readers_read_their_prefectures_municipalities() -> None:
    reader = principal(Role.PREFECTURE, prefecture=WAKAYAMA)
    assert scope_for(reader, None, None) == Scope(WAKAYAMA)
    assert scope_for(reader, None, TANABE) == Scope(WAKAYAMA, TANABE)
    with pytest.raises(OutOfScope):
        scope_for(reader, None, CHIYODA)
    with pytest.raises(OutOfScope):
        scope_for(reader, TOKYO, None)


@pytest.mark.parametrize("role", [Role.MINISTRY, Role.ADMIN])
def test_the_ministry_and_admins_read_everything(role: Role) -> None:
    assert scope_for(principal(role), None, None) == Scope()
    assert scope_for(principal(role), TOKYO, None) == Scope(TOKYO)


def test_residents_and_partners_read_no_insights() -> None:
    with pytest.raises(OutOfScope):
        scope_for(principal(Role.RESIDENT), None, None)
    with pytest.raises(OutOfScope):
        scope_for(principal(Role.PARTNER, partner="jal"), None, None)


def test_areas_are_checked() -> None:
    with pytest.raises(UnknownArea):
        scope_for(None, SHIRAHAMA, None)  # a municipality is not a prefecture
    with pytest.raises(UnknownArea):
        scope_for(None, TOKYO, SHIRAHAMA)  # not in that prefecture
    with pytest.raises(UnknownArea):
        scope_for(None, None, "304019")  # no such code


# --- suppression -------------------------------------------------------------------------------------


def test_every_cell_under_ten_is_withheld() -> None:
    [row] = suppress([("a", "p", {"basic": 9, "premium": 10, "total": 19})])
    assert row.cells["basic"] is None and row.cells["premium"] is not None
    assert row.suppressed[0] == "basic"


def test_one_withheld_cell_beside_a_total_takes_another_with_it() -> None:
    # basic 3 alone withheld: total 50 - premium 47 would give it back
    [row] = suppress([("a", "p", {"basic": 3, "premium": 47, "total": 50})], total="total")
    assert row.cells == {"basic": None, "premium": None, "total": 50}
    # two withheld already: nothing more needed
    [row] = suppress([("a", "p", {"basic": 3, "premium": 4, "total": 7})], total="total")
    assert row.cells == {"basic": None, "premium": None, "total": None}


def test_no_withheld_cell_can_be_worked_out_from_shown_sums() -> None:
    counts = [3, 12, 40, 0, 9, 25, 11]
    rows = [(f"m{i}", "p" if i < 4 else "q", {"basic": b, "premium": p, "total": b + p})
            for i, (b, p) in enumerate(itertools.pairwise(counts))]
    out = suppress(rows, total="total", group_sums=True)
    for row in out:
        assert all(v is None or v >= 10 for v in row.cells.values())
        withheld = row.suppressed
        assert len(withheld) != 1, f"{row.key}: a lone withheld cell beside its total"
    for group in ("p", "q"):
        for column in ("basic", "premium", "total"):
            hidden = [r for r in out if r.group == group and r.cells[column] is None]
            assert len(hidden) != 1, f"{group}/{column}: a lone withheld cell beside the group's sum"


def test_per_1000_needs_a_population() -> None:
    figure = RelationshipFigure(SHIRAHAMA, WAKAYAMA, registered=30, certified=5, people=32)
    assert figure.per_1000 is None
    assert RelationshipFigure(SHIRAHAMA, WAKAYAMA, 30, 5, 32, population=20_000).per_1000 == 1.6


# --- the bundled population table (住民基本台帳, 2025-01-01) ------------------------------------------


def test_the_population_table_covers_every_municipality_by_a_known_code() -> None:
    table = populations()
    every = municipalities()
    kinds = {code: m.kind for code, m in every.items()}
    assert set(table) <= set(kinds), "every code6 is a code of municipalities.csv"
    kinds_kept = {"city", "town", "village", "ward"}
    inhabited = {c for c, m in every.items() if m.kind in kinds_kept and not m.northern_territories}
    assert inhabited <= set(table)
    assert sum(1 for c in table if kinds[c] != "designated_ward") == 1_741
    assert all(p > 0 for p in table.values())


def test_the_population_table_holds_the_ministrys_figures() -> None:
    # 表25-03 【総計】, column 人口 計, as the ministry's workbook has them
    assert population_of(SHIRAHAMA) == 19_753
    assert population_of(CHIYODA) == 68_835
    assert population_of("011002") == 1_955_678  # 札幌市, the city as a whole
    assert population_of("011011") == 245_916  # 札幌市中央区
    assert population_of("016951") is None  # 色丹村 (北方領土): no one registered, no base


def test_a_relationship_figure_now_has_a_per_1000() -> None:
    figure = with_population(RelationshipFigure(SHIRAHAMA, WAKAYAMA, 30, 5, 32), population_of(SHIRAHAMA))
    assert figure.population == 19_753
    assert figure.per_1000 == round(32 * 1000 / 19_753, 3) == 1.62


# --- KPIs --------------------------------------------------------------------------------------------


def test_the_line_runs_from_entry_into_force_to_600_five_years_later() -> None:
    assert kpi_line(date(2024, 10, 31)) == 0
    assert kpi_line(KPI_DEADLINE) == 600
    assert kpi_line(date(2031, 1, 1)) == 600
    assert 299 < kpi_line(date(2027, 5, 1)) < 301


def test_kpis_count_what_is_in_force_each_month() -> None:
    plans = [(date(2025, 3, 21), None), (date(2025, 6, 6), date(2025, 9, 1)), (date(2026, 2, 1), None)]
    corporations = [(date(2025, 2, 25), None)]
    k = kpis(plans, corporations, date(2026, 1, 15))
    assert (k.plans_in_force, k.plans_made, k.corporations_designated) == (1, 3, 1)
    by_month = {p.month_end: p for p in k.series}
    assert by_month[date(2025, 7, 31)].plans == 2
    assert by_month[date(2025, 9, 30)].plans == 1
    assert by_month[date(2026, 1, 31)].plans == 1  # as of today: the February plan not yet
    assert by_month[date(2026, 2, 28)].plans is None  # to come: the line only
    assert k.series[-1].month_end == KPI_DEADLINE and k.series[-1].line == 600
