"""Model quality from feedback labels, and an estimate of it before labels arrive.

Pure functions over arrays: :func:`classification_scores` gives accuracy and macro precision,
recall and F1 exactly as scikit-learn computes them (labels present in either array, zero where a
ratio is undefined); :class:`ConfidenceCalibration` is a CBPE-style estimator: it learns on the
version's reference sample how often a prediction of a given confidence is right (isotonic
regression), and averages that over the current window's confidences. :meth:`~ConfidenceCalibration.estimate`
adds a 95% interval: the window's realised accuracy is a sum of Bernoulli trials with those
chances (variance ``sum p(1-p) / n**2``), and the calibration itself was learned on a finite
sample (variance ``a(1-a) / m`` for its accuracy ``a`` over ``m`` rows). The interval holds only
where the window looks like the reference; the sidecar says when it does not (out-of-support rows,
:mod:`monitoring.data_quality`).

Example::

    scores = classification_scores(y_true, y_pred)      # scores.accuracy, scores.f1
    gate_score("pr_auc", y_true, y_pred, proba)          # the gate's metric (also AUCs)
    cal = ConfidenceCalibration.fit(ref_proba, ref_labels)
    cal.expected_accuracy(window_proba)                  # e.g. 0.91, no labels needed
    cal.estimate(window_proba)                           # AccuracyEstimate(0.91, 0.89, 0.93)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

Z_95 = 1.959963984540054


@dataclass(frozen=True)
class ClassificationScores:
    """Realised quality over ``n`` labelled predictions (macro averages over classes)."""

    n: int
    accuracy: float
    precision: float
    recall: float
    f1: float


def classification_scores(y_true: np.ndarray, y_pred: np.ndarray) -> ClassificationScores | None:
    """Accuracy and macro precision/recall/F1 of ``y_pred`` against ``y_true``; None when empty."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in shape: {y_true.shape} vs {y_pred.shape}")
    n = len(y_true)
    if n == 0:
        return None
    labels, inverse = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)
    k = len(labels)
    t, p = inverse[:n], inverse[n:]
    confusion = np.bincount(t * k + p, minlength=k * k).reshape(k, k)
    tp = np.diag(confusion).astype(np.float64)
    pred_sum = confusion.sum(axis=0)
    true_sum = confusion.sum(axis=1)
    precision = _ratio(tp, pred_sum)
    recall = _ratio(tp, true_sum)
    f1 = _ratio(2 * tp, pred_sum + true_sum)  # = 2PR/(P+R), and 0 where undefined
    return ClassificationScores(
        n=n, accuracy=float(tp.sum() / n), precision=float(precision.mean()),
        recall=float(recall.mean()), f1=float(f1.mean()),
    )


GATE_METRICS = ("accuracy", "f1", "roc_auc", "pr_auc")
DEFAULT_GATE_METRIC = "accuracy"
"""A classifier version that stored no gate metric is judged by accuracy (the default of
``MODELLOOP_TRAINING_RETRAIN_METRIC``)."""


def gate_score(metric: str, y_true: np.ndarray, y_pred: np.ndarray,
               probabilities: np.ndarray | None) -> float | None:
    """A classifier's champion/challenger gate metric over labelled rows, as training measures
    it (``training/evaluate.py``): ``accuracy`` and ``f1`` (macro) of the predictions,
    ``roc_auc`` (binary, else the mean over the classes present of one class against the rest)
    and ``pr_auc`` (average precision of class 1 for two classes, else that mean) of the
    ``[rows, classes]`` probabilities. None where it is undefined: no rows, one class only,
    no probabilities, an unknown metric."""
    y_true = np.asarray(y_true).astype(np.int64)
    if metric in ("accuracy", "f1"):
        scores = classification_scores(y_true, np.asarray(y_pred).astype(np.int64))
        return None if scores is None else float(getattr(scores, metric))
    if metric not in GATE_METRICS or probabilities is None or len(y_true) == 0:
        return None
    proba = np.asarray(probabilities, dtype=np.float64)
    keep = np.isfinite(proba).all(axis=1)
    proba, y_true = proba[keep], y_true[keep]
    present = np.unique(y_true)
    if len(present) < 2 or proba.ndim != 2 or present.max() >= proba.shape[1]:
        return None
    from sklearn import metrics as skm  # only where a model is judged by an AUC

    score = skm.roc_auc_score if metric == "roc_auc" else skm.average_precision_score
    classes = [1] if proba.shape[1] == 2 else present
    return float(np.mean([score(y_true == c, proba[:, c]) for c in classes]))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.zeros_like(num, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def label_lag(ts: np.ndarray, label_ts: np.ndarray) -> float | None:
    """Median delay (seconds) from prediction to label over the labelled events."""
    lag = (label_ts - ts)[~np.isnan(label_ts)]
    return float(np.median(lag)) if len(lag) else None


@dataclass(frozen=True)
class AccuracyEstimate:
    """An accuracy estimated without labels and its 95% interval."""

    value: float
    lower: float
    upper: float


@dataclass
class ConfidenceCalibration:
    """Maps a prediction's confidence (its top class probability) to the chance it is right."""

    model: Any  # sklearn IsotonicRegression, or None: the probabilities are taken as calibrated
    reference_accuracy: float | None = None
    reference_rows: int = 0
    """Labelled reference rows the calibration was learned on."""

    @classmethod
    def fit(cls, probabilities: np.ndarray, labels: np.ndarray | None) -> ConfidenceCalibration:
        """Learn on the reference sample's probabilities and true labels (class indexes)."""
        proba = np.asarray(probabilities, dtype=np.float64)
        if labels is None or len(proba) == 0:
            return cls(model=None)
        y = np.asarray(labels)
        ok = ~np.isnan(y.astype(np.float64))
        proba, y = proba[ok], y[ok]
        if len(y) < 10:
            return cls(model=None)
        correct = (proba.argmax(axis=1) == y.astype(np.int64)).astype(np.float64)
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip", increasing=True)
        iso.fit(proba.max(axis=1), correct)
        return cls(model=iso, reference_accuracy=float(correct.mean()), reference_rows=len(y))

    def expected_accuracy(self, probabilities: np.ndarray) -> float | None:
        """Estimated accuracy over a window of predicted probabilities (no labels needed)."""
        estimate = self.estimate(probabilities)
        return None if estimate is None else estimate.value

    def estimate(self, probabilities: np.ndarray) -> AccuracyEstimate | None:
        """The estimated accuracy of a window with its 95% interval (see the module's text)."""
        proba = np.asarray(probabilities, dtype=np.float64)
        if proba.ndim != 2 or len(proba) == 0:
            return None
        confidence = proba.max(axis=1)
        chance = confidence if self.model is None else self.model.predict(confidence)
        n = len(chance)
        value = float(np.mean(chance))
        variance = float(np.sum(chance * (1 - chance))) / n**2
        if self.reference_accuracy is not None and self.reference_rows:
            a = self.reference_accuracy
            variance += a * (1 - a) / self.reference_rows
        half = Z_95 * variance**0.5
        return AccuracyEstimate(value, max(0.0, value - half), min(1.0, value + half))
