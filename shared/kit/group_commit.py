"""Group commit: concurrent writes of one use case share one transaction.

Under load a write's cost in PostgreSQL is mostly its transaction: BEGIN, COMMIT and the WAL flush
behind it, and a hot row (a municipality's receipt counter) locked by one write at a time. A
``GroupCommit`` lets concurrent writes of one operation share a transaction:

- a write that finds no batch forming starts one; a batch opens as soon as one of ``lanes`` is
  free, so an idle service runs each write at once, with no collection window to wait for;
- writes that arrive while the lanes are busy, or while a batch's writes run, join the forming
  batch (at most ``max_batch``): under load batches grow by themselves;
- each write runs in the batch's transaction, one at a time on the batch's connection. A savepoint
  of its own would let a write that fails be rolled back alone, but costs a round trip per write
  (asyncpg cannot send it with the write's first statement), and writes rarely fail. So writes run
  without one: a write that fails (the first needs none: the transaction begins again) breaks the
  batch, and it and its batch-mates run again (``BatchAborted``, which the runner retries) while
  the ``GroupCommit`` runs each write in a savepoint of its own for ``CAREFUL_S``: there, a write
  that fails is rolled back alone and answered with its own problem, the others go on. One failing
  write sends at most one batch a ``CAREFUL_S`` round again, and a stream of them keeps savepoints on;
- a step that can serve many writes with one statement (a ``SharedStep``, e.g. recording donations)
  is run once for the batch: a write that reaches it waits (giving up its turn) until every write of
  the batch has finished or reached it, then the batch runs the step for all of them and each goes
  on with its own result. One write alone, inputs that must not share a run (``keys``) and writes
  in savepoints run the step's one-write form, as before;
- a write that reads what it then changes through a shared step names it (``key``): two writes
  naming one thing never share a batch, so the later decides on what the earlier wrote;
- the batch writes every write's events to the outbox in one statement and commits once, then each
  write answers. A hot row is locked once per batch, not once per write.

If the batch itself breaks (the connection goes, a write is cancelled in the middle of a statement)
every write still waiting gets ``BatchAborted``, a transient fault: the runner retries it (alone
or in a next batch). A commit whose outcome is unknown answers ``CommitUncertain`` to every write
of the batch; it is never re-run.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, NoReturn, Protocol, TypeVar

import asyncpg
import structlog

from shared.kit.db import Connection
from shared.kit.errors import Transient
from shared.kit.outbox import OutgoingRecord

log = structlog.get_logger(__name__)

T = TypeVar("T")
In = TypeVar("In")
R = TypeVar("R")

#: Writes in one transaction at most: a savepoint each; PostgreSQL keeps the first 64 of a
#: transaction's subtransactions in shared memory and slows down past that.
MAX_BATCH = 48
#: Batches of one operation in flight at once: one runs its writes while another commits.
LANES = 3
#: After a write failed in a batch without savepoints, every write runs in a savepoint of its own for
#: this long: a failure then costs that write alone, not a batch run again.
CAREFUL_S = 2.0


class BatchAborted(Transient):
    """The shared transaction broke before this write could commit; nothing of it was kept (retried
    like any transient fault; a 503 if the batch keeps breaking, e.g. while the database is away)."""


class CommitUncertain(Exception):
    """The commit failed on the wire: it may or may not have happened, so it is never re-run."""


class _Outbox(Protocol):
    async def add_many(self, conn: Connection, records: Sequence[OutgoingRecord]) -> None: ...

    def committed(self) -> None: ...


#: One write's part of a batch: runs on the batch's connection inside its savepoint and returns its
#: answer and the events it emitted (written to the outbox with the batch's).
Member = Callable[[Connection], Awaitable[tuple[T, Sequence[OutgoingRecord]]]]


def _no_keys(_: object) -> Iterable[Hashable]:
    return ()


@dataclass(frozen=True, eq=False)
class SharedStep(Generic[In, R]):
    """A step of a write that a batch runs once for all its writes that reach it.

    ``many`` answers each input's result, in input order, from one statement; ``one`` is the step
    for a single input (a write alone, in a savepoint, or outside any batch). ``keys``: what two
    inputs of one run of ``many`` must not share (a row that each would change, where the second
    must see the first's change): an input that shares one with an earlier input runs ``one``,
    after. If ``many`` fails, the batch runs again with its writes in savepoints (``CAREFUL_S``),
    where each runs ``one``. What a write does after the step, its batch-mates' earlier statements
    do not see: two writes under one Idempotency-Key both reach the step, the second's key then
    conflicts, and the batch runs again one by one (the second replays the first's answer).

    Call it as the step itself: ``await step(conn, value)``."""

    name: str
    many: Callable[[Connection, Sequence[In]], Awaitable[Sequence[R]]]
    one: Callable[[Connection, In], Awaitable[R]]
    keys: Callable[[In], Iterable[Hashable]] = _no_keys

    async def __call__(self, conn: Connection, value: In) -> R:
        seat = _seat.get()
        if seat is None or seat.batch.conn is not conn:
            return await self.one(conn, value)
        return await seat.share(self, value)


#: What ``many`` hands a write whose input runs ``one`` instead.
_ALONE: Any = object()


@dataclass(eq=False)
class _Waiting:
    """A write waiting at a ``SharedStep`` for its batch to run it."""

    step: SharedStep[Any, Any]
    value: Any
    result: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass(eq=False)
class _Seat:
    """A write's turn on the batch's connection, which it gives up while it waits at a shared step."""

    batch: _Batch
    holds: bool = True
    #: It waited at a shared step: its batch-mates ran in between, so it cannot be rolled back alone.
    shared: bool = False

    async def share(self, step: SharedStep[In, R], value: In) -> R:
        batch = self.batch
        waiting = _Waiting(step, value)
        batch.waiting.append(waiting)
        self.shared = True
        self.holds = False
        batch.turn.release()
        batch.progress.set()
        try:
            result = await waiting.result
        except BaseException:
            if waiting in batch.waiting:  # cancelled before its batch ran the step
                batch.waiting.remove(waiting)
            raise
        await batch.turn.acquire()
        self.holds = True
        conn = batch.conn
        assert conn is not None
        return await step.one(conn, value) if result is _ALONE else result


#: The write whose turn it is, in its own task: a ``SharedStep`` it reaches may wait for its batch.
_seat: contextvars.ContextVar[_Seat | None] = contextvars.ContextVar("group_commit_seat", default=None)


@dataclass(eq=False)
class _Batch:
    joined: int = 0
    finished: int = 0
    #: Writes that took their turn on the connection, and of them those kept.
    ran: int = 0
    kept: int = 0
    sealed: bool = False
    conn: Connection | None = None
    #: Why the batch cannot go on (opening failed, or the connection's state is unknown).
    broken: BaseException | None = None
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)
    records: list[OutgoingRecord] = field(default_factory=list)
    #: The keys of its writes that named one (``GroupCommit.run``).
    keys: set[Hashable] = field(default_factory=set)
    #: Writes waiting at a shared step, in the order they reached it.
    waiting: list[_Waiting] = field(default_factory=list)
    outcome: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class GroupCommit(Generic[T]):
    """The batches of one operation of one service process."""

    def __init__(
        self, operation: str, pool: Callable[[], asyncpg.Pool], outbox: _Outbox, *,
        lanes: int = LANES, max_batch: int = MAX_BATCH,
    ) -> None:
        self.operation = operation
        self._pool = pool
        self._outbox = outbox
        self._lanes = asyncio.Semaphore(lanes)
        self._max_batch = max_batch
        self._forming: _Batch | None = None
        #: Until when (monotonic) writes run in savepoints of their own (``CAREFUL_S``).
        self._careful_until = 0.0
        self._leaders: set[asyncio.Task[None]] = set()
        #: Batches committed and writes in them, for the metrics and the tests.
        self.batches = 0
        self.writes = 0

    async def run(self, member: Member[T], key: Hashable | None = None) -> T:
        """``key``: what the write decides on (a resident whose registrations it reads, then adds
        to). Two writes with one key never share a batch: the later waits for the earlier's batch
        to end and joins a next one, so it reads what the earlier wrote. Within a batch a write's
        reads would not see a batch-mate's writes still waiting at a shared step."""
        batch = self._join() if key is None else await self._join_once(key)
        conflict: asyncpg.UniqueViolationError | None = None
        try:
            await batch.opened.wait()
            answer = await self._take_turn(batch, member)
        except asyncpg.UniqueViolationError as error:
            conflict = error
        finally:
            batch.finished += 1  # however it ended: the leader waits for every write that joined
            batch.progress.set()
        try:
            await asyncio.shield(batch.outcome)  # a cancelled request leaves the batch to commit
        except Exception as error:
            if conflict is not None:  # the row it ran into may have gone with the batch: try again
                raise BatchAborted(f"{self.operation}: the batch broke after a conflict") from error
            raise
        if conflict is not None:
            # It ran into a row of a batch-mate: alone it would have waited for that row's commit,
            # and its caller (who may read the row to answer) now finds it committed too.
            raise conflict
        return answer

    async def _join_once(self, key: Hashable) -> _Batch:
        while True:
            batch = self._forming
            if batch is None or batch.sealed or batch.joined >= self._max_batch or key not in batch.keys:
                batch = self._join()
                batch.keys.add(key)
                return batch
            with contextlib.suppress(Exception):  # how it ended is its writes' business
                await asyncio.shield(batch.outcome)

    def _join(self) -> _Batch:
        batch = self._forming
        if batch is None or batch.sealed or batch.joined >= self._max_batch:
            batch = self._forming = _Batch()
            # A clean context: the leader is no request's, whatever request happened to start it.
            leader = asyncio.create_task(self._lead(batch), context=contextvars.Context())
            self._leaders.add(leader)
            leader.add_done_callback(self._leaders.discard)
        batch.joined += 1
        return batch

    async def _take_turn(self, batch: _Batch, member: Member[T]) -> T:
        await batch.turn.acquire()
        seat = _Seat(batch)
        try:
            if batch.broken is not None:
                raise BatchAborted(f"{self.operation}: the batch broke before this write ran") from batch.broken
            conn = batch.conn
            assert conn is not None
            # The first write needs no savepoint: if it fails, the transaction starts again. So a
            # write alone costs what it did before group commit.
            first = batch.ran == 0
            batch.ran += 1
            careful = time.monotonic() < self._careful_until
            savepoint = not first and careful
            if savepoint:
                await conn.execute("SAVEPOINT write")
            # Careful, a write runs its steps alone: one that fails is then rolled back alone.
            token = _seat.set(None if careful else seat)
            try:
                answer, records = await member(conn)
            except BaseException as error:
                # Nothing but this write ran in the transaction (a write that waited at a shared step
                # may have had batch-mates run in between).
                alone = first and batch.ran == 1 and seat.holds
                if not (alone or savepoint):
                    return self._broke(batch, error)
                try:
                    if alone:  # one round trip: a simple query may hold both
                        await conn.execute("ROLLBACK; BEGIN;")
                    else:  # to this write's own savepoint: the latest of that name
                        await conn.execute("ROLLBACK TO SAVEPOINT write")
                except BaseException as rollback_error:
                    batch.broken = rollback_error
                if batch.broken is None and isinstance(error, asyncio.CancelledError):
                    batch.broken = error  # cut off in the middle of a statement: the connection is not trusted
                raise
            finally:
                _seat.reset(token)
            batch.records.extend(records)
            batch.kept += 1
            return answer
        finally:
            if seat.holds:
                batch.turn.release()

    def _broke(self, batch: _Batch, error: BaseException) -> NoReturn:
        """A write without a savepoint failed: what it did cannot be undone alone, so the batch
        rolls back; it and its batch-mates run again, in savepoints for a while."""
        self._careful_until = time.monotonic() + CAREFUL_S
        if batch.broken is None:  # a shared step that failed broke it first: that is the cause
            batch.broken = error
        if not isinstance(error, Exception):  # cancelled (the caller went) or the process stops
            raise error
        log.info("a write failed in a batch without savepoints: the batch runs again",
                 operation=self.operation, writes=batch.joined, error=repr(error))
        raise BatchAborted(f"{self.operation}: this write failed in a batch without savepoints") from error

    async def _lead(self, batch: _Batch) -> None:
        async with self._lanes:
            try:
                async with self._pool().acquire() as conn:
                    await self._open(batch, conn)
                    await self._until_all_ran(batch)
                    await self._close(batch, conn)
            except BaseException as error:
                log.warning("write batch failed", operation=self.operation, writes=batch.joined, error=repr(error))
                self._seal(batch)
                self._release_waiting(batch, error)
                if not batch.opened.is_set():  # no connection, or BEGIN failed: every write retries
                    batch.broken = error
                    batch.opened.set()
                if not batch.outcome.done():
                    batch.outcome.set_exception(BatchAborted(f"{self.operation}: {error!r}"))
                    batch.outcome.exception()  # retrieved: its writes may all have gone already
                if not isinstance(error, Exception):
                    raise

    async def _open(self, batch: _Batch, conn: Connection) -> None:
        await conn.execute("BEGIN;")
        batch.conn = conn
        batch.opened.set()

    async def _until_all_ran(self, batch: _Batch) -> None:
        while batch.finished < batch.joined:
            if batch.waiting and batch.finished + len(batch.waiting) == batch.joined:
                await self._run_shared(batch)  # every write that has not finished waits at a shared step
                continue
            batch.progress.clear()
            await batch.progress.wait()
        # No await between the check and the seal: nobody joins a batch whose writes all ran.
        self._seal(batch)

    async def _run_shared(self, batch: _Batch) -> None:
        """Run the shared steps the batch's writes wait at: ``many`` once per step for the inputs
        that may share a run, in the order they reached it; the others run ``one`` on their turn."""
        if batch.broken is not None:
            self._release_waiting(batch, batch.broken)
            return
        conn = batch.conn
        assert conn is not None
        steps: dict[SharedStep[Any, Any], tuple[list[_Waiting], list[_Waiting]]] = {}
        seen: set[Hashable] = set()
        for w in batch.waiting:
            together, alone = steps.setdefault(w.step, ([], []))
            keys = [(w.step, key) for key in w.step.keys(w.value)]
            (alone if seen.intersection(keys) else together).append(w)
            seen.update(keys)
        waiting, batch.waiting = batch.waiting, []
        async with batch.turn:  # the writes still to come wait for their turn until the step is done
            for step, (together, alone) in steps.items():
                if len(together) < 2:  # one write alone runs the step as it always did
                    alone[:0] = together
                    continue
                try:
                    results = await step.many(conn, [w.value for w in together])
                    for w, result in zip(together, results, strict=True):
                        if not w.result.done():
                            w.result.set_result(result)
                except BaseException as error:
                    # Its writes ran their earlier statements without savepoints: the batch runs again.
                    self._careful_until = time.monotonic() + CAREFUL_S
                    batch.broken = error
                    log.info("a shared step failed: the batch runs again", operation=self.operation,
                             step=step.name, writes=len(together), error=repr(error))
                    self._release_waiting(batch, error, waiting)
                    if not isinstance(error, Exception):
                        raise
                    return
            for _, alone in steps.values():
                for w in alone:
                    if not w.result.done():
                        w.result.set_result(_ALONE)

    def _release_waiting(
        self, batch: _Batch, error: BaseException, waiting: Sequence[_Waiting] | None = None
    ) -> None:
        """The batch broke: every write still waiting at a shared step is told (and runs again)."""
        if waiting is None:
            waiting, batch.waiting = batch.waiting, []
        for w in waiting:
            if not w.result.done():
                aborted = BatchAborted(f"{self.operation}: the batch broke before its shared step ran")
                aborted.__cause__ = error
                w.result.set_exception(aborted)

    def _seal(self, batch: _Batch) -> None:
        batch.sealed = True
        if self._forming is batch:
            self._forming = None

    async def _close(self, batch: _Batch, conn: Connection) -> None:
        if batch.broken is not None:
            try:
                await conn.execute("ROLLBACK;")
            except Exception:
                conn.terminate()
            raise BatchAborted(f"{self.operation}: a write broke the batch") from batch.broken
        try:
            await self._outbox.add_many(conn, batch.records)
        except BaseException:
            try:
                await conn.execute("ROLLBACK;")
            except Exception:
                conn.terminate()
            raise
        try:
            await conn.execute("COMMIT;")
        except Exception as error:
            conn.terminate()
            batch.outcome.set_exception(CommitUncertain(f"{self.operation}: the commit's outcome is unknown"))
            batch.outcome.exception()
            raise CommitUncertain from error
        batch.outcome.set_result(None)
        self.batches += 1
        self.writes += batch.kept
        self._outbox.committed()
