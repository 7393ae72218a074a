"""What partners write and read.

``partner.redemptions.v1`` (key: grant id): written by partners, a trip used against a grant.
``partner.<code>.v1`` (key: certificate number, compacted): what one partner may see. A record
with a null value is the tombstone of a withdrawn certificate or consent.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Literal

from shared.contracts.base import EventData
from shared.contracts.common import MunicipalityCode, PartnerCode
from shared.contracts.topics import PARTNER_FEED, REDEMPTIONS

TripKind = Literal["one_way", "round_trip"]


class TripReported(EventData, name="partner.trip.reported", topic=REDEMPTIONS):
    """A trip the partner carried out under a grant; ``trip_id`` is the partner's own unique id."""

    partner: PartnerCode
    grant_id: str
    certificate_number: str
    trip_id: str
    trip_kind: TripKind
    travelled_on: date
    #: fare_discount: the discount the partner granted on this trip, in yen.
    discount_jpy: int | None = None
    reported_at: datetime


class PartnerCertificate(EventData, name="partner.certificate", topic=PARTNER_FEED):
    """The current state of one certificate as one partner may see it (no personal data)."""

    certificate_number: str
    status: Literal["valid", "revoked", "expired"]
    valid_from: date
    valid_until: date
    municipality_code: MunicipalityCode
    programs: list[str]
    #: HMAC of the resident id with this partner's key: stable here, unlinkable across partners.
    resident_ref: str
    #: Only if the resident gave it for this partner.
    member_number: str | None = None
    changed_at: datetime


class PartnerGrant(EventData, name="partner.grant", topic=PARTNER_FEED):
    """A grant of this partner's program for a certificate (issued, redeemed, cancelled...)."""

    certificate_number: str
    grant_id: str
    program_id: str
    state: Literal["issued", "waitlisted", "redeemed", "redemption_rejected", "cancelled", "expired"]
    resident_ref: str
    member_number: str | None = None
    unit: Literal["jpy", "miles"] | None = None
    amount: int | None = None
    trip_id: str | None = None
    reason: str | None = None
    changed_at: datetime


class PartnerWithdrawal(EventData, name="partner.withdrawal", topic=PARTNER_FEED):
    """Consent revoked or resident withdrawn: forget this certificate (followed by a tombstone)."""

    certificate_number: str
    resident_ref: str
    reason: Literal["consent_revoked", "resident_withdrawn"]
    changed_at: datetime
