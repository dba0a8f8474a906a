"""Int8 quantization of real small models trained here (the CNN static, the MLP dynamic, an
autoencoder and a GRU), quantized by ONNX Runtime, registered, measured on the test split,
served; and what cannot be quantized."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from modelloop.registry import ModelVersion, Registry
from modelloop.schemas import REF_PREDICTION, REF_PROBA_PREFIX
from serving.runtime import OnnxRuntime
from tests.training.quantize._support import (
    FAST_SPEED,
    Quantized,
    op_types,
    quantize_and_register,
    the_test_split,
    train_version,
)
from training.data import load_data
from training.export import onnx_session, run_onnx
from training.measure import layout
from training.pipeline import WEIGHTS_FILE
from training.quantize import (
    INT8_PARITY_TOLERANCE,
    NotQuantizable,
    loss_points,
    quantize_version,
)
from training.settings import TrainingSettings

pytestmark = pytest.mark.slow


# -- the CNN, static ---------------------------------------------------------------------------
def test_cnn_static_is_registered_as_a_child_version_with_its_lineage(cnn_static: Quantized) -> None:
    source, int8 = cnn_static.source.metadata, cnn_static.int8.metadata
    assert (int8.version, int8.parent_version) == (source.version + 1, source.version)
    assert (int8.architecture, int8.inputs, int8.outputs) == (source.architecture, source.inputs,
                                                              source.outputs)
    q = int8.lineage["quantization"]
    assert int8.lineage["trigger"] == "quantize"
    assert (q["method"], q["source_version"], q["metric"]) == ("static", source.version, "accuracy")
    assert q["calibration_rows"] == 512 and q["promotable"] is True and q["max_loss_points"] == 1.0
    assert set(q["rows_per_s"]) == {"fp32", "int8"} and set(q["speedup"]) == {"1", "256"}
    assert q["bytes"]["int8"] < q["bytes"]["fp32"] / 2  # int8 weights: a quarter of the bytes
    assert q["kept_float"] == []
    # the fp32 metrics were measured again on the very test split the version was judged on
    assert q["fp32_metrics"] == pytest.approx(source.metrics, abs=1e-12)
    assert q["int8_metrics"] == int8.metrics
    assert int8.created_at > source.created_at
    # the fp32 weights it was quantized from stay with it: fine-tuning starts from them
    weights = cnn_static.int8.path / WEIGHTS_FILE
    assert weights.read_bytes() == (cnn_static.source.path / WEIGHTS_FILE).read_bytes()


def test_cnn_static_graph_runs_integer_kernels(cnn_static: Quantized, tmp_path: Path) -> None:
    assert {"QuantizeLinear", "DequantizeLinear"} <= op_types(cnn_static.int8.onnx_path)
    # ONNX Runtime fuses the QDQ pairs into integer convolutions: what makes it int8 at run time
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(cnn_static.int8.onnx_path), options,
                         providers=["CPUExecutionProvider"])
    assert "QLinearConv" in op_types(tmp_path / "optimized.onnx")


def test_cnn_static_keeps_accuracy_within_one_point(cnn_static: Quantized) -> None:
    x, y = the_test_split(cnn_static.source)
    fp32 = run_onnx(onnx_session(cnn_static.source.onnx_path), x)["probabilities"]
    int8 = run_onnx(onnx_session(cnn_static.int8.onnx_path), x)["probabilities"]
    acc32, acc8 = (fp32.argmax(1) == y).mean(), (int8.argmax(1) == y).mean()
    assert acc8 >= acc32 - 0.01
    assert cnn_static.int8.metadata.metrics["accuracy"] == pytest.approx(acc8)
    assert not np.array_equal(fp32, int8)  # it is a different model, not a copy


def test_cnn_static_parity_is_measured_against_fp32_not_claimed_at_1e4(cnn_static: Quantized) -> None:
    parity = cnn_static.int8.metadata.parity
    assert parity is not None and parity.passed
    assert parity.tolerance == INT8_PARITY_TOLERANCE  # probabilities: 0.05, not the export's 1e-4
    assert 1e-4 < parity.max_abs_diff <= parity.tolerance
    assert parity.max_abs_diff == cnn_static.int8.metadata.lineage["quantization"]["max_abs_diff"]


def test_cnn_reference_sample_holds_the_int8_models_predictions(cnn_static: Quantized) -> None:
    ref32, ref8 = cnn_static.source.reference(), cnn_static.int8.reference()
    features = cnn_static.source.metadata.feature_names
    # same rows, labels and split marks: drift is measured against the same training data
    assert ref8.drop(columns=[c for c in ref8 if c.startswith(REF_PROBA_PREFIX)] + [REF_PREDICTION]
                     ).equals(ref32.drop(columns=[c for c in ref32 if c.startswith(REF_PROBA_PREFIX)]
                                         + [REF_PREDICTION]))
    x = layout(ref8[features].to_numpy(np.float32), cnn_static.int8.metadata.inputs[0].shape)
    out = run_onnx(onnx_session(cnn_static.int8.onnx_path), x)["probabilities"]
    np.testing.assert_array_equal(ref8[REF_PREDICTION], out.argmax(1))
    proba = [f"{REF_PROBA_PREFIX}{i}" for i in range(10)]
    np.testing.assert_allclose(ref8[proba].to_numpy(), out, rtol=0, atol=1e-7)
    assert not np.allclose(ref8[proba].to_numpy(), ref32[proba].to_numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("which", ["cnn_static", "mlp_dynamic"])
def test_missing_values_still_give_finite_outputs(which: str, request: pytest.FixtureRequest) -> None:
    q: Quantized = request.getfixturevalue(which)
    x, _ = the_test_split(q.source)
    x = x[:20].copy()
    flat = x.reshape(len(x), -1)
    flat[np.arange(20), np.arange(20)] = np.nan  # one missing value a row
    flat[0, :] = np.nan  # a row with nothing at all: every value takes the training median
    out = run_onnx(onnx_session(q.int8.onnx_path), x)["probabilities"]
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)


# -- the MLP, dynamic --------------------------------------------------------------------------
def test_mlp_dynamic_quantizes_the_matmuls_and_keeps_accuracy(mlp_dynamic: Quantized) -> None:
    q = mlp_dynamic.int8.metadata.lineage["quantization"]
    assert q["method"] == "dynamic" and q["calibration_rows"] == 0
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= op_types(mlp_dynamic.int8.onnx_path)
    # the preprocessing stays float, so NaN is imputed before anything is quantized
    assert {"IsNaN", "Where"} <= op_types(mlp_dynamic.int8.onnx_path)
    assert "Gemm" not in op_types(mlp_dynamic.int8.onnx_path)
    fp32, int8 = q["fp32_metrics"]["accuracy"], mlp_dynamic.int8.metadata.metrics["accuracy"]
    assert int8 >= fp32 - 0.01 and q["loss_points"] == pytest.approx(loss_points(fp32, int8))


def test_int8_version_is_served_by_the_serving_runtime(mlp_dynamic: Quantized) -> None:
    runtime = OnnxRuntime(mlp_dynamic.int8, provider="cpu", threads=1).load()
    x, _ = the_test_split(mlp_dynamic.source)
    x[:5, 0] = np.nan
    served = runtime.predict(np.ascontiguousarray(x))["probabilities"]
    np.testing.assert_allclose(served, run_onnx(onnx_session(mlp_dynamic.int8.onnx_path), x)
                               ["probabilities"], rtol=0, atol=1e-6)
    assert np.isfinite(served).all()


# -- other architectures -------------------------------------------------------------------------
def test_autoencoder_dynamic_judged_on_roc_auc_with_its_threshold(settings: TrainingSettings) -> None:
    source = train_version(settings, "breast_cancer", "cancer-ae", architecture="autoencoder", epochs=10)
    q = quantize_and_register(settings, source, "auto")
    lineage = q.int8.metadata.lineage["quantization"]
    assert (lineage["method"], lineage["metric"]) == ("dynamic", "roc_auc")
    assert q.int8.metadata.metrics["threshold"] == source.metadata.metrics["threshold"]
    assert lineage["fp32_metrics"]["roc_auc"] == pytest.approx(source.metadata.metrics["roc_auc"])
    assert abs(lineage["loss_points"]) <= 1.0
    ref = q.int8.reference()
    assert (ref[REF_PREDICTION] != source.reference()[REF_PREDICTION]).any()  # int8 scores


def test_gru_quantizes_its_head_and_says_the_gru_stays_float(settings: TrainingSettings) -> None:
    data = load_data("sequences", rows=400)
    source = train_version(settings, data, "seq-gru", architecture="gru", epochs=2)
    with pytest.raises(NotQuantizable, match="not what it was trained on"):
        quantize_version(source, settings=settings, **FAST_SPEED)  # 4000 rows by default
    quantized = quantize_version(source, settings=settings, data=data, **FAST_SPEED)
    report = quantized.report
    assert report.kept_float == ["GRU"] and report.int8_ops["MatMulInteger"] == 1
    x = np.concatenate([data.features[:8]] * 2, axis=1)  # twice the trained length still runs
    out = run_onnx(onnx_session(quantized.onnx_bytes), x)["probabilities"]
    assert out.shape == (8, 4) and np.isfinite(out).all()
    assert quantized.reference is not None and len(quantized.reference) == len(source.reference())
    # the reference rows' dataset indices are recorded at training, and read back
    assert len(source.metadata.lineage["reference_rows"]) == len(source.reference())
    # a version registered before they were recorded: its rows are found again as training chose them
    registry = Registry(settings.registry_dir)
    lineage = {k: v for k, v in source.metadata.lineage.items() if k != "reference_rows"}
    legacy = registry.register(source.metadata.model_copy(update={"lineage": lineage}),
                               source.onnx_path, reference=source.reference())
    again = quantize_version(registry.get(legacy.name, legacy.version), settings=settings,
                             data=data, **FAST_SPEED)
    assert again.reference is not None
    np.testing.assert_array_equal(again.reference[REF_PREDICTION], quantized.reference[REF_PREDICTION])


# -- what cannot be quantized ------------------------------------------------------------------
def test_an_int8_version_is_not_quantized_again(mlp_dynamic: Quantized, settings: TrainingSettings) -> None:
    v = mlp_dynamic.int8.version
    with pytest.raises(NotQuantizable, match=rf"cancer v{v} is an int8 quantization already \(of v1\)"):
        quantize_version(mlp_dynamic.int8, settings=settings)


def test_other_data_than_the_versions_is_refused(cancer: ModelVersion, settings: TrainingSettings) -> None:
    with pytest.raises(NotQuantizable, match=r"cancer v1: the data 'breast_cancer' \(400 rows\) is not what"):
        quantize_version(cancer, settings=settings, data=load_data("breast_cancer", rows=400))
