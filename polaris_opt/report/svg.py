"""Horizontal bar charts as inline SVG: one row per bar, a label, a value axis, value texts.

Drawn by hand (no plotting library, no script): the page must open anywhere, offline, printed.
A chart's height is capped: it draws at most the bars it is given, and the caller chooses which
(report.html keeps the MAX_BARS most telling). Long labels are cut to LABEL_CHARS with an
ellipsis; every bar carries a <title>, so hovering shows the full name and value. Every text
comes from the model (layer names) and is escaped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

WIDTH = 960
LABEL_WIDTH = 250  # px for the layer names, left of the plot
VALUE_WIDTH = 110  # px right of the plot for the value text of the longest bar
ROW = 16  # px per bar row
BAR = 11  # px bar thickness within its row
TOP = 28  # px above the first row: title
BOTTOM = 30  # px below the last row: axis ticks and unit
LABEL_CHARS = 38
MAX_BARS = 60
TICKS = 5
FONT = "font-family:sans-serif;font-size:11px"
AXIS_COLOUR = "#444444"
GRID_COLOUR = "#dddddd"
BEHIND_COLOUR = "#bdbdbd"  # the lighter bar drawn behind (bytes before, p90, input parameters)


@dataclass(frozen=True)
class Bar:
    """One row: `value` from zero, an optional `behind` value drawn lighter behind it."""

    label: str
    value: float
    text: str
    colour: str
    behind: float | None = None
    tooltip: str = ""


def bar_chart(
    title: str,
    bars: Sequence[Bar],
    *,
    unit: str,
    legend: Sequence[tuple[str, str]] = (),
    caption: str = "",
) -> str:
    """An <svg> with one row per bar; `legend` is (colour, meaning) pairs drawn under the title."""
    low, high = _domain(bars)
    scale = Scale(low, high, LABEL_WIDTH + 10, WIDTH - VALUE_WIDTH)
    height = TOP + (14 if legend else 0) + len(bars) * ROW + BOTTOM
    top = TOP + (14 if legend else 0)
    parts = [
        f'<svg class="chart" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" role="img" aria-label="{_esc(title)}">',
        f'<text x="0" y="16" style="{FONT};font-size:13px;font-weight:bold">{_esc(title)}</text>',
        *_legend(legend),
        *_grid(scale, top, top + len(bars) * ROW),
        *(_row(bar, scale, top + index * ROW) for index, bar in enumerate(bars)),
        *_axis(scale, top + len(bars) * ROW, unit),
        "</svg>",
    ]
    figure = "\n".join(parts)
    return f'{figure}\n<p class="caption">{_esc(caption)}</p>' if caption else figure


@dataclass(frozen=True)
class Scale:
    """Maps values in [low, high] to x pixels in [left, right]."""

    low: float
    high: float
    left: float
    right: float

    def x(self, value: float) -> float:
        span = self.high - self.low
        clipped = min(max(value, self.low), self.high)
        return self.left + (clipped - self.low) / span * (self.right - self.left)


def _domain(bars: Sequence[Bar]) -> tuple[float, float]:
    """Zero and every finite value, widened to tick steps (a bar always starts at zero)."""
    values = [0.0]
    for bar in bars:
        values += [v for v in (bar.value, bar.behind) if v is not None and math.isfinite(v)]
    low, high = min(values), max(values)
    if high == low:
        high = low + 1.0
    step = nice_step((high - low) / TICKS)
    return math.floor(low / step) * step, math.ceil(high / step) * step


def nice_step(raw: float) -> float:
    """The smallest of 1, 2, 5 × 10^k at least `raw`: ticks people read at a glance."""
    power = 10.0 ** math.floor(math.log10(raw))
    for factor in (1.0, 2.0, 5.0, 10.0):
        if factor * power >= raw * (1 - 1e-9):
            return factor * power
    return 10.0 * power


def _ticks(scale: Scale) -> list[float]:
    step = nice_step((scale.high - scale.low) / TICKS)
    count = round((scale.high - scale.low) / step)
    return [scale.low + i * step for i in range(count + 1)]


def _legend(legend: Sequence[tuple[str, str]]) -> list[str]:
    parts, x = [], 0
    for colour, meaning in legend:
        parts.append(f'<rect x="{x}" y="24" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{x + 14}" y="33" style="{FONT}">{_esc(meaning)}</text>')
        x += 24 + 7 * len(meaning)
    return parts


def _grid(scale: Scale, top: float, bottom: float) -> list[str]:
    lines = []
    for tick in _ticks(scale):
        x = scale.x(tick)
        colour = AXIS_COLOUR if tick == 0 else GRID_COLOUR
        lines.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="{colour}"/>')
    return lines


def _axis(scale: Scale, y: float, unit: str) -> list[str]:
    parts = [f'<line x1="{scale.left}" y1="{y}" x2="{scale.right}" y2="{y}" stroke="{AXIS_COLOUR}"/>']
    for tick in _ticks(scale):
        x = scale.x(tick)
        parts.append(
            f'<text x="{x:.1f}" y="{y + 13}" text-anchor="middle" style="{FONT}">{_number(tick)}</text>'
        )
    parts.append(f'<text x="{scale.right}" y="{y + 26}" text-anchor="end" style="{FONT}">{_esc(unit)}</text>')
    return parts


def _row(bar: Bar, scale: Scale, y: float) -> str:
    label = bar.label if len(bar.label) <= LABEL_CHARS else bar.label[: LABEL_CHARS - 1] + "…"
    tooltip = f"{bar.label}: {bar.tooltip or bar.text}"
    middle = y + ROW / 2 + 4
    parts = [
        f"<g><title>{_esc(tooltip)}</title>",
        f'<text x="{LABEL_WIDTH}" y="{middle:.1f}" text-anchor="end" style="{FONT}">{_esc(label)}</text>',
    ]
    if bar.behind is not None and math.isfinite(bar.behind):
        parts.append(_rect(scale, bar.behind, y + (ROW - BAR) / 2, BAR, BEHIND_COLOUR))
    end = scale.x(bar.value) if math.isfinite(bar.value) else scale.x(0.0)
    if math.isfinite(bar.value):
        # The value bar is drawn narrower over a behind bar, so both stay visible.
        thickness = BAR - 4 if bar.behind is not None else BAR
        parts.append(_rect(scale, bar.value, y + (ROW - thickness) / 2, thickness, bar.colour))
    right = max(end, scale.x(0.0), scale.x(bar.behind) if bar.behind is not None else 0.0)
    parts.append(f'<text x="{right + 4:.1f}" y="{middle:.1f}" style="{FONT}">{_esc(bar.text)}</text>')
    parts.append("</g>")
    return "".join(parts)


def _rect(scale: Scale, value: float, y: float, height: float, colour: str) -> str:
    start, end = sorted((scale.x(0.0), scale.x(value)))
    width = max(end - start, 1.0)  # a zero still shows as a hairline
    return f'<rect x="{start:.1f}" y="{y:.1f}" width="{width:.1f}" height="{height}" fill="{colour}"/>'


def _number(value: float) -> str:
    return f"{value:g}" if abs(value) < 1e6 else f"{value:.3g}"


def _esc(text: str) -> str:
    return html.escape(str(text), quote=True)
