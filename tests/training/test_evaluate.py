"""Evaluation metrics on hand-made outputs, with the numbers worked out by hand."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from modelloop.schemas import Task
from training.evaluate import (
    classification_metrics,
    confusion_matrix_png,
    evaluate,
    regression_metrics,
)


def test_binary_classification_metrics() -> None:
    y = np.array([0, 0, 1, 1])
    proba1 = np.array([0.1, 0.6, 0.4, 0.9])  # predicts 0, 1, 0, 1: two right
    ev = classification_metrics(y, np.column_stack([1 - proba1, proba1]), ["no", "yes"])
    assert ev.metrics["accuracy"] == 0.5
    assert ev.metrics["precision"] == 0.5 and ev.metrics["recall"] == 0.5 and ev.metrics["f1"] == 0.5
    assert ev.metrics["roc_auc"] == 0.75  # 3 of the 4 positive/negative pairs ranked right
    # ranked 0.9 (yes), 0.6, 0.4 (yes), 0.1: precision 1 at the first yes, 2/3 at the second
    assert ev.metrics["pr_auc"] == pytest.approx((1 + 2 / 3) / 2)
    assert ev.details["confusion_matrix"]["matrix"] == [[1, 1], [1, 1]]
    assert ev.details["confusion_matrix"]["labels"] == ["no", "yes"]
    assert ev.details["per_class"]["yes"]["support"] == 2


def test_multiclass_roc_auc_is_macro_one_vs_rest() -> None:
    y = np.array([0, 1, 2, 2])
    proba = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.5, 0.1, 0.4]])
    ev = classification_metrics(y, proba, ["a", "b", "c"])
    # class a: 0.8 ranks first among its negatives 0.2, 0.1, 0.5 -> 1; b -> 1; c: (0.7, 0.4) vs
    # (0.1, 0.1): 1
    assert ev.metrics["roc_auc"] == 1.0
    assert ev.metrics["pr_auc"] == 1.0  # each class's rows rank first for it
    assert ev.metrics["accuracy"] == 0.75
    assert ev.details["confusion_matrix"]["matrix"] == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]


def test_roc_auc_over_present_classes_when_one_is_absent() -> None:
    y = np.array([0, 0, 1, 1])  # class 2 has no rows in this window
    proba = np.array([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1]])
    ev = classification_metrics(y, proba, ["a", "b", "c"])
    assert ev.metrics["roc_auc"] == 1.0
    assert ev.details["confusion_matrix"]["matrix"][2] == [0, 0, 0]


def test_roc_auc_is_left_out_for_a_single_class() -> None:
    ev = classification_metrics(np.array([1, 1]), np.array([[0.2, 0.8], [0.6, 0.4]]), ["n", "y"])
    assert "roc_auc" not in ev.metrics and ev.metrics["accuracy"] == 0.5


def test_regression_metrics() -> None:
    ev = regression_metrics(np.array([1.0, 2.0, 3.0, 4.0]), np.array([[1.0], [2.0], [3.0], [6.0]]))
    assert ev.metrics["mae"] == 0.5
    assert ev.metrics["rmse"] == 1.0
    assert ev.metrics["r2"] == pytest.approx(1 - 4 / 5)


def test_evaluate_dispatches_on_the_task() -> None:
    with pytest.raises(ValueError, match="classification needs class_labels"):
        evaluate(Task.classification, np.array([0]), np.array([[1.0, 0.0]]))
    assert set(evaluate(Task.regression, np.zeros(2), np.ones(2)).metrics) == {"mae", "rmse", "r2"}


def test_confusion_matrix_png_is_an_image() -> None:
    data = confusion_matrix_png([[5, 1], [0, 7]], ["malignant", "benign"], title="test")
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.size[0] > 200 and image.size[1] > 200
