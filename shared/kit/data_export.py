"""Each service's part of a resident's data export, answered through events (``shared/contracts/privacy.py``).

A service names the tables that hold something about a resident and the column that links a row to
them (``ExportTables``); the kit answers every ``ExportRequested`` with those rows, sealed with the
resident's data key, on ``privacy.export-parts.v1``. Listing tables rather than hand-picking fields
keeps the export honest: a column added later is in the next export without anyone remembering it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import structlog

from shared.contracts.privacy import ExportPartProvided, ExportRequested
from shared.contracts.sealed import resident_subject
from shared.contracts.topics import EXPORT_PARTS
from shared.kit.consumer import EventRouter, HandlerContext
from shared.kit.db import Connection
from shared.kit.erasure import is_erased
from shared.kit.keyring import SubjectErased

log = structlog.get_logger(__name__)

#: table → the SQL condition that picks a resident's rows, with ``$1`` the resident id
#: (e.g. ``{"grants": "resident_id = $1"}``). Names come from the service's code, never from input.
ExportTables = Mapping[str, str]


def _plain(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, UUID | Decimal):
        return str(value)
    if isinstance(value, bytes | memoryview):
        return None  # binary (a PDF, a key): named in the export, not copied into it
    if isinstance(value, str) and value.startswith("{") and value.endswith("}"):
        try:
            return json.loads(value)
        except ValueError:
            return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


async def rows_about(conn: Connection, resident_id: str, tables: ExportTables) -> dict[str, list[dict[str, Any]]]:
    """Every row of these tables about the resident, as JSON-ready dicts, table by table."""
    part: dict[str, list[dict[str, Any]]] = {}
    for table, condition in tables.items():
        rows = await conn.fetch(f"SELECT * FROM {table} WHERE {condition}", resident_id)
        part[table] = [{k: _plain(v) for k, v in dict(row).items()} for row in rows]
    return part


def export_router(service: str, tables: ExportTables) -> EventRouter:
    """Routes that answer export requests with this service's rows about the resident: combine them
    with the service's own router (``EventRouter.combined``) and add ``EXPORT_REQUESTS`` to its
    topics, so answering exports costs no consumer group of its own."""
    router = EventRouter()

    @router.on(ExportRequested)
    async def provide_part(ctx: HandlerContext, event: ExportRequested) -> None:
        if ctx.keyring is None or await is_erased(ctx.conn, event.resident_id):
            return  # erased: there is nothing to give, and nothing may be written about them
        part = await rows_about(ctx.conn, event.resident_id, tables)
        try:
            sealed = await ctx.keyring.seal(
                resident_subject(event.resident_id), json.dumps(part, ensure_ascii=False, default=str)
            )
        except SubjectErased:
            return
        await ctx.emit(
            EXPORT_PARTS,
            ExportPartProvided(
                export_id=event.export_id, resident_id=event.resident_id, service=service, part=sealed,
                provided_at=ctx.clock.now(),
            ),
            subject=event.resident_id, key=event.resident_id,
        )
        log.info("export part provided", export_id=event.export_id, tables=len(part))

    return router
