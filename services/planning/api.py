"""HTTP routes (``/v1``), thin: authenticate, parse, call the use case, shape the response.

Staff act for their municipality (a prefecture's staff, whose token names the prefecture's code, for
the prefectural plan): managers make, consult on, adopt, amend and withdraw plans, designate and
revoke corporations, answer proposals and run the council; reviewers record what arrives (a
corporation's application, report or proposal, a council meeting). Readers see their municipality
(staff), their prefecture (prefecture readers) or everything (ministry, admins). ``/v1/public/…``
needs no token: adopted plans and designated corporations, rate-limited per client IP.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import Field

from services.planning.handlers import NewMember, PlanningService
from services.planning.views import (
    CorporationView,
    CouncilSummaryView,
    CouncilView,
    Page,
    PlanView,
    ProposalView,
    PublicCorporationView,
    PublicPlanView,
)
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
from shared.kit.auth import DECIDERS, MANAGERS, Principal, Role, require
from shared.kit.http import ApiModel, MultilineText, Offset
from shared.kit.rate_limit import public_limit
from shared.kit.use_case import WriteRequest

router = APIRouter(prefix="/v1", tags=["planning"])

Staff = Annotated[Principal, Depends(require(Role.STAFF, Role.ADMIN))]
Readers = Annotated[Principal, Depends(require(Role.STAFF, Role.PREFECTURE, Role.MINISTRY, Role.ADMIN))]
Deciders = Annotated[Principal, Depends(require(Role.STAFF, Role.ADMIN, staff=DECIDERS))]
Managers = Annotated[Principal, Depends(require(Role.STAFF, Role.ADMIN, staff=MANAGERS))]
Limit = Annotated[int, Query(ge=1, le=200)]
Code = Annotated[str, Field(max_length=16, description="a 6-digit local government code")]


async def planning(request: Request) -> PlanningService:
    service: PlanningService = request.app.state.planning
    return service


Service = Annotated[PlanningService, Depends(planning)]

_NOTE = "staff's own words, kept in this service only: never sent to another service"


# --- request bodies ----------------------------------------------------------------------------------


class ContentBody(ApiModel):
    area: MultilineText = Field(default="", max_length=2000, description="the plan's area (区域)")
    basic_policy: MultilineText = Field(default="", max_length=8000,
                                        description="the basic policy: the region's direction (基本方針)")
    residents_sought: MultilineText = Field(default="", max_length=4000,
                                            description="the dual residents the region seeks")
    base_facilities: list[Annotated[str, Field(max_length=200)]] = Field(default_factory=list, max_length=100)
    convenience_facilities: list[Annotated[str, Field(max_length=200)]] = Field(default_factory=list, max_length=100)
    work_facilities: list[Annotated[str, Field(max_length=200)]] = Field(default_factory=list, max_length=100)

    def to_content(self) -> PlanContent:
        return PlanContent(**self.model_dump())


class PlanBody(ApiModel):
    level: PlanLevel
    municipality_code: Code = Field(description="the municipality's code, or the prefecture's for a prefectural plan")
    content: ContentBody
    covers_dual_residence: bool = Field(
        default=True, description="a prefectural plan: whether it has a 特定居住 section (municipal plans ignore it)"
    )


class ConsultationBody(ApiModel):
    meeting_id: str | None = Field(default=None, max_length=64, description="the council meeting that consulted on it")


class AmendmentBody(ApiModel):
    content: ContentBody
    covers_dual_residence: bool | None = None


class WithdrawBody(ApiModel):
    reason_code: PlanWithdrawalReason


class CorporationBody(ApiModel):
    municipality_code: Code
    name: str = Field(min_length=1, max_length=200, description="the corporation's registered name")
    services: list[SupportArea] = Field(default_factory=list, max_length=3)


class ReportBody(ApiModel):
    period_from: date
    period_until: date
    summary: MultilineText = Field(min_length=1, max_length=4000, description=_NOTE)


class RevokeBody(ApiModel):
    reason_code: CorporationRevocationReason
    note: MultilineText | None = Field(default=None, max_length=1000, description=_NOTE)


class ProposalBody(ApiModel):
    kind: ProposalKind
    plan_id: str | None = Field(default=None, max_length=64, description="the plan to change (kind change)")
    summary: MultilineText = Field(min_length=1, max_length=4000, description=_NOTE)


class AnswerBody(ApiModel):
    decision: ProposalDecision
    reason_code: ProposalAnswerReason
    note: MultilineText | None = Field(default=None, max_length=2000, description=_NOTE)


class MemberBody(ApiModel):
    kind: MemberKind
    name: str = Field(min_length=1, max_length=200, description="the organisation, or a resident member's name: "
                      "shown to the municipality's staff only")

    def to_member(self) -> NewMember:
        return NewMember(self.kind, self.name)


class CouncilBody(ApiModel):
    municipality_code: Code
    name: str = Field(min_length=1, max_length=200)
    members: list[MemberBody] = Field(default_factory=list, max_length=100)


class MeetingBody(ApiModel):
    held_on: date | None = Field(default=None, description="default: today (Japan)")
    agenda: MultilineText = Field(min_length=1, max_length=2000, description=_NOTE)
    minutes_summary: MultilineText = Field(default="", max_length=8000, description=_NOTE)
    plan_id: str | None = Field(default=None, max_length=64, description="the plan the meeting consulted on")


# --- plans -------------------------------------------------------------------------------------------


@router.post("/plans", status_code=201, response_model=PlanView)
async def draft_plan(body: PlanBody, principal: Managers, service: Service, write: WriteRequest) -> Response:
    """A new plan in draft (one live plan per body and level)."""
    return (await service.draft_plan(
        write, body.level, body.municipality_code, body.content.to_content(), body.covers_dual_residence
    )).response()


@router.get("/plans/{plan_id}", response_model=PlanView)
async def get_plan(plan_id: str, principal: Readers, service: Service) -> PlanView:
    """A plan with every version (drafts included)."""
    return await service.plan(principal, plan_id)


@router.post("/plans/{plan_id}/consultation", response_model=PlanView)
async def submit_for_consultation(
    plan_id: str, body: ConsultationBody, principal: Managers, service: Service, write: WriteRequest
) -> Response:
    """The draft goes to consultation (naming the council meeting that consulted on it, if one did)."""
    return (await service.submit_for_consultation(write, plan_id, body.meeting_id)).response()


@router.post("/plans/{plan_id}/adopt", response_model=PlanView)
async def adopt(plan_id: str, principal: Managers, service: Service, write: WriteRequest) -> Response:
    """The version in consultation comes into force today; a municipal plan needs its prefecture's
    adopted plan covering dual residence (409 ``prefectural-plan-missing``)."""
    return (await service.adopt(write, plan_id)).response()


@router.post("/plans/{plan_id}/amendments", status_code=201, response_model=PlanView)
async def amend(plan_id: str, body: AmendmentBody, principal: Managers, service: Service,
                write: WriteRequest) -> Response:
    """Draft the next version of an adopted plan (the version in force stays until it is adopted)."""
    return (await service.amend(write, plan_id, body.content.to_content(), body.covers_dual_residence)).response()


@router.post("/plans/{plan_id}/withdraw", response_model=PlanView)
async def withdraw(plan_id: str, body: WithdrawBody, principal: Managers, service: Service,
                   write: WriteRequest) -> Response:
    return (await service.withdraw(write, plan_id, body.reason_code)).response()


@router.get("/municipalities/{code}/plans", response_model=Page[PlanView])
async def plans_of(code: str, principal: Readers, service: Service, limit: Limit = 100,
                   offset: Offset = 0) -> Page[PlanView]:
    """A municipality's plans; for a prefecture's code, its plan and the municipal plans inside it."""
    principal.ensure_reads_municipality(code)
    return await service.plans_of(code, limit, offset)


# --- support corporations ----------------------------------------------------------------------------


@router.post("/corporations", status_code=201, response_model=CorporationView)
async def apply(body: CorporationBody, principal: Deciders, service: Service, write: WriteRequest) -> Response:
    """Record a corporation's application for designation, as the municipality received it."""
    return (await service.apply(write, body.municipality_code, body.name, tuple(body.services))).response()


@router.get("/corporations/{corporation_id}", response_model=CorporationView)
async def get_corporation(corporation_id: str, principal: Readers, service: Service) -> CorporationView:
    return await service.corporation(principal, corporation_id)


@router.post("/corporations/{corporation_id}/designate", response_model=CorporationView)
async def designate(corporation_id: str, principal: Managers, service: Service, write: WriteRequest) -> Response:
    """The mayor designates the applicant (特定居住支援法人) today."""
    return (await service.designate(write, corporation_id)).response()


@router.post("/corporations/{corporation_id}/reports", status_code=201, response_model=CorporationView)
async def receive_report(corporation_id: str, body: ReportBody, principal: Deciders, service: Service,
                         write: WriteRequest) -> Response:
    """A supervision report the designated corporation submitted (its summary stays here)."""
    return (await service.receive_report(
        write, corporation_id, body.period_from, body.period_until, body.summary
    )).response()


@router.post("/corporations/{corporation_id}/revoke", response_model=CorporationView)
async def revoke(corporation_id: str, body: RevokeBody, principal: Managers, service: Service,
                 write: WriteRequest) -> Response:
    """Revoke a designation with a reason code; the note stays here."""
    return (await service.revoke(write, corporation_id, body.reason_code, body.note or None)).response()


@router.post("/corporations/{corporation_id}/proposals", status_code=201, response_model=ProposalView)
async def propose(corporation_id: str, body: ProposalBody, principal: Deciders, service: Service,
                  write: WriteRequest) -> Response:
    """Record a designated corporation's proposal to make or change the plan; it is due an answer."""
    return (await service.propose(write, corporation_id, body.kind, body.plan_id, body.summary)).response()


@router.get("/municipalities/{code}/corporations", response_model=Page[CorporationView])
async def corporations_of(code: str, principal: Readers, service: Service, limit: Limit = 100,
                          offset: Offset = 0) -> Page[CorporationView]:
    """Every corporation of the municipality: applicants, designated, revoked."""
    principal.ensure_reads_municipality(code)
    return await service.corporations_of(code, limit, offset)


# --- proposals ---------------------------------------------------------------------------------------


@router.post("/proposals/{proposal_id}/answer", response_model=ProposalView)
async def answer(proposal_id: str, body: AnswerBody, principal: Managers, service: Service,
                 write: WriteRequest) -> Response:
    """The municipality's answer: accepted or declined, with a reason code."""
    return (await service.answer(write, proposal_id, body.decision, body.reason_code, body.note or None)).response()


@router.get("/municipalities/{code}/proposals", response_model=Page[ProposalView])
async def proposals_of(
    code: str, principal: Readers, service: Service,
    status: Literal["open", "accepted", "declined"] | None = None, limit: Limit = 100, offset: Offset = 0,
) -> Page[ProposalView]:
    """Proposals to the municipality, soonest due first (``overdue``: open past the due date)."""
    principal.ensure_reads_municipality(code)
    return await service.proposals_of(code, status, limit, offset)


# --- councils ----------------------------------------------------------------------------------------


@router.post("/councils", status_code=201, response_model=CouncilView)
async def form_council(body: CouncilBody, principal: Managers, service: Service, write: WriteRequest) -> Response:
    """The municipality organises its council (特定居住促進協議会) with its first members."""
    return (await service.form_council(
        write, body.municipality_code, body.name, [m.to_member() for m in body.members]
    )).response()


@router.get("/councils/{council_id}", response_model=CouncilView)
async def get_council(council_id: str, principal: Staff, service: Service) -> CouncilView:
    """Members and meetings with their records: the municipality's staff only."""
    return await service.council(principal, council_id)


@router.post("/councils/{council_id}/members", status_code=201, response_model=CouncilView)
async def add_member(council_id: str, body: MemberBody, principal: Managers, service: Service,
                     write: WriteRequest) -> Response:
    return (await service.add_member(write, council_id, body.to_member())).response()


@router.post("/councils/{council_id}/meetings", status_code=201, response_model=CouncilView)
async def hold_meeting(council_id: str, body: MeetingBody, principal: Deciders, service: Service,
                       write: WriteRequest) -> Response:
    """Record a meeting: date, agenda, a summary of the minutes, and the plan it consulted on."""
    return (await service.hold_meeting(
        write, council_id, body.held_on, body.agenda, body.minutes_summary, body.plan_id
    )).response()


@router.get("/municipalities/{code}/councils", response_model=Page[CouncilSummaryView])
async def councils_of(code: str, principal: Readers, service: Service) -> Page[CouncilSummaryView]:
    """The municipality's council: members counted by kind (no names, no minutes)."""
    principal.ensure_reads_municipality(code)
    return await service.councils_of(code)


# --- public (no token) -------------------------------------------------------------------------------


@router.get("/public/plans", response_model=Page[PublicPlanView], dependencies=[Depends(public_limit)])
async def public_plans(
    service: Service,
    prefecture: Annotated[str | None, Query(max_length=16, description="a prefecture's code")] = None,
    level: PlanLevel | None = None, limit: Limit = 100, offset: Offset = 0,
) -> Page[PublicPlanView]:
    """Adopted and amended plans, the version in force of each (public: no token)."""
    return await service.public_plans(prefecture, level, limit, offset)


@router.get("/public/plans/{plan_id}", response_model=PublicPlanView, dependencies=[Depends(public_limit)])
async def public_plan(plan_id: str, service: Service) -> PublicPlanView:
    return await service.public_plan(plan_id)


@router.get("/public/corporations", response_model=Page[PublicCorporationView],
            dependencies=[Depends(public_limit)])
async def public_corporations(
    service: Service,
    municipality: Annotated[str | None, Query(max_length=16, description="a municipality's code")] = None,
    limit: Limit = 100, offset: Offset = 0,
) -> Page[PublicCorporationView]:
    """Designated support corporations (public: no token)."""
    return await service.public_corporations(municipality, limit, offset)
