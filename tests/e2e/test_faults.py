"""Fault injection over the real stack, each test asserting on the final state.

The services run as their own processes. Faults: SIGKILL of a service in the middle of a burst,
PostgreSQL stopped and restarted under load, the broker restarted under load, and a second
replica joining and then taking over when the first is killed.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaProducer

from shared.cli.fleet import ServiceFleet
from shared.contracts.registration import Contact, ResidentRegistered
from shared.contracts.sealed import resident_subject
from shared.contracts.topics import RESIDENTS
from shared.kit.envelope import new_envelope
from shared.kit.settings import Settings
from shared.stack.backends import Backends
from tests.support import bearer, eventually, read_topic, seal_for_tests

pytestmark = pytest.mark.timeout(300)

SHIRAHAMA = "304018"
CHIYODA = "131016"


@pytest.fixture(scope="module")
def fleet(own_settings: Settings, own_backends: Backends, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
    ServiceFleet
]:
    fleet = ServiceFleet(own_settings, own_backends, tmp_path_factory.mktemp("logs"))
    fleet.start(["registration", "certification"])
    yield fleet
    fleet.stop()


@pytest.fixture
async def certification_db(own_settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(own_settings.database_dsn("certification"), min_size=1, max_size=2)
    yield pool
    await pool.close()


@pytest.fixture
async def registration_db(own_settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(own_settings.database_dsn("registration"), min_size=1, max_size=2)
    yield pool
    await pool.close()


def registered(resident_id: str) -> ResidentRegistered:
    """As registration publishes it (v2: the contact sealed). Only certification reads these here,
    and it never opens the contact: the test key seals it."""
    return ResidentRegistered(
        resident_id=resident_id, registration_id=str(uuid.uuid4()), municipality_code=SHIRAHAMA,
        prefecture_code="300004", tier="basic", status="active", legal_address_code=CHIYODA,
        contact=seal_for_tests(resident_subject(resident_id), Contact(
            name="山田 花子", name_kana="ヤマダ ハナコ", email=f"{resident_id}@example.jp",
        )),
        registered_at=datetime.now(UTC),
    )


async def publish_residents(settings: Settings, resident_ids: list[str], *, per_second: float | None = None) -> None:
    """Publish a registration for each resident: at once, or paced (20 at a time) at ``per_second``."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = []
        for index, resident_id in enumerate(resident_ids):
            if per_second is not None and index and index % 20 == 0:
                await asyncio.sleep(20 / per_second)
            envelope = new_envelope("registration", registered(resident_id), subject=resident_id)
            futures.append(await producer.send(
                settings.topic(RESIDENTS.name), envelope.data, key=envelope.key, headers=envelope.headers()
            ))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def count_known(pool: asyncpg.Pool, resident_ids: list[str]) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM residents WHERE resident_id = ANY($1::text[])", resident_ids))


async def register_through_http(fleet: ServiceFleet, settings: Settings, resident_id: str) -> None:
    """Account + basic registration, retried (same Idempotency-Key) until the platform answers."""
    headers = bearer(settings, "resident", subject=resident_id)
    account = {
        "name": "佐藤 太郎", "name_kana": "サトウ タロウ", "email": f"{resident_id[:8]}@example.jp",
        "date_of_birth": "1990-04-01", "legal_address_code": CHIYODA, "preferred_language": "ja",
    }
    steps = [
        ("/v1/residents", account, f"account-{resident_id}"),
        (f"/v1/residents/{resident_id}/registrations", {"municipality_code": SHIRAHAMA, "tier": "basic"},
         f"registration-{resident_id}"),
    ]
    for path, body, key in steps:
        for attempt in range(600):
            try:
                async with httpx.AsyncClient(base_url=fleet.url("registration"), timeout=5) as client:
                    response = await client.post(path, json=body, headers={**headers, "Idempotency-Key": key})
                if response.status_code in (200, 201):
                    break
                assert response.status_code == 503, response.text  # only an outage may refuse us
            except httpx.TransportError:
                pass  # the service is down or restarting
            await asyncio.sleep(min(0.05 * (attempt + 1), 0.5))
        else:
            raise AssertionError(f"{path} never succeeded")


async def outbox_pending(settings: Settings, service: str) -> int:
    conn = await asyncpg.connect(settings.database_dsn(service))
    try:
        return int(await conn.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL"))
    finally:
        await conn.close()


async def outbox_drains(settings: Settings, service: str, timeout: float = 60) -> None:
    """Every outbox row of ``service`` is sent and marked: the relay marks a round's rows with its next
    read, or alone once no commit came for 50 ms, so the last ones are marked a moment after they went."""

    async def drained() -> bool:
        return await outbox_pending(settings, service) == 0

    await eventually(drained, timeout=timeout)


async def test_a_consumer_killed_mid_burst_applies_every_event_exactly_once(
    fleet: ServiceFleet, own_settings: Settings, certification_db: asyncpg.Pool
) -> None:
    residents = [str(uuid.uuid4()) for _ in range(800)]
    # Paced: the consumer applies a burst sent at once faster than the kill can land in its middle.
    publishing = asyncio.create_task(publish_residents(own_settings, residents, per_second=400))

    async def some_applied() -> bool:
        return await count_known(certification_db, residents) >= 200

    await eventually(some_applied, timeout=30)
    fleet.kill("certification")  # SIGKILL: no graceful anything
    assert await count_known(certification_db, residents) < len(residents)
    fleet.restart("certification")
    await publishing

    async def all_applied() -> bool:
        return await count_known(certification_db, residents) == len(residents)

    await eventually(all_applied, timeout=60)
    applied = await certification_db.fetchval(
        "SELECT count(*) FROM resident_registrations WHERE resident_id = ANY($1::text[])", residents
    )
    assert applied == len(residents)  # one registration row each: nothing applied twice


async def test_a_service_killed_mid_requests_loses_no_accepted_request(
    fleet: ServiceFleet, own_settings: Settings, registration_db: asyncpg.Pool, certification_db: asyncpg.Pool
) -> None:
    residents = [str(uuid.uuid4()) for _ in range(60)]
    semaphore = asyncio.Semaphore(12)

    async def one(resident_id: str) -> None:
        async with semaphore:
            await register_through_http(fleet, own_settings, resident_id)

    burst = asyncio.gather(*(one(r) for r in residents))

    async def some_registered() -> bool:
        return bool(await registration_db.fetchval(
            "SELECT count(*) >= 30 FROM registrations WHERE resident_id = ANY($1::text[])", residents
        ))

    await eventually(some_registered, timeout=60)
    fleet.kill("registration")
    await asyncio.sleep(0.5)
    fleet.restart("registration")
    await burst

    municipal = await registration_db.fetchval(
        "SELECT count(*) FROM registrations WHERE resident_id = ANY($1::text[]) AND municipality_code = $2",
        residents, SHIRAHAMA,
    )
    assert municipal == len(residents)

    async def downstream_has_all() -> bool:
        return await count_known(certification_db, residents) == len(residents)

    await eventually(downstream_has_all, timeout=60)
    await outbox_drains(own_settings, "registration", timeout=10)


async def test_a_second_replica_shares_the_work_and_takes_over_when_the_first_dies(
    fleet: ServiceFleet, own_settings: Settings, certification_db: asyncpg.Pool
) -> None:
    second = fleet.add_replica("certification")
    second.wait_ready(90)
    await asyncio.sleep(own_settings.kafka_session_timeout_ms / 1000 * 2)  # the group rebalances
    handled_before = await _handled(second.url)

    # A burst is applied within a fraction of a second, so killing "in the middle" of one is a race:
    # the first burst shows the split, the second arrives after the kill, for the survivor alone.
    first_burst = [str(uuid.uuid4()) for _ in range(1000)]
    await publish_residents(own_settings, first_burst)

    async def first_applied() -> bool:
        return await count_known(certification_db, first_burst) == len(first_burst)

    await eventually(first_applied, timeout=60)
    handled_by_second = await _handled(second.url)
    assert 0 < handled_by_second - handled_before < len(first_burst)  # the replicas split the partitions
    fleet.kill("certification", replica=0)

    second_burst = [str(uuid.uuid4()) for _ in range(1000)]
    await publish_residents(own_settings, second_burst)
    residents = first_burst + second_burst

    async def all_applied() -> bool:
        return await count_known(certification_db, residents) == len(residents)

    await eventually(all_applied, timeout=90)
    # The survivor took over the dead replica's partitions: it applied the whole second burst.
    assert await _handled(second.url) >= handled_by_second + len(second_burst)
    rows = await certification_db.fetchval(
        "SELECT count(*) FROM resident_registrations WHERE resident_id = ANY($1::text[])", residents
    )
    assert rows == len(residents)
    # Back to one replica for the next tests: the restarted first one, the second stopped.
    fleet.processes["certification"][0].start()
    fleet.processes["certification"][0].wait_ready(90)
    second.stop()
    fleet.processes["certification"].remove(second)


async def _handled(url: str) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        metrics = (await client.get("/metrics")).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
        if line.startswith("nichiiki_consumer_events_total{") and 'outcome="handled"' in line
    )


async def test_postgres_restarted_under_load_loses_nothing(
    fleet: ServiceFleet, own_settings: Settings, own_backends: Backends
) -> None:
    residents = [str(uuid.uuid4()) for _ in range(200)]
    semaphore = asyncio.Semaphore(8)

    async def one(resident_id: str) -> None:
        async with semaphore:
            await register_through_http(fleet, own_settings, resident_id)

    burst = asyncio.gather(*(one(r) for r in residents))
    registration_db = await asyncpg.connect(own_settings.database_dsn("registration"))
    try:
        async def some_registered() -> bool:
            return bool(await registration_db.fetchval(
                "SELECT count(*) >= 20 FROM registrations WHERE resident_id = ANY($1::text[])", residents
            ))

        await eventually(some_registered, timeout=60)
    finally:
        await registration_db.close()
    assert own_backends.postgres is not None
    own_backends.postgres.stop()  # fast shutdown: open transactions abort
    assert not burst.done()  # the database goes away in the middle of the requests
    await asyncio.sleep(1.5)
    own_backends.postgres.start()
    await burst

    conn = await asyncpg.connect(own_settings.database_dsn("certification"))
    try:
        async def downstream_has_all() -> bool:
            return await count_known(conn, residents) == len(residents)  # type: ignore[arg-type]

        await eventually(downstream_has_all, timeout=90)
    finally:
        await conn.close()
    await outbox_drains(own_settings, "registration", timeout=10)
    fleet.wait_all_ready()


async def test_the_broker_restarted_under_load_keeps_requests_working_and_the_relay_resends(
    fleet: ServiceFleet, own_settings: Settings, own_backends: Backends
) -> None:
    """Requests keep succeeding while the broker is down (their events wait in the outbox), and
    after the restart the relay reconnects and has every waiting event acknowledged."""
    assert own_backends.broker is not None
    own_backends.broker.kill()
    during = [str(uuid.uuid4()) for _ in range(30)]
    await asyncio.gather(*(register_through_http(fleet, own_settings, r) for r in during))
    assert await outbox_pending(own_settings, "registration") >= len(during)
    own_backends.broker.start()
    after = [str(uuid.uuid4()) for _ in range(30)]
    await asyncio.gather(*(register_through_http(fleet, own_settings, r) for r in after))
    await outbox_drains(own_settings, "registration")
    fleet.wait_all_ready()


@pytest.mark.xfail(
    reason="Tansu keeps its log and consumer groups in memory: after a restart, records acknowledged while "
    "the services recreate topics and re-form groups can be missing (docs/faults.md). A Kafka cluster keeps both.",
    strict=False,
)
async def test_after_a_broker_restart_every_event_reaches_the_consumers(
    fleet: ServiceFleet, own_settings: Settings, certification_db: asyncpg.Pool
) -> None:
    residents = [str(uuid.uuid4()) for _ in range(30)]
    await asyncio.gather(*(register_through_http(fleet, own_settings, r) for r in residents))
    records = await read_topic(
        own_settings, own_settings.topic(RESIDENTS.name),
        until=lambda rs: {r.key.decode() for r in rs if r.key} >= set(residents), timeout=30,
    )
    assert {r.key.decode() for r in records if r.key} >= set(residents)

    async def all_arrived() -> bool:
        return await count_known(certification_db, residents) == len(residents)

    await eventually(all_arrived, timeout=60)
