"""Group commit (``shared/kit/group_commit.py``) through the use-case runner, on a real PostgreSQL.

Concurrent writes of one operation share transactions; each is answered with its own outcome or its
own problem; what fails is rolled back alone; a broken batch is retried; an idle write runs at once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest

from shared.contracts.topics import Topic
from shared.kit.auth import Principal, Role
from shared.kit.errors import DomainError, is_transient
from shared.kit.group_commit import BatchAborted, GroupCommit
from shared.kit.http import failure_response
from shared.kit.outbox import Outbox
from shared.kit.service import UnitOfWork
from shared.kit.settings import Settings
from shared.kit.use_case import Outcome, Write
from tests.support import Ping, fresh_database

TOPIC = Topic("test.group-commit.v1", 1, "key", "tests")


class OverBudget(DomainError):
    code = "over-budget"
    status = 409
    title = "Over budget"


@dataclass
class Runtime:
    """What the runner uses of a ``ServiceRuntime``: its pool, outbox, settings and batches."""

    pool: asyncpg.Pool
    settings: Settings
    service: str = "tests"
    outbox: Outbox = field(default_factory=lambda: Outbox("group_commit_test"))
    group_commits: dict[str, GroupCommit[Any]] = field(default_factory=dict)


#: Every statement the runtime's pooled connections ran, in order.
Statements = list[str]


@pytest.fixture
def statements() -> Statements:
    return []


@pytest.fixture
async def runtime(settings: Settings, statements: Statements) -> AsyncIterator[Runtime]:
    dsn = await fresh_database(settings, "groupcommit")

    async def log_statements(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(lambda logged: statements.append(logged.query))

    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=6, init=log_statements)
    async with pool.acquire() as conn:
        await conn.execute("""
            CREATE TABLE receipts (
                municipality text, number int, donor text UNIQUE, PRIMARY KEY (municipality, number)
            );
            CREATE TABLE counters (municipality text PRIMARY KEY, last int NOT NULL);
            INSERT INTO counters VALUES ('152021', 0);
        """)
    yield Runtime(pool, settings)
    await pool.close()


def write(runtime: Runtime, *, key: str | None = None, request: Any = None) -> Write:
    return Write(
        runtime=runtime,  # type: ignore[arg-type]
        principal=Principal("payment-provider", Role.ADMIN),
        operation="POST /v1/donations", request=request, idempotency_key=key,
    )


Act = Callable[[UnitOfWork], Awaitable[Outcome]]


def donate(donor: str, *, refuse: bool = False) -> Act:
    """One receipt number from the one hot counter, a receipt row, an event."""

    async def act(uow: UnitOfWork) -> Outcome:
        number = await uow.conn.fetchval(
            "UPDATE counters SET last = last + 1 WHERE municipality = '152021' RETURNING last"
        )
        await uow.conn.execute("INSERT INTO receipts VALUES ('152021', $1, $2)", number, donor)
        await uow.emit(TOPIC, Ping(subject=donor, sequence=number), subject=donor)
        if refuse:  # after it wrote: its savepoint must take its receipt number back
            raise OverBudget(f"{donor} is over budget")
        return Outcome(201, {"donor": donor, "receipt": number})

    return act


async def receipts(runtime: Runtime) -> list[tuple[int, str]]:
    async with runtime.pool.acquire() as conn:
        rows = await conn.fetch("SELECT number, donor FROM receipts ORDER BY number")
        return [(r["number"], r["donor"]) for r in rows]


async def outbox_subjects(runtime: Runtime) -> list[str]:
    async with runtime.pool.acquire() as conn:
        return [bytes(r["key"]).decode() for r in await conn.fetch("SELECT key FROM outbox ORDER BY id")]


async def test_concurrent_writes_share_transactions_and_each_gets_its_own_answer(runtime: Runtime) -> None:
    donors = [f"donor-{i:02}" for i in range(40)]
    answers = await asyncio.gather(*(write(runtime).run(donate(d), group_commit=True) for d in donors))

    batches = runtime.group_commits["POST /v1/donations"]
    assert batches.writes == 40
    assert batches.batches < 40 / 2, "concurrent writes were not coalesced"
    by_donor = {a.body["donor"]: a.body["receipt"] for a in answers}
    assert sorted(by_donor) == donors
    stored = await receipts(runtime)
    assert [n for n, _ in stored] == list(range(1, 41)), "receipt numbers are gapless"
    assert {d: n for n, d in stored} == by_donor, "each write was answered with its own receipt"
    assert sorted(await outbox_subjects(runtime)) == donors


async def careful(runtime: Runtime) -> None:
    """Two writes in one batch, the second failing: the batch runs again, and for ``CAREFUL_S``
    after, each write runs in a savepoint of its own. The first is kept (``primer``)."""
    primed = await asyncio.gather(
        write(runtime).run(donate("primer"), group_commit=True),
        write(runtime).run(donate("primer-refused", refuse=True), group_commit=True),
        return_exceptions=True,
    )
    assert isinstance(primed[0], Outcome) and isinstance(primed[1], OverBudget)


async def test_writes_run_without_savepoints_and_one_that_fails_runs_again_with_its_batch(
    runtime: Runtime, statements: Statements
) -> None:
    """A savepoint is a round trip per write: writes run without, until one fails. Its batch then
    rolls back and runs again; nothing of the failed write is kept, every other write once."""
    donors = [f"donor-{i:02}" for i in range(12)]
    answers = await asyncio.gather(*(write(runtime).run(donate(d), group_commit=True) for d in donors))
    assert sorted(a.body["donor"] for a in answers) == donors
    assert runtime.group_commits["POST /v1/donations"].batches < 12 / 2, "concurrent writes were not coalesced"
    assert not [q for q in statements if "SAVEPOINT" in q], "no savepoint while no write fails"

    refused = "donor-refused"
    more = [f"donor-{i:02}" for i in range(12, 20)]
    runs: dict[str, int] = {}

    def counted(donor: str) -> Act:
        act = donate(donor, refuse=donor == refused)

        async def counting(uow: UnitOfWork) -> Outcome:
            runs[donor] = runs.get(donor, 0) + 1
            return await act(uow)

        return counting

    answers_2 = await asyncio.gather(
        *(write(runtime).run(counted(d), group_commit=True) for d in [more[0], refused, *more[1:]]),
        return_exceptions=True,
    )
    assert isinstance(answers_2[1], OverBudget)
    assert all(isinstance(a, Outcome) and a.status_code == 201 for i, a in enumerate(answers_2) if i != 1)
    assert runs[more[0]] == 2, "the batch-mate before the failed write ran again"
    stored = await receipts(runtime)
    assert [n for n, _ in stored] == list(range(1, 21)), "gapless: the failed write's number was taken back"
    assert sorted(d for _, d in stored) == sorted(donors + more), "every other write kept once"
    assert sorted(await outbox_subjects(runtime)) == sorted(donors + more), "no event of the failed write"

    statements.clear()  # for a while now, each write (but a batch's first) runs in a savepoint
    await asyncio.gather(*(write(runtime).run(donate(f"late-{i}"), group_commit=True) for i in range(6)))
    assert [q for q in statements if "SAVEPOINT" in q]


async def test_a_failing_write_is_rolled_back_alone_and_answered_with_its_problem(runtime: Runtime) -> None:
    await careful(runtime)
    refused = {"donor-00", "donor-03", "donor-11"}  # the first of a batch has no savepoint: it begins again
    donors = [f"donor-{i:02}" for i in range(16)]
    answers = await asyncio.gather(
        *(write(runtime).run(donate(d, refuse=d in refused), group_commit=True) for d in donors),
        return_exceptions=True,
    )

    problems = {d for d, a in zip(donors, answers, strict=True) if isinstance(a, OverBudget)}
    assert problems == refused
    assert all(isinstance(a, Outcome) and a.status_code == 201 for d, a in zip(donors, answers, strict=True)
               if d not in refused)
    stored = await receipts(runtime)
    assert [n for n, _ in stored] == list(range(1, 15)), "the refused writes' numbers were taken back"
    assert {d for _, d in stored} == set(donors) - refused | {"primer"}
    assert sorted(await outbox_subjects(runtime)) == sorted(set(donors) - refused | {"primer"}), (
        "no event of a refused write"
    )


async def test_a_broken_batch_is_retried_and_nothing_is_lost_or_doubled(runtime: Runtime) -> None:
    killed: list[str] = []

    def kill_own_connection_once(donor: str) -> Act:
        """The first time, the server drops the batch's connection in the middle of this write."""
        act = donate(donor)

        async def breaking(uow: UnitOfWork) -> Outcome:
            if not killed:
                killed.append(donor)
                await uow.conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
            return await act(uow)

        return breaking

    donors = [f"donor-{i:02}" for i in range(20)]
    acts = [kill_own_connection_once(d) if i == 5 else donate(d) for i, d in enumerate(donors)]
    answers = await asyncio.gather(*(write(runtime).run(a, group_commit=True) for a in acts))

    assert killed == ["donor-05"]
    assert sorted(a.body["donor"] for a in answers) == donors
    stored = await receipts(runtime)
    assert sorted(d for _, d in stored) == donors, "every write committed exactly once"
    assert [n for n, _ in stored] == list(range(1, 21))
    assert {d: n for n, d in stored} == {a.body["donor"]: a.body["receipt"] for a in answers}


async def test_one_key_twice_in_a_batch_acts_once_and_replays_the_first_answer(runtime: Runtime) -> None:
    request = {"body": {"donor": "donor-key"}}
    first, again, other = await asyncio.gather(
        write(runtime, key="k-1", request=request).run(donate("donor-key"), group_commit=True),
        write(runtime, key="k-1", request=request).run(donate("donor-key-twice"), group_commit=True),
        write(runtime).run(donate("donor-other"), group_commit=True),
    )

    assert first.body == again.body and again.replayed and not first.replayed
    assert other.status_code == 201
    assert sorted(d for _, d in await receipts(runtime)) == ["donor-key", "donor-other"]


async def test_an_idle_write_runs_at_once_in_a_batch_of_its_own(runtime: Runtime) -> None:
    for i in range(3):
        answer = await write(runtime).run(donate(f"donor-{i}"), group_commit=True)
        assert answer.body["receipt"] == i + 1
    batches = runtime.group_commits["POST /v1/donations"]
    assert (batches.batches, batches.writes) == (3, 3)


async def test_a_write_that_runs_into_a_batch_mates_row_sees_it_committed(runtime: Runtime) -> None:
    """Alone, the second write would wait for the first's commit and then fail on the unique index;
    its caller then reads the first's row to answer (a duplicate payment). In a batch (in savepoints)
    it fails at once: its error must still reach it only once the row it ran into is committed."""
    await careful(runtime)
    seen_by_caller: list[list[tuple[int, str]]] = []

    async def confirm(donor: str) -> Outcome | None:
        try:
            return await write(runtime).run(donate(donor), group_commit=True)
        except asyncpg.UniqueViolationError:
            seen_by_caller.append(await receipts(runtime))  # another connection, as a handler's read
            return None

    first, twice, other = await asyncio.gather(confirm("donor-dup"), confirm("donor-dup"), confirm("donor-x"))

    assert first is not None and twice is None and other is not None
    assert seen_by_caller == [[(1, "primer"), (2, "donor-dup"), (3, "donor-x")]]


async def test_a_duplicate_in_a_batch_without_savepoints_answers_the_conflict_once_the_row_is_committed(
    runtime: Runtime,
) -> None:
    """The duplicate breaks its batch (no savepoint to roll back to): both run again, one is kept and
    the other meets its row, committed by then, and answers the conflict."""
    seen_by_caller: list[list[tuple[int, str]]] = []

    async def confirm(donor: str) -> Outcome | None:
        try:
            return await write(runtime).run(donate(donor), group_commit=True)
        except asyncpg.UniqueViolationError:
            seen_by_caller.append(await receipts(runtime))
            return None

    answers = await asyncio.gather(confirm("donor-dup"), confirm("donor-dup"), confirm("donor-x"))

    assert answers[2] is not None and [a is None for a in answers[:2]].count(True) == 1
    assert len(seen_by_caller) == 1 and "donor-dup" in {d for _, d in seen_by_caller[0]}
    stored = await receipts(runtime)
    assert sorted(d for _, d in stored) == ["donor-dup", "donor-x"] and [n for n, _ in stored] == [1, 2]


async def test_a_write_whose_batch_keeps_breaking_is_answered_503_not_500(runtime: Runtime) -> None:
    """The database away (here: no connection to be had) breaks every batch the write is retried in:
    it ends as a temporary refusal (503, retry), as a write outside a batch would, never a 500."""
    await runtime.pool.close()
    with pytest.raises(BatchAborted) as refused:
        await write(runtime).run(donate("d1"), group_commit=True)
    assert is_transient(refused.value)
    answer = failure_response(refused.value, "/v1/donations")
    assert answer.status_code == 503
    assert json.loads(bytes(answer.body))["code"] == "service-unavailable"


async def test_writes_naming_one_batch_key_never_share_a_batch(runtime: Runtime) -> None:
    # A write that reads what it then changes through a shared step must see a batch-mate's change:
    # with a ``batch_key``, two writes naming one thing run in different transactions, in order.
    transaction_of: dict[str, list[int]] = {}

    def record(key: str) -> Act:
        async def act(uow: UnitOfWork) -> Outcome:
            transaction_of.setdefault(key, []).append(int(await uow.conn.fetchval("SELECT txid_current()")))
            return Outcome(201, {"key": key})

        return act

    keys = [f"resident-{i % 4}" for i in range(32)]
    answers = await asyncio.gather(*(
        write(runtime).run(record(key), group_commit=True, batch_key=key) for key in keys
    ))

    assert sorted(a.body["key"] for a in answers) == sorted(keys)
    for key, transactions in transaction_of.items():
        assert len(set(transactions)) == len(transactions) == 8, f"{key} shared a batch with itself"
    every = [t for transactions in transaction_of.values() for t in transactions]
    assert len(set(every)) < len(every), "writes of different keys did not share batches"
