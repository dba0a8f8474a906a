"""Users' own modules for tests/training/test_byo.py: importable, as a retraining job needs."""

from __future__ import annotations

import torch
from torch import nn


class TinyClassifier(nn.Module):
    """Logits ``[batch, n_classes]`` from ``[batch, n_features]``."""

    def __init__(self, n_features: int, n_classes: int, hidden: int = 16) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(),
                                    nn.Linear(hidden, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out


class TinyRegressor(nn.Module):
    """A value ``[batch]`` (not ``[batch, 1]``) from ``[batch, n_features]``."""

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)


class DataDependent(TinyClassifier):
    """Python control flow on tensor values: torch.export cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out if bool(out.sum() > 0) else -out


class FixedBatch(TinyClassifier):
    """Branches on the batch size, so the export specialises it: no dynamic batch axis."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out if x.shape[0] > 16 else out * 2


class Noisy(TinyClassifier):
    """Adds fresh noise on every call: ONNX Runtime and PyTorch cannot agree."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out + 10 * torch.rand_like(out)


class Residual(nn.Module):
    """Two 3x3 convolutions added to their input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


class SmallResNet(nn.Module):
    """A small residual CNN: logits ``[batch, n_classes]`` from images ``[batch, 3, 32, 32]``."""

    def __init__(self, n_classes: int, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(Residual(width), nn.MaxPool2d(2), Residual(width))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.blocks(self.stem(x)))
        return out
