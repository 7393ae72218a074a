"""HTTP routes (``/v1``), thin: authenticate, parse, call the use case, shape the response."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import Field, field_validator

from services.certification.domain import (
    ApplicationRequest,
    RequiredRegistration,
    SchemeEdit,
    plannable_municipality,
)
from services.certification.handlers import CertificationService
from services.certification.views import CSV_COLUMNS, ApplicationView, AuditView, CertificateView, Page, RulesView
from shared.contracts.certification import CertificateStatus, HousingBasis
from shared.contracts.common import PartnerMembership
from shared.contracts.reasons import RejectionReason, RevocationReason
from shared.kit.auth import DECIDERS, MANAGERS, Principal, Role, current_principal, require
from shared.kit.csv_export import csv_response
from shared.kit.http import ApiModel, Int32, MultilineText, Offset
from shared.kit.use_case import WriteRequest

router = APIRouter(prefix="/v1", tags=["certification"])

Resident = Annotated[Principal, Depends(require(Role.RESIDENT))]
Staff = Annotated[Principal, Depends(require(Role.STAFF, Role.ADMIN))]
# Reviewers and managers decide applications; only managers end, extend or re-rule (auditors read).
Deciders = Annotated[Principal, Depends(require(Role.STAFF, Role.ADMIN, staff=DECIDERS))]
Managers = Annotated[Principal, Depends(require(Role.STAFF, Role.ADMIN, staff=MANAGERS))]
Admin = Annotated[Principal, Depends(require(Role.ADMIN))]
People = Annotated[Principal, Depends(require(Role.RESIDENT, Role.STAFF, Role.ADMIN))]
Anyone = Annotated[Principal, Depends(current_principal)]
Limit = Annotated[int, Query(ge=1, le=200)]


async def certification(request: Request) -> CertificationService:
    # async: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop per request.
    service: CertificationService = request.app.state.certification
    return service


Service = Annotated[CertificationService, Depends(certification)]


# --- request bodies ------------------------------------------------------------------------------


class MembershipBody(ApiModel):
    partner: str = Field(max_length=32, description="partner code: jal, ana, jreast, sadokisen, kyushuyusen")
    member_number: str | None = Field(
        default=None, max_length=64,
        description=(
            "JAL Mileage Bank: 9 digits (7 on older cards); ANA Mileage Club: 10 digits; "
            "others: up to 20 letters or digits"
        ),
    )


class ApplicationBody(ApiModel):
    municipality_code: str = Field(max_length=16, description="the municipality applied to (6-digit code)")
    planned_stay_days: Int32 = Field(description="planned stay days per year, 1..366 and at least the rule minimum")
    housing_basis: HousingBasis
    address_there: str = Field(min_length=1, max_length=200)
    primary_residence_code: str = Field(max_length=16, description="where the resident's legal address is")
    partners: list[MembershipBody] = Field(default_factory=list, max_length=10)
    note: MultilineText | None = Field(default=None, max_length=1000)

    def to_request(self) -> ApplicationRequest:
        return ApplicationRequest(
            municipality_code=self.municipality_code, planned_stay_days=self.planned_stay_days,
            housing_basis=self.housing_basis, address_there=self.address_there,
            primary_residence_code=self.primary_residence_code,
            # Not validated here: the domain checks each partner against the known partners, with its own code.
            partners=tuple(
                PartnerMembership.model_construct(partner=p.partner, member_number=p.member_number)
                for p in self.partners
            ),
            note=self.note or None,
        )


class ApproveBody(ApiModel):
    valid_from: date | None = Field(
        default=None, description="default: today (Japan); at most 30 days before today, at most 90 days after it"
    )
    valid_until: date | None = Field(
        default=None,
        description="default and latest: valid_from + the municipality's validity_days - 1 (counted inclusively)",
    )


_NOTE = (
    "the staff member's own words, kept in the municipality's audit trail only: never sent to the resident, "
    "another service or a partner"
)


class RejectBody(ApiModel):
    reason_code: RejectionReason = Field(description="why, as a code of the published list (docs/contracts/reasons.md)")
    note: MultilineText | None = Field(default=None, max_length=1000, description=_NOTE)


class RevokeBody(ApiModel):
    reason_code: RevocationReason = Field(
        description="why, as a code of the published list (docs/contracts/reasons.md)"
    )
    note: MultilineText | None = Field(default=None, max_length=1000, description=_NOTE)


class RenewBody(ApiModel):
    valid_until: date | None = Field(
        default=None, description="default and latest: current valid_until + the municipality's validity_days"
    )


class RulesBody(ApiModel):
    min_stay_days: int = Field(ge=1, le=366)
    housing_bases: list[HousingBasis] = Field(min_length=1)
    validity_days: int = Field(ge=1, le=1096)
    required_registration: RequiredRegistration
    valid_from: date | None = Field(
        default=None,
        description="first day the certification scheme is in force (null: since ever); set together with "
        "valid_until; omit both to keep the scheme's period",
    )
    valid_until: date | None = Field(
        default=None, description="last day the scheme is in force (null: until further notice)"
    )

    def to_edit(self, code: str) -> SchemeEdit:
        given = self.model_fields_set & {"valid_from", "valid_until"}
        return SchemeEdit(
            municipality_code=code, min_stay_days=self.min_stay_days, housing_bases=tuple(self.housing_bases),
            validity_days=self.validity_days, required_registration=self.required_registration,
            period=(self.valid_from, self.valid_until) if given else None,
        )

    @field_validator("housing_bases")
    @classmethod
    def _unique(cls, value: list[HousingBasis]) -> list[HousingBasis]:
        return list(dict.fromkeys(value))


class PlanBody(ApiModel):
    adopted_on: date | None = Field(default=None, description="when the 特定居住促進計画 was adopted")


# --- applications --------------------------------------------------------------------------------


@router.post("/applications", status_code=201, response_model=ApplicationView)
async def submit_application(
    body: ApplicationBody, principal: Resident, service: Service, write: WriteRequest
) -> Response:
    """A resident applies for dual-resident certification with a municipality whose scheme is in force."""
    return (await service.submit_application(write, body.to_request())).response()


@router.get("/applications", response_model=Page[ApplicationView])
async def review_queue(
    principal: Staff, service: Service,
    municipality: Annotated[str | None, Query(description="default: the staff member's municipality")] = None,
    status: Literal["submitted", "approved", "rejected", "any"] = "submitted",
    housing_basis: HousingBasis | None = None,
    limit: Limit = 50, offset: Offset = 0,
    after: Annotated[str | None, Query(max_length=64, description=(
        "only applications after this one in the queue's order: the next page is `after=<last id>` "
        "(as fast at the end of a long queue as at its start, unlike `offset`)"
    ))] = None,
) -> Page[ApplicationView]:
    """The review queue of one municipality, oldest first."""
    code = municipality or principal.municipality
    if code is not None:
        principal.ensure_municipality(code)
    return await service.applications(
        municipality_code=code, resident_id=None, status=None if status == "any" else status,
        housing_basis=housing_basis, limit=limit, offset=offset, after=after,
    )


@router.get("/applications/{application_id}", response_model=ApplicationView)
async def get_application(application_id: str, principal: People, service: Service) -> ApplicationView:
    """The applicant or the municipality's staff."""
    return await service.application(principal, application_id)


@router.post("/applications/{application_id}/approve", status_code=201, response_model=CertificateView)
async def approve(
    application_id: str, principal: Deciders, service: Service, write: WriteRequest,
    body: Annotated[ApproveBody | None, Body()] = None,
) -> Response:
    """Approve: issues the certificate (201 with it)."""
    body = body or ApproveBody()
    return (await service.approve(write, application_id, body.valid_from, body.valid_until)).response()


@router.post("/applications/{application_id}/reject", response_model=ApplicationView)
async def reject(
    application_id: str, body: RejectBody, principal: Deciders, service: Service, write: WriteRequest
) -> Response:
    """Reject with a reason code (the resident is told its sentence); the optional note stays in the audit trail."""
    return (await service.reject(write, application_id, body.reason_code, body.note or None)).response()


# --- certificates --------------------------------------------------------------------------------


@router.get("/certificates/{number}", response_model=CertificateView)
async def get_certificate(number: str, principal: People, service: Service) -> CertificateView:
    """The holder or the issuing municipality's staff; partners verify through the partner gateway."""
    return await service.certificate(principal, number)


@router.post("/certificates/{number}/renew", response_model=CertificateView)
async def renew(
    number: str, principal: Managers, service: Service, write: WriteRequest,
    body: Annotated[RenewBody | None, Body()] = None,
) -> Response:
    """Extend a valid certificate before it expires: new validity, same number."""
    return (await service.renew(write, number, (body or RenewBody()).valid_until)).response()


@router.post("/certificates/{number}/revoke", response_model=CertificateView)
async def revoke(number: str, body: RevokeBody, principal: Managers, service: Service, write: WriteRequest) -> Response:
    """Revoke with a reason code (the resident is told its sentence); the optional note stays in the audit trail."""
    return (await service.revoke(write, number, body.reason_code, body.note or None)).response()


# --- a resident's own --------------------------------------------------------------------------


@router.get("/residents/{resident_id}/applications", response_model=Page[ApplicationView])
async def resident_applications(
    resident_id: str, principal: People, service: Service, limit: Limit = 50, offset: Offset = 0
) -> Page[ApplicationView]:
    """A resident's own applications (staff see those to their municipality)."""
    principal.ensure_resident(resident_id)
    return await service.applications(
        municipality_code=principal.municipality if principal.role is Role.STAFF else None,
        resident_id=resident_id, status=None, housing_basis=None, limit=limit, offset=offset,
    )


@router.get("/residents/{resident_id}/certificates", response_model=Page[CertificateView])
async def resident_certificates(
    resident_id: str, principal: People, service: Service, limit: Limit = 50, offset: Offset = 0
) -> Page[CertificateView]:
    """A resident's own certificates (staff see those of their municipality)."""
    principal.ensure_resident(resident_id)
    return await service.certificates(
        municipality_code=principal.municipality if principal.role is Role.STAFF else None,
        resident_id=resident_id, status=None, limit=limit, offset=offset,
    )


# --- municipalities ------------------------------------------------------------------------------


@router.get("/municipalities", response_model=Page[RulesView])
async def municipalities(
    principal: Anyone, service: Service, limit: Limit = 100, offset: Offset = 0
) -> Page[RulesView]:
    """The municipalities that certify dual residents, with their schemes (legal basis, period, rules)."""
    return await service.municipalities(limit, offset)


@router.get("/municipalities/{code}/rules", response_model=RulesView)
async def get_rules(code: str, principal: Anyone, service: Service) -> RulesView:
    return await service.rules(code)


@router.put("/municipalities/{code}/rules", response_model=RulesView)
async def put_rules(code: str, body: RulesBody, principal: Managers, service: Service, write: WriteRequest) -> Response:
    """The municipality's managers (or an admin) set its certification scheme's rules and period; audited.
    The legal basis (plan or model project) follows the town's plan, not this request."""
    return (await service.update_rules(write, body.to_edit(code))).response()


@router.post("/municipalities/{code}/plan", status_code=201, response_model=RulesView)
async def add_plan(
    code: str, principal: Admin, service: Service, write: WriteRequest, body: Annotated[PlanBody | None, Body()] = None
) -> Response:
    """An admin records a plan adopted after the reference data: the town's scheme moves to a plan basis
    (its rules stay), or a town without a scheme gets one with default rules."""
    return (await service.add_plan(write, code, (body or PlanBody()).adopted_on)).response()


@router.get("/municipalities/{code}/certificates", response_model=Page[CertificateView])
async def municipality_certificates(
    code: str, principal: Staff, service: Service, status: CertificateStatus | None = None,
    limit: Limit = 50, offset: Offset = 0,
    valid_until_before: Annotated[date | None, Query(description=(
        "only certificates whose validity ends before this day, soonest first (the expiring list)"
    ))] = None,
) -> Page[CertificateView]:
    principal.ensure_municipality(code)
    return await service.certificates(
        municipality_code=code, resident_id=None, status=status, limit=limit, offset=offset,
        valid_until_before=valid_until_before,
    )


@router.get(
    "/municipalities/{code}/certificates.csv",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/csv": {}}, "description": "UTF-8 CSV with a BOM"}},
)
async def municipality_certificates_csv(
    code: str, principal: Staff, service: Service, status: CertificateStatus | None = None
) -> StreamingResponse:
    """Every certificate of the municipality as CSV (UTF-8 with BOM, for spreadsheet software)."""
    plannable_municipality(code)
    principal.ensure_municipality(code)
    rows = service.certificate_rows(code, status)
    return csv_response(f"certificates-{code}-{service.clock.today().isoformat()}.csv", CSV_COLUMNS, rows)


@router.get("/municipalities/{code}/audit", response_model=Page[AuditView])
async def audit_trail(
    code: str, principal: Staff, service: Service, limit: Limit = 50, offset: Offset = 0,
    application: Annotated[str | None, Query(max_length=64, description=(
        "only the entries about this application and the certificate it was approved into"
    ))] = None,
) -> Page[AuditView]:
    """Every decision about the municipality's applications, certificates and rules, newest first."""
    principal.ensure_municipality(code)
    return await service.audit(code, limit, offset, application)
