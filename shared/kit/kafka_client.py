"""One setting of the Kafka client for every process of the platform: never auto-create topics.

Topics are created explicitly with their partition counts (``kafka_admin.ensure_topics``). By
default aiokafka's metadata requests ask the broker to create any topic they name, so a
producer that reaches a broker which lost its topics (the in-memory embedded broker after a
restart) would recreate them with the broker's default partition count, racing our own
creation. With auto-creation off, a send to a missing topic fails, the relay recreates the
topics properly and sends again.
"""

from __future__ import annotations

import functools

import aiokafka.client
from aiokafka.protocol.metadata import MetadataRequest

aiokafka.client.MetadataRequest = functools.partial(
    MetadataRequest, allow_auto_topic_creation=False
)
