"""Listings' projections of where residents belong, applied set-based: one batch of mixed
registrations, certificates and an erasure leaves exactly the rows that one event per batch leaves,
an erased person's later events write nothing, and a run costs one insert (which looks at the erased itself).

The consumer's ``handle_batch`` is called directly with crafted records, on fresh databases with the
service's migrations: no broker, no service.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from typing import Any

import asyncpg
import pytest

from services.listings import consumers
from services.listings.main import MIGRATIONS, SERVICE
from shared.contracts.certification import CertificateIssued, CertificateRenewed
from shared.contracts.registration import ResidentWithdrawn
from shared.kit.consumer import EventConsumer
from shared.kit.outbox import Outbox
from shared.kit.settings import Settings
from tests.support import EventFeed, OpenPool, assert_batch_is_one_by_one, membership, service_pools, table_rows
from tests.unit.test_notification_rendering import registration

pytestmark = pytest.mark.stack

SHIRAHAMA, TANABE = "304018", "302066"
WAKAYAMA = "300004"
NOW = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)


def consumer_on(settings: Settings, pool: asyncpg.Pool) -> EventConsumer:
    return EventConsumer(
        service=SERVICE, settings=settings, pool=pool, outbox=Outbox("listings_runs_test"),
        router=consumers.router, topics=list(consumers.TOPICS), name=SERVICE,
    )


@pytest.fixture
async def pools(settings: Settings) -> AsyncIterator[OpenPool]:
    async with service_pools(settings, MIGRATIONS) as open_pool:
        yield open_pool


async def state(pool: asyncpg.Pool) -> dict[str, list[dict[str, Any]]]:
    return {
        "registrations": await table_rows(pool, "SELECT * FROM resident_registrations ORDER BY registration_id"),
        "certificates": await table_rows(pool, "SELECT * FROM resident_certificates ORDER BY certificate_number"),
    }


def issued(resident_id: str, municipality: str) -> CertificateIssued:
    return CertificateIssued(
        certificate_number=f"C-{municipality}-n{uuid.uuid4().hex[:8]}", resident_id=resident_id,
        municipality_code=municipality, valid_from=date(2026, 4, 1), valid_until=date(2027, 3, 31), status="valid",
        partners=[membership("jal", resident_id=resident_id)], application_id=f"app-{uuid.uuid4().hex[:8]}",
        issued_at=NOW,
    )


def renewed(certificate: CertificateIssued) -> CertificateRenewed:
    return CertificateRenewed(
        **certificate.model_dump(exclude={"application_id", "issued_at", "valid_until"}),
        valid_until=date(2028, 3, 31), renewed_at=NOW,
    )


def resident() -> str:
    return f"res-{uuid.uuid4().hex[:8]}"


async def test_one_batch_of_registrations_certificates_and_an_erasure_leaves_what_one_by_one_leaves(
    settings: Settings, pools: OpenPool
) -> None:
    a, b, c, erased_before, erased_between = (resident() for _ in range(5))
    history = EventFeed(settings)
    history.add(registration(erased_before), subject=erased_before)
    history.add(ResidentWithdrawn(resident_id=erased_before, withdrawn_at=NOW), subject=erased_before)

    feed = EventFeed(settings, source="registration")
    # With the prefecture registration it brought (和歌山県): a's place there too.
    first = feed.add(registration(a, derived_prefecture=f"reg-{a}-{WAKAYAMA}"), subject=a)
    feed.add(registration(a, municipality=TANABE, prefecture=WAKAYAMA), subject=a)
    feed.add(registration(b, status="pending_review", tier="premium"), subject=b)
    feed.add(registration(c, status="withdrawn"), subject=c)  # not where c belongs
    feed.add(registration(erased_before), subject=erased_before)  # late: dropped
    feed.add(registration(erased_between), subject=erased_between)
    feed.again(first)  # a redelivery in the same batch
    certificate_a, certificate_late = issued(a, SHIRAHAMA), issued(erased_before, SHIRAHAMA)
    certificate_between = issued(erased_between, SHIRAHAMA)
    for certificate in (certificate_a, certificate_late, certificate_between):
        feed.add(certificate, subject=certificate.certificate_number, source="certification")
    feed.add(renewed(certificate_a), subject=certificate_a.certificate_number, source="certification")
    # erased in the middle of the batch: what came before is erased with them, nothing after is written
    feed.add(ResidentWithdrawn(resident_id=erased_between, withdrawn_at=NOW), subject=erased_between)
    feed.add(registration(erased_between, municipality=TANABE, prefecture=WAKAYAMA), subject=erased_between)
    feed.add(issued(erased_between, TANABE), subject="late", source="certification")

    outcome = await assert_batch_is_one_by_one(
        pools, lambda pool: consumer_on(settings, pool), history=history.records, batch=feed.records,
        snapshot=state, label="lst",
    )
    rows = outcome.snapshot
    assert [(r["resident_id"], r["municipality_code"]) for r in rows["registrations"]] == sorted(
        [(a, SHIRAHAMA), (a, WAKAYAMA), (a, TANABE), (b, SHIRAHAMA)], key=lambda r: f"reg-{r[0]}-{r[1]}",
    )
    assert [r["certificate_number"] for r in rows["certificates"]] == [certificate_a.certificate_number]
    # set-based: each run of registrations or certificates is one insert, which looks at the erased
    # itself (no statement of its own for that): the first run of registrations, the run of
    # certificates, and the registration and the certificate after the erasure (which write nothing)
    inserts = [q for q in outcome.transaction if q.startswith("INSERT INTO resident_")]
    looks = [q for q in outcome.transaction if "FROM kit_erased_residents" in q]
    assert len(inserts) == 4, inserts
    assert looks == inserts, looks
