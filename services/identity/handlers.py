"""Use cases of the identity provider.

Two kinds:

- the OAuth 2.0 protocol (``/oauth/token``, ``/oauth/revoke``): form-encoded requests answered with
  OAuth JSON errors; they are not idempotent writes of a resource, so they run their own short
  transaction (a failed sign-in must commit its failure record while the request is refused);
- account management (sign-up, admin API, TOTP enrolment, key rotation): HTTP writes through the
  kit's use-case runner (``write.run``), like every other service's.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import jwt
import structlog
from cryptography.hazmat.primitives.asymmetric import ec
from redis.asyncio import Redis

from services.identity import crypto, store
from services.identity.development import DEMO_TOTP_SECRET, DEV_ACCOUNTS, DEV_CLIENTS
from services.identity.domain import (
    ACCESS_TOKEN_LIFETIME,
    BAD_CREDENTIALS,
    CLOCK_SKEW,
    IDENTITY_AUDIENCE,
    LOCKED,
    MAX_TOKEN_LIFETIME,
    TOTP_REQUIRED,
    TOTP_WRONG,
    Account,
    AccountNotFound,
    AccountRole,
    Client,
    ClientExists,
    ClientRole,
    EmailTaken,
    Grantee,
    InvalidEmail,
    InvalidTotpCode,
    OAuthError,
    StaffRole,
    TotpAlreadyEnabled,
    TotpNotPending,
    WeakPassword,
    accepted_totp_step,
    access_claims,
    amr_of,
    check_account_shape,
    check_client,
    check_password,
    failure_window_start,
    invalid_client,
    invalid_grant,
    is_locked,
    judge_refresh,
    lock_after_failure,
    must_enrol_totp,
    new_account_id,
    normalise_email,
    publish_until,
    session_lifetime,
    totp_required,
    totp_uri,
)
from shared.kit import auth
from shared.kit.auth import REVOKED_SESSION_PREFIX, Principal, Role, Unauthenticated
from shared.kit.db import Connection
from shared.kit.service import ServiceRuntime, UnitOfWork
from shared.kit.use_case import Outcome, Write

log = structlog.get_logger(__name__)

SERVICE = "identity"
REDIS_STATE = "redis"
#: An answer holding a token or a secret must not be kept by a cache on the way (RFC 6749 §5.1).
NO_STORE = {"cache-control": "no-store", "pragma": "no-cache"}
_KEY_LOCK = "identity:signing-key"
_BOOTSTRAP_LOCK = "identity:bootstrap-admin"


@dataclass(frozen=True, slots=True)
class Provider:
    """What the provider says about itself: its issuer URL and the audiences of its tokens."""

    issuer: str
    audience: Sequence[str]
    #: The longest lifetime the services accept (NICHIIKI_TOKEN_MAX_LIFETIME_S): how long a sign-out
    #: is kept in Redis and a rotated-out key stays published.
    max_token_lifetime: timedelta = MAX_TOKEN_LIFETIME
    key_passphrase: str | None = None

    @property
    def access_lifetime(self) -> timedelta:
        return min(ACCESS_TOKEN_LIFETIME, self.max_token_lifetime)

    @property
    def base(self) -> str:
        return self.issuer.rstrip("/")


def account_view(account: Account) -> dict[str, Any]:
    return {
        "account_id": account.account_id, "email": account.email, "role": account.role.value,
        "municipality": account.municipality, "staff_role": account.staff_role.value if account.staff_role else None,
        "prefecture": account.prefecture, "totp_enabled": account.totp_enabled,
    }


def sign_up_caller(email: str) -> Principal:
    """Who signs up (a public route has no token): the e-mail claimed, hashed so that no address is
    kept in an Idempotency-Key scope. One person's retried sign-up replays; another's never does."""
    digest = hashlib.sha256(email.strip().lower().encode()).hexdigest()[:32]
    return Principal(subject=f"sign-up:{digest}", role=Role.RESIDENT)


class IdentityService:
    def __init__(self, runtime: ServiceRuntime, provider: Provider) -> None:
        self.runtime = runtime
        self.provider = provider
        self._private_keys: dict[str, ec.EllipticCurvePrivateKey] = {}

    @property
    def clock_now(self) -> datetime:
        return self.runtime.clock.now()

    # --- discovery and keys ----------------------------------------------------------------------

    def discovery(self) -> dict[str, Any]:
        base = self.provider.base
        return {
            "issuer": self.provider.issuer,
            "jwks_uri": f"{base}/jwks.json",
            "token_endpoint": f"{base}/oauth/token",
            "revocation_endpoint": f"{base}/oauth/revoke",
            "grant_types_supported": ["password", "client_credentials", "refresh_token"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "revocation_endpoint_auth_methods_supported": ["none"],
            "id_token_signing_alg_values_supported": [crypto.ALGORITHM],
            "token_endpoint_auth_signing_alg_values_supported": [crypto.ALGORITHM],
            "subject_types_supported": ["public"],
            "claims_supported": [
                "iss", "sub", "aud", "exp", "nbf", "iat", "jti", "sid", "role", "municipality", "staff_role",
                "prefecture", "partner", "amr",
            ],
        }

    async def jwks(self) -> dict[str, Any]:
        async with self.runtime.pool.acquire() as conn:
            return {"keys": await store.published_keys(conn, self.clock_now)}

    async def ensure_signing_key(self) -> None:
        """A signing key exists from the first start on (replicas starting together make one)."""
        async with self.runtime.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", _KEY_LOCK)
            if await store.active_key(conn) is None:
                kid = await self._add_key(conn, self.clock_now)
                log.info("signing key created", kid=kid)

    async def rotate_signing_key(self, conn: Connection) -> dict[str, Any]:
        """A new signing key from now on; the previous one stays published until its tokens expired.
        Run it in a transaction (the admin route does; so can an operator's script)."""
        now = self.clock_now
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", _KEY_LOCK)
        until = publish_until(now, self.provider.max_token_lifetime)
        retired = await store.retire_active_key(conn, now, until)
        kid = await self._add_key(conn, now)
        log.info("signing key rotated", kid=kid, retired=retired)
        return {"kid": kid, "retired_kid": retired, "retired_key_published_until": until.isoformat()}

    async def _add_key(self, conn: Connection, now: datetime) -> str:
        key = crypto.new_signing_key()
        jwk = crypto.public_jwk(key)
        await store.insert_key(conn, jwk["kid"], crypto.private_pem(key, self.provider.key_passphrase), jwk, now)
        self._private_keys[jwk["kid"]] = key
        return jwk["kid"]

    async def _signing_key(self, conn: Connection) -> tuple[str, ec.EllipticCurvePrivateKey]:
        # Read on every issue: another replica may have rotated (its key then signs here too at once).
        stored = await store.active_key(conn)
        if stored is None:
            raise RuntimeError("no signing key: the service did not start")
        key = self._private_keys.get(stored.kid)
        if key is None:
            key = crypto.load_private_pem(stored.private_pem, self.provider.key_passphrase)
            self._private_keys[stored.kid] = key
        return stored.kid, key

    async def _sign(
        self, conn: Connection, grantee: Grantee, now: datetime, *, session_id: str | None = None,
        amr: Sequence[str] = (), audience: Sequence[str] | None = None,
    ) -> str:
        kid, key = await self._signing_key(conn)
        claims = access_claims(
            grantee, issuer=self.provider.issuer, audience=audience or self.provider.audience, now=now,
            jti=str(uuid.uuid4()), session_id=session_id, amr=amr, lifetime=self.provider.access_lifetime,
        )
        return crypto.sign(claims, key, kid)

    # --- the token endpoint ----------------------------------------------------------------------

    async def password_grant(self, username: str, password: str, totp: str | None) -> dict[str, Any]:
        """Sign a person in. Refusals are ``invalid_grant``; wrong passwords and TOTP codes count
        towards the account's lock, and the count is committed even though the answer is a refusal."""
        try:
            email = normalise_email(username)
        except InvalidEmail:
            await asyncio.to_thread(crypto.verify_secret, None, password)
            raise invalid_grant(BAD_CREDENTIALS) from None
        now = self.clock_now
        refusal: OAuthError | None = None
        async with self.runtime.pool.acquire() as conn, conn.transaction():
            # Locked: concurrent sign-ins of one account are counted one after the other.
            account = await store.account_by_email(conn, email, lock=True)
            if account is None:
                await asyncio.to_thread(crypto.verify_secret, None, password)
                raise invalid_grant(BAD_CREDENTIALS)
            if is_locked(account.locked_until, now):
                log.info("sign-in refused: account locked", account=account.account_id)
                raise invalid_grant(LOCKED)
            used_totp = False
            if not await asyncio.to_thread(crypto.verify_secret, account.password_hash, password):
                refusal = await self._failed(conn, account, now, "password", BAD_CREDENTIALS)
            elif totp_required(account):
                if not totp:
                    raise invalid_grant(TOTP_REQUIRED)  # the password was right: nothing to count
                assert account.totp_secret is not None
                step = accepted_totp_step(account.totp_secret, totp, now, account.totp_last_step)
                if step is None:
                    refusal = await self._failed(conn, account, now, "totp", TOTP_WRONG)
                else:
                    await store.use_totp_step(conn, account.account_id, step)
                    used_totp = True
            if refusal is None:
                await store.clear_failures(conn, account.account_id)
                answer = await self._open_session(conn, account, now, amr_of(used_totp))
        if refusal is not None:
            raise refusal
        log.info("signed in", account=account.account_id, role=account.role.value)
        return answer

    async def _failed(
        self, conn: Connection, account: Account, now: datetime, reason: str, description: str
    ) -> OAuthError:
        failures = await store.add_failure(conn, account.account_id, now, reason, failure_window_start(now))
        until = lock_after_failure(failures, now)
        if until is not None:
            await store.lock(conn, account.account_id, until)
            log.warning("account locked after failed sign-ins", account=account.account_id, until=until.isoformat())
            return invalid_grant(LOCKED)
        log.info("sign-in failed", account=account.account_id, reason=reason, failures=failures)
        return invalid_grant(description)

    async def _open_session(
        self, conn: Connection, account: Account, now: datetime, amr: list[str]
    ) -> dict[str, Any]:
        session_id = str(uuid.uuid4())
        enrolment_only = must_enrol_totp(account)
        await store.insert_session(
            conn, session_id, account.account_id, amr=amr, full_access=not enrolment_only, at=now,
            expires_at=now + session_lifetime(account.role),
        )
        grantee = Grantee.of_account(account)
        if enrolment_only:
            # Staff without TOTP: a token for the identity service's own API alone (enrol, confirm),
            # no refresh token; no other service accepts its audience.
            token = await self._sign(conn, grantee, now, session_id=session_id, amr=amr, audience=[IDENTITY_AUDIENCE])
            return {**_bearer(token, self.provider.access_lifetime), "totp_enrolment_required": True}
        refresh = crypto.new_refresh_token()
        await store.insert_refresh_token(conn, crypto.refresh_token_hash(refresh), session_id, now)
        token = await self._sign(conn, grantee, now, session_id=session_id, amr=amr)
        return {**_bearer(token, self.provider.access_lifetime), "refresh_token": refresh}

    async def client_credentials_grant(self, client_id: str, client_secret: str) -> dict[str, Any]:
        async with self.runtime.pool.acquire() as conn:
            client = await store.client_by_id(conn, client_id)
            if not await asyncio.to_thread(crypto.verify_secret, client.secret_hash if client else None,
                                           client_secret):
                log.info("client authentication failed", client=client_id)
                raise invalid_client()
            assert client is not None
            token = await self._sign(conn, Grantee.of_client(client), self.clock_now)
        log.info("client signed in", client=client.client_id, role=client.role.value)
        return _bearer(token, self.provider.access_lifetime)

    async def refresh_grant(self, refresh_token: str) -> dict[str, Any]:
        """Rotate: the presented token is spent and a new one issued in the same session. A spent
        token presented again revokes the session (one of the two holders is not its owner)."""
        now = self.clock_now
        token_hash = crypto.refresh_token_hash(refresh_token)
        refusal: OAuthError | None = None
        reused_session: str | None = None
        async with self.runtime.pool.acquire() as conn, conn.transaction():
            presented = await store.refresh_token(conn, token_hash)
            verdict = judge_refresh(presented.state if presented else None, now)
            if verdict == "ok":
                assert presented is not None
                account = await store.account_by_id(conn, presented.session.account_id)
                if account is None:
                    raise invalid_grant("the refresh token is not valid")
                await store.use_refresh_token(conn, token_hash, now)
                refresh = crypto.new_refresh_token()
                session_id = presented.session.session_id
                await store.insert_refresh_token(conn, crypto.refresh_token_hash(refresh), session_id, now)
                token = await self._sign(
                    conn, Grantee.of_account(account), now, session_id=session_id, amr=presented.session.amr
                )
                answer = {**_bearer(token, self.provider.access_lifetime), "refresh_token": refresh}
            elif verdict == "reused":
                assert presented is not None
                reused_session = presented.session.session_id
                await store.revoke_session(conn, reused_session, now, "refresh_token_reused")
                refusal = invalid_grant("the refresh token was used before: the session is revoked, sign in again")
            elif verdict in ("revoked", "expired"):
                refusal = invalid_grant(f"the session is {verdict}: sign in again")
            else:
                refusal = invalid_grant("the refresh token is not valid")
        if reused_session is not None:
            log.warning("refresh token reused: session revoked", session=reused_session)
            try:
                await self._announce_revoked(reused_session)
            except Exception as error:  # the database revocation stands; the tokens expire within 15 minutes
                log.error("could not announce the revoked session", session=reused_session, error=repr(error))
        if refusal is not None:
            raise refusal
        return answer

    # --- the revocation endpoint (sign-out) ------------------------------------------------------

    async def revoke(self, token: str) -> None:
        """Sign out the session of an access or refresh token (RFC 7009: an unknown token is no error).
        The session's refresh tokens die with it, and every service learns its id through Redis."""
        now = self.clock_now
        async with self.runtime.pool.acquire() as conn, conn.transaction():
            session_id = await self._session_of(conn, token)
            if session_id is None:
                return
            await store.revoke_session(conn, session_id, now, "sign_out")
        # After the commit; a failure here answers 503 and the client's retry announces it again.
        await self._announce_revoked(session_id)
        log.info("signed out", session=session_id)

    async def _session_of(self, conn: Connection, token: str) -> str | None:
        if token.count(".") == 2:
            claims = await self._verified_claims(conn, token, check_lifetime=False, audience=None)
            sid = claims.get("sid") if claims is not None else None
            return sid if isinstance(sid, str) else None
        presented = await store.refresh_token(conn, crypto.refresh_token_hash(token))
        return presented.session.session_id if presented is not None else None

    async def _announce_revoked(self, session_id: str) -> None:
        redis: Redis | None = self.runtime.state.get(REDIS_STATE)
        if redis is None:
            raise RuntimeError("no Redis client: sign-outs cannot be announced")
        ttl = int(self.provider.max_token_lifetime.total_seconds())
        await redis.set(REVOKED_SESSION_PREFIX + session_id, "1", ex=ttl)

    # --- the identity service's own bearer tokens ------------------------------------------------

    async def _our_key(self, conn: Connection, token: str) -> jwt.PyJWK | None:
        """The published key a token names, if it is one of this provider's."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return None
        kid = header.get("kid")
        if header.get("alg") != crypto.ALGORITHM or not isinstance(kid, str):
            return None
        jwk = await store.published_key(conn, kid, self.clock_now)
        return None if jwk is None else jwt.PyJWK(jwk)

    def _claims(self, token: str, key: jwt.PyJWK, *, check_lifetime: bool, audience: str | None) -> dict[str, Any]:
        """The verified claims (raises ``jwt.PyJWTError``); lifetimes by the service's clock."""
        claims: dict[str, Any] = jwt.decode(
            token, key.key, algorithms=[crypto.ALGORITHM], issuer=self.provider.issuer, audience=audience,
            options={
                "require": ["iss", "sub", "exp", "iat", "role"], "verify_aud": audience is not None,
                "verify_exp": False, "verify_nbf": False, "verify_iat": False,
            },
        )
        if check_lifetime:
            now = self.clock_now.timestamp()
            if now >= claims["exp"]:
                raise jwt.ExpiredSignatureError("the token has expired")
            if now < claims.get("nbf", claims["iat"]) - CLOCK_SKEW.total_seconds():
                raise jwt.ImmatureSignatureError("the token is not valid yet")
        return claims

    async def _verified_claims(
        self, conn: Connection, token: str, *, check_lifetime: bool, audience: str | None
    ) -> dict[str, Any] | None:
        """The claims of a token this provider signed with a published key; None if it did not."""
        key = await self._our_key(conn, token)
        if key is None:
            return None
        try:
            return self._claims(token, key, check_lifetime=check_lifetime, audience=audience)
        except jwt.PyJWTError:
            return None

    async def principal_of(self, token: str) -> Principal | None:
        """The principal of a token this provider signed, for its own API; None when another key
        signed it (the kit's verification is asked then). Its session must not be signed out."""
        async with self.runtime.pool.acquire() as conn:
            key = await self._our_key(conn, token)
            if key is None:
                return None
            try:
                claims = self._claims(token, key, check_lifetime=True, audience=IDENTITY_AUDIENCE)
            except jwt.PyJWTError as error:
                raise Unauthenticated(f"invalid bearer token: {error}") from None
            sid = claims.get("sid")
            if sid is not None:
                session = await store.session_by_id(conn, str(sid))
                if session is None or session.revoked_at is not None:
                    raise Unauthenticated("the session was signed out")
        return auth.principal_of(claims)

    # --- account management (through the use-case runner) ----------------------------------------

    async def sign_up_resident(self, write: Write, email: str, password: str) -> Outcome:
        """A person creates a resident account; its id (``res-…``) is the resident id everywhere."""
        write.principal = sign_up_caller(email)

        async def act(work: UnitOfWork) -> Outcome:
            address = normalise_email(email)
            check_password(password, address)
            account = Account(
                account_id=new_account_id(AccountRole.RESIDENT), email=address, role=AccountRole.RESIDENT,
                password_hash=await asyncio.to_thread(crypto.hash_secret, password),
            )
            if not await store.insert_account(work.conn, account, at=self.clock_now, by="self"):
                raise EmailTaken("an account with this e-mail exists: sign in, or use another address")
            log.info("resident signed up", account=account.account_id)
            return Outcome(201, account_view(account))

        return await write.run(act)

    async def create_account(
        self, write: Write, *, email: str, password: str, role: AccountRole, municipality: str | None,
        staff_role: StaffRole | None, prefecture: str | None,
    ) -> Outcome:
        """An admin creates a staff, reader or admin account (staff enrol TOTP at their first sign-in)."""
        by = write.principal.subject

        async def act(work: UnitOfWork) -> Outcome:
            address = normalise_email(email)
            check_password(password, address)
            check_account_shape(role, municipality_code=municipality, staff_role=staff_role, prefecture=prefecture)
            account = Account(
                account_id=new_account_id(role), email=address, role=role,
                password_hash=await asyncio.to_thread(crypto.hash_secret, password), municipality=municipality,
                staff_role=staff_role, prefecture=prefecture,
            )
            if not await store.insert_account(work.conn, account, at=self.clock_now, by=by):
                raise EmailTaken(f"an account with the e-mail {address} exists")
            log.info("account created", account=account.account_id, role=role.value, by=by)
            return Outcome(201, account_view(account))

        return await write.run(act)

    async def create_client(
        self, write: Write, *, client_id: str, role: ClientRole, partner: str | None
    ) -> Outcome:
        """An admin registers a partner's service account or the payment provider; the secret is in
        the first answer only (a replay answers the client without it; only its hash is stored)."""
        by = write.principal.subject

        async def act(work: UnitOfWork) -> Outcome:
            check_client(client_id, role, partner)
            secret = crypto.new_client_secret()
            client = Client(client_id, role, await asyncio.to_thread(crypto.hash_secret, secret), partner)
            if not await store.insert_client(work.conn, client, at=self.clock_now, by=by):
                raise ClientExists(f"the client {client_id} exists")
            log.info("client created", client=client_id, role=role.value, by=by)
            view = {"client_id": client_id, "role": role.value, "partner": partner}
            return Outcome(201, {**view, "client_secret": secret}, replay_body=view, headers=NO_STORE)

        return await write.run(act)

    async def reset_totp(self, write: Write, account_id: str) -> Outcome:
        """An admin clears an account's TOTP (a lost phone): staff enrol again at their next sign-in."""
        by = write.principal.subject

        async def act(work: UnitOfWork) -> Outcome:
            account = await store.account_by_id(work.conn, account_id, lock=True)
            if account is None:
                raise AccountNotFound(f"no account {account_id}")
            await store.reset_totp(work.conn, account_id)
            now = self.clock_now
            log.info("TOTP reset", account=account_id, by=by)
            return Outcome(200, {"account_id": account_id, "totp_enabled": False, "reset_by": by,
                                 "reset_at": now.isoformat()})

        return await write.run(act)

    async def _me(self, work: UnitOfWork, principal: Principal) -> Account:
        account = await store.account_by_id(work.conn, principal.subject, lock=True)
        if account is None:
            raise AccountNotFound("this token's subject has no account here (client credentials have none)")
        return account

    async def start_totp(self, write: Write) -> Outcome:
        """A new TOTP secret for the caller, pending until a code confirms it: shown once (a replay
        answers without it)."""
        principal = write.principal

        async def authorise(work: UnitOfWork) -> Account:
            return await self._me(work, principal)

        async def act(work: UnitOfWork, account: Account) -> Outcome:
            if account.totp_enabled:
                raise TotpAlreadyEnabled("TOTP is enabled already; an admin resets it when a device is lost")
            secret = crypto.new_totp_secret()
            await store.set_pending_totp(work.conn, account.account_id, secret)
            view = {"account_id": account.account_id, "totp_enabled": False}
            return Outcome(
                201, {**view, "secret": secret, "otpauth_uri": totp_uri(secret, account.email)},
                replay_body=view, headers=NO_STORE,
            )

        return await write.run(act, authorise=authorise)

    async def confirm_totp(self, write: Write, code: str) -> Outcome:
        principal = write.principal

        async def authorise(work: UnitOfWork) -> Account:
            return await self._me(work, principal)

        async def act(work: UnitOfWork, account: Account) -> Outcome:
            if account.totp_enabled:
                raise TotpAlreadyEnabled("TOTP is enabled already")
            if account.totp_secret is None:
                raise TotpNotPending("start the enrolment first: POST /v1/accounts/me/totp")
            step = accepted_totp_step(account.totp_secret, code, self.clock_now, account.totp_last_step)
            if step is None:
                raise InvalidTotpCode("the code does not match: check the device's clock and try the next code")
            await store.enable_totp(work.conn, account.account_id, step)
            log.info("TOTP enrolled", account=account.account_id)
            return Outcome(200, {"account_id": account.account_id, "totp_enabled": True})

        return await write.run(act, authorise=authorise)

    async def rotate_keys(self, write: Write) -> Outcome:
        async def act(work: UnitOfWork) -> Outcome:
            return Outcome(201, await self.rotate_signing_key(work.conn))

        return await write.run(act)

    async def me(self, principal: Principal) -> dict[str, Any]:
        async with self.runtime.pool.acquire() as conn:
            account = await store.account_by_id(conn, principal.subject)
        if account is None:
            raise AccountNotFound("this token's subject has no account here")
        return account_view(account)

    # --- production bootstrap --------------------------------------------------------------------

    async def bootstrap_admin(self, email: str, password: str) -> str | None:
        """The first admin of a production platform (``NICHIIKI_IDENTITY_BOOTSTRAP_ADMIN_*``), made at
        start-up when no admin account exists; the new account's id, else None. Idempotent: replicas
        starting together make one, and a restart (or a later admin) leaves it alone."""
        try:
            address = normalise_email(email)
            check_password(password, address)
        except (InvalidEmail, WeakPassword) as error:
            raise auth.ConfigurationError(f"NICHIIKI_IDENTITY_BOOTSTRAP_ADMIN_*: {error}") from None
        async with self.runtime.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", _BOOTSTRAP_LOCK)
            if await store.admin_exists(conn):
                log.info("an admin account exists: the bootstrap admin is not created")
                return None
            account = Account(
                account_id=new_account_id(AccountRole.ADMIN), email=address, role=AccountRole.ADMIN,
                password_hash=await asyncio.to_thread(crypto.hash_secret, password),
            )
            if not await store.insert_account(conn, account, at=self.clock_now, by="bootstrap"):
                raise auth.ConfigurationError(
                    f"NICHIIKI_IDENTITY_BOOTSTRAP_ADMIN_EMAIL: {address} belongs to an account that is not an admin"
                )
        # A warning: an operator should see it, sign in, and take the password out of the environment.
        log.warning(
            "bootstrap admin account created from NICHIIKI_IDENTITY_BOOTSTRAP_ADMIN_EMAIL; remove its password "
            "from the environment once signed in", account=account.account_id, email=address,
        )
        return account.account_id

    # --- development seed ------------------------------------------------------------------------

    async def seed_development(self) -> None:
        """The development accounts and clients (services/identity/development.py), once each."""
        now = self.clock_now
        async with self.runtime.pool.acquire() as conn:
            have = await store.existing_emails(conn, [a.email for a in DEV_ACCOUNTS])
            have_clients = await store.existing_clients(conn, [c.client_id for c in DEV_CLIENTS])
            added = 0
            for dev in DEV_ACCOUNTS:
                if dev.email in have:
                    continue
                check_account_shape(dev.role, municipality_code=dev.municipality, staff_role=dev.staff_role,
                                    prefecture=dev.prefecture)
                account = Account(
                    account_id=dev.account_id, email=dev.email, role=dev.role,
                    password_hash=await asyncio.to_thread(crypto.hash_secret, dev.password),
                    municipality=dev.municipality, staff_role=dev.staff_role, prefecture=dev.prefecture,
                    totp_secret=DEMO_TOTP_SECRET if dev.totp else None, totp_enabled=dev.totp,
                )
                added += await store.insert_account(conn, account, at=now, by="development-seed")
            for dev_client in DEV_CLIENTS:
                if dev_client.client_id in have_clients:
                    continue
                client = Client(dev_client.client_id, dev_client.role,
                                await asyncio.to_thread(crypto.hash_secret, dev_client.secret), dev_client.partner)
                added += await store.insert_client(conn, client, at=now, by="development-seed")
        if added:
            log.info("development accounts and clients seeded", added=added)


def _bearer(token: str, lifetime: timedelta) -> dict[str, Any]:
    return {"access_token": token, "token_type": "Bearer", "expires_in": int(lifetime.total_seconds())}
