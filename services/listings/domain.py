"""The rules of listings and matching: plain Python, no I/O.

Terms (the act's support for dual residents, from the seed): the mayor provides dual residents and
support corporations (特定居住支援法人) with information on 住まい (vacant houses 空き家, trial stays
お試し居住), なりわい (jobs, side jobs) and コミュニティ (events, community activities), and on places and
programmes (coworking, childcare and school programmes such as 保育園留学). Vacant-house and other
property information is published **only with the owner's consent**: a listing of those kinds
without a recorded consent (who, when, how) is refused.

A listing's lifecycle: draft → published → withdrawn | expired. It expires at the end of its
``expires_on`` day in Japan (a scheduled sweep; exactly once). Residents choose interests (kinds,
places, dates) and consent to receive them; a newly published listing is matched to residents
registered with (or certified by) its municipality, or registered in its prefecture, whose interests
it meets; they are told in a digest, at once or weekly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta
from typing import Literal

from shared.contracts.common import Language
from shared.contracts.listings import (
    DigestCadence,
    DigestEntry,
    ListingContent,
    ListingKind,
    ListingWithdrawalReason,
    Publisher,
)
from shared.kit.clock import JAPAN, japan_date
from shared.kit.errors import Conflict, DomainError, Forbidden, NotFound
from shared.reference import UnknownMunicipality, municipality

ListingStatus = Literal["draft", "published", "withdrawn", "expired"]
ConsentMethod = Literal["written", "electronic", "in_person"]

#: Kinds that show someone's property: published only with its owner's consent.
PROPERTY_KINDS: frozenset[ListingKind] = frozenset({"vacant_house", "trial_stay"})
#: When weekly digests go out: Monday 08:00 in Japan.
WEEKLY_WEEKDAY = 0
WEEKLY_AT = time(8, 0)
#: How long the record of a contact given to a listing's owner is kept (as partner deliveries: the
#: APPI Enforcement Rules, Art. 21 — three years).
DELIVERY_RECORD_YEARS = 3


# --- errors: one per rule the user can break -------------------------------------------------------


class UnknownListing(NotFound):
    code = "unknown-listing"
    title = "No such listing"


class OwnerConsentMissing(DomainError):
    code = "owner-consent-missing"
    title = "A vacant house or trial stay is listed only with its owner's consent"


class InvalidListingDates(DomainError):
    code = "invalid-listing-dates"
    title = "The listing's dates do not fit together"


class UnknownMunicipalityCode(DomainError):
    code = "unknown-municipality"
    title = "No such municipality"


class CorporationNotDesignated(DomainError):
    code = "corporation-not-designated"
    title = "The support corporation is not designated by this municipality"


class ListingNotInState(Conflict):
    code = "listing-state"
    title = "The listing is not in a state that allows this"


class ListingNotOpen(Conflict):
    code = "listing-not-open"
    title = "The listing is not published (or has expired)"


class InvalidInterests(DomainError):
    code = "invalid-interests"
    title = "The interests are not valid"


class NoContactConsent(Conflict):
    code = "no-contact-consent"
    title = "The resident has not consented to give this listing's owner their contact"


class ResidentNotRegisteredHere(Conflict):
    code = "resident-not-registered-here"
    title = "The resident is not registered with the listing's municipality"


class OtherResidentsListings(Forbidden):
    code = "other-residents-listings"
    title = "A resident may only see and change their own interests"


# --- listings --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OwnerConsent:
    """The property owner's consent to publish (who, when, how): kept here, never in an event."""

    owner_name: str
    consented_on: date
    method: ConsentMethod
    #: Where the municipality keeps the signed form or the e-mail (its own file reference).
    document_ref: str | None = None


@dataclass(frozen=True, slots=True)
class Listing:
    listing_id: str
    content: ListingContent
    status: ListingStatus
    created_by: str
    created_at: datetime
    owner_consent: OwnerConsent | None = None
    published_at: datetime | None = None
    withdrawn_at: datetime | None = None
    withdrawal_reason: ListingWithdrawalReason | None = None
    expired_on: date | None = None

    @property
    def municipality_code(self) -> str:
        return self.content.municipality_code

    def is_open(self, today: date) -> bool:
        """Published and not past its expiry: what the public sees and digests carry."""
        return self.status == "published" and self.content.expires_on >= today

    def entry(self) -> DigestEntry:
        c = self.content
        return DigestEntry(
            listing_id=self.listing_id, kind=c.kind, municipality_code=c.municipality_code, title=c.title,
            available_from=c.available_from, available_until=c.available_until,
        )


def prefecture_code_of(code: str) -> str:
    try:
        place = municipality(code)
    except UnknownMunicipality as error:
        raise UnknownMunicipalityCode(f"no municipality {code}") from error
    if place.is_prefecture:
        raise UnknownMunicipalityCode(f"{code} is a prefecture: a listing belongs to a municipality")
    return place.prefecture_code


def draft(
    listing_id: str, *, kind: ListingKind, municipality_code: str, publisher: Publisher,
    corporation_id: str | None, designated_corporations: frozenset[str], area: str, title: str, summary: str,
    language: Language, available_from: date, available_until: date | None, expires_on: date,
    owner_consent: OwnerConsent | None, created_by: str, now: datetime,
) -> Listing:
    """A new listing in draft. No owner's consent, no vacant house or trial stay."""
    if kind in PROPERTY_KINDS and owner_consent is None:
        raise OwnerConsentMissing(f"a {kind} listing needs the owner's consent to publish (who, when, how)")
    today = japan_date(now)
    if owner_consent is not None and owner_consent.consented_on > today:
        raise InvalidListingDates("the owner's consent cannot be dated in the future")
    if available_until is not None and available_until < available_from:
        raise InvalidListingDates("available_until is before available_from")
    if expires_on < today:
        raise InvalidListingDates("expires_on is in the past")
    if available_until is not None and expires_on > available_until:
        raise InvalidListingDates("a listing expires at the latest when it stops being available")
    if publisher == "support_corporation":
        if corporation_id is None or corporation_id not in designated_corporations:
            raise CorporationNotDesignated(
                f"support corporation {corporation_id} is not designated by municipality {municipality_code}"
            )
    elif corporation_id is not None:
        raise CorporationNotDesignated("a listing of the municipality names no support corporation")
    content = ListingContent(
        kind=kind, municipality_code=municipality_code, prefecture_code=prefecture_code_of(municipality_code),
        publisher=publisher, corporation_id=corporation_id, area=area, title=title, summary=summary,
        language=language, available_from=available_from, available_until=available_until, expires_on=expires_on,
    )
    return Listing(listing_id, content, "draft", created_by, now, owner_consent)


def publish(listing: Listing, now: datetime) -> Listing:
    if listing.status != "draft":
        raise ListingNotInState(f"listing {listing.listing_id} is {listing.status}, not a draft")
    if listing.content.expires_on < japan_date(now):
        raise InvalidListingDates("the listing has already expired")
    if listing.content.kind in PROPERTY_KINDS and listing.owner_consent is None:  # older rows, belt and braces
        raise OwnerConsentMissing(f"listing {listing.listing_id} has no owner's consent")
    return replace(listing, status="published", published_at=now)


def withdraw(listing: Listing, reason: ListingWithdrawalReason, now: datetime) -> Listing:
    if listing.status not in ("draft", "published"):
        raise ListingNotInState(f"listing {listing.listing_id} is {listing.status}")
    return replace(listing, status="withdrawn", withdrawn_at=now, withdrawal_reason=reason)


def is_due_to_expire(listing: Listing, today: date) -> bool:
    return listing.status == "published" and listing.content.expires_on < today


def expire(listing: Listing, today: date) -> Listing:
    if not is_due_to_expire(listing, today):
        raise ListingNotInState(f"listing {listing.listing_id} is not due to expire")
    return replace(listing, status="expired", expired_on=listing.content.expires_on)


# --- interests and matching ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Interests:
    """What a resident wants to hear about, and their consent to hear it (revocable: revoking deletes
    the interests). Empty places: any place the resident is registered with or certified by."""

    resident_id: str
    kinds: frozenset[ListingKind]
    municipality_codes: frozenset[str] = frozenset()
    prefecture_codes: frozenset[str] = frozenset()
    available_from: date | None = None
    available_until: date | None = None
    cadence: DigestCadence = "immediate"
    consented_at: datetime | None = None
    #: When the next weekly digest is due (None for immediate digests).
    next_digest_at: datetime | None = None


def interests(
    resident_id: str, *, kinds: frozenset[ListingKind], municipality_codes: frozenset[str],
    prefecture_codes: frozenset[str], available_from: date | None, available_until: date | None,
    cadence: DigestCadence, now: datetime,
) -> Interests:
    """A resident's interests with their consent to receive matching listings, given now."""
    if not kinds:
        raise InvalidInterests("choose at least one kind of listing")
    for code in municipality_codes:
        prefecture_code_of(code)
    for code in prefecture_codes:
        try:
            if not municipality(code).is_prefecture:
                raise InvalidInterests(f"{code} is not a prefecture")
        except UnknownMunicipality as error:
            raise UnknownMunicipalityCode(f"no prefecture {code}") from error
    if available_from is not None and available_until is not None and available_until < available_from:
        raise InvalidInterests("available_until is before available_from")
    return Interests(
        resident_id, kinds, municipality_codes, prefecture_codes, available_from, available_until, cadence,
        consented_at=now, next_digest_at=next_weekly_slot(now) if cadence == "weekly" else None,
    )


def next_weekly_slot(after: datetime) -> datetime:
    """The first Monday 08:00 in Japan strictly after ``after``."""
    local = after.astimezone(JAPAN)
    days = (WEEKLY_WEEKDAY - local.weekday()) % 7
    slot = datetime.combine(local.date() + timedelta(days=days), WEEKLY_AT, tzinfo=JAPAN)
    if slot <= local:
        slot += timedelta(days=7)
    return slot


@dataclass(frozen=True, slots=True)
class ResidentPlaces:
    """Where a resident belongs, as registration and certification told us: municipality and
    prefecture codes of their registrations, municipality codes of their valid certificates."""

    registered_municipalities: frozenset[str] = frozenset()
    registered_prefectures: frozenset[str] = frozenset()
    certified_municipalities: frozenset[str] = frozenset()

    def reaches(self, content: ListingContent) -> bool:
        return (
            content.municipality_code in self.registered_municipalities
            or content.municipality_code in self.certified_municipalities
            or content.prefecture_code in self.registered_prefectures
        )


def matches(content: ListingContent, wanted: Interests, places: ResidentPlaces) -> bool:
    """Whether a listing goes to a resident: they consented, they belong to its municipality or
    prefecture, it is of a kind they chose, in a place they chose, and its dates meet theirs."""
    if wanted.consented_at is None or not places.reaches(content):
        return False
    if content.kind not in wanted.kinds:
        return False
    chose_places = bool(wanted.municipality_codes or wanted.prefecture_codes)
    if chose_places and (content.municipality_code not in wanted.municipality_codes
                         and content.prefecture_code not in wanted.prefecture_codes):
        return False
    if wanted.available_until is not None and content.available_from > wanted.available_until:
        return False
    ends_too_early = content.available_until is not None and wanted.available_from is not None and (
        content.available_until < wanted.available_from
    )
    return not ends_too_early


def digest_due(wanted: Interests, now: datetime) -> bool:
    """Immediate digests are always due; weekly ones at their slot."""
    return wanted.cadence == "immediate" or (wanted.next_digest_at is not None and wanted.next_digest_at <= now)


def after_digest(wanted: Interests, now: datetime) -> Interests:
    if wanted.cadence != "weekly":
        return wanted
    return replace(wanted, next_digest_at=next_weekly_slot(now))


# --- "interested", and the contact given to the listing's owner -------------------------------------


@dataclass(frozen=True, slots=True)
class Interest:
    """A resident said "interested" in a listing; ``share_contact``: they consent (explicitly, for this
    listing) that its owner gets their contact. Revocable until the owner has it."""

    resident_id: str
    listing_id: str
    share_contact: bool
    expressed_at: datetime
    contact_consent_at: datetime | None = None


def express_interest(listing: Listing, resident_id: str, share_contact: bool, now: datetime) -> Interest:
    if not listing.is_open(japan_date(now)):
        raise ListingNotOpen(f"listing {listing.listing_id} is not open")
    return Interest(resident_id, listing.listing_id, share_contact, now, now if share_contact else None)


#: What the listing's owner is given: the contact registration holds (name, its reading, e-mail, phone).
CONTACT_ITEMS: tuple[str, ...] = ("name", "name_kana", "email", "phone")


@dataclass(frozen=True, slots=True)
class ContactDelivery:
    """The record of one provision of a resident's contact to a listing's owner (APPI Art. 29-style,
    like a partner delivery): to whom, whose, which items, on what basis, when, by whom."""

    delivery_id: str
    listing_id: str
    resident_id: str
    recipient_kind: Publisher
    recipient_id: str
    items: tuple[str, ...]
    basis: str
    registration_id: str
    delivered_at: datetime
    delivered_by: str
    extra: dict[str, str] = field(default_factory=dict)


def deliver_contact(
    delivery_id: str, listing: Listing, interest: Interest | None, registration_id: str | None, staff: str,
    now: datetime,
) -> ContactDelivery:
    """Record that the owner gets the resident's contact: only with the resident's consent for this
    listing, and only of a resident registered with the listing's municipality (its staff read the
    contact in registration, where they see their own registrants)."""
    if interest is None or not interest.share_contact or interest.contact_consent_at is None:
        raise NoContactConsent(f"no consent to give listing {listing.listing_id}'s owner this contact")
    if registration_id is None:
        raise ResidentNotRegisteredHere(
            f"the resident is not registered with {listing.municipality_code}: its staff cannot read the contact"
        )
    c = listing.content
    recipient_id = c.corporation_id if c.publisher == "support_corporation" and c.corporation_id else (
        c.municipality_code
    )
    return ContactDelivery(
        delivery_id, listing.listing_id, interest.resident_id, c.publisher, recipient_id, CONTACT_ITEMS,
        f"consent for listing {listing.listing_id} given {interest.contact_consent_at.isoformat()}",
        registration_id, now, staff,
    )
