"""The verification hot path's Redis reads: one pipelined connection, MGET only.

redis-py's asyncio client spends about 100 µs of CPU per command (a pooled connection taken and
given back under a condition, a retry wrapper, a timeout context on the write and on the read, a
stream reader): more than the whole rest of a verification's Redis work, and a third of its CPU
(profiled). This is a protocol on one connection instead: a command is one ``write``, its reply
(Redis answers in order) resolves the oldest waiter as it is parsed, 15 µs a command measured.
Everything else (writes, scripts, the rebuild) stays on redis-py.

It connects as the service's redis-py client does (its pool's host, port, db, credentials and TLS
context), speaks RESP2 (hiredis, redis-py's own accelerator, packs and parses), and fails like it:
a refused or lost connection is a redis-py ``ConnectionError``, a reply later than ``timeout_s`` a
``TimeoutError`` (the connection is then dropped, as the replies behind it would be out of step),
an error reply a ``ResponseError``.
``for_client`` returns None for a connection it does not know how to make (a Unix socket, RESP3,
a credential provider): the caller then reads with redis-py.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import Connection, SSLConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

#: A bulk reply or a nil (MGET answers a list of them).
Value = bytes | int | None | list[Any] | ResponseError

# The connection settings this module makes itself; anything else (a credential provider, RESP3,
# retries on specific errors...) is redis-py's to honour.
_KNOWN = {
    "host", "port", "db", "username", "password", "socket_timeout", "socket_connect_timeout", "retry",
    "health_check_interval", "client_name", "ssl_keyfile", "ssl_certfile", "ssl_cert_reqs", "ssl_ca_certs",
    "ssl_ca_data", "ssl_check_hostname", "ssl_min_version", "ssl_ciphers", "ssl_include_verify_flags",
    "ssl_exclude_verify_flags", "ssl_ca_path", "ssl_password", "encoding", "encoding_errors",
    "decode_responses", "socket_keepalive", "socket_keepalive_options", "retry_on_timeout",
    "retry_on_error", "lib_name", "lib_version", "protocol",
    # redis-py's own bookkeeping (maintenance notifications are RESP3 pushes: none over RESP2).
    "himport_registry", "maint_notifications_config", "maint_notifications_pool_handler", "orig_host_address",
    "orig_socket_connect_timeout", "orig_socket_timeout",
}


def pack(*args: str | bytes) -> bytes:
    """A command in RESP (an array of bulk strings; a str goes as UTF-8)."""
    # (hiredis's stub types the argument as a one-element tuple: any length is meant)
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]
    return packed


class _Pipeline(asyncio.Protocol):
    """One connection: each command's reply resolves the oldest waiter."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        # An error reply comes back as a ResponseError value; bytes that are no RESP raise.
        self.reader = hiredis.Reader(protocolError=RedisConnectionError, replyError=ResponseError)
        self.waiters: deque[asyncio.Future[Value]] = deque()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        try:
            while self.waiters:
                value = reader.gets()
                if value is False:  # incomplete (RESP2 has no booleans)
                    break
                waiter = self.waiters.popleft()
                if waiter.done():  # timed out: the connection is being dropped anyway
                    continue
                if isinstance(value, ResponseError):
                    waiter.set_exception(value)
                else:
                    waiter.set_result(value)
        except RedisConnectionError as error:
            self.fail(RedisConnectionError(f"unreadable reply from Redis: {error}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail_waiters(RedisConnectionError(f"connection to Redis lost: {exc!r}"))

    def command(self, packed: bytes) -> asyncio.Future[Value]:
        if self.closed or self.transport is None:
            raise RedisConnectionError("connection to Redis closed")
        future: asyncio.Future[Value] = asyncio.get_running_loop().create_future()
        self.waiters.append(future)
        self.transport.write(packed)
        return future

    def fail(self, error: Exception) -> None:
        """Drop the connection (its replies would be out of step) and every waiter with ``error``."""
        self.closed = True
        self._fail_waiters(error)
        if self.transport is not None:
            self.transport.close()

    def _fail_waiters(self, error: Exception) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)


class PipelinedReads:
    """MGET over one pipelined connection, (re)connected on demand."""

    def __init__(
        self, host: str, port: int, *, db: int = 0, username: str | None = None, password: str | None = None,
        ssl_context: ssl.SSLContext | None = None, timeout_s: float = 0.5, connect_timeout_s: float = 0.25,
    ) -> None:
        self.host = host
        self.port = port
        self.db = db
        self.username = username
        self.password = password
        self.ssl_context = ssl_context
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._pipeline: _Pipeline | None = None
        self._connecting: asyncio.Future[_Pipeline] | None = None

    @classmethod
    def for_client(cls, client: Redis) -> PipelinedReads | None:
        """Reads made as ``client``'s pool connects; None when it connects in a way not made here."""
        if not isinstance(client, Redis):  # a stand-in (tests): it reads for itself
            return None
        pool = client.connection_pool
        kwargs = dict(pool.connection_kwargs)
        if pool.connection_class not in (Connection, SSLConnection) or set(kwargs) - _KNOWN:
            return None
        if kwargs.get("protocol") not in (None, 2, "2") or kwargs.get("client_name"):
            return None
        context = None
        if pool.connection_class is SSLConnection:
            context = SSLConnection(**kwargs).ssl_context.get()
        return cls(
            str(kwargs.get("host", "localhost")), int(kwargs.get("port", 6379)), db=int(kwargs.get("db") or 0),
            username=kwargs.get("username"), password=kwargs.get("password"), ssl_context=context,
            timeout_s=float(kwargs.get("socket_timeout") or 0.5),
            connect_timeout_s=float(kwargs.get("socket_connect_timeout") or 0.25),
        )

    async def mget(self, keys: list[str]) -> list[bytes | None]:
        pipeline = self._pipeline
        if pipeline is None or pipeline.closed:
            pipeline = await self._connected()
        values = await self._call(pipeline, pack("MGET", *keys))
        if not isinstance(values, list):
            raise RedisConnectionError(f"unexpected reply to MGET: {type(values).__name__}")
        return values

    async def _call(self, pipeline: _Pipeline, packed: bytes) -> Value:
        future = pipeline.command(packed)
        # One timer per command (a batch of requests): a late reply drops the connection.
        timer = asyncio.get_running_loop().call_later(self.timeout_s, self._late, pipeline, future)
        try:
            return await future
        finally:
            timer.cancel()

    @staticmethod
    def _late(pipeline: _Pipeline, future: asyncio.Future[Value]) -> None:
        if not future.done():
            pipeline.fail(RedisTimeoutError("Timeout reading from Redis"))

    async def _connected(self) -> _Pipeline:
        """The connection, made once however many batches wait for it."""
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _connect(self) -> _Pipeline:
        loop = asyncio.get_running_loop()
        try:
            _, pipeline = await asyncio.wait_for(
                loop.create_connection(
                    _Pipeline, self.host, self.port, ssl=self.ssl_context,
                    server_hostname=self.host if self.ssl_context is not None else None,
                ),
                self.connect_timeout_s,
            )
        except (OSError, TimeoutError) as error:
            raise RedisConnectionError(f"cannot connect to Redis at {self.host}:{self.port}: {error!r}") from error
        try:
            if self.password is not None:
                credentials = [self.password] if self.username is None else [self.username, self.password]
                await self._call(pipeline, pack("AUTH", *credentials))
            if self.db:
                await self._call(pipeline, pack("SELECT", str(self.db)))
        except BaseException:
            pipeline.fail(RedisConnectionError("Redis connection set-up failed"))
            raise
        old, self._pipeline = self._pipeline, pipeline
        if old is not None and old is not pipeline and not old.closed:
            old.fail(RedisConnectionError("replaced"))
        return pipeline

    def close(self) -> None:
        if self._pipeline is not None:
            self._pipeline.fail(RedisConnectionError("closed"))
            self._pipeline = None
