"""Japanese local government codes (全国地方公共団体コード), from the bundled MIC table.

The code (6 digits: 2 prefecture + 3 municipality + 1 check digit, kept as text with its leading zeros)
is the only key: prefecture + name is not unique (北海道 has two 泊村).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from types import MappingProxyType
from typing import Annotated, Literal, get_args

from pydantic import PlainValidator, WithJsonSchema

from ._data import ReferenceDataError, parse_flag, read_rows

MunicipalityKind = Literal["prefecture", "city", "town", "village", "ward", "designated_ward"]
"""``ward`` is a Tokyo special ward (特別区), ``designated_ward`` a ward of a designated city (行政区)."""

MUNICIPALITY_CODE_PATTERN = "^[0-9]{6}$"

_CODE5 = re.compile(r"[0-9]{5}")
_CODE6 = re.compile(r"[0-9]{6}")
_WEIGHTS = (6, 5, 4, 3, 2)
_KINDS: Mapping[str, MunicipalityKind] = {kind: kind for kind in get_args(MunicipalityKind)}
_COLUMNS = (
    "code6",
    "code5",
    "prefecture",
    "name",
    "name_kana",
    "name_kana_halfwidth",
    "kind",
    "parent_code6",
    "designated_city",
    "northern_territories",
)


class UnknownMunicipality(KeyError):
    """No municipality has this code (or this prefecture + name)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


class AmbiguousMunicipality(LookupError):
    """Several municipalities share this prefecture + name; look them up by code instead."""

    def __init__(self, prefecture: str, name: str, candidates: tuple[Municipality, ...]) -> None:
        codes = ", ".join(candidate.code for candidate in candidates)
        super().__init__(f"{prefecture}{name} is ambiguous: codes {codes}; use the municipality code")
        self.prefecture = prefecture
        self.name = name
        self.candidates = candidates


def check_digit(code5: str) -> int:
    """The check digit of a 5-digit code: s = 6·d1 + 5·d2 + 4·d3 + 3·d4 + 2·d5; (11 − s mod 11) mod 10."""
    if not isinstance(code5, str) or _CODE5.fullmatch(code5) is None:
        raise ValueError(f"a municipality code without its check digit must be 5 digits, got {code5!r}")
    total = sum(weight * int(digit) for weight, digit in zip(_WEIGHTS, code5, strict=True))
    return (11 - total % 11) % 10


def is_valid_code(code6: str) -> bool:
    """Whether ``code6`` is 6 ASCII digits whose last one is the check digit (not whether it exists)."""
    if not isinstance(code6, str) or _CODE6.fullmatch(code6) is None:
        return False
    return int(code6[5]) == check_digit(code6[:5])


@dataclass(frozen=True, slots=True)
class Municipality:
    """One row of the MIC table: a prefecture, a municipality (市町村・特別区) or a designated-city ward."""

    code: str
    """6 digits with the check digit, e.g. ``"304018"``."""
    code5: str
    """The same code without its check digit (the e-Stat 標準地域コード), e.g. ``"30401"``."""
    prefecture: str
    name: str
    name_kana: str
    name_kana_halfwidth: str
    kind: MunicipalityKind
    parent_code: str | None
    """For a designated-city ward, the code of its city; otherwise None."""
    designated_city: bool
    northern_territories: bool
    """One of the 6 北方領土 villages (codes exist, nobody is registered there)."""

    @property
    def prefecture_code(self) -> str:
        """The 6-digit code of this row's prefecture (itself for a prefecture)."""
        code5 = self.code[:2] + "000"
        return code5 + str(check_digit(code5))

    @property
    def full_name(self) -> str:
        """Prefecture + name, e.g. ``"和歌山県白浜町"``; a prefecture's is its own name."""
        if self.kind == "prefecture":
            return self.name
        return self.prefecture + self.name

    @property
    def is_prefecture(self) -> bool:
        return self.kind == "prefecture"


def _municipality_from_row(row: dict[str, str], line: int) -> Municipality:
    where = f"municipalities.csv, row {line}"
    kind = _KINDS.get(row["kind"])
    if kind is None:
        raise ReferenceDataError(f"{where}: unknown kind {row['kind']!r}")
    code = row["code6"]
    if not is_valid_code(code) or row["code5"] != code[:5]:
        raise ReferenceDataError(f"{where}: bad code {code!r} / {row['code5']!r}")
    return Municipality(
        code=code,
        code5=row["code5"],
        prefecture=row["prefecture"],
        name=row["name"],
        name_kana=row["name_kana"],
        name_kana_halfwidth=row["name_kana_halfwidth"],
        kind=kind,
        parent_code=row["parent_code6"] or None,
        designated_city=parse_flag(row["designated_city"], where=where),
        northern_territories=parse_flag(row["northern_territories"], where=where),
    )


@cache
def municipalities() -> Mapping[str, Municipality]:
    """Every row (prefectures, municipalities, designated-city wards) by 6-digit code, in code order."""
    table: dict[str, Municipality] = {}
    for line, row in enumerate(read_rows("municipalities.csv", _COLUMNS), start=2):
        entry = _municipality_from_row(row, line)
        if entry.code in table:
            raise ReferenceDataError(f"municipalities.csv, row {line}: duplicate code {entry.code}")
        table[entry.code] = entry
    return MappingProxyType(table)


@cache
def _by_name() -> Mapping[tuple[str, str], tuple[Municipality, ...]]:
    index: dict[tuple[str, str], tuple[Municipality, ...]] = {}
    for entry in municipalities().values():
        key = (entry.prefecture, entry.name)
        index[key] = (*index.get(key, ()), entry)
    return MappingProxyType(index)


@cache
def prefectures() -> tuple[Municipality, ...]:
    """The 47 prefecture rows, in code order (北海道 010006 … 沖縄県 470007)."""
    return tuple(entry for entry in municipalities().values() if entry.kind == "prefecture")


@cache
def _prefectures_by_name() -> Mapping[str, Municipality]:
    return MappingProxyType({entry.name: entry for entry in prefectures()})


def municipality(code: str) -> Municipality:
    """The row with this 6-digit code; raises :class:`UnknownMunicipality`."""
    try:
        return municipalities()[code]
    except (KeyError, TypeError):
        raise UnknownMunicipality(f"unknown municipality code {code!r}") from None


def find_municipality(prefecture: str, name: str) -> Municipality:
    """The row named ``name`` in ``prefecture`` (exact MIC spelling, e.g. ``("和歌山県", "白浜町")``).

    A prefecture is found by its own name (``("和歌山県", "和歌山県")``). Raises
    :class:`UnknownMunicipality` if there is none and :class:`AmbiguousMunicipality` if there are several.
    """
    candidates = _by_name().get((prefecture, name), ())
    if not candidates:
        raise UnknownMunicipality(f"no municipality named {name!r} in {prefecture!r}")
    if len(candidates) > 1:
        raise AmbiguousMunicipality(prefecture, name, candidates)
    return candidates[0]


def find_municipality_by_full_name(full_name: str) -> Municipality:
    """The row for a prefecture-prefixed name such as ``"和歌山県白浜町"`` (or a bare ``"和歌山県"``)."""
    for prefecture_name in _prefectures_by_name():
        if full_name.startswith(prefecture_name):
            rest = full_name[len(prefecture_name) :]
            return find_municipality(prefecture_name, rest or prefecture_name)
    raise UnknownMunicipality(f"{full_name!r} does not start with a prefecture name")


def prefecture_of(code: str) -> Municipality:
    """The prefecture row of the municipality with this code (a prefecture's is itself)."""
    return municipality(municipality(code).prefecture_code)


@cache
def _accepted_codes() -> frozenset[str]:
    """Every code the validator accepts: known and with the right check digit."""
    return frozenset(code for code in municipalities() if is_valid_code(code))


def _validate_municipality_code(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"municipality code must be a string of 6 digits, got {type(value).__name__}")
    # Every event carries codes: the known good ones are one set lookup (the checks below cost a
    # consumer about 7 µs per code, most of reading a registration event).
    if value in _accepted_codes():
        return value
    if _CODE6.fullmatch(value) is None:
        raise ValueError(f"municipality code must be 6 digits (e.g. '304018'), got {value!r}")
    expected = check_digit(value[:5])
    if int(value[5]) != expected:
        raise ValueError(
            f"check digit of municipality code {value!r} does not match: "
            f"the last digit should be {expected} for {value[:5]}"
        )
    if value not in municipalities():
        raise ValueError(f"unknown municipality code {value!r}")
    return value


MunicipalityCode = Annotated[
    str,
    PlainValidator(_validate_municipality_code),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": MUNICIPALITY_CODE_PATTERN,
            "description": "全国地方公共団体コード: 6 digits including the check digit, e.g. 304018",
            "examples": ["304018"],
        }
    ),
]
"""A 6-digit local government code that exists in the bundled table (strings only, nothing stripped).

Accepts prefecture and designated-ward codes too: they are all 全国地方公共団体コード.
"""
