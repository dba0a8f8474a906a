"""Fixtures of the training tests: the default breast_cancer model, trained and registered once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from modelloop.registry import ModelVersion, Registry
from training.pipeline import TrainedModel, TrainOptions, register_trained, train_model
from training.settings import TrainingSettings


@dataclass(frozen=True)
class Registered:
    trained: TrainedModel
    version: ModelVersion
    registry: Registry
    settings: TrainingSettings


def quiet_settings(home: Path) -> TrainingSettings:
    """The defaults, with state under ``home`` and no progress bar in the test log."""
    return TrainingSettings(home=home, progress=False)


@pytest.fixture(scope="session")
def cancer(tmp_path_factory: pytest.TempPathFactory) -> Registered:
    """breast_cancer with the default config (the acceptance model), registered and promoted."""
    settings = quiet_settings(tmp_path_factory.mktemp("home"))
    registry = Registry(settings.registry_dir)
    trained = train_model("breast_cancer", name="cancer", options=TrainOptions(settings=settings))
    meta = register_trained(trained, registry, promote=True)
    return Registered(trained, registry.get("cancer", meta.version), registry, settings)


# the training-breadth models (CNN, GRU, autoencoder), trained once per session
from tests.training.breadth_fixtures import (  # noqa: E402
    breadth_home,
    digits_autoencoder,
    digits_cnn,
    sequences_gru,
)

__all__ = ["Registered", "breadth_home", "digits_autoencoder", "digits_cnn", "quiet_settings",
           "sequences_gru"]
