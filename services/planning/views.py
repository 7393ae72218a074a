"""What the HTTP API shows: response models built from domain objects (also stored for Idempotency-Key replays).

Public views (no token) show only what the act makes public: adopted plans (the version in force)
and designated corporations. Staff views add drafts, versions, reports, proposals and councils.
"""

from __future__ import annotations

from datetime import date

from pydantic import BaseModel

from services.planning.domain import (
    Corporation,
    CorporationStatus,
    Council,
    CouncilMeeting,
    Plan,
    PlanStatus,
    PlanVersion,
    Proposal,
    ProposalStatus,
    Source,
    SupervisionReport,
    VersionStatus,
)
from shared.contracts.planning import (
    CorporationRevocationReason,
    MemberKind,
    PlanContent,
    PlanLevel,
    PlanWithdrawalReason,
    ProposalAnswerReason,
    ProposalKind,
    SupportArea,
)
from shared.kit.views import Page as Page
from shared.kit.views import json_body as json_body
from shared.reference import municipality


class PlanVersionView(BaseModel):
    version: int
    status: VersionStatus
    content: PlanContent
    consultation_meeting_id: str | None
    consulted_on: date | None
    in_force_from: date | None

    @classmethod
    def of(cls, v: PlanVersion) -> PlanVersionView:
        return cls(version=v.version, status=v.status, content=v.content,
                   consultation_meeting_id=v.consultation_meeting_id, consulted_on=v.consulted_on,
                   in_force_from=v.in_force_from)


class PublicPlanView(BaseModel):
    plan_id: str
    level: PlanLevel
    municipality_code: str
    municipality_name: str
    prefecture_code: str
    name: str
    status: PlanStatus
    covers_dual_residence: bool
    adopted_on: date | None
    #: The version in force and what it says.
    version: int | None
    in_force_from: date | None
    content: PlanContent | None

    @classmethod
    def of(cls, plan: Plan) -> PublicPlanView:
        current = plan.in_force
        return cls(
            plan_id=plan.plan_id, level=plan.level, municipality_code=plan.municipality_code,
            municipality_name=municipality(plan.municipality_code).full_name, prefecture_code=plan.prefecture_code,
            name=plan.name, status=plan.status, covers_dual_residence=plan.covers_dual_residence,
            adopted_on=plan.adopted_on, version=current.version if current else None,
            in_force_from=current.in_force_from if current else None, content=current.content if current else None,
        )


class PlanView(PublicPlanView):
    source: Source
    withdrawn_on: date | None
    withdrawal_reason: PlanWithdrawalReason | None
    versions: list[PlanVersionView]

    @classmethod
    def of(cls, plan: Plan) -> PlanView:
        return cls(
            **PublicPlanView.of(plan).model_dump(), source=plan.source, withdrawn_on=plan.withdrawn_on,
            withdrawal_reason=plan.withdrawal_reason, versions=[PlanVersionView.of(v) for v in plan.versions],
        )


class PublicCorporationView(BaseModel):
    corporation_id: str
    municipality_code: str
    municipality_name: str
    name: str
    services: list[SupportArea]
    designated_on: date | None

    @classmethod
    def of(cls, c: Corporation) -> PublicCorporationView:
        return cls(corporation_id=c.corporation_id, municipality_code=c.municipality_code,
                   municipality_name=municipality(c.municipality_code).full_name, name=c.name,
                   services=list(c.services), designated_on=c.designated_on)


class ReportView(BaseModel):
    report_id: str
    period_from: date
    period_until: date
    received_on: date
    summary: str

    @classmethod
    def of(cls, r: SupervisionReport) -> ReportView:
        return cls(report_id=r.report_id, period_from=r.period_from, period_until=r.period_until,
                   received_on=r.received_on, summary=r.summary)


class CorporationView(PublicCorporationView):
    status: CorporationStatus
    applied_on: date
    source: Source
    revoked_on: date | None
    revocation_reason: CorporationRevocationReason | None
    reports: list[ReportView] = []

    @classmethod
    def of(cls, c: Corporation, reports: list[SupervisionReport] | None = None) -> CorporationView:
        return cls(
            **PublicCorporationView.of(c).model_dump(), status=c.status, applied_on=c.applied_on, source=c.source,
            revoked_on=c.revoked_on, revocation_reason=c.revocation_reason,
            reports=[ReportView.of(r) for r in reports or ()],
        )


class ProposalView(BaseModel):
    proposal_id: str
    corporation_id: str
    municipality_code: str
    kind: ProposalKind
    plan_id: str | None
    summary: str
    proposed_on: date
    due_on: date
    status: ProposalStatus
    overdue: bool
    answered_on: date | None
    answer_reason: ProposalAnswerReason | None
    answer_note: str | None

    @classmethod
    def of(cls, p: Proposal, today: date) -> ProposalView:
        return cls(
            proposal_id=p.proposal_id, corporation_id=p.corporation_id, municipality_code=p.municipality_code,
            kind=p.kind, plan_id=p.plan_id, summary=p.summary, proposed_on=p.proposed_on, due_on=p.due_on,
            status=p.status, overdue=p.overdue(today), answered_on=p.answered_on, answer_reason=p.answer_reason,
            answer_note=p.answer_note,
        )


class MemberView(BaseModel):
    member_id: str
    kind: MemberKind
    name: str
    joined_on: date


class MeetingView(BaseModel):
    meeting_id: str
    held_on: date
    agenda: str
    minutes_summary: str
    plan_id: str | None

    @classmethod
    def of(cls, m: CouncilMeeting) -> MeetingView:
        return cls(meeting_id=m.meeting_id, held_on=m.held_on, agenda=m.agenda, minutes_summary=m.minutes_summary,
                   plan_id=m.plan_id)


class CouncilSummaryView(BaseModel):
    """What prefecture and ministry readers see of a council: no names, no minutes."""

    council_id: str
    municipality_code: str
    name: str
    formed_on: date
    member_counts: dict[MemberKind, int]

    @classmethod
    def of(cls, c: Council) -> CouncilSummaryView:
        return cls(council_id=c.council_id, municipality_code=c.municipality_code, name=c.name,
                   formed_on=c.formed_on, member_counts=c.member_counts())


class CouncilView(CouncilSummaryView):
    members: list[MemberView]
    meetings: list[MeetingView]

    @classmethod
    def of(cls, c: Council, meetings: list[CouncilMeeting] | None = None) -> CouncilView:
        return cls(
            **CouncilSummaryView.of(c).model_dump(),
            members=[MemberView(member_id=m.member_id, kind=m.kind, name=m.name, joined_on=m.joined_on)
                     for m in c.members],
            meetings=[MeetingView.of(m) for m in meetings or ()],
        )
