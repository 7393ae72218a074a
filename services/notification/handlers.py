"""Use cases: keep the contact projection, turn events into messages, serve the inbox.

Every consumer-side use case runs inside the consumer's transaction (``ctx.conn``): the inbox
message, the queued e-mail and the ``InboxMessagesDelivered`` record commit together with the kit's
inbox row, so a redelivered event finds its row and changes nothing. E-mail leaves the process
later, from the background sender (``sender.py``), never inside this transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg
import structlog
from fastapi.encoders import jsonable_encoder

from services.notification import store
from services.notification.domain import (
    DEFAULT_LANGUAGE,
    ContactUpdate,
    Effect,
    Notice,
    NotificationNotFound,
    conflict_free_runs,
    effect_of,
    ensure_own,
    notice_for,
)
from services.notification.templates import render
from shared.contracts.base import EventData
from shared.contracts.listings import ListingDigestDue
from shared.contracts.notification import MAX_INBOX_DELIVERIES, InboxDelivery, InboxMessagesDelivered
from shared.contracts.registration import (
    ConsentChanged,
    Contact,
    ContactChanged,
    ResidentRegistered,
    ResidentWithdrawn,
)
from shared.contracts.sealed import Sealed
from shared.contracts.topics import DELIVERIES
from shared.kit.consumer import HandlerContext, Run
from shared.kit.erasure import erased_among, forget_responses_about, is_erased, record_erased
from shared.kit.keyring import Keyring
from shared.kit.service import UnitOfWork
from shared.kit.settings import Settings
from shared.kit.use_case import Outcome, Write

log = structlog.get_logger(__name__)

SERVICE = "notification"


def sender_channel(settings: Settings) -> str:
    """The PostgreSQL NOTIFY channel that wakes the e-mail senders of this database."""
    return f"email_{settings.database_name(SERVICE)}"[:63]


# -- registrations, e-mail consents and decisions, a run at a time ------------------------------


def _resident_of(event: EventData) -> str | None:
    resident_id: str | None = getattr(event, "resident_id", None)
    return resident_id


async def _open_contacts(keyring: Keyring, events: Sequence[EventData]) -> list[Contact | None]:
    """Each registration's contact, opened in one look-up of keys (None for other events, and for a
    contact whose person was erased: their key is gone)."""
    sealed = [event.contact if isinstance(event, ResidentRegistered) else None for event in events]
    # Each distinct sealed contact is opened (AES-GCM) and read (JSON) once, not once per event (a
    # redelivered registration carries the same one).
    distinct: dict[tuple[str, str, str], Sealed] = {}
    for value in sealed:
        if value is not None:
            distinct.setdefault((value.kid, value.iv, value.ct), value)
    if not distinct:
        return [None] * len(events)
    opened = await keyring.open_many(list(distinct.values()))
    contacts = {
        key: None if plaintext is None else Contact.model_validate_json(plaintext)
        for key, plaintext in zip(distinct, opened, strict=True)
    }
    return [None if value is None else contacts[(value.kid, value.iv, value.ct)] for value in sealed]


async def apply_events(run: Run[EventData]) -> None:
    """Apply a run of registrations, e-mail consents and decisions in a few statements per chunk.

    Events about a resident this service erased are dropped first (a late event, a replayed dead
    letter, a group reset to earliest): nothing about them is written again. Each chunk
    (``conflict_free_runs``) saves its contacts, then its consents, then writes its messages, which
    read the residents as saved: what applying the events one by one gives — in two statements (the
    residents saved and read back, then the messages, e-mails and the sender's wake-up).
    """
    erased = await erased_among(run.conn, (_resident_of(event) for event in run.events))
    live = [(ctx, event) for ctx, event in run if _resident_of(event) not in erased]
    if len(live) < len(run):
        log.info("events about erased residents dropped", count=len(run) - len(live))
    contacts = await _open_contacts(run.keyring, [event for _, event in live])
    planned = [
        (ctx, effect) for (ctx, event), contact in zip(live, contacts, strict=True)
        if (effect := effect_of(event, contact)) is not None
    ]
    channel = sender_channel(run.settings)
    for chunk in conflict_free_runs(planned, effect=lambda item: item[1]):
        await _apply_chunk(chunk, channel)
    for event in run.events:
        if isinstance(event, ConsentChanged) and event.purpose == "email":
            log.info("e-mail consent changed", resident_id=event.resident_id, granted=event.granted)


async def _apply_chunk(chunk: Sequence[tuple[HandlerContext, Effect]], channel: str) -> None:
    """Contacts, consents, then messages."""
    conn = chunk[0][0].conn
    # A chunk updates a resident at most once: equal keys carry equal updates.
    contacts = {effect.resident_id: effect.contact for _, effect in chunk if effect.contact is not None}
    consents = {effect.resident_id: effect.consent for _, effect in chunk if effect.consent is not None}
    notices = [(ctx, effect.notice) for ctx, effect in chunk if effect.notice is not None]
    residents = None
    if contacts or consents:  # the updates and the read of the residents to tell, as updated: one statement
        residents = await store.save_and_read_residents(
            conn, contacts, consents, sorted({notice.resident_id for _, notice in notices})
        )
    if notices:
        await deliver(notices, channel, residents)


async def deliver(
    notices: Sequence[tuple[HandlerContext, Notice]], channel: str,
    residents: dict[str, store.Resident] | None = None,
) -> None:
    """Tell each resident: inbox always, e-mail with consent (the senders are woken on ``channel``
    if any was queued).

    ``residents``: those told, as already read (else they are read here). One statement writes the
    messages and e-mails of all the notices and wakes the senders. An event whose message already
    exists changes nothing and emits nothing.
    """
    conn = notices[0][0].conn
    if residents is None:
        residents = await store.residents_by_id(conn, sorted({notice.resident_id for _, notice in notices}))
    drafts: list[tuple[HandlerContext, store.NewMessage, store.Resident | None]] = []
    for ctx, notice in notices:
        resident = residents.get(notice.resident_id)
        if resident is not None and resident.withdrawn_at is not None:
            log.info("resident withdrawn, no message", resident_id=notice.resident_id, kind=notice.kind)
            continue
        drafts.append((ctx, draft_message(ctx, notice, resident), resident))
    if not drafts:
        return
    created = await store.insert_messages_and_emails(
        conn, [message for _, message, _ in drafts],
        [uuid.uuid4() if resident is not None and resident.can_receive_email else None for _, _, resident in drafts],
        channel,
    )
    delivered = [
        (ctx, message, created[message.id]) for ctx, message, _ in drafts
        if message.id in created  # else this event already produced its message
    ]
    for start in range(0, len(delivered), MAX_INBOX_DELIVERIES):
        await emit_delivered(delivered[start:start + MAX_INBOX_DELIVERIES])


def draft_message(ctx: HandlerContext, notice: Notice, resident: store.Resident | None) -> store.NewMessage:
    """The message in the resident's language (Japanese and a generic greeting for a stranger)."""
    language = resident.language if resident is not None else DEFAULT_LANGUAGE
    rendered = render(notice, language, resident.name if resident is not None else None)
    return store.NewMessage(
        id=uuid.uuid4(), resident_id=notice.resident_id, kind=notice.kind, language=language,
        subject=rendered.subject, body=rendered.body,
        source_event_id=ctx.envelope.id, source_event_type=ctx.envelope.type,
    )


async def emit_delivered(delivered: Sequence[tuple[HandlerContext, store.NewMessage, datetime]]) -> None:
    """One record of the inbox messages written (caused by, and traced as, the first one's event)."""
    ctx, first, _ = delivered[0]
    await ctx.emit(
        DELIVERIES,
        InboxMessagesDelivered(deliveries=[
            InboxDelivery(
                delivery_id=str(message.id), resident_id=message.resident_id, template=message.kind,
                language=message.language, source_event_id=str(message.source_event_id),
                source_event_type=message.source_event_type, delivered_at=created_at,
            )
            for _, message, created_at in delivered
        ]),
        subject=str(first.id),
    )


async def listing_digest(ctx: HandlerContext, event: ListingDigestDue) -> None:
    """A digest of listings: inbox always, e-mail with the e-mail consent; nothing for an erased resident."""
    notice = notice_for(event)
    if notice is None or await is_erased(ctx.conn, event.resident_id):
        return
    await deliver([(ctx, notice)], sender_channel(ctx.settings))


# -- the rest of the contact projection (registration.residents.v1) ------------------------------


async def contact_changed(ctx: HandlerContext, event: ContactChanged) -> None:
    """A late change after the erasure, or one whose key is gone, must not bring the data back."""
    if await is_erased(ctx.conn, event.resident_id):
        return
    plaintext = None if ctx.keyring is None else await ctx.keyring.open(event.contact)
    if plaintext is None:
        log.info("contact change of an erased resident dropped", resident_id=event.resident_id)
        return
    contact = Contact.model_validate_json(plaintext)
    await store.save_and_read_residents(ctx.conn, {event.resident_id: ContactUpdate.of(contact)}, {}, [])


async def resident_withdrawn(ctx: HandlerContext, event: ResidentWithdrawn) -> None:
    """Erase everything held about the person, and remember it (same transaction) so that no later
    event about them writes anything again."""
    await record_erased(ctx.conn, event.resident_id, event.withdrawn_at)
    erased = await store.erase_resident(ctx.conn, event.resident_id, event.withdrawn_at)
    # A stored answer of marking a message read carries the message (and the name in it).
    forgotten = await forget_responses_about(ctx.conn, event.resident_id)
    log.info("resident erased", resident_id=event.resident_id, messages=erased.messages, emails=erased.emails,
             stored_responses=forgotten)


# -- the inbox over HTTP -----------------------------------------------------------------------


async def list_notifications(
    pool: asyncpg.Pool, resident_id: str, *, unread: bool | None, limit: int, offset: int
) -> dict[str, Any]:
    items, total = await store.list_messages(pool, resident_id, unread=unread, limit=limit, offset=offset)
    return {"items": items, "total": total, "limit": limit, "offset": offset}


async def unread_count(pool: asyncpg.Pool, resident_id: str) -> dict[str, Any]:
    return {"resident_id": resident_id, "unread": await store.unread_count(pool, resident_id)}


async def mark_read(write: Write, resident_id: str, notification_id: uuid.UUID) -> Outcome:
    """Mark one of the resident's own notifications read (again is harmless: the first read time stays)."""
    principal = write.principal

    async def authorise(work: UnitOfWork) -> None:
        # Theirs only: the resident of the path, and a message of that resident (locked for the act).
        ensure_own(principal, resident_id)
        if not await store.lock_message(work.conn, resident_id, notification_id):
            raise NotificationNotFound(f"resident {resident_id} has no notification {notification_id}")

    async def act(work: UnitOfWork, _: None) -> Outcome:
        message = await store.mark_read(work.conn, resident_id, notification_id)
        if message is None:  # cannot happen under the lock; a 404, not a null body, if it ever did
            raise NotificationNotFound(f"resident {resident_id} has no notification {notification_id}")
        return Outcome(200, jsonable_encoder(message))

    return await write.run(act, authorise=authorise)


async def list_emails(pool: asyncpg.Pool, resident_id: str, *, limit: int, offset: int) -> dict[str, Any]:
    items, total = await store.list_emails(pool, resident_id, limit=limit, offset=offset)
    return {"items": items, "total": total, "limit": limit, "offset": offset}
