"""Under load a poll that fetched a partial batch waits briefly for the next records (fewer, larger
batches, each a transaction); after a pause, or with a full batch, it hands over at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord

from shared.kit import consumer as kit_consumer
from shared.kit.consumer import _BatchPoll

P0, P1 = TopicPartition("t", 0), TopicPartition("t", 1)


def record(tp: TopicPartition, offset: int) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(tp.topic, tp.partition, offset, 0, 0, b"k", b"v", None, 1, 1, [])


class Fetches:
    """The aiokafka consumer as a poll sees it: each ``getmany`` takes the next answer (records by
    partition, or an error to raise) at once, or waits its whole timeout when that is empty; each
    call is noted."""

    def __init__(self, answers: Sequence[dict[TopicPartition, list[int]] | Exception]) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[int, int]] = []

    async def getmany(self, *, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Any]]:
        self.calls.append((timeout_ms, max_records))
        answer = self.answers.pop(0) if self.answers else {}
        if isinstance(answer, Exception):
            raise answer
        if not answer:
            await asyncio.sleep(timeout_ms / 1000)
        return {tp: [record(tp, offset) for offset in offsets] for tp, offsets in answer.items()}


def offsets(records: Sequence[ConsumerRecord[bytes, bytes]]) -> list[tuple[int, int]]:
    return [(r.partition, r.offset) for r in records]


async def test_records_after_a_pause_go_at_once() -> None:
    fetches = Fetches([{P0: [1, 2]}, {P0: [3]}])
    assert offsets(await _BatchPoll(500)(fetches)) == [(0, 1), (0, 2)]
    assert len(fetches.calls) == 1  # no second fetch: record 3 was there to be taken, and was not


async def test_under_load_a_partial_batch_takes_the_next_records_along_in_order() -> None:
    poll = _BatchPoll(500)
    fetches = Fetches([{P0: [1]}, {P0: [2], P1: [7]}, {P0: [3, 4], P1: [8]}])
    assert offsets(await poll(fetches)) == [(0, 1)]
    # the next records come within the window: the poll waits for more and hands over both fetches
    assert offsets(await poll(fetches)) == [(0, 2), (1, 7), (0, 3), (0, 4), (1, 8)]
    assert fetches.calls[1:] == [
        (kit_consumer.POLL_TIMEOUT_MS, 500), (round(kit_consumer.LINGER_S * 1000), 498),
    ]


async def test_the_linger_ends_when_nothing_more_comes() -> None:
    poll = _BatchPoll(500)
    fetches = Fetches([{P0: [1]}, {P0: [2]}, {}])
    await poll(fetches)
    begun = time.monotonic()
    assert offsets(await poll(fetches)) == [(0, 2)]
    # it waited for more (the fetch's own timeout), and then gave up: bounded, not until records come
    # (the upper bound is loose: a loaded machine runs the loop late, never early)
    assert kit_consumer.LINGER_S * 0.8 <= time.monotonic() - begun < 1.0


async def test_a_full_batch_goes_at_once() -> None:
    poll = _BatchPoll(3)
    fetches = Fetches([{P0: [1]}, {P0: [2, 3, 4]}, {P0: [5]}])
    await poll(fetches)
    assert offsets(await poll(fetches)) == [(0, 2), (0, 3), (0, 4)]
    assert len(fetches.calls) == 2


async def test_a_fault_while_lingering_comes_with_the_next_poll_after_the_records_in_hand() -> None:
    poll = _BatchPoll(500)
    fault = KafkaError("broker away")
    fetches = Fetches([{P0: [1]}, {P0: [2]}, fault, {P0: [3]}])
    await poll(fetches)
    assert offsets(await poll(fetches)) == [(0, 2)]
    with pytest.raises(KafkaError):
        await poll(fetches)
    assert offsets(await poll(fetches)) == [(0, 3)]


async def test_no_linger_when_turned_off() -> None:
    poll = _BatchPoll(500, linger_s=0)
    fetches = Fetches([{P0: [1]}, {P0: [2]}, {P0: [3]}])
    await poll(fetches)
    assert offsets(await poll(fetches)) == [(0, 2)]
    assert len(fetches.calls) == 2
