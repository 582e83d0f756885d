"""The job page's loss chart: train and validation loss against step, as inline SVG.

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
    name: str  # "train" | "valid": the CSS class and data-series attribute
    label: str
    points: list[tuple[float, float]]  # pixels
    values: list[tuple[int, float]]  # (step, loss) as logged

    @property
    def svg_points(self) -> str:
        return " ".join(f"{x:.1f},{y:.1f}" for x, y in self.points)

    @property
    def marks(self) -> list[tuple[float, float, int, float]]:
        """(x, y, step, loss) of each point, for dots with a tooltip (validation only:
        it has a point every eval_steps, the train series one per logged step)."""
        if len(self.points) != len(self.values):
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


def loss_chart(rows: list[dict]) -> Chart | None:
    """The chart of a job's metrics rows (each a metrics event's `data`), oldest first.

    A step logged twice (a run resumed from a checkpoint repeats steps) keeps its latest
    row. None when there is no finite loss to draw."""
    by_step: dict[int, dict] = {}
    for row in rows:
        step = row.get("step") if isinstance(row, dict) else None
        if isinstance(step, int) and not isinstance(step, bool):
            by_step[step] = row
    train: list[tuple[int, float]] = []
    valid: list[tuple[int, float]] = []
    for step in sorted(by_step):
        row = by_step[step]
        if (loss := _finite(row.get("train_loss"))) is not None:
            train.append((step, loss))
        if (loss := _finite(row.get("valid_loss"))) is not None:
            valid.append((step, loss))
    if not train and not valid:
        return None
    steps = [s for s, _ in train + valid]
    losses = [v for _, v in train + valid]
    x_lo, x_hi = min(steps), max(steps)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    y_lo, y_hi = min(losses), max(losses)
    pad = (y_hi - y_lo) * 0.05 or max(abs(y_hi) * 0.05, 0.05)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    if min(losses) >= 0 > y_lo:
        y_lo = 0.0  # a loss is never negative: do not draw below zero
    chart = Chart()
    plot_w = chart.right_edge - chart.left
    plot_h = chart.bottom_edge - chart.top

    def px(step: float) -> float:
        return chart.left + (step - x_lo) / (x_hi - x_lo) * plot_w

    def py(loss: float) -> float:
        return chart.bottom_edge - (loss - y_lo) / (y_hi - y_lo) * plot_h

    x_ticks = [t for t in nice_ticks(x_lo, x_hi, 6) if float(t).is_integer()]
    y_values = nice_ticks(y_lo, y_hi, 5)
    y_step = y_values[1] - y_values[0] if len(y_values) > 1 else 1.0
    series = []
    for name, label, values in (
        ("train", "train loss", train),
        ("valid", "validation loss", valid),
    ):
        if values:
            shown = _thin(values) if name == "train" else values
            series.append(
                Series(name, label, [(px(s), py(v)) for s, v in shown], values),
            )
    return Chart(
        x_ticks=[(px(t), str(int(t))) for t in x_ticks],
        y_ticks=[(py(t), _label(t, y_step)) for t in y_values],
        series=series,
    )
