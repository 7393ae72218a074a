"""HTTP routes of the donation service (thin: parse, authorise, call a handler, shape the response).

Who calls what: the payment-provider integration (role admin) confirms payments and refunds;
municipality staff see their municipality's donations, funds and receipts and record one-stop
applications; a donor who is a registered resident (resident token whose subject is the donor's
resident id) sees their own donations, receipts and one-stop status; admin sees everything.
"""

import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse

from shared.kit.auth import Principal, Role, require
from shared.kit.csv_export import csv_response
from shared.kit.http import Offset
from shared.kit.my_number import refuse_my_number
from shared.kit.service import ServiceRuntime

from . import handlers
from .domain import MY_NUMBER_EXEMPT_FIELDS
from .schemas import (
    DonationConfirmation,
    DonationPage,
    DonationView,
    DonorDetails,
    DonorSummary,
    DonorView,
    FundsView,
    LedgerPage,
    OneStopApplicationReceived,
    OneStopApplicationView,
    ReceiptView,
    RefundRequest,
)

router = APIRouter(prefix="/v1", tags=["donations"])


def caller(*roles: Role) -> Callable[..., Awaitable[Principal]]:
    """The authenticated principal (one of ``roles``), after refusing any body carrying a My Number.

    Runs before the body is validated, so a My Number under any field name is refused with its own
    code (never merely as an unknown field), and nothing of it is logged or stored.
    """
    allowed = require(*roles)

    async def dependency(request: Request, principal: Annotated[Principal, Depends(allowed)]) -> Principal:
        raw = await request.body()
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                return principal  # malformed JSON: the framework answers 400
            refuse_my_number(body, exempt=MY_NUMBER_EXEMPT_FIELDS)
        return principal

    return dependency


Admin = Annotated[Principal, Depends(caller(Role.ADMIN))]
StaffOrAdmin = Annotated[Principal, Depends(caller(Role.STAFF, Role.ADMIN))]
AnyRole = Annotated[Principal, Depends(caller(Role.RESIDENT, Role.STAFF, Role.ADMIN))]
DonorOrAdmin = Annotated[Principal, Depends(caller(Role.RESIDENT, Role.ADMIN))]
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=200)]
Year = Annotated[int | None, Query(ge=2008, le=2100, description="calendar year of the payment date")]
Limit = Annotated[int, Query(ge=1, le=500)]


def _runtime(request: Request) -> ServiceRuntime:
    runtime: ServiceRuntime = request.app.state.runtime
    return runtime


def _correlation(request: Request) -> str | None:
    return getattr(request.state, "correlation_id", None)


# ---------------------------------------------------------------------------- donations


@router.post(
    "/donations", status_code=201, response_model=DonationView,
    responses={200: {"model": DonationView, "description": "This payment was already recorded (same content)"}},
)
async def confirm_donation(
    body: DonationConfirmation, principal: Admin, request: Request, response: Response
) -> DonationView:
    """A confirmed payment (from the payment provider): recorded once per payment reference."""
    result = await handlers.confirm_donation(_runtime(request), body, correlation_id=_correlation(request))
    response.status_code = 201 if result.created else 200
    return result.donation


@router.get("/donations/{donation_id}", response_model=DonationView)
async def get_donation(donation_id: uuid.UUID, principal: AnyRole, request: Request) -> DonationView:
    return await handlers.get_donation(_runtime(request), principal, donation_id)


@router.post("/donations/{donation_id}/refund", response_model=DonationView)
async def refund_donation(
    donation_id: uuid.UUID, body: RefundRequest, principal: Admin, request: Request,
    idempotency_key: IdempotencyKey = None,
) -> DonationView:
    """The payment was reversed: ledger reversed, receipt cancelled, ``donation.refunded`` emitted."""
    return await handlers.refund_donation(
        _runtime(request), donation_id, body.reason, idempotency_key=idempotency_key,
        correlation_id=_correlation(request),
    )


@router.post("/donations/{donation_id}/one-stop", status_code=201, response_model=OneStopApplicationView)
async def receive_one_stop_application(
    donation_id: uuid.UUID, body: OneStopApplicationReceived, principal: StaffOrAdmin, request: Request,
    idempotency_key: IdempotencyKey = None,
) -> OneStopApplicationView:
    """The municipality received the donor's one-stop application (ワンストップ特例申請書)."""
    return await handlers.receive_one_stop_application(
        _runtime(request), principal, donation_id, body, idempotency_key=idempotency_key,
        correlation_id=_correlation(request),
    )


@router.post("/donations/{donation_id}/one-stop/verify", response_model=OneStopApplicationView)
async def verify_one_stop_application(
    donation_id: uuid.UUID, principal: StaffOrAdmin, request: Request
) -> OneStopApplicationView:
    """The application's identity documents were checked (only the fact is recorded)."""
    return await handlers.verify_one_stop_application(_runtime(request), principal, donation_id)


# ---------------------------------------------------------------------------- donors


@router.post(
    "/donors", status_code=201, response_model=DonorView,
    responses={200: {"model": DonorView, "description": "A donor with this identity exists (details updated)"}},
)
async def register_donor(body: DonorDetails, principal: Admin, request: Request, response: Response) -> DonorView:
    result = await handlers.register_donor(_runtime(request), body, correlation_id=_correlation(request))
    response.status_code = 201 if result.created else 200
    return result.donor


@router.get("/donors/{donor_id}", response_model=DonorView)
async def get_donor(donor_id: uuid.UUID, principal: DonorOrAdmin, request: Request) -> DonorView:
    return await handlers.get_donor(_runtime(request), principal, donor_id)


@router.get("/donors/{donor_id}/summary", response_model=DonorSummary)
async def donor_summary(
    donor_id: uuid.UUID, principal: DonorOrAdmin, request: Request, year: Year = None
) -> DonorSummary:
    """The donor's donations of a calendar year (default: this year in Japan) and one-stop status."""
    return await handlers.donor_summary(_runtime(request), principal, donor_id, year)


@router.get("/residents/{resident_id}/donor", response_model=DonorView)
async def donor_of_resident(resident_id: str, principal: DonorOrAdmin, request: Request) -> DonorView:
    """The donor record of a registered resident (how a resident finds their donor id)."""
    return await handlers.donor_of_resident(_runtime(request), principal, resident_id)


# ---------------------------------------------------------------------------- receipts


@router.get(
    "/receipts/{number}.pdf", response_class=Response,
    responses={200: {"content": {"application/pdf": {}}, "description": "The printable receipt (A4)"}},
)
async def receipt_pdf(number: str, principal: AnyRole, request: Request) -> Response:
    pdf = await handlers.receipt_pdf(_runtime(request), principal, number)
    return Response(
        pdf, media_type="application/pdf",
        headers={"Content-Disposition": f'inline; filename="receipt-{number}.pdf"'},
    )


@router.get("/receipts/{number}", response_model=ReceiptView)
async def get_receipt(number: str, principal: AnyRole, request: Request) -> ReceiptView:
    return await handlers.get_receipt(_runtime(request), principal, number)


@router.post("/receipts/{number}/reissue", response_model=ReceiptView)
async def reissue_receipt(
    number: str, principal: AnyRole, request: Request, idempotency_key: IdempotencyKey = None
) -> ReceiptView:
    """Re-issue a receipt: same number, the re-issue is counted and dated."""
    return await handlers.reissue_receipt(
        _runtime(request), principal, number, idempotency_key=idempotency_key, correlation_id=_correlation(request)
    )


# ---------------------------------------------------------------------------- municipality staff


@router.get("/municipalities/{code}/donations", response_model=DonationPage)
async def municipality_donations(
    code: str, principal: StaffOrAdmin, request: Request, year: Year = None, limit: Limit = 50, offset: Offset = 0
) -> DonationPage:
    return await handlers.municipality_donations(_runtime(request), principal, code, year, limit, offset)


@router.get(
    "/municipalities/{code}/donations.csv", response_class=StreamingResponse,
    responses={200: {"content": {"text/csv": {}}, "description": "The year's donations, UTF-8 with BOM"}},
)
async def export_donations(
    code: str, principal: StaffOrAdmin, request: Request, year: Annotated[int, Query(ge=2008, le=2100)]
) -> StreamingResponse:
    rows = handlers.export_donations_csv(_runtime(request), principal, code, year)
    return csv_response(f"donations-{code}-{year}.csv", handlers.CSV_COLUMNS, rows)


@router.get("/municipalities/{code}/funds", response_model=FundsView)
async def funds(code: str, principal: StaffOrAdmin, request: Request) -> FundsView:
    """Balances per earmark and unit, summed from the ledger."""
    return await handlers.funds(_runtime(request), principal, code)


@router.get("/municipalities/{code}/funds/ledger", response_model=LedgerPage)
async def fund_ledger(
    code: str, principal: StaffOrAdmin, request: Request, limit: Limit = 100, offset: Offset = 0
) -> LedgerPage:
    return await handlers.ledger(_runtime(request), principal, code, limit, offset)
