"""A paced consumer (``ConsumerSpec.pace_s``) starts a batch at most once per pace while records keep
coming: it rests with its partitions paused for what is left of the pace, so that what comes meanwhile
is fetched after in one batch; a batch that took longer than the pace, a full batch (a backlog) or a
quiet spell costs no rest.
And a consumer's idle rest can be capped below the setting (``ConsumerSpec.idle_rest_max_s``)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from shared.kit import consumer as kit_consumer
from shared.kit.consumer import EventConsumer, EventRouter, _BatchPoll
from shared.kit.outbox import Outbox
from shared.kit.settings import Settings
from tests.unit.test_consumer_idle_rest import P0, P1, Consumer


async def test_after_records_a_paced_poll_rests_what_is_left_of_the_pace_then_takes_what_came() -> None:
    consumer = Consumer({P0, P1}, [{P0: [1]}, {P0: [2, 3], P1: [9]}])
    poll = _BatchPoll(500, linger_s=0, pace_s=0.3)
    assert [r.offset for r in await poll(consumer)] == [1]
    await asyncio.sleep(0.1)  # the batch's own work
    started = asyncio.get_running_loop().time()
    assert [(r.partition, r.offset) for r in await poll(consumer)] == [(0, 2), (0, 3), (1, 9)]
    waited = asyncio.get_running_loop().time() - started
    # The pace counts from the first batch's start: what is left of it, not a whole pace more (the
    # upper bound leaves room for a loaded machine running the loop late).
    assert 0.15 <= waited < 0.29
    assert consumer.calls == [
        ("getmany", kit_consumer.POLL_TIMEOUT_MS),
        ("pause", {P0, P1}), ("resume", {P0, P1}), ("getmany", kit_consumer.POLL_TIMEOUT_MS),
    ]


async def test_a_batch_that_took_longer_than_the_pace_is_followed_at_once() -> None:
    consumer = Consumer({P0}, [{P0: [1]}, {P0: [2]}])
    poll = _BatchPoll(500, linger_s=0, pace_s=0.02)
    await poll(consumer)
    await asyncio.sleep(0.03)
    assert [r.offset for r in await poll(consumer)] == [2]
    assert [call for call, _ in consumer.calls] == ["getmany", "getmany"]


async def test_a_backlog_is_not_paced() -> None:
    consumer = Consumer({P0}, [{P0: [1, 2, 3]}, {P0: [4, 5, 6]}, {P0: [7]}, {P0: [8]}])
    poll = _BatchPoll(3, linger_s=0, pace_s=0.5)
    await poll(consumer)  # full: the next goes at once
    assert [r.offset for r in await poll(consumer)] == [4, 5, 6]
    assert [r.offset for r in await poll(consumer)] == [7]  # full again: at once
    assert [call for call, _ in consumer.calls] == ["getmany"] * 3
    await poll(consumer)  # after a partial batch the pace applies again
    assert [call for call, _ in consumer.calls][3:] == ["pause", "resume", "getmany"]


async def test_a_poll_that_found_nothing_brings_no_rest() -> None:
    consumer = Consumer({P0}, [{}, {P0: [4]}])
    poll = _BatchPoll(500, linger_s=0, pace_s=0.5)
    assert await poll(consumer) == ()
    assert [r.offset for r in await poll(consumer)] == [4]
    assert [call for call, _ in consumer.calls] == ["getmany", "getmany"]


async def test_unpaced_by_default() -> None:
    consumer = Consumer({P0}, [{P0: [1]}, {P0: [2]}])
    poll = _BatchPoll(500, linger_s=0)
    await poll(consumer)
    await poll(consumer)
    assert [call for call, _ in consumer.calls] == ["getmany", "getmany"]


def consumer_with(settings: Settings, idle_rest_max_s: float = float("inf")) -> EventConsumer:
    return EventConsumer(
        service="svc", settings=settings, pool=cast(Any, None), outbox=Outbox("outbox_svc"), router=EventRouter(),
        topics=[], idle_rest_max_s=idle_rest_max_s,
    )


def test_a_consumer_rests_as_set_unless_its_own_cap_is_shorter() -> None:
    settings = Settings(consumer_idle_rest_ms=400)
    assert consumer_with(settings).idle_rest_s == 0.4
    assert consumer_with(settings, idle_rest_max_s=0.1).idle_rest_s == 0.1  # the partner feed's
    assert consumer_with(settings, idle_rest_max_s=1.0).idle_rest_s == 0.4
    # Turned off for all (the deployments on Apache Kafka): no consumer rests.
    assert consumer_with(Settings(consumer_idle_rest_ms=0), idle_rest_max_s=0.1).idle_rest_s == 0
