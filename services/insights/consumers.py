"""What insights consumes: every event its figures need, from registration, certification, subsidy,
donation and planning, through one set-based handler (one handler keeps runs as long as batches).

A router belongs to one generation of the read model: its handler first takes the generation row
with a shared lock and applies nothing when a rebuild has moved past it (a batch of the old consumer
group still in flight when the tables were emptied must not fill the new ones).
"""

from __future__ import annotations

from services.insights import handlers
from services.insights.domain import PROJECTED
from shared.contracts.base import EventData
from shared.contracts.topics import CERTIFICATES, CORPORATIONS, DONATIONS, GRANTS, PLANS, RESIDENTS, Topic
from shared.kit.consumer import EventRouter, Run

#: Every topic insights reads.
TOPICS: tuple[Topic, ...] = (RESIDENTS, CERTIFICATES, GRANTS, DONATIONS, PLANS, CORPORATIONS)


def make_router(generation: int) -> EventRouter:
    router = EventRouter()

    @router.on_many(*PROJECTED)
    async def project(run: Run[EventData]) -> None:
        await handlers.project(run.conn, generation, run.events)

    return router
