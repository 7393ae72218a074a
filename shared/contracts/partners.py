"""What partners write and read.

``partner.<code>.trips.v1`` (key: grant id, on the edge cluster): written by that partner only, a
trip used against one of its grants. The partner is the topic's: a record naming another is parked.
The gateway forwards each accepted trip inside, on ``gateway.trips.v1``, the partner stamped.

``partner.<code>.v1`` (compacted): what one partner may see. Keys:

- ``partner.certificate`` and ``partner.withdrawal``: the certificate number;
- ``partner.grant``: ``<certificate number>/grants/<grant id>`` (:func:`grant_key`), sent to the
  partition of the certificate number (the Kafka default partitioner, murmur2), so a certificate
  and its grants share a partition and keep their order.

Compaction keeps the latest record of each key, so a partner keeps the latest state per key: the
certificate, and each of its grants. ``ce_subject`` is the certificate number on every record. A
record with a null value (a tombstone) forgets its key. When a partner must forget a certificate
(consent revoked, resident withdrawn) it gets a ``partner.withdrawal``, then a tombstone for every
grant key it was sent for that certificate, then the certificate's tombstone.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Literal

from shared.contracts.base import EventData
from shared.contracts.common import MunicipalityCode, PartnerCode
from shared.contracts.sealed import Sealed
from shared.contracts.topics import GATEWAY_PARTNERS, GATEWAY_TRIPS, PARTNER_FEED, PARTNER_TRIPS

TripKind = Literal["one_way", "round_trip"]

#: Between the certificate number and the grant id in a grant record's key.
GRANT_KEY_INFIX = "/grants/"


def grant_key(certificate_number: str, grant_id: str) -> str:
    """The key of a grant's records on a partner feed (the certificate number is the partition key)."""
    return f"{certificate_number}{GRANT_KEY_INFIX}{grant_id}"


def certificate_of_key(key: str) -> str:
    """The certificate number a partner feed key belongs to (the key itself for certificate records)."""
    return key.split(GRANT_KEY_INFIX, 1)[0]


class TripReported(EventData, name="partner.trip.reported", version=2, topic=PARTNER_TRIPS):
    """A trip the partner carried out under a grant; ``trip_id`` is the partner's own unique id.

    Version 2: written to the partner's own ``partner.<code>.trips.v1`` on the edge cluster, where the
    topic says who reports (v1 went to one shared topic and named the partner in the record).
    ``partner``, if given, must be the topic's partner."""

    partner: PartnerCode | None = None
    grant_id: str
    certificate_number: str
    trip_id: str
    trip_kind: TripKind
    travelled_on: date
    #: fare_discount: the discount the partner granted on this trip, in yen.
    discount_jpy: int | None = None
    reported_at: datetime


class TripAccepted(EventData, name="partner_gateway.trip.accepted", topic=GATEWAY_TRIPS):
    """A partner's trip report as the gateway accepted it: ``partner`` is the partner whose topic
    (or whose credential, over HTTP) it came from, never what the record said."""

    partner: PartnerCode
    grant_id: str
    certificate_number: str
    trip_id: str
    trip_kind: TripKind
    travelled_on: date
    #: fare_discount: the discount the partner granted on this trip, in yen.
    discount_jpy: int | None = None
    reported_at: datetime


class PartnerCertificate(EventData, name="partner.certificate", version=2, topic=PARTNER_FEED):
    """The current state of one certificate as one partner may see it (no personal data).

    Key: the certificate number. Its grants come on the same partition, keyed per grant.
    """

    certificate_number: str
    status: Literal["valid", "revoked", "expired"]
    valid_from: date
    valid_until: date
    municipality_code: MunicipalityCode
    programs: list[str]
    #: HMAC of the resident id with this partner's key: stable here, unlinkable across partners.
    resident_ref: str
    #: Only if the resident gave it for this partner; v2: sealed for this partner (kid
    #: ``partner:<code>:<resident_ref>``), opened with the key the gateway's ``GET /v1/keys/{kid}``
    #: gives while the resident is not erased (docs/partners.md).
    member_number: Sealed | None = None
    changed_at: datetime


class PartnerGrant(EventData, name="partner.grant", version=2, topic=PARTNER_FEED):
    """A grant of this partner's program for a certificate (issued, redeemed, cancelled...).

    Key ``<certificate number>/grants/<grant id>``, on the certificate's partition: the latest
    record of the key is the grant's current state.
    """

    certificate_number: str
    grant_id: str
    program_id: str
    state: Literal["issued", "waitlisted", "redeemed", "redemption_rejected", "cancelled", "expired"]
    resident_ref: str
    #: As on ``partner.certificate``: sealed for this partner.
    member_number: Sealed | None = None
    unit: Literal["jpy", "miles"] | None = None
    amount: int | None = None
    trip_id: str | None = None
    #: redemption_rejected: a RedemptionRefusal code; cancelled: a CancellationReason code
    #: (docs/contracts/reasons.md). Never free text.
    reason: str | None = None
    changed_at: datetime


class PartnerWithdrawal(EventData, name="partner.withdrawal", topic=PARTNER_FEED):
    """Consent revoked or resident withdrawn: forget this certificate and its grants.

    Key: the certificate number. Followed by a tombstone for each grant key the partner was sent
    for the certificate, then by the certificate's tombstone.
    """

    certificate_number: str
    resident_ref: str
    reason: Literal["consent_revoked", "resident_withdrawn"]
    changed_at: datetime


PartnerKindName = Literal["airline", "rail", "ferry", "bus"]
FeedTransport = Literal["kafka", "http"]


class PartnerRegistered(EventData, name="partner_gateway.partner.registered", topic=GATEWAY_PARTNERS):
    """A partner registered through the gateway's admin API (key: its code). The partners of the
    platform are the seed (``PARTNER_CODES``) and these: certification accepts memberships of it
    with ``member_number_format``, subsidy accepts programmes for it."""

    code: PartnerCode
    name: str
    kind: PartnerKindName
    #: A Python regular expression, anchored (``^…$``) and of bounded length, that every member
    #: number given for this partner must match in full.
    member_number_format: str
    #: How the partner reads its feed: its own Kafka topic on the edge, or ``GET /v1/feed`` over HTTP.
    feed_transport: FeedTransport
    registered_at: datetime
