"""Events of the donation service on ``donation.donations.v1`` (key: municipality code).

ふるさと納税 (hometown-tax donation), 企業版ふるさと納税 (corporate), mile donations; receipts
(寄附金受領証明書) and the one-stop exception (ワンストップ特例).
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Literal

from pydantic import Field

from shared.contracts.base import EventData
from shared.contracts.common import MunicipalityCode
from shared.contracts.topics import DONATIONS

DonationKind = Literal["hometown_tax", "corporate", "miles"]
Earmark = Literal["dual_residence", "general"]
DonationUnit = Literal["jpy", "miles"]


class DonationReceived(EventData, name="donation.donation.received", topic=DONATIONS):
    """A donation was recorded; a money donation's receipt (寄附金受領証明書) was issued with it, in the
    same act, and travels here (``receipt_number``), not in an event of its own."""

    donation_id: str
    municipality_code: MunicipalityCode
    donor_id: str
    #: Set when the donor is a registered resident, so they can be told about it.
    resident_id: str | None = None
    kind: DonationKind
    unit: DonationUnit
    amount: int
    earmark: Earmark
    #: The program the donor named, if any (otherwise the municipality's dual-residence programs).
    program_id: str | None = None
    payment_date: date
    calendar_year: int
    received_at: datetime
    #: True: a hometown-tax donation to a municipality designated for ふるさと納税 on the payment date
    #: (its receipt serves the special deduction and the one-stop exception); False: any other
    #: donation, including a hometown-tax payment recorded as an ordinary donation. None: sent before
    #: the field existed.
    special_deduction: bool | None = None
    #: The certified regional revitalisation plan (地域再生計画) a corporate donation funds.
    revitalisation_plan_id: str | None = None
    receipt_number: str | None = Field(
        default=None,
        description="The receipt issued with this donation (every money donation gets one, numbered per "
        "municipality and year; never one for miles), for `amount` yen at `received_at`. Added to v1 in "
        "2026-12 (issue #22), replacing the separate `donation.receipt.issued` event.",
    )


class DonationRefunded(EventData, name="donation.donation.refunded", topic=DONATIONS):
    donation_id: str
    municipality_code: MunicipalityCode
    donor_id: str
    resident_id: str | None = None
    unit: DonationUnit
    amount: int
    earmark: Earmark
    receipt_number: str | None = None
    refunded_at: datetime


class OneStopExceptionVoided(EventData, name="donation.one_stop.voided", topic=DONATIONS):
    """The donor gave to a sixth municipality this year: every one-stop application is void."""

    donor_id: str
    resident_id: str | None = None
    calendar_year: int
    municipality_codes: list[MunicipalityCode]
    voided_at: datetime
