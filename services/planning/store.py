"""All SQL of the planning service (asyncpg, no ORM): rows in, domain objects out."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import date

import asyncpg

from services.planning.domain import (
    Corporation,
    Council,
    CouncilMeeting,
    CouncilMember,
    Plan,
    PlanStatus,
    PlanVersion,
    Proposal,
    SupervisionReport,
)
from shared.contracts.planning import PlanContent, PlanLevel
from shared.kit.db import Connection

# --- plans -----------------------------------------------------------------------------------------

_PLAN_COLUMNS = """
    p.plan_id, p.level, p.municipality_code, p.prefecture_code, p.name, p.status, p.covers_dual_residence,
    p.source, p.adopted_on, p.withdrawn_on, p.withdrawal_reason,
    (SELECT coalesce(jsonb_agg(jsonb_build_object(
        'version', v.version, 'content', v.content, 'status', v.status,
        'consultation_meeting_id', v.consultation_meeting_id, 'consulted_on', v.consulted_on,
        'in_force_from', v.in_force_from) ORDER BY v.version), '[]'::jsonb)
     FROM plan_versions v WHERE v.plan_id = p.plan_id) AS versions
"""


def _date(value: str | None) -> date | None:
    return None if value is None else date.fromisoformat(value)


def _plan(row: asyncpg.Record) -> Plan:
    versions = tuple(
        PlanVersion(
            version=v["version"], content=PlanContent.model_validate(v["content"]), status=v["status"],
            consultation_meeting_id=v["consultation_meeting_id"], consulted_on=_date(v["consulted_on"]),
            in_force_from=_date(v["in_force_from"]),
        )
        for v in json.loads(row["versions"])
    )
    return Plan(
        plan_id=row["plan_id"], level=row["level"], municipality_code=row["municipality_code"],
        prefecture_code=row["prefecture_code"], name=row["name"], status=row["status"], versions=versions,
        covers_dual_residence=row["covers_dual_residence"], source=row["source"], adopted_on=row["adopted_on"],
        withdrawn_on=row["withdrawn_on"], withdrawal_reason=row["withdrawal_reason"],
    )


async def get_plan(conn: Connection, plan_id: str, *, lock: bool = False) -> Plan | None:
    lock_clause = "FOR UPDATE OF p" if lock else ""
    row = await conn.fetchrow(f"SELECT {_PLAN_COLUMNS} FROM plans p WHERE p.plan_id = $1 {lock_clause}", plan_id)
    return None if row is None else _plan(row)


async def live_plan(conn: Connection, code: str, level: PlanLevel) -> Plan | None:
    """The body's plan of that level that is not withdrawn (at most one)."""
    row = await conn.fetchrow(
        f"SELECT {_PLAN_COLUMNS} FROM plans p WHERE p.municipality_code = $1 AND p.level = $2 "
        "AND p.status <> 'withdrawn'",
        code, level,
    )
    return None if row is None else _plan(row)


async def plans(
    conn: Connection, *, code: str | None = None, prefecture: str | None = None, level: PlanLevel | None = None,
    statuses: Sequence[PlanStatus] | None = None, limit: int = 100, offset: int = 0,
) -> tuple[list[Plan], int]:
    where = """
        ($1::text IS NULL OR p.municipality_code = $1) AND ($2::text IS NULL OR p.prefecture_code = $2)
        AND ($3::text IS NULL OR p.level = $3) AND ($4::text[] IS NULL OR p.status = ANY($4))
    """
    args = (code, prefecture, level, list(statuses) if statuses is not None else None)
    rows = await conn.fetch(
        f"SELECT {_PLAN_COLUMNS} FROM plans p WHERE {where} "
        "ORDER BY p.level DESC, p.prefecture_code, p.municipality_code, p.plan_id LIMIT $5 OFFSET $6",
        *args, limit, offset,
    )
    total = await conn.fetchval(f"SELECT count(*) FROM plans p WHERE {where}", *args)
    return [_plan(row) for row in rows], int(total)


async def save_plan(conn: Connection, plan: Plan) -> None:
    await conn.execute(
        """
        INSERT INTO plans (plan_id, level, municipality_code, prefecture_code, name, status, covers_dual_residence,
                           source, adopted_on, withdrawn_on, withdrawal_reason)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
        ON CONFLICT (plan_id) DO UPDATE SET
            status = EXCLUDED.status, covers_dual_residence = EXCLUDED.covers_dual_residence,
            adopted_on = EXCLUDED.adopted_on, withdrawn_on = EXCLUDED.withdrawn_on,
            withdrawal_reason = EXCLUDED.withdrawal_reason, updated_at = now()
        """,
        plan.plan_id, plan.level, plan.municipality_code, plan.prefecture_code, plan.name, plan.status,
        plan.covers_dual_residence, plan.source, plan.adopted_on, plan.withdrawn_on, plan.withdrawal_reason,
    )
    await conn.executemany(
        """
        INSERT INTO plan_versions (plan_id, version, content, status, consultation_meeting_id, consulted_on,
                                   in_force_from)
        VALUES ($1, $2, $3::jsonb, $4, $5, $6, $7)
        ON CONFLICT (plan_id, version) DO UPDATE SET
            content = EXCLUDED.content, status = EXCLUDED.status,
            consultation_meeting_id = EXCLUDED.consultation_meeting_id, consulted_on = EXCLUDED.consulted_on,
            in_force_from = EXCLUDED.in_force_from
        """,
        [
            (plan.plan_id, v.version, v.content.model_dump_json(), v.status, v.consultation_meeting_id,
             v.consulted_on, v.in_force_from)
            for v in plan.versions
        ],
    )


async def insert_seeded_plans(conn: Connection, seeded: Sequence[Plan]) -> list[Plan]:
    """Insert the reference plans that are not there yet; the ones inserted now."""
    inserted = await conn.fetch(
        """
        INSERT INTO plans (plan_id, level, municipality_code, prefecture_code, name, status, covers_dual_residence,
                           source, adopted_on)
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bool[],
                             $8::text[], $9::date[])
        ON CONFLICT DO NOTHING
        RETURNING plan_id
        """,
        [p.plan_id for p in seeded], [p.level for p in seeded], [p.municipality_code for p in seeded],
        [p.prefecture_code for p in seeded], [p.name for p in seeded], [p.status for p in seeded],
        [p.covers_dual_residence for p in seeded], [p.source for p in seeded], [p.adopted_on for p in seeded],
    )
    new = {row["plan_id"] for row in inserted}
    added = [p for p in seeded if p.plan_id in new]
    for plan in added:
        await save_plan(conn, plan)
    return added


# --- support corporations ----------------------------------------------------------------------------

_CORPORATION_COLUMNS = """
    corporation_id, municipality_code, name, services, status, applied_on, source, designated_on, revoked_on,
    revocation_reason
"""


def _corporation(row: asyncpg.Record) -> Corporation:
    return Corporation(
        corporation_id=row["corporation_id"], municipality_code=row["municipality_code"], name=row["name"],
        services=tuple(row["services"]), status=row["status"], applied_on=row["applied_on"], source=row["source"],
        designated_on=row["designated_on"], revoked_on=row["revoked_on"],
        revocation_reason=row["revocation_reason"],
    )


async def get_corporation(conn: Connection, corporation_id: str, *, lock: bool = False) -> Corporation | None:
    row = await conn.fetchrow(
        f"SELECT {_CORPORATION_COLUMNS} FROM corporations WHERE corporation_id = $1 {'FOR UPDATE' if lock else ''}",
        corporation_id,
    )
    return None if row is None else _corporation(row)


async def corporations(
    conn: Connection, *, code: str | None = None, status: str | None = None, limit: int = 100, offset: int = 0,
) -> tuple[list[Corporation], int]:
    where = "($1::text IS NULL OR municipality_code = $1) AND ($2::text IS NULL OR status = $2)"
    rows = await conn.fetch(
        f"SELECT {_CORPORATION_COLUMNS} FROM corporations WHERE {where} "
        "ORDER BY municipality_code, designated_on NULLS LAST, corporation_id LIMIT $3 OFFSET $4",
        code, status, limit, offset,
    )
    total = await conn.fetchval(f"SELECT count(*) FROM corporations WHERE {where}", code, status)
    return [_corporation(row) for row in rows], int(total)


async def save_corporation(conn: Connection, corporation: Corporation, *, revocation_note: str | None = None) -> None:
    c = corporation
    await conn.execute(
        """
        INSERT INTO corporations (corporation_id, municipality_code, name, services, status, applied_on, source,
                                  designated_on, revoked_on, revocation_reason, revocation_note)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
        ON CONFLICT (corporation_id) DO UPDATE SET
            status = EXCLUDED.status, designated_on = EXCLUDED.designated_on, revoked_on = EXCLUDED.revoked_on,
            revocation_reason = EXCLUDED.revocation_reason,
            revocation_note = coalesce(EXCLUDED.revocation_note, corporations.revocation_note), updated_at = now()
        """,
        c.corporation_id, c.municipality_code, c.name, list(c.services), c.status, c.applied_on, c.source,
        c.designated_on, c.revoked_on, c.revocation_reason, revocation_note,
    )


async def insert_seeded_corporations(conn: Connection, seeded: Sequence[Corporation]) -> list[Corporation]:
    inserted = await conn.fetch(
        """
        INSERT INTO corporations (corporation_id, municipality_code, name, status, applied_on, source, designated_on)
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::date[], $6::text[], $7::date[])
        ON CONFLICT DO NOTHING
        RETURNING corporation_id
        """,
        [c.corporation_id for c in seeded], [c.municipality_code for c in seeded], [c.name for c in seeded],
        [c.status for c in seeded], [c.applied_on for c in seeded], [c.source for c in seeded],
        [c.designated_on for c in seeded],
    )
    new = {row["corporation_id"] for row in inserted}
    return [c for c in seeded if c.corporation_id in new]


async def add_report(conn: Connection, report: SupervisionReport) -> None:
    await conn.execute(
        "INSERT INTO supervision_reports (report_id, corporation_id, period_from, period_until, received_on, summary) "
        "VALUES ($1, $2, $3, $4, $5, $6)",
        report.report_id, report.corporation_id, report.period_from, report.period_until, report.received_on,
        report.summary,
    )


async def reports(conn: Connection, corporation_id: str) -> list[SupervisionReport]:
    rows = await conn.fetch(
        "SELECT report_id, corporation_id, period_from, period_until, received_on, summary "
        "FROM supervision_reports WHERE corporation_id = $1 ORDER BY received_on, report_id",
        corporation_id,
    )
    return [SupervisionReport(**dict(row)) for row in rows]


# --- proposals ---------------------------------------------------------------------------------------

_PROPOSAL_COLUMNS = """
    proposal_id, corporation_id, municipality_code, kind, plan_id, summary, proposed_on, due_on, status,
    answered_on, answer_reason, answer_note
"""


async def get_proposal(conn: Connection, proposal_id: str, *, lock: bool = False) -> Proposal | None:
    row = await conn.fetchrow(
        f"SELECT {_PROPOSAL_COLUMNS} FROM proposals WHERE proposal_id = $1 {'FOR UPDATE' if lock else ''}",
        proposal_id,
    )
    return None if row is None else Proposal(**dict(row))


async def proposals(
    conn: Connection, code: str, status: str | None, limit: int, offset: int
) -> tuple[list[Proposal], int]:
    where = "municipality_code = $1 AND ($2::text IS NULL OR status = $2)"
    rows = await conn.fetch(
        f"SELECT {_PROPOSAL_COLUMNS} FROM proposals WHERE {where} ORDER BY due_on, proposal_id LIMIT $3 OFFSET $4",
        code, status, limit, offset,
    )
    total = await conn.fetchval(f"SELECT count(*) FROM proposals WHERE {where}", code, status)
    return [Proposal(**dict(row)) for row in rows], int(total)


async def save_proposal(conn: Connection, p: Proposal) -> None:
    await conn.execute(
        """
        INSERT INTO proposals (proposal_id, corporation_id, municipality_code, kind, plan_id, summary, proposed_on,
                               due_on, status, answered_on, answer_reason, answer_note)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
        ON CONFLICT (proposal_id) DO UPDATE SET
            status = EXCLUDED.status, answered_on = EXCLUDED.answered_on, answer_reason = EXCLUDED.answer_reason,
            answer_note = EXCLUDED.answer_note
        """,
        p.proposal_id, p.corporation_id, p.municipality_code, p.kind, p.plan_id, p.summary, p.proposed_on, p.due_on,
        p.status, p.answered_on, p.answer_reason, p.answer_note,
    )


# --- councils ----------------------------------------------------------------------------------------


async def _council(conn: Connection, row: asyncpg.Record) -> Council:
    members = await conn.fetch(
        "SELECT member_id, kind, name, joined_on FROM council_members WHERE council_id = $1 ORDER BY position",
        row["council_id"],
    )
    return Council(
        council_id=row["council_id"], municipality_code=row["municipality_code"], name=row["name"],
        formed_on=row["formed_on"], members=tuple(CouncilMember(**dict(m)) for m in members),
    )


async def get_council(conn: Connection, council_id: str, *, lock: bool = False) -> Council | None:
    row = await conn.fetchrow(
        f"SELECT council_id, municipality_code, name, formed_on FROM councils WHERE council_id = $1 "
        f"{'FOR UPDATE' if lock else ''}",
        council_id,
    )
    return None if row is None else await _council(conn, row)


async def council_of(conn: Connection, code: str) -> Council | None:
    row = await conn.fetchrow(
        "SELECT council_id, municipality_code, name, formed_on FROM councils WHERE municipality_code = $1", code
    )
    return None if row is None else await _council(conn, row)


async def save_council(conn: Connection, council: Council) -> None:
    await conn.execute(
        "INSERT INTO councils (council_id, municipality_code, name, formed_on) VALUES ($1, $2, $3, $4) "
        "ON CONFLICT (council_id) DO NOTHING",
        council.council_id, council.municipality_code, council.name, council.formed_on,
    )
    await conn.executemany(
        "INSERT INTO council_members (member_id, council_id, position, kind, name, joined_on) "
        "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (member_id) DO NOTHING",
        [
            (m.member_id, council.council_id, position, m.kind, m.name, m.joined_on)
            for position, m in enumerate(council.members)
        ],
    )


async def add_meeting(conn: Connection, meeting: CouncilMeeting) -> None:
    await conn.execute(
        "INSERT INTO council_meetings (meeting_id, council_id, held_on, agenda, minutes_summary, plan_id) "
        "VALUES ($1, $2, $3, $4, $5, $6)",
        meeting.meeting_id, meeting.council_id, meeting.held_on, meeting.agenda, meeting.minutes_summary,
        meeting.plan_id,
    )


async def get_meeting(conn: Connection, meeting_id: str) -> CouncilMeeting | None:
    row = await conn.fetchrow(
        "SELECT meeting_id, council_id, held_on, agenda, minutes_summary, plan_id FROM council_meetings "
        "WHERE meeting_id = $1",
        meeting_id,
    )
    return None if row is None else CouncilMeeting(**dict(row))


async def meetings(conn: Connection, council_id: str) -> list[CouncilMeeting]:
    rows = await conn.fetch(
        "SELECT meeting_id, council_id, held_on, agenda, minutes_summary, plan_id FROM council_meetings "
        "WHERE council_id = $1 ORDER BY held_on, meeting_id",
        council_id,
    )
    return [CouncilMeeting(**dict(row)) for row in rows]
