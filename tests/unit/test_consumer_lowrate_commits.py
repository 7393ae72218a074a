"""How often a consumer commits while batches keep coming: once per longest delay, not once per
interval (a commit costs the consumer and the broker CPU), and the tail at once when they pause."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, cast

import pytest
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from shared.contracts.topics import RESIDENTS
from shared.kit import consumer as kit_consumer
from shared.kit.consumer import EventConsumer, EventRouter, FetchedBatch
from shared.kit.outbox import Outbox
from shared.kit.settings import Settings

TP = TopicPartition("t.registration.residents.v1", 0)


class Client:
    def __init__(self) -> None:
        self.committed: list[tuple[float, dict[TopicPartition, int]]] = []

    def assignment(self) -> set[TopicPartition]:
        return {TP}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.committed.append((time.monotonic(), dict(offsets)))


def batch(client: Client, offset: int) -> FetchedBatch:
    record = ConsumerRecord(TP.topic, TP.partition, offset, 0, 0, b"k", b"v", None, 1, 1, [])
    return FetchedBatch((record,), client)


def consumer(interval_ms: int) -> EventConsumer:
    settings = Settings().model_copy(update={"consumer_commit_interval_ms": interval_ms})
    made = EventConsumer(
        service="tests", settings=settings, pool=cast(Any, None), outbox=Outbox("unused"), router=EventRouter(),
        topics=[RESIDENTS],
    )

    async def applied(records: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
        return None

    made.handle_batch = applied  # type: ignore[method-assign]
    return made


async def test_a_steady_flow_of_batches_is_committed_once_per_longest_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kit_consumer, "COMMIT_MAX_DELAY_S", 0.3)
    reader, client = consumer(100), Client()
    begun = time.monotonic()
    for offset in range(60):  # a batch every 10 ms: an interval (100 ms) never passes without one
        await reader._on_batch(batch(client, offset))
        await asyncio.sleep(0.01)
    elapsed, flowing = time.monotonic() - begun, len(client.committed)
    # once per interval would be elapsed / 0.1 commits (6 or more)
    assert 1 <= flowing <= elapsed / 0.3 + 1 < elapsed / 0.1, client.committed
    assert all(at - begun >= 0.3 for at, _ in client.committed)
    await asyncio.sleep(0.25)  # they pause: the tail is committed after an interval
    assert client.committed[-1][1] == {TP: 60}
    assert reader.stats.commits == len(client.committed)


async def test_a_lone_batch_is_committed_after_an_interval() -> None:
    reader, client = consumer(50), Client()
    begun = time.monotonic()
    await reader._on_batch(batch(client, 7))
    await asyncio.sleep(0.03)
    assert client.committed == []  # not sooner than an interval
    await asyncio.sleep(0.1)
    assert [offsets for _, offsets in client.committed] == [{TP: 8}]
    assert client.committed[0][0] - begun < 0.1  # not the longest delay: nothing came after it
