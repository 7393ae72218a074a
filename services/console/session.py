"""Server-side sessions in Redis: the browser holds only a random id (HttpOnly, SameSite=Lax, Secure
outside development); the tokens stay here, refreshed before they expire.

A session is made at sign-in from the identity provider's answer, after the console verified the
access token itself (the kit's ``TokenVerifier``: issuer, audience ``nichiiki-console``, signature,
not signed out). Every POST form carries the session's CSRF token; forms shown before a session
exists (sign-in, sign-up) carry one bound to a short-lived cookie of their own (double submit).
"""

from __future__ import annotations

import hmac
import json
import secrets
import time
from dataclasses import asdict, dataclass

from redis.asyncio import Redis

from shared.kit.auth import Principal

COOKIE = "nichiiki_console"
ANONYMOUS_CSRF_COOKIE = "nichiiki_console_csrf"
KEY_PREFIX = "nichiiki:console:session:"
#: Refresh this long before the access token expires, so no call to a service races its expiry.
REFRESH_MARGIN_S = 60.0


@dataclass(slots=True)
class Session:
    """One signed-in user: who (from the verified token) and the tokens to call the services with."""

    id: str
    csrf: str
    access_token: str
    refresh_token: str | None
    #: Unix time the access token expires (the provider's ``expires_in`` from when it answered).
    expires_at: float
    subject: str
    role: str
    municipality: str | None = None
    staff_role: str | None = None
    prefecture: str | None = None
    #: What the user typed to sign in (shown in the header); never a password.
    username: str = ""

    @property
    def due_for_refresh(self) -> bool:
        return time.time() > self.expires_at - REFRESH_MARGIN_S

    @property
    def is_manager(self) -> bool:
        return self.role == "staff" and self.staff_role == "manager"

    @property
    def decides(self) -> bool:
        """Reviewers and managers decide; auditors only read."""
        return self.role == "staff" and self.staff_role in ("reviewer", "manager")

    def with_tokens(
        self, principal: Principal, access_token: str, refresh_token: str | None, expires_in: float
    ) -> None:
        self.access_token, self.refresh_token = access_token, refresh_token
        self.expires_at = time.time() + expires_in
        self.subject, self.role = principal.subject, principal.role.value
        self.municipality, self.prefecture = principal.municipality, principal.prefecture
        self.staff_role = principal.staff_role.value if principal.staff_role else None


def new_session(
    principal: Principal, access_token: str, refresh_token: str | None, expires_in: float, username: str
) -> Session:
    session = Session(
        id=secrets.token_urlsafe(32), csrf=secrets.token_urlsafe(32), access_token="", refresh_token=None,
        expires_at=0.0, subject="", role="", username=username,
    )
    session.with_tokens(principal, access_token, refresh_token, expires_in)
    return session


def same_token(expected: str | None, given: str | None) -> bool:
    """Constant-time comparison of CSRF tokens (an absent one never matches)."""
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected), str(given))


class SessionStore:
    """Sessions as JSON under ``nichiiki:console:session:<id>``, each living as long as its sign-in."""

    def __init__(self, redis: Redis, ttl_s: int) -> None:
        self.redis = redis
        self.ttl_s = ttl_s

    async def load(self, session_id: str | None) -> Session | None:
        if not session_id or len(session_id) > 128:
            return None
        raw = await self.redis.get(KEY_PREFIX + session_id)
        if raw is None:
            return None
        return Session(**json.loads(raw))

    async def save(self, session: Session) -> None:
        await self.redis.set(KEY_PREFIX + session.id, json.dumps(asdict(session)), ex=self.ttl_s)

    async def delete(self, session_id: str) -> None:
        await self.redis.delete(KEY_PREFIX + session_id)
