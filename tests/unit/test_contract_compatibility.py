"""Published event versions stay compatible; the AsyncAPI documents are valid AsyncAPI 3.0.

The baseline is what was published: the schema files in docs/contracts/schemas/ and, when this is a
git checkout, the same files in the last commit (so regenerating the files over a breaking change
does not hide it).
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest

from shared.contracts.catalog import RETIRED_EVENT_TYPES, asyncapi, json_schema, load_all_contracts
from shared.contracts.compatibility import BreakingChange, breaking_changes, compatibility_problems
from shared.contracts.topics import PARTNER_CODES, SERVICES

SCHEMAS = Path("docs/contracts/schemas")
ASYNCAPI = Path("docs/contracts/asyncapi")
ASYNCAPI_3_SCHEMA = Path(__file__).resolve().parents[2] / "shared/contracts/vendor/asyncapi/3.0.0.json"
EVENT = "jp.nichiiki.test.thing.happened.v1"


def event(properties: dict[str, Any], required: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "title": "ThingHappened",
        "properties": properties,
        "required": required,
        "x-topic": "test.things.v1",
        **extra,
    }


STRING = {"type": "string"}
OPTIONAL_STRING = {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None}


def membership(partner: dict[str, Any], *, name: str = "PartnerMembership") -> dict[str, Any]:
    """An event with a list of nested models, as pydantic writes it ($defs and $ref)."""
    return event(
        {"partners": {"type": "array", "items": {"$ref": f"#/$defs/{name}"}, "default": []}},
        [],
        **{
            "$defs": {
                name: {
                    "type": "object",
                    "properties": {"partner": partner, "member_number": OPTIONAL_STRING},
                    "required": ["partner"],
                    "title": name,
                }
            }
        },
    )


BREAKING: list[tuple[str, dict[str, Any], dict[str, Any], str, str]] = [
    ("removed field", event({"a": STRING, "b": STRING}, ["a", "b"]), event({"a": STRING}, ["a"]), "b", "removed"),
    (
        "removed optional field",
        event({"a": STRING, "b": OPTIONAL_STRING}, ["a"]),
        event({"a": STRING}, ["a"]),
        "b",
        "removed",
    ),
    (
        "retyped field",
        event({"a": STRING}, ["a"]),
        event({"a": {"type": "integer"}}, ["a"]),
        "a",
        "type changed from string to integer",
    ),
    (
        "field may now be null",
        event({"a": STRING}, ["a"]),
        event({"a": OPTIONAL_STRING}, ["a"]),
        "a",
        "type changed from string to null | string",
    ),
    (
        "changed format",
        event({"at": {"type": "string", "format": "date-time"}}, ["at"]),
        event({"at": {"type": "string", "format": "date"}}, ["at"]),
        "at",
        "format changed from date-time to date",
    ),
    (
        "newly required field",
        event({"a": STRING}, ["a"]),
        event({"a": STRING, "b": STRING}, ["a", "b"]),
        "b",
        "added as a required field",
    ),
    (
        "optional field made required",
        event({"a": STRING, "b": OPTIONAL_STRING}, ["a"]),
        event({"a": STRING, "b": OPTIONAL_STRING}, ["a", "b"]),
        "b",
        "now required",
    ),
    ("required field made optional", event({"a": STRING}, ["a"]), event({"a": STRING}, []), "a", "no longer required"),
    (
        "narrowed enum",
        event({"s": {"type": "string", "enum": ["valid", "revoked", "expired"]}}, ["s"]),
        event({"s": {"type": "string", "enum": ["valid", "revoked"]}}, ["s"]),
        "s",
        "enum values removed: ['expired']",
    ),
    (
        "narrowed const",
        event({"s": {"enum": ["a", "b"]}}, ["s"]),
        event({"s": {"const": "a"}}, ["s"]),
        "s",
        "enum values removed: ['b']",
    ),
    (
        "free text restricted to values",
        event({"s": STRING}, ["s"]),
        event({"s": {"type": "string", "enum": ["a"]}}, ["s"]),
        "s",
        "now restricted to the values ['a']",
    ),
    (
        "lowered maxLength",
        event({"a": {"type": "string", "maxLength": 100}}, ["a"]),
        event({"a": {"type": "string", "maxLength": 50}}, ["a"]),
        "a",
        "maxLength tightened from 100 to 50",
    ),
    (
        "new maxLength",
        event({"a": STRING}, ["a"]),
        event({"a": {"type": "string", "maxLength": 50}}, ["a"]),
        "a",
        "maxLength tightened from none to 50",
    ),
    (
        "raised minimum",
        event({"n": {"type": "integer", "minimum": 0}}, ["n"]),
        event({"n": {"type": "integer", "minimum": 1}}, ["n"]),
        "n",
        "minimum tightened from 0 to 1",
    ),
    (
        "lowered maxItems",
        event({"l": {"type": "array", "items": STRING, "maxItems": 5}}, ["l"]),
        event({"l": {"type": "array", "items": STRING, "maxItems": 4}}, ["l"]),
        "l",
        "maxItems tightened from 5 to 4",
    ),
    (
        "changed pattern",
        event({"c": {"type": "string", "pattern": "^[0-9]{6}$"}}, ["c"]),
        event({"c": {"type": "string", "pattern": "^[0-9]{5}$"}}, ["c"]),
        "c",
        "pattern changed from",
    ),
    (
        "new pattern",
        event({"c": STRING}, ["c"]),
        event({"c": {"type": "string", "pattern": "^x$"}}, ["c"]),
        "c",
        "pattern changed to '^x$'",
    ),
    (
        "retyped array items",
        event({"l": {"type": "array", "items": STRING}}, ["l"]),
        event({"l": {"type": "array", "items": {"type": "integer"}}}, ["l"]),
        "l[]",
        "type changed from string to integer",
    ),
    (
        "narrowed enum in a nested model",
        membership({"type": "string", "enum": ["jal", "ana"]}),
        membership({"type": "string", "enum": ["jal"]}),
        "partners[].partner",
        "enum values removed: ['ana']",
    ),
    (
        "retyped field in a nested model",
        membership(STRING),
        membership({"type": "integer"}),
        "partners[].partner",
        "type changed from string to integer",
    ),
    (
        "no longer accepts unknown fields",
        event({"a": STRING}, ["a"]),
        event({"a": STRING}, ["a"], additionalProperties=False),
        "",
        "no longer accepts fields it does not list",
    ),
    (
        "moved to another topic",
        event({"a": STRING}, ["a"]),
        event({"a": STRING}, ["a"], **{"x-topic": "other.v1"}),
        "",
        "moved from topic test.things.v1 to other.v1",
    ),
    (
        "a keyword the comparison does not know",
        event({"a": STRING}, ["a"]),
        event({"a": {"type": "string", "not": {"const": "x"}}}, ["a"]),
        "a",
        "not changed",
    ),
]

COMPATIBLE: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("new optional field", event({"a": STRING}, ["a"]), event({"a": STRING, "b": OPTIONAL_STRING}, ["a"])),
    (
        "widened enum",
        event({"s": {"type": "string", "enum": ["valid"]}}, ["s"]),
        event({"s": {"type": "string", "enum": ["valid", "revoked"]}}, ["s"]),
    ),
    (
        "widened enum in a nested model",
        membership({"type": "string", "enum": ["jal"]}),
        membership({"type": "string", "enum": ["jal", "ana"]}),
    ),
    (
        "raised maxLength",
        event({"a": {"type": "string", "maxLength": 50}}, ["a"]),
        event({"a": {"type": "string", "maxLength": 100}}, ["a"]),
    ),
    (
        "dropped maxLength and minimum",
        event({"a": {"type": "string", "maxLength": 50}, "n": {"type": "integer", "minimum": 1}}, ["a", "n"]),
        event({"a": STRING, "n": {"type": "integer"}}, ["a", "n"]),
    ),
    ("dropped pattern", event({"c": {"type": "string", "pattern": "^x$"}}, ["c"]), event({"c": STRING}, ["c"])),
    (
        "new description, title, examples and default",
        event({"a": STRING, "b": OPTIONAL_STRING}, ["a"]),
        event(
            {
                "a": {"type": "string", "title": "A", "description": "the a", "examples": ["x"]},
                "b": {**OPTIONAL_STRING, "default": "n/a"},
            },
            ["a"],
            description="Something happened.",
        ),
    ),
    ("renamed nested model", membership(STRING), membership(STRING, name="Membership")),
]


@pytest.mark.parametrize(
    ("old", "new", "field", "change"), [case[1:] for case in BREAKING], ids=[case[0] for case in BREAKING]
)
def test_each_kind_of_breaking_change_is_caught(
    old: dict[str, Any], new: dict[str, Any], field: str, change: str
) -> None:
    changes = breaking_changes(EVENT, old, new)
    assert any(c.field == field and change in c.change for c in changes), changes


@pytest.mark.parametrize(("old", "new"), [case[1:] for case in COMPATIBLE], ids=[case[0] for case in COMPATIBLE])
def test_compatible_changes_pass(old: dict[str, Any], new: dict[str, Any]) -> None:
    assert breaking_changes(EVENT, old, new) == []


def test_a_recursive_model_is_compared_without_looping() -> None:
    def tree(leaf: dict[str, Any]) -> dict[str, Any]:
        node = {
            "type": "object",
            "properties": {"leaf": leaf, "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}}},
        }
        return event({"root": {"$ref": "#/$defs/Node"}}, ["root"], **{"$defs": {"Node": node}})

    assert breaking_changes(EVENT, tree(STRING), tree(STRING)) == []
    assert [c.field for c in breaking_changes(EVENT, tree(STRING), tree({"type": "integer"}))] == ["root.leaf"]


def test_the_message_names_the_event_the_field_the_change_and_the_way_out() -> None:
    message = str(BreakingChange(EVENT, "partners[].partner", "enum values removed: ['ana']"))
    assert EVENT in message and "'partners[].partner'" in message and "enum values removed: ['ana']" in message
    assert "publish a new version (jp.nichiiki.test.thing.happened.v2)" in message


def test_a_published_version_must_still_be_published_or_be_retired() -> None:
    v1 = event({"a": STRING}, ["a"])
    v2 = event({"a": {"type": "integer"}}, ["a"])  # the breaking change, as a new version
    v2_type = EVENT.removesuffix("v1") + "v2"
    assert compatibility_problems({EVENT: v1}, {EVENT: v1, v2_type: v2}) == []  # both published
    [gone] = compatibility_problems({EVENT: v1}, {v2_type: v2})
    assert gone.startswith(EVENT) and "no model publishes it" in gone and "RETIRED_EVENT_TYPES" in gone
    assert compatibility_problems({EVENT: v1}, {v2_type: v2}, retired={EVENT}) == []
    [again] = compatibility_problems({EVENT: v1}, {EVENT: v1}, retired={EVENT})
    assert "is retired but a model publishes it again" in again
    [changed] = compatibility_problems({EVENT: v1}, {EVENT: v2})
    assert "field 'a': type changed from string to integer" in changed and "publish a new version" in changed


def _committed_schemas(folder: Path) -> dict[str, dict[str, Any]]:
    return {p.name.removesuffix(".json"): json.loads(p.read_text(encoding="utf-8")) for p in folder.glob("*.json")}


def _schemas_at_head(repo_root: Path) -> dict[str, dict[str, Any]] | None:
    """The schema files as of the last commit, or None outside a git checkout."""
    git = shutil.which("git")
    if git is None:
        return None
    listing = subprocess.run(
        [git, "-C", str(repo_root), "ls-tree", "-r", "--name-only", "HEAD", "--", str(SCHEMAS)],
        capture_output=True,
        text=True,
        check=False,
    )
    if listing.returncode != 0:
        return None
    paths = listing.stdout.split()
    if not paths:
        return {}
    batch = subprocess.run(
        [git, "-C", str(repo_root), "cat-file", "--batch"],
        check=True,
        capture_output=True,
        input="".join(f"HEAD:{path}\n" for path in paths).encode(),
    )
    schemas: dict[str, dict[str, Any]] = {}
    output, position = batch.stdout, 0
    for path in paths:  # each object: "<sha> blob <size>\n<content>\n"
        header_end = output.index(b"\n", position)
        size = int(output[position:header_end].split()[2])
        content = output[header_end + 1 : header_end + 1 + size]
        schemas[Path(path).name.removesuffix(".json")] = json.loads(content)
        position = header_end + 1 + size + 1
    return schemas


def test_every_published_event_version_stays_compatible(repo_root: Path) -> None:
    current = {event_type: json_schema(model) for event_type, model in load_all_contracts().items()}
    baselines = {"docs/contracts/schemas": _committed_schemas(repo_root / SCHEMAS)}
    at_head = _schemas_at_head(repo_root)
    if at_head is not None:
        baselines["the last commit"] = at_head
    assert len(baselines["docs/contracts/schemas"]) >= 30  # the baseline really was read
    problems = [
        f"(against {name}) {problem}"
        for name, published in baselines.items()
        for problem in compatibility_problems(published, current, RETIRED_EVENT_TYPES)
    ]
    assert problems == [], "\n".join(problems)


def test_a_retired_version_keeps_its_schema_file_as_the_record(repo_root: Path) -> None:
    for event_type in RETIRED_EVENT_TYPES:
        assert (repo_root / SCHEMAS / f"{event_type}.json").is_file(), f"keep the schema of retired {event_type}"


def test_the_committed_schemas_are_valid_json_schema(repo_root: Path) -> None:
    schemas = _committed_schemas(repo_root / SCHEMAS)
    for event_type, schema in schemas.items():
        jsonschema.Draft202012Validator.check_schema(schema)
        assert unresolvable_refs(schema) == [], event_type


# AsyncAPI -----------------------------------------------------------------------------------------


def asyncapi_validator() -> Any:
    """The official AsyncAPI 3.0.0 schema (npm @asyncapi/specs 6.11.1, vendored): validates offline.

    Its references are to definitions it embeds (by ``$id``); nothing is fetched.
    """
    schema = json.loads(ASYNCAPI_3_SCHEMA.read_text(encoding="utf-8"))
    return jsonschema.Draft7Validator(schema)


#: The services that send or receive events (identity has none, and so no AsyncAPI document).
EVENTFUL = [service for service in SERVICES if asyncapi(service)["channels"]]


def committed_asyncapi(repo_root: Path) -> dict[str, dict[str, Any]]:
    return {
        service: json.loads((repo_root / ASYNCAPI / f"{service}.json").read_text(encoding="utf-8"))
        for service in EVENTFUL
    }


def json_refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from json_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from json_refs(item)


def unresolvable_refs(document: dict[str, Any]) -> list[str]:
    """Every ``$ref`` of the document that is not a JSON pointer to something inside it."""
    broken: list[str] = []
    for ref in json_refs(document):
        target: Any = document
        try:
            if not ref.startswith("#/"):
                raise KeyError(ref)
            for part in ref[2:].split("/"):
                target = target[part.replace("~1", "/").replace("~0", "~")]
        except (KeyError, TypeError):
            broken.append(ref)
    return broken


def test_asyncapi_documents_are_valid_asyncapi_3(repo_root: Path) -> None:
    validator = asyncapi_validator()
    for service, document in committed_asyncapi(repo_root).items():
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]
        assert errors == [], f"{service}: " + "\n".join(errors)
    broken = copy.deepcopy(document)
    next(iter(broken["operations"].values()))["action"] = "publish"  # AsyncAPI 2's word: not valid in 3.0
    assert list(validator.iter_errors(broken)), "the validator accepts anything"


def test_every_ref_in_the_asyncapi_documents_resolves(repo_root: Path) -> None:
    for service, document in committed_asyncapi(repo_root).items():
        # each message is referred to at least from its channel and from its operation
        messages = len(document["components"]["messages"])
        assert messages > 0 and sum(1 for _ in json_refs(document)) >= 2 * messages, service
        assert unresolvable_refs(document) == [], service
    # the shape these documents had before: a payload's nested models pointing at the document's root
    embedded = {
        "components": {
            "messages": {
                "M": {"payload": {"items": {"$ref": "#/$defs/PartnerMembership"}, "$defs": {"PartnerMembership": {}}}}
            }
        }
    }
    assert unresolvable_refs(embedded) == ["#/$defs/PartnerMembership"]


def test_the_partner_feed_is_one_channel_with_a_partner_parameter() -> None:
    document = asyncapi("partner_gateway")
    feeds = [c for c in document["channels"].values() if c["address"].startswith("partner.")]
    # one channel per kind of partner topic: its feed, and the trips it writes
    assert [c["address"] for c in feeds] == ["partner.{partner}.v1", "partner.{partner}.trips.v1"]
    for channel in feeds:
        assert channel["parameters"]["partner"]["enum"] == list(PARTNER_CODES)  # the topics that are created
        assert [s["$ref"] for s in channel["servers"]] == ["#/servers/partners"]  # the edge only
    assert {"PartnerCertificate", "PartnerGrant", "PartnerWithdrawal"} <= set(feeds[0]["messages"])
    assert set(feeds[1]["messages"]) == {"TripReported"}


def test_servers_say_where_and_how_to_connect() -> None:
    for service in EVENTFUL:
        document = asyncapi(service)
        internal = document["servers"]["internal"]
        assert internal["protocol"] == "kafka-secure" and "plaintext" in internal["description"]
        for server in document["servers"].values():
            for requirement in server["security"]:
                scheme = document["components"]["securitySchemes"][requirement["$ref"].rsplit("/", 1)[1]]
                assert scheme["type"] == "scramSha512" and "SASL_SSL" in scheme["description"]
    # the partner-facing cluster is in the gateway's document only: it is the one service on both
    assert "partners" in asyncapi("partner_gateway")["servers"]
    assert [s for s in SERVICES if s != "partner_gateway" and "partners" in asyncapi(s)["servers"]] == []
