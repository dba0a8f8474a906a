"""Evaluation metrics: pure functions from labels and model outputs to numbers.

Classification: ``accuracy``, ``precision``, ``recall``, ``f1`` (macro averages), ``roc_auc``
(binary, or macro one-vs-rest for more classes), ``pr_auc`` (average precision: of the positive
class for two classes, else the macro mean over the classes present, one against the rest) and
``log_loss``; the confusion matrix and
per-class scores go into :attr:`Evaluation.details`. Regression: ``mae``, ``rmse``, ``r2``.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn import metrics as skm

from modelloop.schemas import Task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]
    """Scalar metrics (``ModelMetadata.metrics``)."""
    details: dict[str, Any] = field(default_factory=dict)
    """JSON-ready non-scalar results (``ModelMetadata.evaluation``)."""


def classification_metrics(
    y_true: np.ndarray, probabilities: np.ndarray, class_labels: list[str]
) -> Evaluation:
    """Metrics of class indices ``y_true`` against ``[rows, n_classes]`` probabilities."""
    k = len(class_labels)
    classes = list(range(k))
    y_pred = probabilities.argmax(axis=1)
    prec, rec, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=classes, zero_division=0)
    metrics = {
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "precision": float(np.mean(prec)),
        "recall": float(np.mean(rec)),
        "f1": float(np.mean(f1)),
    }
    present = np.unique(y_true)
    if len(present) < 2:
        log.warning("ROC-AUC is undefined: the evaluation rows hold a single class")
    elif k == 2:
        metrics["roc_auc"] = float(skm.roc_auc_score(y_true, probabilities[:, 1]))
    elif len(present) == k:
        metrics["roc_auc"] = float(skm.roc_auc_score(
            y_true, probabilities, multi_class="ovr", average="macro", labels=classes))
    else:  # one-vs-rest over the classes that occur (an absent class has no positives)
        metrics["roc_auc"] = float(np.mean([
            skm.roc_auc_score(y_true == c, probabilities[:, c]) for c in present]))
    if len(present) >= 2:  # precision-recall AUC (average precision), one-vs-rest macro
        positive = list(present) if k > 2 else [1]
        metrics["pr_auc"] = float(np.mean([
            skm.average_precision_score(y_true == c, probabilities[:, c]) for c in positive]))
    metrics["log_loss"] = float(skm.log_loss(y_true, np.clip(probabilities, 1e-7, 1.0),
                                             labels=classes))
    matrix = skm.confusion_matrix(y_true, y_pred, labels=classes)
    details = {
        "rows": len(y_true),
        "confusion_matrix": {
            "labels": class_labels,
            "matrix": matrix.tolist(),
            "axes": "rows are true labels, columns are predicted labels",
        },
        "per_class": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(class_labels, prec, rec, f1, support, strict=True)
        },
    }
    return Evaluation(metrics, details)


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> Evaluation:
    """Metrics of true values against predictions (both ``[rows]`` or ``[rows, 1]``)."""
    y_true, y_pred = np.ravel(y_true), np.ravel(y_pred)
    metrics = {
        "mae": float(skm.mean_absolute_error(y_true, y_pred)),
        "rmse": float(np.sqrt(skm.mean_squared_error(y_true, y_pred))),
        "r2": float(skm.r2_score(y_true, y_pred)),
    }
    return Evaluation(metrics, {"rows": len(y_true)})


def evaluate(
    task: Task, y_true: np.ndarray, outputs: np.ndarray, class_labels: list[str] | None = None
) -> Evaluation:
    """Dispatch on the task: ``outputs`` are probabilities (classification) or predictions."""
    if task is Task.classification:
        if class_labels is None:
            raise ValueError("classification needs class_labels")
        return classification_metrics(y_true, outputs, class_labels)
    return regression_metrics(y_true, outputs)


def confusion_matrix_png(matrix: list[list[int]], labels: list[str], title: str = "") -> bytes:
    """The confusion matrix as a PNG (counts in the cells, true labels down the side)."""
    # the object API with the Agg canvas: no pyplot global state, no display needed
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = np.asarray(matrix)
    size = max(3.5, 0.55 * len(labels) + 2)
    fig = Figure(figsize=(size + 1, size), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(m, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ticks = range(len(labels))
    ax.set_xticks(ticks, labels=labels, rotation=45, ha="right")
    ax.set_yticks(ticks, labels=labels)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    if title:
        ax.set_title(title)
    threshold = m.max() / 2 if m.size else 0
    for (i, j), count in np.ndenumerate(m):
        ax.text(j, i, str(count), ha="center", va="center",
                color="white" if count > threshold else "black")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
