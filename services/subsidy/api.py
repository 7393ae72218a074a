"""HTTP routes of the subsidy service (thin: parse, authorise, call a use case, shape the answer)."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any

from asyncpg import Record
from fastapi import APIRouter, Depends, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import Response, StreamingResponse
from pydantic import AwareDatetime, Field

from services.subsidy import handlers, store
from services.subsidy.domain import FareProduct, GrantStatus, Program, known_municipality
from shared.contracts.common import MunicipalityCode, PartnerCode
from shared.contracts.partners import TripKind
from shared.contracts.subsidy import BudgetUnit, Mechanism
from shared.kit.auth import MANAGERS, Principal, Role, require
from shared.kit.csv_export import csv_response, keyset_rows
from shared.kit.db import Connection
from shared.kit.http import Amount, ApiModel, Int32, MultilineText, Offset
from shared.kit.rate_limit import PARTNER_API, limited_principal
from shared.kit.service import ServiceRuntime, UnitOfWork
from shared.kit.use_case import Outcome, WriteRequest

router = APIRouter(prefix="/v1", tags=["subsidy"])

Staff = Annotated[Principal, Depends(require(Role.STAFF, Role.ADMIN))]
# Moving money is a manager's (reviewers decide applications elsewhere, auditors only read).
Managers = Annotated[Principal, Depends(require(Role.STAFF, Role.ADMIN, staff=MANAGERS))]
# Programmes and budgets are figures, not people: the prefecture's readers and the ministry see them too.
FigureReader = Annotated[Principal, Depends(require(Role.STAFF, Role.PREFECTURE, Role.MINISTRY, Role.ADMIN))]
Admin = Annotated[Principal, Depends(require(Role.ADMIN))]
# A partner's requests count against the partner API's rate (NICHIIKI_RATE_LIMIT_PARTNER_*): 429 beyond it.
Partner = Annotated[Principal, Depends(limited_principal(PARTNER_API, require(Role.PARTNER)))]
Reader = Annotated[Principal, Depends(require(Role.RESIDENT, Role.STAFF, Role.ADMIN))]
Limit = Annotated[int, Query(ge=1, le=500)]


class FareProductBody(ApiModel):
    route: str = Field(min_length=1, max_length=100, examples=["羽田–高知"])
    fare_jpy: Amount


class ProgramRequest(ApiModel):
    program_id: str = Field(pattern=r"^[a-z0-9][a-z0-9._@-]{2,99}$", examples=["jal-dual-residence-miles@304018"])
    title: str = Field(min_length=1, max_length=300)
    partner: PartnerCode
    municipality_code: MunicipalityCode
    mechanism: Mechanism
    #: Per mechanism, integers only: mileage_grant {required_round_trips, max_one_ways, miles_per_one_way,
    #: window_days, jpy_per_mile?}; fare_voucher {voucher_jpy, max_one_ways, window_days?};
    #: fare_discount {discount_percent?, max_discount_jpy, max_one_ways, window_days?}: without
    #: discount_percent, the partner's fixed fares (fare_products) for participant_cap residents.
    parameters: dict[str, Any]
    active_from: date
    active_until: date
    opening_budget: Amount = 0
    fare_products: list[FareProductBody] = Field(default_factory=list, max_length=50)
    participant_cap: Int32 | None = Field(default=None, ge=1, description="residents the program takes at once")
    one_region_per_year: bool = Field(
        default=False, description="a grant per resident per certificate year in one municipality of the scheme only"
    )


class TopUpRequest(ApiModel):
    unit: BudgetUnit
    amount: Amount
    reason: MultilineText = Field(min_length=1, max_length=500)


class RedemptionRequest(ApiModel):
    """A trip under a grant, as a partner writes it to ``partner.<code>.trips.v1``, minus the partner (the
    token says who reports)."""

    grant_id: str = Field(min_length=1, max_length=200)
    certificate_number: str = Field(min_length=1, max_length=100)
    trip_id: str = Field(min_length=1, max_length=200)
    trip_kind: TripKind
    travelled_on: date
    discount_jpy: Amount | None = None
    reported_at: AwareDatetime | None = None


def _runtime(request: Request) -> ServiceRuntime:
    runtime: ServiceRuntime = request.app.state.runtime
    return runtime


# --- programs and budgets -------------------------------------------------------------------------


@router.post("/programs", status_code=201, summary="Create a travel program (admin)")
async def create_program(body: ProgramRequest, principal: Admin, write: WriteRequest) -> Response:
    draft = handlers.ProgramDraft(
        program_id=body.program_id, title=body.title, partner=body.partner, municipality_code=body.municipality_code,
        mechanism=body.mechanism, parameters=body.parameters, active_from=body.active_from,
        active_until=body.active_until, opening_budget=body.opening_budget,
        fare_products=tuple(FareProduct(route=f.route, fare_jpy=f.fare_jpy) for f in body.fare_products),
        participant_cap=body.participant_cap, one_region_per_year=body.one_region_per_year,
    )

    today = write.runtime.clock.today()

    async def act(uow: UnitOfWork) -> Outcome:
        program = await handlers.create_program(uow, draft, f"{principal.role}:{principal.subject}", today)
        return Outcome(201, jsonable_encoder(await _program_view(uow.conn, program)))

    return (await write.run(act)).response()


@router.get("/programs/{program_id}", summary="A program with its budget and ledger sums")
async def get_program(request: Request, program_id: str, principal: FigureReader) -> dict[str, Any]:
    async with _runtime(request).pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        program = await handlers.load_program(conn, program_id)
        principal.ensure_reads_municipality(program.municipality_code)
        return await _program_view(conn, program)


@router.get("/programs/{program_id}/ledger", summary="The program's budget ledger, oldest first")
async def get_ledger(
    request: Request, program_id: str, principal: Staff, limit: Limit = 100, offset: Offset = 0
) -> dict[str, Any]:
    async with _runtime(request).pool.acquire() as conn:
        program = await handlers.load_program(conn, program_id)
        principal.ensure_municipality(program.municipality_code)
        items, total = await store.ledger_page(conn, program_id, limit, offset)
    return {"items": jsonable_encoder(items), "total": total, "limit": limit, "offset": offset}


@router.get("/programs/{program_id}/grants", summary="The program's grants, by status")
async def get_program_grants(
    request: Request, program_id: str, principal: Staff, status: GrantStatus | None = None,
    limit: Limit = 100, offset: Offset = 0,
) -> dict[str, Any]:
    async with _runtime(request).pool.acquire() as conn:
        program = await handlers.load_program(conn, program_id)
        principal.ensure_municipality(program.municipality_code)
        items, total = await store.grants_of_program(conn, program_id, status, limit, offset)
    items = await handlers.readable_grants(_runtime(request).keyring, items)
    return {"items": jsonable_encoder(items), "total": total, "limit": limit, "offset": offset}


@router.post("/programs/{program_id}/budget", status_code=201, summary="Top up a program's budget")
async def top_up_budget(program_id: str, body: TopUpRequest, principal: Managers, write: WriteRequest) -> Response:
    today = write.runtime.clock.today()

    async def authorise(uow: UnitOfWork) -> Program:
        # Only the program's municipality (or an admin) tops it up: checked before any replay.
        program = await handlers.load_program(uow.conn, program_id)
        principal.ensure_municipality(program.municipality_code)
        return program

    async def act(uow: UnitOfWork, program: Program) -> Outcome:
        result = await handlers.top_up(
            uow, program, f"{principal.role}:{principal.subject}", body.unit, body.amount, body.reason, today
        )
        return Outcome(201, {
            "program_id": result.program_id, "unit": result.unit, "credited": result.credited,
            "ledger_entry_id": result.entry_id,
            "budget": {"available": result.available, "reserved": result.reserved, "spent": result.spent},
            "issued_from_waitlist": result.issued_from_waitlist,
        })

    return (await write.run(act, authorise=authorise)).response()


@router.get("/municipalities/{code}/programs", summary="The municipality's programs and budgets")
async def municipality_programs(request: Request, code: str, principal: FigureReader) -> dict[str, Any]:
    principal.ensure_reads_municipality(code)
    async with _runtime(request).pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        programs = await store.programs_of_municipality(conn, code)
        items = [await _program_view(conn, program) for program in programs]
    return {"items": items, "total": len(items)}


async def _program_view(conn: Connection, program: Program) -> dict[str, Any]:
    """The program with its budget: available (the budget row), reserved and spent (the ledger),
    checked against the ledger and the grants."""
    budgets = []
    grants = await store.grant_sums(conn, program.program_id)
    for budget in await store.budgets_of_program(conn, program.program_id):
        sums = await store.ledger_sums(conn, program.program_id, budget.unit)
        budgets.append({
            "unit": budget.unit, "available": budget.available, "reserved": sums.reserved, "spent": sums.spent,
            "credited": sums.available + sums.reserved + sums.spent,
            "ledger": {
                "available": sums.available, "reserved": sums.reserved, "spent": sums.spent,
                "entries": sums.entries, "by_kind": sums.by_kind,
            },
            "balanced": budget.available == sums.available
            and (sums.reserved, sums.spent) == (grants.remaining, grants.drawn),
        })
    return {
        "program_id": program.program_id, "title": program.title, "partner": program.partner,
        "municipality_code": program.municipality_code, "mechanism": program.mechanism, "unit": program.unit,
        "parameters": program.parameters.model_dump(exclude_none=True), "grant_value": program.grant_value,
        "active_from": program.active_from.isoformat(), "active_until": program.active_until.isoformat(),
        "reference_program": program.reference_program,
        "fare_products": [{"route": f.route, "fare_jpy": f.fare_jpy} for f in program.fare_products],
        "participant_cap": program.participant_cap, "one_region_per_year": program.one_region_per_year,
        "budgets": budgets,
        "grants": await store.grant_counts(conn, program.program_id),
    }


# --- grants and redemptions -----------------------------------------------------------------------


@router.get("/residents/{resident_id}/grants", summary="A resident's grants")
async def resident_grants(
    request: Request, resident_id: str, principal: Reader, limit: Limit = 100, offset: Offset = 0
) -> dict[str, Any]:
    principal.ensure_resident(resident_id)
    municipality = principal.municipality if principal.role is Role.STAFF else None
    async with _runtime(request).pool.acquire() as conn:
        items, total = await store.grants_of_resident(conn, resident_id, municipality, limit, offset)
    items = await handlers.readable_grants(_runtime(request).keyring, items)
    return {"items": jsonable_encoder(items), "total": total, "limit": limit, "offset": offset}


@router.post(
    "/redemptions", status_code=201,
    summary="Report a trip under a grant (partners that cannot produce to Kafka)",
    description="201 with the outcome (accepted or refused with a reason) for a new trip id; 200 with the "
    "first outcome when the same trip is reported again. Reports that cannot be this partner's are problems.",
)
async def report_redemption(body: RedemptionRequest, principal: Partner, write: WriteRequest) -> Response:
    assert principal.partner is not None  # a partner token always names its partner
    clock = write.runtime.clock
    report = handlers.TripReport(
        partner=principal.partner, grant_id=body.grant_id, certificate_number=body.certificate_number,
        trip_id=body.trip_id, trip_kind=body.trip_kind, travelled_on=body.travelled_on,
        discount_jpy=body.discount_jpy, reported_at=body.reported_at or clock.now(),
    )
    today = clock.today()

    # Whose grant it is is checked by the use case (a wrong partner is a 403 that stores nothing);
    # the key is the partner's own, so no other partner ever gets this answer back.
    async def act(uow: UnitOfWork) -> Outcome:
        outcome = await handlers.report_trip(uow, report, "http", today)
        return Outcome(200 if outcome.duplicate else 201, jsonable_encoder(outcome.as_json()))

    return (await write.run(act)).response()


@router.get("/municipalities/{code}/redemptions", summary="The municipality's reported trips and their outcomes")
async def redemptions(
    request: Request, code: str, principal: Staff, program_id: str | None = None, limit: Limit = 100,
    offset: Offset = 0,
) -> dict[str, Any]:
    principal.ensure_municipality(code)
    async with _runtime(request).pool.acquire() as conn:
        items, total = await store.redemptions_page(conn, code, program_id, limit, offset)
    return {"items": jsonable_encoder(items), "total": total, "limit": limit, "offset": offset}


_CSV_COLUMNS = (
    "recorded_at", "reported_at", "partner", "trip_id", "program_id", "grant_id", "certificate_number", "trip_kind",
    "travelled_on", "discount_jpy", "accepted", "reason", "detail", "unit", "amount", "trips_counted", "completed",
    "channel",
)


@router.get("/municipalities/{code}/redemptions.csv", summary="Every reported trip of the municipality, as CSV")
async def redemptions_csv(request: Request, code: str, principal: Staff) -> StreamingResponse:
    known_municipality(code)
    principal.ensure_municipality(code)

    async def page(conn: Connection, after: store.TripKey | None, limit: int) -> list[Record]:
        return await store.redemptions_after(conn, code, after, limit)

    rows = (
        tuple(row[column] for column in _CSV_COLUMNS)
        async for row in keyset_rows(_runtime(request).pool, page, store.trip_key)
    )
    return csv_response(f"redemptions-{code}.csv", _CSV_COLUMNS, rows)
