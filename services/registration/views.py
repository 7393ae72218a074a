"""What the HTTP API answers: response models and how they are built from the domain.

Handlers return these as JSON-ready dicts, so an idempotent replay answers byte for byte what the
first request answered. Registration views carry no contact data (they are stored with
Idempotency-Key answers and sent to staff); only the resident's own view and staff lists do.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from pydantic import BaseModel

from services.registration.domain import (
    ACTIVITY_KINDS,
    ActivityKind,
    CatalogueStatus,
    Consent,
    DesignatedActivity,
    Registration,
    Resident,
    ReviewKind,
)
from services.registration.store import ListedRegistration, ReviewedActivity, ReviewRecord
from shared.contracts.registration import ConsentPurpose, RegistrationStatus
from shared.reference import municipality


class RegistrationView(BaseModel):
    id: str
    resident_id: str
    municipality_code: str
    municipality_name: str
    prefecture_code: str
    tier: str
    status: RegistrationStatus
    derived_from: str | None
    registered_at: datetime
    valid_from: date | None
    valid_until: date | None
    awaiting_review: ReviewKind | None
    prefecture_registration_id: str | None = None


class DesignatedActivityView(BaseModel):
    """An entry of a municipality's catalogue of designated activities."""

    id: str
    municipality_code: str
    code: str
    name_ja: str
    name_en: str
    kind: ActivityKind
    kind_ja: str
    kind_en: str
    season: str | None
    evidence_required: bool
    status: CatalogueStatus
    #: Seeded sample data of a demo town, not the municipality's own designation.
    sample: bool
    created_at: datetime
    updated_at: datetime
    retired_at: datetime | None


class CatalogueView(BaseModel):
    municipality_code: str
    municipality_name: str
    items: list[DesignatedActivityView]


class ActivityView(BaseModel):
    #: The catalogue entry picked (None: a request from before catalogues, or erased).
    activity_id: str | None = None
    #: The entry's Japanese name (or the free text of a request from before catalogues).
    name: str
    date: date
    document_ref: str | None
    #: The catalogue entry as it is now (a retired one included), for the staff reviewing the request.
    activity: DesignatedActivityView | None = None


class ReviewView(BaseModel):
    id: str
    kind: ReviewKind
    status: str
    requested_at: datetime
    decided_at: datetime | None
    decided_by: str | None
    #: A rejection's code (docs/contracts/reasons.md).
    reason: str | None
    #: The staff's own words on the decision (staff only; erased with the resident's data).
    note: str | None = None
    identity_method: str | None
    identity_verified_at: datetime | None
    #: The provider whose signed attestation proved the identity (None: a result the app stated itself,
    #: accepted before attestations were required).
    identity_provider: str | None = None
    activities: list[ActivityView]


class RegistrationDetailView(RegistrationView):
    reviews: list[ReviewView]


class ConsentView(BaseModel):
    purpose: ConsentPurpose
    partner: str | None
    granted: bool
    at: datetime


class ResidentView(BaseModel):
    id: str
    name: str
    name_kana: str
    email: str
    phone: str | None
    preferred_language: str
    date_of_birth: date
    legal_address_code: str
    created_at: datetime
    registrations: list[RegistrationView]
    consents: list[ConsentView]


class ListedRegistrationView(RegistrationView):
    name: str | None
    name_kana: str | None
    email: str | None
    phone: str | None
    preferred_language: str


class RegistrationPage(BaseModel):
    items: list[ListedRegistrationView]
    total: int
    limit: int
    offset: int


class ExpiryRun(BaseModel):
    expired: int


def registration_view(r: Registration, prefecture_registration_id: str | None = None) -> RegistrationView:
    return RegistrationView(
        id=r.id, resident_id=r.resident_id, municipality_code=r.municipality_code,
        municipality_name=municipality(r.municipality_code).full_name, prefecture_code=r.prefecture_code,
        tier=r.tier, status=r.status, derived_from=r.derived_from, registered_at=r.registered_at,
        valid_from=r.valid_from, valid_until=r.valid_until, awaiting_review=r.pending_review,
        prefecture_registration_id=prefecture_registration_id,
    )


def registration_detail(r: Registration, reviews: list[ReviewRecord]) -> RegistrationDetailView:
    return RegistrationDetailView(
        **registration_view(r).model_dump(),
        reviews=[
            ReviewView(
                id=v.id, kind=v.kind, status=v.status, requested_at=v.requested_at, decided_at=v.decided_at,
                decided_by=v.decided_by, reason=v.reason, note=v.note, identity_method=v.identity_method,
                identity_verified_at=v.identity_verified_at, identity_provider=v.identity_provider,
                activities=[activity_view(a) for a in v.activities],
            )
            for v in reviews
        ],
    )


def designated_activity_view(a: DesignatedActivity) -> DesignatedActivityView:
    kind_ja, kind_en = ACTIVITY_KINDS[a.kind]
    return DesignatedActivityView(
        id=a.id, municipality_code=a.municipality_code, code=a.code, name_ja=a.name_ja, name_en=a.name_en,
        kind=a.kind, kind_ja=kind_ja, kind_en=kind_en, season=a.season, evidence_required=a.evidence_required,
        status=a.status, sample=a.sample, created_at=a.created_at, updated_at=a.updated_at, retired_at=a.retired_at,
    )


def catalogue_view(municipality_code: str, entries: list[DesignatedActivity]) -> CatalogueView:
    return CatalogueView(
        municipality_code=municipality_code, municipality_name=municipality(municipality_code).full_name,
        items=[designated_activity_view(a) for a in entries],
    )


def activity_view(a: ReviewedActivity) -> ActivityView:
    if a.entry is not None:
        return ActivityView(activity_id=a.entry.id, name=a.entry.name_ja, date=a.on, document_ref=a.document_ref,
                            activity=designated_activity_view(a.entry))
    return ActivityView(name=a.name or "", date=a.on, document_ref=a.document_ref)


def consent_view(c: Consent) -> ConsentView:
    return ConsentView(purpose=c.purpose, partner=c.partner, granted=c.granted, at=c.at)


def resident_view(resident: Resident, registrations: list[Registration], consents: list[Consent]) -> ResidentView:
    c = resident.contact
    return ResidentView(
        id=resident.id, name=c.name, name_kana=c.name_kana, email=c.email, phone=c.phone,
        preferred_language=c.preferred_language, date_of_birth=resident.date_of_birth,
        legal_address_code=resident.legal_address_code, created_at=resident.created_at,
        registrations=[registration_view(r) for r in registrations],
        consents=[consent_view(x) for x in consents],
    )


def listed_view(item: ListedRegistration) -> ListedRegistrationView:
    return ListedRegistrationView(
        **registration_view(item.registration).model_dump(), name=item.name, name_kana=item.name_kana,
        email=item.email, phone=item.phone, preferred_language=item.preferred_language,
    )


def as_json(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")
