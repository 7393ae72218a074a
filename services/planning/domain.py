"""The rules of plans, support corporations and councils: plain Python, no I/O.

Terms (the amended 広域的地域活性化のための基盤整備に関する法律, 2024):

- prefectural plan: 広域的地域活性化基盤整備計画 with a 特定居住 section (``covers_dual_residence``);
- municipal plan: 特定居住促進計画, made only inside a prefecture whose adopted plan covers dual residence;
- support corporation: 特定居住支援法人 (二地域居住等支援法人), designated by the mayor;
- council: 特定居住促進協議会, organised by a municipality to consult on its plan.

A plan's lifecycle: draft → consultation → adopted → (amended →)* withdrawn. An amendment is a new
version of the same plan, drafted and consulted on while the adopted version stays in force; adopting
it supersedes the previous version. Adopted and amended plans are public (the version in force).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from datetime import date, timedelta
from typing import Literal

from shared.contracts.planning import (
    CorporationRevocationReason,
    MemberKind,
    PlanContent,
    PlanLevel,
    PlanWithdrawalReason,
    ProposalAnswerReason,
    ProposalDecision,
    ProposalKind,
    SupportArea,
)
from shared.kit.errors import Conflict, DomainError, NotFound
from shared.reference import REGIONAL_BASE_PLAN, SPECIFIC_RESIDENCE_PLAN, UnknownMunicipality, municipality

PlanStatus = Literal["draft", "consultation", "adopted", "amended", "withdrawn"]
VersionStatus = Literal["draft", "consultation", "in_force", "superseded", "withdrawn"]
CorporationStatus = Literal["applied", "designated", "revoked"]
ProposalStatus = Literal["open", "accepted", "declined"]
Source = Literal["reference", "staff"]

PUBLIC_PLAN_STATUSES: tuple[PlanStatus, ...] = ("adopted", "amended")
#: How long a municipality has to answer a proposal unless configured otherwise.
DEFAULT_ANSWER_DAYS = 60

# --- errors: one per rule the user can break -------------------------------------------------------


class UnknownPlan(NotFound):
    code = "unknown-plan"
    title = "No such plan"


class UnknownCorporation(NotFound):
    code = "unknown-corporation"
    title = "No such support corporation"


class UnknownProposal(NotFound):
    code = "unknown-proposal"
    title = "No such proposal"


class UnknownCouncil(NotFound):
    code = "unknown-council"
    title = "No such council"


class UnknownMeeting(NotFound):
    code = "unknown-meeting"
    title = "No such council meeting"


class NotAPlanningBody(DomainError):
    code = "not-a-planning-body"
    title = "The code is not a municipality or prefecture that can make this plan"


class PlanStateConflict(Conflict):
    code = "plan-state-conflict"
    title = "The plan is not in a state that allows this"


class PrefecturalPlanMissing(Conflict):
    code = "prefectural-plan-missing"
    title = "The prefecture has no adopted plan covering dual residence"


class PlanAlreadyExists(Conflict):
    code = "plan-already-exists"
    title = "The municipality already has a live plan of this level"


class CorporationStateConflict(Conflict):
    code = "corporation-state-conflict"
    title = "The support corporation is not in a state that allows this"


class CorporationNotDesignated(Conflict):
    code = "corporation-not-designated"
    title = "Only a designated support corporation may do this"


class ProposalAlreadyAnswered(Conflict):
    code = "proposal-already-answered"
    title = "The proposal has been answered"


class ProposalTargetInvalid(DomainError):
    code = "proposal-target-invalid"
    title = "A change proposal names a public plan of the municipality; a make proposal names none"


class MeetingOfAnotherMunicipality(DomainError):
    code = "meeting-of-another-municipality"
    title = "The meeting is not of a council of the plan's municipality"


class CouncilAlreadyExists(Conflict):
    code = "council-already-exists"
    title = "The municipality already has a council"


class InvalidPeriod(DomainError):
    code = "invalid-period"
    title = "The period ends before it starts"


# --- plans -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlanVersion:
    version: int
    content: PlanContent
    status: VersionStatus
    consultation_meeting_id: str | None = None
    consulted_on: date | None = None
    in_force_from: date | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    plan_id: str
    level: PlanLevel
    #: The municipality's code for a municipal plan, the prefecture's for a prefectural plan.
    municipality_code: str
    prefecture_code: str
    name: str
    status: PlanStatus
    versions: tuple[PlanVersion, ...]
    covers_dual_residence: bool
    source: Source = "staff"
    adopted_on: date | None = None
    withdrawn_on: date | None = None
    withdrawal_reason: PlanWithdrawalReason | None = None

    @property
    def in_force(self) -> PlanVersion | None:
        return next((v for v in self.versions if v.status == "in_force"), None)

    @property
    def pending(self) -> PlanVersion | None:
        """The version being drafted or consulted on (the first, or an amendment)."""
        return next((v for v in self.versions if v.status in ("draft", "consultation")), None)

    @property
    def latest(self) -> PlanVersion:
        return self.versions[-1]

    @property
    def public(self) -> bool:
        return self.status in PUBLIC_PLAN_STATUSES

    def _with_version(self, changed: PlanVersion) -> tuple[PlanVersion, ...]:
        return tuple(changed if v.version == changed.version else v for v in self.versions)


def planning_body(level: PlanLevel, code: str) -> tuple[str, str]:
    """The plan's name and the prefecture code of a municipality (level municipality) or a
    prefecture (level prefecture) that may make it."""
    try:
        body = municipality(code)
    except UnknownMunicipality:
        raise NotAPlanningBody(f"{code} is not a known local government code") from None
    if level == "prefecture":
        if not body.is_prefecture:
            raise NotAPlanningBody(f"{code} is not a prefecture: a prefectural plan is the prefecture's")
        return REGIONAL_BASE_PLAN, code
    if body.is_prefecture:
        raise NotAPlanningBody(f"{code} is a prefecture: a 特定居住促進計画 is a municipality's")
    return SPECIFIC_RESIDENCE_PLAN, body.prefecture_code


def is_prefecture(code: str) -> bool:
    try:
        return municipality(code).is_prefecture
    except UnknownMunicipality:
        raise NotAPlanningBody(f"{code} is not a known local government code") from None


def draft_plan(plan_id: str, level: PlanLevel, code: str, content: PlanContent, *, covers_dual_residence: bool,
               live: Plan | None) -> Plan:
    """A new plan in draft; a body has one live (not withdrawn) plan of a level at a time."""
    name, prefecture = planning_body(level, code)
    if live is not None:
        raise PlanAlreadyExists(f"{code} already has plan {live.plan_id} ({live.status}): amend it instead",
                                plan_id=live.plan_id)
    return Plan(
        plan_id=plan_id, level=level, municipality_code=code, prefecture_code=prefecture, name=name, status="draft",
        versions=(PlanVersion(1, content, "draft"),),
        # Only a prefectural plan has a 特定居住 section to speak of.
        covers_dual_residence=covers_dual_residence if level == "prefecture" else False,
    )


def submit_for_consultation(plan: Plan, on: date, meeting: CouncilMeeting | None, council: Council | None) -> Plan:
    """The pending draft goes to consultation, optionally naming the council meeting that consulted on it."""
    pending = plan.pending
    if plan.status == "withdrawn" or pending is None or pending.status != "draft":
        raise PlanStateConflict(f"plan {plan.plan_id} has no draft to consult on (it is {plan.status})")
    if meeting is not None and (council is None or council.municipality_code != plan.municipality_code):
        raise MeetingOfAnotherMunicipality(
            f"meeting {meeting.meeting_id} is not of a council of {plan.municipality_code}"
        )
    consulted = replace(pending, status="consultation", consulted_on=on,
                        consultation_meeting_id=meeting.meeting_id if meeting else None)
    status: PlanStatus = "consultation" if plan.status == "draft" else plan.status
    return replace(plan, status=status, versions=plan._with_version(consulted))


def check_covered(plan: Plan, prefectural: Plan | None, on: date) -> None:
    """A municipal plan needs its prefecture's adopted plan with dual-residence content, in force on ``on``."""
    if plan.level != "municipality":
        return
    if (
        prefectural is None or not prefectural.public or not prefectural.covers_dual_residence
        or prefectural.adopted_on is None or prefectural.adopted_on > on
    ):
        prefecture = municipality(plan.prefecture_code).name
        raise PrefecturalPlanMissing(
            f"{prefecture} has no adopted 広域的地域活性化基盤整備計画 covering dual residence on {on}: "
            "a 特定居住促進計画 can be adopted only inside one",
            prefecture_code=plan.prefecture_code,
        )


def adopt(plan: Plan, on: date, prefectural: Plan | None) -> Plan:
    """The version in consultation comes into force: adopted (the first) or amended (a later one)."""
    pending = plan.pending
    if plan.status == "withdrawn" or pending is None or pending.status != "consultation":
        raise PlanStateConflict(
            f"plan {plan.plan_id} has no version in consultation: consult on a draft before adopting it"
        )
    current = plan.in_force
    if current is not None and current.in_force_from is not None and on < current.in_force_from:
        raise PlanStateConflict(f"an amendment cannot come into force before the version it replaces ({on})")
    check_covered(plan, prefectural, on)
    versions = tuple(
        replace(v, status="in_force", in_force_from=on) if v.version == pending.version
        else replace(v, status="superseded") if v.status == "in_force" else v
        for v in plan.versions
    )
    if current is None:
        return replace(plan, status="adopted", versions=versions, adopted_on=on)
    return replace(plan, status="amended", versions=versions)


def start_amendment(plan: Plan, content: PlanContent, covers_dual_residence: bool | None = None) -> Plan:
    """A new draft version of a public plan; the version in force stays so until the new one is adopted."""
    if not plan.public:
        raise PlanStateConflict(f"plan {plan.plan_id} is {plan.status}: only an adopted plan is amended")
    if plan.pending is not None:
        raise PlanStateConflict(f"plan {plan.plan_id} already has version {plan.pending.version} under way")
    covers = plan.covers_dual_residence
    if plan.level == "prefecture" and covers_dual_residence is not None:
        covers = covers_dual_residence
    draft = PlanVersion(plan.latest.version + 1, content, "draft")
    return replace(plan, versions=(*plan.versions, draft), covers_dual_residence=covers)


def withdraw(plan: Plan, on: date, reason: PlanWithdrawalReason) -> Plan:
    """Withdraw a plan (and any version under way). Withdrawing a prefectural plan leaves the municipal
    plans adopted under it in force: the act asks coverage only when a municipal plan is adopted."""
    if plan.status == "withdrawn":
        raise PlanStateConflict(f"plan {plan.plan_id} is withdrawn already")
    versions = tuple(
        replace(v, status="withdrawn") if v.status in ("draft", "consultation", "in_force") else v
        for v in plan.versions
    )
    return replace(plan, status="withdrawn", versions=versions, withdrawn_on=on, withdrawal_reason=reason)


def seeded_plan(plan_id: str, level: PlanLevel, code: str, adopted_on: date, area: str) -> Plan:
    """A plan of the reference data: adopted on its date. The seed lists no contents beyond the area
    (the whole municipality or prefecture); staff amend the plan to record the rest."""
    name, prefecture = planning_body(level, code)
    content = PlanContent(area=area)
    return Plan(
        plan_id=plan_id, level=level, municipality_code=code, prefecture_code=prefecture, name=name,
        status="adopted", versions=(PlanVersion(1, content, "in_force", in_force_from=adopted_on),),
        covers_dual_residence=level == "prefecture", source="reference", adopted_on=adopted_on,
    )


# --- support corporations ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Corporation:
    """One designation: a corporation serving several municipalities is designated by each."""

    corporation_id: str
    municipality_code: str
    name: str
    services: tuple[SupportArea, ...]
    status: CorporationStatus
    applied_on: date
    source: Source = "staff"
    designated_on: date | None = None
    revoked_on: date | None = None
    revocation_reason: CorporationRevocationReason | None = None


@dataclass(frozen=True, slots=True)
class SupervisionReport:
    report_id: str
    corporation_id: str
    period_from: date
    period_until: date
    received_on: date
    #: Staff's summary of the report: kept in this service only.
    summary: str


def apply_for_designation(corporation_id: str, code: str, name: str, services: tuple[SupportArea, ...],
                          on: date) -> Corporation:
    planning_body("municipality", code)
    return Corporation(corporation_id, code, name, tuple(dict.fromkeys(services)), "applied", on)


def designate(corporation: Corporation, on: date) -> Corporation:
    if corporation.status != "applied":
        raise CorporationStateConflict(f"{corporation.corporation_id} is {corporation.status}: only an applicant "
                                       "is designated")
    if on < corporation.applied_on:
        raise CorporationStateConflict("a designation cannot precede the application")
    return replace(corporation, status="designated", designated_on=on)


def receive_report(corporation: Corporation, report_id: str, period_from: date, period_until: date, on: date,
                   summary: str) -> SupervisionReport:
    if corporation.status != "designated":
        raise CorporationNotDesignated(f"{corporation.corporation_id} is {corporation.status}: reports are "
                                       "received from designated corporations")
    if period_until < period_from:
        raise InvalidPeriod(f"{period_until} is before {period_from}")
    return SupervisionReport(report_id, corporation.corporation_id, period_from, period_until, on, summary)


def revoke(corporation: Corporation, on: date, reason: CorporationRevocationReason) -> Corporation:
    if corporation.status != "designated":
        raise CorporationStateConflict(f"{corporation.corporation_id} is {corporation.status}: only a designation "
                                       "is revoked")
    return replace(corporation, status="revoked", revoked_on=on, revocation_reason=reason)


def seeded_corporation(corporation_id: str, code: str, name: str, designated_on: date) -> Corporation:
    return Corporation(corporation_id, code, name, (), "designated", designated_on, "reference", designated_on)


# --- proposals --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Proposal:
    proposal_id: str
    corporation_id: str
    municipality_code: str
    kind: ProposalKind
    plan_id: str | None
    #: The corporation's proposal in staff's words: kept in this service only.
    summary: str
    proposed_on: date
    due_on: date
    status: ProposalStatus = "open"
    answered_on: date | None = None
    answer_reason: ProposalAnswerReason | None = None
    answer_note: str | None = None

    def overdue(self, today: date) -> bool:
        return self.status == "open" and today > self.due_on


def make_proposal(proposal_id: str, corporation: Corporation, kind: ProposalKind, plan: Plan | None, summary: str,
                  on: date, answer_days: int = DEFAULT_ANSWER_DAYS) -> Proposal:
    """A designated corporation proposes that its municipality make a plan (none live) or change its
    public plan; the municipality must answer within ``answer_days``."""
    if corporation.status != "designated":
        raise CorporationNotDesignated(f"{corporation.corporation_id} is {corporation.status}: only a designated "
                                       "support corporation may propose")
    if kind == "change":
        if plan is None or plan.municipality_code != corporation.municipality_code or not plan.public:
            raise ProposalTargetInvalid("a change proposal names a public plan of the corporation's municipality")
    elif plan is not None:
        raise ProposalTargetInvalid("a proposal to make a plan names no plan")
    return Proposal(proposal_id, corporation.corporation_id, corporation.municipality_code, kind,
                    plan.plan_id if plan else None, summary, on, on + timedelta(days=answer_days))


def answer(proposal: Proposal, decision: ProposalDecision, reason: ProposalAnswerReason, on: date,
           note: str | None) -> Proposal:
    if proposal.status != "open":
        raise ProposalAlreadyAnswered(f"{proposal.proposal_id} was {proposal.status} on {proposal.answered_on}")
    return replace(proposal, status=decision, answered_on=on, answer_reason=reason, answer_note=note)


# --- councils ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CouncilMember:
    member_id: str
    kind: MemberKind
    #: The organisation, or a resident member's name: kept in this service, shown to its staff only.
    name: str
    joined_on: date


@dataclass(frozen=True, slots=True)
class CouncilMeeting:
    meeting_id: str
    council_id: str
    held_on: date
    agenda: str
    #: Staff's summary of the minutes: kept in this service only.
    minutes_summary: str
    plan_id: str | None = None


@dataclass(frozen=True, slots=True)
class Council:
    council_id: str
    municipality_code: str
    name: str
    formed_on: date
    members: tuple[CouncilMember, ...] = ()

    def member_counts(self) -> dict[MemberKind, int]:
        return dict(sorted(Counter(m.kind for m in self.members).items()))


def form_council(council_id: str, code: str, name: str, on: date, members: tuple[CouncilMember, ...],
                 existing: Council | None) -> Council:
    """A municipality organises one council (協議会) to consult on its plan."""
    planning_body("municipality", code)
    if existing is not None:
        raise CouncilAlreadyExists(f"{code} has council {existing.council_id}", council_id=existing.council_id)
    return Council(council_id, code, name, on, members)


def add_member(council: Council, member: CouncilMember) -> Council:
    return replace(council, members=(*council.members, member))


def hold_meeting(council: Council, meeting_id: str, held_on: date, agenda: str, minutes_summary: str,
                 plan: Plan | None) -> CouncilMeeting:
    if held_on < council.formed_on:
        raise InvalidPeriod(f"the council was formed on {council.formed_on}")
    if plan is not None and plan.municipality_code != council.municipality_code:
        raise MeetingOfAnotherMunicipality(f"plan {plan.plan_id} is not of {council.municipality_code}")
    return CouncilMeeting(meeting_id, council.council_id, held_on, agenda, minutes_summary,
                          plan.plan_id if plan else None)
