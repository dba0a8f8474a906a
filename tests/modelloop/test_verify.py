"""The check before an alias moves: real ONNX graphs of every kind, run by ONNX Runtime."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest

from modelloop.registry import BrokenVersion, ModelVersion, Registry, RegistryError
from modelloop.schemas import INPUT_NAME, REF_PREDICTION
from modelloop.verify import MAX_ROWS, check_outputs, check_version
from tests.modelloop.onnx_graphs import KINDS, graph, metadata, reference, run


def _registered(tmp_path: Path, onnx_bytes: bytes, ref: pd.DataFrame | None,
                kind: str = "classification") -> ModelVersion:
    reg = Registry(tmp_path)
    meta = reg.register(metadata(kind), onnx_bytes, reference=ref)
    return reg.get("m", meta.version)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_version_passes(tmp_path: Path, kind: str) -> None:
    version = _registered(tmp_path, graph(kind), reference(kind, graph(kind)), kind)
    result = check_version(version)
    # a sequence model's sample holds each feature's mean over time, not its sequences
    assert (result.rows, result.compared, result.mismatches) == (64, kind != "sequence", 0)


def _renamed_input(onnx_bytes: bytes) -> bytes:
    model = onnx.load_from_string(onnx_bytes)
    model.graph.input[0].name = "x"
    for node in model.graph.node:
        node.input[:] = ["x" if i == INPUT_NAME else i for i in node.input]
    return model.SerializeToString()


def _flipped(ref: pd.DataFrame) -> str:
    """The detail of row 0 when a classifier predicts the other class everywhere."""
    want = int(ref[REF_PREDICTION].iloc[0])
    return f"row 0: class {1 - want} where the sample has {want}"


INTACT = graph("classification")
REF = reference("classification", INTACT)
WEIGHTS = onnx.numpy_helper.to_array(
    next(i for i in onnx.load_from_string(INTACT).graph.initializer if i.name == "w"))

# (kind, ONNX bytes, reference sample or None, the file named, the reason)
REFUSED = [
    # a valid graph whose preprocessing divides by a scale of zero: every output NaN or infinite
    *[(kind, graph(kind, scale=0.0), reference(kind, graph(kind)), "model.onnx",
       f"output '{out}' is not finite (NaN or infinity) in 64 of 64 reference rows, first row 0")
      for kind, out in [("classification", "probabilities"), ("regression", "prediction"),
                        ("anomaly", "score"), ("image", "probabilities"),
                        ("sequence", "probabilities")]],
    # logits where probabilities belong
    ("classification", graph("classification", softmax=False, weights=np.zeros((3, 2))), REF,
     "model.onnx", "probabilities do not sum to 1 in 64 of 64 reference rows, first row 0 sums to 0"),
    # another model than the one whose predictions the sample holds: every class flipped
    ("classification", graph("classification", weights=-WEIGHTS), REF, "model.onnx",
     "its predictions differ from those stored in its reference sample in 64 of 64 rows "
     f"(at most 0 may); {_flipped(REF)}"),
    # a graph that does not take its input as the conventions say
    ("classification", _renamed_input(INTACT), REF, "model.onnx",
     "its graph takes the inputs ['x'], not one named 'input'"),
    # a classifier's graph registered as a regressor
    ("regression", INTACT, REF.assign(**{REF_PREDICTION: 0.5}), "model.onnx",
     "a regression model must output 'prediction'; the graph outputs ['probabilities']"),
    # nothing to run it on
    ("classification", INTACT, None, "reference.parquet",
     "it has no reference sample to be checked on"),
    # a sample without the model's features
    ("classification", INTACT, REF.drop(columns=["b"]), "reference.parquet",
     "the reference sample lacks the feature columns ['b']"),
    # a sample without predictions to compare with
    ("classification", INTACT, REF.drop(columns=[REF_PREDICTION]), "reference.parquet",
     "the reference sample has no '_ml_prediction' column"),
    # predictions that are no class index
    ("classification", INTACT, REF.assign(**{REF_PREDICTION: 0.5}), "reference.parquet",
     "its '_ml_prediction' column holds values that are not class indices"),
]


@pytest.mark.parametrize(("kind", "onnx_bytes", "ref", "file", "reason"), REFUSED)
def test_a_broken_version_is_refused_naming_the_file_and_why(
        tmp_path: Path, kind: str, onnx_bytes: bytes, ref: pd.DataFrame | None, file: str,
        reason: str) -> None:
    version = _registered(tmp_path, onnx_bytes, ref, kind)
    with pytest.raises(BrokenVersion) as caught:
        check_version(version)
    assert str(caught.value) == f"m v1 is broken: {version.path / file}: {reason}"
    assert isinstance(caught.value, RegistryError) and "\n" not in str(caught.value)


def test_a_file_onnx_runtime_cannot_load_is_refused(tmp_path: Path) -> None:
    version = _registered(tmp_path, b"this is not an ONNX model", REF)
    with pytest.raises(BrokenVersion, match=r"^m v1 is broken: ") as caught:
        check_version(version)
    assert caught.value.path == version.onnx_path
    assert caught.value.reason.startswith("ONNX Runtime cannot load it: ")
    assert "\n" not in str(caught.value)


def test_a_damaged_reference_sample_is_refused(tmp_path: Path) -> None:
    version = _registered(tmp_path, INTACT, REF)
    version.reference_path.write_bytes(b"PAR1 not really")
    with pytest.raises(BrokenVersion) as caught:
        check_version(version)
    assert caught.value.path == version.reference_path
    assert caught.value.reason.startswith("the reference sample cannot be read: ")


def test_ties_may_go_either_way(tmp_path: Path) -> None:
    # zero weights: every row is [0.5, 0.5]; the sample says class 1, ONNX Runtime's argmax 0
    tie = graph("classification", weights=np.zeros((3, 2)))
    version = _registered(tmp_path, tie, reference("classification", tie).assign(**{REF_PREDICTION: 1}))
    assert check_version(version).mismatches == 0


@pytest.mark.parametrize(("changed", "passes"), [
    (2, True),   # 1 % of 200 rows may differ (another provider's arithmetic)
    (3, False),  # one more may not
])
def test_a_small_share_of_other_classes_is_tolerated(tmp_path: Path, changed: int,
                                                     passes: bool) -> None:
    ref = reference("classification", INTACT, rows=200)
    ref.loc[: changed - 1, REF_PREDICTION] = 1 - ref.loc[: changed - 1, REF_PREDICTION]
    version = _registered(tmp_path, INTACT, ref)
    if passes:
        assert check_version(version).mismatches == changed
    else:
        with pytest.raises(BrokenVersion, match=f"in {changed} of 200 rows \\(at most 2 may\\)"):
            check_version(version)


@pytest.mark.parametrize(("kind", "factor", "passes"), [
    ("regression", 1.001, True),   # within 1 % of the value plus the values' spread
    ("regression", 1.5, False),    # another model
    ("anomaly", 1.001, True),
    ("anomaly", 1.5, False),
])
def test_values_are_compared_with_a_tolerance(tmp_path: Path, kind: str, factor: float,
                                              passes: bool) -> None:
    ref = reference(kind, graph(kind))
    ref[REF_PREDICTION] = ref[REF_PREDICTION] * factor + (factor - 1)
    version = _registered(tmp_path, graph(kind), ref, kind)
    if passes:
        assert check_version(version).compared
    else:
        with pytest.raises(BrokenVersion, match="its predictions differ from those stored"):
            check_version(version)


def test_at_most_max_rows_reference_rows_run(tmp_path: Path) -> None:
    version = _registered(tmp_path, INTACT, reference("classification", INTACT, rows=3000))
    assert check_version(version).rows == MAX_ROWS


Runner = Callable[[np.ndarray], dict[str, np.ndarray]]


@pytest.mark.parametrize(("runner", "reason"), [
    # serving's own session answers NaN (another provider)
    (lambda x: {"probabilities": np.full((len(x), 2), np.nan, np.float32)},
     "output 'probabilities' is not finite (NaN or infinity) in 64 of 64 reference rows, first row 0"),
    # it answers one row fewer than asked
    (lambda x: {"probabilities": np.full((len(x) - 1, 2), 0.5, np.float32)},
     "output 'probabilities' has shape [63, 2] for 64 reference rows"),
    # it fails
    (lambda x: 1 / 0, "running it on 64 reference rows failed: division by zero"),
])
def test_check_outputs_judges_any_runner(tmp_path: Path, runner: Runner, reason: str) -> None:
    version = _registered(tmp_path, INTACT, REF)
    with pytest.raises(BrokenVersion) as caught:
        check_outputs(version, runner)
    assert str(caught.value) == f"m v1 is broken: {version.onnx_path}: {reason}"


def test_check_outputs_passes_a_faithful_runner(tmp_path: Path) -> None:
    version = _registered(tmp_path, INTACT, REF)
    assert check_outputs(version, lambda x: {"probabilities": run(INTACT, x)}).compared

