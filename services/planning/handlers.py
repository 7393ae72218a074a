"""Use cases: load, decide (domain), save (store), emit (outbox) — one transaction each, through the
kit's use-case runner. ``authorise`` loads and locks the target and checks who may act on it (staff
of the plan's, corporation's or council's municipality, or an admin); the domain checks the state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date
from typing import TypeVar

import asyncpg
import structlog

from services.planning import domain, store
from services.planning.domain import (
    Corporation,
    Council,
    CouncilMember,
    Plan,
    PlanVersion,
    Proposal,
    UnknownCorporation,
    UnknownCouncil,
    UnknownMeeting,
    UnknownPlan,
    UnknownProposal,
)
from services.planning.views import (
    CorporationView,
    CouncilSummaryView,
    CouncilView,
    Page,
    PlanView,
    ProposalView,
    PublicCorporationView,
    PublicPlanView,
    json_body,
)
from shared.contracts.planning import (
    CorporationDesignated,
    CorporationReportReceived,
    CorporationRevocationReason,
    CorporationRevoked,
    CouncilFormed,
    CouncilMeetingHeld,
    CouncilMembershipChanged,
    MemberKind,
    PlanAdopted,
    PlanAmended,
    PlanContent,
    PlanLevel,
    PlanSubmittedForConsultation,
    PlanWithdrawalReason,
    PlanWithdrawn,
    ProposalAnswered,
    ProposalAnswerReason,
    ProposalDecision,
    ProposalKind,
    ProposalMade,
    SupportArea,
)
from shared.contracts.topics import CORPORATIONS, COUNCILS, PLANS
from shared.kit.auth import Principal
from shared.kit.clock import Clock
from shared.kit.ids import new_id
from shared.kit.service import ServiceRuntime, UnitOfWork
from shared.kit.use_case import Outcome, Work, Write
from shared.reference import municipality, plans, support_corporations

log = structlog.get_logger(__name__)

T = TypeVar("T")


def seeded_plan_id(code: str) -> str:
    return f"pln-{code}"


def seeded_corporation_id(code: str, name: str) -> str:
    # Stable across restarts and replicas, so seeding stays idempotent.
    return f"spc-{code}-{hashlib.sha256(name.encode()).hexdigest()[:10]}"


# --- events ----------------------------------------------------------------------------------------


async def _emit_plan_in_force(work: Work, plan: Plan, version: PlanVersion) -> None:
    common = {
        "plan_id": plan.plan_id, "level": plan.level, "municipality_code": plan.municipality_code,
        "prefecture_code": plan.prefecture_code, "version": version.version, "name": plan.name,
        "covers_dual_residence": plan.covers_dual_residence, "content": version.content,
    }
    assert version.in_force_from is not None
    event: PlanAdopted | PlanAmended = (
        PlanAdopted(**common, adopted_on=version.in_force_from) if plan.status == "adopted"
        else PlanAmended(**common, amended_on=version.in_force_from)
    )
    await work.emit(PLANS, event, subject=plan.plan_id)


async def _emit_designated(work: Work, c: Corporation) -> None:
    assert c.designated_on is not None
    await work.emit(CORPORATIONS, CorporationDesignated(
        corporation_id=c.corporation_id, municipality_code=c.municipality_code, name=c.name,
        services=list(c.services), designated_on=c.designated_on,
    ), subject=c.corporation_id)


# --- seeding (a prepare step) ------------------------------------------------------------------------


async def seed_reference(runtime: ServiceRuntime) -> None:
    """The plans and designated corporations of ``shared/reference`` (MLIT, end of 2025), once: rows
    that exist stay as staff changed them. Each row inserted now announces itself (PlanAdopted,
    CorporationDesignated) in the same transaction, so consumers learn the seed from the topics."""
    seeded_plans = [
        domain.seeded_plan(
            seeded_plan_id(p.municipality_code), p.level, p.municipality_code, p.adopted_on,
            municipality(p.municipality_code).full_name,
        )
        for p in plans()
    ]
    seeded_corporations = [
        domain.seeded_corporation(
            seeded_corporation_id(c.municipality_code, c.corporation), c.municipality_code, c.corporation,
            c.designated_on,
        )
        for c in support_corporations()
    ]
    async with runtime.transaction() as work:
        added_plans = await store.insert_seeded_plans(work.conn, seeded_plans)
        for plan in added_plans:
            version = plan.in_force
            assert version is not None
            await _emit_plan_in_force(work, plan, version)
        added_corporations = await store.insert_seeded_corporations(work.conn, seeded_corporations)
        for corporation in added_corporations:
            await _emit_designated(work, corporation)
    if added_plans or added_corporations:
        log.info("reference plans and corporations seeded", plans=len(added_plans),
                 corporations=len(added_corporations))


# --- the use cases -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewMember:
    kind: MemberKind
    name: str


class PlanningService:
    def __init__(self, runtime: ServiceRuntime, *, answer_days: int = domain.DEFAULT_ANSWER_DAYS) -> None:
        self.runtime = runtime
        self.answer_days = answer_days

    @property
    def clock(self) -> Clock:
        return self.runtime.clock

    # authorise steps: load and lock the target, then check the caller acts for its municipality

    @staticmethod
    def _owned(
        load: Callable[[UnitOfWork], Awaitable[T | None]], missing: Exception, code_of: Callable[[T], str],
        principal: Principal,
    ) -> Callable[[UnitOfWork], Awaitable[T]]:
        async def authorise(work: UnitOfWork) -> T:
            target = await load(work)
            if target is None:
                raise missing
            principal.ensure_municipality(code_of(target))
            return target

        return authorise

    def _plan(self, principal: Principal, plan_id: str) -> Callable[[UnitOfWork], Awaitable[Plan]]:
        return self._owned(lambda w: store.get_plan(w.conn, plan_id, lock=True), UnknownPlan(f"no plan {plan_id}"),
                           lambda p: p.municipality_code, principal)

    def _corporation(self, principal: Principal, corporation_id: str) -> Callable[[UnitOfWork], Awaitable[Corporation]]:
        return self._owned(lambda w: store.get_corporation(w.conn, corporation_id, lock=True),
                           UnknownCorporation(f"no support corporation {corporation_id}"),
                           lambda c: c.municipality_code, principal)

    def _proposal(self, principal: Principal, proposal_id: str) -> Callable[[UnitOfWork], Awaitable[Proposal]]:
        return self._owned(lambda w: store.get_proposal(w.conn, proposal_id, lock=True),
                           UnknownProposal(f"no proposal {proposal_id}"), lambda p: p.municipality_code, principal)

    def _council(self, principal: Principal, council_id: str) -> Callable[[UnitOfWork], Awaitable[Council]]:
        return self._owned(lambda w: store.get_council(w.conn, council_id, lock=True),
                           UnknownCouncil(f"no council {council_id}"), lambda c: c.municipality_code, principal)

    @staticmethod
    def _for(principal: Principal, code: str) -> Callable[[UnitOfWork], Awaitable[str]]:
        async def authorise(work: UnitOfWork) -> str:
            principal.ensure_municipality(code)
            return code

        return authorise

    # --- plans

    async def draft_plan(self, write: Write, level: PlanLevel, code: str, content: PlanContent,
                         covers_dual_residence: bool) -> Outcome:
        async def act(work: UnitOfWork, code: str) -> Outcome:
            live = await store.live_plan(work.conn, code, level)
            plan = domain.draft_plan(new_id("pln", 16), level, code, content,
                                     covers_dual_residence=covers_dual_residence, live=live)
            try:
                await store.save_plan(work.conn, plan)
            except asyncpg.UniqueViolationError:
                # another draft of the same body committed between the look and the insert
                raise domain.PlanAlreadyExists(f"{code} already has a live {level} plan") from None
            return Outcome(201, json_body(PlanView.of(plan)))

        return await write.run(act, authorise=self._for(write.principal, code))

    async def submit_for_consultation(self, write: Write, plan_id: str, meeting_id: str | None) -> Outcome:
        async def act(work: UnitOfWork, plan: Plan) -> Outcome:
            meeting = council = None
            if meeting_id is not None:
                meeting = await store.get_meeting(work.conn, meeting_id)
                if meeting is None:
                    raise UnknownMeeting(f"no council meeting {meeting_id}")
                council = await store.get_council(work.conn, meeting.council_id)
            today = self.clock.today()
            consulted = domain.submit_for_consultation(plan, today, meeting, council)
            await store.save_plan(work.conn, consulted)
            version = consulted.pending
            assert version is not None
            await work.emit(PLANS, PlanSubmittedForConsultation(
                plan_id=plan.plan_id, level=plan.level, municipality_code=plan.municipality_code,
                prefecture_code=plan.prefecture_code, version=version.version, meeting_id=meeting_id,
                submitted_on=today,
            ), subject=plan.plan_id)
            return Outcome(200, json_body(PlanView.of(consulted)))

        return await write.run(act, authorise=self._plan(write.principal, plan_id))

    async def adopt(self, write: Write, plan_id: str) -> Outcome:
        async def act(work: UnitOfWork, plan: Plan) -> Outcome:
            prefectural = (
                await store.live_plan(work.conn, plan.prefecture_code, "prefecture")
                if plan.level == "municipality" else None
            )
            adopted = domain.adopt(plan, self.clock.today(), prefectural)
            await store.save_plan(work.conn, adopted)
            version = adopted.in_force
            assert version is not None
            await _emit_plan_in_force(work, adopted, version)
            return Outcome(200, json_body(PlanView.of(adopted)))

        return await write.run(act, authorise=self._plan(write.principal, plan_id))

    async def amend(self, write: Write, plan_id: str, content: PlanContent,
                    covers_dual_residence: bool | None) -> Outcome:
        async def act(work: UnitOfWork, plan: Plan) -> Outcome:
            amended = domain.start_amendment(plan, content, covers_dual_residence)
            await store.save_plan(work.conn, amended)
            return Outcome(201, json_body(PlanView.of(amended)))

        return await write.run(act, authorise=self._plan(write.principal, plan_id))

    async def withdraw(self, write: Write, plan_id: str, reason: PlanWithdrawalReason) -> Outcome:
        async def act(work: UnitOfWork, plan: Plan) -> Outcome:
            today = self.clock.today()
            withdrawn = domain.withdraw(plan, today, reason)
            await store.save_plan(work.conn, withdrawn)
            await work.emit(PLANS, PlanWithdrawn(
                plan_id=plan.plan_id, level=plan.level, municipality_code=plan.municipality_code,
                prefecture_code=plan.prefecture_code, version=plan.latest.version, reason=reason, withdrawn_on=today,
            ), subject=plan.plan_id)
            return Outcome(200, json_body(PlanView.of(withdrawn)))

        return await write.run(act, authorise=self._plan(write.principal, plan_id))

    async def plan(self, principal: Principal, plan_id: str) -> PlanView:
        async with self.runtime.pool.acquire() as conn:
            plan = await store.get_plan(conn, plan_id)
        if plan is None:
            raise UnknownPlan(f"no plan {plan_id}")
        principal.ensure_reads_municipality(plan.municipality_code)
        return PlanView.of(plan)

    async def plans_of(self, code: str, limit: int, offset: int) -> Page[PlanView]:
        """A municipality's plans; for a prefecture, its plan and every municipal plan inside it."""
        prefecture = domain.is_prefecture(code)
        async with self.runtime.pool.acquire() as conn:
            found, total = await store.plans(
                conn, code=None if prefecture else code, prefecture=code if prefecture else None,
                limit=limit, offset=offset,
            )
        return Page(items=[PlanView.of(p) for p in found], total=total, limit=limit, offset=offset)

    async def public_plans(self, prefecture: str | None, level: PlanLevel | None, limit: int,
                           offset: int) -> Page[PublicPlanView]:
        async with self.runtime.pool.acquire() as conn:
            found, total = await store.plans(conn, prefecture=prefecture, level=level,
                                             statuses=domain.PUBLIC_PLAN_STATUSES, limit=limit, offset=offset)
        return Page(items=[PublicPlanView.of(p) for p in found], total=total, limit=limit, offset=offset)

    async def public_plan(self, plan_id: str) -> PublicPlanView:
        async with self.runtime.pool.acquire() as conn:
            plan = await store.get_plan(conn, plan_id)
        if plan is None or not plan.public:  # a draft does not show that it exists
            raise UnknownPlan(f"no public plan {plan_id}")
        return PublicPlanView.of(plan)

    # --- support corporations

    async def apply(self, write: Write, code: str, name: str, services: tuple[SupportArea, ...]) -> Outcome:
        async def act(work: UnitOfWork, code: str) -> Outcome:
            corporation = domain.apply_for_designation(new_id("spc", 16), code, name, services, self.clock.today())
            await store.save_corporation(work.conn, corporation)
            return Outcome(201, json_body(CorporationView.of(corporation)))

        return await write.run(act, authorise=self._for(write.principal, code))

    async def designate(self, write: Write, corporation_id: str) -> Outcome:
        async def act(work: UnitOfWork, corporation: Corporation) -> Outcome:
            designated = domain.designate(corporation, self.clock.today())
            await store.save_corporation(work.conn, designated)
            await _emit_designated(work, designated)
            return Outcome(200, json_body(CorporationView.of(designated)))

        return await write.run(act, authorise=self._corporation(write.principal, corporation_id))

    async def receive_report(self, write: Write, corporation_id: str, period_from: date, period_until: date,
                             summary: str) -> Outcome:
        async def act(work: UnitOfWork, corporation: Corporation) -> Outcome:
            report = domain.receive_report(corporation, new_id("rpt", 16), period_from, period_until,
                                           self.clock.today(), summary)
            await store.add_report(work.conn, report)
            await work.emit(CORPORATIONS, CorporationReportReceived(
                corporation_id=corporation.corporation_id, municipality_code=corporation.municipality_code,
                report_id=report.report_id, period_from=period_from, period_until=period_until,
                received_on=report.received_on,
            ), subject=corporation.corporation_id)
            reports = await store.reports(work.conn, corporation.corporation_id)
            return Outcome(201, json_body(CorporationView.of(corporation, reports)))

        return await write.run(act, authorise=self._corporation(write.principal, corporation_id))

    async def revoke(self, write: Write, corporation_id: str, reason: CorporationRevocationReason,
                     note: str | None) -> Outcome:
        async def act(work: UnitOfWork, corporation: Corporation) -> Outcome:
            revoked = domain.revoke(corporation, self.clock.today(), reason)
            await store.save_corporation(work.conn, revoked, revocation_note=note)
            assert revoked.revoked_on is not None
            await work.emit(CORPORATIONS, CorporationRevoked(
                corporation_id=revoked.corporation_id, municipality_code=revoked.municipality_code, reason=reason,
                revoked_on=revoked.revoked_on,
            ), subject=revoked.corporation_id)
            return Outcome(200, json_body(CorporationView.of(revoked)))

        return await write.run(act, authorise=self._corporation(write.principal, corporation_id))

    async def corporation(self, principal: Principal, corporation_id: str) -> CorporationView:
        async with self.runtime.pool.acquire() as conn:
            corporation = await store.get_corporation(conn, corporation_id)
            if corporation is None:
                raise UnknownCorporation(f"no support corporation {corporation_id}")
            principal.ensure_reads_municipality(corporation.municipality_code)
            reports = await store.reports(conn, corporation_id)
        return CorporationView.of(corporation, reports)

    async def corporations_of(self, code: str, limit: int, offset: int) -> Page[CorporationView]:
        async with self.runtime.pool.acquire() as conn:
            found, total = await store.corporations(conn, code=code, limit=limit, offset=offset)
        return Page(items=[CorporationView.of(c) for c in found], total=total, limit=limit, offset=offset)

    async def public_corporations(self, code: str | None, limit: int, offset: int) -> Page[PublicCorporationView]:
        async with self.runtime.pool.acquire() as conn:
            found, total = await store.corporations(conn, code=code, status="designated", limit=limit, offset=offset)
        return Page(items=[PublicCorporationView.of(c) for c in found], total=total, limit=limit, offset=offset)

    # --- proposals

    async def propose(self, write: Write, corporation_id: str, kind: ProposalKind, plan_id: str | None,
                      summary: str) -> Outcome:
        """Staff record a proposal the corporation submitted (the corporation has no sign-in of its own)."""

        async def act(work: UnitOfWork, corporation: Corporation) -> Outcome:
            plan = None
            if plan_id is not None:
                plan = await store.get_plan(work.conn, plan_id)
                if plan is None:
                    raise UnknownPlan(f"no plan {plan_id}")
            today = self.clock.today()
            proposal = domain.make_proposal(new_id("prp", 16), corporation, kind, plan, summary, today,
                                            self.answer_days)
            await store.save_proposal(work.conn, proposal)
            await work.emit(CORPORATIONS, ProposalMade(
                proposal_id=proposal.proposal_id, corporation_id=proposal.corporation_id,
                municipality_code=proposal.municipality_code, kind=kind, plan_id=proposal.plan_id,
                proposed_on=today, due_on=proposal.due_on,
            ), subject=proposal.proposal_id, key=proposal.corporation_id)
            return Outcome(201, json_body(ProposalView.of(proposal, today)))

        return await write.run(act, authorise=self._corporation(write.principal, corporation_id))

    async def answer(self, write: Write, proposal_id: str, decision: ProposalDecision, reason: ProposalAnswerReason,
                     note: str | None) -> Outcome:
        async def act(work: UnitOfWork, proposal: Proposal) -> Outcome:
            today = self.clock.today()
            answered = domain.answer(proposal, decision, reason, today, note)
            await store.save_proposal(work.conn, answered)
            await work.emit(CORPORATIONS, ProposalAnswered(
                proposal_id=proposal.proposal_id, corporation_id=proposal.corporation_id,
                municipality_code=proposal.municipality_code, plan_id=proposal.plan_id, decision=decision,
                reason=reason, answered_on=today,
            ), subject=proposal.proposal_id, key=proposal.corporation_id)
            return Outcome(200, json_body(ProposalView.of(answered, today)))

        return await write.run(act, authorise=self._proposal(write.principal, proposal_id))

    async def proposals_of(self, code: str, status: str | None, limit: int, offset: int) -> Page[ProposalView]:
        today = self.clock.today()
        async with self.runtime.pool.acquire() as conn:
            found, total = await store.proposals(conn, code, status, limit, offset)
        return Page(items=[ProposalView.of(p, today) for p in found], total=total, limit=limit, offset=offset)

    # --- councils

    async def form_council(self, write: Write, code: str, name: str, members: list[NewMember]) -> Outcome:
        async def act(work: UnitOfWork, code: str) -> Outcome:
            today = self.clock.today()
            existing = await store.council_of(work.conn, code)
            council = domain.form_council(
                new_id("cnc", 16), code, name, today,
                tuple(CouncilMember(new_id("mbr", 16), m.kind, m.name, today) for m in members), existing,
            )
            try:
                await store.save_council(work.conn, council)
            except asyncpg.UniqueViolationError:
                raise domain.CouncilAlreadyExists(f"{code} already has a council") from None
            await work.emit(COUNCILS, CouncilFormed(
                council_id=council.council_id, municipality_code=code, formed_on=today,
                members=council.member_counts(),
            ), subject=council.council_id)
            return Outcome(201, json_body(CouncilView.of(council)))

        return await write.run(act, authorise=self._for(write.principal, code))

    async def add_member(self, write: Write, council_id: str, member: NewMember) -> Outcome:
        async def act(work: UnitOfWork, council: Council) -> Outcome:
            today = self.clock.today()
            changed = domain.add_member(council, CouncilMember(new_id("mbr", 16), member.kind, member.name, today))
            await store.save_council(work.conn, changed)
            await work.emit(COUNCILS, CouncilMembershipChanged(
                council_id=council.council_id, municipality_code=council.municipality_code,
                members=changed.member_counts(), changed_on=today,
            ), subject=council.council_id)
            return Outcome(201, json_body(CouncilView.of(changed, await store.meetings(work.conn, council_id))))

        return await write.run(act, authorise=self._council(write.principal, council_id))

    async def hold_meeting(self, write: Write, council_id: str, held_on: date | None, agenda: str,
                           minutes_summary: str, plan_id: str | None) -> Outcome:
        async def act(work: UnitOfWork, council: Council) -> Outcome:
            plan = None
            if plan_id is not None:
                plan = await store.get_plan(work.conn, plan_id)
                if plan is None:
                    raise UnknownPlan(f"no plan {plan_id}")
            meeting = domain.hold_meeting(council, new_id("mtg", 16), held_on or self.clock.today(), agenda,
                                          minutes_summary, plan)
            await store.add_meeting(work.conn, meeting)
            await work.emit(COUNCILS, CouncilMeetingHeld(
                council_id=council.council_id, meeting_id=meeting.meeting_id,
                municipality_code=council.municipality_code, held_on=meeting.held_on, plan_id=meeting.plan_id,
            ), subject=council.council_id)
            return Outcome(201, json_body(CouncilView.of(council, await store.meetings(work.conn, council_id))))

        return await write.run(act, authorise=self._council(write.principal, council_id))

    async def council(self, principal: Principal, council_id: str) -> CouncilView:
        async with self.runtime.pool.acquire() as conn:
            council = await store.get_council(conn, council_id)
            if council is None:
                raise UnknownCouncil(f"no council {council_id}")
            # Names and minutes are the municipality's: its staff (and admins) only.
            principal.ensure_municipality(council.municipality_code)
            return CouncilView.of(council, await store.meetings(conn, council_id))

    async def councils_of(self, code: str) -> Page[CouncilSummaryView]:
        async with self.runtime.pool.acquire() as conn:
            council = await store.council_of(conn, code)
        items = [] if council is None else [CouncilSummaryView.of(council)]
        return Page(items=items, total=len(items), limit=1, offset=0)
