"""Message templates: one file per kind and language, ``templates/<kind>.<lang>.txt``.

A template's first line is ``Subject: ...``, then a blank line, then the body. Placeholders are
``string.Template`` names (``$certificate_number``, ``${municipality}``); every fact of the notice
is available, written for the language, plus ``$name`` (the resident's name). Fixed phrases
that depend on a fact (tier, partner name, "used up"...) are in ``templates/_labels.<lang>.txt``
as ``key = text`` lines. Templates are read once and checked: a missing file or placeholder is
an error at start-up, not in the middle of a delivery.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from functools import cache
from pathlib import Path
from string import Template

from services.notification.domain import (
    KINDS,
    LANGUAGES,
    Amount,
    Fact,
    Kind,
    Label,
    ListingLines,
    Notice,
    Place,
    Places,
    Reason,
    format_amount,
    format_date,
    format_number,
    format_places,
    place_name,
)
from shared.contracts.common import Language
from shared.contracts.listings import DigestEntry
from shared.contracts.reasons import reason_text

TEMPLATE_DIR = Path(__file__).parent / "templates"
_SUBJECT = "Subject: "


class TemplateError(RuntimeError):
    """A template file is missing, malformed, or names a fact the notice does not have."""


@dataclass(frozen=True, slots=True)
class MessageTemplate:
    subject: Template
    body: Template


@dataclass(frozen=True, slots=True)
class Rendered:
    language: Language
    subject: str
    body: str


def parse_template(text: str, where: str) -> MessageTemplate:
    first, _, rest = text.partition("\n")
    if not first.startswith(_SUBJECT):
        raise TemplateError(f"{where}: the first line must be 'Subject: ...'")
    if not rest.startswith("\n"):
        raise TemplateError(f"{where}: a blank line must follow the subject")
    body = rest[1:].rstrip("\n") + "\n"
    return MessageTemplate(Template(first[len(_SUBJECT):].strip()), Template(body))


@cache
def message_template(kind: Kind, language: Language) -> MessageTemplate:
    path = TEMPLATE_DIR / f"{kind}.{language}.txt"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise TemplateError(f"no template {path.name}") from error
    return parse_template(text, path.name)


@cache
def labels(language: Language) -> dict[str, str]:
    path = TEMPLATE_DIR / f"_labels.{language}.txt"
    table: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, separator, value = line.partition("=")
        if not separator:
            raise TemplateError(f"{path.name}, line {number}: expected 'key = text'")
        table[key.strip()] = value.strip()
    return table


def label(key: str, language: Language) -> str:
    """A fixed phrase; an unknown partner falls back to its code rather than failing the message."""
    table = labels(language)
    if key in table:
        return table[key]
    if key.startswith("partner."):
        return key.removeprefix("partner.").upper()
    raise TemplateError(f"_labels.{language}.txt has no {key!r}")


def write_fact(fact: Fact, language: Language) -> str:
    match fact:
        case Amount():
            return format_amount(fact, language)
        case Place():
            return place_name(fact.code)
        case Places():
            return format_places(fact.codes, language)
        case Label():
            return label(fact.key, language)
        case Reason():
            return reason_text(fact.kind, fact.code, language)
        case ListingLines():
            return "\n".join(_listing_line(entry, language) for entry in fact.entries)
        case date():  # datetime too: its date in Japan
            return format_date(fact, language)
        case bool():
            raise TemplateError("a yes/no fact must be a Label, not a bool")
        case int():
            return format_number(fact)
        case str():
            return fact
    raise TemplateError(f"cannot write a {type(fact).__name__}")


def _listing_line(entry: DigestEntry, language: Language) -> str:
    kind, place = label(f"listing.{entry.kind}", language), place_name(entry.municipality_code)
    since = format_date(entry.available_from, language)
    until = "" if entry.available_until is None else format_date(entry.available_until, language)
    if language == "ja":
        return f"・{entry.title}（{kind}、{place}、{since}〜{until}）"
    return f"- {entry.title} ({kind}, {place}, {since}" + (f" to {until})" if until else " onwards)")


def render(notice: Notice, language: Language, name: str | None) -> Rendered:
    """The notice in words, for a resident called ``name`` (None: not known here yet)."""
    template = message_template(notice.kind, language)
    values = {key: write_fact(fact, language) for key, fact in notice.facts.items()}
    values["name"] = name or label("resident.unknown", language)
    try:
        return Rendered(language, template.subject.substitute(values), template.body.substitute(values))
    except (KeyError, ValueError) as error:
        raise TemplateError(f"{notice.kind}.{language}.txt: {error!r}") from error


def check_templates() -> None:
    """Every kind has a well-formed template in every language (run at start-up and in tests)."""
    for kind in KINDS:
        for language in LANGUAGES:
            template = message_template(kind, language)
            for part in (template.subject, template.body):
                if not part.is_valid():
                    raise TemplateError(f"{kind}.{language}.txt has an invalid placeholder")
    for language in LANGUAGES:
        label("resident.unknown", language)
