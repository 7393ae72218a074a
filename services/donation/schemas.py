"""What crosses the HTTP boundary: request bodies (commands) and the views the service returns.

A request body turns itself into the domain's command (``to_domain``); the domain never sees a
pydantic model.

Request bodies refuse unknown fields and loose types (an amount of ``"1000"`` or ``1.5`` is a
schema error, never coerced). Rules that need the reference data or the clock (unknown
municipality, corporate minimum, future payment date...) are checked in ``domain``.
"""

from __future__ import annotations

import re
import uuid
from datetime import date, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool

from shared.contracts.donation import DonationKind, DonationUnit, Earmark
from shared.kit.http import Amount, ApiModel, MultilineText, MyNumberExempt

from .domain import ApplicationReceived, CompanyDetails, PaymentConfirmation, PersonDetails

Text = Annotated[str, Field(min_length=1, max_length=300)]
_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _iso_date(value: object) -> object:
    """Dates are ``YYYY-MM-DD`` strings only: no timestamps, no date-times, no numbers."""
    if isinstance(value, date):
        return value
    if not isinstance(value, str) or _ISO_DATE.fullmatch(value) is None:
        raise ValueError("a date is written YYYY-MM-DD")
    return value


#: A calendar date as ``YYYY-MM-DD`` (a Japanese calendar date where a rule depends on it).
CalendarDate = Annotated[date, BeforeValidator(_iso_date)]

# ---------------------------------------------------------------------------- commands


class IndividualDonor(ApiModel):
    """A person giving a hometown-tax or mile donation."""

    type: Literal["individual"]
    name: Text
    address: Annotated[str, Field(min_length=1, max_length=500)]
    #: Set when the donor is a registered resident of the platform (their resident id).
    resident_id: Annotated[str, Field(min_length=1, max_length=100)] | None = None
    email: Annotated[str, Field(max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")] | None = None

    def to_domain(self) -> PersonDetails:
        return PersonDetails(name=self.name, address=self.address, resident_id=self.resident_id, email=self.email)


class CompanyDonor(ApiModel):
    """A company giving a corporate (企業版) donation."""

    type: Literal["company"]
    name: Text
    #: The municipality code of the company's head office (本社所在地).
    head_office_code: Annotated[str, Field(min_length=1, max_length=10)]
    address: Annotated[str, Field(min_length=1, max_length=500)] | None = None
    #: 法人番号 (13 digits, public); the company's identity when given.
    corporate_number: Annotated[str, Field(pattern=r"^[0-9]{13}$")] | None = None
    email: Annotated[str, Field(max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")] | None = None

    def to_domain(self) -> CompanyDetails:
        return CompanyDetails(
            name=self.name, head_office_code=self.head_office_code, address=self.address,
            corporate_number=self.corporate_number, email=self.email,
        )


DonorDetails = Annotated[IndividualDonor | CompanyDonor, Field(discriminator="type")]


class DonationConfirmation(ApiModel):
    """A payment the payment provider confirmed: recorded once per payment reference."""

    # The payment provider's own opaque id (its own numbering may be 12 digits, e.g. 202612310001):
    # the only field of the platform not checked for a My Number.
    payment_reference: Annotated[
        str, Field(min_length=1, max_length=200), MyNumberExempt("the payment provider's own reference")
    ]
    municipality_code: Annotated[str, Field(min_length=1, max_length=10)]
    kind: DonationKind
    #: Yen, or miles for a mile donation; a positive integer.
    amount: Amount
    #: Defaults to ``general`` for money and ``dual_residence`` for miles.
    earmark: Earmark | None = None
    #: A travel program of the municipality the donor named (optional).
    program_id: Annotated[str, Field(min_length=1, max_length=100)] | None = None
    #: The project of a corporate donation as the company names it (free text, optional).
    project: Text | None = None
    #: The certified regional revitalisation plan (地域再生計画) a corporate donation funds (required
    #: for ``corporate``, refused for other kinds): an id of ``shared/reference``'s plans.
    revitalisation_plan_id: Annotated[str, Field(min_length=1, max_length=100)] | None = None
    #: The payment date, a Japanese calendar date (YYYY-MM-DD).
    payment_date: CalendarDate
    #: Details of the donor (found or created by identity) ...
    donor: DonorDetails | None = None
    #: ... or the id of a donor already on file.
    donor_id: uuid.UUID | None = None
    one_stop_requested: StrictBool = False

    def to_domain(self) -> PaymentConfirmation:
        return PaymentConfirmation(
            payment_reference=self.payment_reference, municipality_code=self.municipality_code, kind=self.kind,
            amount=self.amount, payment_date=self.payment_date, earmark=self.earmark, program_id=self.program_id,
            project=self.project, donor=None if self.donor is None else self.donor.to_domain(),
            donor_id=self.donor_id, one_stop_requested=self.one_stop_requested,
            revitalisation_plan_id=self.revitalisation_plan_id,
        )


class RefundRequest(ApiModel):
    reason: Annotated[MultilineText, Field(min_length=1, max_length=500)]


class OneStopApplicationReceived(ApiModel):
    """The municipality received the donor's one-stop application (paper or online) on this date."""

    received_on: CalendarDate
    #: The identity documents were checked (only the fact is kept, never the documents or numbers).
    verified: StrictBool = False

    def to_domain(self) -> ApplicationReceived:
        return ApplicationReceived(received_on=self.received_on, verified=self.verified)


# ---------------------------------------------------------------------------- views


class View(BaseModel):
    model_config = ConfigDict(frozen=True)


class DonorView(View):
    id: str
    type: Literal["individual", "company"]
    name: str
    address: str | None
    resident_id: str | None
    email: str | None
    head_office_code: str | None
    corporate_number: str | None
    created_at: datetime
    #: Set once the donor was erased: the record is kept blank, used no further.
    erased_at: datetime | None = None


class DonorErasureView(View):
    """A donor's erasure: done now, but for what the receipts must keep until ``erasable_from``."""

    donor_id: str
    erased_at: datetime | None
    #: The day the receipts' donor name and address are erased too (None: no receipt keeps them).
    erasable_from: date | None


class DonationView(View):
    id: str
    payment_reference: str
    municipality_code: str
    municipality_name: str
    donor_id: str
    donor_name: str
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
    status: Literal["confirmed", "refunded"]
    refunded_at: datetime | None = None
    refund_reason: str | None = None
    #: A hometown-tax donation to a municipality designated on the payment date: its receipt serves
    #: the special deduction and the one-stop exception. False: recorded as an ordinary donation.
    special_deduction: bool = False
    #: The certified regional revitalisation plan a corporate donation funds.
    revitalisation_plan_id: str | None = None


class DonationPage(View):
    items: list[DonationView]
    total: int
    limit: int
    offset: int


class ReceiptView(View):
    number: str
    donation_id: str
    municipality_code: str
    municipality_name: str
    calendar_year: int
    donor_id: str
    donor_name: str
    donor_address: str
    amount_jpy: int
    donation_date: date
    issued_at: datetime
    status: Literal["issued", "cancelled"]
    cancelled_at: datetime | None
    reissue_count: int
    last_reissued_at: datetime | None
    kind: DonationKind
    #: The receipt serves the ふるさと納税 special deduction (false: an ordinary donation's receipt).
    special_deduction: bool
    revitalisation_plan_id: str | None = None


class FundBalance(View):
    earmark: Earmark
    unit: DonationUnit
    donated: int
    refunded: int
    #: Net amount passed to program budgets (transfers less transfers reversed by refunds).
    transferred: int
    balance: int


class FundsView(View):
    municipality_code: str
    funds: list[FundBalance]


class LedgerEntryView(View):
    id: int
    earmark: Earmark
    unit: DonationUnit
    entry: Literal["donation", "refund", "transfer", "transfer_reversal"]
    amount: int
    donation_id: str | None
    program_id: str | None
    recorded_at: datetime


class LedgerPage(View):
    items: list[LedgerEntryView]
    total: int
    limit: int
    offset: int


class OneStopApplicationView(View):
    id: str
    donation_id: str
    donor_id: str
    municipality_code: str
    calendar_year: int
    received_on: date
    verified: bool
    verified_at: datetime | None
    status: Literal["valid", "void", "late"]
    recorded_at: datetime


class OneStopStatus(View):
    requested: bool
    #: ``not_requested``: no one-stop request this year; ``void``: a sixth municipality voided it.
    status: Literal["not_requested", "valid", "void"]
    municipality_count: int
    municipalities: list[str]
    limit: int
    voided_at: datetime | None
    applications: list[OneStopApplicationView]


class DonorSummary(View):
    donor_id: str
    year: int
    donations: list[DonationView]
    total_jpy: int
    total_miles: int
    one_stop: OneStopStatus
