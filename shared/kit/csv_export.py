"""CSV exports as municipal staff open them: in Excel, with Japanese text.

UTF-8 with a byte-order mark (without it Excel reads Japanese as mojibake), CRLF line ends,
streamed in chunks so a large municipality's export never sits in memory whole, and every
cell that a spreadsheet would run as a formula (``= + - @``, tab, CR) written as text.

Rows come from the database page by page (``keyset_rows``): each page is one statement on a
connection borrowed for that page and returned before any of its rows is sent, so a client that
reads slowly holds no pooled connection and no snapshot, however long its download takes.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Hashable, Iterable, Sequence
from datetime import date, datetime
from typing import TypeVar
from urllib.parse import quote

import asyncpg
from fastapi.responses import StreamingResponse

from shared.kit.db import Connection

BOM = "\ufeff"
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")

#: Rows read per page of a download: one short statement each (a few ms at 500 rows).
PAGE_ROWS = 500

Row = TypeVar("Row")
Key = TypeVar("Key", bound=Hashable)

#: One page of a keyset-paginated listing: up to ``limit`` rows strictly after ``after`` in the
#: listing's order (the first page for ``None``). The order must be on a unique key, so that a page
#: boundary can neither repeat nor skip a row.
PageQuery = Callable[[Connection, Key | None, int], Awaitable[Sequence[Row]]]


async def keyset_rows(
    pool: asyncpg.Pool, page: PageQuery[Key, Row], key: Callable[[Row], Key], *, page_rows: int | None = None
) -> AsyncIterator[Row]:
    """Every row of a listing, one page per borrowed connection.

    The connection goes back to the pool before the page's rows are handed on, so while the client
    reads, the download holds nothing of the database. Pages are separate statements, not one
    snapshot: a row that exists throughout comes exactly once (the key is unique and ordered); a
    row added or changed meanwhile comes as it is when its page is read, or (added behind the
    cursor) not at all, as on a list read page by page.
    """
    size = page_rows or PAGE_ROWS
    after: Key | None = None
    while True:
        async with pool.acquire() as conn:
            rows = await page(conn, after, size)
        for row in rows:
            yield row
        if len(rows) < size:
            return
        after = key(rows[-1])


def cell(value: object) -> str:
    """One value as a CSV cell: dates in ISO 8601, booleans as true/false, formulas defused."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = value.isoformat() if isinstance(value, date | datetime) else str(value)
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


async def csv_lines(
    header: Sequence[str], rows: AsyncIterable[Sequence[object]] | Iterable[Sequence[object]], *, chunk: int = 500
) -> AsyncIterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(header)
    yield BOM + _take(buffer)
    count = 0
    if isinstance(rows, AsyncIterable):
        async for row in rows:
            writer.writerow(cell(value) for value in row)
            count += 1
            if count % chunk == 0:
                yield _take(buffer)
    else:
        for row in rows:
            writer.writerow(cell(value) for value in row)
            count += 1
            if count % chunk == 0:
                yield _take(buffer)
    yield _take(buffer)


def csv_response(
    filename: str,
    header: Sequence[str],
    rows: AsyncIterable[Sequence[object]] | Iterable[Sequence[object]],
    *,
    headers: dict[str, str] | None = None,
) -> StreamingResponse:
    return StreamingResponse(
        csv_lines(header, rows),
        media_type="text/csv; charset=utf-8",
        headers={"content-disposition": content_disposition(filename), "cache-control": "no-store", **(headers or {})},
    )


def content_disposition(filename: str) -> str:
    """``attachment`` with an ASCII name and the exact one in RFC 5987 form (headers are Latin-1)."""
    ascii_name = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_.") else "_" for ch in filename)
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename, safe='')}"


def _take(buffer: io.StringIO) -> str:
    text = buffer.getvalue()
    buffer.seek(0)
    buffer.truncate(0)
    return text
