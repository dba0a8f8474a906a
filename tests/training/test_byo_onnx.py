"""ONNX files made elsewhere (skl2onnx, torch.onnx in the test) registered with `modelloop models
register` or training.byo.register_onnx, then served by a real `modelloop serve`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from modelloop.registry import Registry
from modelloop.schemas import INPUT_NAME, PREDICTION, REF_SPLIT, Task
from tests.serving.conftest import start_server, stop_server
from tests.training.conftest import quiet_settings
from tests.training.test_byo import SPECIES, iris
from training.byo import ByoError, ExampleData, not_retrainable, register_onnx

MODELLOOP = str(Path(sys.executable).with_name("modelloop"))
pytestmark = pytest.mark.slow


def sklearn_iris(path: Path, *, zipmap: bool = False) -> Path:
    """A scaler and a logistic regression on iris, converted with skl2onnx (input `features`)."""
    train, _ = iris()
    x, y = train.drop(columns="target").to_numpy(np.float32), train["target"].to_numpy()
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x, y)
    assert list(pipe.classes_) == list(SPECIES)
    proto = to_onnx(pipe, initial_types=[("features", FloatTensorType([None, 4]))],
                    options={LogisticRegression: {"zipmap": zipmap}}, target_opset=17)
    path.write_bytes(proto.SerializeToString())
    return path


def torch_file(path: Path, module: nn.Module, n_features: int, *, dynamic: bool = True) -> Path:
    """``module`` exported by torch.onnx as a user would (input `x`, output `y`)."""
    torch.onnx.export(module.eval(), (torch.zeros(8, n_features),), str(path), input_names=["x"],
                      output_names=["y"], dynamo=False,
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}} if dynamic else None)
    return path


def ort_run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def test_the_cli_registers_a_skl2onnx_file_that_then_serves(tmp_path: Path) -> None:
    onnx_file = sklearn_iris(tmp_path / "iris.onnx")
    train, held = iris()
    train.to_csv(tmp_path / "train.csv", index=False)
    held.to_csv(tmp_path / "held.csv", index=False)
    home = tmp_path / "home"
    env = {**os.environ, "MODELLOOP_HOME": str(home)}
    done = subprocess.run([MODELLOOP, "models", "register", str(onnx_file), "--name", "iris",
                           "--data", str(tmp_path / "train.csv"), "--holdout",
                           str(tmp_path / "held.csv"), "--promote", "--json",
                           "--gate-metric", "pr_auc"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["name"], summary["version"], summary["promoted"]) == ("iris", 1, True)
    assert summary["metrics"]["accuracy"] > 0.85

    registry = Registry(home / "registry")
    version = registry.get("iris")
    meta = version.metadata
    assert meta.lineage["source"] == "onnx" and meta.lineage["graph_inputs"] == ["features"]
    assert meta.lineage["graph_output"] == "probabilities"
    assert meta.class_labels == list(SPECIES) and meta.architecture == "onnx"
    assert meta.config == {"gate_metric": "pr_auc"}  # what `models gate` judges the line by
    assert (version.reference()[REF_SPLIT] == "holdout").sum() == len(held)
    assert "no weights or architecture to retrain" in (not_retrainable(meta) or "")

    x = held.drop(columns="target").to_numpy(np.float32)
    _, expected = ort_run(onnx_file, x)  # skl2onnx's label, then the probabilities
    server = start_server(home, tmp_path / "serve.log", {}, "--workers", "1")
    try:
        records = [dict(zip(meta.feature_names, map(float, r), strict=True)) for r in x]
        resp = httpx.post(f"{server.url}/predict", json={"instances": records}, timeout=30)
        assert resp.status_code == 200, resp.text
        doc = resp.json()
    finally:
        stop_server(server)
    assert (doc["model"], doc["version"]) == ("iris", 1)
    got = np.array([[p["probabilities"][c] for c in SPECIES] for p in doc["predictions"]],
                   dtype=np.float32)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert [p["label"] for p in doc["predictions"]] == list(SPECIES[expected.argmax(1)])


def test_a_torch_onnx_regressor_and_a_skl2onnx_regressor(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 3)).astype(np.float32)
    y = x @ np.array([2.0, -1.0, 0.5], dtype=np.float32) + 1
    data = ExampleData((x[:200], y[:200]), holdout=(x[200:], y[200:]), task=Task.regression,
                       feature_names=["a", "b", "c"])
    settings = quiet_settings(tmp_path)
    registry = Registry(settings.registry_dir)

    torch.manual_seed(0)
    linear = nn.Linear(3, 1)
    with torch.no_grad():  # the true coefficients: a perfect regressor, [batch, 1] out
        linear.weight.copy_(torch.tensor([[2.0, -1.0, 0.5]]))
        linear.bias.fill_(1.0)
    made_by_torch = torch_file(tmp_path / "lin.onnx", linear, 3)
    meta = register_onnx(made_by_torch, data, name="lin", registry=registry, settings=settings,
                         promote=True)
    assert meta.outputs[0].name == PREDICTION and meta.metrics["r2"] > 0.999
    assert meta.gate_metric == "r2"
    with pytest.raises(ByoError) as err:  # a classifier's metric, refused in one line
        register_onnx(made_by_torch, data, name="lin", registry=registry, settings=settings,
                      gate_metric="roc_auc")
    assert str(err.value) == ("ONNX file lin.onnx: --gate-metric roc_auc is not a regression "
                              "metric; choose r2")
    stored = onnx.load(str(registry.get("lin").onnx_path))
    assert [i.name for i in stored.graph.input] == [INPUT_NAME]
    assert [o.name for o in stored.graph.output] == [PREDICTION]

    made_by_sklearn = tmp_path / "ols.onnx"
    ols = LinearRegression().fit(x[:200], y[:200])
    made_by_sklearn.write_bytes(to_onnx(ols, x[:1], target_opset=17).SerializeToString())
    meta = register_onnx(made_by_sklearn, data, name="lin", registry=registry, settings=settings,
                         promote=True)
    assert meta.version == 2 and registry.aliases("lin") == {"production": 2, "previous": 1}


class Logits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * 100  # no softmax: logits


class Probabilities(Logits):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.linear(x), dim=-1)


class Poisoned(Logits):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.linear(x), dim=-1) * torch.log(x[:, :1] - 5)  # NaN for iris


GIVEN = ["virginica", "setosa", "versicolor"]  # refused only where the graph names its classes


def _garbage(path: Path) -> Path:
    path.write_bytes(b"not a graph")
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        # the classes in another order than the graph says them
        (lambda p: sklearn_iris(p, zipmap=True), "its classes are ['setosa', 'versicolor', "
         "'virginica'], in this order; the classes given are ['virginica', 'setosa', 'versicolor']"),
        # exported without dynamic axes: the batch size is fixed at 8
        (lambda p: torch_file(p, Probabilities(), 4, dynamic=False),
         "input 'x' has shape [8, 4]: its batch axis is not dynamic"),
        # logits, not probabilities
        (lambda p: torch_file(p, Logits(), 4), "its classifier output is not probabilities"),
        # three features in, the data has four
        (lambda p: torch_file(p, nn.Sequential(nn.Linear(3, 3), nn.Softmax(-1)), 3),
         "input 'x' takes 3 features; the data has 4"),
        # NaN on every row
        (lambda p: torch_file(p, Poisoned(), 4), "gives NaN or infinity in"),
        # not ONNX at all
        (_garbage, "is not a valid ONNX model"),
    ],
)
def test_refusals(tmp_path: Path, make: object, message: str) -> None:
    path = make(tmp_path / "model.onnx")  # type: ignore[operator]
    train, held = iris()
    settings = quiet_settings(tmp_path)
    with pytest.raises(ByoError) as info:
        register_onnx(path, ExampleData(train, holdout=held, class_labels=GIVEN), name="iris",
                      registry=Registry(settings.registry_dir), settings=settings)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert Registry(settings.registry_dir).models() == []


def test_the_cli_refusal_is_one_line_and_exit_2(tmp_path: Path) -> None:
    train, _ = iris()
    train.to_csv(tmp_path / "train.csv", index=False)
    path = torch_file(tmp_path / "logits.onnx", Logits(), 4)
    done = subprocess.run([MODELLOOP, "models", "register", str(path), "--name", "iris", "--data",
                           str(tmp_path / "train.csv")],
                          env={**os.environ, "MODELLOOP_HOME": str(tmp_path / "home")},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ONNX file logits.onnx: its classifier output is not "
                                  "probabilities")
    assert done.stderr.count("\n") == 1
