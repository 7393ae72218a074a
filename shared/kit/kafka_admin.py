"""Topic creation at start-up, idempotent, on whatever broker is configured.

In a deployment behind ACLs the topics are created by the setup job (``deploy/kafka/setup.sh``) and the
services have no CREATE: a creation the broker refuses for authorisation is left to that job, and a
principal sees only the topics it may describe, so the others look missing to it every time.
"""

from __future__ import annotations

from collections.abc import Iterable

import structlog
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    for_code,
)

from shared.contracts.topics import ALL_TOPICS, Topic, dead_letter_topics
from shared.kit.kafka_security import KafkaConnection
from shared.kit.settings import Settings

log = structlog.get_logger(__name__)


def platform_topics() -> tuple[Topic, ...]:
    return ALL_TOPICS + dead_letter_topics()


async def ensure_topics(settings: Settings, topics: Iterable[Topic] | None = None) -> list[str]:
    """Create the topics that do not exist yet, each on its cluster; return the names created."""
    chosen = list(topics if topics is not None else platform_topics())
    created: list[str] = []
    for cluster in ("internal", "edge"):
        on_cluster = [t for t in chosen if t.cluster == cluster]
        if on_cluster:
            created += await _ensure_on(settings, KafkaConnection.of(settings, cluster), on_cluster)
    return created


async def _ensure_on(settings: Settings, connection: KafkaConnection, topics: Iterable[Topic]) -> list[str]:
    wanted = {settings.topic(t.name): t for t in topics}
    admin = AIOKafkaAdminClient(**connection.aiokafka_kwargs(), request_timeout_ms=10_000)
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
        refused: list[str] = []
        for new_topic in missing:  # one by one: a replica may race us to any of them
            # aiokafka returns the broker's per-topic error codes rather than raising them
            response = await admin.create_topics([new_topic])
            for _, code, *_message in response.topic_errors:
                error = for_code(code) if code else None
                if error is None:
                    created.append(new_topic.name)
                elif error in (TopicAuthorizationFailedError, ClusterAuthorizationFailedError):
                    refused.append(new_topic.name)
                elif error is not TopicAlreadyExistsError:
                    log.warning("topic not created", topic=new_topic.name, error=error.__name__)
        if refused:
            log.debug("topics left to the setup job (no CREATE)", count=len(refused))
        if created:
            log.info("topics created", count=len(created))
        return created
    finally:
        await admin.close()
