"""Fine-tuning: start training from a registered version's weights instead of random ones.

Every version stores its PyTorch weights (``weights.pt``) beside the ONNX file. A
:class:`WarmStart` loads them into a freshly built model of the same architecture before
training: the preprocessing (imputation medians, scaling) and every layer whose shape still fits
come from the parent; a layer that no longer fits (an output head for other classes) keeps its
fresh initialisation. Optionally the first ``freeze`` weight layers are frozen: no gradient, and
their batch-norm statistics stay the parent's::

    init = WarmStart.from_registry(registry, "cancer", "production", freeze=1)
    train_and_register(frame, name="cancer", options=TrainOptions(config=init.config(), init=init))

``modelloop train --init-from cancer --freeze 1`` does the same, and the retraining job
fine-tunes the champion when ``MODELLOOP_TRAINING_RETRAIN_FINE_TUNE`` is on (the default).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from modelloop.registry import ModelVersion, Registry, RegistryError
from training.config import TrainingConfig
from training.data import DataError
from training.models import TabularNet
from training.pipeline import WEIGHTS_FILE

# leaf modules that carry a layer's weights; batch norms and the like belong to the layer before
_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.RNNBase)


class TransferError(DataError):
    """The parent cannot seed this model (no weights, another architecture, other inputs)."""


def weight_layers(net: nn.Module) -> list[list[str]]:
    """The model's weight layers in order, each the names of its leaf modules with parameters
    (a Linear or Conv and the norm layers after it), e.g. ``[["backbone.layers.0",
    "backbone.layers.1"], ["backbone.layers.4", ...], ...]``."""
    layers: list[list[str]] = []
    for name, module in net.named_modules():
        if any(True for _ in module.children()) or not any(True for _ in module.parameters(False)):
            continue
        if isinstance(module, _WEIGHT_LAYERS) or not layers:
            layers.append([name])
        else:
            layers[-1].append(name)
    return layers


def freeze_layers(net: TabularNet, count: int) -> list[str]:
    """Freeze the first ``count`` weight layers of ``net`` (all but the output layer at most);
    returns the frozen module names."""
    layers = weight_layers(net)
    if count < 0 or count >= len(layers):
        raise TransferError(f"--freeze {count}: the model has {len(layers)} weight layers and the "
                            f"last one (the output) must train; choose 0 to {len(layers) - 1}")
    names = [name for layer in layers[:count] for name in layer]
    for name in names:
        for p in net.get_submodule(name).parameters():
            p.requires_grad_(False)
    net.frozen = tuple(names)  # TabularNet.train keeps these in eval mode
    return names


def _vocabulary_change(parent: Mapping[str, Sequence[str]], data: Mapping[str, Sequence[str]]) -> str:
    """One line on how the data's categorical values differ from the parent's."""
    for name in sorted(set(parent) | set(data)):
        if name not in parent or name not in data:
            kind = "categorical here" if name in data else "numeric here"
            return f"feature {name!r} is {kind}, not there"
        new = [v for v in data[name] if v not in parent[name]]
        gone = [v for v in parent[name] if v not in data[name]]
        if new or gone:
            said = ", ".join([*(f"{v!r} new" for v in new[:3]), *(f"{v!r} gone" for v in gone[:3])])
            return f"the values of {name!r} changed ({said}); its codes would not match"
    return "the categorical values changed"


@dataclass
class WarmStart:
    """A registered version's weights to start training from (see the module docstring)."""

    name: str
    version: int
    architecture: str
    parent_config: dict[str, Any]
    state: dict[str, torch.Tensor]
    feature_names: list[str]
    class_labels: list[str] | None
    freeze: int = 0
    new_head: bool = False
    """Set by :meth:`check`: the classes differ from the parent's, so its output layer (whose
    rows mean the parent's classes) is not loaded."""
    loaded: list[str] = field(default_factory=list)
    """Filled by :meth:`apply`: the tensors taken from the parent."""
    fresh: list[str] = field(default_factory=list)
    """Filled by :meth:`apply`: the tensors left freshly initialised (their shapes differ)."""
    frozen: list[str] = field(default_factory=list)
    categories: dict[str, list[str]] = field(default_factory=dict)
    """The parent's categorical values (``ModelMetadata.categories``): its weights mean those
    codes, so the data must code the same values."""

    @classmethod
    def from_version(cls, version: ModelVersion, freeze: int = 0) -> WarmStart:
        path = version.path / WEIGHTS_FILE
        meta = version.metadata
        if not path.exists():
            raise TransferError(f"{meta.name} v{meta.version} has no stored weights ({WEIGHTS_FILE}); "
                                "it cannot be fine-tuned (train it with this version of modelloop)")
        state = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
        return cls(meta.name, meta.version, meta.architecture, dict(meta.config), state,
                   list(meta.feature_names), meta.class_labels, freeze,
                   categories={k: list(v) for k, v in meta.categories.items()})

    @classmethod
    def from_registry(cls, registry: Registry, name: str, ref: int | str = "production",
                      freeze: int = 0) -> WarmStart:
        try:
            version = registry.get(name, ref)
        except RegistryError as exc:
            raise TransferError(f"cannot fine-tune from {name}@{ref}: {exc}") from exc
        return cls.from_version(version, freeze)

    def config(self, **overrides: Any) -> TrainingConfig:
        """The parent's training configuration with ``overrides`` (None values ignored): the
        architecture and its parameters must stay the parent's for the weights to fit."""
        config = TrainingConfig.model_validate(self.parent_config)
        return config.model_copy(update={k: v for k, v in overrides.items() if v is not None})

    def apply(self, net: TabularNet) -> None:
        """Load the parent's tensors into ``net`` where the shapes fit, then freeze."""
        own = net.state_dict()
        pre = [k for k in own if k.startswith("preprocess.")]
        mismatched = [k for k in pre if k in self.state and self.state[k].shape != own[k].shape]
        if mismatched or not all(k in self.state for k in pre):
            shape = tuple(own[pre[0]].shape) if pre else ()
            raise TransferError(f"cannot fine-tune from {self.name} v{self.version}: its inputs "
                                f"differ from this data's (input preprocessing of shape {shape})")
        head = [f"{m}." for m in weight_layers(net)[-1]] if self.new_head else []
        take = {k: v for k, v in self.state.items()
                if k in own and v.shape == own[k].shape and not any(map(k.startswith, head))}
        self.loaded = sorted(take)
        self.fresh = sorted(k for k in own if k not in take)
        if not any(k.startswith("backbone.") for k in take):
            raise TransferError(f"cannot fine-tune from {self.name} v{self.version}: none of its "
                                "layers fit this model")
        net.load_state_dict(take, strict=False)
        self.frozen = freeze_layers(net, self.freeze) if self.freeze else []

    def check(self, config: TrainingConfig, feature_names: list[str],
              class_labels: list[str] | None,
              categories: Mapping[str, Sequence[str]] | None = None) -> None:
        """The model to train must be the parent's architecture with the parent's parameters,
        on the parent's features in the same order, with the parent's categorical values
        (``categories``: the data's). Other classes than the parent's get a fresh output
        layer."""
        if config.architecture != self.architecture:
            raise TransferError(f"cannot fine-tune a {config.architecture!r} model from "
                                f"{self.name} v{self.version}, a {self.architecture!r} model")
        parent = self.parent_config.get("model")
        if parent and config.model != parent:
            raise TransferError(f"cannot fine-tune from {self.name} v{self.version} with other "
                                f"architecture parameters ({config.model} vs "
                                f"{self.parent_config['model']})")
        if feature_names != self.feature_names:
            diff = next((i for i, (a, b) in enumerate(zip(feature_names, self.feature_names,
                                                          strict=False)) if a != b),
                        min(len(feature_names), len(self.feature_names)))
            ours = feature_names[diff] if diff < len(feature_names) else "nothing"
            theirs = self.feature_names[diff] if diff < len(self.feature_names) else "nothing"
            raise TransferError(f"cannot fine-tune from {self.name} v{self.version}: its inputs "
                                f"differ from this data's (feature {diff} is {theirs!r} there, "
                                f"{ours!r} here)")
        ours_cat = {k: list(v) for k, v in (categories or {}).items()}
        if ours_cat != self.categories:
            raise TransferError(f"cannot fine-tune from {self.name} v{self.version}: "
                                f"{_vocabulary_change(self.categories, ours_cat)}")
        self.new_head = class_labels != self.class_labels

    def describe(self) -> dict[str, Any]:
        """What went into the new version's lineage."""
        return {"model": self.name, "version": self.version, "frozen_layers": self.freeze,
                "frozen_modules": self.frozen, "tensors_loaded": len(self.loaded),
                "tensors_fresh": self.fresh}
