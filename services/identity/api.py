"""HTTP: the OpenID Connect / OAuth 2.0 endpoints (discovery, JWKS, token, revocation) and the
account API (``/v1``: sign-up, TOTP enrolment, the admin API), thin over the use cases."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, unquote_plus

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field, StringConstraints

from services.identity.domain import (
    AccountRole,
    ClientRole,
    OAuthError,
    StaffRole,
    invalid_client,
    invalid_request,
)
from services.identity.handlers import NO_STORE, IdentityService
from shared.kit.auth import Principal, Role, current_principal, require
from shared.kit.http import ApiModel
from shared.kit.rate_limit import public_limit, sign_in_limit
from shared.kit.use_case import WriteRequest

oauth = APIRouter(tags=["oauth"])
router = APIRouter(prefix="/v1", tags=["accounts"])

Admin = Annotated[Principal, Depends(require(Role.ADMIN))]
Anyone = Annotated[Principal, Depends(current_principal)]

#: The OAuth endpoints take form bodies (the kit's BodyGuard admits them on these paths only).
FORM_PATHS = ("/oauth/token", "/oauth/revoke")
#: Writes anyone may send without a token (``identity_principal`` lets them through unauthenticated).
PUBLIC_WRITES = {("POST", "/v1/accounts/residents")}
#: Stands in for the caller of a public write until the use case names it (``sign_up_caller``).
ANONYMOUS = Principal(subject="anonymous", role=Role.RESIDENT)


async def identity(request: Request) -> IdentityService:
    service: IdentityService = request.app.state.identity
    return service


Service = Annotated[IdentityService, Depends(identity)]


async def identity_principal(request: Request) -> Principal:
    """Replaces the kit's ``current_principal`` in this app: a token this provider issued is verified
    here, against its own keys and sessions (the kit would fetch this very service's JWKS over HTTP);
    any other token (a development HS256 one) is the kit's to verify. A public write may come without one."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        service: IdentityService = request.app.state.identity
        principal = await service.principal_of(token.strip())
        if principal is not None:
            return principal
    elif (request.method, getattr(request.scope.get("route"), "path", None)) in PUBLIC_WRITES:
        return ANONYMOUS
    return await current_principal(request)


# --- OAuth 2.0 protocol helpers ------------------------------------------------------------------

_FORM = "application/x-www-form-urlencoded"


async def form_of(request: Request) -> dict[str, str]:
    """The parameters of a form body (RFC 6749 §3.2): each once, empty ones as if omitted."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != _FORM:
        raise invalid_request(f"send the parameters as {_FORM}")
    try:
        pairs = parse_qsl((await request.body()).decode("ascii"), keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise invalid_request("the body is not a valid form") from None
    params: dict[str, str] = {}
    for name, value in pairs:
        if name in params:
            raise invalid_request(f"the parameter {name} is sent more than once")
        if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in name + value):
            raise invalid_request(f"the parameter {name} holds control characters")
        if value:
            params[name] = value
    return params


def required(params: dict[str, str], name: str) -> str:
    value = params.get(name)
    if value is None:
        raise invalid_request(f"the parameter {name} is required")
    return value


def client_credentials(request: Request, params: dict[str, str]) -> tuple[str, str]:
    """The client's id and secret: HTTP Basic (client_secret_basic) or the form (client_secret_post)."""
    scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
    in_form = "client_id" in params or "client_secret" in params
    if scheme.lower() == "basic":
        if in_form:
            raise invalid_request("authenticate the client one way only")
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise invalid_client() from None
        client_id, colon, secret = decoded.partition(":")
        if not colon:
            raise invalid_client()
        return unquote_plus(client_id), unquote_plus(secret)  # RFC 6749 §2.3.1: form-encoded first
    if "client_id" not in params or "client_secret" not in params:
        raise invalid_client("authenticate the client (HTTP Basic, or client_id and client_secret)")
    return params["client_id"], params["client_secret"]


def oauth_error(error: OAuthError) -> JSONResponse:
    headers = dict(NO_STORE)
    if error.status == 401:
        headers["www-authenticate"] = 'Basic realm="nichiiki"'
    return JSONResponse(
        {"error": error.error, "error_description": error.description}, status_code=error.status, headers=headers
    )


def _form_doc(properties: dict[str, Any], required_names: list[str]) -> dict[str, Any]:
    schema = {"type": "object", "properties": properties, "required": required_names}
    return {"requestBody": {"required": True, "content": {_FORM: {"schema": schema}}}}


_TOKEN_FORM = _form_doc(
    {
        "grant_type": {"type": "string", "enum": ["password", "client_credentials", "refresh_token"]},
        "username": {"type": "string", "description": "password grant: the account's e-mail"},
        "password": {"type": "string", "description": "password grant"},
        "totp": {"type": "string", "description": "password grant: the current TOTP code (staff; enrolled residents)"},
        "refresh_token": {"type": "string", "description": "refresh_token grant"},
        "client_id": {"type": "string", "description": "client_credentials grant (or HTTP Basic)"},
        "client_secret": {"type": "string", "description": "client_credentials grant (or HTTP Basic)"},
    },
    ["grant_type"],
)
_REVOKE_FORM = _form_doc(
    {"token": {"type": "string", "description": "a refresh token or an access token of the session"},
     "token_type_hint": {"type": "string", "enum": ["refresh_token", "access_token"]}},
    ["token"],
)
_OAUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "an OAuth error: invalid_request, invalid_grant, unsupported_grant_type"},
    401: {"description": "an OAuth error: invalid_client"},
}
_TOKEN_ERRORS: dict[int | str, dict[str, Any]] = {
    **_OAUTH_ERRORS,
    429: {"description": "too many sign-ins for this account or from this address (problem+json, Retry-After)"},
}


# --- discovery, keys, token, revocation ----------------------------------------------------------


@oauth.get("/.well-known/openid-configuration")
async def openid_configuration(service: Service) -> JSONResponse:
    """The OpenID Connect discovery document (issuer, jwks_uri, endpoints, algorithms)."""
    return JSONResponse(service.discovery(), headers={"cache-control": "public, max-age=300"})


@oauth.get("/jwks.json")
async def jwks(service: Service) -> JSONResponse:
    """The public keys that verify access tokens: the signing key and those rotated out whose tokens
    may still be alive. A service refetches it when it meets an unknown ``kid``."""
    return JSONResponse(await service.jwks(), headers={"cache-control": "public, max-age=300"})


@oauth.post(
    "/oauth/token", openapi_extra=_TOKEN_FORM, responses=_TOKEN_ERRORS, dependencies=[Depends(sign_in_limit)]
)
async def token(request: Request, service: Service) -> JSONResponse:
    """OAuth 2.0 token endpoint (form-encoded): ``password`` (+ ``totp``), ``client_credentials``,
    ``refresh_token`` (rotating: a refresh token is good once)."""
    try:
        params = await form_of(request)
        grant = required(params, "grant_type")
        if grant == "password":
            answer = await service.password_grant(
                required(params, "username"), required(params, "password"), params.get("totp")
            )
        elif grant == "client_credentials":
            client_id, secret = client_credentials(request, params)
            answer = await service.client_credentials_grant(client_id, secret)
        elif grant == "refresh_token":
            answer = await service.refresh_grant(required(params, "refresh_token"))
        else:
            raise OAuthError("unsupported_grant_type", "grant_type is password, client_credentials or refresh_token")
    except OAuthError as error:
        return oauth_error(error)
    return JSONResponse(answer, headers=NO_STORE)


@oauth.post("/oauth/revoke", openapi_extra=_REVOKE_FORM, responses=_OAUTH_ERRORS)
async def revoke(request: Request, service: Service) -> Response:
    """Sign out (RFC 7009): the session of the token is revoked — its refresh tokens stop working and
    every service refuses its access tokens. 200 also for a token that is unknown or revoked already."""
    try:
        params = await form_of(request)
        await service.revoke(required(params, "token"))
    except OAuthError as error:
        return oauth_error(error)
    return Response(status_code=200, headers=NO_STORE)


# --- accounts ------------------------------------------------------------------------------------

Password = Annotated[str, StringConstraints(strip_whitespace=False, min_length=1, max_length=256)]


class SignUpBody(ApiModel):
    email: str = Field(max_length=254)
    password: Password = Field(description="at least 12 characters, not the e-mail address")


class AccountBody(ApiModel):
    email: str = Field(max_length=254)
    password: Password = Field(description="the initial password: at least 12 characters, not the e-mail")
    role: Literal[AccountRole.STAFF, AccountRole.PREFECTURE, AccountRole.MINISTRY, AccountRole.ADMIN]
    municipality: str | None = Field(default=None, max_length=6, description="staff: the 6-digit municipality code")
    staff_role: StaffRole | None = Field(default=None, description="staff: reviewer, manager or auditor")
    prefecture: str | None = Field(default=None, max_length=6, description="prefecture readers: the 6-digit code")


class ClientBody(ApiModel):
    client_id: str = Field(max_length=64)
    role: ClientRole
    partner: str | None = Field(default=None, max_length=32, description="partner clients: the partner code")


class TotpCodeBody(ApiModel):
    code: str = Field(max_length=6, description="the code the authenticator app shows now")


@router.post("/accounts/residents", status_code=201, dependencies=[Depends(public_limit)])
async def sign_up(body: SignUpBody, service: Service, write: WriteRequest) -> Response:
    """Self sign-up of a resident (public): the account's id (``res-…``) is the resident id in every service."""
    return (await service.sign_up_resident(write, body.email, body.password)).response()


@router.post("/accounts", status_code=201)
async def create_account(body: AccountBody, principal: Admin, service: Service, write: WriteRequest) -> Response:
    """An admin creates a staff, prefecture reader, ministry reader or admin account."""
    return (await service.create_account(
        write, email=body.email, password=body.password, role=body.role, municipality=body.municipality,
        staff_role=body.staff_role, prefecture=body.prefecture,
    )).response()


@router.get("/accounts/me")
async def me(principal: Anyone, service: Service) -> dict[str, Any]:
    """The caller's account."""
    return await service.me(principal)


@router.post("/accounts/me/totp", status_code=201)
async def start_totp(principal: Anyone, service: Service, write: WriteRequest) -> Response:
    """Start TOTP enrolment: the secret and its ``otpauth://`` URI, shown this once."""
    return (await service.start_totp(write)).response()


@router.post("/accounts/me/totp/confirm")
async def confirm_totp(body: TotpCodeBody, principal: Anyone, service: Service, write: WriteRequest) -> Response:
    """Confirm the enrolment with a current code: from now on every sign-in needs one."""
    return (await service.confirm_totp(write, body.code)).response()


@router.post("/accounts/{account_id}/totp/reset")
async def reset_totp(
    account_id: Annotated[str, Path(max_length=100)], principal: Admin, service: Service, write: WriteRequest
) -> Response:
    """An admin clears an account's TOTP (a lost device); staff enrol again at their next sign-in."""
    return (await service.reset_totp(write, account_id)).response()


@router.post("/clients", status_code=201)
async def create_client(body: ClientBody, principal: Admin, service: Service, write: WriteRequest) -> Response:
    """An admin registers a partner's service account or the payment provider (client credentials);
    the ``client_secret`` is shown this once."""
    return (await service.create_client(
        write, client_id=body.client_id, role=body.role, partner=body.partner
    )).response()


@router.post("/signing-keys/rotate", status_code=201)
async def rotate_signing_key(principal: Admin, service: Service, write: WriteRequest) -> Response:
    """An admin rotates the signing key: new tokens are signed with a new key, the previous one stays
    in the JWKS until the tokens it signed have expired."""
    return (await service.rotate_keys(write)).response()
