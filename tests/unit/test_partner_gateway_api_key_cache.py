"""The API-key cache against the keys' generation, and the verification reads made as one MGET
(without servers: a recording stand-in for the database pool and for Redis)."""

from __future__ import annotations

import asyncio
import json
import uuid
from types import SimpleNamespace
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

from services.partner_gateway.auth import ApiKeyCache
from services.partner_gateway.cache import REDIS_STATE, VerificationCache, generation_key
from services.partner_gateway.domain import api_key_hash
from shared.kit.settings import Settings

SECRET = "nchk_test_secret"
KEY_ID = uuid.uuid4()


class Keys:
    """The partner_api_keys table: ``active_api_key``'s query, counted."""

    def __init__(self) -> None:
        self.revoked = False
        self.queries = 0

    async def fetchrow(self, _sql: str, key_hash: str) -> dict[str, Any] | None:
        self.queries += 1
        if key_hash != api_key_hash(SECRET) or self.revoked:
            return None
        return {"id": KEY_ID, "partner": "jal"}


class Generations:
    def __init__(self) -> None:
        self.value: bytes | None = b""
        self.writable = True
        self.writes = 0
        self.reads = 0

    async def generation(self) -> bytes | None:
        self.reads += 1
        return self.value

    async def new_generation(self) -> bool:
        self.writes += 1
        if not self.writable:
            return False
        self.value = uuid.uuid4().bytes
        return True


def key_cache(
    keys: Keys, generations: Generations, *, positive_ttl_s: float = 30.0, unconfirmed_ttl_s: float = 1.0
) -> ApiKeyCache:
    runtime: Any = SimpleNamespace(pool=keys)
    return ApiKeyCache(
        runtime, generations=generations, positive_ttl_s=positive_ttl_s, unconfirmed_ttl_s=unconfirmed_ttl_s
    )


async def test_a_cached_key_is_used_while_the_generation_stays_and_looked_up_again_when_it_changes() -> None:
    keys, generations = Keys(), Generations()
    cache = key_cache(keys, generations)
    for _ in range(5):
        principal = await cache.principal(SECRET)
        assert principal is not None and principal.partner == "jal"
    assert keys.queries == 1

    keys.revoked = True  # revoked through another process, which replaced the generation
    generations.value = b"another"
    assert cache.cached(SECRET) is not None  # still in this process's cache...
    assert await cache.principal(SECRET, b"another", read=False) is None  # ...but not used
    assert keys.queries == 2 and cache.cached(SECRET) is None


async def test_an_unknown_key_is_remembered_without_asking_redis_again() -> None:
    keys, generations = Keys(), Generations()
    cache = key_cache(keys, generations)
    for _ in range(3):
        assert await cache.principal("nchk_wrong") is None
    assert (keys.queries, generations.reads) == (1, 1)


async def test_without_a_readable_generation_a_cached_key_is_trusted_briefly() -> None:
    keys, generations = Keys(), Generations()
    cache = key_cache(keys, generations, unconfirmed_ttl_s=0.05)
    generations.value = None  # Redis cannot be read
    assert await cache.principal(SECRET) is not None
    assert await cache.principal(SECRET) is not None
    assert keys.queries == 1
    await asyncio.sleep(0.06)
    keys.revoked = True
    assert await cache.principal(SECRET) is None
    assert keys.queries == 2


async def test_a_generation_redis_refused_is_written_again_in_the_background() -> None:
    keys, generations = Keys(), Generations()
    cache = key_cache(keys, generations, positive_ttl_s=5.0)
    assert await cache.principal(SECRET) is not None
    generations.writable = False
    await cache.revoked()
    assert cache.cached(SECRET) is None  # this process forgot at once
    assert generations.writes == 1
    generations.writable = True
    for _ in range(50):
        if generations.writes >= 2:
            break
        await asyncio.sleep(0.05)
    assert generations.writes == 2 and generations.value not in (b"", None)


class RecordingRedis:
    def __init__(self, values: dict[str, bytes], fail: bool = False) -> None:
        self.values = values
        self.fail = fail
        self.calls: list[list[str]] = []

    async def mget(self, keys: list[str]) -> list[bytes | None]:
        self.calls.append(keys)
        await asyncio.sleep(0)
        if self.fail:
            raise RedisConnectionError("down")
        return [self.values.get(key) for key in keys]


def verification_cache(redis: RecordingRedis, pool: Any = None) -> VerificationCache:
    settings = Settings.model_validate({"topic_prefix": "u.", "env": "development"})
    runtime: Any = SimpleNamespace(settings=settings, state={REDIS_STATE: redis}, pool=pool)
    return VerificationCache(runtime)


def entry(number: str) -> bytes:
    return json.dumps({"v": 1, "entitled": True, "certificate_number": number}).encode()


async def test_the_reads_of_one_loop_iteration_go_as_one_mget_with_the_generation() -> None:
    settings = Settings.model_validate({"topic_prefix": "u.", "env": "development"})
    numbers = [f"N{i}" for i in range(5)]
    values = {f"u.verify:jal:{n}": entry(n) for n in numbers} | {generation_key(settings): b"g1"}
    redis = RecordingRedis(values)
    cache = verification_cache(redis)

    found, generation = await asyncio.gather(
        asyncio.gather(*(cache.lookup_with_generation("jal", n) for n in [*numbers, numbers[0]])), cache.generation()
    )
    assert len(redis.calls) == 1
    assert redis.calls[0] == [generation_key(settings), *(f"u.verify:jal:{n}" for n in numbers)]
    for (answer, seen), number in zip(found, [*numbers, numbers[0]], strict=True):
        assert answer is not None and answer["certificate_number"] == number and seen == b"g1"
    assert generation == b"g1"

    await cache.lookup("jal", numbers[1])  # a later iteration: a batch of its own
    assert len(redis.calls) == 2 and redis.calls[1] == [generation_key(settings), "u.verify:jal:N1"]


async def test_a_failed_mget_sends_every_read_of_the_batch_to_postgresql() -> None:
    class NoRows:
        queries = 0

        async def fetchrow(self, *_: object) -> None:
            self.queries += 1

    pool = NoRows()
    cache = verification_cache(RecordingRedis({}, fail=True), pool)
    found = await asyncio.gather(*(cache.lookup_with_generation("jal", f"N{i}") for i in range(3)))
    assert found == [(None, None)] * 3  # unknown to PostgreSQL; the generation unknown too
    assert pool.queries == 3
    assert await cache.generation() is None  # Redis is skipped for a moment after the fault
