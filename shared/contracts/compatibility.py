"""Whether an event version's new JSON Schema still keeps the promise of the published one.

An event type (``….v<N>``) is a promise to every consumer, including ones that replay a topic
from the beginning (compacted partner feeds, projections rebuilt by a new consumer group). Within
a version only compatible changes are allowed:

- allowed: a new optional field, new enum values, a removed or loosened constraint on a value
  (a higher ``maxLength``, a dropped ``pattern``), new descriptions, titles, examples, defaults;
- breaking: a removed field, a field that is no longer required (consumers rely on it), a newly
  required field (events already on the topic lack it), a changed type (``null`` newly allowed
  included) or format, removed enum values, a new or tightened constraint (a lower ``maxLength``,
  a higher ``minimum``, a changed ``pattern``), a move to another topic.

A breaking change is a new model with the next version; the old version keeps its model (and
schema) for as long as it is published, or is retired explicitly (``catalog.RETIRED_EVENT_TYPES``).
Keywords this module does not know are compared for equality: any change to them is reported.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

Schema = Mapping[str, Any]

#: Keywords that describe a value without constraining it: changing them breaks nobody.
_ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "examples",
        "default",
        "$comment",
        "deprecated",
        "readOnly",
        "writeOnly",
        "$id",
        "$schema",
        "$defs",
        "definitions",
        "discriminator",
    }
)
_UPPER_BOUNDS = ("maxLength", "maxItems", "maxProperties", "maximum", "exclusiveMaximum")
_LOWER_BOUNDS = ("minLength", "minItems", "minProperties", "minimum", "exclusiveMinimum")
#: Keywords compared by the rules below rather than for plain equality.
_COMPARED = frozenset(
    {
        "type",
        "anyOf",
        "oneOf",
        "enum",
        "const",
        "format",
        "pattern",
        "multipleOf",
        "uniqueItems",
        "properties",
        "required",
        "additionalProperties",
        "items",
        *_UPPER_BOUNDS,
        *_LOWER_BOUNDS,
    }
)
_VERSION = re.compile(r"\.v(\d+)$")


def next_version(event_type: str) -> str:
    """``jp.nichiiki.x.y.v1`` → ``jp.nichiiki.x.y.v2``."""
    match = _VERSION.search(event_type)
    if match is None:
        return event_type + ".v2"
    return event_type[: match.start()] + f".v{int(match.group(1)) + 1}"


@dataclass(frozen=True, slots=True)
class BreakingChange:
    event_type: str
    field: str
    """Dotted path of the field (``partners[].partner``); empty for the event itself."""
    change: str

    def __str__(self) -> str:
        where = f"field {self.field!r}" if self.field else "the event"
        return (
            f"{self.event_type}: {where}: {self.change}. This breaks consumers of the published version: "
            f"publish a new version ({next_version(self.event_type)}) instead of changing this one"
        )


def breaking_changes(event_type: str, published: Schema, current: Schema) -> list[BreakingChange]:
    """Every breaking difference between the published JSON Schema of an event and the current one."""
    comparison = _Comparison(event_type, published, current)
    old_topic, new_topic = published.get("x-topic"), current.get("x-topic")
    if old_topic != new_topic:
        comparison.report("", f"moved from topic {old_topic} to {new_topic}")
    comparison.compare(published, current, "")
    return comparison.changes


def compatibility_problems(
    published: Mapping[str, Schema], current: Mapping[str, Schema], retired: Collection[str] = ()
) -> list[str]:
    """Published event type → schema against current event type → schema: what breaks a promise.

    A published version must still be published, compatibly, unless it is explicitly retired; a
    retired version must not be published again (its type would promise two different things).
    """
    problems: list[str] = []
    for event_type, schema in sorted(published.items()):
        now = current.get(event_type)
        if now is None:
            if event_type not in retired:
                problems.append(
                    f"{event_type}: was published, but no model publishes it any more. Keep its model while "
                    "anyone may still send or read it (publish a new version next to it), or retire it "
                    "explicitly in RETIRED_EVENT_TYPES (shared/contracts/catalog.py) and keep its schema file"
                )
            continue
        problems.extend(str(change) for change in breaking_changes(event_type, schema, now))
    problems.extend(
        f"{event_type}: is retired but a model publishes it again; publish a new version instead"
        for event_type in sorted(retired)
        if event_type in current
    )
    return problems


@dataclass
class _Comparison:
    event_type: str
    old_root: Schema
    new_root: Schema
    changes: list[BreakingChange] = field(default_factory=list)
    _seen: set[tuple[str, str]] = field(default_factory=set)

    def report(self, path: str, change: str) -> None:
        self.changes.append(BreakingChange(self.event_type, path, change))

    def compare(self, old: Schema, new: Schema, path: str) -> None:
        if "$ref" in old and "$ref" in new:  # recursive models: compare each pair of definitions once
            pair = (str(old["$ref"]), str(new["$ref"]))
            if pair in self._seen:
                return
            self._seen.add(pair)
        old_kinds = _kinds(_resolve(old, self.old_root), self.old_root)
        new_kinds = _kinds(_resolve(new, self.new_root), self.new_root)
        if set(old_kinds) != set(new_kinds):
            self.report(path, f"type changed from {_describe(old_kinds)} to {_describe(new_kinds)}")
        for kind in old_kinds.keys() & new_kinds.keys():
            self._compare_kind(old_kinds[kind], new_kinds[kind], path)

    def _compare_kind(self, old: Schema, new: Schema, path: str) -> None:
        old_values, new_values = _values(old), _values(new)
        if new_values is not None:
            if old_values is None:
                self.report(path, f"now restricted to the values {new_values}")
            elif removed := [v for v in old_values if v not in new_values]:
                self.report(path, f"enum values removed: {removed}")
        if old.get("format") != new.get("format"):
            self.report(path, f"format changed from {old.get('format')} to {new.get('format')}")
        if "pattern" in new and old.get("pattern") != new["pattern"]:
            before = f"from {old['pattern']!r} " if "pattern" in old else ""
            self.report(path, f"pattern changed {before}to {new['pattern']!r}")
        for keyword in _UPPER_BOUNDS:
            if keyword in new and (keyword not in old or new[keyword] < old[keyword]):
                self.report(path, f"{keyword} tightened from {old.get(keyword, 'none')} to {new[keyword]}")
        for keyword in _LOWER_BOUNDS:
            if keyword in new and (keyword not in old or new[keyword] > old[keyword]):
                self.report(path, f"{keyword} tightened from {old.get(keyword, 'none')} to {new[keyword]}")
        if "multipleOf" in new and ("multipleOf" not in old or old["multipleOf"] % new["multipleOf"] != 0):
            self.report(path, f"multipleOf changed from {old.get('multipleOf', 'none')} to {new['multipleOf']}")
        if new.get("uniqueItems") and not old.get("uniqueItems"):
            self.report(path, "items must now be unique")
        self._compare_object(old, new, path)
        if "items" in old or "items" in new:
            self.compare(old.get("items", {}), new.get("items", {}), f"{path}[]")
        for keyword in sorted((old.keys() | new.keys()) - _ANNOTATIONS - _COMPARED):
            if not keyword.startswith("x-") and old.get(keyword) != new.get(keyword):
                self.report(path, f"{keyword} changed from {old.get(keyword)!r} to {new.get(keyword)!r}")

    def _compare_object(self, old: Schema, new: Schema, path: str) -> None:
        old_fields: Mapping[str, Schema] = old.get("properties", {})
        new_fields: Mapping[str, Schema] = new.get("properties", {})
        old_required, new_required = set(old.get("required", ())), set(new.get("required", ()))
        for name, schema in old_fields.items():
            where = _join(path, name)
            if name not in new_fields:
                self.report(where, "removed")
                continue
            if name in old_required and name not in new_required:
                self.report(where, "no longer required (consumers of this version rely on it being present)")
            elif name in new_required and name not in old_required:
                self.report(where, "now required (events already published may lack it)")
            self.compare(schema, new_fields[name], where)
        for name in sorted(new_required - old_fields.keys()):
            self.report(_join(path, name), "added as a required field (events already published lack it)")
        old_extra, new_extra = old.get("additionalProperties", True), new.get("additionalProperties", True)
        if new_extra is False and old_extra is not False:
            self.report(path, "no longer accepts fields it does not list")
        elif isinstance(old_extra, Mapping) and isinstance(new_extra, Mapping):
            self.compare(old_extra, new_extra, _join(path, "*"))
        elif old_extra is True and isinstance(new_extra, Mapping):
            self.compare({}, new_extra, _join(path, "*"))


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _resolve(schema: Schema, root: Schema) -> Schema:
    """Follow local ``$ref``s (``#/$defs/...``); keywords next to a ``$ref`` apply too."""
    seen: set[str] = set()
    while "$ref" in schema:
        ref = str(schema["$ref"])
        if not ref.startswith("#") or ref in seen:
            raise ValueError(f"cannot follow $ref {ref!r}: only local, non-circular references are supported")
        seen.add(ref)
        target: Any = root
        for part in ref[1:].split("/")[1:]:
            target = target[part.replace("~1", "/").replace("~0", "~")]
        schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) == 1:  # pydantic's older $ref wrapper
        rest = {k: v for k, v in schema.items() if k != "allOf"}
        return _resolve({**schema["allOf"][0], **rest}, root)
    return schema


def _kinds(schema: Schema, root: Schema) -> dict[str, Schema]:
    """The alternatives a schema allows, by JSON type (``{"string": …, "null": …}`` for ``str | None``)."""
    branches = list(_branches(schema, root))
    by_type: dict[str, list[Schema]] = {}
    for kind, branch in branches:
        by_type.setdefault(kind, []).append(branch)
    kinds: dict[str, Schema] = {}
    for kind, alternatives in by_type.items():
        if len(alternatives) == 1:
            kinds[kind] = alternatives[0]
        else:  # e.g. a union of two models: tell them apart by their titles
            for index, branch in enumerate(alternatives):
                kinds[f"{kind} {branch.get('title', index)}"] = branch
    return kinds


def _branches(schema: Schema, root: Schema) -> Iterator[tuple[str, Schema]]:
    schema = _resolve(schema, root)
    for union in ("anyOf", "oneOf"):
        if isinstance(schema.get(union), list):
            rest = {k: v for k, v in schema.items() if k != union}
            for alternative in schema[union]:
                for kind, branch in _branches(alternative, root):
                    yield kind, {**rest, **branch}
            return
    declared = schema.get("type")
    if isinstance(declared, list):
        for kind in declared:
            yield str(kind), {**schema, "type": kind}
        return
    yield (str(declared) if declared is not None else _inferred_type(schema)), schema


def _inferred_type(schema: Schema) -> str:
    values = _values(schema)
    if values:
        names = {_json_type(v) for v in values}
        if len(names) == 1:
            return names.pop()
    if "properties" in schema:
        return "object"
    if "items" in schema:
        return "array"
    return "any"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _values(schema: Schema) -> list[Any] | None:
    if "const" in schema:
        return [schema["const"]]
    if "enum" in schema:
        return list(schema["enum"])
    return None


def _describe(kinds: Mapping[str, Schema]) -> str:
    return " | ".join(sorted(kinds)) if kinds else "nothing"
