"""Bearer JWT with roles: resident, staff (of one municipality), partner (one partner), admin.

Keys come from settings (HS256 with a shared secret here; the deployment sets its own).
Routes declare who may call them with ``Depends(require(Role.STAFF, ...))``; ownership checks
(a resident's own data, a staff member's own municipality) are explicit calls on the principal.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import jwt
from fastapi import Depends, Request

from shared.kit.errors import DomainError, Forbidden
from shared.kit.settings import Settings

ALGORITHM = "HS256"


class Role(enum.StrEnum):
    RESIDENT = "resident"
    STAFF = "staff"
    PARTNER = "partner"
    ADMIN = "admin"


class Unauthenticated(DomainError):
    code = "unauthenticated"
    status = 401
    title = "Authentication required"


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    role: Role
    municipality: str | None = None
    partner: str | None = None

    def ensure_resident(self, resident_id: str) -> None:
        """Residents see only their own data; staff and admin pass (their own checks apply)."""
        if self.role is Role.RESIDENT and self.subject != resident_id:
            raise Forbidden("a resident may only act on their own data")
        if self.role is Role.PARTNER:
            raise Forbidden("partners may not read resident data")

    def ensure_municipality(self, municipality_code: str) -> None:
        """Staff act only for their own municipality (or its prefecture's staff... not here); admin passes."""
        if self.role is Role.ADMIN:
            return
        if self.role is not Role.STAFF or self.municipality != municipality_code:
            raise Forbidden(f"staff of municipality {municipality_code} only")

    def ensure_partner(self, partner_code: str) -> None:
        if self.role is Role.ADMIN:
            return
        if self.role is not Role.PARTNER or self.partner != partner_code:
            raise Forbidden(f"partner {partner_code} only")


def mint_token(
    settings: Settings,
    *,
    subject: str,
    role: Role,
    municipality: str | None = None,
    partner: str | None = None,
    ttl: timedelta = timedelta(hours=12),
) -> str:
    now = datetime.now(UTC)
    claims: dict[str, Any] = {
        "sub": subject, "role": role.value, "iss": settings.jwt_issuer,
        "iat": int(now.timestamp()), "exp": int((now + ttl).timestamp()),
    }
    if role is Role.STAFF:
        if municipality is None:
            raise ValueError("a staff token names its municipality")
        claims["municipality"] = municipality
    if role is Role.PARTNER:
        if partner is None:
            raise ValueError("a partner token names its partner")
        claims["partner"] = partner
    return jwt.encode(claims, settings.jwt_secret, algorithm=ALGORITHM)


def decode_token(settings: Settings, token: str) -> Principal:
    try:
        claims = jwt.decode(
            token, settings.jwt_secret, algorithms=[ALGORITHM], issuer=settings.jwt_issuer,
            options={"require": ["sub", "exp", "role"]},
        )
        role = Role(claims["role"])
    except (jwt.PyJWTError, ValueError) as error:
        raise Unauthenticated(f"invalid bearer token: {error}") from error
    principal = Principal(
        subject=str(claims["sub"]), role=role,
        municipality=claims.get("municipality"), partner=claims.get("partner"),
    )
    if role is Role.STAFF and not principal.municipality:
        raise Unauthenticated("a staff token must name its municipality")
    if role is Role.PARTNER and not principal.partner:
        raise Unauthenticated("a partner token must name its partner")
    return principal


async def current_principal(request: Request) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("send a bearer token in the Authorization header")
    settings: Settings = request.app.state.settings
    return decode_token(settings, token.strip())


def require(*roles: Role) -> Callable[[Principal], Awaitable[Principal]]:
    """A dependency that admits only the given roles (401 without a token, 403 with another role)."""

    async def dependency(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
        if principal.role not in roles:
            raise Forbidden(f"this needs one of the roles: {', '.join(r.value for r in roles)}")
        return principal

    return dependency
