"""The relay places keyed records itself: exactly where the Kafka default partitioner would."""

from __future__ import annotations

import random

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2

from shared.kit.outbox import _Placement, murmur2


def test_murmur2_is_the_kafka_clients_hash_for_every_length_and_byte() -> None:
    rng = random.Random(22)
    samples = [bytes(rng.randrange(256) for _ in range(length)) for length in range(300) for _ in range(20)]
    samples += [b"", b"\x00", b"\xff" * 3, b"\x80" * 301, b"NCH-304018-2026-000001", "山田".encode()]
    for data in samples:
        assert murmur2(data) == aiokafka_murmur2(data), data


class _Producer:
    """What ``_Placement`` asks of a producer: a topic's partitions (a set, as aiokafka answers)."""

    def __init__(self, partitions: int) -> None:
        self.asked = 0
        self._partitions = set(range(partitions))

    async def partitions_for(self, topic: str) -> set[int]:
        self.asked += 1
        return self._partitions


async def test_a_keyed_record_goes_where_the_default_partitioner_sends_it_and_a_keyless_one_is_left_open() -> None:
    rng = random.Random(7)
    for count in (1, 3, 6, 12):
        producer = _Producer(count)
        placement = _Placement()
        partitions = list(range(count))
        for _ in range(200):
            key = rng.randbytes(rng.randrange(1, 64))
            expected = DefaultPartitioner()(key, partitions, partitions)
            assert await placement.partition(producer, "topic", key) == expected
            assert await placement.partition(producer, "topic", key) == expected
        assert await placement.partition(producer, "topic", None) is None
        assert producer.asked == 1  # once a round per topic
