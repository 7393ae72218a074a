"""The console's SVG charts and the insights pages, in-process: the drawing holds the figures it is
given (points, bars, the 600 line), is named and described for screen readers, and the pages put
the insights service's figures in charts and tables, show its refusal on the page, and withhold
small public cells as 「10未満」."""

from __future__ import annotations

import re
from datetime import date
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from services.console.charts import Line, bar_chart, line_chart, nice_ceiling, number
from services.console.clients import ApiError, Json, Services
from services.console.main import create_app
from services.console.pages.base import Console
from services.console.pages.insights import by_prefecture, donations_by_month, largest, monthly_totals
from services.console.session import COOKIE, Session, SessionStore
from services.insights import domain, views
from shared.kit.settings import Settings

# --- charts -----------------------------------------------------------------------------------------


def _points(svg: str, series: str) -> list[tuple[float, float]]:
    d = re.search(rf'<path data-series="{series}" d="([^"]*)"', svg)
    assert d is not None, svg
    return [(float(x), float(y)) for x, y in re.findall(r"[ML]([\d.]+),([\d.]+)", d.group(1))]


def test_a_line_chart_draws_each_line_through_its_values_and_stops_at_a_gap() -> None:
    svg = str(line_chart(chart_id="c", title="計画 <KPI>", desc="説明", labels=["1", "2", "3", "4"], y_max=600,
                         lines=[Line("actual", "実績", [0, 300, None, None]),
                                Line("line", "目標線", [150, 300, 450, 600], dashed=True)]))
    assert 'role="img"' in svg and 'aria-labelledby="c-title c-desc"' in svg
    assert '<title id="c-title">計画 &lt;KPI&gt;</title>' in svg  # escaped, never markup
    actual, line = _points(svg, "actual"), _points(svg, "line")
    assert len(actual) == 2 and len(line) == 4
    # Same value, same height; 600 at the top, 0 at the bottom, x evenly spaced.
    assert actual[1][1] == line[1][1]
    bottom, top = actual[0][1], line[3][1]
    assert bottom > top and line[2][1] == pytest.approx(bottom - (bottom - top) * 450 / 600, abs=0.1)
    assert line[1][0] - line[0][0] == pytest.approx(line[3][0] - line[2][0], abs=0.1)
    assert re.search(r'data-series="line"[^>]*stroke-dasharray', svg)  # told apart without colour
    grid = sorted(float(y) for y in re.findall(r'<line class="grid"[^>]*y1="([\d.]+)"', svg))
    assert grid[0] == pytest.approx(top, abs=0.1) and grid[-1] == pytest.approx(bottom, abs=0.1)
    assert ">600</text>" in svg and ">0</text>" in svg


def test_a_gap_in_the_middle_starts_a_new_stretch_of_the_same_line() -> None:
    svg = str(line_chart(chart_id="g", title="t", desc="d", labels=list("abcde"),
                         lines=[Line("x", "x", [1, 2, None, 4, 5])]))
    d = re.search(r'data-series="x" d="([^"]*)"', svg)
    assert d is not None and d.group(1).count("M") == 2 and d.group(1).count("L") == 2


def test_a_bar_chart_has_a_bar_per_figure_proportional_to_it() -> None:
    svg = str(bar_chart(chart_id="b", title="登録者", desc="上位", bars=[("白浜町", 40), ("田辺市", 10), ("0人", 0)]))
    widths = {label: (float(w), float(v)) for label, v, w in
              re.findall(r'data-label="([^"]+)" data-value="([\d.]+)" x="[\d.]+" y="[\d.]+" width="([\d.]+)"', svg)}
    assert set(widths) == {"白浜町", "田辺市", "0人"}
    assert widths["白浜町"][0] == pytest.approx(4 * widths["田辺市"][0], abs=0.2) and widths["0人"][0] == 0
    assert ">40</text>" in svg and "<desc id=\"b-desc\">上位</desc>" in svg


@pytest.mark.parametrize("value, ceiling", [(0, 1), (7, 10), (28, 50), (51, 100), (600, 1000), (1200, 2000),
                                            (2400, 2500)])
def test_an_axis_ends_on_a_round_number(value: float, ceiling: float) -> None:
    assert nice_ceiling(value) == ceiling


def test_numbers_read_as_people_write_them() -> None:
    assert (number(1234567), number(12.5), number(None), number(3.0)) == ("1,234,567", "12.5", "—", "3")


# --- shaping the service's rows ----------------------------------------------------------------------


def test_rows_are_summed_per_prefecture_month_and_unit() -> None:
    rows = [{"prefecture_code": "300004", "basic": 3, "premium": 1, "total": 4},
            {"prefecture_code": "300004", "basic": 2, "premium": 0, "total": 2},
            {"prefecture_code": "130001", "basic": 1, "premium": 1, "total": 2}]
    assert by_prefecture(rows, ("basic", "premium", "total")) == [
        {"prefecture_code": "130001", "prefecture_name": "東京都", "basic": 1, "premium": 1, "total": 2},
        {"prefecture_code": "300004", "prefecture_name": "和歌山県", "basic": 5, "premium": 1, "total": 6}]
    monthly = [{"month": "2026-01-01", "tier": "basic", "new": 3, "ended": 1},
               {"month": "2026-01-01", "tier": "premium", "new": 1, "ended": 0},
               {"month": "2025-12-01", "tier": "basic", "new": 2, "ended": 0}]
    assert monthly_totals(monthly) == [{"month": "2025-12", "basic": 2, "premium": 0, "ended": 0},
                                       {"month": "2026-01", "basic": 3, "premium": 1, "ended": 1}]
    donations = [{"month": "2026-01-01", "unit": "jpy", "count": 2, "amount": 30000, "refunded": 1},
                 {"month": "2026-01-01", "unit": "jpy", "count": 1, "amount": 10000, "refunded": 0},
                 {"month": "2026-01-01", "unit": "miles", "count": 1, "amount": 5000, "refunded": 0}]
    assert donations_by_month(donations) == [
        {"month": "2026-01", "unit": "jpy", "count": 3, "amount": 40000, "refunded": 1},
        {"month": "2026-01", "unit": "miles", "count": 1, "amount": 5000, "refunded": 0}]
    assert largest([{"n": "a", "v": 1}, {"n": "b", "v": 5}, {"n": "c", "v": 5}], "n", "v", 2) == [("b", 5), ("c", 5)]


# --- the pages, in-process, over a stub of the insights service --------------------------------------


def _kpis() -> Json:
    """The service's own KPI view of a few plans and corporations (its domain, not a hand-made copy)."""
    k = domain.kpis([(date(2025, 3, 10), None), (date(2025, 6, 1), date(2025, 9, 1)), (date(2025, 8, 1), None)],
                    [(date(2025, 1, 15), None)], today=date(2026, 1, 20))
    return views.kpi_view(k).model_dump(mode="json")


class Insights(Services):
    """The insights service as the pages call it: tables by name; Tokyo refused to a Wakayama reader."""

    def __init__(self) -> None:
        super().__init__({}, http=httpx.AsyncClient())
        self.asked: list[tuple[str, dict[str, Any]]] = []

    async def insights(self, token: str, table: str, **query: Any) -> Json:
        self.asked.append((table, query))
        if query.get("prefecture") == "130001":
            raise ApiError(403, "out-of-scope", "prefecture 300004 only")
        if table == "kpis":
            return _kpis()
        rows = {"registrations": [{"prefecture_code": "300004", "municipality_code": "304018",
                                   "municipality_name": "和歌山県白浜町", "basic": 12, "premium": 3, "total": 15}],
                "registrations/monthly": [{"municipality_code": "304018", "municipality_name": "和歌山県白浜町",
                                           "month": "2026-01-01", "tier": "basic", "new": 12, "ended": 0}]}
        return {"scope": "300004", "rows": rows.get(table, [])}

    async def public_insights(self, table: str, client_ip: str | None, **query: Any) -> Json:
        if table == "kpis":
            return _kpis()
        return {"scope": "300004", "rows": [
            {"municipality_code": "304018", "municipality_name": "和歌山県白浜町",
             "values": {"basic": 12, "premium": None, "total": None}, "suppressed": ["premium", "total"]}]}


class Sessions(SessionStore):
    def __init__(self) -> None:
        self.ttl_s = 3600
        self.sessions = {
            role: Session(id=f"s-{role}", csrf="c", access_token="t", refresh_token="r", expires_at=4e9,
                          subject=role, role=role, username=f"{role}@example.jp",
                          prefecture="300004" if role == "prefecture" else None)
            for role in ("ministry", "prefecture")
        }

    async def load(self, session_id: str | None) -> Session | None:
        return next((s for s in self.sessions.values() if s.id == session_id), None)

    async def save(self, session: Session) -> None:
        self.sessions[session.role] = session


@pytest.fixture(scope="module")
def app() -> tuple[FastAPI, Insights]:
    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0", env="development"))
    services = Insights()
    app.state.console = Console(services=services, sessions=Sessions(), redis=None,  # type: ignore[arg-type]
                                verifier=None, secure_cookies=True, development=False)  # type: ignore[arg-type]
    return app, services


async def _get(app: FastAPI, path: str, role: str | None) -> httpx.Response:
    cookies = {COOKIE: f"s-{role}"} if role else {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://console.test",
                                 cookies=cookies) as client:
        return await client.get(path)


async def test_the_kpi_page_draws_both_lines_and_tabulates_the_services_figures(app: tuple[FastAPI, Insights]
                                                                              ) -> None:
    response = await _get(app[0], "/insights", "ministry")
    assert response.status_code == 200, response.text[:500]
    page, kpis = response.text, _kpis()
    for key in ("plans", "corporations"):
        chart = re.search(rf'<svg class="chart" id="kpi-{key}".*?</svg>', page, re.S)
        assert chart is not None
        assert len(_points(chart.group(0), "line")) == len(kpis["series"]) == 60
        # Months to come carry the line only: the actual stops at January 2026 (15 month ends).
        assert len(_points(chart.group(0), "actual")) == 15
    assert '<dd data-kpi="plans"><span class="count">2 / 600</span>' in page  # one withdrawn on 2025-09-01
    assert '<dd data-kpi="corporations"><span class="count">1 / 600</span>' in page
    august = re.search(r'<tr data-month="2025-08-31">(.*?)</tr>', page)
    assert august is not None and '<td class="num" data-series="plans">3</td>' in august.group(1)
    last = '<tr data-month="2029-10-31"><th scope="row">2029-10-31</th><td class="num" data-series="plans">—</td>'
    assert last in page
    assert 'href="/insights/kpis.csv"' in page


async def test_a_table_page_has_its_chart_its_table_and_its_csv_link_in_the_asked_scope(
    app: tuple[FastAPI, Insights]
) -> None:
    application, services = app
    response = await _get(application, "/insights/registrations?prefecture=300004&municipality=304018", "ministry")
    assert response.status_code == 200
    assert ("registrations", {"prefecture": "300004", "municipality": "304018"}) in services.asked
    assert 'data-label="和歌山県白浜町" data-value="15"' in response.text
    assert 'href="/insights/registrations.csv?prefecture=300004&amp;municipality=304018"' in response.text
    assert '<option value="304018" selected>' in response.text  # the filter keeps the choice


async def test_a_refused_scope_is_said_on_the_page_itself(app: tuple[FastAPI, Insights]) -> None:
    response = await _get(app[0], "/insights/registrations?prefecture=130001", "prefecture")
    assert response.status_code == 403
    assert "この地域の集計を見る権限がありません" in response.text and 'role="alert"' in response.text
    assert "<h1>ふるさと住民登録</h1>" in response.text and "<svg" not in response.text
    # A prefecture reader chooses among their own municipalities, never a prefecture.
    assert 'name="prefecture"' not in response.text and '<option value="304018"' in response.text


async def test_the_public_page_shows_withheld_cells_as_under_10_without_signing_in(
    app: tuple[FastAPI, Insights]
) -> None:
    response = await _get(app[0], "/public/insights?prefecture=300004", None)
    assert response.status_code == 200
    row = re.search(r'<tr data-code="304018">(.*?)</tr>', response.text)
    assert row is not None
    assert row.group(1).count("10未満") == 2 and '<td class="num">12</td>' in row.group(1)
    assert 'id="kpi-plans"' in response.text
    english = await _get_english(app[0], "/public/insights?prefecture=300004")
    assert "&lt;10" in english


async def _get_english(app: FastAPI, path: str) -> str:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://console.test",
                                 cookies={"nichiiki_lang": "en"}) as client:
        return (await client.get(path)).text
