"""Personal data inside events: sealed with the person's own data key (crypto-shredding).

A field that would carry a name, an e-mail, a phone or a member number carries a ``Sealed`` value
instead: AES-256-GCM under the data key of the person it is about (``kid``). The keys live in one
key store (``shared/kit/keyring.py``); erasing a person destroys their key, and with it every copy
of the field in every topic, dead-letter queue and retained record, without rewriting a log.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

#: The key of a person's data, and of what a partner may read of it (derived from it).
RESIDENT_SUBJECT = "resident:"
PARTNER_SCOPE = "/partner:"


def resident_subject(resident_id: str) -> str:
    return f"{RESIDENT_SUBJECT}{resident_id}"


def partner_kid(resident_id: str, partner_code: str) -> str:
    """The key a partner is given for one resident: derived from the resident's, so it dies with it,
    and useless for anything sealed for another partner or for the platform itself."""
    return f"{resident_subject(resident_id)}{PARTNER_SCOPE}{partner_code}"


def subject_of(kid: str) -> str:
    """The stored key a kid depends on (a partner's kid depends on the resident's key)."""
    return kid.split(PARTNER_SCOPE, 1)[0]


class Sealed(BaseModel):
    """A value encrypted for one person (JWE-like, compact): unreadable once their key is erased."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kid: str = Field(description="whose key: `resident:<id>`, or `resident:<id>/partner:<code>` for a partner")
    alg: Literal["A256GCM"] = "A256GCM"
    iv: str = Field(description="the 96-bit nonce, base64url without padding")
    ct: str = Field(description="ciphertext and 128-bit tag, base64url without padding; AAD is the kid")
