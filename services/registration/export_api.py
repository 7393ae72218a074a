"""HTTP routes of a resident's data export (prefix /v1): ask, follow, download as JSON or PDF."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from services.registration import exports, store
from services.registration.domain import ResidentNotFound
from services.registration.export_pdf import render_export
from shared.kit.auth import Principal, Role, require
from shared.kit.errors import Conflict
from shared.kit.service import ServiceRuntime, UnitOfWork
from shared.kit.use_case import Outcome, WriteRequest

router = APIRouter(prefix="/v1", tags=["data export"])

ResidentOrAdmin = Annotated[Principal, Depends(require(Role.RESIDENT, Role.ADMIN))]


class ExportNotReady(Conflict):
    code = "export-not-ready"
    title = "The export is still being gathered"


def _runtime(request: Request) -> ServiceRuntime:
    runtime: ServiceRuntime = request.app.state.runtime
    return runtime


@router.post("/residents/{resident_id}/exports", status_code=202)
async def request_export(resident_id: str, principal: ResidentOrAdmin, write: WriteRequest) -> Response:
    """Ask for everything the platform holds about the resident (APPI Art. 33): every service answers
    through events; follow ``GET .../exports/{export_id}`` until it is ready."""
    principal.ensure_resident(resident_id)

    async def act(uow: UnitOfWork) -> Outcome:
        if await store.lock_resident(uow.conn, resident_id) is None:
            raise ResidentNotFound(f"no resident {resident_id}")
        export = await exports.request_export(uow, resident_id)
        return Outcome(202, export.view())

    return (await write.run(act)).response()


async def _export(request: Request, resident_id: str, export_id: str) -> exports.DataExport:
    async with _runtime(request).pool.acquire() as conn:
        return await exports.load_export(conn, resident_id, export_id)


@router.get("/residents/{resident_id}/exports/{export_id}")
async def get_export(resident_id: str, export_id: str, request: Request, principal: ResidentOrAdmin) -> dict[str, Any]:
    """Where the export stands: which services have answered, and whether it is ready."""
    principal.ensure_resident(resident_id)
    return (await _export(request, resident_id, export_id)).view()


async def _archive(request: Request, resident_id: str, export_id: str) -> dict[str, Any]:
    export = await _export(request, resident_id, export_id)
    if export.ready_at is None:
        raise ExportNotReady(f"waiting for {', '.join(export.waiting_for)}")
    async with _runtime(request).pool.acquire() as conn:
        return await exports.archive(conn, export)


@router.get("/residents/{resident_id}/exports/{export_id}/archive.json")
async def download_json(resident_id: str, export_id: str, request: Request, principal: ResidentOrAdmin) -> Response:
    """The whole archive as JSON: every service's rows about the resident."""
    principal.ensure_resident(resident_id)
    archive = await _archive(request, resident_id, export_id)
    return JSONResponse(archive, headers={
        "Content-Disposition": f'attachment; filename="nichiiki-export-{export_id}.json"',
        "Cache-Control": "no-store",
    })


@router.get("/residents/{resident_id}/exports/{export_id}/archive.pdf")
async def download_pdf(resident_id: str, export_id: str, request: Request, principal: ResidentOrAdmin) -> Response:
    """The same archive as a readable PDF in Japanese."""
    principal.ensure_resident(resident_id)
    archive = await _archive(request, resident_id, export_id)
    pdf = await asyncio.to_thread(render_export, archive)
    return Response(pdf, media_type="application/pdf", headers={
        "Content-Disposition": f'attachment; filename="nichiiki-export-{export_id}.pdf"',
        "Cache-Control": "no-store",
    })
