"""A shared step of group commit (``SharedStep`` in ``shared/kit/group_commit.py``), through the
use-case runner on a real PostgreSQL: the writes of a batch that reach it get their results from one
run of its ``many`` form; a write alone, inputs that share a key and writes in savepoints run its
``one`` form; a failing step or write makes the batch run again, and nothing is lost or doubled.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest

from shared.contracts.topics import Topic
from shared.kit.auth import Principal, Role
from shared.kit.db import Connection
from shared.kit.errors import DomainError
from shared.kit.group_commit import GroupCommit, SharedStep
from shared.kit.outbox import Outbox
from shared.kit.service import UnitOfWork
from shared.kit.settings import Settings
from shared.kit.use_case import Outcome, Write
from tests.support import Ping, fresh_database

TOPIC = Topic("test.group-batch.v1", 1, "key", "tests")
OPERATION = "POST /v1/receipts"


class OverBudget(DomainError):
    code = "over-budget"
    status = 409
    title = "Over budget"


@dataclass
class Runtime:
    """What the runner uses of a ``ServiceRuntime``."""

    pool: asyncpg.Pool
    settings: Settings
    service: str = "tests"
    outbox: Outbox = field(default_factory=lambda: Outbox("group_batch_test"))
    group_commits: dict[str, GroupCommit[Any]] = field(default_factory=dict)
    statements: list[str] = field(default_factory=list)

    @property
    def batches(self) -> GroupCommit[Any]:
        return self.group_commits[OPERATION]

    def ran(self, start: str) -> int:
        return sum(1 for s in self.statements if s.lstrip().startswith(start))


@pytest.fixture
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    dsn = await fresh_database(settings, "groupbatch")
    statements: list[str] = []

    async def log_statements(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(lambda logged: statements.append(logged.query))

    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=6, init=log_statements)
    async with pool.acquire() as conn:
        await conn.execute("""
            CREATE TABLE receipts (number int PRIMARY KEY, donor text UNIQUE);
            CREATE TABLE counters (municipality text PRIMARY KEY, last int NOT NULL);
            INSERT INTO counters VALUES ('152021', 0);
        """)
    yield Runtime(pool, settings, statements=statements)
    await pool.close()


MANY = "WITH counter AS"
ONE = "UPDATE counters"


@dataclass
class Numbering:
    """A shared step that gives each donor the next receipt number: ``many`` numbers a batch's donors
    in one statement, in input order; ``fail`` makes its next run fail."""

    runs: list[list[str]] = field(default_factory=list)
    fail: int = 0
    #: Set to hold ``many`` until the test lets it go.
    gate: asyncio.Event | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def many(self, conn: Connection, donors: Sequence[str]) -> list[int]:
        self.runs.append(list(donors))
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            self.fail -= 1
            await conn.execute("SELECT 1 / 0")
        rows = await conn.fetch(
            """
            WITH counter AS (
                UPDATE counters SET last = last + cardinality($1::text[]) WHERE municipality = '152021'
                RETURNING last - cardinality($1::text[]) AS before
            )
            INSERT INTO receipts
            SELECT before + i, donor FROM counter, unnest($1::text[]) WITH ORDINALITY AS d (donor, i)
            RETURNING number
            """,
            list(donors),
        )
        return [r["number"] for r in rows]

    async def one(self, conn: Connection, donor: str) -> int:
        number: int = await conn.fetchval(
            "UPDATE counters SET last = last + 1 WHERE municipality = '152021' RETURNING last"
        )
        await conn.execute("INSERT INTO receipts VALUES ($1, $2)", number, donor)
        return number

    def step(self) -> SharedStep[str, int]:
        # A donor's household ("a/1" and "a/2") must not share a run.
        return SharedStep("numbering", self.many, self.one, lambda donor: [donor.split("/")[0]])


def donate(step: SharedStep[str, int], donor: str, *, refuse: bool = False) -> Any:
    async def act(uow: UnitOfWork) -> Outcome:
        number = await step(uow.conn, donor)
        await uow.emit(TOPIC, Ping(subject=donor, sequence=number), subject=donor)
        if refuse:  # after the shared step: the batch must take its number back
            raise OverBudget(f"{donor} is over budget")
        return Outcome(201, {"donor": donor, "receipt": number})

    return act


def run(runtime: Runtime, act: Any) -> Any:
    return Write(
        runtime=runtime,  # type: ignore[arg-type]
        principal=Principal("payment-provider", Role.ADMIN), operation=OPERATION, request=None,
    ).run(act, group_commit=True)


async def stored(runtime: Runtime) -> dict[str, int]:
    async with runtime.pool.acquire() as conn:
        rows = await conn.fetch("SELECT number, donor FROM receipts ORDER BY number")
    assert [r["number"] for r in rows] == list(range(1, len(rows) + 1)), "receipt numbers are gapless"
    return {r["donor"]: r["number"] for r in rows}


async def outbox_subjects(runtime: Runtime) -> list[str]:
    async with runtime.pool.acquire() as conn:
        return sorted(bytes(r["key"]).decode() for r in await conn.fetch("SELECT key FROM outbox"))


async def test_a_batchs_writes_share_one_run_of_the_step(runtime: Runtime) -> None:
    numbering = Numbering()
    step = numbering.step()
    donors = [f"donor-{i:02}" for i in range(30)]

    answers = await asyncio.gather(*(run(runtime, donate(step, d)) for d in donors))

    by_donor = {a.body["donor"]: a.body["receipt"] for a in answers}
    assert await stored(runtime) == by_donor, "each write was answered with its own number"
    assert runtime.batches.writes == 30
    assert len(numbering.runs) <= runtime.batches.batches < 10
    assert sum(len(r) for r in numbering.runs) + runtime.ran(ONE) == 30
    assert runtime.ran(MANY) == len(numbering.runs) and runtime.ran(ONE) < 5
    assert numbering.runs[0] == donors[: len(numbering.runs[0])], "in the order the writes reached it"
    assert runtime.ran("BEGIN") == runtime.ran("COMMIT") == runtime.batches.batches
    assert await outbox_subjects(runtime) == donors


async def test_a_write_alone_runs_the_one_write_step(runtime: Runtime) -> None:
    numbering = Numbering()
    answer = await run(runtime, donate(numbering.step(), "alone"))
    assert answer.body == {"donor": "alone", "receipt": 1}
    assert numbering.runs == [] and runtime.ran(ONE) == 1


async def test_inputs_that_share_a_key_run_alone_after_the_shared_run(runtime: Runtime) -> None:
    numbering = Numbering()
    step = numbering.step()
    donors = ["a/1", "b/1", "a/2", "c/1", "a/3", "d/1"]

    answers = await asyncio.gather(*(run(runtime, donate(step, d)) for d in donors))

    assert numbering.runs == [["a/1", "b/1", "c/1", "d/1"]]
    numbers = {a.body["donor"]: a.body["receipt"] for a in answers}
    assert await stored(runtime) == numbers
    assert [numbers[d] for d in ("a/1", "b/1", "c/1", "d/1", "a/2", "a/3")] == [1, 2, 3, 4, 5, 6]
    assert runtime.ran(ONE) == 2 and runtime.batches.batches == 1


async def test_a_failing_shared_run_makes_the_batch_run_again_one_by_one(runtime: Runtime) -> None:
    numbering = Numbering(fail=1)
    step = numbering.step()
    donors = [f"donor-{i:02}" for i in range(12)]

    answers = await asyncio.gather(*(run(runtime, donate(step, d)) for d in donors))

    assert len(numbering.runs) == 1, "the batch ran again in savepoints, each write alone"
    assert await stored(runtime) == {a.body["donor"]: a.body["receipt"] for a in answers}
    # Every write ran the one-write step; in each batch after the failure, every write but the first
    # (which needs none) in a savepoint of its own. How the retries fall into batches is timing.
    assert runtime.ran(ONE) == 12 and runtime.ran("SAVEPOINT") == 12 - runtime.batches.batches
    assert await outbox_subjects(runtime) == donors


async def test_a_write_that_fails_after_the_shared_step_is_answered_alone(runtime: Runtime) -> None:
    numbering = Numbering()
    step = numbering.step()
    donors = [f"donor-{i:02}" for i in range(10)]

    answers = await asyncio.gather(
        *(run(runtime, donate(step, d, refuse=d == "donor-04")) for d in donors), return_exceptions=True
    )

    assert isinstance(answers[4], OverBudget)
    kept = [a for a in answers if isinstance(a, Outcome)]
    assert len(kept) == 9
    assert await stored(runtime) == {a.body["donor"]: a.body["receipt"] for a in kept}, "its number was given back"
    assert await outbox_subjects(runtime) == [d for d in donors if d != "donor-04"]


async def test_a_write_cancelled_while_its_step_runs_breaks_the_batch_and_nothing_is_doubled(
    runtime: Runtime,
) -> None:
    numbering = Numbering(gate=asyncio.Event())
    step = numbering.step()
    donors = [f"donor-{i:02}" for i in range(8)]
    writes = [asyncio.ensure_future(run(runtime, donate(step, d))) for d in donors]
    await asyncio.wait_for(numbering.started.wait(), 10)
    writes[3].cancel()  # its request went while the batch ran the step for it
    assert numbering.gate is not None
    numbering.gate.set()

    answers = await asyncio.gather(*writes, return_exceptions=True)

    assert isinstance(answers[3], asyncio.CancelledError)
    kept = [a for a in answers if isinstance(a, Outcome)]
    assert len(kept) == 7, answers
    assert await stored(runtime) == {a.body["donor"]: a.body["receipt"] for a in kept}
    assert await outbox_subjects(runtime) == [d for d in donors if d != "donor-03"]


async def test_one_key_twice_in_a_batch_acts_once_and_replays_the_first_answer(runtime: Runtime) -> None:
    """Both reach the shared step before either remembers its key: the second's remembering fails,
    the batch runs again (one by one), and the twin that runs second replays the first's answer."""
    numbering = Numbering()
    step = numbering.step()

    def keyed(donor: str, key: str | None) -> Any:
        return Write(
            runtime=runtime,  # type: ignore[arg-type]
            principal=Principal("payment-provider", Role.ADMIN), operation=OPERATION,
            request={"body": "same"} if key else None, idempotency_key=key,
        ).run(donate(step, donor), group_commit=True)

    answers = await asyncio.gather(
        keyed("donor-key", "k-1"), keyed("donor-other", None), keyed("donor-key-twice", "k-1"), keyed("x", None)
    )

    twins = answers[0], answers[2]
    assert len(numbering.runs) == 1, "both reached the shared step in one batch"
    # Both ran again, in either order: the one that ran first acted, the other replays its answer.
    assert twins[0].body == twins[1].body and sorted(t.replayed for t in twins) == [False, True]
    acted = twins[0].body["donor"]
    assert sorted(await stored(runtime)) == sorted([acted, "donor-other", "x"])
