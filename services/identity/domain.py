"""The identity provider's rules, pure: who may hold which account, passwords, lockout, TOTP,
sessions and refresh tokens, the claims of an access token, how long a rotated key stays published.

Nothing here reads a clock, a database or a random source: instants and random values come in as
parameters, so every rule is checked by plain unit tests (tests/unit/test_identity_domain.py).
"""

from __future__ import annotations

import enum
import hmac
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal
from urllib.parse import quote

import pyotp

from shared.kit.auth import audience
from shared.kit.errors import Conflict, DomainError, NotFound
from shared.kit.ids import new_id, random_hex
from shared.reference import UnknownMunicipality, municipality

#: Access tokens live 15 minutes (services accept at most NICHIIKI_TOKEN_MAX_LIFETIME_S, 3600 s).
ACCESS_TOKEN_LIFETIME = timedelta(minutes=15)
#: The longest lifetime a service accepts (the kit's default NICHIIKI_TOKEN_MAX_LIFETIME_S): a sign-out
#: keeps its session id in Redis this long, a rotated-out key stays published this long (plus skew).
MAX_TOKEN_LIFETIME = timedelta(seconds=3600)
#: Clock skew allowed between the provider and the services.
CLOCK_SKEW = timedelta(minutes=5)

#: After this many failed sign-ins of one account within the window, the account is locked.
LOCKOUT_THRESHOLD = 5
LOCKOUT_WINDOW = timedelta(minutes=15)
LOCKOUT_DURATION = timedelta(minutes=15)

MIN_PASSWORD_LENGTH = 12
#: argon2 hashes whatever it is given; an upper bound keeps a sign-in's cost bounded.
MAX_PASSWORD_LENGTH = 256

#: RFC 6238 defaults (what every authenticator app uses): 30 s steps, 6 digits, SHA-1.
TOTP_STEP_S = 30
#: Steps either side of now that are accepted (a phone's clock a little off, a code typed slowly).
TOTP_DRIFT_STEPS = 1
TOTP_ISSUER_NAME = "Nichiiki"

#: The audience of the identity service's own API (``/v1/accounts/me/…``, the admin API).
IDENTITY_AUDIENCE = audience("identity")

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_CODE6 = re.compile(r"^[0-9]{6}$")
_TOTP_CODE = re.compile(r"^[0-9]{6}$")
_CLIENT_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{2,63}$")


class AccountRole(enum.StrEnum):
    """Roles of people who sign in with a password (the ``role`` claim)."""

    RESIDENT = "resident"
    STAFF = "staff"
    PREFECTURE = "prefecture"
    MINISTRY = "ministry"
    ADMIN = "admin"


class ClientRole(enum.StrEnum):
    """Roles of systems that sign in with client credentials (the ``role`` claim)."""

    PARTNER = "partner"
    PAYMENT_PROVIDER = "payment_provider"


class StaffRole(enum.StrEnum):
    REVIEWER = "reviewer"  # approves and rejects
    MANAGER = "manager"  # also revokes, renews and tops up budgets
    AUDITOR = "auditor"  # reads only


# --- refusals of the account API (problem+json) --------------------------------------------------


class WeakPassword(DomainError):
    code = "weak-password"
    status = 422
    title = "The password does not meet the policy"


class InvalidEmail(DomainError):
    code = "invalid-email"
    status = 422
    title = "Not an e-mail address"


class EmailTaken(Conflict):
    code = "email-taken"
    title = "An account with this e-mail exists"


class InvalidAccount(DomainError):
    code = "invalid-account"
    status = 422
    title = "The account does not fit its role"


class InvalidClient(DomainError):
    code = "invalid-client"
    status = 422
    title = "The client does not fit its role"


class ClientExists(Conflict):
    code = "client-exists"
    title = "A client with this id exists"


class AccountNotFound(NotFound):
    code = "account-not-found"
    title = "No such account"


class TotpAlreadyEnabled(Conflict):
    code = "totp-already-enabled"
    title = "TOTP is enabled already"


class TotpNotPending(Conflict):
    code = "totp-not-pending"
    title = "No TOTP enrolment is pending"


class InvalidTotpCode(DomainError):
    code = "invalid-totp-code"
    status = 422
    title = "The TOTP code is not valid now"


# --- OAuth 2.0 protocol errors (RFC 6749 §5.2; not problem+json) ---------------------------------


class OAuthError(Exception):
    """An OAuth error answer: ``{"error": ..., "error_description": ...}``, 400 (401 for a client)."""

    def __init__(self, error: str, description: str, *, status: int = 400) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status


def invalid_grant(description: str) -> OAuthError:
    return OAuthError("invalid_grant", description)


def invalid_client(description: str = "client authentication failed") -> OAuthError:
    return OAuthError("invalid_client", description, status=401)


def invalid_request(description: str) -> OAuthError:
    return OAuthError("invalid_request", description)


BAD_CREDENTIALS = "the username or password is not correct"
LOCKED = "the account is locked for 15 minutes after repeated failed sign-ins; try again later"
TOTP_REQUIRED = "this account signs in with a TOTP code: send it as the totp parameter"
TOTP_WRONG = "the TOTP code is not correct"


# --- accounts ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Account:
    account_id: str
    email: str
    role: AccountRole
    password_hash: str
    municipality: str | None = None
    staff_role: StaffRole | None = None
    prefecture: str | None = None
    totp_secret: str | None = None
    totp_enabled: bool = False
    totp_last_step: int | None = None
    locked_until: datetime | None = None


@dataclass(frozen=True, slots=True)
class Client:
    client_id: str
    role: ClientRole
    secret_hash: str
    partner: str | None = None


def normalise_email(email: str) -> str:
    address = email.strip().lower()
    if len(address) > 254 or _EMAIL.fullmatch(address) is None:
        raise InvalidEmail("send an e-mail address such as name@example.jp")
    return address


def check_password(password: str, email: str) -> str:
    """The password policy: at least 12 characters, at most 256, and not the e-mail (nor its local part)."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise WeakPassword(f"a password has at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise WeakPassword(f"a password has at most {MAX_PASSWORD_LENGTH} characters")
    folded = password.strip().casefold()
    if folded in (email.casefold(), email.casefold().partition("@")[0]):
        raise WeakPassword("the password must not be the e-mail address")
    return password


def check_account_shape(
    role: AccountRole, *, municipality_code: str | None, staff_role: StaffRole | None, prefecture: str | None
) -> None:
    """Staff name their municipality and staff role, prefecture readers their prefecture; nobody else any."""
    if role is AccountRole.STAFF:
        if municipality_code is None or staff_role is None:
            raise InvalidAccount("a staff account names its municipality and staff_role")
        if not _is_kind(municipality_code, municipal=True):
            raise InvalidAccount(f"{municipality_code!r} is not a municipality code")
    elif municipality_code is not None or staff_role is not None:
        raise InvalidAccount("only staff accounts name a municipality and staff_role")
    if role is AccountRole.PREFECTURE:
        if prefecture is None or not _is_kind(prefecture, municipal=False):
            raise InvalidAccount("a prefecture reader names a prefecture code (e.g. 300004 和歌山県)")
    elif prefecture is not None:
        raise InvalidAccount("only prefecture readers name a prefecture")
    if role is AccountRole.RESIDENT:
        raise InvalidAccount("residents sign up themselves")


def _is_kind(code: str, *, municipal: bool) -> bool:
    if _CODE6.fullmatch(code) is None:
        return False
    try:
        entry = municipality(code)
    except UnknownMunicipality:
        return False
    return (entry.kind != "prefecture") is municipal


def check_client(client_id: str, role: ClientRole, partner: str | None) -> None:
    """A well-formed client. Whether a partner code names a partner is the gateway's to say (partners
    are registered there at run time): its routes refuse a token of a partner it does not know."""
    if _CLIENT_ID.fullmatch(client_id) is None:
        raise InvalidClient("a client id is 3-64 lower-case letters, digits and . _ -")
    if role is ClientRole.PARTNER:
        if partner is None or _PARTNER_CODE.fullmatch(partner) is None:
            raise InvalidClient("a partner client names its partner's code (2-32 lower-case letters, digits, _ -)")
    elif partner is not None:
        raise InvalidClient("only partner clients name a partner")


_PARTNER_CODE = re.compile(r"^[a-z0-9][a-z0-9_-]{1,31}$")


def new_account_id(role: AccountRole, draw: Callable[[], str] = random_hex) -> str:
    """``res-<32 hex>`` for a resident (registration takes the token's subject as the resident id),
    ``usr-<32 hex>`` for anyone else; never one that looks like a My Number (``shared.kit.ids``)."""
    return new_id("res" if role is AccountRole.RESIDENT else "usr", draw=draw)


# --- lockout -------------------------------------------------------------------------------------


def is_locked(locked_until: datetime | None, now: datetime) -> bool:
    return locked_until is not None and now < locked_until


def failure_window_start(now: datetime) -> datetime:
    """Failures since this instant count towards a lock."""
    return now - LOCKOUT_WINDOW


def lock_after_failure(failures_in_window: int, now: datetime) -> datetime | None:
    """Until when the account is locked, given its failures within the window (the new one
    included); None while below the threshold."""
    if failures_in_window >= LOCKOUT_THRESHOLD:
        return now + LOCKOUT_DURATION
    return None


# --- TOTP ----------------------------------------------------------------------------------------


def totp_step(at: datetime) -> int:
    return int(at.timestamp()) // TOTP_STEP_S


def accepted_totp_step(secret: str, code: str, now: datetime, last_step: int | None) -> int | None:
    """The time step a code matches (now, or a step either side), if it is later than the last one
    accepted (RFC 6238 §5.2: a code is good once); None when the code is refused."""
    if _TOTP_CODE.fullmatch(code) is None:
        return None
    totp = pyotp.TOTP(secret)
    current = totp_step(now)
    for step in range(current - TOTP_DRIFT_STEPS, current + TOTP_DRIFT_STEPS + 1):
        if last_step is not None and step <= last_step:
            continue
        if hmac.compare_digest(totp.at(step * TOTP_STEP_S), code):
            return step
    return None


def totp_uri(secret: str, email: str) -> str:
    """The ``otpauth://`` URI an authenticator app reads (as a QR code)."""
    label = quote(f"{TOTP_ISSUER_NAME}:{email}", safe="@:")
    return f"otpauth://totp/{label}?secret={secret}&issuer={TOTP_ISSUER_NAME}&algorithm=SHA1&digits=6&period=30"


def totp_required(account: Account) -> bool:
    """An account that enrolled TOTP (staff must; residents may) passes it at every sign-in."""
    return account.totp_enabled


def must_enrol_totp(account: Account) -> bool:
    """Staff without TOTP get an enrolment-only sign-in (the identity service's own API, no refresh)."""
    return account.role is AccountRole.STAFF and not account.totp_enabled


# --- sessions and refresh tokens -----------------------------------------------------------------


def session_lifetime(role: AccountRole) -> timedelta:
    """How long a sign-in lasts through refreshes: a resident's phone a month, a work account a day's shift."""
    return timedelta(days=30) if role is AccountRole.RESIDENT else timedelta(hours=12)


RefreshVerdict = Literal["ok", "unknown", "reused", "revoked", "expired", "enrolment_only"]


@dataclass(frozen=True, slots=True)
class RefreshState:
    """A presented refresh token as the database knows it (None fields: no such token)."""

    used_at: datetime | None
    session_revoked_at: datetime | None
    session_expires_at: datetime
    full_access: bool


def judge_refresh(state: RefreshState | None, now: datetime) -> RefreshVerdict:
    """What a refresh-token grant does: rotate (ok), or refuse; ``reused`` (a rotated token presented
    again: stolen, or replayed) also revokes the whole session."""
    if state is None:
        return "unknown"
    if state.session_revoked_at is not None:
        return "revoked"
    if state.used_at is not None:
        return "reused"
    if now >= state.session_expires_at:
        return "expired"
    if not state.full_access:
        return "enrolment_only"
    return "ok"


# --- access tokens -------------------------------------------------------------------------------


def audiences(services: Sequence[str]) -> list[str]:
    """Every service's audience (``nichiiki-<service>``, ``_`` as ``-``), the identity service's own
    among them, each once, in order."""
    return list(dict.fromkeys([*(audience(s) for s in services), IDENTITY_AUDIENCE]))


@dataclass(frozen=True, slots=True)
class Grantee:
    """Whom a token is for: the subject and the claims that follow from their account or client."""

    subject: str
    role: str
    municipality: str | None = None
    staff_role: str | None = None
    prefecture: str | None = None
    partner: str | None = None

    @classmethod
    def of_account(cls, account: Account) -> Grantee:
        return cls(
            account.account_id, account.role.value, municipality=account.municipality,
            staff_role=account.staff_role.value if account.staff_role else None, prefecture=account.prefecture,
        )

    @classmethod
    def of_client(cls, client: Client) -> Grantee:
        return cls(client.client_id, client.role.value, partner=client.partner)


def access_claims(
    grantee: Grantee,
    *,
    issuer: str,
    audience: Sequence[str],
    now: datetime,
    jti: str,
    session_id: str | None = None,
    amr: Sequence[str] = (),
    lifetime: timedelta = ACCESS_TOKEN_LIFETIME,
) -> dict[str, Any]:
    """The claims of an access token (docs/identity.md): each role's own claims only, no others."""
    issued = int(now.timestamp())
    claims: dict[str, Any] = {
        "iss": issuer, "sub": grantee.subject, "aud": list(audience),
        "iat": issued, "nbf": issued, "exp": issued + int(lifetime.total_seconds()),
        "jti": jti, "role": grantee.role,
    }
    if session_id is not None:
        claims["sid"] = session_id
    if grantee.role == AccountRole.STAFF:
        claims["municipality"] = grantee.municipality
        claims["staff_role"] = grantee.staff_role
    if grantee.role == AccountRole.PREFECTURE:
        claims["prefecture"] = grantee.prefecture
    if grantee.role == ClientRole.PARTNER:
        claims["partner"] = grantee.partner
    if amr:
        claims["amr"] = list(amr)
    return claims


def amr_of(used_totp: bool) -> list[str]:
    """Authentication methods (RFC 8176): a password, and a one-time password when TOTP was passed."""
    return ["pwd", "otp"] if used_totp else ["pwd"]


# --- signing keys --------------------------------------------------------------------------------


def publish_until(retired_at: datetime, max_token_lifetime: timedelta = MAX_TOKEN_LIFETIME) -> datetime:
    """A key rotated out stays in the JWKS until every token it may have signed has expired (any
    token a service accepts lives at most ``max_token_lifetime``)."""
    return retired_at + max_token_lifetime + CLOCK_SKEW


def published(retired_at: datetime | None, until: datetime | None, now: datetime) -> bool:
    return retired_at is None or (until is not None and now < until)
