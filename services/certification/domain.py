"""Rules of dual-resident certification: pure Python, no I/O.

What is decided here: whether an application may be submitted (the municipality's rules, the
resident's registrations and consents as the projection knows them), how an application is
decided, how a certificate is numbered, renewed, revoked and when it expires, and how the
registration events move the resident projection. Every rule a user can break has one error type
with its problem+json ``code``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from typing import Any, Final, Literal, get_args

from shared.contracts.certification import CertificateStatus, HousingBasis
from shared.contracts.common import PartnerMembership, Tier
from shared.contracts.planning import PlanAdopted, PlanWithdrawn
from shared.contracts.reasons import RESIDENT_WITHDRAWN, RejectionReason, RevocationReason
from shared.contracts.registration import (
    ConsentChanged,
    ConsentState,
    PremiumApproved,
    PremiumExpired,
    PremiumRejected,
    PremiumRequested,
    RegistrationStatus,
    RegistrationWithdrawn,
    ResidentRegistered,
)
from shared.contracts.topics import PARTNER_CODES
from shared.kit.errors import Conflict, DomainError, NotFound
from shared.reference import Municipality, UnknownMunicipality, municipality

HOUSING_BASES: tuple[HousingBasis, ...] = get_args(HousingBasis)
#: Days before ``valid_until`` on which ``certificate.expiring`` is sent.
EXPIRING_NOTICE_DAYS = 30
MAX_STAY_DAYS = 366
#: Who decides when no staff member does (the resident's withdrawal).
SYSTEM_ACTOR = "system"
#: The reason code of what the resident's withdrawal rejects and revokes (shared/contracts/reasons.py).
WITHDRAWAL_REASON: Final = RESIDENT_WITHDRAWN
#: How far back staff may date a certificate's start: a decision made at the counter some days
#: before it is keyed in, or dated from the day the stay began, not a backdated year of coverage.
MAX_BACKDATED_DAYS = 30
#: How far ahead a certificate may start: a resident whose second home is ready next season; a
#: later start is a later application (the facts checked now may no longer hold then).
MAX_DEFERRED_DAYS = 90

RequiredRegistration = Literal["any_active", "premium"]
#: What a municipality certifies dual residents under: its adopted 特定居住促進計画 (``plan``), or a
#: 先導的モデル事業 / its own scheme (``model_project``). Certification is one of the model projects'
#: tools and needs no plan (issue #19).
LegalBasis = Literal["plan", "model_project"]
SchemeSource = Literal["reference", "admin", "planning"]
ApplicationStatus = Literal["submitted", "approved", "rejected"]
ResidentStatus = Literal["active", "withdrawn"]
PremiumStatus = Literal["requested", "approved", "rejected", "expired"]


# --- errors: one per rule a user can break -------------------------------------------------------


class UnknownMunicipalityCode(DomainError):
    code = "unknown-municipality"
    title = "No municipality has this code"


class MunicipalityNotFound(NotFound):
    code = "municipality-not-found"
    title = "No municipality has this code"


class NotAMunicipality(DomainError):
    code = "not-a-municipality"
    title = "The code names a prefecture, not a municipality"


class NoCertificationScheme(DomainError):
    code = "no-certification-scheme"
    title = "The municipality has no certification scheme for dual residents"


class SchemeNotInForce(DomainError):
    code = "scheme-not-in-force"
    title = "The municipality's certification scheme is not in force today"


class InvalidSchemePeriod(DomainError):
    code = "invalid-scheme-period"
    title = "The scheme's valid_until precedes its valid_from"


class RulesNotFound(NotFound):
    code = "rules-not-found"
    title = "The municipality has no certification scheme, so no certification rules"


class PlanAlreadyRecorded(Conflict):
    code = "plan-already-recorded"
    title = "The municipality's plan is recorded already"


class PrimaryResidenceSameMunicipality(DomainError):
    code = "primary-residence-same-municipality"
    title = "The primary residence must be in another municipality"


class StayDaysOutOfRange(DomainError):
    code = "stay-days-out-of-range"
    title = "Planned stay days per year must be between 1 and 366"


class StayBelowMinimum(DomainError):
    code = "stay-below-minimum"
    title = "Planned stay days are below the municipality's minimum"


class HousingBasisNotAccepted(DomainError):
    code = "housing-basis-not-accepted"
    title = "The municipality does not accept this housing basis"


class UnknownPartner(DomainError):
    code = "unknown-partner"
    title = "No partner has this code"


class DuplicatePartner(DomainError):
    code = "duplicate-partner"
    title = "A partner is listed twice"


class InvalidMemberNumber(DomainError):
    code = "invalid-member-number"
    title = "The member number does not have the partner's format"


class PartnerConsentMissing(DomainError):
    code = "partner-consent-missing"
    title = "The resident has not consented to share the certificate with this partner"


class ResidentNotYetKnown(Conflict):
    """The registration event has not reached this service yet: the client retries shortly."""

    code = "resident-not-yet-known"
    title = "The resident's registration is not known here yet"


class ResidentWithdrawn(Conflict):
    code = "resident-withdrawn"
    title = "The resident has withdrawn"


class RegistrationRequired(DomainError):
    code = "registration-required"
    title = "An active furusato registration with the municipality is required"


class PremiumRegistrationRequired(DomainError):
    code = "premium-registration-required"
    title = "An active premium registration with the municipality is required"


class RegistrationNoLongerActive(Conflict):
    code = "registration-no-longer-active"
    title = "The resident's registration with the municipality is no longer active"


class OpenApplicationExists(Conflict):
    code = "open-application-exists"
    title = "An application to this municipality is already under review"


class CertificateAlreadyHeld(Conflict):
    code = "certificate-already-held"
    title = "The resident already holds a valid certificate of this municipality"


class ApplicationNotFound(NotFound):
    code = "application-not-found"
    title = "No such application"


class ApplicationAlreadyDecided(Conflict):
    code = "application-already-decided"
    title = "The application was decided already"


class InvalidValidityPeriod(DomainError):
    code = "invalid-validity-period"
    title = "valid_until precedes valid_from"


class ValidityEndsInPast(DomainError):
    code = "validity-ends-in-past"
    title = "The certificate would be expired on issue"


class ValidFromTooEarly(DomainError):
    code = "valid-from-too-early"
    title = f"valid_from may be at most {MAX_BACKDATED_DAYS} days before today"


class ValidFromTooLate(DomainError):
    code = "valid-from-too-late"
    title = f"valid_from may be at most {MAX_DEFERRED_DAYS} days after today"


class ValidityExceedsRules(DomainError):
    code = "validity-exceeds-rules"
    title = "valid_until is beyond the validity the municipality's rules allow"


class CertificateNotFound(NotFound):
    code = "certificate-not-found"
    title = "No such certificate"


class CertificateAlreadyRevoked(Conflict):
    code = "certificate-already-revoked"
    title = "The certificate is revoked already"


class CertificateExpired(Conflict):
    code = "certificate-expired"
    title = "The certificate has expired"


class CertificateNotRenewable(Conflict):
    code = "certificate-not-renewable"
    title = "Only a valid, unexpired certificate can be renewed"


class RenewalMustExtend(DomainError):
    code = "renewal-must-extend"
    title = "A renewal must move valid_until later"


class RenewalTooEarly(Conflict):
    code = "renewal-too-early"
    title = "The certificate's current validity runs longer than one validity period from today"


# --- municipalities and their rules --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MunicipalityRules:
    """One municipality's certification scheme: its legal basis, when it is in force, and what it
    requires of an applicant (defaults: the design's brackets).

    ``plan_source`` says where the scheme's row came from (the reference data, an admin, or the
    planning service's events); ``plan_adopted_on`` is set only on a plan basis."""

    municipality_code: str
    min_stay_days: int = 30
    housing_bases: tuple[HousingBasis, ...] = HOUSING_BASES
    validity_days: int = 365
    required_registration: RequiredRegistration = "any_active"
    plan_source: SchemeSource = "reference"
    plan_adopted_on: date | None = None
    legal_basis: LegalBasis = "plan"
    valid_from: date | None = None
    valid_until: date | None = None

    def in_force_on(self, day: date) -> bool:
        return (self.valid_from is None or self.valid_from <= day) and (
            self.valid_until is None or day <= self.valid_until
        )

    def with_plan(self, adopted_on: date | None, source: SchemeSource) -> MunicipalityRules:
        """The town adopted a 特定居住促進計画: the same rules, now on a plan basis."""
        return replace(self, legal_basis="plan", plan_adopted_on=adopted_on, plan_source=source)

    def without_plan(self, source: SchemeSource) -> MunicipalityRules:
        """The town's plan was withdrawn: certification goes on under its own scheme, same rules."""
        return replace(self, legal_basis="model_project", plan_adopted_on=None, plan_source=source)

    def edited(self, edit: SchemeEdit) -> MunicipalityRules:
        """Staff change their scheme's rules and period; the legal basis is a fact, not a choice here."""
        valid_from, valid_until = edit.period if edit.period is not None else (self.valid_from, self.valid_until)
        if valid_from is not None and valid_until is not None and valid_until < valid_from:
            raise InvalidSchemePeriod(
                f"valid_until {valid_until} precedes valid_from {valid_from}", field="valid_until"
            )
        return replace(
            self, min_stay_days=edit.min_stay_days, housing_bases=edit.housing_bases,
            validity_days=edit.validity_days, required_registration=edit.required_registration,
            valid_from=valid_from, valid_until=valid_until,
        )


@dataclass(frozen=True, slots=True)
class SchemeEdit:
    """What staff may change of their scheme: the rules, and (``period``, None to keep it) when it is in force."""

    municipality_code: str
    min_stay_days: int
    housing_bases: tuple[HousingBasis, ...]
    validity_days: int
    required_registration: RequiredRegistration
    period: tuple[date | None, date | None] | None = None


def scheme_after_plan_event(
    current: MunicipalityRules | None, code: str, event: PlanAdopted | PlanWithdrawn
) -> MunicipalityRules | None:
    """A town's scheme after its 特定居住促進計画 was adopted or withdrawn (``planning.plans.v1``).

    Adoption puts the scheme on a plan basis (a town without a scheme gets one, default rules);
    withdrawal puts it back on a model-project basis: certification is not tied to a plan, so
    the town goes on certifying under its own scheme until its staff end it (``valid_until``).
    None: nothing changes (a withdrawal where no scheme is recorded)."""
    if isinstance(event, PlanAdopted):
        return (current or MunicipalityRules(code)).with_plan(event.adopted_on, "planning")
    if current is None or current.legal_basis != "plan":
        return None
    return current.without_plan("planning")


def seed_schemes(
    adopted_plans: Mapping[str, date], programme_towns: Iterable[str]
) -> list[MunicipalityRules]:
    """The schemes of the reference data: every town with an adopted plan certifies on that basis;
    every other town of a travel programme certifies under a model project (default rules each)."""
    schemes = [
        MunicipalityRules(code, legal_basis="plan", plan_adopted_on=adopted_on)
        for code, adopted_on in adopted_plans.items()
    ]
    seen = set(adopted_plans)
    for code in programme_towns:
        if code not in seen:
            seen.add(code)
            schemes.append(MunicipalityRules(code, legal_basis="model_project"))
    return schemes


def known_municipality(code: str, field_name: str) -> Municipality:
    try:
        return municipality(code)
    except UnknownMunicipality:
        raise UnknownMunicipalityCode(f"{field_name}: no municipality has code {code!r}", field=field_name) from None


def plannable_municipality(code: str) -> Municipality:
    """A municipality that may adopt a 特定居住促進計画 (a path parameter: 404 if unknown)."""
    try:
        entry = municipality(code)
    except UnknownMunicipality:
        raise MunicipalityNotFound(f"no municipality has code {code!r}") from None
    if entry.is_prefecture:
        raise NotAMunicipality(f"{code} is {entry.name}, a prefecture; plans here are municipal")
    return entry


def same_municipality(a: str, b: str) -> bool:
    """Whether two codes name one municipality (a designated city's ward counts as its city)."""

    def city(code: str) -> str:
        try:
            return municipality(code).parent_code or code
        except UnknownMunicipality:
            return code

    return city(a) == city(b)


# --- partners ------------------------------------------------------------------------------------

_MEMBER_NUMBER_FORMATS: Mapping[str, tuple[re.Pattern[str], str]] = {
    "jal": (re.compile(r"[0-9]{9}|[0-9]{7}"), "a JAL Mileage Bank number is 9 digits (7 on older cards)"),
    "ana": (re.compile(r"[0-9]{10}"), "an ANA Mileage Club number is 10 digits"),
}
_OTHER_MEMBER_NUMBER = (re.compile(r"[0-9A-Za-z]{1,20}"), "a member number is 1 to 20 letters or digits")


def registered_format(member_number_format: str) -> tuple[re.Pattern[str], str]:
    """A registered partner's member-number format (validated by the gateway: anchored, bounded)."""
    return re.compile(member_number_format), f"a member number of this partner matches {member_number_format}"


def check_partners(
    partners: Sequence[PartnerMembership], registered: Mapping[str, tuple[re.Pattern[str], str]] | None = None
) -> None:
    """``registered``: partners registered through the gateway (``gateway.partners.v1``) → their
    member-number format; the partners are the seed (``PARTNER_CODES``) and these."""
    registered = registered or {}
    seen: set[str] = set()
    for index, membership in enumerate(partners):
        where = f"partners[{index}]"
        if membership.partner not in PARTNER_CODES and membership.partner not in registered:
            known = [*PARTNER_CODES, *sorted(registered)]
            raise UnknownPartner(
                f"{where}.partner: {membership.partner!r} is not one of {', '.join(known)}",
                field=f"{where}.partner",
            )
        if membership.partner in seen:
            raise DuplicatePartner(f"{where}.partner: {membership.partner} is listed twice", field=f"{where}.partner")
        seen.add(membership.partner)
        if membership.member_number is not None:
            pattern, expected = _MEMBER_NUMBER_FORMATS.get(membership.partner) or registered.get(
                membership.partner, _OTHER_MEMBER_NUMBER
            )
            if pattern.fullmatch(membership.member_number) is None:
                raise InvalidMemberNumber(
                    f"{where}.member_number: {expected}", field=f"{where}.member_number", partner=membership.partner
                )


def shared_partners(declared: Iterable[PartnerMembership], consented: frozenset[str]) -> list[PartnerMembership]:
    """The memberships a certificate event may carry: declared in the application AND consented now."""
    return [membership for membership in declared if membership.partner in consented]


def without_member_numbers(partners: Iterable[PartnerMembership]) -> list[PartnerMembership]:
    return [PartnerMembership(partner=membership.partner) for membership in partners]


# --- the resident projection ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Registration:
    """One furusato registration of a resident with one municipality, as the events tell it."""

    registration_id: str
    municipality_code: str
    tier: Tier
    status: RegistrationStatus
    premium_status: PremiumStatus | None = None
    valid_until: date | None = None

    def is_active(self, today: date) -> bool:
        return self.status == "active" and (self.valid_until is None or self.valid_until >= today)

    def is_active_premium(self, today: date) -> bool:
        return self.tier == "premium" and self.is_active(today)


@dataclass(frozen=True, slots=True)
class Resident:
    resident_id: str
    status: ResidentStatus
    legal_address_code: str | None
    registrations: tuple[Registration, ...] = ()
    consented_partners: frozenset[str] = frozenset()

    def satisfies(self, rules: MunicipalityRules, today: date) -> bool:
        """Whether the resident's registration with the municipality is what its rules require."""
        with_municipality = [r for r in self.registrations if r.municipality_code == rules.municipality_code]
        if rules.required_registration == "premium":
            return any(r.is_active_premium(today) for r in with_municipality)
        return any(r.is_active(today) for r in with_municipality)


def registration_registered(event: ResidentRegistered) -> Registration:
    premium: PremiumStatus | None = None
    if event.tier == "premium":
        premium = "approved" if event.status == "active" else "requested" if event.status == "pending_review" else None
    return Registration(event.registration_id, event.municipality_code, event.tier, event.status, premium)


def registration_after(
    current: Registration | None,
    event: PremiumRequested | PremiumApproved | PremiumRejected | PremiumExpired | RegistrationWithdrawn,
) -> Registration:
    """The registration after one of its later events (an unseen registration starts conservatively)."""
    base = current or Registration(event.registration_id, event.municipality_code, "premium", "pending_review")
    if isinstance(event, PremiumRequested):
        return replace(base, premium_status="requested")
    if isinstance(event, PremiumApproved):
        return replace(base, tier="premium", status="active", premium_status="approved", valid_until=event.valid_until)
    if isinstance(event, PremiumRejected):
        # A premium-only registration under review is rejected; a basic one asking to upgrade stays basic.
        status: RegistrationStatus = "rejected" if base.status == "pending_review" else base.status
        return replace(base, status=status, premium_status="rejected")
    if isinstance(event, PremiumExpired):
        # Conservative: an expired premium registration satisfies neither rule until an event says more.
        return replace(base, status="expired", premium_status="expired")
    return replace(base, status="withdrawn")


@dataclass(frozen=True, slots=True)
class ConsentUpdate:
    partner: str
    granted: bool
    at: datetime


def share_consents(items: Iterable[ConsentState | ConsentChanged]) -> list[ConsentUpdate]:
    """The per-partner share_certificate consents among consent facts (others are not ours)."""
    return [
        ConsentUpdate(item.partner, item.granted, item.at)
        for item in items
        if item.purpose == "share_certificate" and item.partner is not None
    ]


RegistrationChange = PremiumRequested | PremiumApproved | PremiumRejected | PremiumExpired | RegistrationWithdrawn
#: The events of ``registration.residents.v1`` that move the projection (withdrawal aside: it erases).
ProjectionEvent = ResidentRegistered | RegistrationChange | ConsentChanged


@dataclass(frozen=True, slots=True)
class ResidentRow:
    resident_id: str
    #: None: keep what the row holds (a resident first seen through a later event gets none).
    legal_address_code: str | None
    last_event_at: datetime


@dataclass(frozen=True, slots=True)
class RegistrationRow:
    resident_id: str
    registration: Registration
    last_event_at: datetime


@dataclass(frozen=True, slots=True)
class ConsentRow:
    resident_id: str
    consent: ConsentUpdate


@dataclass(slots=True)
class ProjectionChanges:
    """The rows a run of events leaves, one per key: each is what the last event touching it wrote."""

    residents: dict[str, ResidentRow] = field(default_factory=dict)
    registrations: dict[str, RegistrationRow] = field(default_factory=dict)
    consents: dict[tuple[str, str], ConsentRow] = field(default_factory=dict)

    def touch_resident(self, resident_id: str, at: datetime, legal_address_code: str | None = None) -> None:
        """Every event refreshes ``last_event_at``; only a registration carries the legal address."""
        previous = self.residents.get(resident_id)
        if legal_address_code is None and previous is not None:
            legal_address_code = previous.legal_address_code
        self.residents[resident_id] = ResidentRow(resident_id, legal_address_code, at)

    def save_registration(self, resident_id: str, registration: Registration, at: datetime) -> None:
        # A saved registration keeps the resident it was first saved under (as the upsert does).
        previous = self.registrations.get(registration.registration_id)
        owner = previous.resident_id if previous is not None else resident_id
        self.registrations[registration.registration_id] = RegistrationRow(owner, registration, at)

    def registration(self, registration_id: str) -> Registration | None:
        row = self.registrations.get(registration_id)
        return None if row is None else row.registration

    def set_consent(self, resident_id: str, consent: ConsentUpdate) -> None:
        """Last writer wins by the consent's own time, a tie by arrival (as ``share_consents`` does)."""
        key = (resident_id, consent.partner)
        previous = self.consents.get(key)
        if previous is None or previous.consent.at <= consent.at:
            self.consents[key] = ConsentRow(resident_id, consent)


def registrations_to_read(events: Iterable[ProjectionEvent]) -> list[str]:
    """The registrations whose stored state a run builds on: changed before the run itself saved them."""
    saved: set[str] = set()
    needed: list[str] = []
    for event in events:
        if isinstance(event, ConsentChanged):
            continue
        if isinstance(event, ResidentRegistered):
            saved.update(r.registration_id for r in event.registrations())
            continue
        if event.registration_id not in saved:
            needed.append(event.registration_id)
        saved.add(event.registration_id)
    return needed


def project_events(
    events: Iterable[tuple[ProjectionEvent, datetime]], stored: Mapping[str, Registration]
) -> ProjectionChanges:
    """Fold a run of events (of active residents, in order, each with its envelope time) into the
    rows applying them one by one would leave; ``stored``: the registrations the run builds on."""
    changes = ProjectionChanges()
    for event, at in events:
        if isinstance(event, ResidentRegistered):
            changes.touch_resident(event.resident_id, at, event.legal_address_code)
            for registered in event.registrations():  # with the prefecture's it brought
                changes.save_registration(event.resident_id, registration_registered(registered), at)
            for consent in share_consents(event.consents):
                changes.set_consent(event.resident_id, consent)
        elif isinstance(event, ConsentChanged):
            updates = share_consents([event])
            if updates:  # a consent of another purpose is not ours: it touches nothing
                changes.touch_resident(event.resident_id, at)
            for consent in updates:
                changes.set_consent(event.resident_id, consent)
        else:
            changes.touch_resident(event.resident_id, at)
            current = changes.registration(event.registration_id) or stored.get(event.registration_id)
            changes.save_registration(event.resident_id, registration_after(current, event), at)
    return changes


# --- applications --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApplicationRequest:
    municipality_code: str
    planned_stay_days: int
    housing_basis: HousingBasis
    address_there: str
    primary_residence_code: str
    partners: tuple[PartnerMembership, ...] = ()
    note: str | None = None


def check_request(
    request: ApplicationRequest, registered: Mapping[str, tuple[re.Pattern[str], str]] | None = None
) -> None:
    """What can be told from the request alone (and the registered partners' formats)."""
    applying = known_municipality(request.municipality_code, "municipality_code")
    residence = known_municipality(request.primary_residence_code, "primary_residence_code")
    for entry, name in ((applying, "municipality_code"), (residence, "primary_residence_code")):
        if entry.is_prefecture:
            raise NotAMunicipality(f"{name}: {entry.code} is {entry.name}, a prefecture", field=name)
    if same_municipality(applying.code, residence.code):
        raise PrimaryResidenceSameMunicipality(
            f"the primary residence {residence.full_name} is the municipality applied to",
            field="primary_residence_code",
        )
    if not 1 <= request.planned_stay_days <= MAX_STAY_DAYS:
        raise StayDaysOutOfRange(
            f"planned_stay_days is {request.planned_stay_days}; a year has 1 to {MAX_STAY_DAYS} days",
            field="planned_stay_days",
        )
    check_partners(request.partners, registered)


def scheme_in_force(code: str, rules: MunicipalityRules | None, today: date) -> MunicipalityRules:
    """The municipality's scheme, if it certifies today (whatever its legal basis)."""
    if rules is None:
        name = municipality(code).full_name
        raise NoCertificationScheme(
            f"{name} ({code}) has no certification scheme for dual residents", field="municipality_code"
        )
    if not rules.in_force_on(today):
        raise SchemeNotInForce(
            f"the certification scheme of {code} is in force from {rules.valid_from or 'its start'} "
            f"until {rules.valid_until or 'further notice'}; today is {today}",
            field="municipality_code",
        )
    return rules


def check_against_rules(
    request: ApplicationRequest, rules: MunicipalityRules | None, today: date
) -> MunicipalityRules:
    rules = scheme_in_force(request.municipality_code, rules, today)
    if request.planned_stay_days < rules.min_stay_days:
        raise StayBelowMinimum(
            f"planned_stay_days is {request.planned_stay_days}; the municipality requires at least "
            f"{rules.min_stay_days}", field="planned_stay_days", minimum=rules.min_stay_days,
        )
    if request.housing_basis not in rules.housing_bases:
        raise HousingBasisNotAccepted(
            f"housing_basis {request.housing_basis!r} is not accepted; accepted: {', '.join(rules.housing_bases)}",
            field="housing_basis", accepted=list(rules.housing_bases),
        )
    return rules


def check_applicant(
    request: ApplicationRequest, rules: MunicipalityRules, resident: Resident | None, today: date,
    *, retry_after_s: int,
) -> Resident:
    """What the resident projection must show before an application is accepted."""
    if resident is None or (resident.status != "withdrawn" and not resident.registrations):
        # Accepting it would mean deciding on facts we do not have; the registration event is
        # usually milliseconds away, so the client is told to retry. (A consent event can make the
        # resident known before any of their registrations is.)
        raise ResidentNotYetKnown(
            "no furusato registration of this resident has reached the certification service yet; retry shortly",
            retry_after=retry_after_s,
            headers={"Retry-After": str(retry_after_s)},
        )
    if resident.status == "withdrawn":
        raise ResidentWithdrawn("the resident has withdrawn from the platform")
    if resident.legal_address_code is not None and same_municipality(
        resident.legal_address_code, request.municipality_code
    ):
        raise PrimaryResidenceSameMunicipality(
            "the resident's registered legal address is in the municipality applied to",
            field="municipality_code",
        )
    if not resident.satisfies(rules, today):
        if rules.required_registration == "premium":
            raise PremiumRegistrationRequired(
                f"the municipality requires an active premium registration with {rules.municipality_code}"
            )
        raise RegistrationRequired(f"register with municipality {rules.municipality_code} first")
    for index, membership in enumerate(request.partners):
        if membership.partner not in resident.consented_partners:
            raise PartnerConsentMissing(
                f"partners[{index}]: grant the share_certificate consent for {membership.partner} first",
                field=f"partners[{index}].partner", partner=membership.partner,
            )
    return resident


def check_still_eligible(rules: MunicipalityRules, resident: Resident | None, today: date) -> Resident:
    """Before approving or renewing: the facts the application relied on still hold."""
    if resident is None or resident.status == "withdrawn":
        raise ResidentWithdrawn("the resident has withdrawn from the platform")
    if not resident.satisfies(rules, today):
        raise RegistrationNoLongerActive(
            f"the resident no longer has the registration with {rules.municipality_code} the rules require"
        )
    return resident


@dataclass(frozen=True, slots=True)
class Application:
    application_id: str
    resident_id: str
    municipality_code: str
    primary_residence_code: str
    planned_stay_days: int
    housing_basis: HousingBasis
    address_there: str | None
    partners: tuple[PartnerMembership, ...]
    note: str | None
    status: ApplicationStatus
    submitted_at: datetime
    decided_at: datetime | None = None
    decided_by: str | None = None
    decision_reason: str | None = None
    certificate_number: str | None = None

    @classmethod
    def submit(cls, resident_id: str, request: ApplicationRequest, at: datetime) -> Application:
        return cls(
            application_id=str(uuid.uuid4()), resident_id=resident_id,
            municipality_code=request.municipality_code, primary_residence_code=request.primary_residence_code,
            planned_stay_days=request.planned_stay_days, housing_basis=request.housing_basis,
            address_there=request.address_there, partners=request.partners, note=request.note,
            status="submitted", submitted_at=at,
        )

    def _ensure_open(self) -> None:
        if self.status != "submitted":
            raise ApplicationAlreadyDecided(
                f"application {self.application_id} is {self.status} already", current_status=self.status
            )

    def approve(self, *, by: str, at: datetime, certificate_number: str) -> Application:
        self._ensure_open()
        return replace(self, status="approved", decided_at=at, decided_by=by, certificate_number=certificate_number)

    def approval(self, *, by: str, at: datetime, year: int, valid_from: date, valid_until: date) -> Approval:
        """Decide to approve; the certificate number is taken afterwards, when the approval is recorded."""
        self._ensure_open()
        return Approval(self, by=by, at=at, year=year, valid_from=valid_from, valid_until=valid_until)

    def reject(self, *, by: str, at: datetime, reason: RejectionReason) -> Application:
        """``reason``: a code of the published list; a staff note stays in the audit trail."""
        self._ensure_open()
        return replace(self, status="rejected", decided_at=at, decided_by=by, decision_reason=reason)


# --- certificates --------------------------------------------------------------------------------


def validity_period(
    rules: MunicipalityRules, today: date, valid_from: date | None, valid_until: date | None
) -> tuple[date, date]:
    """The certificate's validity (inclusive): from today for the municipality's validity by default.

    Staff may choose the dates within the rules: valid_from from ``MAX_BACKDATED_DAYS`` before
    today to ``MAX_DEFERRED_DAYS`` after it, valid_until at most the municipality's validity
    (``validity_days``, counted inclusively) from valid_from: every certificate year is a year of
    travel support reserved from the budget, so a longer validity is not a clerical choice."""
    start = valid_from or today
    longest = start + timedelta(days=rules.validity_days - 1)
    end = valid_until or longest
    if end < start:
        raise InvalidValidityPeriod(f"valid_until {end} precedes valid_from {start}", field="valid_until")
    if end < today:
        raise ValidityEndsInPast(f"valid_until {end} is before today ({today}, Japan time)", field="valid_until")
    earliest, latest = today - timedelta(days=MAX_BACKDATED_DAYS), today + timedelta(days=MAX_DEFERRED_DAYS)
    if start < earliest:
        raise ValidFromTooEarly(
            f"valid_from {start} is more than {MAX_BACKDATED_DAYS} days before today ({today}, Japan time)",
            field="valid_from", earliest=earliest.isoformat(),
        )
    if start > latest:
        raise ValidFromTooLate(
            f"valid_from {start} is more than {MAX_DEFERRED_DAYS} days after today ({today}, Japan time)",
            field="valid_from", latest=latest.isoformat(),
        )
    if end > longest:
        raise ValidityExceedsRules(
            f"valid_until {end} is beyond {longest}: the municipality's validity is {rules.validity_days} days "
            f"from valid_from {start}", field="valid_until", latest=longest.isoformat(),
            validity_days=rules.validity_days,
        )
    return start, end


@dataclass(frozen=True, slots=True)
class Approval:
    """An approval decided in full but for its number (``shared.contracts.formats.CertificateNumber``:
    ``NCH-<code6>-<year>-<sequence>``), whose sequence the store takes in the statement that records
    the approval (the counter row of the municipality's year stays locked from then until commit, so
    it is taken as late as possible)."""

    application: Application
    by: str
    at: datetime
    year: int
    valid_from: date
    valid_until: date

    def numbered(self, number: str) -> tuple[Application, Certificate]:
        """The approved application and its certificate, as recorded under ``number``."""
        approved = self.application.approve(by=self.by, at=self.at, certificate_number=number)
        certificate = Certificate.issue(
            approved, number=number, valid_from=self.valid_from, valid_until=self.valid_until, by=self.by, at=self.at
        )
        return approved, certificate


@dataclass(frozen=True, slots=True)
class Certificate:
    certificate_number: str
    municipality_code: str
    resident_id: str
    application_id: str
    valid_from: date
    valid_until: date
    status: CertificateStatus
    partners: tuple[PartnerMembership, ...]
    issued_at: datetime
    issued_by: str
    renewed_at: datetime | None = None
    revoked_at: datetime | None = None
    revocation_reason: str | None = None

    @classmethod
    def issue(
        cls, application: Application, *, number: str, valid_from: date, valid_until: date, by: str, at: datetime
    ) -> Certificate:
        return cls(
            certificate_number=number, municipality_code=application.municipality_code,
            resident_id=application.resident_id, application_id=application.application_id,
            valid_from=valid_from, valid_until=valid_until, status="valid", partners=application.partners,
            issued_at=at, issued_by=by,
        )

    def is_expired(self, today: date) -> bool:
        return self.status == "expired" or (self.status == "valid" and today > self.valid_until)

    def renew(
        self, *, today: date, validity_days: int, valid_until: date | None, at: datetime
    ) -> Certificate:
        """Extend the validity under the same number; valid_from stays, so coverage never lapses.

        A renewal adds at most one validity period, starting the day after the current valid_until,
        and only while the current validity ends within one period from today: renewals cannot be
        stacked into years of coverage (and of reserved travel support) ahead."""
        if self.status != "valid" or self.is_expired(today):
            state = "expired" if self.is_expired(today) else self.status
            raise CertificateNotRenewable(f"certificate {self.certificate_number} is {state}", current_status=state)
        renewable_from = self.valid_until - timedelta(days=validity_days - 1)
        if today < renewable_from:
            raise RenewalTooEarly(
                f"certificate {self.certificate_number} is valid until {self.valid_until}; it can be renewed "
                f"from {renewable_from}", renewable_from=renewable_from.isoformat(),
            )
        longest = self.valid_until + timedelta(days=validity_days)
        new_until = valid_until or longest
        if new_until <= self.valid_until:
            raise RenewalMustExtend(
                f"valid_until {new_until} does not extend the current {self.valid_until}", field="valid_until"
            )
        if new_until > longest:
            raise ValidityExceedsRules(
                f"valid_until {new_until} is beyond {longest}: a renewal adds at most the municipality's validity "
                f"of {validity_days} days after the current {self.valid_until}", field="valid_until",
                latest=longest.isoformat(), validity_days=validity_days,
            )
        return replace(self, valid_until=new_until, renewed_at=at)

    def revoke(self, *, today: date, reason: RevocationReason, at: datetime) -> Certificate:
        """``reason``: a code of the published list; a staff note stays in the audit trail."""
        if self.status == "revoked":
            raise CertificateAlreadyRevoked(f"certificate {self.certificate_number} is revoked already")
        if self.is_expired(today):
            raise CertificateExpired(f"certificate {self.certificate_number} expired after {self.valid_until}")
        return replace(self, status="revoked", revoked_at=at, revocation_reason=reason)

    def revoke_on_withdrawal(self, at: datetime) -> Certificate:
        """The resident withdrew: whatever is still valid ends, with their member numbers."""
        return replace(
            self, status="revoked", revoked_at=at, revocation_reason=WITHDRAWAL_REASON,
            partners=tuple(without_member_numbers(self.partners)),
        )


def expiring_window(today: date) -> tuple[date, date]:
    """Certificates with valid_until in this inclusive window get their expiring notice now."""
    return today, today + timedelta(days=EXPIRING_NOTICE_DAYS)


def days_left(valid_until: date, today: date) -> int:
    return (valid_until - today).days


def expired_on(valid_until: date) -> date:
    """A certificate expires on the day after its last valid day (Japan time)."""
    return valid_until + timedelta(days=1)


# --- audit trail ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditEntry:
    actor: str
    actor_role: str
    municipality_code: str
    action: str
    target_type: Literal["application", "certificate", "municipality"]
    target_id: str
    at: datetime
    reason: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    #: The staff member's own words: kept apart from the entry (``audit_notes``), so the entry stays
    #: append-only while the note is erased with the resident it may be about.
    note: str | None = None
