"""Ids the platform draws for its own records: ``<prefix>-<hex digits>``.

An id travels in paths (``/v1/plans/{plan_id}``) and records, where the My Number guard reads
twelve digits in a row whose last is the check digit of the first eleven as a My Number and
refuses it (``shared/kit/my_number.py``). Hex digits hold such a run by chance: about one draw in
800 of 32 digits, one in 2,400 of 16. Such a draw is drawn again, so no record ever gets an id that
its own routes would refuse.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from shared.kit.my_number import looks_like_my_number


def random_hex() -> str:
    return uuid.uuid4().hex


def new_id(prefix: str, hex_digits: int = 32, draw: Callable[[], str] = random_hex) -> str:
    """``<prefix>-`` and ``hex_digits`` (at most 32) random hex digits, never looking like a My Number."""
    while True:
        candidate = f"{prefix}-{draw()[:hex_digits]}"
        if not looks_like_my_number(candidate):
            return candidate
