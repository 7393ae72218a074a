"""When a consumer commits its offsets: every applied batch is committed without waiting for another
record, including a batch applied while the previous commit was still on the wire."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, cast

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from shared.contracts.topics import RESIDENTS
from shared.kit.consumer import EventConsumer, EventRouter, _partition_spans
from shared.kit.outbox import Outbox
from shared.kit.settings import Settings

TP = TopicPartition("t.registration.residents.v1", 0)


class SlowCommitClient:
    """The aiokafka consumer as the kit sees it: its assignment, and commits that take a while."""

    def __init__(self) -> None:
        self.committed: list[dict[TopicPartition, int]] = []
        self.commit_s = 0.2

    def assignment(self) -> set[TopicPartition]:
        return {TP}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        await asyncio.sleep(self.commit_s)
        self.committed.append(dict(offsets))


class Batch:
    """What FastStream hands the kit: the raw records and the client that fetched them."""

    def __init__(self, client: SlowCommitClient, offsets: Sequence[int]) -> None:
        self.consumer = client
        self.raw_message = tuple(
            ConsumerRecord(TP.topic, TP.partition, offset, 0, 0, b"k", b"v", None, 1, 1, [])
            for offset in offsets
        )

    async def nack(self) -> None:
        raise AssertionError("no batch fails here")


async def test_a_batch_applied_during_a_commit_is_committed_without_another_record() -> None:
    settings = Settings().model_copy(update={"consumer_commit_interval_ms": 50})
    consumer = EventConsumer(
        service="tests", settings=settings, pool=cast(Any, None), outbox=Outbox("unused"), router=EventRouter(),
        topics=[RESIDENTS],
    )

    async def applied(records: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
        return None

    consumer.handle_batch = applied  # type: ignore[method-assign]
    client = SlowCommitClient()
    await consumer._on_batch(cast(Any, Batch(client, [10, 11, 12])))
    await asyncio.sleep(0.1)  # the first commit is on the wire now (it takes 0.2 s)
    assert client.committed == []
    await consumer._on_batch(cast(Any, Batch(client, [13, 14, 15])))  # the last batch of a burst
    await asyncio.sleep(0.8)
    assert client.committed == [{TP: 13}, {TP: 16}]


def test_a_batch_is_committed_past_the_last_record_of_each_of_its_partitions() -> None:
    """Per partition of a batch (its records interleaved, as a batch merged in time order is): the
    offset of its first record (applied from there, for the lag) and the offset after its last."""
    other = TopicPartition(TP.topic, 1)
    records = [
        ConsumerRecord(tp.topic, tp.partition, offset, 0, 0, b"k", b"v", None, 1, 1, [])
        for tp, offset in [(TP, 7), (other, 3), (TP, 8), (other, 4), (TP, 9)]
    ]
    assert _partition_spans(records) == {TP: (7, 10), other: (3, 5)}
