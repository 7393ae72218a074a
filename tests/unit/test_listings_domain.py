"""Listings' rules without I/O: the owner's consent, dates, the lifecycle, matching, digests' timing,
and the contact given only with the resident's consent."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from services.listings import domain
from services.listings.domain import (
    CorporationNotDesignated,
    Interests,
    InvalidListingDates,
    ListingNotInState,
    ListingNotOpen,
    NoContactConsent,
    OwnerConsent,
    OwnerConsentMissing,
    ResidentNotRegisteredHere,
    ResidentPlaces,
)
from shared.contracts.listings import ListingKind
from shared.kit.clock import JAPAN

SHIRAHAMA, WAKAYAMA, TANABE, SADO = "304018", "300004", "302066", "152242"
NOW = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)  # Wednesday 12:00 in Japan
TODAY = date(2026, 11, 25)
CONSENT = OwnerConsent("白浜 一郎", TODAY, "written", "空き家バンク 14")


def draft(kind: ListingKind = "vacant_house", **changes: Any) -> domain.Listing:
    args: dict[str, Any] = {
        "kind": kind, "municipality_code": SHIRAHAMA, "publisher": "municipality", "corporation_id": None,
        "designated_corporations": frozenset(), "area": "堅田", "title": "海辺の平屋", "summary": "徒歩5分",
        "language": "ja", "available_from": TODAY, "available_until": TODAY + timedelta(days=90),
        "expires_on": TODAY + timedelta(days=30), "owner_consent": CONSENT, "created_by": "staff-1", "now": NOW,
    }
    return domain.draft("lst-1", **(args | changes))


@pytest.mark.parametrize("kind", ["vacant_house", "trial_stay"])
def test_property_is_listed_only_with_the_owners_consent(kind: ListingKind) -> None:
    with pytest.raises(OwnerConsentMissing):
        draft(kind, owner_consent=None)
    assert draft(kind).owner_consent == CONSENT


def test_other_kinds_need_no_owners_consent() -> None:
    listing = draft("job", owner_consent=None)
    assert listing.status == "draft" and listing.content.prefecture_code == WAKAYAMA


def test_dates_must_fit() -> None:
    with pytest.raises(InvalidListingDates):
        draft(available_until=TODAY - timedelta(days=1))
    with pytest.raises(InvalidListingDates):
        draft(expires_on=TODAY - timedelta(days=1))
    with pytest.raises(InvalidListingDates):
        draft(expires_on=TODAY + timedelta(days=91))  # past the availability
    with pytest.raises(InvalidListingDates):
        draft(owner_consent=replace(CONSENT, consented_on=TODAY + timedelta(days=1)))


def test_a_corporation_publishes_only_when_designated_by_the_town() -> None:
    with pytest.raises(CorporationNotDesignated):
        draft(publisher="support_corporation", corporation_id="spc-x")
    listing = draft(publisher="support_corporation", corporation_id="spc-x", designated_corporations={"spc-x"})
    assert listing.content.corporation_id == "spc-x"
    with pytest.raises(CorporationNotDesignated):
        draft(corporation_id="spc-x")  # the municipality's own listing names none


def test_lifecycle_and_expiry() -> None:
    published = domain.publish(draft(), NOW)
    assert published.status == "published" and published.is_open(TODAY)
    with pytest.raises(ListingNotInState):
        domain.publish(published, NOW)
    last_day = published.content.expires_on
    assert published.is_open(last_day) and not domain.is_due_to_expire(published, last_day)
    assert domain.is_due_to_expire(published, last_day + timedelta(days=1))
    expired = domain.expire(published, last_day + timedelta(days=1))
    assert expired.status == "expired" and expired.expired_on == last_day
    with pytest.raises(ListingNotInState):
        domain.withdraw(expired, "filled", NOW)
    assert domain.withdraw(published, "filled", NOW).status == "withdrawn"


def wants(**changes: Any) -> Interests:
    args: dict[str, Any] = {
        "kinds": frozenset({"vacant_house"}), "municipality_codes": frozenset(), "prefecture_codes": frozenset(),
        "available_from": None, "available_until": None, "cadence": "immediate", "now": NOW,
    }
    return domain.interests("r-1", **(args | changes))


REGISTERED_HERE = ResidentPlaces(frozenset({SHIRAHAMA}), frozenset({WAKAYAMA}))


def test_matching_needs_belonging_kind_place_and_dates() -> None:
    content = draft().content
    assert domain.matches(content, wants(), REGISTERED_HERE)
    # Belonging: registered in the prefecture, certified by the town, or neither.
    assert domain.matches(content, wants(), ResidentPlaces(frozenset({TANABE}), frozenset({WAKAYAMA})))
    assert domain.matches(content, wants(), ResidentPlaces(certified_municipalities=frozenset({SHIRAHAMA})))
    assert not domain.matches(content, wants(), ResidentPlaces(frozenset({SADO}), frozenset({"150002"})))
    assert not domain.matches(content, wants(kinds=frozenset({"job"})), REGISTERED_HERE)
    assert not domain.matches(content, wants(municipality_codes=frozenset({TANABE})), REGISTERED_HERE)
    assert domain.matches(content, wants(prefecture_codes=frozenset({WAKAYAMA})), REGISTERED_HERE)
    assert not domain.matches(content, wants(available_until=TODAY - timedelta(days=1)), REGISTERED_HERE)
    assert not domain.matches(content, wants(available_from=TODAY + timedelta(days=91)), REGISTERED_HERE)
    assert not domain.matches(content, replace(wants(), consented_at=None), REGISTERED_HERE)


def test_interests_are_checked() -> None:
    with pytest.raises(domain.InvalidInterests):
        wants(kinds=frozenset())
    with pytest.raises(domain.InvalidInterests):
        wants(prefecture_codes=frozenset({SHIRAHAMA}))
    with pytest.raises(domain.UnknownMunicipalityCode):
        wants(municipality_codes=frozenset({"999999"}))


def test_weekly_digests_go_out_on_monday_morning_in_japan() -> None:
    weekly = wants(cadence="weekly")
    assert weekly.next_digest_at == datetime(2026, 11, 30, 8, 0, tzinfo=JAPAN)
    assert not domain.digest_due(weekly, NOW)
    assert domain.digest_due(weekly, datetime(2026, 11, 30, 8, 0, tzinfo=JAPAN))
    after = domain.after_digest(weekly, datetime(2026, 11, 30, 8, 0, tzinfo=JAPAN))
    assert after.next_digest_at == datetime(2026, 12, 7, 8, 0, tzinfo=JAPAN)
    assert domain.digest_due(wants(), NOW) and domain.after_digest(wants(), NOW).next_digest_at is None


def test_the_contact_goes_to_the_owner_only_with_consent_for_that_listing() -> None:
    listing = domain.publish(draft(), NOW)
    with pytest.raises(ListingNotOpen):
        domain.express_interest(draft(), "r-1", True, NOW)
    silent = domain.express_interest(listing, "r-1", False, NOW)
    with pytest.raises(NoContactConsent):
        domain.deliver_contact("d-1", listing, silent, "reg-1", "staff-1", NOW)
    with pytest.raises(NoContactConsent):
        domain.deliver_contact("d-1", listing, None, "reg-1", "staff-1", NOW)
    sharing = domain.express_interest(listing, "r-1", True, NOW)
    with pytest.raises(ResidentNotRegisteredHere):
        domain.deliver_contact("d-1", listing, sharing, None, "staff-1", NOW)
    given = domain.deliver_contact("d-1", listing, sharing, "reg-1", "staff-1", NOW)
    assert (given.recipient_kind, given.recipient_id, given.items) == (
        "municipality", SHIRAHAMA, ("name", "name_kana", "email", "phone"),
    )
    corporation = domain.publish(
        draft(publisher="support_corporation", corporation_id="spc-x", designated_corporations={"spc-x"}), NOW
    )
    assert domain.deliver_contact("d-2", corporation, sharing, "reg-1", "staff-1", NOW).recipient_id == "spc-x"
