"""Pruning: a real small MLP trained here, pruned with torch.nn.utils.prune, fine-tuned, exported,
registered, measured against its parent on the test split; the promotion rule; ``modelloop
prune`` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from modelloop.cli import app
from modelloop.models_cli import not_promotable
from modelloop.registry import ModelVersion, Registry
from tests.training.conftest import quiet_settings
from training.config import TrainingConfig
from training.pipeline import TrainOptions, train_and_register
from training.prune import NotPrunable, prune_version, register_pruned
from training.settings import TrainingSettings

pytestmark = pytest.mark.slow
FAST_SPEED = {"speed_repeats": 1, "speed_min_time_s": 0.005}  # rows/s are not what is tested
runner = CliRunner()


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> TrainingSettings:
    return quiet_settings(tmp_path_factory.mktemp("prune-home"))


def _train(settings: TrainingSettings, name: str, **overrides: object) -> ModelVersion:
    registry = Registry(settings.registry_dir)
    config = TrainingConfig.from_settings(settings, **overrides)
    meta = train_and_register("breast_cancer", name=name, registry=registry, promote=True,
                              options=TrainOptions(config=config, settings=settings))
    return registry.get(name, meta.version)


@pytest.fixture(scope="module")
def cancer(settings: TrainingSettings) -> ModelVersion:
    """The breast_cancer MLP ([64, 32] hidden units), 30 epochs, seeded."""
    return _train(settings, "cancer", epochs=30)


def _env(settings: TrainingSettings) -> dict[str, str]:
    return {"MODELLOOP_HOME": str(settings.home)}


def _weight_shapes(path: Path) -> list[tuple[int, ...]]:
    model = onnx.load(path)
    return sorted(numpy_helper.to_array(i).shape for i in model.graph.initializer
                  if numpy_helper.to_array(i).ndim == 2)


def test_structured_pruning_shrinks_the_graph_and_is_promoted_within_the_budget(
        settings: TrainingSettings, cancer: ModelVersion) -> None:
    result = runner.invoke(app, ["prune", "cancer", "--version", str(cancer.version),
                                 "--amount", "0.5", "--structured", "--epochs", "10",
                                 "--promote", "--json"], env=_env(settings))
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    report = out["pruning"]
    registry = Registry(settings.registry_dir)
    pruned = registry.get("cancer", out["version"])

    # whole hidden units are gone: half of each hidden layer, in the exported graph itself
    assert report["hidden"] == {"parent": [64, 32], "pruned": [32, 16]}
    parent_shapes, pruned_shapes = _weight_shapes(cancer.onnx_path), _weight_shapes(pruned.onnx_path)
    assert sum(np.prod(s) for s in pruned_shapes) < sum(np.prod(s) for s in parent_shapes) / 2
    assert pruned.onnx_path.stat().st_size < cancer.onnx_path.stat().st_size
    assert report["bytes"] == {"parent": cancer.onnx_path.stat().st_size,
                               "pruned": pruned.onnx_path.stat().st_size}
    # measured on the parent's test split: the parent's numbers are its registered ones
    assert report["parent_metrics"]["accuracy"] == pytest.approx(cancer.metadata.metrics["accuracy"])
    assert pruned.metadata.metrics["accuracy"] == pytest.approx(report["pruned_metrics"]["accuracy"])
    assert report["loss_points"] <= report["max_loss_points"] == pytest.approx(1.0)
    assert set(report["rows_per_s"]["pruned"]) == {"1", "256"}

    # lineage, the stored config (a later fine-tune builds the small MLP) and the promotion
    assert pruned.metadata.parent_version == cancer.version
    assert pruned.metadata.lineage["trigger"] == "prune"
    assert (report["amount"], report["structured"]) == (0.5, True)
    assert pruned.metadata.config["model"]["hidden"] == [32, 16]
    assert pruned.metadata.parity is not None and pruned.metadata.parity.passed
    assert out["promoted"] is True
    assert registry.resolve("cancer", "production") == pruned.version
    shown = runner.invoke(app, ["models", "show", "cancer", str(pruned.version)], env=_env(settings))
    assert (f"pruned:    structured 0.5 from v{cancer.version}, hidden [64, 32] -> [32, 16], "
            f"accuracy loss {report['loss_points']:.2f} points, promotable") in shown.stdout


def test_unstructured_pruning_zeroes_weights_in_a_graph_of_the_same_shape(
        settings: TrainingSettings, cancer: ModelVersion) -> None:
    pruned = prune_version(cancer, amount=0.7, settings=settings, epochs=5, **FAST_SPEED)
    report = pruned.report
    assert report.hidden == {"parent": [64, 32], "pruned": [64, 32]}
    assert report.zero_weights["parent"] == 0.0
    assert report.zero_weights["pruned"] == pytest.approx(0.7, abs=0.01)
    model = onnx.load_from_string(pruned.onnx_bytes)
    weights = [numpy_helper.to_array(i) for i in model.graph.initializer
               if numpy_helper.to_array(i).ndim == 2]
    assert sorted(w.shape for w in weights) == _weight_shapes(cancer.onnx_path)
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights)
    assert zeros == pytest.approx(0.7, abs=0.01)  # the zeros survive the fine-tune and export
    # the dense file does not shrink (zeros take as many bytes)
    assert abs(report.bytes["pruned"] - report.bytes["parent"]) < 0.02 * report.bytes["parent"]


def test_a_pruned_version_over_the_budget_is_registered_but_not_promoted(
        settings: TrainingSettings, cancer: ModelVersion) -> None:
    strict = settings.model_copy(update={"prune_max_loss": 0.0})
    pruned = prune_version(cancer, amount=0.97, structured=True, settings=strict, epochs=1,
                           **FAST_SPEED)
    report = pruned.report
    assert report.hidden["pruned"] == [2, 1]
    # two and one hidden units after one epoch: a loss, which the 0.0 budget refuses
    assert report.loss_points > 0 and not report.promotable, report
    assert not_promotable(pruned.metadata.lineage) == (
        f"it is a pruned model of v{cancer.version} that loses {report.loss_points:.2f} "
        f"points of accuracy (at most 0.00 allowed)")
    registry = Registry(settings.registry_dir)
    production = registry.aliases(cancer.metadata.name)["production"]
    meta, promoted, _ = register_pruned(pruned, registry, promote=True)
    assert not promoted and registry.aliases(cancer.metadata.name)["production"] == production
    assert registry.get(cancer.metadata.name, meta.version).metadata.lineage["pruning"]


@pytest.mark.parametrize(("lineage", "why"), [
    # a pruned model within its budget
    ({"pruning": {"promotable": True}}, None),
    # one over it
    ({"pruning": {"promotable": False, "source_version": 3, "loss_points": 2.5,
                  "metric": "accuracy", "max_loss_points": 1.0}},
     "it is a pruned model of v3 that loses 2.50 points of accuracy (at most 1.00 allowed)"),
    # a version made otherwise
    ({"trigger": "manual"}, None),
])
def test_the_promotion_rule_reads_the_pruning_lineage(lineage: dict[str, object],
                                                       why: str | None) -> None:
    assert not_promotable(lineage) == why


def test_prune_refuses_what_it_cannot_prune(settings: TrainingSettings,
                                            cancer: ModelVersion) -> None:
    detector = _train(settings, "detector", epochs=2, architecture="autoencoder")
    result = runner.invoke(app, ["prune", "detector"], env=_env(settings))
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] == (f"error: detector v{detector.version} is a "
                                              "'autoencoder' model; pruning takes the 'mlp' "
                                              "architecture only")
    result = runner.invoke(app, ["prune", "cancer", "--amount", "1.5"], env=_env(settings))
    assert result.exit_code == 2
    assert "between 0 and 1" in result.stderr
    registry = Registry(settings.registry_dir)
    meta, _, _ = register_pruned(prune_version(cancer, settings=settings, epochs=1, **FAST_SPEED),
                                 registry)
    with pytest.raises(NotPrunable, match="pruned already; prune the version it came from"):
        prune_version(registry.get("cancer", meta.version), settings=settings)
    # a version whose training data cannot be reloaded as it was: one line, exit 2
    moved = registry.register(cancer.metadata.model_copy(update={"data_fingerprint": "sha256:0"}),
                              cancer.onnx_path, reference=cancer.reference())
    result = runner.invoke(app, ["prune", "cancer", "--version", str(moved.version)],
                           env=_env(settings))
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines()[-1].startswith(f"error: cancer v{moved.version}: the data ")
    assert "start from a version trained by `modelloop train`" in result.stderr


def test_a_balanced_model_is_fine_tuned_with_its_weighted_loss(settings: TrainingSettings) -> None:
    balanced = _train(settings, "balanced", epochs=5, class_weight="balanced")
    pruned = prune_version(balanced, amount=0.5, structured=True, settings=settings, epochs=3,
                           **FAST_SPEED)
    assert pruned.metadata.config["class_weight"] == "balanced"
    assert pruned.metadata.config["epochs"] == 5  # the parent's; the fine-tune's are in lineage
    assert 1 <= pruned.report.fine_tune_epochs <= 3
