"""The gateway's trip rules: the partner is the topic's, a record naming another is refused."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from services.partner_gateway.domain import (
    NotAPartnerTripTopic,
    TripClaimsAnotherPartner,
    accept_trip,
    reporting_partner,
)
from shared.contracts.partners import TripReported

KNOWN = {"jal", "ana"}


def report(partner: str | None = None) -> TripReported:
    return TripReported(
        partner=partner, grant_id="G-1", certificate_number="NCH-304018-2026-000001", trip_id="JL-1",
        trip_kind="round_trip", travelled_on=date(2026, 3, 1), discount_jpy=None,
        reported_at=datetime(2026, 3, 2, tzinfo=UTC),
    )


def test_the_partner_is_the_one_whose_trip_topic_it_came_from() -> None:
    assert reporting_partner("partner.jal.trips.v1", KNOWN) == "jal"
    assert reporting_partner("partner.ana.trips.v1", KNOWN) == "ana"


@pytest.mark.parametrize("topic", [
    "partner.jal.v1",  # JAL's feed, not its trips
    "partner.lufthansa.trips.v1",  # no such partner
    "subsidy.grants.v1",
    "t1234.partner.jal.trips.v1",  # a prefix the caller did not strip
])
def test_anything_but_a_known_partners_trip_topic_is_refused(topic: str) -> None:
    with pytest.raises(NotAPartnerTripTopic):
        reporting_partner(topic, KNOWN)


def test_the_accepted_trip_carries_the_topics_partner_and_the_rest_unchanged() -> None:
    for named in (None, "jal"):
        accepted = accept_trip(report(named), "jal")
        assert accepted.partner == "jal"
        assert accepted.model_dump(exclude={"partner"}) == report().model_dump(exclude={"partner"})


def test_a_record_naming_another_partner_is_refused_with_a_reason_that_says_so() -> None:
    with pytest.raises(TripClaimsAnotherPartner) as refused:
        accept_trip(report("ana"), "jal")
    assert refused.value.code == "trip-claims-another-partner"
    assert str(refused.value).startswith("trip-claims-another-partner: the record on partner.jal.trips.v1 names")
    assert "'ana'" in str(refused.value)
