"""The background e-mail sender: claim due rows, send them over SMTP, record the outcome.

Exactly once per event and channel, as far as SMTP allows:

- the consumer queues at most one row per (source event, channel, resident) — a unique key;
- a sender claims due rows with ``FOR UPDATE SKIP LOCKED`` and, in the same short transaction,
  marks them 'sending' with a lease (``next_attempt_at`` = now + lease): two replicas never take
  the same row while its lease runs;
- only after the SMTP server accepted the message is the row marked 'sent', together with the
  ``MessageDelivered`` event (outbox, same transaction); every mark checks that the claim is still
  ours (status 'sending' and the same attempt number).

The remaining window: if the process dies after the server accepted the message and before the
row is marked, the lease runs out and the row is sent again, with the same ``Message-ID``
(``<row-id@nichiiki.jp>``), so the copy is recognisably the same message. Plain SMTP has no way
to ask a server whether it already has a message, so this window cannot be closed from here.

Temporary failures (4xx, connection refused, timeouts) are retried with exponential backoff;
a 5xx to the recipient or the content fails the row for good, records the refused address on
the resident (later messages to that address fail without a connection), and emits
``MessageFailed``.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import asyncpg
import structlog

from services.notification import store
from services.notification.domain import RetryPolicy, scrub_address
from services.notification.handlers import sender_channel
from services.notification.mailer import (
    Accepted,
    OutgoingEmail,
    Refused,
    SmtpConnection,
    SmtpTarget,
    parse_smtp_url,
)
from shared.contracts.notification import MessageDelivered, MessageFailed
from shared.contracts.topics import DELIVERIES
from shared.kit.errors import is_transient
from shared.kit.metrics import OutcomeCounters

if TYPE_CHECKING:
    from shared.kit.service import ServiceRuntime

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class MailerConfig:
    """How the sender behaves; the defaults suit production, tests shorten the waits."""

    sender: str = "Nichiiki <no-reply@nichiiki.jp>"
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    #: How long a claimed row stays ours; must exceed one SMTP send (connect + timeouts).
    lease: timedelta = timedelta(minutes=2)
    batch_size: int = 20
    #: Concurrent send loops per process, each with its own SMTP connection.
    workers: int = 2
    poll_interval_s: float = 1.0
    smtp_timeout_s: float = 10.0


@dataclass
class SenderStats:
    claimed: int = 0
    sent: int = 0
    retried: int = 0
    failed: int = 0
    cancelled: int = 0
    lost_claims: int = 0


class EmailSender:
    """One per process; ``await sender(runtime)`` runs it (a ServiceRuntime background task)."""

    def __init__(self, config: MailerConfig | None = None) -> None:
        self.config = config or MailerConfig()
        self.stats = SenderStats()
        #: Exported as ``nichiiki_email_messages_total{outcome=...}`` (read at scrape time).
        self.metrics = OutcomeCounters(
            "nichiiki_email_messages", "E-mails by what happened: claimed, sent, retried, failed, cancelled, "
            "lost_claims (another sender took it over)", lambda: self.stats,
        )
        self._runtime: ServiceRuntime | None = None
        self._target: SmtpTarget | None = None
        self._wake = asyncio.Event()

    @property
    def runtime(self) -> ServiceRuntime:
        if self._runtime is None:
            raise RuntimeError("the e-mail sender is not bound to a runtime")
        return self._runtime

    def bind(self, runtime: ServiceRuntime) -> None:
        self._runtime = runtime
        runtime.state["email_sender"] = self
        runtime.state.setdefault("metrics", []).append(self.metrics)  # exported with the runtime's (EventMetrics)
        url = runtime.settings.smtp_url
        self._target = parse_smtp_url(url, self.config.smtp_timeout_s) if url else None

    async def __call__(self, runtime: ServiceRuntime) -> None:
        self.bind(runtime)
        if self._target is None:
            log.warning("NICHIIKI_SMTP_URL is not set: e-mails stay queued until it is")
            return
        loops = [self._listen(), *(self._work(n) for n in range(self.config.workers))]
        await asyncio.gather(*loops)

    # -- loops ----------------------------------------------------------------------------------

    async def _listen(self) -> None:
        """Wake the workers when a consumer queues mail (polling covers a lost connection)."""
        channel = sender_channel(self.runtime.settings)
        while True:
            try:
                conn = await asyncpg.connect(self.runtime.dsn)
                try:
                    closed = asyncio.Event()
                    conn.add_termination_listener(lambda *_, gone=closed: gone.set())
                    await conn.add_listener(channel, lambda *_: self._wake.set())
                    await closed.wait()
                finally:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), timeout=2)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("e-mail wake-up listener lost, polling meanwhile", error=repr(error))
                await asyncio.sleep(self.config.poll_interval_s)

    async def _work(self, worker: int) -> None:
        backoff = 0.1
        while True:
            try:
                handled = await self.run_once()
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if is_transient(error):
                    log.warning("e-mail sender interrupted, retrying", error=repr(error), backoff_s=backoff)
                else:
                    log.exception("e-mail sender failed a batch", worker=worker)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if handled < self.config.batch_size:
                await self._idle()

    async def _idle(self) -> None:
        wait = self.config.poll_interval_s
        due_in = await store.seconds_until_next_due(self.runtime.pool)
        if due_in is not None:
            wait = min(wait, max(due_in, 0.01))
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=wait)

    # -- one batch ------------------------------------------------------------------------------

    async def run_once(self) -> int:
        """Claim a batch of due e-mails and settle each one; the number claimed."""
        if self._target is None:
            return 0
        async with self.runtime.pool.acquire() as conn:
            claimed = await store.claim_due_emails(conn, self.config.batch_size, self.config.lease)
        if not claimed:
            return 0
        self.stats.claimed += len(claimed)
        smtp = SmtpConnection(self._target)
        outage: Refused | None = None
        try:
            for index, email in enumerate(claimed):
                # Settle the row even if we are cancelled meanwhile (shutdown), then give back the rest.
                settling = asyncio.ensure_future(self._settle(smtp, email, outage))
                try:
                    result = await asyncio.shield(settling)
                except asyncio.CancelledError:
                    with contextlib.suppress(Exception):  # the runtime gives background tasks 5 s to stop
                        await asyncio.wait_for(settling, timeout=min(self.config.smtp_timeout_s, 4.0))
                    with contextlib.suppress(Exception):
                        await store.release_claims(self.runtime.pool, claimed[index + 1:])
                    raise
                if isinstance(result, Refused) and result.stage == "connect":
                    outage = result  # the server is away: the rest of the batch waits too
        finally:
            with contextlib.suppress(Exception):
                await smtp.close()
        return len(claimed)

    async def _settle(self, smtp: SmtpConnection, email: store.ClaimedEmail, outage: Refused | None) -> Refused | None:
        resident = email.resident
        if resident is None or not resident.can_receive_email or resident.email is None:
            await self._cancel(email, "no e-mail consent or no address any more")
            return None
        if resident.address_bounced:
            await self._fail(email, "the address was refused permanently before", bounce=None)
            return None
        if outage is not None:
            await self._temporary_failure(email, outage)
            return outage
        if not await store.mark_sending_recipient(self.runtime.pool, email, resident.email):
            self.stats.lost_claims += 1
            return None
        outcome = await smtp.send(
            OutgoingEmail(
                row_id=str(email.id), sender=self.config.sender, recipient=resident.email,
                recipient_name=resident.name, subject=email.subject, body=email.body, language=email.language,
                kind=email.kind, source_event_id=str(email.source_event_id),
            )
        )
        if isinstance(outcome, Accepted):
            await self._sent(email)
            return None
        reason = scrub_address(outcome.reason, resident.email, resident.name)
        if outcome.permanent:
            await self._fail(email, reason, bounce=resident.email if outcome.stage == "rcpt" else None)
        else:
            await self._temporary_failure(email, Refused(outcome.stage, outcome.code, reason))
        return outcome

    # -- outcomes -------------------------------------------------------------------------------

    async def _sent(self, email: store.ClaimedEmail) -> None:
        async with self.runtime.transaction() as uow:
            finished = await store.finish_email(uow.conn, email, "sent")
            if finished is None:
                self.stats.lost_claims += 1
                return
            await uow.emit(
                DELIVERIES,
                MessageDelivered(
                    delivery_id=str(email.id), resident_id=email.resident_id, channel="email",
                    template=email.kind, language=email.language, source_event_id=str(email.source_event_id),
                    source_event_type=email.source_event_type, delivered_at=finished,
                ),
                subject=email.resident_id,
            )
        self.stats.sent += 1
        log.info("e-mail sent", email_id=str(email.id), kind=email.kind, attempts=email.attempts)

    async def _fail(self, email: store.ClaimedEmail, reason: str, *, bounce: str | None) -> None:
        async with self.runtime.transaction() as uow:
            finished = await store.finish_email(uow.conn, email, "failed", reason)
            if finished is None:
                self.stats.lost_claims += 1
                return
            if bounce is not None:
                await store.record_bounce(uow.conn, email.resident_id, bounce, reason)
            await uow.emit(
                DELIVERIES,
                MessageFailed(
                    delivery_id=str(email.id), resident_id=email.resident_id, channel="email",
                    template=email.kind, source_event_id=str(email.source_event_id), reason=reason,
                    failed_at=finished,
                ),
                subject=email.resident_id,
            )
        self.stats.failed += 1
        log.warning("e-mail failed permanently", email_id=str(email.id), reason=reason, attempts=email.attempts)

    async def _temporary_failure(self, email: store.ClaimedEmail, refused: Refused) -> None:
        policy = self.config.retry
        if policy.gives_up_after(email.attempts):
            await self._fail(email, f"gave up after {email.attempts} attempts: {refused.reason}", bounce=None)
            return
        delay = policy.delay(email.attempts)
        if await store.retry_email_later(self.runtime.pool, email, delay, refused.reason):
            self.stats.retried += 1
            log.info(
                "e-mail delayed", email_id=str(email.id), reason=refused.reason, attempts=email.attempts,
                retry_at=(datetime.now(UTC) + delay).isoformat(),
            )
        else:
            self.stats.lost_claims += 1

    async def _cancel(self, email: store.ClaimedEmail, reason: str) -> None:
        if await store.finish_email(self.runtime.pool, email, "cancelled", reason) is not None:
            self.stats.cancelled += 1
            log.info("e-mail cancelled", email_id=str(email.id), reason=reason)
