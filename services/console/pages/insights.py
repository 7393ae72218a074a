"""The national picture (issue #20): the KPI page and the figures tables of the insights service,
each with a chart (``services.console.charts``, server-rendered SVG) and its numbers in a table, and
the public page (no sign-in: the service's suppressed tables).

The insights service decides the scope: municipal staff get their municipality, prefecture readers
their prefecture's municipalities, the ministry and admins everything. The console only offers the
choices that make sense for the role, and shows the service's refusal (another prefecture asked for
by editing the URL) on the same page, filter kept, so the reader can choose again.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from markupsafe import Markup

from services.console import i18n
from services.console.charts import BRAND, TARGET, Line, bar_chart, line_chart
from services.console.clients import ApiError, Json
from services.console.pages.base import Viewer, problem_errors, signed_in, viewer_of
from services.console.pages.downloads import service_csv
from shared.reference import municipalities, prefectures

router = APIRouter(include_in_schema=False)

Reader = Annotated[Viewer, Depends(signed_in("prefecture", "ministry", "admin", "staff"))]
Anyone = Annotated[Viewer, Depends(viewer_of)]

#: The tables a reader may download, as the service names them (its ``<table>.csv`` routes).
CSV_TABLES = ("registrations", "registrations-monthly", "certificates", "programmes", "donations",
              "relationship-population", "kpis")
#: The insights sub-pages, in the order of their tabs.
PAGES = ("kpis", "registrations", "certificates", "programmes", "donations", "relationship-population")
#: How many bars a chart shows (the largest); the table below it has every row.
TOP = 15


# --- pure shaping of the service's rows for charts and tables -----------------------------------------


def by_prefecture(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> list[dict[str, Any]]:
    """Rows summed per prefecture (``prefecture_code``), the prefecture's name added, by code."""
    sums: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(columns, 0))
    for row in rows:
        for column in columns:
            sums[row["prefecture_code"]][column] += int(row[column] or 0)
    names = {p.code: p.name for p in prefectures()}
    return [{"prefecture_code": code, "prefecture_name": names.get(code, code), **values}
            for code, values in sorted(sums.items())]


def monthly_totals(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """New registrations per month by tier, and ended ones, over every municipality of the scope."""
    months: dict[str, dict[str, int]] = defaultdict(lambda: {"basic": 0, "premium": 0, "ended": 0})
    for row in rows:
        month = months[str(row["month"])[:7]]
        month[row["tier"] if row["tier"] in ("basic", "premium") else "basic"] += int(row["new"])
        month["ended"] += int(row["ended"])
    return [{"month": month, **values} for month, values in sorted(months.items())]


def donations_by_month(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Donations per month and unit (yen, points…): how many and how much, refunds apart."""
    months: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: {"count": 0, "amount": 0, "refunded": 0})
    for row in rows:
        month = months[(str(row["month"])[:7], str(row["unit"]))]
        for column in ("count", "amount", "refunded"):
            month[column] += int(row[column])
    return [{"month": month, "unit": unit, **values} for (month, unit), values in sorted(months.items())]


def largest(rows: Iterable[Mapping[str, Any]], label: str, value: str, n: int = TOP) -> list[tuple[str, float]]:
    """The ``n`` largest rows as (label, value) bars, largest first (ties by label, so a page is stable)."""
    bars = [(str(row[label]), float(row[value] or 0)) for row in rows]
    return sorted(bars, key=lambda bar: (-bar[1], bar[0]))[:n]


def kpi_charts(kpis: Mapping[str, Any], t: Any) -> dict[str, Markup]:
    """One line chart per KPI: what was in force at each month end, and the straight line to the
    target at the deadline."""
    series = kpis["series"]
    labels = [str(point["month_end"])[:7] for point in series]
    target = float(kpis["target"])
    charts = {}
    for key in ("plans", "corporations"):
        charts[key] = line_chart(
            chart_id=f"kpi-{key}", title=t(f"insights.kpi.{key}"),
            desc=t("insights.kpi.desc", name=t(f"insights.kpi.{key}"), target=int(target),
                   deadline=str(kpis["deadline"]), actual=_in_force(kpis, key), as_of=str(kpis["as_of"]),
                   line=kpis["line_today"]),
            labels=labels, tick_every=12, y_max=target,
            lines=[Line("actual", t("insights.kpi.actual"), [p[key] for p in series], BRAND),
                   Line("line", t("insights.kpi.line", target=int(target)), [p["line"] for p in series], TARGET,
                        dashed=True)],
        )
    return charts


def _in_force(kpis: Mapping[str, Any], key: str) -> int:
    return int(kpis["plans_in_force"] if key == "plans" else kpis["corporations_designated"])


# --- the reader's scope -----------------------------------------------------------------------------


def _scope_query(request: Request) -> dict[str, str]:
    """``prefecture`` / ``municipality`` as asked (the service checks them and the reader's right)."""
    return {name: value for name in ("prefecture", "municipality")
            if (value := request.query_params.get(name, "").strip())}


def _area_choices(viewer: Viewer, query: Mapping[str, str]) -> dict[str, list[tuple[str, str]]]:
    """The filter's choices: the ministry and admins pick a prefecture then a municipality of it;
    prefecture readers a municipality of their own; municipal staff nothing (theirs only)."""
    session = viewer.signed_in
    choices: dict[str, list[tuple[str, str]]] = {}
    if session.role in ("ministry", "admin"):
        choices["prefecture"] = [(p.code, p.name) for p in prefectures()]
    prefecture = session.prefecture if session.role == "prefecture" else query.get("prefecture")
    if session.role != "staff" and prefecture:
        choices["municipality"] = [
            (m.code, m.full_name) for m in sorted(municipalities().values(), key=lambda m: m.code)
            if m.prefecture_code == prefecture and m.kind not in ("prefecture", "designated_ward")
            and not m.northern_territories
        ]
    return choices


async def _page(viewer: Viewer, request: Request, page: str, tables: Sequence[str],
                shape: Any) -> Response:
    """Fetch ``tables`` in the reader's scope and render ``insights/<page>.html`` with what ``shape``
    makes of them; a refusal (out of scope, no such area) is shown on the same page, filter kept."""
    query = _scope_query(request)
    context: dict[str, Any] = {"page": page, "area": query, "choices": _area_choices(viewer, query),
                               "csv_query": "&".join(f"{k}={v}" for k, v in query.items())}
    try:
        token = await viewer.token()
        fetched = {table: await viewer.services.insights(token, table, **(query if table != "kpis" else {}))
                   for table in tables}
    except ApiError as error:
        if error.status not in (403, 404, 422):
            raise
        return viewer.render(f"insights/{page}.html", status=error.status, errors=problem_errors(error, viewer.lang),
                             refused=True, **context)
    return viewer.render(f"insights/{page}.html", refused=False, **context, **shape(viewer, fetched))


# --- pages ------------------------------------------------------------------------------------------


@router.get("/insights")
async def kpis_page(viewer: Reader, request: Request) -> Response:
    def shape(viewer: Viewer, fetched: dict[str, Json]) -> dict[str, Any]:
        kpis = fetched["kpis"]
        return {"kpis": kpis, "charts": kpi_charts(kpis, viewer.t)}

    return await _page(viewer, request, "kpis", ("kpis",), shape)


@router.get("/insights/registrations")
async def registrations_page(viewer: Reader, request: Request) -> Response:
    def shape(viewer: Viewer, fetched: dict[str, Json]) -> dict[str, Any]:
        rows, monthly = fetched["registrations"]["rows"], monthly_totals(fetched["registrations/monthly"]["rows"])
        t = viewer.t
        return {
            "scope": fetched["registrations"]["scope"], "rows": rows, "monthly": monthly,
            "prefectures": by_prefecture(rows, ("basic", "premium", "total")),
            "bars": bar_chart(chart_id="registrations-bars", title=t("insights.registrations.chart"),
                              desc=t("insights.chart.top", n=min(TOP, len(rows)), total=len(rows)),
                              bars=largest(rows, "municipality_name", "total")),
            "line": line_chart(chart_id="registrations-monthly", title=t("insights.registrations.monthly"),
                               desc=t("insights.chart.monthly", months=len(monthly)),
                               labels=[m["month"] for m in monthly],
                               tick_every=max(len(monthly) // 6, 1),
                               lines=[Line("basic", t("tier.basic"), [m["basic"] for m in monthly], BRAND),
                                      Line("premium", t("tier.premium"), [m["premium"] for m in monthly], TARGET,
                                           dashed=True)]),
        }

    return await _page(viewer, request, "registrations", ("registrations", "registrations/monthly"), shape)


@router.get("/insights/certificates")
async def certificates_page(viewer: Reader, request: Request) -> Response:
    def shape(viewer: Viewer, fetched: dict[str, Json]) -> dict[str, Any]:
        rows = fetched["certificates"]["rows"]
        return {"scope": fetched["certificates"]["scope"], "rows": rows,
                "prefectures": by_prefecture(rows, ("valid", "revoked", "expired")),
                "bars": bar_chart(chart_id="certificates-bars", title=viewer.t("insights.certificates.chart"),
                                  desc=viewer.t("insights.chart.top", n=min(TOP, len(rows)), total=len(rows)),
                                  bars=largest(rows, "municipality_name", "valid"))}

    return await _page(viewer, request, "certificates", ("certificates",), shape)


@router.get("/insights/programmes")
async def programmes_page(viewer: Reader, request: Request) -> Response:
    def shape(viewer: Viewer, fetched: dict[str, Json]) -> dict[str, Any]:
        rows = fetched["programmes"]["rows"]
        labelled = [{**row, "label": f"{row['program_id']} ({i18n.label('unit', row['unit'], viewer.lang)})"}
                    for row in rows]
        return {"scope": fetched["programmes"]["scope"], "rows": rows,
                "bars": bar_chart(chart_id="programmes-bars", title=viewer.t("insights.programmes.chart"),
                                  desc=viewer.t("insights.chart.top", n=min(TOP, len(rows)), total=len(rows)),
                                  bars=largest(labelled, "label", "spent"), label_width=320)}

    return await _page(viewer, request, "programmes", ("programmes",), shape)


@router.get("/insights/donations")
async def donations_page(viewer: Reader, request: Request) -> Response:
    def shape(viewer: Viewer, fetched: dict[str, Json]) -> dict[str, Any]:
        rows = fetched["donations"]["rows"]
        months = donations_by_month(rows)
        yen = [m for m in months if m["unit"] == "jpy"]
        return {"scope": fetched["donations"]["scope"], "rows": rows, "months": months,
                "line": line_chart(chart_id="donations-monthly", title=viewer.t("insights.donations.chart"),
                                   desc=viewer.t("insights.chart.monthly", months=len(yen)),
                                   labels=[m["month"] for m in yen], tick_every=max(len(yen) // 6, 1),
                                   lines=[Line("amount", viewer.t("insights.donations.amount_yen"),
                                               [m["amount"] for m in yen], BRAND)])}

    return await _page(viewer, request, "donations", ("donations",), shape)


@router.get("/insights/relationship-population")
async def relationship_page(viewer: Reader, request: Request) -> Response:
    def shape(viewer: Viewer, fetched: dict[str, Json]) -> dict[str, Any]:
        rows = fetched["relationship-population"]["rows"]
        return {"scope": fetched["relationship-population"]["scope"], "rows": rows,
                "prefectures": by_prefecture(rows, ("registered", "certified", "people")),
                "bars": bar_chart(chart_id="relationship-bars", title=viewer.t("insights.relationship.chart"),
                                  desc=viewer.t("insights.chart.top", n=min(TOP, len(rows)), total=len(rows)),
                                  bars=largest(rows, "municipality_name", "people"))}

    return await _page(viewer, request, "relationship-population", ("relationship-population",), shape)


@router.get("/insights/{table}.csv")
async def insights_csv(viewer: Reader, request: Request, table: str) -> Response:
    """The service's CSV of ``table`` in the reader's scope, passed on as it comes."""
    if table not in CSV_TABLES:
        return viewer.render("error.html", status=404, errors=[("", viewer.t("error.not_found_page"))])
    path = "/v1/insights/registrations/monthly.csv" if table == "registrations-monthly" else f"/v1/insights/{table}.csv"
    query = _scope_query(request) if table != "kpis" else {}
    label = query.get("municipality") or query.get("prefecture") or viewer.signed_in.municipality \
        or (viewer.signed_in.prefecture if viewer.signed_in.role == "prefecture" else None) or "national"
    return await service_csv(viewer, "insights", path, f"insights-{table}-{label}.csv", query)


# --- the public page --------------------------------------------------------------------------------


@router.get("/public/insights")
async def public_page(viewer: Anyone, request: Request) -> Response:
    """The KPIs, and for a chosen prefecture the registrations and relationship population of every
    municipality with counts under 10 withheld (shown as 「10未満」)."""
    prefecture = request.query_params.get("prefecture", "").strip()
    client = request.client.host if request.client else None
    context: dict[str, Any] = {"prefecture": prefecture,
                               "choices": [(p.code, p.name) for p in prefectures()]}
    try:
        kpis = await viewer.services.public_insights("kpis", client)
        context |= {"kpis": kpis, "charts": kpi_charts(kpis, viewer.t)}
        if prefecture:
            registrations = await viewer.services.public_insights("registrations", client, prefecture=prefecture)
            relationship = await viewer.services.public_insights("relationship-population", client,
                                                                 prefecture=prefecture)
            context |= {"registrations": registrations["rows"], "relationship": relationship["rows"]}
    except ApiError as error:
        if error.status not in (404, 422, 429):
            raise
        return viewer.render("insights/public.html", status=error.status, errors=problem_errors(error, viewer.lang),
                             **context)
    return viewer.render("insights/public.html", **context)

