"""A resident's data export: everything the platform holds about them, gathered through events.

``request_export`` records the request and publishes ``ExportRequested``; every service answers with
its part (``shared/kit/data_export.py``), which ``gather_parts`` keeps; once every service has
answered the export is ready, and ``archive`` adds registration's own part. The archive is JSON; a
readable PDF in Japanese is rendered from it (``export_pdf``).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog

from shared.contracts.privacy import EXPORT_SERVICES, ExportPartProvided, ExportRequested
from shared.contracts.topics import EXPORT_REQUESTS
from shared.kit.consumer import EventRouter, Run
from shared.kit.data_export import ExportTables, rows_about
from shared.kit.db import Connection
from shared.kit.erasure import erased_among
from shared.kit.errors import NotFound
from shared.kit.service import UnitOfWork

log = structlog.get_logger(__name__)

#: What registration itself holds about a resident.
EXPORT_TABLES: ExportTables = {
    "residents": "id = $1",
    "registrations": "resident_id = $1",
    "identity_verifications": "resident_id = $1",
    "premium_reviews": "registration_id IN (SELECT id FROM registrations WHERE resident_id = $1)",
    "premium_activities": "review_id IN (SELECT r.id FROM premium_reviews r JOIN registrations g "
    "ON g.id = r.registration_id WHERE g.resident_id = $1)",
    "consents": "resident_id = $1",
    "consent_log": "resident_id = $1",
}


class ExportNotFound(NotFound):
    code = "export-not-found"
    title = "No such export"


@dataclass(frozen=True, slots=True)
class DataExport:
    export_id: str
    resident_id: str
    requested_at: datetime
    ready_at: datetime | None
    answered: tuple[str, ...]

    @property
    def waiting_for(self) -> tuple[str, ...]:
        return tuple(s for s in EXPORT_SERVICES if s not in self.answered)

    def view(self) -> dict[str, Any]:
        return {
            "export_id": self.export_id, "resident_id": self.resident_id,
            "status": "ready" if self.ready_at is not None else "gathering",
            "requested_at": self.requested_at.isoformat(),
            "ready_at": None if self.ready_at is None else self.ready_at.isoformat(),
            "answered": list(self.answered), "waiting_for": list(self.waiting_for),
        }


async def request_export(uow: UnitOfWork, resident_id: str) -> DataExport:
    now = uow.runtime.clock.now()
    export_id = str(uuid.uuid4())
    await uow.conn.execute(
        "INSERT INTO data_exports (export_id, resident_id, requested_at) VALUES ($1, $2, $3)",
        export_id, resident_id, now,
    )
    await uow.emit(
        EXPORT_REQUESTS, ExportRequested(export_id=export_id, resident_id=resident_id, requested_at=now),
        subject=resident_id, key=resident_id,
    )
    log.info("data export requested", export_id=export_id, resident_id=resident_id)
    return DataExport(export_id, resident_id, now, None, ())


async def load_export(conn: Connection, resident_id: str, export_id: str) -> DataExport:
    row = await conn.fetchrow(
        """
        SELECT e.export_id, e.resident_id, e.requested_at, e.ready_at,
               COALESCE(array_agg(p.service ORDER BY p.service) FILTER (WHERE p.service IS NOT NULL), '{}') AS answered
        FROM data_exports e LEFT JOIN data_export_parts p USING (export_id)
        WHERE e.export_id = $1 AND e.resident_id = $2
        GROUP BY e.export_id
        """,
        export_id, resident_id,
    )
    if row is None:
        raise ExportNotFound(f"no export {export_id} of this resident")
    return DataExport(
        row["export_id"], row["resident_id"], row["requested_at"], row["ready_at"], tuple(row["answered"])
    )


async def archive(conn: Connection, export: DataExport) -> dict[str, Any]:
    """The whole archive: registration's part read now, every other service's as it answered."""
    rows = await conn.fetch("SELECT service, part, provided_at FROM data_export_parts WHERE export_id = $1",
                            export.export_id)
    services: dict[str, Any] = {"registration": await rows_about(conn, export.resident_id, EXPORT_TABLES)}
    for row in sorted(rows, key=lambda r: r["service"]):
        services[row["service"]] = json.loads(row["part"])
    return {
        "export_id": export.export_id, "resident_id": export.resident_id,
        "requested_at": export.requested_at.isoformat(),
        "ready_at": None if export.ready_at is None else export.ready_at.isoformat(),
        "services": services,
    }


async def forget_exports(conn: Connection, resident_id: str) -> None:
    """Erasure: the resident's exports go with the rest of their data."""
    await conn.execute("DELETE FROM data_exports WHERE resident_id = $1", resident_id)


parts_router = EventRouter()


@parts_router.on_many(ExportPartProvided)
async def gather_parts(run: Run[ExportPartProvided]) -> None:
    """Keep each service's part (opened with the resident's key; an erased resident's is dropped)."""
    events = run.events
    erased = await erased_among(run.conn, [e.resident_id for e in events])
    opened = await run.keyring.open_many([e.part for e in events])
    now = run.clock.now()
    for event, part in zip(events, opened, strict=True):
        if part is None or event.resident_id in erased or event.service not in EXPORT_SERVICES:
            continue  # erased (the key is gone), or not a service that answers exports
        stored = await run.conn.fetchval(
            """
            INSERT INTO data_export_parts (export_id, service, part, provided_at)
            SELECT $1, $2, $3::jsonb, $4 FROM data_exports WHERE export_id = $1 AND resident_id = $5
            ON CONFLICT (export_id, service) DO NOTHING
            RETURNING true
            """,
            event.export_id, event.service, part.decode(), event.provided_at, event.resident_id,
        )
        if stored:
            await run.conn.execute(
                """
                UPDATE data_exports SET ready_at = $2
                WHERE export_id = $1 AND ready_at IS NULL
                  AND (SELECT count(*) FROM data_export_parts WHERE export_id = $1) >= $3
                """,
                event.export_id, now, len(EXPORT_SERVICES),
            )
