"""Server-side SVG line charts: a series of (time, value) points in, an SVG string out.

No chart library and no JavaScript: htmx swaps the whole fragment every few seconds, so a
small, complete SVG per chart is all the page needs. Every text that lands in the SVG goes
through `_esc`; numbers are formatted here, so nothing else can inject markup.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape

Point = tuple[float, float]  # (unix time in seconds, value)


@dataclass(frozen=True, kw_only=True)
class Frame:
    """The chart's size and the margins its axis labels need."""

    width: int = 640
    height: int = 170
    left: int = 52
    right: int = 14
    top: int = 26
    bottom: int = 24

    @property
    def plot_w(self) -> float:
        return float(self.width - self.left - self.right)

    @property
    def plot_h(self) -> float:
        return float(self.height - self.top - self.bottom)


DEFAULT_FRAME = Frame()


def _esc(text: str) -> str:
    return escape(text, quote=True)


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten at or above `value`, at least 1: an axis
    top with round labels."""
    if not value > 1:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1.0, 2.0, 5.0, 10.0):
        if value <= step * power:
            return step * power
    return 10.0 * power


def format_number(value: float) -> str:
    if value >= 1_000_000:
        return f"{value / 1_000_000:.1f}M"
    if value >= 1_000:
        return f"{value / 1_000:.1f}k"
    if value >= 10 or value == int(value):
        return f"{value:.0f}"
    return f"{value:.1f}"


def _clock(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%H:%M")


def scale(
    points: Sequence[Point], *, start: float, end: float, top: float, frame: Frame
) -> list[tuple[float, float]]:
    """Points inside [start, end] mapped into the plot area (SVG y grows downwards)."""
    span = max(end - start, 1e-9)
    out = []
    for t, v in points:
        if start <= t <= end and math.isfinite(v):
            x = frame.left + (t - start) / span * frame.plot_w
            y = frame.top + frame.plot_h * (1.0 - min(max(v, 0.0), top) / top)
            out.append((round(x, 1), round(y, 1)))
    return out


def line_chart(
    points: Sequence[Point],
    *,
    title: str,
    start: float,
    end: float,
    unit: str = "",
    frame: Frame = DEFAULT_FRAME,
) -> str:
    """An SVG line chart of `points` over [start, end], the y axis from 0 to a round top."""
    f = frame
    visible = [(t, v) for t, v in points if start <= t <= end and math.isfinite(v)]
    top = nice_ceiling(max((v for _, v in visible), default=0.0))
    label = f"{title} ({unit})" if unit else title
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{f.width}" '
        f'height="{f.height}" viewBox="0 0 {f.width} {f.height}" role="img" '
        f'aria-label="{_esc(label)}">',
        f"<title>{_esc(label)}</title>",
        f'<text x="{f.left}" y="16" font-size="13" font-weight="600">{_esc(label)}</text>',
    ]
    bottom_y = f.top + f.plot_h
    for fraction in (0.0, 0.5, 1.0):
        y = round(bottom_y - fraction * f.plot_h, 1)
        parts.append(
            f'<line x1="{f.left}" y1="{y}" x2="{f.width - f.right}" y2="{y}" '
            f'stroke="#dde3e9" stroke-width="1"/>'
        )
        parts.append(
            f'<text x="{f.left - 6}" y="{y + 4}" font-size="11" text-anchor="end" '
            f'fill="#5b6b7b">{_esc(format_number(top * fraction))}</text>'
        )
    for fraction, anchor in ((0.0, "start"), (0.5, "middle"), (1.0, "end")):
        x = round(f.left + fraction * f.plot_w, 1)
        parts.append(
            f'<text x="{x}" y="{f.height - 6}" font-size="11" text-anchor="{anchor}" '
            f'fill="#5b6b7b">{_esc(_clock(start + fraction * (end - start)))}</text>'
        )
    xy = scale(visible, start=start, end=end, top=top, frame=f)
    if len(xy) >= 2:
        coords = " ".join(f"{x},{y}" for x, y in xy)
        parts.append(
            f'<polyline points="{coords}" fill="none" stroke="#0f3d5c" stroke-width="1.5"/>'
        )
    elif len(xy) == 1:
        x, y = xy[0]
        parts.append(f'<circle cx="{x}" cy="{y}" r="2.5" fill="#0f3d5c"/>')
    else:
        parts.append(
            f'<text x="{round(f.left + f.plot_w / 2, 1)}" y="{round(f.top + f.plot_h / 2, 1)}" '
            f'font-size="12" text-anchor="middle" fill="#5b6b7b">no data yet</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
