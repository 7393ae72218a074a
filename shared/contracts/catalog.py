"""JSON Schema per event type and an AsyncAPI 3.0 document per service, generated from the models.

``nichiiki contracts`` writes them under ``docs/contracts/``; a test keeps the committed copies
equal to what the models generate, so the published contracts never drift from the code, and
another (``compatibility.py``) fails when a published event version changes in a breaking way.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path
from typing import Any

import shared.contracts
from shared.contracts.base import EVENT_MODELS, EventData
from shared.contracts.topics import CORE_TOPICS, PARTNER_FEED, PARTNER_TRIPS, SERVICES, Topic
from shared.reference import travel_programs


def load_all_contracts() -> dict[str, type[EventData]]:
    """Import every contract module so that every event model is registered."""
    for module in pkgutil.iter_modules(shared.contracts.__path__):
        if module.name not in {"base", "catalog", "compatibility", "topics"}:
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


#: Event versions no longer published. Their schema files stay in ``docs/contracts/schemas/`` as the
#: record of what was promised; the compatibility test accepts their models being gone. Event type →
#: why and since when, e.g. ``"jp.nichiiki.x.y.v1": "replaced by v2 on 2025-04-01; no producer sends it"``.
RETIRED_EVENT_TYPES: dict[str, str] = {
    "jp.nichiiki.partner.trip.reported.v1": "replaced by v2 on each partner's own partner.<code>.trips.v1 "
    "(2026-12): the shared partner.redemptions.v1 is gone, so a partner can no longer report as another",
    **{
        f"jp.nichiiki.{name}.v1": "replaced by v2 (2026-12, crypto-shredding): personal data (contact, member "
        "numbers) travels sealed with the resident's data key, unreadable in every copy once they are erased"
        for name in (
            "registration.resident.registered", "registration.contact_changed",
            "certification.application.submitted", "certification.certificate.issued",
            "certification.certificate.renewed", "certification.certificate.revoked",
            "certification.certificate.expiring", "certification.certificate.expired",
            "subsidy.grant.issued", "partner.certificate", "partner.grant",
        )
    },
    "jp.nichiiki.registration.resident.registered.v2": "replaced by v3 (2026-12, issue #22): a municipal "
    "registration and the prefecture registration it brings are one event (`derived_prefecture_registration_id`), "
    "not two; no producer sends v2, and no deployment's log holds it (the platform is not yet in service)",
    "jp.nichiiki.donation.receipt.issued.v1": "replaced by `receipt_number` on donation.donation.received.v1 "
    "(2026-12, issue #22): a money donation and its receipt are recorded in one act, so they are one event, not "
    "two; no producer sends it, and no deployment's log holds it (the platform is not yet in service)",
    "jp.nichiiki.subsidy.budget.changed.v1": "replaced by v2 (2026-12, privacy): `reason` is a BudgetChangeReason "
    "code; v1 carried a staff member's own words of a top-up, which now stay in the subsidy service's ledger",
}

#: The AsyncAPI addresses of the partner topics: one of each per partner, on the edge cluster.
PARTNER_FEED_ADDRESS = "partner.{partner}.v1"
PARTNER_FEED_CHANNEL = "partner_feed_v1"
PARTNER_TRIPS_ADDRESS = "partner.{partner}.trips.v1"
PARTNER_TRIPS_CHANNEL = "partner_trips_v1"
_PARAMETERISED = {PARTNER_FEED.name: (PARTNER_FEED_ADDRESS, PARTNER_FEED_CHANNEL),
                  PARTNER_TRIPS.name: (PARTNER_TRIPS_ADDRESS, PARTNER_TRIPS_CHANNEL)}

_INTERNAL_SERVER = "internal"
_PARTNER_SERVER = "partners"
_SERVERS: dict[str, Any] = {
    _INTERNAL_SERVER: {
        "host": "{bootstrap}",
        "protocol": "kafka-secure",
        "title": "The platform's Kafka cluster",
        "description": "Where the services publish and consume every event; partners are never given it. "
        "Deployed with SASL_SSL and SCRAM-SHA-512, a user per service and ACLs generated from the topic registry "
        "(docker-compose.yml); the local embedded stack (`./nichiiki start`, Tansu) and the tests listen in "
        "plaintext without authentication, isolated by design.",
        "variables": {
            "bootstrap": {
                "description": "Bootstrap servers (`NICHIIKI_KAFKA_BOOTSTRAP`).",
                "default": "kafka:9092",
                "examples": ["kafka:9092", "127.0.0.1:19092"],
            },
        },
        "security": [{"$ref": "#/components/securitySchemes/scramSha512"}],
    },
    _PARTNER_SERVER: {
        "host": "{host}",
        "protocol": "kafka-secure",
        "title": "The partner-facing cluster (the edge)",
        "description": "What airlines, railways and ferries connect to (`NICHIIKI_PARTNER_KAFKA_BOOTSTRAP`): it "
        "holds only partner topics. Each partner reads its own feed (`partner.{partner}.v1`) and writes its own "
        "trips (`partner.{partner}.trips.v1`), nothing else. Deployed with SASL_SSL and SCRAM-SHA-512, a "
        "credential and ACLs per partner; on the local stack a second embedded broker in plaintext.",
        "variables": {
            "host": {"description": "The partner-facing bootstrap address, given to each partner at onboarding.",
                     "examples": ["kafka-edge:9092", "127.0.0.1:19093"]},
        },
        "security": [{"$ref": "#/components/securitySchemes/partnerScramSha512"}],
    },
}
_SECURITY_SCHEMES: dict[str, Any] = {
    "scramSha512": {
        "type": "scramSha512",
        "description": "SASL/SCRAM-SHA-512 over TLS (Kafka `security.protocol=SASL_SSL`).",
    },
    "partnerScramSha512": {
        "type": "scramSha512",
        "description": "SASL/SCRAM-SHA-512 over TLS (Kafka `security.protocol=SASL_SSL`), the partner's own "
        "credential: a partner reads its own feed only.",
    },
}


def partner_codes() -> list[str]:
    """The partners of the travel programs reference data, in the order listed (``jal``, ``ana``, …)."""
    return list(dict.fromkeys(program.partner_code for program in travel_programs()))


def _channel(topic: Topic, models: list[type[EventData]]) -> tuple[str, dict[str, Any]]:
    description = f"{topic.description} Key: {topic.key}. Partitions: {topic.partitions}." + (
        " Compacted." if topic.compacted else ""
    )
    channel: dict[str, Any] = {
        "address": topic.name,
        "description": description,
        "messages": {m.__name__: {"$ref": f"#/components/messages/{m.__name__}"} for m in models},
        "servers": [{"$ref": f"#/servers/{_PARTNER_SERVER if topic.cluster == 'edge' else _INTERNAL_SERVER}"}],
    }
    if topic.name in _PARAMETERISED:  # topics.py names the shape ``partner.<partner>…``; AsyncAPI has parameters
        channel["address"] = _PARAMETERISED[topic.name][0]
        channel["parameters"] = {
            "partner": {
                "description": "The partner's code (lower-case letters and digits): one topic per partner.",
                "enum": partner_codes(),
            },
        }
        return _PARAMETERISED[topic.name][1], channel
    return topic.name.replace(".", "_"), channel


def _payload_components(model: type[EventData], schemas: dict[str, Any]) -> dict[str, Any]:
    """The model's schema as components: its nested models move from ``$defs`` to components/schemas.

    Embedded in an AsyncAPI document, ``#/$defs/...`` would point at the document's root, where there
    are no ``$defs``; and ``$id`` would make the references resolve against another document.
    """
    schema = json_schema(model)
    del schema["$id"]
    definitions: dict[str, Any] = schema.pop("$defs", {})
    as_is = {name: name for name in definitions}
    names: dict[str, str] = {}
    for name, definition in definitions.items():
        # Models share nested models (PartnerMembership); a different one of the same name gets its own.
        same = schemas.get(name, _rewrite_refs(definition, as_is)) == _rewrite_refs(definition, as_is)
        names[name] = name if same else f"{model.__name__}.{name}"
    rewritten: dict[str, Any] = _rewrite_refs(schema, names)
    for name, definition in definitions.items():
        schemas[names[name]] = _rewrite_refs(definition, names)
    return rewritten


def _rewrite_refs(node: Any, names: dict[str, str]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            node = {**node, "$ref": f"#/components/schemas/{names[ref.removeprefix('#/$defs/')]}"}
        return {k: (v if k == "$ref" else _rewrite_refs(v, names)) for k, v in node.items()}
    if isinstance(node, list):
        return [_rewrite_refs(item, names) for item in node]
    return node


def asyncapi(service: str) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of one service: the channels it sends to and receives from."""
    if service not in SERVICES:
        raise KeyError(service)
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    for topic in (*CORE_TOPICS, PARTNER_FEED, PARTNER_TRIPS):  # one parameterised channel per partner topic kind
        sends = service in topic.producers
        receives = service in topic.consumers
        if not (sends or receives):
            continue
        models = events_on(topic)
        channel_id, channels[channel_id] = _channel(topic, models)
        for model in models:
            schemas[model.__name__] = _payload_components(model, schemas)
            messages[model.__name__] = {
                "name": model.event_type,
                "title": model.__name__,
                "contentType": "application/json",
                "headers": _CLOUDEVENTS_HEADERS,
                "payload": {"$ref": f"#/components/schemas/{model.__name__}"},
            }
        if sends:
            operations[f"send_{channel_id}"] = {"action": "send", "channel": {"$ref": f"#/channels/{channel_id}"}}
        if receives:
            operations[f"receive_{channel_id}"] = {
                "action": "receive", "channel": {"$ref": f"#/channels/{channel_id}"},
            }
    used = {ref["$ref"].removeprefix("#/servers/") for c in channels.values() for ref in c["servers"]}
    servers = {name: server for name, server in _SERVERS.items() if name in used}
    security = {
        ref["$ref"].removeprefix("#/components/securitySchemes/") for s in servers.values() for ref in s["security"]
    }
    return {
        "asyncapi": "3.0.0",
        "info": {"title": f"Nichiiki {service}", "version": "1.0.0"},
        "defaultContentType": "application/json",
        "servers": servers,
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": messages,
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": {name: s for name, s in _SECURITY_SCHEMES.items() if name in security},
        },
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
        document = asyncapi(service)
        if document["channels"]:  # a service without events (identity) has no AsyncAPI document
            files[f"asyncapi/{service}.json"] = _dump(document)
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
