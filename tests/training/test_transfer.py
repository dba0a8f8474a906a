"""Fine-tuning from a registered version (training/transfer.py): weights carried over, layers
frozen, a new head for other classes, and the errors when the parent cannot seed the model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from modelloop.registry import Registry
from tests.training.conftest import Registered
from training.config import TrainingConfig
from training.data import load_data
from training.pipeline import WEIGHTS_FILE, TrainOptions, train_model
from training.transfer import TransferError, WarmStart, weight_layers

pytestmark = pytest.mark.slow


def _config(registered: Registered, **overrides: object) -> TrainingConfig:
    return TrainingConfig.model_validate(registered.version.metadata.config).model_copy(
        update=overrides)


def test_weight_layers_group_norms_with_their_layer(cancer: Registered) -> None:
    net = cancer.trained.net  # default MLP: Linear, BatchNorm, ReLU, Dropout, x2, then the head
    assert weight_layers(net) == [["backbone.layers.0", "backbone.layers.1"],
                                  ["backbone.layers.4", "backbone.layers.5"],
                                  ["backbone.layers.8"]]


def test_fine_tuning_starts_where_the_parent_ended(cancer: Registered) -> None:
    init = WarmStart.from_registry(cancer.registry, "cancer")
    data = load_data("breast_cancer", rows=400, seed=7)
    config = _config(cancer, seed=7, epochs=5, patience=5)
    tuned = train_model(data, name="cancer", options=TrainOptions(
        config=config, settings=cancer.settings, init=init))
    scratch = train_model(data, name="cancer", options=TrainOptions(
        config=config, settings=cancer.settings))
    # the parent already fits this data: its first epoch is far better than a fresh model's
    assert tuned.fit.history[0].val_loss < 0.5 * scratch.fit.history[0].val_loss
    lineage = tuned.metadata.lineage["fine_tuned_from"]
    assert lineage["version"] == cancer.version.version and lineage["tensors_fresh"] == []
    # the parent's preprocessing is kept (it fitted the data the weights learned from)
    parent = cancer.trained.net.state_dict()
    assert torch.equal(tuned.net.state_dict()["preprocess.median"], parent["preprocess.median"])


def test_frozen_layers_keep_the_parents_weights_and_statistics(cancer: Registered) -> None:
    init = WarmStart.from_registry(cancer.registry, "cancer", freeze=2)
    data = load_data("breast_cancer", rows=400, seed=8)
    tuned = train_model(data, name="cancer", options=TrainOptions(
        config=_config(cancer, seed=8, epochs=4), settings=cancer.settings, init=init))
    parent, child = cancer.trained.net.state_dict(), tuned.net.state_dict()
    for key in ("backbone.layers.0.weight", "backbone.layers.1.running_mean",
                "backbone.layers.4.weight", "backbone.layers.5.running_var"):
        assert torch.equal(parent[key], child[key]), key
    assert not torch.equal(parent["backbone.layers.8.weight"], child["backbone.layers.8.weight"])
    assert tuned.metadata.lineage["fine_tuned_from"]["frozen_modules"] == [
        "backbone.layers.0", "backbone.layers.1", "backbone.layers.4", "backbone.layers.5"]


def test_other_classes_get_a_fresh_head(cancer: Registered) -> None:
    frame = load_data("breast_cancer").to_frame()
    # the same 30 features, a new three-class target
    frame["target"] = pd.qcut(frame["mean radius"], 3, labels=["small", "medium", "large"])
    frame["target"] = frame["target"].astype(str)
    init = WarmStart.from_registry(cancer.registry, "cancer")
    tuned = train_model(frame, name="sizes", options=TrainOptions(
        config=_config(cancer, epochs=30), settings=cancer.settings, init=init))
    assert init.fresh == ["backbone.layers.8.bias", "backbone.layers.8.weight"]
    assert tuned.metadata.class_labels == ["large", "medium", "small"]
    assert tuned.metadata.metrics["accuracy"] > 0.8


def test_the_same_number_of_other_classes_gets_a_fresh_head(cancer: Registered) -> None:
    frame = load_data("breast_cancer").to_frame()
    median = frame["mean radius"].median()
    frame["target"] = np.where(frame["mean radius"] > median, "large", "small")  # 2 classes again
    init = WarmStart.from_registry(cancer.registry, "cancer")
    tuned = train_model(frame, name="sizes", options=TrainOptions(
        config=_config(cancer, epochs=20), settings=cancer.settings, init=init))
    # the parent's output rows meant malignant/benign: not loaded, though the shapes fit
    assert init.new_head and init.fresh == ["backbone.layers.8.bias", "backbone.layers.8.weight"]
    assert tuned.metadata.metrics["accuracy"] > 0.85


def test_other_features_of_the_same_count_are_refused(cancer: Registered) -> None:
    frame = load_data("breast_cancer").to_frame()
    names = [c for c in frame.columns if c != "target"]
    swapped = frame.rename(columns={names[0]: names[1], names[1]: names[0]})  # same count
    init = WarmStart.from_registry(cancer.registry, "cancer")
    with pytest.raises(TransferError, match="feature 0 is 'mean radius' there, 'mean texture' here"):
        train_model(swapped, name="x", options=TrainOptions(
            config=_config(cancer, epochs=2), settings=cancer.settings, init=init))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        # 13 wine features into a model of 30
        ("other inputs", "its inputs differ from this data's"),
        # a CNN cannot start from an MLP
        ("other architecture", "cannot fine-tune a 'cnn' model from cancer v1, a 'mlp' model"),
        # other hidden widths: the weights cannot fit
        ("other parameters", "with other architecture parameters"),
        # the output layer must train
        ("freeze everything", "--freeze 3: the model has 3 weight layers"),
    ],
)
def test_a_parent_that_cannot_seed_the_model(cancer: Registered, case: str, message: str) -> None:
    init = WarmStart.from_registry(cancer.registry, "cancer", freeze=3 if "freeze" in case else 0)
    data, config = "breast_cancer", _config(cancer, epochs=2)
    if case == "other inputs":
        data = "wine"
    elif case == "other architecture":
        data, config = "digits", config.model_copy(update={"architecture": "cnn", "model": {}})
    elif case == "other parameters":
        config = config.model_copy(update={"model": {**config.model, "hidden": [8]}})
    with pytest.raises(TransferError, match=message.replace("(", r"\(")):
        train_model(data, name="x", options=TrainOptions(
            config=config, settings=cancer.settings, init=init))


def test_a_version_without_weights(cancer: Registered, tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    v = cancer.version
    registry.register(v.metadata, v.onnx_path, reference=v.reference())  # no weights.pt
    with pytest.raises(TransferError, match=f"no stored weights \\({WEIGHTS_FILE}\\)"):
        WarmStart.from_registry(registry, "cancer", 1)
    with pytest.raises(TransferError, match="cannot fine-tune from cancer@7"):
        WarmStart.from_registry(registry, "cancer", 7)


def _modelloop(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("modelloop")
    env = {**os.environ, "MODELLOOP_HOME": str(home), "MODELLOOP_TRAINING_PROGRESS": "false"}
    return subprocess.run([str(exe), "train", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_cli_fine_tunes_a_registered_version(cancer: Registered, tmp_path: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(cancer.settings.home, home)
    proc = _modelloop(home, "--dataset", "breast_cancer", "--rows", "300", "--epochs", "3",
                      "--init-from", "cancer@1", "--freeze", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["name"] == "cancer" and out["version"] == 2  # the parent's name by default
    meta = Registry(home / "registry").get("cancer", 2).metadata
    assert meta.parent_version == 1
    assert meta.lineage["fine_tuned_from"]["frozen_modules"] == ["backbone.layers.0",
                                                                 "backbone.layers.1"]
    assert meta.config["model"] == cancer.version.metadata.config["model"]
    assert np.isclose(meta.config["learning_rate"], cancer.version.metadata.config["learning_rate"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # freezing needs a parent
        (["--freeze", "1"], "--freeze is for --init-from"),
        # an unknown parent: one line, exit 2, before any training
        (["--init-from", "nope"], "error: cannot fine-tune from nope@production"),
        # a parent of other inputs
        (["--init-from", "cancer", "--dataset", "wine"], "its inputs differ from this data's"),
    ],
)
def test_cli_errors(cancer: Registered, tmp_path: Path, args: list[str], message: str) -> None:
    home = tmp_path / "home"
    shutil.copytree(cancer.settings.home, home)
    if "--dataset" not in args:
        args = ["--dataset", "breast_cancer", *args]
    proc = _modelloop(home, "--epochs", "2", *args)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_fine_tuning_a_cnn_freezes_its_first_convolution(digits_cnn: Registered) -> None:
    init = WarmStart.from_version(digits_cnn.version, freeze=1)
    config = _config(digits_cnn, epochs=2, seed=3)
    tuned = train_model(load_data("digits", rows=600, seed=3), name="digits-cnn",
                        options=TrainOptions(config=config, settings=digits_cnn.settings, init=init))
    assert init.frozen == ["backbone.features.0", "backbone.features.1"]  # conv and its norm
    parent, child = digits_cnn.trained.net.state_dict(), tuned.net.state_dict()
    for key in ("backbone.features.0.weight", "backbone.features.1.running_mean"):
        assert torch.equal(parent[key], child[key]), key
    assert not torch.equal(parent["backbone.features.3.weight"], child["backbone.features.3.weight"])
    assert tuned.metadata.metrics["accuracy"] > 0.9  # it starts from a trained CNN
