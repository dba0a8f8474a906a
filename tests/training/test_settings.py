"""Training settings: the env prefix, documented fields, errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from modelloop.cli import app
from modelloop.settings import HomeSettings
from training.config import TrainingConfig
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
