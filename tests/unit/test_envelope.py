from __future__ import annotations

import uuid

import pytest

from shared.kit.envelope import EnvelopeError, new_envelope, parse_envelope
from tests.support import Ping


def test_round_trip_keeps_every_attribute() -> None:
    envelope = new_envelope("registration", Ping(subject="r-1", sequence=7), subject="r-1", correlation_id="c-1")
    parsed = parse_envelope(envelope.headers(), envelope.data, envelope.key)
    assert parsed == envelope
    assert parsed.decode(Ping) == Ping(subject="r-1", sequence=7)
    headers = dict(envelope.headers())
    assert headers["ce_specversion"] == b"1.0"
    assert headers["ce_source"] == b"/nichiiki/registration"
    assert headers["ce_type"] == b"jp.nichiiki.tests.ping.v1"
    assert headers["content-type"] == b"application/json"
    assert envelope.key == b"r-1"


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda h: {k: v for k, v in h.items() if k != "ce_id"}, "missing CloudEvents header ce_id"),
        (lambda h: {**h, "ce_id": b"not-a-uuid"}, "is not a UUID"),
        (lambda h: {**h, "ce_specversion": b"0.3"}, "unsupported specversion"),
        (lambda h: {**h, "ce_time": b"yesterday"}, "not an RFC 3339 time"),
        (lambda h: {**h, "content-type": b"text/plain"}, "unsupported content-type"),
    ],
)
def test_bad_headers_are_refused_with_the_reason(mutate, reason) -> None:  # type: ignore[no-untyped-def]
    envelope = new_envelope("tests", Ping(subject="s", sequence=1), subject="s")
    headers = mutate(dict(envelope.headers()))
    with pytest.raises(EnvelopeError, match=reason):
        parse_envelope(list(headers.items()), envelope.data, envelope.key)


def test_data_that_does_not_fit_the_contract_is_refused() -> None:
    envelope = new_envelope("tests", Ping(subject="s", sequence=1), subject="s")
    parsed = parse_envelope(envelope.headers(), b'{"subject": "s", "sequence": "many"}', None)
    with pytest.raises(EnvelopeError, match="does not match"):
        parsed.decode(Ping)
    with pytest.raises(EnvelopeError, match="does not match"):
        parse_envelope(envelope.headers(), b"not json{", None).decode(Ping)


def test_event_ids_are_unique_and_types_are_versioned() -> None:
    ids = {new_envelope("tests", Ping(subject="s", sequence=i), subject="s").id for i in range(100)}
    assert len(ids) == 100
    assert all(isinstance(i, uuid.UUID) for i in ids)
    assert Ping.event_type.endswith(".v1")


def test_a_batch_is_merged_by_time_across_partitions_keeping_each_partitions_order() -> None:
    from types import SimpleNamespace

    from shared.kit.consumer import in_time_order

    def record(topic: str, partition: int, offset: int, timestamp: int) -> SimpleNamespace:
        return SimpleNamespace(topic=topic, partition=partition, offset=offset, timestamp=timestamp)

    residents = [record("residents", 0, 0, 100), record("residents", 0, 1, 300)]
    applications = [record("applications", 2, 0, 200), record("applications", 2, 1, 150)]  # a clock went back
    merged = in_time_order([*applications, *residents])
    assert [(r.topic, r.offset) for r in merged] == [
        ("residents", 0), ("applications", 0), ("applications", 1), ("residents", 1),
    ]
