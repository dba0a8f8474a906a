"""The autoencoder: acceptance ROC-AUC on digits with injected anomalies, the threshold's meaning,
the injection itself and the exported ``score`` output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelloop.schemas import REF_LABEL, REF_PREDICTION, SCORE, Task
from tests.training.conftest import Registered
from training.anomaly import (
    ANOMALY_KINDS,
    anomaly_metrics,
    inject_anomalies,
    with_injected_anomalies,
)
from training.export import onnx_session, run_onnx

pytestmark = pytest.mark.slow


def test_autoencoder_meets_the_acceptance_roc_auc(digits_autoencoder: Registered) -> None:
    meta = digits_autoencoder.version.metadata
    assert meta.task is Task.anomaly and meta.class_labels is None
    assert meta.metrics["roc_auc"] >= 0.95
    assert meta.outputs[0].name == SCORE and meta.outputs[0].shape == [None]
    assert meta.parity is not None and meta.parity.passed
    n_test = len(digits_autoencoder.trained.split.test)
    assert meta.evaluation["rows"] == 2 * n_test and meta.evaluation["anomalies"] == n_test


def test_threshold_flags_the_chosen_share_of_validation_rows(digits_autoencoder: Registered) -> None:
    trained = digits_autoencoder.trained
    session = onnx_session(digits_autoencoder.version.onnx_path)
    val = run_onnx(session, trained.dataset.features[trained.split.val])[SCORE]
    # the 0.99 quantile of the validation errors is the threshold: about 1 % scores >= 1
    assert (val >= 1).mean() <= 0.02
    assert float(trained.net.threshold) == pytest.approx(digits_autoencoder.version.metadata.metrics["threshold"])
    # normal test rows rarely cross it; injected spikes score far above normal rows
    test = trained.dataset.features[trained.split.test]
    normal = run_onnx(session, test)[SCORE]
    assert (normal >= 1).mean() <= 0.05
    spikes, kinds = inject_anomalies(test, 300, seed=9)
    scores = run_onnx(session, spikes[np.array(kinds) == "spike"])[SCORE]
    assert np.median(scores) > 3 * np.median(normal)


def test_score_is_torch_error_over_threshold(digits_autoencoder: Registered) -> None:
    trained = digits_autoencoder.trained
    x = trained.dataset.features[trained.split.test][:50].copy()
    x[0, 10] = np.nan
    got = run_onnx(onnx_session(digits_autoencoder.version.onnx_path), x)[SCORE]
    with torch.no_grad():
        errors = trained.net(torch.from_numpy(x)).numpy()
    assert got.shape == (50,) and np.isfinite(got).all()
    np.testing.assert_allclose(got, errors / float(trained.net.threshold), rtol=1e-4, atol=1e-6)


def test_reference_rows_are_normal_with_their_scores(digits_autoencoder: Registered) -> None:
    ref = digits_autoencoder.version.reference()
    trained = digits_autoencoder.trained
    assert (ref[REF_LABEL] == 0).all()
    x = ref[trained.dataset.feature_names].to_numpy(np.float32)
    want = run_onnx(onnx_session(digits_autoencoder.version.onnx_path), x)[SCORE]
    np.testing.assert_allclose(ref[REF_PREDICTION].to_numpy(), want, rtol=1e-6)


def _rows() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.normal(10.0, 2.0, (200, 12)).astype(np.float32)


@pytest.mark.parametrize(("kind", "changed", "check"), [
    # a spike: 1-3 features, each moved by 4 to 8 standard deviations
    ("spike", (1, 3), lambda d, sd: np.all((np.abs(d[d != 0]) >= 4 * sd[d != 0] * 0.999)
                                            & (np.abs(d[d != 0]) <= 8 * sd[d != 0] * 1.001))),
    # a scramble: half the features (6 of 12), values taken from other rows
    ("scramble", (0, 6), None),
    # noise: every feature moves
    ("noise", (12, 12), None),
])
def test_injected_kinds(kind: str, changed: tuple[int, int], check: object) -> None:
    x = _rows()
    sd = x.std(axis=0)
    out, kinds = inject_anomalies(x, 300, seed=1)
    assert kinds.count(kind) == 100 and set(kinds) == set(ANOMALY_KINDS)
    for row in out[np.array(kinds) == kind]:
        diffs = row[None, :] - x  # the source row is the one sharing the most values
        d = diffs[(diffs == 0).sum(axis=1).argmax()]
        assert changed[0] <= (d != 0).sum() <= changed[1]
        if check is not None:
            assert check(d, sd)  # type: ignore[operator]
        if kind == "scramble":  # every changed value is some row's value of that feature
            for j in np.flatnonzero(d):
                assert row[j] in x[:, j]


def test_injection_is_seeded_and_labelled() -> None:
    x = _rows()
    a1, _ = inject_anomalies(x, 50, seed=3)
    a2, _ = inject_anomalies(x, 50, seed=3)
    np.testing.assert_array_equal(a1, a2)
    mixed, labels = with_injected_anomalies(x, seed=0, ratio=0.5)
    assert mixed.shape == (300, 12) and labels.tolist() == [0] * 200 + [1] * 100
    np.testing.assert_array_equal(mixed[:200], x)


def test_anomaly_metrics_on_a_known_case() -> None:
    y = np.array([0, 0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.5, 1.2, 0.3, 2.0, 0.9])  # one false positive, one missed anomaly
    m = anomaly_metrics(y, scores).metrics
    assert m["precision"] == 0.5 and m["recall"] == 0.5 and m["false_positive_rate"] == 0.25
    assert m["roc_auc"] == pytest.approx(7 / 8)
    perfect = anomaly_metrics(y, np.array([0, 0, 0, 0, 3, 3.0])).metrics
    assert perfect["roc_auc"] == 1.0 and perfect["f1"] == 1.0
