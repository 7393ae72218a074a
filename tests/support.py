"""Helpers for tests over the real broker and database."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, Protocol, TypeAlias, TypeVar

import asyncpg
import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from asgi_lifespan import LifespanManager
from asyncpg.connection import LoggedQuery
from cryptography.exceptions import InvalidTag
from fastapi import FastAPI
from pydantic import BaseModel

from shared.contracts.base import EventData
from shared.contracts.common import SealedMembership
from shared.contracts.sealed import RESIDENT_SUBJECT, Sealed, resident_subject
from shared.contracts.topics import Topic, cluster_of
from shared.kit.auth import Role, StaffRole, audience, mint_token
from shared.kit.consumer import ConsumerStats, EventConsumer, in_time_order
from shared.kit.db import Connection
from shared.kit.envelope import Envelope, new_envelope
from shared.kit.kafka_admin import ensure_topics
from shared.kit.kafka_security import KafkaConnection
from shared.kit.keyring import Keyring, open_with, seal_with
from shared.kit.migrations import KIT_MIGRATIONS, apply_migrations, ensure_database, load_migrations, migrate_service
from shared.kit.settings import Settings, with_database

TEST_TOPIC = Topic("test.pings.v1", 3, "subject", "tests", ("tests",), description="test events")


class Ping(EventData, name="tests.ping", topic=TEST_TOPIC):
    subject: str
    sequence: int


async def service_database(settings: Settings, label: str, migrations: Path) -> str:
    """A new database with the kit's and one service's migrations; returns its DSN."""
    name = f"{settings.db_prefix}_{label}_{uuid.uuid4().hex[:6]}"
    dsn = with_database(settings.pg_dsn or "", name)
    await migrate_service(dsn, with_database(settings.pg_dsn or "", "postgres"), name, migrations)
    return dsn


async def query_logging_pool(
    dsn: str, on_query: Callable[[LoggedQuery], None] | None, *, max_size: int = 1
) -> asyncpg.Pool:
    """A pool whose connections hand every statement they run to ``on_query`` (for counting)."""

    async def log_queries(conn: asyncpg.Connection[asyncpg.Record]) -> None:
        if on_query is not None:
            conn.add_query_logger(on_query)

    return await asyncpg.create_pool(dsn, min_size=1, max_size=max_size, init=log_queries)


def broker_record(
    topic: str, offset: int, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]], *,
    timestamp_ms: int | None = None,
) -> ConsumerRecord[bytes, bytes]:
    """A record of partition 0 as the broker hands it over, for ``EventConsumer.handle_batch``
    (record time follows the offset unless given)."""
    timestamp = 1_000 + offset if timestamp_ms is None else timestamp_ms
    return ConsumerRecord(
        topic, 0, offset, timestamp, 0, key, value, None, len(key or b""), len(value or b""), headers,
    )


def envelope_record(topic: str, offset: int, envelope: Envelope) -> ConsumerRecord[bytes, bytes]:
    return broker_record(topic, offset, envelope.key, envelope.data, envelope.headers())


async def fresh_database(settings: Settings, label: str) -> str:
    """A new database with the kit's tables; returns its DSN."""
    name = f"{settings.db_prefix}_{label}_{uuid.uuid4().hex[:6]}"
    await ensure_database(with_database(settings.pg_dsn or "", "postgres"), name)
    dsn = with_database(settings.pg_dsn or "", name)
    conn = await asyncpg.connect(dsn)
    try:
        await apply_migrations(conn, load_migrations(KIT_MIGRATIONS, "kit"))
    finally:
        await conn.close()
    return dsn


async def fresh_topic(settings: Settings, partitions: int = 3, *, with_dlq: bool = True) -> str:
    """A new topic (and its DLQ) of this test alone; returns its full name."""
    name = f"test.{uuid.uuid4().hex[:8]}.v1"
    topics = [Topic(name, partitions, "key", "tests")]
    if with_dlq:
        topics.append(Topic(name + ".dlq", 1, "key", "tests"))
    await ensure_topics(settings, topics)
    return settings.topic(name)


async def read_topic(
    settings: Settings, topic: str, *, until: Callable[[list[ConsumerRecord[bytes, bytes]]], bool],
    timeout: float = 15.0,
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of a topic from the beginning (no group), until ``until`` holds or time runs out."""
    consumer = AIOKafkaConsumer(
        **_connection(settings, topic).aiokafka_kwargs(), enable_auto_commit=False, fetch_max_wait_ms=10,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        while partitions is None:
            await consumer.client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic)
        assigned = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(assigned)
        await consumer.seek_to_beginning(*assigned)
        records: list[ConsumerRecord[bytes, bytes]] = []
        deadline = time.monotonic() + timeout
        while not until(records) and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=50)
            for batch in batches.values():
                records.extend(batch)
        return records
    finally:
        await consumer.stop()


RawRecord = tuple[bytes | None, bytes, list[tuple[str, bytes]]]


def _connection(settings: Settings, topic: str) -> KafkaConnection:
    """The cluster ``topic`` (as named on the broker, prefix included) lives on."""
    return KafkaConnection.of(settings, cluster_of(topic.removeprefix(settings.topic_prefix)))


async def produce(settings: Settings, topic: str, records: list[RawRecord]) -> None:
    producer = AIOKafkaProducer(**_connection(settings, topic).aiokafka_kwargs(), acks="all")
    await producer.start()
    try:
        for key, value, headers in records:
            await producer.send_and_wait(topic, value=value, key=key, headers=headers)
    finally:
        await producer.stop()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 15.0, interval: float = 0.02) -> None:
    """Poll until the check holds; fail with the time it took otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


@contextlib.asynccontextmanager
async def service_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Run a service in-process (lifespan: migrations, relay, consumers) with an HTTP client on it."""
    async with (
        LifespanManager(app, startup_timeout=60, shutdown_timeout=30),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://service"
        ) as client,
    ):
        yield client


def bearer(
    settings: Settings, role: str, subject: str | None = None, *, services: Sequence[str] | None = None, **claims: str
) -> dict[str, str]:
    """Authorization header of a development JWT for the role (for every platform service, or ``services``)."""
    token = mint_token(
        settings, subject=subject or f"{role}-{uuid.uuid4().hex[:6]}", role=Role(role),
        municipality=claims.get("municipality"), partner=claims.get("partner"), prefecture=claims.get("prefecture"),
        staff_role=StaffRole(claims["staff_role"]) if "staff_role" in claims else None,
        audiences=None if services is None else [audience(s) for s in services],
    )
    return {"Authorization": f"Bearer {token}"}


async def caught_up(
    app: FastAPI, *, also_empty: str | None = None, timeout: float = 60.0, interval: float = 0.05
) -> None:
    """Every consumer group of a running service committed past the end of its topics, its outbox
    is relayed, and the optional ``also_empty`` count query (another queue of the service) is 0."""
    runtime = app.state.runtime
    groups = {consumer.group_id: consumer.topics for consumer in runtime.consumers}
    # One client per group that never subscribes (so it never joins the group): it reads the commits.
    probes = {
        consumer.group_id: AIOKafkaConsumer(
            **KafkaConnection.of(runtime.settings, consumer.cluster).aiokafka_kwargs(), group_id=consumer.group_id,
            enable_auto_commit=False,
        )
        for consumer in runtime.consumers
    }
    for probe in probes.values():
        await probe.start()
    try:
        partitions: dict[str, list[TopicPartition]] = {}
        if probes:
            first = next(iter(probes.values()))
            await first.topics()  # fetches the metadata
            partitions = {
                group: [TopicPartition(t, p) for t in topics for p in sorted(first.partitions_for_topic(t) or ())]
                for group, topics in groups.items()
            }

        behind: list[str] = []

        async def done() -> bool:
            behind.clear()
            if unpublished := await runtime.pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL"):
                behind.append(f"{unpublished} outbox rows unpublished")
                return False
            if also_empty is not None and (left := await runtime.pool.fetchval(also_empty)):
                behind.append(f"{left} rows left by {also_empty!r}")
                return False
            for group, tps in partitions.items():
                ends = await probes[group].end_offsets(tps)
                for tp in tps:
                    committed = await probes[group].committed(tp) or 0
                    if committed < ends[tp]:
                        behind.append(f"{group} {tp.topic}[{tp.partition}] committed {committed} of {ends[tp]}")
            return not behind

        try:
            await eventually(done, timeout=timeout, interval=interval)
        except AssertionError as error:
            raise AssertionError(f"{error}: {'; '.join(behind)}") from None
    finally:
        for probe in probes.values():
            await probe.stop()


async def assert_key_scoped(
    client: httpx.AsyncClient,
    method: str,
    path: str,
    *,
    owner: dict[str, str],
    other: dict[str, str],
    body: Any = None,
    changed_body: Any = None,
    changed_path: str | None = None,
) -> httpx.Response:
    """The Idempotency-Key contract of one write route, as seen from outside:

    - the owner's first request succeeds (2xx), and repeating it answers the stored first response
      (``Idempotent-Replayed: true``, same status and body);
    - another caller sending the same key and request never gets the owner's response: its own
      answer (a 403/404 where it may not act, or its own fresh result), never a replay;
    - the owner sending the same key with another valid request (``changed_body``, or the same body
      to ``changed_path``) gets a 422 ``idempotency-key-reused``.

    Returns the owner's first response."""
    assert changed_body is not None or changed_path is not None, "name the changed request"
    key = f"scope-{uuid.uuid4()}"

    async def send(headers: dict[str, str], payload: Any, to: str = path) -> httpx.Response:
        kwargs: dict[str, Any] = {"headers": {**headers, "Idempotency-Key": key}}
        if payload is not None:
            kwargs["json"] = payload
        return await client.request(method, to, **kwargs)

    first = await send(owner, body)
    assert first.status_code < 300, f"{method} {path}: {first.status_code} {first.text}"
    again = await send(owner, body)
    assert (again.status_code, again.content and again.json()) == (first.status_code, first.content and first.json())
    assert again.headers.get("Idempotent-Replayed") == "true"
    theirs = await send(other, body)
    assert theirs.headers.get("Idempotent-Replayed") is None, f"{method} {path}: another caller got a replay"
    if theirs.status_code < 300:
        assert theirs.content != first.content or theirs.status_code != first.status_code or first.status_code == 204
    else:
        assert theirs.status_code in (400, 403, 404, 409, 422), theirs.text
    changed = await send(owner, body if changed_body is None else changed_body, changed_path or path)
    assert changed.status_code == 422, changed.text
    assert changed.json()["code"] == "idempotency-key-reused", changed.text
    return first


# --- One batch against one event per batch: the equivalence harness of set-based consumers ---------
#
# A consumer applying runs of events set-based must end, after one batch of mixed events, exactly
# where applying the same events one per batch ends. A service's run tests give their scenario (a
# feed of history and one of the batch), how to open a fresh database and the consumer on it, and
# what of a database they compare; ``assert_batch_is_one_by_one`` does the rest.

BrokerRecord: TypeAlias = "ConsumerRecord[bytes, bytes]"
OnQuery: TypeAlias = Callable[[LoggedQuery], None]
Seed: TypeAlias = Callable[[Connection], Awaitable[Any]]
#: The consumer of a service on a database (a coroutine where building it reads the database).
ConsumerOn: TypeAlias = Callable[[asyncpg.Pool], "EventConsumer | Awaitable[EventConsumer]"]
S = TypeVar("S")


class OpenPool(Protocol):
    """A fresh database of a service: a pool on it whose connections hand every statement to ``on_query``
    (``max_size``: instead of the pools' own size, e.g. 1 where a count must not meet a connection that
    has not yet looked up the statements' types)."""

    def __call__(
        self, label: str, on_query: OnQuery | None = None, *, max_size: int | None = None
    ) -> Awaitable[asyncpg.Pool]: ...


class EventFeed:
    """Broker records in the order they are added: one partition per topic, and record times that
    follow the order across topics (so ``in_time_order`` keeps it)."""

    def __init__(self, settings: Settings, source: str = "tests") -> None:
        self.settings = settings
        self.source = source
        self.records: list[BrokerRecord] = []
        self._offsets: dict[str, int] = {}
        self._added: set[uuid.UUID] = set()

    def add(
        self, event: EventData, *, subject: str, time: datetime | None = None, key: str | None = None,
        source: str | None = None,
    ) -> Envelope:
        """The event in a new envelope (sent by the feed's ``source`` unless given; at ``time``, now
        unless given; keyed by the subject unless ``key``), on the event's topic."""
        return self.put(new_envelope(source or self.source, event, subject=subject, key=key, time=time))

    def put(self, envelope: Envelope) -> Envelope:
        """An envelope made elsewhere, on its event's topic."""
        topic = self.settings.topic(envelope.data_model().event_topic)
        offset = self._offsets.get(topic, 0)
        self._offsets[topic] = offset + 1
        self.records.append(broker_record(
            topic, offset, envelope.key, envelope.data, envelope.headers(), timestamp_ms=1_000 + len(self.records),
        ))
        self._added.add(envelope.id)
        return envelope

    def again(self, envelope: Envelope) -> None:
        """An envelope of this feed once more (a redelivery, a producer's retry): the inbox must skip it."""
        assert envelope.id in self._added, "again() repeats an envelope of this feed"
        self.put(envelope)


def without(row: Mapping[str, Any], *volatile: str) -> dict[str, Any]:
    """A row without its columns that differ between two databases by nature (ids, clocks)."""
    return {column: value for column, value in row.items() if column not in volatile}


async def table_rows(pool: asyncpg.Pool, query: str, *volatile: str) -> list[dict[str, Any]]:
    """The rows of a query, each ``without`` the volatile columns."""
    return [without(dict(row), *volatile) for row in await pool.fetch(query)]


async def tables_rows(
    pool: asyncpg.Pool, queries: Mapping[str, str], *volatile: str
) -> dict[str, list[dict[str, Any]]]:
    """Each named query's ``table_rows``: a snapshot of a database to compare with another's."""
    return {name: await table_rows(pool, query, *volatile) for name, query in queries.items()}


class QueryLog:
    """The statements of a pool's connections (give it as ``on_query``), for counting."""

    def __init__(self) -> None:
        self.logged: list[LoggedQuery] = []

    def __call__(self, query: LoggedQuery) -> None:
        self.logged.append(query)

    async def of_batch(self, consumer: EventConsumer, records: Sequence[BrokerRecord]) -> list[LoggedQuery]:
        """Handle the records as one batch; the statements it ran."""
        self.logged.clear()
        await consumer.handle_batch(records)
        return list(self.logged)


def in_transaction(statements: Sequence[LoggedQuery]) -> list[str]:
    """The statements between the first BEGIN and the COMMIT after it."""
    texts = [statement.query for statement in statements]
    begin = texts.index("BEGIN;")
    return texts[begin + 1:texts.index("COMMIT;", begin)]


@contextlib.asynccontextmanager
async def service_pools(
    settings: Settings, migrations: Path, *, seed: Seed | None = None, max_size: int = 1
) -> AsyncIterator[OpenPool]:
    """Opens fresh databases with a service's migrations (then ``seed`` in a transaction), and
    closes every pool it opened at the end."""
    opened: list[asyncpg.Pool] = []
    service_pool_size = max_size

    async def open_pool(label: str, on_query: OnQuery | None = None, *, max_size: int | None = None) -> asyncpg.Pool:
        pool = await query_logging_pool(
            await service_database(settings, label, migrations), on_query,
            max_size=service_pool_size if max_size is None else max_size,
        )
        opened.append(pool)
        if seed is not None:
            async with pool.acquire() as conn, conn.transaction():
                await seed(conn)
        return pool

    try:
        yield open_pool
    finally:
        for pool in opened:
            await pool.close()


@dataclass
class BatchOutcome(Generic[S]):
    """What one batch left, once shown equal to one event per batch."""

    #: The snapshot both databases ended with.
    snapshot: S
    #: The batched consumer's counts: the batch and its repeat, if any (history is applied by another).
    stats: ConsumerStats
    #: The one-by-one consumer's counts.
    one_by_one_stats: ConsumerStats
    #: Every statement the batch's first handling ran, BEGIN to the pool's reset.
    statements: list[LoggedQuery]

    @property
    def transaction(self) -> list[str]:
        return in_transaction(self.statements)


async def assert_batch_is_one_by_one(
    open_pool: OpenPool,
    consumer_on: ConsumerOn,
    *,
    history: Sequence[BrokerRecord],
    batch: Sequence[BrokerRecord],
    snapshot: Callable[[asyncpg.Pool], Awaitable[S]],
    after_history: Callable[[asyncpg.Pool], Awaitable[None]] | None = None,
    repeat: bool = True,
    label: str = "runs",
) -> BatchOutcome[S]:
    """Apply ``history`` one record per batch to two fresh databases (then ``after_history``); then
    ``batch`` as one batch on the first, and once more unless not to ``repeat`` (which must change
    nothing), and one record per batch on the other, in the order a batch is handled in; assert both
    end with the same ``snapshot``."""

    async def consumer(pool: asyncpg.Pool) -> EventConsumer:
        made = consumer_on(pool)
        return made if isinstance(made, EventConsumer) else await made

    log = QueryLog()
    batched, one_by_one = await open_pool(f"{label}_batched", log), await open_pool(f"{label}_single")
    for pool in (batched, one_by_one):
        earlier = await consumer(pool)
        for record in history:
            await earlier.handle_batch([record])
        if after_history is not None:
            await after_history(pool)
    whole = await consumer(batched)
    statements = await log.of_batch(whole, batch)
    state = await snapshot(batched)
    if repeat:
        await whole.handle_batch(batch)
        assert await snapshot(batched) == state, "the same batch again changed the state"
    single = await consumer(one_by_one)
    for record in in_time_order(batch):
        await single.handle_batch([record])
    assert await snapshot(one_by_one) == state, "one event per batch ends elsewhere than one batch"
    return BatchOutcome(state, whole.stats, single.stats, statements)


# -- sealed personal data in test events ------------------------------------------------------------

#: Tests build events synchronously, before any key store is at hand: their sealed fields are sealed
#: with this key (``seal_for_tests``), and ``sealed_for`` seals them again with a key store's own
#: keys before they are fed to a service, which opens them with that store.
TEST_SEALING_KEY = hashlib.sha256(b"nichiiki tests: events built before a key store").digest()

Data = TypeVar("Data", bound=EventData)


def seal_for_tests(kid: str, value: str | BaseModel) -> Sealed:
    """``value`` sealed with the test key (see ``TEST_SEALING_KEY``)."""
    plaintext = value.model_dump_json() if isinstance(value, BaseModel) else value
    return seal_with(TEST_SEALING_KEY, kid, plaintext.encode())


def membership(partner: str, member_number: str | None = None, *, resident_id: str = "tests") -> SealedMembership:
    """A partner membership as v2 certificate events carry it: the number sealed with the test key
    under ``resident:<resident_id>`` (``sealed_for`` seals it with a key store's key of that resident)."""
    number = None if member_number is None else seal_for_tests(resident_subject(resident_id), member_number)
    return SealedMembership(partner=partner, member_number=number)


def opened_for_tests(sealed: Sealed) -> bytes:
    """What ``seal_for_tests`` sealed."""
    return open_with(TEST_SEALING_KEY, sealed)


async def sealed_for(keyring: Keyring, event: Data) -> Data:
    """The event with every value sealed with the test key for a resident (``resident:<id>``) sealed
    again with ``keyring``'s key of that resident; values sealed otherwise are left as they are."""

    async def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if set(node) == {"kid", "alg", "iv", "ct"} and str(node["kid"]).startswith(RESIDENT_SUBJECT):
                try:
                    plaintext = opened_for_tests(Sealed.model_validate(node))
                except InvalidTag:
                    return node
                return (await keyring.seal(node["kid"], plaintext)).model_dump(mode="json")
            return {key: await walk(value) for key, value in node.items()}
        if isinstance(node, list):
            return [await walk(value) for value in node]
        return node

    return type(event).model_validate(await walk(event.model_dump(mode="json")))


async def envelope_sealed_for(keyring: Keyring, envelope: Envelope) -> Envelope:
    """The envelope (same id, time, key and headers) with its event ``sealed_for`` the key store."""
    if b'"kid"' not in envelope.data:
        return envelope  # nothing sealed in it
    sealed = await sealed_for(keyring, envelope.data_model())
    return dataclasses.replace(envelope, data=sealed.model_dump_json().encode())


class PooledStatements:
    """The statements a pool's connections run inside ``async with`` (each statement with its
    whitespace made single spaces): ``count(start)`` counts those that begin so."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.queries: list[str] = []

    def __call__(self, query: LoggedQuery) -> None:
        self.queries.append(" ".join(query.query.split()))

    async def __aenter__(self) -> PooledStatements:
        await self._each(lambda conn: conn.add_query_logger(self))
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._each(lambda conn: conn.remove_query_logger(self))

    async def _each(self, act: Callable[[Any], None]) -> None:  # a pooled connection (its proxy)
        held = [await self.pool.acquire() for _ in range(self.pool.get_max_size())]
        for conn in held:
            act(conn)
        for conn in held:
            await self.pool.release(conn)

    def count(self, start: str) -> int:
        return sum(1 for q in self.queries if q.startswith(start))
