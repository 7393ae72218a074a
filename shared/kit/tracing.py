"""OpenTelemetry traces across HTTP → use case → outbox → Kafka → consumer → outbox → …

One trace follows a decision from the request that made it to every record it caused, across
services: W3C Trace Context travels as the ``traceparent`` (and ``tracestate``) record header (the
CloudEvents distributed-tracing extension, next to the ``ce_*`` headers), stored with each outbox
row in the columns of the same names until the relay sends it.

- HTTP: ``Observe`` opens a server span per request (continuing an incoming ``traceparent``), the
  use-case runner a child span; events emitted in it carry that span as their parent.
- Consumers: one span per event (kind consumer), the child of the event's ``traceparent``; what the
  handler emits carries it on. Per event, not per batch: a batch mixes events of many traces, and a
  batch span (with links to them) would start a new trace whose id the emitted events would carry,
  so no trace would reach from a click to the partner's record.

Export: OTLP over HTTP when ``NICHIIKI_OTEL_EXPORTER_OTLP_ENDPOINT`` (or the standard
``OTEL_EXPORTER_OTLP_ENDPOINT``) is set; otherwise no tracer provider is installed, no span is
recorded, and an incoming ``traceparent`` is passed on unchanged (a string copied per event).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

__all__ = ["Span", "SpanKind", "TraceHeaders"]

log = structlog.get_logger(__name__)

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
ENDPOINT_VARIABLES = ("NICHIIKI_OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")

#: version 00: trace id, parent span id, flags (W3C Trace Context, level 1).
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")

#: The kit's tracer, from the provider in use; None: not tracing (``recording`` is False).
_tracer: trace.Tracer | None = None
_NO_TRACER = trace.NoOpTracer()
_configured: str | None = None


@dataclass(frozen=True, slots=True)
class TraceHeaders:
    """A span's W3C Trace Context as two header values."""

    traceparent: str
    tracestate: str | None = None

    def headers(self) -> list[tuple[str, bytes]]:
        headers = [(TRACEPARENT, self.traceparent.encode())]
        if self.tracestate:
            headers.append((TRACESTATE, self.tracestate.encode()))
        return headers

    @property
    def trace_id(self) -> str:
        return self.traceparent[3:35]


def endpoint_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    environ = os.environ if environ is None else environ
    for name in ENDPOINT_VARIABLES:
        if environ.get(name):
            return environ[name]
    return None


def configure_tracing(service: str, environ: Mapping[str, str] | None = None) -> bool:
    """Install an SDK tracer provider exporting OTLP/HTTP when an endpoint is configured (once per
    process); without one, nothing is installed and spans cost next to nothing. True if exporting."""
    global _configured
    endpoint = endpoint_from_env(environ)
    if endpoint is None:
        return False
    if _configured is not None:
        return True
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # The standard variable is a base URL (the exporter adds /v1/traces); ours is the same.
    url = endpoint.rstrip("/")
    url = url if url.endswith("/v1/traces") else f"{url}/v1/traces"
    provider = TracerProvider(resource=Resource.create({"service.name": f"nichiiki-{service}",
                                                        "service.namespace": "nichiiki"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
    trace.set_tracer_provider(provider)  # also for any library instrumentation in the process
    use_provider(provider)
    _configured = service
    log.info("traces exported over OTLP", endpoint=url)
    return True


def use_provider(provider: trace.TracerProvider | None) -> None:
    """Trace through ``provider`` from now on (None: stop). ``configure_tracing`` calls it; tests
    hand in a provider with an in-memory exporter and take it away again."""
    global _tracer
    _tracer = None if provider is None else provider.get_tracer("nichiiki.kit")


def recording() -> bool:
    """Whether spans are recorded in this process (an exporter, or a test's)."""
    return _tracer is not None


def tracer() -> trace.Tracer:
    return _tracer or _NO_TRACER


def parse_traceparent(traceparent: str | None, tracestate: str | None = None) -> SpanContext | None:
    """The remote span context a ``traceparent`` names; None for an absent or malformed one."""
    if not traceparent:
        return None
    found = _TRACEPARENT.match(traceparent.strip().lower())
    if found is None:
        return None
    trace_id, span_id = int(found.group(1), 16), int(found.group(2), 16)
    if trace_id == 0 or span_id == 0:
        return None
    state = TraceState.from_header([tracestate]) if tracestate else None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(int(found.group(3), 16)),
                       trace_state=state)


def headers_of(span_context: SpanContext) -> TraceHeaders | None:
    """The Trace Context headers naming ``span_context`` as the parent; None for an invalid one."""
    if not span_context.is_valid:
        return None
    state = span_context.trace_state.to_header() if span_context.trace_state else None
    return TraceHeaders(
        f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{int(span_context.trace_flags):02x}",
        state or None,
    )


def current_headers() -> TraceHeaders | None:
    """The Trace Context of the current span (the request's, the use case's), if any."""
    return headers_of(trace.get_current_span().get_span_context())


def from_headers(headers: Iterable[tuple[str, bytes]]) -> TraceHeaders | None:
    """The Trace Context a record's headers carry, if a valid one."""
    traceparent = tracestate = None
    for name, value in headers:
        if name == TRACEPARENT:
            traceparent = value.decode("latin-1")
        elif name == TRACESTATE:
            tracestate = value.decode("latin-1")
    if parse_traceparent(traceparent) is None:
        return None
    assert traceparent is not None
    return TraceHeaders(traceparent, tracestate)


def parent_context(traceparent: str | None, tracestate: str | None = None) -> otel_context.Context | None:
    remote = parse_traceparent(traceparent, tracestate)
    return None if remote is None else trace.set_span_in_context(NonRecordingSpan(remote))


def start_span(
    name: str, *, kind: SpanKind, parent: TraceHeaders | None = None, detached: bool = False,
    attributes: Mapping[str, str | int] | None = None,
) -> Span:
    """A span (not made current): the child of ``parent`` when given, else of the current span, or
    the root of a new trace when ``detached`` (a message's own span has only its own parent)."""
    ctx = parent_context(parent.traceparent, parent.tracestate) if parent is not None else None
    if ctx is None and detached:
        ctx = otel_context.Context()
    return tracer().start_span(name, context=ctx, kind=kind, attributes=attributes)


def consumer_span(
    traceparent: str | None, tracestate: str | None, *, topic: str, partition: int, offset: int, group: str,
    event_id: str, event_type: str,
) -> tuple[Span | None, TraceHeaders | None]:
    """One event's span (kind consumer, the child of the event's ``traceparent``, a new trace's root
    without one) and the Trace Context its emitted events carry. Without a recording provider: no
    span, and the event's own (valid) context is passed on unchanged."""
    incoming = TraceHeaders(traceparent, tracestate) if traceparent and parse_traceparent(traceparent) else None
    if not recording():
        return None, incoming
    span = start_span(
        f"process {topic}", kind=SpanKind.CONSUMER, parent=incoming, detached=True,
        attributes={
            "messaging.system": "kafka", "messaging.operation.type": "process",
            "messaging.destination.name": topic, "messaging.destination.partition.id": str(partition),
            "messaging.kafka.offset": offset, "messaging.consumer.group.name": group,
            "messaging.message.id": event_id, "cloudevents.event_id": event_id,
            "cloudevents.event_type": event_type,
        },
    )
    return span, headers_of(span.get_span_context())


def failed(span: Span | None, description: str) -> None:
    if span is not None:
        span.set_status(Status(StatusCode.ERROR, description))


@contextmanager
def ending(span: Span | None, before_end: Callable[[], None] | None = None) -> Iterator[None]:
    """Run the block in ``span`` (current, so spans and logs inside nest under it), then end it
    (``before_end`` first: what is known only at the end); an exception marks it failed. None:
    nothing to do."""
    if span is None:
        yield
        return
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield
    except BaseException as error:
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        raise
    finally:
        otel_context.detach(token)
        if before_end is not None:
            before_end()
        span.end()


@contextmanager
def ending_all(spans: Iterable[Span | None]) -> Iterator[None]:
    """End every span after the block (a set-based handler's events: one call handles them all)."""
    live = [span for span in spans if span is not None]
    try:
        yield
    except BaseException as error:
        for span in live:
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        raise
    finally:
        for span in live:
            span.end()


def remote_span(headers: TraceHeaders) -> Span | None:
    """A non-recording span standing for a remote parent: made current, it passes the context on."""
    remote = parse_traceparent(headers.traceparent, headers.tracestate)
    return None if remote is None else NonRecordingSpan(remote)


@contextmanager
def current(span: Span) -> Iterator[Span]:
    """Make ``span`` current in the block (its events' parent), without ending it."""
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield span
    finally:
        otel_context.detach(token)
