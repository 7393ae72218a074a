"""HTTP routes of the donation service (thin: parse, turn the body into the domain's command, call
the use case, shape the response). Every write takes the kit's ``WriteRequest`` and runs through it.

Who calls what: the payment provider (role payment_provider) confirms payments and refunds (an
admin may too: payments the provider does not see, e.g. a bank transfer, are entered by hand);
municipality staff see their municipality's donations, funds and receipts, and reviewers and
managers record one-stop applications and re-issue receipts (auditors only read); the prefecture's
readers and the ministry see the funds' balances (figures, no donor); a donor who is a registered
resident (resident token whose subject is the donor's resident id) sees their own donations,
receipts and one-stop status; a donor's erasure on request is an admin's, or a manager's of a
municipality the donor gave to; admin sees everything.
"""

import uuid
from collections.abc import Awaitable, Callable, Collection
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse

from shared.kit.auth import ALL_STAFF, DECIDERS, MANAGERS, Principal, Role, StaffRole, require
from shared.kit.csv_export import csv_response
from shared.kit.http import Offset
from shared.kit.use_case import WriteRequest

from .handlers import CSV_COLUMNS, DonationService
from .schemas import (
    DonationConfirmation,
    DonationPage,
    DonationView,
    DonorDetails,
    DonorErasureView,
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


def caller(*roles: Role, staff: Collection[StaffRole] = ALL_STAFF) -> Callable[..., Awaitable[Principal]]:
    """The authenticated principal (one of ``roles``). A My Number anywhere in a body (under a
    field of its own name too), the query or the path is refused by the kit (``ApiModel``,
    ``BodyGuard``) with ``my-number-not-allowed`` before any route sees it."""
    return require(*roles, staff=staff)


Admin = Annotated[Principal, Depends(caller(Role.ADMIN))]
#: Who reports payments and their reversals.
Payments = Annotated[Principal, Depends(caller(Role.PAYMENT_PROVIDER, Role.ADMIN))]
StaffOrAdmin = Annotated[Principal, Depends(caller(Role.STAFF, Role.ADMIN))]
#: Staff who act (reviewers, managers); auditors only read.
ActingStaff = Annotated[Principal, Depends(caller(Role.STAFF, Role.ADMIN, staff=DECIDERS))]
#: Managers (and admin): a donor's erasure on request.
Managers = Annotated[Principal, Depends(caller(Role.STAFF, Role.ADMIN, staff=MANAGERS))]
#: The funds' balances are figures: the prefecture's readers and the ministry read them too.
FigureReader = Annotated[Principal, Depends(caller(Role.STAFF, Role.PREFECTURE, Role.MINISTRY, Role.ADMIN))]
AnyRole = Annotated[Principal, Depends(caller(Role.RESIDENT, Role.STAFF, Role.ADMIN))]
ActingAnyRole = Annotated[Principal, Depends(caller(Role.RESIDENT, Role.STAFF, Role.ADMIN, staff=DECIDERS))]
DonorOrAdmin = Annotated[Principal, Depends(caller(Role.RESIDENT, Role.ADMIN))]
Year = Annotated[int | None, Query(ge=2008, le=2100, description="calendar year of the payment date")]
Limit = Annotated[int, Query(ge=1, le=500)]


def _service(request: Request) -> DonationService:
    service: DonationService = request.app.state.donation
    return service


async def donation_service(request: Request) -> DonationService:
    # async: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop per request.
    return _service(request)


Service = Annotated[DonationService, Depends(donation_service)]


# ---------------------------------------------------------------------------- donations


@router.post(
    "/donations", status_code=201, response_model=DonationView,
    responses={200: {"model": DonationView, "description": "This payment was already recorded (same content)"}},
)
async def confirm_donation(
    body: DonationConfirmation, principal: Payments, write: WriteRequest, request: Request
) -> Response:
    """A confirmed payment (from the payment provider): recorded once per payment reference."""
    # The service read here, not as one more dependency: this is the hot write path.
    return (await _service(request).confirm_donation(write, body.to_domain())).response()


@router.get("/donations/{donation_id}", response_model=DonationView)
async def get_donation(donation_id: uuid.UUID, principal: AnyRole, service: Service) -> DonationView:
    return await service.get_donation(principal, donation_id)


@router.post("/donations/{donation_id}/refund", response_model=DonationView)
async def refund_donation(
    donation_id: uuid.UUID, body: RefundRequest, principal: Payments, service: Service, write: WriteRequest
) -> Response:
    """The payment was reversed: ledger reversed, receipt cancelled, ``donation.refunded`` emitted."""
    return (await service.refund_donation(write, donation_id, body.reason)).response()


@router.post("/donations/{donation_id}/one-stop", status_code=201, response_model=OneStopApplicationView)
async def receive_one_stop_application(
    donation_id: uuid.UUID, body: OneStopApplicationReceived, principal: ActingStaff, service: Service,
    write: WriteRequest,
) -> Response:
    """The municipality received the donor's one-stop application (ワンストップ特例申請書)."""
    return (await service.receive_one_stop_application(write, donation_id, body.to_domain())).response()


@router.post("/donations/{donation_id}/one-stop/verify", response_model=OneStopApplicationView)
async def verify_one_stop_application(
    donation_id: uuid.UUID, principal: ActingStaff, service: Service, write: WriteRequest
) -> Response:
    """The application's identity documents were checked (only the fact is recorded)."""
    return (await service.verify_one_stop_application(write, donation_id)).response()


# ---------------------------------------------------------------------------- donors


@router.post(
    "/donors", status_code=201, response_model=DonorView,
    responses={200: {"model": DonorView, "description": "A donor with this identity exists (details updated)"}},
)
async def register_donor(body: DonorDetails, principal: Admin, service: Service, write: WriteRequest) -> Response:
    return (await service.register_donor(write, body.to_domain())).response()


@router.get("/donors/{donor_id}", response_model=DonorView)
async def get_donor(donor_id: uuid.UUID, principal: DonorOrAdmin, service: Service) -> DonorView:
    return await service.get_donor(principal, donor_id)


@router.delete("/donors/{donor_id}", response_model=DonorErasureView)
async def erase_donor(donor_id: uuid.UUID, principal: Managers, service: Service, write: WriteRequest) -> Response:
    """Erase a donor on request (a registered resident's donor is erased when they withdraw): name,
    address and e-mail go now; the receipts keep the donor's name and address until the legal
    retention period ends (``erasable_from``), then the retention job erases them too."""
    return (await service.erase_donor(write, donor_id)).response()


@router.get("/donors/{donor_id}/summary", response_model=DonorSummary)
async def donor_summary(
    donor_id: uuid.UUID, principal: DonorOrAdmin, service: Service, year: Year = None
) -> DonorSummary:
    """The donor's donations of a calendar year (default: this year in Japan) and one-stop status."""
    return await service.donor_summary(principal, donor_id, year)


@router.get("/residents/{resident_id}/donor", response_model=DonorView)
async def donor_of_resident(resident_id: str, principal: DonorOrAdmin, service: Service) -> DonorView:
    """The donor record of a registered resident (how a resident finds their donor id)."""
    return await service.donor_of_resident(principal, resident_id)


# ---------------------------------------------------------------------------- receipts


@router.get(
    "/receipts/{number}.pdf", response_class=Response,
    responses={200: {"content": {"application/pdf": {}}, "description": "The printable receipt (A4)"}},
)
async def receipt_pdf(number: str, principal: AnyRole, service: Service) -> Response:
    pdf = await service.receipt_pdf(principal, number)
    return Response(
        pdf, media_type="application/pdf",
        headers={"Content-Disposition": f'inline; filename="receipt-{number}.pdf"'},
    )


@router.get("/receipts/{number}", response_model=ReceiptView)
async def get_receipt(number: str, principal: AnyRole, service: Service) -> ReceiptView:
    return await service.get_receipt(principal, number)


@router.post("/receipts/{number}/reissue", response_model=ReceiptView)
async def reissue_receipt(number: str, principal: ActingAnyRole, service: Service, write: WriteRequest) -> Response:
    """Re-issue a receipt: same number, the re-issue is counted and dated (who may read it may)."""
    return (await service.reissue_receipt(write, number)).response()


# ---------------------------------------------------------------------------- municipality staff


@router.get("/municipalities/{code}/donations", response_model=DonationPage)
async def municipality_donations(
    code: str, principal: StaffOrAdmin, service: Service, year: Year = None, limit: Limit = 50, offset: Offset = 0
) -> DonationPage:
    return await service.municipality_donations(principal, code, year, limit, offset)


@router.get(
    "/municipalities/{code}/donations.csv", response_class=StreamingResponse,
    responses={200: {"content": {"text/csv": {}}, "description": "The year's donations, UTF-8 with BOM"}},
)
async def export_donations(
    code: str, principal: StaffOrAdmin, service: Service, year: Annotated[int, Query(ge=2008, le=2100)]
) -> StreamingResponse:
    rows = service.export_donations_csv(principal, code, year)
    return csv_response(f"donations-{code}-{year}.csv", CSV_COLUMNS, rows)


@router.get("/municipalities/{code}/funds", response_model=FundsView)
async def funds(code: str, principal: FigureReader, service: Service) -> FundsView:
    """Balances per earmark and unit, summed from the ledger."""
    return await service.funds(principal, code)


@router.get("/municipalities/{code}/funds/ledger", response_model=LedgerPage)
async def fund_ledger(
    code: str, principal: StaffOrAdmin, service: Service, limit: Limit = 100, offset: Offset = 0
) -> LedgerPage:
    return await service.ledger(principal, code, limit, offset)
