"""On the real broker: an idle consumer rests with every partition it holds paused (no fetch waits on
the broker meanwhile), and what was published while it rested is still taken, every record once."""

from __future__ import annotations

from shared.kit.settings import Settings
from tests.integration.test_consumer_lag import burst, slow_consumer
from tests.support import eventually, fresh_topic


async def test_an_idle_consumer_rests_paused_and_takes_what_came_meanwhile(settings: Settings) -> None:
    topic = await fresh_topic(settings, partitions=3, with_dlq=False)
    resting = settings.model_copy(update={"consumer_idle_rest_ms": 500})
    async with slow_consumer(resting, topic, delay_s=0) as consumer:
        await burst(settings, topic, producers=1, each=1)

        async def handled(count: int) -> bool:
            return consumer.stats.handled >= count

        await eventually(lambda: handled(1), timeout=30)
        reader = consumer._reader

        async def resting_paused() -> bool:
            held = reader.assignment()
            return bool(held) and reader.paused() == held

        # A second after its last record it rests: every partition it holds is paused.
        await eventually(resting_paused, timeout=10, interval=0.02)
        total = sum((await burst(settings, topic, producers=2, each=40)).values())  # the first record too
        await eventually(lambda: handled(total), timeout=30)
        assert consumer.stats.handled == total
