"""Events of the subsidy service.

``subsidy.grants.v1`` (key: certificate number, so a partner's view of one certificate stays in
order) and ``subsidy.budgets.v1`` (key: program id). Amounts are integers: yen or miles.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Literal

from pydantic import Field

from shared.contracts.base import EventData
from shared.contracts.common import MunicipalityCode, PartnerCode
from shared.contracts.reasons import BUDGET_CHANGE_DESCRIPTION, CANCELLATION_DESCRIPTION, BudgetChangeReason
from shared.contracts.sealed import Sealed
from shared.contracts.topics import BUDGETS, GRANTS

Mechanism = Literal["mileage_grant", "fare_discount", "fare_voucher"]
BudgetUnit = Literal["jpy", "miles"]
RedemptionRefusal = Literal[
    "over_count", "outside_window", "certificate_revoked", "certificate_expired", "unknown_grant",
    "duplicate_trip", "wrong_partner", "grant_not_active",
]


class _GrantEvent(EventData):
    grant_id: str
    program_id: str
    partner: PartnerCode
    mechanism: Mechanism
    certificate_number: str
    resident_id: str
    municipality_code: MunicipalityCode


class GrantIssued(_GrantEvent, name="subsidy.grant.issued", version=2, topic=GRANTS):
    """v2: the member number is sealed with the resident's data key (as the certificate carried it)."""

    unit: BudgetUnit
    reserved: int
    window_from: date
    window_until: date
    #: The partner member number the resident consented to share (e.g. JAL Mileage Bank), sealed.
    member_number: Sealed | None = None
    issued_at: datetime


class GrantWaitlisted(_GrantEvent, name="subsidy.grant.waitlisted", topic=GRANTS):
    unit: BudgetUnit
    needed: int
    position: int
    waitlisted_at: datetime


class GrantRedeemed(_GrantEvent, name="subsidy.grant.redeemed", topic=GRANTS):
    trip_id: str
    unit: BudgetUnit
    amount: int
    trips_counted: int
    #: True when the grant is used up (for mileage grants: the miles were credited).
    completed: bool
    redeemed_at: datetime


class GrantRedemptionRejected(_GrantEvent, name="subsidy.grant.redemption_rejected", topic=GRANTS):
    trip_id: str
    reason: RedemptionRefusal
    detail: str
    rejected_at: datetime


class GrantCancelled(_GrantEvent, name="subsidy.grant.cancelled", topic=GRANTS):
    unit: BudgetUnit
    released: int
    reason: str = Field(description=CANCELLATION_DESCRIPTION)
    cancelled_at: datetime


class GrantExpired(_GrantEvent, name="subsidy.grant.expired", topic=GRANTS):
    unit: BudgetUnit
    released: int
    expired_on: date


class BudgetChanged(EventData, name="subsidy.budget.changed", version=2, topic=BUDGETS):
    """v2: ``reason`` is a code of the published list; v1 carried the staff's own words of a top-up."""

    program_id: str
    municipality_code: MunicipalityCode
    unit: BudgetUnit
    delta: int
    balance: int
    reason: BudgetChangeReason = Field(description=BUDGET_CHANGE_DESCRIPTION)
    changed_at: datetime
