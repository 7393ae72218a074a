"""HTTP resources of the partner gateway (thin: parse, authorise, call a use case, shape the answer).

- ``GET /v1/certificates/{number}``: verification, for partners (API key or partner JWT);
- ``GET /v1/feed``: a partner's feed over HTTP (cursor, long poll), for partners (``feed.py``);
- ``GET /v1/keys/{kid}``: the key a partner opens the member numbers of one resident with, for partners;
- ``GET /v1/partners``, ``POST /v1/partners`` (register), ``POST /v1/partners/{code}/api-keys``,
  ``DELETE .../api-keys/{id}``: admin;
- ``GET /v1/deliveries`` and ``/v1/deliveries.csv``: the delivery record, admin (every row) and
  staff (their municipality's rows);
- ``GET /v1/residents/{resident_id}/deliveries``: one resident's provision record (APPI Art. 33),
  the resident, staff (their municipality's rows) and admin.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Annotated, Any, Literal

import asyncpg
import structlog
from fastapi import APIRouter, Body, Depends, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.requests import Request as StarletteRequest
from starlette.types import ASGIApp, Receive, Scope, Send

from services.partner_gateway import feed, handlers, store
from services.partner_gateway.auth import (
    Admin,
    PartnerCaller,
    ResidentStaffOrAdmin,
    StaffOrAdmin,
    api_key_principal,
    gateway_of,
    only_partner,
    partner_caller,
)
from services.partner_gateway.domain import (
    MAX_FORMAT_LENGTH,
    CertificateNotFound,
    InvalidApiKey,
    InvalidPeriod,
    MalformedCertificateNumber,
    PartnerKeyNotFound,
    UnknownPartnerFilter,
    day_bounds,
    own_resident_ref,
    verification,
)
from services.partner_gateway.handlers import Gateway
from shared.contracts.common import MunicipalityCode, PartnerCode
from shared.contracts.formats import CertificateNumber, CertificateNumberError
from shared.contracts.sealed import resident_subject
from shared.kit.auth import Principal, Role
from shared.kit.csv_export import csv_response, keyset_rows
from shared.kit.db import Connection
from shared.kit.errors import DomainError
from shared.kit.http import ApiModel, Offset, failure_response, refusal
from shared.kit.rate_limit import (
    PARTNER_API,
    VERIFICATION,
    RateLimiter,
    limited_principal,
    limiter_of,
    limiter_of_scope,
)
from shared.kit.use_case import WriteRequest

router = APIRouter(prefix="/v1")
log = structlog.get_logger(__name__)

_NO_STORE = handlers.NO_STORE


# --- Verification -------------------------------------------------------------------------------


class Verification(BaseModel):
    certificate_number: str
    valid: bool = Field(description="today (Asia/Tokyo) within the validity, and the status is valid")
    status: str = Field(description="valid | revoked | expired")
    valid_from: date
    valid_until: date
    municipality_code: str
    programs: list[str] = Field(description="this partner's programs in the certificate's municipality")
    checked_on: date = Field(description="the day (Asia/Tokyo) the answer is for")


VERIFY_PATH = "/v1/certificates/{number}"


@router.get(
    "/certificates/{number}", tags=["verification"], response_model=Verification,
    summary="Verify a certificate (partners only; 404 for unknown and for certificates of other partners)",
)
async def verify_certificate(number: str, request: Request, principal: PartnerCaller) -> Response:
    # Served by ``VerificationHotPath`` in a running gateway; this route documents it (OpenAPI)
    # and answers the same where the hot path is not installed.
    assert principal.partner is not None
    await verification_limit(limiter_of(request), principal.partner)
    body = await verification_body(gateway_of(request), principal.partner, number)
    return Response(body, media_type="application/json", headers=_NO_STORE)


async def verification_limit(limiter: RateLimiter, partner: str) -> None:
    """The partner's verification rate (every key and token of the partner together): a local lease
    of the Redis bucket, so a verification rarely waits for Redis (``shared/kit/rate_limit.py``)."""
    await limiter.take(limiter.limit(VERIFICATION), partner)


#: Rendered verification answers kept per process: at most this many.
MAX_ANSWERS = 10_000


class RenderedAnswers:
    """Verification answers rendered once: reused while the cache hands out the same entry object
    for (partner, number) on the same day. The cache gives one object per raw Redis value
    (``VerificationCache._entry``), so a changed entry (a new version) is a new object and is
    rendered again; an entry read from PostgreSQL is always new."""

    __slots__ = ("_rendered",)

    def __init__(self) -> None:
        self._rendered: dict[tuple[str, str], tuple[Mapping[str, Any], date, bytes]] = {}

    def known(self, partner: str, number: str) -> bool:
        """Whether ``number`` was answered before (so it is well formed)."""
        return (partner, number) in self._rendered

    def body(self, partner: str, number: str, entry: Mapping[str, Any], today: date) -> bytes:
        key = (partner, number)
        found = self._rendered.get(key)
        if found is not None and found[0] is entry and found[1] == today:
            return found[2]
        body = render_verification(entry, today)
        if len(self._rendered) >= MAX_ANSWERS:
            self._rendered.clear()  # crude but bounded
        self._rendered[key] = (entry, today, body)
        return body


def render_verification(entry: Mapping[str, Any], today: date) -> bytes:
    return json.dumps(verification(entry, today), separators=(",", ":")).encode()


async def verification_body(
    gateway: Gateway, partner: str, number: str, api_key: str | None = None, answers: RenderedAnswers | None = None,
) -> bytes:
    """The answer for ``partner``. ``api_key``: the caller's key, taken from the cache unchecked and
    checked here against the generation read with the certificate (401 if it was revoked since).
    ``answers``: where answers rendered before are reused."""
    if answers is None or not answers.known(partner, number):
        try:
            CertificateNumber.parse(number)
        except CertificateNumberError as error:
            raise MalformedCertificateNumber(str(error)) from None
    entry, generation = await gateway.verification.lookup_with_generation(partner, number)
    if api_key is not None and await gateway.api_keys.principal(api_key, generation, read=False) is None:
        raise InvalidApiKey("the X-Api-Key is unknown or revoked")
    if entry is None:
        raise CertificateNotFound(f"no certificate {number}")
    if answers is None:
        return render_verification(entry, gateway.today())
    return answers.body(partner, number, entry, gateway.today())


@dataclass(frozen=True, slots=True)
class _RouteLabel:
    path: str


class VerificationHotPath:
    """``GET /v1/certificates/{number}`` as plain ASGI, ahead of FastAPI's routing.

    Partners call it at rates no other route sees, and FastAPI's routing, dependency solving and
    response machinery cost more than the Redis GET behind it (about half of the request's CPU,
    profiled). Same credentials, answers and problem+json errors as the documented route.
    """

    _PREFIX = "/v1/certificates/"
    _ROUTE = _RouteLabel(VERIFY_PATH)
    _HEADERS = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway
        self.answers = RenderedAnswers()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if (
            scope["type"] != "http" or scope["method"] != "GET" or not path.startswith(self._PREFIX)
            or "/" in path[len(self._PREFIX):] or len(path) == len(self._PREFIX)
        ):
            await self.app(scope, receive, send)
            return
        scope["route"] = self._ROUTE  # the metrics label, as FastAPI's router would set it
        try:
            principal, unchecked_key = await self._caller(scope)
            assert principal.partner is not None
            await verification_limit(limiter_of_scope(scope), principal.partner)
            body = await verification_body(
                self.gateway, principal.partner, path[len(self._PREFIX):], unchecked_key, self.answers
            )
        except DomainError as error:
            await refusal(error, path)(scope, receive, send)
            return
        except Exception as error:
            await failure_response(error, path)(scope, receive, send)
            return
        await send({
            "type": "http.response.start", "status": 200,
            "headers": [*self._HEADERS, (b"content-length", str(len(body)).encode())],
        })
        await send({"type": "http.response.body", "body": body})

    async def _caller(self, scope: Scope) -> tuple[Principal, str | None]:
        """``partner_caller``: an API key (what partners send at these rates) straight from the raw
        headers, as Starlette's ``Headers.get`` reads them (the first one, latin-1); anything else
        (a bearer token, no credential) through the dependency itself. With the principal, the key
        if its cached principal is still to be checked against the generation (``verification_body``:
        in the round trip to Redis it makes anyway)."""
        for name, value in scope["headers"]:
            if name == b"x-api-key":
                secret = value.decode("latin-1").strip()
                principal = self.gateway.api_keys.cached(secret)
                unchecked = secret if principal is not None else None
                if principal is None:
                    principal = await api_key_principal(self.gateway, secret)
                scope.setdefault("state", {})["principal_kind"] = principal.role.value  # the access log's
                return only_partner(principal), unchecked
        return await partner_caller(StarletteRequest(scope)), None


# --- Partners and their API keys (admin) --------------------------------------------------------


class ApiKeyView(BaseModel):
    id: uuid.UUID
    prefix: str
    label: str | None
    created_by: str
    created_at: datetime
    revoked_at: datetime | None


class ProgramView(BaseModel):
    program_id: str
    municipality_codes: list[str]


class PartnerView(BaseModel):
    code: str
    name: str
    kind: str
    feed_topic: str
    programs: list[ProgramView]
    api_keys: list[ApiKeyView]


class PartnerList(BaseModel):
    items: list[PartnerView]
    total: int


class NewApiKey(ApiModel):
    label: str | None = Field(default=None, max_length=100)


class CreatedApiKey(ApiKeyView):
    partner: str
    api_key: str = Field(description="the secret: shown once, only its SHA-256 is kept")


def _key_view(key: store.ApiKey) -> dict[str, Any]:
    return {
        "id": key.id, "prefix": key.prefix, "label": key.label, "created_by": key.created_by,
        "created_at": key.created_at, "revoked_at": key.revoked_at,
    }


@router.get("/partners", tags=["partners"], response_model=PartnerList)
async def list_partners(request: Request, principal: Admin) -> PartnerList:
    gateway = gateway_of(request)
    keys = await store.api_keys(gateway.runtime.pool)
    items: list[PartnerView] = []
    for partner in gateway.partners:
        by_program: dict[str, list[str]] = {}
        for municipality_code, program_ids in sorted(partner.programs.items()):
            for program_id in program_ids:
                by_program.setdefault(program_id, []).append(municipality_code)
        items.append(
            PartnerView(
                code=partner.code, name=partner.name, kind=partner.kind, feed_topic=f"partner.{partner.code}.v1",
                programs=[ProgramView(program_id=p, municipality_codes=m) for p, m in sorted(by_program.items())],
                api_keys=[ApiKeyView(**_key_view(k)) for k in keys if k.partner == partner.code],
            )
        )
    return PartnerList(items=items, total=len(items))


# ``principal`` before ``write`` in each write route: the gateway's own credential check (a partner's
# X-Api-Key is a 403 here) runs before the kit's bearer-only ``WriteRequest``.


@router.post(
    "/partners/{code}/api-keys", tags=["partners"], status_code=201, response_model=CreatedApiKey,
    summary="Issue an API key to a partner (the secret is in this answer only)",
)
async def create_api_key(
    code: str, request: Request, principal: Admin, write: WriteRequest,
    body: Annotated[NewApiKey | None, Body()] = None,
) -> Response:
    """The answer holds the key's secret (`api_key`), shown this once: only its SHA-256 is kept.
    Repeating the request with the same `Idempotency-Key` answers the same key's metadata **without
    `api_key`** (the secret is never stored, not even for a replay); a lost secret means a new key."""
    gateway = gateway_of(request)
    return (await handlers.create_api_key(write, gateway.partners, code, body.label if body else None)).response()


@router.delete("/partners/{code}/api-keys/{key_id}", tags=["partners"], status_code=204)
async def revoke_api_key(
    code: str, key_id: uuid.UUID, request: Request, principal: Admin, write: WriteRequest
) -> Response:
    """Revoke a partner's API key (revoking it again is a 204 too; the first revocation time stays)."""
    gateway = gateway_of(request)
    outcome = await handlers.revoke_api_key(write, gateway.partners, code, key_id)
    # After the commit: this process stops accepting the key at once, the others at its next use.
    await gateway.api_keys.revoked()
    return outcome.response()


# --- Registering partners (admin) ----------------------------------------------------------------


class ProgramSpec(ApiModel):
    program_id: str = Field(pattern=r"^[a-z0-9][a-z0-9._@-]{2,99}$", examples=["kochiferry-miles@392065"])
    municipality_codes: list[MunicipalityCode] = Field(min_length=1, max_length=2000)


class PartnerRegistration(ApiModel):
    code: PartnerCode
    name: str = Field(min_length=1, max_length=200)
    kind: Literal["airline", "rail", "railway", "ferry", "bus"] = Field(description="`railway` is stored as `rail`")
    member_number_format: str = Field(
        min_length=2, max_length=MAX_FORMAT_LENGTH, examples=["^[0-9]{8}$"],
        description="a regular expression anchored with ^ and $ whose matches are at most 64 characters",
    )
    feed: Literal["kafka", "http"] = Field(default="kafka", description="how the partner reads its feed")
    programs: list[ProgramSpec] = Field(
        default_factory=list, max_length=100,
        description="the programmes it runs and where: they decide whose certificates it may see",
    )
    label: str | None = Field(default=None, max_length=100, description="the label of its first API key")


@router.post(
    "/partners", tags=["partners"], status_code=201,
    summary="Register a partner: its first API key (in this answer only), its edge topics, its announcement",
)
async def register_partner(
    request: Request, principal: Admin, write: WriteRequest, body: PartnerRegistration
) -> Response:
    """The answer holds the partner's first API key (`api_key`), shown this once; a replay with the
    same `Idempotency-Key` answers without it. `kafka` says whether a SCRAM user and ACLs could be
    made: not on the embedded broker (no SASL), where the partner reads over HTTP (`GET /v1/feed`)."""
    gateway = gateway_of(request)
    partner = handlers.NewPartner(
        code=body.code, name=body.name, kind="rail" if body.kind == "railway" else body.kind,
        member_number_format=body.member_number_format, feed_transport=body.feed,
        programs=tuple((p.program_id, m) for p in body.programs for m in dict.fromkeys(p.municipality_codes)),
    )
    return (await handlers.register_partner(write, gateway.partners, partner, body.label)).response()


# --- The HTTP feed (partners without Kafka) ------------------------------------------------------


class FeedRecordView(BaseModel):
    cursor: str = Field(description="this record's position: pass it as `after` to read on from here")
    key: str = Field(description="the Kafka record's key")
    value: dict[str, Any] | None = Field(
        description="the Kafka record's JSON value; null: a tombstone (forget the key)"
    )
    type: str | None = Field(description="ce_type (null for a tombstone)")
    id: str = Field(description="ce_id")
    time: str = Field(description="ce_time")
    subject: str = Field(description="ce_subject: the certificate number")


class FeedPageView(BaseModel):
    records: list[FeedRecordView]
    next: str = Field(description="the cursor to ask for next (`after`)")


# One bucket per partner (every key and token of it together), as for its other API requests.
FeedReader = Annotated[Principal, Depends(limited_principal(PARTNER_API, partner_caller))]


@router.get(
    "/feed", tags=["feed"], response_model=FeedPageView,
    summary="Your feed over HTTP: the records of partner.<code>.v1, in order, from a cursor (long poll)",
)
async def read_feed(
    request: Request, principal: FeedReader,
    after: Annotated[str, Query(pattern=r"^[0-9]{1,18}$", description="a cursor from a previous answer")] = "0",
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    wait: Annotated[float, Query(ge=0, le=feed.MAX_WAIT_S, description="seconds to wait for a record")] = 0,
) -> Response:
    """The partner is the credential's (API key or partner token), never a parameter. Records after
    `after` are answered at once; if there are none, the answer waits up to `wait` seconds for the
    next one. Superseded records are compacted away after 7 days; tombstones are served."""
    assert principal.partner is not None
    gateway = gateway_of(request)
    items, next_cursor = await feed.read(
        gateway.runtime.pool, gateway.feed, principal.partner, int(after), limit, wait
    )
    return JSONResponse(feed.page_body(items, next_cursor), headers=_NO_STORE)


# --- Partners' keys: what opens the member numbers on their feed ----------------------------------


class PartnerKeyView(BaseModel):
    kid: str = Field(description="`partner:<your code>:<resident_ref>`, as on the feed's sealed values")
    alg: Literal["A256GCM"] = "A256GCM"
    k: str = Field(description="the 256-bit AES-GCM key, base64url without padding (JWK `oct` style)")


@router.get(
    "/keys/{kid}", tags=["feed"], response_model=PartnerKeyView,
    responses={404: {"description": "not your kid, never sent to you, withdrawn, or the resident was erased"}},
    summary="The key that opens the member numbers sealed for you about one resident",
)
async def partner_key(kid: str, request: Request, principal: FeedReader) -> Response:
    """Open a record's `member_number` (`{kid, alg, iv, ct}`) with AES-256-GCM under this key, the
    kid's UTF-8 bytes as additional data. A 404 (problem+json) once the gateway told you to forget
    the resident (consent revoked, withdrawal) or the resident was erased: the key then no longer
    exists anywhere, so drop any copy you kept. Another partner's kid is a 404 too. Do not cache
    it longer than you keep the record it opens."""
    assert principal.partner is not None
    gateway = gateway_of(request)
    ref = own_resident_ref(kid, principal.partner)
    resident_id = None if ref is None else await store.resident_of_ref(gateway.runtime.pool, principal.partner, ref)
    key = None if resident_id is None else await gateway.runtime.keyring.partner_key(
        resident_subject(resident_id), kid
    )
    if key is None:
        raise PartnerKeyNotFound("no key for this kid")
    # Not a delivery of its own: the record it opens was recorded when it was sent (docs/partners.md).
    log.info("partner key handed out", partner=principal.partner)
    body = PartnerKeyView(kid=kid, k=base64.urlsafe_b64encode(key).rstrip(b"=").decode("ascii"))
    return JSONResponse(body.model_dump(), headers=_NO_STORE)


# --- The delivery record (APPI Art. 29) ---------------------------------------------------------


class DeliveryView(BaseModel):
    delivered_at: datetime
    partner: str
    resident_ref: str
    certificate_number: str
    municipality_code: str
    record_type: str
    items: list[str]
    consent_purpose: str
    consent_source: str
    consent_at: datetime
    event_id: uuid.UUID
    cause_event_id: uuid.UUID | None


class DeliveryPage(BaseModel):
    items: list[DeliveryView]
    total: int
    limit: int
    offset: int


_CSV_COLUMNS = list(DeliveryView.model_fields)


def _delivery_filter(
    request: Request, principal: Principal, partner: str | None, municipality: str | None,
    since: date | None, until: date | None,
) -> store.DeliveryFilter:
    if partner is not None and partner not in gateway_of(request).partners:
        raise UnknownPartnerFilter(f"no partner {partner!r}")
    if since is not None and until is not None and until < since:
        raise InvalidPeriod(f"'to' ({until}) is before 'from' ({since})")
    if principal.role is Role.STAFF:
        if municipality is not None:
            principal.ensure_municipality(municipality)
        municipality = principal.municipality
    start, end = day_bounds(since, until)
    return store.DeliveryFilter(partner=partner, municipality_code=municipality, since=start, before=end)


PartnerQuery = Annotated[str | None, Query(description="partner code, e.g. jal")]
MunicipalityQuery = Annotated[
    str | None, Query(pattern=r"^[0-9]{6}$", description="staff: their own municipality only")
]
FromQuery = Annotated[date | None, Query(alias="from", description="first day (Asia/Tokyo), inclusive")]
ToQuery = Annotated[date | None, Query(alias="to", description="last day (Asia/Tokyo), inclusive")]


def _delivery(row: asyncpg.Record) -> DeliveryView:
    return DeliveryView(**{name: row[name] for name in _CSV_COLUMNS})


@router.get("/deliveries", tags=["deliveries"], response_model=DeliveryPage)
async def list_deliveries(
    request: Request, principal: StaffOrAdmin, partner: PartnerQuery = None, municipality: MunicipalityQuery = None,
    since: FromQuery = None, until: ToQuery = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100, offset: Offset = 0,
) -> DeliveryPage:
    where = _delivery_filter(request, principal, partner, municipality, since, until)
    rows, total = await store.deliveries(gateway_of(request).runtime.pool, where, limit, offset)
    return DeliveryPage(items=[_delivery(row) for row in rows], total=total, limit=limit, offset=offset)


@router.get(
    "/deliveries.csv", tags=["deliveries"], response_class=StreamingResponse,
    responses={200: {"content": {"text/csv": {}}}},
)
async def export_deliveries(
    request: Request, principal: StaffOrAdmin, partner: PartnerQuery = None, municipality: MunicipalityQuery = None,
    since: FromQuery = None, until: ToQuery = None,
) -> StreamingResponse:
    where = _delivery_filter(request, principal, partner, municipality, since, until)

    async def page(conn: Connection, after: int | None, limit: int) -> list[asyncpg.Record]:
        return await store.deliveries_after(conn, where, after, limit)

    async def rows() -> AsyncIterator[list[object]]:
        async for row in keyset_rows(gateway_of(request).runtime.pool, page, lambda row: int(row["id"])):
            view = _delivery(row).model_dump(mode="json")
            view["items"] = " ".join(view["items"])
            yield [view[name] for name in _CSV_COLUMNS]

    return csv_response("deliveries.csv", _CSV_COLUMNS, rows())


# --- A resident's own provision record (APPI Art. 33) ---------------------------------------------


class ResidentDeliveryView(BaseModel):
    delivered_at: datetime
    partner: str
    partner_name: str | None = Field(description="the partner's name, as the gateway knows it")
    certificate_number: str
    municipality_code: str
    record_type: str = Field(description="what was sent: a ce_type (certificate, grant, withdrawal) or `tombstone`")
    items: list[str] = Field(description="the fields the record carried")
    consent_purpose: str
    consent_source: str = Field(description="the consent (or withdrawal) the delivery rests on")
    consent_at: datetime


class ResidentDeliveryPage(BaseModel):
    items: list[ResidentDeliveryView]
    total: int
    limit: int
    offset: int


@router.get(
    "/residents/{resident_id}/deliveries", tags=["deliveries"], response_model=ResidentDeliveryPage,
    summary="A resident's provision record: every delivery of their data to a partner (APPI Art. 33)",
)
async def resident_deliveries(
    resident_id: str, request: Request, principal: ResidentStaffOrAdmin,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100, offset: Offset = 0,
) -> ResidentDeliveryPage:
    """Oldest first. The resident sees all of theirs; staff those of their municipality; admin all.
    The record stays after an erasure for its legal retention (3 years), pseudonymous."""
    principal.ensure_resident(resident_id)
    gateway = gateway_of(request)
    partners = list(gateway.partners)
    rows, total = await store.resident_deliveries(
        gateway.runtime.pool, {p.code: p.resident_ref(resident_id) for p in partners},
        principal.municipality if principal.role is Role.STAFF else None, limit, offset,
    )
    names = {p.code: p.name for p in partners}
    return ResidentDeliveryPage(
        items=[
            ResidentDeliveryView(partner_name=names.get(row["partner"]), **{
                name: row[name] for name in ResidentDeliveryView.model_fields if name != "partner_name"
            })
            for row in rows
        ],
        total=total, limit=limit, offset=offset,
    )
