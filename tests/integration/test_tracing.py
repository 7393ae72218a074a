"""One trace from a staff member's approval at certification to JAL's record on its feed.

Certification and the partner gateway run in-process over the real brokers and PostgreSQL, with the
kit tracing through an SDK provider whose spans land in an in-memory exporter. The approval's
server span starts the trace; the certificate event carries it (outbox row → ``traceparent``
record header); the gateway's span for that event continues it, and the record it puts on JAL's
feed (on the partner-facing cluster) carries the same trace id.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest
import structlog
import structlog.testing
from aiokafka import ConsumerRecord
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.certification.main import create_app as certification_app
from services.partner_gateway.main import create_app as gateway_app
from shared.contracts.base import EventData
from shared.contracts.partners import certificate_of_key
from shared.contracts.registration import ConsentState, Contact, ResidentRegistered
from shared.contracts.sealed import resident_subject
from shared.contracts.topics import CERTIFICATES, RESIDENTS
from shared.kit import tracing
from shared.kit.consumer import EventConsumer, EventRouter, Run
from shared.kit.envelope import new_envelope, parse_envelope
from shared.kit.keyring import Keyring
from shared.kit.outbox import Outbox
from shared.kit.settings import Settings
from shared.reference import prefecture_of
from tests.support import (
    TEST_TOPIC,
    Ping,
    bearer,
    envelope_record,
    eventually,
    fresh_database,
    produce,
    read_topic,
    service_client,
)

SHIRAHAMA = "304018"  # JAL serves it
CHIYODA = "131016"

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    try:
        yield exporter
    finally:
        tracing.use_provider(None)  # the rest of the session runs untraced, as services do by default
        provider.shutdown()


@pytest.fixture(scope="module")
async def apps(settings: Settings, spans: InMemorySpanExporter) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    gateway = gateway_app(settings)
    async with service_client(gateway), service_client(certification_app(settings)) as certification:
        yield certification, gateway


async def registered(settings: Settings, resident_id: str) -> ResidentRegistered:
    now = datetime.now(UTC)
    keyring = Keyring.from_settings(settings)
    try:
        contact = await keyring.seal(resident_subject(resident_id), Contact(
            name="山田 花子", name_kana="ヤマダ ハナコ", email=f"{resident_id}@example.jp",
        ))
    finally:
        await keyring.close()
    return ResidentRegistered(
        resident_id=resident_id, registration_id=f"reg-{uuid.uuid4().hex[:8]}", municipality_code=SHIRAHAMA,
        prefecture_code=prefecture_of(SHIRAHAMA).code, tier="basic", status="active", legal_address_code=CHIYODA,
        contact=contact,
        consents=[ConsentState(purpose="share_certificate", partner="jal", granted=True, at=now)],
        registered_at=now,
    )


async def jal_records(settings: Settings, number: str) -> list[ConsumerRecord[bytes, bytes]]:
    def mine(records: list[ConsumerRecord[bytes, bytes]]) -> list[ConsumerRecord[bytes, bytes]]:
        return [r for r in records if r.key is not None and certificate_of_key(r.key.decode()) == number]

    topic = settings.topic("partner.jal.v1")
    return mine(await read_topic(settings, topic, until=lambda rs: bool(mine(rs)), timeout=30))


def spans_of(exporter: InMemorySpanExporter, trace_id: int) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.context is not None and s.context.trace_id == trace_id]


async def test_one_trace_from_the_approval_to_the_record_on_jals_feed(
    settings: Settings, apps: tuple[httpx.AsyncClient, Any], spans: InMemorySpanExporter
) -> None:
    certification, gateway = apps
    resident = f"res-{uuid.uuid4().hex[:10]}"
    event = await registered(settings, resident)
    envelope = new_envelope("registration", event, subject=resident)
    await produce(settings, settings.topic(RESIDENTS.name), [(envelope.key, envelope.data, envelope.headers())])

    async def application_accepted() -> dict[str, Any] | None:
        response = await certification.post("/v1/applications", headers=bearer(settings, "resident", resident), json={
            "municipality_code": SHIRAHAMA, "planned_stay_days": 60, "housing_basis": "rented",
            "address_there": "和歌山県西牟婁郡白浜町1234-5", "primary_residence_code": CHIYODA,
            "partners": [{"partner": "jal", "member_number": "123456789"}],
        })
        return response.json() if response.status_code == 201 else None  # 409/503 until the resident is known

    application: dict[str, Any] = {}

    async def applied() -> bool:
        application.update(await application_accepted() or {})
        return bool(application)

    await eventually(applied, timeout=30, interval=0.2)

    spans.clear()
    approved = await certification.post(
        f"/v1/applications/{application['application_id']}/approve",
        headers=bearer(settings, "staff", municipality=SHIRAHAMA),
    )
    assert approved.status_code == 201, approved.text
    number = approved.json()["certificate_number"]

    # The staff's click: the server span of the approval, named by its route template (not the id).
    [click] = [
        s for s in spans.get_finished_spans()
        if s.kind is SpanKind.SERVER and s.name == "POST /v1/applications/{application_id}/approve"
    ]
    assert click.context is not None and click.parent is None
    trace_id = click.context.trace_id
    assert click.attributes is not None and click.attributes["http.response.status_code"] == 201
    [use_case] = [s for s in spans_of(spans, trace_id) if s.name.startswith("use case POST")]
    assert use_case.parent is not None and use_case.parent.span_id == click.context.span_id

    # The certificate event on the internal cluster carries the use case's span as its parent.
    issued = [
        parse_envelope(r.headers, r.value, r.key)
        for r in await read_topic(settings, settings.topic(CERTIFICATES.name),
                                  until=lambda rs: any(r.key == number.encode() for r in rs), timeout=20)
        if r.key == number.encode()
    ]
    assert issued and issued[0].traceparent is not None
    parent = tracing.parse_traceparent(issued[0].traceparent)
    assert parent is not None and (parent.trace_id, parent.span_id) == (trace_id, use_case.context.span_id)
    assert parent.trace_flags.sampled

    # JAL's record on its feed (the partner-facing cluster) carries the same trace id.
    [record] = [r for r in await jal_records(settings, number) if r.key == number.encode()]
    headers = dict(record.headers)
    assert "traceparent" in headers, sorted(headers)
    carried = tracing.parse_traceparent(headers["traceparent"].decode())
    assert carried is not None and carried.trace_id == trace_id

    # ... whose parent is the gateway's span for the certificate event, itself a child of the use case.
    async def gateway_span_ended() -> bool:
        return any(s.span_id == carried.span_id for s in (x.context for x in spans_of(spans, trace_id)) if s)

    await eventually(gateway_span_ended, timeout=10)
    [consumed] = [s for s in spans_of(spans, trace_id) if s.context and s.context.span_id == carried.span_id]
    assert consumed.kind is SpanKind.CONSUMER and consumed.name == f"process {settings.topic(CERTIFICATES.name)}"
    assert consumed.parent is not None and consumed.parent.span_id == use_case.context.span_id
    assert consumed.attributes is not None
    assert consumed.attributes["cloudevents.event_id"] == str(issued[0].id)
    assert gateway.state.runtime.service == "partner_gateway"


async def test_an_incoming_traceparent_is_continued_and_untraced_requests_carry_none(
    settings: Settings, apps: tuple[httpx.AsyncClient, Any], spans: InMemorySpanExporter
) -> None:
    certification, _ = apps
    caller = "4bf92f3577b34da6a3ce929d0e0e4736"
    response = await certification.get(
        "/v1/applications", params={"municipality": SHIRAHAMA},
        headers={**bearer(settings, "staff", municipality=SHIRAHAMA),
                 "traceparent": f"00-{caller}-00f067aa0ba902b7-01"},
    )
    assert response.status_code == 200, response.text
    [server] = [s for s in spans.get_finished_spans() if s.name == "GET /v1/applications"]
    assert server.context is not None and f"{server.context.trace_id:032x}" == caller
    assert server.parent is not None and server.parent.span_id == 0x00F067AA0BA902B7

    # Without a provider nothing is recorded, and an incoming context still passes through unchanged.
    tracing.use_provider(None)
    try:
        assert tracing.consumer_span(
            f"00-{caller}-00f067aa0ba902b7-01", None, topic="t", partition=0, offset=0, group="g",
            event_id="e", event_type="x",
        ) == (None, tracing.TraceHeaders(f"00-{caller}-00f067aa0ba902b7-01"))
        assert tracing.consumer_span("garbage", None, topic="t", partition=0, offset=0, group="g",
                                     event_id="e", event_type="x") == (None, None)
    finally:
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(spans))
        tracing.use_provider(provider)


# --- The kit alone: consumers' spans and log context, the access log -------------------------------


class Echo(EventData, name="tests.echo", topic=TEST_TOPIC):
    subject: str


async def test_each_event_of_a_set_based_run_continues_its_own_trace_and_the_run_logs_every_id(
    settings: Settings, spans: InMemorySpanExporter
) -> None:
    pool = await asyncpg.create_pool(await fresh_database(settings, "traced"), min_size=1, max_size=2)
    router = EventRouter()
    seen: list[dict[str, Any]] = []

    @router.on_many(Ping)
    async def pings(run: Run[Ping]) -> None:
        seen.append(structlog.contextvars.get_contextvars())
        for _, ping in run:
            await run.emit(ping, TEST_TOPIC, Echo(subject=ping.subject), subject=ping.subject)

    consumer = EventConsumer(
        service="tests", settings=settings, pool=pool, outbox=Outbox("outbox_traced_test"), router=router,
        topics=[TEST_TOPIC], name="tests-traced",
    )
    traces = [f"{uuid.uuid4().hex}", f"{uuid.uuid4().hex}"]
    envelopes = [
        new_envelope("tests", Ping(subject=f"s{i}", sequence=i), subject=f"s{i}", correlation_id=f"corr-{i}",
                     traceparent=f"00-{trace_id}-{i + 1:016x}-01")
        for i, trace_id in enumerate(traces)
    ]
    untraced = new_envelope("tests", Ping(subject="s2", sequence=2), subject="s2", correlation_id="corr-0")
    try:
        await consumer.handle_batch(
            [envelope_record(TEST_TOPIC.name, i, e) for i, e in enumerate([*envelopes, untraced])]
        )
        [context] = seen  # one run, one call: its log context lists every event and correlation id
        assert context["event_ids"] == [str(e.id) for e in [*envelopes, untraced]]
        assert context["correlation_ids"] == ["corr-0", "corr-1"] and context["events"] == 3

        rows = await pool.fetch("SELECT key, traceparent FROM outbox ORDER BY id")
        carried = {bytes(r["key"]).decode(): tracing.parse_traceparent(r["traceparent"]) for r in rows}
        consumed = {s.context.span_id: s for s in spans.get_finished_spans() if s.context is not None}
        for i, trace_id in enumerate(traces):
            echo = carried[f"s{i}"]
            assert echo is not None and f"{echo.trace_id:032x}" == trace_id  # each its own cause's trace
            span = consumed[echo.span_id]
            assert span.kind is SpanKind.CONSUMER and span.parent is not None and span.parent.span_id == i + 1
        root = carried["s2"]  # no trace came in: the event's span starts one
        assert root is not None and consumed[root.span_id].parent is None
    finally:
        await pool.close()


async def test_one_access_line_per_request_with_the_route_template_and_no_personal_data(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi import APIRouter, Depends

    from shared.kit import http as kit_http
    from shared.kit.auth import Principal, current_principal
    from shared.kit.http import create_app

    captured = structlog.testing.CapturingLogger()
    monkeypatch.setattr(kit_http, "log", structlog.wrap_logger(
        captured, processors=[structlog.contextvars.merge_contextvars],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
    ))
    router = APIRouter()

    @router.get("/v1/residents/{resident_id}/things")
    async def things(resident_id: str, principal: Principal = Depends(current_principal)) -> dict[str, str]:
        return {"ok": resident_id}

    app = create_app(service="registration", settings=settings, routers=[router])
    async with service_client(app) as client:
        ok = await client.get("/v1/residents/res-secret-1/things", params={"email": "taro@example.jp"},
                        headers={**bearer(settings, "resident", "res-secret-1"), "x-request-id": "req-1"})
        missing = await client.get("/v1/nowhere/res-secret-2")
        await client.get("/healthz")
    assert ok.status_code == 200 and missing.status_code == 404
    lines = [c.kwargs for c in captured.calls if c.kwargs.get("event") == "request"]
    info = [c.kwargs for c in captured.calls if c.kwargs.get("event") == "request" and c.method_name == "info"]
    assert len(lines) == 3 and len(info) == 2  # the probe's line is DEBUG
    first, second = info
    assert first["method"] == "GET" and first["route"] == "/v1/residents/{resident_id}/things"
    assert first["status"] == 200 and first["principal_kind"] == "resident" and first["request_id"] == "req-1"
    assert isinstance(first["duration_ms"], float) and first["duration_ms"] >= 0
    assert (second["route"], second["status"], second["principal_kind"]) == ("unmatched", 404, "none")
    text = repr(lines)
    assert "res-secret" not in text and "taro@example.jp" not in text and "email" not in text
