"""マイページ: the resident's own pages, phone-sized first. Sign-up is on the public pages; here a
resident tells the platform who they are, registers with municipalities (basic) and asks for
premium (picking activities from the municipality's catalogue of designated activities), applies
for dual-resident certification, sees certificates, grants and trips, the inbox, their consents
(each revocable), every delivery of their data to partners, exports everything held about them,
and withdraws (erasing their data) after a confirmation.

Each call names the resident id from the signed-in session (the token's subject): a resident can
only ever reach their own data, and the services check it again.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from services.console import i18n
from services.console.clients import ApiError, Json
from services.console.pages.base import (
    PAGE_SIZE,
    Form,
    PageRefused,
    Viewer,
    offset_of,
    pager,
    problem_errors,
    read_form,
    redirect,
    signed_in,
)
from services.console.pages.downloads import passed_on
from services.console.session import COOKIE

router = APIRouter(prefix="/my", include_in_schema=False)

Resident = Annotated[Viewer, Depends(signed_in("resident"))]
HOUSING = ("owned", "rented", "trial_residence", "shared_house", "hotel")
_EXPORT_ID = re.compile(r"^[0-9a-f-]{36}$")


def _me(viewer: Viewer) -> str:
    return viewer.signed_in.subject


async def _profile(viewer: Viewer) -> Json | None:
    try:
        return await viewer.services.resident(await viewer.token(), _me(viewer))
    except ApiError as error:
        if error.status == 404:
            return None
        raise


def _field_errors(viewer: Viewer, error: ApiError, field_of_code: dict[str, str] | None = None,
                  default: str = "") -> list[tuple[str, str]]:
    named = (field_of_code or {}).get(error.code, default)
    return [(name or named, message) for name, message in problem_errors(error, viewer.lang)]


# --- home, profile, registrations ---------------------------------------------------------------


async def _home(viewer: Viewer, **context: Any) -> Response:
    profile = await _profile(viewer)
    status = context.pop("status", 200)
    return viewer.render("resident/home.html", status=status, profile=profile, **context)


@router.get("")
async def home(viewer: Resident) -> Response:
    return await _home(viewer)


PROFILE_FIELDS = {
    "invalid-name": "name", "invalid-kana": "name_kana", "invalid-email": "email", "invalid-phone": "phone",
    "invalid-legal-address": "legal_address_code", "birth-date-in-future": "date_of_birth",
}


@router.post("/profile")
async def create_profile(viewer: Resident, request: Request) -> Response:
    form = await read_form(request, viewer)
    required = ("name", "name_kana", "email", "date_of_birth", "legal_address_code")
    missing = [(name, viewer.t("error.required", field=viewer.t(_PROFILE_LABEL[name])))
               for name in required if not form.get(name)]
    if missing:
        return await _home(viewer, status=422, form=form.kept(), errors=missing)
    consents: list[Json] = []
    if form.get("consent_email"):
        consents.append({"purpose": "email"})
    if form.get("consent_jal"):
        consents.append({"purpose": "share_certificate", "partner": "jal"})
    body = {
        "name": form.get("name"), "name_kana": form.get("name_kana"), "email": form.get("email"),
        "phone": form.get("phone") or None, "date_of_birth": form.get("date_of_birth"),
        "legal_address_code": form.get("legal_address_code"),
        "preferred_language": "en" if form.get("preferred_language") == "en" else "ja", "consents": consents,
    }
    try:
        await viewer.services.call("POST", "registration", "/v1/residents", await viewer.token(), json=body,
                                   idempotency_key=form.get("key") or None)
    except ApiError as error:
        return await _home(viewer, status=error.status, form=form.kept(),
                           errors=_field_errors(viewer, error, PROFILE_FIELDS))
    return redirect("/my", "profile.saved")


_PROFILE_LABEL = {"name": "profile.name", "name_kana": "profile.kana", "email": "profile.email",
                  "date_of_birth": "profile.dob", "legal_address_code": "profile.legal_address"}


@router.post("/registrations")
async def register(viewer: Resident, request: Request) -> Response:
    form = await read_form(request, viewer)
    body: Json = {"municipality_code": form.get("municipality_code"), "tier": "basic"}
    try:
        await viewer.services.call("POST", "registration", f"/v1/residents/{_me(viewer)}/registrations",
                                   await viewer.token(), json=body, idempotency_key=form.get("key") or None)
    except ApiError as error:
        return await _home(viewer, status=error.status, form=form.kept(),
                           errors=_field_errors(viewer, error, default="municipality_code"))
    return redirect("/my", "my.registered")


# --- premium: picks from the municipality's catalogue of designated activities ------------------

#: Pick rows the form offers: three distinct entries are needed, a few more leave room for repeats.
PICK_ROWS = 5
_MUNICIPALITY_CODE = re.compile(r"^\d{6}$")
_PICK = re.compile(r"activities\[(\d+)\]")
#: Which input of a pick row a refusal points at (the rest: the activity chosen).
PICK_FIELD_OF_CODE = {"activity-evidence-required": "document_ref", "activity-out-of-range": "activity_date",
                      "activity-retired": "activity_date"}


async def _premium_page(viewer: Viewer, municipality_code: str, **context: Any) -> Response:
    """The premium form: the resident's basic registrations to upgrade, and the chosen municipality's
    catalogue (public: read without the resident's token) to pick from."""
    profile = await _profile(viewer)
    if profile is None:
        return redirect("/my")
    basic = [r["municipality_code"] for r in profile.get("registrations", []) if r.get("tier") == "basic"
             and r.get("status") == "active"]
    code = municipality_code if _MUNICIPALITY_CODE.match(municipality_code) else (basic[0] if len(basic) == 1 else "")
    catalogue: Json | None = None
    status = context.pop("status", 200)
    if code:
        try:
            client = viewer.request.client.host if viewer.request.client else None
            catalogue = await viewer.services.activity_catalogue(code, client)
        except ApiError as error:
            if error.status >= 500:
                raise
            status = error.status  # not a municipality one registers with: said beside the choice
            context["errors"] = [*context.get("errors", []), *_field_errors(viewer, error, default="municipality_code")]
    return viewer.render("resident/premium.html", status=status, basic=basic, municipality_code=code,
                         catalogue=catalogue, rows=range(PICK_ROWS), **context)


@router.get("/premium")
async def premium_page(viewer: Resident, request: Request) -> Response:
    return await _premium_page(viewer, request.query_params.get("municipality", "").strip())


@router.post("/premium")
async def ask_for_premium(viewer: Resident, request: Request) -> Response:
    form = await read_form(request, viewer)
    code = form.get("municipality_code")
    picks, missing = _picks(viewer, form)
    if missing:
        return await _premium_page(viewer, code, status=422, form=form.kept(), errors=missing)
    body: Json = {"municipality_code": code, "tier": "premium", "attestation": form.get("attestation") or None,
                  "activities": [pick for _, pick in picks]}
    try:
        await viewer.services.call("POST", "registration", f"/v1/residents/{_me(viewer)}/registrations",
                                   await viewer.token(), json=body, idempotency_key=form.get("key") or None)
    except ApiError as error:
        return await _premium_page(viewer, code, status=error.status, form=form.kept(),
                                   errors=_pick_errors(viewer, error, [row for row, _ in picks]))
    return redirect("/my", "my.premium_requested")


def _picks(viewer: Viewer, form: Form) -> tuple[list[tuple[int, Json]], list[tuple[str, str]]]:
    """The rows with an activity chosen, as the service's picks ``{activity_id, date, document_ref?}``
    (with their row numbers), and a line per chosen activity without a date."""
    picks: list[tuple[int, Json]] = []
    missing: list[tuple[str, str]] = []
    for row in range(PICK_ROWS):
        activity_id, day = form.get(f"activity_id_{row}"), form.get(f"activity_date_{row}")
        if not activity_id:
            continue
        if not day:
            missing.append((f"activity_date_{row}", viewer.t("premium.date_needed", n=row + 1)))
        picks.append((row, {"activity_id": activity_id, "date": day,
                            "document_ref": form.get(f"document_ref_{row}") or None}))
    return picks, missing


def _pick_errors(viewer: Viewer, error: ApiError, rows: list[int]) -> list[tuple[str, str]]:
    """A refusal, linked to the input it is about. ``activities[i]`` in the detail (the service's rules)
    or in ``loc`` (its request checks) is the i-th pick sent, which is form row ``rows[i]``."""
    index: int | None = None
    if (match := _PICK.search(error.detail)) is not None:
        index = int(match.group(1))
    for item in error.errors:
        loc = [str(part) for part in item.get("loc", []) if str(part) != "body"]
        if len(loc) >= 2 and loc[0] == "activities" and loc[1].isdigit():
            index = int(loc[1])
    if index is not None and index < len(rows):
        title = i18n.problem_title(error.code, error.status, viewer.lang)
        field = f"{PICK_FIELD_OF_CODE.get(error.code, 'activity_id')}_{rows[index]}"
        return [(field, viewer.t("premium.in_row", n=rows[index] + 1, problem=title))]
    named = PREMIUM_FIELDS.get(error.code, "attestation" if error.code.startswith("attestation") else "")
    return [("activity_id_0" if name == "activities" else name or named, message)
            for name, message in problem_errors(error, viewer.lang)]


PREMIUM_FIELDS = {
    "not-enough-activities": "activity_id_0", "activity-not-designated": "activity_id_0",
    "identity-not-verified": "attestation", "identity-not-attested": "attestation",
    "identity-verification-invalid": "attestation", "already-registered": "municipality_code",
    "premium-in-home-municipality": "municipality_code", "premium-limit-reached": "municipality_code",
    "unknown-municipality": "municipality_code", "malformed-municipality-code": "municipality_code",
    "municipality-not-registrable": "municipality_code",
}


# --- certification -----------------------------------------------------------------------------


async def _apply_page(viewer: Viewer, **context: Any) -> Response:
    status = context.pop("status", 200)
    form = context.pop("form", None)
    if form is None:
        profile = await _profile(viewer)
        form = {"primary_residence_code": profile["legal_address_code"] if profile else ""}
    return viewer.render("resident/apply.html", status=status, housing_bases=HOUSING, form=form, **context)


@router.get("/apply")
async def apply_page(viewer: Resident) -> Response:
    return await _apply_page(viewer)


APPLY_FIELDS = {
    "stay-below-minimum": "planned_stay_days", "stay-days-out-of-range": "planned_stay_days",
    "housing-basis-not-accepted": "housing_basis", "invalid-member-number": "jal_member_number",
    "invalid-member-number-format": "jal_member_number", "primary-residence-same-municipality": "municipality_code",
    "no-certification-scheme": "municipality_code", "scheme-not-in-force": "municipality_code",
    "registration-required": "municipality_code",
}


@router.post("/apply")
async def apply(viewer: Resident, request: Request) -> Response:
    form = await read_form(request, viewer)
    days = form.get("planned_stay_days")
    member = form.get("jal_member_number")
    body = {
        "municipality_code": form.get("municipality_code"),
        "planned_stay_days": int(days) if days.isdigit() and len(days) < 6 else days,
        "housing_basis": form.get("housing_basis"), "address_there": form.get("address_there"),
        "primary_residence_code": form.get("primary_residence_code"),
        "partners": [{"partner": "jal", "member_number": member}] if member else [],
        "note": form.raw("note") or None,
    }
    try:
        await viewer.services.call("POST", "certification", "/v1/applications", await viewer.token(), json=body,
                                   idempotency_key=form.get("key") or None)
    except ApiError as error:
        return await _apply_page(viewer, status=error.status, form=form.kept(),
                                 errors=_field_errors(viewer, error, APPLY_FIELDS))
    return redirect("/my/certificates", "apply.submitted")


@router.get("/certificates")
async def certificates(viewer: Resident) -> Response:
    token, me = await viewer.token(), _me(viewer)
    certificates = await viewer.services.get("certification", f"/v1/residents/{me}/certificates", token)
    applications = await viewer.services.get("certification", f"/v1/residents/{me}/applications", token)
    grants = await viewer.services.grants_of_resident(token, me)
    return viewer.render("resident/certificates.html", certificates=certificates["items"],
                         applications=applications["items"], grants=grants["items"])


# --- inbox -------------------------------------------------------------------------------------


@router.get("/inbox")
async def inbox(viewer: Resident, request: Request) -> Response:
    page = await viewer.services.notifications(await viewer.token(), _me(viewer), limit=20,
                                               offset=offset_of(request))
    return viewer.render("resident/inbox.html", page=page, pager=pager(request, page, ()))


@router.post("/inbox/{notification_id}/read")
async def mark_read(viewer: Resident, request: Request, notification_id: str) -> Response:
    form = await read_form(request, viewer)
    await viewer.services.call("POST", "notification", f"/v1/residents/{_me(viewer)}/notifications/"
                               f"{notification_id}/read", await viewer.token(), idempotency_key=form.get("key") or None)
    return redirect("/my/inbox")


# --- consents and deliveries -------------------------------------------------------------------


async def _consents_page(viewer: Viewer, **context: Any) -> Response:
    consents = await viewer.services.get("registration", f"/v1/residents/{_me(viewer)}/consents",
                                         await viewer.token())
    status = context.pop("status", 200)
    return viewer.render("resident/consents.html", status=status, consents=consents["items"], **context)


@router.get("/consents")
async def consents(viewer: Resident) -> Response:
    return await _consents_page(viewer)


@router.post("/consents")
async def give_consent(viewer: Resident, request: Request) -> Response:
    form = await read_form(request, viewer)
    purpose, partner = form.get("purpose"), form.get("partner") or None
    try:
        await viewer.services.call("POST", "registration", f"/v1/residents/{_me(viewer)}/consents",
                                   await viewer.token(), json={"purpose": purpose, "partner": partner},
                                   idempotency_key=form.get("key") or None)
    except ApiError as error:
        return await _consents_page(viewer, status=error.status, form=form.kept(),
                                    errors=_field_errors(viewer, error, default="purpose"))
    return redirect("/my/consents", "consents.granted")


@router.post("/consents/revoke")
async def revoke_consent(viewer: Resident, request: Request) -> Response:
    form = await read_form(request, viewer)
    purpose, partner = form.get("purpose"), form.get("partner") or None
    try:
        await viewer.services.call("DELETE", "registration", f"/v1/residents/{_me(viewer)}/consents/{purpose}",
                                   await viewer.token(), params={"partner": partner},
                                   idempotency_key=form.get("key") or None)
    except ApiError as error:
        return await _consents_page(viewer, status=error.status, errors=_field_errors(viewer, error))
    return redirect("/my/consents", "consents.revoked")


@router.get("/deliveries")
async def deliveries(viewer: Resident, request: Request) -> Response:
    page = await viewer.services.resident_deliveries(await viewer.token(), _me(viewer), limit=PAGE_SIZE,
                                                     offset=offset_of(request))
    return viewer.render("resident/deliveries.html", page=page, pager=pager(request, page, ()))


# --- data export -------------------------------------------------------------------------------


@router.get("/export")
async def export_page(viewer: Resident, request: Request) -> Response:
    export_id = request.query_params.get("id", "")
    export: Json | None = None
    if _EXPORT_ID.match(export_id):
        export = await viewer.services.get("registration", f"/v1/residents/{_me(viewer)}/exports/{export_id}",
                                           await viewer.token())
    return viewer.render("resident/export.html", export=export)


@router.post("/export")
async def request_export(viewer: Resident, request: Request) -> Response:
    form = await read_form(request, viewer)
    export = await viewer.services.call("POST", "registration", f"/v1/residents/{_me(viewer)}/exports",
                                        await viewer.token(), idempotency_key=form.get("key") or None)
    return redirect(f"/my/export?id={export['export_id']}")


@router.get("/export/{export_id}/archive.{kind}")
async def download_export(viewer: Resident, export_id: str, kind: str) -> Response:
    if kind not in ("json", "pdf") or not _EXPORT_ID.match(export_id):
        raise PageRefused(404)
    return await passed_on(viewer, "registration", f"/v1/residents/{_me(viewer)}/exports/{export_id}/archive.{kind}",
                           "application/pdf" if kind == "pdf" else "application/json", f"nichiiki-data.{kind}")


# --- withdraw and erase ------------------------------------------------------------------------


@router.get("/withdraw")
async def withdraw_page(viewer: Resident) -> Response:
    return viewer.render("resident/withdraw.html")


@router.post("/withdraw")
async def withdraw(viewer: Resident, request: Request) -> Response:
    form = await read_form(request, viewer)
    if form.get("confirm") != "yes":
        return viewer.render("resident/withdraw.html", status=422,
                             errors=[("confirm", viewer.t("withdraw.confirm_needed"))])
    await viewer.services.call("DELETE", "registration", f"/v1/residents/{_me(viewer)}", await viewer.token(),
                               idempotency_key=form.get("key") or None)
    session = viewer.signed_in
    await viewer.services.revoke(session.refresh_token or session.access_token)
    await viewer.console.sessions.delete(session.id)
    response = redirect("/signin", "withdraw.done")
    response.delete_cookie(COOKIE, path="/")
    return response


