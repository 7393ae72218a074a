"""The My Number filter: the check digit, the normaliser, every evasion, and the kit's use of it
(every ``ApiModel`` scalar, free JSON, the path and the query)."""

from __future__ import annotations

import datetime as dt
import enum
import random
import re
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal

import httpx
import pytest
from fastapi import APIRouter
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, BeforeValidator, Field, ValidationError

from shared.kit.http import ApiModel, MultilineText, MyNumberExempt, _my_number_target, create_app
from shared.kit.ids import new_id
from shared.kit.my_number import (
    MyNumberNotAllowed,
    check_digit,
    find_my_number,
    int_is_my_number,
    is_my_number,
    looks_like_my_number,
    might_hold_my_number,
    normalise,
    refuse_my_number,
)
from shared.kit.settings import Settings


def reference_check_digit(first_eleven: str) -> int:
    """The check digit as the ordinance words it (P_n the n-th digit from the right, Q_n its weight)."""
    total = 0
    for n in range(1, 12):
        p = int(first_eleven[11 - n])
        q = n + 1 if n <= 6 else n - 5
        total += p * q
    remainder = total % 11
    return 0 if remainder <= 1 else 11 - remainder


def generated(rng: random.Random) -> str:
    first = "".join(rng.choice("0123456789") for _ in range(11))
    return first + str(reference_check_digit(first))


RNG = random.Random(20260305)
#: Valid My Numbers (generated with the reference check digit above).
NUMBERS = [generated(RNG) for _ in range(5)]
#: 123456789018 by hand: 1·2+0·3+9·4+8·5+7·6+6·7+5·2+4·3+3·4+2·5+1·6 = 212; 212 mod 11 = 3; 11 - 3 = 8.
KNOWN = "123456789018"


def grouped(number: str, sep: str) -> str:
    return sep.join((number[:4], number[4:8], number[8:]))


def by(sep: str) -> Callable[[str], str]:
    """Four-four-four, with ``sep`` between the groups."""
    return lambda number: grouped(number, sep)


FULL_WIDTH = str.maketrans("0123456789", "０１２３４５６７８９")
#: Every way of writing a My Number the filter must see through, as text.
EVASIONS: dict[str, Any] = {
    "plain": lambda n: n,
    "spaces": lambda n: grouped(n, " "),
    "ideographic space": lambda n: grouped(n, "\u3000"),
    "no-break space": lambda n: grouped(n, "\u00a0"),
    "tab and newline": lambda n: f"{n[:4]}\t{n[4:8]}\n{n[8:]}",
    "hyphens": lambda n: grouped(n, "-"),
    "dots": lambda n: grouped(n, "."),
    "slashes": lambda n: grouped(n, "/"),
    "underscores": lambda n: grouped(n, "_"),
    "commas": lambda n: grouped(n, ","),
    "ideographic commas": lambda n: grouped(n, "、"),
    "U+200B": lambda n: grouped(n, "\u200b"),
    "U+200C": lambda n: grouped(n, "\u200c"),
    "U+200D": lambda n: grouped(n, "\u200d"),
    "U+2060": lambda n: grouped(n, "\u2060"),
    "U+FEFF": lambda n: grouped(n, "\ufeff"),
    "soft hyphen": lambda n: grouped(n, "\u00ad"),
    "katakana long vowel mark": lambda n: grouped(n, "ー"),
    "half-width long vowel mark": lambda n: grouped(n, "ｰ"),
    **{f"dash U+{ord(d):04X}": by(d) for d in "‐‑‒–—―−－﹣〜"},
    "leading +": lambda n: "+" + n,
    "leading + and hyphens": lambda n: "+" + grouped(n, "-"),
    "full-width digits": lambda n: n.translate(FULL_WIDTH),
    "full-width digits and hyphens": lambda n: grouped(n.translate(FULL_WIDTH), "－"),
    "one digit at a time": lambda n: " ".join(n),
    "mixed separators": lambda n: f"{n[:2]}.{n[2:4]}\u200b-{n[4:8]} / {n[8:]}",
    "in a sentence": lambda n: f"個人番号は{grouped(n, '-')}です",
    "after letters": lambda n: f"ID{n}",
}


# --- The check digit -------------------------------------------------------------------------------


def test_the_check_digit_of_a_known_number() -> None:
    assert check_digit(KNOWN[:11]) == 8
    assert is_my_number(KNOWN)
    assert not is_my_number("123456789012")


@given(st.text(alphabet="0123456789", min_size=11, max_size=11))
def test_the_check_digit_is_the_ordinances_and_exactly_one_last_digit_is_valid(first: str) -> None:
    assert check_digit(first) == reference_check_digit(first)
    assert [d for d in "0123456789" if is_my_number(first + d)] == [str(reference_check_digit(first))]


def test_the_check_digit_rejects_other_lengths() -> None:
    with pytest.raises(ValueError, match="eleven"):
        check_digit("1234567890")
    assert not is_my_number("1234567890180") and not is_my_number("12345678901")


# --- The detector ----------------------------------------------------------------------------------


@pytest.mark.parametrize("number", [KNOWN, *NUMBERS])
@pytest.mark.parametrize("evasion", sorted(EVASIONS))
def test_every_evasion_of_a_valid_number_is_seen(evasion: str, number: str) -> None:
    text = EVASIONS[evasion](number)
    assert looks_like_my_number(text), repr(text)
    assert might_hold_my_number(text)


@pytest.mark.parametrize("evasion", sorted(EVASIONS))
def test_the_same_writing_with_a_wrong_check_digit_passes(evasion: str) -> None:
    wrong = KNOWN[:11] + str((int(KNOWN[11]) + 1) % 10)
    assert not looks_like_my_number(EVASIONS[evasion](wrong))


@pytest.mark.parametrize("text", [
    "1234567890180",  # a valid number inside a 13-digit run: a corporate number is 13 digits
    f"{KNOWN}5",
    f"9{KNOWN}",
    "1234-5678-9018-7",  # four groups: 13 digits once the separators are gone
    "12345678901",
    "+81-90-1234-5678",  # an international phone number (its digits fail the check)
    "090-1234-5678", "2026-03-02T10:00:00+09:00", "棚田の草刈り 2026-02-01", "NCH-304018-2026-000123",
    f"8f0e2a44-1c1d-4c2b-9f3e-{KNOWN}",  # a UUID whose last group happens to be a valid number
    str(uuid.UUID(f"8f0e2a44-1c1d-4c2b-9f3e-{KNOWN}")).upper(),
    "山田 花子", "", "ヤマダ ハナコ",
])
def test_other_numbers_and_system_ids_pass(text: str) -> None:
    assert not looks_like_my_number(text)


def test_a_uuid_only_shields_what_is_a_real_uuid() -> None:
    # version 0, variant 0: no system draws this; a My Number dressed up as one is seen
    assert looks_like_my_number(f"8f0e2a44-1c1d-0c2b-0f3e-{KNOWN}")
    assert looks_like_my_number(f"8f0e2a44-1c1d-4c2b-9f3e-{KNOWN} {grouped(NUMBERS[0], ' ')}")


def test_the_normaliser_removes_separators_and_keeps_the_rest() -> None:
    assert normalise("１２３４－５６７８ー９０１８\u200b") == "123456789018"
    assert normalise("a.b/c_d,e f+g") == "abcdefg"
    assert normalise("山田：12") == "山田:12"  # a colon is no separator (times: 10:00)


@given(st.text(alphabet="0123456789 -.\u200b", max_size=40))
def test_the_cheap_test_never_hides_a_number(text: str) -> None:
    if looks_like_my_number(text):
        assert might_hold_my_number(text)


def test_json_numbers() -> None:
    assert int_is_my_number(int(KNOWN)) and int_is_my_number(-int(KNOWN))
    assert not int_is_my_number(123456789012) and not int_is_my_number(int(KNOWN) * 10)
    assert int_is_my_number(int(NUMBERS[0])) == (NUMBERS[0][0] != "0")  # a leading 0 is lost in a number


def test_the_path_is_reported_never_the_value_and_exempt_fields_are_skipped() -> None:
    dashed = grouped(KNOWN, "-")
    document = {"donor": {"notes": ["ok", dashed]}, "payment_reference": KNOWN}
    assert find_my_number(document, exempt={"payment_reference"}) == "$.donor.notes[1]"
    with pytest.raises(MyNumberNotAllowed) as refused:
        refuse_my_number(document, exempt={"payment_reference"}, where="trip report")
    assert refused.value.detail.startswith("my-number-not-allowed: the trip report value at $.donor.notes[1]")
    assert KNOWN[:4] not in refused.value.detail
    assert find_my_number({"payment_reference": KNOWN}, exempt={"payment_reference"}) is None
    assert find_my_number({KNOWN: 1}) == "$ (a member name)"
    assert find_my_number({"n": int(KNOWN)}) == "$.n"
    assert find_my_number({"n": 12345678.9018}) == "$.n"
    assert find_my_number({"count": 3, "flag": True, "nothing": None, "n": 123456789012}) is None


# --- Every ApiModel ---------------------------------------------------------------------------------


class Colour(enum.Enum):
    RED = "red"


class Leg(ApiModel):
    station: str
    minutes: int = 0


class Trip(ApiModel):
    title: str = "t"
    note: MultilineText | None = None
    code: str = Field(default="a", pattern="^[a-z]+$", max_length=4)
    count: int = 0
    day: dt.date | None = None
    at: dt.datetime | None = None
    colour: Colour | None = None
    kind: Literal["a", "b"] = "a"
    tags: list[str] = []
    legs: list[Leg] = []
    by_name: dict[str, int] = {}
    extra: dict[str, Any] = {}
    reference: Annotated[str, MyNumberExempt("another system's own reference")] = "r"
    references: Annotated[list[str], MyNumberExempt("another system's own references")] = []


def refused_at(data: dict[str, Any]) -> list[tuple[Any, ...]]:
    with pytest.raises(ValidationError) as caught:
        Trip.model_validate(data)
    return [error["loc"] for error in caught.value.errors() if error["type"] == "my_number_not_allowed"]


@pytest.mark.parametrize("evasion", sorted(EVASIONS))
def test_every_str_of_an_api_model_refuses_every_evasion(evasion: str) -> None:
    text = EVASIONS[evasion](KNOWN)
    assert refused_at({"title": text}) == [("title",)]
    assert refused_at({"note": text}) == [("note",)]
    # before the field's own pattern and length could call it merely malformed
    assert refused_at({"code": text}) == [("code",)]
    assert refused_at({"tags": ["ok", text]}) == [("tags", 1)]
    assert refused_at({"legs": [{"station": text}]}) == [("legs", 0, "station")]
    assert refused_at({"count": text}) == [("count",)]  # "1234 5678 9018" for an int
    assert refused_at({"extra": {"k": [text]}}) == [("extra", "k")]
    assert refused_at({"extra": {text: 1}}) == [("extra", text, "[key]")]  # a member name


def test_json_numbers_and_every_scalar_type_are_refused_too() -> None:
    number = int(KNOWN)
    for field in ("title", "count", "day", "at", "legs"):
        data: dict[str, Any] = {field: [{"station": "s", "minutes": number}]} if field == "legs" else {field: number}
        expected = ("legs", 0, "minutes") if field == "legs" else (field,)
        assert refused_at(data) == [expected], field
    # a number of milliseconds would otherwise be a datetime that keeps every digit
    assert refused_at({"at": KNOWN}) == [("at",)]
    assert refused_at({"extra": {"n": number}}) == [("extra", "n")]
    assert refused_at({"by_name": {KNOWN: 1}}) == [("by_name", KNOWN, "[key]")]


def test_only_an_exempt_field_takes_twelve_digits() -> None:
    trip = Trip.model_validate({"reference": KNOWN, "references": [grouped(KNOWN, "-")]})
    assert trip.reference == KNOWN
    assert refused_at({"reference": KNOWN, "title": KNOWN}) == [("title",)]
    with pytest.raises(ValueError, match="why"):
        MyNumberExempt(" ")


def test_ordinary_values_pass_and_other_guards_still_hold() -> None:
    trip = Trip.model_validate({
        "title": "白浜町 ワーケーション 090-1234-5678", "count": 123456789012, "day": "2026-03-02",
        "at": "2026-03-02T10:00:00+09:00", "tags": ["1234567890180"], "extra": {"k": "NCH-304018-2026-000123"},
    })
    assert trip.count == 123456789012
    with pytest.raises(ValidationError) as caught:
        Trip.model_validate({"title": "a\x00b"})
    assert caught.value.errors()[0]["type"] == "control_character"


def test_models_that_are_not_api_models_are_left_alone() -> None:
    class Event(BaseModel):
        text: str

    assert Event.model_validate({"text": KNOWN}).text == KNOWN


# --- The path and the query --------------------------------------------------------------------------


def target(path: str, query: bytes = b"") -> list[Any] | None:
    return _my_number_target({"type": "http", "path": path, "query_string": query})


@pytest.mark.parametrize("evasion", sorted(EVASIONS))
def test_a_my_number_in_the_path_or_the_query_is_refused(evasion: str) -> None:
    text = EVASIONS[evasion](KNOWN)
    if "/" not in text:  # a slash is a new path segment
        assert target(f"/v1/residents/{text}/grants") == ["path", 3]
    encoded = httpx.QueryParams({"limit": "5", "q": text})
    assert target("/v1/registrations", str(encoded).encode()) == ["query", "q"]


def test_a_my_number_as_a_query_name_is_not_echoed_and_ordinary_targets_pass() -> None:
    assert target("/v1/x", f"{KNOWN}=1".encode()) == ["query", "(a member name)"]
    assert target("/v1/x", b"q=" + KNOWN.encode()) == ["query", "q"]
    assert target("/v1/x", b"q=%2B" + KNOWN.encode()) == ["query", "q"]
    assert target("/v1/certificates/NCH-304018-2025-000123") is None
    assert target(f"/v1/donations/8f0e2a44-1c1d-4c2b-9f3e-{KNOWN}") is None
    assert target("/v1/municipalities/304018/2026/01") is None  # segments are separate values
    assert target("/v1/registrations", b"q=%E5%B1%B1%E7%94%B0&from=2025-01-01&to=2025-12-31&limit=20") is None
    assert target("/v1/x", b"a=123456789012") is None


# --- The answer --------------------------------------------------------------------------------------


def kit_app() -> Any:
    router = APIRouter()

    @router.post("/trips")
    async def post_trip(body: Trip) -> dict[str, str]:
        return {"title": body.title}

    @router.get("/things/{thing}")
    async def get_thing(thing: str, q: str = "") -> dict[str, str]:
        return {"thing": thing}

    settings = Settings(pg_dsn="postgresql://nobody@127.0.0.1:1/none", redis_url="redis://127.0.0.1:1/0",
                        env="development")
    return create_app(service="kit_test", settings=settings, routers=[router])


async def call(method: str, url: str, **kwargs: Any) -> httpx.Response:
    transport = httpx.ASGITransport(app=kit_app(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://kit") as client:
        return await client.request(method, url, **kwargs)


def assert_refused(response: httpx.Response, where: str, loc: list[Any]) -> None:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["code"] == "my-number-not-allowed"
    assert problem["detail"].startswith(f"the {where} value at $")
    assert loc in [error["loc"] for error in problem["errors"]]
    for fragment in (KNOWN, KNOWN[:4], KNOWN[4:8], KNOWN[8:]):
        assert fragment not in response.text  # never echoed


async def test_the_answer_is_a_problem_naming_the_field_never_the_value() -> None:
    assert_refused(await call("POST", "/trips", json={"legs": [{"station": grouped(KNOWN, "-")}]}),
                   "body", ["body", "legs", 0, "station"])
    # with other errors beside it, the My Number is the answer
    assert_refused(await call("POST", "/trips", json={"title": KNOWN, "count": "many"}), "body", ["body", "title"])
    # under a member the model does not know, in its name or its value
    assert_refused(await call("POST", "/trips", json={"my_number": grouped(KNOWN, " ")}), "body",
                   ["body", "my_number"])
    assert_refused(await call("POST", "/trips", json={grouped(KNOWN, "-"): "x"}), "body",
                   ["body", "(a member name)"])
    # in an enum or a literal, which take no value of the caller's making
    assert_refused(await call("POST", "/trips", json={"colour": KNOWN}), "body", ["body", "colour"])
    assert_refused(await call("POST", "/trips", json={"kind": KNOWN}), "body", ["body", "kind"])
    assert_refused(await call("GET", f"/things/x?q={KNOWN}"), "query", ["query", "q"])
    assert_refused(await call("GET", f"/things/{grouped(KNOWN, '.')}"), "path", ["path", 2])


async def test_what_passes_still_passes_and_other_errors_keep_their_code() -> None:
    accepted = await call("POST", "/trips", json={"title": "1234567890180", "reference": KNOWN})
    assert accepted.status_code == 200, accepted.text
    unknown = await call("POST", "/trips", json={"my_number": "x"})
    assert (unknown.status_code, unknown.json()["code"]) == (422, "invalid-request")
    assert (await call("GET", "/things/NCH-304018-2026-000123?q=123456789012")).status_code == 200


def test_the_check_runs_before_a_validator_of_the_models_own() -> None:
    def echoing(value: object) -> object:
        raise ValueError(f"not a code: {value!r}")  # as a careless validator would

    class Program(ApiModel):
        code: Annotated[str, BeforeValidator(echoing)]

    with pytest.raises(ValidationError) as caught:
        Program.model_validate({"code": grouped(KNOWN, "-")})
    assert [(e["loc"], e["type"]) for e in caught.value.errors()] == [(("code",), "my_number_not_allowed")]
    with pytest.raises(ValidationError) as caught:
        Program.model_validate({"code": "x"})
    assert caught.value.errors()[0]["type"] == "value_error"


# --- ids the platform draws ----------------------------------------------------------------------


def test_a_drawn_id_that_would_look_like_a_my_number_is_drawn_again() -> None:
    # 16 hex digits of the first draw hold KNOWN, twelve digits in a row with the right check digit.
    draws = iter([f"ab{KNOWN}cd" + "0" * 16, "abcdef0123456789" * 2])
    assert looks_like_my_number(f"pln-ab{KNOWN}cd")
    assert new_id("pln", 16, draw=lambda: next(draws)) == "pln-abcdef0123456789"


def test_drawn_ids_hold_the_digits_asked_for() -> None:
    assert re.fullmatch(r"lst-[0-9a-f]{16}", new_id("lst", 16))
    assert re.fullmatch(r"usr-[0-9a-f]{32}", new_id("usr"))
