"""Value types that several services' events share."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.contracts.sealed import Sealed
from shared.reference import MunicipalityCode

Language = Literal["ja", "en"]
Tier = Literal["basic", "premium"]

#: A partner's code as used in topic names and credentials: jal, ana, jreast, sadokisen, kyushuyusen.
PartnerCode = Annotated[str, Field(pattern=r"^[a-z][a-z0-9]{1,31}$")]

__all__ = ["Language", "MunicipalityCode", "PartnerCode", "PartnerMembership", "SealedMembership", "Tier"]


class PartnerMembership(BaseModel):
    """A partner the resident consented to share a certificate with, and their member number there."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    partner: PartnerCode
    member_number: str | None = None


class SealedMembership(BaseModel):
    """A partner the resident consented to share a certificate with, and their member number there
    sealed with the resident's key (unreadable in every copy once the resident is erased)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    partner: PartnerCode
    member_number: Sealed | None = None
