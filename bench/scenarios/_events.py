"""Helpers of the donation, subsidy, notification and consumer scenarios.

- ``LeanHttp``: keep-alive HTTP/1.1 over asyncio streams with request bytes built before the timed
  window. The load generator shares the machine with the services, so every microsecond it spends
  per request is taken from what it measures; httpx costs a few hundred per request.
- ``publish``: pipelined envelopes onto a (prefixed) topic, as a producing service would.
- ``sealing_keys`` / ``sealed_for_resident``: personal fields sealed with each resident's key from
  the platform's key store, as the producing service seals them (keys fetched before a timed window).
- ``ConsumerProgress``: a service's ``nichiiki_consumer_events_total{outcome="handled"}`` polled
  from its ``/metrics`` (cheap), to time a burst from its first applied event to its last.
- ``settle``: wait until every consumer group of the platform is at the end of its topics and every
  service's outbox is relayed, so one scenario's aftermath is never billed to the next.
- ``CpuMeter``: where the CPU went during a window (service processes, PostgreSQL, broker, the
  load generator, and the rest of a shared machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import asyncpg
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from bench.scenarios._common import OUTSIDE, read_response
from shared.contracts.certification import CertificateIssued
from shared.contracts.common import SealedMembership
from shared.contracts.registration import ConsentState, Contact, ResidentRegistered
from shared.contracts.sealed import Sealed, resident_subject
from shared.contracts.topics import CORE_TOPICS, GATEWAY_TRIPS, Topic
from shared.kit.clock import SYSTEM_CLOCK
from shared.kit.envelope import Envelope, new_envelope
from shared.kit.kafka_security import KafkaConnection
from shared.kit.keyring import Keyring, seal_with
from shared.kit.offsets import end_probe, log_end_offsets
from shared.kit.settings import Settings
from shared.reference import municipalities, travel_programs

if TYPE_CHECKING:
    from bench.run import BenchContext

def today_in_japan() -> date:
    return SYSTEM_CLOCK.today()


# --- HTTP ---------------------------------------------------------------------------------------------------


class HttpStatusError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:300]!r}")
        self.status = status
        self.body = body


@dataclass(slots=True)
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    used_at: float


class LeanHttp:
    """Keep-alive connections to one service, at most ``size`` requests in flight."""

    IDLE_S = 3.0  # uvicorn drops idle keep-alive connections after 5 s

    def __init__(self, base_url: str, *, size: int = 64, timeout_s: float = 30.0) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.timeout_s = timeout_s
        self._idle: list[_Conn] = []
        self._slots = asyncio.Semaphore(size)

    def build(self, method: str, path: str, *, headers: dict[str, str] | None = None, body: Any = None) -> bytes:
        """The bytes of one request (built ahead of a timed window)."""
        payload = b"" if body is None else json.dumps(body, ensure_ascii=False).encode()
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        if method in ("POST", "PUT", "PATCH") or payload:
            lines.append(f"Content-Length: {len(payload)}")
        if payload:
            lines.append("Content-Type: application/json")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload

    async def send(self, raw: bytes, ok: Sequence[int] = (200, 201)) -> tuple[int, bytes]:
        async with self._slots:
            conn = await self._take()
            try:
                async with asyncio.timeout(self.timeout_s):
                    conn.writer.write(raw)
                    status, body, keep = await read_response(conn.reader)
            except BaseException:
                conn.writer.close()
                raise
            if keep:
                conn.used_at = time.monotonic()
                self._idle.append(conn)
            else:
                conn.writer.close()
        if status not in ok:
            raise HttpStatusError(status, body)
        return status, body

    async def json(self, method: str, path: str, *, headers: dict[str, str] | None = None, body: Any = None,
                   ok: Sequence[int] = (200, 201)) -> Any:
        _, response = await self.send(self.build(method, path, headers=headers, body=body), ok)
        return json.loads(response) if response else None

    async def _take(self) -> _Conn:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.used_at < self.IDLE_S:
                return conn
            conn.writer.close()
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return _Conn(reader, writer, now)

    async def close(self) -> None:
        while self._idle:
            conn = self._idle.pop()
            conn.writer.close()
            with contextlib.suppress(Exception):
                await conn.writer.wait_closed()


# --- Kafka ----------------------------------------------------------------------------------------------------


async def publish(settings: Settings, topic: Topic, envelopes: Sequence[Envelope]) -> float:
    """Send every envelope (pipelined, acks=all) onto the run's ``topic``; returns the seconds taken."""
    name = settings.topic(topic.name)
    producer = AIOKafkaProducer(
        **KafkaConnection.of(settings, topic.cluster).aiokafka_kwargs(), acks="all", linger_ms=5,
        max_batch_size=256 * 1024,
    )
    await producer.start()
    try:
        started = time.perf_counter()
        futures = [
            await producer.send(name, envelope.data, key=envelope.key, headers=envelope.headers())
            for envelope in envelopes
        ]
        await asyncio.gather(*futures)
        return time.perf_counter() - started
    finally:
        await producer.stop()


#: Groups whose name is not the service's: insights' carries its read model's generation (a fresh
#: platform is at generation 1; docs/services/insights.md). Named wrong, its lag never reaches 0.
GROUP_NAMES = {"insights": "insights-g1"}
#: Each service's consumer groups (group name suffix → the topics it reads), as the services declare them.
CONSUMER_GROUPS: dict[str, tuple[str, tuple[Topic, ...]]] = {}
for _topic in CORE_TOPICS:
    for _service in _topic.consumers:
        # subsidy's trips have a group of their own
        _name = "subsidy-trips" if _topic is GATEWAY_TRIPS else GROUP_NAMES.get(_service, _service)
        _owner, _topics = CONSUMER_GROUPS.get(_name, (_service, ()))
        CONSUMER_GROUPS[_name] = (_owner, (*_topics, _topic))


async def consumer_lag(ctx: BenchContext) -> int:
    """Records not yet committed by the running services' consumer groups, summed."""
    connection = KafkaConnection.internal(ctx.settings)  # CORE_TOPICS only: all inside
    admin = AIOKafkaAdminClient(**connection.aiokafka_kwargs())
    probe = end_probe(connection.aiokafka_kwargs())
    await admin.start()
    await probe.start()
    try:
        behind = 0
        running = {n: ts for n, (service, ts) in CONSUMER_GROUPS.items() if service in ctx.fleet.processes}
        every = {TopicPartition(ctx.settings.topic(t.name), p) for ts in running.values() for t in ts
                 for p in range(t.partitions)}
        # Not the broker's reported ends: the embedded broker's can lag its log (shared/kit/offsets.py).
        ends = await log_end_offsets(probe, every)
        for name, topics in running.items():
            partitions = [
                TopicPartition(ctx.settings.topic(t.name), p) for t in topics for p in range(t.partitions)
            ]
            committed = await admin.list_consumer_group_offsets(
                ctx.settings.topic(f"nichiiki.{name}"), partitions=partitions
            )
            for tp in partitions:
                at = committed.get(tp)
                # Tansu may answer an end offset below a committed one (the last batch's base): clamp.
                behind += max(0, ends[tp] - (at.offset if at is not None and at.offset >= 0 else 0))
        return behind
    finally:
        await probe.stop()
        await admin.close()


async def pending_outboxes(ctx: BenchContext) -> int:
    """Outbox rows not yet relayed, plus e-mails not yet settled, over every service database."""
    pending = 0
    for service in ctx.fleet.processes:
        try:
            conn = await asyncpg.connect(ctx.settings.database_dsn(service))
        except asyncpg.InvalidCatalogNameError:
            continue  # a service without a database of its own (the console): no outbox
        try:
            pending += await conn.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            if service == "notification":
                pending += await conn.fetchval(
                    "SELECT count(*) FROM email_outbox WHERE status IN ('pending', 'sending') "
                    "AND next_attempt_at < now() + interval '1 minute'"
                )
        finally:
            await conn.close()
    return pending


async def settle(ctx: BenchContext, *, timeout_s: float = 120.0) -> tuple[float, bool]:
    """Wait until the platform is idle: consumers at the end of their topics, outboxes relayed.

    Returns (seconds waited, idle). Two idle readings in a row: an outbox relayed between the
    two probes may have put new records on a topic.
    """
    started = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    quiet = 0
    while time.monotonic() < deadline:
        if await consumer_lag(ctx) == 0 and await pending_outboxes(ctx) == 0:
            quiet += 1
            if quiet == 2:
                return time.perf_counter() - started, True
        else:
            quiet = 0
        await asyncio.sleep(0.25)
    return time.perf_counter() - started, False


# --- Consumer progress from /metrics --------------------------------------------------------------------------

_HANDLED = re.compile(r'^nichiiki_consumer_events_total\{consumer="([^"]+)",outcome="handled"\} ([0-9.e+]+)$', re.M)


async def handled_events(http: LeanHttp) -> dict[str, int]:
    """``nichiiki_consumer_events_total{outcome="handled"}`` per consumer name, from one service."""
    _, body = await http.send(http.build("GET", "/metrics"), ok=(200,))
    counts: dict[str, int] = {}
    for name, value in _HANDLED.findall(body.decode()):
        counts[name] = counts.get(name, 0) + int(float(value))
    return counts


@dataclass
class Progress:
    """A burst of ``expected`` events for one consumer: published at ``started_at``, its handled
    counter first moved at ``first_at`` (the first batch committed) and reached the end at ``done_at``
    (``time.perf_counter`` values).

    The rate is taken from the first send, not from the first counter movement: the counter moves
    only when a whole batch (up to 500 records) commits, so starting the clock there would leave the
    first batch's work out of the time.
    """

    service: str
    consumer: str
    expected: int
    baseline: int = 0
    started_at: float = 0.0
    first_at: float | None = None
    done_at: float | None = None
    seen: int = 0

    @property
    def seconds(self) -> float:
        if self.done_at is None:
            return float("nan")
        return self.done_at - self.started_at

    @property
    def rate(self) -> float:
        seconds = self.seconds
        return self.expected / seconds if seconds == seconds and seconds > 0 else 0.0


async def watch_consumers(
    ctx: BenchContext, progresses: Sequence[Progress], *, started_at: float, timeout_s: float,
    interval_s: float = 0.05,
) -> None:
    """Poll each service's ``/metrics`` until every consumer handled ``expected`` more events.

    ``done_at`` is the poll that saw the last event (at most ``interval_s`` late, which only
    lowers the rate).
    """
    clients = {p.service: LeanHttp(ctx.fleet.url(p.service), size=2) for p in progresses}
    deadline = time.monotonic() + timeout_s
    for p in progresses:
        p.started_at = started_at
    try:
        while time.monotonic() < deadline and any(p.done_at is None for p in progresses):
            counts = {service: await handled_events(client) for service, client in clients.items()}
            now = time.perf_counter()
            for p in progresses:
                p.seen = counts[p.service].get(p.consumer, 0) - p.baseline
                if p.first_at is None and p.seen > 0:
                    p.first_at = now
                if p.done_at is None and p.seen >= p.expected:
                    p.done_at = now
            await asyncio.sleep(interval_s)
    finally:
        for client in clients.values():
            await client.close()


async def baselines(ctx: BenchContext, progresses: Sequence[Progress]) -> None:
    for p in progresses:
        client = LeanHttp(ctx.fleet.url(p.service), size=1)
        try:
            p.baseline = (await handled_events(client)).get(p.consumer, 0)
        finally:
            await client.close()


async def inbox_count(ctx: BenchContext, service: str, consumer: str, event_ids: Iterable[str]) -> int:
    """How many of these events the consumer's inbox holds (applied, in the service's own database)."""
    conn = await asyncpg.connect(ctx.settings.database_dsn(service))
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM inbox WHERE consumer = $1 AND event_id = ANY($2::uuid[])",
            consumer, list(event_ids),
        ))
    finally:
        await conn.close()


# --- Events the scenarios publish -----------------------------------------------------------------------------


def _program_towns() -> frozenset[str]:
    return frozenset(code for program in travel_programs() for code in program.municipality_codes)


def plain_municipalities() -> list[str]:
    """Cities, towns and villages that receive donations and host no travel program, in code order."""
    towns = _program_towns()
    return [
        m.code for m in municipalities().values()
        if m.kind in ("city", "town", "village") and not m.northern_territories and m.code not in towns
    ]


async def sealing_keys(settings: Settings, resident_ids: Sequence[str]) -> dict[str, bytes]:
    """Each resident's data key from the platform's key store (made on first use), fetched before a
    timed window: the scenarios seal personal fields as the producing service does, so the services
    open them with the same store (docs/privacy.md)."""
    keyring = Keyring.from_settings(settings)
    try:
        keys: dict[str, bytes] = {}
        for start in range(0, len(resident_ids), 500):
            chunk = resident_ids[start:start + 500]
            found = await asyncio.gather(*(keyring.key_for_sealing(resident_subject(r)) for r in chunk))
            keys.update(zip(chunk, found, strict=True))
        return keys
    finally:
        await keyring.close()


def sealed_for_resident(keys: Mapping[str, bytes], resident_id: str, value: str | Contact) -> Sealed:
    """``value`` sealed with the resident's key (``sealing_keys``), as ``Keyring.seal`` seals it."""
    plaintext = value.model_dump_json() if isinstance(value, Contact) else value
    kid = resident_subject(resident_id)
    return seal_with(keys[resident_id], kid, plaintext.encode())


def resident_registered(
    resident_id: str, municipality_code: str, *, email: str, keys: Mapping[str, bytes], language: str = "ja",
    email_consent: bool = False, share_with: Sequence[str] = (), now: datetime | None = None,
) -> Envelope:
    """A basic, active first registration as the registration service would announce it: the contact
    sealed with the resident's key (from ``keys``), with the prefecture registration it brought."""
    now = now or datetime.now(UTC)
    town = municipalities()[municipality_code]
    consents = [ConsentState(purpose="share_certificate", partner=p, granted=True, at=now) for p in share_with]
    if email_consent:
        consents.append(ConsentState(purpose="email", granted=True, at=now))
    event = ResidentRegistered(
        resident_id=resident_id, registration_id=f"reg-{resident_id}", municipality_code=municipality_code,
        prefecture_code=town.prefecture_code, tier="basic", status="active", legal_address_code="131016",
        contact=sealed_for_resident(keys, resident_id, Contact(
            name="二地域 太郎", name_kana="ニチイキ タロウ", email=email,
            preferred_language="en" if language == "en" else "ja",
        )),
        consents=consents, registered_at=now,
        derived_prefecture_registration_id=None if town.is_prefecture else f"reg-{resident_id}-prefecture",
    )
    return new_envelope("registration", event, subject=resident_id)


def certificate_issued(
    certificate_number: str, resident_id: str, municipality_code: str, *, partners: Sequence[str] = (),
    valid_from: date | None = None, now: datetime | None = None,
) -> Envelope:
    """A one-year certificate as the certification service would announce it (partners without a
    member number: nothing personal to seal)."""
    now = now or datetime.now(UTC)
    start = valid_from or today_in_japan()
    event = CertificateIssued(
        certificate_number=certificate_number, resident_id=resident_id, municipality_code=municipality_code,
        valid_from=start, valid_until=start + timedelta(days=364), status="valid",
        partners=[SealedMembership(partner=p) for p in partners], application_id=f"app-{certificate_number}",
        issued_at=now,
    )
    return new_envelope("certification", event, subject=certificate_number)


# --- Where the CPU went ---------------------------------------------------------------------------------------


def cpu_note(spent: dict[str, float], seconds: float, per: int, unit: str) -> str:
    parts = [
        f"{group} {value / seconds:.2f} cores ({value / per * 1000:.2f} ms/{unit})"
        for group, value in sorted(spent.items(), key=lambda item: -item[1])
        if value / seconds >= 0.01
    ]
    total = sum(v for k, v in spent.items() if k != OUTSIDE)
    return (
        f"CPU during the window ({seconds:.1f} s, {os.cpu_count()} cores): " + ", ".join(parts)
        + f"; this run in all {total / per * 1000:.2f} ms CPU/{unit}."
    )


def machine_load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores"


class RoundTripProbe:
    """A lone ``SELECT 1`` every few milliseconds on its own connection during a window.

    On a busy machine a sequential chain of database round trips (a consumer batch, one request)
    is paced by how long each hop waits for a CPU, not by what it costs; this shows that wait.
    """

    def __init__(self, dsn: str, every_s: float = 0.005) -> None:
        self.dsn = dsn
        self.every_s = every_s
        self.samples_ms: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RoundTripProbe:
        conn = await asyncpg.connect(self.dsn)

        async def probe() -> None:
            try:
                while True:
                    begun = time.perf_counter()
                    await conn.fetchval("SELECT 1")
                    self.samples_ms.append((time.perf_counter() - begun) * 1000)
                    await asyncio.sleep(self.every_s)
            finally:
                await conn.close()

        self._task = asyncio.create_task(probe())
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def describe(self) -> str:
        if not self.samples_ms:
            return "no round-trip samples"
        ordered = sorted(self.samples_ms)
        p50 = ordered[len(ordered) // 2]
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        return f"a lone SELECT 1 round trip took p50 {p50:.2f} ms, p99 {p99:.2f} ms during the window"
