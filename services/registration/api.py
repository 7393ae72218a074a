"""HTTP routes (prefix /v1), thin: check who calls, turn the request into a use case call.

No value of a body, the query or the path may hold a My Number: the kit refuses it for every
service (``ApiModel`` and ``BodyGuard``, ``shared.kit.my_number``).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import Field, model_validator

from services.registration import domain, handlers
from services.registration.attestation import AttestationVerifier
from services.registration.domain import ActivityKind, ActivityPick, Tier
from services.registration.views import (
    CatalogueView,
    ConsentView,
    DesignatedActivityView,
    ExpiryRun,
    RegistrationDetailView,
    RegistrationPage,
    RegistrationView,
    ResidentView,
)
from shared.contracts.reasons import RejectionReason
from shared.contracts.registration import ConsentPurpose, RegistrationStatus
from shared.kit import csv_export
from shared.kit.auth import DECIDERS, MANAGERS, Principal, Role, require
from shared.kit.http import ApiModel, MultilineText
from shared.kit.rate_limit import public_limit
from shared.kit.service import ServiceRuntime
from shared.kit.use_case import WriteRequest

Language = Literal["ja", "en"]


router = APIRouter(prefix="/v1", tags=["registration"])

ResidentOrAdmin = Annotated[Principal, Depends(require(Role.RESIDENT, Role.ADMIN))]
StaffOrAdmin = Annotated[Principal, Depends(require(Role.STAFF, Role.ADMIN))]
# Premium reviews are decided by reviewers and managers; auditors only read.
Deciders = Annotated[Principal, Depends(require(Role.STAFF, Role.ADMIN, staff=DECIDERS))]
Anyone = Annotated[Principal, Depends(require(Role.RESIDENT, Role.STAFF, Role.ADMIN))]
# A municipality's catalogue of designated activities is its managers' (the mayor's designation).
Managers = Annotated[Principal, Depends(require(Role.STAFF, Role.ADMIN, staff=MANAGERS))]


# --- Request bodies ------------------------------------------------------------------------------


class ConsentRequest(ApiModel):
    purpose: ConsentPurpose
    partner: str | None = Field(None, max_length=32, description="Required for share_certificate, e.g. jal")


class NewResidentRequest(ApiModel):
    name: str = Field(max_length=100, examples=["山田 花子"])
    name_kana: str = Field(max_length=100, examples=["ヤマダ ハナコ"])
    email: str = Field(max_length=254, json_schema_extra={"format": "email"}, examples=["hanako@example.jp"])
    phone: str | None = Field(None, max_length=32, examples=["090-1234-5678"])
    date_of_birth: dt.date
    legal_address_code: str = Field(max_length=16, description="Municipality of the 住民票", examples=["131016"])
    preferred_language: Language = "ja"
    consents: list[ConsentRequest] = Field(default_factory=list, max_length=20)


class ContactChangeRequest(ApiModel):
    name: str | None = Field(None, max_length=100)
    name_kana: str | None = Field(None, max_length=100)
    email: str | None = Field(None, max_length=254, json_schema_extra={"format": "email"})
    phone: str | None = Field(None, max_length=32, description="null removes the phone number")
    preferred_language: Language | None = None

    @model_validator(mode="after")
    def _only_phone_may_be_null(self) -> ContactChangeRequest:
        for name in ("name", "name_kana", "email", "preferred_language"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be removed")
        return self


#: A compact JWS: three base64url parts (the signature may not be empty: ``alg: none`` is refused anyway).
AttestationToken = Annotated[str, Field(
    min_length=16, max_length=8192, pattern=r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$",
    description="The identity-verification provider's signed attestation (compact JWS, ES256) that the resident "
    "verified their identity with the My Number Card (JPKI): `sub` is the resident id, it lives at most 10 minutes "
    "and is used once (docs/services/registration.md)",
)]
#: What clients sent before attestations: refused with ``identity-not-attested`` (no longer trusted).
SelfClaimedIdentity = Annotated[dict[str, Any] | None, Field(
    json_schema_extra={"deprecated": True},
    description="No longer accepted: a client cannot state its own JPKI result. Send `attestation`.",
)]


def _refuse_self_claimed(identity: dict[str, Any] | None) -> None:
    if identity is not None:
        raise domain.IdentityNotAttested(
            "`identity` (a verification result the app states itself) is no longer accepted: send `attestation`, "
            "the identity-verification provider's signed attestation"
        )


class ActivityRequest(ApiModel):
    activity_id: str | None = Field(
        None, max_length=64, examples=["304018-ume-harvest"],
        description="An entry of the municipality's catalogue (GET /v1/public/municipalities/{code}/activities)",
    )
    date: dt.date
    document_ref: str | None = Field(None, max_length=256, description="Evidence (required where the entry says so)")
    name: str | None = Field(
        None, max_length=200, json_schema_extra={"deprecated": True},
        description="No longer accepted: activities are picked from the catalogue by `activity_id`",
    )

    def to_domain(self) -> ActivityPick:
        if self.activity_id is None or self.name is not None:
            raise domain.FreeTextActivity(
                "name each activity by `activity_id`, an entry of the municipality's catalogue of designated "
                "activities (GET /v1/public/municipalities/{code}/activities); free-text `name` is no longer accepted"
            )
        return ActivityPick(self.activity_id, self.date, self.document_ref)


class RegistrationRequest(ApiModel):
    municipality_code: str = Field(max_length=16, examples=["304018"])
    tier: Tier = "basic"
    attestation: AttestationToken | None = None
    identity: SelfClaimedIdentity = None
    activities: list[ActivityRequest] = Field(default_factory=list, max_length=50)


class RenewalRequest(ApiModel):
    activities: list[ActivityRequest] = Field(max_length=50)
    attestation: AttestationToken | None = None
    identity: SelfClaimedIdentity = None


class NewDesignatedActivityRequest(ApiModel):
    code: str = Field(max_length=40, description="Unique in the municipality's catalogue; the id is `<code of the "
                      "municipality>-<code>`", examples=["beach-cleanup"])
    name_ja: str = Field(max_length=200, examples=["海岸清掃"])
    name_en: str = Field(max_length=200, examples=["Beach clean-up"])
    kind: ActivityKind
    season: str | None = Field(None, max_length=100, description="When it takes place", examples=["毎年8月"])
    evidence_required: bool = False


class DesignatedActivityChangeRequest(ApiModel):
    name_ja: str | None = Field(None, max_length=200)
    name_en: str | None = Field(None, max_length=200)
    kind: ActivityKind | None = None
    season: str | None = Field(None, max_length=100, description="null removes it")
    evidence_required: bool | None = None

    @model_validator(mode="after")
    def _only_season_may_be_null(self) -> DesignatedActivityChangeRequest:
        for name in ("name_ja", "name_en", "kind", "evidence_required"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be removed")
        return self


class RejectionRequest(ApiModel):
    reason_code: RejectionReason = Field(description="why, as a code of the published list (docs/contracts/reasons.md)")
    note: MultilineText | None = Field(
        default=None, max_length=1000,
        description="the staff member's own words, kept on the review in this service only (erased with the "
        "resident's data): never sent to the resident, another service or a partner",
    )


# --- Helpers -------------------------------------------------------------------------------------


def _runtime(request: Request) -> ServiceRuntime:
    runtime: ServiceRuntime = request.app.state.runtime
    return runtime


def _attestations(request: Request) -> AttestationVerifier:
    """The verifier ``main.create_app`` built (read here, not as one more dependency of a hot route)."""
    verifier: AttestationVerifier = request.app.state.attestations
    return verifier


# --- Residents -----------------------------------------------------------------------------------


@router.post("/residents", status_code=201, response_model=ResidentView)
async def create_resident(
    body: NewResidentRequest, principal: Annotated[Principal, Depends(require(Role.RESIDENT))], write: WriteRequest
) -> Response:
    """Create the caller's account (the token's subject is the resident id)."""
    details = domain.contact(body.name, body.name_kana, body.email, body.phone, body.preferred_language)
    outcome = await handlers.create_resident(
        write, details, body.date_of_birth, body.legal_address_code, [(c.purpose, c.partner) for c in body.consents]
    )
    return outcome.response()


@router.get("/residents/{resident_id}", response_model=ResidentView)
async def get_resident(resident_id: str, request: Request, principal: ResidentOrAdmin) -> dict[str, Any]:
    principal.ensure_resident(resident_id)
    return await handlers.get_resident(_runtime(request), resident_id)


@router.patch("/residents/{resident_id}", response_model=ResidentView)
async def change_contact(
    resident_id: str, body: ContactChangeRequest, principal: ResidentOrAdmin, write: WriteRequest
) -> Response:
    principal.ensure_resident(resident_id)
    changes = {name: getattr(body, name) for name in body.model_fields_set}
    return (await handlers.update_contact(write, resident_id, changes)).response()


@router.delete("/residents/{resident_id}", status_code=204)
async def erase_resident(resident_id: str, principal: ResidentOrAdmin, write: WriteRequest) -> Response:
    """Erasure request: the account and every registration end; personal data is erased here."""
    principal.ensure_resident(resident_id)
    return (await handlers.erase_resident(write, resident_id)).response()


@router.post("/residents/{resident_id}/registrations", status_code=201, response_model=RegistrationView)
async def register(
    resident_id: str, body: RegistrationRequest, principal: ResidentOrAdmin, write: WriteRequest, request: Request,
) -> Response:
    """Register with a municipality (201), or ask to upgrade a basic registration to premium (200)."""
    principal.ensure_resident(resident_id)
    _refuse_self_claimed(body.identity)
    outcome = await handlers.register(
        write, resident_id, body.municipality_code, body.tier, body.attestation,
        [a.to_domain() for a in body.activities], _attestations(request),
    )
    return outcome.response()


@router.get("/residents/{resident_id}/consents", response_model=list[ConsentView])
async def list_consents(resident_id: str, request: Request, principal: ResidentOrAdmin) -> list[dict[str, Any]]:
    principal.ensure_resident(resident_id)
    return await handlers.list_consents(_runtime(request), resident_id)


@router.post("/residents/{resident_id}/consents", response_model=ConsentView)
async def grant_consent(
    resident_id: str, body: ConsentRequest, principal: ResidentOrAdmin, write: WriteRequest
) -> Response:
    principal.ensure_resident(resident_id)
    return (await handlers.grant_consent(write, resident_id, body.purpose, body.partner)).response()


@router.delete("/residents/{resident_id}/consents/{purpose}", response_model=ConsentView)
async def revoke_consent(
    resident_id: str, purpose: ConsentPurpose, principal: ResidentOrAdmin, write: WriteRequest,
    partner: Annotated[str | None, Query(max_length=32)] = None,
) -> Response:
    principal.ensure_resident(resident_id)
    return (await handlers.revoke_consent(write, resident_id, purpose, partner)).response()


# --- Registrations -------------------------------------------------------------------------------


@router.get("/registrations", response_model=RegistrationPage)
async def list_registrations(
    request: Request,
    principal: StaffOrAdmin,
    municipality: Annotated[str | None, Query(max_length=16, description="Defaults to the staff's own")] = None,
    tier: Tier | None = None,
    status: RegistrationStatus | None = None,
    q: Annotated[str | None, Query(max_length=100, description="Part of the name or its reading")] = None,
    awaiting_review: bool | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    after: Annotated[str | None, Query(max_length=64, description=(
        "only registrations after this one in the list's order: the next page is `after=<last id>` "
        "(as fast deep in a long list as at its start, unlike `offset`)"
    ))] = None,
) -> dict[str, Any]:
    """Registrations with one municipality, for its staff: paged, filtered, searchable."""
    registration_filter = handlers.staff_filter(principal, municipality, tier, status, q, awaiting_review)
    return await handlers.list_registrations(_runtime(request), registration_filter, limit, offset, after)


CSV_COLUMNS = (
    "registration_id", "resident_id", "municipality_code", "municipality_name", "tier", "status", "registered_at",
    "valid_from", "valid_until", "awaiting_review", "name", "name_kana", "email", "phone", "preferred_language",
)


async def _csv_pages(pages: AsyncIterator[list[tuple[str, ...]]]) -> AsyncIterator[str]:
    """The file, a page of rows at a time: the cells come formatted (Japan time, ISO 8601, formulas
    defused) from the store, so a page is one bulk ``writerows``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    yield csv_export.BOM + buffer.getvalue()
    async for rows in pages:
        buffer.seek(0)
        buffer.truncate(0)
        writer.writerows(rows)
        yield buffer.getvalue()


@router.get(
    "/registrations/export.csv",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/csv": {}}, "description": "UTF-8 CSV with a BOM"}},
)
async def export_registrations(
    request: Request,
    principal: StaffOrAdmin,
    municipality: Annotated[str | None, Query(max_length=16)] = None,
    tier: Tier | None = None,
    status: RegistrationStatus | None = None,
    q: Annotated[str | None, Query(max_length=100)] = None,
    awaiting_review: bool | None = None,
) -> StreamingResponse:
    """The same registrations as the list, as a CSV file for Excel (UTF-8 with BOM)."""
    registration_filter = handlers.staff_filter(principal, municipality, tier, status, q, awaiting_review)
    pages = handlers.export_registrations(_runtime(request), registration_filter)
    return StreamingResponse(_csv_pages(pages), media_type="text/csv; charset=utf-8", headers={
        "content-disposition": csv_export.content_disposition(
            f"registrations-{registration_filter.municipality_code}.csv"),
        "cache-control": "no-store",
    })


@router.get("/registrations/{registration_id}", response_model=RegistrationDetailView)
async def get_registration(registration_id: str, request: Request, principal: Anyone) -> dict[str, Any]:
    """A registration with its premium reviews (the person, the municipality's staff, admin)."""
    return await handlers.get_registration(_runtime(request), principal, registration_id)


@router.post("/registrations/{registration_id}/approve", response_model=RegistrationView)
async def approve(registration_id: str, principal: Deciders, write: WriteRequest) -> Response:
    """Approve the premium request under review: valid for one year from today (Japan)."""
    return (await handlers.approve(write, registration_id)).response()


@router.post("/registrations/{registration_id}/reject", response_model=RegistrationView)
async def reject(
    registration_id: str, body: RejectionRequest, principal: Deciders, write: WriteRequest
) -> Response:
    return (await handlers.reject(write, registration_id, body.reason_code, body.note or None)).response()


@router.post("/registrations/{registration_id}/renew", response_model=RegistrationView)
async def renew(
    registration_id: str, body: RenewalRequest, principal: ResidentOrAdmin, write: WriteRequest, request: Request,
) -> Response:
    """Ask for one more premium year with a new activity record (reviewed by the municipality)."""
    _refuse_self_claimed(body.identity)
    outcome = await handlers.renew(
        write, registration_id, [a.to_domain() for a in body.activities], body.attestation, _attestations(request),
    )
    return outcome.response()


@router.delete("/registrations/{registration_id}", response_model=RegistrationView)
async def withdraw_registration(registration_id: str, principal: ResidentOrAdmin, write: WriteRequest) -> Response:
    """Withdraw one registration; the account and the other registrations stay."""
    return (await handlers.withdraw_registration(write, registration_id)).response()


# --- Designated activities (each municipality's catalogue) ---------------------------------------


@router.get("/public/municipalities/{code}/activities", response_model=CatalogueView,
            dependencies=[Depends(public_limit)], tags=["public"])
async def public_catalogue(code: str, request: Request) -> dict[str, Any]:
    """The municipality's published designated activities (public: no token). Premium requests pick
    three or more of them."""
    return await handlers.public_catalogue(_runtime(request), code)


@router.post("/municipalities/{code}/activities", status_code=201, response_model=DesignatedActivityView)
async def create_designated_activity(
    code: str, body: NewDesignatedActivityRequest, principal: Managers, write: WriteRequest
) -> Response:
    """Publish an entry of the municipality's catalogue (its managers, admin)."""
    principal.ensure_municipality(code)
    entry = domain.new_designated_activity(
        municipality_code=code, code=body.code, name_ja=body.name_ja, name_en=body.name_en, kind=body.kind,
        season=body.season, evidence_required=body.evidence_required, now=write.runtime.clock.now(),
    )
    return (await handlers.create_designated_activity(write, entry)).response()


@router.patch("/activities/{activity_id}", response_model=DesignatedActivityView)
async def change_designated_activity(
    activity_id: str, body: DesignatedActivityChangeRequest, principal: Managers, write: WriteRequest
) -> Response:
    """Change an entry's names, kind, season or whether evidence is needed (not a retired one)."""
    changes = {name: getattr(body, name) for name in body.model_fields_set}
    return (await handlers.change_designated_activity(write, activity_id, changes)).response()


@router.post("/activities/{activity_id}/retire", response_model=DesignatedActivityView)
async def retire_designated_activity(activity_id: str, principal: Managers, write: WriteRequest) -> Response:
    """Retire an entry: activities dated from today on no longer count; retiring again changes nothing."""
    return (await handlers.retire_designated_activity(write, activity_id)).response()


# --- Operations ----------------------------------------------------------------------------------


@router.post("/admin/premium-expiry", response_model=ExpiryRun, tags=["operations"])
async def run_premium_expiry(
    principal: Annotated[Principal, Depends(require(Role.ADMIN))], write: WriteRequest
) -> Response:
    """Expire premium registrations past their validity now (the service also does it periodically)."""
    return (await handlers.expire_premiums_now(write)).response()
