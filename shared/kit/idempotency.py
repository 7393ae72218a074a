"""Idempotency-Key: a repeated POST returns the first result instead of acting twice.

The key is reserved in the same transaction as the state change, so two concurrent requests with
one key serialise on the row: the second waits, then replays the first's stored response. The
same key with a different body is a 422 problem, never a silent merge.

Keys are kept ``idempotency_retention_hours`` (24 h): the window the platform promises a client to
repeat a write with its key. ``shared/kit/retention.py`` deletes older ones, after which the same
key runs as a new request.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from shared.kit.db import Connection
from shared.kit.errors import DomainError


class IdempotencyKeyReused(DomainError):
    code = "idempotency-key-reused"
    status = 422
    title = "The Idempotency-Key was used for a different request"


@dataclass(frozen=True, slots=True)
class StoredResponse:
    status_code: int
    body: Any


def request_hash(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


async def replay(conn: Connection, scope: str, key: str, body_hash: str) -> StoredResponse | None:
    """The stored response of this key, if the first request has committed (waits if it is running)."""
    # Take a transaction-scoped lock on the key so a concurrent twin waits for the first to finish.
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"{scope}:{key}")
    row = await conn.fetchrow(
        "SELECT request_hash, status_code, body FROM idempotency_keys WHERE scope = $1 AND key = $2", scope, key
    )
    if row is None:
        return None
    if row["request_hash"] != body_hash:
        raise IdempotencyKeyReused(f"Idempotency-Key {key!r} was first used with another body")
    return StoredResponse(row["status_code"], json.loads(row["body"]))


async def remember(
    conn: Connection, scope: str, key: str, body_hash: str, status_code: int, body: Any
) -> None:
    await conn.execute(
        """
        INSERT INTO idempotency_keys (scope, key, request_hash, status_code, body)
        VALUES ($1, $2, $3, $4, $5::jsonb)
        """,
        scope, key, body_hash, status_code, json.dumps(body, default=str),
    )
