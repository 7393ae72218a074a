"""Events of the notification service on ``notification.deliveries.v1`` (key: resident id).

A record of what was sent, never the message body: no personal data on the topic.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from shared.contracts.base import EventData
from shared.contracts.topics import DELIVERIES

Channel = Literal["inbox", "email"]


class MessageDelivered(EventData, name="notification.message.delivered", topic=DELIVERIES):
    delivery_id: str
    resident_id: str
    channel: Channel
    template: str
    language: Literal["ja", "en"]
    source_event_id: str
    source_event_type: str
    delivered_at: datetime


class MessageFailed(EventData, name="notification.message.failed", topic=DELIVERIES):
    """Permanently undeliverable (e.g. the mail server refused the address); not retried."""

    delivery_id: str
    resident_id: str
    channel: Channel
    template: str
    source_event_id: str
    reason: str
    failed_at: datetime
