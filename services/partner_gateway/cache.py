"""The verification cache: one Redis entry per (partner, certificate), PostgreSQL behind it.

Key ``{topic_prefix}verify:{partner}:{number}``, value JSON: ``{"v": version, "entitled": true,
"certificate_number", "status", "valid_from", "valid_until", "municipality_code", "programs"}``,
or ``{"v": version, "entitled": false}`` for a certificate the partner may not (or no longer)
see. ``valid`` is not cached: it depends on the day and is computed per request.

- Reads: the reads the requests of one event-loop iteration make go out together, as one MGET
  (under load several verifications arrive per iteration: one command, one write and one read
  for all of them); the MGET also reads the API keys' generation (``auth.py``: a revocation
  changes it, so every process learns of it in the round trip it makes anyway). The MGETs go over
  a pipelined connection of their own (``redis_reads``: redis-py's client costs more CPU per
  command than the rest of a verification), each raw value is parsed once. A miss (cold
  cache) or an unreachable Redis falls back to the entitlements table and repopulates the entry;
  after a Redis fault, Redis is skipped for ``down_for_s``.
- Writes: never inside a consumer transaction. Entitlement changes are queued in the same
  transaction (``verify_cache_queue``) and this module's sync task writes them after commit,
  woken by NOTIFY. At start (and after Redis was unreachable) it rebuilds every entry.
- Every write goes through one Lua script that keeps the entry with the higher ``version``
  (a sequence bumped on every entitlement change), so a slow repopulation or a rebuild can never
  overwrite a newer state, and a withdrawal is never undone by a stale read.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import secrets
from collections.abc import Callable, Sequence
from typing import Any, cast

import asyncpg
import structlog
from prometheus_client import Counter
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from services.partner_gateway import store
from services.partner_gateway.redis_reads import PipelinedReads
from shared.kit.db import Connection
from shared.kit.service import ServiceRuntime
from shared.kit.settings import Settings

log = structlog.get_logger(__name__)

#: Keeps whichever entry has the higher version; ARGV: value, version, ttl seconds (0: none).
SET_IF_NEWER = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, stored = pcall(cjson.decode, current)
  if ok and type(stored) == 'table' and tonumber(stored['v']) and tonumber(stored['v']) >= tonumber(ARGV[2]) then
    return 0
  end
end
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
return 1
"""

#: A certificate the partner may no longer see (kept a day, then PostgreSQL answers again).
WITHDRAWN_TTL_S = 86_400
#: A number the gateway does not know for this partner (a newer entry replaces it at once).
UNKNOWN_TTL_S = 60

REDIS_STATE = "redis"


def open_redis(settings: Settings) -> Redis | None:
    """The Redis client of the service (None when no Redis is configured: PostgreSQL serves)."""
    if settings.redis_url is None:
        return None
    # A blocking pool: at a burst, a request waits a moment for a free connection instead of
    # failing with "too many connections" (which would send it to PostgreSQL as if Redis were down).
    pool = BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=64, timeout=0.5, socket_connect_timeout=0.25, socket_timeout=0.5,
        retry=Retry(NoBackoff(), 1), health_check_interval=30,
    )
    return Redis.from_pool(pool)  # the client owns the pool: closing it closes the connections


def cache_key(settings: Settings, partner: str, number: str) -> str:
    return f"{settings.topic_prefix}verify:{partner}:{number}"


def generation_key(settings: Settings) -> str:
    """The API keys' generation: a random token, replaced at every revocation (absent: b"")."""
    return f"{settings.topic_prefix}api-keys:generation"


#: A value read with the generation: (the key's value or None, the generation; b"" when never set).
Read = tuple[bytes | None, bytes]


class _Batch:
    """The reads of one event-loop iteration, made together."""

    __slots__ = ("client", "waiters")

    def __init__(self, client: Redis) -> None:
        self.client = client
        self.waiters: list[tuple[str | None, asyncio.Future[Read]]] = []


#: Parsed entries kept by their raw value (a verification then parses nothing): at most this many.
MAX_PARSED = 10_000


def parsed(raw: bytes) -> dict[str, Any]:
    """A Redis entry's value, parsed into a form the garbage collector stops tracking: the entry's
    only container, ``programs``, as a tuple of str (CPython untracks such a tuple at its first
    collection, and a dict holding only untracked values at the next full one). Kept as lists, the
    cached entries were walked by every full collection: with the cache full (``MAX_PARSED``), 4.8 ms
    of walking instead of 1.1, a pause every request in flight waits out."""
    entry: dict[str, Any] = json.loads(raw)
    programs = entry.get("programs")
    if isinstance(programs, list):
        entry["programs"] = tuple(programs)
    return entry


def entry_of(row: asyncpg.Record | None) -> dict[str, Any]:
    """The cache entry of an entitlements row (None: unknown to this partner, version 0)."""
    if row is None:
        return {"v": 0, "entitled": False}
    if not row["active"]:
        return {"v": row["version"], "entitled": False}
    return {
        "v": row["version"], "entitled": True,
        "certificate_number": row["certificate_number"], "status": row["status"],
        "valid_from": row["valid_from"].isoformat(), "valid_until": row["valid_until"].isoformat(),
        "municipality_code": row["municipality_code"], "programs": list(row["programs"]),
    }


def _ttl(entry: dict[str, Any]) -> int:
    if entry["entitled"]:
        return 0
    return UNKNOWN_TTL_S if entry["v"] == 0 else WITHDRAWN_TTL_S


class VerificationCache:
    def __init__(
        self, runtime: ServiceRuntime, *, down_for_s: float = 1.0, batch_size: int = 500,
        lookups: Counter | None = None,
    ) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.down_for_s = down_for_s
        self.batch_size = batch_size
        self.lookups = lookups
        self._down_until = 0.0
        self._children: dict[str, Any] = {}
        self._wake = asyncio.Event()
        self._batch: _Batch | None = None
        self._fetches: set[asyncio.Task[None]] = set()
        # The hot path's reads (``redis_reads``), made for the client they were made from.
        self._reads: tuple[Redis, PipelinedReads | None] | None = None
        # Raw value → its parsed entry, the same object each time (``api.py`` keys its answers on it);
        # callers only read it (it is shared).
        self._entry: Callable[[bytes], dict[str, Any]] = functools.lru_cache(maxsize=MAX_PARSED)(parsed)
        self.generation_key = generation_key(self.settings)
        self.rebuilt = 0  # entries written by the last rebuild
        self.synced = 0  # entries written by the queue since start

    @property
    def redis(self) -> Redis | None:
        client: Redis | None = self.runtime.state.get(REDIS_STATE)
        return client

    def key(self, partner: str, number: str) -> str:
        return cache_key(self.settings, partner, number)

    # --- reads ---------------------------------------------------------------------------------

    async def lookup(self, partner: str, number: str) -> dict[str, Any] | None:
        """The entry this partner may see, or None (unknown, or not this partner's)."""
        return (await self.lookup_with_generation(partner, number))[0]

    async def lookup_with_generation(self, partner: str, number: str) -> tuple[dict[str, Any] | None, bytes | None]:
        """``lookup``, and the API keys' generation read in the same round trip (None: Redis could
        not be read, the answer came from PostgreSQL)."""
        client = self._usable()
        key = self.key(partner, number)
        if client is not None:
            try:
                raw, generation = await self._read(client, key)
            except (RedisError, OSError) as error:
                self._trip(error)
                client = None
            else:
                if raw is not None:
                    self._count("redis")
                    entry = self._entry(raw)
                    return (entry if entry.get("entitled") else None), generation
        self._count("database")
        entry = entry_of(await store.verification_row(self.runtime.pool, partner, number))
        if client is not None:
            try:
                await self._write(client, [(key, entry)])
            except (RedisError, OSError) as error:
                self._trip(error)
            else:
                # Read before the database row: revocations since are not missed.
                return (entry if entry["entitled"] else None), generation
        return (entry if entry["entitled"] else None), None

    async def generation(self) -> bytes | None:
        """The API keys' generation (b"": never set), or None when Redis cannot be read."""
        client = self._usable()
        if client is None:
            return None
        try:
            return (await self._read(client, None))[1]
        except (RedisError, OSError) as error:
            self._trip(error)
            return None

    async def new_generation(self) -> bool:
        """Replace the generation (after a revocation's commit): every process checks its cached
        API keys again at their next use. False when Redis could not be written."""
        client = self.redis
        if client is None:
            return False
        try:
            await client.set(self.generation_key, secrets.token_hex(16))
        except (RedisError, OSError) as error:
            log.warning("the API keys' generation could not be replaced", error=repr(error))
            return False
        return True

    def _read(self, client: Redis, key: str | None) -> asyncio.Future[Read]:
        """``key``'s value (None: only the generation), read with every other read of this loop
        iteration: the batch goes once the requests already running have all asked."""
        loop = asyncio.get_running_loop()
        batch = self._batch
        if batch is None or batch.client is not client:
            batch = self._batch = _Batch(client)
            loop.call_soon(self._send, batch)
        future: asyncio.Future[Read] = loop.create_future()
        batch.waiters.append((key, future))
        return future

    def _send(self, batch: _Batch) -> None:
        if self._batch is batch:
            self._batch = None
        task = asyncio.ensure_future(self._fetch(batch))
        self._fetches.add(task)  # a reference until done (the loop keeps only weak ones)
        task.add_done_callback(self._fetches.discard)

    async def _fetch(self, batch: _Batch) -> None:
        keys = list(dict.fromkeys(key for key, _ in batch.waiters if key is not None))
        try:
            # bytes: the client does not decode responses (``open_redis``).
            reads = self._reads_for(batch.client)
            names = [self.generation_key, *keys]
            values = cast(
                list[bytes | None], await (batch.client.mget(names) if reads is None else reads.mget(names))
            )
        except BaseException as error:
            for _, future in batch.waiters:
                if not future.done():  # a waiter cancelled meanwhile has gone
                    if isinstance(error, asyncio.CancelledError):
                        future.cancel()
                    else:
                        future.set_exception(error)
            if not isinstance(error, Exception):
                raise
            return
        generation = values[0] or b""
        found = dict(zip(keys, values[1:], strict=True))
        for key, future in batch.waiters:
            if not future.done():
                future.set_result((None if key is None else found[key], generation))

    def _reads_for(self, client: Redis) -> PipelinedReads | None:
        if self._reads is None or self._reads[0] is not client:
            if self._reads is not None and self._reads[1] is not None:
                self._reads[1].close()
            self._reads = (client, PipelinedReads.for_client(client))
        return self._reads[1]

    def close(self) -> None:
        """Close the hot path's own connection (the redis-py client is closed by its owner)."""
        if self._reads is not None and self._reads[1] is not None:
            self._reads[1].close()
        self._reads = None

    def _usable(self) -> Redis | None:
        client = self.redis
        if client is None or asyncio.get_running_loop().time() < self._down_until:
            return None
        return client

    def _trip(self, error: BaseException) -> None:
        self._down_until = asyncio.get_running_loop().time() + self.down_for_s
        log.warning("redis unavailable, verification served from PostgreSQL", error=repr(error),
                    retry_in_s=self.down_for_s)

    def _count(self, source: str) -> None:
        if self.lookups is not None:
            child = self._children.get(source)
            if child is None:
                child = self._children[source] = self.lookups.labels(source)
            child.inc()

    # --- writes --------------------------------------------------------------------------------

    async def _write(self, client: Redis, entries: Sequence[tuple[str, dict[str, Any]]]) -> None:
        script = client.register_script(SET_IF_NEWER)
        if len(entries) == 1:
            key, entry = entries[0]
            await script(keys=[key], args=[json.dumps(entry), entry["v"], _ttl(entry)])
            return
        async with client.pipeline(transaction=False) as pipe:
            for key, entry in entries:
                await script(keys=[key], args=[json.dumps(entry), entry["v"], _ttl(entry)], client=pipe)
            await pipe.execute()

    async def write_rows(self, client: Redis, rows: Sequence[asyncpg.Record]) -> None:
        await self._write(client, [(self.key(r["partner"], r["certificate_number"]), entry_of(r)) for r in rows])

    async def rebuild(self, client: Redis) -> int:
        """Write every entitlement to Redis (newer entries already there are kept)."""
        written = 0
        after = ("", "")
        while True:
            rows = await store.verification_rows_after(self.runtime.pool, after, 1000)
            if rows:
                await self.write_rows(client, rows)
                written += len(rows)
                after = (rows[-1]["partner"], rows[-1]["certificate_number"])
            if len(rows) < 1000:
                break
        self.rebuilt = written
        log.info("verification cache rebuilt", entries=written)
        return written

    async def drain(self, conn: Connection, client: Redis) -> int:
        """Write the queued entitlement changes; the queue rows go only once Redis has them."""
        async with conn.transaction():
            ids, rows = await store.take_cache_queue(conn, self.batch_size)
            if not ids:
                return 0
            await self.write_rows(client, rows)
            await store.delete_cache_queue(conn, ids)
        self.synced += len(rows)
        return len(ids)

    # --- the sync task -------------------------------------------------------------------------

    async def run(self) -> None:
        """Rebuild, then follow the queue until cancelled; retry with backoff on any fault."""
        if self.redis is None:
            log.warning("no Redis configured: verification is served from PostgreSQL only")
            while True:  # nothing will read the queue: keep it from growing
                with contextlib.suppress(Exception):
                    await store.clear_cache_queue(self.runtime.pool)
                await asyncio.sleep(10.0)
        needs_rebuild = True
        backoff = 0.05
        while True:
            client = self.redis
            try:
                conn: Connection = await asyncpg.connect(self.runtime.dsn)
                try:
                    await conn.add_listener(store.CACHE_CHANNEL, self._on_notify)
                    if needs_rebuild and client is not None:
                        await self.rebuild(client)
                        needs_rebuild = False
                    while client is not None:
                        self._wake.clear()
                        if await self.drain(conn, client) < self.batch_size:
                            with contextlib.suppress(TimeoutError):
                                await asyncio.wait_for(self._wake.wait(), timeout=1.0)
                        backoff = 0.05
                        if client is not self.redis:  # swapped (tests, reconfiguration): rebuild
                            client = self.redis
                            needs_rebuild = True
                            break
                finally:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), timeout=2)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if isinstance(error, (RedisError, OSError)):
                    needs_rebuild = True  # Redis may have restarted empty
                log.warning("verification cache sync interrupted, retrying", error=repr(error), backoff_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            if client is None:
                await asyncio.sleep(1.0)

    def _on_notify(self, *_: object) -> None:
        self._wake.set()


async def sync_verification_cache(runtime: ServiceRuntime) -> None:
    """Background task of the runtime: keep Redis in step with the entitlements table."""
    cache: VerificationCache = runtime.state["verification"]
    await cache.run()
