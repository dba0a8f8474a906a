"""ONNX export: the dynamic batch axis, the graph conventions and the typed parity error."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from pydantic import BaseModel

from modelloop.registry import Registry
from modelloop.schemas import PREDICTION, PROBABILITIES, Task
from training import models
from training.config import TrainingConfig
from training.data import load_data
from training.export import (
    ExportError,
    Mismatch,
    ParityError,
    check_conventions,
    check_parity,
    export_onnx,
    onnx_session,
    run_onnx,
)
from training.models import InferenceGraph, MLPParams, TabularNet, build_model
from training.pipeline import TrainOptions, train_and_register
from training.settings import TrainingSettings
from training.trainer import seeded


@pytest.fixture(scope="module")
def small() -> tuple[TabularNet, np.ndarray, bytes]:
    """An untrained 3-class MLP on wine (export does not care about training) and its ONNX."""
    ds = load_data("wine")
    with seeded(0):
        net = build_model("mlp", MLPParams(hidden=[16]), train_features=ds.features,
                          task=Task.classification, n_outputs=3).eval()
    # a single example row: export_onnx must still give a dynamic batch axis
    data = export_onnx(InferenceGraph(net), n_features=13, output_names=[PROBABILITIES],
                       example=ds.features[:1])
    return net, ds.features, data


@pytest.mark.parametrize("batch", [1, 2, 7, 300])
def test_exported_batch_axis_is_dynamic_even_from_a_one_row_example(
    small: tuple[TabularNet, np.ndarray, bytes], batch: int
) -> None:
    net, x, data = small
    rows = x[np.arange(batch) % len(x)]
    got = run_onnx(onnx_session(data), rows)[PROBABILITIES]
    with torch.no_grad():
        want = net.infer(torch.from_numpy(rows)).numpy()
    assert got.shape == (batch, 3)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_parity_passes_and_reports_what_it_checked(small: tuple[TabularNet, np.ndarray, bytes]) -> None:
    net, x, data = small
    result = check_parity(InferenceGraph(net), data, x, tolerance=1e-4, batch_sizes=[1, 7, 4096],
                          max_rows=100)
    assert result.passed and result.max_abs_diff <= 1e-4
    assert (result.batch_sizes, result.rows_checked, result.tolerance) == ([1, 7, 4096], 100, 1e-4)


def test_parity_error_lists_every_mismatch(small: tuple[TabularNet, np.ndarray, bytes]) -> None:
    net, x, data = small
    changed = copy.deepcopy(net)
    with torch.no_grad():  # the weights change after export: the ONNX file no longer matches
        changed.backbone.layers[-1].bias += torch.tensor([0.0, 0.0, 3.0])
    with pytest.raises(ParityError) as err:
        check_parity(InferenceGraph(changed.eval()), data, x, tolerance=1e-4,
                     batch_sizes=[1, 7, 4096], max_rows=50)
    mismatches = err.value.mismatches
    assert [(m.output, m.batch_size) for m in mismatches] == [
        (PROBABILITIES, 1), (PROBABILITIES, 7), (PROBABILITIES, 4096)]
    assert all(m.max_abs_diff > 0.01 and 0 <= m.worst_row < 50 for m in mismatches)
    message = str(err.value)
    assert message.startswith("ONNX export parity failed: 3 output(s) differ from PyTorch by "
                              "more than 0.0001: ")
    assert all(str(m) in message for m in mismatches)


def test_mismatch_names_output_batch_size_and_row() -> None:
    m = Mismatch("prediction", 7, 0.25, 12)
    assert str(m) == "prediction at batch size 7: max abs diff 0.25 (held-out row 12)"


def _graph(
    input_name: str = "input",
    dtype: int = TensorProto.FLOAT,
    shape: tuple[int | str, ...] = ("batch", 4),
    output_name: str = "probabilities",
    out_shape: tuple[int | str, ...] = ("batch", 2),
) -> onnx.ModelProto:
    node = helper.make_node("Identity", [input_name], [output_name])
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(input_name, dtype, list(shape))],
        [helper.make_tensor_value_info(output_name, dtype, list(out_shape))],
    )
    return helper.make_model(graph)


@pytest.mark.parametrize(
    ("graph", "problem"),
    [
        # serving sends one tensor named "input"
        (_graph(input_name="x"), "inputs are ['x'], expected ['input']"),
        # features are float32
        (_graph(dtype=TensorProto.DOUBLE), "input is not float32"),
        # a batch size baked in by the exporter
        (_graph(shape=(1, 4)), "input shape is [1, 4], expected [batch, 4]"),
        # the wrong number of features
        (_graph(shape=("batch", 5)), "input shape is ['batch', 5], expected [batch, 4]"),
        # the output name serving reads
        (_graph(output_name="logits"), "outputs are ['logits'], expected ['probabilities']"),
        # an output with a fixed batch axis
        (_graph(out_shape=(8, 2)), "output 'probabilities' has no dynamic batch axis (shape [8, 2])"),
    ],
)
def test_conventions_are_checked(graph: onnx.ModelProto, problem: str) -> None:
    with pytest.raises(ExportError) as err:
        check_conventions(graph, n_features=4, output_names=["probabilities"])
    assert str(err.value) == f"exported graph breaks the ONNX conventions: {problem}"


def test_conventions_accept_a_conforming_graph() -> None:
    check_conventions(_graph(), n_features=4, output_names=["probabilities"])


class _NoParams(BaseModel):
    pass


class _ExportsDifferently(torch.nn.Module):
    """A backbone whose exported graph is not what runs eagerly: the bug parity must catch."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(x)
        return out + 1.0 if torch.compiler.is_exporting() else out


def test_pipeline_registers_nothing_when_parity_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "ARCHITECTURES", dict(models.ARCHITECTURES))
    models.register_architecture(models.Architecture(
        "skewed", _NoParams, lambda p, i, o: _ExportsDifferently(i, o), "exports wrong"))
    settings = TrainingSettings(home=tmp_path, progress=False)
    config = TrainingConfig.from_settings(settings, architecture="skewed", epochs=2)
    with pytest.raises(ParityError) as err:
        train_and_register("diabetes", name="skewed", options=TrainOptions(
            config=config, settings=settings))
    assert [(m.output, m.batch_size) for m in err.value.mismatches] == [
        (PREDICTION, 1), (PREDICTION, 7), (PREDICTION, 4096)]
    assert Registry(settings.registry_dir).models() == []
