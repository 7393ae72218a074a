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
- the batch writes every write's events to the outbox in one statement and commits once, then each
  write answers. A hot row is locked once per batch, not once per write.

If the batch itself breaks (the connection goes, a write is cancelled in the middle of a statement)
every write still waiting gets ``BatchAborted``, a transient fault: the runner retries it (alone
or in a next batch). A commit whose outcome is unknown answers ``CommitUncertain`` to every write
of the batch; it is never re-run.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, NoReturn, Protocol, TypeVar

import asyncpg
import structlog

from shared.kit.db import Connection
from shared.kit.errors import Transient
from shared.kit.outbox import OutgoingRecord

log = structlog.get_logger(__name__)

T = TypeVar("T")

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

    async def run(self, member: Member[T]) -> T:
        batch = self._join()
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
        async with batch.turn:
            if batch.broken is not None:
                raise BatchAborted(f"{self.operation}: the batch broke before this write ran") from batch.broken
            conn = batch.conn
            assert conn is not None
            # The first write needs no savepoint: if it fails, the transaction starts again. So a
            # write alone costs what it did before group commit.
            first = batch.ran == 0
            batch.ran += 1
            savepoint = not first and time.monotonic() < self._careful_until
            if savepoint:
                await conn.execute("SAVEPOINT write")
            try:
                answer, records = await member(conn)
            except BaseException as error:
                if not first and not savepoint:
                    return self._broke(batch, error)
                try:
                    if first:  # one round trip: a simple query may hold both
                        await conn.execute("ROLLBACK; BEGIN;")
                    else:  # to this write's own savepoint: the latest of that name
                        await conn.execute("ROLLBACK TO SAVEPOINT write")
                except BaseException as rollback_error:
                    batch.broken = rollback_error
                if batch.broken is None and isinstance(error, asyncio.CancelledError):
                    batch.broken = error  # cut off in the middle of a statement: the connection is not trusted
                raise
            batch.records.extend(records)
            batch.kept += 1
            return answer

    def _broke(self, batch: _Batch, error: BaseException) -> NoReturn:
        """A write without a savepoint failed: what it did cannot be undone alone, so the batch
        rolls back; it and its batch-mates run again, in savepoints for a while."""
        self._careful_until = time.monotonic() + CAREFUL_S
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
            batch.progress.clear()
            await batch.progress.wait()
        # No await between the check and the seal: nobody joins a batch whose writes all ran.
        self._seal(batch)

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
