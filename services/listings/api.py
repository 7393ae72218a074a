"""HTTP routes (``/v1``), thin: authenticate, parse, call the use case, shape the response.

Staff of a municipality draft, publish and withdraw its listings — for the municipality itself or,
for now, on behalf of a support corporation it designated (as planning records a corporation's
reports and proposals: corporations have no accounts of their own yet) — see who said "interested"
and record the giving of a consenting resident's contact. Residents set their interests (and with
them their consent to receive matching listings), say "interested", and see the record of their
contact given. ``/v1/public/…`` needs no token: published listings, rate-limited per client IP.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import Field

from services.listings.domain import ConsentMethod, ListingStatus, OwnerConsent
from services.listings.handlers import ListingsService, NewListing
from services.listings.store import ListingFilter
from services.listings.views import (
    ContactDeliveryView,
    InterestsView,
    InterestView,
    ListingView,
    Page,
    PublicListingView,
    StaffInterestView,
)
from shared.contracts.common import Language
from shared.contracts.listings import DigestCadence, ListingKind, ListingWithdrawalReason, Publisher
from shared.kit.auth import DECIDERS, Principal, Role, require
from shared.kit.http import ApiModel, MultilineText, Offset
from shared.kit.rate_limit import public_limit
from shared.kit.use_case import WriteRequest

router = APIRouter(prefix="/v1", tags=["listings"])

Staff = Annotated[Principal, Depends(require(Role.STAFF, Role.ADMIN))]
Deciders = Annotated[Principal, Depends(require(Role.STAFF, Role.ADMIN, staff=DECIDERS))]
Residents = Annotated[Principal, Depends(require(Role.RESIDENT, Role.ADMIN))]
Limit = Annotated[int, Query(ge=1, le=200)]
Code = Annotated[str, Field(max_length=16, description="a 6-digit local government code")]


async def listings_service(request: Request) -> ListingsService:
    service: ListingsService = request.app.state.listings
    return service


Service = Annotated[ListingsService, Depends(listings_service)]


# --- request bodies ----------------------------------------------------------------------------------


class OwnerConsentBody(ApiModel):
    owner_name: str = Field(min_length=1, max_length=200, description="who consented: the owner (kept here only, "
                            "never in an event or the public view)")
    consented_on: date
    method: ConsentMethod
    document_ref: str | None = Field(default=None, max_length=200,
                                     description="the municipality's reference of the signed form or e-mail")

    def to_consent(self) -> OwnerConsent:
        return OwnerConsent(self.owner_name, self.consented_on, self.method, self.document_ref)


class ListingBody(ApiModel):
    kind: ListingKind
    municipality_code: Code
    publisher: Publisher = "municipality"
    corporation_id: str | None = Field(default=None, max_length=64,
                                       description="the designated support corporation it is published for")
    area: str = Field(min_length=1, max_length=200)
    title: str = Field(min_length=1, max_length=200)
    summary: MultilineText = Field(min_length=1, max_length=4000)
    language: Language = "ja"
    available_from: date
    available_until: date | None = None
    expires_on: date
    owner_consent: OwnerConsentBody | None = Field(
        default=None, description="required for vacant_house and trial_stay: no consent, no listing"
    )

    def to_new(self) -> NewListing:
        return NewListing(
            self.kind, self.municipality_code, self.publisher, self.corporation_id, self.area, self.title,
            self.summary, self.language, self.available_from, self.available_until, self.expires_on,
            None if self.owner_consent is None else self.owner_consent.to_consent(),
        )


class WithdrawBody(ApiModel):
    reason_code: ListingWithdrawalReason


class InterestsBody(ApiModel):
    kinds: list[ListingKind] = Field(min_length=1, max_length=8)
    municipality_codes: list[Code] = Field(default_factory=list, max_length=50)
    prefecture_codes: list[Code] = Field(default_factory=list, max_length=47)
    available_from: date | None = None
    available_until: date | None = None
    cadence: DigestCadence = "immediate"


class InterestedBody(ApiModel):
    share_contact: bool = Field(
        default=False, description="consent (for this listing only) that its owner gets your contact"
    )


# --- listings (staff) --------------------------------------------------------------------------------


@router.post("/listings", status_code=201, response_model=ListingView)
async def draft_listing(body: ListingBody, principal: Deciders, service: Service, write: WriteRequest) -> Response:
    """A new listing in draft; a vacant house or trial stay needs the owner's consent (422
    ``owner-consent-missing``)."""
    return (await service.draft(write, body.to_new())).response()


@router.get("/listings", response_model=Page[ListingView])
async def staff_listings(
    principal: Staff, service: Service,
    municipality: Annotated[str | None, Query(max_length=16, description="defaults to the staff's own")] = None,
    kind: ListingKind | None = None, status: ListingStatus | None = None, limit: Limit = 50, offset: Offset = 0,
) -> Page[ListingView]:
    """The municipality's listings in every state."""
    return await service.listings(
        principal, ListingFilter(kind=kind, municipality_code=municipality,
                                 statuses=None if status is None else (status,)), limit, offset,
    )


@router.get("/listings/{listing_id}", response_model=ListingView)
async def staff_listing(listing_id: str, principal: Staff, service: Service) -> ListingView:
    """A listing with its lifecycle and the owner's consent record."""
    return await service.listing(principal, listing_id)


@router.post("/listings/{listing_id}/publish", response_model=ListingView)
async def publish(listing_id: str, principal: Deciders, service: Service, write: WriteRequest) -> Response:
    """Publish the draft: public at once, matched to residents' interests (told in their next digest)."""
    return (await service.publish(write, listing_id)).response()


@router.post("/listings/{listing_id}/withdraw", response_model=ListingView)
async def withdraw(listing_id: str, body: WithdrawBody, principal: Deciders, service: Service,
                   write: WriteRequest) -> Response:
    return (await service.withdraw(write, listing_id, body.reason_code)).response()


@router.get("/listings/{listing_id}/interests", response_model=list[StaffInterestView])
async def listing_interests(listing_id: str, principal: Staff, service: Service) -> list[StaffInterestView]:
    """Who said "interested" (resident ids); for those who consented to give their contact, their
    registration with the municipality, where its staff read the contact."""
    return await service.listing_interests(principal, listing_id)


@router.post("/listings/{listing_id}/interests/{resident_id}/contact-deliveries", status_code=201,
             response_model=ContactDeliveryView)
async def deliver_contact(listing_id: str, resident_id: str, principal: Deciders, service: Service,
                          write: WriteRequest) -> Response:
    """Record that the listing's owner gets the resident's contact (the resident consented for this
    listing; 409 ``no-contact-consent`` otherwise). The contact itself is read in registration."""
    return (await service.deliver_contact(write, listing_id, resident_id)).response()


# --- residents ---------------------------------------------------------------------------------------


@router.get("/residents/{resident_id}/listing-interests", response_model=InterestsView | None)
async def get_interests(resident_id: str, principal: Residents, service: Service) -> InterestsView | None:
    """The resident's interests and consent (null: none, no listings are sent)."""
    return await service.interests(principal, resident_id)


@router.put("/residents/{resident_id}/listing-interests", response_model=InterestsView)
async def set_interests(resident_id: str, body: InterestsBody, principal: Residents, service: Service,
                        write: WriteRequest) -> Response:
    """Choose interests and consent to receive matching listings (a digest, at once or weekly)."""
    return (await service.set_interests(
        write, resident_id, kinds=frozenset(body.kinds), municipality_codes=frozenset(body.municipality_codes),
        prefecture_codes=frozenset(body.prefecture_codes), available_from=body.available_from,
        available_until=body.available_until, cadence=body.cadence,
    )).response()


@router.delete("/residents/{resident_id}/listing-interests", status_code=204)
async def revoke_interests(resident_id: str, principal: Residents, service: Service, write: WriteRequest) -> Response:
    """Revoke the consent: the interests and the matches not yet sent are deleted."""
    return (await service.revoke_interests(write, resident_id)).response()


@router.get("/residents/{resident_id}/interested-listings", response_model=list[InterestView])
async def interested_listings(resident_id: str, principal: Residents, service: Service) -> list[InterestView]:
    return await service.resident_interests(principal, resident_id)


@router.put("/residents/{resident_id}/interested-listings/{listing_id}", response_model=InterestView)
async def express_interest(resident_id: str, listing_id: str, body: InterestedBody, principal: Residents,
                           service: Service, write: WriteRequest) -> Response:
    """Say "interested" in a published listing, with or without consent to give its owner your contact."""
    return (await service.express_interest(write, resident_id, listing_id, body.share_contact)).response()


@router.delete("/residents/{resident_id}/interested-listings/{listing_id}", status_code=204)
async def withdraw_interest(resident_id: str, listing_id: str, principal: Residents, service: Service,
                            write: WriteRequest) -> Response:
    """No longer interested (a contact already given stays in the record)."""
    return (await service.withdraw_interest(write, resident_id, listing_id)).response()


@router.get("/residents/{resident_id}/listing-deliveries", response_model=list[ContactDeliveryView])
async def listing_deliveries(resident_id: str, principal: Residents, service: Service) -> list[ContactDeliveryView]:
    """The record of each time the resident's contact was given to a listing's owner (APPI Art. 29-style)."""
    return await service.deliveries(principal, resident_id)


# --- public (no token) -------------------------------------------------------------------------------


@router.get("/public/listings", response_model=Page[PublicListingView], dependencies=[Depends(public_limit)])
async def public_listings(
    service: Service,
    kind: ListingKind | None = None,
    municipality: Annotated[str | None, Query(max_length=16, description="a municipality's code")] = None,
    prefecture: Annotated[str | None, Query(max_length=16, description="a prefecture's code")] = None,
    available_from: Annotated[date | None, Query(description="available on or after this day")] = None,
    available_until: Annotated[date | None, Query(description="available on or before this day")] = None,
    language: Language | None = None, limit: Limit = 50, offset: Offset = 0,
) -> Page[PublicListingView]:
    """Published listings not past their expiry (public: no token)."""
    return await service.public_listings(
        ListingFilter(kind=kind, municipality_code=municipality, prefecture_code=prefecture,
                      available_from=available_from, available_until=available_until, language=language),
        limit, offset,
    )


@router.get("/public/listings/{listing_id}", response_model=PublicListingView, dependencies=[Depends(public_limit)])
async def public_listing(listing_id: str, service: Service) -> PublicListingView:
    return await service.public_listing(listing_id)
