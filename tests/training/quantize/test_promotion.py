"""The promotion rule of an int8 version: the loss in points against the allowed one, the method
and metric it is judged by, and `models promote` refusing an unpromotable version."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from modelloop.cli import app
from modelloop.models_cli import not_promotable
from modelloop.registry import ModelVersion, Registry
from modelloop.schemas import Task
from tests.training.quantize._support import FAST_SPEED
from training.quantize import (
    Method,
    is_promotable,
    loss_points,
    primary_metric,
    quantize_version,
    register_quantized,
    resolve_method,
)
from training.settings import TrainingSettings

pytestmark = pytest.mark.slow


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
