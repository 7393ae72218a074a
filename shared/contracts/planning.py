"""Events of the planning service: plans, support corporations, councils.

``planning.plans.v1`` (key: plan id), ``planning.corporations.v1`` (key: corporation id; a
proposal's events too, so a corporation's designation, proposals and revocation stay in order) and
``planning.councils.v1`` (key: council id). Only ids, codes, dates and the public content of
adopted plans travel: staff notes, supervision reports, proposal texts, member names, agendas and
minutes stay in the planning service.
"""

from __future__ import annotations

from datetime import date
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.contracts.base import EventData
from shared.contracts.common import MunicipalityCode
from shared.contracts.topics import CORPORATIONS, COUNCILS, PLANS

PlanLevel = Literal["prefecture", "municipality"]
#: What a support corporation provides to dual residents: 住まい, なりわい, コミュニティ.
SupportArea = Literal["housing", "work", "community"]
#: Why a plan was withdrawn.
PlanWithdrawalReason = Literal["superseded_by_new_plan", "merged_municipality", "policy_ended", "entered_in_error",
                               "other"]
#: Why a municipality revoked a support corporation's designation (the mayor's supervision).
CorporationRevocationReason = Literal[
    "business_not_performed", "report_not_submitted", "improvement_order_violated", "corporation_request",
    "dissolved", "other",
]
ProposalKind = Literal["make", "change"]
ProposalDecision = Literal["accepted", "declined"]
#: The reason a municipality gives with its answer to a proposal.
ProposalAnswerReason = Literal[
    "will_make_plan", "will_amend_plan", "already_addressed", "outside_plan_scope", "insufficient_basis", "other",
]
MemberKind = Literal[
    "municipality", "prefecture", "support_corporation", "resident", "estate_agent", "transport_operator",
    "chamber_of_commerce", "agricultural_cooperative", "other",
]


class PlanContent(BaseModel):
    """What a plan states (the seed's list): its area, basic policy, the dual residents it seeks, base
    facilities, and facilities for convenience and for creating work. Public once adopted."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    area: str = ""
    basic_policy: str = ""
    residents_sought: str = ""
    base_facilities: list[str] = []
    convenience_facilities: list[str] = []
    work_facilities: list[str] = []


class _PlanEvent(EventData):
    plan_id: str
    level: PlanLevel
    #: The municipality's code for a municipal plan, the prefecture's for a prefectural one.
    municipality_code: MunicipalityCode
    prefecture_code: MunicipalityCode
    version: int


class PlanSubmittedForConsultation(_PlanEvent, name="planning.plan.consultation_started", topic=PLANS):
    #: The council meeting that consulted on the version, if a council did.
    meeting_id: str | None = None
    submitted_on: date


class PlanAdopted(_PlanEvent, name="planning.plan.adopted", topic=PLANS):
    """A plan's first version came into force (the plan is public from now on)."""

    name: str
    #: A prefectural plan's 特定居住 section: whether municipal plans may be made inside it.
    covers_dual_residence: bool
    content: PlanContent
    adopted_on: date


class PlanAmended(_PlanEvent, name="planning.plan.amended", topic=PLANS):
    """A new version of an adopted plan came into force and replaces the previous one."""

    name: str
    covers_dual_residence: bool
    content: PlanContent
    amended_on: date


class PlanWithdrawn(_PlanEvent, name="planning.plan.withdrawn", topic=PLANS):
    reason: PlanWithdrawalReason
    withdrawn_on: date


class CorporationDesignated(EventData, name="planning.corporation.designated", topic=CORPORATIONS):
    corporation_id: str
    municipality_code: MunicipalityCode
    #: The corporation's registered name (a legal person's, public with the designation).
    name: str
    services: list[SupportArea] = []
    designated_on: date


class CorporationReportReceived(EventData, name="planning.corporation.report_received", topic=CORPORATIONS):
    """A supervision report reached the municipality (its text stays in the planning service)."""

    corporation_id: str
    municipality_code: MunicipalityCode
    report_id: str
    period_from: date
    period_until: date
    received_on: date


class CorporationRevoked(EventData, name="planning.corporation.revoked", topic=CORPORATIONS):
    corporation_id: str
    municipality_code: MunicipalityCode
    reason: CorporationRevocationReason
    revoked_on: date


class ProposalMade(EventData, name="planning.proposal.made", topic=CORPORATIONS):
    """A designated corporation proposed that the municipality make (or change) its plan; the
    municipality must answer by ``due_on``."""

    proposal_id: str
    corporation_id: str
    municipality_code: MunicipalityCode
    kind: ProposalKind
    plan_id: str | None = None
    proposed_on: date
    due_on: date


class ProposalAnswered(EventData, name="planning.proposal.answered", topic=CORPORATIONS):
    proposal_id: str
    corporation_id: str
    municipality_code: MunicipalityCode
    plan_id: str | None = None
    decision: ProposalDecision
    reason: ProposalAnswerReason
    answered_on: date


class CouncilFormed(EventData, name="planning.council.formed", topic=COUNCILS):
    council_id: str
    municipality_code: MunicipalityCode
    formed_on: date
    #: How many members of each kind (never who).
    members: dict[MemberKind, int] = Field(default_factory=dict)


class CouncilMembershipChanged(EventData, name="planning.council.membership_changed", topic=COUNCILS):
    council_id: str
    municipality_code: MunicipalityCode
    members: dict[MemberKind, int] = Field(default_factory=dict)
    changed_on: date


class CouncilMeetingHeld(EventData, name="planning.council.meeting_held", topic=COUNCILS):
    council_id: str
    meeting_id: str
    municipality_code: MunicipalityCode
    held_on: date
    #: The plan the meeting consulted on, if it did.
    plan_id: str | None = None
