"""Pages anyone reaches: the landing page, sign-in (password, and TOTP for staff), residents'
sign-up, sign-out and the language switch (the insights pages: ``pages/insights.py``)."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response

from services.console.clients import ApiError
from services.console.i18n import LANG_COOKIE, LANGUAGES
from services.console.pages.base import (
    HOME_OF_ROLE,
    Viewer,
    read_form,
    redirect,
    viewer_of,
)
from services.console.session import COOKIE, new_session
from shared.kit.auth import Unauthenticated

router = APIRouter(include_in_schema=False)

Anyone = Annotated[Viewer, Depends(viewer_of)]


def _safe_next(value: str | None) -> str | None:
    """Only a path of this site (never ``//evil.example`` or a URL): no open redirect."""
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return None


@router.get("/")
async def landing(viewer: Anyone) -> Response:
    if viewer.session is not None:
        return RedirectResponse(HOME_OF_ROLE.get(viewer.session.role, "/signin"), status_code=303)
    return viewer.render("landing.html")


@router.get("/signin")
async def sign_in_page(viewer: Anyone, request: Request) -> Response:
    errors = [("", viewer.t("session.expired"))] if request.query_params.get("expired") else []
    return viewer.render("signin.html", next=_safe_next(request.query_params.get("next")) or "", errors=errors)


@router.post("/signin")
async def sign_in(viewer: Anyone, request: Request) -> Response:
    form = await read_form(request, viewer)
    username, password, totp = form.get("username"), form.raw("password"), form.get("totp") or None
    next_path = _safe_next(form.get("next")) or ""
    missing = [(name, viewer.t("error.required", field=viewer.t(f"signin.{name}")))
               for name, value in (("username", username), ("password", password)) if not value]
    if missing:
        return viewer.render("signin.html", status=422, form=form.kept("password"), errors=missing, next=next_path)
    client = request.client.host if request.client else None
    try:
        tokens = await viewer.services.sign_in(username, password, totp, client)
    except ApiError as error:
        return viewer.refusal(error, "signin.html", status=401 if error.status in (400, 401) else error.status,
                              form=form.kept("password"), next=next_path)
    if tokens.totp_enrolment_required:
        return viewer.render("signin.html", status=403, errors=[("totp", viewer.t("signin.enrol_totp"))],
                             form=form.kept("password"), next=next_path)
    try:
        principal = await viewer.console.verifier.principal(tokens.access_token)
    except Unauthenticated:
        return viewer.render("signin.html", status=401, errors=[("", viewer.t("problem.unauthenticated"))],
                             form=form.kept("password"), next=next_path)
    session = new_session(principal, tokens.access_token, tokens.refresh_token, tokens.expires_in, username)
    await viewer.console.sessions.save(session)
    target = next_path or HOME_OF_ROLE.get(session.role, "/")
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(COOKIE, session.id, httponly=True, samesite="lax", secure=viewer.console.secure_cookies,
                        path="/", max_age=viewer.console.sessions.ttl_s)
    return response


@router.get("/signup")
async def sign_up_page(viewer: Anyone) -> Response:
    return viewer.render("signup.html", signup_key=secrets.token_urlsafe(18))


@router.post("/signup")
async def sign_up(viewer: Anyone, request: Request) -> Response:
    form = await read_form(request, viewer)
    email, password = form.get("username"), form.raw("password")
    errors = [(name, viewer.t("error.required", field=viewer.t(f"signin.{name}")))
              for name, value in (("username", email), ("password", password)) if not value]
    if not errors and password != form.raw("password_again"):
        errors.append(("password_again", viewer.t("signup.mismatch")))
    if errors:
        return viewer.render("signup.html", status=422, form=form.kept("password", "password_again"), errors=errors,
                             signup_key=form.get("signup_key"))
    try:
        await viewer.services.sign_up(email, password, f"console-signup-{form.get('signup_key')}")
    except ApiError as error:
        if error.code == "weak-password":
            error.errors = [{"loc": ["body", "password"]}]
        elif error.code in ("email-taken", "invalid-email"):
            error.errors = [{"loc": ["body", "username"]}]
        return viewer.refusal(error, "signup.html", form=form.kept("password", "password_again"),
                              signup_key=secrets.token_urlsafe(18))
    return await sign_in(viewer, request)


@router.post("/signout")
async def sign_out(viewer: Anyone, request: Request) -> Response:
    await read_form(request, viewer)
    response = redirect("/signin", "session.signed_out")
    if viewer.session is not None:
        # Revoking the refresh token ends the session at the provider: every service refuses its tokens.
        await viewer.services.revoke(viewer.session.refresh_token or viewer.session.access_token)
        await viewer.console.sessions.delete(viewer.session.id)
    response.delete_cookie(COOKIE, path="/")
    return response


@router.get("/lang/{code}")
async def switch_language(code: str, request: Request) -> Response:
    """Sets the language cookie and goes back where the person was (a link: works without a form)."""
    response = RedirectResponse(_safe_next(request.query_params.get("next")) or "/", status_code=303)
    if code in LANGUAGES:
        response.set_cookie(LANG_COOKIE, code, max_age=365 * 86400, samesite="lax", path="/")
    return response

