"""Events of the registration service on ``registration.residents.v1`` (key: resident id).

ふるさと住民登録 (furusato resident registration): a person registers with municipalities, basic
or premium; registering with a municipality also registers them with its prefecture.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.contracts.base import EventData
from shared.contracts.common import Language, MunicipalityCode, PartnerCode, Tier
from shared.contracts.reasons import REJECTION_DESCRIPTION
from shared.contracts.sealed import Sealed
from shared.contracts.topics import ERASURES, RESIDENTS

RegistrationStatus = Literal["active", "pending_review", "rejected", "expired", "withdrawn"]
#: What a consent is for; ``share_certificate`` is per partner, the others are not.
ConsentPurpose = Literal["email", "share_certificate", "newsletter"]


class Contact(BaseModel):
    """What other services may keep to reach the resident (erased on withdrawal). It travels sealed
    with the resident's key (``Sealed`` of this model's JSON): erasing the key erases every copy."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str
    name_kana: str
    email: str
    phone: str | None = None
    preferred_language: Language = "ja"


class ConsentState(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    purpose: ConsentPurpose
    partner: PartnerCode | None = None
    granted: bool
    at: datetime


class ResidentRegistered(EventData, name="registration.resident.registered", version=3, topic=RESIDENTS):
    """A registration with one municipality became known (basic: active; premium: pending review).

    v2: the contact is sealed with the resident's data key (a ``Contact`` as JSON).
    v3: the registration with the prefecture that a municipal one brings travels in the same event
    (``derived_prefecture_registration_id``), not in an event of its own: one act, one event."""

    resident_id: str
    registration_id: str
    municipality_code: MunicipalityCode
    prefecture_code: MunicipalityCode
    tier: Tier
    status: RegistrationStatus
    legal_address_code: MunicipalityCode
    contact: Sealed
    consents: list[ConsentState] = []
    registered_at: datetime
    derived_prefecture_registration_id: str | None = Field(
        default=None,
        description="The registration with the prefecture (`prefecture_code`) that this one brought: basic, "
        "active, with the same contact, consents and time. Null when the person already had one, or when this "
        "registration is with a prefecture.",
    )

    def registrations(self) -> list[ResidentRegistered]:
        """This event as one registration each: itself, then the prefecture's it brought (if any)."""
        if self.derived_prefecture_registration_id is None:
            return [self]
        derived = self.model_copy(update={
            "registration_id": self.derived_prefecture_registration_id, "municipality_code": self.prefecture_code,
            "tier": "basic", "status": "active", "derived_prefecture_registration_id": None,
        })
        return [self, derived]


class PremiumRequested(EventData, name="registration.premium_requested", topic=RESIDENTS):
    resident_id: str
    registration_id: str
    municipality_code: MunicipalityCode
    activity_count: int
    requested_at: datetime


class PremiumApproved(EventData, name="registration.premium_approved", topic=RESIDENTS):
    resident_id: str
    registration_id: str
    municipality_code: MunicipalityCode
    valid_until: date
    decided_at: datetime


class PremiumRejected(EventData, name="registration.premium_rejected", topic=RESIDENTS):
    resident_id: str
    registration_id: str
    municipality_code: MunicipalityCode
    reason: str = Field(description=REJECTION_DESCRIPTION)
    decided_at: datetime


class PremiumExpired(EventData, name="registration.premium_expired", topic=RESIDENTS):
    resident_id: str
    registration_id: str
    municipality_code: MunicipalityCode
    expired_on: date


class RegistrationWithdrawn(EventData, name="registration.withdrawn", topic=RESIDENTS):
    """One registration ended by the resident; the account stays."""

    resident_id: str
    registration_id: str
    municipality_code: MunicipalityCode
    withdrawn_at: datetime


class ConsentChanged(EventData, name="registration.consent_changed", topic=RESIDENTS):
    """A consent granted or revoked (a revocation is an event too)."""

    resident_id: str
    purpose: ConsentPurpose
    partner: PartnerCode | None = None
    granted: bool
    at: datetime


class ContactChanged(EventData, name="registration.contact_changed", version=2, topic=RESIDENTS):
    """v2: the contact is sealed with the resident's data key (a ``Contact`` as JSON)."""

    resident_id: str
    contact: Sealed
    at: datetime


class ResidentWithdrawn(EventData, name="registration.resident.withdrawn", topic=RESIDENTS):
    """Erasure request: every service removes or anonymises this person's personal data."""

    resident_id: str
    withdrawn_at: datetime


class ResidentErased(EventData, name="registration.resident.erased", topic=ERASURES):
    """The same erasure as ``ResidentWithdrawn``, written in the same transaction, on a topic of its own:
    for the services that keep nothing of registrations, so they need not read every one to learn of it."""

    resident_id: str
    withdrawn_at: datetime
