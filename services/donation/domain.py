"""Rules of donations, receipts, the one-stop exception and the fund ledger (pure Python, no I/O).

Every rule a caller can break is one ``DomainError`` subclass with its problem ``code``. The
handlers load facts, ask these functions what to do, then store and emit what they decided. The
service's concepts are plain dataclasses here; the domain knows no HTTP request model and no
caller (who may act is the handlers' check), and reads no clock: dates and instants are passed in.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from datetime import date, datetime
from typing import Literal

from shared.contracts.donation import DonationKind, DonationUnit, Earmark
from shared.contracts.formats import ProgramId, ProgramIdError
from shared.kit.errors import Conflict, DomainError, NotFound
from shared.reference import (
    Municipality,
    NotDesignatedPeriod,
    RevitalisationPlan,
    UnknownMunicipality,
    UnknownRevitalisationPlan,
    allocation_tax_non_recipient,
    municipality,
    not_designated_on,
    revitalisation_plan,
    travel_program,
    travel_programs,
)
from shared.reference import UnknownTravelProgram as UnknownTravelProgramId

#: 企業版ふるさと納税: the smallest corporate donation.
CORPORATE_MINIMUM_JPY = 100_000
#: One-stop exception: at most this many distinct municipalities in a calendar year.
ONE_STOP_MUNICIPALITY_LIMIT = 5
#: Receipt numbers: municipality code, calendar year, sequence (6 digits, wider past 999,999).
RECEIPT_NUMBER = re.compile(r"[0-9]{6}-[0-9]{4}-[0-9]{6,}")

DonorType = Literal["individual", "company"]
LedgerEntryKind = Literal["donation", "refund", "transfer", "transfer_reversal"]
ApplicationStatus = Literal["valid", "void", "late"]
ReceiptStatus = Literal["issued", "cancelled"]


# ---------------------------------------------------------------------------- errors


class NonPositiveAmount(DomainError):
    code = "amount-not-positive"
    title = "The amount must be a positive integer"


class CorporateDonationBelowMinimum(DomainError):
    code = "corporate-donation-below-minimum"
    title = "A corporate donation is at least ¥100,000"


class CorporateDonationToHeadOffice(DomainError):
    code = "corporate-donation-to-head-office"
    title = "A company may not give a corporate donation to the local government of its head office"


class CorporatePlanRequired(DomainError):
    code = "corporate-plan-required"
    title = "A corporate donation names the certified regional revitalisation plan (地域再生計画) it funds"


class CorporateRecipientExcluded(DomainError):
    code = "corporate-recipient-excluded"
    title = (
        "This local government cannot receive corporate donations in the fiscal year: 東京都, or a local "
        "government of the metropolitan areas that receives no local allocation tax"
    )


class UnknownRevitalisationPlanId(DomainError):
    code = "unknown-revitalisation-plan"
    title = "The municipality has no certified regional revitalisation plan with this id"


class RevitalisationPlanNotCertified(DomainError):
    code = "revitalisation-plan-not-certified"
    title = "The regional revitalisation plan is not certified for the fiscal year of the payment"


class RevitalisationPlanNotApplicable(DomainError):
    code = "revitalisation-plan-not-applicable"
    title = "Only a corporate donation names a regional revitalisation plan"


class MunicipalityNotDesignated(DomainError):
    code = "municipality-not-designated"
    title = (
        "The municipality was not designated for ふるさと納税 on the payment date: the donation has no special "
        "deduction and no one-stop exception"
    )


class UnknownMunicipalityCode(DomainError):
    code = "unknown-municipality"
    title = "No municipality has this code"


class NotADonationRecipient(DomainError):
    code = "not-a-donation-recipient"
    title = "This code is not a local government that can receive donations"


class PaymentDateInFuture(DomainError):
    code = "payment-date-in-future"
    title = "The payment date is after today (Japan time)"


class PaymentReferenceConflict(Conflict):
    code = "payment-reference-conflict"
    title = "This payment reference was confirmed with different content"


class DonorRequired(DomainError):
    code = "donor-required"
    title = "Name the donor: either donor details or donor_id, not both"


class DonorKindMismatch(DomainError):
    code = "donor-kind-mismatch"
    title = "Corporate donations come from companies; hometown-tax and mile donations from individuals"


class UnknownDonor(DomainError):
    code = "unknown-donor"
    title = "No donor has this id"


class NoMileProgram(DomainError):
    code = "no-mile-program"
    title = "The municipality runs no mileage program that could use donated miles"


class MilesMustFundProgram(DomainError):
    code = "miles-must-fund-program"
    title = "Donated miles are always earmarked for the dual-residence program"


class UnknownProgram(DomainError):
    code = "unknown-program"
    title = "The municipality runs no such program"


class ProgramRequiresDualResidenceEarmark(DomainError):
    code = "program-requires-dual-residence-earmark"
    title = "A donation naming a program is earmarked for dual residence"




class AlreadyRefunded(Conflict):
    code = "already-refunded"
    title = "The donation was already refunded"


class ReceiptCancelled(Conflict):
    code = "receipt-cancelled"
    title = "The receipt was cancelled (the donation was refunded)"


class OneStopNotApplicable(DomainError):
    code = "one-stop-not-applicable"
    title = "The one-stop exception applies to individuals' hometown-tax donations only"


class OneStopApplicationExists(Conflict):
    code = "one-stop-application-exists"
    title = "A one-stop application was already received for this donation"


class DonationRefunded(Conflict):
    code = "donation-refunded"
    title = "The donation was refunded"


class ReceivedDateInFuture(DomainError):
    code = "received-date-in-future"
    title = "The application cannot be received after today (Japan time)"


class ReceivedBeforePayment(DomainError):
    code = "received-before-payment"
    title = "The application cannot be received before the donation was paid"


class DonorErased(DomainError):
    code = "donor-erased"
    status = 410
    title = "The donor's data was erased: the donor is not contacted and nothing is issued to them again"


class DonorIsACompany(Conflict):
    code = "donor-is-a-company"
    title = "Erasure on request is for persons; a company's donor record is not personal data"


class DonationNotFound(NotFound):
    code = "donation-not-found"


class DonorNotFound(NotFound):
    code = "donor-not-found"


class ReceiptNotFound(NotFound):
    code = "receipt-not-found"


class MunicipalityNotFound(NotFound):
    code = "municipality-not-found"


class OneStopApplicationNotFound(NotFound):
    code = "one-stop-application-not-found"


# ---------------------------------------------------------------------------- municipalities


def recipient(code: str) -> Municipality:
    """The local government a donation goes to: a prefecture, city, town, village or Tokyo ward."""
    try:
        found = municipality(code)
    except UnknownMunicipality:
        raise UnknownMunicipalityCode(f"unknown municipality code {code!r}", municipality_code=code) from None
    if found.kind == "designated_ward" or found.northern_territories:
        raise NotADonationRecipient(
            f"{found.full_name} ({code}) does not receive donations"
            + (f"; give to the city {found.parent_code}" if found.parent_code else ""),
            municipality_code=code,
        )
    return found


def known_municipality(code: str) -> Municipality:
    """A municipality named in a path (404 when unknown)."""
    try:
        return municipality(code)
    except UnknownMunicipality:
        raise MunicipalityNotFound(f"unknown municipality code {code!r}") from None


def head_office_governments(head_office_code: str) -> frozenset[str]:
    """The local governments of a head office: its municipality (a ward's city) and its prefecture."""
    head = municipality(head_office_code)
    return frozenset({head.code, head.parent_code or head.code, head.prefecture_code})


def issuer_title(recipient: Municipality) -> str:
    """Who signs a receipt: 知事 of a prefecture, 長 of a city, town, village or ward."""
    return f"{recipient.name}知事" if recipient.is_prefecture else f"{recipient.name}長"


def fiscal_year(day: date) -> int:
    """The Japanese fiscal year (April to March) a date belongs to: 2026-03-31 is in 2025."""
    return day.year if day.month >= 4 else day.year - 1


# ---------------------------------------------------------------------------- designation (指定制度)
#
# Since 2019-06-01 only local governments the Minister of Internal Affairs designates receive
# ふるさと納税 with the special deduction (地方税法 第37条の2 第2項, 第314条の7 第2項) and the one-stop
# exception. The reference data lists the periods a government was NOT designated (東京都 never
# applied; others were refused or revoked); a government not listed on the payment date is
# designated. A payment to one that is not is still money received: it is recorded and receipted
# as an ordinary donation (the income-tax and basic resident-tax deduction still apply to a gift
# to a local government), but never promises the special deduction, takes no one-stop request or
# application and does not count towards the one-stop limit of five.


def not_designated(target: Municipality, payment_date: date) -> NotDesignatedPeriod | None:
    """The period of non-designation covering the payment date, if any."""
    return not_designated_on(target.code, payment_date)


def _not_designated_error(target: Municipality, period: NotDesignatedPeriod, what: str) -> MunicipalityNotDesignated:
    until = f" until {period.end.isoformat()}" if period.end else ""
    return MunicipalityNotDesignated(
        f"{target.full_name} was not designated for ふるさと納税 from {period.start.isoformat()}{until} "
        f"({period.reason}): {what}",
        municipality_code=target.code, not_designated_from=period.start.isoformat(),
        not_designated_until=period.end.isoformat() if period.end else None,
    )


# ---------------------------------------------------------------------------- corporate (企業版)


def check_corporate_recipient(target: Municipality, year: int) -> None:
    """東京都, and in the three metropolitan areas a local government that receives no local
    allocation tax (不交付団体) whose whole area lies in their zones, receive no corporate donation."""
    entry = allocation_tax_non_recipient(target.code, year)
    if entry is None:
        return
    if target.is_prefecture:
        raise CorporateRecipientExcluded(
            f"{target.full_name} receives no local allocation tax: it cannot receive corporate donations",
            municipality_code=target.code, fiscal_year=year, reason="non-recipient-prefecture",
        )
    if entry.metropolitan_zone == "whole":
        raise CorporateRecipientExcluded(
            f"{target.full_name} receives no local allocation tax in fiscal year {year} and lies in a metropolitan "
            "area's zone: it cannot receive corporate donations",
            municipality_code=target.code, fiscal_year=year, reason="metropolitan-non-recipient",
        )


def certified_plan(plan_id: str | None, target: Municipality, payment_date: date) -> RevitalisationPlan:
    """The certified 地域再生計画 of the recipient a corporate donation funds, certified on the payment date."""
    if plan_id is None:
        raise CorporatePlanRequired("name the certified regional revitalisation plan: revitalisation_plan_id")
    try:
        plan = revitalisation_plan(plan_id)
    except UnknownRevitalisationPlan:
        unknown = UnknownRevitalisationPlanId(f"unknown regional revitalisation plan {plan_id!r}", plan_id=plan_id)
        raise unknown from None
    if plan.municipality_code != target.code:
        raise UnknownRevitalisationPlanId(f"{plan_id} is not a plan of {target.full_name}", plan_id=plan_id)
    year = fiscal_year(payment_date)
    if payment_date < plan.certified_on or year < plan.from_fiscal_year or (
        plan.until_fiscal_year is not None and year > plan.until_fiscal_year
    ):
        until = plan.until_fiscal_year if plan.until_fiscal_year is not None else ""
        raise RevitalisationPlanNotCertified(
            f"{plan.name} ({plan_id}) was certified on {plan.certified_on.isoformat()} for fiscal years "
            f"{plan.from_fiscal_year}–{until}; the payment on {payment_date.isoformat()} is in fiscal year {year}",
            plan_id=plan_id, fiscal_year=year,
        )
    return plan


# ---------------------------------------------------------------------------- donors


@dataclass(frozen=True, slots=True)
class PersonDetails:
    """A person giving a hometown-tax or mile donation, as the payment notification names them."""

    name: str
    address: str
    #: Set when the donor is a registered resident of the platform (their resident id).
    resident_id: str | None = None
    email: str | None = None
    type: Literal["individual"] = "individual"

    def unlinked(self) -> PersonDetails:
        """The details without the resident link and the e-mail: for a resident who was erased, whose
        money is still recorded (with what its receipt must show), but never linked or written to."""
        return replace(self, resident_id=None, email=None)


@dataclass(frozen=True, slots=True)
class CompanyDetails:
    """A company giving a corporate (企業版) donation."""

    name: str
    #: The municipality code of the company's head office (本社所在地).
    head_office_code: str
    address: str | None = None
    #: 法人番号 (13 digits, public); the company's identity when given.
    corporate_number: str | None = None
    email: str | None = None
    type: Literal["company"] = "company"


DonorDetails = PersonDetails | CompanyDetails

#: The details' fields in order: ``content_hash`` reads them as ``dataclasses.asdict`` would, without
#: its recursive copy on every confirmation (the details hold only str and None).
_DETAIL_FIELDS = {kind: tuple(f.name for f in fields(kind)) for kind in (PersonDetails, CompanyDetails)}


def _details_dict(details: DonorDetails) -> dict[str, str | None]:
    return {name: getattr(details, name) for name in _DETAIL_FIELDS[type(details)]}


@dataclass(frozen=True, slots=True)
class DonorFacts:
    """What the donation rules need to know about a donor."""

    type: DonorType
    head_office_code: str | None = None


@dataclass(frozen=True, slots=True)
class NewDonor:
    """A donor record to find by ``donor_key`` or create (the latest details win)."""

    id: uuid.UUID
    donor_key: str
    type: DonorType
    name: str
    address: str | None
    resident_id: str | None
    email: str | None
    head_office_code: str | None
    corporate_number: str | None
    at: datetime


@dataclass(frozen=True, slots=True)
class Donor:
    id: uuid.UUID
    type: DonorType
    name: str
    address: str | None
    resident_id: str | None
    email: str | None
    head_office_code: str | None
    corporate_number: str | None
    created_at: datetime
    #: When the donor was erased (their resident withdrew, or they asked): no further use.
    erased_at: datetime | None = None

    @property
    def erased(self) -> bool:
        return self.erased_at is not None

    @property
    def facts(self) -> DonorFacts:
        return DonorFacts(self.type, self.head_office_code)

    @property
    def receipt_address(self) -> str:
        """The address a receipt shows: the donor's, or a company's head-office municipality."""
        if self.address:
            return self.address
        if self.type == "company" and self.head_office_code:
            return municipality(self.head_office_code).full_name
        return ""

    def check_usable(self) -> None:
        """An erased donor is named by no new donation (the provider sends the donor's details)."""
        if self.erased_at is not None:
            raise DonorErased(f"donor {self.id} was erased; send the donor's details instead of donor_id")

    def check_erasable(self) -> None:
        if self.type == "company":
            raise DonorIsACompany(f"donor {self.id} is a company")


_WHITESPACE = re.compile(r"\s+")


def _normalised(text: str) -> str:
    """NFKC, no whitespace: ``"山田　太郎"`` and ``"山田太郎"`` are one name, ``"１－２"`` is ``"1-2"``."""
    # Compiled once: ``re.sub`` looks its pattern up in re's cache on every call (twice a confirmation).
    return _WHITESPACE.sub("", unicodedata.normalize("NFKC", text)).lower()


def donor_key(details: DonorDetails) -> str:
    """The identity a payment notification's donor is matched on (one donor record per identity)."""
    if isinstance(details, PersonDetails):
        if details.resident_id is not None:
            return f"resident:{details.resident_id}"
        return f"individual:{_normalised(details.name)}|{_normalised(details.address)}"
    if details.corporate_number is not None:
        return f"company:{details.corporate_number}"
    return f"company:{details.head_office_code}|{_normalised(details.name)}"


def check_donor_details(details: DonorDetails) -> DonorFacts:
    if isinstance(details, CompanyDetails):
        try:
            municipality(details.head_office_code)
        except UnknownMunicipality:
            raise UnknownMunicipalityCode(
                f"unknown head-office municipality code {details.head_office_code!r}",
                municipality_code=details.head_office_code,
            ) from None
        return DonorFacts("company", details.head_office_code)
    return DonorFacts("individual")


def new_donor(details: DonorDetails, donor_id: uuid.UUID, at: datetime) -> NewDonor:
    """The donor record the details stand for (checked: a company's head office exists)."""
    check_donor_details(details)
    if isinstance(details, PersonDetails):
        return NewDonor(
            id=donor_id, donor_key=donor_key(details), type="individual", name=details.name,
            address=details.address, resident_id=details.resident_id, email=details.email,
            head_office_code=None, corporate_number=None, at=at,
        )
    return NewDonor(
        id=donor_id, donor_key=donor_key(details), type="company", name=details.name, address=details.address,
        resident_id=None, email=details.email, head_office_code=details.head_office_code,
        corporate_number=details.corporate_number, at=at,
    )


# ---------------------------------------------------------------------------- donations


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    entry: LedgerEntryKind
    amount: int


@dataclass(frozen=True, slots=True)
class PaymentConfirmation:
    """A payment the payment provider confirmed: recorded once per payment reference."""

    payment_reference: str
    municipality_code: str
    kind: DonationKind
    #: Yen, or miles for a mile donation.
    amount: int
    payment_date: date
    #: Defaults to ``general`` for money and ``dual_residence`` for miles or a named program.
    earmark: Earmark | None = None
    program_id: str | None = None
    #: The project of a corporate donation, as the company names it (free text, optional).
    project: str | None = None
    #: The donor's details (found or created by identity) or the id of a donor on file: one of them.
    donor: DonorDetails | None = None
    donor_id: uuid.UUID | None = None
    one_stop_requested: bool = False
    #: The certified 地域再生計画 a corporate donation funds (required for corporate, refused otherwise).
    revitalisation_plan_id: str | None = None

    def content_hash(self) -> str:
        """What a repeated notification of the payment is compared on: the whole content.

        Hashed as the JSON of the request (sorted keys, dates ISO, ids as text): the same value the
        rows recorded before this class existed carry, so their re-notifications still match."""
        body = {
            "payment_reference": self.payment_reference, "municipality_code": self.municipality_code,
            "kind": self.kind, "amount": self.amount, "earmark": self.earmark, "program_id": self.program_id,
            "project": self.project, "payment_date": self.payment_date.isoformat(),
            "donor": None if self.donor is None else _details_dict(self.donor),
            "donor_id": None if self.donor_id is None else str(self.donor_id),
            "one_stop_requested": self.one_stop_requested,
        }
        if self.revitalisation_plan_id is not None:  # absent before plans were named: old hashes unchanged
            body["revitalisation_plan_id"] = self.revitalisation_plan_id
        return hashlib.sha256(_HASHED_JSON.encode(body).encode()).hexdigest()


#: ``json.dumps(body, sort_keys=True, ensure_ascii=False)``'s encoder (the same text), made once
#: rather than on every confirmation.
_HASHED_JSON = json.JSONEncoder(sort_keys=True, ensure_ascii=False)


def check_one_donor(confirmation: PaymentConfirmation) -> None:
    if (confirmation.donor is None) == (confirmation.donor_id is None):
        raise DonorRequired("send either donor details or donor_id")


@dataclass(frozen=True, slots=True)
class DonationPlan:
    """What recording one confirmed payment means."""

    municipality: Municipality
    kind: DonationKind
    unit: DonationUnit
    earmark: Earmark
    calendar_year: int
    #: A money donation gets the next receipt number of its municipality and year.
    issues_receipt: bool
    #: Individuals' hometown-tax donations to a designated municipality count towards the one-stop limit.
    counts_for_one_stop: bool
    ledger: tuple[LedgerEntry, ...]
    #: A hometown-tax donation to a municipality designated on the payment date: the receipt may
    #: serve the special deduction (特例控除) and the one-stop exception. False for every other donation.
    special_deduction: bool = False
    #: The certified plan a corporate donation funds.
    revitalisation_plan: RevitalisationPlan | None = None


def plan_donation(confirmation: PaymentConfirmation, donor: DonorFacts, today: date) -> DonationPlan:
    """Check a payment confirmation against every rule and say how to record it."""
    target = recipient(confirmation.municipality_code)
    kind = confirmation.kind
    amount = confirmation.amount
    if amount <= 0:
        raise NonPositiveAmount(f"amount {amount} is not positive")
    if confirmation.payment_date > today:
        raise PaymentDateInFuture(
            f"payment date {confirmation.payment_date} is after today ({today}, Japan time)"
        )
    if kind == "corporate":
        if donor.type != "company" or donor.head_office_code is None:
            raise DonorKindMismatch("a corporate donation comes from a company donor")
        if amount < CORPORATE_MINIMUM_JPY:
            raise CorporateDonationBelowMinimum(f"¥{amount:,} is below ¥{CORPORATE_MINIMUM_JPY:,}")
        if target.code in head_office_governments(donor.head_office_code):
            raise CorporateDonationToHeadOffice(
                f"{target.full_name} is the local government of the company's head office "
                f"({donor.head_office_code})"
            )
        check_corporate_recipient(target, fiscal_year(confirmation.payment_date))
        plan = certified_plan(confirmation.revitalisation_plan_id, target, confirmation.payment_date)
    else:
        if donor.type != "individual":
            raise DonorKindMismatch(f"a {kind} donation comes from an individual donor")
        if confirmation.revitalisation_plan_id is not None:
            raise RevitalisationPlanNotApplicable(f"a {kind} donation names no regional revitalisation plan")
        plan = None
    if confirmation.one_stop_requested and kind != "hometown_tax":
        raise OneStopNotApplicable(f"a {kind} donation has no one-stop exception")
    excluded = not_designated(target, confirmation.payment_date) if kind == "hometown_tax" else None
    if excluded is not None and confirmation.one_stop_requested:
        raise _not_designated_error(target, excluded, "a one-stop request cannot be taken")
    special_deduction = kind == "hometown_tax" and excluded is None

    unit: DonationUnit = "miles" if kind == "miles" else "jpy"
    names_program = confirmation.program_id is not None
    earmark: Earmark = confirmation.earmark or ("dual_residence" if kind == "miles" or names_program else "general")
    if kind == "miles":
        if earmark != "dual_residence":
            raise MilesMustFundProgram("donated miles fund the municipality's dual-residence program")
        if not any(
            p.mechanism == "mileage_grant" and target.code in p.municipality_codes for p in travel_programs()
        ):
            raise NoMileProgram(f"{target.full_name} runs no mileage program")
    if confirmation.program_id is not None:
        _check_program(confirmation.program_id, target, unit)
        if earmark != "dual_residence":
            raise ProgramRequiresDualResidenceEarmark("a donation to a program is earmarked dual_residence")

    ledger = [LedgerEntry("donation", amount)]
    if earmark == "dual_residence":
        # Earmarked money and miles go on to the program budget (the subsidy service raises it
        # on donation.received): the fund records the transfer in the same transaction.
        ledger.append(LedgerEntry("transfer", -amount))
    return DonationPlan(
        municipality=target,
        kind=kind,
        unit=unit,
        earmark=earmark,
        calendar_year=confirmation.payment_date.year,
        issues_receipt=unit == "jpy",
        counts_for_one_stop=special_deduction,
        ledger=tuple(ledger),
        special_deduction=special_deduction,
        revitalisation_plan=plan,
    )


def _check_program(program_id: str, target: Municipality, unit: DonationUnit) -> None:
    """A travel program of the municipality: its reference id, or the subsidy service's
    ``<reference id>@<municipality code>`` (that program's budget in one municipality)."""
    try:
        named = ProgramId.named(program_id, target.code)
    except ProgramIdError:
        raise UnknownProgram(f"unknown program {program_id!r}") from None
    if named.municipality_code != target.code:
        raise UnknownProgram(f"{program_id} is not a program of {target.full_name}")
    try:
        program = travel_program(named.reference)
    except UnknownTravelProgramId:
        raise UnknownProgram(f"unknown program {program_id!r}") from None
    if target.code not in program.municipality_codes:
        raise UnknownProgram(f"{target.full_name} does not take part in {program_id}")
    if unit == "miles" and program.mechanism != "mileage_grant":
        raise UnknownProgram(f"{program_id} does not use miles")


def refund_entries(entries: Iterable[LedgerEntry]) -> tuple[LedgerEntry, ...]:
    """The rows that cancel a donation's ledger rows: its refund, and the transfer given back."""
    reversal: dict[LedgerEntryKind, LedgerEntryKind] = {"donation": "refund", "transfer": "transfer_reversal"}
    return tuple(LedgerEntry(reversal[e.entry], -e.amount) for e in entries if e.entry in reversal)


@dataclass(frozen=True, slots=True)
class NewDonation:
    """Everything one statement records for a confirmed payment (named as the store binds it)."""

    id: uuid.UUID
    payment_reference: str
    request_hash: str
    municipality_code: str
    donor_id: uuid.UUID
    kind: DonationKind
    unit: DonationUnit
    amount: int
    earmark: Earmark
    program_id: str | None
    project: str | None
    payment_date: date
    calendar_year: int
    one_stop_requested: bool
    received_at: datetime
    #: What the receipt shows of the donor, frozen now.
    donor_name: str
    donor_address: str
    issues_receipt: bool
    counts_for_one_stop: bool
    ledger: tuple[LedgerEntry, ...]
    special_deduction: bool = False
    revitalisation_plan_id: str | None = None
    #: A person to find by identity or create in the same statement: the record on file, if any,
    #: is the donor (its id, and its name and address on the receipt), not these details.
    new_donor: NewDonor | None = None


def new_donation(
    confirmation: PaymentConfirmation, plan: DonationPlan, donor: Donor | NewDonor, donation_id: uuid.UUID,
    at: datetime,
) -> NewDonation:
    """The donation to record. A ``NewDonor`` (a person only) is found or created with it: the
    donor's fields here are then the notification's: the donor recorded is the one the statement
    found or created (``Donation.recorded`` takes it from there)."""
    if isinstance(donor, NewDonor):
        if donor.type != "individual":  # a company's receipt address needs the one on file: found first
            raise ValueError("only a person is found or created with the donation")
        donor_address, new_donor = donor.address or "", donor
    else:
        donor_address, new_donor = donor.receipt_address, None
    return NewDonation(
        id=donation_id, payment_reference=confirmation.payment_reference, request_hash=confirmation.content_hash(),
        municipality_code=plan.municipality.code, donor_id=donor.id, kind=plan.kind, unit=plan.unit,
        amount=confirmation.amount, earmark=plan.earmark, program_id=confirmation.program_id,
        project=confirmation.project, payment_date=confirmation.payment_date, calendar_year=plan.calendar_year,
        one_stop_requested=confirmation.one_stop_requested, received_at=at, donor_name=donor.name,
        donor_address=donor_address, issues_receipt=plan.issues_receipt,
        counts_for_one_stop=plan.counts_for_one_stop, ledger=plan.ledger, special_deduction=plan.special_deduction,
        revitalisation_plan_id=plan.revitalisation_plan.plan_id if plan.revitalisation_plan else None,
        new_donor=new_donor,
    )


@dataclass(frozen=True, slots=True)
class Donation:
    id: uuid.UUID
    payment_reference: str
    request_hash: str
    municipality_code: str
    donor_id: uuid.UUID
    donor_name: str
    #: The resident the donor record is linked to (who may read it), if any.
    donor_resident_id: str | None
    kind: DonationKind
    unit: DonationUnit
    amount: int
    earmark: Earmark
    program_id: str | None
    project: str | None
    payment_date: date
    calendar_year: int
    one_stop_requested: bool
    receipt_number: str | None
    received_at: datetime
    refunded_at: datetime | None = None
    refund_reason: str | None = None
    #: A hometown-tax donation to a municipality designated on its payment date (see ``plan_donation``).
    special_deduction: bool = False
    revitalisation_plan_id: str | None = None

    @classmethod
    def recorded(cls, record: NewDonation, donor: Donor, receipt_number: str | None) -> Donation:
        """The donation as recorded for ``donor``: the one on file, which a person named by the
        notification may be (then ``record``'s donor fields are the notification's, not its)."""
        return cls(
            id=record.id, payment_reference=record.payment_reference, request_hash=record.request_hash,
            municipality_code=record.municipality_code, donor_id=donor.id, donor_name=donor.name,
            donor_resident_id=donor.resident_id, kind=record.kind, unit=record.unit, amount=record.amount,
            earmark=record.earmark, program_id=record.program_id, project=record.project,
            payment_date=record.payment_date, calendar_year=record.calendar_year,
            one_stop_requested=record.one_stop_requested, receipt_number=receipt_number,
            received_at=record.received_at, special_deduction=record.special_deduction,
            revitalisation_plan_id=record.revitalisation_plan_id,
        )

    @property
    def refunded(self) -> bool:
        return self.refunded_at is not None

    def refund(self, reason: str, at: datetime) -> Donation:
        """The payment was reversed (once)."""
        if self.refunded_at is not None:
            raise AlreadyRefunded(f"donation {self.id} was refunded at {self.refunded_at.isoformat()}")
        return replace(self, refunded_at=at, refund_reason=reason)

    def check_application(self, received_on: date, today: date) -> None:
        """A one-stop application may be received for this donation on ``received_on``."""
        check_application(
            kind=self.kind, refunded=self.refunded, payment_date=self.payment_date, received_on=received_on,
            today=today,
        )
        if not self.special_deduction:
            target = municipality(self.municipality_code)
            period = not_designated(target, self.payment_date)
            if period is not None:
                raise _not_designated_error(target, period, "a one-stop application cannot be taken")
            raise MunicipalityNotDesignated(
                f"donation {self.id} was recorded without the special deduction: no one-stop application",
                municipality_code=self.municipality_code,
            )


@dataclass(frozen=True, slots=True)
class RecordedDonation:
    """What recording a donation answered: its receipt number, and its donor-year as it found it."""

    receipt_number: str | None
    #: None when the donation does not count for the one-stop exception.
    year: DonorYearState | None
    #: The donor-year's municipalities before this donation, in the order they were first given to.
    earlier_municipalities: tuple[str, ...]
    #: The donor found or created with the donation (``NewDonation.new_donor``); None when known before.
    donor: Donor | None = None

    def municipalities(self, code: str) -> list[str]:
        """The donor-year's municipalities with this donation's."""
        earlier = list(self.earlier_municipalities)
        return earlier if code in earlier else [*earlier, code]


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """One movement of a municipality's fund."""

    id: int
    earmark: Earmark
    unit: DonationUnit
    entry: LedgerEntryKind
    amount: int
    donation_id: uuid.UUID | None
    program_id: str | None
    recorded_at: datetime


@dataclass(frozen=True, slots=True)
class FundBalance:
    """One fund (earmark, unit) of a municipality, summed from its ledger rows."""

    earmark: Earmark
    unit: DonationUnit
    donated: int
    refunded: int
    #: Net amount passed to program budgets (transfers less transfers reversed by refunds).
    transferred: int
    balance: int


@dataclass(frozen=True, slots=True)
class ExportedDonation:
    """One line of a municipality-year's export (the fields in the export's column order)."""

    receipt_number: str | None
    donation_id: uuid.UUID
    payment_reference: str
    payment_date: date
    kind: DonationKind
    unit: DonationUnit
    amount: int
    earmark: Earmark
    program_id: str | None
    project: str | None
    donor_type: DonorType
    donor_name: str
    donor_address: str | None
    one_stop_requested: bool
    one_stop_status: ApplicationStatus | None
    received_at: datetime
    refunded_at: datetime | None
    receipt_status: ReceiptStatus | None
    reissue_count: int | None
    special_deduction: bool
    revitalisation_plan_id: str | None


# ---------------------------------------------------------------------------- receipts


@dataclass(frozen=True, slots=True)
class Receipt:
    """寄附金受領証明書: what it shows is frozen when issued; a re-issue keeps the number."""

    number: str
    donation_id: uuid.UUID
    municipality_code: str
    calendar_year: int
    donor_id: uuid.UUID
    donor_name: str
    donor_address: str
    amount_jpy: int
    donation_date: date
    issued_at: datetime
    status: ReceiptStatus
    cancelled_at: datetime | None
    reissue_count: int
    last_reissued_at: datetime | None
    #: Who may read it besides staff and admin: the resident the donor is linked to.
    donor_resident_id: str | None
    donor_type: DonorType
    kind: DonationKind
    project: str | None
    #: The donor was erased: the receipt is kept as the municipality's record (until
    #: ``retention_ends``), read by staff, but never printed or re-issued to anyone again.
    donor_erased: bool = False
    #: When the retention period ended and its donor name and address were erased.
    purged_at: datetime | None = None
    #: Whether the receipt serves the ふるさと納税 special deduction (a designated municipality).
    special_deduction: bool = False
    revitalisation_plan_id: str | None = None

    @property
    def kind_label(self) -> str:
        return receipt_kind_label(self.kind, special_deduction=self.special_deduction)

    @property
    def note(self) -> str | None:
        """What the receipt must say beyond its table (a donation outside the designation)."""
        if self.kind == "hometown_tax" and not self.special_deduction:
            return NOT_DESIGNATED_NOTE
        return None

    @property
    def plan_name(self) -> str | None:
        """The certified plan a corporate donation funds, as the receipt names it (its id if the
        reference data no longer lists it: a receipt stays printable)."""
        if self.revitalisation_plan_id is None:
            return None
        try:
            return revitalisation_plan(self.revitalisation_plan_id).name
        except UnknownRevitalisationPlan:
            return self.revitalisation_plan_id

    def check_printable(self) -> None:
        self._check_donor_not_erased()
        if self.status == "cancelled":
            raise ReceiptCancelled(f"receipt {self.number} was cancelled; it is not printed")

    def reissue(self, at: datetime) -> Receipt:
        """The same number again, counted and dated; a cancelled receipt is never re-issued."""
        self._check_donor_not_erased()
        if self.status == "cancelled":
            raise ReceiptCancelled(f"receipt {self.number} was cancelled; it cannot be re-issued")
        return replace(self, reissue_count=self.reissue_count + 1, last_reissued_at=at)

    def _check_donor_not_erased(self) -> None:
        if self.donor_erased:
            raise DonorErased(f"the donor of receipt {self.number} was erased; it is not issued again")


def is_receipt_number(text: str) -> bool:
    return RECEIPT_NUMBER.fullmatch(text) is not None


def receipt_kind_label(kind: DonationKind, *, special_deduction: bool = True) -> str:
    """The kind of donation as a receipt names it; a hometown-tax donation to a municipality that was
    not designated is an ordinary donation (寄附金), never ふるさと納税."""
    if kind == "hometown_tax" and not special_deduction:
        return "寄附金（ふるさと納税の対象外）"
    return _KIND_LABELS.get(kind, kind)


#: Printed on the receipt of a hometown-tax donation to a municipality that was not designated.
NOT_DESIGNATED_NOTE = (
    "寄附日において本団体はふるさと納税の対象となる地方団体として総務大臣の指定を受けていないため、"
    "この寄附金は特例控除（地方税法第37条の2第2項・第314条の7第2項）及び申告特例（ワンストップ特例）の対象となりません。"
)


_KIND_LABELS: dict[str, str] = {
    "hometown_tax": "ふるさと納税", "corporate": "企業版ふるさと納税（地方創生応援税制）",
}


# ---------------------------------------------------------------------------- one-stop exception


@dataclass(frozen=True, slots=True)
class DonorYear:
    """A donor's calendar year as the one-stop rules see it."""

    municipalities: frozenset[str]
    requested: bool
    voided: bool
    announced: bool


@dataclass(frozen=True, slots=True)
class DonorYearState:
    """A donor-year as stored: whether they asked for the exception, and whether it was voided (and told)."""

    requested: bool
    voided_at: datetime | None
    announced: bool

    @property
    def voided(self) -> bool:
        return self.voided_at is not None

    @property
    def status(self) -> Literal["not_requested", "valid", "void"]:
        if self.voided:
            return "void"
        return "valid" if self.requested else "not_requested"

    def with_municipalities(self, municipalities: Iterable[str], *, requested: bool | None = None) -> DonorYear:
        """The year as the one-stop rules see it (``requested``: the donor asks now)."""
        return DonorYear(
            frozenset(municipalities), requested=self.requested if requested is None else requested,
            voided=self.voided, announced=self.announced,
        )


NOT_REQUESTED = DonorYearState(requested=False, voided_at=None, announced=False)


@dataclass(frozen=True, slots=True)
class OneStopDecision:
    #: Mark every application of the donor-year void now.
    void: bool
    #: Tell the donor now (once per donor-year, and only if they asked for the exception).
    announce: bool


def one_stop_decision(year: DonorYear) -> OneStopDecision:
    """The sixth distinct municipality voids the year; the donor is told once, if they asked for it.

    A donor who never requested the exception is told when they first request it in a void year.
    A void year stays void (a later refund does not restore it: the donor was already told).
    """
    void_now = not year.voided and len(year.municipalities) > ONE_STOP_MUNICIPALITY_LIMIT
    voided = year.voided or void_now
    return OneStopDecision(void=void_now, announce=voided and year.requested and not year.announced)


def one_stop_deadline(calendar_year: int) -> date:
    """Applications must reach the municipality by 10 January of the next year."""
    return date(calendar_year + 1, 1, 10)


def check_application(
    *, kind: DonationKind, refunded: bool, payment_date: date, received_on: date, today: date
) -> None:
    if kind != "hometown_tax":
        raise OneStopNotApplicable(f"a {kind} donation has no one-stop exception")
    if refunded:
        raise DonationRefunded("a refunded donation takes no one-stop application")
    if received_on > today:
        raise ReceivedDateInFuture(f"received on {received_on} is after today ({today}, Japan time)")
    if received_on < payment_date:
        raise ReceivedBeforePayment(f"received on {received_on}, before the payment on {payment_date}")


def application_status(calendar_year: int, received_on: date, year_voided: bool) -> ApplicationStatus:
    if year_voided:
        return "void"
    return "late" if received_on > one_stop_deadline(calendar_year) else "valid"


@dataclass(frozen=True, slots=True)
class ApplicationReceived:
    """The municipality received the donor's one-stop application (paper or online) on this date."""

    received_on: date
    #: The identity documents were checked (only the fact is kept, never the documents or numbers).
    verified: bool = False


@dataclass(frozen=True, slots=True)
class OneStopApplication:
    id: uuid.UUID
    donation_id: uuid.UUID
    donor_id: uuid.UUID
    municipality_code: str
    calendar_year: int
    received_on: date
    verified: bool
    verified_at: datetime | None
    status: ApplicationStatus
    recorded_at: datetime

    @classmethod
    def receive(
        cls, donation: Donation, received: ApplicationReceived, year: DonorYearState, application_id: uuid.UUID,
        at: datetime,
    ) -> OneStopApplication:
        """The application of a donation (checked by ``Donation.check_application``)."""
        return cls(
            id=application_id, donation_id=donation.id, donor_id=donation.donor_id,
            municipality_code=donation.municipality_code, calendar_year=donation.calendar_year,
            received_on=received.received_on, verified=received.verified,
            verified_at=at if received.verified else None,
            status=application_status(donation.calendar_year, received.received_on, year.voided), recorded_at=at,
        )


# ---------------------------------------------------------------------------- erasure and legal retention
#
# A donor is erased with their resident (``ResidentErased``) or on request
# (``DELETE /donors/{id}``). Name, address, e-mail, the resident link and staff free text go at
# once; the receipt (寄附金受領証明書) keeps the donor's name and address, because the municipality
# must keep it as a record of money received and of a tax credit, until ``retention_ends``:
#
# - the donation lowers the donor's resident tax (住民税) of the fiscal year after the calendar year
#   of the payment (地方税法 第37条の2・第314条の7, 寄附金税額控除; the one-stop exception, 附則第7条,
#   sends it to the donor's municipality as 申告特例通知書), and that tax can be reassessed for
#   5 years after its statutory due date (地方税法 第17条の5 第1項);
# - the receipt copy is an accounting document of revenue (歳入), kept under the municipality's
#   文書管理規程 / 財務規則 for 5 years (some say 10) counted from the fiscal year after the one it
#   belongs to; a claim on public money lapses in 5 years (地方自治法 第236条 第1項).
#
# The later of the two ends wins: kept through the end of fiscal year (calendar year + 1) + N, so
# erasable from 1 April of (calendar year + 2 + N); N (``retention_years``) is 5 unless the
# municipality's rules say longer.

#: The years a municipality keeps a donation's receipt after the fiscal year of the tax it lowered.
DEFAULT_RETENTION_YEARS = 5


def retention_ends(calendar_year: int, years: int = DEFAULT_RETENTION_YEARS) -> date:
    """The first day the receipt of a donation paid in ``calendar_year`` may lose its donor's name
    and address (1 April, Japanese fiscal years begin then)."""
    return date(calendar_year + 2 + years, 4, 1)


def last_erasable_year(today: date, years: int = DEFAULT_RETENTION_YEARS) -> int:
    """The latest calendar year whose receipts' retention has ended on ``today`` (a date in Japan)."""
    year = today.year - 2 - years
    return year if today >= date(today.year, 4, 1) else year - 1


def erasable_from(receipt_years: Iterable[int], years: int = DEFAULT_RETENTION_YEARS) -> date | None:
    """The day the last of these receipts may be erased (None: no receipt, nothing is kept)."""
    latest = max(receipt_years, default=None)
    return None if latest is None else retention_ends(latest, years)


# ---------------------------------------------------------------------------- presentation


def yen(amount: int) -> str:
    return f"¥{amount:,}"


def japanese_date(day: date) -> str:
    return f"{day.year}年{day.month}月{day.day}日"
