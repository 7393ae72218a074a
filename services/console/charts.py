"""Charts as server-rendered SVG: no JavaScript, no library, nothing fetched (closed municipal networks).

Each chart is an ``<svg role="img">`` named by its ``<title>`` and described by its ``<desc>``
(screen readers read those, not the drawing); the page puts the same figures in a table next to
it, so the numbers are never only in a picture. Colours keep 3:1 against white (WCAG 1.4.11), and
the target line is dashed as well as coloured, so it is told apart without colour.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

INK = "#1b1b1b"
GRID = "#8a8a8a"
BRAND = "#0b4f8a"
TARGET = "#a4161a"
#: Text inside the drawing, in the page's own font (the console serves IPAexGothic).
FONT = 'font-family="inherit" font-size="13"'


@dataclass(frozen=True, slots=True)
class Line:
    """One line of a line chart: ``values`` align with the chart's labels; None leaves a gap (a month
    still to come)."""

    key: str
    name: str
    values: Sequence[float | None]
    colour: str = BRAND
    dashed: bool = False


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 × 10ⁿ at or above ``value`` (an axis ends on a round number)."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * power:
            return float(step * power)
    return float(10 * power)  # pragma: no cover - the loop always returns


def ticks(maximum: float, count: int = 5) -> list[float]:
    """``count`` + 1 evenly spaced values from 0 to ``maximum``."""
    return [maximum * i / count for i in range(count + 1)]


def number(value: float | None) -> str:
    """A figure as people read it: 1,234 or 12.5; an absent value as a dash."""
    if value is None:
        return "—"
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.1f}"


def _open(chart_id: str, title: str, desc: str, width: int, height: int, key: str) -> list[str]:
    return [
        f'<svg class="chart" id="{escape(chart_id)}" data-chart="{escape(key)}" role="img" '
        f'aria-labelledby="{escape(chart_id)}-title {escape(chart_id)}-desc" viewBox="0 0 {width} {height}" '
        f'width="100%" preserveAspectRatio="xMinYMin meet" xmlns="http://www.w3.org/2000/svg">',
        f'<title id="{escape(chart_id)}-title">{escape(title)}</title>',
        f'<desc id="{escape(chart_id)}-desc">{escape(desc)}</desc>',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
    ]


def line_chart(
    *, chart_id: str, title: str, desc: str, labels: Sequence[str], lines: Sequence[Line], tick_every: int = 1,
    width: int = 720, height: int = 320, y_max: float | None = None,
) -> Markup:
    """Lines over the same x labels (months), a y axis from 0, a legend on top. Each line is one
    ``<path data-series="<key>">``: a gap in the values starts a new stretch of the same path."""
    left, right, top, bottom = 56, 16, 40, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    highest = max((v for line in lines for v in line.values if v is not None), default=0.0)
    y_top = y_max if y_max is not None else nice_ceiling(highest)
    n = len(labels)

    def x(i: int) -> float:
        return left + (plot_w * i / (n - 1) if n > 1 else plot_w / 2)

    def y(v: float) -> float:
        return top + plot_h - plot_h * min(v, y_top) / y_top

    out = _open(chart_id, title, desc, width, height, "line")
    for value in ticks(y_top):
        out.append(f'<line class="grid" x1="{left}" x2="{left + plot_w}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
                   f'stroke="{GRID}" stroke-width="{1 if value else 1.5}" stroke-opacity="{0.5 if value else 1}"/>')
        out.append(f'<text x="{left - 6}" y="{y(value) + 4:.1f}" text-anchor="end" fill="{INK}" {FONT}>'
                   f'{escape(number(value))}</text>')
    for i, label in enumerate(labels):
        if i % max(tick_every, 1) == 0 or i == n - 1:
            out.append(f'<line x1="{x(i):.1f}" x2="{x(i):.1f}" y1="{top + plot_h}" y2="{top + plot_h + 5}" '
                       f'stroke="{INK}"/>')
            anchor = "end" if i == n - 1 and n > 1 else "middle" if i else "start"
            out.append(f'<text x="{x(i):.1f}" y="{top + plot_h + 20}" text-anchor="{anchor}" fill="{INK}" {FONT}>'
                       f'{escape(label)}</text>')
    for line in lines:
        commands, pen_down = [], False
        for i, point in enumerate(line.values[:n]):
            if point is None:
                pen_down = False
                continue
            commands.append(f"{'L' if pen_down else 'M'}{x(i):.1f},{y(point):.1f}")
            pen_down = True
        dash = ' stroke-dasharray="8 5"' if line.dashed else ""
        out.append(f'<path data-series="{escape(line.key)}" d="{" ".join(commands)}" fill="none" '
                   f'stroke="{line.colour}" stroke-width="3"{dash}/>')
    legend_x = left
    for line in lines:  # the legend: a short stroke of each line's own style, then its name
        dash = ' stroke-dasharray="8 5"' if line.dashed else ""
        out.append(f'<line x1="{legend_x}" x2="{legend_x + 28}" y1="16" y2="16" stroke="{line.colour}" '
                   f'stroke-width="3"{dash}/>')
        out.append(f'<text x="{legend_x + 34}" y="20" fill="{INK}" {FONT}>{escape(line.name)}</text>')
        legend_x += 34 + 14 * len(line.name) + 24
    out.append("</svg>")
    return Markup("\n".join(out))


def bar_chart(
    *, chart_id: str, title: str, desc: str, bars: Sequence[tuple[str, float]], width: int = 720,
    label_width: int = 220, bar_height: int = 22,
) -> Markup:
    """Horizontal bars (long Japanese names fit on the left), each with its figure written at its end."""
    gap, top, value_room = 8, 8, 80
    height = top * 2 + max(len(bars), 1) * (bar_height + gap)
    plot_w = width - label_width - value_room
    highest = nice_ceiling(max((v for _, v in bars), default=0.0))
    out = _open(chart_id, title, desc, width, height, "bar")
    for i, (label, value) in enumerate(bars):
        y = top + i * (bar_height + gap)
        length = plot_w * max(value, 0) / highest
        out.append(f'<text x="{label_width - 8}" y="{y + bar_height * 0.72:.1f}" text-anchor="end" fill="{INK}" '
                   f'{FONT}>{escape(label)}</text>')
        out.append(f'<rect data-label="{escape(label)}" data-value="{value:g}" x="{label_width}" y="{y}" '
                   f'width="{length:.1f}" height="{bar_height}" fill="{BRAND}"/>')
        out.append(f'<text x="{label_width + length + 6:.1f}" y="{y + bar_height * 0.72:.1f}" fill="{INK}" '
                   f'{FONT}>{escape(number(value))}</text>')
    out.append(f'<line x1="{label_width}" x2="{label_width}" y1="{top - 4}" y2="{height - top + 4}" stroke="{INK}"/>')
    out.append("</svg>")
    return Markup("\n".join(out))
