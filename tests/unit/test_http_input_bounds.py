"""The kit refuses input PostgreSQL cannot store: control characters (NUL above all) in the strings of a
request body, ints beyond a ``bigint``, and control characters in a path or query string."""

from __future__ import annotations

import importlib
import inspect
import types
from collections.abc import Iterator
from typing import Annotated, Any, Union, get_args, get_origin

import pytest
from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, ValidationError, model_validator

from shared.kit.http import (
    INT32_MAX,
    INT32_MIN,
    INT64_MAX,
    INT64_MIN,
    MAX_AMOUNT,
    AllowControls,
    Amount,
    ApiModel,
    Int32,
    MultilineText,
    _unstorable_target,
)
from shared.kit.settings import Settings

NUL = "\x00"


class Leg(ApiModel):
    station: str
    minutes: int


class Trip(ApiModel):
    title: str
    note: MultilineText | None = None
    count: int = 0
    days: Int32 = 0
    yen: Amount = 0
    percent: int = Field(default=0, ge=0, le=100)
    huge_bound: int = Field(default=0, le=10**30)
    tags: list[str] = []
    legs: list[Leg] = []
    extra: dict[str, Any] = {}

    @model_validator(mode="after")
    def _no_13(self) -> Trip:
        if self.count == 13:
            raise ValueError("not 13")
        return self


def refusal(data: dict[str, Any], model: type[BaseModel] = Trip) -> list[tuple[tuple[int | str, ...], str]]:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(data)
    return [(error["loc"], error["type"]) for error in caught.value.errors()]


@pytest.mark.parametrize("control", [NUL, "\x01", "\n", "\t", "\x1f", "\x7f", "\x85", "\x9f"])
def test_a_control_character_in_a_string_is_refused_naming_the_field(control: str) -> None:
    assert refusal({"title": f"a{control}b"}) == [(("title",), "control_character")]


def test_the_error_says_which_character_and_where() -> None:
    with pytest.raises(ValidationError) as caught:
        Trip.model_validate({"title": f"abc{NUL}"})
    assert "U+0000 at position 3" in caught.value.errors()[0]["msg"]


def test_printable_text_passes_japanese_and_full_width_spaces_too() -> None:
    trip = Trip.model_validate({"title": "白浜町\u3000ワーケーション 2泊 ✈", "tags": ["a b", "é"]})
    assert trip.title == "白浜町\u3000ワーケーション 2泊 ✈"


def test_line_breaks_and_tabs_only_where_a_field_opts_in() -> None:
    assert Trip.model_validate({"title": "t", "note": "line 1\r\nline 2\tend"}).note == "line 1\r\nline 2\tend"
    assert refusal({"title": "line 1\nline 2"}) == [(("title",), "control_character")]
    for control in (NUL, "\x0b", "\x7f", "\x85"):
        assert refusal({"title": "t", "note": f"a{control}b"}) == [(("note",), "control_character")]


def test_nul_can_never_be_opted_in() -> None:
    with pytest.raises(ValueError, match="not allowable"):
        AllowControls("\n\x00")
    with pytest.raises(ValueError, match="not allowable"):
        AllowControls("a")


def test_strings_in_lists_nested_models_and_free_json_are_checked_too() -> None:
    assert refusal({"title": "t", "tags": ["ok", f"x{NUL}"]}) == [(("tags", 1), "control_character")]
    assert refusal({"title": "t", "legs": [{"station": f"x{NUL}", "minutes": 1}]}) == [
        (("legs", 0, "station"), "control_character")
    ]
    assert refusal({"title": "t", "extra": {"k": {"deep": [f"x{NUL}"]}}}) == [(("extra", "k"), "control_character")]
    assert refusal({"title": "t", "extra": {f"k{NUL}": 1}}) == [(("extra", f"k{NUL}", "[key]"), "control_character")]
    assert refusal({"title": "t", "extra": {"k": [1, 2**63]}}) == [(("extra", "k"), "int_out_of_range")]
    assert Trip.model_validate({"title": "t", "extra": {"k": [INT64_MAX, INT64_MIN, True, 1.5, None]}}).extra


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 10**40, -(10**40)])
def test_an_int_beyond_a_bigint_is_refused_naming_the_field(value: int) -> None:
    expected = "less_than_equal" if value > 0 else "greater_than_equal"
    assert refusal({"title": "t", "count": value}) == [(("count",), expected)]
    assert refusal({"title": "t", "legs": [{"station": "s", "minutes": value}]}) == [
        (("legs", 0, "minutes"), expected)
    ]


def test_the_bigint_range_itself_passes() -> None:
    assert Trip.model_validate({"title": "t", "count": INT64_MAX}).count == INT64_MAX
    assert Trip.model_validate({"title": "t", "count": INT64_MIN}).count == INT64_MIN


def test_tighter_bounds_of_a_field_stay_and_looser_ones_are_capped() -> None:
    assert refusal({"title": "t", "percent": 101}) == [(("percent",), "less_than_equal")]
    assert refusal({"title": "t", "percent": -1}) == [(("percent",), "greater_than_equal")]
    assert refusal({"title": "t", "huge_bound": 2**63}) == [(("huge_bound",), "less_than_equal")]
    assert refusal({"title": "t", "days": INT32_MAX + 1}) == [(("days",), "less_than_equal")]
    assert refusal({"title": "t", "days": INT32_MIN - 1}) == [(("days",), "greater_than_equal")]
    assert Trip.model_validate({"title": "t", "days": INT32_MAX}).days == INT32_MAX


def test_an_amount_is_a_strict_int_up_to_the_ceiling() -> None:
    assert Trip.model_validate({"title": "t", "yen": MAX_AMOUNT}).yen == MAX_AMOUNT
    assert refusal({"title": "t", "yen": MAX_AMOUNT + 1}) == [(("yen",), "less_than_equal")]
    assert refusal({"title": "t", "yen": "100"}) == [(("yen",), "int_type")]
    assert refusal({"title": "t", "yen": 1.5}) == [(("yen",), "int_type")]


def test_the_bounds_are_in_the_json_schema_and_validators_of_the_model_still_run() -> None:
    properties = Trip.model_json_schema()["properties"]
    assert (properties["count"]["minimum"], properties["count"]["maximum"]) == (INT64_MIN, INT64_MAX)
    assert (properties["percent"]["minimum"], properties["percent"]["maximum"]) == (0, 100)
    assert properties["yen"]["maximum"] == MAX_AMOUNT
    assert refusal({"title": "t", "count": 13}) == [((), "value_error")]


def test_models_that_are_not_api_models_are_left_alone() -> None:
    class Event(BaseModel):
        text: str
        count: int

    assert Event.model_validate({"text": NUL, "count": 2**70}).count == 2**70


# --- The path and the query string ------------------------------------------------------------------


def target(path: str, query: bytes = b"") -> tuple[list[str], str] | None:
    return _unstorable_target({"type": "http", "path": path, "query_string": query})


def test_a_control_character_in_the_path_or_the_query_is_refused_naming_the_parameter() -> None:
    assert target("/v1/residents/a\x00b/grants") == (["path"], "control characters are not allowed (U+0000)")
    assert target("/v1/registrations", b"limit=5&q=a%00b") == (
        ["query", "q"], "control characters are not allowed (U+0000)"
    )
    for query in (b"status=%0A", b"status=%7f", b"status=%C2%85", b"status=a\x01", b"status=%E2%9C%88%00"):
        found = target("/v1/x", query)
        assert found is not None and found[0] == ["query", "status"], query
    # in a name: not echoed back
    assert target("/v1/x", b"a%00=1") == (["query"], "control characters are not allowed (U+0000)")


def test_ordinary_paths_and_queries_pass() -> None:
    assert target("/v1/certificates/NCH-304018-2025-000123") is None
    assert target("/v1/registrations", b"q=%E5%B1%B1%E7%94%B0+%E8%8A%B1%E5%AD%90&limit=20") is None
    assert target("/v1/registrations", b"q=100%25&from=2025-01-01") is None
    assert target("/v1/municipalities/東京/certificates.csv") is None


# --- Every service ---------------------------------------------------------------------------------

SERVICES = ["registration", "certification", "subsidy", "donation", "notification", "partner_gateway"]


def api_routes(routes: list[Any]) -> Iterator[APIRoute]:
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif (router := getattr(route, "original_router", None)) is not None:
            yield from api_routes(router.routes)


def dependants(dependant: Dependant) -> Iterator[Dependant]:
    yield dependant
    for sub in dependant.dependencies:
        yield from dependants(sub)


def models_of(annotation: Any) -> Iterator[Any]:
    """The types a body annotation admits (``A | B | None`` → A, B)."""
    if get_origin(annotation) is Annotated:
        yield from models_of(get_args(annotation)[0])
    elif get_origin(annotation) in (Union, types.UnionType):
        for arg in get_args(annotation):
            if arg is not type(None):
                yield from models_of(arg)
    else:
        yield annotation


@pytest.mark.parametrize("service", SERVICES)
def test_every_request_body_is_an_api_model_and_every_int_parameter_is_bounded(service: str) -> None:
    # Building an app connects to nothing: a DSN that is never dialled will do.
    create_app = importlib.import_module(f"services.{service}.main").create_app
    app: FastAPI = create_app(Settings(pg_dsn="postgresql://nobody@127.0.0.1:1/none", redis_url="redis://127.0.0.1:1/0"))
    bodies: list[str] = []
    unguarded: list[str] = []
    for route in api_routes(app.routes):
        for dependant in dependants(route.dependant):
            for body in dependant.body_params:
                for model in models_of(body.field_info.annotation):
                    bodies.append(f"{route.path}: {model}")
                    if not (inspect.isclass(model) and issubclass(model, ApiModel)):
                        unguarded.append(f"{route.path}: body {model}")
            for parameter in dependant.query_params + dependant.path_params + dependant.header_params:
                if int not in set(models_of(parameter.field_info.annotation)):
                    continue
                bounds = {type(m).__name__: m for m in parameter.field_info.metadata}
                low = getattr(bounds.get("Ge"), "ge", None)
                high = getattr(bounds.get("Le"), "le", None)
                if low is None or high is None or low < INT64_MIN or high > INT64_MAX:
                    unguarded.append(f"{route.path}: {parameter.name} {parameter.field_info.metadata}")
    assert unguarded == []
    if service != "notification":  # the inbox takes no body
        assert bodies
