"""The municipality's catalogue of designated activities (自治体が指定する担い手活動), for staff: every
staff member reads it; managers publish, change and retire entries (the mayor's designation, so the
registration service allows managers alone and the console offers the forms to them alone).

The list is the public catalogue (published entries; a retired one leaves it, and the registration
service keeps it for the picks already made). Premium requests pick three or more entries of it.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from services.console.clients import ApiError, Json
from services.console.i18n import label
from services.console.pages.base import Form, PageRefused, Viewer, problem_errors, read_form, redirect, signed_in

router = APIRouter(prefix="/staff/catalogue", include_in_schema=False)

Staff = Annotated[Viewer, Depends(signed_in("staff"))]
KINDS = ("festival", "farming", "environment", "disaster_prevention", "community_event", "education", "other")
#: Which input a refusal is about.
FIELD_OF_CODE = {"invalid-activity-code": "code", "activity-exists": "code", "invalid-activity-name": "name_ja"}


def _manager(viewer: Viewer) -> None:
    if not viewer.signed_in.is_manager:
        raise PageRefused(403)


async def _catalogue(viewer: Viewer) -> Json:
    # The public catalogue (published entries): the same list residents pick from.
    return await viewer.services.activity_catalogue(viewer.municipality, _client(viewer))


def _kinds(viewer: Viewer) -> list[tuple[str, str]]:
    return [(kind, label("activity_kind", kind, viewer.lang)) for kind in KINDS]


def _client(viewer: Viewer) -> str | None:
    return viewer.request.client.host if viewer.request.client else None


def _errors(viewer: Viewer, error: ApiError) -> list[tuple[str, str]]:
    named = FIELD_OF_CODE.get(error.code, "")
    return [(name or named, message) for name, message in problem_errors(error, viewer.lang)]


def _entry_body(form: Form, *, creating: bool) -> Json:
    """The service's body from the form: a change sends every field (the service changes only what
    differs; an empty season removes it)."""
    body: Json = {"name_ja": form.get("name_ja"), "name_en": form.get("name_en"), "kind": form.get("kind"),
                  "season": form.get("season") or None, "evidence_required": form.get("evidence_required") == "yes"}
    if creating:
        body["code"] = form.get("code")
    return body


async def _list_page(viewer: Viewer, **context: Any) -> Response:
    catalogue = await _catalogue(viewer)
    status = context.pop("status", 200)
    return viewer.render("staff/catalogue.html", status=status, catalogue=catalogue, kinds=_kinds(viewer),
                         **context)


@router.get("")
async def catalogue(viewer: Staff) -> Response:
    return await _list_page(viewer)


@router.post("")
async def create_entry(viewer: Staff, request: Request) -> Response:
    form = await read_form(request, viewer)
    _manager(viewer)
    try:
        await viewer.services.call("POST", "registration", f"/v1/municipalities/{viewer.municipality}/activities",
                                   await viewer.token(), json=_entry_body(form, creating=True),
                                   idempotency_key=form.get("key") or None)
    except ApiError as error:
        return await _list_page(viewer, status=error.status, form=form.kept(), errors=_errors(viewer, error))
    return redirect("/staff/catalogue", "catalogue.created")


async def _entry_page(viewer: Viewer, activity_id: str, **context: Any) -> Response:
    entry = next((a for a in (await _catalogue(viewer))["items"] if a["id"] == activity_id), None)
    if entry is None:  # retired, or another municipality's: not in this catalogue
        raise PageRefused(404)
    status = context.pop("status", 200)
    form = context.pop("form", None) or {
        "name_ja": entry["name_ja"], "name_en": entry["name_en"], "kind": entry["kind"],
        "season": entry.get("season") or "", "evidence_required": "yes" if entry["evidence_required"] else "",
    }
    return viewer.render("staff/catalogue_entry.html", status=status, entry=entry, kinds=_kinds(viewer),
                         form=form, **context)


@router.get("/{activity_id}")
async def entry(viewer: Staff, activity_id: str) -> Response:
    return await _entry_page(viewer, activity_id)


@router.post("/{activity_id}")
async def change_entry(viewer: Staff, request: Request, activity_id: str) -> Response:
    form = await read_form(request, viewer)
    _manager(viewer)
    try:
        await viewer.services.call("PATCH", "registration", f"/v1/activities/{activity_id}", await viewer.token(),
                                   json=_entry_body(form, creating=False), idempotency_key=form.get("key") or None)
    except ApiError as error:
        return await _entry_page(viewer, activity_id, status=error.status, form=form.kept(),
                                 errors=_errors(viewer, error))
    return redirect(f"/staff/catalogue/{activity_id}", "catalogue.changed")


@router.post("/{activity_id}/retire")
async def retire_entry(viewer: Staff, request: Request, activity_id: str) -> Response:
    form = await read_form(request, viewer)
    _manager(viewer)
    if form.get("confirm") != "yes":
        return await _entry_page(viewer, activity_id, status=422,
                                 errors=[("confirm", viewer.t("catalogue.retire_confirm_needed"))])
    try:
        await viewer.services.call("POST", "registration", f"/v1/activities/{activity_id}/retire",
                                   await viewer.token(), idempotency_key=form.get("key") or None)
    except ApiError as error:
        return await _entry_page(viewer, activity_id, status=error.status, errors=_errors(viewer, error))
    return redirect("/staff/catalogue", "catalogue.retired")
