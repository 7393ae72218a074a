"""Topic creation at start-up, idempotent, on whatever broker is configured."""

from __future__ import annotations

from collections.abc import Iterable

import structlog
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from shared.contracts.topics import ALL_TOPICS, Topic, dead_letter_topics
from shared.kit.settings import Settings

log = structlog.get_logger(__name__)


def platform_topics() -> tuple[Topic, ...]:
    return ALL_TOPICS + dead_letter_topics()


async def ensure_topics(settings: Settings, topics: Iterable[Topic] | None = None) -> list[str]:
    """Create the topics that do not exist yet; return the names created."""
    wanted = {settings.topic(t.name): t for t in (topics if topics is not None else platform_topics())}
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.require_kafka(), request_timeout_ms=10_000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(
                name, topic.partitions, 1,
                topic_configs={"cleanup.policy": "compact"} if topic.compacted else {},
            )
            for name, topic in wanted.items()
            if name not in existing
        ]
        created: list[str] = []
        for new_topic in missing:  # one by one: a replica may race us to any of them
            try:
                await admin.create_topics([new_topic])
                created.append(new_topic.name)
            except TopicAlreadyExistsError:
                pass
        if created:
            log.info("topics created", count=len(created))
        return created
    finally:
        await admin.close()
