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
