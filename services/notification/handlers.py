"""Use cases: keep the contact projection, turn events into messages, serve the inbox.

Every consumer-side use case runs inside the consumer's transaction (``ctx.conn``): the inbox
message, the queued e-mail and the ``MessageDelivered`` event commit together with the kit's
inbox row, so a redelivered event finds its row and changes nothing. E-mail leaves the process
later, from the background sender (``sender.py``), never inside this transaction.
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import structlog

from services.notification import store
from services.notification.domain import (
    DEFAULT_LANGUAGE,
    Notice,
    NotificationNotFound,
    email_consent,
    notice_for,
)
from services.notification.templates import render
from shared.contracts.base import EventData
from shared.contracts.notification import MessageDelivered
from shared.contracts.registration import ConsentChanged, ContactChanged, ResidentRegistered, ResidentWithdrawn
from shared.contracts.topics import DELIVERIES
from shared.kit.consumer import HandlerContext
from shared.kit.settings import Settings

log = structlog.get_logger(__name__)

SERVICE = "notification"


def sender_channel(settings: Settings) -> str:
    """The PostgreSQL NOTIFY channel that wakes the e-mail senders of this database."""
    return f"email_{settings.database_name(SERVICE)}"[:63]


# -- the contact projection (registration.residents.v1) ------------------------------------------


async def resident_registered(ctx: HandlerContext, event: ResidentRegistered) -> None:
    contact = event.contact
    await store.save_contact(ctx.conn, event.resident_id, contact.name, contact.email, contact.preferred_language)
    consent = email_consent(event.consents)
    if consent is not None:
        await store.save_email_consent(ctx.conn, event.resident_id, consent.granted, consent.at)
    await notify(ctx, event)


async def consent_changed(ctx: HandlerContext, event: ConsentChanged) -> None:
    if event.purpose != "email":
        return
    await store.save_email_consent(ctx.conn, event.resident_id, event.granted, event.at)
    log.info("e-mail consent changed", resident_id=event.resident_id, granted=event.granted)


async def contact_changed(ctx: HandlerContext, event: ContactChanged) -> None:
    resident = await store.get_resident(ctx.conn, event.resident_id)
    if resident is not None and resident.withdrawn_at is not None:
        return  # erased: a late contact change must not bring the data back
    contact = event.contact
    await store.save_contact(ctx.conn, event.resident_id, contact.name, contact.email, contact.preferred_language)


async def resident_withdrawn(ctx: HandlerContext, event: ResidentWithdrawn) -> None:
    erased = await store.erase_resident(ctx.conn, event.resident_id, event.withdrawn_at)
    log.info("resident erased", resident_id=event.resident_id, messages=erased.messages, emails=erased.emails)


# -- messages ----------------------------------------------------------------------------------


async def notify(ctx: HandlerContext, event: EventData) -> None:
    """Tell the resident about the event, if it calls for it: inbox always, e-mail with consent."""
    notice = notice_for(event)
    if notice is not None:
        await deliver(ctx, notice)


async def deliver(ctx: HandlerContext, notice: Notice) -> None:
    resident = await store.get_resident(ctx.conn, notice.resident_id)
    if resident is not None and resident.withdrawn_at is not None:
        log.info("resident withdrawn, no message", resident_id=notice.resident_id, kind=notice.kind)
        return
    language = resident.language if resident is not None else DEFAULT_LANGUAGE
    rendered = render(notice, language, resident.name if resident is not None else None)
    message = store.NewMessage(
        id=uuid.uuid4(), resident_id=notice.resident_id, kind=notice.kind, language=language,
        subject=rendered.subject, body=rendered.body,
        source_event_id=ctx.envelope.id, source_event_type=ctx.envelope.type,
    )
    created_at = await store.insert_message(ctx.conn, message)
    if created_at is None:
        return  # this event already produced its message
    await ctx.emit(
        DELIVERIES,
        MessageDelivered(
            delivery_id=str(message.id), resident_id=message.resident_id, channel="inbox",
            template=message.kind, language=language, source_event_id=str(message.source_event_id),
            source_event_type=message.source_event_type, delivered_at=created_at,
        ),
        subject=message.resident_id,
    )
    if resident is None or not resident.can_receive_email:
        return
    if await store.insert_email(ctx.conn, message, uuid.uuid4()):
        await store.wake_sender(ctx.conn, sender_channel(ctx.settings))


# -- the inbox over HTTP -----------------------------------------------------------------------


async def list_notifications(
    pool: asyncpg.Pool, resident_id: str, *, unread: bool | None, limit: int, offset: int
) -> dict[str, Any]:
    items, total = await store.list_messages(pool, resident_id, unread=unread, limit=limit, offset=offset)
    return {"items": items, "total": total, "limit": limit, "offset": offset}


async def unread_count(pool: asyncpg.Pool, resident_id: str) -> dict[str, Any]:
    return {"resident_id": resident_id, "unread": await store.unread_count(pool, resident_id)}


async def mark_read(pool: asyncpg.Pool, resident_id: str, notification_id: uuid.UUID) -> dict[str, Any]:
    message = await store.mark_read(pool, resident_id, notification_id)
    if message is None:
        raise NotificationNotFound(f"resident {resident_id} has no notification {notification_id}")
    return message


async def list_emails(pool: asyncpg.Pool, resident_id: str, *, limit: int, offset: int) -> dict[str, Any]:
    items, total = await store.list_emails(pool, resident_id, limit=limit, offset=offset)
    return {"items": items, "total": total, "limit": limit, "offset": offset}
