"""An idle consumer rests between fetches with its partitions paused (the embedded broker spends CPU
all the while a fetch waits on it); any records bring it back to listening at once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from shared.kit import consumer as kit_consumer
from shared.kit.consumer import _BatchPoll

P0, P1, P2 = TopicPartition("t", 0), TopicPartition("t", 1), TopicPartition("t", 2)


class Consumer:
    """The aiokafka consumer as the poll uses it: an assignment that can be paused, and fetches that
    answer with the next records given or wait out their timeout. Every call is noted in order."""

    def __init__(self, assignment: set[TopicPartition], answers: list[dict[TopicPartition, list[int]]]) -> None:
        self.assigned = set(assignment)
        self.paused_now: set[TopicPartition] = set()
        self.answers = answers
        self.calls: list[tuple[str, Any]] = []

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def paused(self) -> set[TopicPartition]:
        return self.paused_now & self.assigned

    def pause(self, *partitions: TopicPartition) -> None:
        self.calls.append(("pause", set(partitions)))
        self.paused_now |= set(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self.calls.append(("resume", set(partitions)))
        self.paused_now -= set(partitions)

    async def getmany(self, *, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Any]]:
        self.calls.append(("getmany", timeout_ms))
        assert not self.paused(), "fetched while paused"
        answer = self.answers.pop(0) if self.answers else {}
        if not answer:
            await asyncio.sleep(timeout_ms / 1000)
        return {tp: [ConsumerRecord(tp.topic, tp.partition, o, 0, 0, b"k", b"v", None, 1, 1, []) for o in offsets]
                for tp, offsets in answer.items()}


@pytest.fixture
def idle_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kit_consumer, "IDLE_AFTER_S", 0.05)


async def test_a_consumer_that_just_joined_listens_at_once() -> None:
    consumer = Consumer({P0, P1}, [])
    await _BatchPoll(500, rest_s=0.2, listen_ms=60)(consumer)
    assert consumer.calls == [("getmany", kit_consumer.POLL_TIMEOUT_MS)]


async def test_an_idle_consumer_pauses_its_partitions_rests_then_listens_its_listen(idle_at_once: None) -> None:
    consumer = Consumer({P0, P1}, [{}, {}])
    poll = _BatchPoll(500, rest_s=0.03, listen_ms=60)
    await poll(consumer)  # not idle yet: the usual listen
    await asyncio.sleep(0.06)
    started = asyncio.get_running_loop().time()
    assert await poll(consumer) == ()
    assert asyncio.get_running_loop().time() - started >= 0.03 + 0.06
    assert consumer.calls[1:] == [("pause", {P0, P1}), ("resume", {P0, P1}), ("getmany", 60)]


async def test_records_end_the_rest_until_the_consumer_is_idle_again(idle_at_once: None) -> None:
    consumer = Consumer({P0}, [{}, {P0: [7]}, {}])
    poll = _BatchPoll(500, linger_s=0, rest_s=0.01, listen_ms=60)
    await poll(consumer)
    await asyncio.sleep(0.06)
    assert [r.offset for r in await poll(consumer)] == [7]  # rested, then found a record
    consumer.calls.clear()
    await poll(consumer)  # a record just came: no rest
    assert consumer.calls == [("getmany", kit_consumer.POLL_TIMEOUT_MS)]


async def test_a_rebalance_during_the_rest_leaves_the_new_assignment_alone(idle_at_once: None) -> None:
    consumer = Consumer({P0, P1}, [{}, {}])
    poll = _BatchPoll(500, rest_s=0.05, listen_ms=10)
    await poll(consumer)
    await asyncio.sleep(0.06)
    resting = asyncio.create_task(poll(consumer))
    await asyncio.sleep(0.02)
    consumer.assigned, consumer.paused_now = {P1, P2}, {P1}  # P0 went elsewhere; P2 came unpaused
    await resting
    assert ("resume", {P1}) in consumer.calls
    assert consumer.paused() == set()


async def test_a_consumer_stopped_while_resting_is_left_unpaused(idle_at_once: None) -> None:
    consumer = Consumer({P0}, [{}])
    poll = _BatchPoll(500, rest_s=10, listen_ms=10)
    await poll(consumer)
    await asyncio.sleep(0.06)
    resting = asyncio.create_task(poll(consumer))
    await asyncio.sleep(0.02)
    assert consumer.paused() == {P0}
    resting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await resting
    assert consumer.paused() == set()


async def test_no_rest_when_it_is_turned_off(idle_at_once: None) -> None:
    consumer = Consumer({P0}, [{}, {}])
    poll = _BatchPoll(500, rest_s=0, listen_ms=10)
    await poll(consumer)
    await asyncio.sleep(0.06)
    await poll(consumer)
    assert consumer.calls == [("getmany", kit_consumer.POLL_TIMEOUT_MS)] * 2
