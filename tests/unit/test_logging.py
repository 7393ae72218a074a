from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from shared.kit import logging as kit_logging
from shared.kit.logging import bound_context, configure_logging


@pytest.fixture
def json_lines(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    monkeypatch.setattr(kit_logging, "_configured_for", None)
    configure_logging("certification", fmt="json", level="INFO")
    yield stream
    kit_logging._configured_for = None
    configure_logging("tests", fmt="console", level="WARNING")
    structlog.reset_defaults()


def test_json_lines_carry_service_and_the_bound_event_context(json_lines: io.StringIO) -> None:
    log = structlog.get_logger("test")
    with bound_context(event_id="e-1", correlation_id="c-1"):
        log.info("certificate issued", certificate_number="NCH-304018-2026-000001")
    log.info("outside")
    first, second = (json.loads(line) for line in json_lines.getvalue().splitlines())
    assert first["service"] == "certification"
    assert first["event_id"] == "e-1" and first["correlation_id"] == "c-1"
    assert first["certificate_number"] == "NCH-304018-2026-000001"
    assert first["level"] == "info" and first["event"] == "certificate issued" and "timestamp" in first
    assert "event_id" not in second  # context ends with the block


def test_stdlib_loggers_go_through_the_same_pipeline(json_lines: io.StringIO) -> None:
    with bound_context(request_id="r-9"):
        logging.getLogger("uvicorn.error").warning("port busy")
    line = json.loads(json_lines.getvalue().splitlines()[-1])
    assert line["event"] == "port busy" and line["request_id"] == "r-9" and line["service"] == "certification"


def test_a_served_worker_process_logs_as_configured(json_lines: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    """``serve`` with several workers spawns processes that run no ``__main__``: the app factory
    they call sets up logging as the settings say (before, they logged at DEBUG in console format)."""
    from fastapi import FastAPI

    from shared.kit import service
    from shared.kit.settings import get_settings

    monkeypatch.setenv("NICHIIKI_SERVED_SERVICE", "registration")
    monkeypatch.setenv("NICHIIKI_LOG_FORMAT", "json")
    monkeypatch.setenv("NICHIIKI_LOG_LEVEL", "WARNING")
    monkeypatch.setenv("NICHIIKI_PG_DSN", "postgresql://nobody@127.0.0.1:1/none")  # the app only names it
    monkeypatch.setattr(kit_logging, "_configured_for", None)  # a fresh process: nothing set up yet
    structlog.reset_defaults()
    get_settings.cache_clear()
    try:
        app = service._served_app()
    finally:
        get_settings.cache_clear()

    assert isinstance(app, FastAPI)
    assert kit_logging._configured_for == ("registration", "json", "WARNING")
    assert logging.getLogger().level == logging.WARNING
    assert not structlog.get_logger("test").is_enabled_for(logging.INFO)
