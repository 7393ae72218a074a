"""Every HTTP write of every service runs through one runner, in one order:

1. **authorise** — the use case's permission check (who may act on this target) runs first, before
   anything is replayed or changed; it may load and lock the target, and hands it to the action;
2. **idempotency** — with an ``Idempotency-Key``, the key is scoped to the caller's identity and
   the operation: the same caller repeating the same request gets the first response back; the
   same key with another body is a 422 problem; another caller's key is another key;
3. **one transaction** for the state change, the stored response and the outgoing events (written
   to the outbox in one statement just before the commit);
4. **transient faults retried** — a database that is briefly away, a serialisation failure or a
   deadlock re-runs the whole attempt after a jittered backoff; a commit whose outcome is unknown
   is never re-run (it answers 503, and an Idempotency-Key makes the client's retry safe).

A hot use case may let concurrent writes share the transaction (``run(..., group_commit=True)``,
``shared/kit/group_commit.py``): each still runs these steps in order and gets its own answer or
its own problem (one that fails makes its batch run again, in savepoints for a while); the batch
writes its events and commits once. A step of the act that can serve many writes in one statement
(a ``SharedStep``) then runs once for the batch's writes that reach it.

Routes get a ``Write`` through the ``WriteRequest`` dependency (it is the only way to run a
use case from HTTP) and call ``write.run(act, authorise=...)``; ``tests/unit/test_use_cases.py``
walks every write route of every service and fails on one without it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import re
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol, TypeVar, overload

import structlog
from fastapi import Depends, Header, Request
from fastapi.responses import JSONResponse, Response

from shared.contracts.base import EventData
from shared.contracts.topics import Topic
from shared.kit import idempotency, tracing
from shared.kit.auth import Principal, current_principal
from shared.kit.db import Connection
from shared.kit.envelope import Envelope
from shared.kit.errors import DomainError, is_transient
from shared.kit.group_commit import CommitUncertain, GroupCommit
from shared.kit.outbox import OutgoingRecord
from shared.kit.service import ServiceRuntime, UnitOfWork

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: Attempts of one write when the database is briefly away (the first one included).
ATTEMPTS = 4
#: The first retry waits about this long (jittered ±50 %), each next one twice as long.
FIRST_BACKOFF_S = 0.025

_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


class Work(Protocol):
    """An open transaction that can record outgoing events: a use case's ``UnitOfWork`` or a
    consumer's ``HandlerContext``. It is all a use case needs."""

    @property
    def conn(self) -> Connection: ...

    async def emit(self, topic: Topic, data: EventData, *, subject: str, key: str | None = None) -> Envelope: ...


class InvalidIdempotencyKey(DomainError):
    code = "invalid-idempotency-key"
    status = 422
    title = "The Idempotency-Key is not usable"


@dataclass(frozen=True, slots=True)
class Outcome:
    """A write's answer as it is sent, and as it is stored for an Idempotency-Key replay.

    ``replay_body``: what a replay answers instead of ``body`` when the first answer holds what must
    never be stored (an API key's secret is shown once)."""

    status_code: int
    body: Any = None
    replayed: bool = False
    replay_body: Any = None
    headers: dict[str, str] = field(default_factory=dict)

    def response(self) -> Response:
        headers = dict(self.headers)
        if self.replayed:
            headers["Idempotent-Replayed"] = "true"
        if self.body is None:
            return Response(status_code=self.status_code, headers=headers)
        return JSONResponse(self.body, status_code=self.status_code, headers=headers)


@dataclass(slots=True)
class Write:
    """One HTTP write: who asks, for which operation, with which request, under which key."""

    runtime: ServiceRuntime
    principal: Principal
    #: ``METHOD /route/{template}``: a key is remembered per caller and operation.
    operation: str
    #: What the key's fingerprint covers: the concrete path, query and body.
    request: Any
    idempotency_key: str | None = None
    correlation_id: str | None = None
    ran: bool = False

    @property
    def caller(self) -> str:
        """The caller's identity; it leads the key's scope so an erasure can forget a person's keys."""
        p = self.principal
        where = p.municipality or p.partner
        return f"{p.subject} {p.role.value}{'@' + where if where else ''}"

    @overload
    async def run(
        self, act: Callable[[UnitOfWork], Awaitable[Outcome]], *, group_commit: bool = False,
        batch_key: Hashable | None = None,
    ) -> Outcome: ...

    @overload
    async def run(
        self, act: Callable[[UnitOfWork, T], Awaitable[Outcome]], *, authorise: Callable[[UnitOfWork], Awaitable[T]],
        group_commit: bool = False, batch_key: Hashable | None = None,
    ) -> Outcome: ...

    async def run(
        self, act: Callable[..., Awaitable[Outcome]], *, authorise: Any = None, group_commit: bool = False,
        batch_key: Hashable | None = None,
    ) -> Outcome:
        """Authorise, replay or act, commit; retry what a transient fault interrupted.

        ``authorise`` checks who may act on the target (and may load and lock it for ``act``); it
        must not check the target's state, so that a replay finds the first answer, not a 409.
        Without it the route's role check is the whole permission check.

        ``group_commit``: concurrent writes of this operation may share one transaction
        (``shared/kit/group_commit.py``; a write that fails makes its batch-mates run again). For a
        hot use case whose act is short and only talks to its own database; the answer is the same
        as alone. ``batch_key``: what the act reads and then writes through a ``SharedStep`` (two
        writes naming one never share a batch: ``GroupCommit.run``)."""
        if self.ran:
            raise RuntimeError(f"{self.operation}: a write runs once")
        self.ran = True
        if not tracing.recording():
            return await self._run(act, authorise, group_commit, batch_key)
        # The use case's span: the events it emits name it as their parent (``UnitOfWork.emit``).
        span = tracing.start_span(
            f"use case {self.operation}", kind=tracing.SpanKind.INTERNAL,
            attributes={"nichiiki.operation": self.operation, "nichiiki.principal_kind": self.principal.role.value},
        )
        with tracing.ending(span):
            return await self._run(act, authorise, group_commit, batch_key)

    async def _run(
        self, act: Callable[..., Awaitable[Outcome]], authorise: Any, group_commit: bool, batch_key: Hashable | None
    ) -> Outcome:
        attempt = 1
        while True:
            try:
                return await self._attempt(act, authorise, group_commit, batch_key)
            except CommitUncertain as uncertain:
                raise uncertain.__cause__ or uncertain from None
            except Exception as error:
                if not is_transient(error) or attempt >= ATTEMPTS:  # a BatchAborted is transient
                    raise
                delay = FIRST_BACKOFF_S * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
                log.warning("write hit a transient fault, retrying", operation=self.operation,
                            error=repr(error), attempt=attempt, backoff_s=round(delay, 3))
                attempt += 1
                await asyncio.sleep(delay)

    async def _attempt(
        self, act: Callable[..., Awaitable[Outcome]], authorise: Any, group_commit: bool, batch_key: Hashable | None
    ) -> Outcome:
        if group_commit:
            return await self._batches().run(functools.partial(self._in_batch, act, authorise), batch_key)
        runtime = self.runtime
        async with runtime.pool.acquire() as conn:
            transaction = conn.transaction()
            await transaction.start()
            try:
                work = UnitOfWork(conn, runtime, self.correlation_id)
                outcome = await self._decide(work, act, authorise)
                if outcome.replayed:
                    await transaction.rollback()
                    return outcome
                await work.flush()
            except BaseException:
                try:
                    await transaction.rollback()
                except Exception:
                    # It cannot roll back (the server went away, or the request was cancelled in the
                    # middle of a statement): never hand such a connection to the next request.
                    conn.terminate()
                raise
            try:
                await transaction.commit()
            except Exception as error:
                raise CommitUncertain from error
        runtime.outbox.committed()
        return outcome

    async def _in_batch(
        self, act: Callable[..., Awaitable[Outcome]], authorise: Any, conn: Connection
    ) -> tuple[Outcome, list[OutgoingRecord]]:
        """This write's part of a shared transaction: its answer, and its events for the batch."""
        work = UnitOfWork(conn, self.runtime, self.correlation_id)
        outcome = await self._decide(work, act, authorise)
        return outcome, work.take_pending()

    def _batches(self) -> GroupCommit[Outcome]:
        batches = self.runtime.group_commits.get(self.operation)
        if batches is None:
            runtime = self.runtime
            batches = runtime.group_commits[self.operation] = GroupCommit(
                self.operation, lambda: runtime.pool, runtime.outbox
            )
        return batches

    async def _decide(self, work: UnitOfWork, act: Callable[..., Awaitable[Outcome]], authorise: Any) -> Outcome:
        """Authorise; then the key's stored answer, or act and remember the answer under the key."""
        target = await authorise(work) if authorise is not None else None
        scope, fingerprint = self._key_scope()
        if scope is not None:
            assert self.idempotency_key is not None
            stored = await idempotency.replay(work.conn, scope, self.idempotency_key, fingerprint)
            if stored is not None:
                log.info("write replayed", operation=self.operation)
                return Outcome(stored.status_code, stored.body, replayed=True)
        outcome = await (act(work, target) if authorise is not None else act(work))
        if scope is not None:
            assert self.idempotency_key is not None
            kept = outcome.body if outcome.replay_body is None else outcome.replay_body
            await idempotency.remember(work.conn, scope, self.idempotency_key, fingerprint, outcome.status_code, kept)
        return outcome

    def _key_scope(self) -> tuple[str | None, str]:
        if self.idempotency_key is None:
            return None, ""
        return (
            f"{self.caller} {self.operation}",
            idempotency.request_hash({"operation": self.operation, "request": self.request}),
        )


def checked_target(
    load: Callable[[Connection], Awaitable[T]], check: Callable[[T], None]
) -> Callable[[UnitOfWork], Awaitable[T]]:
    """The usual ``authorise`` step: load (and lock) the target, then check who may act on it
    (``check`` raises the 403); the action gets the loaded target."""

    async def authorise(work: UnitOfWork) -> T:
        target = await load(work.conn)
        check(target)
        return target

    return authorise


IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key", max_length=255,
        description="repeat this write safely: the same key and request answer the first response again",
    ),
]


def valid_idempotency_key(key: str) -> bool:
    return _IDEMPOTENCY_KEY.fullmatch(key) is not None


async def write_request(
    request: Request,
    principal: Annotated[Principal, Depends(current_principal)],
    idempotency_key: IdempotencyKeyHeader = None,
) -> Write:
    """The ``Write`` of an HTTP request (FastAPI has parsed and validated the body before this runs)."""
    if idempotency_key is not None and not valid_idempotency_key(idempotency_key):
        raise InvalidIdempotencyKey("send 1-255 visible ASCII characters, e.g. a UUID")
    route = getattr(request.scope.get("route"), "path", None)
    if route is None:  # not routed by a template (the URL is parsed only then)
        route = request.url.path
    return Write(
        runtime=request.app.state.runtime,
        principal=principal,
        operation=f"{request.method} {route}",
        # The fingerprint is only needed under a key: parsing the body again costs the hot paths.
        request=None if idempotency_key is None else {
            "path": request.url.path, "query": str(request.query_params), "body": await _body_of(request),
        },
        idempotency_key=idempotency_key,
        correlation_id=getattr(request.state, "correlation_id", None),
    )


async def _body_of(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.hex()


#: The dependency every write route takes: ``write: WriteRequest``.
WriteRequest = Annotated[Write, Depends(write_request)]
