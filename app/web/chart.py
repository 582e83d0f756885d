"""The dashboard's charts as inline SVG: on the job page train and validation loss against
step, for a classifier its validation accuracy and macro-F1, and for a DPO job its reward
accuracy and reward margin (how often, and by how much, the preferred answer beats the
other); on the compare page several jobs' losses (and reward accuracies) on one chart, a
colour per job, train solid and validation dashed.

Only numbers leave this module (pixel coordinates and tick labels); the template draws
them. No chart library, no script: the page works without JavaScript or a CDN.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

WIDTH, HEIGHT = 1100, 340
LEFT, RIGHT, TOP, BOTTOM = 64, 20, 36, 46  # margins around the plot area
MAX_POINTS = 1000  # a longer train series is thinned (first and last kept)
# Compared jobs: each its colour class (job-0 ...; dashboard.css), hence at most this many.
JOB_STYLES = 8
KEY_COLUMNS, KEY_ROW = 2, 20  # the compare chart's job legend, under the step axis
KEY_LABEL_CHARS = 64


@dataclass(frozen=True)
class Series:
    name: str  # data-series: "train", "valid", "accuracy", "macro_f1", "train_reward_margin"...
    label: str
    points: list[tuple[float, float]]  # pixels
    values: list[tuple[int, float]]  # (step, value) as logged
    dots: bool = False  # one dot per point, with a tooltip: the evaluated series
    style: str = ""  # the CSS class, when not the name: a reward chart's "train" or "valid"
    job: str = ""  # on a comparison chart, the job whose line it is

    @property
    def css(self) -> str:
        return self.style or self.name

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
class Key:
    """A comparison chart's legend entry: a job's colour with a sample of each of its line
    styles, or (no job) what a line style means, in neutral grey; at (x, y) in pixels."""

    label: str
    x: float
    y: float
    styles: tuple[str, ...]  # the samples drawn: "train" (solid), "valid" (dashed)
    css: str = ""  # the job's colour class; "" for a line style's key
    job: str = ""


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
    # A comparison chart's legend (the job page's charts label each series instead).
    keys: list[Key] = field(default_factory=list)


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


@dataclass(frozen=True)
class _Line:
    """A series to draw: from a metrics key, named for the page, styled by its CSS class."""

    name: str
    label: str
    key: str  # the metrics rows' key
    style: str = ""
    job: str = ""

    @property
    def evaluated(self) -> bool:
        """A validation figure: a point every eval_steps, each drawn as a dot."""
        return self.key.startswith("valid_")


def _series(rows: list[dict], lines: tuple[_Line, ...]) -> list[tuple[_Line, list]]:
    """The lines that have a finite value in `rows` (already by step), with their values."""
    return [(line, values) for line in lines if (values := _values(rows, line.key))]


def _draw(
    lines: list[tuple[_Line, list[tuple[int, float]]]],
    y_lo: float,
    y_hi: float,
    height: int = HEIGHT,
) -> Chart:
    """Scale the series, all non-empty, into the plot area (a taller chart keeps the same
    plot area and has room below it for a legend)."""
    steps = [s for _, values in lines for s, _ in values]
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
    for line, values in lines:
        dots = line.evaluated
        shown = values if dots else _thin(values)
        points = [(px(s), py(v)) for s, v in shown]
        series.append(Series(line.name, line.label, points, values, dots, line.style, line.job))
    return Chart(
        height=height,
        x_ticks=[(px(t), str(int(t))) for t in x_ticks],
        y_ticks=[(py(t), _label(t, y_step)) for t in y_values],
        series=series,
    )


LOSS = (
    _Line("train", "train loss", "train_loss"),
    _Line("valid", "validation loss", "valid_loss"),
)
SCORES = (
    _Line("accuracy", "validation accuracy", "valid_accuracy"),
    _Line("macro_f1", "validation macro-F1", "valid_macro_f1"),
)
REWARD_ACCURACY = (
    _Line("train_reward_accuracy", "train reward accuracy", "train_reward_accuracy", "train"),
    _Line("valid_reward_accuracy", "validation reward accuracy", "valid_reward_accuracy", "valid"),
)
REWARD_MARGIN = (
    _Line("train_reward_margin", "train reward margin", "train_reward_margin", "train"),
    _Line("valid_reward_margin", "validation reward margin", "valid_reward_margin", "valid"),
)


def _loss_scale(lines: list[tuple[_Line, list[tuple[int, float]]]]) -> tuple[float, float]:
    """The losses' range with a margin, never below zero when no loss is."""
    losses = [v for _, values in lines for _, v in values]
    y_lo, y_hi = min(losses), max(losses)
    pad = (y_hi - y_lo) * 0.05 or max(abs(y_hi) * 0.05, 0.05)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    if min(losses) >= 0 > y_lo:
        y_lo = 0.0  # a loss is never negative: do not draw below zero
    return y_lo, y_hi


def loss_chart(rows: list[dict]) -> Chart | None:
    """The loss chart of a job's metrics rows (each a metrics event's `data`), oldest
    first. None when there is no finite loss to draw."""
    lines = _series(_by_step(rows), LOSS)
    if not lines:
        return None
    return _draw(lines, *_loss_scale(lines))


def score_chart(rows: list[dict]) -> Chart | None:
    """A classifier's validation accuracy and macro-F1 against step, on a fixed 0 to 1
    scale (so a flat line near 1 reads as good, not as noise blown up). None when the
    rows hold neither (a generative job, or no evaluation yet)."""
    lines = _series(_by_step(rows), SCORES)
    return _draw(lines, 0.0, 1.0) if lines else None


def reward_accuracy_chart(rows: list[dict]) -> Chart | None:
    """A DPO job's reward accuracy (the share of pairs whose preferred answer the policy
    rewards above the other, against the reference), train and validation, on a fixed 0 to
    1 scale. It starts at 0: while policy and reference are equal no reward is above
    another. None when the rows hold none (not a DPO job)."""
    lines = _series(_by_step(rows), REWARD_ACCURACY)
    return _draw(lines, 0.0, 1.0) if lines else None


def reward_margin_chart(rows: list[dict]) -> Chart | None:
    """A DPO job's mean reward margin (preferred minus other, in beta-scaled log-ratio
    units), train and validation. Its scale always holds zero: where the line sits against
    it (above: the preferred answers win) is what the chart is for."""
    lines = _series(_by_step(rows), REWARD_MARGIN)
    if not lines:
        return None
    margins = [v for _, values in lines for _, v in values]
    y_lo, y_hi = min(0.0, *margins), max(0.0, *margins)
    pad = (y_hi - y_lo) * 0.05 or 0.05  # all zero (the first steps): a band around it
    return _draw(lines, y_lo - pad, y_hi + pad)


# --- several jobs on one chart (the compare page) ---------------------------------------


@dataclass(frozen=True)
class Run:
    """A compared job: its id, its name in the legend, and its metrics rows as recorded."""

    job: str
    label: str
    rows: list[dict]


Scale = Callable[[list[tuple[_Line, list[tuple[int, float]]]]], tuple[float, float]]


def _short(label: str) -> str:
    return label if len(label) <= KEY_LABEL_CHARS else label[: KEY_LABEL_CHARS - 1] + "…"


def _compare(runs: list[Run], lines: tuple[_Line, ...], scale: Scale) -> Chart | None:
    """Each run's `lines` in the run's colour (job-0, job-1 ... by its place in `runs`),
    train solid and validation dashed, scaled together; under the step axis a legend entry
    per run that has a line, and at the top what solid and dashed mean. None when no run
    has any of the lines."""
    if len(runs) > JOB_STYLES:
        raise ValueError(f"at most {JOB_STYLES} jobs fit one chart, not {len(runs)}")
    drawn: list[tuple[_Line, list[tuple[int, float]]]] = []
    shown: list[tuple[int, Run, tuple[str, ...]]] = []
    for index, run in enumerate(runs):
        mine = _series(_by_step(run.rows), lines)
        for line, values in mine:
            label = f"{run.job} {line.label}"
            style = f"{line.style or line.name} job-{index}"
            drawn.append((_Line(line.name, label, line.key, style, run.job), values))
        if mine:
            shown.append((index, run, tuple(line.style or line.name for line, _ in mine)))
    if not drawn:
        return None
    rows = math.ceil(len(shown) / KEY_COLUMNS)
    key_top = HEIGHT - BOTTOM + 60  # under the tick labels and the "step" axis label
    chart = _draw(drawn, *scale(drawn), height=key_top + rows * KEY_ROW + 6)
    column = (chart.right_edge - chart.left) / KEY_COLUMNS
    meaning = {"train": "solid", "valid": "dashed"}
    keys = [
        Key(
            f"{line.label} ({meaning.get(line.style or line.name, '')})",
            chart.right_edge - 560 + i * 280,
            12,
            (line.style or line.name,),
        )
        for i, line in enumerate(lines)
    ]
    keys += [
        Key(
            _short(run.label),
            chart.left + (place % KEY_COLUMNS) * column,
            key_top + (place // KEY_COLUMNS) * KEY_ROW,
            styles,
            f"job-{index}",
            run.job,
        )
        for place, (index, run, styles) in enumerate(shown)
    ]
    return replace(chart, keys=keys)


def compare_loss_chart(runs: list[Run]) -> Chart | None:
    """Train and validation loss of up to JOB_STYLES jobs on one scale. None when none of
    them has logged a finite loss."""
    return _compare(runs, LOSS, _loss_scale)


def compare_reward_accuracy_chart(runs: list[Run]) -> Chart | None:
    """DPO jobs' train and validation reward accuracy on the fixed 0 to 1 scale. None when
    no run has any (no DPO job among them)."""
    return _compare(runs, REWARD_ACCURACY, lambda _: (0.0, 1.0))


def latest(rows: list[dict], key: str) -> tuple[int, float] | None:
    """The step and value of `key`'s last finite value in the rows (a repeated step's
    latest row counts, as on the charts); None when it has none."""
    values = _values(_by_step(rows), key)
    return values[-1] if values else None
