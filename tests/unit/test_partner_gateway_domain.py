"""Partner gateway rules without I/O: who may see what, pseudonyms, records, verification answers."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, date, datetime, timedelta

import pytest

from services.partner_gateway.domain import (
    Certificate,
    Partner,
    ShareConsent,
    api_key_hash,
    api_key_prefix,
    certificate_record,
    day_bounds,
    delivered_items,
    entitlement,
    feed_key,
    grant_record,
    new_api_key,
    pseudonym,
    supersedes,
    verification,
    withdrawal_record,
)
from services.partner_gateway.handlers import TodayInJapan, certificate_changed_at
from shared.contracts.certification import CertificateExpired, CertificateRevoked
from shared.contracts.partners import certificate_of_key, grant_key
from shared.contracts.subsidy import (
    GrantCancelled,
    GrantExpired,
    GrantIssued,
    GrantRedeemed,
    GrantRedemptionRejected,
    GrantWaitlisted,
)
from shared.kit.clock import JAPAN, Clock
from tests.support import seal_for_tests

NOW = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
JAL_PROGRAMS = {"304018": ("jal-dual-residence-miles",), "422100": ("jal-dual-residence-miles",)}
JAL = Partner("jal", "JAL", "airline", JAL_PROGRAMS, b"j" * 32)
KYUSHU = Partner("kyushuyusen", "Kyushu Yusen", "ferry", {"422100": ("iki-island-routes",)}, b"k" * 32)


def certificate(municipality: str = "422100", **memberships: str | None) -> Certificate:
    return Certificate(
        number=f"NCH-{municipality}-2026-000001", resident_id="res-1", municipality_code=municipality,
        valid_from=date(2026, 1, 1), valid_until=date(2026, 12, 31), status="valid",
        memberships=memberships, changed_at=NOW,
    )


def test_a_partner_sees_a_certificate_only_where_it_serves_if_listed_and_not_revoked() -> None:
    view = entitlement(JAL, certificate(jal="JMB-1", kyushuyusen=None), None, withdrawn=False)
    assert view is not None
    assert (view.programs, view.member_number, view.municipality_code) == (
        ("jal-dual-residence-miles",), "JMB-1", "422100"
    )
    assert view.basis.source == "certificate_membership" and view.basis.at == NOW
    assert entitlement(KYUSHU, certificate("304018", kyushuyusen=None), None, withdrawn=False) is None  # (a)
    assert entitlement(KYUSHU, certificate(jal=None), None, withdrawn=False) is None  # (b)
    revoked = ShareConsent(granted=False, at=NOW)
    assert entitlement(JAL, certificate(jal=None), revoked, withdrawn=False) is None  # (c)
    assert entitlement(JAL, certificate(jal=None), None, withdrawn=True) is None
    granted = entitlement(JAL, certificate(jal=None), ShareConsent(True, NOW - timedelta(days=9)), withdrawn=False)
    assert granted is not None and granted.basis.source == "registration_consent"
    assert granted.member_number is None


def test_the_resident_reference_is_stable_per_partner_and_unlinkable_across_partners() -> None:
    jal = entitlement(JAL, certificate(jal=None, kyushuyusen=None), None, withdrawn=False)
    kyushu = entitlement(KYUSHU, certificate(jal=None, kyushuyusen=None), None, withdrawn=False)
    assert jal is not None and kyushu is not None
    assert jal.resident_ref == hmac.new(b"j" * 32, b"res-1", hashlib.sha256).hexdigest()
    assert jal.resident_ref == JAL.resident_ref("res-1") != kyushu.resident_ref
    assert pseudonym(b"j" * 32, "res-2") != jal.resident_ref
    assert "b'jjj" not in repr(JAL)  # the key never shows up in logs or reprs


def test_the_newest_consent_wins_and_a_revocation_wins_a_tie() -> None:
    granted, revoked = ShareConsent(True, NOW), ShareConsent(False, NOW)
    assert supersedes(granted, None)
    assert supersedes(revoked, granted) and not supersedes(granted, revoked)
    assert supersedes(ShareConsent(True, NOW + timedelta(seconds=1)), revoked)
    assert not supersedes(ShareConsent(False, NOW - timedelta(seconds=1)), granted)


def test_records_carry_the_minimum_and_the_items_sent_are_listed() -> None:
    view = entitlement(JAL, certificate(jal=None), None, withdrawn=False)
    assert view is not None
    record = certificate_record(view, NOW, None)
    fields = set(record.model_dump())
    assert not fields & {"resident_id", "name", "address", "birth_date", "email", "phone"}
    assert "member_number" not in delivered_items(record)
    assert delivered_items(withdrawal_record("NCH-422100-2026-000001", "ref", "consent_revoked", NOW)) == [
        "certificate_number", "resident_ref", "reason", "changed_at",
    ]


GRANT = {
    "grant_id": "g-1", "program_id": "jal-dual-residence-miles", "partner": "jal", "mechanism": "mileage_grant",
    "certificate_number": "NCH-422100-2026-000001", "resident_id": "res-1", "municipality_code": "422100",
}


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (GrantIssued(**GRANT, unit="miles", reserved=30000, window_from=date(2026, 3, 1), window_until=date(2026, 7, 1),
                     member_number=seal_for_tests("resident:res-1", "ELSEWHERE"), issued_at=NOW),
         {"state": "issued", "unit": "miles", "amount": 30000, "changed_at": NOW}),
        (GrantWaitlisted(**GRANT, unit="miles", needed=30000, position=3, waitlisted_at=NOW),
         {"state": "waitlisted", "amount": 30000}),
        (GrantRedeemed(**GRANT, trip_id="JL1", unit="miles", amount=7500, trips_counted=1, completed=False,
                       redeemed_at=NOW),
         {"state": "redeemed", "amount": 7500, "trip_id": "JL1"}),
        (GrantRedemptionRejected(**GRANT, trip_id="JL2", reason="over_count", detail="5th trip", rejected_at=NOW),
         {"state": "redemption_rejected", "trip_id": "JL2", "reason": "over_count", "amount": None}),
        (GrantCancelled(**GRANT, unit="miles", released=30000, reason="certificate_revoked", cancelled_at=NOW),
         {"state": "cancelled", "amount": 30000, "reason": "certificate_revoked"}),
        # Cancellations published before the codes carried the staff's words: never forwarded.
        (GrantCancelled(**GRANT, unit="miles", released=1, reason="certificate revoked: 病気療養のため転居",
                        cancelled_at=NOW),
         {"state": "cancelled", "reason": "certificate_revoked"}),
        (GrantCancelled(**GRANT, unit="miles", released=1, reason="the resident asked", cancelled_at=NOW),
         {"state": "cancelled", "reason": "other"}),
        (GrantExpired(**GRANT, unit="jpy", released=5000, expired_on=date(2026, 7, 2)),
         {"state": "expired", "unit": "jpy", "changed_at": datetime(2026, 7, 2, tzinfo=JAPAN)}),
    ],
)
def test_grant_events_become_partner_grants(event: GrantIssued, expected: dict[str, object]) -> None:
    for_jal = seal_for_tests("partner:jal:ref-1", "JMB-1")
    record = grant_record(event, "ref-1", for_jal)
    dumped = record.model_dump()
    assert {k: dumped[k] for k in expected} == expected
    # the consented number only, sealed for the partner (never the event's, sealed for the platform)
    assert dumped["resident_ref"] == "ref-1" and record.member_number == for_jal
    assert "resident_id" not in dumped


def test_feed_keys_one_per_certificate_and_one_per_grant_on_the_certificates_partition() -> None:
    number = "NCH-422100-2026-000001"
    view = entitlement(JAL, certificate(jal=None), None, withdrawn=False)
    assert view is not None
    assert feed_key(certificate_record(view, NOW, None)) == (number, None)
    assert feed_key(withdrawal_record(number, "ref", "consent_revoked", NOW)) == (number, None)
    grant = grant_record(GrantCancelled(**GRANT, unit="miles", released=1, reason="r", cancelled_at=NOW), "ref", None)
    assert feed_key(grant) == (f"{number}/grants/g-1", number)  # partitioned by the certificate number
    assert grant_key(number, "g-1") == f"{number}/grants/g-1"
    assert certificate_of_key(grant_key(number, "g-1")) == certificate_of_key(number) == number


ENTRY = {"certificate_number": "N", "status": "valid", "valid_from": "2026-01-01", "valid_until": "2026-12-31",
         "municipality_code": "422100", "programs": ["p"]}


@pytest.mark.parametrize(
    ("status", "today", "valid", "shown"),
    [
        ("valid", date(2026, 1, 1), True, "valid"),
        ("valid", date(2026, 12, 31), True, "valid"),
        ("valid", date(2025, 12, 31), False, "valid"),  # not yet
        ("valid", date(2027, 1, 1), False, "expired"),  # past its last day, before the expiry event
        ("revoked", date(2026, 6, 1), False, "revoked"),
        ("expired", date(2026, 6, 1), False, "expired"),
    ],
)
def test_valid_means_today_in_tokyo_within_the_validity_and_status_valid(
    status: str, today: date, valid: bool, shown: str
) -> None:
    answer = verification({**ENTRY, "status": status}, today)
    assert (answer["valid"], answer["status"], answer["checked_on"]) == (valid, shown, today.isoformat())


def test_today_is_the_day_in_japan_by_the_clock_and_follows_it_both_ways() -> None:
    instant = [datetime(2026, 12, 31, 14, 59, 59, 999999, tzinfo=UTC)]
    today = TodayInJapan(Clock(lambda: instant[0]))
    assert today() == date(2026, 12, 31)
    instant[0] = datetime(2026, 12, 31, 15, 0, tzinfo=UTC)  # midnight in Japan
    assert today() == date(2027, 1, 1)
    instant[0] = datetime(2027, 1, 1, 14, 59, tzinfo=UTC)
    assert today() == date(2027, 1, 1)
    instant[0] = datetime(2026, 12, 31, 14, 0, tzinfo=UTC)  # a clock set back
    assert today() == date(2026, 12, 31)
    instant[0] = datetime(2027, 6, 1, 3, 0, tzinfo=JAPAN)  # an instant in another zone
    assert today() == date(2027, 6, 1)
    assert TodayInJapan(Clock.on_date(date(2026, 5, 5)))() == date(2026, 5, 5)


def test_periods_are_tokyo_days_inclusive() -> None:
    start, end = day_bounds(date(2026, 1, 1), date(2026, 1, 31))
    assert start == datetime(2026, 1, 1, tzinfo=JAPAN) and end == datetime(2026, 2, 1, tzinfo=JAPAN)
    assert day_bounds(None, None) == (None, None)


def test_api_keys_are_random_and_only_their_hash_is_kept() -> None:
    first, second = new_api_key(), new_api_key()
    assert first != second and first.startswith("nchk_") and len(first) > 40
    assert api_key_hash(first) == hashlib.sha256(first.encode()).hexdigest()
    assert first.startswith(api_key_prefix(first)) and len(api_key_prefix(first)) < 16


def test_certificate_change_times() -> None:
    base = {"certificate_number": "N", "resident_id": "r", "municipality_code": "422100",
            "valid_from": date(2025, 1, 1), "valid_until": date(2025, 12, 31)}
    revoked = CertificateRevoked(**base, status="revoked", reason="x", revoked_at=NOW)
    assert certificate_changed_at(revoked) == NOW
    expired = CertificateExpired(**base, status="expired", expired_on=date(2026, 1, 1))
    assert certificate_changed_at(expired) == datetime(2026, 1, 1, tzinfo=JAPAN)
