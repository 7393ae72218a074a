"""Rules of the partner gateway, pure Python (no I/O).

Who may see a certificate: a partner sees it only if it runs a program in the certificate's
municipality, the resident listed it among the certificate's partner memberships, the resident's
share consent for it is not revoked, and the resident has not withdrawn. What it sees is the
minimum: number, status, validity, municipality, its own programs there, a pseudonymous resident
reference (HMAC-SHA256 of the resident id with the partner's own key) and the member number only
if the resident gave one for that partner. Never a name, address, birth date, e-mail or phone.

Trips come the other way: a partner writes them to its own ``partner.<code>.trips.v1``, and the
partner a trip counts for is the topic's, never what the record says (``accept_trip``).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Container, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Any, Literal

from shared.contracts.base import EventData
from shared.contracts.partners import (
    PartnerCertificate,
    PartnerGrant,
    PartnerWithdrawal,
    TripAccepted,
    TripReported,
    grant_key,
)
from shared.contracts.reasons import cancellation_reason
from shared.contracts.sealed import Sealed, partner_kid
from shared.contracts.subsidy import (
    GrantCancelled,
    GrantExpired,
    GrantIssued,
    GrantRedeemed,
    GrantRedemptionRejected,
    GrantWaitlisted,
)
from shared.contracts.topics import partner_of_topic, partner_trips
from shared.kit.auth import Unauthenticated
from shared.kit.clock import JAPAN
from shared.kit.errors import DomainError, NotFound

SHARE_PURPOSE = "share_certificate"

PartnerKind = Literal["airline", "rail", "ferry", "bus"]
FeedTransport = Literal["kafka", "http"]
CertificateStatus = Literal["valid", "revoked", "expired"]
WithdrawalReason = Literal["consent_revoked", "resident_withdrawn"]
ConsentSource = Literal["registration_consent", "certificate_membership", "consent_revocation", "resident_withdrawal"]
GrantEvent = GrantIssued | GrantWaitlisted | GrantRedeemed | GrantRedemptionRejected | GrantCancelled | GrantExpired
GRANT_EVENTS: tuple[type[EventData], ...] = (
    GrantIssued, GrantWaitlisted, GrantRedeemed, GrantRedemptionRejected, GrantCancelled, GrantExpired,
)

API_KEY_PREFIX = "nchk_"


# --- Refusals (one per rule a caller can break) -------------------------------------------------


class MalformedCertificateNumber(DomainError):
    code = "malformed-certificate-number"
    status = 422
    title = "Not a certificate number (NCH-dddddd-dddd-dddddd)"


class CertificateNotFound(NotFound):
    """Unknown, or not this partner's to see: the two are indistinguishable on purpose."""

    code = "certificate-not-found"
    title = "No such certificate"


class PartnerNotFound(NotFound):
    code = "partner-not-found"
    title = "No such partner"


class ApiKeyNotFound(NotFound):
    code = "api-key-not-found"
    title = "No such API key"


class PartnerKeyNotFound(NotFound):
    """No key for this kid: malformed, another partner's, a reference this partner was never sent or
    was told to forget, or a resident who was erased (indistinguishable on purpose)."""

    code = "partner-key-not-found"
    title = "No such key"


class UnknownPartnerFilter(DomainError):
    code = "unknown-partner"
    status = 422
    title = "No partner has this code"


class InvalidPeriod(DomainError):
    code = "invalid-period"
    status = 422
    title = "The period ends before it starts"


class InvalidApiKey(Unauthenticated):
    code = "invalid-api-key"
    title = "Unknown or revoked API key"


class UnknownPartnerCredential(Unauthenticated):
    code = "unknown-partner"
    title = "The credential names no known partner"


class TripClaimsAnotherPartner(DomainError):
    """A trip record on one partner's topic that names another partner: parked, never forwarded
    (the topic says who reports; a partner cannot report, or spend, as another)."""

    code = "trip-claims-another-partner"
    title = "The trip record names another partner than the topic it was written to"


class NotAPartnerTripTopic(DomainError):
    """A trip read from a topic that is no known partner's trip topic (a subscription mistake)."""

    code = "not-a-partner-trip-topic"
    title = "The trip came from no known partner's trip topic"


# --- Partners -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Partner:
    code: str
    name: str
    kind: PartnerKind
    #: municipality code → the partner's program ids there
    programs: Mapping[str, tuple[str, ...]]
    pseudonym_key: bytes = field(repr=False)
    #: Registered partners only: the format every member number given for it must match in full.
    member_number_format: str | None = None
    feed_transport: FeedTransport = "kafka"

    def programs_in(self, municipality_code: str) -> tuple[str, ...]:
        return self.programs.get(municipality_code, ())

    def serves(self, municipality_code: str) -> bool:
        return bool(self.programs.get(municipality_code))

    def resident_ref(self, resident_id: str) -> str:
        return pseudonym(self.pseudonym_key, resident_id)


def pseudonym(key: bytes, resident_id: str) -> str:
    """Stable for one partner, unlinkable across partners (each has its own key)."""
    return hmac.new(key, resident_id.encode(), hashlib.sha256).hexdigest()


def new_pseudonym_key() -> bytes:
    return secrets.token_bytes(32)


_REF = re.compile(r"^[0-9a-f]{64}$")


def own_resident_ref(kid: str, partner: str) -> str | None:
    """The resident reference of a kid ``partner:<code>:<ref>`` if the kid is this partner's (its
    own code, a well-formed reference), else None."""
    prefix = partner_kid(partner, "")
    if not kid.startswith(prefix):
        return None
    ref = kid[len(prefix):]
    return ref if _REF.match(ref) else None


# --- Consents and certificates --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ShareConsent:
    """The latest share_certificate consent a resident gave or revoked for one partner."""

    granted: bool
    at: datetime


def supersedes(incoming: ShareConsent, current: ShareConsent | None) -> bool:
    """Whether a consent change replaces the one on record (newest wins; a revocation wins a tie)."""
    if current is None:
        return True
    if incoming.at != current.at:
        return incoming.at > current.at
    return current.granted and not incoming.granted


@dataclass(frozen=True, slots=True)
class Certificate:
    number: str
    resident_id: str
    municipality_code: str
    valid_from: date
    valid_until: date
    status: CertificateStatus
    #: partner code → member number given for that partner (None: none given)
    memberships: Mapping[str, str | None]
    changed_at: datetime


@dataclass(frozen=True, slots=True)
class ConsentBasis:
    """On what a delivery rests (APPI): the purpose, where the consent was given, and when."""

    source: ConsentSource
    at: datetime
    purpose: str = SHARE_PURPOSE


@dataclass(frozen=True, slots=True)
class Entitlement:
    """What one partner may see of one certificate."""

    partner: str
    certificate_number: str
    resident_ref: str
    municipality_code: str
    programs: tuple[str, ...]
    member_number: str | None
    status: CertificateStatus
    valid_from: date
    valid_until: date
    basis: ConsentBasis


def entitlement(
    partner: Partner, certificate: Certificate, consent: ShareConsent | None, *, withdrawn: bool
) -> Entitlement | None:
    """The partner's view of the certificate, or None if the partner may not see it."""
    if withdrawn:
        return None
    programs = partner.programs_in(certificate.municipality_code)
    if not programs or partner.code not in certificate.memberships:
        return None
    if consent is not None and not consent.granted:
        return None
    basis = (
        ConsentBasis("registration_consent", consent.at)
        if consent is not None
        else ConsentBasis("certificate_membership", certificate.changed_at)
    )
    return Entitlement(
        partner=partner.code,
        certificate_number=certificate.number,
        resident_ref=partner.resident_ref(certificate.resident_id),
        municipality_code=certificate.municipality_code,
        programs=programs,
        member_number=certificate.memberships[partner.code],
        status=certificate.status,
        valid_from=certificate.valid_from,
        valid_until=certificate.valid_until,
        basis=basis,
    )


def start_of_day(day: date) -> datetime:
    return datetime.combine(day, time(0), JAPAN)


# --- Records for the partner feed ----------------------------------------------------------------


def certificate_record(view: Entitlement, changed_at: datetime, member_number: Sealed | None) -> PartnerCertificate:
    """The partner's view of a certificate; ``member_number``: the view's, sealed for this partner."""
    return PartnerCertificate(
        certificate_number=view.certificate_number,
        status=view.status,
        valid_from=view.valid_from,
        valid_until=view.valid_until,
        municipality_code=view.municipality_code,
        programs=list(view.programs),
        resident_ref=view.resident_ref,
        member_number=member_number,
        changed_at=changed_at,
    )


def withdrawal_record(
    certificate_number: str, resident_ref: str, reason: WithdrawalReason, at: datetime
) -> PartnerWithdrawal:
    return PartnerWithdrawal(
        certificate_number=certificate_number, resident_ref=resident_ref, reason=reason, changed_at=at
    )


def grant_record(event: GrantEvent, resident_ref: str, member_number: Sealed | None) -> PartnerGrant:
    """The partner's view of a grant event: no resident id, the consented member number only (the
    entitlement's, sealed for this partner; never the event's, which is sealed for the platform)."""
    common: dict[str, Any] = {
        "certificate_number": event.certificate_number, "grant_id": event.grant_id,
        "program_id": event.program_id, "resident_ref": resident_ref, "member_number": member_number,
    }
    match event:
        case GrantIssued():
            return PartnerGrant(**common, state="issued", unit=event.unit, amount=event.reserved,
                                changed_at=event.issued_at)
        case GrantWaitlisted():
            return PartnerGrant(**common, state="waitlisted", unit=event.unit, amount=event.needed,
                                changed_at=event.waitlisted_at)
        case GrantRedeemed():
            return PartnerGrant(**common, state="redeemed", unit=event.unit, amount=event.amount,
                                trip_id=event.trip_id, changed_at=event.redeemed_at)
        case GrantRedemptionRejected():
            return PartnerGrant(**common, state="redemption_rejected", trip_id=event.trip_id,
                                reason=event.reason, changed_at=event.rejected_at)
        case GrantCancelled():
            # Only a code of the published list reaches a partner: an older event's free text
            # (it once carried the staff's words on a revocation) becomes "other".
            return PartnerGrant(**common, state="cancelled", unit=event.unit, amount=event.released,
                                reason=cancellation_reason(event.reason), changed_at=event.cancelled_at)
        case GrantExpired():
            return PartnerGrant(**common, state="expired", unit=event.unit, amount=event.released,
                                changed_at=start_of_day(event.expired_on))


def feed_key(record: PartnerCertificate | PartnerGrant | PartnerWithdrawal) -> tuple[str, str | None]:
    """The record's key on the compacted partner feed, and the key whose partition it must share.

    A certificate's records are keyed by its number and a grant's by ``<number>/grants/<grant id>``,
    so compaction keeps the latest state of each. A grant goes to its certificate's partition, so
    the partner reads a certificate and its grants in order.
    """
    if isinstance(record, PartnerGrant):
        return grant_key(record.certificate_number, record.grant_id), record.certificate_number
    return record.certificate_number, None


def delivered_items(record: EventData) -> list[str]:
    """The fields a record actually carries (None fields are not sent as data)."""
    return [name for name, value in record.model_dump().items() if value is not None]


# --- Trips partners report (partner.<code>.trips.v1 on the edge) ----------------------------------


def reporting_partner(topic: str, known: Container[str]) -> str:
    """The partner a trip record belongs to: the one whose trip topic it was read from (``topic``
    without the test prefix), never what the record says. Refuses a topic that is not a known
    partner's trip topic (a feed topic has the same ``partner.<code>.`` start)."""
    code = partner_of_topic(topic)
    if code is None or code not in known or partner_trips(code).name != topic:
        raise NotAPartnerTripTopic(f"{code or '-'}: trips are read only from a known partner's trips topic")
    return code


def accept_trip(report: TripReported, partner: str) -> TripAccepted:
    """The trip as the gateway forwards it inside: the partner stamped from the topic. A record that
    names another partner is refused (and parked by the consumer with this reason)."""
    if report.partner is not None and report.partner != partner:
        raise TripClaimsAnotherPartner(
            f"{TripClaimsAnotherPartner.code}: the record on {partner_trips(partner).name} names partner "
            f"{report.partner!r}; a partner reports only its own trips, on its own topic"
        )
    return TripAccepted(partner=partner, **report.model_dump(exclude={"partner"}))


# --- Verification ---------------------------------------------------------------------------------


def effective_status(status: str, valid_until: date, today: date) -> str:
    """A valid certificate past its last day is expired, even before the expiry event arrives."""
    if status == "valid" and today > valid_until:
        return "expired"
    return status


def verification(entry: Mapping[str, Any], today: date) -> dict[str, Any]:
    """The verification answer from a cache entry (dates as ISO strings), for ``today`` (the date in
    Japan: the caller reads its clock, this stays pure)."""
    valid_from = date.fromisoformat(entry["valid_from"])
    valid_until = date.fromisoformat(entry["valid_until"])
    status = effective_status(entry["status"], valid_until, today)
    return {
        "certificate_number": entry["certificate_number"],
        "valid": status == "valid" and valid_from <= today <= valid_until,
        "status": status,
        "valid_from": entry["valid_from"],
        "valid_until": entry["valid_until"],
        "municipality_code": entry["municipality_code"],
        "programs": list(entry["programs"]),
        "checked_on": today.isoformat(),
    }


# --- API keys -------------------------------------------------------------------------------------


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def api_key_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def api_key_prefix(secret: str) -> str:
    """Enough of the key to tell keys apart in listings, far too little to use."""
    return secret[: len(API_KEY_PREFIX) + 6]


def day_bounds(since: date | None, until: date | None) -> tuple[datetime | None, datetime | None]:
    """Calendar days in Japan ``since``..``until`` (inclusive) as [start, end) instants."""
    start = start_of_day(since) if since is not None else None
    end = start_of_day(until + timedelta(days=1)) if until is not None else None
    return start, end


# --- Registering a partner (admin) ----------------------------------------------------------------

#: The longest member number a registered format may accept, and the longest format itself.
MAX_MEMBER_NUMBER_LENGTH = 64
MAX_FORMAT_LENGTH = 200


class InvalidMemberNumberFormat(DomainError):
    code = "invalid-member-number-format"
    status = 422
    title = "The member-number format is not an anchored, bounded regular expression"


class PartnerExists(DomainError):
    code = "partner-exists"
    status = 409
    title = "A partner with this code exists"


def check_member_number_format(pattern: str) -> re.Pattern[str]:
    """An anchored (``^…$``) regular expression whose matches are at most ``MAX_MEMBER_NUMBER_LENGTH``
    characters: a format with ``*``, ``+`` or ``{n,}`` would accept anything of any length (and
    an unbounded pattern is where catastrophic backtracking lives)."""
    if len(pattern) > MAX_FORMAT_LENGTH:
        raise InvalidMemberNumberFormat(f"the format is longer than {MAX_FORMAT_LENGTH} characters",
                                        field="member_number_format")
    if not (pattern.startswith("^") and pattern.endswith("$") and not pattern.endswith("\\$")):
        raise InvalidMemberNumberFormat("anchor the format: it must start with ^ and end with $",
                                        field="member_number_format")
    try:
        compiled = re.compile(pattern)
        # The stdlib's own parser knows the widths a pattern can match (private; typed on some Pythons only).
        low, high = getattr(re, "_parser").parse(pattern).getwidth()  # noqa: B009
    except (re.error, OverflowError, RecursionError) as error:
        raise InvalidMemberNumberFormat(f"not a regular expression: {error}", field="member_number_format") from None
    if high > MAX_MEMBER_NUMBER_LENGTH:
        raise InvalidMemberNumberFormat(
            f"the format must bound the length: at most {MAX_MEMBER_NUMBER_LENGTH} characters "
            "(no *, + or {n,})", field="member_number_format",
        )
    if low == 0:
        raise InvalidMemberNumberFormat("the format accepts an empty member number", field="member_number_format")
    return compiled
