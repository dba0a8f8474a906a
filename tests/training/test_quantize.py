"""Int8 quantization: real small models trained here, quantized by ONNX Runtime, registered,
measured on the test split, served; the promotion rule; ``modelloop quantize`` end to end."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from modelloop.cli import app
from modelloop.models_cli import not_promotable
from modelloop.registry import ModelVersion, Registry
from modelloop.schemas import REF_PREDICTION, REF_PROBA_PREFIX, Task
from serving.runtime import OnnxRuntime
from tests.training.conftest import quiet_settings
from training.config import TrainingConfig
from training.data import load_data, split_dataset
from training.export import onnx_session, run_onnx
from training.pipeline import WEIGHTS_FILE, TrainOptions, train_and_register
from training.quantize import (
    INT8_PARITY_TOLERANCE,
    Method,
    NotQuantizable,
    QuantizedModel,
    gemm_to_matmul,
    is_promotable,
    layout,
    loss_points,
    primary_metric,
    quantize_version,
    register_quantized,
    resolve_method,
)
from training.settings import TrainingSettings

pytestmark = pytest.mark.slow
FAST_SPEED = {"speed_repeats": 1, "speed_min_time_s": 0.005}  # rows/s are not what is tested


@dataclass(frozen=True)
class Quantized:
    source: ModelVersion
    int8: ModelVersion
    quantized: QuantizedModel
    registry: Registry


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> TrainingSettings:
    return quiet_settings(tmp_path_factory.mktemp("quantize-home"))


def _train(settings: TrainingSettings, data: object, name: str, **overrides: object) -> ModelVersion:
    registry = Registry(settings.registry_dir)
    config = TrainingConfig.from_settings(settings, **overrides)
    meta = train_and_register(data, name=name, registry=registry, promote=True,  # type: ignore[arg-type]
                              options=TrainOptions(config=config, settings=settings))
    return registry.get(name, meta.version)


def _quantize(settings: TrainingSettings, source: ModelVersion, method: str) -> Quantized:
    registry = Registry(settings.registry_dir)
    quantized = quantize_version(source, method=method, settings=settings, **FAST_SPEED)
    meta, promoted, _ = register_quantized(quantized, registry)
    assert not promoted
    return Quantized(source, registry.get(meta.name, meta.version), quantized, registry)


@pytest.fixture(scope="module")
def cancer(settings: TrainingSettings) -> ModelVersion:
    """The breast_cancer MLP, 30 epochs: seeded, so the same weights on every CPU run."""
    return _train(settings, "breast_cancer", "cancer", epochs=30)


@pytest.fixture(scope="module")
def cnn_static(settings: TrainingSettings) -> Quantized:
    source = _train(settings, "digits", "digits-cnn", architecture="cnn", epochs=8)
    return _quantize(settings, source, "auto")


@pytest.fixture(scope="module")
def mlp_dynamic(settings: TrainingSettings, cancer: ModelVersion) -> Quantized:
    return _quantize(settings, cancer, "auto")


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(path).graph.node}


def _test_split(version: ModelVersion) -> tuple[np.ndarray, np.ndarray]:
    meta = version.metadata
    ds = load_data(meta.dataset)
    split = split_dataset(ds, val_fraction=meta.config["val_fraction"],
                          test_fraction=meta.config["test_fraction"], seed=meta.config["seed"])
    return layout(ds.features[split.test], meta.inputs[0].shape), ds.target[split.test]


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
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(cnn_static.int8.onnx_path)
    # ONNX Runtime fuses the QDQ pairs into integer convolutions: what makes it int8 at run time
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(cnn_static.int8.onnx_path), options,
                         providers=["CPUExecutionProvider"])
    assert "QLinearConv" in _ops(tmp_path / "optimized.onnx")


def test_cnn_static_keeps_accuracy_within_one_point(cnn_static: Quantized) -> None:
    x, y = _test_split(cnn_static.source)
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
    x, _ = _test_split(q.source)
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
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= _ops(mlp_dynamic.int8.onnx_path)
    # the preprocessing stays float, so NaN is imputed before anything is quantized
    assert {"IsNaN", "Where"} <= _ops(mlp_dynamic.int8.onnx_path)
    assert "Gemm" not in _ops(mlp_dynamic.int8.onnx_path)
    fp32, int8 = q["fp32_metrics"]["accuracy"], mlp_dynamic.int8.metadata.metrics["accuracy"]
    assert int8 >= fp32 - 0.01 and q["loss_points"] == pytest.approx(loss_points(fp32, int8))


def test_int8_version_is_served_by_the_serving_runtime(mlp_dynamic: Quantized) -> None:
    runtime = OnnxRuntime(mlp_dynamic.int8, provider="cpu", threads=1).load()
    x, _ = _test_split(mlp_dynamic.source)
    x[:5, 0] = np.nan
    served = runtime.predict(np.ascontiguousarray(x))["probabilities"]
    np.testing.assert_allclose(served, run_onnx(onnx_session(mlp_dynamic.int8.onnx_path), x)
                               ["probabilities"], rtol=0, atol=1e-6)
    assert np.isfinite(served).all()


# -- other architectures -------------------------------------------------------------------------
def test_autoencoder_dynamic_judged_on_roc_auc_with_its_threshold(settings: TrainingSettings) -> None:
    source = _train(settings, "breast_cancer", "cancer-ae", architecture="autoencoder", epochs=10)
    q = _quantize(settings, source, "auto")
    lineage = q.int8.metadata.lineage["quantization"]
    assert (lineage["method"], lineage["metric"]) == ("dynamic", "roc_auc")
    assert q.int8.metadata.metrics["threshold"] == source.metadata.metrics["threshold"]
    assert lineage["fp32_metrics"]["roc_auc"] == pytest.approx(source.metadata.metrics["roc_auc"])
    assert abs(lineage["loss_points"]) <= 1.0
    ref = q.int8.reference()
    assert (ref[REF_PREDICTION] != source.reference()[REF_PREDICTION]).any()  # int8 scores


def test_gru_quantizes_its_head_and_says_the_gru_stays_float(settings: TrainingSettings) -> None:
    data = load_data("sequences", rows=400)
    source = _train(settings, data, "seq-gru", architecture="gru", epochs=2)
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


# -- the promotion rule ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("loss", "max_loss", "promotable"),
    [
        (0.0, 0.01, True),     # no change
        (-0.5, 0.0, True),     # int8 better: promotable even when no loss is allowed
        (1.0, 0.01, True),     # exactly the allowed point
        (1.0 + 1e-12, 0.01, True),  # float noise of (a - b) * 100 is not a loss
        (1.01, 0.01, False),   # over by a hundredth of a point
        (0.88, 0.005, False),  # one test row of 114 against half a point
        (0.1, 0.0, False),     # any loss when none is allowed
    ],
)
def test_is_promotable(loss: float, max_loss: float, promotable: bool) -> None:
    assert is_promotable(loss, max_loss) is promotable


@pytest.mark.parametrize(
    ("fp32", "int8", "points"),
    [(0.9649, 0.9561, 0.88), (0.95, 0.96, -1.0), (0.5, 0.5, 0.0)],
)
def test_loss_points(fp32: float, int8: float, points: float) -> None:
    assert loss_points(fp32, int8) == pytest.approx(points)


@pytest.mark.parametrize(
    ("method", "architecture", "resolved"),
    [("auto", "cnn", "static"), ("auto", "mlp", "dynamic"), ("auto", "gru", "dynamic"),
     ("auto", "autoencoder", "dynamic"), ("static", "mlp", "static"), ("dynamic", "cnn", "dynamic")],
)
def test_resolve_method(method: str, architecture: str, resolved: str) -> None:
    assert resolve_method(Method(method), architecture) == resolved


@pytest.mark.parametrize(("task", "metric"), [(Task.classification, "accuracy"),
                                              (Task.regression, "r2"), (Task.anomaly, "roc_auc")])
def test_primary_metric(task: Task, metric: str) -> None:
    assert primary_metric(task) == metric


@pytest.mark.parametrize(
    ("lineage", "refused"),
    [
        ({"trigger": "cli"}, None),  # an fp32 version
        ({"quantization": {"promotable": True}}, None),  # int8 within the allowed loss
        ({"quantization": {"promotable": False, "source_version": 2, "loss_points": 1.5,
                           "metric": "accuracy", "max_loss_points": 1.0}},
         "it is an int8 quantization of v2 that loses 1.50 points of accuracy (at most 1.00 allowed)"),
    ],
)
def test_models_promote_refuses_only_an_unpromotable_int8_version(lineage: dict,
                                                                  refused: str | None) -> None:
    assert not_promotable(lineage) == refused


def test_a_loss_over_the_setting_is_registered_but_not_promoted(cancer: ModelVersion,
                                                               settings: TrainingSettings) -> None:
    registry = Registry(settings.registry_dir)
    strict = settings.model_copy(update={"quantize_max_loss": 0.0})  # no loss at all allowed
    quantized = quantize_version(cancer, method="static", settings=strict, **FAST_SPEED)
    loss = quantized.report.loss_points
    meta, promoted, reason = register_quantized(quantized, registry, promote=True)
    if loss <= 1e-9:  # int8 kernels differ by CPU: here they lost nothing, which 0.0 allows
        assert promoted and meta.lineage["quantization"]["promotable"], reason
        assert registry.aliases("cancer")["production"] == meta.version
        registry.promote("cancer", cancer.version)  # as it was, for the other tests
        return
    assert not promoted and not meta.lineage["quantization"]["promotable"]
    assert reason.startswith(f"not promoted: accuracy {quantized.report.fp32_metrics['accuracy']:.4f}"
                             f" -> {quantized.report.int8_metrics['accuracy']:.4f} loses "
                             f"{loss:.2f} points (a loss of at most 0.00 allowed")
    assert registry.aliases("cancer")["production"] == cancer.version


def test_models_promote_refuses_an_unpromotable_int8_version(cancer: ModelVersion,
                                                             settings: TrainingSettings) -> None:
    registry = Registry(settings.registry_dir)
    lineage = {"trigger": "quantize", "quantization": {
        "source_version": cancer.version, "promotable": False, "loss_points": 1.5,
        "metric": "accuracy", "max_loss_points": 1.0}}
    meta = registry.register(cancer.metadata.model_copy(update={"lineage": lineage}),
                             cancer.onnx_path, reference=cancer.reference())
    env = {"MODELLOOP_HOME": str(settings.home)}
    refused = CliRunner().invoke(app, ["models", "promote", "cancer", str(meta.version)], env=env)
    assert refused.exit_code == 1
    assert refused.output == (
        f"error: cancer v{meta.version} not promoted: it is an int8 quantization of "
        f"v{cancer.version} that loses 1.50 points of accuracy (at most 1.00 allowed); use "
        "--force to promote it anyway\n")
    assert registry.aliases("cancer")["production"] == cancer.version
    forced = CliRunner().invoke(app, ["models", "promote", "cancer", str(meta.version), "--force"],
                                env=env)
    assert forced.exit_code == 0, forced.output
    assert registry.aliases("cancer") == {"production": meta.version, "previous": cancer.version}
    registry.promote("cancer", cancer.version)  # as it was, for the other tests


# -- the graph rewrite -------------------------------------------------------------------------
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", [True, False])
def test_gemm_to_matmul_gives_the_same_outputs(trans_b: int, bias: bool) -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 5) if trans_b else (5, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(size=3).astype(np.float32), "b"))
        inputs.append("b")
    graph = helper.make_graph(
        [helper.make_node("Gemm", inputs, ["y"], transB=trans_b)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    rewritten = gemm_to_matmul(model)
    assert [n.op_type for n in rewritten.graph.node] == (["MatMul", "Add"] if bias else ["MatMul"])
    assert [n.op_type for n in model.graph.node] == ["Gemm"]  # the input is left alone
    x = rng.normal(size=(4, 5)).astype(np.float32)
    before = onnx_session(model.SerializeToString()).run(None, {"x": x})[0]
    after = onnx_session(rewritten.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("shape", "rows", "expected"),
    [
        ([None, 64], (5, 64), (5, 64)),          # tabular rows as they are
        ([None, 1, 8, 8], (5, 64), (5, 1, 8, 8)),  # an image's pixels reshaped
        ([None, None, 3], (5, 24, 3), (5, 24, 3)),  # a sequence of any length as it is
    ],
)
def test_layout(shape: list[int | None], rows: tuple[int, ...], expected: tuple[int, ...]) -> None:
    out = layout(np.zeros(rows, np.float64), shape)
    assert out.shape == expected and out.dtype == np.float32 and out.flags.c_contiguous


# -- the command -------------------------------------------------------------------------------
runner = CliRunner()


def test_cli_quantizes_registers_and_prints_json(cancer: ModelVersion, settings: TrainingSettings) -> None:
    registry = Registry(settings.registry_dir)
    before = {m.version for m in registry.versions("cancer")}
    result = runner.invoke(app, ["quantize", "cancer", "--version", "1", "--method", "dynamic",
                                 "--promote", "--json"], env={"MODELLOOP_HOME": str(settings.home)})
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)  # stdout holds only the JSON; the table is on stderr
    assert out["version"] not in before and out["source_version"] == 1 and out["promoted"]
    assert out["quantization"]["method"] == "dynamic" and out["quantization"]["promotable"]
    assert Path(out["onnx_path"]) == registry.get("cancer", out["version"]).onnx_path.resolve()
    assert "rows/s, batch 256" in result.stderr and f"int8 v{out['version']}" in result.stderr
    assert registry.aliases("cancer")["production"] == out["version"]
    shown = runner.invoke(app, ["models", "show", "cancer"], env={"MODELLOOP_HOME": str(settings.home)})
    assert "int8:      dynamic from v1" in shown.stdout and "int8 vs fp32 v1" in shown.stdout
    registry.promote("cancer", cancer.version)  # as it was, for the other tests


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # no such model
        (["nope"], "error: model 'nope' is not registered under "),
        # no such version
        (["cancer", "--version", "99"], "error: model 'cancer' has no version 99\n"),
        # no such method
        (["cancer", "--method", "int4"], "'int4' is not one of"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(args: list[str], message: str, cancer: ModelVersion,
                                              settings: TrainingSettings) -> None:
    result = runner.invoke(app, ["quantize", *args], env={"MODELLOOP_HOME": str(settings.home)})
    assert result.exit_code == 2
    assert message in result.stderr and result.stdout == ""


def test_cli_refuses_an_int8_version_with_exit_2(mlp_dynamic: Quantized, settings: TrainingSettings) -> None:
    v = mlp_dynamic.int8.version
    result = runner.invoke(app, ["quantize", "cancer", "--version", str(v)],
                           env={"MODELLOOP_HOME": str(settings.home)})
    assert result.exit_code == 2
    assert result.stderr.endswith(f"error: cancer v{v} is an int8 quantization already (of v1); "
                                  "quantize the fp32 version\n")
