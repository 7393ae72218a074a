"""JSON Schema per event type and an AsyncAPI 3.0 document per service, generated from the models.

``nichiiki contracts`` writes them under ``docs/contracts/``; a test keeps the committed copies
equal to what the models generate, so the published contracts never drift from the code.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path
from typing import Any

import shared.contracts
from shared.contracts.base import EVENT_MODELS, EventData
from shared.contracts.topics import CORE_TOPICS, PARTNER_FEED, SERVICES, Topic


def load_all_contracts() -> dict[str, type[EventData]]:
    """Import every contract module so that every event model is registered."""
    for module in pkgutil.iter_modules(shared.contracts.__path__):
        if module.name not in {"base", "catalog", "topics"}:
            importlib.import_module(f"shared.contracts.{module.name}")
    # Only the published contracts: tests define event models of their own.
    return {t: m for t, m in sorted(EVENT_MODELS.items()) if m.__module__.startswith("shared.contracts.")}


def json_schema(model: type[EventData]) -> dict[str, Any]:
    schema = model.model_json_schema()
    schema["$id"] = f"https://nichiiki.jp/schemas/{model.event_type}.json"
    schema["x-cloudevents-type"] = model.event_type
    schema["x-topic"] = model.event_topic
    return schema


def events_on(topic: Topic) -> list[type[EventData]]:
    return [m for m in load_all_contracts().values() if m.event_topic == topic.name]


def asyncapi(service: str) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of one service: the channels it sends to and receives from."""
    if service not in SERVICES:
        raise KeyError(service)
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for topic in (*CORE_TOPICS, PARTNER_FEED):  # one channel stands for every partner's feed
        sends = topic.producer == service
        receives = service in topic.consumers
        if not (sends or receives):
            continue
        models = events_on(topic)
        channel_id = topic.name.replace(".", "_")
        channels[channel_id] = {
            "address": topic.name,
            "description": f"{topic.description} Key: {topic.key}. Partitions: {topic.partitions}."
            + (" Compacted." if topic.compacted else ""),
            "messages": {m.__name__: {"$ref": f"#/components/messages/{m.__name__}"} for m in models},
        }
        for model in models:
            messages[model.__name__] = {
                "name": model.event_type,
                "title": model.__name__,
                "contentType": "application/json",
                "headers": _CLOUDEVENTS_HEADERS,
                "payload": json_schema(model),
            }
        if sends:
            operations[f"send_{channel_id}"] = {"action": "send", "channel": {"$ref": f"#/channels/{channel_id}"}}
        if receives:
            operations[f"receive_{channel_id}"] = {
                "action": "receive", "channel": {"$ref": f"#/channels/{channel_id}"},
            }
    return {
        "asyncapi": "3.0.0",
        "info": {"title": f"Nichiiki {service}", "version": "1.0.0"},
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }


_CLOUDEVENTS_HEADERS: dict[str, Any] = {
    "type": "object",
    "description": "CloudEvents 1.0, Kafka protocol binding, binary content mode",
    "required": ["ce_specversion", "ce_id", "ce_source", "ce_type", "ce_time", "ce_subject"],
    "properties": {
        "ce_specversion": {"const": "1.0"},
        "ce_id": {"type": "string", "format": "uuid", "description": "unique per event; the idempotency key"},
        "ce_source": {"type": "string", "examples": ["/nichiiki/certification"]},
        "ce_type": {"type": "string"},
        "ce_time": {"type": "string", "format": "date-time"},
        "ce_subject": {"type": "string", "description": "the aggregate id"},
        "ce_correlationid": {"type": "string"},
        "ce_causationid": {"type": "string"},
    },
}


def render_documents() -> dict[str, str]:
    """Relative path → file text, for every generated contract document."""
    files: dict[str, str] = {}
    for event_type, model in load_all_contracts().items():
        files[f"schemas/{event_type}.json"] = _dump(json_schema(model))
    for service in SERVICES:
        files[f"asyncapi/{service}.json"] = _dump(asyncapi(service))
    return files


def write_documents(folder: Path) -> list[Path]:
    written: list[Path] = []
    for relative, text in render_documents().items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def _dump(document: dict[str, Any]) -> str:
    return json.dumps(document, ensure_ascii=False, indent=2, sort_keys=True) + "\n"
