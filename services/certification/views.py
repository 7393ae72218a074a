"""What the HTTP API shows: response models built from domain objects (also stored for Idempotency-Key replays)."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from pydantic import BaseModel

from services.certification.domain import (
    Application,
    ApplicationStatus,
    Certificate,
    LegalBasis,
    MunicipalityRules,
    RequiredRegistration,
    SchemeSource,
)
from shared.contracts.certification import CertificateStatus, HousingBasis
from shared.contracts.common import PartnerMembership
from shared.kit.views import Page as Page
from shared.kit.views import json_body as json_body
from shared.reference import municipality


class ApplicationView(BaseModel):
    application_id: str
    resident_id: str
    municipality_code: str
    municipality_name: str
    primary_residence_code: str
    planned_stay_days: int
    housing_basis: HousingBasis
    address_there: str | None
    partners: list[PartnerMembership]
    note: str | None
    status: ApplicationStatus
    submitted_at: datetime
    decided_at: datetime | None
    decided_by: str | None
    decision_reason: str | None
    certificate_number: str | None

    @classmethod
    def of(cls, application: Application) -> ApplicationView:
        a = application
        return cls(
            application_id=a.application_id, resident_id=a.resident_id, municipality_code=a.municipality_code,
            municipality_name=municipality(a.municipality_code).full_name,
            primary_residence_code=a.primary_residence_code, planned_stay_days=a.planned_stay_days,
            housing_basis=a.housing_basis, address_there=a.address_there, partners=list(a.partners), note=a.note,
            status=a.status, submitted_at=a.submitted_at, decided_at=a.decided_at, decided_by=a.decided_by,
            decision_reason=a.decision_reason, certificate_number=a.certificate_number,
        )


class CertificateView(BaseModel):
    certificate_number: str
    resident_id: str
    municipality_code: str
    municipality_name: str
    application_id: str
    valid_from: date
    valid_until: date
    status: CertificateStatus
    #: The memberships declared in the application; events carry those still consented.
    partners: list[PartnerMembership]
    issued_at: datetime
    renewed_at: datetime | None
    revoked_at: datetime | None
    revocation_reason: str | None

    @classmethod
    def of(cls, certificate: Certificate) -> CertificateView:
        c = certificate
        return cls(
            certificate_number=c.certificate_number, resident_id=c.resident_id,
            municipality_code=c.municipality_code, municipality_name=municipality(c.municipality_code).full_name,
            application_id=c.application_id, valid_from=c.valid_from, valid_until=c.valid_until, status=c.status,
            partners=list(c.partners), issued_at=c.issued_at, renewed_at=c.renewed_at, revoked_at=c.revoked_at,
            revocation_reason=c.revocation_reason,
        )


class RulesView(BaseModel):
    """A municipality's certification scheme."""

    municipality_code: str
    municipality_name: str
    #: plan: under its adopted 特定居住促進計画; model_project: a 先導的モデル事業 or its own scheme.
    legal_basis: LegalBasis
    plan_source: SchemeSource
    plan_adopted_on: date | None
    valid_from: date | None
    valid_until: date | None
    min_stay_days: int
    housing_bases: list[HousingBasis]
    validity_days: int
    required_registration: RequiredRegistration

    @classmethod
    def of(cls, rules: MunicipalityRules) -> RulesView:
        return cls(
            municipality_code=rules.municipality_code,
            municipality_name=municipality(rules.municipality_code).full_name, legal_basis=rules.legal_basis,
            plan_source=rules.plan_source, plan_adopted_on=rules.plan_adopted_on, valid_from=rules.valid_from,
            valid_until=rules.valid_until, min_stay_days=rules.min_stay_days,
            housing_bases=list(rules.housing_bases), validity_days=rules.validity_days,
            required_registration=rules.required_registration,
        )


class AuditView(BaseModel):
    id: int
    at: datetime
    actor: str
    actor_role: str
    municipality_code: str
    action: str
    target_type: str
    target_id: str
    reason: str | None
    details: dict[str, Any]



CSV_COLUMNS = (
    "certificate_number", "resident_id", "status", "valid_from", "valid_until", "issued_at", "renewed_at",
    "revoked_at", "revocation_reason", "partners",
)


def certificate_row(c: Certificate) -> list[object]:
    return [
        c.certificate_number, c.resident_id, c.status, c.valid_from, c.valid_until, c.issued_at,
        c.renewed_at, c.revoked_at, c.revocation_reason, ";".join(p.partner for p in c.partners),
    ]
