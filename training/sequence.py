"""Recurrent networks (GRU, LSTM) for sequences, and the synthetic sequence task they learn.

**The task** (``--dataset sequences``, :class:`SequenceTask`): each example is a sequence of
``length`` time steps (24 by default) of three channels, and its class is the *shape* of the
``signal`` channel over the whole window:

==========  ==================================================================================
``rise``    a straight ramp up
``fall``    a straight ramp down
``peak``    a triangular bump (its centre anywhere in the middle 40 % of the window)
``dip``     a triangular trough
==========  ==================================================================================

Each has a random amplitude (0.5 to 2) and offset (normal, sd 1) plus Gaussian noise (sd 0.35) at
every step. ``rise`` and ``fall`` hold exactly the same values in a different order, so a model
that ignores the order cannot tell them apart. Two more channels carry nothing about the class:
``walk``, a random walk, and ``noise``, white noise. The classes are balanced, and the same seed
gives the same data.

**The model** (``--model gru`` or ``--model lstm``): per-channel median imputation and
standardization (fitted on the training steps), a GRU or LSTM, and a linear head on its last
output. The exported graph takes ``input`` float32 ``[batch, time, 3]`` with a dynamic time axis,
so sequences of any length are served; the parity check runs at 1, a third, one and two times the
training length. To learn the shapes at any length, each training batch is resampled (linear
interpolation) to a random length between ``min_stretch`` and ``max_stretch`` times its own.
Monitoring sees one row per sequence: each channel's mean over time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator
from torch import nn
from torch.nn import functional as F

from modelloop.schemas import INPUT_NAME, Task, TensorSpec, monitored_features
from training.data import TARGET, TabularDataset
from training.models import (
    Architecture,
    NetBuilder,
    Preprocessor,
    TabularNet,
    register_architecture,
)

CLASSES = ["rise", "fall", "peak", "dip"]
CHANNELS = ["signal", "walk", "noise"]
SEQUENCE_ROWS = 4000
SEQUENCE_LENGTH = 24


@dataclass(frozen=True)
class SequenceTask:
    """The seeded generator of the sequence task (see the module docstring)."""

    seed: int = 0
    noise: float = 0.35

    def sample(self, n: int, *, length: int = SEQUENCE_LENGTH, seed: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """``n`` sequences ``[n, length, 3]`` float32 and their class indices into CLASSES."""
        if n < 1 or length < 2:
            raise ValueError("a sample needs at least one sequence of at least 2 steps")
        rng = np.random.default_rng(self.seed if seed is None else seed)
        y = np.arange(n) % len(CLASSES)  # balanced, then shuffled
        rng.shuffle(y)
        t = np.linspace(0.0, 1.0, length)[None, :]
        amplitude = rng.uniform(0.5, 2.0, (n, 1))
        offset = rng.normal(0.0, 1.0, (n, 1))
        centre = rng.uniform(0.3, 0.7, (n, 1))
        ramp = np.broadcast_to(t - 0.5, (n, length))
        bump = np.maximum(0.0, 1.0 - np.abs(t - centre) / 0.3) - 0.3
        shape = np.select([y[:, None] == k for k in range(4)], [ramp, -ramp, bump, -bump])
        signal = offset + amplitude * shape + rng.normal(0.0, self.noise, (n, length))
        walk = np.cumsum(rng.normal(0.0, 0.3, (n, length)), axis=1)
        white = rng.normal(0.0, 1.0, (n, length))
        return np.stack([signal, walk, white], axis=-1).astype(np.float32), y.astype(np.int64)

    def dataset(self, n: int = SEQUENCE_ROWS, *, length: int = SEQUENCE_LENGTH) -> TabularDataset:
        x, y = self.sample(n, length=length)
        return TabularDataset("sequences", x, y, list(CHANNELS), TARGET, Task.classification,
                              list(CLASSES))


def load_sequences(rows: int | None, seed: int) -> TabularDataset:
    """The built-in ``sequences`` dataset (``--rows``, ``--seed``)."""
    return SequenceTask(seed=seed).dataset(rows or SEQUENCE_ROWS)


class RNNParams(BaseModel):
    """Parameters of the ``gru`` and ``lstm`` architectures."""

    model_config = ConfigDict(extra="forbid")

    hidden: PositiveInt = 32
    """Size of the recurrent state."""
    layers: PositiveInt = 1
    """Stacked recurrent layers."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout between stacked layers (with ``layers`` > 1)."""
    min_stretch: float = Field(default=0.5, gt=0.0, le=1.0)
    """Shortest resampled training length, as a share of the sequence's length."""
    max_stretch: float = Field(default=2.0, ge=1.0, le=8.0)
    """Longest resampled training length (1 and 1 turn the augmentation off)."""

    @model_validator(mode="after")
    def _dropout_needs_layers(self) -> RNNParams:
        if self.dropout > 0 and self.layers == 1:
            raise ValueError("dropout between layers needs layers > 1")
        return self


class TimeStretch(nn.Module):
    """Resample a batch ``[batch, time, features]`` to a random length (training mode only)."""

    def __init__(self, min_stretch: float, max_stretch: float) -> None:
        super().__init__()
        self.min_stretch, self.max_stretch = min_stretch, max_stretch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.min_stretch == self.max_stretch == 1.0:
            return x
        steps = x.shape[1]
        low, high = max(2, round(steps * self.min_stretch)), max(2, round(steps * self.max_stretch))
        length = int(torch.randint(low, high + 1, ()))
        if length == steps:
            return x
        out = F.interpolate(x.transpose(1, 2), size=length, mode="linear", align_corners=True)
        return out.transpose(1, 2)


class RecurrentBackbone(nn.Module):
    """A GRU or LSTM over ``[batch, time, features]`` and a linear head on its last output."""

    def __init__(self, cell: str, n_features: int, n_outputs: int, params: RNNParams) -> None:
        super().__init__()
        rnn = nn.GRU if cell == "gru" else nn.LSTM
        self.rnn = rnn(n_features, params.hidden, num_layers=params.layers, batch_first=True,
                       dropout=params.dropout)
        self.head = nn.Linear(params.hidden, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        logits: torch.Tensor = self.head(out[:, -1])
        return logits


class SequenceClassifier(TabularNet):
    """Per-channel preprocessing, time-stretch augmentation (training only), an RNN."""

    tasks = frozenset({Task.classification})

    def __init__(self, preprocess: Preprocessor, backbone: RecurrentBackbone, n_outputs: int,
                 stretch: TimeStretch) -> None:
        super().__init__(preprocess, backbone, Task.classification, n_outputs)
        self.stretch = stretch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the preprocessor's [features] statistics broadcast over batch and time
        out: torch.Tensor = self.backbone(self.stretch(self.preprocess(x)))
        return out

    def monitored_features(self, rows: np.ndarray) -> np.ndarray:
        # the rule serving applies to the sequences it is sent: each feature's mean over time
        out: np.ndarray = monitored_features(rows, (None, rows.shape[-1]))
        return out

    def parity_inputs(self, x: np.ndarray) -> Sequence[np.ndarray]:
        steps = x.shape[1]
        return [x[:, :1], x[:, :max(2, steps // 3)], x, np.concatenate([x, x], axis=1)]

    def io_specs(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        n_features = int(self.preprocess.mean.numel())
        inputs = [TensorSpec(name=INPUT_NAME, dtype="float32", shape=[None, None, n_features])]
        outputs = [TensorSpec(name=self.output_name, dtype="float32", shape=[None, self.n_outputs])]
        return inputs, outputs


def _builder(cell: str) -> NetBuilder:
    def build(params: BaseModel, *, train_features: np.ndarray, task: Task, n_outputs: int,
              train_target: np.ndarray | None = None) -> SequenceClassifier:
        assert isinstance(params, RNNParams)
        n_features = train_features.shape[-1]
        pre = Preprocessor.fit(np.asarray(train_features).reshape(-1, n_features))
        backbone = RecurrentBackbone(cell, n_features, n_outputs, params)
        return SequenceClassifier(pre, backbone, n_outputs,
                                  TimeStretch(params.min_stretch, params.max_stretch))

    return build


for _cell, _what in (("gru", "GRU"), ("lstm", "LSTM")):
    register_architecture(Architecture(
        _cell, RNNParams, None, f"{_what} for sequences [batch, time, features]",
        tasks=frozenset({Task.classification}), build_net=_builder(_cell), data="sequence"))
