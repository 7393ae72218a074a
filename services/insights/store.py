"""SQL of insights: applying the read model's changes, and the figures as domain objects."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from datetime import date

from services.insights.domain import (
    CertificateFigure,
    Change,
    DonationFigure,
    MonthlyRegistrations,
    Op,
    ProgrammeFigure,
    RegistrationFigure,
    RelationshipFigure,
    Scope,
)
from shared.kit.clock import japan_date
from shared.kit.db import Connection

#: The tables a rebuild empties (``insights_state`` and the kit's tables stay).
PROJECTION_TABLES = ("registrations", "certificates", "grants", "redemptions", "donations", "plans", "corporations")

_LIVE = "('active', 'pending_review')"

#: One statement per kind of change. Every one is idempotent and order-safe for its own key, so
#: consecutive changes of one kind go to the server in one pipelined ``executemany``.
_STATEMENTS: dict[Op, str] = {
    "register": (
        "INSERT INTO registrations (registration_id, resident_id, municipality_code, prefecture_code, tier, status, "
        "registered_on) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (registration_id) DO NOTHING"
    ),
    # An upgrade or a first premium request approved: premium and active.
    "approve_premium": (
        "UPDATE registrations SET tier = 'premium', status = 'active' WHERE registration_id = $1"
    ),
    # A rejected first request ends the registration; a rejected upgrade leaves it as it was.
    "reject_premium": (
        "UPDATE registrations SET status = 'rejected' WHERE registration_id = $1 AND status = 'pending_review'"
    ),
    "end_registration": (
        f"UPDATE registrations SET status = $2, ended_on = $3 WHERE registration_id = $1 AND status IN {_LIVE}"
    ),
    # Erasure: the person's live registrations end; every row forgets the id, the counts stay.
    "erase": (
        "WITH forgot AS (UPDATE certificates SET resident_id = NULL WHERE resident_id = $1) "
        f"UPDATE registrations SET status = CASE WHEN status IN {_LIVE} THEN 'withdrawn' ELSE status END, "
        f"ended_on = CASE WHEN status IN {_LIVE} THEN $2 ELSE ended_on END, resident_id = NULL "
        "WHERE resident_id = $1"
    ),
    "certificate": (
        "INSERT INTO certificates (certificate_number, resident_id, municipality_code, prefecture_code, status, "
        "valid_from, valid_until, issued_on) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
        "ON CONFLICT (certificate_number) DO UPDATE SET status = EXCLUDED.status, valid_from = EXCLUDED.valid_from, "
        "valid_until = EXCLUDED.valid_until, issued_on = COALESCE(certificates.issued_on, EXCLUDED.issued_on), "
        "resident_id = CASE WHEN EXCLUDED.resident_id IS NULL THEN NULL ELSE certificates.resident_id END"
    ),
    "grant_waitlisted": (
        "INSERT INTO grants (grant_id, program_id, partner, mechanism, municipality_code, prefecture_code, unit, "
        "status) VALUES ($1, $2, $3, $4, $5, $6, $7, 'waitlisted') ON CONFLICT (grant_id) DO NOTHING"
    ),
    "grant_issued": (
        "INSERT INTO grants (grant_id, program_id, partner, mechanism, municipality_code, prefecture_code, unit, "
        "status, issued, reserved) VALUES ($1, $2, $3, $4, $5, $6, $7, 'active', true, $8) "
        "ON CONFLICT (grant_id) DO UPDATE SET status = 'active', issued = true, reserved = EXCLUDED.reserved "
        "WHERE grants.status = 'waitlisted'"
    ),
    "grant_ended": "UPDATE grants SET status = $2 WHERE grant_id = $1 AND status IN ('active', 'waitlisted')",
    "redemption": (
        "WITH counted AS (INSERT INTO redemptions (grant_id, trip_id, program_id, municipality_code, "
        "prefecture_code, unit, amount, redeemed_on) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
        "ON CONFLICT (grant_id, trip_id) DO NOTHING) "
        "UPDATE grants SET status = 'completed' WHERE grant_id = $1 AND $9 AND status = 'active'"
    ),
    "donation": (
        "INSERT INTO donations (donation_id, municipality_code, prefecture_code, kind, unit, amount, earmark, "
        "received_month) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (donation_id) DO NOTHING"
    ),
    "refund": "UPDATE donations SET refunded = true WHERE donation_id = $1",
    "plan_adopted": (
        "INSERT INTO plans (plan_id, level, municipality_code, prefecture_code, adopted_on) "
        "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (plan_id) DO NOTHING"
    ),
    "plan_withdrawn": "UPDATE plans SET withdrawn_on = $2 WHERE plan_id = $1 AND withdrawn_on IS NULL",
    "designated": (
        "INSERT INTO corporations (corporation_id, municipality_code, prefecture_code, designated_on) "
        "VALUES ($1, $2, $3, $4) ON CONFLICT (corporation_id) DO NOTHING"
    ),
    "corporation_revoked": (
        "UPDATE corporations SET revoked_on = $2 WHERE corporation_id = $1 AND revoked_on IS NULL"
    ),
}


async def apply(conn: Connection, changes: Sequence[Change]) -> None:
    """The changes in order: each stretch of one kind in one pipelined round trip."""
    for op, stretch in itertools.groupby(changes, key=lambda change: change.op):
        await conn.executemany(_STATEMENTS[op], [change.args for change in stretch])


async def erased_among(conn: Connection, resident_ids: Iterable[str]) -> dict[str, date]:
    """The erased residents among these, with the day (Japan) of their erasure (kit_erased_residents)."""
    ids = sorted(set(resident_ids))
    if not ids:
        return {}
    rows = await conn.fetch(
        "SELECT resident_id, erased_at FROM kit_erased_residents WHERE resident_id = ANY($1::text[])", ids
    )
    return {row["resident_id"]: japan_date(row["erased_at"]) for row in rows}


async def generation_for_update(conn: Connection, *, share: bool) -> int:
    """The current generation, locked: shared by a consumer run (a rebuild waits for it), exclusive
    for a rebuild (runs wait for it, then find the generation changed)."""
    mode = "SHARE" if share else "UPDATE"
    value: int = await conn.fetchval(f"SELECT generation FROM insights_state FOR {mode}")
    return value


async def generation(conn: Connection) -> int:
    value: int = await conn.fetchval("SELECT generation FROM insights_state")
    return value


async def start_generation(conn: Connection) -> int:
    """Empty the projection and move to the next generation (in the caller's transaction)."""
    await generation_for_update(conn, share=False)
    await conn.execute(f"TRUNCATE {', '.join(PROJECTION_TABLES)}")
    value: int = await conn.fetchval(
        "UPDATE insights_state SET generation = generation + 1, rebuilt_at = now() RETURNING generation"
    )
    return value


def _where(scope: Scope, *, municipality_column: str = "municipality_code",
           prefecture_column: str = "prefecture_code") -> tuple[str, list[object]]:
    if scope.municipality is not None:
        return f"{municipality_column} = $1", [scope.municipality]
    if scope.prefecture is not None:
        return f"{prefecture_column} = $1", [scope.prefecture]
    return "true", []


async def registrations(conn: Connection, scope: Scope) -> list[RegistrationFigure]:
    where, args = _where(scope)
    rows = await conn.fetch(
        "SELECT municipality_code, prefecture_code, "
        "count(*) FILTER (WHERE tier = 'basic')::int AS basic, "
        "count(*) FILTER (WHERE tier = 'premium')::int AS premium "
        f"FROM registrations WHERE status = 'active' AND {where} "
        "GROUP BY municipality_code, prefecture_code ORDER BY municipality_code", *args,
    )
    return [RegistrationFigure(**dict(row)) for row in rows]


async def monthly_registrations(conn: Connection, scope: Scope) -> list[MonthlyRegistrations]:
    where, args = _where(scope)
    rows = await conn.fetch(
        "WITH scoped AS (SELECT * FROM registrations WHERE " + where + "), "
        "moves AS ("
        "  SELECT municipality_code, date_trunc('month', registered_on)::date AS month, tier, 1 AS new, 0 AS ended"
        "  FROM scoped"
        "  UNION ALL SELECT municipality_code, date_trunc('month', ended_on)::date, tier, 0, 1"
        "  FROM scoped WHERE ended_on IS NOT NULL) "
        "SELECT municipality_code, month, tier, sum(new)::int AS new, sum(ended)::int AS ended FROM moves "
        "GROUP BY municipality_code, month, tier ORDER BY municipality_code, month, tier", *args,
    )
    return [MonthlyRegistrations(**dict(row)) for row in rows]


async def certificates(conn: Connection, scope: Scope) -> list[CertificateFigure]:
    where, args = _where(scope)
    rows = await conn.fetch(
        "SELECT municipality_code, prefecture_code, count(*) FILTER (WHERE status = 'valid')::int AS valid, "
        "count(*) FILTER (WHERE status = 'revoked')::int AS revoked, "
        "count(*) FILTER (WHERE status = 'expired')::int AS expired "
        f"FROM certificates WHERE {where} GROUP BY municipality_code, prefecture_code ORDER BY municipality_code",
        *args,
    )
    return [CertificateFigure(**dict(row)) for row in rows]


async def programmes(conn: Connection, scope: Scope) -> list[ProgrammeFigure]:
    where, args = _where(scope, municipality_column="g.municipality_code", prefecture_column="g.prefecture_code")
    rows = await conn.fetch(
        "SELECT g.program_id, g.partner, g.municipality_code, g.unit, "
        "count(*) FILTER (WHERE g.issued)::int AS issued, "
        "count(*) FILTER (WHERE g.status = 'waitlisted')::int AS waitlisted, "
        "count(*) FILTER (WHERE g.status = 'active')::int AS active, "
        "COALESCE(sum(g.reserved) FILTER (WHERE g.status = 'active'), 0)::bigint AS reserved, "
        "COALESCE(sum(r.spent), 0)::bigint AS spent, COALESCE(sum(r.trips), 0)::int AS trips "
        "FROM grants g LEFT JOIN (SELECT grant_id, sum(amount) AS spent, count(*) AS trips FROM redemptions "
        "GROUP BY grant_id) r USING (grant_id) "
        f"WHERE {where} GROUP BY g.program_id, g.partner, g.municipality_code, g.unit "
        "ORDER BY g.program_id, g.municipality_code, g.unit", *args,
    )
    return [ProgrammeFigure(**dict(row)) for row in rows]


async def donations(conn: Connection, scope: Scope) -> list[DonationFigure]:
    where, args = _where(scope)
    rows = await conn.fetch(
        "SELECT municipality_code, kind, unit, received_month AS month, "
        "count(*) FILTER (WHERE NOT refunded)::int AS count, "
        "COALESCE(sum(amount) FILTER (WHERE NOT refunded), 0)::bigint AS amount, "
        "count(*) FILTER (WHERE refunded)::int AS refunded "
        f"FROM donations WHERE {where} GROUP BY municipality_code, kind, unit, received_month "
        "ORDER BY municipality_code, received_month, kind, unit", *args,
    )
    return [DonationFigure(**dict(row)) for row in rows]


async def relationship(conn: Connection, scope: Scope) -> list[RelationshipFigure]:
    """People per municipality (prefectures' own registrations aside): each person once, by id."""
    where, args = _where(scope)
    rows = await conn.fetch(
        "WITH links AS ("
        f"  SELECT municipality_code, prefecture_code, resident_id, true AS registered, false AS certified"
        f"  FROM registrations WHERE status = 'active' AND municipality_code <> prefecture_code AND {where}"
        f"  UNION ALL SELECT municipality_code, prefecture_code, resident_id, false, true"
        f"  FROM certificates WHERE status = 'valid' AND {where}) "
        "SELECT municipality_code, prefecture_code, "
        "count(DISTINCT resident_id) FILTER (WHERE registered)::int AS registered, "
        "count(DISTINCT resident_id) FILTER (WHERE certified)::int AS certified, "
        "count(DISTINCT resident_id)::int AS people "
        "FROM links WHERE resident_id IS NOT NULL GROUP BY municipality_code, prefecture_code "
        "ORDER BY municipality_code", *args,
    )
    return [RelationshipFigure(**dict(row)) for row in rows]


async def plan_spans(conn: Connection) -> list[tuple[date, date | None]]:
    """Municipal plans (特定居住促進計画: the KPI counts these): adopted, withdrawn if they were."""
    rows = await conn.fetch("SELECT adopted_on, withdrawn_on FROM plans WHERE level = 'municipality'")
    return [(row["adopted_on"], row["withdrawn_on"]) for row in rows]


async def corporation_spans(conn: Connection) -> list[tuple[date, date | None]]:
    rows = await conn.fetch("SELECT designated_on, revoked_on FROM corporations")
    return [(row["designated_on"], row["revoked_on"]) for row in rows]
