"""Events of the listings service: listings (``listings.listings.v1``, key: listing id) and the
digests of new listings due to residents (``listings.digests.v1``, key: resident id).

A listing's events carry only its public content and ids: the owner's consent record (the owner's
name, how they consented) and who at the municipality recorded it stay in the listings service. A
digest names the resident by their random id and lists the listings' public content, so
notification can write the message without asking anyone: nothing personal travels.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.contracts.base import EventData
from shared.contracts.common import Language, MunicipalityCode
from shared.contracts.topics import LISTING_DIGESTS, LISTINGS

#: What a listing offers: 住まい (vacant houses, trial stays), なりわい (jobs, side jobs), コミュニティ
#: (events, community activities), and places and programmes (coworking, childcare such as 保育園留学).
ListingKind = Literal[
    "vacant_house", "trial_stay", "job", "side_job", "event", "community_activity", "coworking",
    "childcare_programme",
]
#: Who publishes: the municipality itself, or a support corporation it designated (recorded by the
#: municipality's staff on the corporation's behalf).
Publisher = Literal["municipality", "support_corporation"]
ListingWithdrawalReason = Literal["filled", "cancelled", "owner_consent_withdrawn", "entered_in_error", "other"]
DigestCadence = Literal["immediate", "weekly"]


class ListingContent(BaseModel):
    """What anyone may read about a listing once it is published."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    kind: ListingKind
    municipality_code: MunicipalityCode
    prefecture_code: MunicipalityCode
    publisher: Publisher
    #: The support corporation that publishes it (planning's id), when it is one.
    corporation_id: str | None = None
    area: str = Field(description="where, in the municipality's words (a district, an address block)")
    title: str
    summary: str
    language: Language
    available_from: date
    available_until: date | None = None
    expires_on: date


class ListingPublished(EventData, name="listings.listing.published", topic=LISTINGS):
    listing_id: str
    content: ListingContent
    published_at: datetime


class ListingWithdrawn(EventData, name="listings.listing.withdrawn", topic=LISTINGS):
    listing_id: str
    municipality_code: MunicipalityCode
    reason: ListingWithdrawalReason
    withdrawn_at: datetime


class ListingExpired(EventData, name="listings.listing.expired", topic=LISTINGS):
    listing_id: str
    municipality_code: MunicipalityCode
    expired_on: date


class DigestEntry(BaseModel):
    """One listing of a digest: its id and public content, enough to write the message."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    listing_id: str
    kind: ListingKind
    municipality_code: MunicipalityCode
    title: str
    available_from: date
    available_until: date | None = None


class ListingDigestDue(EventData, name="listings.digest.due", topic=LISTING_DIGESTS):
    """New listings that match a resident's interests, to be told to them once (they consented to
    receive them in the listings service; notification still honours their e-mail consent)."""

    digest_id: str
    resident_id: str
    cadence: DigestCadence
    listings: list[DigestEntry]
    due_at: datetime
