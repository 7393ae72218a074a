"""HTTP: a resident's inbox (list, unread count, mark read) and their e-mail delivery log."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response

from services.notification import handlers
from services.notification.domain import ensure_own
from shared.kit.auth import Principal, Role, require
from shared.kit.use_case import WriteRequest

router = APIRouter(prefix="/v1", tags=["notifications"])

ResidentOrAdmin = Annotated[Principal, Depends(require(Role.RESIDENT, Role.ADMIN))]
ResidentOnly = Annotated[Principal, Depends(require(Role.RESIDENT))]
Limit = Annotated[int, Query(ge=1, le=100, description="page size")]
Offset = Annotated[int, Query(ge=0, le=100_000)]


@router.get("/residents/{resident_id}/notifications", summary="A resident's inbox, newest first")
async def list_notifications(
    request: Request, resident_id: str, principal: ResidentOrAdmin,
    unread: Annotated[bool | None, Query(description="true: only unread; false: only read")] = None,
    limit: Limit = 20, offset: Offset = 0,
) -> dict[str, Any]:
    ensure_own(principal, resident_id)
    return await handlers.list_notifications(
        request.app.state.runtime.pool, resident_id, unread=unread, limit=limit, offset=offset
    )


@router.get("/residents/{resident_id}/notifications/unread-count", summary="How many are unread")
async def unread_count(request: Request, resident_id: str, principal: ResidentOrAdmin) -> dict[str, Any]:
    ensure_own(principal, resident_id)
    return await handlers.unread_count(request.app.state.runtime.pool, resident_id)


@router.post(
    "/residents/{resident_id}/notifications/{notification_id}/read", response_model=dict[str, Any],
    summary="Mark one notification read (again is harmless: the first read time stays)",
)
async def mark_read(
    resident_id: str, notification_id: uuid.UUID, principal: ResidentOnly, write: WriteRequest
) -> Response:
    """The resident's own notifications only (another resident's is a 403 or a 404)."""
    return (await handlers.mark_read(write, resident_id, notification_id)).response()


@router.get(
    "/residents/{resident_id}/emails",
    summary="The resident's e-mails and what became of them (no body, no address)",
)
async def list_emails(
    request: Request, resident_id: str, principal: ResidentOrAdmin, limit: Limit = 20, offset: Offset = 0
) -> dict[str, Any]:
    ensure_own(principal, resident_id)
    return await handlers.list_emails(request.app.state.runtime.pool, resident_id, limit=limit, offset=offset)
