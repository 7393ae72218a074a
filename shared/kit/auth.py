"""Who is calling: bearer JWTs from an OpenID Connect issuer, verified against its JWKS.

Every service verifies the same claims (``docs/identity.md``): ``iss`` is ``NICHIIKI_OIDC_ISSUER``,
``aud`` names this service (``nichiiki-<service>``), ``exp``/``nbf``/``iat`` hold and the lifetime is
at most ``NICHIIKI_TOKEN_MAX_LIFETIME_S``; ``role`` (with ``municipality`` and ``staff_role`` for
staff, ``prefecture`` for prefecture readers, ``partner`` for partners) says what the caller is.
Only asymmetric signatures (ES256, RS256) by a key the issuer publishes are accepted; HS256 with
the development key is accepted too only when ``NICHIIKI_ENV=development`` (``nichiiki token``
mints those), and a service outside development refuses to start without an issuer.

Routes declare who may call them with ``Depends(require(Role.STAFF, ..., staff=DECIDERS))``;
ownership checks (a resident's own data, a staff member's own municipality) are explicit calls
on the principal.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import enum
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import httpx
import jwt
import structlog
from fastapi import Depends, Request
from fastapi.security import HTTPBearer
from jwt.algorithms import HMACAlgorithm
from jwt.api_jws import PyJWS
from jwt.utils import base64url_decode, base64url_encode
from redis.asyncio import Redis

from shared.contracts.topics import SERVICES
from shared.kit.errors import DomainError, Forbidden
from shared.kit.settings import Settings
from shared.reference import UnknownMunicipality, prefecture_of

log = structlog.get_logger(__name__)

DEVELOPMENT_ALGORITHM = "HS256"
ASYMMETRIC_ALGORITHMS = ("ES256", "RS256")
#: Clock skew tolerated between the issuer and the services.
LEEWAY_S = 30
#: A session revoked at sign-out is looked up in Redis under this prefix (``sid`` claim).
REVOKED_SESSION_PREFIX = "nichiiki:revoked-session:"
#: How long "this session is not revoked" is believed before Redis is asked again.
REVOCATION_CACHE_S = 1.0
#: The JWKS is fetched again after this long, or sooner for an unknown ``kid`` (at most this often).
JWKS_TTL_S = 300.0
JWKS_MIN_REFRESH_S = 10.0
#: Tokens verified lately, kept so that a client's next request with the same token skips the
#: signature check (at most this many; the oldest goes first).
VERIFIED_TOKENS = 10_000
#: Parsed token headers (``alg``, ``kid``), by their encoded form: an issuer's tokens share a few.
PARSED_HEADERS = 64


class Role(enum.StrEnum):
    RESIDENT = "resident"
    STAFF = "staff"
    PREFECTURE = "prefecture"
    MINISTRY = "ministry"
    PARTNER = "partner"
    PAYMENT_PROVIDER = "payment_provider"
    ADMIN = "admin"


class StaffRole(enum.StrEnum):
    """What a municipality's staff member may do: reviewers decide applications and registrations,
    managers also revoke, renew and top up budgets, auditors only read."""

    REVIEWER = "reviewer"
    MANAGER = "manager"
    AUDITOR = "auditor"


#: Staff who decide on applications and registrations.
DECIDERS = frozenset({StaffRole.REVIEWER, StaffRole.MANAGER})
#: Staff who revoke, renew and move money.
MANAGERS = frozenset({StaffRole.MANAGER})
ALL_STAFF = frozenset(StaffRole)


class Unauthenticated(DomainError):
    code = "unauthenticated"
    status = 401
    title = "Authentication required"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer realm="nichiiki"'})


class ConfigurationError(RuntimeError):
    """The service cannot run as configured; the message says what to set."""


def audience(service: str) -> str:
    """The ``aud`` a token must name to be used at a service."""
    return f"nichiiki-{service.replace('_', '-')}"


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    role: Role
    municipality: str | None = None
    partner: str | None = None
    prefecture: str | None = None
    staff_role: StaffRole | None = None
    #: The sign-in session (``sid``); sign-out revokes it.
    session: str | None = None

    def ensure_resident(self, resident_id: str) -> None:
        """Residents see only their own data; staff and admin pass (their own checks apply)."""
        if self.role is Role.RESIDENT and self.subject != resident_id:
            raise Forbidden("a resident may only act on their own data")
        if self.role not in (Role.RESIDENT, Role.STAFF, Role.ADMIN):
            raise Forbidden(f"the role {self.role.value} may not read resident data")

    def ensure_municipality(self, municipality_code: str) -> None:
        """Staff act only for their own municipality; admin passes."""
        if self.role is Role.ADMIN:
            return
        if self.role is not Role.STAFF or self.municipality != municipality_code:
            raise Forbidden(f"staff of municipality {municipality_code} only")

    def ensure_reads_municipality(self, municipality_code: str) -> None:
        """Who may read a municipality's figures: its staff, its prefecture's readers, the
        ministry and admins."""
        if self.role in (Role.ADMIN, Role.MINISTRY):
            return
        if self.role is Role.PREFECTURE and self.prefecture is not None:
            with contextlib.suppress(UnknownMunicipality):
                if prefecture_of(municipality_code).code == self.prefecture:
                    return
        self.ensure_municipality(municipality_code)

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
    prefecture: str | None = None,
    staff_role: StaffRole | None = None,
    session: str | None = None,
    ttl: timedelta = timedelta(hours=1),
    audiences: Sequence[str] | None = None,
) -> str:
    """A development token (HS256 with the development key), accepted only in development.

    Staff get the manager role unless told otherwise (a development convenience: production
    tokens come from the identity provider, which always states it)."""
    now = datetime.now(UTC)
    claims: dict[str, Any] = {
        "sub": subject, "role": role.value, "iss": settings.jwt_issuer,
        "aud": list(audiences) if audiences is not None else [audience(s) for s in SERVICES],
        "iat": int(now.timestamp()), "nbf": int(now.timestamp()), "exp": int((now + ttl).timestamp()),
        "jti": str(uuid.uuid4()),
    }
    if role is Role.STAFF:
        if municipality is None:
            raise ValueError("a staff token names its municipality")
        claims["municipality"] = municipality
        claims["staff_role"] = (staff_role or StaffRole.MANAGER).value
    if role is Role.PARTNER:
        if partner is None:
            raise ValueError("a partner token names its partner")
        claims["partner"] = partner
    if role is Role.PREFECTURE:
        if prefecture is None:
            raise ValueError("a prefecture reader's token names its prefecture")
        claims["prefecture"] = prefecture
    if session is not None:
        claims["sid"] = session
    return jwt.encode(claims, settings.jwt_secret, algorithm=DEVELOPMENT_ALGORITHM)


def platform_claims(claims: dict[str, Any], claim_map: dict[str, str] | None = None) -> dict[str, Any]:
    """The claims under the names the services read: ``claim_map`` names where this issuer puts them,
    and a single app role in ``roles`` (Entra ID) stands for ``role``, written ``<role>`` or
    ``<role>.<qualifier>`` (``staff.reviewer``, ``partner.jal``, ``prefecture.300004``)."""
    mapped = dict(claims)
    for ours, theirs in (claim_map or {}).items():
        if theirs in claims:
            mapped[ours] = claims[theirs]
    roles = claims.get("roles")
    if "role" not in mapped and isinstance(roles, list) and len(roles) == 1 and isinstance(roles[0], str):
        role, _, qualifier = roles[0].partition(".")
        mapped["role"] = role
        where = {"staff": "staff_role", "partner": "partner", "prefecture": "prefecture"}.get(role)
        if where is not None and qualifier:
            mapped.setdefault(where, qualifier)
    return mapped


def principal_of(claims: dict[str, Any]) -> Principal:
    """The principal a verified token's claims describe (401 when they do not make one)."""
    try:
        role = Role(claims["role"])
        staff_role = StaffRole(claims["staff_role"]) if role is Role.STAFF else None
    except (KeyError, ValueError) as error:
        raise Unauthenticated(f"the token does not state a known role: {error}") from None
    principal = Principal(
        subject=str(claims["sub"]), role=role, municipality=claims.get("municipality") if role is Role.STAFF else None,
        partner=claims.get("partner") if role is Role.PARTNER else None,
        prefecture=claims.get("prefecture") if role is Role.PREFECTURE else None,
        staff_role=staff_role, session=claims.get("sid"),
    )
    if role is Role.STAFF and not principal.municipality:
        raise Unauthenticated("a staff token must name its municipality")
    if role is Role.PARTNER and not principal.partner:
        raise Unauthenticated("a partner token must name its partner")
    if role is Role.PREFECTURE and not principal.prefecture:
        raise Unauthenticated("a prefecture reader's token must name its prefecture")
    return principal


@dataclass(frozen=True, slots=True)
class _Verified:
    """A token that passed every check but the session's revocation (which runs on every request)."""

    principal: Principal
    #: The wall-clock time (s) from which its ``exp``, the leeway included, refuses it.
    expires_at: float
    #: When the issuer's keys that verified it were fetched (``None``: the development key): it is
    #: believed only while those keys are, so a key the issuer withdraws stops working as soon as now.
    keys_fetched_at: float | None


#: A token segment as issuers write it: base64url, unpadded.
_UNPADDED_BASE64URL = re.compile(rb"[A-Za-z0-9_-]*")


class _Segments(PyJWS):
    """PyJWT's JWS, reading a plain segment with one regular expression instead of a Python test per
    byte (about half the cost of checking a fresh token). A segment accepted here is decoded exactly
    as PyJWT decodes it; any other goes to PyJWT's own reading, which answers it (or refuses it)."""

    @staticmethod
    def _decode_base64url_segment(segment: bytes, name: str) -> bytes:
        if _UNPADDED_BASE64URL.fullmatch(segment) is not None and len(segment) % 4 != 1:
            try:
                decoded = base64url_decode(segment)
            except (TypeError, binascii.Error):
                pass
            else:
                if base64url_encode(decoded) == segment:  # canonical, as PyJWT requires
                    return decoded
        return PyJWS._decode_base64url_segment(segment, name)


class _PreparedHMAC(HMACAlgorithm):
    """HS256 whose key checks (not a PEM, SSH, DER or JWK key) run once per key, not per token: the
    prepared key depends on the key alone. A key PyJWT refuses is refused every time, as before."""

    def __init__(self) -> None:
        super().__init__(HMACAlgorithm.SHA256)
        self._prepared: dict[str | bytes, bytes] = {}

    def prepare_key(self, key: str | bytes) -> bytes:
        prepared = self._prepared.get(key)
        if prepared is None:
            prepared = super().prepare_key(key)
            if len(self._prepared) < 4:  # the development key; never a token's own input
                self._prepared[key] = prepared
        return prepared


class _Decoder(jwt.PyJWT):
    """``jwt.decode`` with every check it makes, at a lower cost per fresh token (``_Segments``,
    ``_PreparedHMAC``)."""

    def __init__(self) -> None:
        super().__init__()
        segments = _Segments(options=self._get_sig_options())
        segments.unregister_algorithm(DEVELOPMENT_ALGORITHM)
        segments.register_algorithm(DEVELOPMENT_ALGORITHM, _PreparedHMAC())
        self._jws = segments


_decoder = _Decoder()


class JwksKeys:
    """The issuer's signing keys, from its discovery document's ``jwks_uri``, cached."""

    def __init__(self, issuer: str, http: httpx.AsyncClient | None = None) -> None:
        self.issuer = issuer.rstrip("/")
        self._http = http
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = -JWKS_TTL_S
        self._lock = asyncio.Lock()

    async def key(self, kid: str | None) -> jwt.PyJWK:
        now = time.monotonic()
        stale = now - self._fetched_at > JWKS_TTL_S
        unknown = kid not in self._keys and now - self._fetched_at > JWKS_MIN_REFRESH_S
        if stale or unknown:
            await self._refresh(now)
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        found = self._keys.get(kid or "")
        if found is None:
            raise Unauthenticated("the token's signing key is not one the issuer publishes")
        return found

    @property
    def fetched_at(self) -> float:
        """When the keys ``key`` hands out now were fetched (``time.monotonic``)."""
        return self._fetched_at

    def trusts(self, fetched_at: float) -> bool:
        """Whether a key of the fetch made at ``fetched_at`` is one ``key`` would still hand out
        unchecked: no fetch since, and that one not yet due again."""
        return fetched_at == self._fetched_at and time.monotonic() - fetched_at <= JWKS_TTL_S

    async def _refresh(self, started: float) -> None:
        async with self._lock:
            if self._fetched_at >= started:
                return  # another request refreshed while this one waited
            http = self._http or httpx.AsyncClient(timeout=5.0)
            try:
                discovery = (await http.get(f"{self.issuer}/.well-known/openid-configuration")).json()
                document = (await http.get(discovery["jwks_uri"])).json()
            except (httpx.HTTPError, ValueError, KeyError) as error:
                log.warning("the issuer's keys could not be fetched", issuer=self.issuer, error=repr(error))
                if self._keys:
                    return  # keep the keys we have; a rotation will be picked up later
                raise Unauthenticated("the token issuer's keys are unavailable") from error
            finally:
                if self._http is None:
                    await http.aclose()
            keys: dict[str, jwt.PyJWK] = {}
            for entry in document.get("keys", []):
                if entry.get("use", "sig") != "sig" or entry.get("alg", "ES256") not in ASYMMETRIC_ALGORITHMS:
                    continue
                try:
                    keys[str(entry.get("kid", ""))] = jwt.PyJWK(entry)
                except jwt.PyJWTError as error:
                    log.warning("an unusable key in the issuer's JWKS", kid=entry.get("kid"), error=repr(error))
            self._keys = keys
            self._fetched_at = time.monotonic()


class TokenVerifier:
    """Verifies bearer tokens for one service (``audience(service)``)."""

    def __init__(self, settings: Settings, service: str, *, http: httpx.AsyncClient | None = None) -> None:
        self.settings = settings
        self.audience = settings.oidc_audience or audience(service)
        self.development = settings.env == "development"
        if not self.development and not settings.oidc_issuer:
            raise ConfigurationError(
                f"{service}: NICHIIKI_OIDC_ISSUER is not set. Outside development every token must come from an "
                "OpenID Connect issuer: set NICHIIKI_OIDC_ISSUER to its URL (the embedded identity service, "
                "Keycloak, Entra ID; see docs/identity.md), or NICHIIKI_ENV=development to use the development key."
            )
        self.keys = JwksKeys(settings.oidc_issuer, http) if settings.oidc_issuer else None
        self._redis: Redis | None = None
        self._not_revoked: dict[str, float] = {}
        # Ordered: the oldest goes in O(1) (a dict's first key is found by a scan past the deleted ones).
        self._verified: OrderedDict[str, _Verified] = OrderedDict()
        self._headers: dict[str, dict[str, Any]] = {}

    async def principal(self, token: str) -> Principal:
        """The caller a bearer token names; ``Unauthenticated`` for any token not to be accepted.

        A token verified lately is not verified again until its ``exp`` (or the keys that verified
        it are due to be fetched again); whether its session was signed out is asked every time."""
        verified = self._verified.get(token)
        if verified is None or not self._still_valid(verified):
            self._verified.pop(token, None)
            verified = await self._verify(token)
            self._remember(token, verified)
        principal = verified.principal
        if principal.session is not None and await self._revoked(principal.session):
            raise Unauthenticated("the session was signed out")
        return principal

    def _still_valid(self, verified: _Verified) -> bool:
        if time.time() >= verified.expires_at:
            return False
        return verified.keys_fetched_at is None or (
            self.keys is not None and self.keys.trusts(verified.keys_fetched_at)
        )

    def _remember(self, token: str, verified: _Verified) -> None:
        if token not in self._verified and len(self._verified) >= VERIFIED_TOKENS:
            self._verified.popitem(last=False)  # the oldest
        self._verified[token] = verified

    def _header(self, token: str) -> dict[str, Any]:
        """The token's header, parsed by PyJWT once per distinct encoded header."""
        encoded = token.partition(".")[0]
        header = self._headers.get(encoded)
        if header is None:
            try:
                header = jwt.get_unverified_header(token)
            except jwt.PyJWTError as error:
                raise Unauthenticated(f"invalid bearer token: {error}") from None
            if len(self._headers) >= PARSED_HEADERS:
                self._headers.clear()
            self._headers[encoded] = header
        return header

    async def _verify(self, token: str) -> _Verified:
        header = self._header(token)
        algorithm = header.get("alg")
        keys_fetched_at: float | None = None
        if algorithm in ASYMMETRIC_ALGORITHMS and self.keys is not None:
            key: Any = (await self.keys.key(header.get("kid"))).key
            keys_fetched_at = self.keys.fetched_at  # read with the key, no await between
            issuer = self.keys.issuer
        elif algorithm == DEVELOPMENT_ALGORITHM and self.development:
            key, issuer = self.settings.jwt_secret, self.settings.jwt_issuer
        else:
            raise Unauthenticated(f"tokens signed with {algorithm!r} are not accepted here")
        try:
            claims: dict[str, Any] = _decoder.decode(
                token, key, algorithms=[algorithm], audience=self.audience, issuer=issuer, leeway=LEEWAY_S,
                options={"require": ["sub", "exp", "iat", "iss", "aud"]},
            )
        except jwt.PyJWTError as error:
            raise Unauthenticated(f"invalid bearer token: {error}") from None
        if int(claims["exp"]) - int(claims["iat"]) > self.settings.token_max_lifetime_s:
            raise Unauthenticated(
                f"the token lives longer than the {self.settings.token_max_lifetime_s} s this platform accepts"
            )
        principal = principal_of(platform_claims(claims, self.settings.oidc_claim_map))
        # PyJWT refuses a token once ``exp <= now - leeway``.
        return _Verified(principal, int(claims["exp"]) + LEEWAY_S, keys_fetched_at)

    async def _revoked(self, session: str) -> bool:
        if not self.settings.redis_url:
            return False
        now = time.monotonic()
        if self._not_revoked.get(session, 0.0) > now:
            return False
        if self._redis is None:
            self._redis = Redis.from_url(self.settings.redis_url)
        if await self._redis.exists(REVOKED_SESSION_PREFIX + session):
            return True
        if len(self._not_revoked) > 100_000:
            self._not_revoked.clear()
        self._not_revoked[session] = now + REVOCATION_CACHE_S
        return False

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()


_BEARER = {
    "scheme_name": "bearer", "bearerFormat": "JWT",
    "description": "An access token from the identity provider (docs/identity.md).",
}
#: The OpenAPI security scheme of every authenticated operation (Swagger's Authorize button).
bearer_scheme = HTTPBearer(auto_error=False, **_BEARER)


class _BearerCaller(HTTPBearer):
    """``current_principal``: the bearer scheme that also verifies the token. One dependency, not a
    verifier over a scheme: FastAPI resolves every dependency of every request in turn."""

    async def __call__(self, request: Request) -> Principal:  # type: ignore[override]
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("send a bearer token in the Authorization header")
        verifier: TokenVerifier = request.app.state.verifier
        principal = await verifier.principal(token)
        request.state.principal_kind = principal.role.value  # the access log's caller kind (never who)
        return principal


#: The caller of a request, from its bearer token: ``Depends(current_principal)``, or
#: ``await current_principal(request)``. Declares the same OpenAPI security scheme as ``bearer_scheme``.
current_principal = _BearerCaller(auto_error=False, **_BEARER)


def require(
    *roles: Role, staff: Collection[StaffRole] = ALL_STAFF
) -> Callable[[Principal], Awaitable[Principal]]:
    """A dependency that admits only the given roles (401 without a token, 403 with another role);
    staff only with one of the ``staff`` roles."""
    allowed_staff = frozenset(staff)

    async def dependency(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
        if principal.role not in roles:
            raise Forbidden(f"this needs one of the roles: {', '.join(r.value for r in roles)}")
        if principal.role is Role.STAFF and principal.staff_role not in allowed_staff:
            raise Forbidden(f"this needs a staff role of: {', '.join(sorted(r.value for r in allowed_staff))}")
        return principal

    return dependency
