"""HTTP routes (``/v1``), thin: who reads which scope, the figures, their CSV.

``/v1/insights/…``: municipal staff read their municipality, prefecture readers their prefecture's
municipalities, the ministry and admins everything (``prefecture=`` / ``municipality=`` narrow it).
``/v1/public/insights/…``: no token; every municipality listed, every count of people under 10
withheld (null, named in ``suppressed``) with complementary suppression of row totals.
``POST /v1/insights/rebuild`` (admins): read every topic again from the earliest offset.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response, StreamingResponse

from services.insights import views
from services.insights.domain import Scope, scope_for
from services.insights.handlers import InsightsService
from services.insights.views import (
    CertificateRow,
    DonationRow,
    KpiView,
    MonthlyRow,
    ProgrammeRow,
    PublicRow,
    RegistrationRow,
    RelationshipRow,
    Table,
)
from shared.kit.auth import Principal, Role, require
from shared.kit.csv_export import csv_response
from shared.kit.rate_limit import public_limit
from shared.kit.use_case import WriteRequest

router = APIRouter(prefix="/v1", tags=["insights"])

Readers = Annotated[Principal, Depends(require(Role.STAFF, Role.PREFECTURE, Role.MINISTRY, Role.ADMIN))]
Admin = Annotated[Principal, Depends(require(Role.ADMIN))]
Code = r"^[0-9]{6}$"
Prefecture = Annotated[str | None, Query(pattern=Code, description="a prefecture's code (e.g. 300004)")]
Municipality = Annotated[str | None, Query(pattern=Code, description="a municipality's code (e.g. 304018)")]


async def insights(request: Request) -> InsightsService:
    service: InsightsService = request.app.state.insights
    return service


Service = Annotated[InsightsService, Depends(insights)]


def _scope(principal: Principal | None, prefecture: str | None, municipality: str | None) -> Scope:
    return scope_for(principal, prefecture, municipality)


def _csv(name: str, scope: Scope, rows: list[list[object]]) -> StreamingResponse:
    return csv_response(f"insights-{name}-{scope.label}.csv", views.CSV_HEADINGS[name], rows)


# --- registrations ---------------------------------------------------------------------------------


@router.get("/insights/registrations", response_model=Table[RegistrationRow])
async def registrations(
    principal: Readers, service: Service, prefecture: Prefecture = None, municipality: Municipality = None,
) -> Table[RegistrationRow]:
    """Active registrations by municipality (a prefecture's own registrations under its code) and tier."""
    scope = _scope(principal, prefecture, municipality)
    return Table(scope=scope.label, rows=views.registration_rows(await service.registrations(scope)))


@router.get("/insights/registrations.csv", response_class=StreamingResponse)
async def registrations_csv(
    principal: Readers, service: Service, prefecture: Prefecture = None, municipality: Municipality = None,
) -> Response:
    scope = _scope(principal, prefecture, municipality)
    return _csv("registrations", scope, views.csv_cells(views.registration_rows(await service.registrations(scope))))


@router.get("/insights/registrations/monthly", response_model=Table[MonthlyRow])
async def monthly(
    principal: Readers, service: Service, prefecture: Prefecture = None, municipality: Municipality = None,
) -> Table[MonthlyRow]:
    """New and ended registrations per municipality, month (Japan time) and tier."""
    scope = _scope(principal, prefecture, municipality)
    return Table(scope=scope.label, rows=views.monthly_rows(await service.monthly_registrations(scope)))


@router.get("/insights/registrations/monthly.csv", response_class=StreamingResponse)
async def monthly_csv(
    principal: Readers, service: Service, prefecture: Prefecture = None, municipality: Municipality = None,
) -> Response:
    scope = _scope(principal, prefecture, municipality)
    rows = views.monthly_rows(await service.monthly_registrations(scope))
    return _csv("registrations-monthly", scope, views.csv_cells(rows))


# --- certificates, programmes, donations -----------------------------------------------------------


@router.get("/insights/certificates", response_model=Table[CertificateRow])
async def certificates(
    principal: Readers, service: Service, prefecture: Prefecture = None, municipality: Municipality = None,
) -> Table[CertificateRow]:
    """Dual-resident certificates by municipality: valid now, revoked, expired."""
    scope = _scope(principal, prefecture, municipality)
    return Table(scope=scope.label, rows=views.certificate_rows(await service.certificates(scope)))


@router.get("/insights/certificates.csv", response_class=StreamingResponse)
async def certificates_csv(
    principal: Readers, service: Service, prefecture: Prefecture = None, municipality: Municipality = None,
) -> Response:
    scope = _scope(principal, prefecture, municipality)
    return _csv("certificates", scope, views.csv_cells(views.certificate_rows(await service.certificates(scope))))


@router.get("/insights/programmes", response_model=Table[ProgrammeRow])
async def programmes(
    principal: Readers, service: Service, prefecture: Prefecture = None, municipality: Municipality = None,
) -> Table[ProgrammeRow]:
    """Travel grants per programme and municipality: issued, waitlisted, active, reserved, and the
    miles or yen spent (``unit``) over how many trips."""
    scope = _scope(principal, prefecture, municipality)
    return Table(scope=scope.label, rows=views.programme_rows(await service.programmes(scope)))


@router.get("/insights/programmes.csv", response_class=StreamingResponse)
async def programmes_csv(
    principal: Readers, service: Service, prefecture: Prefecture = None, municipality: Municipality = None,
) -> Response:
    scope = _scope(principal, prefecture, municipality)
    return _csv("programmes", scope, views.csv_cells(views.programme_rows(await service.programmes(scope))))


@router.get("/insights/donations", response_model=Table[DonationRow])
async def donations(
    principal: Readers, service: Service, prefecture: Prefecture = None, municipality: Municipality = None,
) -> Table[DonationRow]:
    """Donations by municipality, kind, unit and month received (refunded ones counted apart)."""
    scope = _scope(principal, prefecture, municipality)
    return Table(scope=scope.label, rows=views.donation_rows(await service.donations(scope)))


@router.get("/insights/donations.csv", response_class=StreamingResponse)
async def donations_csv(
    principal: Readers, service: Service, prefecture: Prefecture = None, municipality: Municipality = None,
) -> Response:
    scope = _scope(principal, prefecture, municipality)
    return _csv("donations", scope, views.csv_cells(views.donation_rows(await service.donations(scope))))


# --- relationship population and KPIs --------------------------------------------------------------


@router.get("/insights/relationship-population", response_model=Table[RelationshipRow])
async def relationship(
    principal: Readers, service: Service, prefecture: Prefecture = None, municipality: Municipality = None,
) -> Table[RelationshipRow]:
    """People registered with or certified by each municipality (each person once), and per 1,000
    inhabitants where the population is known."""
    scope = _scope(principal, prefecture, municipality)
    return Table(scope=scope.label, rows=views.relationship_rows(await service.relationship(scope)))


@router.get("/insights/relationship-population.csv", response_class=StreamingResponse)
async def relationship_csv(
    principal: Readers, service: Service, prefecture: Prefecture = None, municipality: Municipality = None,
) -> Response:
    scope = _scope(principal, prefecture, municipality)
    rows = views.relationship_rows(await service.relationship(scope))
    return _csv("relationship-population", scope, views.csv_cells(rows))


@router.get("/insights/kpis", response_model=KpiView)
async def kpis(principal: Readers, service: Service) -> KpiView:
    """Municipal plans and support corporations in force against 600 + 600 within five years."""
    return views.kpi_view(await service.kpis())


@router.get("/insights/kpis.csv", response_class=StreamingResponse)
async def kpis_csv(principal: Readers, service: Service) -> Response:
    return _csv("kpis", Scope(), views.kpi_csv_cells(views.kpi_view(await service.kpis())))


# --- public ------------------------------------------------------------------------------------------


@router.get("/public/insights/registrations", response_model=Table[PublicRow], dependencies=[Depends(public_limit)])
async def public_registrations(
    service: Service, prefecture: Prefecture = None, municipality: Municipality = None,
) -> Table[PublicRow]:
    """Active registrations per municipality (public: no token; counts under 10 withheld)."""
    scope = _scope(None, prefecture, municipality)
    return Table(scope=scope.label, rows=views.public_registrations(scope, await service.registrations(scope)))


@router.get("/public/insights/relationship-population", response_model=Table[PublicRow],
            dependencies=[Depends(public_limit)])
async def public_relationship(
    service: Service, prefecture: Prefecture = None, municipality: Municipality = None,
) -> Table[PublicRow]:
    """Relationship population per municipality (public: no token; counts under 10 withheld)."""
    scope = _scope(None, prefecture, municipality)
    return Table(scope=scope.label, rows=views.public_relationship(scope, await service.relationship(scope)))


@router.get("/public/insights/kpis", response_model=KpiView, dependencies=[Depends(public_limit)])
async def public_kpis(service: Service) -> KpiView:
    """The KPI figures (plans and corporations are not people: nothing withheld)."""
    return views.kpi_view(await service.kpis())


# --- rebuild ---------------------------------------------------------------------------------------


@router.post("/insights/rebuild", status_code=202)
async def rebuild(principal: Admin, service: Service, write: WriteRequest) -> Response:
    """Empty the read model and read every topic again from the earliest offset (a new generation)."""
    return (await service.rebuild(write)).response()
