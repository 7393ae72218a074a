"""The staff console (municipal reviewers, managers, auditors): what needs them, the review queues,
certificates, residents, donations and receipts, programme budgets and the APPI delivery records.

Every page reads and writes through the services with the staff member's own token, so the
services' own checks hold (another municipality's object: 403/404, an auditor's write: 403); the
console checks the role first and hides what the role may not do (managers alone renew, revoke and
top up). Pages orchestrate only: read the form, call the service, render or redirect.
"""

from __future__ import annotations

import asyncio
from datetime import date, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response

from services.console.clients import ApiError, Json
from services.console.i18n import label, reasons
from services.console.pages.base import (
    PAGE_SIZE,
    PageRefused,
    Viewer,
    after_of,
    offset_of,
    pager,
    problem_errors,
    read_form,
    redirect,
    signed_in,
)
from services.console.pages.downloads import paged_csv, passed_on, service_csv
from shared.kit.clock import JAPAN, SYSTEM_CLOCK

router = APIRouter(prefix="/staff", include_in_schema=False)

Staff = Annotated[Viewer, Depends(signed_in("staff"))]
HOUSING = ("owned", "rented", "trial_residence", "shared_house", "hotel")


def _decider(viewer: Viewer) -> None:
    if not viewer.signed_in.decides:
        raise PageRefused(403)


def _manager(viewer: Viewer) -> None:
    if not viewer.signed_in.is_manager:
        raise PageRefused(403)


def _query(request: Request, name: str, allowed: tuple[str, ...], default: str = "") -> str:
    value = request.query_params.get(name, default)
    return value if value in allowed else default


# --- home ------------------------------------------------------------------------------------


@router.get("")
async def home(viewer: Staff) -> Response:
    token, code = await viewer.token(), viewer.municipality
    # Four services' answers, asked at once: the page takes as long as the slowest, not their sum.
    registrations, applications, programs, expiring = await asyncio.gather(
        viewer.services.registrations(token, municipality=code, awaiting_review=True, limit=1),
        viewer.services.applications(token, municipality=code, limit=1),
        viewer.services.programs(token, code),
        _expiring(viewer, token, code, limit=1),
    )
    waitlisted = sum(int(p.get("grants", {}).get("waitlisted", 0)) for p in programs.get("items", []))
    return viewer.render("staff/home.html", counts={
        "registrations": registrations["total"], "applications": applications["total"],
        "expiring": expiring["total"], "waitlisted": waitlisted,
    })


async def _expiring(viewer: Viewer, token: str, code: str, days: int = 30, limit: int = PAGE_SIZE,
                    offset: int = 0) -> Json:
    """The valid certificates whose validity ends within ``days`` (the last day included), soonest first:
    the service's filter reads them from an index, where the console once paged through them all."""
    before = (SYSTEM_CLOCK.today() + timedelta(days=days + 1)).isoformat()
    return await viewer.services.certificates(token, code, status="valid", valid_until_before=before, limit=limit,
                                              offset=offset)


# --- certification applications ----------------------------------------------------------------


async def _applications_page(viewer: Viewer, request: Request, status: str, housing: str, limit: int,
                             newest: bool) -> Json:
    token, offset = await viewer.token(), offset_of(request)
    query = {"municipality": viewer.municipality, "status": status, "housing_basis": housing or None}
    after = after_of(request)
    if not newest and after:
        # A "next" link: an index range after the last row shown, however deep (OFFSET reads every row before).
        page = await viewer.services.applications(token, **query, limit=limit, after=after)
        return {**page, "offset": offset}
    if not newest:
        return await viewer.services.applications(token, **query, limit=limit, offset=offset)
    # The service pages oldest first: newest first is the same list read from its end.
    total = (await viewer.services.applications(token, **query, limit=1))["total"]
    start = max(total - offset - limit, 0)
    page = await viewer.services.applications(token, **query, limit=max(min(limit, total - offset), 1),
                                              offset=start)
    return {**page, "items": list(reversed(page["items"])), "offset": offset, "limit": limit}


@router.get("/applications")
async def applications(viewer: Staff, request: Request) -> Response:
    status = _query(request, "status", ("submitted", "approved", "rejected", "any"), "submitted")
    housing = _query(request, "housing_basis", HOUSING)
    newest = request.query_params.get("sort") == "newest"
    page = await _applications_page(viewer, request, status, housing, PAGE_SIZE, newest)
    return viewer.render(
        "staff/applications.html", page=page,
        pager=pager(request, page, ("status", "housing_basis", "sort"), key=None if newest else "application_id"),
        filter_status=status, housing=housing, newest=newest, housing_bases=HOUSING,
    )


APPLICATION_COLUMNS = ("application_id", "resident_id", "status", "submitted_at", "planned_stay_days",
                       "housing_basis", "primary_residence_code", "partners", "decided_at")


@router.get("/applications.csv")
async def applications_csv(viewer: Staff, request: Request) -> Response:
    status = _query(request, "status", ("submitted", "approved", "rejected", "any"), "submitted")
    code = viewer.municipality

    async def fetch(token: str, limit: int, offset: int) -> Json:
        return await viewer.services.applications(token, municipality=code, status=status, limit=limit, offset=offset)

    def row(a: Json) -> list[object]:
        return [a["application_id"], a["resident_id"], a["status"], a["submitted_at"], a["planned_stay_days"],
                a["housing_basis"], a["primary_residence_code"], ";".join(p["partner"] for p in a["partners"]),
                a["decided_at"]]

    filename = f"applications-{code}-{date.today().isoformat()}.csv"
    return await paged_csv(viewer, filename, APPLICATION_COLUMNS, fetch, row)


def _rule_checks(viewer: Viewer, application: Json, rules: Json) -> list[tuple[str, str, bool | None]]:
    """The municipality's rules against the application, one line each: (rule, what the application
    says, met). None: the service checked it when the application came in, from data the console
    does not see (the resident's registrations)."""
    housing = "、".join(label("housing", basis, viewer.lang) for basis in rules["housing_bases"])
    return [
        (viewer.t("rules.min_stay", days=rules["min_stay_days"]), str(application["planned_stay_days"]),
         application["planned_stay_days"] >= rules["min_stay_days"]),
        (viewer.t("rules.housing", bases=housing), label("housing", application["housing_basis"], viewer.lang),
         application["housing_basis"] in rules["housing_bases"]),
        (viewer.t("rules.primary_elsewhere"), application["primary_residence_code"],
         application["primary_residence_code"] != application["municipality_code"]),
        (viewer.t("rules.registration", kind=viewer.t(f"required.{rules['required_registration']}")), "", None),
    ]


async def _application_view(viewer: Viewer, application_id: str, **context: Any) -> Response:
    token, code = await viewer.token(), viewer.municipality
    # Staff see only their municipality's applications (the service refuses others), so its rules and
    # audit trail can be asked for at the same time as the application.
    application, rules, audit = await asyncio.gather(
        viewer.services.application(token, application_id),
        viewer.services.rules(token, code),
        viewer.services.audit(token, code, application=application_id, limit=200),
    )
    trail = audit["items"]
    status = context.pop("status", 200)
    return viewer.render(
        "staff/application.html", status=status, application=application, rules=rules,
        checks=_rule_checks(viewer, application, rules), trail=trail,
        rejection_reasons=reasons("rejection", viewer.lang), **context,
    )


@router.get("/applications/{application_id}")
async def application(viewer: Staff, application_id: str) -> Response:
    return await _application_view(viewer, application_id)


@router.post("/applications/{application_id}/approve")
async def approve_application(viewer: Staff, request: Request, application_id: str) -> Response:
    form = await read_form(request, viewer)
    _decider(viewer)
    try:
        await viewer.services.call("POST", "certification", f"/v1/applications/{application_id}/approve",
                                   await viewer.token(), json={}, idempotency_key=form.get("key") or None)
    except ApiError as error:
        return await _application_view(viewer, application_id, status=error.status,
                                       errors=_errors(viewer, error), form=form.kept())
    return redirect(f"/staff/applications/{application_id}", "decide.approved")


@router.post("/applications/{application_id}/reject")
async def reject_application(viewer: Staff, request: Request, application_id: str) -> Response:
    form = await read_form(request, viewer)
    _decider(viewer)
    try:
        await viewer.services.call(
            "POST", "certification", f"/v1/applications/{application_id}/reject", await viewer.token(),
            json={"reason_code": form.get("reason_code"), "note": form.raw("note") or None},
            idempotency_key=form.get("key") or None,
        )
    except ApiError as error:
        return await _application_view(viewer, application_id, status=error.status,
                                       errors=_errors(viewer, error, "reason_code"), form=form.kept())
    return redirect(f"/staff/applications/{application_id}", "decide.rejected")


def _errors(viewer: Viewer, error: ApiError, field: str = "") -> list[tuple[str, str]]:
    found = problem_errors(error, viewer.lang)
    return [(name or field, message) for name, message in found]


# --- premium registrations and registered residents ---------------------------------------------


async def _registrations(viewer: Viewer, request: Request, template: str, awaiting: bool) -> Response:
    tier = _query(request, "tier", ("basic", "premium"))
    status = _query(request, "status", ("active", "pending_review", "rejected", "expired", "withdrawn"))
    q = request.query_params.get("q", "")[:100]
    offset, after = offset_of(request), after_of(request)
    page = await viewer.services.registrations(
        await viewer.token(), municipality=viewer.municipality, tier=tier or None, status=status or None,
        q=q or None, awaiting_review=True if awaiting else None, limit=PAGE_SIZE,
        # "next" links read after the last row shown (keyset); ``offset`` then only numbers the rows.
        **({"after": after} if after else {"offset": offset}),
    )
    page = {**page, "offset": offset}
    return viewer.render(template, page=page, pager=pager(request, page, ("tier", "status", "q"), key="id"),
                         tier=tier, filter_status=status, q=q, awaiting=awaiting)


@router.get("/registrations")
async def registrations(viewer: Staff, request: Request) -> Response:
    return await _registrations(viewer, request, "staff/registrations.html", awaiting=True)


@router.get("/residents")
async def residents(viewer: Staff, request: Request) -> Response:
    return await _registrations(viewer, request, "staff/registrations.html", awaiting=False)


@router.get("/residents.csv")
async def residents_csv(viewer: Staff, request: Request) -> Response:
    tier = _query(request, "tier", ("basic", "premium"))
    return await service_csv(viewer, "registration", "/v1/registrations/export.csv",
                             f"residents-{viewer.municipality}.csv", {"municipality": viewer.municipality,
                                                                        "tier": tier or None})


async def _registration_view(viewer: Viewer, registration_id: str, **context: Any) -> Response:
    registration = await viewer.services.registration(await viewer.token(), registration_id)
    status = context.pop("status", 200)
    return viewer.render("staff/registration.html", status=status, registration=registration,
                         rejection_reasons=reasons("rejection", viewer.lang), **context)


@router.get("/registrations/{registration_id}")
async def registration(viewer: Staff, registration_id: str) -> Response:
    return await _registration_view(viewer, registration_id)


@router.post("/registrations/{registration_id}/{decision}")
async def decide_registration(viewer: Staff, request: Request, registration_id: str, decision: str) -> Response:
    form = await read_form(request, viewer)
    if decision not in ("approve", "reject"):
        raise PageRefused(404)
    _decider(viewer)
    body = {} if decision == "approve" else {"reason_code": form.get("reason_code"), "note": form.raw("note") or None}
    try:
        await viewer.services.call("POST", "registration", f"/v1/registrations/{registration_id}/{decision}",
                                   await viewer.token(), json=body, idempotency_key=form.get("key") or None)
    except ApiError as error:
        return await _registration_view(viewer, registration_id, status=error.status, form=form.kept(),
                                        errors=_errors(viewer, error, "reason_code"))
    return redirect(f"/staff/registrations/{registration_id}",
                    "decide.approved" if decision == "approve" else "decide.rejected")


# --- certificates ------------------------------------------------------------------------------


@router.get("/certificates")
async def certificates(viewer: Staff, request: Request) -> Response:
    number = request.query_params.get("number", "").strip()
    if number:
        return RedirectResponse(f"/staff/certificates/{number}", status_code=303)
    status = _query(request, "status", ("valid", "revoked", "expired"))
    page = await viewer.services.certificates(await viewer.token(), viewer.municipality, status=status or None,
                                              limit=PAGE_SIZE, offset=offset_of(request))
    return viewer.render("staff/certificates.html", page=page, pager=pager(request, page, ("status",)),
                         filter_status=status, expiring=False)


@router.get("/certificates/expiring")
async def expiring(viewer: Staff, request: Request) -> Response:
    page = await _expiring(viewer, await viewer.token(), viewer.municipality, offset=offset_of(request))
    return viewer.render("staff/certificates.html", page=page, pager=pager(request, page, ()), filter_status="valid",
                         expiring=True)


@router.get("/certificates.csv")
async def certificates_csv(viewer: Staff, request: Request) -> Response:
    status = _query(request, "status", ("valid", "revoked", "expired"))
    code = viewer.municipality
    return await service_csv(viewer, "certification", f"/v1/municipalities/{code}/certificates.csv",
                             f"certificates-{code}-{date.today().isoformat()}.csv", {"status": status or None})


async def _certificate_view(viewer: Viewer, number: str, **context: Any) -> Response:
    certificate = await viewer.services.certificate(await viewer.token(), number)
    status = context.pop("status", 200)
    return viewer.render("staff/certificate.html", status=status, certificate=certificate,
                         revocation_reasons=reasons("revocation", viewer.lang), **context)


@router.get("/certificates/{number}")
async def certificate(viewer: Staff, number: str) -> Response:
    return await _certificate_view(viewer, number)


@router.post("/certificates/{number}/{action}")
async def change_certificate(viewer: Staff, request: Request, number: str, action: str) -> Response:
    form = await read_form(request, viewer)
    if action not in ("renew", "revoke"):
        raise PageRefused(404)
    _manager(viewer)  # the service refuses reviewers too; the console does not offer it to them
    body: Json = (
        {"valid_until": form.get("valid_until") or None} if action == "renew"
        else {"reason_code": form.get("reason_code"), "note": form.raw("note") or None}
    )
    try:
        await viewer.services.call("POST", "certification", f"/v1/certificates/{number}/{action}",
                                   await viewer.token(), json=body, idempotency_key=form.get("key") or None)
    except ApiError as error:
        return await _certificate_view(viewer, number, status=error.status, form=form.kept(),
                                       errors=_errors(viewer, error, "reason_code" if action == "revoke"
                                                      else "valid_until"))
    return redirect(f"/staff/certificates/{number}",
                    "certificate.renewed" if action == "renew" else "certificate.revoked")


# --- donations and receipts --------------------------------------------------------------------


def _year(request: Request) -> int:
    raw = request.query_params.get("year", "")
    return int(raw) if raw.isdigit() and 2008 <= int(raw) <= 2100 else SYSTEM_CLOCK.now().astimezone(JAPAN).year


@router.get("/donations")
async def donations(viewer: Staff, request: Request) -> Response:
    year = _year(request)
    page = await viewer.services.donations(await viewer.token(), viewer.municipality, year=year, limit=PAGE_SIZE,
                                           offset=offset_of(request))
    return viewer.render("staff/donations.html", page=page, pager=pager(request, page, ("year",)), year=year)


@router.get("/donations.csv")
async def donations_csv(viewer: Staff, request: Request) -> Response:
    year, code = _year(request), viewer.municipality
    return await service_csv(viewer, "donation", f"/v1/municipalities/{code}/donations.csv",
                             f"donations-{code}-{year}.csv", {"year": year})


@router.get("/receipts/{number}.pdf")
async def receipt_pdf(viewer: Staff, number: str) -> Response:
    return await passed_on(viewer, "donation", f"/v1/receipts/{number}.pdf", "application/pdf",
                           f"receipt-{number}.pdf", inline=True)


@router.post("/receipts/{number}/reissue")
async def reissue_receipt(viewer: Staff, request: Request, number: str) -> Response:
    form = await read_form(request, viewer)
    _decider(viewer)
    await viewer.services.call("POST", "donation", f"/v1/receipts/{number}/reissue", await viewer.token(),
                               idempotency_key=form.get("key") or None)
    return redirect(f"/staff/donations?year={_year(request)}", "donations.reissued")


@router.post("/donations/{donation_id}/one-stop")
async def one_stop(viewer: Staff, request: Request, donation_id: str) -> Response:
    form = await read_form(request, viewer)
    _decider(viewer)
    await viewer.services.call(
        "POST", "donation", f"/v1/donations/{donation_id}/one-stop", await viewer.token(),
        json={"received_on": form.get("received_on") or SYSTEM_CLOCK.today().isoformat(),
              "verified": form.get("verified") == "true"},
        idempotency_key=form.get("key") or None,
    )
    return redirect("/staff/donations", "donations.one_stop_done")


# --- programme budgets -------------------------------------------------------------------------


@router.get("/programs")
async def programs(viewer: Staff) -> Response:
    found = await viewer.services.programs(await viewer.token(), viewer.municipality)
    return viewer.render("staff/programs.html", programs=found["items"])


async def _program_view(viewer: Viewer, request: Request, program_id: str, **context: Any) -> Response:
    token = await viewer.token()
    program = await viewer.services.program(token, program_id)
    if program["municipality_code"] != viewer.municipality:
        raise PageRefused(404)
    grant_status = _query(request, "grants", ("waitlisted", "issued", "completed", "cancelled", "expired"),
                          "waitlisted")
    ledger = await viewer.services.get("subsidy", f"/v1/programs/{program_id}/ledger", token, limit=PAGE_SIZE,
                                       offset=offset_of(request))
    grants = await viewer.services.get("subsidy", f"/v1/programs/{program_id}/grants", token, status=grant_status,
                                       limit=100)
    status = context.pop("status", 200)
    return viewer.render("staff/program.html", status=status, program=program, ledger=ledger,
                         pager=pager(request, ledger, ("grants",)), grants=grants, grant_status=grant_status,
                         **context)


@router.get("/programs/{program_id}")
async def program(viewer: Staff, request: Request, program_id: str) -> Response:
    return await _program_view(viewer, request, program_id)


LEDGER_COLUMNS = ("entry_id", "at", "kind", "unit", "amount", "reason")


@router.get("/programs/{program_id}/ledger.csv")
async def ledger_csv(viewer: Staff, program_id: str) -> Response:
    async def fetch(token: str, limit: int, offset: int) -> Json:
        return await viewer.services.get("subsidy", f"/v1/programs/{program_id}/ledger", token, limit=limit,
                                         offset=offset)

    def row(entry: Json) -> list[object]:
        return [entry["entry_id"], entry["created_at"], entry["kind"], entry["unit"], entry["amount"],
                entry.get("reason")]

    return await paged_csv(viewer, f"ledger-{program_id}.csv", LEDGER_COLUMNS, fetch, row)


@router.post("/programs/{program_id}/budget")
async def top_up(viewer: Staff, request: Request, program_id: str) -> Response:
    form = await read_form(request, viewer)
    _manager(viewer)
    amount = form.get("amount")
    try:
        await viewer.services.call(
            "POST", "subsidy", f"/v1/programs/{program_id}/budget", await viewer.token(),
            json={"unit": form.get("unit"), "amount": int(amount) if amount.lstrip("-").isdigit() else amount,
                  "reason": form.raw("reason")},
            idempotency_key=form.get("key") or None,
        )
    except ApiError as error:
        return await _program_view(viewer, request, program_id, status=error.status, form=form.kept(),
                                   errors=_errors(viewer, error, "amount"))
    return redirect(f"/staff/programs/{program_id}", "program.topped_up")


# --- APPI delivery records ---------------------------------------------------------------------


@router.get("/deliveries")
async def deliveries(viewer: Staff, request: Request) -> Response:
    partner = request.query_params.get("partner", "")[:32]
    page = await viewer.services.deliveries(await viewer.token(), municipality=viewer.municipality,
                                            partner=partner or None, limit=PAGE_SIZE, offset=offset_of(request))
    return viewer.render("staff/deliveries.html", page=page, pager=pager(request, page, ("partner",)),
                         partner=partner)


@router.get("/deliveries.csv")
async def deliveries_csv(viewer: Staff, request: Request) -> Response:
    partner = request.query_params.get("partner", "")[:32]
    return await service_csv(viewer, "partner_gateway", "/v1/deliveries.csv",
                             f"deliveries-{viewer.municipality}.csv",
                             {"municipality": viewer.municipality, "partner": partner or None})
