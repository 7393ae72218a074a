"""Reference facts of the hometown-tax schemes (data only; the donation service decides with them).

- ``hometown_tax_designation.csv``: the periods a local government was **not** designated by the
  Minister of Internal Affairs as a ふるさと納税 recipient (指定制度, since 2019-06-01). A government
  not listed for a day is designated on it (the default: MIC designates every applicant that meets
  the criteria; only refusals and revocations are published as news).
- ``local_allocation_tax_non_recipients.csv``: local governments that receive no local allocation
  tax (地方交付税の不交付団体), by fiscal year, with whether their whole area lies in the three
  metropolitan areas' zones (既成市街地・近郊整備地帯 etc.), which decides 企業版ふるさと納税.
- ``regional_revitalisation_plans.csv``: 地域再生計画 certified by the Cabinet Office (the projects
  a corporate donation may fund), with the fiscal years they run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from functools import cache
from typing import Literal, get_args

from ._data import ReferenceDataError, parse_date, parse_flag, read_rows
from .municipalities import UnknownMunicipality, municipality

MetropolitanZone = Literal["whole", "partial", "none"]
_ZONES: tuple[str, ...] = get_args(MetropolitanZone)


class UnknownRevitalisationPlan(KeyError):
    def __init__(self, plan_id: str) -> None:
        super().__init__(plan_id)
        self.plan_id = plan_id

    def __str__(self) -> str:
        return f"unknown regional revitalisation plan {self.plan_id!r}"


@dataclass(frozen=True, slots=True)
class NotDesignatedPeriod:
    """A period a local government could not receive ふるさと納税 (no special deduction, no one-stop)."""

    municipality_code: str
    start: date
    #: The last day not designated (inclusive); None: still not designated as far as the data knows.
    end: date | None
    reason: str
    source: str

    def covers(self, day: date) -> bool:
        return self.start <= day and (self.end is None or day <= self.end)


@dataclass(frozen=True, slots=True)
class AllocationTaxNonRecipient:
    """A local government that receives no local allocation tax (不交付団体) in these fiscal years."""

    municipality_code: str
    from_fiscal_year: int
    #: Inclusive; None: through the latest fiscal year on file.
    until_fiscal_year: int | None
    #: How much of its area lies in the three metropolitan areas' zones (首都圏の既成市街地・近郊整備地帯,
    #: 近畿圏の既成都市区域・近郊整備区域, 中部圏の都市整備区域).
    metropolitan_zone: MetropolitanZone
    source: str

    def covers(self, fiscal_year: int) -> bool:
        return self.from_fiscal_year <= fiscal_year and (
            self.until_fiscal_year is None or fiscal_year <= self.until_fiscal_year
        )


@dataclass(frozen=True, slots=True)
class RevitalisationPlan:
    """A 地域再生計画 certified by the Cabinet Office (まち・ひと・しごと創生寄附活用事業)."""

    plan_id: str
    municipality_code: str
    name: str
    certified_on: date
    from_fiscal_year: int
    #: Inclusive; None: no end published.
    until_fiscal_year: int | None
    #: Illustrative data, not a published certification.
    sample: bool
    source: str


def _code(row: dict[str, str], where: str) -> str:
    """The row's municipality code, checked against the name written beside it (catches typos)."""
    code = row["municipality_code"]
    try:
        found = municipality(code)
    except UnknownMunicipality:
        raise ReferenceDataError(f"{where}: unknown municipality code {code!r}") from None
    if found.full_name != row["municipality"]:
        raise ReferenceDataError(f"{where}: {code} is {found.full_name}, not {row['municipality']}")
    return code


def _year(value: str, where: str) -> int:
    if not value.isdigit() or len(value) != 4:
        raise ReferenceDataError(f"{where}: expected a fiscal year like 2025, got {value!r}")
    return int(value)


@cache
def _not_designated() -> tuple[NotDesignatedPeriod, ...]:
    columns = ("municipality_code", "municipality", "not_designated_from", "not_designated_until", "reason", "source")
    result: list[NotDesignatedPeriod] = []
    for line, row in enumerate(read_rows("hometown_tax_designation.csv", columns), start=2):
        where = f"hometown_tax_designation.csv, row {line}"
        start = parse_date(row["not_designated_from"], where=where)
        end = parse_date(row["not_designated_until"], where=where) if row["not_designated_until"] else None
        if end is not None and end < start:
            raise ReferenceDataError(f"{where}: the period ends before it starts")
        if not row["source"]:
            raise ReferenceDataError(f"{where}: no source")
        result.append(NotDesignatedPeriod(_code(row, where), start, end, row["reason"], row["source"]))
    return tuple(result)


def not_designated_periods() -> list[NotDesignatedPeriod]:
    """Every published period of non-designation, in file order."""
    return list(_not_designated())


def not_designated_on(code: str, day: date) -> NotDesignatedPeriod | None:
    """The period in which the local government was not designated on ``day``, if any."""
    return next((p for p in _not_designated() if p.municipality_code == code and p.covers(day)), None)


@cache
def _non_recipients() -> tuple[AllocationTaxNonRecipient, ...]:
    columns = (
        "municipality_code", "municipality", "from_fiscal_year", "until_fiscal_year", "metropolitan_zone", "source",
    )
    result: list[AllocationTaxNonRecipient] = []
    for line, row in enumerate(read_rows("local_allocation_tax_non_recipients.csv", columns), start=2):
        where = f"local_allocation_tax_non_recipients.csv, row {line}"
        zone = row["metropolitan_zone"]
        if zone not in _ZONES:
            raise ReferenceDataError(f"{where}: metropolitan_zone is one of {_ZONES}, got {zone!r}")
        until = _year(row["until_fiscal_year"], where) if row["until_fiscal_year"] else None
        result.append(
            AllocationTaxNonRecipient(
                municipality_code=_code(row, where), from_fiscal_year=_year(row["from_fiscal_year"], where),
                until_fiscal_year=until, metropolitan_zone=zone,  # type: ignore[arg-type]  # checked above
                source=row["source"],
            )
        )
    return tuple(result)


def allocation_tax_non_recipients() -> list[AllocationTaxNonRecipient]:
    return list(_non_recipients())


def allocation_tax_non_recipient(code: str, fiscal_year: int) -> AllocationTaxNonRecipient | None:
    """The local government's non-recipient entry for the fiscal year (None: it receives the tax,
    or no list on file says otherwise)."""
    return next((n for n in _non_recipients() if n.municipality_code == code and n.covers(fiscal_year)), None)


@cache
def _plans() -> dict[str, RevitalisationPlan]:
    columns = (
        "plan_id", "municipality_code", "municipality", "name", "certified_on", "from_fiscal_year",
        "until_fiscal_year", "sample", "source",
    )
    result: dict[str, RevitalisationPlan] = {}
    for line, row in enumerate(read_rows("regional_revitalisation_plans.csv", columns), start=2):
        where = f"regional_revitalisation_plans.csv, row {line}"
        plan_id = row["plan_id"]
        if plan_id in result:
            raise ReferenceDataError(f"{where}: plan id {plan_id!r} appears twice")
        until = _year(row["until_fiscal_year"], where) if row["until_fiscal_year"] else None
        result[plan_id] = RevitalisationPlan(
            plan_id=plan_id, municipality_code=_code(row, where), name=row["name"],
            certified_on=parse_date(row["certified_on"], where=where),
            from_fiscal_year=_year(row["from_fiscal_year"], where), until_fiscal_year=until,
            sample=parse_flag(row["sample"], where=where), source=row["source"],
        )
    return result


def revitalisation_plans() -> list[RevitalisationPlan]:
    return list(_plans().values())


def revitalisation_plan(plan_id: str) -> RevitalisationPlan:
    """The plan with this id; raises :class:`UnknownRevitalisationPlan`."""
    try:
        return _plans()[plan_id]
    except KeyError:
        raise UnknownRevitalisationPlan(plan_id) from None
