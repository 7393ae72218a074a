"""Prometheus metrics: the event machinery (consumers, relay, outbox backlog, dead letters), the
components that count for themselves (``runtime.state["metrics"]``: the e-mail sender), the process
(CPU, memory, file descriptors, GC), and how ``/metrics`` stays right with several HTTP workers.

One registry per app (``AppRegistry``). With one worker ``/metrics`` renders it as is. With more
(``NICHIIKI_HTTP_WORKERS`` > 1) ``serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` before the workers
start, so every ``Counter``/``Histogram``/``Gauge`` writes to a file of its process, and whichever
worker answers ``/metrics`` sums them all (prometheus_client's multiprocess mode). Collectors that
read state at scrape time (``EventMetrics``, the process collectors) cannot be read across
processes: ``Mirror`` copies each worker's into multiprocess metrics every ``MIRROR_INTERVAL_S``
(counters by their increase, so they sum; gauges by the largest live value, process gauges per
``pid``), so a scrape is at most that much behind with several workers, and exact with one.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from shared.kit.retention import TABLES

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
        # From each consumer's own fetch state (shared/kit/offsets.py: never below what it fetched,
        # so it holds where the embedded broker's reported ends lag): no broker round trip per scrape.
        lag = GaugeMetricFamily(
            "nichiiki_consumer_lag", "Records a consumer group's member holds past what it applied",
            labels=["group", "topic", "partition"],
        )
        for consumer in self.runtime.consumers:
            for tp, behind in sorted(consumer.lag().items()):
                lag.add_metric([consumer.group_id, tp.topic, str(tp.partition)], behind)
        yield lag
        relay = self.runtime.relay_or_none
        published = CounterMetricFamily("nichiiki_outbox_published", "Outbox rows published to Kafka")
        published.add_metric([], relay.published if relay else 0)
        yield published
        leader = GaugeMetricFamily("nichiiki_outbox_relay_leader", "1 if this process relays the outbox")
        leader.add_metric([], 1 if relay and relay.is_leader else 0)
        yield leader
        # Sampled by the leading relay only (one per database): other processes report nothing.
        backlog = GaugeMetricFamily("nichiiki_outbox_backlog", "Outbox rows not yet relayed to Kafka")
        oldest = GaugeMetricFamily(
            "nichiiki_outbox_oldest_age_seconds", "Age of the oldest outbox row not yet relayed (0: none waits)"
        )
        if relay is not None and relay.backlog is not None and relay.oldest_age_s is not None:
            backlog.add_metric([], relay.backlog)
            oldest.add_metric([], relay.oldest_age_s)
        yield backlog
        yield oldest
        dead = CounterMetricFamily(
            "nichiiki_dead_letters", "Dead letters published, by dead-letter topic", labels=["topic"]
        )
        for topic, count in sorted((relay.dead_letters if relay else {}).items()):
            dead.add_metric([topic], count)
        yield dead
        # Group commit (shared/kit/group_commit.py): writes per batch = writes / batches.
        write_batches = CounterMetricFamily(
            "nichiiki_write_batches", "Transactions committed for group-committed writes", labels=["operation"]
        )
        batched_writes = CounterMetricFamily(
            "nichiiki_batched_writes", "Group-committed writes kept in a committed batch", labels=["operation"]
        )
        for operation, group in sorted(getattr(self.runtime, "group_commits", {}).items()):
            write_batches.add_metric([operation], group.batches)
            batched_writes.add_metric([operation], group.writes)
        yield write_batches
        yield batched_writes
        for component in self.runtime.state.get("metrics", ()):
            yield from component.collect()
        # Summed over replicas this is the table's total: one replica prunes each round.
        pruned = CounterMetricFamily(
            "nichiiki_rows_pruned", "Old rows of the kit's tables deleted by retention", labels=["table"]
        )
        retention = getattr(self.runtime, "retention", None)  # stand-in runtimes of tests may lack it
        for table in TABLES:
            pruned.add_metric([table], retention.pruned[table] if retention else 0)
        yield pruned


class OutcomeCounters(Collector):
    """A component's own counters (a dataclass of ints, read at scrape time) as one counter family
    labelled by outcome: ``<name>_total{outcome="<field>"}``."""

    def __init__(self, name: str, documentation: str, stats: Callable[[], Any], label: str = "outcome") -> None:
        self.name, self.documentation, self.stats, self.label = name, documentation, stats, label

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        stats = self.stats()
        for field in fields(stats):
            family.add_metric([field.name], getattr(stats, field.name))
        yield family


log = structlog.get_logger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
MIRROR_INTERVAL_S = 1.0


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def prepare_multiprocess(workers: int) -> str | None:
    """Before several HTTP workers start: a clean directory for their metric files (the operator's
    ``PROMETHEUS_MULTIPROC_DIR``, emptied, or a new temporary one), inherited by the workers."""
    if workers <= 1:
        return None
    directory = multiprocess_dir()
    if directory is None:
        directory = tempfile.mkdtemp(prefix="nichiiki-metrics-")
    else:
        shutil.rmtree(directory, ignore_errors=True)  # files of a previous run would be summed in
        Path(directory).mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = directory
    return directory


class AppRegistry(CollectorRegistry):
    """The registry of one app: metric objects as usual, and the collectors that read state at
    scrape time set aside too (``scrape_time``), which multiprocess mode mirrors."""

    def __init__(self) -> None:
        super().__init__()
        self.scrape_time: list[Collector] = []
        self.multiprocess = multiprocess_dir() is not None
        for collector in (PROCESS_COLLECTOR, GC_COLLECTOR, PLATFORM_COLLECTOR):
            # The default registry's process, GC and platform collectors: one app per process.
            self.register(collector)

    def register(self, collector: Collector) -> None:
        super().register(collector)
        if not isinstance(collector, MetricWrapperBase):
            self.scrape_time.append(collector)

    def render(self) -> bytes:
        """What ``/metrics`` answers: this process's registry, or every worker's sum."""
        if not self.multiprocess:
            return generate_latest(self)
        combined = CollectorRegistry()
        multiprocess.MultiProcessCollector(combined)  # type: ignore[no-untyped-call]
        return generate_latest(combined)


class Mirror:
    """Copies the scrape-time collectors of this worker into multiprocess metrics (module doc)."""

    def __init__(self, registry: AppRegistry) -> None:
        self.registry = registry
        self._counters: dict[str, Counter] = {}
        self._gauges: dict[str, Gauge] = {}
        self._last: dict[tuple[str, tuple[str, ...]], float] = {}
        self._gauge_labels: dict[str, set[tuple[str, ...]]] = {}

    async def run(self, interval_s: float = MIRROR_INTERVAL_S) -> None:
        try:
            while True:
                try:
                    self.sync()
                except Exception as error:  # a scrape is worth less than the worker
                    log.warning("metrics mirror failed", error=repr(error))
                await asyncio.sleep(interval_s)
        finally:
            self.sync()

    def sync(self) -> None:
        for collector in self.registry.scrape_time:
            for family in collector.collect():
                if family.type == "counter":
                    self._counter(family)
                elif family.type in ("gauge", "info"):
                    self._gauge(family)

    def _counter(self, family: Metric) -> None:
        samples = [s for s in family.samples if s.name.endswith("_total")]
        if not samples:
            return
        labels = sorted(samples[0].labels)
        counter = self._counters.get(family.name)
        if counter is None:
            counter = self._counters[family.name] = Counter(family.name, family.documentation, labels, registry=None)
        for sample in samples:
            values = tuple(sample.labels[name] for name in labels)
            key = (family.name, values)
            last = self._last.get(key, 0.0)
            # A counter that went back (its component was rebuilt) starts again from zero.
            increase = sample.value - last if sample.value >= last else sample.value
            if increase > 0:
                (counter.labels(*values) if labels else counter).inc(increase)
            self._last[key] = sample.value

    def _gauge(self, family: Metric) -> None:
        name = family.name if family.type == "gauge" else f"{family.name}_info"
        samples = [s for s in family.samples if s.name == name]
        labels = sorted(samples[0].labels) if samples else None
        gauge = self._gauges.get(name)
        if gauge is None:
            if labels is None:
                return
            # Per process where it is a process's own (memory, CPU time...): one series per pid.
            mode = "liveall" if name.startswith("process_") else "livemax"
            gauge = self._gauges[name] = Gauge(
                name, family.documentation, labels, registry=None, multiprocess_mode=mode  # type: ignore[arg-type]
            )
        label_names = list(gauge._labelnames)
        seen = set()
        for sample in samples:
            values = tuple(sample.labels.get(n, "") for n in label_names)
            seen.add(values)
            (gauge.labels(*values) if label_names else gauge).set(sample.value)
        # A series this worker no longer reports (a partition assigned elsewhere now) reads 0 here.
        for values in self._gauge_labels.get(name, set()) - seen:
            (gauge.labels(*values) if label_names else gauge).set(0)
        self._gauge_labels[name] = seen


def process_exited() -> None:
    """A worker going away: drop its live gauges from the sums."""
    if multiprocess_dir() is not None:
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
