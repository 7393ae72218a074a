"""Build ``populations.csv`` (``code6,population``) from MIC's 住民基本台帳 table.

Input: the workbook 「【総計】市区町村別人口、人口動態及び世帯数」 of 総務省「住民基本台帳に基づく人口、
人口動態及び世帯数」 (one sheet; column A the 6-digit 団体コード, column F the total population 計).
Only codes in ``municipalities.csv`` are kept: the national, prefecture, 郡 and 島しょ rows are sums, and
the 北方領土 villages (population 0, no one registered there) would give no per-1,000 base.

    .venv/bin/python shared/reference/data/build_populations.py <workbook.xlsx>

The workbook is read as the zip of XML it is, so no spreadsheet library is needed.
"""

from __future__ import annotations

import csv
import re
import sys
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator
from pathlib import Path

import structlog

HERE = Path(__file__).resolve().parent
_M = "{http://schemas.openxmlformats.org/spreadsheetml/2006/main}"
log = structlog.get_logger("build_populations")


def sheet_rows(workbook: Path) -> Iterator[dict[str, str]]:
    """Each row of the first sheet as {column letter: text}."""
    with zipfile.ZipFile(workbook) as z:
        shared = [
            "".join(t.text or "" for t in si.iter(f"{_M}t"))
            for si in ET.fromstring(z.read("xl/sharedStrings.xml")).iter(f"{_M}si")
        ]
        sheet = ET.fromstring(z.read("xl/worksheets/sheet1.xml"))
    for row in sheet.iter(f"{_M}row"):
        cells: dict[str, str] = {}
        for cell in row.iter(f"{_M}c"):
            value = cell.find(f"{_M}v")
            if value is None or value.text is None:
                continue
            column = re.sub(r"\d", "", cell.get("r", ""))
            cells[column] = shared[int(value.text)] if cell.get("t") == "s" else value.text
        yield cells


def build(workbook: Path, out: Path = HERE / "populations.csv") -> int:
    with (HERE / "municipalities.csv").open(encoding="utf-8", newline="") as handle:
        keep = {
            row["code6"]
            for row in csv.DictReader(handle)
            if row["kind"] != "prefecture" and row["northern_territories"] == "0"
        }
    rows = [(cells["A"], int(cells["F"])) for cells in sheet_rows(workbook) if cells.get("A") in keep]
    missing = keep - {code for code, _ in rows}
    if missing:
        raise SystemExit(f"the workbook lacks {len(missing)} municipalities, e.g. {sorted(missing)[:5]}")
    with out.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["code6", "population"])
        writer.writerows(sorted(rows))
    log.info("populations_written", path=str(out), rows=len(rows))
    return len(rows)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    build(Path(sys.argv[1]))
