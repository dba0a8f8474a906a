"""Quality from labels equals scikit-learn; the confidence-based estimate tracks the realised
accuracy without labels."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from modelloop.synthetic import TARGET, SyntheticTask
from monitoring.accuracy import (
    ConfidenceCalibration,
    classification_scores,
    gate_score,
    label_lag,
)
from tests.monitoring.helpers import TrainedModel


@pytest.mark.parametrize(
    ("n", "k_true", "k_pred", "seed"),
    [
        (500, 2, 2, 0),    # binary
        (1000, 4, 4, 1),   # multi-class
        (300, 3, 5, 2),    # predictions of classes that never occur in the labels
        (7, 3, 3, 3),      # a tiny window where some classes have no predictions
        (1, 2, 2, 4),      # a single labelled prediction
    ],
)
def test_scores_equal_scikit_learn(n: int, k_true: int, k_pred: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, k_true, n)
    y_pred = np.where(rng.random(n) < 0.7, y_true, rng.integers(0, k_pred, n))
    got = classification_scores(y_true, y_pred)
    assert got is not None and got.n == n
    kw = {"average": "macro", "zero_division": 0}
    assert got.accuracy == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
    assert got.precision == pytest.approx(precision_score(y_true, y_pred, **kw), abs=1e-12)
    assert got.recall == pytest.approx(recall_score(y_true, y_pred, **kw), abs=1e-12)
    assert got.f1 == pytest.approx(f1_score(y_true, y_pred, **kw), abs=1e-12)


@pytest.mark.parametrize(
    ("n", "k", "present", "seed"),
    [
        (400, 2, 2, 0),  # binary: PR-AUC is class 1's average precision
        (600, 4, 4, 1),  # multi-class: the macro mean over the classes, one against the rest
        (300, 4, 3, 2),  # a class absent from the labels: the mean over those present
    ],
)
def test_gate_scores_are_what_training_measures(n: int, k: int, present: int, seed: int) -> None:
    """The sidecar's gate metric of a window equals ``training.evaluate``'s on the same rows,
    so the gauge and ``modelloop retrain`` speak of the same number."""
    from training.evaluate import classification_metrics

    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, present, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y_true]
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y_pred = proba.argmax(axis=1)
    expected = classification_metrics(y_true, proba, [str(c) for c in range(k)]).metrics
    for metric in ("accuracy", "f1", "roc_auc", "pr_auc"):
        assert gate_score(metric, y_true, y_pred, proba) == pytest.approx(expected[metric],
                                                                           abs=1e-12), metric


@pytest.mark.parametrize(
    ("metric", "y_true", "probabilities"),
    [
        ("pr_auc", [1, 1, 1], [[0.2, 0.8]] * 3),  # one class only: no ranking to judge
        ("roc_auc", [0, 1], None),               # events without probabilities
        ("pr_auc", [], np.zeros((0, 2))),         # no labelled rows
        ("log_loss", [0, 1], [[0.9, 0.1], [0.2, 0.8]]),  # not a gate metric
    ],
)
def test_an_undefined_gate_score_is_none(metric: str, y_true: list[int],
                                         probabilities: object) -> None:
    y = np.asarray(y_true, dtype=np.int64)
    proba = None if probabilities is None else np.asarray(probabilities, dtype=np.float64)
    assert gate_score(metric, y, y, proba) is None


def test_no_labels_no_scores_and_shapes_must_match() -> None:
    assert classification_scores(np.array([]), np.array([])) is None
    with pytest.raises(ValueError, match=r"differ in shape: \(2,\) vs \(3,\)"):
        classification_scores(np.zeros(2), np.zeros(3))


def test_label_lag_is_the_median_delay_of_labelled_events() -> None:
    ts = np.array([0.0, 10.0, 20.0, 30.0])
    label_ts = np.array([5.0, np.nan, 50.0, 31.0])
    assert label_lag(ts, label_ts) == 5.0
    assert label_lag(ts, np.full(4, np.nan)) is None


def test_estimated_accuracy_tracks_the_realised_one(task: SyntheticTask,
                                                    trained: TrainedModel) -> None:
    ref = trained.reference(rows=3000)
    proba_cols = ["_ml_proba_0", "_ml_proba_1"]
    cal = ConfidenceCalibration.fit(ref[proba_cols].to_numpy(), ref["_ml_label"].to_numpy())
    assert cal.reference_accuracy == pytest.approx(
        (ref["_ml_prediction"] == ref["_ml_label"]).mean())
    for seed, concept in ((31, 0.0), (32, 0.0)):
        window = task.sample(3000, seed=seed, concept=concept)
        proba = trained.predict_proba(window[task.feature_names].to_numpy())
        realised = (proba.argmax(axis=1) == window[TARGET].to_numpy()).mean()
        # without labels, within two points of what the labels later show
        assert cal.expected_accuracy(proba) == pytest.approx(realised, abs=0.02)


def test_estimate_without_a_calibration_is_the_mean_confidence() -> None:
    cal = ConfidenceCalibration.fit(np.array([[0.5, 0.5]]), None)
    assert cal.model is None
    assert cal.expected_accuracy(np.array([[0.9, 0.1], [0.3, 0.7]])) == pytest.approx(0.8)
    assert cal.expected_accuracy(np.zeros((0, 2))) is None


def test_the_estimate_has_an_interval_that_holds_the_realised_accuracy(
        task: SyntheticTask, trained: TrainedModel) -> None:
    ref = trained.reference(rows=2000)
    cal = ConfidenceCalibration.fit(ref[["_ml_proba_0", "_ml_proba_1"]].to_numpy(),
                                    ref["_ml_label"].to_numpy())
    assert cal.reference_rows == 2000
    for seed in (41, 42, 43):
        window = task.sample(1000, seed=seed)
        proba = trained.predict_proba(window[task.feature_names].to_numpy())
        realised = (proba.argmax(axis=1) == window[TARGET].to_numpy()).mean()
        est = cal.estimate(proba)
        assert est is not None and est.value == cal.expected_accuracy(proba)
        assert est.lower <= realised <= est.upper
        # Bernoulli spread of 1000 rows and the calibration's of 2000: a few points, not more
        assert 0.02 < est.upper - est.lower < 0.08


def test_the_estimate_gap_shows_labels_that_disagree_with_the_confidence() -> None:
    """A concept shift leaves the features and the confidence as they were; only the labels
    change. The estimate on the labelled rows minus their realised accuracy shows it."""
    from monitoring.evaluate import MIN_GAP_LABELS, _estimate_gap
    from monitoring.records import Window

    rng = np.random.default_rng(3)

    def window(n: int, flipped: bool) -> Window:
        p1 = rng.uniform(0.05, 0.95, n)
        proba = np.column_stack([1 - p1, p1])
        truth = (rng.random(n) < p1).astype(np.float64)  # calibrated: P(y=1) = p1
        label = 1 - truth if flipped else truth
        return Window(version=np.ones(n, np.int64), ts=np.arange(n, dtype=np.float64),
                      prediction=proba.argmax(axis=1).astype(np.float64),
                      latency_s=np.zeros(n), label=label, label_ts=np.ones(n),
                      features=None, probabilities=proba)

    ref = window(2000, flipped=False)
    calibration = ConfidenceCalibration.fit(ref.probabilities, ref.label)

    def gap(w: Window) -> float | None:
        mask = w.labelled
        acc = float(np.mean(w.prediction[mask] == w.label[mask]))
        return _estimate_gap(w, calibration, {"accuracy": acc, "n": int(mask.sum())})

    same, shifted = gap(window(1000, flipped=False)), gap(window(1000, flipped=True))
    assert same is not None and abs(same) < 0.04
    assert shifted is not None and shifted > 0.4  # the estimate promises ~0.75, labels give ~0.25
    few = window(MIN_GAP_LABELS - 1, flipped=True)
    assert gap(few) is None  # too few labels to judge
