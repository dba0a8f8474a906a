"""Bring your own model (training/byo.py): a user's module, trained here, exported, checked and
registered; every refusal with its one-line reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.datasets import load_iris
from torch import nn

from modelloop.registry import Registry
from modelloop.schemas import PREDICTION, PROBABILITIES, REF_SPLIT, Task
from tests.training import byo_nets
from tests.training.conftest import quiet_settings
from training.byo import ByoError, ExampleData, not_retrainable, register_module
from training.config import TrainingConfig
from training.export import ParityError, onnx_session, run_onnx
from training.models import Preprocessor
from training.pipeline import TrainOptions, train_model

SPECIES = np.array(["setosa", "versicolor", "virginica"])
KWARGS = {"n_features": 4, "n_classes": 3}


def iris() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Iris with string labels: a training frame and a holdout frame."""
    frame = load_iris(as_frame=True).frame.rename(columns=lambda c: c.replace(" (cm)", "").replace(" ", "_"))
    frame["target"] = SPECIES[frame["target"]]
    held = frame.sample(frac=0.3, random_state=0)
    return frame.drop(index=held.index).reset_index(drop=True), held.reset_index(drop=True)


def fit(module: nn.Module, x: np.ndarray, y: np.ndarray, loss: Any, epochs: int = 300) -> nn.Module:
    """A user's own training loop: full-batch Adam."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(module.parameters(), lr=0.05)
    xt, yt = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y)
    for _ in range(epochs):
        opt.zero_grad()
        loss(module(xt), yt).backward()
        opt.step()
    return module.eval()


@pytest.fixture(scope="module")
def trained_classifier() -> tuple[nn.Module, Preprocessor, pd.DataFrame, pd.DataFrame]:
    """TinyClassifier trained behind modelloop's Preprocessor on the iris training frame."""
    train, held = iris()
    features = train.drop(columns="target").to_numpy(np.float32)
    pre = Preprocessor.fit(features)
    with torch.no_grad():
        z = pre(torch.from_numpy(features)).numpy()
    torch.manual_seed(0)
    net = fit(byo_nets.TinyClassifier(**KWARGS), z,
              np.searchsorted(SPECIES, train["target"].to_numpy()), nn.functional.cross_entropy)
    return net, pre, train, held


def test_a_trained_classifier_is_registered_promoted_and_faithful(tmp_path: Path, trained_classifier: Any) -> None:
    net, pre, train, held = trained_classifier
    settings = quiet_settings(tmp_path)
    registry = Registry(settings.registry_dir)
    meta = register_module(net, ExampleData(train, holdout=held), name="iris", preprocess=pre,
                           init_kwargs=KWARGS, registry=registry, settings=settings, promote=True)
    assert registry.aliases("iris") == {"production": meta.version}
    assert meta.task is Task.classification and meta.class_labels == list(SPECIES)
    assert meta.metrics["accuracy"] > 0.85  # on the 45 held-out rows
    assert meta.parity is not None and meta.parity.passed
    assert meta.lineage["source"] == "module"
    assert meta.lineage["module_class"] == "tests.training.byo_nets.TinyClassifier"
    assert meta.config["architecture"] == "tests.training.byo_nets:TinyClassifier"
    assert meta.config["model"] == KWARGS
    assert meta.gate_metric == "accuracy"  # MODELLOOP_TRAINING_RETRAIN_METRIC, as train stores it
    version = registry.get("iris", meta.version)
    reference = version.reference()
    assert set(reference[REF_SPLIT]) == {"train", "holdout"}
    assert (reference[REF_SPLIT] == "holdout").sum() == len(held)
    # the served graph is the module behind its preprocessing, with the softmax
    x = held.drop(columns="target").to_numpy(np.float32)
    served = run_onnx(onnx_session(version.onnx_path), x)[PROBABILITIES]
    with torch.no_grad():
        want = torch.softmax(net(pre(torch.from_numpy(x))), dim=-1).numpy()
    np.testing.assert_allclose(served, want, atol=1e-5)
    assert not_retrainable(meta) is None


def test_retraining_rebuilds_the_users_architecture(tmp_path: Path, trained_classifier: Any) -> None:
    """What `modelloop retrain` does with the champion's config: the user's class, trained
    by modelloop's loop."""
    net, pre, train, held = trained_classifier
    settings = quiet_settings(tmp_path)
    meta = register_module(net, ExampleData(train, holdout=held), name="iris", preprocess=pre,
                           init_kwargs=KWARGS, registry=Registry(settings.registry_dir),
                           settings=settings)
    config = TrainingConfig.model_validate(meta.config).model_copy(update={"epochs": 30})
    challenger = train_model(pd.concat([train, held]), name="iris", options=TrainOptions(
        config=config, settings=settings, class_labels=meta.class_labels,
        parent_version=meta.version))
    assert isinstance(challenger.net.backbone.module, byo_nets.TinyClassifier)
    assert challenger.metadata.architecture == "tests.training.byo_nets:TinyClassifier"
    assert challenger.metadata.metrics["accuracy"] > 0.6


def test_a_regressor_with_a_1d_output_and_raw_features(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 3)).astype(np.float32)
    y = (x @ np.array([1.5, -2.0, 0.5]) + 3 + rng.normal(scale=0.1, size=300)).astype(np.float32)
    net = fit(byo_nets.TinyRegressor(3), x[:200], y[:200], nn.functional.mse_loss)
    settings = quiet_settings(tmp_path)
    data = ExampleData((x[:200], y[:200]), holdout=(x[200:], y[200:]), task=Task.regression,
                       feature_names=["a", "b", "c"])
    meta = register_module(net, data, name="lin", registry=Registry(settings.registry_dir), settings=settings)
    assert meta.outputs[0].name == PREDICTION and meta.outputs[0].shape == [None, 1]
    assert meta.metrics["r2"] > 0.95
    assert meta.lineage["preprocess"] == "none" and meta.lineage["retrainable"] is False
    assert "without its constructor arguments" in (not_retrainable(meta) or "")


def _local_class() -> nn.Module:
    class Hidden(byo_nets.TinyClassifier):
        pass

    return Hidden(**KWARGS)


@pytest.mark.parametrize(
    ("module", "init_kwargs", "error", "message"),
    [
        # control flow on tensor values: torch.export cannot trace it
        (byo_nets.DataDependent(**KWARGS), None, ByoError,
         "module tests.training.byo_nets.DataDependent does not export to ONNX: "
         "GuardOnDataDependentSymNode: Could not guard on data-dependent expression"),
        # two logits for three classes
        (byo_nets.TinyClassifier(4, 2), None, ByoError,
         "module tests.training.byo_nets.TinyClassifier outputs shape [4, 2] for 4 rows; a "
         "classification model must output [batch, 3] logits, one per class "
         "['setosa', 'versicolor', 'virginica']"),
        # fresh noise on every call: ONNX Runtime cannot agree with PyTorch
        (byo_nets.Noisy(**KWARGS), None, ParityError, "ONNX export parity failed: 3 output(s)"),
        # branches on the batch size: the graph holds one branch, small batches differ
        (byo_nets.FixedBatch(**KWARGS), None, ParityError,
         "ONNX export parity failed: 2 output(s) differ from PyTorch by more than 0.0001: "
         "probabilities at batch size 1"),
        # a class a retraining job cannot import
        (_local_class(), KWARGS, ByoError, "cannot be imported by a retraining job"),
        # constructor arguments that build another shape
        (byo_nets.TinyClassifier(**KWARGS), {**KWARGS, "hidden": 8}, ByoError,
         "does not rebuild the module: its parameters differ"),
    ],
)
def test_refusals(tmp_path: Path, module: nn.Module, init_kwargs: dict[str, Any] | None,
                  error: type[Exception], message: str) -> None:
    train, held = iris()
    settings = quiet_settings(tmp_path)
    with pytest.raises(error) as info:
        register_module(module, ExampleData(train, holdout=held), name="iris", preprocess="fit",
                        init_kwargs=init_kwargs, registry=Registry(settings.registry_dir),
                        settings=settings)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    if error is ParityError:
        assert "held-out row" in str(info.value)
    assert Registry(settings.registry_dir).models() == []
