"""The verification hot path's savings keep its behaviour: the pipelined Redis reads (against a
stand-in Redis server speaking RESP), rendered answers reused only for the same entry and day,
the kit's request ids and its memo of clean paths."""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import date, timedelta
from types import SimpleNamespace
from typing import Any

import hiredis
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

import shared.kit.http as kit
from services.partner_gateway.api import RenderedAnswers, render_verification
from services.partner_gateway.cache import REDIS_STATE, VerificationCache, generation_key, open_redis
from services.partner_gateway.redis_reads import PipelinedReads, Value, _Pipeline, pack
from shared.kit.http import _CleanPaths, _my_number_target
from shared.kit.settings import Settings

# --- RESP ------------------------------------------------------------------------------------------


def a_pipeline(waiting: int, loop: asyncio.AbstractEventLoop) -> tuple[_Pipeline, list[asyncio.Future[Value]]]:
    """A connection's protocol with ``waiting`` commands sent (on a transport that goes nowhere)."""
    pipeline = _Pipeline()
    pipeline.connection_made(SimpleNamespace(write=lambda _: None, close=lambda: None))  # type: ignore[arg-type]
    waiters = [loop.create_future() for _ in range(waiting)]
    pipeline.waiters.extend(waiters)
    return pipeline, waiters


def settled(waiter: asyncio.Future[Value]) -> object:
    if not waiter.done():
        return ...
    return waiter.exception() or waiter.result()


async def test_replies_resolve_their_waiters_in_order_only_once_whole() -> None:
    loop = asyncio.get_running_loop()
    array = b"*3\r\n$2\r\nab\r\n$-1\r\n$0\r\n\r\n"
    replies = array + b"$5\r\na\r\nbc\r\n" + b"$-1\r\n*0\r\n+OK\r\n:42\r\n"
    for cut in range(1, len(replies)):  # split across two reads anywhere, a reply resolves only when whole
        pipeline, waiters = a_pipeline(6, loop)
        pipeline.data_received(replies[:cut])
        assert waiters[0].done() is (cut >= len(array)), cut
        pipeline.data_received(replies[cut:])
        # a value may hold CRLF; nil is None; an empty array an empty list
        assert [settled(w) for w in waiters] == [[b"ab", None, b""], b"a\r\nbc", None, [], b"OK", 42], cut
        assert not pipeline.closed
    pipeline, waiters = a_pipeline(2, loop)
    for byte in range(len(replies)):  # a byte at a time: replies beyond the waiters wait for theirs
        pipeline.data_received(replies[byte:byte + 1])
    assert [settled(w) for w in waiters] == [[b"ab", None, b""], b"a\r\nbc"]
    late = loop.create_future()
    pipeline.waiters.append(late)
    pipeline.data_received(b"")
    assert settled(late) is None


async def test_an_error_reply_fails_its_waiter_only_and_garbage_drops_the_connection() -> None:
    loop = asyncio.get_running_loop()
    pipeline, waiters = a_pipeline(3, loop)
    pipeline.data_received(b"-NOAUTH Authentication required.\r\n*2\r\n-ERR inside\r\n$1\r\nv\r\n")
    error = settled(waiters[0])
    assert isinstance(error, ResponseError) and str(error) == "NOAUTH Authentication required."
    inside = settled(waiters[1])  # an error inside an array is a value of it, as redis-py gives it
    assert isinstance(inside, list) and isinstance(inside[0], ResponseError) and inside[1] == b"v"
    assert settled(waiters[2]) is ... and not pipeline.closed
    pipeline.data_received(b"?what\r\n")
    assert isinstance(settled(waiters[2]), RedisConnectionError) and pipeline.closed
    with pytest.raises(RedisConnectionError):
        pipeline.command(pack("MGET", "k"))


def test_commands_are_packed_as_arrays_of_bulk_strings() -> None:
    assert pack("MGET", "a", b"bc") == b"*3\r\n$4\r\nMGET\r\n$1\r\na\r\n$2\r\nbc\r\n"
    assert pack("MGET", "é") == b"*2\r\n$4\r\nMGET\r\n$2\r\n\xc3\xa9\r\n"  # a key goes as UTF-8


# --- A stand-in Redis server -------------------------------------------------------------------------


class FakeRedis:
    """Enough of Redis for MGET, AUTH and SELECT; every command is recorded. ``stall``: commands
    are read but never answered; ``answer_in_one_write``: replies to commands read together go out
    as one write (so one ``data_received`` may hold several)."""

    def __init__(self, values: dict[bytes, bytes], password: bytes | None = None) -> None:
        self.values = values
        self.password = password
        self.commands: list[list[bytes]] = []
        self.stall = False
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        commands = hiredis.Reader()
        authed = self.password is None
        while data := await reader.read(65536):
            commands.feed(data)
            replies = []
            while (command := commands.gets()) is not False:
                assert isinstance(command, list)
                self.commands.append(command)
                name = command[0].upper()
                if name == b"AUTH":
                    authed = command[-1] == self.password
                    replies.append(b"+OK\r\n" if authed else b"-WRONGPASS invalid password\r\n")
                elif not authed:
                    replies.append(b"-NOAUTH Authentication required.\r\n")
                elif name == b"SELECT":
                    replies.append(b"+OK\r\n")
                elif name == b"MGET":
                    parts = [b"*%d\r\n" % (len(command) - 1)]
                    for key in command[1:]:
                        value = self.values.get(key)
                        parts.append(b"$-1\r\n" if value is None else b"$%d\r\n%b\r\n" % (len(value), value))
                    replies.append(b"".join(parts))
                else:
                    replies.append(b"-ERR unknown command\r\n")
            if replies and not self.stall:
                writer.write(b"".join(replies))

    def drop_connections(self) -> None:
        for writer in self.writers:
            writer.close()


@asynccontextmanager
async def fake_redis(values: dict[bytes, bytes], password: bytes | None = None) -> AsyncIterator[tuple[FakeRedis, int]]:
    fake = FakeRedis(values, password)
    server = await asyncio.start_server(fake.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield fake, port
    finally:
        fake.drop_connections()
        server.close()


async def test_reads_are_pipelined_on_one_connection_in_order() -> None:
    values = {f"k{i}".encode(): f"v{i}".encode() for i in range(50)}
    async with fake_redis(values) as (fake, port):
        reads = PipelinedReads("127.0.0.1", port)
        asked = [[f"k{i}", f"k{i + 1}", "missing"] for i in range(0, 50, 2)]
        found = await asyncio.gather(*(reads.mget(keys) for keys in asked))
        assert found == [[f"v{i}".encode(), f"v{i + 1}".encode(), None] for i in range(0, 50, 2)]
        assert fake.connections == 1  # however many asked at once, one connection made
        assert [c[0] for c in fake.commands] == [b"MGET"] * len(asked)
        reads.close()


async def test_it_connects_as_the_services_client_does_credentials_and_database() -> None:
    async with fake_redis({b"k": b"v"}, password=b"s3cret") as (fake, port):
        client = open_redis(Settings.model_validate({"redis_url": f"redis://user:s3cret@127.0.0.1:{port}/3"}))
        assert client is not None
        reads = PipelinedReads.for_client(client)
        assert reads is not None
        assert await reads.mget(["k"]) == [b"v"]
        assert fake.commands[:2] == [[b"AUTH", b"user", b"s3cret"], [b"SELECT", b"3"]]
        reads.close()
        await client.aclose()

    async with fake_redis({b"k": b"v"}, password=b"other") as (fake, port):
        reads = PipelinedReads("127.0.0.1", port, password="s3cret")
        with pytest.raises(ResponseError):
            await reads.mget(["k"])


def test_connections_it_does_not_make_are_left_to_redis_py() -> None:
    assert PipelinedReads.for_client(Redis.from_url("unix:///tmp/redis.sock")) is None
    assert PipelinedReads.for_client(Redis.from_url("redis://127.0.0.1:6379/0", protocol=3)) is None
    tls = PipelinedReads.for_client(Redis.from_url("rediss://u:p@redis.example:6380/0"))
    assert tls is not None and tls.ssl_context is not None and (tls.host, tls.port, tls.username) == (
        "redis.example", 6380, "u"
    )


async def test_a_late_reply_drops_the_connection_and_the_next_read_reconnects() -> None:
    async with fake_redis({b"k": b"v"}) as (fake, port):
        reads = PipelinedReads("127.0.0.1", port, timeout_s=0.05)
        fake.stall = True
        first, second = await asyncio.gather(reads.mget(["k"]), reads.mget(["k"]), return_exceptions=True)
        assert isinstance(first, RedisTimeoutError) and isinstance(second, RedisTimeoutError)
        fake.stall = False
        assert await reads.mget(["k"]) == [b"v"]
        assert fake.connections == 2
        reads.close()


async def test_a_lost_or_refused_connection_is_a_redis_connection_error() -> None:
    async with fake_redis({b"k": b"v"}) as (fake, port):
        reads = PipelinedReads("127.0.0.1", port)
        assert await reads.mget(["k"]) == [b"v"]
        fake.stall = True
        waiting = asyncio.ensure_future(reads.mget(["k"]))
        await asyncio.sleep(0.05)
        fake.drop_connections()
        with pytest.raises(RedisConnectionError):
            await waiting
    with pytest.raises(RedisConnectionError):
        await PipelinedReads("127.0.0.1", port, connect_timeout_s=0.2).mget(["k"])


async def test_the_verification_cache_reads_through_the_pipeline_with_the_generation() -> None:
    settings = Settings.model_validate({"topic_prefix": "u.", "env": "development"})
    values = {
        f"u.verify:jal:{n}".encode(): json.dumps({"v": 1, "entitled": True, "certificate_number": n}).encode()
        for n in ("N1", "N2")
    } | {generation_key(settings).encode(): b"g1"}
    async with fake_redis(values) as (fake, port):
        client = open_redis(Settings.model_validate({"redis_url": f"redis://127.0.0.1:{port}/0"}))
        assert client is not None
        runtime: Any = SimpleNamespace(settings=settings, state={REDIS_STATE: client}, pool=None)
        cache = VerificationCache(runtime)
        (first, generation), (again, _), (other, _) = await asyncio.gather(
            cache.lookup_with_generation("jal", "N1"), cache.lookup_with_generation("jal", "N1"),
            cache.lookup_with_generation("jal", "N2"),
        )
        assert generation == b"g1" and first is not None and first["certificate_number"] == "N1"
        assert other is not None and other["certificate_number"] == "N2"
        assert again is first  # one parsed object per raw value (the rendered answers rely on it)
        # One MGET for the three reads, on the hot path's own connection (redis-py sent nothing).
        assert fake.commands == [[b"MGET", generation_key(settings).encode(), b"u.verify:jal:N1", b"u.verify:jal:N2"]]
        assert fake.connections == 1
        cache.close()
        await client.aclose()


# --- Rendered answers -----------------------------------------------------------------------------


def an_entry(status: str = "valid") -> dict[str, Any]:
    return {
        "v": 1, "entitled": True, "certificate_number": "NCH-304018-2026-000001", "status": status,
        "valid_from": "2026-04-01", "valid_until": "2027-03-31", "municipality_code": "304018",
        "programs": ["jal-dual-residence-miles"],
    }


def test_an_answer_is_reused_only_for_the_same_entry_object_and_day() -> None:
    answers = RenderedAnswers()
    today = date(2026, 12, 6)
    entry = an_entry()
    assert not answers.known("jal", "N1")
    body = answers.body("jal", "N1", entry, today)
    assert json.loads(body) == {
        "certificate_number": "NCH-304018-2026-000001", "valid": True, "status": "valid",
        "valid_from": "2026-04-01", "valid_until": "2027-03-31", "municipality_code": "304018",
        "programs": ["jal-dual-residence-miles"], "checked_on": "2026-12-06",
    }
    assert answers.known("jal", "N1") and answers.body("jal", "N1", entry, today) is body
    revoked = answers.body("jal", "N1", an_entry("revoked"), today)  # a new version: a new object
    assert json.loads(revoked)["status"] == "revoked" and json.loads(revoked)["valid"] is False
    later = answers.body("jal", "N1", an_entry(), today + timedelta(days=1))
    assert json.loads(later)["checked_on"] == "2026-12-07"
    expired = answers.body("jal", "N1", an_entry(), date(2027, 4, 1))
    assert json.loads(expired)["valid"] is False


def test_parsed_entries_leave_the_collectors_view_and_answer_as_before() -> None:
    """The cached entries (up to ``MAX_PARSED``) are not walked by every full collection."""
    runtime: Any = SimpleNamespace(settings=Settings.model_validate({"topic_prefix": "u."}), state={}, pool=None)
    cache = VerificationCache(runtime)
    raw = json.dumps(an_entry()).encode()
    entry = cache._entry(raw)
    assert entry == {**an_entry(), "programs": ("jal-dual-residence-miles",)} and cache._entry(raw) is entry
    gc.collect()  # CPython untracks atom-only tuples, then dicts of untracked values, in a full collection
    assert not gc.is_tracked(entry["programs"]) and not gc.is_tracked(entry)
    assert render_verification(entry, date(2026, 12, 6)) == render_verification(an_entry(), date(2026, 12, 6))


# --- The kit: clean paths ----------------------------------------------------------------


def test_clean_paths_are_remembered_and_a_my_number_is_still_refused_and_never_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    real: Callable[[str], int | None] = kit._my_number_segment

    def counted(path: str) -> int | None:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(kit, "_my_number_segment", counted)
    segment_of = _CleanPaths(size=3)
    clean_path, holding_path = "/v1/certificates/NCH-304018-2026-000001", "/v1/residents/123456789018"
    clean = {"type": "http", "path": clean_path, "query_string": b""}
    holding = {"type": "http", "path": holding_path, "query_string": b""}
    assert _my_number_target(clean, segment_of) is None
    assert _my_number_target(clean, segment_of) is None
    assert calls == [clean_path]  # checked once
    for _ in range(2):
        assert _my_number_target(holding, segment_of) == ["path", 3]
    assert calls.count(holding_path) == 2  # never remembered
    for i in range(5):  # bounded
        _my_number_target({"type": "http", "path": f"/p/{i}", "query_string": b""}, segment_of)
    assert len(segment_of._clean) <= 3
