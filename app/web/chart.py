"""The job page's charts as inline SVG: train and validation loss against step, and for a
classifier its validation accuracy and macro-F1.

Only numbers leave this module (pixel coordinates and tick labels); the template draws
them. No chart library, no script: the page works without JavaScript or a CDN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

WIDTH, HEIGHT = 1100, 340
LEFT, RIGHT, TOP, BOTTOM = 64, 20, 36, 46  # margins around the plot area
MAX_POINTS = 1000  # a longer train series is thinned (first and last kept)


@dataclass(frozen=True)
class Series:
    name: str  # "train" | "valid" | "accuracy" | "macro_f1": CSS class, data-series
    label: str
    points: list[tuple[float, float]]  # pixels
    values: list[tuple[int, float]]  # (step, value) as logged
    dots: bool = False  # one dot per point, with a tooltip: the evaluated series

    @property
    def svg_points(self) -> str:
        return " ".join(f"{x:.1f},{y:.1f}" for x, y in self.points)

    @property
    def marks(self) -> list[tuple[float, float, int, float]]:
        """(x, y, step, value) of each point, for dots with a tooltip (evaluated series
        only: they have a point every eval_steps, the train series one per logged step)."""
        if not self.dots or len(self.points) != len(self.values):
            return []
        return [(x, y, s, v) for (x, y), (s, v) in zip(self.points, self.values, strict=True)]

    @property
    def last(self) -> tuple[int, float] | None:
        return self.values[-1] if self.values else None


@dataclass(frozen=True)
class Chart:
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    top: int = TOP
    right_edge: int = WIDTH - RIGHT
    bottom_edge: int = HEIGHT - BOTTOM
    x_ticks: list[tuple[float, str]] = field(default_factory=list)
    y_ticks: list[tuple[float, str]] = field(default_factory=list)
    series: list[Series] = field(default_factory=list)


def _finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    ticks, value = [], first
    while value <= hi + step * 1e-9:
        if value >= lo - step * 1e-9:
            ticks.append(round(value, 12))
        value += step
    return ticks


def _label(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step))) if step < 1 else 0
    return f"{value:.{decimals}f}"


def _thin(values: list[tuple[int, float]]) -> list[tuple[int, float]]:
    if len(values) <= MAX_POINTS:
        return values
    every = math.ceil(len(values) / MAX_POINTS)
    return values[::every] + ([values[-1]] if (len(values) - 1) % every else [])


def _by_step(rows: list[dict]) -> list[dict]:
    """The rows oldest step first; a step logged twice (a run resumed from a checkpoint
    repeats steps) keeps its latest row."""
    by_step: dict[int, dict] = {}
    for row in rows:
        step = row.get("step") if isinstance(row, dict) else None
        if isinstance(step, int) and not isinstance(step, bool):
            by_step[step] = row
    return [by_step[step] for step in sorted(by_step)]


def _values(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(row["step"], v) for row in rows if (v := _finite(row.get(key))) is not None]


def _draw(lines: list[tuple[str, str, list[tuple[int, float]]]], y_lo: float, y_hi: float) -> Chart:
    """Scale the series (name, label, values), all non-empty, into the plot area."""
    steps = [s for _, _, values in lines for s, _ in values]
    x_lo, x_hi = min(steps), max(steps)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    chart = Chart()
    plot_w = chart.right_edge - chart.left
    plot_h = chart.bottom_edge - chart.top

    def px(step: float) -> float:
        return chart.left + (step - x_lo) / (x_hi - x_lo) * plot_w

    def py(value: float) -> float:
        return chart.bottom_edge - (value - y_lo) / (y_hi - y_lo) * plot_h

    x_ticks = [t for t in nice_ticks(x_lo, x_hi, 6) if float(t).is_integer()]
    y_values = nice_ticks(y_lo, y_hi, 5)
    y_step = y_values[1] - y_values[0] if len(y_values) > 1 else 1.0
    series = []
    for name, label, values in lines:
        dots = name != "train"  # evaluated series: a point every eval_steps
        shown = values if dots else _thin(values)
        series.append(Series(name, label, [(px(s), py(v)) for s, v in shown], values, dots))
    return Chart(
        x_ticks=[(px(t), str(int(t))) for t in x_ticks],
        y_ticks=[(py(t), _label(t, y_step)) for t in y_values],
        series=series,
    )


def loss_chart(rows: list[dict]) -> Chart | None:
    """The loss chart of a job's metrics rows (each a metrics event's `data`), oldest
    first. None when there is no finite loss to draw."""
    rows = _by_step(rows)
    lines = [
        (name, label, values)
        for name, label, key in (
            ("train", "train loss", "train_loss"),
            ("valid", "validation loss", "valid_loss"),
        )
        if (values := _values(rows, key))
    ]
    if not lines:
        return None
    losses = [v for _, _, values in lines for _, v in values]
    y_lo, y_hi = min(losses), max(losses)
    pad = (y_hi - y_lo) * 0.05 or max(abs(y_hi) * 0.05, 0.05)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    if min(losses) >= 0 > y_lo:
        y_lo = 0.0  # a loss is never negative: do not draw below zero
    return _draw(lines, y_lo, y_hi)


def score_chart(rows: list[dict]) -> Chart | None:
    """A classifier's validation accuracy and macro-F1 against step, on a fixed 0 to 1
    scale (so a flat line near 1 reads as good, not as noise blown up). None when the
    rows hold neither (a generative job, or no evaluation yet)."""
    rows = _by_step(rows)
    lines = [
        (name, label, values)
        for name, label, key in (
            ("accuracy", "validation accuracy", "valid_accuracy"),
            ("macro_f1", "validation macro-F1", "valid_macro_f1"),
        )
        if (values := _values(rows, key))
    ]
    return _draw(lines, 0.0, 1.0) if lines else None
