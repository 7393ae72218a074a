"""Notification: messages/s from event to inbox row, and to acceptance by the SMTP server.

Two bursts, each published at once as the producing service would: ``ResidentRegistered``
(active, basic, with e-mail consent; half Japanese, half English) → ``registration_confirmed``;
then ``CertificateIssued`` for the same residents → ``certificate_issued``. Each event is one
inbox row and one e-mail. Timed from the first send to the last inbox row (the consumer's
``handled`` counter, checked against the inbox table), and to the last message accepted by the
run's SMTP sink (its ``.eml`` files, counted by recipient).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg

from bench.scenarios._common import CpuMeter
from bench.scenarios._events import (
    Progress,
    RoundTripProbe,
    baselines,
    certificate_issued,
    cpu_note,
    machine_load,
    publish,
    resident_registered,
    sealing_keys,
    settle,
    watch_consumers,
)
from shared.contracts.topics import CERTIFICATES, RESIDENTS, Topic
from shared.kit.envelope import Envelope
from shared.stack.smtp_sink import read_mailbox

if TYPE_CHECKING:
    from bench.run import BenchContext, ScenarioResult

#: 長野県松本市: no travel program (no grants follow the certificates).
TOWN = "202029"
DOMAIN = "notify.bench.example.jp"


@dataclass
class Burst:
    kind: str
    events: int
    inbox_s: float = float("nan")
    mail_s: float = float("nan")
    mailed: int = 0
    cpu: str = ""

    @property
    def inbox_rate(self) -> float:
        return self.events / self.inbox_s if self.inbox_s == self.inbox_s else 0.0

    @property
    def mail_rate(self) -> float:
        return self.mailed / self.mail_s if self.mail_s == self.mail_s else 0.0


def mailbox_of(ctx: BenchContext) -> Path:
    """The runner's SMTP sink stores its mail in ``<workdir>/mailbox``; the fleet logs to ``<workdir>/logs``."""
    return ctx.fleet.log_dir.parent / "mailbox"


def _eml_count(folder: Path) -> int:
    with os.scandir(folder) as entries:
        return sum(1 for entry in entries if entry.name.endswith(".eml"))


async def run(ctx: BenchContext) -> ScenarioResult:
    from bench.run import Metric, ScenarioResult

    tag = uuid.uuid4().hex[:8]
    count = ctx.scale(1_000, 300)
    mailbox = mailbox_of(ctx)
    residents = [str(uuid.uuid4()) for _ in range(count)]
    notes: list[str] = [
        f"SMTP sink: {ctx.settings.smtp_url}, mailbox {mailbox} (the runner's sink; e-mails counted from its "
        f"files by recipient domain {DOMAIN})."
    ]
    await settle(ctx)
    keys = await sealing_keys(ctx.settings, residents)  # before the window, as registration has them
    registered = [
        resident_registered(rid, TOWN, email=f"r{i}-{tag}@{DOMAIN}", keys=keys, language="en" if i % 2 else "ja",
                            email_consent=True)
        for i, rid in enumerate(residents)
    ]
    first = await burst(ctx, mailbox, "registration_confirmed", RESIDENTS, registered)
    certified = [
        certificate_issued(f"BENCH-N-{tag}-{i:05d}", rid, TOWN) for i, rid in enumerate(residents)
    ]
    second = await burst(ctx, mailbox, "certificate_issued", CERTIFICATES, certified)

    check = await check_delivery(ctx, mailbox, tag, [e.id for e in registered + certified])
    notes += [
        f"{b.kind}: {b.events:,} events → inbox in {b.inbox_s:.2f} s, → {b.mailed:,} e-mails accepted by SMTP in "
        f"{b.mail_s:.2f} s (from the first send). {b.cpu}"
        for b in (first, second)
    ]
    notes.append(
        f"read back: {check.inbox:,} inbox rows for {2 * count:,} events, {check.sent:,} e-mail rows sent, "
        f"{check.mailbox:,} messages to this burst's recipients in the sink ({check.duplicates} duplicate "
        f"Message-IDs). The sender runs 2 loops per process, 20 e-mails a claim, one SMTP session per claim "
        f"(MailerConfig defaults). {machine_load()} at the end (shared machine)."
    )
    exact = check.inbox == 2 * count and check.sent == 2 * count and check.mailbox == 2 * count
    return ScenarioResult(
        "Notification: event → inbox row → e-mail accepted by SMTP",
        [
            Metric("registration_confirmed: events → inbox rows", first.inbox_rate, "messages/s",
                   limit="pg_commit_1_conn"),
            Metric("registration_confirmed: events → SMTP acceptance", first.mail_rate, "messages/s",
                   limit="pg_commit_1_conn"),
            Metric("certificate_issued: events → inbox rows", second.inbox_rate, "messages/s",
                   limit="pg_commit_1_conn"),
            Metric("certificate_issued: events → SMTP acceptance", second.mail_rate, "messages/s",
                   limit="pg_commit_1_conn"),
            Metric("messages lost or duplicated (inbox, e-mail)", abs(check.inbox - 2 * count)
                   + abs(check.mailbox - 2 * count) + check.duplicates, "messages", target="0 (exactly once)",
                   met=exact and check.duplicates == 0),
        ],
        notes,
    )


async def burst(ctx: BenchContext, mailbox: Path, kind: str, topic: Topic, envelopes: list[Envelope]) -> Burst:
    """Publish at once; time the last inbox row and the last e-mail accepted, both from the first send."""
    result = Burst(kind, len(envelopes))
    progress = Progress("notification", "notification", len(envelopes))
    await baselines(ctx, [progress])
    mails_before = _eml_count(mailbox)
    meter = CpuMeter()
    async with RoundTripProbe(ctx.settings.database_dsn("notification")) as probe:
        started = time.perf_counter()
        sending = asyncio.create_task(publish(ctx.settings, topic, envelopes))
        await watch_consumers(ctx, [progress], started_at=started, timeout_s=180)
        if progress.done_at is not None:
            result.inbox_s = progress.done_at - started
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            result.mailed = _eml_count(mailbox) - mails_before
            if result.mailed >= len(envelopes):
                result.mail_s = time.perf_counter() - started
                break
            await asyncio.sleep(0.05)
        await sending
    spent = meter.stop()
    wall = meter.wall
    result.cpu = f"{probe.describe()}. " + cpu_note(spent, wall, len(envelopes), "event")
    await settle(ctx)
    return result


@dataclass
class DeliveryCheck:
    inbox: int = 0
    sent: int = 0
    mailbox: int = 0
    duplicates: int = 0


async def check_delivery(ctx: BenchContext, mailbox: Path, tag: str, event_ids: list[uuid.UUID]) -> DeliveryCheck:
    check = DeliveryCheck()
    conn = await asyncpg.connect(ctx.settings.database_dsn("notification"))
    try:
        check.inbox = int(await conn.fetchval(
            "SELECT count(*) FROM messages WHERE source_event_id = ANY($1::uuid[])", event_ids
        ))
        check.sent = int(await conn.fetchval(
            "SELECT count(*) FROM email_outbox WHERE source_event_id = ANY($1::uuid[]) AND status = 'sent'", event_ids
        ))
    finally:
        await conn.close()
    messages = await asyncio.to_thread(read_mailbox, mailbox)
    ours = [m for m in messages if f"-{tag}@{DOMAIN}" in str(m.get("X-Envelope-To", ""))]
    check.mailbox = len(ours)
    ids = [str(m.get("Message-ID", "")) for m in ours]
    check.duplicates = len(ids) - len(set(ids))
    return check
