"""What a classifier's evaluation reports: accuracy, macro-F1, per-class precision, recall
and F1, and the confusion matrix. Plain Python, so the worker computes it and the API and
dashboard read it in the same shape (a job's `stats.classification`)."""

from __future__ import annotations

from collections.abc import Sequence


def _ratio(numerator: int, denominator: int) -> float:
    # A class never predicted has no precision, one with no examples no recall: 0 by the
    # usual convention (scikit-learn's zero_division=0), so macro-F1 is not flattered.
    return numerator / denominator if denominator else 0.0


def confusion_matrix(n_classes: int, labels: Sequence[int], predictions: Sequence[int]) -> list:
    """Row i, column j: examples of class i predicted as class j."""
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    matrix = [[0] * n_classes for _ in range(n_classes)]
    for label, predicted in zip(labels, predictions, strict=True):
        matrix[int(label)][int(predicted)] += 1
    return matrix


def classification_report(
    classes: Sequence[str], labels: Sequence[int], predictions: Sequence[int]
) -> dict:
    """The figures people read for a classifier, over one evaluation set.

    `labels` and `predictions` are class indices into `classes`. Macro-F1 is the unweighted
    mean of the per-class F1 over every class, so a rare class counts as much as a common
    one: the figure that shows a classifier which ignores a small class.
    """
    n = len(classes)
    matrix = confusion_matrix(n, labels, predictions)
    per_class = []
    for i, name in enumerate(classes):
        right = matrix[i][i]
        predicted = sum(matrix[row][i] for row in range(n))
        support = sum(matrix[i])
        precision = _ratio(right, predicted)
        recall = _ratio(right, support)
        f1 = _ratio(2 * right, predicted + support)  # = 2PR / (P + R), 0 when both are 0
        per_class.append(
            {
                "class": name,
                "precision": round(precision, 4),
                "recall": round(recall, 4),
                "f1": round(f1, 4),
                "support": support,
            }
        )
    total = len(labels)
    return {
        "classes": list(classes),
        "examples": total,
        "accuracy": round(_ratio(sum(matrix[i][i] for i in range(n)), total), 4),
        "macro_f1": round(sum(c["f1"] for c in per_class) / n, 4) if n else 0.0,
        "per_class": per_class,
        "confusion_matrix": matrix,
    }


def report_summary(report: dict) -> str:
    """One line for the job's events: the headline figures and the weakest class."""
    line = (
        f"Classification on {report['examples']:,} validation examples: accuracy "
        f"{report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f}"
    )
    if report["per_class"]:
        weakest = min(report["per_class"], key=lambda c: c["f1"])
        line += f"; weakest class {weakest['class']!r} (F1 {weakest['f1']:.3f})"
    return line
