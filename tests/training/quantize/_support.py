"""What the quantization tests share: the quantized pair, and training, quantizing and
reading back a version the way they all do."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from modelloop.registry import ModelVersion, Registry
from training.config import TrainingConfig
from training.data import load_data, split_dataset
from training.measure import layout
from training.pipeline import TrainOptions, train_and_register
from training.quantize import (
    QuantizedModel,
    quantize_version,
    register_quantized,
)
from training.settings import TrainingSettings

FAST_SPEED = {"speed_repeats": 1, "speed_min_time_s": 0.005}  # rows/s are not what is tested


@dataclass(frozen=True)
class Quantized:
    source: ModelVersion
    int8: ModelVersion
    quantized: QuantizedModel
    registry: Registry


def train_version(settings: TrainingSettings, data: object, name: str, **overrides: object) -> ModelVersion:
    registry = Registry(settings.registry_dir)
    config = TrainingConfig.from_settings(settings, **overrides)
    meta = train_and_register(data, name=name, registry=registry, promote=True,  # type: ignore[arg-type]
                              options=TrainOptions(config=config, settings=settings))
    return registry.get(name, meta.version)


def quantize_and_register(settings: TrainingSettings, source: ModelVersion, method: str) -> Quantized:
    registry = Registry(settings.registry_dir)
    quantized = quantize_version(source, method=method, settings=settings, **FAST_SPEED)
    meta, promoted, _ = register_quantized(quantized, registry)
    assert not promoted
    return Quantized(source, registry.get(meta.name, meta.version), quantized, registry)


def op_types(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(path).graph.node}


def the_test_split(version: ModelVersion) -> tuple[np.ndarray, np.ndarray]:
    meta = version.metadata
    ds = load_data(meta.dataset)
    split = split_dataset(ds, val_fraction=meta.config["val_fraction"],
                          test_fraction=meta.config["test_fraction"], seed=meta.config["seed"])
    return layout(ds.features[split.test], meta.inputs[0].shape), ds.target[split.test]
