"""A polled batch goes straight to the kit, without FastStream's per-message dispatch (middlewares,
context scopes, parser, decoder, dependency injection): what it kept of it is checked here."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord
from faststream.kafka import KafkaBroker

from shared.contracts.topics import RESIDENTS
from shared.kit import consumer as kit_consumer
from shared.kit.consumer import EventConsumer, EventRouter, FetchedBatch, _Dispatch
from shared.kit.outbox import Outbox
from shared.kit.settings import Settings

TOPIC = "t.registration.residents.v1"


def record(partition: int, offset: int) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(TOPIC, partition, offset, 0, 0, b"k", b"v", None, 1, 1, [("ce_type", b"\xff")])


class Client:
    """The aiokafka consumer as a batch sees it: where each partition was rewound to."""

    def __init__(self) -> None:
        self.seeks: list[tuple[TopicPartition, int]] = []

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))


class Subscriber:
    """What the dispatch reads of a FastStream subscriber."""

    def __init__(self) -> None:
        self.running = True
        self.consumer = Client()
        self.held: list[bool] = []
        self.locked = False

    @property
    def lock(self) -> Any:
        outer = self

        class Lock:
            def __enter__(self) -> None:
                outer.locked = True

            def __exit__(self, *exc: object) -> None:
                outer.locked = False

        return Lock()


async def test_a_batch_reaches_the_handler_as_fetched_under_the_subscriber_lock() -> None:
    subscriber = Subscriber()
    seen: list[FetchedBatch] = []

    async def handle(batch: FetchedBatch) -> None:
        subscriber.held.append(subscriber.locked)
        seen.append(batch)

    records = (record(0, 5), record(1, 2))
    await _Dispatch(subscriber, handle)(records)
    # the records themselves, headers unread (one that is not UTF-8 must reach the kit to be parked)
    assert [batch.raw_message for batch in seen] == [records]
    assert seen[0].consumer is subscriber.consumer
    assert subscriber.held == [True] and not subscriber.locked  # a graceful stop waits for it


async def test_nothing_is_handled_once_the_subscriber_stops() -> None:
    subscriber = Subscriber()
    subscriber.running = False

    async def handle(batch: FetchedBatch) -> None:
        raise AssertionError("a stopped subscriber hands nothing over")

    await _Dispatch(subscriber, handle)((record(0, 1),))


async def test_a_failing_batch_is_logged_and_the_consume_loop_goes_on() -> None:
    subscriber = Subscriber()

    async def handle(batch: FetchedBatch) -> None:
        raise RuntimeError("boom")

    await _Dispatch(subscriber, handle)((record(0, 1),))  # does not raise
    assert not subscriber.locked


async def test_a_cancelled_batch_is_not_swallowed() -> None:
    subscriber = Subscriber()

    async def handle(batch: FetchedBatch) -> None:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await _Dispatch(subscriber, handle)((record(0, 1),))


async def test_nack_rewinds_each_partition_to_its_first_record() -> None:
    client = Client()
    batch = FetchedBatch((record(0, 7), record(1, 3), record(0, 8), record(1, 4)), client)
    await batch.nack()
    assert sorted(client.seeks) == [(TopicPartition(TOPIC, 0), 7), (TopicPartition(TOPIC, 1), 3)]


async def test_attach_hands_batches_to_the_consumer_directly() -> None:
    consumer = EventConsumer(
        service="tests", settings=Settings(), pool=cast(Any, None), outbox=Outbox("unused"), router=EventRouter(),
        topics=[RESIDENTS],
    )
    batches: list[FetchedBatch] = []

    async def on_batch(batch: FetchedBatch) -> None:
        batches.append(batch)

    setattr(consumer, "_on_batch", on_batch)  # noqa: B010 (before attach, which binds it)
    broker = KafkaBroker("127.0.0.1:9", logger=None)
    consumer.attach(broker)
    (subscriber,) = broker.subscribers
    assert isinstance(subscriber.consume_one, _Dispatch)  # type: ignore[attr-defined]
    assert isinstance(subscriber.get_msg, kit_consumer._BatchPoll)  # type: ignore[attr-defined]
    subscriber.running = True
    records = (record(0, 1),)
    await subscriber.consume_one(records)  # type: ignore[attr-defined]
    assert [batch.raw_message for batch in batches] == [records]
