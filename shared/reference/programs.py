"""Travel-partner programs for certified dual residents (airline, rail and ferry)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from types import MappingProxyType
from typing import Literal, get_args

from ._data import ReferenceDataError, parse_flag, read_rows
from .municipalities import find_municipality_by_full_name, municipality

PartnerKind = Literal["airline", "rail", "ferry"]
TravelMechanism = Literal["mileage_grant", "fare_discount", "fare_voucher"]

_PARTNER_KINDS: Mapping[str, PartnerKind] = {kind: kind for kind in get_args(PartnerKind)}
_MECHANISMS: Mapping[str, TravelMechanism] = {kind: kind for kind in get_args(TravelMechanism)}
_NUMERIC_PARAMETER = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(-?[0-9]+)(?![0-9.])")
_COLUMNS = (
    "program",
    "partner",
    "partner_kind",
    "mechanism",
    "municipalities",
    "seed_terms",
    "demo_parameters",
    "one_region_per_year",
)
_FARE_COLUMNS = ("program", "prefecture", "route", "fare_jpy")


class UnknownTravelProgram(KeyError):
    def __init__(self, program_id: str) -> None:
        super().__init__(program_id)
        self.program_id = program_id

    def __str__(self) -> str:
        return f"unknown travel program {self.program_id!r}"


def parse_demo_parameters(text: str) -> dict[str, int]:
    """The numeric ``key=value`` pairs of a ``;``-separated parameter list; prose parts are skipped.

    ``"miles_per_one_way=7500 (illustrative); max_one_ways=4; window_days=122"`` →
    ``{"miles_per_one_way": 7500, "max_one_ways": 4, "window_days": 122}``.
    """
    parameters: dict[str, int] = {}
    for part in text.split(";"):
        match = _NUMERIC_PARAMETER.match(part)
        if match is not None:
            parameters[match.group(1)] = int(match.group(2))
    return parameters


def partner_code_of(partner: str) -> str:
    """A partner's short code: lower-case letters and digits only (``"JR East"`` → ``"jreast"``)."""
    return re.sub(r"[^0-9a-z]+", "", partner.lower())


@dataclass(frozen=True, slots=True)
class FareProduct:
    """A fixed fare a partner publishes for the programme's participants (ANA: e.g. 羽田–高知 ¥11,000
    one way), for the participating municipalities of one prefecture."""

    prefecture: str
    route: str
    fare_jpy: int


@dataclass(frozen=True, slots=True)
class TravelProgram:
    program_id: str
    partner: str
    """The partner's name as listed: ``JAL``, ``ANA``, ``JR East``, ``Sado Kisen``, ``Kyushu Yusen``."""
    partner_kind: PartnerKind
    mechanism: TravelMechanism
    municipality_codes: tuple[str, ...]
    """The participating municipalities, in the order listed."""
    seed_terms: str
    """The published terms, in prose."""
    demo_parameters: Mapping[str, int] = field(hash=False)
    """Illustrative numbers for demos and tests (read-only), e.g. ``{"miles_per_one_way": 7500, ...}``."""
    one_region_per_year: bool = False
    """A resident gets this programme in one participating municipality per certificate year (JAL)."""
    fare_products: tuple[FareProduct, ...] = ()
    """The fixed fares published for participants (``fare_products.csv``), if the programme has any."""

    def fare_products_for(self, municipality_code: str) -> tuple[FareProduct, ...]:
        """The fares of the municipality's prefecture (none known: the partner has not published them
        in our sources)."""
        prefecture = municipality(municipality(municipality_code).prefecture_code).name
        return tuple(product for product in self.fare_products if product.prefecture == prefecture)

    @property
    def partner_code(self) -> str:
        """``jal``, ``ana``, ``jreast``, ``sadokisen``, ``kyushuyusen``."""
        return partner_code_of(self.partner)


@cache
def _fare_products() -> dict[str, tuple[FareProduct, ...]]:
    products: dict[str, list[FareProduct]] = {}
    for line, row in enumerate(read_rows("fare_products.csv", _FARE_COLUMNS), start=2):
        if not row["fare_jpy"].isdigit() or int(row["fare_jpy"]) <= 0:
            raise ReferenceDataError(f"fare_products.csv, row {line}: fare_jpy is a positive whole number of yen")
        products.setdefault(row["program"], []).append(
            FareProduct(prefecture=row["prefecture"], route=row["route"], fare_jpy=int(row["fare_jpy"]))
        )
    return {program: tuple(items) for program, items in products.items()}


@cache
def _travel_programs() -> tuple[TravelProgram, ...]:
    result: list[TravelProgram] = []
    fares = _fare_products()
    for line, row in enumerate(read_rows("travel_programs.csv", _COLUMNS), start=2):
        where = f"travel_programs.csv, row {line}"
        partner_kind = _PARTNER_KINDS.get(row["partner_kind"])
        mechanism = _MECHANISMS.get(row["mechanism"])
        if partner_kind is None or mechanism is None:
            raise ReferenceDataError(f"{where}: unknown partner_kind or mechanism")
        names = [name.strip() for name in row["municipalities"].split(";") if name.strip()]
        codes = tuple(find_municipality_by_full_name(name).code for name in names)
        result.append(
            TravelProgram(
                program_id=row["program"],
                partner=row["partner"],
                partner_kind=partner_kind,
                mechanism=mechanism,
                municipality_codes=codes,
                seed_terms=row["seed_terms"],
                demo_parameters=MappingProxyType(parse_demo_parameters(row["demo_parameters"])),
                one_region_per_year=parse_flag(row["one_region_per_year"], where=where),
                fare_products=fares.get(row["program"], ()),
            )
        )
    return tuple(result)


def travel_programs() -> list[TravelProgram]:
    """Every travel program, in the order listed."""
    return list(_travel_programs())


def travel_program(program_id: str) -> TravelProgram:
    """The program with this id, e.g. ``"jal-dual-residence-miles"``; raises :class:`UnknownTravelProgram`."""
    for program in _travel_programs():
        if program.program_id == program_id:
            return program
    raise UnknownTravelProgram(program_id)
