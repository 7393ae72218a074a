"""Typed calls to the services' HTTP APIs, always with the signed-in user's own token.

The console holds no data of its own: every page is what the services answer this user. A refusal
comes back as ``ApiError`` carrying the service's problem+json (status, ``code``, ``detail``,
``errors``), which the pages show translated (``i18n.problem_title``).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

Json = dict[str, Any]
Params = Mapping[str, str | int | bool | None]


@dataclass
class ApiError(Exception):
    """A service refused (4xx/5xx) or did not answer (status 503, code ``service-unavailable``)."""

    status: int
    code: str
    detail: str = ""
    errors: list[Json] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.detail}"


@dataclass(frozen=True, slots=True)
class Tokens:
    access_token: str
    refresh_token: str | None
    expires_in: float
    #: A staff member who has not enrolled TOTP yet gets a token good for enrolling only.
    totp_enrolment_required: bool = False


def _clean(params: Params | None) -> dict[str, str | int | bool]:
    return {k: v for k, v in (params or {}).items() if v is not None and v != ""}


def _error_of(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    if "error" in body and "code" not in body:  # an OAuth error of the token endpoint
        return ApiError(response.status_code, str(body["error"]), str(body.get("error_description", "")))
    return ApiError(
        response.status_code, str(body.get("code") or f"http-{response.status_code}"),
        str(body.get("detail") or body.get("title") or ""), list(body.get("errors") or []),
    )


class Services:
    """One HTTP client for every service the console calls, by name (``urls``: name → base URL)."""

    def __init__(self, urls: Mapping[str, str], *, timeout: float = 15.0, http: httpx.AsyncClient | None = None):
        self.urls = {name: url.rstrip("/") for name, url in urls.items()}
        self._timeout = timeout
        # A given client (tests) serves every service; otherwise each service has a pool of its own.
        self._given = http is not None
        self.http = http or self._new_client()
        self._pools: dict[str, httpx.AsyncClient] = {}

    def _new_client(self) -> httpx.AsyncClient:
        # Connections stay open between pages (keep-alive, HTTP/1.1), as many idle ones as busy staff
        # pages use at once (httpx keeps 20 by default, so 20 staff paging with concurrent calls kept
        # reconnecting).
        return httpx.AsyncClient(
            timeout=self._timeout, http1=True, http2=False,
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=100, keepalive_expiry=30.0),
        )

    def pool(self, service: str) -> httpx.AsyncClient:
        """The client for ``service``'s calls: a pool per service, because httpcore walks every
        connection of a pool on each request and response (an expiry check and a socket poll each,
        and a count of all of them per idle one); one pool for all services cost the console about a
        fifth of its CPU with 20 staff paging (py-spy, issue 18)."""
        if self._given:
            return self.http
        client = self._pools.get(service)
        if client is None:
            client = self._pools[service] = self._new_client()
        return client

    async def close(self) -> None:
        for client in (self.http, *self._pools.values()):
            await client.aclose()

    def url(self, service: str, path: str) -> str:
        return f"{self.urls[service]}{path}"

    async def call(
        self, method: str, service: str, path: str, token: str | None, *, json: Any = None,
        params: Params | None = None, idempotency_key: str | None = None, expect_json: bool = True,
    ) -> Json:
        headers = {"accept": "application/json"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        if method != "GET":
            # A form carries its own key, so a double submit replays the first answer.
            headers["idempotency-key"] = idempotency_key or f"console-{uuid.uuid4()}"
        try:
            response = await self.pool(service).request(method, self.url(service, path), json=json,
                                                         params=_clean(params), headers=headers)
        except httpx.HTTPError as error:
            raise ApiError(503, "service-unavailable", f"{service}: {error.__class__.__name__}") from error
        if response.status_code >= 400:
            raise _error_of(response)
        if not expect_json or response.status_code == 204 or not response.content:
            return {}
        body = response.json()
        return body if isinstance(body, dict) else {"items": body}

    async def get(self, service: str, path: str, token: str, **params: str | int | bool | None) -> Json:
        return await self.call("GET", service, path, token, params=params)

    async def open(self, service: str, path: str, token: str, params: Params | None = None) -> httpx.Response:
        """A download (CSV, PDF, JSON archive) whose body is still to come: the page passes it on chunk
        by chunk and closes it (``aclose``) when done. A refusal is raised before anything is sent on."""
        http = self.pool(service)
        request = http.build_request(
            "GET", self.url(service, path), params=_clean(params), headers={"authorization": f"Bearer {token}"},
        )
        try:
            response = await http.send(request, stream=True)
        except httpx.HTTPError as error:
            raise ApiError(503, "service-unavailable", f"{service}: {error.__class__.__name__}") from error
        if response.status_code >= 400:
            try:
                await response.aread()
            finally:
                await response.aclose()
            raise _error_of(response)
        return response

    # --- identity ----------------------------------------------------------------------------

    async def _token(self, form: dict[str, str], client_ip: str | None) -> Tokens:
        headers = {"x-forwarded-for": client_ip} if client_ip else {}
        try:
            response = await self.http.post(self.url("identity", "/oauth/token"), data=form, headers=headers)
        except httpx.HTTPError as error:
            raise ApiError(503, "service-unavailable", f"identity: {error.__class__.__name__}") from error
        if response.status_code != 200:
            raise _error_of(response)
        body = response.json()
        return Tokens(
            str(body["access_token"]), body.get("refresh_token"), float(body.get("expires_in", 900)),
            bool(body.get("totp_enrolment_required", False)),
        )

    async def sign_in(self, username: str, password: str, totp: str | None, client_ip: str | None) -> Tokens:
        form = {"grant_type": "password", "username": username, "password": password}
        if totp:
            form["totp"] = totp
        return await self._token(form, client_ip)

    async def refresh(self, refresh_token: str) -> Tokens:
        return await self._token({"grant_type": "refresh_token", "refresh_token": refresh_token}, None)

    async def revoke(self, token: str) -> None:
        """Sign out at the provider: the session ends there, so every service refuses its tokens."""
        # The local session goes anyway; its tokens expire within minutes.
        with contextlib.suppress(httpx.HTTPError):
            await self.http.post(self.url("identity", "/oauth/revoke"), data={"token": token})

    async def sign_up(self, email: str, password: str, idempotency_key: str) -> Json:
        return await self.call("POST", "identity", "/v1/accounts/residents", None,
                               json={"email": email, "password": password}, idempotency_key=idempotency_key)

    # --- registration ------------------------------------------------------------------------

    async def resident(self, token: str, resident_id: str) -> Json:
        return await self.get("registration", f"/v1/residents/{resident_id}", token)

    async def registrations(self, token: str, **query: str | int | bool | None) -> Json:
        return await self.get("registration", "/v1/registrations", token, **query)

    async def registration(self, token: str, registration_id: str) -> Json:
        return await self.get("registration", f"/v1/registrations/{registration_id}", token)

    async def activity_catalogue(self, code: str, client_ip: str | None) -> Json:
        """A municipality's published designated activities: public, no token; the visitor's address
        goes along, so the service's per-IP limit counts each visitor rather than the console."""
        headers = {"accept": "application/json", **({"x-forwarded-for": client_ip} if client_ip else {})}
        base = self.urls.get("registration")
        if base is None:  # not configured: unavailable, like a service that does not answer
            raise ApiError(503, "service-unavailable", "registration")
        try:
            response = await self.http.get(f"{base}/v1/public/municipalities/{code}/activities", headers=headers)
        except httpx.HTTPError as error:
            raise ApiError(503, "service-unavailable", f"registration: {error.__class__.__name__}") from error
        if response.status_code >= 400:
            raise _error_of(response)
        body: Json = response.json()
        return body

    # --- certification -----------------------------------------------------------------------

    async def applications(self, token: str, **query: str | int | bool | None) -> Json:
        return await self.get("certification", "/v1/applications", token, **query)

    async def application(self, token: str, application_id: str) -> Json:
        return await self.get("certification", f"/v1/applications/{application_id}", token)

    async def certificate(self, token: str, number: str) -> Json:
        return await self.get("certification", f"/v1/certificates/{number}", token)

    async def certificates(self, token: str, municipality: str, **query: str | int | bool | None) -> Json:
        return await self.get("certification", f"/v1/municipalities/{municipality}/certificates", token, **query)

    async def rules(self, token: str, municipality: str) -> Json:
        return await self.get("certification", f"/v1/municipalities/{municipality}/rules", token)

    async def audit(self, token: str, municipality: str, **query: str | int | bool | None) -> Json:
        return await self.get("certification", f"/v1/municipalities/{municipality}/audit", token, **query)

    # --- subsidy, donation, gateway, notification ---------------------------------------------

    async def programs(self, token: str, municipality: str) -> Json:
        return await self.get("subsidy", f"/v1/municipalities/{municipality}/programs", token)

    async def program(self, token: str, program_id: str) -> Json:
        return await self.get("subsidy", f"/v1/programs/{program_id}", token)

    async def grants_of_resident(self, token: str, resident_id: str) -> Json:
        return await self.get("subsidy", f"/v1/residents/{resident_id}/grants", token)

    async def donations(self, token: str, municipality: str, **query: str | int | bool | None) -> Json:
        return await self.get("donation", f"/v1/municipalities/{municipality}/donations", token, **query)

    async def deliveries(self, token: str, **query: str | int | bool | None) -> Json:
        return await self.get("partner_gateway", "/v1/deliveries", token, **query)

    async def resident_deliveries(self, token: str, resident_id: str, **query: str | int | bool | None) -> Json:
        return await self.get("partner_gateway", f"/v1/residents/{resident_id}/deliveries", token, **query)

    async def notifications(self, token: str, resident_id: str, **query: str | int | bool | None) -> Json:
        return await self.get("notification", f"/v1/residents/{resident_id}/notifications", token, **query)

    # --- insights ----------------------------------------------------------------------------

    async def insights(self, token: str, table: str, **query: str | int | bool | None) -> Json:
        """A figures table (``registrations``, ``kpis``, …) in the reader's scope (the service narrows it)."""
        return await self.get("insights", f"/v1/insights/{table}", token, **query)

    async def public_insights(self, table: str, client_ip: str | None, **query: str | int | bool | None) -> Json:
        """A public, suppressed table: no token; the visitor's address goes along, so the service's
        per-IP limit counts each visitor (where it trusts the proxy) rather than the console."""
        headers = {"accept": "application/json", **({"x-forwarded-for": client_ip} if client_ip else {})}
        base = self.urls.get("insights")
        if base is None:  # not configured: unavailable, like a service that does not answer
            raise ApiError(503, "service-unavailable", "insights")
        try:
            response = await self.http.get(f"{base}/v1/public/insights/{table}", params=_clean(query),
                                           headers=headers)
        except httpx.HTTPError as error:
            raise ApiError(503, "service-unavailable", f"insights: {error.__class__.__name__}") from error
        if response.status_code >= 400:
            raise _error_of(response)
        body = response.json()
        return body if isinstance(body, dict) else {"items": body}
