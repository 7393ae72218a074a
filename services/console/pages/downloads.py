"""Downloads passed through as they arrive, never held whole: the services' CSV files (their header
line turned into the user's language on the way; UTF-8 with a BOM, so Excel opens them as they
are), CSV files of lists a service has no CSV for (``shared.kit.csv_export``, fetched page by page),
PDFs and JSON archives."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import httpx
from fastapi.responses import StreamingResponse

from services.console import i18n
from services.console.clients import Params
from services.console.i18n import Language
from services.console.pages.base import Viewer
from shared.kit.csv_export import BOM, content_disposition, csv_response

#: Each page of a list fetched for a CSV file: the service's largest page.
CSV_PAGE = 200


async def _passed_on(response: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    finally:
        await response.aclose()


async def _translated_csv(response: httpx.Response, lang: Language) -> AsyncIterator[bytes]:
    """The service's CSV with its first line (column names) replaced by headings in ``lang``; the
    rest chunk by chunk as it comes."""
    try:
        head = b""
        chunks = response.aiter_bytes()
        async for chunk in chunks:
            head += chunk
            if b"\n" in head:
                break
        line, _, rest = head.partition(b"\n")
        columns = next(csv.reader([line.decode("utf-8-sig").rstrip("\r")]), [])
        out = io.StringIO()
        csv.writer(out, lineterminator="\r\n").writerow(i18n.csv_heading(c, lang) for c in columns)
        yield (BOM + out.getvalue()).encode()
        if rest:
            yield rest
        async for chunk in chunks:
            yield chunk
    finally:
        await response.aclose()


async def service_csv(viewer: Viewer, service: str, path: str, filename: str, params: Params | None = None
                      ) -> StreamingResponse:
    response = await viewer.services.open(service, path, await viewer.token(), params)
    return StreamingResponse(
        _translated_csv(response, viewer.lang), media_type="text/csv; charset=utf-8",
        headers={"content-disposition": content_disposition(filename), "cache-control": "no-store"},
    )


async def paged_csv(
    viewer: Viewer, filename: str, columns: Sequence[str],
    fetch: Callable[[str, int, int], Awaitable[dict[str, Any]]], row: Callable[[dict[str, Any]], Sequence[object]],
) -> StreamingResponse:
    """A list as CSV, one page of the service's answer at a time (``fetch(token, limit, offset)``). The
    first page is asked for before the download starts, so a refusal is a page, not a broken file."""
    first = await fetch(await viewer.token(), CSV_PAGE, 0)

    async def rows() -> AsyncIterator[Sequence[object]]:
        page, offset = first, 0
        while True:
            for item in page.get("items", []):
                yield row(item)
            offset += CSV_PAGE
            if offset >= int(page.get("total", 0)):
                return
            page = await fetch(await viewer.token(), CSV_PAGE, offset)

    return csv_response(filename, [i18n.csv_heading(c, viewer.lang) for c in columns], rows())


async def passed_on(viewer: Viewer, service: str, path: str, media_type: str, filename: str,
                    inline: bool = False) -> StreamingResponse:
    response = await viewer.services.open(service, path, await viewer.token())
    disposition = content_disposition(filename)
    return StreamingResponse(
        _passed_on(response), media_type=response.headers.get("content-type", media_type),
        headers={"content-disposition": disposition.replace("attachment", "inline") if inline else disposition,
                 "cache-control": "no-store"},
    )
