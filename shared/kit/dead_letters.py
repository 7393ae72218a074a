"""Replaying a dead-letter topic back to the topics its records came from.

Run after the fix for whatever parked them is deployed. The inbox rows of parked events are
marked 'parked', so the consumer that parked an event applies it on replay, and consumers that
had handled it already skip it. Replay progress is a consumer group of its own, so running the
command again replays only what was parked since.
"""

from __future__ import annotations

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from shared.contracts.topics import cluster_of
from shared.kit.consumer import dead_letter_origin
from shared.kit.kafka_security import KafkaConnection
from shared.kit.settings import Settings

log = structlog.get_logger(__name__)


async def replay_dead_letters(settings: Settings, dlq_topic: str, *, idle_s: float = 1.0) -> int:
    """Re-publish every not-yet-replayed record of ``dlq_topic``; return how many."""
    internal = KafkaConnection.internal(settings)
    consumer = AIOKafkaConsumer(
        dlq_topic,
        **internal.aiokafka_kwargs(),
        group_id=settings.topic("nichiiki.dlq-replay"),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
    )
    # Dead letters are kept inside; a partner's trip report goes back to the partner-facing cluster.
    edge = KafkaConnection.edge(settings)
    producer = AIOKafkaProducer(**internal.aiokafka_kwargs(), acks="all")
    edge_producer = producer if edge == internal else AIOKafkaProducer(**edge.aiokafka_kwargs(), acks="all")
    await consumer.start()
    await producer.start()
    if edge_producer is not producer:
        await edge_producer.start()
    replayed = 0
    try:
        # The first fetch waits out the group join; after that, an empty fetch means "all replayed".
        first_wait_ms = settings.kafka_session_timeout_ms + 5000
        while True:
            wait_ms = first_wait_ms if replayed == 0 and not consumer.assignment() else int(idle_s * 1000)
            batches = await consumer.getmany(timeout_ms=wait_ms, max_records=500)
            if not batches:
                break
            for records in batches.values():
                for record in records:
                    origin, headers = dead_letter_origin(record.headers)
                    on_edge = cluster_of(origin.removeprefix(settings.topic_prefix)) == "edge"
                    await (edge_producer if on_edge else producer).send_and_wait(
                        origin, value=record.value, key=record.key, headers=headers,
                    )
                    replayed += 1
            await consumer.commit()
        log.info("dead letters replayed", topic=dlq_topic, count=replayed)
        return replayed
    finally:
        if edge_producer is not producer:
            await edge_producer.stop()
        await producer.stop()
        await consumer.stop()
