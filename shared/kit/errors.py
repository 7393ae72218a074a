"""What can go wrong, classified once for the whole platform.

``DomainError`` is a rule the user broke: HTTP maps it to a problem+json response by its
``code`` and ``status``; a consumer parks the event on the DLQ with it as the reason.
``is_transient`` says whether retrying later can succeed (database or broker unavailable).
"""

from __future__ import annotations

import errno
from typing import Any, ClassVar

import asyncpg
import redis.exceptions
from aiokafka.errors import KafkaError

#: Members of a problem+json body that the kit fills; a rule's extra members must not reuse them.
RESERVED_PROBLEM_FIELDS = frozenset({"type", "title", "status", "code", "detail", "instance"})


class DomainError(Exception):
    """A broken business rule. Subclasses set ``code`` (machine-readable) and ``status``."""

    code: ClassVar[str] = "domain-error"
    status: ClassVar[int] = 422
    title: ClassVar[str] = "The request breaks a rule"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None, **extra: Any) -> None:
        reserved = RESERVED_PROBLEM_FIELDS.intersection(extra)
        if reserved:
            raise ValueError(f"problem fields {sorted(reserved)} are set by the kit; name the extra otherwise")
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra


class NotFound(DomainError):
    code = "not-found"
    status = 404
    title = "Not found"


class Conflict(DomainError):
    code = "conflict"
    status = 409
    title = "Conflicts with the current state"


class Forbidden(DomainError):
    code = "forbidden"
    status = 403
    title = "Not allowed for this principal"


_TRANSIENT_PG = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.LockNotAvailableError,
    # a connection left mid-statement (a cancelled request during an outage): another one will do
    asyncpg.InternalClientError,
)


class Transient(Exception):
    """A condition of the platform's own making that clears by itself (e.g. a shared transaction
    broke before a write in it could commit): retried, and answered 503 if it lasts."""


#: Exception classes that are always infrastructure faults (HTTP answers them with 503).
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    *_TRANSIENT_PG, KafkaError, TimeoutError, ConnectionError, Transient,
    # Redis away (a session's sign-out is looked up there): not the builtin ConnectionError
    redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
)


def is_transient(error: BaseException) -> bool:
    """True for faults of infrastructure that may clear by themselves; never for a broken rule."""
    if isinstance(error, DomainError):
        return False
    if isinstance(error, TRANSIENT_ERRORS):  # asyncio.TimeoutError is TimeoutError (Python 3.11+)
        return True
    return isinstance(error, OSError) and error.errno in (errno.ECONNREFUSED, errno.ECONNRESET, errno.EPIPE)
