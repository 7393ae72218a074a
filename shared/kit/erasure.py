"""Which residents were erased, as this service learnt it: so nothing about them is written again.

Every service that keeps anything about a resident records the erasure (``ResidentWithdrawn``, or
``ResidentErased`` on its own topic) in its own ``kit_erased_residents`` in the same transaction as
the erasure itself, and its consumers drop events about a resident found there: a late event, a
replayed dead letter or a consumer group reset to earliest then leaves the person erased. Only the
random resident id is kept.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from shared.kit.db import Connection


async def record_erased(conn: Connection, resident_id: str, at: datetime) -> bool:
    """Remember the erasure; True the first time (a redelivery finds it done)."""
    inserted = await conn.fetchval(
        "INSERT INTO kit_erased_residents (resident_id, erased_at) VALUES ($1, $2) "
        "ON CONFLICT (resident_id) DO NOTHING RETURNING true",
        resident_id, at,
    )
    return bool(inserted)


async def erased_among(conn: Connection, resident_ids: Iterable[str | None]) -> set[str]:
    """The ids among these that were erased (one query for a whole batch)."""
    ids = sorted({i for i in resident_ids if i})
    if not ids:
        return set()
    rows = await conn.fetch(
        "SELECT resident_id FROM kit_erased_residents WHERE resident_id = ANY($1::text[])", ids
    )
    return {row["resident_id"] for row in rows}


async def is_erased(conn: Connection, resident_id: str | None) -> bool:
    return bool(await erased_among(conn, [resident_id]))


async def forget_responses_about(conn: Connection, resident_id: str) -> int:
    """Delete this service's stored ``Idempotency-Key`` responses that mention the resident or that
    the resident asked for (the scope begins with the caller's subject); how many were deleted.

    A stored response is the first answer of a write (an application with its address, a member
    number): it must not outlive the person. Ids are random UUIDs, so finding the id anywhere in
    the response's text is exact enough; ``strpos`` rather than ``LIKE`` so no character of an id
    is a wildcard."""
    result: str = await conn.execute(
        "DELETE FROM idempotency_keys WHERE starts_with(scope, $1 || ' ') OR strpos(body::text, $1) > 0",
        resident_id,
    )
    return int(result.split()[-1])
