"""Events of the notification service on ``notification.deliveries.v1``.

A record of what was sent, never the message body: no personal data on the topic. An e-mail's
outcome is a record of its own, keyed by the resident; the inbox messages one consumer transaction
wrote are one record (``InboxMessagesDelivered``), keyed by its first message's id: a record per
message was about half of the notification consumer's CPU per event (docs/benchmarks.md).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.contracts.base import EventData
from shared.contracts.topics import DELIVERIES

Channel = Literal["inbox", "email"]


class MessageDelivered(EventData, name="notification.message.delivered", topic=DELIVERIES):
    """An e-mail the SMTP server accepted (key: resident id). Inbox messages are recorded in
    ``InboxMessagesDelivered``; a ``channel`` of ``inbox`` is only found in records written before it."""

    delivery_id: str
    resident_id: str
    channel: Channel
    template: str
    language: Literal["ja", "en"]
    source_event_id: str
    source_event_type: str
    delivered_at: datetime


class InboxDelivery(BaseModel):
    """One message written to a resident's inbox."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    delivery_id: str
    resident_id: str
    template: str
    language: Literal["ja", "en"]
    source_event_id: str
    source_event_type: str
    delivered_at: datetime


#: Messages per ``InboxMessagesDelivered`` at most: a consumer batch (500 events) in a few records of
#: some 30 KB each, well under the broker's record size limit.
MAX_INBOX_DELIVERIES = 100


class InboxMessagesDelivered(EventData, name="notification.inbox.delivered", topic=DELIVERIES):
    """Messages written to residents' inboxes in one transaction, in the order written (key: the
    first message's id, so records spread over the partitions; a resident's inbox record and the
    e-mail record of the same message may be on different ones: each carries its time)."""

    deliveries: list[InboxDelivery] = Field(min_length=1, max_length=MAX_INBOX_DELIVERIES)


class MessageFailed(EventData, name="notification.message.failed", topic=DELIVERIES):
    """Permanently undeliverable (e.g. the mail server refused the address); not retried."""

    delivery_id: str
    resident_id: str
    channel: Channel
    template: str
    source_event_id: str
    reason: str
    failed_at: datetime
