"""Notification over the real stack: broker, PostgreSQL and a real SMTP server on loopback.

Each test runs the service in-process against its own database (a fresh ``db_prefix``) and its
own SMTP sink, and feeds it by publishing upstream contract events to the (prefixed) topics.
Residents are unique per test, so events other tests leave on the shared topics never count.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from aiokafka import ConsumerRecord
from fastapi import FastAPI

from services.notification import store
from services.notification.domain import RetryPolicy
from services.notification.mailer import OutgoingEmail, SmtpConnection, parse_smtp_url
from services.notification.main import create_app
from services.notification.sender import EmailSender, MailerConfig
from shared.contracts.base import EventData
from shared.contracts.common import Language
from shared.contracts.notification import InboxDelivery, InboxMessagesDelivered, MessageDelivered, MessageFailed
from shared.contracts.registration import (
    ConsentChanged,
    Contact,
    ContactChanged,
    ResidentRegistered,
    ResidentWithdrawn,
)
from shared.contracts.sealed import resident_subject
from shared.contracts.topics import DELIVERIES
from shared.kit.envelope import Envelope, new_envelope, parse_envelope
from shared.kit.keyring import Keyring
from shared.kit.service import ServiceRuntime
from shared.kit.settings import Settings
from shared.stack.ports import free_port
from shared.stack.smtp_sink import SmtpSink
from tests.support import bearer, eventually, produce, read_topic, seal_for_tests, sealed_for, service_client
from tests.unit.test_notification_rendering import (
    DECIDED,
    EXPECTED,
    SHIRAHAMA,
    WAKAYAMA,
    registration,
    sample_events,
)

FAST = MailerConfig(
    retry=RetryPolicy(base=timedelta(milliseconds=200), cap=timedelta(seconds=1), max_attempts=6),
    lease=timedelta(seconds=30), batch_size=10, workers=2, poll_interval_s=0.1, smtp_timeout_s=5,
)

# -- harness ------------------------------------------------------------------------------------


def own_settings(settings: Settings, smtp_url: str | None) -> Settings:
    """The session's broker and topics, a database of this test's own, and this test's SMTP server."""
    return settings.model_copy(
        update={"smtp_url": smtp_url, "db_prefix": f"{settings.db_prefix}_n{uuid.uuid4().hex[:6]}"}
    )


@dataclass
class Running:
    app: FastAPI
    client: httpx.AsyncClient
    settings: Settings

    @property
    def runtime(self) -> ServiceRuntime:
        runtime: ServiceRuntime = self.app.state.runtime
        return runtime

    @property
    def pool(self) -> asyncpg.Pool:
        return self.runtime.pool

    @property
    def sender(self) -> EmailSender:
        sender: EmailSender = self.runtime.state["email_sender"]
        return sender


@contextlib.asynccontextmanager
async def running(settings: Settings, mailer: MailerConfig = FAST) -> AsyncIterator[Running]:
    app = create_app(settings, mailer=mailer)

    async with service_client(app) as client:
        yield Running(app, client, settings)


def resident_id() -> str:
    # 11 hex digits: never twelve digits in a row, the shape of a My Number, which the guard refuses
    return f"r-{uuid.uuid4().hex[:11]}"


def address(resident: str) -> str:
    return f"{resident}@example.jp"


def envelope_of(event: EventData) -> Envelope:
    """The envelope the producing service would publish (subject and key as its topic says)."""
    data: Any = event
    subject = {
        "registration.residents.v1": lambda: data.resident_id,
        "certification.applications.v1": lambda: data.application_id,
        "certification.certificates.v1": lambda: data.certificate_number,
        "subsidy.grants.v1": lambda: data.certificate_number,
        # The one-stop voiding spans municipalities: keyed by donor here (this consumer ignores keys).
        "donation.donations.v1": lambda: getattr(data, "municipality_code", None) or data.donor_id,
        "listings.digests.v1": lambda: data.resident_id,
    }[event.event_topic]()
    service = event.event_topic.split(".")[0]
    return new_envelope(service, event, subject=subject)


async def sealed(settings: Settings, *events: EventData) -> list[EventData]:
    """The events with their contacts sealed with the key store of ``settings``, as registration
    seals them (the events are built with the tests' key)."""
    keyring = Keyring.from_settings(settings)
    try:
        return [await sealed_for(keyring, event) for event in events]
    finally:
        await keyring.close()


async def publish(settings: Settings, *events: EventData | Envelope, times: int = 1) -> list[Envelope]:
    """Publish each event (sealed as registration seals it; or the same envelope again) ``times``
    times, in order."""
    built = [item for item in events if not isinstance(item, Envelope)]
    resealed = iter(await sealed(settings, *built) if built else [])
    envelopes = [item if isinstance(item, Envelope) else envelope_of(next(resealed)) for item in events]
    by_topic: dict[str, list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]]] = {}
    for _ in range(times):
        for envelope in envelopes:
            topic = settings.topic(envelope.data_model().event_topic)
            by_topic.setdefault(topic, []).append((envelope.key, envelope.data, envelope.headers()))
    for topic, records in by_topic.items():  # order holds within a topic, as it would in production
        await produce(settings, topic, records)
    return envelopes


async def registered(run: Running, *events: ResidentRegistered) -> None:
    """Publish registrations and wait until the contact projection has them."""
    await publish(run.settings, *events)
    ids = [event.resident_id for event in events]

    async def known() -> bool:
        count = await run.pool.fetchval(
            "SELECT count(*) FROM residents WHERE resident_id = ANY($1::text[]) AND name IS NOT NULL", ids
        )
        return bool(count == len(set(ids)))

    await eventually(known, timeout=20)


async def messages_of(pool: asyncpg.Pool, resident: str) -> list[asyncpg.Record]:
    return await pool.fetch("SELECT * FROM messages WHERE resident_id = $1 ORDER BY created_at, id", resident)


async def resident_row(pool: asyncpg.Pool, resident: str) -> asyncpg.Record:
    row = await pool.fetchrow("SELECT * FROM residents WHERE resident_id = $1", resident)
    assert row is not None
    return row


async def emails_of(pool: asyncpg.Pool, resident: str) -> list[asyncpg.Record]:
    return await pool.fetch("SELECT * FROM email_outbox WHERE resident_id = $1 ORDER BY created_at, id", resident)


def mail_to(sink: SmtpSink, recipient: str) -> list[EmailMessage]:
    return [m for m in sink.received if recipient in str(m.get("X-Envelope-To", ""))]


async def wait_for_rows(pool: asyncpg.Pool, sql: str, *args: object, count: int, timeout: float = 20) -> None:
    async def reached() -> bool:
        return bool(await pool.fetchval(sql, *args) >= count)

    await eventually(reached, timeout=timeout)


async def wait_for_status(pool: asyncpg.Pool, resident: str, status: str, count: int) -> None:
    await wait_for_rows(
        pool, "SELECT count(*) FROM email_outbox WHERE resident_id = $1 AND status = $2", resident, status, count=count
    )


async def consumed(run: Running, envelopes: Sequence[Envelope]) -> None:
    """Wait until the service's consumer has taken every one of these events (its inbox rows)."""
    ids = [envelope.id for envelope in envelopes]
    await wait_for_rows(run.pool, "SELECT count(*) FROM inbox WHERE event_id = ANY($1::uuid[])", ids, count=len(ids))


async def wait_for_consent(pool: asyncpg.Pool, resident: str, granted: bool) -> None:
    await wait_for_rows(
        pool, "SELECT count(*) FROM residents WHERE resident_id = $1 AND email_consent = $2", resident, granted,
        count=1,
    )


async def wait_for_mail(sink: SmtpSink, recipient: str, count: int, timeout: float = 20) -> list[EmailMessage]:
    async def arrived() -> bool:
        return len(mail_to(sink, recipient)) >= count

    await eventually(arrived, timeout=timeout)
    return mail_to(sink, recipient)


@dataclass(frozen=True)
class Recorded:
    """One delivery on notification.deliveries.v1: an e-mail's record, or one message of an inbox record."""

    record: ConsumerRecord[bytes, bytes]
    event: MessageDelivered | MessageFailed | InboxMessagesDelivered
    entry: MessageDelivered | MessageFailed | InboxDelivery

    @property
    def channel(self) -> str:
        return "inbox" if isinstance(self.entry, InboxDelivery) else self.entry.channel

    @property
    def kind(self) -> tuple[str, str]:
        return type(self.event).__name__, self.channel


async def deliveries_for(settings: Settings, residents: Sequence[str], *, until: int) -> list[Recorded]:
    """The deliveries on notification.deliveries.v1 to these residents (once ``until`` of them arrived)."""
    wanted = set(residents)

    def decode(records: list[ConsumerRecord[bytes, bytes]]) -> list[Recorded]:
        found = []
        for record in records:
            envelope = parse_envelope(record.headers, record.value, record.key)
            event = envelope.data_model()
            assert isinstance(event, MessageDelivered | MessageFailed | InboxMessagesDelivered)
            entries = event.deliveries if isinstance(event, InboxMessagesDelivered) else [event]
            found += [Recorded(record, event, entry) for entry in entries if entry.resident_id in wanted]
        return found

    records = await read_topic(
        settings, settings.topic(DELIVERIES.name), until=lambda recs: len(decode(recs)) >= until, timeout=20
    )
    return decode(records)


@contextlib.asynccontextmanager
async def smtp_sink(tmp_path: Path, port: int | None = None, *, start: bool = True) -> AsyncIterator[SmtpSink]:
    sink = SmtpSink(tmp_path / f"mail-{uuid.uuid4().hex[:6]}", port=port or free_port())
    if start:
        await asyncio.to_thread(sink.start)
    try:
        yield sink
    finally:
        await asyncio.to_thread(sink.stop)


# -- every kind, both languages, both channels --------------------------------------------------


async def test_every_decision_reaches_inbox_and_email_in_the_residents_language(
    settings: Settings, tmp_path: Path
) -> None:
    ja, en = resident_id(), resident_id()
    languages: tuple[tuple[str, Language, str], ...] = ((ja, "ja", "山田 太郎"), (en, "en", "Emma Brown"))
    async with smtp_sink(tmp_path) as sink, running(own_settings(settings, sink.url)) as run:
        await registered(
            run,
            # Each registers with 和歌山県 itself, then with 白浜町 in it: one confirmation each, in words of its own.
            *(registration(r, name=name, email=address(r), language=language, municipality=municipality)
              for r, language, name in languages for municipality in (WAKAYAMA, SHIRAHAMA)),
        )
        registrations = ("registration_confirmed", "prefecture_registration_confirmed")
        events = [e for r in (ja, en) for kind, e in sample_events(r).items() if kind not in registrations]
        await publish(run.settings, *events)
        kinds = len(EXPECTED)
        for resident in (ja, en):
            await wait_for_rows(
                run.pool, "SELECT count(*) FROM messages WHERE resident_id = $1", resident, count=kinds
            )
            await wait_for_mail(sink, address(resident), kinds)
            await wait_for_status(run.pool, resident, "sent", kinds)

        for resident, language, name in languages:
            inbox = {row["kind"]: row for row in await messages_of(run.pool, resident)}
            assert set(inbox) == set(EXPECTED)  # one message of each kind
            emails = {row["kind"]: row for row in await emails_of(run.pool, resident)}
            mail = {m["X-Nichiiki-Template"]: m for m in mail_to(sink, address(resident))}
            assert len(mail_to(sink, address(resident))) == kinds
            for kind, expected in EXPECTED.items():
                message = inbox[kind]
                assert message["language"] == language and message["read_at"] is None
                text = message["subject"] + "\n" + message["body"]
                assert name in message["body"]
                for fragment in expected[language]:
                    assert fragment in text, (kind, language, fragment)
                email = mail[kind]
                assert email["Subject"] == message["subject"]
                assert email.get_content().replace("\r\n", "\n") == message["body"]
                assert email["Message-ID"] == f"<{emails[kind]['id']}@nichiiki.jp>"
                assert email["Content-Language"] == language
                assert emails[kind]["status"] == "sent" and emails[kind]["attempts"] == 1

        # What was sent is on notification.deliveries.v1, without any personal data: each e-mail keyed
        # by its resident, the inbox messages a transaction wrote in one record keyed by its first.
        delivered = await deliveries_for(run.settings, [ja, en], until=4 * kinds)
        assert len(delivered) == 4 * kinds
        for found in delivered:
            headers = dict(found.record.headers)
            assert headers["ce_type"] == found.event.event_type.encode()
            if isinstance(found.event, InboxMessagesDelivered):
                key = found.event.deliveries[0].delivery_id
            else:
                assert isinstance(found.event, MessageDelivered)
                key = found.event.resident_id
            assert found.record.key == key.encode() == headers["ce_subject"]
            for personal in (b"Emma", "山田".encode(), b"example.jp", "証明書".encode()):
                assert personal not in (found.record.value or b"")
        assert {found.kind for found in delivered} == {
            ("InboxMessagesDelivered", "inbox"), ("MessageDelivered", "email"),
        }
        by_channel = {(found.entry.resident_id, found.channel, found.entry.template) for found in delivered}
        assert by_channel == {(r, c, kind) for r in (ja, en) for c in ("inbox", "email") for kind in EXPECTED}
        # Each record names the row it records: the inbox message, or the e-mail.
        rows = {
            "inbox": {str(m["id"]) for r in (ja, en) for m in await messages_of(run.pool, r)},
            "email": {str(e["id"]) for r in (ja, en) for e in await emails_of(run.pool, r)},
        }
        assert {c: {f.entry.delivery_id for f in delivered if f.channel == c} for c in rows} == rows


# -- exactly once -------------------------------------------------------------------------------


async def test_redelivered_events_make_one_message_and_one_email(settings: Settings, tmp_path: Path) -> None:
    resident = resident_id()
    async with smtp_sink(tmp_path) as sink, running(own_settings(settings, sink.url)) as run:
        envelopes = await publish(run.settings, registration(resident, email=address(resident)), times=2)
        await wait_for_mail(sink, address(resident), 1)
        samples = sample_events(resident)
        decisions = [samples["certificate_issued"], samples["grant_issued"], samples["receipt_issued"]]
        envelopes = [envelope_of(e) for e in decisions]
        await publish(run.settings, *envelopes, times=2)  # every envelope twice, same ce_id
        await wait_for_mail(sink, address(resident), 4)
        await wait_for_status(run.pool, resident, "sent", 4)

        async def all_seen() -> bool:
            return sum(c.stats.duplicates for c in run.runtime.consumers) >= 4

        await eventually(all_seen, timeout=20)
        await asyncio.sleep(0.5)  # give a wrong second send the time to show
        assert len(await messages_of(run.pool, resident)) == 4
        assert [r["status"] for r in await emails_of(run.pool, resident)] == ["sent"] * 4
        assert len(mail_to(sink, address(resident))) == 4
        delivered = await deliveries_for(run.settings, [resident], until=8)
        assert sorted(found.channel for found in delivered) == ["email"] * 4 + ["inbox"] * 4


async def test_an_smtp_server_failing_the_first_attempts_gets_the_mail_once_later(
    settings: Settings, tmp_path: Path
) -> None:
    resident = resident_id()
    async with smtp_sink(tmp_path) as sink, running(own_settings(settings, sink.url)) as run:
        sink.fail_next(2)  # 451 to the first two RCPT/DATA commands
        await publish(run.settings, registration(resident, email=address(resident)))
        await wait_for_status(run.pool, resident, "sent", 1)
        [email] = await emails_of(run.pool, resident)
        assert email["attempts"] == 3
        assert email["last_error"].startswith("451")
        assert email["recipient"] == address(resident)
        await asyncio.sleep(0.5)
        assert len(mail_to(sink, address(resident))) == 1
        delivered = await deliveries_for(run.settings, [resident], until=2)
        assert sorted(found.kind for found in delivered) == [
            ("InboxMessagesDelivered", "inbox"), ("MessageDelivered", "email"),
        ]


async def test_an_smtp_outage_is_retried_with_backoff_until_the_server_is_back(
    settings: Settings, tmp_path: Path
) -> None:
    resident = resident_id()
    async with smtp_sink(tmp_path, start=False) as sink, running(own_settings(settings, sink.url)) as run:
        await publish(run.settings, registration(resident, email=address(resident)))
        await wait_for_rows(
            run.pool, "SELECT count(*) FROM email_outbox WHERE resident_id = $1 AND attempts >= 2", resident, count=1
        )
        [email] = await emails_of(run.pool, resident)
        assert email["status"] in ("pending", "sending")
        assert "refused" in email["last_error"].lower()
        assert email["next_attempt_at"] > email["last_attempt_at"]  # backing off, not spinning
        await asyncio.to_thread(sink.start)
        await wait_for_mail(sink, address(resident), 1)
        await wait_for_status(run.pool, resident, "sent", 1)
        assert len(mail_to(sink, address(resident))) == 1
        # Inbox delivery never waited for the mail server.
        assert [m["kind"] for m in await messages_of(run.pool, resident)] == ["registration_confirmed"]


async def test_a_permanently_refused_address_is_recorded_and_never_retried(settings: Settings, tmp_path: Path) -> None:
    resident = resident_id()
    bad, good = address(resident), f"new-{resident}@example.jp"
    async with smtp_sink(tmp_path) as sink, running(own_settings(settings, sink.url)) as run:
        sink.reject_address(bad)
        await registered(run, registration(resident, email=bad))
        await wait_for_status(run.pool, resident, "failed", 1)
        # A second message to the refused address fails at once, without bothering the server.
        await publish(run.settings, sample_events(resident)["certificate_issued"])
        await wait_for_status(run.pool, resident, "failed", 2)
        await asyncio.sleep(1.5)  # several backoff periods: nothing is retried
        first, second = await emails_of(run.pool, resident)
        assert (first["status"], first["attempts"]) == ("failed", 1)
        assert first["last_error"].startswith("550") and bad not in first["last_error"]
        assert (second["status"], second["attempts"]) == ("failed", 1)
        assert "refused permanently before" in second["last_error"]
        contact = await resident_row(run.pool, resident)
        assert contact["bounced_email"] == bad and contact["bounce_reason"].startswith("550")
        assert mail_to(sink, bad) == []
        assert len(await messages_of(run.pool, resident)) == 2  # the inbox got both

        failures = [
            found.entry for found in await deliveries_for(run.settings, [resident], until=4)
            if isinstance(found.entry, MessageFailed)
        ]
        assert len(failures) == 2
        assert {f.template for f in failures} == {"registration_confirmed", "certificate_issued"}
        assert all(bad not in f.reason for f in failures)

        # A new address gets a fresh chance.
        await publish(run.settings, ContactChanged(
            resident_id=resident, at=DECIDED, contact=seal_for_tests(
                resident_subject(resident),
                Contact(name="山田 太郎", name_kana="ヤマダ タロウ", email=good, preferred_language="en"),
            ),
        ))
        await wait_for_rows(
            run.pool, "SELECT count(*) FROM residents WHERE resident_id = $1 AND email = $2", resident, good, count=1
        )
        await publish(run.settings, sample_events(resident)["premium_approved"])
        [mail] = await wait_for_mail(sink, good, 1)
        assert mail["Subject"].startswith("Your premium registration is approved")
        await wait_for_status(run.pool, resident, "sent", 1)

        # The delivery log is visible to the resident and admins, without bodies or addresses.
        response = await run.client.get(
            f"/v1/residents/{resident}/emails", headers=bearer(run.settings, "admin")
        )
        assert response.status_code == 200
        log = response.json()
        assert log["total"] == 3
        assert [item["status"] for item in log["items"]] == ["sent", "failed", "failed"]
        assert "body" not in log["items"][0] and "recipient" not in log["items"][0]


# -- consent and erasure ------------------------------------------------------------------------


async def test_email_only_with_consent_and_the_inbox_always(settings: Settings, tmp_path: Path) -> None:
    resident, stranger = resident_id(), resident_id()
    samples = sample_events(resident)
    async with smtp_sink(tmp_path) as sink, running(own_settings(settings, sink.url)) as run:
        await registered(run, registration(resident, email=address(resident), email_consent=False))
        await publish(run.settings, samples["application_received"])
        await wait_for_rows(run.pool, "SELECT count(*) FROM messages WHERE resident_id = $1", resident, count=2)
        assert await emails_of(run.pool, resident) == []

        await publish(run.settings, ConsentChanged(resident_id=resident, purpose="email", granted=True, at=DECIDED))
        await wait_for_consent(run.pool, resident, True)  # different topics: no order between them
        await publish(run.settings, samples["certificate_issued"])
        [mail] = await wait_for_mail(sink, address(resident), 1)
        assert mail["X-Nichiiki-Template"] == "certificate_issued"

        # Another purpose's consent does not touch e-mail; revoking e-mail consent stops e-mail.
        await publish(
            run.settings,
            ConsentChanged(resident_id=resident, purpose="newsletter", granted=True, at=DECIDED + timedelta(hours=1)),
            ConsentChanged(resident_id=resident, purpose="email", granted=False, at=DECIDED + timedelta(hours=2)),
        )
        await wait_for_consent(run.pool, resident, False)
        await consumed(run, await publish(run.settings, samples["certificate_revoked"]))
        assert len(await messages_of(run.pool, resident)) == 4
        await asyncio.sleep(0.3)
        assert [r["kind"] for r in await emails_of(run.pool, resident)] == ["certificate_issued"]
        assert len(mail_to(sink, address(resident))) == 1

        # Someone the projection has not seen yet: inbox in Japanese, generic greeting, no e-mail.
        await publish(run.settings, sample_events(stranger)["receipt_issued"])
        await wait_for_rows(run.pool, "SELECT count(*) FROM messages WHERE resident_id = $1", stranger, count=1)
        [message] = await messages_of(run.pool, stranger)
        assert message["language"] == "ja" and message["body"].startswith("ご登録者 様")
        assert await emails_of(run.pool, stranger) == []


async def test_a_queued_email_is_cancelled_when_consent_is_revoked_before_it_goes(
    settings: Settings, tmp_path: Path
) -> None:
    resident = resident_id()
    async with smtp_sink(tmp_path, start=False) as sink, running(own_settings(settings, sink.url)) as run:
        await registered(run, registration(resident, email=address(resident)))
        await wait_for_rows(
            run.pool, "SELECT count(*) FROM email_outbox WHERE resident_id = $1 AND attempts >= 1", resident, count=1
        )
        await publish(run.settings, ConsentChanged(resident_id=resident, purpose="email", granted=False, at=DECIDED))
        await wait_for_consent(run.pool, resident, False)
        await asyncio.to_thread(sink.start)
        await wait_for_status(run.pool, resident, "cancelled", 1)
        await asyncio.sleep(0.3)
        assert mail_to(sink, address(resident)) == []


async def test_withdrawal_erases_contact_inbox_and_emails(settings: Settings, tmp_path: Path) -> None:
    resident, neighbour = resident_id(), resident_id()
    samples = sample_events(resident)
    async with smtp_sink(tmp_path) as sink, running(own_settings(settings, sink.url)) as run:
        await registered(
            run, registration(resident, email=address(resident)), registration(neighbour, email=address(neighbour))
        )
        await publish(run.settings, samples["certificate_issued"])
        await wait_for_mail(sink, address(resident), 2)
        sink.fail_next(1000)  # the next e-mail stays queued
        await publish(run.settings, samples["grant_issued"])
        await wait_for_rows(
            run.pool,
            "SELECT count(*) FROM email_outbox WHERE resident_id = $1 AND kind = 'grant_issued' AND attempts >= 1",
            resident, count=1,
        )
        assert len(await messages_of(run.pool, resident)) == 3

        await publish(run.settings, ResidentWithdrawn(resident_id=resident, withdrawn_at=DECIDED))
        await wait_for_rows(
            run.pool, "SELECT count(*) FROM residents WHERE resident_id = $1 AND withdrawn_at IS NOT NULL",
            resident, count=1,
        )
        assert await messages_of(run.pool, resident) == []
        assert await emails_of(run.pool, resident) == []
        contact = await resident_row(run.pool, resident)
        assert contact["name"] is None and contact["email"] is None and not contact["email_consent"]

        # Later events about them (a certificate revoked because they left, a late contact change, a
        # registration redelivered: their keys still open, the erasure ledger drops them) bring nothing back.
        late = await publish(
            run.settings,
            samples["certificate_revoked"],
            ContactChanged(
                resident_id=resident, at=DECIDED, contact=seal_for_tests(
                    resident_subject(resident),
                    Contact(name="山田 太郎", name_kana="ヤマダ タロウ", email=address(resident)),
                ),
            ),
            registration(resident, email=address(resident)),
            sample_events(neighbour)["certificate_issued"],
        )
        await consumed(run, late)
        assert await run.pool.fetchval(
            "SELECT count(*) FROM kit_erased_residents WHERE resident_id = $1", resident
        ) == 1
        assert len(await messages_of(run.pool, neighbour)) == 2
        assert await messages_of(run.pool, resident) == []
        contact = await resident_row(run.pool, resident)
        assert contact["name"] is None and contact["email"] is None
        response = await run.client.get(
            f"/v1/residents/{resident}/notifications", headers=bearer(run.settings, "resident", resident)
        )
        assert response.json() == {"items": [], "total": 0, "limit": 20, "offset": 0}
        sink.clear_faults()
        await asyncio.sleep(0.5)
        assert len(mail_to(sink, address(resident))) == 2  # the queued one was erased, not sent
        assert len(await messages_of(run.pool, neighbour)) == 2


# -- the inbox over HTTP ------------------------------------------------------------------------


async def test_the_inbox_lists_counts_and_marks_read(settings: Settings, tmp_path: Path) -> None:
    resident, other = resident_id(), resident_id()
    samples = sample_events(resident)
    async with smtp_sink(tmp_path) as sink, running(own_settings(settings, sink.url)) as run:
        await registered(run, registration(resident, email_consent=False), registration(other, email_consent=False))
        await publish(run.settings, samples["application_received"], samples["certificate_issued"],
                      sample_events(other)["certificate_issued"])
        await wait_for_rows(run.pool, "SELECT count(*) FROM messages WHERE resident_id = $1", resident, count=3)
        await wait_for_rows(run.pool, "SELECT count(*) FROM messages WHERE resident_id = $1", other, count=2)
        me = bearer(run.settings, "resident", resident)
        base = f"/v1/residents/{resident}/notifications"

        listed = await run.client.get(base, headers=me)
        assert listed.status_code == 200, listed.text
        page = listed.json()
        assert page["total"] == 3 and len(page["items"]) == 3
        kinds = [item["kind"] for item in page["items"]]
        assert set(kinds) == {"registration_confirmed", "application_received", "certificate_issued"}
        created = [item["created_at"] for item in page["items"]]
        assert created == sorted(created, reverse=True)  # newest first
        first = page["items"][0]
        assert set(first) >= {"id", "kind", "subject", "body", "language", "created_at", "read_at"}

        paged = (await run.client.get(base, params={"limit": 2, "offset": 2}, headers=me)).json()
        assert paged["total"] == 3 and [i["id"] for i in paged["items"]] == [page["items"][2]["id"]]
        assert (await run.client.get(f"{base}/unread-count", headers=me)).json() == {
            "resident_id": resident, "unread": 3,
        }

        read = await run.client.post(f"{base}/{first['id']}/read", headers=me)
        assert read.status_code == 200 and read.json()["read_at"] is not None
        again = await run.client.post(f"{base}/{first['id']}/read", headers=me)
        assert again.json()["read_at"] == read.json()["read_at"]  # the first read time stays
        assert (await run.client.get(f"{base}/unread-count", headers=me)).json()["unread"] == 2
        unread = (await run.client.get(base, params={"unread": "true"}, headers=me)).json()
        assert unread["total"] == 2 and first["id"] not in [i["id"] for i in unread["items"]]
        read_only = (await run.client.get(base, params={"unread": "false"}, headers=me)).json()
        assert [i["id"] for i in read_only["items"]] == [first["id"]]

        admin = (await run.client.get(base, headers=bearer(run.settings, "admin"))).json()
        assert admin["total"] == 3

        # Refusals: problem+json with a code, and nothing changes.
        theirs = (await messages_of(run.pool, other))[0]["id"]
        refusals: list[tuple[str, str, dict[str, str], dict[str, Any], int, str]] = [
            ("get", base, {}, {}, 401, "unauthenticated"),
            ("get", base, {"Authorization": "Bearer nonsense"}, {}, 401, "unauthenticated"),
            ("get", f"/v1/residents/{other}/notifications", me, {}, 403, "other-residents-notifications"),
            ("get", f"/v1/residents/{other}/notifications/unread-count", me, {}, 403, "other-residents-notifications"),
            ("get", f"/v1/residents/{other}/emails", me, {}, 403, "other-residents-notifications"),
            ("get", base, bearer(run.settings, "staff", municipality=SHIRAHAMA), {}, 403, "forbidden"),
            ("get", base, bearer(run.settings, "partner", partner="jal"), {}, 403, "forbidden"),
            ("get", base, me, {"limit": 0}, 422, "invalid-request"),
            ("get", base, me, {"limit": 101}, 422, "invalid-request"),
            ("get", base, me, {"offset": -1}, 422, "invalid-request"),
            ("get", base, me, {"unread": "perhaps"}, 422, "invalid-request"),
            ("post", f"{base}/{uuid.uuid4()}/read", me, {}, 404, "notification-not-found"),
            ("post", f"{base}/{theirs}/read", me, {}, 404, "notification-not-found"),
            (
                "post", f"/v1/residents/{other}/notifications/{theirs}/read", me, {}, 403,
                "other-residents-notifications",
            ),
            ("post", f"{base}/not-a-uuid/read", me, {}, 422, "invalid-request"),
            ("post", f"{base}/{page['items'][1]['id']}/read", bearer(run.settings, "admin"), {}, 403, "forbidden"),
        ]
        for method, url, headers, params, status, code in refusals:
            response = await run.client.request(method, url, headers=headers, params=params)
            assert response.status_code == status, (url, params, response.text)
            assert response.headers["content-type"].startswith("application/problem+json")
            assert response.json()["code"] == code, (url, params, response.json())
        rows = await run.pool.fetch(
            "SELECT resident_id, read_at IS NOT NULL AS read FROM messages WHERE resident_id = ANY($1::text[])",
            [resident, other],
        )
        assert sum(r["read"] for r in rows) == 1  # only the one the resident read
        assert sink.received == [] or all(resident not in str(m["To"]) for m in sink.received)


# -- replicas and crashes -----------------------------------------------------------------------


async def test_two_replicas_on_one_database_never_send_the_same_email_twice(
    settings: Settings, tmp_path: Path
) -> None:
    residents = [resident_id() for _ in range(20)]
    # A consumer group of its own (topic prefix): on the embedded broker, a group whose two members
    # left together keeps a stale leader, and the next member to join waits in SyncGroup for it.
    shared_db = own_settings(settings, None).model_copy(
        update={"topic_prefix": f"{settings.topic_prefix}r{uuid.uuid4().hex[:4]}."}
    )
    small_batches = replace(FAST, batch_size=3, workers=2, poll_interval_s=0.05)
    async with smtp_sink(tmp_path) as sink:
        shared_db = shared_db.model_copy(update={"smtp_url": sink.url})
        async with running(shared_db, small_batches) as one, running(shared_db, small_batches) as two:
            await publish(
                shared_db,
                *[registration(r, email=address(r)) for r in residents],
            )
            await wait_for_rows(
                one.pool, "SELECT count(*) FROM residents WHERE resident_id = ANY($1::text[])", residents,
                count=len(residents),
            )
            await publish(shared_db, *[sample_events(r)["certificate_issued"] for r in residents])
            await wait_for_rows(
                one.pool,
                "SELECT count(*) FROM email_outbox WHERE resident_id = ANY($1::text[]) AND status = 'sent'",
                residents, count=2 * len(residents), timeout=40,
            )
            await asyncio.sleep(0.5)
            mail = [m for r in residents for m in mail_to(sink, address(r))]
            assert len(mail) == 2 * len(residents)
            assert len({m["Message-ID"] for m in mail}) == len(mail)
            claimed = one.sender.stats.claimed + two.sender.stats.claimed
            assert claimed >= len(mail)
            assert one.sender.stats.sent + two.sender.stats.sent >= len(mail)
            assert one.sender.stats.lost_claims + two.sender.stats.lost_claims == 0


async def test_a_send_cut_short_by_a_crash_is_resent_with_the_same_message_id(
    settings: Settings, tmp_path: Path
) -> None:
    """The documented window: accepted by the server, then the process died before marking the row."""
    resident = resident_id()
    async with smtp_sink(tmp_path) as sink:
        no_mail = own_settings(settings, None)  # a replica without SMTP: mail only queues
        async with running(no_mail) as queued:
            await registered(queued, registration(resident, email=address(resident)))
            await wait_for_rows(
                queued.pool, "SELECT count(*) FROM email_outbox WHERE resident_id = $1", resident, count=1
            )
            # A sender claims the row with a short lease, hands it to the server ... and dies.
            async with queued.pool.acquire() as conn:
                [claimed] = await store.claim_due_emails(conn, 10, timedelta(seconds=1))
            smtp = SmtpConnection(parse_smtp_url(sink.url))
            assert claimed.resident is not None and claimed.resident.email is not None
            await smtp.send(OutgoingEmail(
                row_id=str(claimed.id), sender=FAST.sender, recipient=claimed.resident.email, recipient_name=None,
                subject=claimed.subject, body=claimed.body, language=claimed.language, kind=claimed.kind,
                source_event_id=str(claimed.source_event_id),
            ))
            await smtp.close()
        with_mail = no_mail.model_copy(update={"smtp_url": sink.url})
        async with running(with_mail) as restarted:
            await wait_for_status(restarted.pool, resident, "sent", 1)
            [row] = await emails_of(restarted.pool, resident)
            assert row["attempts"] == 2
            copies = mail_to(sink, address(resident))
            assert len(copies) == 2
            assert {m["Message-ID"] for m in copies} == {f"<{claimed.id}@nichiiki.jp>"}
            emailed = [
                found for found in await deliveries_for(restarted.settings, [resident], until=2)
                if found.channel == "email"
            ]
            assert len(emailed) == 1  # the record says once; the mailbox has the same message twice


async def test_the_sender_stands_by_without_an_smtp_url(settings: Settings) -> None:
    resident = resident_id()
    async with running(own_settings(settings, None)) as run:
        await registered(run, registration(resident, email=address(resident)))
        await wait_for_rows(run.pool, "SELECT count(*) FROM email_outbox WHERE resident_id = $1", resident, count=1)
        await asyncio.sleep(0.3)
        [email] = await emails_of(run.pool, resident)
        assert (email["status"], email["attempts"]) == ("pending", 0)
        assert await run.sender.run_once() == 0
        ready = await run.client.get("/readyz")
        assert ready.status_code == 200

