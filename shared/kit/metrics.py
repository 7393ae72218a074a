"""Prometheus metrics of the event machinery: what each consumer handled, what the relay sent."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from shared.kit.service import ServiceRuntime


class EventMetrics(Collector):
    """Reads the runtime's counters at scrape time (no bookkeeping on the hot path)."""

    def __init__(self, runtime: ServiceRuntime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        events = CounterMetricFamily(
            "nichiiki_consumer_events", "Events seen by a consumer, by outcome", labels=["consumer", "outcome"]
        )
        retries = CounterMetricFamily(
            "nichiiki_consumer_batch_retries", "Batches retried after a transient fault", labels=["consumer"]
        )
        batches = CounterMetricFamily("nichiiki_consumer_batches", "Batches applied", labels=["consumer"])
        commits = CounterMetricFamily(
            "nichiiki_consumer_offset_commits", "Offset commits sent (at most one per commit interval)",
            labels=["consumer"],
        )
        for consumer in self.runtime.consumers:
            stats = consumer.stats
            batches.add_metric([consumer.name], stats.batches)
            commits.add_metric([consumer.name], stats.commits)
            for outcome, value in (
                ("handled", stats.handled), ("duplicate", stats.duplicates),
                ("skipped", stats.skipped), ("parked", stats.parked),
            ):
                events.add_metric([consumer.name, outcome], value)
            retries.add_metric([consumer.name], stats.retries)
        yield events
        yield retries
        yield batches
        yield commits
        relay = self.runtime.relay_or_none
        published = CounterMetricFamily("nichiiki_outbox_published", "Outbox rows published to Kafka")
        published.add_metric([], relay.published if relay else 0)
        yield published
        leader = GaugeMetricFamily("nichiiki_outbox_relay_leader", "1 if this process relays the outbox")
        leader.add_metric([], 1 if relay and relay.is_leader else 0)
        yield leader
