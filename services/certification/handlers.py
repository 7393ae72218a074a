"""Use cases: load, decide (domain), save (store), emit (outbox) — one transaction each.

HTTP use cases run in ``runtime.transaction``; event use cases run in the consumer's batch
transaction (``HandlerContext``); both expose ``conn`` and ``emit``, which is all a use case needs.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import date, datetime
from typing import Any, Literal

import structlog

from services.certification import store
from services.certification.domain import (
    SYSTEM_ACTOR,
    WITHDRAWAL_REASON,
    Application,
    ApplicationNotFound,
    ApplicationRequest,
    AuditEntry,
    Certificate,
    CertificateAlreadyHeld,
    CertificateNotFound,
    MunicipalityRules,
    NoCertificationScheme,
    OpenApplicationExists,
    PlanAlreadyRecorded,
    ProjectionEvent,
    RulesNotFound,
    SchemeEdit,
    check_against_rules,
    check_applicant,
    check_request,
    check_still_eligible,
    days_left,
    expired_on,
    expiring_window,
    plannable_municipality,
    project_events,
    registered_format,
    registrations_to_read,
    scheme_after_plan_event,
    scheme_in_force,
    shared_partners,
    validity_period,
    without_member_numbers,
)
from services.certification.views import (
    ApplicationView,
    AuditView,
    CertificateView,
    Page,
    RulesView,
    certificate_row,
    json_body,
)
from shared.contracts.certification import (
    ApplicationRejected,
    ApplicationSubmitted,
    CertificateExpired,
    CertificateExpiring,
    CertificateIssued,
    CertificateRenewed,
    CertificateRevoked,
)
from shared.contracts.common import PartnerMembership, SealedMembership
from shared.contracts.partners import PartnerRegistered
from shared.contracts.planning import PlanAdopted, PlanWithdrawn
from shared.contracts.reasons import RejectionReason, RevocationReason
from shared.contracts.registration import ConsentChanged, ResidentWithdrawn
from shared.contracts.sealed import resident_subject
from shared.contracts.topics import APPLICATIONS, CERTIFICATES, PARTNER_CODES
from shared.kit.auth import Principal, Role
from shared.kit.clock import utc_now
from shared.kit.csv_export import keyset_rows
from shared.kit.db import Connection
from shared.kit.erasure import forget_responses_about, record_erased
from shared.kit.keyring import Keyring, SubjectErased
from shared.kit.service import ServiceRuntime, UnitOfWork
from shared.kit.use_case import Outcome, Work, Write, checked_target

log = structlog.get_logger(__name__)

def _audit(
    principal: Principal | None, municipality_code: str, action: str, target: Application | Certificate | str,
    at: datetime, reason: str | None = None, *, note: str | None = None, **details: Any,
) -> AuditEntry:
    target_type: Literal["application", "certificate", "municipality"]
    if isinstance(target, Application):
        target_type, target_id = "application", target.application_id
    elif isinstance(target, Certificate):
        target_type, target_id = "certificate", target.certificate_number
    else:
        target_type, target_id = "municipality", target
    return AuditEntry(
        actor=principal.subject if principal else SYSTEM_ACTOR,
        actor_role=principal.role.value if principal else SYSTEM_ACTOR,
        municipality_code=municipality_code, action=action, target_type=target_type,
        target_id=target_id, at=at, reason=reason, details=details, note=note,
    )


async def seal_partners(
    keyring: Keyring, resident_id: str, partners: Sequence[PartnerMembership], *, erased_ok: bool = True
) -> list[SealedMembership]:
    """The memberships as events carry them: each member number sealed with the resident's data key.

    The database keeps them in clear while the resident is active (the application's and the
    certificate's views show them, and they are erased with the rest on withdrawal); every copy on
    a topic, a dead letter or a partner's projection is unreadable once the key is shredded. A
    resident whose key is gone already (erased, their withdrawal not yet here) gets no numbers
    (``erased_ok``), or the 410 ``SubjectErased`` where nothing should be recorded for them at all."""
    sealed: list[SealedMembership] = []
    for membership in partners:
        number = None
        if membership.member_number is not None:
            try:
                number = await keyring.seal(resident_subject(resident_id), membership.member_number)
            except SubjectErased:
                if not erased_ok:
                    raise
                log.info("member number not sent: the resident was erased", resident_id=resident_id)
        sealed.append(SealedMembership(partner=membership.partner, member_number=number))
    return sealed


def _certificate_fields(certificate: Certificate, partners: list[SealedMembership]) -> dict[str, Any]:
    c = certificate
    return {
        "certificate_number": c.certificate_number, "resident_id": c.resident_id,
        "municipality_code": c.municipality_code, "valid_from": c.valid_from, "valid_until": c.valid_until,
        "status": c.status, "partners": partners,
    }


CertificateEvent = (
    CertificateIssued | CertificateRenewed | CertificateRevoked | CertificateExpiring | CertificateExpired
)


async def _record_rejection(
    work: Work, principal: Principal | None, rejected: Application, reason: RejectionReason, at: datetime,
    note: str | None = None,
) -> None:
    """Save a rejected application, audit who rejected it and why (code and note), announce it (code only)."""
    await store.save_decision(work.conn, rejected)
    await store.append_audit(
        work.conn,
        _audit(principal, rejected.municipality_code, "application.rejected", rejected, at, reason, note=note),
    )
    await work.emit(
        APPLICATIONS,
        ApplicationRejected(
            application_id=rejected.application_id, resident_id=rejected.resident_id,
            municipality_code=rejected.municipality_code, reason=reason, decided_at=at,
        ),
        subject=rejected.application_id,
    )


async def _emit_certificate(work: Work, event: CertificateEvent) -> None:
    """Certificate events are keyed (and their subject is) the certificate number."""
    await work.emit(CERTIFICATES, event, subject=event.certificate_number)


# --- the resident projection (consumed from registration.residents.v1) ---------------------------


async def record_projection_events(
    conn: Connection, events: Sequence[tuple[ProjectionEvent, datetime]]
) -> None:
    """Apply a run of registration events (each with its envelope time) in a few statements, leaving
    the rows applying them one by one would: read what the run builds on, fold it, write each table once.

    The common run (registrations and consents, changes of registrations it saved itself) builds on
    nothing stored: it is folded whole and written in one statement that also drops every row of a
    resident who withdrew. Folding a withdrawn resident's events and dropping their rows after is
    dropping the events before, as each row belongs to one resident: a registration named under two
    residents in one run (never seen: ids are per resident) takes the longer way, as does a run that
    reads stored registrations."""
    if not registrations_to_read(event for event, _ in events) and _one_resident_per_registration(events):
        changes = project_events(events, {})
        withdrawn = await store.save_projection(
            conn, list(changes.residents.values()), list(changes.registrations.values()),
            list(changes.consents.values()), unless_withdrawn={event.resident_id for event, _ in events},
        )
        for event, _ in events:
            _of_withdrawn(event, withdrawn)  # logs each event ignored
        return
    withdrawn = await store.withdrawn_among(conn, (event.resident_id for event, _ in events))
    live = [(event, at) for event, at in events if not _of_withdrawn(event, withdrawn)]
    needed = registrations_to_read(event for event, _ in live)
    stored = await store.get_registrations(conn, needed) if needed else {}
    changes = project_events(live, stored)
    await store.save_projection(
        conn, list(changes.residents.values()), list(changes.registrations.values()), list(changes.consents.values())
    )


def _one_resident_per_registration(events: Sequence[tuple[ProjectionEvent, datetime]]) -> bool:
    owners: dict[str, str] = {}
    for event, _ in events:
        if isinstance(event, ConsentChanged):
            continue
        if owners.setdefault(event.registration_id, event.resident_id) != event.resident_id:
            return False
    return True


def _of_withdrawn(event: ProjectionEvent, withdrawn: set[str]) -> bool:
    # No withdrawal is in a run (it is handled alone), so who withdrew stays the same throughout.
    if event.resident_id not in withdrawn:
        return False
    log.info("event for a withdrawn resident ignored", resident_id=event.resident_id, event_type=event.event_type)
    return True


async def withdraw_resident(work: Work, event: ResidentWithdrawn, at: datetime) -> None:
    """Erasure: reject what is open, revoke what is valid, erase what is personal, keep a tombstone.

    Personal here: the legal address, the applications' address there, note and member numbers, the
    certificates' member numbers, staff notes about the resident's applications and certificates
    (the audit trail keeps who decided what, when, and the reason code) and the stored responses of
    writes about them. What the events carried is sealed with the resident's key, which registration
    shreds."""
    conn = work.conn
    await record_erased(conn, event.resident_id, event.withdrawn_at)
    resident = await store.load_resident(conn, event.resident_id, lock=True)
    consented = resident.consented_partners if resident else frozenset()
    await store.mark_withdrawn(conn, event.resident_id, event.withdrawn_at, at)
    now = utc_now()
    # Applications before certificates: an approval running now holds the application's lock, and
    # the certificate it issues is visible to the statements after this one.
    for application in await store.open_applications_of(conn, event.resident_id):
        rejected = application.reject(by=SYSTEM_ACTOR, at=now, reason=WITHDRAWAL_REASON)
        await _record_rejection(work, None, rejected, WITHDRAWAL_REASON, now)
    for certificate in await store.valid_certificates_of(conn, event.resident_id):
        revoked = certificate.revoke_on_withdrawal(now)
        await store.save_certificate(conn, revoked)
        await store.append_audit(
            conn, _audit(None, revoked.municipality_code, "certificate.revoked", revoked, now, WITHDRAWAL_REASON)
        )
        # The partners that saw the certificate learn it ended; their member numbers are gone.
        partners = [
            SealedMembership(partner=m.partner)
            for m in without_member_numbers(shared_partners(certificate.partners, consented))
        ]
        await _emit_certificate(
            work, CertificateRevoked(**_certificate_fields(revoked, partners), reason=WITHDRAWAL_REASON, revoked_at=now)
        )
    await store.erase_applications(conn, event.resident_id, now)
    await store.erase_certificate_member_numbers(conn, event.resident_id)
    notes = await store.erase_audit_notes(conn, event.resident_id)
    responses = await forget_responses_about(conn, event.resident_id)
    log.info("resident withdrawn: personal data erased", resident_id=event.resident_id, staff_notes=notes,
             stored_responses=responses)


# --- plans (consumed from planning.plans.v1) -----------------------------------------------------


async def record_plan_event(work: Work, event: PlanAdopted | PlanWithdrawn, at: datetime) -> None:
    """A municipal plan adopted or withdrawn moves the town's scheme between a plan and a
    model-project basis (prefectural plans certify nobody); audited as the planning service's act."""
    if event.level != "municipality":
        return
    code = event.municipality_code
    current = await store.get_rules(work.conn, code, lock=True)
    scheme = scheme_after_plan_event(current, code, event)
    if scheme is None:
        log.info("plan withdrawn where no plan-based scheme is recorded", municipality_code=code)
        return
    await store.upsert_scheme(work.conn, scheme, "planning")
    action = "plan.adopted" if isinstance(event, PlanAdopted) else "plan.withdrawn"
    await store.append_audit(
        work.conn,
        AuditEntry(actor="planning", actor_role=SYSTEM_ACTOR, municipality_code=code, action=action,
                   target_type="municipality", target_id=code, at=at,
                   details={"plan_id": event.plan_id, "legal_basis": scheme.legal_basis}),
    )
    log.info("certification scheme follows the plan", municipality_code=code, legal_basis=scheme.legal_basis)


# --- partners registered through the gateway -----------------------------------------------------


async def record_registered_partners(conn: Connection, events: Sequence[PartnerRegistered]) -> None:
    """The projection of ``gateway.partners.v1``: which partners beyond the seed applications may
    name, and their member-number formats (the latest registration of a code wins)."""
    latest: dict[str, PartnerRegistered] = {}
    for event in events:
        if event.code not in latest or latest[event.code].registered_at <= event.registered_at:
            latest[event.code] = event
    await store.save_registered_partners(
        conn, [(e.code, e.member_number_format, e.registered_at) for e in latest.values()]
    )
    log.info("registered partners recorded", partners=sorted(latest))


# --- HTTP use cases ------------------------------------------------------------------------------


class CertificationService:
    def __init__(self, runtime: ServiceRuntime, *, retry_after_s: int = 5) -> None:
        self.runtime = runtime
        self.clock = runtime.clock
        self.retry_after_s = retry_after_s

    async def _registered_partners(self, request: ApplicationRequest) -> dict[str, tuple[re.Pattern[str], str]]:
        """The formats of the registered (not seeded) partners the request names: one read, only then."""
        named = {m.partner for m in request.partners} - set(PARTNER_CODES)
        if not named:
            return {}
        formats = await store.registered_partner_formats(self.runtime.pool, named)
        return {code: registered_format(pattern) for code, pattern in formats.items()}

    # applications

    async def submit_application(self, write: Write, request: ApplicationRequest) -> Outcome:
        check_request(request, await self._registered_partners(request))
        principal = write.principal

        async def act(work: UnitOfWork) -> Outcome:
            conn = work.conn
            rules = check_against_rules(
                request, await store.get_rules(conn, request.municipality_code), self.clock.today()
            )
            resident = await store.load_resident(conn, principal.subject, lock=True)
            check_applicant(request, rules, resident, self.clock.today(), retry_after_s=self.retry_after_s)
            if await store.has_open_application(conn, principal.subject, request.municipality_code):
                raise OpenApplicationExists(f"an application to {request.municipality_code} is under review already")
            held = await store.valid_certificate_number(conn, principal.subject, request.municipality_code)
            if held is not None:
                raise CertificateAlreadyHeld(
                    f"certificate {held} is valid; the municipality renews it", certificate_number=held
                )
            application = Application.submit(principal.subject, request, self.clock.now())
            try:
                await store.insert_application(conn, application)
            except store.OpenApplicationConflict:
                raise OpenApplicationExists(
                    f"an application to {request.municipality_code} is under review already"
                ) from None
            await work.emit(
                APPLICATIONS,
                ApplicationSubmitted(
                    application_id=application.application_id, resident_id=application.resident_id,
                    municipality_code=application.municipality_code,
                    primary_residence_code=application.primary_residence_code,
                    planned_stay_days=application.planned_stay_days, housing_basis=application.housing_basis,
                    partners=await seal_partners(
                        self.runtime.keyring, application.resident_id, application.partners, erased_ok=False
                    ),
                    submitted_at=application.submitted_at,
                ),
                subject=application.application_id,
            )
            log.info("application submitted", application_id=application.application_id,
                     municipality_code=application.municipality_code)
            return Outcome(201, json_body(ApplicationView.of(application)))

        return await write.run(act)

    async def approve(
        self, write: Write, application_id: str, valid_from: date | None, valid_until: date | None
    ) -> Outcome:
        principal = write.principal

        async def act(work: UnitOfWork, application: Application) -> Outcome:
            conn = work.conn
            today = self.clock.today()
            # Certified only while the town's scheme is in force (it may have ended since the application).
            code = application.municipality_code
            rules = scheme_in_force(code, await store.get_rules(conn, code), today)
            resident = check_still_eligible(
                rules, await store.load_resident(conn, application.resident_id, lock=True), today
            )
            start, end = validity_period(rules, today, valid_from, valid_until)
            now = self.clock.now()
            approval = application.approval(
                by=principal.subject, at=now, year=today.year, valid_from=start, valid_until=end
            )
            # One statement takes the number and writes the approval: every approval of the town
            # waits for the counter row from that statement until our commit.
            number = await store.issue_certificate(
                conn, approval,
                _audit(principal, application.municipality_code, "application.approved", application, now,
                       valid_from=start, valid_until=end),
            )
            approved, certificate = approval.numbered(number)
            partners = await seal_partners(
                self.runtime.keyring, certificate.resident_id,
                shared_partners(certificate.partners, resident.consented_partners), erased_ok=False,
            )
            await _emit_certificate(
                work,
                CertificateIssued(
                    **_certificate_fields(certificate, partners), application_id=approved.application_id,
                    issued_at=now,
                ),
            )
            log.info("certificate issued", certificate_number=number, application_id=application_id)
            return Outcome(201, json_body(CertificateView.of(certificate)))

        return await write.run(act, authorise=self._application_for_decision(principal, application_id))

    async def reject(
        self, write: Write, application_id: str, reason: RejectionReason, note: str | None = None
    ) -> Outcome:
        principal = write.principal

        async def act(work: UnitOfWork, application: Application) -> Outcome:
            now = self.clock.now()
            rejected = application.reject(by=principal.subject, at=now, reason=reason)
            await _record_rejection(work, principal, rejected, reason, now, note)
            return Outcome(200, json_body(ApplicationView.of(rejected)))

        return await write.run(act, authorise=self._application_for_decision(principal, application_id))

    def _application_for_decision(
        self, principal: Principal, application_id: str
    ) -> Callable[[UnitOfWork], Awaitable[Application]]:
        """Only the municipality's staff decide on its applications (the application is locked for it)."""

        async def load(conn: Connection) -> Application:
            application = await store.get_application(conn, application_id, lock=True)
            if application is None:
                raise ApplicationNotFound(f"no application {application_id}")
            return application

        return checked_target(load, lambda application: principal.ensure_municipality(application.municipality_code))

    # certificates

    async def renew(self, write: Write, number: str, valid_until: date | None) -> Outcome:
        principal = write.principal

        async def act(work: UnitOfWork, certificate: Certificate) -> Outcome:
            conn = work.conn
            today = self.clock.today()
            code = certificate.municipality_code
            rules = scheme_in_force(code, await store.get_rules(conn, code), today)
            now = self.clock.now()
            renewed = certificate.renew(today=today, validity_days=rules.validity_days, valid_until=valid_until, at=now)
            resident = check_still_eligible(
                rules, await store.load_resident(conn, certificate.resident_id, lock=True), today
            )
            await store.save_certificate(conn, renewed, reset_expiring=True)
            await store.append_audit(
                conn,
                _audit(principal, renewed.municipality_code, "certificate.renewed", renewed, now,
                       previous_valid_until=certificate.valid_until, valid_until=renewed.valid_until),
            )
            partners = await seal_partners(
                self.runtime.keyring, renewed.resident_id,
                shared_partners(renewed.partners, resident.consented_partners),
            )
            await _emit_certificate(work, CertificateRenewed(**_certificate_fields(renewed, partners), renewed_at=now))
            return Outcome(200, json_body(CertificateView.of(renewed)))

        return await write.run(act, authorise=self._certificate_for_decision(principal, number))

    async def revoke(
        self, write: Write, number: str, reason: RevocationReason, note: str | None = None
    ) -> Outcome:
        principal = write.principal

        async def act(work: UnitOfWork, certificate: Certificate) -> Outcome:
            conn = work.conn
            now = self.clock.now()
            revoked = certificate.revoke(today=self.clock.today(), reason=reason, at=now)
            await store.save_certificate(conn, revoked)
            await store.append_audit(
                conn,
                _audit(principal, revoked.municipality_code, "certificate.revoked", revoked, now, reason,
                       note=note),
            )
            consented = (await store.consented_partners(conn, [revoked.resident_id])).get(
                revoked.resident_id, frozenset()
            )
            partners = await seal_partners(
                self.runtime.keyring, revoked.resident_id, shared_partners(revoked.partners, consented)
            )
            await _emit_certificate(
                work, CertificateRevoked(**_certificate_fields(revoked, partners), reason=reason, revoked_at=now)
            )
            return Outcome(200, json_body(CertificateView.of(revoked)))

        return await write.run(act, authorise=self._certificate_for_decision(principal, number))

    def _certificate_for_decision(
        self, principal: Principal, number: str
    ) -> Callable[[UnitOfWork], Awaitable[Certificate]]:
        """Only the issuing municipality's staff decide on a certificate (it is locked for it)."""

        async def load(conn: Connection) -> Certificate:
            certificate = await store.get_certificate(conn, number, lock=True)
            if certificate is None:
                raise CertificateNotFound(f"no certificate {number}")
            return certificate

        return checked_target(load, lambda certificate: principal.ensure_municipality(certificate.municipality_code))

    # municipality rules

    async def _rules(self, conn: Connection, code: str) -> MunicipalityRules:
        rules = await store.get_rules(conn, code)
        if rules is None:
            raise NoCertificationScheme(f"{code} has no certification scheme")
        return rules

    async def rules(self, code: str) -> RulesView:
        plannable_municipality(code)
        async with self.runtime.pool.acquire() as conn:
            rules = await store.get_rules(conn, code)
        if rules is None:
            raise RulesNotFound(f"{code} has no certification scheme, so no certification rules")
        return RulesView.of(rules)

    async def municipalities(self, limit: int, offset: int) -> Page[RulesView]:
        async with self.runtime.pool.acquire() as conn:
            rules, total = await store.list_rules(conn, limit, offset)
        return Page(items=[RulesView.of(r) for r in rules], total=total, limit=limit, offset=offset)

    async def update_rules(self, write: Write, edit: SchemeEdit) -> Outcome:
        principal = write.principal
        code = edit.municipality_code
        plannable_municipality(code)

        async def authorise(work: UnitOfWork) -> None:
            principal.ensure_municipality(code)

        async def act(work: UnitOfWork, _: None) -> Outcome:
            before = await store.get_rules(work.conn, code)
            if before is None:
                raise RulesNotFound(f"{code} has no certification scheme")
            await store.save_rules(work.conn, before.edited(edit), principal.subject)
            saved = await self._rules(work.conn, code)
            await store.append_audit(
                work.conn,
                _audit(principal, code, "rules.updated", code, self.clock.now(),
                       before=RulesView.of(before).model_dump(mode="json"),
                       after=RulesView.of(saved).model_dump(mode="json")),
            )
            return Outcome(200, json_body(RulesView.of(saved)))

        return await write.run(act, authorise=authorise)

    async def add_plan(self, write: Write, code: str, adopted_on: date | None) -> Outcome:
        """An admin records a plan adopted after the reference data: a town certifying under a model
        project keeps its rules on a plan basis now; a town without a scheme gets one, default rules."""
        principal = write.principal
        plannable_municipality(code)

        async def act(work: UnitOfWork) -> Outcome:
            current = await store.get_rules(work.conn, code, lock=True)
            if current is not None and current.legal_basis == "plan":
                raise PlanAlreadyRecorded(f"{code} has a plan on record already")
            scheme = (current or MunicipalityRules(code)).with_plan(adopted_on, "admin")
            await store.upsert_scheme(work.conn, scheme, principal.subject)
            rules = await self._rules(work.conn, code)
            await store.append_audit(
                work.conn, _audit(principal, code, "plan.recorded", code, self.clock.now(), adopted_on=adopted_on)
            )
            return Outcome(201, json_body(RulesView.of(rules)))

        return await write.run(act)

    # reads

    async def application(self, principal: Principal, application_id: str) -> ApplicationView:
        async with self.runtime.pool.acquire() as conn:
            application = await store.get_application(conn, application_id)
        if application is None or (principal.role is Role.RESIDENT and principal.subject != application.resident_id):
            raise ApplicationNotFound(f"no application {application_id}")
        if principal.role is not Role.RESIDENT:
            principal.ensure_municipality(application.municipality_code)
        return ApplicationView.of(application)

    async def applications(
        self, *, municipality_code: str | None, resident_id: str | None, status: str | None,
        housing_basis: str | None, limit: int, offset: int, after: str | None = None,
    ) -> Page[ApplicationView]:
        async with self.runtime.pool.acquire() as conn:
            items, total = await store.list_applications(
                conn, municipality_code=municipality_code, resident_id=resident_id, status=status,
                housing_basis=housing_basis, limit=limit, offset=offset, after=after,
            )
        return Page(items=[ApplicationView.of(a) for a in items], total=total, limit=limit, offset=offset)

    async def certificate(self, principal: Principal, number: str) -> CertificateView:
        """Only the holder and the issuing municipality read a certificate; to anyone else it does not exist."""
        async with self.runtime.pool.acquire() as conn:
            certificate = await store.get_certificate(conn, number)
        allowed = certificate is not None and (
            principal.role is Role.ADMIN
            or (principal.role is Role.RESIDENT and principal.subject == certificate.resident_id)
            or (principal.role is Role.STAFF and principal.municipality == certificate.municipality_code)
        )
        if certificate is None or not allowed:
            raise CertificateNotFound(f"no certificate {number}")
        return CertificateView.of(certificate)

    async def certificates(
        self, *, municipality_code: str | None, resident_id: str | None, status: str | None, limit: int, offset: int,
        valid_until_before: date | None = None,
    ) -> Page[CertificateView]:
        async with self.runtime.pool.acquire() as conn:
            items, total = await store.list_certificates(
                conn, municipality_code=municipality_code, resident_id=resident_id, status=status,
                limit=limit, offset=offset, valid_until_before=valid_until_before,
            )
        return Page(items=[CertificateView.of(c) for c in items], total=total, limit=limit, offset=offset)

    async def certificate_rows(self, code: str, status: str | None) -> AsyncIterator[list[object]]:
        """Every certificate of the municipality as CSV rows, a page at a time (no connection held between)."""

        async def page(conn: Connection, after: store.CertificateKey | None, limit: int) -> list[Certificate]:
            return await store.certificates_after(conn, code, status, after, limit)

        async for certificate in keyset_rows(self.runtime.pool, page, store.certificate_key):
            yield certificate_row(certificate)

    async def audit(self, code: str, limit: int, offset: int, application_id: str | None = None) -> Page[AuditView]:
        async with self.runtime.pool.acquire() as conn:
            items, total = await store.list_audit(conn, code, limit, offset, application_id)
        return Page(items=[AuditView.model_validate(i) for i in items], total=total, limit=limit, offset=offset)

    # expiry

    async def sweep_expiry(self, batch_size: int = 200) -> tuple[int, int]:
        """Send due expiring notices and expire what ended; safe to run on every replica at once."""
        today = self.clock.today()
        first_day, last_day = expiring_window(today)

        async def expiring(conn: Connection) -> list[Certificate]:
            return await store.claim_expiring(conn, first_day, last_day, batch_size)

        async def expired(conn: Connection) -> list[Certificate]:
            return await store.claim_expired(conn, today, batch_size)

        def expiring_event(c: Certificate, partners: list[SealedMembership]) -> CertificateEvent:
            return CertificateExpiring(**_certificate_fields(c, partners), days_left=days_left(c.valid_until, today))

        def expired_event(c: Certificate, partners: list[SealedMembership]) -> CertificateEvent:
            return CertificateExpired(**_certificate_fields(c, partners), expired_on=expired_on(c.valid_until))

        notified = await self._sweep(expiring, expiring_event, batch_size)
        ended = await self._sweep(expired, expired_event, batch_size)
        if notified or ended:
            log.info("expiry sweep", today=today.isoformat(), expiring=notified, expired=ended)
        return notified, ended

    async def _sweep(
        self,
        claim: Callable[[Connection], Awaitable[list[Certificate]]],
        event: Callable[[Certificate, list[SealedMembership]], CertificateEvent],
        batch_size: int,
    ) -> int:
        count = 0
        while True:
            async with self.runtime.transaction() as work:
                claimed = await claim(work.conn)
                consents = await store.consented_partners(work.conn, [c.resident_id for c in claimed])
                for certificate in claimed:
                    partners = await seal_partners(
                        self.runtime.keyring, certificate.resident_id,
                        shared_partners(certificate.partners, consents.get(certificate.resident_id, frozenset())),
                    )
                    await _emit_certificate(work, event(certificate, partners))
            count += len(claimed)
            if len(claimed) < batch_size:
                return count

