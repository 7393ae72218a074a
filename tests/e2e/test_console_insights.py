"""The national picture in the console, in a real browser (issue #20): planning seeds its reference
plans and corporations as events, insights reads them, and

1. a ministry reader signs in and sees the KPI page: two SVG charts, each with the month-end line of
   what is in force and the straight line to 600, and the figures the insights API answers, in the
   summary and the table; the KPI CSV comes through with a BOM and Japanese headings;
2. a prefecture reader who edits the URL to another prefecture gets the service's refusal as a page
   (403, said in Japanese, the filter kept);
3. anyone, signed out, sees the public page with the small cells withheld as 「10未満」.

axe-core runs on every page (``Browser.checked``): no serious or critical violation. The KPI page's
screenshot goes to docs/console/ (docs/console.md shows it).
"""

from __future__ import annotations

import csv
import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.cli.fleet import ServiceFleet
from shared.kit.settings import Settings
from shared.stack.backends import Backends
from tests.e2e.test_console import DESKTOP, DOCS_SHOTS, Browser, _chromium, browser, console_settings

__all__ = ["browser", "console_settings"]  # the fixtures, used here by name

pytestmark = [pytest.mark.stack, pytest.mark.timeout(420)]

SERVICES = ("planning", "insights", "identity", "console")
MINISTRY = ("reader@mlit.example", "nichiiki-dev-ministry-pass")
WAKAYAMA_READER = ("reader@pref.wakayama.example", "nichiiki-dev-prefecture-pass")
WAKAYAMA, TOKYO = "300004", "130001"
#: The planning service's reference seed (MLIT, end of 2025).
SEED_PLANS, SEED_CORPORATIONS = 28, 51


@pytest.fixture(scope="module")
def fleet(console_settings: Settings, backends: Backends, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[ServiceFleet]:
    _chromium()
    fleet = ServiceFleet(console_settings, backends, tmp_path_factory.mktemp("insights-console-logs"))
    try:
        fleet.start(SERVICES)
        yield fleet
    finally:
        fleet.stop()


def _api_kpis(fleet: ServiceFleet) -> dict[str, object]:
    """What the insights API answers the ministry reader (their own token, as the console uses)."""
    token = httpx.post(f"{fleet.url('identity')}/oauth/token", data={
        "grant_type": "password", "username": MINISTRY[0], "password": MINISTRY[1]}, timeout=10)
    token.raise_for_status()
    answer = httpx.get(f"{fleet.url('insights')}/v1/insights/kpis", timeout=10,
                       headers={"authorization": f"Bearer {token.json()['access_token']}"})
    answer.raise_for_status()
    body: dict[str, object] = answer.json()
    return body


def _shot_for_docs(path: Path, name: str) -> None:
    DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, DOCS_SHOTS / f"{name}.png")


def test_1_the_ministry_sees_the_kpis_against_the_600_lines(browser: Browser, fleet: ServiceFleet) -> None:
    browser.size(DESKTOP)
    browser.sign_in(*MINISTRY)
    assert browser.path == "/insights", browser.path  # where ministry readers land
    # Insights reads the seed's events as they come: wait for all of them.
    made = f"これまでの作成・指定 {SEED_CORPORATIONS}件"
    browser.until("the seeded corporations", lambda: made in browser.text, timeout=90)
    api = _api_kpis(fleet)
    assert api["plans_made"] == SEED_PLANS and api["corporations_made"] == SEED_CORPORATIONS, api

    find = browser.driver.find_element
    summary = {key: find("css selector", f"dd[data-kpi='{key}'] .count").text for key in ("plans", "corporations")}
    assert summary == {"plans": f"{api['plans_in_force']} / 600",
                       "corporations": f"{api['corporations_designated']} / 600"}, summary

    for key in ("plans", "corporations"):
        chart = find("css selector", f"svg#kpi-{key}")
        assert chart.get_attribute("role") == "img"
        assert find("css selector", f"#kpi-{key}-title").get_attribute("textContent").startswith(
            "特定居住" if key == "plans" else "特定居住支援法人")
        actual = chart.find_element("css selector", "path[data-series='actual']").get_attribute("d")
        line = chart.find_element("css selector", "path[data-series='line']").get_attribute("d")
        assert chart.find_element("css selector", "path[data-series='line']").get_attribute("stroke-dasharray")
        # The line runs over the five years, one point per month end; the actual stops at this month.
        series = api["series"]
        assert isinstance(series, list)
        assert line.count("M") == 1 and line.count("L") == len(series) - 1, line
        started = [p for p in series if p[key] is not None]
        assert actual.count("M") == 1 and actual.count("L") == len(started) - 1, actual
        # The line ends at the top of the axis (600 at the deadline), where the y axis says 600.
        last_y = float(line.rsplit(",", 1)[1])
        first_grid = min(float(g.get_attribute("y1")) for g in chart.find_elements("css selector", "line.grid"))
        assert abs(last_y - first_grid) < 0.2, (last_y, first_grid)
        assert "600" in [t.text for t in chart.find_elements("css selector", "text")]

    # The table holds the API's figures, month end by month end.
    rows = browser.driver.find_elements("css selector", "table.kpi-table tbody tr")
    assert len(rows) == len(api["series"])  # type: ignore[arg-type]
    for row, point in zip(rows, api["series"], strict=True):  # type: ignore[call-overload]
        assert row.get_attribute("data-month") == point["month_end"]
        cells = {c.get_attribute("data-series"): c.text for c in row.find_elements("css selector", "td")}
        for key in ("plans", "corporations"):
            assert cells[key] == ("—" if point[key] is None else f"{point[key]:,}"), (point, cells)
        assert float(cells["line"]) == point["line"]
    # The screenshot shows the first chart whole: its actual line and the line to 600.
    browser.driver.execute_script("document.getElementById('kpi-plans-heading').scrollIntoView()")
    _shot_for_docs(browser.shot("insights-kpis"), "insights-kpis")

    status, body = browser.fetch("/insights/kpis.csv")
    assert status == 200 and body.startswith(b"\xef\xbb\xbf"), body[:20]
    table = list(csv.reader(io.StringIO(body.decode("utf-8-sig"))))
    assert table[0] == ["月末", "特定居住促進計画", "特定居住支援法人", "目標線"], table[0]
    assert len(table) == 1 + len(api["series"])  # type: ignore[arg-type]

    # The other figures pages render for the ministry (nationwide), each with its chart or "none".
    for page in ("registrations", "certificates", "programmes", "donations", "relationship-population"):
        browser.go(f"/insights/{page}")
        assert browser.driver.find_element("tag name", "h1").text, page
        assert "全国" in browser.text, browser.text
    # the population behind "per 1,000 inhabitants" names its source, as its licence asks
    assert "総務省「住民基本台帳に基づく人口、人口動態及び世帯数」" in browser.text, browser.text
    browser.sign_out()


def test_2_a_prefecture_reader_asking_for_another_prefecture_is_told_no(browser: Browser) -> None:
    browser.size(DESKTOP)
    browser.sign_in(*WAKAYAMA_READER)
    browser.go("/insights/registrations")
    assert "和歌山県" in browser.text, browser.text
    browser.go(f"/insights/registrations?prefecture={TOKYO}")
    summary = browser.driver.find_element("css selector", ".error-summary")
    assert "この地域の集計を見る権限がありません" in summary.text, summary.text
    assert browser.driver.find_element("tag name", "h1").text == "ふるさと住民登録"
    status, _ = browser.fetch(f"/insights/registrations?prefecture={TOKYO}")
    assert status == 403
    status, _ = browser.fetch(f"/insights/registrations.csv?prefecture={TOKYO}")
    assert status == 403
    browser.sign_out()


def test_3_the_public_page_withholds_small_cells(browser: Browser) -> None:
    browser.size(DESKTOP)
    browser.go(f"/public/insights?prefecture={WAKAYAMA}")
    assert "10未満" in browser.text, browser.text
    rows = browser.driver.find_elements("css selector", "table.public-registrations tbody tr")
    assert len(rows) == 30  # every municipality of 和歌山県, registered there or not
    shirahama = browser.driver.find_element("css selector", "table.public-registrations tr[data-code='304018']")
    assert shirahama.find_elements("css selector", "td[data-suppressed='true']")
    assert browser.driver.find_elements("css selector", "svg#kpi-plans path[data-series='line']")
