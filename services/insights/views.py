"""What the HTTP API shows: tables of figures built from domain objects, and their CSV form."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import date
from typing import Generic, TypeVar

from pydantic import BaseModel

from services.insights.domain import (
    CertificateFigure,
    DonationFigure,
    Kpis,
    MonthlyRegistrations,
    ProgrammeFigure,
    RegistrationFigure,
    RelationshipFigure,
    Scope,
    SuppressedRow,
    suppress,
)
from shared.reference import UnknownMunicipality, municipalities, municipality

Row = TypeVar("Row", bound=BaseModel)


def name_of(code: str) -> str:
    with contextlib.suppress(UnknownMunicipality):
        return municipality(code).full_name
    return code


class RegistrationRow(BaseModel):
    prefecture_code: str
    municipality_code: str
    municipality_name: str
    basic: int
    premium: int
    total: int


class MonthlyRow(BaseModel):
    municipality_code: str
    municipality_name: str
    month: date
    tier: str
    new: int
    ended: int


class CertificateRow(BaseModel):
    prefecture_code: str
    municipality_code: str
    municipality_name: str
    valid: int
    revoked: int
    expired: int


class ProgrammeRow(BaseModel):
    program_id: str
    partner: str
    municipality_code: str
    unit: str
    issued: int
    waitlisted: int
    active: int
    reserved: int
    spent: int
    trips: int


class DonationRow(BaseModel):
    municipality_code: str
    municipality_name: str
    kind: str
    unit: str
    month: date
    count: int
    amount: int
    refunded: int


class RelationshipRow(BaseModel):
    prefecture_code: str
    municipality_code: str
    municipality_name: str
    registered: int
    certified: int
    people: int
    population: int | None
    per_1000: float | None


class KpiPointView(BaseModel):
    month_end: date
    plans: int | None
    corporations: int | None
    line: float


class KpiView(BaseModel):
    as_of: date
    target: int
    entry_into_force: date
    deadline: date
    plans_in_force: int
    plans_made: int
    corporations_designated: int
    corporations_made: int
    line_today: float
    series: list[KpiPointView]


class Table(BaseModel, Generic[Row]):
    scope: str
    rows: list[Row]


class PublicRow(BaseModel):
    """A public row: a withheld count is null and named in ``suppressed``."""

    municipality_code: str
    municipality_name: str
    values: dict[str, int | float | None]
    suppressed: list[str]


def registration_rows(figures: Sequence[RegistrationFigure]) -> list[RegistrationRow]:
    return [
        RegistrationRow(prefecture_code=f.prefecture_code, municipality_code=f.municipality_code,
                        municipality_name=name_of(f.municipality_code), basic=f.basic, premium=f.premium,
                        total=f.total)
        for f in figures
    ]


def monthly_rows(figures: Sequence[MonthlyRegistrations]) -> list[MonthlyRow]:
    return [MonthlyRow(municipality_name=name_of(f.municipality_code), **_fields(f)) for f in figures]


def certificate_rows(figures: Sequence[CertificateFigure]) -> list[CertificateRow]:
    return [CertificateRow(municipality_name=name_of(f.municipality_code), **_fields(f)) for f in figures]


def programme_rows(figures: Sequence[ProgrammeFigure]) -> list[ProgrammeRow]:
    return [ProgrammeRow(**_fields(f)) for f in figures]


def donation_rows(figures: Sequence[DonationFigure]) -> list[DonationRow]:
    return [DonationRow(municipality_name=name_of(f.municipality_code), **_fields(f)) for f in figures]


def relationship_rows(figures: Sequence[RelationshipFigure]) -> list[RelationshipRow]:
    return [
        RelationshipRow(municipality_name=name_of(f.municipality_code), per_1000=f.per_1000, **_fields(f))
        for f in figures
    ]


def kpi_view(k: Kpis) -> KpiView:
    return KpiView(
        as_of=k.as_of, target=k.target, entry_into_force=k.entry_into_force, deadline=k.deadline,
        plans_in_force=k.plans_in_force, plans_made=k.plans_made,
        corporations_designated=k.corporations_designated, corporations_made=k.corporations_made,
        line_today=k.line_today,
        series=[KpiPointView(month_end=p.month_end, plans=p.plans, corporations=p.corporations, line=p.line)
                for p in k.series],
    )


def _fields(figure: object) -> dict[str, object]:
    return {name: getattr(figure, name) for name in getattr(figure, "__slots__", ())}


# --- public tables: every municipality of the scope, small cells withheld ----------------------------


def public_municipalities(scope: Scope) -> list[tuple[str, str]]:
    """(code, prefecture code) of every municipality a public table lists, data or not: a row that
    appears only where someone registered would itself tell that someone did."""
    out = []
    for m in municipalities().values():
        if m.kind in ("prefecture", "designated_ward") or m.northern_territories:
            continue
        if scope.municipality not in (None, m.code) or scope.prefecture not in (None, m.prefecture_code):
            continue
        out.append((m.code, m.prefecture_code))
    return sorted(out)


def public_registrations(scope: Scope, figures: Sequence[RegistrationFigure]) -> list[PublicRow]:
    found = {f.municipality_code: f for f in figures}
    rows = [
        (code, prefecture, {"basic": f.basic if f else 0, "premium": f.premium if f else 0,
                            "total": f.total if f else 0})
        for code, prefecture in public_municipalities(scope) for f in [found.get(code)]
    ]
    return [_public(row) for row in suppress(rows, total="total")]


def public_relationship(scope: Scope, figures: Sequence[RelationshipFigure]) -> list[PublicRow]:
    found = {f.municipality_code: f for f in figures}
    rows = [
        (code, prefecture, {"registered": f.registered if f else 0, "certified": f.certified if f else 0,
                            "people": f.people if f else 0})
        for code, prefecture in public_municipalities(scope) for f in [found.get(code)]
    ]
    out = []
    for row in suppress(rows):
        figure = found.get(row.key)
        people = row.cells["people"]
        per_1000 = figure.per_1000 if figure is not None and people is not None else None
        public = _public(row)
        public.values["per_1000"] = per_1000
        out.append(public)
    return out


def _public(row: SuppressedRow) -> PublicRow:
    return PublicRow(municipality_code=row.key, municipality_name=name_of(row.key),
                     values=dict(row.cells), suppressed=row.suppressed)


# --- CSV: Japanese headings -------------------------------------------------------------------------

CSV_HEADINGS: dict[str, list[str]] = {
    "registrations": ["都道府県コード", "市区町村コード", "市区町村名", "基本登録", "プレミアム登録", "合計"],
    "registrations-monthly": ["市区町村コード", "市区町村名", "月", "区分", "新規", "終了"],
    "certificates": ["都道府県コード", "市区町村コード", "市区町村名", "有効", "取消", "期限切れ"],
    "programmes": ["制度ID", "事業者", "市区町村コード", "単位", "交付件数", "待機中", "有効", "引当額",
                   "利用額", "利用回数"],
    "donations": ["市区町村コード", "市区町村名", "種別", "単位", "受領月", "件数", "金額", "返金件数"],
    "relationship-population": ["都道府県コード", "市区町村コード", "市区町村名", "登録者数", "証明者数",
                                "関係人口", "人口", "人口千人当たり"],
    "kpis": ["月末", "特定居住促進計画", "特定居住支援法人", "目標線"],
}


def csv_cells(rows: Sequence[BaseModel]) -> list[list[object]]:
    return [list(row.model_dump().values()) for row in rows]


def kpi_csv_cells(view: KpiView) -> list[list[object]]:
    return [[p.month_end, p.plans, p.corporations, p.line] for p in view.series]
