"""An autoencoder for anomaly detection: reconstruction error as the score.

``--model autoencoder`` learns to reconstruct the (imputed, standardized) features of the training
rows, taking all of them as normal; the labels of the dataset are not used. A row it reconstructs
badly is unlike the training data. After training, the **threshold** is the
``threshold_quantile`` (default 0.99) of the reconstruction errors of the validation rows, so about
1 % of normal rows are flagged. The exported graph outputs ``score`` ``[batch]``: the row's mean
squared reconstruction error divided by the threshold, so **a score of 1 or more is an anomaly**
(the raw threshold is stored as the metric ``threshold``)::

    modelloop train --dataset breast_cancer --model autoencoder --name cancer-anomaly

**Evaluation** with injected anomalies: :func:`inject_anomalies` adds as many corrupted copies of
test rows as there are test rows (``anomaly_ratio``), a third of each kind, then ROC-AUC, average
precision, and precision, recall, F1 and false-positive rate at the threshold are measured on the
normal test rows (label 0) against the corrupted ones (label 1). The kinds, with ``sd`` each
feature's standard deviation in the rows given:

* ``spike``: 1 to 3 features moved by 4 to 8 ``sd`` (a sensor spike, a unit error);
* ``scramble``: half of the features replaced by those of another row (each value is plausible,
  the combination is not);
* ``noise``: every feature plus Gaussian noise of 0.75 ``sd``.
"""

from __future__ import annotations

import itertools
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from sklearn import metrics as skm
from torch import nn

from modelloop.schemas import INPUT_NAME, SCORE, Task, TensorSpec
from training.evaluate import Evaluation
from training.models import (
    ACTIVATIONS,
    Architecture,
    Preprocessor,
    TabularNet,
    register_architecture,
)

ANOMALY_KINDS = ("spike", "scramble", "noise")


class AutoencoderParams(BaseModel):
    """Parameters of the ``autoencoder`` architecture."""

    model_config = ConfigDict(extra="forbid")

    hidden: list[PositiveInt] = Field(default_factory=lambda: [64, 32], min_length=1)
    """Encoder widths; the decoder mirrors them."""
    bottleneck: PositiveInt | None = None
    """Width of the code in the middle; None: half the number of features (at least 2)."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    threshold_quantile: float = Field(default=0.99, gt=0.0, lt=1.0)
    """Quantile of the validation rows' reconstruction errors that becomes the threshold."""
    anomaly_ratio: float = Field(default=1.0, gt=0.0, le=10.0)
    """Injected anomalies per test row in the evaluation."""


def _mlp(widths: list[int], activation: str, dropout: float, last_plain: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if not (last_plain and i == len(widths) - 2):
            layers.append(ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class AutoencoderBackbone(nn.Module):
    """Encoder (features -> bottleneck) and a mirrored decoder (bottleneck -> features)."""

    def __init__(self, n_features: int, params: AutoencoderParams) -> None:
        super().__init__()
        widths = [n_features, *params.hidden, params.bottleneck or max(2, n_features // 2)]
        self.encoder = _mlp(widths, params.activation, params.dropout, last_plain=False)
        self.decoder = _mlp(widths[::-1], params.activation, params.dropout, last_plain=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.decoder(self.encoder(x))
        return out


class Autoencoder(TabularNet):
    """Preprocessing, an :class:`AutoencoderBackbone`; ``forward`` gives each row's mean squared
    reconstruction error of the standardized features, ``infer`` that error over the threshold."""

    tasks = frozenset({Task.anomaly})
    threshold: torch.Tensor

    def __init__(self, preprocess: Preprocessor, backbone: AutoencoderBackbone,
                 params: AutoencoderParams) -> None:
        super().__init__(preprocess, backbone, Task.anomaly, 1)
        self.quantile = params.threshold_quantile
        self.anomaly_ratio = params.anomaly_ratio
        self.register_buffer("threshold", torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.preprocess(x)
        return ((self.backbone(z) - z) ** 2).mean(dim=1)

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        return self(x) / self.threshold

    def encode_target(self, y: np.ndarray) -> torch.Tensor:
        return torch.zeros(len(y))  # the target is the input itself; fit() wants one per row

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return out.mean()

    @property
    def output_name(self) -> str:
        return SCORE

    def calibrate(self, x_val: np.ndarray, y_val: np.ndarray) -> None:
        with torch.no_grad():
            errors = self(torch.from_numpy(np.ascontiguousarray(x_val, dtype=np.float32))).numpy()
        threshold = float(np.quantile(errors, self.quantile)) if len(errors) else 1.0
        self.threshold.fill_(max(threshold, 1e-12))

    def evaluation_set(self, x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        return with_injected_anomalies(x, seed=seed, ratio=self.anomaly_ratio)

    def evaluate(self, y: np.ndarray, outputs: np.ndarray, class_labels: list[str] | None) -> Evaluation:
        evaluation = anomaly_metrics(y, outputs)
        evaluation.metrics["threshold"] = float(self.threshold)
        return evaluation

    def io_specs(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        n_features = int(self.preprocess.mean.numel())
        return ([TensorSpec(name=INPUT_NAME, dtype="float32", shape=[None, n_features])],
                [TensorSpec(name=SCORE, dtype="float32", shape=[None])])


def inject_anomalies(x: np.ndarray, n: int, *, seed: int) -> tuple[np.ndarray, list[str]]:
    """``n`` corrupted copies of rows of ``x`` (kinds in turn; see the module docstring)."""
    rng = np.random.default_rng(seed)
    x = np.asarray(x, dtype=np.float64)
    rows, features = x.shape
    sd = np.nanstd(x, axis=0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    out = x[rng.integers(0, rows, n)].copy()
    kinds = [ANOMALY_KINDS[i % len(ANOMALY_KINDS)] for i in range(n)]
    for i, kind in enumerate(kinds):
        if kind == "spike":
            cols = rng.choice(features, size=min(features, int(rng.integers(1, 4))), replace=False)
            out[i, cols] += rng.choice([-1.0, 1.0], len(cols)) * rng.uniform(4, 8, len(cols)) * sd[cols]
        elif kind == "scramble":
            cols = rng.choice(features, size=max(1, features // 2), replace=False)
            out[i, cols] = x[rng.integers(0, rows), cols]
        else:
            out[i] += rng.normal(0.0, 0.75, features) * sd
    return out.astype(np.float32), kinds


def with_injected_anomalies(x: np.ndarray, *, seed: int, ratio: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The rows of ``x`` (label 0) followed by ``ratio * len(x)`` injected anomalies (label 1)."""
    n = max(1, round(ratio * len(x)))
    anomalies, _ = inject_anomalies(x, n, seed=seed + 1)
    labels = np.concatenate([np.zeros(len(x), np.int64), np.ones(n, np.int64)])
    return np.concatenate([np.asarray(x, np.float32), anomalies]), labels


def anomaly_metrics(y_true: np.ndarray, scores: np.ndarray) -> Evaluation:
    """ROC-AUC, average precision, and precision/recall/F1/false-positive rate at score >= 1."""
    y_true, scores = np.asarray(y_true).ravel(), np.asarray(scores, dtype=np.float64).ravel()
    flagged = scores >= 1.0
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        y_true, flagged.astype(np.int64), average="binary", zero_division=0)
    normal = y_true == 0
    metrics = {
        "roc_auc": float(skm.roc_auc_score(y_true, scores)),
        "average_precision": float(skm.average_precision_score(y_true, scores)),
        "precision": float(precision), "recall": float(recall), "f1": float(f1),
        "false_positive_rate": float(flagged[normal].mean()) if normal.any() else 0.0,
    }
    details = {"rows": len(y_true), "anomalies": int((y_true == 1).sum()),
               "injected_kinds": list(ANOMALY_KINDS)}
    return Evaluation(metrics, details)


def build_autoencoder(params: BaseModel, *, train_features: np.ndarray, task: Task, n_outputs: int,
                      train_target: np.ndarray | None = None) -> Autoencoder:
    assert isinstance(params, AutoencoderParams)
    pre = Preprocessor.fit(train_features)
    return Autoencoder(pre, AutoencoderBackbone(train_features.shape[1], params), params)


register_architecture(Architecture(
    "autoencoder", AutoencoderParams, None,
    "autoencoder for anomaly detection (score: reconstruction error over the threshold)",
    tasks=frozenset({Task.anomaly}), build_net=build_autoencoder))
