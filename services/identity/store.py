"""SQL of the identity service: each function one statement, domain objects in and out."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from services.identity.domain import Account, AccountRole, Client, ClientRole, RefreshState, StaffRole
from shared.kit.db import Connection

# --- accounts ------------------------------------------------------------------------------------

_ACCOUNT_COLUMNS = (
    "account_id, email, role, password_hash, municipality, staff_role, prefecture, "
    "totp_secret, totp_enabled, totp_last_step, locked_until"
)


def _account(row: asyncpg.Record | None) -> Account | None:
    if row is None:
        return None
    return Account(
        account_id=row["account_id"], email=row["email"], role=AccountRole(row["role"]),
        password_hash=row["password_hash"], municipality=row["municipality"],
        staff_role=StaffRole(row["staff_role"]) if row["staff_role"] else None, prefecture=row["prefecture"],
        totp_secret=row["totp_secret"], totp_enabled=row["totp_enabled"], totp_last_step=row["totp_last_step"],
        locked_until=row["locked_until"],
    )


async def insert_account(conn: Connection, account: Account, *, at: datetime, by: str) -> bool:
    """Insert the account; False when its id or e-mail is taken (nothing changes then)."""
    inserted = await conn.fetchval(
        """
        INSERT INTO accounts (account_id, email, role, password_hash, municipality, staff_role, prefecture,
                              totp_secret, totp_enabled, created_at, created_by)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
        ON CONFLICT DO NOTHING
        RETURNING true
        """,
        account.account_id, account.email, account.role.value, account.password_hash, account.municipality,
        account.staff_role.value if account.staff_role else None, account.prefecture,
        account.totp_secret, account.totp_enabled, at, by,
    )
    return bool(inserted)


async def account_by_email(conn: Connection, email: str, *, lock: bool = False) -> Account | None:
    row = await conn.fetchrow(
        f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE email = $1{' FOR UPDATE' if lock else ''}", email
    )
    return _account(row)


async def account_by_id(conn: Connection, account_id: str, *, lock: bool = False) -> Account | None:
    row = await conn.fetchrow(
        f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE account_id = $1{' FOR UPDATE' if lock else ''}", account_id
    )
    return _account(row)


async def admin_exists(conn: Connection) -> bool:
    return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM accounts WHERE role = 'admin')"))


async def existing_emails(conn: Connection, emails: Sequence[str]) -> set[str]:
    rows = await conn.fetch("SELECT email FROM accounts WHERE email = ANY($1::text[])", list(emails))
    return {row["email"] for row in rows}


async def set_pending_totp(conn: Connection, account_id: str, secret: str) -> None:
    await conn.execute(
        "UPDATE accounts SET totp_secret = $2, totp_enabled = false, totp_last_step = NULL WHERE account_id = $1",
        account_id, secret,
    )


async def enable_totp(conn: Connection, account_id: str, step: int) -> None:
    await conn.execute(
        "UPDATE accounts SET totp_enabled = true, totp_last_step = $2 WHERE account_id = $1", account_id, step
    )


async def use_totp_step(conn: Connection, account_id: str, step: int) -> None:
    await conn.execute("UPDATE accounts SET totp_last_step = $2 WHERE account_id = $1", account_id, step)


async def reset_totp(conn: Connection, account_id: str) -> None:
    await conn.execute(
        "UPDATE accounts SET totp_secret = NULL, totp_enabled = false, totp_last_step = NULL WHERE account_id = $1",
        account_id,
    )


# --- failed sign-ins and locks -------------------------------------------------------------------


async def add_failure(conn: Connection, account_id: str, at: datetime, reason: str, since: datetime) -> int:
    """Record a failed sign-in; returns the account's failures since ``since``, this one included."""
    count: int = await conn.fetchval(
        """
        WITH added AS (INSERT INTO sign_in_failures (account_id, at, reason) VALUES ($1, $2, $3))
        SELECT count(*) + 1 FROM sign_in_failures WHERE account_id = $1 AND at >= $4
        """,
        account_id, at, reason, since,
    )
    return count


async def lock(conn: Connection, account_id: str, until: datetime) -> None:
    """Lock the account; the failures that caused it are spent."""
    await conn.execute(
        """
        WITH spent AS (DELETE FROM sign_in_failures WHERE account_id = $1)
        UPDATE accounts SET locked_until = $2 WHERE account_id = $1
        """,
        account_id, until,
    )


async def clear_failures(conn: Connection, account_id: str) -> None:
    """A successful sign-in resets the count (and an expired lock)."""
    await conn.execute(
        """
        WITH cleared AS (DELETE FROM sign_in_failures WHERE account_id = $1)
        UPDATE accounts SET locked_until = NULL WHERE account_id = $1 AND locked_until IS NOT NULL
        """,
        account_id,
    )


# --- clients -------------------------------------------------------------------------------------


async def insert_client(conn: Connection, client: Client, *, at: datetime, by: str) -> bool:
    inserted = await conn.fetchval(
        """
        INSERT INTO clients (client_id, role, partner, secret_hash, created_at, created_by)
        VALUES ($1, $2, $3, $4, $5, $6)
        ON CONFLICT DO NOTHING
        RETURNING true
        """,
        client.client_id, client.role.value, client.partner, client.secret_hash, at, by,
    )
    return bool(inserted)


async def client_by_id(conn: Connection, client_id: str) -> Client | None:
    row = await conn.fetchrow("SELECT client_id, role, partner, secret_hash FROM clients WHERE client_id = $1",
                              client_id)
    if row is None:
        return None
    return Client(row["client_id"], ClientRole(row["role"]), row["secret_hash"], row["partner"])


async def existing_clients(conn: Connection, client_ids: Sequence[str]) -> set[str]:
    rows = await conn.fetch("SELECT client_id FROM clients WHERE client_id = ANY($1::text[])", list(client_ids))
    return {row["client_id"] for row in rows}


# --- sessions and refresh tokens -----------------------------------------------------------------


async def insert_session(
    conn: Connection, session_id: str, account_id: str, *, amr: Sequence[str], full_access: bool,
    at: datetime, expires_at: datetime,
) -> None:
    await conn.execute(
        """
        INSERT INTO sessions (session_id, account_id, amr, full_access, created_at, expires_at)
        VALUES ($1, $2, $3, $4, $5, $6)
        """,
        session_id, account_id, list(amr), full_access, at, expires_at,
    )


@dataclass(frozen=True, slots=True)
class SessionRow:
    session_id: str
    account_id: str
    amr: list[str]
    full_access: bool
    expires_at: datetime
    revoked_at: datetime | None


async def session_by_id(conn: Connection, session_id: str) -> SessionRow | None:
    row = await conn.fetchrow(
        "SELECT session_id, account_id, amr, full_access, expires_at, revoked_at FROM sessions WHERE session_id = $1",
        session_id,
    )
    return None if row is None else SessionRow(**dict(row))


async def revoke_session(conn: Connection, session_id: str, at: datetime, reason: str) -> None:
    """Revoke the session (its refresh tokens die with it); the first revocation's time and reason stay."""
    await conn.execute(
        "UPDATE sessions SET revoked_at = $2, revoked_reason = $3 WHERE session_id = $1 AND revoked_at IS NULL",
        session_id, at, reason,
    )


async def insert_refresh_token(conn: Connection, token_hash: str, session_id: str, at: datetime) -> None:
    await conn.execute(
        "INSERT INTO refresh_tokens (token_hash, session_id, issued_at) VALUES ($1, $2, $3)",
        token_hash, session_id, at,
    )


@dataclass(frozen=True, slots=True)
class PresentedRefresh:
    session: SessionRow
    state: RefreshState


async def refresh_token(conn: Connection, token_hash: str) -> PresentedRefresh | None:
    """The refresh token and its session, locked (two refreshes with one token: the second waits,
    then finds it used)."""
    row = await conn.fetchrow(
        """
        SELECT t.used_at, s.session_id, s.account_id, s.amr, s.full_access, s.expires_at, s.revoked_at
        FROM refresh_tokens t JOIN sessions s USING (session_id)
        WHERE t.token_hash = $1
        FOR UPDATE
        """,
        token_hash,
    )
    if row is None:
        return None
    session = SessionRow(row["session_id"], row["account_id"], row["amr"], row["full_access"], row["expires_at"],
                         row["revoked_at"])
    return PresentedRefresh(session, RefreshState(row["used_at"], row["revoked_at"], row["expires_at"],
                                                  row["full_access"]))


async def use_refresh_token(conn: Connection, token_hash: str, at: datetime) -> None:
    await conn.execute("UPDATE refresh_tokens SET used_at = $2 WHERE token_hash = $1", token_hash, at)


# --- signing keys --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredKey:
    kid: str
    private_pem: str
    created_at: datetime


async def active_key(conn: Connection) -> StoredKey | None:
    row = await conn.fetchrow(
        "SELECT kid, private_pem, created_at FROM signing_keys WHERE retired_at IS NULL"
    )
    return None if row is None else StoredKey(row["kid"], row["private_pem"], row["created_at"])


async def insert_key(conn: Connection, kid: str, pem: str, jwk: dict[str, Any], at: datetime) -> None:
    await conn.execute(
        "INSERT INTO signing_keys (kid, private_pem, public_jwk, created_at) VALUES ($1, $2, $3::jsonb, $4)",
        kid, pem, json.dumps(jwk), at,
    )


async def retire_active_key(conn: Connection, at: datetime, publish_until: datetime) -> str | None:
    """Retire the signing key (it stays published until ``publish_until``); returns its kid."""
    kid: str | None = await conn.fetchval(
        "UPDATE signing_keys SET retired_at = $1, publish_until = $2 WHERE retired_at IS NULL RETURNING kid",
        at, publish_until,
    )
    return kid


async def published_keys(conn: Connection, now: datetime) -> list[dict[str, Any]]:
    """The JWKS: the signing key and those rotated out whose tokens may still be alive, newest first."""
    rows = await conn.fetch(
        """
        SELECT public_jwk FROM signing_keys
        WHERE retired_at IS NULL OR publish_until > $1
        ORDER BY created_at DESC, kid
        """,
        now,
    )
    return [json.loads(row["public_jwk"]) for row in rows]


async def published_key(conn: Connection, kid: str, now: datetime) -> dict[str, Any] | None:
    raw = await conn.fetchval(
        "SELECT public_jwk FROM signing_keys WHERE kid = $1 AND (retired_at IS NULL OR publish_until > $2)",
        kid, now,
    )
    return None if raw is None else dict(json.loads(raw))
