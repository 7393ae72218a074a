"""Rules of furusato registration, pure Python: what a person may register, and how a registration moves.

A registration with a municipality brings a *derived* one with its prefecture (basic, active), which
lives as long as some live registration with a municipality of that prefecture does. A premium
request (new, an upgrade of a basic registration, or a yearly renewal) is a *review* that the
municipality's staff approve or reject; the registration's status only says what holds now.

States of a registration::

    basic:    active ──withdraw──▶ withdrawn
    premium:  pending_review ──approve──▶ active ──(valid_until passed)──▶ expired
                    │                        └──withdraw──▶ withdrawn
                    └──reject──▶ rejected
    upgrade:  basic active + pending review ──approve──▶ premium active (reject: stays basic)
    renewal:  premium active + pending review ──approve──▶ valid one more year (reject: unchanged)

A premium request proves activities of the municipality's catalogue of designated activities
(自治体が指定する担い手活動, *designated activities*): the resident picks entries of that catalogue,
each with the date they took part; the municipality's managers publish, change and retire entries::

    designated activity:  published ──retire──▶ retired (counts for activities done before that day)
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

from pydantic import validate_email
from pydantic_core import PydanticCustomError

from shared.contracts.partners import PartnerRegistered
from shared.contracts.registration import ConsentPurpose, RegistrationStatus
from shared.contracts.topics import PARTNER_CODES
from shared.kit.clock import japan_date
from shared.kit.errors import Conflict, DomainError, NotFound
from shared.kit.my_number import find_my_number, looks_like_my_number
from shared.reference import Municipality, UnknownMunicipality, is_valid_code, municipality

Tier = Literal["basic", "premium"]
#: What kind of local work a designated activity is: 祭り・伝統行事, 農作業・援農, 清掃・環境保全,
#: 防災・消防団, 地域イベント運営, 子ども・教育支援, その他.
ActivityKind = Literal[
    "festival", "farming", "environment", "disaster_prevention", "community_event", "education", "other"
]
CatalogueStatus = Literal["published", "retired"]
ReviewKind = Literal["initial", "upgrade", "renewal"]
Language = Literal["ja", "en"]

LIVE: frozenset[str] = frozenset({"active", "pending_review"})
PREMIUM_LIMIT = 3
MIN_ACTIVITIES = 3
#: A JPKI verification result older than this is not accepted for a new premium request.
IDENTITY_MAX_AGE = timedelta(days=365)
#: Identity verification methods premium accepts: マイナンバーカードの公的個人認証 (JPKI) only.
IDENTITY_METHODS: frozenset[str] = frozenset({"jpki"})
#: The longest an identity attestation may live (``exp - iat``): it is made for one request.
ATTESTATION_MAX_LIFETIME = timedelta(minutes=10)
#: Clock skew tolerated between the identity-verification provider and this service.
ATTESTATION_LEEWAY = timedelta(seconds=30)
#: Kinds a person can register with: prefectures and municipalities (Tokyo's special wards are
#: municipalities); a designated city's ward is not (register with the city).
REGISTRABLE_KINDS = frozenset({"prefecture", "city", "town", "village", "ward"})
RESIDENT_ID = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
#: A catalogue entry's code within its municipality; the entry's id is ``<municipality code>-<code>``.
ACTIVITY_CODE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
#: Japanese and English labels of each kind of designated activity.
ACTIVITY_KINDS: Mapping[ActivityKind, tuple[str, str]] = {
    "festival": ("祭り・伝統行事", "Festivals and traditional events"),
    "farming": ("農作業・援農", "Farm work and farm help"),
    "environment": ("清掃・環境保全", "Clean-up and conservation"),
    "disaster_prevention": ("防災・消防団", "Disaster prevention and volunteer fire brigade"),
    "community_event": ("地域イベント運営", "Running community events"),
    "education": ("子ども・教育支援", "Support for children and education"),
    "other": ("その他", "Other"),
}


# --- Errors: one per rule a person or staff member can break -------------------------------------


class MalformedMunicipalityCode(DomainError):
    code = "malformed-municipality-code"
    title = "The municipality code is malformed"


class UnknownMunicipalityCode(DomainError):
    code = "unknown-municipality"
    title = "No municipality has this code"


class MunicipalityNotRegistrable(DomainError):
    code = "municipality-not-registrable"
    title = "One cannot register with this local government"


class InvalidLegalAddress(DomainError):
    code = "invalid-legal-address"
    title = "The legal address must be a municipality where people live"


class InvalidResidentId(DomainError):
    code = "invalid-resident-id"
    title = "The token's subject cannot be a resident id"


class InvalidName(DomainError):
    code = "invalid-name"
    title = "The name is empty or contains control characters"


class InvalidKana(DomainError):
    code = "invalid-kana"
    title = "The reading must be written in kana"


class InvalidEmail(DomainError):
    code = "invalid-email"
    title = "The e-mail address is not valid"


class InvalidPhone(DomainError):
    code = "invalid-phone"
    title = "The phone number may hold digits, hyphens and a leading +"


class BirthDateInFuture(DomainError):
    code = "birth-date-in-future"
    title = "The date of birth is in the future"




class ResidentExists(Conflict):
    code = "resident-exists"
    title = "This person already has an account"


class ResidentErased(Conflict):
    code = "resident-erased"
    title = "This account was erased and cannot be reopened"


class ResidentNotFound(NotFound):
    code = "resident-not-found"
    title = "No such resident"


class RegistrationNotFound(NotFound):
    code = "registration-not-found"
    title = "No such registration"


class AlreadyRegistered(Conflict):
    code = "already-registered"
    title = "The person is already registered with this municipality"


class ProofNotForBasic(DomainError):
    code = "proof-not-for-basic"
    title = "A basic registration takes no identity verification or activities"


class IdentityNotVerified(DomainError):
    code = "identity-not-verified"
    title = "Premium needs identity verified with the My Number Card (JPKI)"


class IdentityNotAttested(DomainError):
    code = "identity-not-attested"
    title = "Identity is accepted only as the verification provider's signed attestation"


class IdentityVerificationInvalid(DomainError):
    code = "identity-verification-invalid"
    title = "The identity verification result is in the future or too old"


class AttestationInvalid(DomainError):
    code = "attestation-invalid"
    title = "The identity attestation is not one a trusted provider signed for this request"


class AttestationExpired(DomainError):
    code = "attestation-expired"
    title = "The identity attestation has expired: verify again"


class AttestationReplayed(Conflict):
    code = "attestation-replayed"
    title = "This identity attestation was already used: each one is used once"


class AttestationSubjectMismatch(DomainError):
    code = "attestation-subject-mismatch"
    title = "The identity attestation is about another person"


class PremiumInHomeMunicipality(DomainError):
    code = "premium-in-home-municipality"
    title = "Premium is not available in the municipality of one's legal address"


class PremiumLimitReached(Conflict):
    code = "premium-limit-reached"
    title = "At most 3 premium registrations may be active or under review at a time"


class NotEnoughActivities(DomainError):
    code = "not-enough-activities"
    title = "Premium needs at least 3 distinct designated activities of the municipality within the year"


class FreeTextActivity(DomainError):
    code = "activity-not-designated"
    title = "Activities are picked from the municipality's catalogue by activity_id, not named freely"


class UnknownActivity(DomainError):
    code = "unknown-activity"
    title = "No designated activity has this id"


class ActivityOfAnotherMunicipality(DomainError):
    code = "activity-of-another-municipality"
    title = "The activity is designated by another municipality"


class ActivityRetired(DomainError):
    code = "activity-retired"
    title = "The activity was no longer designated on the date given"


class ActivityEvidenceRequired(DomainError):
    code = "activity-evidence-required"
    title = "The municipality needs evidence of this activity: send document_ref"


class InvalidActivityCode(DomainError):
    code = "invalid-activity-code"
    title = "An activity code is 1-40 lower-case letters, digits and hyphens"


class InvalidActivityName(DomainError):
    code = "invalid-activity-name"
    title = "An activity's name is empty or contains control characters"


class DesignatedActivityExists(Conflict):
    code = "activity-exists"
    title = "The municipality's catalogue already has an activity with this code"


class DesignatedActivityNotFound(NotFound):
    code = "activity-not-found"
    title = "No such designated activity"


class DesignatedActivityRetired(Conflict):
    code = "activity-already-retired"
    title = "A retired activity is not changed"


class ActivityOutOfRange(DomainError):
    code = "activity-out-of-range"
    title = "An activity is dated in the future or outside the period it must prove"


class AlreadyDecided(Conflict):
    code = "already-decided"
    title = "Nothing awaits review on this registration"


class NotRenewable(Conflict):
    code = "not-renewable"
    title = "Only an active premium registration can be renewed"


class ReviewPending(Conflict):
    code = "review-pending"
    title = "A premium request is already under review"


class RegistrationClosed(Conflict):
    code = "registration-closed"
    title = "The registration has already ended"


class DerivedRegistration(Conflict):
    code = "derived-registration"
    title = "The prefecture registration follows the municipal ones"


class ConsentPartnerRequired(DomainError):
    code = "consent-partner-required"
    title = "Sharing the certificate is consented per partner: name the partner"


class ConsentPartnerNotAllowed(DomainError):
    code = "consent-partner-not-allowed"
    title = "This consent is not given per partner"


class UnknownPartner(DomainError):
    code = "unknown-partner"
    title = "No partner has this code"


class ConsentNotFound(NotFound):
    code = "consent-not-found"
    title = "This consent was never given"


class MunicipalityRequired(DomainError):
    code = "municipality-required"
    title = "Name the municipality to list"


# --- Calendar ----------------------------------------------------------------------------------

# Validity and activity dates follow the calendar in Japan: ``japan_date(now)`` of the instant passed in.


def add_years(day: date, years: int) -> date:
    """The same calendar day ``years`` later; 29 February becomes 28 February."""
    try:
        return day.replace(year=day.year + years)
    except ValueError:
        return day.replace(year=day.year + years, day=28)


# --- Input rules ---------------------------------------------------------------------------------


def municipality_from_code(code: str) -> Municipality:
    """The reference row of a 6-digit code; malformed and unknown codes are told apart."""
    if not is_valid_code(code):
        raise MalformedMunicipalityCode(
            f"{code!r} is not a municipality code: 6 digits whose last one is the check digit (e.g. 304018)"
        )
    try:
        return municipality(code)
    except UnknownMunicipality as error:
        raise UnknownMunicipalityCode(f"no municipality has the code {code}") from error


@functools.lru_cache(maxsize=4096)
def registrable(code: str) -> Municipality:
    """A prefecture or municipality a person can register with.

    Cached: each registration asks twice, and the answer is the reference table's (fixed). Only
    codes it accepts are kept (a refusal is raised again every time), so the table bounds it."""
    entry = municipality_from_code(code)
    if entry.kind not in REGISTRABLE_KINDS or entry.northern_territories:
        hint = f"; register with the city {entry.parent_code}" if entry.parent_code else ""
        raise MunicipalityNotRegistrable(f"{entry.full_name} ({code}) takes no registrations{hint}")
    return entry


def legal_address(code: str) -> Municipality:
    """The municipality (or designated-city ward) of a person's 住民票."""
    entry = municipality_from_code(code)
    if entry.is_prefecture or entry.northern_territories:
        raise InvalidLegalAddress(f"{entry.full_name} ({code}) cannot be a legal address")
    return entry


def home_municipality(legal_address_code: str) -> str:
    """The municipality of a legal address: a designated city's ward belongs to its city."""
    entry = municipality(legal_address_code)
    return entry.parent_code or entry.code


def check_resident_id(subject: str) -> str:
    if RESIDENT_ID.fullmatch(subject) is None or looks_like_my_number(subject):
        raise InvalidResidentId(
            "a resident id is 1-128 characters of letters, digits and . _ : @ -, and never a My Number"
        )
    return subject


def check_name(value: str) -> str:
    name = " ".join(unicodedata.normalize("NFC", value).split())
    if not name or any(unicodedata.category(ch) == "Cc" for ch in name):
        raise InvalidName("the name must not be empty nor contain control characters")
    return name


_KANA = re.compile(r"^[\u3041-\u3096\u309d\u309e\u30a1-\u30fa\u30fb\u30fc\u30fd\u30fe ]+$")


def normalise_kana(value: str) -> str:
    """The reading in full-width katakana (hiragana and half-width katakana are accepted)."""
    text = " ".join(unicodedata.normalize("NFKC", value).split())
    if not text or _KANA.fullmatch(text) is None or not any(ch not in " ・ー" for ch in text):
        raise InvalidKana("write the reading in katakana or hiragana (ー, ・ and spaces allowed)")
    return "".join(_to_katakana(ch) for ch in text)


def _to_katakana(ch: str) -> str:
    if "\u3041" <= ch <= "\u3096" or ch in "\u309d\u309e":
        return chr(ord(ch) + 0x60)
    return ch


def kana_search_term(value: str) -> str:
    """A search string as stored readings are written (NFKC, hiragana as katakana)."""
    return "".join(_to_katakana(ch) for ch in unicodedata.normalize("NFKC", value).strip())


def check_email(value: str) -> str:
    try:
        _, email = validate_email(value)
    except PydanticCustomError as error:
        raise InvalidEmail(f"not a valid e-mail address: {error.message()}") from error
    return email


_PHONE = re.compile(r"^\+?[0-9][0-9-]{5,23}[0-9]$")


def check_phone(value: str | None) -> str | None:
    if value is None:
        return None
    phone = value.strip()
    if _PHONE.fullmatch(phone) is None or sum(ch.isdigit() for ch in phone) > 15:
        raise InvalidPhone("a phone number is digits and hyphens, optionally after a leading +")
    return phone


def check_birth_date(born: date, today: date) -> date:
    if born > today:
        raise BirthDateInFuture(f"{born.isoformat()} is after today ({today.isoformat()}, Japan time)")
    return born


# --- Residents -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Contact:
    """What other services may keep to reach the person."""

    name: str
    name_kana: str
    email: str
    phone: str | None
    preferred_language: Language


def contact(name: str, name_kana: str, email: str, phone: str | None, preferred_language: Language) -> Contact:
    return Contact(check_name(name), normalise_kana(name_kana), check_email(email), check_phone(phone),
                   preferred_language)


@dataclass(frozen=True, slots=True)
class Resident:
    id: str
    contact: Contact
    date_of_birth: date
    legal_address_code: str
    created_at: datetime


def new_resident(
    subject: str, details: Contact, date_of_birth: date, legal_address_code: str, now: datetime
) -> Resident:
    return Resident(
        id=check_resident_id(subject),
        contact=details,
        date_of_birth=check_birth_date(date_of_birth, japan_date(now)),
        legal_address_code=legal_address(legal_address_code).code,
        created_at=now,
    )


# --- Registrations -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Registration:
    id: str
    resident_id: str
    municipality_code: str
    prefecture_code: str
    tier: Tier
    status: RegistrationStatus
    derived_from: str | None
    registered_at: datetime
    valid_from: date | None = None
    valid_until: date | None = None
    pending_review: ReviewKind | None = None

    @property
    def is_live(self) -> bool:
        return self.status in LIVE

    @property
    def is_prefecture(self) -> bool:
        return self.municipality_code == self.prefecture_code

    @property
    def holds_premium_place(self) -> bool:
        """Counts towards the limit: premium and live, or a premium request under review."""
        return (self.tier == "premium" and self.is_live) or self.pending_review is not None


@dataclass(frozen=True, slots=True)
class ActivityPick:
    """An activity of the catalogue the person took part in, on a day, with an optional evidence reference."""

    activity_id: str
    on: date
    document_ref: str | None = None


@dataclass(frozen=True, slots=True)
class IdentityVerification:
    """What a provider's attestation established: how, by whom, when. Never the card's My Number."""

    method: str
    verified_at: datetime
    #: The provider that signed the attestation (its ``iss``).
    provider: str
    #: The attestation's ``jti``: a provider's attestation is used once.
    attestation_id: str


@dataclass(frozen=True, slots=True)
class RegistrationPlan:
    """What one registration request changes."""

    registration: Registration  # the new row, or the basic row being upgraded
    is_new: bool
    review: ReviewKind | None
    derived_prefecture: Registration | None  # a new derived prefecture row (only with a new registration)
    prefecture_registration_id: str | None  # the prefecture row (new or reused); None for a prefecture

    @property
    def new_rows(self) -> list[Registration]:
        """The registrations to insert: the new one, then its derived prefecture one."""
        rows = [self.registration] if self.is_new else []
        return rows if self.derived_prefecture is None else [*rows, self.derived_prefecture]


def check_identity(identity: IdentityVerification | None, now: datetime) -> IdentityVerification:
    if identity is None:
        raise IdentityNotVerified(
            "send `attestation`: the signed result of a JPKI verification from the identity-verification provider"
        )
    if identity.verified_at > now + ATTESTATION_LEEWAY:
        raise IdentityVerificationInvalid("the identity verification is dated in the future")
    if identity.verified_at < now - IDENTITY_MAX_AGE:
        raise IdentityVerificationInvalid("the identity verification is more than a year old: verify again")
    return identity


def _instant(claims: Mapping[str, Any], name: str) -> datetime:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AttestationInvalid(f"the attestation's {name!r} claim must be a NumericDate (seconds since 1970)")
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError) as error:
        raise AttestationInvalid(f"the attestation's {name!r} claim is out of range") from error


def _text(claims: Mapping[str, Any], name: str, max_length: int = 256) -> str:
    value = claims.get(name)
    if not isinstance(value, str) or not 1 <= len(value) <= max_length:
        raise AttestationInvalid(f"the attestation's {name!r} claim must be a string of 1-{max_length} characters")
    return value


def check_attestation(
    claims: Mapping[str, Any], *, resident_id: str, date_of_birth: date | None, now: datetime
) -> IdentityVerification:
    """The identity verification an attestation states, once its claims hold for this request.

    ``claims`` come from a JWS whose signature a trusted provider made (checked before this); the
    rules here are the rest: about whom (``sub``, and ``birthdate`` when the provider states it),
    how fresh (``iat``, ``exp``, at most 10 minutes of life), by which method, and when the
    verification happened. That it was not used before is the store's unique index."""
    if find_my_number(dict(claims)) is not None:  # never stored, but refused: a provider must not send one
        raise AttestationInvalid("the attestation carries a value that looks like a My Number")
    provider = _text(claims, "iss")
    attestation_id = _text(claims, "jti", 128)
    issued, expires = _instant(claims, "iat"), _instant(claims, "exp")
    if expires <= issued or expires - issued > ATTESTATION_MAX_LIFETIME:
        raise AttestationInvalid(
            f"an attestation lives at most {int(ATTESTATION_MAX_LIFETIME.total_seconds() // 60)} minutes (exp - iat)"
        )
    if issued > now + ATTESTATION_LEEWAY:
        raise AttestationInvalid("the attestation is issued in the future")
    if "nbf" in claims and _instant(claims, "nbf") > now + ATTESTATION_LEEWAY:
        raise AttestationInvalid("the attestation is not valid yet (nbf)")
    if now > expires + ATTESTATION_LEEWAY:
        raise AttestationExpired(f"the attestation expired at {expires.isoformat()}: verify the identity again")
    if _text(claims, "sub") != resident_id:
        raise AttestationSubjectMismatch("the attestation is about another resident than the one registering")
    birthdate = claims.get("birthdate")
    if birthdate is not None:
        try:
            verified_birth = date.fromisoformat(birthdate) if isinstance(birthdate, str) else None
        except ValueError:
            verified_birth = None
        if verified_birth is None:
            raise AttestationInvalid("the attestation's 'birthdate' claim must be a date (YYYY-MM-DD)")
        if date_of_birth is not None and verified_birth != date_of_birth:
            raise AttestationSubjectMismatch("the verified date of birth is not the account's")
    method = _text(claims, "method", 32)
    if method not in IDENTITY_METHODS:
        raise AttestationInvalid(
            f"the identity verification method {method!r} is not accepted for premium; accepted: "
            f"{', '.join(sorted(IDENTITY_METHODS))}"
        )
    verified_at = _instant(claims, "verified_at")
    if verified_at > issued + ATTESTATION_LEEWAY:
        raise AttestationInvalid("the attestation states a verification made after it was issued")
    return check_identity(IdentityVerification(method, verified_at, provider, attestation_id), now)


def check_activities(
    activities: Sequence[ActivityPick], catalogue: Mapping[str, DesignatedActivity], municipality_code: str,
    today: date, since: date, period: str,
) -> None:
    """At least 3 distinct designated activities of the municipality, each dated between ``since`` and
    today. ``catalogue``: the entries the picks name (of any municipality; a missing one is unknown)."""
    for position, activity in enumerate(activities):
        entry = catalogue.get(activity.activity_id)
        if entry is None:
            raise UnknownActivity(
                f"activities[{position}]: no designated activity {activity.activity_id!r}; pick one of the "
                f"municipality's catalogue (GET /v1/public/municipalities/{municipality_code}/activities)"
            )
        if entry.municipality_code != municipality_code:
            raise ActivityOfAnotherMunicipality(
                f"activities[{position}]: {entry.id} is designated by {entry.municipality_code}, "
                f"not {municipality_code}"
            )
        if activity.on > today:
            raise ActivityOutOfRange(f"activities[{position}] is dated after today ({today.isoformat()})")
        if activity.on < since:
            raise ActivityOutOfRange(
                f"activities[{position}] of {activity.on.isoformat()} is before {since.isoformat()} ({period})"
            )
        if not entry.designated_on(activity.on):
            raise ActivityRetired(
                f"activities[{position}]: {entry.id} was retired on {entry.retired_on} (the activity is dated "
                f"{activity.on.isoformat()})"
            )
        if entry.evidence_required and not activity.document_ref:
            raise ActivityEvidenceRequired(f"activities[{position}]: {entry.id} needs a document_ref")
    distinct = {a.activity_id for a in activities}
    if len(distinct) < MIN_ACTIVITIES:
        raise NotEnoughActivities(
            f"{len(distinct)} distinct designated activities listed; at least {MIN_ACTIVITIES} are needed ({period})"
        )


def premium_places(registrations: Iterable[Registration]) -> int:
    return sum(1 for r in registrations if r.holds_premium_place)


def plan_registration(
    *,
    resident_id: str,
    legal_address_code: str,
    existing: Sequence[Registration],
    target_code: str,
    tier: Tier,
    identity: IdentityVerification | None,
    activities: Sequence[ActivityPick],
    catalogue: Mapping[str, DesignatedActivity],
    now: datetime,
    new_id: Callable[[], str],
) -> RegistrationPlan:
    """Decide a registration request against the person's current registrations."""
    target = registrable(target_code)
    live = {r.municipality_code: r for r in existing if r.is_live}
    current = live.get(target.code)
    if tier == "basic":
        if identity is not None or activities:
            raise ProofNotForBasic("leave out identity and activities, or ask for tier premium")
        if current is not None:
            raise AlreadyRegistered(f"already registered with {target.full_name} ({target.code})")
    else:
        if current is not None and (current.tier == "premium" or current.pending_review is not None):
            raise AlreadyRegistered(f"already premium or under review with {target.full_name} ({target.code})")
        check_identity(identity, now)
        if target.code == home_municipality(legal_address_code):
            raise PremiumInHomeMunicipality(f"{target.full_name} is the municipality of the legal address")
        today = japan_date(now)
        check_activities(activities, catalogue, target.code, today, add_years(today, -1), "within the last year")
        if premium_places(existing) >= PREMIUM_LIMIT:
            raise PremiumLimitReached(f"already {PREMIUM_LIMIT} premium registrations active or under review")

    if current is not None:  # a basic registration upgraded to premium, reviewed first
        upgraded = replace(current, pending_review="upgrade")
        prefecture = live.get(target.prefecture_code) if not target.is_prefecture else None
        return RegistrationPlan(upgraded, False, "upgrade", None, prefecture.id if prefecture else None)

    prefecture_code = target.prefecture_code  # computed from the code each time it is read
    registration = Registration(
        id=new_id(), resident_id=resident_id, municipality_code=target.code,
        prefecture_code=prefecture_code, tier=tier,
        status="active" if tier == "basic" else "pending_review", derived_from=None, registered_at=now,
        pending_review="initial" if tier == "premium" else None,
    )
    if target.is_prefecture:
        return RegistrationPlan(registration, True, registration.pending_review, None, None)
    reused = live.get(prefecture_code)
    if reused is not None:
        return RegistrationPlan(registration, True, registration.pending_review, None, reused.id)
    derived = Registration(
        id=new_id(), resident_id=resident_id, municipality_code=prefecture_code,
        prefecture_code=prefecture_code, tier="basic", status="active", derived_from=registration.id,
        registered_at=now,
    )
    return RegistrationPlan(registration, True, registration.pending_review, derived, derived.id)


def plan_renewal(
    registration: Registration, activities: Sequence[ActivityPick], catalogue: Mapping[str, DesignatedActivity],
    now: datetime,
) -> None:
    """A renewal proves this validity year's activities: each dated since it began."""
    if registration.tier != "premium" or registration.status != "active":
        raise NotRenewable(f"registration {registration.id} is {registration.tier} and {registration.status}")
    if registration.pending_review is not None:
        raise ReviewPending(f"a {registration.pending_review} request awaits review")
    today = japan_date(now)
    since = registration.valid_from or add_years(today, -1)
    check_activities(activities, catalogue, registration.municipality_code, today, since,
                     f"since the current validity began on {since.isoformat()}")


def approve(registration: Registration, now: datetime) -> Registration:
    """The registration once its pending premium request is approved: valid one year (Japan dates)."""
    kind = registration.pending_review
    if kind is None:
        raise AlreadyDecided(f"registration {registration.id} has no premium request awaiting review")
    today = japan_date(now)
    current_end = registration.valid_until
    if kind == "renewal" and registration.status == "active" and current_end is not None and current_end >= today:
        # An early renewal keeps the days left: the new year follows the current one.
        valid_from, valid_until = current_end + timedelta(days=1), add_years(current_end, 1)
    else:
        valid_from, valid_until = today, add_years(today, 1)
    return replace(
        registration, tier="premium", status="active", valid_from=valid_from, valid_until=valid_until,
        pending_review=None,
    )


def reject(registration: Registration) -> Registration:
    """A rejected first request ends the registration; a rejected upgrade or renewal changes nothing else."""
    kind = registration.pending_review
    if kind is None:
        raise AlreadyDecided(f"registration {registration.id} has no premium request awaiting review")
    if kind == "initial":
        return replace(registration, status="rejected", pending_review=None)
    return replace(registration, pending_review=None)


def check_withdrawable(registration: Registration, existing: Sequence[Registration]) -> bool:
    """True when the registration is live and may end; False when it already was withdrawn (a no-op)."""
    if registration.status == "withdrawn":
        return False
    if not registration.is_live:
        raise RegistrationClosed(f"registration {registration.id} is {registration.status}")
    if registration.is_prefecture and registration.derived_from is not None and registration.tier == "basic":
        holders = [r for r in existing if r.is_live and not r.is_prefecture
                   and r.prefecture_code == registration.municipality_code]
        if holders:
            raise DerivedRegistration(
                "the prefecture registration came with registrations with its municipalities; withdraw those"
            )
    return True


def derived_prefecture_to_release(prefecture_code: str, remaining: Sequence[Registration]) -> Registration | None:
    """The derived prefecture row to withdraw once no live municipal registration in it remains."""
    if any(r.is_live and not r.is_prefecture and r.prefecture_code == prefecture_code for r in remaining):
        return None
    for r in remaining:
        if (r.municipality_code == prefecture_code and r.is_live and r.derived_from is not None
                and r.tier == "basic" and r.pending_review is None):
            return r
    return None


# --- Designated activities (the municipality's catalogue) ----------------------------------------


@dataclass(frozen=True, slots=True)
class DesignatedActivity:
    """An entry of a municipality's catalogue of designated activities (自治体が指定する担い手活動)."""

    id: str
    municipality_code: str
    code: str
    name_ja: str
    name_en: str
    kind: ActivityKind
    #: When it takes place, as the municipality words it (e.g. 毎年8月, 通年); not checked against dates.
    season: str | None
    #: Whether a pick must carry a document reference (a photo, a host's confirmation).
    evidence_required: bool
    status: CatalogueStatus
    #: Seeded sample data of the demo towns, not a municipality's own designation.
    sample: bool
    created_at: datetime
    updated_at: datetime
    retired_at: datetime | None = None

    @property
    def retired_on(self) -> date | None:
        return japan_date(self.retired_at) if self.retired_at is not None else None

    def designated_on(self, day: date) -> bool:
        """An activity done while the entry was designated counts; from its retirement day on, none does."""
        retired_on = self.retired_on
        return retired_on is None or day < retired_on


def designated_activity_id(municipality_code: str, code: str) -> str:
    if ACTIVITY_CODE.fullmatch(code) is None:
        raise InvalidActivityCode(f"{code!r}: use 1-40 lower-case letters, digits and hyphens (e.g. beach-cleanup)")
    return f"{municipality_code}-{code}"


def _activity_name(value: str, field: str) -> str:
    name = " ".join(unicodedata.normalize("NFC", value).split())
    if not name or any(unicodedata.category(ch) == "Cc" for ch in name):
        raise InvalidActivityName(f"{field} must not be empty nor contain control characters")
    return name


def _season(value: str | None) -> str | None:
    if value is None:
        return None
    season = " ".join(unicodedata.normalize("NFC", value).split())
    return season or None


def new_designated_activity(
    *, municipality_code: str, code: str, name_ja: str, name_en: str, kind: ActivityKind, season: str | None,
    evidence_required: bool, now: datetime, sample: bool = False,
) -> DesignatedActivity:
    """A new published entry of a municipality's (or prefecture's) catalogue."""
    target = registrable(municipality_code)
    return DesignatedActivity(
        id=designated_activity_id(target.code, code), municipality_code=target.code, code=code,
        name_ja=_activity_name(name_ja, "name_ja"), name_en=_activity_name(name_en, "name_en"), kind=kind,
        season=_season(season), evidence_required=evidence_required, status="published", sample=sample,
        created_at=now, updated_at=now,
    )


def change_designated_activity(
    entry: DesignatedActivity, changes: Mapping[str, Any], now: datetime
) -> DesignatedActivity:
    """The entry with ``changes`` (name_ja, name_en, kind, season, evidence_required) applied; a staff
    change makes it the municipality's own (no longer sample data). Picks made before keep their dates."""
    if entry.status == "retired":
        raise DesignatedActivityRetired(f"{entry.id} was retired on {entry.retired_on}: publish a new entry")
    changed = replace(
        entry,
        name_ja=_activity_name(changes["name_ja"], "name_ja") if "name_ja" in changes else entry.name_ja,
        name_en=_activity_name(changes["name_en"], "name_en") if "name_en" in changes else entry.name_en,
        kind=changes.get("kind", entry.kind),
        season=_season(changes["season"]) if "season" in changes else entry.season,
        evidence_required=changes.get("evidence_required", entry.evidence_required),
    )
    if changed == entry:
        return entry
    return replace(changed, sample=False, updated_at=now)


def retire_designated_activity(entry: DesignatedActivity, now: datetime) -> DesignatedActivity | None:
    """The retired entry; None when it already is (retiring again changes nothing)."""
    if entry.status == "retired":
        return None
    return replace(entry, status="retired", retired_at=now, updated_at=now)


# --- Consents ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Consent:
    purpose: ConsentPurpose
    partner: str | None
    granted: bool
    at: datetime


def check_consent_target(purpose: ConsentPurpose, partner: str | None, registered: Collection[str] = ()) -> None:
    """``registered``: partners registered through the gateway (``gateway.partners.v1``) among those
    named; the partners are the seed (``PARTNER_CODES``) and these."""
    if purpose == "share_certificate":
        if partner is None:
            raise ConsentPartnerRequired("name the partner the certificate may be shared with")
        if partner not in PARTNER_CODES and partner not in registered:
            raise UnknownPartner(
                f"no partner {partner!r}; partners: {', '.join(PARTNER_CODES)} and those registered since"
            )
    elif partner is not None:
        raise ConsentPartnerNotAllowed(f"consent {purpose!r} is not given per partner")


def partners_beyond_seed(targets: Iterable[tuple[ConsentPurpose, str | None]]) -> set[str]:
    """The partners named that are not in the seed: only these need the registered partners read."""
    return {partner for _, partner in targets if partner is not None and partner not in PARTNER_CODES}


def latest_partner_registrations(events: Iterable[PartnerRegistered]) -> list[PartnerRegistered]:
    """One event per partner code: the latest registration (a re-announced code keeps the newer)."""
    latest: dict[str, PartnerRegistered] = {}
    for event in events:
        if event.code not in latest or latest[event.code].registered_at <= event.registered_at:
            latest[event.code] = event
    return list(latest.values())
