"""The provider's cryptography: argon2id password and client-secret hashes, ES256 (P-256) signing
keys as PEM and as JWK, signing access tokens, hashing refresh tokens.

argon2 is slow on purpose (about 0.1 s and 64 MiB a hash): callers run it in a thread
(``asyncio.to_thread``) so a sign-in never blocks the event loop.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from typing import Any

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

#: argon2id with the library's defaults (RFC 9106's second recommended option: t=3, m=64 MiB, p=4).
_HASHER = PasswordHasher()
#: Verified against when the username is unknown, so an unknown name costs what a wrong password costs.
_DUMMY_HASH = _HASHER.hash(secrets.token_urlsafe(16))

ALGORITHM = "ES256"


def hash_secret(secret: str) -> str:
    return _HASHER.hash(secret)


def verify_secret(stored_hash: str | None, secret: str) -> bool:
    """Whether ``secret`` matches; an absent hash is checked against a dummy (same cost, always False)."""
    try:
        return _HASHER.verify(stored_hash or _DUMMY_HASH, secret) and stored_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def new_client_secret() -> str:
    return secrets.token_urlsafe(32)


def new_refresh_token() -> str:
    return secrets.token_urlsafe(32)


def refresh_token_hash(token: str) -> str:
    """Refresh tokens are 256 random bits: a fast hash is enough to keep them out of the database."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_totp_secret() -> str:
    """160 random bits in base32 (RFC 4226's recommended secret length)."""
    return base64.b32encode(secrets.token_bytes(20)).decode()


# --- signing keys --------------------------------------------------------------------------------


def new_signing_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The public key as a JWK (RFC 7517/7518) whose ``kid`` is its RFC 7638 thumbprint."""
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    numbers = public.public_numbers()
    members = {"crv": "P-256", "kty": "EC", "x": _b64url(numbers.x.to_bytes(32, "big")),
               "y": _b64url(numbers.y.to_bytes(32, "big"))}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    kid = _b64url(hashlib.sha256(canonical).digest())
    return {**members, "kid": kid, "use": "sig", "alg": ALGORITHM}


def private_pem(key: ec.EllipticCurvePrivateKey, passphrase: str | None) -> str:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase.encode()) if passphrase else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption).decode()


def load_private_pem(pem: str, passphrase: str | None) -> ec.EllipticCurvePrivateKey:
    encrypted = "ENCRYPTED" in pem.partition("\n")[0]
    key = serialization.load_pem_private_key(
        pem.encode(), password=passphrase.encode() if passphrase and encrypted else None
    )
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("a signing key is an EC private key")
    return key


def sign(claims: dict[str, Any], key: ec.EllipticCurvePrivateKey, kid: str) -> str:
    return jwt.encode(claims, key, algorithm=ALGORITHM, headers={"kid": kid, "typ": "JWT"})
