"""The My Number (個人番号, individual number) is never accepted or stored anywhere.

It may be used only for tax, social security and disaster work, never with consent elsewhere, so
every service refuses any request value that looks like one. A My Number is 12 digits, written
plain, spaced or 4-4-4 with hyphens, in half- or full-width digits. Refused: any string (or bare
JSON number, or member name) that, once spaces and hyphens are removed, holds a run of exactly
twelve digits. Not refused: a run right after "+" (an international phone number), 13 digits (a
corporate number), a canonical UUID (system ids, whose hex groups hold 12 digits by chance), and
fields the caller exempts (another system's own identifiers, e.g. a payment reference).
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from collections.abc import Collection
from typing import Any

from shared.kit.errors import DomainError

_SEPARATORS = str.maketrans("", "", " \t\r\n-\u2010\u2011\u2012\u2013\u2014\u2015\u2212")
_TWELVE_DIGITS = re.compile(r"(?<![0-9+])[0-9]{12}(?![0-9])")
_CANONICAL_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


class MyNumberNotAllowed(DomainError):
    code = "my-number-not-allowed"
    status = 422
    title = "A My Number is never accepted"


def is_uuid(text: str) -> bool:
    if _CANONICAL_UUID.match(text) is None:
        return False
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def looks_like_my_number(text: str) -> bool:
    if is_uuid(text):
        return False
    compact = unicodedata.normalize("NFKC", text).translate(_SEPARATORS)
    return _TWELVE_DIGITS.search(compact) is not None


def find_my_number(value: Any, *, exempt: Collection[str] = (), path: str = "$") -> str | None:
    """The JSON path of the first value that looks like a My Number, anywhere in a document."""
    if isinstance(value, str):
        return path if looks_like_my_number(value) else None
    if isinstance(value, int) and not isinstance(value, bool):
        return path if looks_like_my_number(str(abs(value))) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and looks_like_my_number(key):
                return f"{path} (a member name)"
            if key in exempt:
                continue
            found = find_my_number(item, exempt=exempt, path=f"{path}.{key}")
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = find_my_number(item, exempt=exempt, path=f"{path}[{index}]")
            if found is not None:
                return found
    return None


def refuse_my_number(document: Any, *, where: str = "body", exempt: Collection[str] = ()) -> None:
    path = find_my_number(document, exempt=exempt)
    if path is not None:
        # Never echo the value itself: it may be a real individual number.
        raise MyNumberNotAllowed(f"the {where} value at {path} looks like a 12-digit My Number; it is never accepted")
