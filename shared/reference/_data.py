"""Reading the CSV files bundled in ``shared/reference/data`` (never anything outside the package)."""

from __future__ import annotations

import csv
import io
from datetime import date
from importlib import resources

_PACKAGE = __name__.rpartition(".")[0]


class ReferenceDataError(RuntimeError):
    """A bundled reference CSV is malformed (a packaging or data-update bug, not a user error)."""


def read_rows(filename: str, columns: tuple[str, ...]) -> list[dict[str, str]]:
    """Every row of ``data/<filename>`` as a dict of text values (codes keep their leading zeros)."""
    resource = resources.files(_PACKAGE) / "data" / filename
    # bytes, then text without newline translation: the csv module handles the CRLF rows itself
    text = resource.read_bytes().decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = tuple(reader.fieldnames or ())
    missing = [column for column in columns if column not in header]
    if missing:
        raise ReferenceDataError(f"{filename}: missing columns {missing} (header is {list(header)})")
    rows: list[dict[str, str]] = []
    for row in reader:
        if None in row or any(row[column] is None for column in columns):
            raise ReferenceDataError(f"{filename}, line {reader.line_num}: wrong number of fields")
        rows.append({column: row[column] for column in columns})
    return rows


def parse_flag(value: str, *, where: str) -> bool:
    if value == "1":
        return True
    if value == "0":
        return False
    raise ReferenceDataError(f"{where}: expected 0 or 1, got {value!r}")


def parse_date(value: str, *, where: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError as error:
        raise ReferenceDataError(f"{where}: expected an ISO date, got {value!r}") from error
