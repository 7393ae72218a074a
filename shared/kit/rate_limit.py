"""Rate limits per principal, per partner and per client IP, kept in Redis: one implementation.

A limit is a rate and a burst (how many requests may come at once), checked with GCRA (the generic
cell rate algorithm: one "theoretical arrival time" per bucket, in a Lua script that reads Redis's
own clock, so every replica shares one bucket and one clock). A request over the limit is refused
with 429 ``application/problem+json`` (code ``rate-limited``) and ``Retry-After`` (whole seconds,
at least 1; ``retry_after_s`` in the body says it to the millisecond).

Two ways to check, one bucket format:

- ``RateLimiter.hit``: one Redis round trip per request (``EVALSHA``), several buckets at once and
  all-or-nothing (sign-in: the account's and the IP's). For sign-in, partner API writes and
  public routes, where a round trip (measured: 165 µs of the caller's CPU) is small beside the
  request's own work (a transaction, a password hash).
- ``RateLimiter.take``: a local token bucket per process and key that leases its tokens from the
  same Redis bucket, ``rate × rate_limit_lease_s`` at a time (10 at 200/s), topping up in the
  background when a quarter is left. For the partner gateway's verification hot path, whose
  whole request costs 0.34 ms of CPU (docs/benchmarks.md): a Redis call per verification would
  add half of that again and a second Redis hop to its latency, while a take from the lease costs
  0.8 µs and waits for nothing in the steady state (measured over loopback Redis: 6,000 takes
  paced at 3,000/s made 41 Redis calls, p99 24 µs). It never lets more through than Redis grants
  (tokens are taken before they are spent); it can let slightly fewer (a process's unspent tokens
  are dropped after a second): at most one lease per process per second. A refused lease is
  remembered until its retry time, so a flooding partner costs Redis one call per retry interval,
  not one per request.

Each bucket is keyed ``{topic_prefix}rate:{limit}:{who}``; who is a partner code, a principal
(``role:subject``), or a hash of an account name or client IP (no personal data in Redis).

When Redis cannot be reached the limiter **fails open**: the request passes, a warning is logged
(at most every 10 s) and ``rate_limit_unavailable_total`` counts it; Redis is not tried again for
a second, so an outage does not add a connection timeout to every request. Availability of the
platform matters more than limiting for the length of an outage.

FastAPI: ``limited_principal(PARTNER_API, require(Role.PARTNER))`` (a dependency that yields the
principal after checking its bucket), ``sign_in_limit`` (the identity provider's token endpoint),
``public_limit`` (routes without credentials). Plain ASGI: ``limiter_of_scope(scope).take(...)``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import structlog
from fastapi import Depends, Request
from prometheus_client import CollectorRegistry, Counter
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.types import Scope

from shared.kit.auth import Principal
from shared.kit.errors import DomainError
from shared.kit.settings import Settings

log = structlog.get_logger(__name__)

#: After a Redis failure, requests pass without asking Redis for this long.
OUTAGE_BACKOFF_S = 1.0
#: At most one "Redis unavailable" warning this often.
WARNING_INTERVAL_S = 10.0
#: Leased tokens not spent within this long are dropped (a process cannot bank a burst).
LEASE_TTL_S = 1.0
#: How long the limiter's own Redis client waits: a slow Redis fails open rather than stalling requests.
REDIS_TIMEOUT_S = 0.25
#: Local buckets kept per process (partners are few; this only bounds a pathological key set).
MAX_LOCAL_BUCKETS = 10_000

# GCRA over every key in KEYS, all or nothing: grant up to ARGV[1] tokens (as many as every bucket
# has, so a lease can be partial), else none, the wait until one token is free in every bucket and
# (1-based) which bucket waits longest.
# ARGV[2i], ARGV[2i+1]: key i's emission interval (µs per request) and tolerance (emission × burst).
# Times in µs of Redis's clock; a double holds them exactly (below 2^53).
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local grant = tonumber(ARGV[1])
local tats = {}
local wait = 0
local slowest = 1
for i, key in ipairs(KEYS) do
  local emission = tonumber(ARGV[2 * i])
  local tolerance = tonumber(ARGV[2 * i + 1])
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  tats[i] = tat
  local fit = math.floor((now + tolerance - tat) / emission)
  if fit < 1 then
    fit = 0
    local until_one = tat + emission - tolerance - now
    if until_one > wait then wait = until_one; slowest = i end
  end
  if fit < grant then grant = fit end
end
if grant > 0 then
  for i, key in ipairs(KEYS) do
    local new_tat = tats[i] + grant * tonumber(ARGV[2 * i])
    redis.call('SET', key, string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
  end
end
return {grant, math.ceil(wait), slowest}
"""


@dataclass(frozen=True, slots=True)
class Limit:
    """``rate`` requests per second on average, up to ``burst`` at once."""

    name: str
    rate: float
    burst: int

    @property
    def emission_us(self) -> float:
        return 1_000_000 / self.rate

    def describe(self) -> str:
        per_minute = self.rate * 60
        if per_minute < 600:
            return f"{per_minute:g}/min (burst {self.burst})"
        return f"{self.rate:g}/s (burst {self.burst})"


#: The limits' names; their figures come from settings (``limits``).
SIGN_IN_ACCOUNT = "sign-in-account"
SIGN_IN_IP = "sign-in-ip"
PARTNER_API = "partner"
VERIFICATION = "verification"
PUBLIC = "public"


def limits(settings: Settings) -> dict[str, Limit]:
    """Every limit of the platform, from ``NICHIIKI_RATE_LIMIT_*``."""
    s = settings
    return {
        SIGN_IN_ACCOUNT: Limit(
            SIGN_IN_ACCOUNT, s.rate_limit_sign_in_account_per_min / 60, s.rate_limit_sign_in_account_burst
        ),
        SIGN_IN_IP: Limit(SIGN_IN_IP, s.rate_limit_sign_in_ip_per_min / 60, s.rate_limit_sign_in_ip_burst),
        PARTNER_API: Limit(PARTNER_API, s.rate_limit_partner_per_s, s.rate_limit_partner_burst),
        VERIFICATION: Limit(VERIFICATION, s.rate_limit_verify_per_s, s.rate_limit_verify_burst),
        PUBLIC: Limit(PUBLIC, s.rate_limit_public_per_min / 60, s.rate_limit_public_burst),
    }


class RateLimited(DomainError):
    code = "rate-limited"
    status = 429
    title = "Too many requests"

    def __init__(self, limit: Limit, retry_after_s: float) -> None:
        retry_after_s = max(retry_after_s, 0.001)
        super().__init__(
            f"more than {limit.describe()} for this caller ({limit.name}); retry after {retry_after_s:.3f} s",
            headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))},
            limit=limit.name, retry_after_s=round(retry_after_s, 3),
        )
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class Grant:
    """What Redis granted: ``tokens`` (0 = refused) and, when refused, the wait until one is free
    and which bucket (0-based) waits longest."""

    tokens: int
    retry_after_s: float
    slowest: int = 0


@dataclass(slots=True)
class _Local:
    """One key's tokens leased from Redis, in this process."""

    tokens: int = 0
    expires_at: float = 0.0
    refused_until: float = 0.0
    open_until: float = 0.0  # Redis unavailable: pass everything until then
    pending: asyncio.Task[None] | None = field(default=None)


class RateLimiter:
    """The buckets of one service process (``app.state.rate_limiter``, made by the kit's ``create_app``)."""

    def __init__(
        self, settings: Settings, *, registry: CollectorRegistry | None = None, redis: Redis | None = None
    ) -> None:
        self.settings = settings
        self.enabled = settings.rate_limit_enabled and settings.redis_url is not None
        self.limits = limits(settings)
        self.prefix = f"{settings.topic_prefix}rate:"
        self._redis = redis
        self._own_redis = redis is None
        self._script: Any = None
        self._down_until = 0.0
        self._warned_at = -WARNING_INTERVAL_S
        self._local: dict[tuple[str, str], _Local] = {}
        self.refusals = Counter(
            "rate_limit_refusals_total", "Requests refused by a rate limit", ["limit"], registry=registry
        ) if registry is not None else None
        self.unavailable = Counter(
            "rate_limit_unavailable_total", "Rate-limit checks passed because Redis was unavailable",
            registry=registry,
        ) if registry is not None else None

    def limit(self, name: str) -> Limit:
        return self.limits[name]

    def _client(self) -> Any:
        if self._script is None:
            if self._redis is None:
                assert self.settings.redis_url is not None
                self._redis = Redis.from_url(
                    self.settings.redis_url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S,
                )
            self._script = self._redis.register_script(_GCRA)
        return self._script

    async def acquire(self, tokens: int, *buckets: tuple[Limit, str]) -> Grant | None:
        """Take up to ``tokens`` from every bucket at once (one round trip); None when Redis is unavailable."""
        now = time.monotonic()
        if now < self._down_until:
            self._count_unavailable()
            return None
        keys = [f"{self.prefix}{limit.name}:{who}" for limit, who in buckets]
        args: list[float] = [tokens]
        for limit, _ in buckets:
            args += [limit.emission_us, limit.emission_us * limit.burst]
        try:
            granted, wait_us, slowest = await self._client()(keys=keys, args=args)
        except (TimeoutError, RedisError, OSError) as error:
            self._down_until = time.monotonic() + OUTAGE_BACKOFF_S
            self._count_unavailable()
            if now - self._warned_at >= WARNING_INTERVAL_S:
                self._warned_at = now
                log.warning("rate limits not applied: Redis is unavailable (failing open)", error=repr(error))
            return None
        return Grant(int(granted), int(wait_us) / 1_000_000, int(slowest) - 1)

    def _count_unavailable(self) -> None:
        if self.unavailable is not None:
            self.unavailable.inc()

    def _refuse(self, limit: Limit, retry_after_s: float) -> RateLimited:
        if self.refusals is not None:
            self.refusals.labels(limit.name).inc()
        return RateLimited(limit, retry_after_s)

    async def hit(self, *buckets: tuple[Limit, str]) -> None:
        """Count one request against every bucket (one Redis round trip); 429 when any is full."""
        if not self.enabled or not buckets:
            return
        grant = await self.acquire(1, *buckets)
        if grant is not None and grant.tokens == 0:
            raise self._refuse(buckets[grant.slowest][0], grant.retry_after_s)

    async def take(self, limit: Limit, who: str) -> None:
        """Count one request from this process's lease of the bucket (Redis about once per lease)."""
        if not self.enabled:
            return
        now = time.monotonic()
        local = self._local.get((limit.name, who))
        if local is None:
            if len(self._local) >= MAX_LOCAL_BUCKETS:
                self._local.clear()
            local = self._local[(limit.name, who)] = _Local()
        if local.tokens > 0 and local.expires_at > now:
            local.tokens -= 1
            if local.tokens <= self._lease_size(limit) // 4 and local.pending is None:
                local.pending = asyncio.create_task(self._lease(local, limit, who))
            return
        if local.open_until > now:
            return
        if local.refused_until > now:
            raise self._refuse(limit, local.refused_until - now)
        # Out of tokens: wait for a lease (one in flight serves every waiting request); a second one
        # when the requests that waited with this one took the whole lease.
        for _ in range(2):
            if local.pending is None:
                local.pending = asyncio.create_task(self._lease(local, limit, who))
            await asyncio.shield(local.pending)
            now = time.monotonic()
            if local.tokens > 0 and local.expires_at > now:
                local.tokens -= 1
                return
            if local.open_until > now:
                return
            if local.refused_until > now:
                raise self._refuse(limit, local.refused_until - now)
        raise self._refuse(limit, limit.emission_us / 1_000_000)

    def _lease_size(self, limit: Limit) -> int:
        return max(1, min(limit.burst, math.ceil(limit.rate * self.settings.rate_limit_lease_s)))

    async def _lease(self, local: _Local, limit: Limit, who: str) -> None:
        try:
            grant = await self.acquire(self._lease_size(limit), (limit, who))
            now = time.monotonic()
            if grant is None:
                local.open_until = now + OUTAGE_BACKOFF_S
            elif grant.tokens > 0:
                local.tokens = (local.tokens if local.expires_at > now else 0) + grant.tokens
                local.expires_at = now + LEASE_TTL_S
            else:
                local.refused_until = now + grant.retry_after_s
        finally:
            local.pending = None

    async def close(self) -> None:
        for local in self._local.values():
            if local.pending is not None:
                local.pending.cancel()
        if self._redis is not None and self._own_redis:
            await self._redis.aclose()
        self._redis = self._script = None


def limiter_of_scope(scope: Scope) -> RateLimiter:
    """The app's limiter, from a plain ASGI handler."""
    limiter: RateLimiter = scope["app"].state.rate_limiter
    return limiter


def limiter_of(request: Request) -> RateLimiter:
    limiter: RateLimiter = request.app.state.rate_limiter
    return limiter


def principal_key(principal: Principal) -> str:
    """A partner's bucket is the partner's (every key and token of it together); anyone else's is their own."""
    if principal.partner is not None:
        return principal.partner
    return f"{principal.role.value}:{principal.subject}"


def hashed(value: str) -> str:
    """An account name or IP as a bucket key: no personal data in Redis."""
    return hashlib.blake2b(value.encode(), digest_size=12).hexdigest()


def client_ip(scope: Scope, settings: Settings) -> str:
    if settings.rate_limit_trust_forwarded_for:
        for name, value in scope.get("headers", ()):
            if name == b"x-forwarded-for":
                last: str = value.decode("latin-1").rsplit(",", 1)[-1].strip()
                if last:
                    return last
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def limited_principal(
    limit_name: str, principal: Callable[..., Awaitable[Principal]]
) -> Callable[..., Awaitable[Principal]]:
    """A dependency yielding ``principal``'s caller after counting the request in its bucket of
    ``limit_name`` (one Redis round trip): ``Annotated[Principal, Depends(limited_principal(PARTNER_API,
    require(Role.PARTNER)))]``."""

    # A default, not an Annotated hint: the hint would be a string (postponed annotations) naming a
    # local that FastAPI cannot resolve.
    async def dependency(request: Request, caller: Principal = Depends(principal)) -> Principal:
        limiter = limiter_of(request)
        await limiter.hit((limiter.limit(limit_name), principal_key(caller)))
        return caller

    return dependency


async def public_limit(request: Request) -> None:
    """For a route without credentials (public verification): the client IP's bucket."""
    limiter = limiter_of(request)
    await limiter.hit((limiter.limit(PUBLIC), hashed(client_ip(request.scope, limiter.settings))))


async def sign_in_limit(request: Request) -> None:
    """For the OAuth token endpoint: the account's bucket (``username``, else the client id, from the
    form or HTTP Basic) and the client IP's, both in one round trip; 429 when either is full."""
    limiter = limiter_of(request)
    if not limiter.enabled:
        return
    buckets = [(limiter.limit(SIGN_IN_IP), hashed(client_ip(request.scope, limiter.settings)))]
    account = await _sign_in_account(request)
    if account:
        buckets.append((limiter.limit(SIGN_IN_ACCOUNT), hashed(account)))
    await limiter.hit(*buckets)


async def _sign_in_account(request: Request) -> str | None:
    # The body is read (and kept by Starlette for the route) only when it is a form: the route's
    # own parsing sees the same bytes.
    form: dict[str, str] = {}
    if request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/x-www-form-urlencoded":
        form = dict(parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True))
    account: str | None = form.get("username") or form.get("client_id")
    if not account:
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic":
            try:
                account = base64.b64decode(credentials.strip(), validate=True).decode().split(":", 1)[0]
            except (ValueError, UnicodeDecodeError):
                account = None
    return account.strip().lower() if account else None
