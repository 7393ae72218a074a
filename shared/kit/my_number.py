"""The My Number (個人番号, individual number) is never accepted or stored anywhere.

It may be used only for tax, social security and disaster work, never with consent elsewhere, so
every request value and every text a partner sends is refused when it holds one. One normaliser
and one detector, used by the HTTP kit (every ``ApiModel`` field, path and query) and by consumers
of partner text.

The rule (``looks_like_my_number``):

1. Normalise (``normalise``): NFKC (full-width digits and punctuation become ASCII), then remove
   every separator someone could write between the digits: whitespace of every kind (spaces,
   U+3000, tabs, line breaks), format characters (zero-width space/joiners U+200B/C/D, word joiner
   U+2060, BOM U+FEFF, soft hyphen: all of Unicode's ``Cf``), every dash (Unicode's ``Pd``: ‐ ‑ ‒
   – — ― 〜 ﹣ …, and the minus sign −, the katakana long vowel mark ー, ~, box-drawing lines),
   dots (. · ・ 。), slashes (/ \\ ∕ ⁄), underscores, commas (, 、), apostrophes and ``+`` (so a
   leading ``+`` no longer hides a number).
2. Scan the maximal runs of decimal digits (any script's: ``int`` reads them) of the normalised
   text. A run of **exactly 12** digits whose last digit is the My Number check digit of the first
   eleven is a My Number. A longer run is not scanned for 12-digit windows: a 13-digit corporate
   number (法人番号) or a 16-digit card number must stay accepted, and a window of a longer run is
   not a number anyone wrote. Twelve digits with a wrong check digit are not a My Number either
   (order numbers, member numbers, +81 phone numbers mostly are not refused).
3. A canonical RFC 4122 UUID (version 1-8, variant 10xx) is not looked into: system ids, whose last
   group holds 12 digits by chance about once in 300 draws.

The check digit: with P_n the n-th digit from the right among the first 11 (n = 1..11) and
Q_n = n + 1 for n <= 6, n - 5 for n >= 7, r = sum(P_n * Q_n) mod 11; the check digit is 0 when
r <= 1, else 11 - r.

A bare integer (a JSON number) is a My Number when its decimal digits are one. The detector never
returns or logs the value: a refusal names where it was, never what.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection
from typing import Any

from shared.kit.errors import DomainError

CODE = "my-number-not-allowed"


class MyNumberNotAllowed(DomainError):
    code = CODE
    status = 422
    title = "A My Number is never accepted"


def _separators() -> str:
    chars = set(
        "+~'"  # a leading + (international prefix), ~ as a range dash, ' as a thousands separator
        ".\u00b7\u2022\u2027\u2219\u22c5\u30fb\u3002"  # dots: . · • ‧ ∙ ⋅ ・ 。
        "/\\\u2044\u2215\u29f8"  # slashes: / \ ⁄ ∕ ⧸
        "_\u2017"  # underscores: _ ‗
        ",\u060c\u066b\u066c\u201a\u3001"  # commas: , ، ٫ ٬ ‚ 、
        "\u2212\u02d7\u2043\u2796\u30fc\u2500\u2501\u23af\u2019"  # − ˗ ⁃ ➖ ー ─ ━ ⎯ and ’
    )
    # Whitespace, format characters (zero-width ones, BOM, soft hyphen, tags) and dashes, by
    # category: the BMP and plane 14 (tags) scanned, plane 1's few listed (scanning it costs 50 ms).
    plane_1 = (0x10EAD, 0x110BD, 0x110CD, *range(0x13430, 0x13440), *range(0x1BCA0, 0x1BCA4),
               *range(0x1D173, 0x1D17B))
    for code in (*range(0x10000), *plane_1, *range(0xE0000, 0xE1000)):
        char = chr(code)
        if char.isspace() or unicodedata.category(char) in ("Zs", "Zl", "Zp", "Cf", "Pd"):
            chars.add(char)
    # "-", "]", "\\" and "^" are escaped by re.escape inside the class.
    return "".join(sorted(chars))


_SEPARATOR = re.compile(f"[{re.escape(_separators())}]+")
_DIGIT = re.compile(r"\d")
#: A maximal run of exactly twelve decimal digits (``\d`` is any script's decimal digit).
_TWELVE = re.compile(r"(?<!\d)\d{12}(?!\d)")
_UUID = re.compile(
    r"(?<![0-9A-Za-z])[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[1-8][0-9a-fA-F]{3}-[89abAB][0-9a-fA-F]{3}-[0-9a-fA-F]{12}"
    r"(?![0-9A-Za-z])"
)
_WEIGHTS = (2, 3, 4, 5, 6, 7, 2, 3, 4, 5, 6)  # Q_1 .. Q_11


def check_digit(first_eleven: str) -> int:
    """The My Number check digit of eleven decimal digits."""
    digits = [unicodedata.decimal(c) for c in first_eleven]
    if len(digits) != 11:
        raise ValueError("a My Number check digit is computed over exactly eleven digits")
    remainder = sum(p * q for p, q in zip(reversed(digits), _WEIGHTS, strict=True)) % 11
    return 0 if remainder <= 1 else 11 - remainder


def is_my_number(digits: str) -> bool:
    """Whether twelve decimal digits (nothing else) are a My Number: their check digit is right."""
    return len(digits) == 12 and digits.isdecimal() and check_digit(digits[:11]) == unicodedata.decimal(digits[11])


def normalise(text: str) -> str:
    """NFKC, canonical UUIDs blanked out, every separator removed (see the module's rule)."""
    text = unicodedata.normalize("NFKC", text)
    text = _UUID.sub("#", text)  # not a digit, not a separator: it ends a run
    return _SEPARATOR.sub("", text)


def might_hold_my_number(text: str) -> bool:
    """The cheap test in front of ``looks_like_my_number``: twelve decimal digits at all, after NFKC."""
    if text.isascii():  # O(1) in CPython; NFKC changes nothing in ASCII
        return len(text) >= 12 and sum(map(text.count, "0123456789")) >= 12
    return len(_DIGIT.findall(unicodedata.normalize("NFKC", text))) >= 12


def looks_like_my_number(text: str) -> bool:
    """Whether the text holds a My Number, however it is written (see the module's rule)."""
    if not might_hold_my_number(text):
        return False
    return any(is_my_number(run.group()) for run in _TWELVE.finditer(normalise(text)))


def int_is_my_number(value: int) -> bool:
    """Whether a bare integer (a JSON number) is a My Number (a sign is a dash: it is ignored)."""
    return 10**11 <= abs(value) < 10**12 and is_my_number(str(abs(value)))


def scalar_looks_like_my_number(value: object) -> bool:
    """Whether a JSON scalar (str, int or float) holds a My Number; False for anything else."""
    if isinstance(value, str):
        return looks_like_my_number(value)
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return int_is_my_number(value)
    if isinstance(value, float):
        return looks_like_my_number(repr(value))  # 12345678.9018: dots are separators
    return False


def find_my_number(value: Any, *, exempt: Collection[str] = (), path: str = "$") -> str | None:
    """The JSON path of the first value (or member name) holding a My Number, anywhere in a document;
    members named in ``exempt`` are not looked into."""
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
    elif scalar_looks_like_my_number(value):
        return path
    return None


def refusal_detail(where: str, path: str) -> str:
    """The detail of a refusal: where the value is, never the value (it may be a real number)."""
    return f"the {where} value at {path} looks like a 12-digit My Number; it is never accepted"


def refuse_my_number(document: Any, *, where: str = "body", exempt: Collection[str] = ()) -> None:
    """Raise ``MyNumberNotAllowed`` (whose detail starts with the code, so a dead letter's reason
    names it) when the document holds a My Number anywhere."""
    path = find_my_number(document, exempt=exempt)
    if path is not None:
        raise MyNumberNotAllowed(f"{CODE}: {refusal_detail(where, path)}")
