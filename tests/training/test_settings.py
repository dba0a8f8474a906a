"""Training settings: the env prefix, documented fields, errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from modelloop.cli import app
from modelloop.schemas import ModelMetadata, Task
from modelloop.settings import HomeSettings
from training.config import TrainingConfig
from training.retrain import RetrainError, gate_metric
from training.settings import TrainingSettings


def test_env_prefix_and_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MODELLOOP_HOME", str(tmp_path))
    monkeypatch.setenv("MODELLOOP_TRAINING_EPOCHS", "7")
    monkeypatch.setenv("MODELLOOP_TRAINING_PARITY_BATCH_SIZES", "[1, 64]")
    settings = TrainingSettings()
    assert (settings.epochs, settings.parity_batch_sizes) == (7, [1, 64])
    assert settings.registry_dir == tmp_path / "registry"
    assert TrainingConfig.from_settings(settings, seed=4).model_dump(include={"epochs", "seed"}) == {
        "epochs": 7, "seed": 4}


def test_every_field_is_documented() -> None:
    own = set(TrainingSettings.model_fields) - set(HomeSettings.model_fields)
    undocumented = [n for n in own if not TrainingSettings.model_fields[n].description]
    assert own and undocumented == []


def test_a_bad_value_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELLOOP_TRAINING_DEVICE", "tpu")
    with pytest.raises(ValidationError, match="device"):
        TrainingSettings()


def test_cli_reports_a_bad_setting_in_one_line(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    monkeypatch.setenv("MODELLOOP_TRAINING_PARITY_TOLERANCE", "-1")
    result = CliRunner().invoke(app, ["train", "--dataset", "wine"])
    assert result.exit_code == 2
    assert result.stderr == ("error: setting MODELLOOP_TRAINING_PARITY_TOLERANCE: Input should be "
                             "greater than or equal to 0\n")


def _meta(task: Task, config: dict[str, str]) -> ModelMetadata:
    return ModelMetadata(name="m", version=3, task=task, inputs=[], outputs=[],
                         feature_names=[], config=config)


@pytest.mark.parametrize(("task", "stored", "option", "expected"), [
    # the command's --metric wins over the stored one
    (Task.classification, {"gate_metric": "pr_auc"}, "f1", ("f1", "option")),
    # the champion's stored metric wins over the setting
    (Task.classification, {"gate_metric": "pr_auc"}, None, ("pr_auc", "champion")),
    # a version that stored none: the setting (MODELLOOP_TRAINING_RETRAIN_METRIC)
    (Task.classification, {}, None, ("roc_auc", "setting")),
    # a regressor that stored none: r2, whatever the classifiers' setting
    (Task.regression, {}, None, ("r2", "setting")),
])
def test_the_gate_metric_comes_from_the_option_the_champion_or_the_setting(
        task: Task, stored: dict[str, str], option: str | None,
        expected: tuple[str, str]) -> None:
    settings = TrainingSettings(retrain_metric="roc_auc")
    assert gate_metric(_meta(task, stored), settings, option) == expected


def test_a_gate_metric_of_the_other_task_is_refused() -> None:
    with pytest.raises(RetrainError) as err:
        gate_metric(_meta(Task.regression, {}), TrainingSettings(), "accuracy")
    assert str(err.value) == "--metric accuracy is not a regression metric; choose r2"
    with pytest.raises(ValidationError, match="retrain_metric"):
        TrainingSettings(retrain_metric="r2")  # the setting is the classifiers' fallback
