"""Fixtures of the quantization tests: one registry for the package, the models trained and
quantized in it once (seeded, so the same weights on every CPU run)."""

from __future__ import annotations

import pytest

from modelloop.registry import ModelVersion
from tests.training.conftest import quiet_settings
from tests.training.quantize._support import Quantized, quantize_and_register, train_version
from training.settings import TrainingSettings


@pytest.fixture(scope="package")
def settings(tmp_path_factory: pytest.TempPathFactory) -> TrainingSettings:
    return quiet_settings(tmp_path_factory.mktemp("quantize-home"))


@pytest.fixture(scope="package")
def cancer(settings: TrainingSettings) -> ModelVersion:
    """The breast_cancer MLP, 30 epochs: seeded, so the same weights on every CPU run."""
    return train_version(settings, "breast_cancer", "cancer", epochs=30)


@pytest.fixture(scope="package")
def cnn_static(settings: TrainingSettings) -> Quantized:
    source = train_version(settings, "digits", "digits-cnn", architecture="cnn", epochs=8)
    return quantize_and_register(settings, source, "auto")


@pytest.fixture(scope="package")
def mlp_dynamic(settings: TrainingSettings, cancer: ModelVersion) -> Quantized:
    return quantize_and_register(settings, cancer, "auto")
