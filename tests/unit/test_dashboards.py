"""The Grafana dashboards: valid JSON, one Prometheus datasource chosen by variable, and every metric
their PromQL reads is one the code registers (a renamed metric would leave a panel silently empty)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from shared.kit.metrics import AppRegistry

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))

#: Where the code names a metric: a metric object, a scrape-time family, a component's counters.
_DECLARED = re.compile(
    r"\b(Counter|Histogram|Gauge|CounterMetricFamily|GaugeMetricFamily|OutcomeCounters)\(\s*\"([a-zA-Z_:][\w:]*)\"",
)
_SUFFIXES = {
    "Counter": ("_total",), "CounterMetricFamily": ("_total",), "OutcomeCounters": ("_total",),
    "Histogram": ("_bucket", "_sum", "_count"), "Gauge": ("",), "GaugeMetricFamily": ("",),
}
_PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "by", "without", "rate", "irate", "increase", "histogram_quantile",
    "label_values", "topk", "bottomk", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "delta", "deriv", "abs", "clamp_min", "clamp_max", "time", "offset", "bool",
}


def registered_metrics() -> set[str]:
    """Every sample name the code can expose: declared in shared/ and services/, and the process,
    GC and platform collectors every app registry carries."""
    names: set[str] = set()
    for source in [*(ROOT / "shared").rglob("*.py"), *(ROOT / "services").rglob("*.py")]:
        for kind, name in _DECLARED.findall(source.read_text(encoding="utf-8")):
            base = name.removesuffix("_total") if kind != "Gauge" else name
            names.update(base + suffix for suffix in _SUFFIXES[kind])
    for family in AppRegistry().collect():
        names.update(sample.name for sample in family.samples)
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (label matchers, groupings and ranges removed)."""
    text = re.sub(r"label_values\(\s*([^,()]+),[^)]*\)", r"\1", expr)  # a variable's query: metric, label
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", text)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", text)
    words = set(re.findall(r"[a-zA-Z_:][\w:]*", text))
    return {w for w in words if w not in _PROMQL_WORDS and not re.fullmatch(r"\d+\w*", w)}


def expressions(node: Any) -> list[str]:
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                found.append(value)
            else:
                found.extend(expressions(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(expressions(item))
    return found


def datasources(node: Any) -> list[Any]:
    found: list[Any] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                found.append(value)
            else:
                found.extend(datasources(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(datasources(item))
    return found


def test_the_three_dashboards_are_there() -> None:
    assert {d.stem for d in DASHBOARDS} == {"platform-overview", "service", "partner-feeds"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_a_dashboard_reads_only_metrics_the_code_registers(path: Path) -> None:
    board = json.loads(path.read_text(encoding="utf-8"))
    assert board["uid"] and board["title"] and board["panels"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert all(ds == {"type": "prometheus", "uid": "${datasource}"} for ds in datasources(board))
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    exprs = expressions(board)
    assert exprs, "panels query something"
    known = registered_metrics()
    unknown = {name for expr in exprs for name in metric_names(expr)} - known
    assert not unknown, f"{path.name} reads metrics nothing registers: {sorted(unknown)}"


def test_the_metric_name_check_catches_a_renamed_metric() -> None:
    assert metric_names('sum by (job) (rate(http_requests_total{status=~"5.."}[5m]))') == {"http_requests_total"}
    assert metric_names("label_values(nichiiki_outbox_published_total, job)") == {"nichiiki_outbox_published_total"}
    assert "nichiiki_consumer_lagg" not in registered_metrics()
    assert {"nichiiki_consumer_lag", "nichiiki_outbox_backlog", "nichiiki_dead_letters_total",
            "nichiiki_email_messages_total", "process_resident_memory_bytes"} <= registered_metrics()
