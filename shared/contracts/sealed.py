"""Personal data inside events: sealed with the person's own data key (crypto-shredding).

A field that would carry a name, an e-mail, a phone or a member number carries a ``Sealed`` value
instead: AES-256-GCM under the data key of the person it is about (``kid``). The keys live in one
key store (``shared/kit/keyring.py``); erasing a person destroys their key, and with it every copy
of the field in every topic, dead-letter queue and retained record, without rewriting a log.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

RESIDENT_SUBJECT = "resident:"


def resident_subject(resident_id: str) -> str:
    """The kid of everything sealed about one resident inside the platform."""
    return f"{RESIDENT_SUBJECT}{resident_id}"


def partner_kid(partner_code: str, resident_ref: str) -> str:
    """The kid of what one partner is sent about one resident (``resident_ref``: the partner's own
    pseudonym of the resident, never the id). Its key is derived from the resident's, so it dies
    with it, and opens nothing sealed for the platform or for another partner."""
    return f"partner:{partner_code}:{resident_ref}"


class Sealed(BaseModel):
    """A value encrypted for one person (JWE-like, compact): unreadable once their key is erased."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kid: str = Field(description="whose key: `resident:<id>` inside the platform, `partner:<code>:<resident ref>` "
                     "on a partner's feed")
    alg: Literal["A256GCM"] = "A256GCM"
    iv: str = Field(description="the 96-bit nonce, base64url without padding")
    ct: str = Field(description="ciphertext and 128-bit tag, base64url without padding; AAD is the kid")
