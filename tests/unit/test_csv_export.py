from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from datetime import date

from shared.kit.csv_export import cell, csv_lines


async def collect(iterator: AsyncIterator[str]) -> str:
    return "".join([chunk async for chunk in iterator])


async def test_bom_crlf_iso_dates_and_defused_formulas() -> None:
    text = await collect(csv_lines(["名前", "日付", "式", "可"], [("山田 花子", date(2026, 11, 26), "=1+1", True)]))
    assert text.startswith("\ufeff名前,日付,式,可\r\n")
    rows = list(csv.reader(io.StringIO(text.removeprefix("\ufeff"))))
    assert rows[1] == ["山田 花子", "2026-11-26", "'=1+1", "true"]


async def test_async_rows_are_streamed_in_chunks() -> None:
    async def rows() -> AsyncIterator[tuple[int]]:
        for i in range(1200):
            yield (i,)

    chunks = [chunk async for chunk in csv_lines(["n"], rows(), chunk=500)]
    assert len(chunks) >= 3
    assert "".join(chunks).count("\r\n") == 1201


def test_cells() -> None:
    assert cell(None) == "" and cell(False) == "false" and cell("-5") == "'-5" and cell(30000) == "30000"


def test_a_filename_outside_latin_1_cannot_break_the_header() -> None:
    from shared.kit.csv_export import content_disposition

    header = content_disposition("certificates-東京.csv")
    header.encode("latin-1")
    assert 'filename="certificates-__.csv"' in header and "filename*=UTF-8''certificates-%E6%9D%B1" in header


class _CountingPool:
    """A stand-in pool that counts the connections out at any moment."""

    def __init__(self) -> None:
        self.out = 0
        self.acquired = 0

    def acquire(self) -> _CountingPool:
        return self

    async def __aenter__(self) -> object:
        self.out += 1
        self.acquired += 1
        return object()

    async def __aexit__(self, *exc: object) -> None:
        self.out -= 1


async def test_keyset_pages_join_into_every_row_once_and_hold_no_connection_while_rows_go_out() -> None:
    from shared.kit.csv_export import keyset_rows

    # Ties on the first part of the order at every page boundary: only the unique key separates them.
    listing = sorted((minute // 3, f"id-{minute:04d}") for minute in range(1000))
    pool = _CountingPool()
    seen_after: list[tuple[int, str] | None] = []

    async def page(conn: object, after: tuple[int, str] | None, limit: int) -> list[tuple[int, str]]:
        assert pool.out == 1  # the page is read on the borrowed connection
        seen_after.append(after)
        return [row for row in listing if after is None or row > after][:limit]

    rows = []
    async for row in keyset_rows(pool, page, lambda row: row, page_rows=7):  # type: ignore[arg-type]
        assert pool.out == 0, "a row was handed on while a connection was out"
        rows.append(row)
    assert rows == listing
    assert pool.acquired == len(seen_after) == 1000 // 7 + 1 and seen_after[0] is None
    assert seen_after[1] == listing[6]


async def test_a_listing_that_fills_its_last_page_exactly_ends_with_one_empty_page() -> None:
    from shared.kit.csv_export import keyset_rows

    pool = _CountingPool()

    async def page(conn: object, after: int | None, limit: int) -> list[int]:
        start = 0 if after is None else after + 1
        return list(range(start, min(start + limit, 10)))

    rows = [row async for row in keyset_rows(pool, page, lambda row: row, page_rows=5)]  # type: ignore[arg-type]
    assert rows == list(range(10)) and pool.acquired == 3
