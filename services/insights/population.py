"""Inhabitants per municipality, for "per 1,000 inhabitants".

Read from ``shared/reference/data/populations.csv`` (``code6,population``): 総務省「住民基本台帳に基づく
人口、人口動態及び世帯数」 as of 2025-01-01, every municipality and designated-city ward (source, licence
and how to rebuild it in the reference README). A code it lacks (the 北方領土 villages, a missing file)
has a null ``population`` and ``per_1000``, never a guess.
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
