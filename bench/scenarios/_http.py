"""Helpers of the service scenarios: a lean HTTP/1.1 load client, a topic watcher, residents set up.

The load generator runs on the same small machine as the services, so its own cost per request
is part of every figure. ``HttpPool`` keeps that cost low (keep-alive connections over asyncio
streams, the request bytes built by hand, no client framework) and ``CpuMeter`` reports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from bench.measure import Latencies
from bench.scenarios._common import CLIENT, OUTSIDE, CpuMeter, read_response
from bench.scenarios._events import GROUP_NAMES
from shared.contracts.topics import APPLICATIONS, RESIDENTS, Topic, cluster_of
from shared.kit.kafka_security import KafkaConnection
from shared.kit.offsets import end_probe, log_end_offsets
from shared.kit.settings import Settings
from shared.reference import SPECIFIC_RESIDENCE_PLAN, plans, travel_programs

if TYPE_CHECKING:
    from bench.run import BenchContext

#: A municipality with a 特定居住促進計画 (plans reference data) where JAL runs a program.
SHIRAHAMA = "304018"
#: Every municipality with a 特定居住促進計画 where JAL runs a program (白浜町 among them).
JAL_TOWNS: tuple[str, ...] = tuple(sorted(
    {code for program in travel_programs() if program.partner_code == "jal" for code in program.municipality_codes}
    & {p.municipality_code or "" for p in plans() if p.level == "municipality" and p.plan == SPECIFIC_RESIDENCE_PLAN}
))
#: The residents' legal address (千代田区): not Shirahama, so they may register and apply there.
CHIYODA = "131016"


class HttpError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:300]!r}")
        self.status = status
        self.body = body

    def problem_code(self) -> str | None:
        with contextlib.suppress(ValueError, AttributeError):
            code = json.loads(self.body).get("code")
            return str(code) if code is not None else None
        return None


@dataclass(slots=True)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    used_at: float


class HttpPool:
    """Keep-alive HTTP/1.1 connections to one service; at most ``size`` requests in flight."""

    #: uvicorn closes idle keep-alive connections after 5 s; never reuse one close to that.
    IDLE_S = 3.0

    def __init__(self, base_url: str, *, size: int = 64, timeout_s: float = 10.0) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.timeout_s = timeout_s
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(size)
        self._host_header = f"Host: {self.host}:{self.port}\r\n".encode()

    async def request(
        self, method: str, path: str, *, headers: dict[str, str] | None = None, body: Any = None,
        ok: Sequence[int] = (200, 201),
    ) -> tuple[int, bytes]:
        """Send one request; HttpError unless the status is one of ``ok``."""
        payload = b"" if body is None else json.dumps(body).encode()
        head = [f"{method} {path} HTTP/1.1\r\n".encode(), self._host_header]
        if headers:
            head.extend(f"{name}: {value}\r\n".encode() for name, value in headers.items())
        if method in ("POST", "PUT", "PATCH") or payload:
            head.append(f"Content-Length: {len(payload)}\r\n".encode())
            if payload:
                head.append(b"Content-Type: application/json\r\n")
        head.append(b"\r\n")
        message = b"".join(head) + payload
        async with self._slots:
            connection = await self._take()
            try:
                async with asyncio.timeout(self.timeout_s):
                    connection.writer.write(message)
                    status, response, keep = await read_response(connection.reader)
            except BaseException:
                connection.writer.close()
                raise
            if keep:
                connection.used_at = time.monotonic()
                self._idle.append(connection)
            else:
                connection.writer.close()
        if status not in ok:
            raise HttpError(status, response)
        return status, response

    async def json(self, method: str, path: str, **kwargs: Any) -> Any:
        _, response = await self.request(method, path, **kwargs)
        return json.loads(response)

    async def _take(self) -> _Connection:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if now - connection.used_at < self.IDLE_S:
                return connection
            connection.writer.close()
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return _Connection(reader, writer, now)

    async def close(self) -> None:
        while self._idle:
            connection = self._idle.pop()
            connection.writer.close()
            with contextlib.suppress(Exception):
                await connection.writer.wait_closed()


# --- Watching a topic --------------------------------------------------------------------------------------

KeyOf = Callable[[ConsumerRecord[bytes, bytes]], str | None]


def header(record: ConsumerRecord[bytes, bytes], name: str) -> str | None:
    for key, value in record.headers:
        if key == name:
            return bytes(value).decode()
    return None


def subject_of(event_type: str) -> KeyOf:
    """The record's ``ce_subject`` when its ``ce_type`` is ``event_type``."""

    def key_of(record: ConsumerRecord[bytes, bytes]) -> str | None:
        return header(record, "ce_subject") if header(record, "ce_type") == event_type else None

    return key_of


def field_of(event_type: str, field: str) -> KeyOf:
    """A field of the event data when the record's ``ce_type`` is ``event_type``."""

    def key_of(record: ConsumerRecord[bytes, bytes]) -> str | None:
        if header(record, "ce_type") != event_type or record.value is None:
            return None
        value = json.loads(record.value).get(field)
        return str(value) if value is not None else None

    return key_of


async def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    partitions = consumer.partitions_for_topic(topic)
    deadline = time.monotonic() + 15
    while not partitions:
        if time.monotonic() > deadline:
            raise RuntimeError(f"topic {topic} has no partitions")
        await consumer.client.force_metadata_update()
        partitions = consumer.partitions_for_topic(topic)
    return [TopicPartition(topic, p) for p in sorted(partitions)]


class TopicWatcher:
    """Reads every partition of one topic from its end, noting when each key is first seen.

    Assigned partitions (no group, no rebalance) and positions resolved in ``start``, so nothing
    published after ``start`` returns can be missed. ``fetch_max_wait_ms`` 10: an idle fetch
    returns after at most 10 ms, and a record that arrives during it is returned at once.
    """

    def __init__(self, settings: Settings, topic: str, key_of: KeyOf) -> None:
        self.topic = topic
        self.key_of = key_of
        self.seen: dict[str, float] = {}
        self._waiters: dict[str, asyncio.Future[float]] = {}
        on = cluster_of(topic.removeprefix(settings.topic_prefix))
        self._consumer = AIOKafkaConsumer(
            **KafkaConnection.of(settings, on).aiokafka_kwargs(), enable_auto_commit=False, fetch_max_wait_ms=10,
            auto_offset_reset="latest",
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        assigned = await partitions_of(self._consumer, self.topic)
        self._consumer.assign(assigned)
        await self._consumer.seek_to_end(*assigned)
        for tp in assigned:
            await self._consumer.position(tp)  # resolved now, before any load
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=200, max_records=1000)
            now = time.perf_counter()
            for records in batches.values():
                for record in records:
                    key = self.key_of(record)
                    if key is None or key in self.seen:
                        continue
                    self.seen[key] = now
                    waiter = self._waiters.pop(key, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(now)

    async def wait(self, key: str, timeout_s: float = 10.0) -> float:
        """When ``key`` was first seen (perf_counter), waiting for it if need be."""
        seen = self.seen.get(key)
        if seen is not None:
            return seen
        if self._task is not None and self._task.done():
            self._task.result()  # the reader died: raise its error
        waiter = self._waiters.get(key)
        if waiter is None:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters[key] = waiter
        async with asyncio.timeout(timeout_s):
            return await asyncio.shield(waiter)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self._consumer.stop()


# --- Timing from the scheduled start ------------------------------------------------------------------------


class Schedule:
    """The scheduled start of operation ``index`` of a ``paced`` run, taken just before it starts.

    ``paced`` measures from each operation's scheduled start to the operation's end; an event seen
    by a watcher may come before the HTTP answer, so the scenarios time ``seen - scheduled``
    themselves. The origin is taken a few microseconds before ``paced`` takes its own, so these
    latencies can only be a hair longer than the truth.
    """

    def __init__(self, rate_per_s: float) -> None:
        self.rate_per_s = rate_per_s
        self.origin = time.perf_counter()
        self.latencies = Latencies()

    def of(self, index: int) -> float:
        return self.origin + index / self.rate_per_s

    def record(self, index: int, seen_at: float) -> None:
        self.latencies.samples_ms.append((seen_at - self.of(index)) * 1000)


# --- Residents, registrations, applications -----------------------------------------------------------------


def resident_body(index: int, *, share_with: Sequence[str] = ()) -> dict[str, Any]:
    return {
        "name": "山田 花子", "name_kana": "ヤマダ ハナコ", "email": f"bench{index}@example.jp",
        "date_of_birth": "1990-04-01", "legal_address_code": CHIYODA, "preferred_language": "ja",
        "consents": [{"purpose": "share_certificate", "partner": code} for code in share_with],
    }


async def bounded(count: int, operation: Callable[[int], Any], *, concurrency: int = 32) -> None:
    """Run ``operation(i)`` for every i, ``concurrency`` at a time (set-up, not measured)."""
    indexes = iter(range(count))

    async def worker() -> None:
        for index in indexes:
            await operation(index)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def new_resident_ids(count: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(count)]


async def create_accounts(
    ctx: BenchContext, registration: HttpPool, ids: Sequence[str], *, share_with: Sequence[str] = (),
    concurrency: int = 32,
) -> None:
    async def create(index: int) -> None:
        await registration.request(
            "POST", "/v1/residents", headers=ctx.headers("resident", subject=ids[index]),
            body=resident_body(index, share_with=share_with),
        )

    await bounded(len(ids), create, concurrency=concurrency)


async def register_basic(ctx: BenchContext, registration: HttpPool, resident_id: str, municipality: str) -> None:
    await registration.request(
        "POST", f"/v1/residents/{resident_id}/registrations", headers=ctx.headers("resident", subject=resident_id),
        body={"municipality_code": municipality, "tier": "basic"},
    )


async def submit_application(
    ctx: BenchContext, certification: HttpPool, resident_id: str, index: int, municipality: str
) -> str:
    """Apply sharing with JAL; waits while the certification service does not know the registration yet."""
    body = {
        "municipality_code": municipality, "planned_stay_days": 60, "housing_basis": "rented",
        "address_there": "1番地", "primary_residence_code": CHIYODA,
        "partners": [{"partner": "jal", "member_number": f"{index % 1_000_000_000:09d}"}],
    }
    headers = ctx.headers("resident", subject=resident_id)
    deadline = time.monotonic() + 30
    while True:
        try:
            application = await certification.json("POST", "/v1/applications", headers=headers, body=body)
            return str(application["application_id"])
        except HttpError as error:
            # Not known yet, or known only from the account's consent event (422 registration-required
            # until the ResidentRegistered event reaches the certification service): retry.
            retry = error.problem_code() in ("resident-not-yet-known", "registration-required")
            if not retry or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


@dataclass(frozen=True, slots=True)
class Pending:
    application_id: str
    municipality: str


async def submitted_applications(
    ctx: BenchContext, registration: HttpPool, certification: HttpPool, municipalities: Sequence[str], *,
    concurrency: int = 32,
) -> list[Pending]:
    """One application per entry of ``municipalities``, each of a new resident registered there (basic) who
    consented to share with JAL, ready for approval (set-up, outside any timed window)."""
    count = len(municipalities)
    ids = new_resident_ids(count)
    await create_accounts(ctx, registration, ids, share_with=("jal",), concurrency=concurrency)
    await bounded(count, lambda i: register_basic(ctx, registration, ids[i], municipalities[i]),
                  concurrency=concurrency)
    await wait_consumers_caught_up(ctx, RESIDENTS)
    applications: list[Pending] = []

    async def apply(index: int) -> None:
        number = await submit_application(ctx, certification, ids[index], index, municipalities[index])
        applications.append(Pending(number, municipalities[index]))

    await bounded(count, apply, concurrency=concurrency)
    await wait_consumers_caught_up(ctx, APPLICATIONS)
    return applications


def describe(latencies: Latencies) -> str:
    return f"p50 {latencies.p50:.1f} ms, p99 {latencies.p99:.1f} ms, max {max(latencies.samples_ms or [0]):.1f} ms"


# --- Letting the platform settle ----------------------------------------------------------------------------


async def wait_consumers_caught_up(ctx: BenchContext, topic: Topic, *, timeout_s: float = 90.0) -> float:
    """Wait until every running service that consumes ``topic`` has committed up to its end.

    A scenario leaves its events to the services downstream; returning before they are handled
    would hand their CPU cost to the next scenario. Returns the seconds waited.
    """
    running = [service for service in topic.consumers if service in ctx.fleet.processes]
    groups = [ctx.settings.topic(f"nichiiki.{GROUP_NAMES.get(service, service)}") for service in running]
    name = ctx.settings.topic(topic.name)
    started = time.perf_counter()
    connection = KafkaConnection.of(ctx.settings, topic.cluster)
    admin = AIOKafkaAdminClient(**connection.aiokafka_kwargs())
    probe = end_probe(connection.aiokafka_kwargs())
    await admin.start()
    await probe.start()
    try:
        partitions = await partitions_of(probe, name)
        ends = await log_end_offsets(probe, partitions)  # the broker's reported ends may lag (offsets.py)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            behind = 0
            for group in groups:
                committed = await admin.list_consumer_group_offsets(group, partitions=partitions)
                for tp in partitions:
                    at = committed.get(tp)
                    behind += ends[tp] - (at.offset if at is not None and at.offset >= 0 else 0)
            if behind <= 0:
                break
            await asyncio.sleep(0.25)
    finally:
        await probe.stop()
        await admin.close()
    return time.perf_counter() - started


# --- Where the CPU went -------------------------------------------------------------------------------------




async def settle(ctx: BenchContext, *topics: Topic, timeout_s: float = 120.0) -> float:
    """Wait until the work a scenario's setup caused downstream is done: every consumer of ``topics``
    caught up and the notification service's e-mails sent (the sink's mailbox stops growing).

    Setup (residents registered, applications sent) makes e-mails that take far longer to send than
    the setup takes; measured windows that start earlier pay for them. Returns the seconds waited.
    """
    started = time.perf_counter()
    for topic in topics:
        await wait_consumers_caught_up(ctx, topic, timeout_s=timeout_s)
    mailbox = ctx.fleet.log_dir.parent / "mailbox"
    last, stable_since = -1, time.monotonic()
    while time.perf_counter() - started < timeout_s:
        count = sum(1 for _ in mailbox.rglob("*.eml")) if mailbox.is_dir() else 0
        if count != last:
            last, stable_since = count, time.monotonic()
        elif time.monotonic() - stable_since >= 1.5:
            break
        await asyncio.sleep(0.25)
    return time.perf_counter() - started


async def idle_cpu(seconds: float = 2.0) -> dict[str, float]:
    """Cores each part of the run uses with no load offered (consumers polling, background tasks)."""
    meter = CpuMeter()
    await asyncio.sleep(seconds)
    return {group: value / seconds for group, value in meter.stop().items()}


def cpu_note(
    spent: dict[str, float], seconds: float, per: int, unit: str, idle: dict[str, float],
    workers: Mapping[str, int] | None = None,
) -> str:
    """Where the CPU went in a window: cores busy per part, and the CPU each operation added on top of
    what that part uses idle (``idle``), so a slow window does not inflate the cost per operation.

    Each service's own figure is beside the platform's sum. ``workers``: services running more than one
    process (``NICHIIKI_HTTP_WORKERS``); the cap of the busiest service is per process, so it multiplies.
    """
    parts = []
    platform = 0.0
    busiest, busiest_ms = "", 0.0
    for group, value in sorted(spent.items(), key=lambda item: -item[1]):
        if value / seconds < 0.01:
            continue
        if group == OUTSIDE:
            parts.append(f"{group} {value / seconds:.2f} cores")
            continue
        added = max(0.0, value - idle.get(group, 0.0) * seconds) / max(per, 1) * 1000
        if group != CLIENT:
            platform += added
        if group not in (CLIENT, "postgres", "broker", "redis", "other") and added > busiest_ms:
            busiest, busiest_ms = group, added
        parts.append(f"{group} {value / seconds:.2f} cores ({added:.2f} ms/{unit} over idle)")
    idle_total = sum(v for g, v in idle.items() if g not in (OUTSIDE, CLIENT))
    cores = os.cpu_count() or 1
    ceiling = (cores - idle_total) / platform * 1000 if platform else float("nan")
    count = (workers or {}).get(busiest, 1)
    single = (
        f"; {'one' if count == 1 else count} {busiest} process{'' if count == 1 else 'es'} (one event loop, one core "
        f"at most each) cap{'s' if count == 1 else ''} it at about {count * 1000 / busiest_ms:,.0f}/s"
        if busiest_ms else ""
    )
    return (
        f"CPU during the window ({seconds:.1f} s, {cores} cores): " + ", ".join(parts) + ". "
        f"The platform (services, PostgreSQL, broker, Redis) spent {platform:.1f} ms of CPU per {unit} over its idle "
        f"use of {idle_total:.2f} cores: a CPU-bound ceiling of about {ceiling:,.0f} {unit}s/s on this machine "
        f"with nothing else running{single}."
    )


class LoopLag:
    """How late the load generator's own event loop runs (a late loop delays sends and reads, so it
    shows up in every latency measured); sampled every 5 ms during a window."""

    def __init__(self) -> None:
        self.lags = Latencies()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(0.005)
            self.lags.add(max(0.0, time.perf_counter() - started - 0.005))

    def __enter__(self) -> LoopLag:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()

    def note(self) -> str:
        worst = max(self.lags.samples_ms or [0.0])
        return f"load generator's event loop late by p99 {self.lags.p99:.1f} ms, max {worst:.1f} ms"
