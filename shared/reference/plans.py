"""Adopted dual-residence plans and designated support corporations (MLIT, as of the end of 2025)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from functools import cache
from typing import Literal

from ._data import ReferenceDataError, parse_date, read_rows
from .municipalities import find_municipality

PlanLevel = Literal["prefecture", "municipality"]

SPECIFIC_RESIDENCE_PLAN = "特定居住促進計画"
"""The municipal plan (特定居住促進計画) under which a municipality certifies dual residents."""
REGIONAL_BASE_PLAN = "広域的地域活性化基盤整備計画"
"""The prefectural plan with dual-residence content."""


@dataclass(frozen=True, slots=True)
class Plan:
    level: PlanLevel
    prefecture: str
    municipality: str | None
    """The municipality's name for a municipal plan, None for a prefectural plan."""
    plan: str
    """The plan's name: 特定居住促進計画 or 広域的地域活性化基盤整備計画."""
    adopted_on: date
    municipality_code: str
    """The municipality's code for a municipal plan, the prefecture's code for a prefectural plan."""


@dataclass(frozen=True, slots=True)
class SupportCorporation:
    """A designated support corporation (特定居住支援法人); a corporation may serve several municipalities."""

    prefecture: str
    municipality: str
    corporation: str
    designated_on: date
    municipality_code: str


@cache
def _plans() -> tuple[Plan, ...]:
    result: list[Plan] = []
    columns = ("level", "prefecture", "municipality", "plan", "adopted_on")
    for line, row in enumerate(read_rows("plans.csv", columns), start=2):
        where = f"plans.csv, row {line}"
        prefecture = row["prefecture"]
        adopted_on = parse_date(row["adopted_on"], where=where)
        if row["level"] == "prefecture":
            if row["municipality"]:
                raise ReferenceDataError(f"{where}: a prefectural plan names a municipality")
            code = find_municipality(prefecture, prefecture).code
            result.append(Plan("prefecture", prefecture, None, row["plan"], adopted_on, code))
        elif row["level"] == "municipality":
            name = row["municipality"]
            code = find_municipality(prefecture, name).code
            result.append(Plan("municipality", prefecture, name, row["plan"], adopted_on, code))
        else:
            raise ReferenceDataError(f"{where}: unknown level {row['level']!r}")
    return tuple(result)


def plans() -> list[Plan]:
    """Every adopted plan, prefectural then municipal, in the order MLIT lists them."""
    return list(_plans())


@cache
def municipalities_with_plan(as_of: date | None = None) -> frozenset[str]:
    """Codes of the municipalities with an adopted 特定居住促進計画 (adopted on or before ``as_of``)."""
    return frozenset(
        plan.municipality_code
        for plan in _plans()
        if plan.level == "municipality"
        and plan.plan == SPECIFIC_RESIDENCE_PLAN
        and (as_of is None or plan.adopted_on <= as_of)
    )


@cache
def _support_corporations() -> tuple[SupportCorporation, ...]:
    result: list[SupportCorporation] = []
    columns = ("prefecture", "municipality", "corporation", "designated_on")
    for line, row in enumerate(read_rows("support_corporations.csv", columns), start=2):
        where = f"support_corporations.csv, row {line}"
        code = find_municipality(row["prefecture"], row["municipality"]).code
        designated_on = parse_date(row["designated_on"], where=where)
        result.append(
            SupportCorporation(
                prefecture=row["prefecture"],
                municipality=row["municipality"],
                corporation=row["corporation"],
                designated_on=designated_on,
                municipality_code=code,
            )
        )
    return tuple(result)


def support_corporations() -> list[SupportCorporation]:
    """The designated support corporations, one entry per (municipality, corporation) designation."""
    return list(_support_corporations())
