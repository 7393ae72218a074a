"""Who is calling: a partner with an API key or a partner JWT; staff and admin with a JWT.

One dependency, ``authenticated``, accepts both kinds of credential and yields a kit
``Principal``; ``allow(...)`` then admits roles (401 without a credential or with a bad one,
403 with a good credential of another role, e.g. a partner key on an admin endpoint).
API keys are looked up by their SHA-256 and cached in memory (the verification hot path does
no database work for a known key). Revocation reaches every process (HTTP workers, replicas) at
once: it replaces the API keys' *generation* in Redis (a random token), each cached key remembers
the generation read before its database lookup, and a cached key is used only while Redis still
holds that generation; otherwise it is looked up again. The verification hot path reads the
generation in the same MGET as the certificate (``cache.py``), other routes with one GET. When Redis
cannot be read, a cached key is trusted for ``unconfirmed_ttl_s`` only; if the new generation
cannot be written, it is retried for as long as caches keep keys (``positive_ttl_s``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Protocol

import structlog
from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials

from services.partner_gateway import store
from services.partner_gateway.domain import InvalidApiKey, UnknownPartnerCredential, api_key_hash
from services.partner_gateway.handlers import Gateway
from shared.kit.auth import Principal, Role, Unauthenticated, bearer_scheme, current_principal
from shared.kit.errors import Forbidden
from shared.kit.service import ServiceRuntime

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class _Cached:
    principal: Principal | None
    expires_at: float
    #: The API keys' generation read before the database lookup (None: Redis could not be read).
    generation: bytes | None = None
    stored_at: float = 0.0


class _Generations(Protocol):
    """Where the API keys' generation is read and replaced (``VerificationCache``)."""

    async def generation(self) -> bytes | None: ...

    async def new_generation(self) -> bool: ...


class ApiKeyCache:
    """SHA-256 of an API key → the partner principal (or None: unknown/revoked), with a TTL, checked
    against the API keys' generation at every use (``generations``: None, no Redis)."""

    def __init__(
        self, runtime: ServiceRuntime, *, generations: _Generations | None = None, positive_ttl_s: float = 30.0,
        negative_ttl_s: float = 5.0, unconfirmed_ttl_s: float = 1.0, max_entries: int = 10_000,
    ) -> None:
        self.runtime = runtime
        self.generations = generations
        self.positive_ttl_s = positive_ttl_s
        self.negative_ttl_s = negative_ttl_s
        self.unconfirmed_ttl_s = unconfirmed_ttl_s
        self.max_entries = max_entries
        self._entries: dict[str, _Cached] = {}
        self._republish: asyncio.Task[None] | None = None

    def cached(self, secret: str) -> Principal | None:
        """The principal cached for this key, not yet checked against the generation (the caller
        checks it with ``principal(secret, generation)`` once it has read the generation)."""
        cached = self._entries.get(api_key_hash(secret))
        if cached is None or cached.expires_at <= time.monotonic():
            return None
        return cached.principal

    async def principal(self, secret: str, generation: bytes | None = None, *, read: bool = True) -> Principal | None:
        """The key's principal (None: unknown or revoked). ``generation``: as just read from Redis
        (``read=False``: the caller read it, None meaning it could not); otherwise it is read here."""
        digest = api_key_hash(secret)
        cached = self._entries.get(digest)
        if cached is not None and cached.principal is None and cached.expires_at > time.monotonic():
            return None  # unknown or revoked, whatever the generation: revocations never undo that
        if read:
            generation = await self._generation()
        now = time.monotonic()
        cached = self._entries.get(digest)
        if cached is not None and cached.expires_at > now and (
            (generation is not None and cached.generation == generation)
            or (generation is None and now - cached.stored_at < self.unconfirmed_ttl_s)
        ):
            return cached.principal
        # The generation was read before this lookup: a revocation committed after it replaces it.
        found = await store.active_api_key(self.runtime.pool, digest)
        principal = (
            None if found is None
            else Principal(subject=f"api-key:{found[0]}", role=Role.PARTNER, partner=found[1])
        )
        if len(self._entries) >= self.max_entries:
            self._entries.clear()  # crude but bounded: a flood of wrong keys cannot grow memory
        ttl = self.positive_ttl_s if principal is not None else self.negative_ttl_s
        self._entries[digest] = _Cached(principal, now + ttl, generation, now)
        return principal

    async def _generation(self) -> bytes | None:
        return None if self.generations is None else await self.generations.generation()

    async def revoked(self) -> None:
        """After a revocation's commit: this process forgets every key at once, the others at their
        next use of one (a new generation). Should Redis refuse the write, it is retried in the
        background until every cache has expired what it held (``positive_ttl_s``)."""
        self.forget()
        if self.generations is None or await self.generations.new_generation():
            return
        if self._republish is None or self._republish.done():
            self._republish = asyncio.create_task(self._retry_new_generation(), name="api-key-generation")

    async def _retry_new_generation(self) -> None:
        assert self.generations is not None
        deadline = time.monotonic() + self.positive_ttl_s
        delay = 0.1
        while time.monotonic() < deadline:
            await asyncio.sleep(delay)
            if await self.generations.new_generation():
                log.info("the API keys' generation was replaced after a retry")
                return
            delay = min(delay * 2, 2.0)
        log.error("the API keys' generation could not be replaced: other processes honoured a revoked key "
                  "for up to the cache's TTL", ttl_s=self.positive_ttl_s)

    def forget(self) -> None:
        self._entries.clear()


def gateway_of(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


#: The OpenAPI security scheme of the partner routes' other credential (Swagger's Authorize button).
api_key_scheme = APIKeyHeader(
    name="X-Api-Key", scheme_name="apiKey", auto_error=False,
    description="A partner's API key, issued by an admin (`POST /v1/partners/{code}/api-keys`).",
)


async def authenticated(
    request: Request,
    # Declared for OpenAPI only (the headers are read below, also when called directly).
    _bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)] = None,
) -> Principal:
    """The caller, from ``X-Api-Key`` (partners) or ``Authorization: Bearer`` (every role)."""
    gateway = gateway_of(request)
    secret = request.headers.get("x-api-key")
    if secret is not None:
        principal = await api_key_principal(gateway, secret)
        request.state.principal_kind = principal.role.value  # the access log's caller kind (never who)
        return principal
    if not request.headers.get("authorization"):
        raise Unauthenticated("send an X-Api-Key header or an Authorization: Bearer token")
    principal = await current_principal(request)
    if principal.role is Role.PARTNER and principal.partner not in gateway.partners:
        raise UnknownPartnerCredential(f"no partner {principal.partner!r}")
    return principal


async def api_key_principal(gateway: Gateway, secret: str) -> Principal:
    """The partner an ``X-Api-Key`` header's value belongs to; 401 for an unknown or revoked key."""
    principal = await gateway.api_keys.principal(secret.strip())
    if principal is None:
        raise InvalidApiKey("the X-Api-Key is unknown or revoked")
    return principal


def allow(*roles: Role) -> Callable[[Principal], Awaitable[Principal]]:
    """Admit only these roles: 403 for a valid credential of another role."""

    async def dependency(principal: Annotated[Principal, Depends(authenticated)]) -> Principal:
        if principal.role not in roles:
            raise Forbidden(f"this needs one of the roles: {', '.join(r.value for r in roles)}")
        return principal

    return dependency


async def partner_caller(
    request: Request,
    _api_key: Annotated[str | None, Depends(api_key_scheme)] = None,
    _bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)] = None,
) -> Principal:
    """``allow(Role.PARTNER)`` in one dependency: the verification hot path pays for one, not two."""
    return only_partner(await authenticated(request))


def only_partner(principal: Principal) -> Principal:
    """The principal if it is a partner's; 403 for a valid credential of another role."""
    if principal.role is not Role.PARTNER:
        raise Forbidden("this needs the role: partner")
    return principal


PartnerCaller = Annotated[Principal, Depends(partner_caller)]
StaffOrAdmin = Annotated[Principal, Depends(allow(Role.STAFF, Role.ADMIN))]
ResidentStaffOrAdmin = Annotated[Principal, Depends(allow(Role.RESIDENT, Role.STAFF, Role.ADMIN))]
Admin = Annotated[Principal, Depends(allow(Role.ADMIN))]
