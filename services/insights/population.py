"""Inhabitants per municipality, for "per 1,000 inhabitants".

The platform bundles no population table yet (see docs/services/insights.md): it reads
``shared/reference/data/populations.csv`` (``code6,population``, one row per municipality, from a
dated official source named in the reference README) when that file exists. Without it every
``population`` and ``per_1000`` is null, never a guess.
"""

from __future__ import annotations

import csv
from functools import cache
from pathlib import Path

POPULATIONS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "data" / "populations.csv"


@cache
def populations(path: Path = POPULATIONS) -> dict[str, int]:
    if not path.exists():
        return {}
    with path.open(encoding="utf-8", newline="") as handle:
        return {row["code6"]: int(row["population"]) for row in csv.DictReader(handle) if row.get("population")}


def population_of(code: str) -> int | None:
    return populations().get(code)
