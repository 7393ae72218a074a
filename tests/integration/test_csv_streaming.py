"""CSV downloads read page by page (issue 18): a client that reads slowly holds no pooled
connection and no snapshot, and the pages join into exactly the rows of the listing.

The registration service runs behind a real uvicorn server (the in-process ASGI transport of the
other tests buffers a whole response, so a slow reader could not be told from a fast one), with a
pool of two connections, small socket buffers on both ends (so that the server really waits on the
client rather than emptying the file into the kernel's buffers), and pages of 50 rows.
"""

from __future__ import annotations

import asyncio
import csv
import io
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from bench.scenarios.console_pages import seed_registrations
from services.registration import main as registration_main
from services.registration.main import create_app
from shared.kit import csv_export
from shared.kit.service import ServiceRuntime
from shared.kit.settings import Settings
from tests.support import bearer

KAGOSHIMA = "462012"  # 鹿児島県鹿児島市: no other test registers there
ROWS = 10_000  # about 2 MB of CSV, far more than the buffers between server and client hold
BUFFER = 8192


@dataclass
class Server:
    app: FastAPI
    port: int

    @property
    def runtime(self) -> ServiceRuntime:
        runtime: ServiceRuntime = self.app.state.runtime
        return runtime


@pytest.fixture(scope="module")
async def server(settings: Settings) -> AsyncIterator[Server]:
    class SmallPool(ServiceRuntime):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, "pool_size": 2})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(registration_main, "ServiceRuntime", SmallPool)
        app = create_app(settings, maintenance_interval_s=3600)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted sockets inherit the listener's send buffer: the server cannot run far ahead.
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
    listener.bind(("127.0.0.1", 0))
    # log_config=None: keep the kit's logging (uvicorn's own config would take its loggers out of the pipeline)
    config = uvicorn.Config(app, log_level="warning", lifespan="on", log_config=None)
    uvicorn_server = uvicorn.Server(config)
    task = asyncio.create_task(uvicorn_server.serve(sockets=[listener]))
    deadline = time.monotonic() + 60
    while not uvicorn_server.started:
        assert not task.done(), "the server did not start"
        assert time.monotonic() < deadline, "the server did not start in 60 s"
        await asyncio.sleep(0.05)
    yield Server(app, listener.getsockname()[1])
    uvicorn_server.should_exit = True
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout=10)
    except TimeoutError:  # a failed test can leave a download stalled: do not wait on it
        uvicorn_server.force_exit = True
        await task


@pytest.fixture(scope="module")
async def seeded(server: Server) -> list[str]:
    """The municipality's registrations, in the list's order (three share each second: ties at page
    boundaries are separated by the id alone)."""
    async with server.runtime.pool.acquire() as conn:
        await seed_registrations(conn, KAGOSHIMA, "46", ROWS, tag="csv")
        return [row["id"] for row in await conn.fetch(
            "SELECT id FROM registrations WHERE municipality_code = $1 ORDER BY registered_at, id", KAGOSHIMA
        )]


class SlowDownload:
    """A raw HTTP/1.1 GET with a small receive buffer, read one chunk at a time."""

    def __init__(self, port: int, path: str, headers: dict[str, str]) -> None:
        self.port, self.path, self.headers = port, path, headers
        self.body = b""

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
        self.reader, self.writer = await asyncio.open_connection(sock=sock, limit=BUFFER)
        head = "".join(f"{name}: {value}\r\n" for name, value in self.headers.items())
        self.writer.write(f"GET {self.path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{head}\r\n".encode())
        await self.writer.drain()

    async def read_chunk(self) -> int:
        chunk = await self.reader.read(BUFFER)
        self.body += chunk
        return len(chunk)

    async def read_rest(self) -> None:
        while await self.read_chunk():
            pass
        self.writer.close()

    def rows(self) -> list[dict[str, str]]:
        head, _, body = self.body.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert b"transfer-encoding: chunked" in head.lower()
        text = _dechunk(body).decode("utf-8")
        assert text.startswith("\ufeff")
        return list(csv.DictReader(io.StringIO(text.removeprefix("\ufeff"))))


def _dechunk(body: bytes) -> bytes:
    out, rest = bytearray(), body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        rest = rest[size + 2:]
    return bytes(out)


async def _open_transactions(settings: Settings, older_than_s: float) -> int:
    """Backends of the registration database inside a transaction (a snapshot) for that long."""
    conn = await asyncpg.connect(settings.database_dsn("registration"))
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND xact_start < now() - make_interval(secs => $1)", older_than_s,
        ))
    finally:
        await conn.close()


async def test_slow_downloads_hold_no_connection_and_join_into_every_row_once(
    server: Server, seeded: list[str], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(csv_export, "PAGE_ROWS", 50)
    staff = bearer(settings, "staff", municipality=KAGOSHIMA)
    path = f"/v1/registrations/export.csv?municipality={KAGOSHIMA}"
    # Two slow readers at once: were each to hold a connection, they would take the whole pool of two.
    downloads = [SlowDownload(server.port, path, staff) for _ in range(2)]
    for download in downloads:
        await download.start()
        assert await download.read_chunk() > 0

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", headers=staff) as client:
        for _ in range(3):  # one chunk a second each, while other staff use the service
            await asyncio.sleep(1.0)
            for download in downloads:
                await download.read_chunk()
            async with asyncio.timeout(2):
                listed = await client.get("/v1/registrations", params={"municipality": KAGOSHIMA, "limit": 5})
            assert listed.status_code == 200 and listed.json()["total"] == ROWS
            assert await _open_transactions(settings, older_than_s=0.5) == 0
        # Still mid-file: the test watched a download that was waiting on its client.
        assert all(len(download.body) < 1_000_000 for download in downloads)

        # A registration added meanwhile is after every seeded one in the list's order.
        added = await client.post(
            "/v1/residents", headers=bearer(settings, "resident", subject="csv-late"),
            json={"name": "後藤 一", "name_kana": "ゴトウ ハジメ", "email": "late@example.jp",
                  "date_of_birth": "1990-01-01", "legal_address_code": "131016", "preferred_language": "ja"},
        )
        assert added.status_code == 201, added.text
        registered = await client.post(
            "/v1/residents/csv-late/registrations", headers=bearer(settings, "resident", subject="csv-late"),
            json={"municipality_code": KAGOSHIMA, "tier": "basic"},
        )
        assert registered.status_code in (200, 201), registered.text

    await asyncio.gather(*(download.read_rest() for download in downloads))
    for download in downloads:
        ids = [row["registration_id"] for row in download.rows()]
        assert len(ids) == len(set(ids)), "a row came twice at a page boundary"
        # Every seeded row exactly once, in the list's order; the late one at the end (read after it came).
        assert ids[:ROWS] == seeded
        assert ids[ROWS:] == [registered.json()["id"]]


async def test_the_export_matches_the_list_page_by_page(
    server: Server, seeded: list[str], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Filtered (premium requests awaiting review: every 100th), pages of 7 rows: the file is the list."""
    monkeypatch.setattr(csv_export, "PAGE_ROWS", 7)
    staff = bearer(settings, "staff", municipality=KAGOSHIMA)
    query = {"municipality": KAGOSHIMA, "awaiting_review": "true"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", headers=staff, timeout=30) as client:
        exported = await client.get("/v1/registrations/export.csv", params=query)
        listed, after = [], None
        while True:
            page = (await client.get("/v1/registrations", params={
                **query, "limit": 30, **({"after": after} if after else {}),
            })).json()
            listed += [item["id"] for item in page["items"]]
            if len(page["items"]) < 30:
                break
            after = page["items"][-1]["id"]
            assert page["total"] == ROWS // 100
    rows = list(csv.DictReader(io.StringIO(exported.content.decode("utf-8-sig"))))
    awaiting = [rid for rid in seeded if int(rid.rsplit("-", 1)[1]) % 100 == 0]
    assert [row["registration_id"] for row in rows] == listed == awaiting
    assert {(row["awaiting_review"], row["tier"]) for row in rows} == {("initial", "premium")}
