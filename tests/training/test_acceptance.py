"""Issue 2's acceptance, as a user would check it: the default MLP on breast_cancer, its
registered ONNX file run in ONNX Runtime against PyTorch, NaN handling, and what is stored."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from modelloop.schemas import (
    ALIAS_PRODUCTION,
    INPUT_NAME,
    PROBABILITIES,
    REF_LABEL,
    REF_PREDICTION,
    REF_PROBA_PREFIX,
    REF_SPLIT,
)
from tests.training.conftest import Registered
from training.config import TrainingConfig
from training.data import load_data
from training.pipeline import CONFUSION_MATRIX_PNG, TrainOptions, train_model
from training.settings import TrainingSettings

pytestmark = pytest.mark.slow


def _session(cancer: Registered) -> ort.InferenceSession:
    return ort.InferenceSession(str(cancer.version.onnx_path), providers=["CPUExecutionProvider"])


def _test_rows(cancer: Registered) -> np.ndarray:
    trained = cancer.trained
    return trained.dataset.features[trained.split.test]


def test_default_mlp_meets_the_acceptance_metrics(cancer: Registered) -> None:
    meta = cancer.registry.get("cancer", ALIAS_PRODUCTION).metadata
    assert meta.metrics["accuracy"] >= 0.95
    assert meta.metrics["roc_auc"] >= 0.98
    # ...with the real default config, not one tuned for the test
    defaults = TrainingConfig.from_settings(TrainingSettings())
    stored = TrainingConfig.model_validate(meta.config)
    assert stored.model_dump(exclude={"task", "model", "gate_metric"}) == \
        defaults.model_dump(exclude={"task", "model", "gate_metric"})
    assert stored.gate_metric == TrainingSettings().retrain_metric  # the setting's, resolved
    assert stored.model == {"hidden": [64, 32], "dropout": 0.1, "batch_norm": True, "activation": "relu"}


@pytest.mark.parametrize("batch", [1, 7, 4096])
def test_registered_onnx_matches_torch(cancer: Registered, batch: int) -> None:
    x = _test_rows(cancer)
    x = x[np.arange(max(batch, len(x))) % len(x)]
    session = _session(cancer)
    net = cancer.trained.net.eval()
    for start in range(0, len(x), batch):
        chunk = x[start:start + batch]
        if len(chunk) < batch:
            break
        (got,) = session.run([PROBABILITIES], {INPUT_NAME: chunk})
        with torch.no_grad():
            want = net.infer(torch.from_numpy(chunk)).numpy()
        assert got.shape == (batch, 2)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_nan_in_any_feature_gives_a_finite_prediction(cancer: Registered) -> None:
    ds = cancer.trained.dataset
    train = ds.features[cancer.trained.split.train]
    base = np.repeat(_test_rows(cancer)[:1], ds.n_features, axis=0)
    with_nan = base.copy()
    with_nan[np.arange(ds.n_features), np.arange(ds.n_features)] = np.nan  # row j: feature j
    all_nan = np.full((1, ds.n_features), np.nan, dtype=np.float32)
    session = _session(cancer)
    (proba,) = session.run([PROBABILITIES], {INPUT_NAME: np.concatenate([with_nan, all_nan])})
    assert np.isfinite(proba).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    # a missing value is read as the training median: same output as writing the median in
    imputed = base.copy()
    medians = np.median(train, axis=0).astype(np.float32)
    imputed[np.arange(ds.n_features), np.arange(ds.n_features)] = medians
    (expected,) = session.run([PROBABILITIES], {INPUT_NAME: imputed})
    np.testing.assert_allclose(proba[:-1], expected, atol=1e-6)


def test_onnx_graph_follows_the_conventions(cancer: Registered) -> None:
    model = onnx.load(str(cancer.version.onnx_path))
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert inp.name == INPUT_NAME and inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")  # dynamic batch
    assert dims[1].dim_value == 30
    assert out.name == PROBABILITIES
    meta = cancer.version.metadata
    assert [(t.name, t.shape) for t in meta.inputs] == [(INPUT_NAME, [None, 30])]
    assert [(t.name, t.shape) for t in meta.outputs] == [(PROBABILITIES, [None, 2])]
    assert meta.parity is not None and meta.parity.passed
    assert meta.parity.batch_sizes == [1, 7, 4096] and meta.parity.max_abs_diff <= 1e-4


def test_version_stores_evaluation_fingerprint_and_reference(cancer: Registered) -> None:
    meta, ds = cancer.version.metadata, cancer.trained.dataset
    assert meta.feature_names == ds.feature_names and meta.class_labels == ["malignant", "benign"]
    assert meta.data_fingerprint == load_data("breast_cancer").fingerprint
    assert meta.dataset == "breast_cancer"
    assert set(meta.metrics) == {"accuracy", "precision", "recall", "f1", "roc_auc", "pr_auc",
                                 "log_loss"}
    cm = np.array(meta.evaluation["confusion_matrix"]["matrix"])
    assert cm.sum() == len(cancer.trained.split.test) == 114
    assert np.trace(cm) / cm.sum() == pytest.approx(meta.metrics["accuracy"])
    assert (cancer.version.path / CONFUSION_MATRIX_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    ref = cancer.version.reference()
    assert list(ref.columns) == [*ds.feature_names, REF_LABEL, REF_PREDICTION,
                                 f"{REF_PROBA_PREFIX}0", f"{REF_PROBA_PREFIX}1", REF_SPLIT]
    split = cancer.trained.split
    # every training row (fewer than the 2000-row cap), then the held-out rows, marked
    rows = np.concatenate([np.sort(split.train), np.sort(np.concatenate([split.val, split.test]))])
    assert len(ref) == len(rows)
    assert (ref[REF_SPLIT] == np.where(np.arange(len(rows)) < len(split.train), "train", "holdout")).all()
    (proba,) = _session(cancer).run(
        [PROBABILITIES], {INPUT_NAME: ref[ds.feature_names].to_numpy(np.float32)})
    np.testing.assert_allclose(ref[[f"{REF_PROBA_PREFIX}0", f"{REF_PROBA_PREFIX}1"]], proba, atol=1e-6)
    assert (ref[REF_PREDICTION] == proba.argmax(axis=1)).all()
    assert (ref[REF_LABEL] == ds.target[rows]).all()


def test_stored_config_retrains_the_same_model_from_a_dataframe(cancer: Registered) -> None:
    """What a retraining job does: the champion's config, its classes, data as a DataFrame."""
    champion = cancer.version.metadata
    frame = load_data("breast_cancer").to_frame()
    challenger = train_model(frame, name="cancer", options=TrainOptions(
        config=TrainingConfig.model_validate(champion.config), settings=cancer.settings,
        class_labels=champion.class_labels, parent_version=champion.version,
        lineage={"trigger": "test"}))
    meta = challenger.metadata
    lineage = {k: v for k, v in meta.lineage.items() if k not in ("data_report", "reference_rows")}
    assert (meta.parent_version, lineage, meta.class_labels) == (1, {"trigger": "test"},
                                                                champion.class_labels)
    assert meta.lineage["data_report"] == champion.lineage["data_report"]  # the same table
    assert meta.lineage["reference_rows"] == champion.lineage["reference_rows"]  # the same rows
    # same data, config and seed: the same model, to the bit on CPU
    assert meta.data_fingerprint == champion.data_fingerprint
    assert meta.metrics == champion.metrics
    x = _test_rows(cancer)
    np.testing.assert_array_equal(challenger.predict(x), cancer.trained.predict(x))
