"""The job page's classification report: a job's `stats.classification` (the shape of
app.domain.classification.classification_report, plus the evaluated step) checked and laid
out for the template, which then only loops.

The stats are the worker's JSON, so nothing here assumes their shape: a report that does
not hold together (a matrix of another size than the class list) shows what does.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cell:
    count: int
    true_class: str
    predicted_class: str
    diagonal: bool

    @property
    def kind(self) -> str:
        """The CSS class: right answers on the diagonal, confusions off it."""
        if self.diagonal:
            return "diag"
        return "confused" if self.count else "zero"


@dataclass(frozen=True)
class ClassRow:
    name: str
    precision: float | None
    recall: float | None
    f1: float | None
    support: int | None


@dataclass(frozen=True)
class ClassificationView:
    step: int | None
    examples: int | None
    accuracy: float | None
    macro_f1: float | None
    classes: list[str]
    per_class: list[ClassRow]
    matrix: list[tuple[str, list[Cell]]]  # (true class, its row); empty if malformed


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _matrix(classes: list[str], rows: object) -> list[tuple[str, list[Cell]]]:
    n = len(classes)
    if not isinstance(rows, list) or len(rows) != n:
        return []
    if not all(
        isinstance(r, list) and len(r) == n and all(_count(c) is not None for c in r) for r in rows
    ):
        return []
    return [
        (true, [Cell(count, true, classes[j], i == j) for j, count in enumerate(row)])
        for i, (true, row) in enumerate(zip(classes, rows, strict=True))
    ]


def classification_view(stats: dict) -> ClassificationView | None:
    """The report in `stats["classification"]`, or None when the job has none."""
    report = stats.get("classification")
    if not isinstance(report, dict):
        return None
    classes = [str(c) for c in report.get("classes") or [] if isinstance(c, str | int)]
    per_class = [
        ClassRow(
            str(c.get("class", "")),
            _number(c.get("precision")),
            _number(c.get("recall")),
            _number(c.get("f1")),
            _count(c.get("support")),
        )
        for c in report.get("per_class") or []
        if isinstance(c, dict)
    ]
    return ClassificationView(
        step=_count(report.get("step")),
        examples=_count(report.get("examples")),
        accuracy=_number(report.get("accuracy")),
        macro_f1=_number(report.get("macro_f1")),
        classes=classes,
        per_class=per_class,
        matrix=_matrix(classes, report.get("confusion_matrix")),
    )
