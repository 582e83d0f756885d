"""A classifier's evaluation report: confusion matrix, per-class P/R/F1, macro-F1."""

from __future__ import annotations

import pytest

from app.domain.classification import classification_report, confusion_matrix, report_summary

CLASSES = ["World", "Sports", "Business"]
# True classes: 3 World, 2 Sports, 3 Business; Business is never predicted.
LABELS = [0, 0, 0, 1, 1, 2, 2, 2]
PREDICTIONS = [0, 0, 1, 1, 0, 0, 1, 0]


def test_the_confusion_matrix_has_true_classes_in_rows() -> None:
    assert confusion_matrix(3, LABELS, PREDICTIONS) == [
        [2, 1, 0],
        [1, 1, 0],
        [2, 1, 0],
    ]


def test_per_class_precision_recall_and_f1() -> None:
    report = classification_report(CLASSES, LABELS, PREDICTIONS)
    assert report["per_class"] == [
        # 2 right of 5 predicted World, of 3 World: F1 = 2·2 / (5 + 3).
        {"class": "World", "precision": 0.4, "recall": 0.6667, "f1": 0.5, "support": 3},
        {"class": "Sports", "precision": 0.3333, "recall": 0.5, "f1": 0.4, "support": 2},
        # Never predicted: precision 0 (not a division by zero), and so F1 0.
        {"class": "Business", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 3},
    ]


def test_accuracy_and_macro_f1_weigh_every_class_alike() -> None:
    report = classification_report(CLASSES, LABELS, PREDICTIONS)
    assert report["classes"] == CLASSES
    assert report["examples"] == 8
    assert report["accuracy"] == 0.375
    assert report["macro_f1"] == pytest.approx((0.5 + 0.4 + 0.0) / 3, abs=1e-4)
    assert report["confusion_matrix"] == confusion_matrix(3, LABELS, PREDICTIONS)


def test_a_perfect_classifier_scores_one_everywhere() -> None:
    report = classification_report(CLASSES, [0, 1, 2, 2], [0, 1, 2, 2])
    assert (report["accuracy"], report["macro_f1"]) == (1.0, 1.0)
    assert all(c["precision"] == c["recall"] == c["f1"] == 1.0 for c in report["per_class"])


def test_a_class_without_examples_has_recall_zero_and_counts_in_macro_f1() -> None:
    report = classification_report(["a", "b"], [0, 0], [0, 0])
    assert report["per_class"][1] == {
        "class": "b",
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "support": 0,
    }
    assert report["macro_f1"] == 0.5


def test_labels_and_predictions_of_different_lengths_are_an_error() -> None:
    with pytest.raises(ValueError, match="3 labels but 2 predictions"):
        classification_report(CLASSES, [0, 1, 2], [0, 1])


def test_the_summary_names_the_headline_figures_and_the_weakest_class() -> None:
    summary = report_summary(classification_report(CLASSES, LABELS, PREDICTIONS))
    assert summary == (
        "Classification on 8 validation examples: accuracy 0.375, macro-F1 0.300; "
        "weakest class 'Business' (F1 0.000)"
    )
