"""Records written together share one copy of each distinct list of header names (``_columns``):
each row still gets its own names and values, in its own order."""

from __future__ import annotations

import uuid

import asyncpg

from shared.kit.outbox import Outbox, OutgoingRecord, _columns
from shared.kit.settings import Settings
from tests.support import fresh_database


class LeadingRelay:
    is_leader = True

    def wake(self) -> None: ...


def envelope_headers(n: int) -> list[tuple[str, bytes]]:
    return [("ce_specversion", b"1.0"), ("ce_id", str(n).encode()), ("ce_type", b"t")]


def test_each_distinct_list_of_names_is_sent_once() -> None:
    records = [
        OutgoingRecord("t", b"k", envelope_headers(n), b"v", str(uuid.uuid4())) for n in range(50)
    ] + [OutgoingRecord("t", b"k", [("dlq_reason", b"r")], b"v", str(uuid.uuid4()))]
    columns = _columns(records)
    names, values, names_first, names_last = columns[3], columns[4], columns[11], columns[12]
    assert names == ["ce_specversion", "ce_id", "ce_type", "dlq_reason"]
    assert len(values) == 50 * 3 + 1
    assert set(zip(names_first[:50], names_last[:50], strict=True)) == {(1, 3)}
    assert (names_first[50], names_last[50]) == (4, 4)


async def test_rows_sharing_names_with_others_between_are_stored_as_written(settings: Settings) -> None:
    dsn = await fresh_database(settings, "outbox")
    outbox = Outbox("unused")
    outbox.local_relay = LeadingRelay()  # type: ignore[assignment]
    ids = [str(uuid.uuid4()) for _ in range(5)]
    records = [
        OutgoingRecord("t.a", b"k0", envelope_headers(0), b"v0", ids[0]),
        OutgoingRecord("t.a", b"k1", [("dlq_reason", b"r"), ("ce_id", b"1"), ("traceparent", b"00-ab-cd-01")],
                       b"v1", ids[1]),
        OutgoingRecord("t.a", b"k2", envelope_headers(2), b"v2", ids[2]),
        OutgoingRecord("t.b", b"k3", [], None, ids[3]),
        OutgoingRecord("t.a", b"k4", [("ce_type", b"t"), ("ce_id", b"4"), ("ce_specversion", b"1.0")], b"v4", ids[4]),
    ]
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await outbox.add_many(conn, records)
        rows = await conn.fetch(
            "SELECT event_id::text, header_names, header_values, traceparent FROM outbox ORDER BY id"
        )
    finally:
        await conn.close()
    assert [tuple(row) for row in rows] == [
        (ids[0], ["ce_specversion", "ce_id", "ce_type"], [b"1.0", b"0", b"t"], None),
        (ids[1], ["dlq_reason", "ce_id"], [b"r", b"1"], "00-ab-cd-01"),
        (ids[2], ["ce_specversion", "ce_id", "ce_type"], [b"1.0", b"2", b"t"], None),
        (ids[3], [], [], None),
        (ids[4], ["ce_type", "ce_id", "ce_specversion"], [b"t", b"4", b"1.0"], None),
    ]
