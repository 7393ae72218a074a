"""Rules of donations, receipts, the one-stop exception and the fund ledger (pure Python, no I/O).

Every rule a caller can break is one ``DomainError`` subclass with its problem ``code``. The
handlers load facts, ask these functions what to do, then store and emit what they decided.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Literal
from zoneinfo import ZoneInfo

from shared.contracts.donation import DonationKind, DonationUnit, Earmark
from shared.kit.auth import Principal, Role
from shared.kit.errors import Conflict, DomainError, Forbidden, NotFound
from shared.reference import Municipality, UnknownMunicipality, municipality, travel_program, travel_programs
from shared.reference import UnknownTravelProgram as UnknownTravelProgramId

from .schemas import CompanyDonor, DonationConfirmation, IndividualDonor

TOKYO = ZoneInfo("Asia/Tokyo")
#: 企業版ふるさと納税: the smallest corporate donation.
CORPORATE_MINIMUM_JPY = 100_000
#: One-stop exception: at most this many distinct municipalities in a calendar year.
ONE_STOP_MUNICIPALITY_LIMIT = 5
#: Receipt numbers: municipality code, calendar year, sequence (6 digits, wider past 999,999).
RECEIPT_NUMBER = re.compile(r"[0-9]{6}-[0-9]{4}-[0-9]{6,}")

DonorType = Literal["individual", "company"]
LedgerEntryKind = Literal["donation", "refund", "transfer", "transfer_reversal"]
ApplicationStatus = Literal["valid", "void", "late"]


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


class CorporateProjectRequired(DomainError):
    code = "corporate-project-required"
    title = "A corporate donation names the project it funds"


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


# ---------------------------------------------------------------------------- time


def today_in_japan(now: datetime) -> date:
    """The Japanese calendar date at ``now`` (payment dates and deadlines follow it)."""
    return now.astimezone(TOKYO).date()


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


# ---------------------------------------------------------------------------- donors


@dataclass(frozen=True, slots=True)
class DonorFacts:
    """What the donation rules need to know about a donor."""

    type: DonorType
    head_office_code: str | None = None


def _normalised(text: str) -> str:
    """NFKC, no whitespace: ``"山田　太郎"`` and ``"山田太郎"`` are one name, ``"１－２"`` is ``"1-2"``."""
    return re.sub(r"\s+", "", unicodedata.normalize("NFKC", text)).lower()


def donor_key(details: IndividualDonor | CompanyDonor) -> str:
    """The identity a payment notification's donor is matched on (one donor record per identity)."""
    if isinstance(details, IndividualDonor):
        if details.resident_id is not None:
            return f"resident:{details.resident_id}"
        return f"individual:{_normalised(details.name)}|{_normalised(details.address)}"
    if details.corporate_number is not None:
        return f"company:{details.corporate_number}"
    return f"company:{details.head_office_code}|{_normalised(details.name)}"


def check_donor_details(details: IndividualDonor | CompanyDonor) -> DonorFacts:
    if isinstance(details, CompanyDonor):
        try:
            municipality(details.head_office_code)
        except UnknownMunicipality:
            raise UnknownMunicipalityCode(
                f"unknown head-office municipality code {details.head_office_code!r}",
                municipality_code=details.head_office_code,
            ) from None
        return DonorFacts("company", details.head_office_code)
    return DonorFacts("individual")


def receipt_address(donor_type: DonorType, address: str | None, head_office_code: str | None) -> str:
    """The address a receipt shows: the donor's, or a company's head-office municipality."""
    if address:
        return address
    if donor_type == "company" and head_office_code:
        return municipality(head_office_code).full_name
    return ""


# ---------------------------------------------------------------------------- donations


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    entry: LedgerEntryKind
    amount: int


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
    #: Individuals' hometown-tax donations count towards the one-stop limit.
    counts_for_one_stop: bool
    ledger: tuple[LedgerEntry, ...]


def plan_donation(confirmation: DonationConfirmation, donor: DonorFacts, today: date) -> DonationPlan:
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
        if not confirmation.project:
            raise CorporateProjectRequired("name the project of the regional plan the donation funds")
    elif donor.type != "individual":
        raise DonorKindMismatch(f"a {kind} donation comes from an individual donor")
    if confirmation.one_stop_requested and kind != "hometown_tax":
        raise OneStopNotApplicable(f"a {kind} donation has no one-stop exception")

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
        counts_for_one_stop=kind == "hometown_tax",
        ledger=tuple(ledger),
    )


def _check_program(program_id: str, target: Municipality, unit: DonationUnit) -> None:
    """A travel program of the municipality: its reference id, or the subsidy service's
    ``<reference id>@<municipality code>`` (that program's budget in one municipality)."""
    reference_id, _, municipality_code = program_id.partition("@")
    if municipality_code and municipality_code != target.code:
        raise UnknownProgram(f"{program_id} is not a program of {target.full_name}")
    try:
        program = travel_program(reference_id)
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


# ---------------------------------------------------------------------------- one-stop exception


@dataclass(frozen=True, slots=True)
class DonorYear:
    """A donor's calendar year as the one-stop rules see it."""

    municipalities: frozenset[str]
    requested: bool
    voided: bool
    announced: bool


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


# ---------------------------------------------------------------------------- personal data

#: Fields that carry identifiers of other systems, not personal data (a payment provider's own id).
MY_NUMBER_EXEMPT_FIELDS = frozenset({"payment_reference"})


# ---------------------------------------------------------------------------- access


def ensure_donor_access(principal: Principal, donor_resident_id: str | None) -> None:
    """A donor's own data: admin, or the resident the donor record is linked to."""
    if principal.role is Role.ADMIN:
        return
    if principal.role is Role.RESIDENT and donor_resident_id is not None and principal.subject == donor_resident_id:
        return
    raise Forbidden("only the donor (a resident linked to this donor) or an admin")


def ensure_donation_access(principal: Principal, municipality_code: str, donor_resident_id: str | None) -> None:
    """A donation or its receipt: admin, staff of its municipality, or its donor."""
    if principal.role is Role.STAFF:
        principal.ensure_municipality(municipality_code)
        return
    ensure_donor_access(principal, donor_resident_id)


# ---------------------------------------------------------------------------- presentation


def yen(amount: int) -> str:
    return f"¥{amount:,}"


def japanese_date(day: date) -> str:
    return f"{day.year}年{day.month}月{day.day}日"
