"""Preprocessing inside the model, the MLP, and the architecture registry as an extension point."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import BaseModel
from torch import nn

from modelloop.schemas import Task
from training import models
from training.config import TrainingConfig
from training.data import load_data
from training.models import (
    ARCHITECTURES,
    MLP,
    Architecture,
    MLPParams,
    Preprocessor,
    build_model,
    get_architecture,
    register_architecture,
)
from training.pipeline import TrainOptions, train_model
from training.settings import TrainingSettings


def test_preprocessor_fits_on_observed_values_and_holds_buffers() -> None:
    x = np.array([[1.0, 10.0, 5.0, np.nan],
                  [2.0, np.nan, 5.0, np.nan],
                  [3.0, 30.0, 5.0, np.nan],
                  [np.nan, 20.0, 5.0, np.nan]], dtype=np.float32)
    pre = Preprocessor.fit(x)
    assert pre.median.tolist() == [2.0, 20.0, 5.0, 0.0]  # an all-missing column imputes 0
    assert pre.scale[2] == 1.0  # a constant column is centred, not divided by zero
    assert set(pre.state_dict()) == {"median", "mean", "scale"}  # saved and exported with the model
    out = pre(torch.from_numpy(x))
    assert torch.isfinite(out).all()
    # a NaN becomes the median, then is standardized like any value
    assert out[3, 0] == pytest.approx(float((2.0 - pre.mean[0]) / pre.scale[0]))
    filled = np.where(np.isnan(x), pre.median.numpy(), x)
    np.testing.assert_allclose(out.numpy().mean(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(pre.mean.numpy(), filled.mean(axis=0), rtol=1e-6)


@pytest.mark.parametrize(
    ("params", "layers"),
    [
        # the default: batch norm and dropout after each hidden layer
        (MLPParams(), [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout,
                       nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout, nn.Linear]),
        # switched off
        (MLPParams(hidden=[8], dropout=0.0, batch_norm=False, activation="gelu"),
         [nn.Linear, nn.GELU, nn.Linear]),
    ],
)
def test_mlp_layers_follow_the_params(params: MLPParams, layers: list[type]) -> None:
    mlp = MLP(5, 3, params)
    assert [type(m) for m in mlp.layers] == layers
    assert mlp(torch.randn(4, 5)).shape == (4, 3)


def test_mlp_params_reject_unknown_and_bad_values() -> None:
    with pytest.raises(ValueError, match="dropout"):
        MLPParams(dropout=1.5)
    with pytest.raises(ValueError, match="extra_forbidden"):
        MLPParams.model_validate({"hiden": [3]})


def test_unknown_architecture_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"^unknown architecture 'resnet' \(known: "
                                         r"autoencoder, cnn, gru, lstm, mlp; or package.module:Class\)$"):
        get_architecture("resnet")


class LinearParams(BaseModel):
    bias: bool = True


def test_a_registered_architecture_reuses_trainer_export_and_registry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """How a later architecture plugs in: a backbone builder, nothing else."""
    monkeypatch.setattr(models, "ARCHITECTURES", dict(ARCHITECTURES))  # restored after the test
    register_architecture(Architecture(
        "linear", LinearParams,
        lambda p, n_in, n_out: nn.Linear(n_in, n_out, bias=p.bias),  # type: ignore[attr-defined]
        "logistic / linear regression"))
    settings = TrainingSettings(home=tmp_path, progress=False)
    config = TrainingConfig.from_settings(settings, architecture="linear", epochs=30)
    trained = train_model("wine", name="wine-linear", options=TrainOptions(
        config=config, settings=settings))
    meta = trained.metadata
    assert meta.architecture == "linear" and meta.config["model"] == {"bias": True}
    assert meta.parity is not None and meta.parity.passed
    assert meta.metrics["accuracy"] > 0.8


def test_build_model_rejects_a_task_the_architecture_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ARCHITECTURES, "clf-only", Architecture(
        "clf-only", MLPParams, lambda p, i, o: nn.Linear(i, o), "", frozenset({Task.classification})))
    ds = load_data("diabetes")
    with pytest.raises(ValueError, match="architecture 'clf-only' does not support regression"):
        build_model("clf-only", MLPParams(), train_features=ds.features, task=Task.regression,
                    n_outputs=1)
