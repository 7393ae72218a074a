"""What the service decides, without I/O: which events become which messages, how facts are written
in each language, how the contact projection changes, and how a failed e-mail is retried.

A *notice* is the language-free content of one message: its kind (the template's name) and its
facts (dates, amounts, municipality codes, reason codes). Rendering turns it into a subject and a
body in the resident's language (``templates.py``); every wording lives in the template files.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Literal, TypeVar, get_args

from shared.contracts.base import EventData
from shared.contracts.certification import (
    ApplicationRejected,
    ApplicationSubmitted,
    CertificateExpired,
    CertificateExpiring,
    CertificateIssued,
    CertificateRenewed,
    CertificateRevoked,
)
from shared.contracts.common import Language
from shared.contracts.donation import DonationReceived, OneStopExceptionVoided
from shared.contracts.listings import DigestEntry, ListingDigestDue
from shared.contracts.reasons import ReasonKind
from shared.contracts.registration import (
    ConsentChanged,
    ConsentState,
    Contact,
    PremiumApproved,
    PremiumRejected,
    PremiumRequested,
    ResidentRegistered,
)
from shared.contracts.subsidy import GrantCancelled, GrantIssued, GrantRedeemed, GrantWaitlisted
from shared.kit.auth import Principal, Role
from shared.kit.clock import japan_date
from shared.kit.errors import Forbidden, NotFound
from shared.reference import municipality

T = TypeVar("T")

Kind = Literal[
    "registration_confirmed",
    "prefecture_registration_confirmed",
    "premium_requested",
    "premium_approved",
    "premium_rejected",
    "application_received",
    "application_rejected",
    "certificate_issued",
    "certificate_renewed",
    "certificate_expiring",
    "certificate_expired",
    "certificate_revoked",
    "grant_issued",
    "grant_waitlisted",
    "grant_redeemed",
    "grant_cancelled",
    "receipt_issued",
    "one_stop_voided",
    "listing_digest",
]
KINDS: tuple[Kind, ...] = get_args(Kind)
LANGUAGES: tuple[Language, ...] = get_args(Language)
DEFAULT_LANGUAGE: Language = "ja"
Unit = Literal["jpy", "miles"]


# -- facts: values that are written differently in each language -----------------------------


@dataclass(frozen=True, slots=True)
class Amount:
    """Money (yen) or miles, always an int."""

    value: int
    unit: Unit


@dataclass(frozen=True, slots=True)
class Place:
    """A municipality or prefecture, by its 6-digit code."""

    code: str


@dataclass(frozen=True, slots=True)
class Places:
    codes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Label:
    """A fixed phrase looked up in the language's label file (``templates/_labels.<lang>.txt``)."""

    key: str


@dataclass(frozen=True, slots=True)
class Reason:
    """Why a decision went against the resident: a code of a published list (shared/contracts/reasons.py),
    written as that list's sentence; anything else (an older event's free text) as the ``other`` one."""

    kind: ReasonKind
    code: str


@dataclass(frozen=True, slots=True)
class ListingLines:
    """The listings of a digest, one line each (title, kind, place, dates), written per language."""

    entries: tuple[DigestEntry, ...]


Fact = str | int | date | datetime | Amount | Place | Places | Label | Reason | ListingLines


@dataclass(frozen=True, slots=True)
class Notice:
    """One message to one resident, before it is put into words."""

    kind: Kind
    resident_id: str
    facts: Mapping[str, Fact] = field(default_factory=dict)


_MONTHS_EN = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)


def format_date(day: date | datetime, language: Language) -> str:
    """西暦 in Japanese (``2026年11月26日``), day-month-year in English (``26 November 2026``)."""
    if isinstance(day, datetime):
        day = japan_date(day)  # an instant is written as its date in Japan
    if language == "ja":
        return f"{day.year}年{day.month}月{day.day}日"
    return f"{day.day} {_MONTHS_EN[day.month - 1]} {day.year}"


def format_number(value: int) -> str:
    return f"{value:,}"


def format_amount(amount: Amount, language: Language) -> str:
    """``30,000円`` / ``¥30,000``; ``30,000マイル`` / ``30,000 miles``."""
    number = format_number(amount.value)
    if amount.unit == "jpy":
        if language == "ja":
            return f"{number}円"
        return f"¥{number}"
    if language == "ja":
        return f"{number}マイル"
    return f"{number} mile" if amount.value == 1 else f"{number} miles"


def place_name(code: str) -> str:
    """The municipality's full name (prefecture + name) as written in Japanese, in every language."""
    return municipality(code).full_name


def format_places(codes: Sequence[str], language: Language) -> str:
    separator = "、" if language == "ja" else ", "
    return separator.join(place_name(code) for code in codes)


# -- which events become which messages -------------------------------------------------------


def is_prefecture_registration(event: ResidentRegistered) -> bool:
    """A registration with a prefecture itself: its confirmation names no municipality, and no
    second place the resident was registered with on the way."""
    return event.municipality_code == event.prefecture_code


def notice_for(event: EventData) -> Notice | None:
    """The message an event calls for, or None when it concerns no resident we should tell."""
    match event:
        case ResidentRegistered():
            # Premium sign-ups start pending review and are announced by PremiumRequested.
            if event.status != "active":
                return None
            if is_prefecture_registration(event):
                return Notice("prefecture_registration_confirmed", event.resident_id, {
                    "prefecture": Place(event.prefecture_code),
                    "tier": Label(f"tier.{event.tier}"),
                    "registered_on": event.registered_at,
                })
            return Notice("registration_confirmed", event.resident_id, {
                "municipality": Place(event.municipality_code),
                "prefecture": Place(event.prefecture_code),
                "tier": Label(f"tier.{event.tier}"),
                "registered_on": event.registered_at,
            })
        case PremiumRequested():
            return Notice("premium_requested", event.resident_id, {
                "municipality": Place(event.municipality_code),
                "activity_count": event.activity_count,
                "requested_on": event.requested_at,
            })
        case PremiumApproved():
            return Notice("premium_approved", event.resident_id, {
                "municipality": Place(event.municipality_code),
                "valid_until": event.valid_until,
                "decided_on": event.decided_at,
            })
        case PremiumRejected():
            return Notice("premium_rejected", event.resident_id, {
                "municipality": Place(event.municipality_code),
                "reason": Reason("rejection", event.reason),
                "decided_on": event.decided_at,
            })
        case ApplicationSubmitted():
            return Notice("application_received", event.resident_id, {
                "municipality": Place(event.municipality_code),
                "application_id": event.application_id,
                "submitted_on": event.submitted_at,
            })
        case ApplicationRejected():
            return Notice("application_rejected", event.resident_id, {
                "municipality": Place(event.municipality_code),
                "application_id": event.application_id,
                "reason": Reason("rejection", event.reason),
                "decided_on": event.decided_at,
            })
        case CertificateIssued() | CertificateRenewed():
            kind: Kind = "certificate_issued" if isinstance(event, CertificateIssued) else "certificate_renewed"
            return Notice(kind, event.resident_id, _certificate_facts(event))
        case CertificateExpiring():
            return Notice("certificate_expiring", event.resident_id, {
                **_certificate_facts(event), "days_left": event.days_left,
            })
        case CertificateExpired():
            return Notice("certificate_expired", event.resident_id, {
                **_certificate_facts(event), "expired_on": event.expired_on,
            })
        case CertificateRevoked():
            return Notice("certificate_revoked", event.resident_id, {
                **_certificate_facts(event), "reason": Reason("revocation", event.reason),
                "revoked_on": event.revoked_at,
            })
        case GrantIssued():
            return Notice("grant_issued", event.resident_id, {
                **_grant_facts(event.partner, event.municipality_code, event.program_id, event.certificate_number),
                "amount": Amount(event.reserved, event.unit),
                "window_from": event.window_from,
                "window_until": event.window_until,
            })
        case GrantWaitlisted():
            return Notice("grant_waitlisted", event.resident_id, {
                **_grant_facts(event.partner, event.municipality_code, event.program_id, event.certificate_number),
                "amount": Amount(event.needed, event.unit),
                "position": event.position,
            })
        case GrantRedeemed():
            return Notice("grant_redeemed", event.resident_id, {
                **_grant_facts(event.partner, event.municipality_code, event.program_id, event.certificate_number),
                "amount": Amount(event.amount, event.unit),
                "trips_counted": event.trips_counted,
                "completion": Label("grant.completed" if event.completed else "grant.in_progress"),
                "redeemed_on": event.redeemed_at,
            })
        case GrantCancelled():
            return Notice("grant_cancelled", event.resident_id, {
                **_grant_facts(event.partner, event.municipality_code, event.program_id, event.certificate_number),
                "reason": Reason("cancellation", event.reason),
                "cancelled_on": event.cancelled_at,
            })
        case DonationReceived():
            # A donor who is not a registered resident has no inbox; a donation of miles, no receipt.
            if event.resident_id is None or event.receipt_number is None:
                return None
            return Notice("receipt_issued", event.resident_id, {
                "municipality": Place(event.municipality_code),
                "receipt_number": event.receipt_number,
                "amount": Amount(event.amount, "jpy"),  # a receipt is only ever for yen
                "calendar_year": str(event.calendar_year),
                "issued_on": event.received_at,
            })
        case OneStopExceptionVoided():
            if event.resident_id is None:
                return None
            return Notice("one_stop_voided", event.resident_id, {
                "calendar_year": str(event.calendar_year),
                "municipalities": Places(tuple(event.municipality_codes)),
                "municipality_count": len(event.municipality_codes),
                "voided_on": event.voided_at,
            })
        case ListingDigestDue():
            # listings.digests.v1: the resident consented to these in the listings service.
            return Notice("listing_digest", event.resident_id, {
                "count": len(event.listings),
                "listings": ListingLines(tuple(event.listings)),
                "cadence": Label(f"digest.{event.cadence}"),
            })
    return None


def _certificate_facts(
    event: CertificateIssued | CertificateRenewed | CertificateExpiring | CertificateExpired | CertificateRevoked,
) -> dict[str, Fact]:
    return {
        "certificate_number": event.certificate_number,
        "municipality": Place(event.municipality_code),
        "valid_from": event.valid_from,
        "valid_until": event.valid_until,
    }


def _grant_facts(partner: str, municipality_code: str, program_id: str, certificate_number: str) -> dict[str, Fact]:
    return {
        "partner": Label(f"partner.{partner}"),
        "municipality": Place(municipality_code),
        "program_id": program_id,
        "certificate_number": certificate_number,
    }


# -- the contact projection --------------------------------------------------------------------


def email_consent(consents: Sequence[ConsentState]) -> ConsentState | None:
    """The latest e-mail consent in a list of consents (None if the list says nothing about e-mail)."""
    latest: ConsentState | None = None
    for consent in consents:
        if consent.purpose == "email" and (latest is None or consent.at >= latest.at):
            latest = consent
    return latest


@dataclass(frozen=True, slots=True)
class ContactUpdate:
    name: str
    email: str
    language: Language

    @classmethod
    def of(cls, contact: Contact) -> ContactUpdate:
        return cls(contact.name, contact.email, contact.preferred_language)


@dataclass(frozen=True, slots=True)
class ConsentUpdate:
    """An e-mail consent, applied unless a later one is already recorded."""

    granted: bool
    at: datetime


@dataclass(frozen=True, slots=True)
class Effect:
    """What one event does here, in this order: update the resident's contact, then their e-mail
    consent, then tell them (the message reads the contact and consent as they are by then)."""

    resident_id: str
    contact: ContactUpdate | None = None
    consent: ConsentUpdate | None = None
    notice: Notice | None = None


def effect_of(event: EventData, contact: Contact | None = None) -> Effect | None:
    """What a registration, an e-mail consent or a decision does here (None: nothing).

    ``contact``: a registration's contact, opened. A registration whose contact could not be opened
    is about a person who was erased (their key is gone): it does nothing, so nothing of them is
    kept and no one is told."""
    match event:
        case ResidentRegistered():
            if contact is None:
                return None
            consent = email_consent(event.consents)
            return Effect(
                event.resident_id, contact=ContactUpdate.of(contact),
                consent=None if consent is None else ConsentUpdate(consent.granted, consent.at),
                notice=notice_for(event),
            )
        case ConsentChanged():
            if event.purpose != "email":
                return None
            return Effect(event.resident_id, consent=ConsentUpdate(event.granted, event.at))
    notice = notice_for(event)
    return None if notice is None else Effect(notice.resident_id, notice=notice)


Update = TypeVar("Update", ContactUpdate, ConsentUpdate)


@dataclass(slots=True)
class _Chunk:
    contacts: dict[str, ContactUpdate] = field(default_factory=dict)
    consents: dict[str, ConsentUpdate] = field(default_factory=dict)
    told: set[str] = field(default_factory=set)

    def admits(self, effect: Effect) -> bool:
        resident = effect.resident_id
        return _fits(self.contacts, effect.contact, resident, self.told) and _fits(
            self.consents, effect.consent, resident, self.told
        )

    def add(self, effect: Effect) -> None:
        if effect.contact is not None:
            self.contacts[effect.resident_id] = effect.contact
        if effect.consent is not None:
            self.consents[effect.resident_id] = effect.consent
        if effect.notice is not None:
            self.told.add(effect.resident_id)


def _fits(updates: Mapping[str, Update], update: Update | None, resident: str, told: set[str]) -> bool:
    if update is None:
        return True
    if resident in updates:
        # Applying the same update again changes nothing (a second registration of the same person
        # repeats their contact and consents); another one would touch the row twice.
        return updates[resident] == update
    return resident not in told  # a message earlier in the chunk must not see it


def conflict_free_runs(items: Sequence[T], effect: Callable[[T], Effect]) -> Iterator[Sequence[T]]:
    """Consecutive chunks of ``items`` that can each be applied at once, with the outcome of
    applying the items one by one: every contact update of the chunk, then every consent update,
    then every message (which reads the residents as updated).

    That holds when a chunk updates a resident's contact (or consent) at most once — repeating the
    same update is harmless — and never after a message to them earlier in the chunk.
    """
    start, chunk = 0, _Chunk()
    for index, item in enumerate(items):
        change = effect(item)
        if not chunk.admits(change):
            yield items[start:index]
            start, chunk = index, _Chunk()
        chunk.add(change)
    if start < len(items):
        yield items[start:]


# -- e-mail delivery: retries and failures -----------------------------------------------------

SmtpStage = Literal["connect", "mail", "rcpt", "data"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff for temporary SMTP failures, with a cap and a last attempt."""

    base: timedelta = timedelta(seconds=30)
    cap: timedelta = timedelta(hours=1)
    max_attempts: int = 12

    def delay(self, attempts: int) -> timedelta:
        """The wait after the ``attempts``-th failed attempt (1 → base, 2 → 2·base, ... ≤ cap)."""
        exponent = max(attempts - 1, 0)
        return min(self.base * (1 << min(exponent, 30)), self.cap)

    def gives_up_after(self, attempts: int) -> bool:
        return attempts >= self.max_attempts


def is_permanent_smtp_failure(stage: SmtpStage, code: int | None) -> bool:
    """Only a 5xx answer about this message (recipient or content) is final.

    A refused connection, a 4xx, or a 5xx to our own MAIL FROM / login is a problem of the
    server or of our configuration: retrying later, with backoff, can succeed.
    """
    return code is not None and 500 <= code <= 599 and stage in ("rcpt", "data")


def scrub_address(reason: str, address: str | None, name: str | None = None) -> str:
    """A server's reason without the recipient's address or name in it (failure events carry no
    personal data; a server may echo the whole ``To`` it was given)."""
    for personal, placeholder in ((address, "<recipient>"), (name, "<name>")):
        if personal and personal.strip():
            reason = re.sub(re.escape(personal.strip()), placeholder, reason, flags=re.IGNORECASE)
    return reason[:500]


# -- rules a caller of the HTTP API can break ----------------------------------------------------


class NotificationNotFound(NotFound):
    code = "notification-not-found"
    title = "The resident has no such notification"


class OtherResidentsNotifications(Forbidden):
    code = "other-residents-notifications"
    title = "A resident may only see their own notifications"


def ensure_own(principal: Principal, resident_id: str) -> None:
    """A resident sees and acts on their own notifications only (an admin reads anyone's)."""
    if principal.role is Role.RESIDENT and principal.subject != resident_id:
        raise OtherResidentsNotifications(f"resident {principal.subject} may not read {resident_id}'s notifications")
