"""The HTTP feed (``GET /v1/feed``): a partner's records over HTTP, for partners without Kafka.

The same records in the same order as the Kafka feed ``partner.<code>.v1``: the gateway writes each
record it puts in the outbox for a partner's feed also into ``partner_feed_log``, in the same
transaction and order (``store.insert_deliveries``), so whatever a partner reads, over Kafka or
HTTP, is a record the delivery record (APPI Art. 29) already holds, once.

Cursor: ``position``, given to committed log rows in id order by a sequencer under an advisory lock
(``store.sequence_feed``, run by the readers). A transaction that commits late gets later positions
than rows already read, so a reader past a cursor never misses a row; rows of one certificate keep
their order (a handler locks the certificate's rows before writing its records, so their ids follow
commit order).

Compaction: the log keeps every record; a record superseded by a later one of the same key is
dropped once it has been readable for ``COMPACTION_LAG_S`` (7 days, Kafka's ``min.compaction.lag.ms``
in spirit): a partner that keeps up sees every record (a withdrawal before its tombstone), one that
starts over from the beginning sees the latest record of each key. Tombstones are the latest record
of their key and stay, so a partner reading from the beginning learns which keys to forget.

Long poll: records after the cursor → answered at once; none → wait up to ``wait`` seconds (at most
``MAX_WAIT_S``) for the next. Waiting holds no database connection: a waiter parks on ``FeedSignal``,
woken by one listening connection per process (``NOTIFY partner_gateway_feed``, sent once per
transaction that logged records) or, failing that, by a short poll every ``POLL_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg
import structlog

from services.partner_gateway import store
from shared.kit.db import Connection
from shared.kit.service import BackgroundTask, ServiceRuntime

if TYPE_CHECKING:
    from services.partner_gateway.handlers import PartnerDirectory

log = structlog.get_logger(__name__)

MAX_WAIT_S = 25.0
#: A waiter looks at the log at least this often, even without a notification.
POLL_S = 1.0
#: How often each process reloads the partner directory (partners registered through another replica).
RELOAD_S = 10.0
COMPACTION_LAG_S = 7 * 86_400.0
COMPACT_EVERY_S = 3_600.0
#: The delivery record's legal retention: three years from each record (個人情報保護法施行規則
#: 第21条第3号, a record made per provision; 第14条 before the 2022 renumbering), then it goes.
DELIVERY_RETENTION_DAYS = 3 * 366


class FeedSignal:
    """Wakes every long poll of this process when new feed records may have been committed."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def ticket(self) -> asyncio.Event:
        """Take before looking at the log: a wake after that look is not lost."""
        return self._event

    def wake(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    @staticmethod
    async def wait(ticket: asyncio.Event, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ticket.wait(), timeout=max(timeout_s, 0.0))


@dataclass(frozen=True, slots=True)
class FeedItem:
    cursor: str
    key: str
    value: Any
    type: str | None
    id: str
    time: str
    subject: str


def _item(row: asyncpg.Record) -> FeedItem:
    value = row["value"]
    return FeedItem(
        cursor=str(row["position"]), key=row["key"],
        value=None if value is None else json.loads(bytes(value)),
        type=row["event_type"], id=str(row["event_id"]), time=row["event_time"].isoformat(), subject=row["subject"],
    )


async def read(
    pool: asyncpg.Pool, signal: FeedSignal, partner: str, after: int, limit: int, wait_s: float
) -> tuple[list[FeedItem], int]:
    """The partner's records after ``after`` (at most ``limit``), waiting up to ``wait_s`` for the
    first if there are none; and the next cursor."""
    deadline = time.monotonic() + min(max(wait_s, 0.0), MAX_WAIT_S)
    while True:
        ticket = signal.ticket()
        async with pool.acquire() as conn:  # released before any wait
            await store.sequence_feed(conn)
            rows = await store.feed_page(conn, partner, after, limit)
        left = deadline - time.monotonic()
        if rows or left <= 0:
            items = [_item(row) for row in rows]
            return items, (int(items[-1].cursor) if items else after)
        await signal.wait(ticket, min(left, POLL_S))


def watch(partners: PartnerDirectory, signal: FeedSignal) -> BackgroundTask:
    """Background task of the runtime: listen for feed notifications (one connection, not pooled),
    reload the partner directory every ``RELOAD_S``, and every ``COMPACT_EVERY_S`` compact the log
    and delete the delivery records past their retention (idempotent: every replica may run it)."""

    async def run(runtime: ServiceRuntime) -> None:
        last_compaction = time.monotonic()
        while True:
            conn: Connection | None = None
            try:
                conn = await asyncpg.connect(runtime.dsn)
                await conn.add_listener(store.FEED_CHANNEL, lambda *_: signal.wake())
                signal.wake()  # anything committed while not listening
                while not conn.is_closed():
                    await asyncio.sleep(RELOAD_S)
                    partners.replace(await store.load_partners(runtime.pool))
                    if time.monotonic() - last_compaction >= COMPACT_EVERY_S:
                        last_compaction = time.monotonic()
                        dropped = await store.compact_feed_log(runtime.pool, COMPACTION_LAG_S)
                        if dropped:
                            log.info("partner feed log compacted", dropped=dropped)
                        expired = await store.prune_deliveries(runtime.pool, DELIVERY_RETENTION_DAYS)
                        if expired:
                            log.info("delivery records past their retention deleted", deleted=expired)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("partner feed watch failed; retrying", error=repr(error))
                await asyncio.sleep(1.0)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()

    return run


def page_body(items: Sequence[FeedItem], next_cursor: int) -> dict[str, Any]:
    return {
        "records": [
            {"cursor": i.cursor, "key": i.key, "value": i.value, "type": i.type, "id": i.id, "time": i.time,
             "subject": i.subject}
            for i in items
        ],
        "next": str(next_cursor),
    }
