"""CloudEvents 1.0 envelope, Kafka protocol binding, binary content mode.

Attributes travel as ``ce_*`` headers, the event data is the record value (JSON), and the
record key is the aggregate whose order matters. ``ce_id`` is the idempotency key consumers
record in their inbox. Two extension attributes carry tracing: ``ce_correlationid`` (one id for
everything one request caused) and ``ce_causationid`` (the event that caused this one).
"""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

from pydantic import ValidationError

from shared.contracts.base import EventData, event_model

SPEC_VERSION = "1.0"
CONTENT_TYPE = "application/json"

Headers = Sequence[tuple[str, bytes]]
#: W3C Trace Context headers, read as attributes (the CloudEvents distributed-tracing extension).
_TRACE_HEADERS = frozenset({"traceparent", "tracestate"})
D = TypeVar("D", bound=EventData)


class EnvelopeError(ValueError):
    """A record that is not a valid Nichiiki CloudEvent (parked on the DLQ, never retried)."""


@dataclass(frozen=True, slots=True)
class Envelope:
    id: uuid.UUID
    source: str
    type: str
    subject: str
    time: datetime
    data: bytes
    key: bytes | None = None
    correlation_id: str | None = None
    causation_id: str | None = None
    extra_headers: tuple[tuple[str, bytes], ...] = field(default=())
    #: W3C Trace Context of the span that emitted it (the CloudEvents distributed-tracing extension).
    traceparent: str | None = None
    tracestate: str | None = None

    def headers(self) -> list[tuple[str, bytes]]:
        headers = [
            ("ce_specversion", SPEC_VERSION.encode()),
            ("ce_id", str(self.id).encode()),
            ("ce_source", self.source.encode()),
            ("ce_type", self.type.encode()),
            ("ce_subject", self.subject.encode()),
            ("ce_time", self.time.isoformat().encode()),
            ("content-type", CONTENT_TYPE.encode()),
        ]
        if self.correlation_id:
            headers.append(("ce_correlationid", self.correlation_id.encode()))
        if self.causation_id:
            headers.append(("ce_causationid", self.causation_id.encode()))
        if self.traceparent:
            headers.append(("traceparent", self.traceparent.encode()))
            if self.tracestate:
                headers.append(("tracestate", self.tracestate.encode()))
        headers.extend(self.extra_headers)
        return headers

    def decode(self, model: builtins.type[D]) -> D:
        """Validate the data against the contract model (EnvelopeError if it does not fit)."""
        try:
            return model.model_validate_json(self.data)
        except ValidationError as error:
            raise EnvelopeError(f"data does not match {model.event_type}: {error}") from error

    def data_model(self) -> EventData:
        model = event_model(self.type)
        if model is None:
            raise EnvelopeError(f"unknown event type {self.type!r}")
        return self.decode(model)


def source_of(service: str) -> str:
    return f"/nichiiki/{service}"


def new_envelope(
    service: str,
    data: EventData,
    *,
    subject: str,
    key: str | None = None,
    correlation_id: str | None = None,
    causation_id: str | None = None,
    event_id: uuid.UUID | None = None,
    time: datetime | None = None,
    traceparent: str | None = None,
    tracestate: str | None = None,
) -> Envelope:
    """Wrap event data for publishing; ``key`` defaults to the subject (the aggregate id)."""
    return Envelope(
        id=event_id or uuid.uuid4(),
        source=source_of(service),
        type=data.event_type,
        subject=subject,
        time=time or datetime.now(UTC),
        data=data.model_dump_json().encode(),
        key=(key if key is not None else subject).encode(),
        correlation_id=correlation_id,
        causation_id=causation_id,
        traceparent=traceparent,
        tracestate=tracestate,
    )


def parse_envelope(headers: Iterable[tuple[str, bytes]], value: bytes | None, key: bytes | None) -> Envelope:
    """Read a record back into an envelope; raise EnvelopeError with the exact reason."""
    attrs: dict[str, str] = {}
    extra: list[tuple[str, bytes]] = []
    for name, raw in headers:
        if name in _TRACE_HEADERS:
            # Malformed trace context is ignored where it is used, never a reason to park the event.
            attrs[name] = raw.decode("latin-1")
        elif name.startswith("ce_") or name == "content-type":
            try:
                attrs[name] = raw.decode()
            except UnicodeDecodeError as error:
                raise EnvelopeError(f"header {name} is not UTF-8") from error
        else:
            extra.append((name, raw))
    for required in ("ce_specversion", "ce_id", "ce_source", "ce_type", "ce_time"):
        if required not in attrs:
            raise EnvelopeError(f"missing CloudEvents header {required}")
    if attrs["ce_specversion"] != SPEC_VERSION:
        raise EnvelopeError(f"unsupported specversion {attrs['ce_specversion']!r}")
    if attrs.get("content-type", CONTENT_TYPE).split(";")[0].strip() != CONTENT_TYPE:
        raise EnvelopeError(f"unsupported content-type {attrs.get('content-type')!r}")
    try:
        event_id = uuid.UUID(attrs["ce_id"])
    except ValueError as error:
        raise EnvelopeError(f"ce_id {attrs['ce_id']!r} is not a UUID") from error
    try:
        time = datetime.fromisoformat(attrs["ce_time"])
    except ValueError as error:
        raise EnvelopeError(f"ce_time {attrs['ce_time']!r} is not an RFC 3339 time") from error
    if value is None:
        raise EnvelopeError("record has no value")
    return Envelope(
        id=event_id,
        source=attrs["ce_source"],
        type=attrs["ce_type"],
        subject=attrs.get("ce_subject", ""),
        time=time,
        data=value,
        key=key,
        correlation_id=attrs.get("ce_correlationid"),
        causation_id=attrs.get("ce_causationid"),
        extra_headers=tuple(extra),
        traceparent=attrs.get("traceparent"),
        tracestate=attrs.get("tracestate"),
    )
