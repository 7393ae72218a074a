"""The planning rules without I/O: the plan lifecycle and its versions, the prefectural prerequisite,
support corporations, proposals and councils, and the reference seed they start from."""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from services.planning import domain
from services.planning.domain import (
    Council,
    CouncilMeeting,
    CouncilMember,
    Plan,
)
from shared.contracts.planning import PlanContent
from shared.reference import plans, support_corporations

SHIRAHAMA = "304018"  # 和歌山県白浜町
WAKAYAMA = "300004"  # 和歌山県
HACHIOJI = "132012"  # 東京都八王子市
TOKYO = "130001"  # 東京都: no prefectural plan in the seed
DAY = date(2026, 4, 1)
CONTENT = PlanContent(area="白浜町全域", basic_policy="海と温泉の町で、仕事と暮らしを二地域で",
                      residents_sought="テレワーカー", base_facilities=["移住交流拠点"])


def prefectural(code: str = WAKAYAMA, *, on: date = DAY - timedelta(days=30), covers: bool = True) -> Plan:
    plan = domain.draft_plan("pln-pref", "prefecture", code, CONTENT, covers_dual_residence=covers, live=None)
    plan = domain.submit_for_consultation(plan, on, None, None)
    return domain.adopt(plan, on, None)


def consulted(code: str = SHIRAHAMA) -> Plan:
    plan = domain.draft_plan("pln-1", "municipality", code, CONTENT, covers_dual_residence=False, live=None)
    return domain.submit_for_consultation(plan, DAY, None, None)


def test_a_plan_goes_draft_consultation_adopted_amended_withdrawn() -> None:
    plan = domain.draft_plan("pln-1", "municipality", SHIRAHAMA, CONTENT, covers_dual_residence=True, live=None)
    assert (plan.status, plan.name, plan.prefecture_code, plan.public) == ("draft", "特定居住促進計画", WAKAYAMA, False)
    assert plan.covers_dual_residence is False  # only a prefectural plan has a 特定居住 section
    plan = domain.submit_for_consultation(plan, DAY, None, None)
    assert plan.status == "consultation" and plan.pending is not None and plan.pending.consulted_on == DAY
    plan = domain.adopt(plan, DAY, prefectural())
    assert (plan.status, plan.adopted_on, plan.public) == ("adopted", DAY, True)
    assert plan.in_force is not None and plan.in_force.version == 1 and plan.pending is None

    changed = CONTENT.model_copy(update={"work_facilities": ["コワーキングスペース"]})
    plan = domain.start_amendment(plan, changed)
    # the draft amendment does not touch what is public
    assert plan.status == "adopted" and plan.in_force is not None and plan.in_force.content == CONTENT
    assert plan.pending is not None and plan.pending.version == 2
    plan = domain.submit_for_consultation(plan, DAY + timedelta(days=10), None, None)
    assert plan.status == "adopted"  # consulting on an amendment leaves the plan adopted
    plan = domain.adopt(plan, DAY + timedelta(days=20), prefectural())
    assert plan.status == "amended"
    assert plan.in_force is not None and (plan.in_force.version, plan.in_force.content) == (2, changed)
    assert [v.status for v in plan.versions] == ["superseded", "in_force"]
    assert plan.adopted_on == DAY  # first adoption kept

    plan = domain.withdraw(plan, DAY + timedelta(days=30), "policy_ended")
    assert (plan.status, plan.public, plan.in_force) == ("withdrawn", False, None)
    with pytest.raises(domain.PlanStateConflict):
        domain.withdraw(plan, DAY, "other")


def test_out_of_order_steps_are_refused() -> None:
    draft = domain.draft_plan("pln-1", "municipality", SHIRAHAMA, CONTENT, covers_dual_residence=False, live=None)
    with pytest.raises(domain.PlanStateConflict):
        domain.adopt(draft, DAY, prefectural())  # no consultation yet
    with pytest.raises(domain.PlanStateConflict):
        domain.start_amendment(draft, CONTENT)  # only an adopted plan is amended
    in_consultation = domain.submit_for_consultation(draft, DAY, None, None)
    with pytest.raises(domain.PlanStateConflict):
        domain.submit_for_consultation(in_consultation, DAY, None, None)
    adopted = domain.adopt(in_consultation, DAY, prefectural())
    amending = domain.start_amendment(adopted, CONTENT)
    with pytest.raises(domain.PlanStateConflict):
        domain.start_amendment(amending, CONTENT)  # one version under way at a time
    amending = domain.submit_for_consultation(amending, DAY, None, None)
    with pytest.raises(domain.PlanStateConflict):
        domain.adopt(amending, DAY - timedelta(days=1), prefectural())  # not before the version it replaces


def test_one_live_plan_per_body_and_level() -> None:
    live = consulted()
    with pytest.raises(domain.PlanAlreadyExists):
        domain.draft_plan("pln-2", "municipality", SHIRAHAMA, CONTENT, covers_dual_residence=False, live=live)


def test_plans_are_made_by_the_right_body() -> None:
    with pytest.raises(domain.NotAPlanningBody):
        domain.draft_plan("p", "prefecture", SHIRAHAMA, CONTENT, covers_dual_residence=True, live=None)
    with pytest.raises(domain.NotAPlanningBody):
        domain.draft_plan("p", "municipality", WAKAYAMA, CONTENT, covers_dual_residence=False, live=None)
    with pytest.raises(domain.NotAPlanningBody):
        domain.draft_plan("p", "municipality", "999999", CONTENT, covers_dual_residence=False, live=None)


def test_a_municipal_plan_needs_an_adopted_prefectural_plan_covering_dual_residence() -> None:
    plan = consulted(HACHIOJI)
    with pytest.raises(domain.PrefecturalPlanMissing) as refused:
        domain.adopt(plan, DAY, None)
    assert refused.value.extra == {"prefecture_code": TOKYO} and "東京都" in refused.value.detail
    with pytest.raises(domain.PrefecturalPlanMissing):  # a prefectural plan without a 特定居住 section
        domain.adopt(consulted(), DAY, prefectural(covers=False))
    with pytest.raises(domain.PrefecturalPlanMissing):  # adopted only after the day
        domain.adopt(consulted(), DAY, prefectural(on=DAY + timedelta(days=1)))
    draft_only = domain.draft_plan("pln-pref", "prefecture", WAKAYAMA, CONTENT, covers_dual_residence=True, live=None)
    with pytest.raises(domain.PrefecturalPlanMissing):  # not adopted at all
        domain.adopt(consulted(), DAY, draft_only)
    assert domain.adopt(consulted(), DAY, prefectural(on=DAY)).status == "adopted"  # the same day will do
    # a prefectural plan needs nothing above it
    assert prefectural(TOKYO).status == "adopted"


def test_consultation_names_a_meeting_of_the_plans_own_council() -> None:
    plan = domain.draft_plan("pln-1", "municipality", SHIRAHAMA, CONTENT, covers_dual_residence=False, live=None)
    own = domain.form_council("c-1", SHIRAHAMA, "白浜町特定居住促進協議会", DAY, (), None)
    other = domain.form_council("c-2", HACHIOJI, "八王子市協議会", DAY, (), None)
    meeting = domain.hold_meeting(own, "m-1", DAY, "計画案について", "賛成多数", plan)
    consulted_plan = domain.submit_for_consultation(plan, DAY, meeting, own)
    assert consulted_plan.pending is not None and consulted_plan.pending.consultation_meeting_id == "m-1"
    foreign = CouncilMeeting("m-2", other.council_id, DAY, "x", "y")
    with pytest.raises(domain.MeetingOfAnotherMunicipality):
        domain.submit_for_consultation(plan, DAY, foreign, other)
    with pytest.raises(domain.MeetingOfAnotherMunicipality):
        domain.hold_meeting(other, "m-3", DAY, "x", "y", plan)


def test_a_corporation_is_designated_supervised_and_revoked() -> None:
    applied = domain.apply_for_designation("spc-1", SHIRAHAMA, "(株)白浜暮らし", ("housing", "work", "housing"), DAY)
    assert applied.status == "applied" and applied.services == ("housing", "work")
    with pytest.raises(domain.CorporationNotDesignated):
        domain.receive_report(applied, "r-1", DAY, DAY, DAY, "x")
    with pytest.raises(domain.CorporationStateConflict):
        domain.revoke(applied, DAY, "other")
    designated = domain.designate(applied, DAY + timedelta(days=5))
    assert (designated.status, designated.designated_on) == ("designated", DAY + timedelta(days=5))
    with pytest.raises(domain.CorporationStateConflict):
        domain.designate(designated, DAY)
    report = domain.receive_report(designated, "r-1", date(2026, 4, 1), date(2027, 3, 31), DAY, "空き家相談 12件")
    assert report.summary == "空き家相談 12件"
    with pytest.raises(domain.InvalidPeriod):
        domain.receive_report(designated, "r-2", DAY, DAY - timedelta(days=1), DAY, "x")
    revoked = domain.revoke(designated, DAY, "report_not_submitted")
    assert (revoked.status, revoked.revocation_reason) == ("revoked", "report_not_submitted")
    with pytest.raises(domain.CorporationStateConflict):
        domain.revoke(revoked, DAY, "other")


def test_only_a_designated_corporation_proposes_and_the_municipality_answers_once() -> None:
    adopted = domain.adopt(consulted(), DAY, prefectural())
    applied = domain.apply_for_designation("spc-1", SHIRAHAMA, "(株)白浜暮らし", (), DAY)
    with pytest.raises(domain.CorporationNotDesignated):
        domain.make_proposal("p-1", applied, "change", adopted, "拠点施設の追加", DAY)
    corporation = domain.designate(applied, DAY)
    proposal = domain.make_proposal("p-1", corporation, "change", adopted, "拠点施設の追加", DAY, answer_days=30)
    assert (proposal.status, proposal.due_on, proposal.plan_id) == ("open", DAY + timedelta(days=30), "pln-1")
    assert not proposal.overdue(DAY + timedelta(days=30)) and proposal.overdue(DAY + timedelta(days=31))
    with pytest.raises(domain.ProposalTargetInvalid):  # a change names a public plan
        domain.make_proposal("p-2", corporation, "change", None, "x", DAY)
    with pytest.raises(domain.ProposalTargetInvalid):  # …of the corporation's own municipality
        domain.make_proposal("p-2", corporation, "change", domain.adopt(consulted(HACHIOJI), DAY, prefectural(TOKYO)),
                             "x", DAY)
    with pytest.raises(domain.ProposalTargetInvalid):  # a draft is not a plan to change yet
        domain.make_proposal("p-2", corporation, "change", consulted(), "x", DAY)
    with pytest.raises(domain.ProposalTargetInvalid):  # making a plan names none
        domain.make_proposal("p-2", corporation, "make", adopted, "x", DAY)
    answered = domain.answer(proposal, "declined", "outside_plan_scope", DAY + timedelta(days=3), "予算外")
    assert (answered.status, answered.answer_reason, answered.overdue(DAY + timedelta(days=99))) == (
        "declined", "outside_plan_scope", False)
    with pytest.raises(domain.ProposalAlreadyAnswered):
        domain.answer(answered, "accepted", "will_amend_plan", DAY, None)


def test_a_council_counts_its_members_by_kind() -> None:
    members = (
        CouncilMember("m1", "municipality", "白浜町", DAY), CouncilMember("m2", "resident", "山田 花子", DAY),
        CouncilMember("m3", "resident", "佐藤 一郎", DAY), CouncilMember("m4", "transport_operator", "JAL", DAY),
    )
    council = domain.form_council("c-1", SHIRAHAMA, "白浜町特定居住促進協議会", DAY, members, None)
    assert council.member_counts() == {"municipality": 1, "resident": 2, "transport_operator": 1}
    grown = domain.add_member(council, CouncilMember("m5", "chamber_of_commerce", "白浜町商工会", DAY))
    assert grown.member_counts()["chamber_of_commerce"] == 1 and len(council.members) == 4
    with pytest.raises(domain.CouncilAlreadyExists):
        domain.form_council("c-2", SHIRAHAMA, "二つ目", DAY, (), council)
    with pytest.raises(domain.InvalidPeriod):
        domain.hold_meeting(council, "mt", DAY - timedelta(days=1), "x", "y", None)
    assert isinstance(council, Council)


def test_the_reference_seed_keeps_the_prerequisite() -> None:
    """Each of the seed's 28 municipal plans sits in one of its 20 prefectures with a plan adopted on or
    before it; so the seeded state is one the rules could have reached."""
    seeded = plans()
    prefectural_plans = {
        p.municipality_code: domain.seeded_plan(f"pln-{p.municipality_code}", "prefecture", p.municipality_code,
                                                p.adopted_on, p.prefecture)
        for p in seeded if p.level == "prefecture"
    }
    municipal = [p for p in seeded if p.level == "municipality"]
    assert (len(prefectural_plans), len(municipal), len(support_corporations())) == (20, 28, 51)
    for p in municipal:
        plan = domain.seeded_plan(f"pln-{p.municipality_code}", "municipality", p.municipality_code, p.adopted_on,
                                  p.municipality or "")
        domain.check_covered(plan, prefectural_plans.get(plan.prefecture_code), p.adopted_on)
    with pytest.raises(domain.PrefecturalPlanMissing):  # and the check does bite on the seed's own dates
        hokkaido = prefectural_plans["010006"]
        domain.check_covered(domain.seeded_plan("x", "municipality", "015814", date(2025, 3, 20), "厚真町"),
                             hokkaido, date(2025, 3, 20))
