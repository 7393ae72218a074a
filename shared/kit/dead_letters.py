"""Replaying a dead-letter topic back to the topics its records came from.

Run after the fix for whatever parked them is deployed. The inbox rows of parked events are
marked 'parked' with their dead letter's id, and a replayed record names that dead letter (a
``dlq_replay`` header): the consumer that parked the event applies it once, consumers that had
handled it already skip it, and a redelivery of the original record (not a replay) never re-runs
it. Replay progress is a consumer group of its own, so running the command again replays only
what was parked since.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from shared.contracts.acls import DLQ_REPLAY_GROUP
from shared.contracts.topics import cluster_of
from shared.kit.consumer import dead_letter_origin
from shared.kit.inbox import DEAD_LETTER_ID_HEADER, REPLAY_HEADER
from shared.kit.kafka_security import KafkaConnection
from shared.kit.offsets import end_probe, log_end_offsets
from shared.kit.settings import Settings

log = structlog.get_logger(__name__)


async def replay_dead_letters(
    settings: Settings, dlq_topic: str, *, idle_s: float = 1.0, progress: Callable[[int, int], None] | None = None,
) -> int:
    """Re-publish every not-yet-replayed record of ``dlq_topic``; return how many.

    Only what the topic held when the replay began is replayed: an event that fails again is parked
    again (a new dead letter) for the next replay. ``progress(replayed, total)`` is called after
    each batch (total: what was left to replay when the first batch came, by ``shared.kit.offsets``)."""
    internal = KafkaConnection.internal(settings)
    if await _all_replayed(internal, dlq_topic, settings.topic(DLQ_REPLAY_GROUP)):
        log.info("dead letters replayed", topic=dlq_topic, count=0)
        return 0
    consumer = AIOKafkaConsumer(
        dlq_topic,
        **internal.aiokafka_kwargs(),
        group_id=settings.topic(DLQ_REPLAY_GROUP),
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
    total: int | None = None
    #: Where each partition ended when the replay began: only what was parked before it is replayed.
    #: An event that fails again is parked again, as a new dead letter past this end, for the next
    #: replay; replaying "until the topic is empty" would chase it forever.
    ends: dict[TopicPartition, int] | None = None
    try:
        # The first fetch waits out the group join; after that, an empty fetch means "all replayed".
        first_wait_ms = settings.kafka_session_timeout_ms + 5000
        while True:
            wait_ms = first_wait_ms if replayed == 0 and not consumer.assignment() else int(idle_s * 1000)
            batches = await consumer.getmany(timeout_ms=wait_ms, max_records=500)
            if not batches:
                break
            if ends is None:
                ends = await _ends(internal, list(consumer.assignment()))
                if progress is not None:
                    starts = {tp: records[0].offset for tp, records in batches.items() if records}
                    total = sum(max(0, end - starts.get(tp, end)) for tp, end in ends.items())
            done: dict[TopicPartition, int] = {}
            for tp, records in batches.items():
                for record in records:
                    if record.offset >= ends.get(tp, 0):
                        break  # parked after the replay began: the next replay's
                    origin, headers = dead_letter_origin(record.headers)
                    # A dead letter parked before they had ids replays as one without (b"").
                    headers.append((REPLAY_HEADER, dict(record.headers).get(DEAD_LETTER_ID_HEADER, b"")))
                    on_edge = cluster_of(origin.removeprefix(settings.topic_prefix)) == "edge"
                    await (edge_producer if on_edge else producer).send_and_wait(
                        origin, value=record.value, key=record.key, headers=headers,
                    )
                    replayed += 1
                    done[tp] = record.offset + 1
            if done:
                await consumer.commit({tp: OffsetAndMetadata(offset, "") for tp, offset in done.items()})
            if progress is not None:
                total = max(total or 0, replayed)
                progress(replayed, total)
            if not [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
                break
        log.info("dead letters replayed", topic=dlq_topic, count=replayed)
        return replayed
    finally:
        if edge_producer is not producer:
            await edge_producer.stop()
        await producer.stop()
        await consumer.stop()


async def _ends(connection: KafkaConnection, assigned: list[TopicPartition]) -> dict[TopicPartition, int]:
    """Where each assigned partition ends now (by ``shared.kit.offsets``: never by a stale watermark)."""
    probe = end_probe(connection.aiokafka_kwargs())
    await probe.start()
    try:
        return await log_end_offsets(probe, assigned)
    finally:
        await probe.stop()


async def _all_replayed(connection: KafkaConnection, dlq_topic: str, group: str) -> bool:
    """Whether the replay group has already passed every record of ``dlq_topic``.

    Asked without joining the group: a join, and the first fetch that waits it out, takes seconds
    (the session timeout and more) even where there is nothing to replay, and most dead-letter
    topics have nothing. A topic not known yet is left to the replay itself."""
    probe = end_probe(connection.aiokafka_kwargs(), group_id=group)
    await probe.start()
    try:
        await probe.topics()  # fetches the metadata
        partitions = probe.partitions_for_topic(dlq_topic)
        if not partitions:
            return False
        tps = [TopicPartition(dlq_topic, p) for p in sorted(partitions)]
        # Where a replay would start: the group's commit, or (none yet) the log's first record.
        firsts = await probe.beginning_offsets(tps)
        starts = {tp: committed if (committed := await probe.committed(tp)) is not None else firsts[tp] for tp in tps}
        ends = await log_end_offsets(probe, tps)
        return all(starts[tp] >= ends[tp] for tp in tps)
    finally:
        await probe.stop()
