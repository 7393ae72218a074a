"""Identifiers whose text one service makes and another reads: one builder and one parser each.

- ``CertificateNumber``: ``NCH-<municipality code>-<year>-<sequence>``, e.g. ``NCH-304018-2026-000007``.
  Certification numbers certificates (its store composes the same text in SQL, checked against
  this builder); the partner gateway refuses anything else before a lookup; every other service
  carries it as an opaque key.
- ``ProgramId``: ``<reference program>@<municipality code>``, e.g. ``jal-dual-residence-miles@304018``,
  a travel program's budget in one municipality. Subsidy names its seeded programs so; a donor
  names either that or the bare reference program, which donation checks and subsidy resolves.

The parsers take ASCII digits only (``\\d`` and ``int()`` would admit other scripts' digits) and
accept exactly what the builders make, so ``parse(text).text == text``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar


class FormatError(ValueError):
    """A text that is not of an identifier's format (the shared base of the errors below)."""


class CertificateNumberError(FormatError):
    """Not ``NCH-dddddd-dddd-dddddd`` with a year from 0001 and a sequence from 000001."""


class ProgramIdError(FormatError):
    """Not ``<reference program>@<municipality code>``."""


_CODE = re.compile(r"[0-9]{6}")


@dataclass(frozen=True, slots=True)
class CertificateNumber:
    """A certificate's number: unique nationwide because the municipality code is."""

    PREFIX: ClassVar[str] = "NCH"
    #: The largest sequence a municipality's year can reach (six digits).
    MAX_SEQUENCE: ClassVar[int] = 999_999
    _PATTERN: ClassVar[re.Pattern[str]] = re.compile(r"NCH-([0-9]{6})-([0-9]{4})-([0-9]{6})")

    municipality_code: str
    year: int
    sequence: int

    def __post_init__(self) -> None:
        if not isinstance(self.municipality_code, str) or _CODE.fullmatch(self.municipality_code) is None:
            raise CertificateNumberError(
                f"municipality code {self.municipality_code!r} is not 6 ASCII digits"
            )
        if not 1 <= self.year <= 9999:
            raise CertificateNumberError(f"year {self.year} does not have 4 digits")
        if not 1 <= self.sequence <= self.MAX_SEQUENCE:
            raise CertificateNumberError(
                f"certificate sequence {self.sequence} out of range for {self.municipality_code}/{self.year}"
            )

    @property
    def text(self) -> str:
        return f"{self.PREFIX}-{self.municipality_code}-{self.year:04d}-{self.sequence:06d}"

    def __str__(self) -> str:
        return self.text

    @classmethod
    def format(cls, municipality_code: str, year: int, sequence: int) -> str:
        """The number's text; raises :class:`CertificateNumberError` for parts it cannot carry."""
        return cls(municipality_code, year, sequence).text

    @classmethod
    def parse(cls, text: str) -> CertificateNumber:
        """The parts of ``text``; raises :class:`CertificateNumberError` unless it is a number."""
        match = cls._PATTERN.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            raise CertificateNumberError(f"{text!r} is not of the form NCH-dddddd-dddd-dddddd")
        code, year, sequence = match.groups()
        return cls(code, int(year), int(sequence))


@dataclass(frozen=True, slots=True)
class ProgramId:
    """A travel program's budget in one municipality."""

    SEPARATOR: ClassVar[str] = "@"
    #: A reference program id (``shared/reference``'s travel programs): lower case, digits, ``.``, ``_``, ``-``.
    _REFERENCE: ClassVar[re.Pattern[str]] = re.compile(r"[a-z0-9][a-z0-9._-]*")

    reference: str
    municipality_code: str

    def __post_init__(self) -> None:
        if not isinstance(self.reference, str) or self._REFERENCE.fullmatch(self.reference) is None:
            raise ProgramIdError(
                f"reference program {self.reference!r} is not lower-case letters, digits, '.', '_' or '-'"
            )
        if not isinstance(self.municipality_code, str) or _CODE.fullmatch(self.municipality_code) is None:
            raise ProgramIdError(f"municipality code {self.municipality_code!r} is not 6 ASCII digits")

    @property
    def text(self) -> str:
        return f"{self.reference}{self.SEPARATOR}{self.municipality_code}"

    def __str__(self) -> str:
        return self.text

    @classmethod
    def format(cls, reference: str, municipality_code: str) -> str:
        """The id's text; raises :class:`ProgramIdError` for parts it cannot carry."""
        return cls(reference, municipality_code).text

    @classmethod
    def parse(cls, text: str) -> ProgramId:
        """The parts of ``text``; raises :class:`ProgramIdError` unless it is a program id."""
        if not isinstance(text, str) or text.count(cls.SEPARATOR) != 1:
            raise ProgramIdError(f"{text!r} is not of the form <reference program>@<municipality code>")
        reference, _, code = text.partition(cls.SEPARATOR)
        return cls(reference, code)

    @classmethod
    def named(cls, name: str, municipality_code: str) -> ProgramId:
        """What a donor names: a program id, or a bare reference program (its budget in ``municipality_code``).

        Raises :class:`ProgramIdError` for a name that is neither.
        """
        if isinstance(name, str) and cls.SEPARATOR in name:
            return cls.parse(name)
        return cls(name, municipality_code)
