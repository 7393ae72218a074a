"""What the HTTP API shows: response models built from domain objects (also stored for Idempotency-Key replays).

The public view is the listing's public content; the staff view adds its lifecycle and the owner's
consent record. Residents see their own interests, "interested" and the record of contacts given.
"""

from __future__ import annotations

from datetime import date, datetime

from pydantic import BaseModel

from services.listings.domain import (
    ConsentMethod,
    ContactDelivery,
    Interest,
    Interests,
    Listing,
    ListingStatus,
)
from shared.contracts.common import Language
from shared.contracts.listings import DigestCadence, ListingKind, ListingWithdrawalReason, Publisher
from shared.kit.views import Page as Page
from shared.kit.views import json_body as json_body
from shared.reference import municipality


class PublicListingView(BaseModel):
    listing_id: str
    kind: ListingKind
    municipality_code: str
    municipality_name: str
    prefecture_code: str
    publisher: Publisher
    corporation_id: str | None
    area: str
    title: str
    summary: str
    language: Language
    available_from: date
    available_until: date | None
    expires_on: date
    published_at: datetime | None

    @classmethod
    def of(cls, listing: Listing) -> PublicListingView:
        c = listing.content
        return cls(
            listing_id=listing.listing_id, kind=c.kind, municipality_code=c.municipality_code,
            municipality_name=municipality(c.municipality_code).full_name, prefecture_code=c.prefecture_code,
            publisher=c.publisher, corporation_id=c.corporation_id, area=c.area, title=c.title, summary=c.summary,
            language=c.language, available_from=c.available_from, available_until=c.available_until,
            expires_on=c.expires_on, published_at=listing.published_at,
        )


class OwnerConsentView(BaseModel):
    owner_name: str
    consented_on: date
    method: ConsentMethod
    document_ref: str | None


class ListingView(PublicListingView):
    status: ListingStatus
    owner_consent: OwnerConsentView | None
    created_by: str
    created_at: datetime
    withdrawn_at: datetime | None
    withdrawal_reason: ListingWithdrawalReason | None
    expired_on: date | None

    @classmethod
    def of(cls, listing: Listing) -> ListingView:
        o = listing.owner_consent
        return cls(
            **PublicListingView.of(listing).model_dump(), status=listing.status,
            owner_consent=None if o is None else OwnerConsentView(
                owner_name=o.owner_name, consented_on=o.consented_on, method=o.method, document_ref=o.document_ref,
            ),
            created_by=listing.created_by, created_at=listing.created_at, withdrawn_at=listing.withdrawn_at,
            withdrawal_reason=listing.withdrawal_reason, expired_on=listing.expired_on,
        )


class InterestsView(BaseModel):
    resident_id: str
    kinds: list[ListingKind]
    municipality_codes: list[str]
    prefecture_codes: list[str]
    available_from: date | None
    available_until: date | None
    cadence: DigestCadence
    #: When the resident consented to receive matching listings (revoking deletes the interests).
    consented_at: datetime | None
    next_digest_at: datetime | None

    @classmethod
    def of(cls, wanted: Interests) -> InterestsView:
        return cls(
            resident_id=wanted.resident_id, kinds=sorted(wanted.kinds),
            municipality_codes=sorted(wanted.municipality_codes),
            prefecture_codes=sorted(wanted.prefecture_codes), available_from=wanted.available_from,
            available_until=wanted.available_until, cadence=wanted.cadence, consented_at=wanted.consented_at,
            next_digest_at=wanted.next_digest_at,
        )


class InterestView(BaseModel):
    resident_id: str
    listing_id: str
    share_contact: bool
    expressed_at: datetime
    contact_consent_at: datetime | None

    @classmethod
    def of(cls, interest: Interest) -> InterestView:
        return cls(resident_id=interest.resident_id, listing_id=interest.listing_id,
                   share_contact=interest.share_contact, expressed_at=interest.expressed_at,
                   contact_consent_at=interest.contact_consent_at)


class StaffInterestView(InterestView):
    #: The resident's registration with the listing's municipality (where its staff read the contact).
    registration_id: str | None


class ContactDeliveryView(BaseModel):
    delivery_id: str
    listing_id: str
    resident_id: str
    recipient_kind: Publisher
    recipient_id: str
    items: list[str]
    basis: str
    #: Where the municipality's staff read the contact: the resident's registration with it, at the
    #: registration service (``GET /v1/registrations`` of the municipality).
    registration_id: str
    delivered_at: datetime

    @classmethod
    def of(cls, d: ContactDelivery) -> ContactDeliveryView:
        return cls(delivery_id=d.delivery_id, listing_id=d.listing_id, resident_id=d.resident_id,
                   recipient_kind=d.recipient_kind, recipient_id=d.recipient_id, items=list(d.items), basis=d.basis,
                   registration_id=d.registration_id, delivered_at=d.delivered_at)
