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
from shared.kit.consumer import distinct_runs
from shared.kit.db import Connection

#: The tables a rebuild empties (``insights_state`` and the kit's tables stay).
PROJECTION_TABLES = ("registrations", "certificates", "grants", "redemptions", "donations", "plans", "corporations")

_LIVE = "('active', 'pending_review')"

#: The two kinds applied row by row (one pipelined ``executemany``): one per withdrawal or trip, and
#: each writes two tables.
_PER_ROW: dict[Op, str] = {
    # Erasure: the person's live registrations end; every row forgets the id, the counts stay.
    "erase": (
        "WITH forgot AS (UPDATE certificates SET resident_id = NULL WHERE resident_id = $1) "
        f"UPDATE registrations SET status = CASE WHEN status IN {_LIVE} THEN 'withdrawn' ELSE status END, "
        f"ended_on = CASE WHEN status IN {_LIVE} THEN $2 ELSE ended_on END, resident_id = NULL "
        "WHERE resident_id = $1"
    ),
    "redemption": (
        "WITH counted AS (INSERT INTO redemptions (grant_id, trip_id, program_id, municipality_code, "
        "prefecture_code, unit, amount, redeemed_on) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
        "ON CONFLICT (grant_id, trip_id) DO NOTHING) "
        "UPDATE grants SET status = 'completed' WHERE grant_id = $1 AND $9 AND status = 'active'"
    ),
}

#: Every other kind: one statement for a whole stretch, its rows as arrays (``unnest``), which costs
#: the server less per row than an ``executemany`` running the statement once per row (issue #20).
#: Each is idempotent and touches a row at most once, so a stretch is cut where its key (the first
#: column) repeats; applied in order, the pieces leave the rows the changes one by one would.
_SET_BASED: dict[Op, str] = {
    "register": (
        "INSERT INTO registrations (registration_id, resident_id, municipality_code, prefecture_code, tier, status, "
        "registered_on) SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], "
        "$6::text[], $7::date[]) ON CONFLICT (registration_id) DO NOTHING"
    ),
    # An upgrade or a first premium request approved: premium and active.
    "approve_premium": (
        "UPDATE registrations SET tier = 'premium', status = 'active' WHERE registration_id = ANY($1::text[])"
    ),
    # A rejected first request ends the registration; a rejected upgrade leaves it as it was.
    "reject_premium": (
        "UPDATE registrations SET status = 'rejected' "
        "WHERE registration_id = ANY($1::text[]) AND status = 'pending_review'"
    ),
    "end_registration": (
        "UPDATE registrations r SET status = c.status, ended_on = c.ended_on "
        "FROM unnest($1::text[], $2::text[], $3::date[]) AS c (registration_id, status, ended_on) "
        f"WHERE r.registration_id = c.registration_id AND r.status IN {_LIVE}"
    ),
    "certificate": (
        "INSERT INTO certificates (certificate_number, resident_id, municipality_code, prefecture_code, status, "
        "valid_from, valid_until, issued_on) SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], "
        "$5::text[], $6::date[], $7::date[], $8::date[]) "
        "ON CONFLICT (certificate_number) DO UPDATE SET status = EXCLUDED.status, valid_from = EXCLUDED.valid_from, "
        "valid_until = EXCLUDED.valid_until, issued_on = COALESCE(certificates.issued_on, EXCLUDED.issued_on), "
        "resident_id = CASE WHEN EXCLUDED.resident_id IS NULL THEN NULL ELSE certificates.resident_id END"
    ),
    "grant_waitlisted": (
        "INSERT INTO grants (grant_id, program_id, partner, mechanism, municipality_code, prefecture_code, unit, "
        "status) SELECT *, 'waitlisted' FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], "
        "$6::text[], $7::text[]) ON CONFLICT (grant_id) DO NOTHING"
    ),
    "grant_issued": (
        "INSERT INTO grants (grant_id, program_id, partner, mechanism, municipality_code, prefecture_code, unit, "
        "reserved, status, issued) SELECT *, 'active', true FROM unnest($1::text[], $2::text[], $3::text[], "
        "$4::text[], $5::text[], $6::text[], $7::text[], $8::bigint[]) "
        "ON CONFLICT (grant_id) DO UPDATE SET status = 'active', issued = true, reserved = EXCLUDED.reserved "
        "WHERE grants.status = 'waitlisted'"
    ),
    "grant_ended": (
        "UPDATE grants g SET status = c.status FROM unnest($1::text[], $2::text[]) AS c (grant_id, status) "
        "WHERE g.grant_id = c.grant_id AND g.status IN ('active', 'waitlisted')"
    ),
    "donation": (
        "INSERT INTO donations (donation_id, municipality_code, prefecture_code, kind, unit, amount, earmark, "
        "received_month) SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], "
        "$6::bigint[], $7::text[], $8::date[]) ON CONFLICT (donation_id) DO NOTHING"
    ),
    "refund": "UPDATE donations SET refunded = true WHERE donation_id = ANY($1::text[])",
    "plan_adopted": (
        "INSERT INTO plans (plan_id, level, municipality_code, prefecture_code, adopted_on) "
        "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::date[]) "
        "ON CONFLICT (plan_id) DO NOTHING"
    ),
    "plan_withdrawn": (
        "UPDATE plans p SET withdrawn_on = c.withdrawn_on "
        "FROM unnest($1::text[], $2::date[]) AS c (plan_id, withdrawn_on) "
        "WHERE p.plan_id = c.plan_id AND p.withdrawn_on IS NULL"
    ),
    "designated": (
        "INSERT INTO corporations (corporation_id, municipality_code, prefecture_code, designated_on) "
        "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::date[]) ON CONFLICT (corporation_id) DO NOTHING"
    ),
    "corporation_revoked": (
        "UPDATE corporations k SET revoked_on = c.revoked_on "
        "FROM unnest($1::text[], $2::date[]) AS c (corporation_id, revoked_on) "
        "WHERE k.corporation_id = c.corporation_id AND k.revoked_on IS NULL"
    ),
}


async def apply(conn: Connection, changes: Sequence[Change]) -> None:
    """The changes in order: each stretch of one kind in one statement (cut where a key repeats), or
    for ``_PER_ROW`` kinds in one pipelined round trip."""
    for op, stretch in itertools.groupby(changes, key=lambda change: change.op):
        rows = [change.args for change in stretch]
        statement = _SET_BASED.get(op)
        if statement is None:
            await conn.executemany(_PER_ROW[op], rows)
            continue
        for piece in distinct_runs(rows, key=lambda args: args[0]):
            await conn.execute(statement, *(list(column) for column in zip(*piece, strict=True)))


async def generation_and_erased(conn: Connection, resident_ids: Iterable[str]) -> tuple[int, dict[str, date]]:
    """What a consumer run starts with, in one round trip: the current generation, share-locked
    (``generation_for_update``), and the erased residents among these, with the day (Japan) of their
    erasure (``kit_erased_residents``)."""
    rows = await conn.fetch(
        """
        SELECT g.generation, e.resident_id, e.erased_at
        FROM (SELECT generation FROM insights_state FOR SHARE) AS g
        LEFT JOIN kit_erased_residents e ON e.resident_id = ANY($1::text[])
        """,
        sorted(set(resident_ids)),
    )
    erased = {row["resident_id"]: japan_date(row["erased_at"]) for row in rows if row["resident_id"] is not None}
    return int(rows[0]["generation"]), erased


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
