"""Hand-written inline SVG charts for the HTML reports: no plotting library, no scripts, no fetches.

Every time chart shares one horizontal geometry (width and margins), so charts stacked on a
page line up: the same second is at the same x in the step breakdown, the GPU timelines and
the host timeline. Values arrive as numpy arrays; NaN means "no data here" and is drawn as a
break in the line or area, never as zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

import numpy as np

from profilerd.units import fmt_seconds

WIDTH = 1120
LEFT = 68
RIGHT = 18
TOP = 16
BOTTOM = 30
AXIS = "#6b7280"
GRID = "#e5e7eb"
TEXT = "#374151"
PALETTE = (
    "#4c78a8",
    "#f58518",
    "#54a24b",
    "#e45756",
    "#72b7b2",
    "#b279a2",
    "#eeca3b",
    "#ff9da6",
    "#9d755d",
    "#79706e",
)

Formatter = Callable[[float], str]


@dataclass(frozen=True)
class Layer:
    label: str
    color: str
    values: np.ndarray


@dataclass(frozen=True)
class Line:
    label: str
    color: str
    x: np.ndarray
    y: np.ndarray
    dashed: bool = False


@dataclass(frozen=True)
class Band:
    """A shaded time span (a throttled GPU), drawn behind the data."""

    start: float
    end: float
    label: str
    color: str = "#fca5a5"


@dataclass(frozen=True)
class Mark:
    """A vertical marker at one moment (an XID error), labelled at the top."""

    at: float
    label: str
    color: str = "#b91c1c"


# ---- formatting -------------------------------------------------------------------------------
def fmt_duration(seconds: float) -> str:
    """Seconds for time axes: 0:45, 12:30, 3:05:00 for h:mm:ss."""
    seconds = round(seconds)
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def fmt_bytes(value: float) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(value) >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"


def fmt_ratio(value: float) -> str:
    return f"{value:.0%}"


def fmt_number(value: float) -> str:
    return f"{value:.3g}"


def nice_ceiling(value: float) -> float:
    """1, 2, 2.5 or 5 times a power of ten, at least ``value``."""
    if not math.isfinite(value) or value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for factor in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if factor * power >= value * (1 - 1e-9):
            return factor * power
    return 10 * power


def ticks(maximum: float, count: int = 5) -> list[float]:
    """Round tick positions from 0 to about ``maximum``."""
    if maximum <= 0 or not math.isfinite(maximum):
        return [0.0]
    step = maximum / count
    power = 10 ** math.floor(math.log10(step))
    step = next(f * power for f in (1, 2, 2.5, 5, 10) if f * power >= step * (1 - 1e-9))
    return [i * step for i in range(int(maximum / step + 1e-9) + 1)]


# ---- geometry -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plot:
    """Maps data to pixels inside the margins of one chart."""

    x_max: float
    y_max: float
    height: int
    width: int = WIDTH

    @property
    def inner_width(self) -> float:
        return self.width - LEFT - RIGHT

    @property
    def inner_height(self) -> float:
        return self.height - TOP - BOTTOM

    def x(self, value: np.ndarray | float) -> np.ndarray | float:
        return LEFT + np.asarray(value) / (self.x_max or 1.0) * self.inner_width

    def y(self, value: np.ndarray | float) -> np.ndarray | float:
        clipped = np.clip(np.asarray(value, dtype=np.float64), 0.0, self.y_max)
        return TOP + self.inner_height * (1.0 - clipped / (self.y_max or 1.0))


def _svg(plot: Plot, title: str, body: Sequence[str], chart_id: str) -> str:
    return (
        f'<svg class="chart" id="{escape(chart_id)}" viewBox="0 0 {plot.width} {plot.height}" '
        f'width="100%" preserveAspectRatio="xMinYMin meet" role="img" aria-label="{escape(title)}">'
        f"<title>{escape(title)}</title>" + "".join(body) + "</svg>"
    )


def _y_axis(plot: Plot, fmt: Formatter, label: str) -> list[str]:
    parts = []
    for value in ticks(plot.y_max, 4):
        y = float(plot.y(value))
        parts.append(f'<line x1="{LEFT}" x2="{plot.width - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="{GRID}"/>')
        parts.append(
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11" fill="{TEXT}">'
            f"{escape(fmt(value))}</text>"
        )
    if label:
        parts.append(
            f'<text x="12" y="{TOP + plot.inner_height / 2:.1f}" font-size="11" fill="{AXIS}" text-anchor="middle" '
            f'transform="rotate(-90 12 {TOP + plot.inner_height / 2:.1f})">{escape(label)}</text>'
        )
    return parts


def _x_axis(plot: Plot, fmt: Formatter = fmt_duration, count: int = 10) -> list[str]:
    base = TOP + plot.inner_height
    parts = [f'<line x1="{LEFT}" x2="{plot.width - RIGHT}" y1="{base}" y2="{base}" stroke="{AXIS}"/>']
    for value in ticks(plot.x_max, count):
        x = float(plot.x(value))
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{base}" y2="{base + 4}" stroke="{AXIS}"/>')
        parts.append(
            f'<text x="{x:.1f}" y="{base + 17}" text-anchor="middle" font-size="11" fill="{TEXT}">'
            f"{escape(fmt(value))}</text>"
        )
    return parts


def _time_ticks(x_max: float) -> Formatter:
    """Time-axis labels; sub-minute runs get seconds with decimals where needed."""
    if x_max < 20:
        return lambda v: f"{v:g}s"
    return fmt_duration


def _segments(valid: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) index ranges of consecutive True values."""
    if valid.size == 0:
        return []
    edges = np.diff(np.concatenate(([0], valid.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))


def _points(xs: np.ndarray, ys: np.ndarray) -> str:
    return " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs.tolist(), ys.tolist(), strict=True))


def _bands_and_marks(plot: Plot, bands: Sequence[Band], marks: Sequence[Mark]) -> tuple[list[str], list[str]]:
    behind, front = [], []
    for band in bands:
        x1, x2 = float(plot.x(band.start)), float(plot.x(max(band.end, band.start)))
        behind.append(
            f'<rect class="band" x="{x1:.1f}" y="{TOP}" width="{max(x2 - x1, 1.5):.1f}" height="{plot.inner_height}" '
            f'fill="{band.color}" fill-opacity="0.35"><title>{escape(band.label)}</title></rect>'
        )
        if x2 - x1 > 60:
            behind.append(
                f'<text x="{x1 + 4:.1f}" y="{TOP + plot.inner_height - 5:.1f}" font-size="10.5" fill="#991b1b">'
                f"{escape(band.label[: int((x2 - x1) / 6)])}</text>"
            )
    for mark in marks:
        x = float(plot.x(mark.at))
        front.append(
            f'<line class="mark" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{TOP + plot.inner_height}" '
            f'stroke="{mark.color}" stroke-width="1.5" stroke-dasharray="4 3">'
            f"<title>{escape(mark.label)}</title></line>"
        )
        anchor = "end" if x > plot.width - 160 else "start"
        dx = -4 if anchor == "end" else 4
        front.append(
            f'<text x="{x + dx:.1f}" y="{TOP + 10}" font-size="10.5" fill="{mark.color}" text-anchor="{anchor}">'
            f"{escape(mark.label[:48])}</text>"
        )
    return behind, front


def capped_maximum(totals: np.ndarray) -> tuple[float, bool]:
    """A y-axis top that a few outliers (a checkpoint step) do not dictate, and whether it clips."""
    finite = totals[np.isfinite(totals)]
    if finite.size == 0:
        return 1.0, False
    peak = float(finite.max())
    typical = float(np.percentile(finite, 98)) * 1.3
    if peak <= typical or finite.size < 20:
        return nice_ceiling(peak * 1.05), False
    return nice_ceiling(typical), True


# ---- charts ------------------------------------------------------------------------------------------
def stacked_area(
    starts: np.ndarray,
    bucket: float,
    layers: Sequence[Layer],
    x_max: float,
    *,
    title: str,
    y_label: str,
    fmt: Formatter,
    chart_id: str,
    height: int = 260,
    bands: Sequence[Band] = (),
    marks: Sequence[Mark] = (),
) -> str:
    """Layers stacked per time bucket, drawn as steps (each bucket is flat); NaN buckets are gaps.

    The y axis stops at about the 98th percentile of the totals when a few buckets tower over
    the rest; those are clipped and labelled with their real value.
    """
    stack = np.vstack([layer.values for layer in layers]) if layers else np.zeros((1, starts.size))
    totals = stack.sum(axis=0)
    y_max, clipped = capped_maximum(totals)
    plot = Plot(x_max, y_max, height)
    valid = np.isfinite(totals)
    cumulative = np.nancumsum(np.where(np.isfinite(stack), stack, 0.0), axis=0)
    behind, front = _bands_and_marks(plot, bands, marks)
    body = [*_y_axis(plot, fmt, y_label), *behind]
    left = np.asarray(plot.x(starts), dtype=np.float64)
    right = np.asarray(plot.x(np.minimum(starts + bucket, x_max)), dtype=np.float64)
    for index, layer in enumerate(layers):
        top = cumulative[index]
        bottom = cumulative[index - 1] if index else np.zeros_like(top)
        for start, stop in _segments(valid):
            xs = np.column_stack((left[start:stop], right[start:stop])).ravel()
            upper = np.repeat(np.asarray(plot.y(top[start:stop])), 2)
            lower = np.repeat(np.asarray(plot.y(bottom[start:stop])), 2)
            outline = np.concatenate((xs, xs[::-1]))
            heights = np.concatenate((upper, lower[::-1]))
            body.append(
                f'<polygon class="area" points="{_points(outline, heights)}" fill="{layer.color}">'
                f"<title>{escape(layer.label)}</title></polygon>"
            )
    if clipped:
        order = np.argsort(np.where(valid, totals, -np.inf))[::-1]
        for index in [i for i in order[:4] if totals[i] > y_max]:
            x = float((left[index] + right[index]) / 2)
            body.append(f'<path d="M{x - 5:.1f},{TOP + 7} L{x + 5:.1f},{TOP + 7} L{x:.1f},{TOP} Z" fill="#111827"/>')
            body.append(
                f'<text x="{x + 7:.1f}" y="{TOP + 24}" font-size="10.5" fill="#111827">'
                f"{escape(fmt(float(totals[index])))}</text>"
            )
    body += front
    body += _x_axis(plot, _time_ticks(x_max))
    return _svg(plot, title, body, chart_id)


def line_chart(
    lines: Sequence[Line],
    x_max: float,
    *,
    title: str,
    y_label: str,
    fmt: Formatter,
    chart_id: str,
    y_max: float | None = None,
    height: int = 200,
    bands: Sequence[Band] = (),
    marks: Sequence[Mark] = (),
) -> str:
    """One polyline per series over the shared time axis; NaN breaks a line."""
    values = np.concatenate([line.y[np.isfinite(line.y)] for line in lines]) if lines else np.array([])
    top = y_max if y_max is not None else nice_ceiling(float(values.max()) * 1.08 if values.size else 1.0)
    plot = Plot(x_max, top, height)
    behind, front = _bands_and_marks(plot, bands, marks)
    body = [*_y_axis(plot, fmt, y_label), *behind]
    for line in lines:
        valid = np.isfinite(line.y)
        dash = ' stroke-dasharray="6 4"' if line.dashed else ""
        for start, stop in _segments(valid):
            xs = np.asarray(plot.x(line.x[start:stop]), dtype=np.float64)
            ys = np.asarray(plot.y(line.y[start:stop]), dtype=np.float64)
            if stop - start == 1:
                body.append(f'<circle cx="{xs[0]:.1f}" cy="{ys[0]:.1f}" r="2" fill="{line.color}"/>')
                continue
            body.append(
                f'<polyline class="series" points="{_points(xs, ys)}" fill="none" stroke="{line.color}" '
                f'stroke-width="1.6" stroke-linejoin="round"{dash}><title>{escape(line.label)}</title></polyline>'
            )
    body += front
    body += _x_axis(plot, _time_ticks(x_max))
    return _svg(plot, title, body, chart_id)


def histogram(
    left: np.ndarray,
    right: np.ndarray,
    counts: np.ndarray,
    *,
    title: str,
    chart_id: str,
    marks: Sequence[Mark] = (),
    fmt: Formatter = fmt_seconds,
    color: str = PALETTE[0],
    height: int = 220,
) -> str:
    """Bars of counts over value bins (x in the values' own unit, from the first bin's edge)."""
    if counts.size == 0:
        return ""
    origin = float(left[0])
    plot = Plot(float(right[-1]) - origin, nice_ceiling(float(counts.max()) * 1.05), height)
    body = _y_axis(plot, fmt_number, "steps")
    xs1 = np.asarray(plot.x(left - origin), dtype=np.float64)
    xs2 = np.asarray(plot.x(right - origin), dtype=np.float64)
    ys = np.asarray(plot.y(counts), dtype=np.float64)
    base = TOP + plot.inner_height
    for x1, x2, y, count in zip(xs1.tolist(), xs2.tolist(), ys.tolist(), counts.tolist(), strict=True):
        if count <= 0:
            continue
        body.append(
            f'<rect class="bar" x="{x1 + 0.5:.1f}" y="{y:.1f}" width="{max(x2 - x1 - 1, 0.8):.1f}" '
            f'height="{base - y:.1f}" fill="{color}"/>'
        )
    for row, mark in enumerate(marks):
        x = float(plot.x(mark.at - origin))
        body.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{base}" stroke="{mark.color}" stroke-width="1.5" '
            f'stroke-dasharray="4 3"/>'
        )
        body.append(
            f'<text x="{x + 4:.1f}" y="{TOP + 10 + 14 * row}" font-size="11" fill="{mark.color}">'
            f"{escape(mark.label)}</text>"
        )
    # Ticks at round values of the data (not of the offset from the first bin).
    span = float(right[-1]) - origin
    step = ticks(span, 8)[1] if len(ticks(span, 8)) > 1 else span
    first = math.ceil(origin / step) * step if step > 0 else origin
    body.append(f'<line x1="{LEFT}" x2="{plot.width - RIGHT}" y1="{base}" y2="{base}" stroke="{AXIS}"/>')
    value = first
    while step > 0 and value <= origin + span + 1e-12:
        x = float(plot.x(value - origin))
        body.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{base}" y2="{base + 4}" stroke="{AXIS}"/>')
        body.append(
            f'<text x="{x:.1f}" y="{base + 17}" text-anchor="middle" font-size="11" fill="{TEXT}">'
            f"{escape(fmt(value))}</text>"
        )
        value += step
    return _svg(plot, title, body, chart_id)


def stacked_bars(
    labels: Sequence[str],
    layers: Sequence[Layer],
    *,
    title: str,
    chart_id: str,
    fmt: Formatter,
    highlight: int | None = None,
    highlight_label: str = "",
) -> str:
    """Horizontal stacked bars, one row per label (per-rank comparison); ``highlight`` is outlined."""
    rows = len(labels)
    row_h = 24
    height = TOP + rows * row_h + BOTTOM
    stack = np.vstack([layer.values for layer in layers]) if layers else np.zeros((1, rows))
    totals = np.nansum(stack, axis=0)
    plot = Plot(nice_ceiling(float(totals.max()) * 1.04 if rows else 1.0), 1.0, height)
    body = []
    for value in ticks(plot.x_max, 8):
        x = float(plot.x(value))
        body.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{TOP + rows * row_h}" stroke="{GRID}"/>')
        body.append(
            f'<text x="{x:.1f}" y="{TOP + rows * row_h + 17}" text-anchor="middle" font-size="11" fill="{TEXT}">'
            f"{escape(fmt(value))}</text>"
        )
    cumulative = np.nancumsum(np.nan_to_num(stack), axis=0)
    for row, label in enumerate(labels):
        y = TOP + row * row_h + 3
        weight = "bold" if row == highlight else "normal"
        body.append(
            f'<text x="{LEFT - 6}" y="{y + 13}" text-anchor="end" font-size="11" fill="{TEXT}" '
            f'font-weight="{weight}">{escape(label)}</text>'
        )
        for index, layer in enumerate(layers):
            start = cumulative[index - 1][row] if index else 0.0
            x1, x2 = float(plot.x(start)), float(plot.x(cumulative[index][row]))
            if x2 - x1 < 0.2:
                continue
            body.append(
                f'<rect class="bar" x="{x1:.1f}" y="{y}" width="{x2 - x1:.1f}" height="{row_h - 6}" '
                f'fill="{layer.color}"><title>{escape(label)} · {escape(layer.label)}: '
                f"{escape(fmt(float(layer.values[row])))}</title></rect>"
            )
        if row == highlight:
            end = float(plot.x(totals[row]))
            body.append(
                f'<rect x="{LEFT - 2}" y="{y - 2}" width="{end - LEFT + 4:.1f}" height="{row_h - 2}" fill="none" '
                f'stroke="#b91c1c" stroke-width="2"/>'
            )
            if highlight_label:
                body.append(
                    f'<text x="{end + 8:.1f}" y="{y + 13}" font-size="11" fill="#b91c1c" font-weight="bold">'
                    f"{escape(highlight_label)}</text>"
                )
    return _svg(plot, title, body, chart_id)


def legend(items: Sequence[tuple[str, str]]) -> str:
    """An HTML legend: colour swatches with labels."""
    return (
        '<div class="legend">'
        + "".join(f'<span><i style="background:{escape(color)}"></i>{escape(label)}</span>' for label, color in items)
        + "</div>"
    )


def sparkline(values: Sequence[float | None]) -> str:
    """A Unicode sparkline (▁▂▃▄▅▆▇█) for Markdown and terminals; gaps are spaces."""
    blocks = "▁▂▃▄▅▆▇█"
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return ""
    low, high = min(finite), max(finite)
    span = high - low or 1.0
    return "".join(
        " " if v is None or not math.isfinite(v) else blocks[min(7, int((v - low) / span * 7.999))] for v in values
    )
