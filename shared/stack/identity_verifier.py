"""The development identity-verification provider: signs the attestations a premium request carries.

In production a provider certified for マイナンバーカードの公的個人認証 (JPKI) checks the resident's
card and signs a short-lived attestation of the result (a compact JWS, ES256); registration trusts
the providers named in ``NICHIIKI_IDENTITY_VERIFIER_JWKS`` (docs/services/registration.md). On a
development machine this module plays that provider: :func:`attest` signs with a fixed key pair,
and registration trusts :func:`public_jwks` only when ``NICHIIKI_ENV=development``.

DEVELOPMENT ONLY. The private key below is in the source code, like the development JWT secret:
anyone can sign with it, so no deployment may ever trust it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from datetime import UTC, date, datetime, timedelta
from functools import cache
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["DEVELOPMENT_ISSUER", "attest", "development_key", "public_jwks"]

#: The ``iss`` of every development attestation.
DEVELOPMENT_ISSUER = "nichiiki-development-identity-verifier"
ALGORITHM = "ES256"
#: What a development attestation lives by default (registration accepts at most 10 minutes).
DEFAULT_TTL = timedelta(minutes=5)

# A P-256 key generated once for development. Never trust it outside NICHIIKI_ENV=development.
_DEVELOPMENT_PRIVATE_KEY_PEM = b"""-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgUiIv9n5EEOnLGx8o
spAvsoeFOk9ZVTyrBVschkM54HOhRANCAAR/yN+X/zB98Bi2N6eWkKGEPDgvh34L
bMMgSAM8gY0IH7+tbIGuc+dmcpU+nEjgXzOYQoP6n9aCEOkW+28fi8ZS
-----END PRIVATE KEY-----
"""


@cache
def development_key() -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(_DEVELOPMENT_PRIVATE_KEY_PEM, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def _jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    """The public half as a JWK, with a ``kid`` of its RFC 7638 thumbprint."""
    public = key.public_key()
    members: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public))
    canonical = {name: members[name] for name in ("crv", "kty", "x", "y")}
    return {**canonical, "kid": _thumbprint(canonical), "use": "sig", "alg": ALGORITHM}


def _thumbprint(members: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(members, separators=(",", ":"), sort_keys=True).encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def public_jwks() -> dict[str, Any]:
    """The development provider's public keys as a JWKS document."""
    return {"keys": [_jwk(development_key())]}


def attest(
    resident_id: str,
    method: str = "jpki",
    *,
    verified_at: datetime | None = None,
    birthdate: date | None = None,
    now: datetime | None = None,
    ttl: timedelta = DEFAULT_TTL,
    jti: str | None = None,
    issuer: str = DEVELOPMENT_ISSUER,
    key: ec.EllipticCurvePrivateKey | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """A signed attestation that ``resident_id`` verified their identity with ``method`` just now.

    The claims are those registration checks: ``iss``, ``sub`` (the resident id), ``iat``, ``exp``,
    ``jti`` (single use), ``method``, ``verified_at`` (a NumericDate) and, when given, the verified
    ``birthdate`` (ISO 8601). Never a My Number. ``key``/``issuer``/``extra`` let tests forge the
    attestations registration must refuse (another key, another issuer, extra claims)."""
    issued = now or datetime.now(UTC)
    claims: dict[str, Any] = {
        "iss": issuer, "sub": resident_id, "iat": int(issued.timestamp()), "exp": int((issued + ttl).timestamp()),
        "jti": jti or str(uuid.uuid4()), "method": method,
        "verified_at": int((verified_at or issued).timestamp()),
    }
    if birthdate is not None:
        claims["birthdate"] = birthdate.isoformat()
    claims.update(extra or {})
    signing_key = key or development_key()
    headers = {"kid": _jwk(signing_key)["kid"], "typ": "JWT"}
    return jwt.encode(claims, signing_key, algorithm=ALGORITHM, headers=headers)
