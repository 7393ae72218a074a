"""Where a partition ends, in a way that holds when the broker's reported end lags its log.

The embedded broker (Tansu 0.6) answers ListOffsets(latest) — ``end_offsets`` — with a stale end
under concurrent producers: measured, 374 while records ran to offset 374 (one short) and 267
while they ran to 331, and 30-70 short after bursts of 12,000 on 4 partitions, staying so until the
next record came; the high watermark in its *fetch* responses was right each time. Apache
Kafka's answers agree, so nothing here costs more there than one short fetch. Two rules follow:

- the end of a partition is never less than what was fetched from it: ``end_of`` takes the
  largest of the reported end, the fetch high watermark and the last fetched offset + 1;
- "read to the end" (``log_end_offsets``) fetches on from the reported end until two fetches in
  a row come back empty past every watermark seen, within a bound.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

__all__ = ["end_of", "end_probe", "fetch_state", "log_end_offsets", "partition_lag"]

#: How long a probe's fetch waits for records; an empty fetch costs about this much.
PROBE_FETCH_WAIT_MS = 20


def end_of(*candidates: int | None) -> int:
    """The end of a partition: the largest of what says where it ends (None: not known)."""
    return max((c for c in candidates if c is not None), default=0)


def end_probe(connection_kwargs: Mapping[str, Any], **extra: Any) -> AIOKafkaConsumer:
    """A consumer for ``log_end_offsets``: no group membership, no commits, short fetch waits."""
    return AIOKafkaConsumer(
        **connection_kwargs, enable_auto_commit=False, fetch_max_wait_ms=PROBE_FETCH_WAIT_MS, **extra
    )


async def log_end_offsets(
    probe: AIOKafkaConsumer, partitions: Iterable[TopicPartition], *, timeout_s: float = 5.0
) -> dict[TopicPartition, int]:
    """The offset after the last record of each partition, even where the broker reports less.

    ``probe`` is assigned the partitions and moved (use one of its own, e.g. ``end_probe``; a
    client that only probes and never subscribes may have a group id, for reading its commits).
    Past ``timeout_s`` it returns the best it knows so far: never less than the reported end."""
    wanted = list(partitions)
    if not wanted:
        return {}
    ends = dict(await probe.end_offsets(wanted))
    probe.assign(wanted)
    for tp in wanted:
        # A stale answer is the base of a batch that runs further: fetching from it reads the rest.
        probe.seek(tp, ends[tp])
    wait_ms = max(100, 3 * PROBE_FETCH_WAIT_MS)
    deadline = time.monotonic() + timeout_s
    empty = 0
    while empty < 2 and time.monotonic() < deadline:
        batches = await probe.getmany(*wanted, timeout_ms=wait_ms, max_records=10_000)
        fetched = False
        for tp, records in batches.items():
            if records:
                fetched = True
                ends[tp] = end_of(ends[tp], records[-1].offset + 1)
        for tp in wanted:
            ends[tp] = end_of(ends[tp], probe.highwater(tp))
        # Empty counts only once each partition's position has passed every watermark seen.
        behind = False
        for tp in wanted:
            if await probe.position(tp) < ends[tp]:
                behind = True
        empty = 0 if fetched or behind else empty + 1
        if behind and not fetched:
            await asyncio.sleep(0)  # the records past the watermark are on their way
    return ends


def fetch_state(client: Any) -> dict[TopicPartition, tuple[int | None, int | None]]:
    """What a running aiokafka consumer knows of each assigned partition, without a round trip:
    ``(position, high watermark)``, either None until known.

    The position (the next offset it hands out) is read from the client's assignment state, as
    ``highwater()`` itself does: ``position()`` is a coroutine and a scrape is not."""
    try:
        assignment = client._subscription.subscription.assignment
        if assignment is None:
            return {}
        state: dict[TopicPartition, tuple[int | None, int | None]] = {}
        for tp in assignment.tps:
            tp_state = assignment.state_value(tp)
            position = tp_state.position if tp_state.has_valid_position else None
            state[tp] = (position, tp_state.highwater)
        return state
    except AttributeError:  # not subscribed (yet), or another client version: nothing known
        return {}


def partition_lag(
    state: Mapping[TopicPartition, tuple[int | None, int | None]], applied: Mapping[TopicPartition, int]
) -> dict[TopicPartition, int]:
    """Records past what was applied, per partition of ``state`` (``fetch_state``): the end is the
    largest of the fetch high watermark, the fetch position and what was applied; a partition none
    of whose records was handed out yet was applied up to its position."""
    lag: dict[TopicPartition, int] = {}
    for tp, (position, highwater) in state.items():
        done = applied.get(tp, position)
        if done is None:
            continue  # neither a position nor anything applied yet: unknown, not zero
        lag[tp] = end_of(highwater, position, done) - done
    return lag
