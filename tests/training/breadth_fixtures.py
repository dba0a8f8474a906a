"""Session fixtures of the training-breadth tests: a CNN, a GRU and an autoencoder, each trained
once (reduced epochs or rows, still meeting issue 7's acceptance) and registered in one home."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelloop.registry import Registry
from tests.training.conftest import Registered, quiet_settings
from training.config import TrainingConfig
from training.data import load_data
from training.pipeline import TrainOptions, register_trained, train_model


@pytest.fixture(scope="session")
def breadth_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("breadth-home")


def _train(home: Path, data: object, name: str, architecture: str, **overrides: object) -> Registered:
    settings = quiet_settings(home)
    registry = Registry(settings.registry_dir)
    config = TrainingConfig.from_settings(settings, architecture=architecture, **overrides)
    trained = train_model(data, name=name,  # type: ignore[arg-type]
                          options=TrainOptions(config=config, settings=settings))
    meta = register_trained(trained, registry, promote=True)
    return Registered(trained, registry.get(name, meta.version), registry, settings)


@pytest.fixture(scope="session")
def digits_cnn(breadth_home: Path) -> Registered:
    """The CNN on the full digits data, at most 40 epochs (the default config allows 150)."""
    return _train(breadth_home, "digits", "digits-cnn", "cnn", epochs=40, patience=10)


@pytest.fixture(scope="session")
def sequences_gru(breadth_home: Path) -> Registered:
    """The GRU on 2000 sequences of the sequence task (the default is 4000), 30 epochs."""
    return _train(breadth_home, load_data("sequences", rows=2000), "sequences-gru", "gru", epochs=30)


@pytest.fixture(scope="session")
def digits_autoencoder(breadth_home: Path) -> Registered:
    """The autoencoder on digits with the default config."""
    return _train(breadth_home, "digits", "digits-anomaly", "autoencoder")
