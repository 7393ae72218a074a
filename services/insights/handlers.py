"""Use cases of insights: projecting events, rebuilding from the earliest offsets, reading figures.

A rebuild is a new generation: one transaction empties the tables and bumps the generation; then
every replica's consumer moves to the group ``<name>-g<generation>``, which has no offsets and so
starts at the earliest record of every topic, with an inbox of its own (its name is the group's).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date

import structlog

from services.insights import domain, store
from services.insights.domain import (
    CertificateFigure,
    DonationFigure,
    Kpis,
    MonthlyRegistrations,
    ProgrammeFigure,
    RegistrationFigure,
    RelationshipFigure,
    Scope,
)
from services.insights.population import population_of
from shared.contracts.base import EventData
from shared.contracts.registration import ResidentWithdrawn
from shared.contracts.topics import Topic
from shared.kit import erasure
from shared.kit.consumer import BACKGROUND_PACE_S, EventConsumer, EventRouter
from shared.kit.db import Connection
from shared.kit.service import ConsumerSpec, ServiceRuntime, UnitOfWork
from shared.kit.use_case import Outcome, Write

log = structlog.get_logger(__name__)


async def project(conn: Connection, generation: int, events: Sequence[EventData]) -> None:
    """Apply a run of events to the read model of ``generation`` (nothing if a rebuild moved on)."""
    current, erased = await store.generation_and_erased(conn, domain.resident_ids(events))
    if current != generation:
        log.info("events of an earlier generation dropped", generation=generation, current=current,
                 events=len(events))
        return
    for event in events:
        if isinstance(event, ResidentWithdrawn):
            await erasure.record_erased(conn, event.resident_id, event.withdrawn_at)
    await store.apply(conn, domain.changes_of(events, erased))


@dataclass(frozen=True, slots=True)
class Rebuilt:
    generation: int
    consumer_group: str


class InsightsService:
    def __init__(
        self, runtime: ServiceRuntime, *, router_for: Callable[[int], EventRouter], topics: Sequence[Topic],
        consumer_name: str, follow_interval_s: float = 1.0,
    ) -> None:
        self.runtime = runtime
        self.router_for = router_for
        self.topics = tuple(topics)
        self.consumer_name = consumer_name
        self.follow_interval_s = follow_interval_s
        self.generation = 0

    def name_of(self, generation: int) -> str:
        return f"{self.consumer_name}-g{generation}"

    # --- the consumer of the current generation --------------------------------------------------

    async def prepare(self, runtime: ServiceRuntime) -> None:
        """Before the consumers start: subscribe as the generation the database is at."""
        async with runtime.pool.acquire() as conn:
            self.generation = await store.generation(conn)
        runtime.consumer_specs = [
            ConsumerSpec(
                self.router_for(self.generation), self.topics, name=self.name_of(self.generation),
                pace_s=BACKGROUND_PACE_S,
            )
        ]

    def _consumer(self) -> EventConsumer | None:
        prefix = self.consumer_name + "-g"
        return next((c for c in self.runtime.consumers if c.name.startswith(prefix)), None)

    def switch(self, generation: int) -> None:
        """Move this replica's consumer to ``generation``: a new router and group; the runtime's
        watchdog re-subscribes it (within seconds), from the earliest offsets."""
        consumer = self._consumer()
        if consumer is None or generation <= self.generation:
            return
        name = self.name_of(generation)
        consumer.router = self.router_for(generation)
        consumer.name = name
        consumer.group_id = self.runtime.settings.topic(f"nichiiki.{name}")
        consumer.needs_resubscribe = True
        self.generation = generation
        log.info("insights consumer moved to a new generation", generation=generation, group=consumer.group_id)

    async def follow(self, runtime: ServiceRuntime) -> None:
        """Background: a rebuild asked at another replica moves this one too."""
        while True:
            await asyncio.sleep(self.follow_interval_s)
            try:
                async with runtime.pool.acquire() as conn:
                    generation = await store.generation(conn)
            except Exception as error:  # the database briefly away: ask again next round
                log.info("generation not read", error=repr(error))
                continue
            self.switch(generation)

    # --- writes ----------------------------------------------------------------------------------

    async def rebuild(self, write: Write) -> Outcome:
        """Empty the read model and read every topic again from the earliest offset."""

        async def act(work: UnitOfWork) -> Outcome:
            generation = await store.start_generation(work.conn)
            view = Rebuilt(generation, self.runtime.settings.topic(f"nichiiki.{self.name_of(generation)}"))
            return Outcome(202, {"generation": view.generation, "consumer_group": view.consumer_group})

        outcome = await write.run(act)
        generation = int(outcome.body["generation"])
        self.switch(generation)
        log.info("insights rebuild started", generation=generation, replayed=outcome.replayed)
        return outcome

    # --- reads -----------------------------------------------------------------------------------

    async def registrations(self, scope: Scope) -> list[RegistrationFigure]:
        async with self.runtime.pool.acquire() as conn:
            return await store.registrations(conn, scope)

    async def monthly_registrations(self, scope: Scope) -> list[MonthlyRegistrations]:
        async with self.runtime.pool.acquire() as conn:
            return await store.monthly_registrations(conn, scope)

    async def certificates(self, scope: Scope) -> list[CertificateFigure]:
        async with self.runtime.pool.acquire() as conn:
            return await store.certificates(conn, scope)

    async def programmes(self, scope: Scope) -> list[ProgrammeFigure]:
        async with self.runtime.pool.acquire() as conn:
            return await store.programmes(conn, scope)

    async def donations(self, scope: Scope) -> list[DonationFigure]:
        async with self.runtime.pool.acquire() as conn:
            return await store.donations(conn, scope)

    async def relationship(self, scope: Scope) -> list[RelationshipFigure]:
        async with self.runtime.pool.acquire() as conn:
            figures = await store.relationship(conn, scope)
        return [domain.with_population(f, population_of(f.municipality_code)) for f in figures]

    async def kpis(self, today: date | None = None) -> Kpis:
        async with self.runtime.pool.acquire() as conn:
            plans = await store.plan_spans(conn)
            corporations = await store.corporation_spans(conn)
        return domain.kpis(plans, corporations, today or self.runtime.clock.today())
