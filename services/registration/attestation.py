"""Identity attestations: whose signature registration trusts, and checking it.

A premium request carries ``attestation``, a compact JWS (ES256) that an identity-verification
provider signed after the resident verified their identity (JPKI: マイナンバーカードの公的個人認証).
This module checks the JWS itself: its algorithm (ES256 only: never ``none``, never a shared
secret), that its ``iss`` is a trusted provider, and its signature by one of that provider's keys.
The claims' rules (subject, freshness, method) are ``domain.check_attestation``; single use is the
store's unique index.

Trusted providers: ``NICHIIKI_IDENTITY_VERIFIER_JWKS``, a JSON object mapping each provider's issuer
to its JWKS (``{"https://verifier.example": {"keys": [{"kty": "EC", ...}]}}``), or the path of a
file holding one. With ``NICHIIKI_ENV=development`` the development provider
(``shared/stack/identity_verifier.py``) is trusted too; anywhere else only what is configured.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jwt
import structlog
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.registration.domain import AttestationInvalid
from shared.kit.settings import Settings

log = structlog.get_logger(__name__)

ALGORITHM = "ES256"


class VerifierSettings(BaseSettings):
    """Registration's own setting: the identity-verification providers it trusts."""

    model_config = SettingsConfigDict(env_prefix="NICHIIKI_", extra="ignore")

    #: JSON ``{issuer: JWKS}``, or the path of a file holding it.
    identity_verifier_jwks: str | None = None


def parse_providers(document: str) -> dict[str, tuple[jwt.PyJWK, ...]]:
    """``{issuer: JWKS}`` (inline JSON or a file path) as each issuer's ES256 signing keys."""
    text = document.strip()
    if not text.startswith("{"):
        text = Path(text).read_text(encoding="utf-8")
    parsed = json.loads(text)
    if not isinstance(parsed, dict):
        raise ValueError("NICHIIKI_IDENTITY_VERIFIER_JWKS must map each provider's issuer to its JWKS")
    providers: dict[str, tuple[jwt.PyJWK, ...]] = {}
    for issuer, jwks in parsed.items():
        entries = jwks.get("keys") if isinstance(jwks, dict) else None
        if not isinstance(entries, list):
            raise ValueError(f"the JWKS of identity-verification provider {issuer!r} has no 'keys' list")
        keys = tuple(
            jwt.PyJWK(entry, ALGORITHM) for entry in entries
            if entry.get("use", "sig") == "sig" and entry.get("alg", ALGORITHM) == ALGORITHM
        )
        if not keys:
            raise ValueError(f"identity-verification provider {issuer!r} publishes no ES256 signing key")
        providers[str(issuer)] = keys
    return providers


class AttestationVerifier:
    """Checks an attestation's JWS against the trusted providers' keys and returns its claims."""

    def __init__(self, providers: Mapping[str, Sequence[jwt.PyJWK]]) -> None:
        self.providers = {issuer: tuple(keys) for issuer, keys in providers.items()}

    @classmethod
    def from_settings(cls, settings: Settings, configured: str | None = None) -> AttestationVerifier:
        """The providers configured (``configured``, else ``NICHIIKI_IDENTITY_VERIFIER_JWKS``), plus the
        development provider when ``NICHIIKI_ENV=development``."""
        document = configured if configured is not None else VerifierSettings().identity_verifier_jwks
        providers = parse_providers(document) if document else {}
        if settings.env == "development":
            from shared.stack.identity_verifier import DEVELOPMENT_ISSUER, public_jwks

            providers.setdefault(DEVELOPMENT_ISSUER, tuple(jwt.PyJWK(k, ALGORITHM) for k in public_jwks()["keys"]))
        if not providers:
            log.warning("no identity-verification provider is trusted: every premium request will be refused; "
                        "set NICHIIKI_IDENTITY_VERIFIER_JWKS")
        return cls(providers)

    def claims(self, token: str) -> dict[str, Any]:
        """The claims of an attestation a trusted provider signed (AttestationInvalid otherwise).

        Times are not checked here: ``domain.check_attestation`` does, against the runtime's clock."""
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as error:
            raise AttestationInvalid(f"the attestation is not a compact JWS: {error}") from None
        if header.get("alg") != ALGORITHM:
            raise AttestationInvalid(f"attestations signed with {header.get('alg')!r} are not accepted: ES256 only")
        issuer = unverified.get("iss")
        keys = self.providers.get(issuer) if isinstance(issuer, str) else None
        if not keys:
            raise AttestationInvalid("the attestation's issuer is not a trusted identity-verification provider")
        kid = header.get("kid")
        candidates = [k for k in keys if kid is None or k.key_id in (None, kid)]
        for key in candidates:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token, key.key, algorithms=[ALGORITHM], issuer=issuer,
                    options={"verify_exp": False, "verify_iat": False, "verify_nbf": False, "verify_aud": False,
                             "require": ["iss", "sub", "iat", "exp", "jti"]},
                )
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError as error:
                raise AttestationInvalid(f"the attestation is not valid: {error}") from None
            return claims
        raise AttestationInvalid("the attestation's signature is not by a key of its provider")
