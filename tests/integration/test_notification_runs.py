"""Notification's set-based consumer over the real database: a batch of mixed events leaves exactly
the rows and events that handling them one at a time leaves, in a handful of statements.

The consumer is the service's own (its router, its migrations) fed crafted records through
``EventConsumer.handle_batch``, as the broker would hand them over.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from asyncpg.connection import LoggedQuery

from services.notification import consumers
from services.notification.handlers import sender_channel
from shared.contracts.base import EventData
from shared.contracts.common import Language
from shared.contracts.notification import InboxMessagesDelivered
from shared.contracts.registration import ConsentChanged, Contact, ContactChanged, ResidentWithdrawn
from shared.contracts.sealed import resident_subject
from shared.kit.consumer import EventConsumer
from shared.kit.envelope import Envelope
from shared.kit.keyring import Keyring
from shared.kit.outbox import Outbox
from shared.kit.settings import Settings
from tests.integration.test_notification import address, envelope_of, resident_id
from tests.support import (
    BrokerRecord,
    EventFeed,
    OpenPool,
    QueryLog,
    assert_batch_is_one_by_one,
    broker_record,
    seal_for_tests,
    sealed_for,
    service_pools,
)
from tests.unit.test_notification_rendering import DECIDED, registration, sample_events

HOKKAIDO = "010006"

MIGRATIONS = Path(consumers.__file__).parent / "migrations"


def consumer_on(settings: Settings, pool: asyncpg.Pool, keyring: Keyring) -> EventConsumer:
    return EventConsumer(
        service="notification", settings=settings, pool=pool, outbox=Outbox("outbox_notification_runs"),
        router=consumers.router, topics=consumers.TOPICS, keyring=keyring,
    )


@pytest.fixture
async def pools(settings: Settings) -> AsyncIterator[OpenPool]:
    """Fresh databases with notification's migrations."""
    async with service_pools(settings, MIGRATIONS) as open_pool:
        yield open_pool


@pytest.fixture
async def keyring(settings: Settings) -> AsyncIterator[Keyring]:
    """The key store the consumer opens contacts with, and the tests seal them with."""
    store = Keyring.from_settings(settings)
    yield store
    await store.close()


async def sealed_envelope(keyring: Keyring, event: EventData) -> Envelope:
    """The event's envelope, its contact sealed with ``keyring`` as registration would."""
    return envelope_of(await sealed_for(keyring, event))


def records(settings: Settings, envelopes: Sequence[Envelope]) -> list[BrokerRecord]:
    """The envelopes as the broker hands them over, in this order (record time follows it)."""
    feed = EventFeed(settings)
    for envelope in envelopes:
        feed.put(envelope)
    return feed.records


def own(settings: Settings, statements: Sequence[LoggedQuery]) -> list[str]:
    """The statements on the service's own tables (and the wake-up of its sender)."""
    return [
        s.query for s in statements
        if any(table in s.query for table in ("residents", "messages", "email_outbox"))
        or s.args == (sender_channel(settings),)
    ]


@dataclass(frozen=True)
class Outcome:
    """What the service keeps and emits, without its own ids and clocks."""

    residents: list[tuple[Any, ...]]
    messages: list[tuple[Any, ...]]
    emails: list[tuple[Any, ...]]
    delivered: list[tuple[Any, ...]]


async def outcome(pool: asyncpg.Pool) -> Outcome:
    residents = await pool.fetch(
        """
        SELECT resident_id, name, email, preferred_language, email_consent, email_consent_at, bounced_email,
               bounce_reason, withdrawn_at
        FROM residents ORDER BY resident_id
        """
    )
    messages = await pool.fetch(
        """
        SELECT id, resident_id, kind, language, subject, body, source_event_id, source_event_type, created_at
        FROM messages ORDER BY created_at, id
        """
    )
    emails = await pool.fetch(
        """
        SELECT resident_id, kind, language, subject, body, source_event_id, source_event_type, status
        FROM email_outbox ORDER BY source_event_id, resident_id
        """
    )
    delivered = []
    created = {row["id"]: row["created_at"] for row in messages}
    for row in await pool.fetch("SELECT payload FROM outbox ORDER BY id"):
        for entry in InboxMessagesDelivered.model_validate(json.loads(row["payload"])).deliveries:
            assert created[uuid.UUID(entry.delivery_id)] == entry.delivered_at  # the message's own row
            delivered.append((entry.resident_id, entry.template, entry.language, entry.source_event_id))
    return Outcome(
        [tuple(row.values()) for row in residents],
        [tuple(row.values())[1:-1] for row in messages],
        [tuple(row.values()) for row in emails],
        delivered,
    )


async def test_a_mixed_batch_leaves_what_one_event_at_a_time_leaves(
    settings: Settings, pools: OpenPool, keyring: Keyring
) -> None:
    emma, bo, chris, dana, eri, stranger, gone = (resident_id() for _ in range(7))
    samples = {r: sample_events(r) for r in (emma, bo, chris, dana, eri, stranger, gone)}
    # Before the batch: a resident who withdrew, and an event whose message exists but whose inbox
    # row is gone (as after a replay): it must not make a second message or a delivery record.
    already = envelope_of(samples[dana]["certificate_issued"])
    before = [
        await sealed_envelope(keyring, registration(gone, email=address(gone))),
        envelope_of(ResidentWithdrawn(resident_id=gone, withdrawn_at=DECIDED)),
        await sealed_envelope(keyring, registration(dana, name="Dana Lee", email=address(dana), language="en")),
        already,
    ]
    copy = envelope_of(samples[emma]["certificate_issued"])
    batch = [
        await sealed_envelope(keyring, registration(emma, name="Emma Brown", email=address(emma), language="en",
                                                    derived_prefecture=f"reg-{emma}-pref")),
        # A registration with a prefecture itself (北海道): the same contact and consent again, its own message.
        await sealed_envelope(keyring, registration(emma, name="Emma Brown", email=address(emma), language="en",
                                                    municipality=HOKKAIDO, prefecture=HOKKAIDO)),
        copy,
        copy,  # a duplicate in the same batch
        envelope_of(ConsentChanged(resident_id=emma, purpose="email", granted=False, at=DECIDED + timedelta(hours=1))),
        envelope_of(samples[emma]["grant_issued"]),  # inbox only from now on
        await sealed_envelope(keyring, registration(bo, name="Bo", email=address(bo), email_consent=False)),
        envelope_of(samples[bo]["receipt_issued"]),
        envelope_of(samples[stranger]["application_received"]),  # never registered: Japanese, no e-mail
        envelope_of(samples[chris]["application_received"]),  # before Chris is known ...
        await sealed_envelope(keyring, registration(chris, name="Chris Wu", email=address(chris), language="en")),
        envelope_of(samples[chris]["certificate_issued"]),  # ... and after
        # A stale consent (older than the registration's) changes nothing.
        envelope_of(ConsentChanged(resident_id=bo, purpose="email", granted=True, at=DECIDED - timedelta(days=2))),
        envelope_of(samples[gone]["certificate_revoked"]),  # withdrawn: no message
        # A late copy of their registration (its key still opens: the erasure ledger drops it).
        await sealed_envelope(keyring, registration(gone, name="Gone Again", email=address(gone))),
        already,
        await sealed_envelope(keyring, registration(eri, email=address(eri), status="pending_review", tier="premium")),
        envelope_of(samples[eri]["premium_requested"]),
        envelope_of(ConsentChanged(resident_id=bo, purpose="newsletter", granted=True, at=DECIDED)),
    ]

    async def forget_already(pool: asyncpg.Pool) -> None:
        await pool.execute("DELETE FROM inbox WHERE event_id = $1", already.id)
        await pool.execute("DELETE FROM outbox")

    result = await assert_batch_is_one_by_one(
        pools, lambda pool: consumer_on(settings, pool, keyring), history=records(settings, before),
        batch=records(settings, batch), snapshot=outcome, after_history=forget_already, label="notification_runs",
    )
    got, statements = result.snapshot, own(settings, result.statements)
    assert result.stats.parked == result.one_by_one_stats.parked == 0

    kinds = {(m[0], m[1], m[2]) for m in got.messages}
    assert [(m[0], m[1], m[2]) for m in got.messages if m[0] != dana] == [
        (emma, "registration_confirmed", "en"), (emma, "prefecture_registration_confirmed", "en"),
        (emma, "certificate_issued", "en"), (emma, "grant_issued", "en"),
        (bo, "registration_confirmed", "ja"), (bo, "receipt_issued", "ja"),
        (stranger, "application_received", "ja"),
        (chris, "application_received", "ja"), (chris, "registration_confirmed", "en"),
        (chris, "certificate_issued", "en"),
        (eri, "premium_requested", "ja"),
    ]
    assert len([k for k in kinds if k[0] == dana]) == 2  # from before the batch, once each
    by_event = {(m[0], m[1]): m for m in got.messages}
    assert "Emma Brown" in by_event[(emma, "certificate_issued")][4]
    assert "Chris Wu" not in by_event[(chris, "application_received")][4]
    assert "Chris Wu" in by_event[(chris, "certificate_issued")][4]
    assert sorted((e[0], e[1]) for e in got.emails if e[0] != dana) == sorted([
        (emma, "registration_confirmed"), (emma, "prefecture_registration_confirmed"), (emma, "certificate_issued"),
        (chris, "registration_confirmed"), (chris, "certificate_issued"),
        (eri, "premium_requested"),
    ])
    assert [(d[0], d[1]) for d in got.delivered] == [(m[0], m[1]) for m in got.messages if m[0] != dana]
    consent = {row[0]: row[4] for row in got.residents}
    assert (consent[emma], consent[bo], consent[chris], consent[gone]) == (False, False, True, False)
    [tombstone] = [row for row in got.residents if row[0] == gone]
    assert tombstone[1:3] == (None, None) and tombstone[-1] is not None  # no name, no address, still erased

    # The erasure ledger, then three chunks (the consent after Emma's message, Chris's registration
    # after his message cut the run) of two statements each: the residents saved and read back,
    # then the messages and e-mails, which wake the sender (PostgreSQL delivers a channel's identical
    # notifications of one transaction once, at commit).
    assert len(statements) == 1 + 3 * 2, statements
    assert all("pg_notify" in s for s in statements if "INSERT INTO messages" in s)


async def test_a_burst_of_registrations_and_decisions_costs_three_statements(
    settings: Settings, pools: OpenPool, keyring: Keyring
) -> None:
    residents = [resident_id() for _ in range(200)]
    events: list[EventData] = []
    for i, resident in enumerate(residents):
        language: Language = "en" if i % 2 else "ja"
        events.append(registration(resident, email=address(resident), language=language,
                                   derived_prefecture=f"reg-{resident}-pref"))
    events += [sample_events(resident)["certificate_issued"] for resident in residents]
    log = QueryLog()
    pool = await pools("notification_runs", log)
    consumer = consumer_on(settings, pool, keyring)
    batch = records(settings, [await sealed_envelope(keyring, event) for event in events])
    statements = own(settings, await log.of_batch(consumer, batch))

    # The erasure ledger; the contacts and consents saved and the residents read back; the messages,
    # e-mails and the sender's wake-up (the 200 contacts are opened with one look-up in the key store).
    assert len(statements) == 3, statements
    assert "pg_notify" in statements[-1]
    counts = await pool.fetchrow(
        """
        SELECT (SELECT count(*) FROM messages) AS messages, (SELECT count(*) FROM email_outbox) AS emails,
               (SELECT count(*) FROM residents) AS residents, (SELECT count(*) FROM outbox) AS records,
               (SELECT sum(jsonb_array_length(convert_from(payload, 'UTF8')::jsonb -> 'deliveries'))
                FROM outbox) AS delivered
        """
    )
    assert counts is not None
    # The 400 inbox messages are recorded 100 to a record.
    assert dict(counts) == {"messages": 400, "emails": 400, "residents": 200, "records": 4, "delivered": 400}
    assert consumer.stats.handled == len(events)


# -- erasure: nothing comes back ------------------------------------------------------------------


async def personal_rows(pool: asyncpg.Pool, resident: str) -> dict[str, Any]:
    """What the service holds about one resident."""
    row = await pool.fetchrow("SELECT name, email, withdrawn_at FROM residents WHERE resident_id = $1", resident)
    return {
        "contact": None if row is None else (row["name"], row["email"]),
        "erased": row is not None and row["withdrawn_at"] is not None,
        "messages": await pool.fetchval("SELECT count(*) FROM messages WHERE resident_id = $1", resident),
        "emails": await pool.fetchval("SELECT count(*) FROM email_outbox WHERE resident_id = $1", resident),
        "ledger": await pool.fetchval("SELECT count(*) FROM kit_erased_residents WHERE resident_id = $1", resident),
    }


async def test_a_registration_dead_letter_replayed_after_the_erasure_changes_nothing(
    settings: Settings, pools: OpenPool, keyring: Keyring
) -> None:
    """The registration is parked (a fault, fixed later), the person is erased, then the dead
    letter is replayed: the contact does not come back, no message is written, nothing is parked."""
    gone, neighbour = resident_id(), resident_id()
    pool = await pools("notification_dlq_replay")
    consumer = consumer_on(settings, pool, keyring)
    # The fault: saving this resident's contact fails (until "the fix is deployed" below).
    await pool.execute(
        f"""
        CREATE FUNCTION refuse_resident() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'broken for now'; END $$;
        CREATE TRIGGER refuse_resident BEFORE INSERT OR UPDATE ON residents FOR EACH ROW
            WHEN (NEW.resident_id = '{gone}') EXECUTE FUNCTION refuse_resident();
        """
    )
    parked = await sealed_envelope(keyring, registration(gone, name="消去 花子", email=address(gone)))
    feed = EventFeed(settings)
    feed.put(parked)
    await consumer.handle_batch(feed.records)
    assert consumer.stats.parked == 1
    dead_letter_id = await pool.fetchval(
        "SELECT dead_letter_id FROM inbox WHERE event_id = $1 AND status = 'parked'", parked.id
    )
    assert dead_letter_id is not None
    await pool.execute("DROP TRIGGER refuse_resident ON residents")

    erasure = envelope_of(ResidentWithdrawn(resident_id=gone, withdrawn_at=DECIDED))
    feed = EventFeed(settings)
    feed.put(erasure)
    await consumer.handle_batch(feed.records)
    erased = await personal_rows(pool, gone)
    assert erased == {"contact": (None, None), "erased": True, "messages": 0, "emails": 0, "ledger": 1}

    # ``nichiiki dlq replay``: the same record, naming its dead letter, with a neighbour's event.
    topic = settings.topic(parked.data_model().event_topic)
    neighbours = await sealed_envelope(keyring, registration(neighbour, email=address(neighbour)))
    await consumer.handle_batch([
        broker_record(topic, 10, parked.key, parked.data,
                      [*parked.headers(), ("dlq_replay", str(dead_letter_id).encode())]),
        broker_record(topic, 11, neighbours.key, neighbours.data, neighbours.headers()),
    ])
    assert await personal_rows(pool, gone) == erased
    assert consumer.stats.parked == 1  # dropped as erased, not parked again
    assert await pool.fetchval("SELECT status FROM inbox WHERE event_id = $1", parked.id) == "done"
    assert (await personal_rows(pool, neighbour))["messages"] == 1  # the rest of the batch applies


async def test_a_contact_whose_key_was_shredded_is_not_kept(
    settings: Settings, pools: OpenPool, keyring: Keyring
) -> None:
    """Registration has erased the person (their key is gone) but the withdrawal has not arrived:
    their late registration and contact change store nothing and tell no one, and are not errors."""
    gone = resident_id()
    pool = await pools("notification_shredded")
    consumer = consumer_on(settings, pool, keyring)
    registered = await sealed_envelope(keyring, registration(gone, email=address(gone)))
    changed = envelope_of(await sealed_for(keyring, ContactChanged(
        resident_id=gone, at=DECIDED,
        contact=seal_for_tests(resident_subject(gone), Contact(name="n", name_kana="エヌ", email=address(gone))),
    )))
    await keyring.shred(resident_subject(gone))  # registration's erasure
    feed = EventFeed(settings)
    feed.put(registered)
    feed.put(changed)
    await consumer.handle_batch(feed.records)
    assert consumer.stats.parked == 0 and consumer.stats.handled == 2
    assert await personal_rows(pool, gone) == {
        "contact": None, "erased": False, "messages": 0, "emails": 0, "ledger": 0,
    }
