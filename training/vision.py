"""A small convolutional network for images, with augmentation while it trains.

``cnn`` trains on dataset rows that are the pixels of an image (scikit-learn's 8x8 ``digits``:
64 features), laid out as ``[batch, channels, height, width]``; the exported graph takes that
tensor, e.g. ``input`` float32 ``[batch, 1, 8, 8]``. Serving accepts the same tensor (or the 64
pixels of a row) and monitoring sees the 64 pixel values of each row.

Preprocessing inside the model: missing pixels (NaN) take the training median of that pixel, then
the image is standardized with the mean and standard deviation of all training pixels (one pair
for the image, not one per pixel, so a shifted stroke keeps its scale). While training, each batch
is augmented after imputation: a random shift (up to ``max_shift`` pixels), rotation (up to
``max_rotation`` degrees) and Gaussian noise (``noise`` standard deviations of the pixels). The
augmentation only runs in training mode, so it is not part of the exported graph::

    modelloop train --dataset digits --model cnn
"""

from __future__ import annotations

import math

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from torch import nn
from torch.nn import functional as F

from modelloop.schemas import INPUT_NAME, Task, TensorSpec, monitored_features
from training.models import Architecture, TabularNet, register_architecture


class CNNParams(BaseModel):
    """Parameters of the ``cnn`` architecture."""

    model_config = ConfigDict(extra="forbid")

    image_shape: list[PositiveInt] | None = Field(default=None, min_length=3, max_length=3)
    """``[channels, height, width]`` of the image the features hold, row-major; None: one
    channel, square (64 features -> ``[1, 8, 8]``)."""
    channels: list[PositiveInt] = Field(default_factory=lambda: [16, 32], min_length=1)
    """Output channels of each 3x3 convolution block (conv -> batch norm -> ReLU)."""
    hidden: PositiveInt = 64
    """Width of the dense layer after the convolutions."""
    dropout: float = Field(default=0.2, ge=0.0, lt=1.0)
    augment: bool = True
    """Augment the training batches (shift, rotation, noise)."""
    max_shift: float = Field(default=1.0, ge=0.0)
    """Largest random shift, in pixels."""
    max_rotation: float = Field(default=12.0, ge=0.0, le=180.0)
    """Largest random rotation, in degrees."""
    noise: float = Field(default=0.1, ge=0.0)
    """Standard deviation of the added Gaussian noise, in standard deviations of the pixels."""


class ImagePreprocessor(nn.Module):
    """Per-pixel median imputation, then one mean and scale for the whole image."""

    median: torch.Tensor
    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, image_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.register_buffer("median", torch.zeros(image_shape))
        self.register_buffer("mean", torch.tensor(0.0))
        self.register_buffer("scale", torch.tensor(1.0))

    @classmethod
    def fit(cls, images: np.ndarray) -> ImagePreprocessor:
        """Fit on the training images ``[rows, channels, height, width]`` (NaN = missing)."""
        x = np.asarray(images, dtype=np.float64)
        pre = cls(tuple(x.shape[1:]))
        median = np.nan_to_num(np.nanmedian(x, axis=0)) if np.isnan(x).any() else np.median(x, axis=0)
        filled = np.where(np.isnan(x), median, x)
        std = float(filled.std())
        pre.median.copy_(torch.as_tensor(median, dtype=torch.float32))
        pre.mean.fill_(float(filled.mean()))
        pre.scale.fill_(std if std > 1e-12 else 1.0)
        return pre

    def impute(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(torch.isnan(x), self.median, x)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


class Augment(nn.Module):
    """Random shift, rotation and noise per image (training mode only; identity in eval)."""

    def __init__(self, max_shift: float, max_rotation: float, noise_std: float) -> None:
        super().__init__()
        self.max_shift = max_shift
        self.max_rotation = math.radians(max_rotation)
        self.noise_std = noise_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        b, _, h, w = x.shape
        angle = (torch.rand(b, device=x.device) * 2 - 1) * self.max_rotation
        # affine_grid works in [-1, 1] coordinates: one pixel is 2 / size
        shift = (torch.rand(b, 2, device=x.device) * 2 - 1) * self.max_shift
        tx, ty = shift[:, 0] * 2 / w, shift[:, 1] * 2 / h
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if self.noise_std > 0:
            out = out + self.noise_std * torch.randn_like(out)
        return out


class ConvBackbone(nn.Module):
    """3x3 conv blocks, a 2x2 max-pool (images at least 4 wide), then a dense head."""

    def __init__(self, image_shape: tuple[int, int, int], n_outputs: int, params: CNNParams) -> None:
        super().__init__()
        c, h, w = image_shape
        blocks: list[nn.Module] = []
        for width in params.channels:
            blocks += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            c = width
        if min(h, w) >= 4:
            blocks.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c * h * w, params.hidden), nn.ReLU(),
            nn.Dropout(params.dropout), nn.Linear(params.hidden, n_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x))
        return out


class ImageClassifier(TabularNet):
    """Imputation, augmentation (training only), standardization and a :class:`ConvBackbone`."""

    tasks = frozenset({Task.classification})
    preprocess: ImagePreprocessor  # type: ignore[assignment]

    def __init__(self, preprocess: ImagePreprocessor, backbone: ConvBackbone, n_outputs: int,
                 augment: Augment | None) -> None:
        super().__init__(preprocess, backbone, Task.classification, n_outputs)  # type: ignore[arg-type]
        self.image_shape = tuple(int(d) for d in preprocess.median.shape)
        self.augment = augment

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.preprocess.impute(x)
        if self.augment is not None:  # a no-op in eval mode, so absent from the exported graph
            x = self.augment(x)
        out: torch.Tensor = self.backbone(self.preprocess.normalize(x))
        return out

    def layout(self, rows: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(rows, dtype=np.float32).reshape(-1, *self.image_shape))

    def monitored_features(self, rows: np.ndarray) -> np.ndarray:
        # the rule serving applies to the images it is sent: their pixels
        out: np.ndarray = monitored_features(np.asarray(rows), self.image_shape)
        return out

    def io_specs(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        inputs = [TensorSpec(name=INPUT_NAME, dtype="float32", shape=[None, *self.image_shape])]
        outputs = [TensorSpec(name=self.output_name, dtype="float32", shape=[None, self.n_outputs])]
        return inputs, outputs


def image_shape(params: CNNParams, n_features: int) -> tuple[int, int, int]:
    """The ``[channels, height, width]`` the features form (ValueError when they cannot)."""
    if params.image_shape is not None:
        c, h, w = params.image_shape
        if c * h * w != n_features:
            raise ValueError(f"model.image_shape {params.image_shape} holds {c * h * w} pixels, "
                             f"the data has {n_features} features")
        return c, h, w
    side = math.isqrt(n_features)
    if side * side != n_features:
        raise ValueError(f"architecture 'cnn' needs the features to form an image: {n_features} "
                         "features are not a square; set model.image_shape [channels, height, width]")
    return 1, side, side


def build_cnn(params: BaseModel, *, train_features: np.ndarray, task: Task, n_outputs: int,
              train_target: np.ndarray | None = None) -> ImageClassifier:
    assert isinstance(params, CNNParams)
    shape = image_shape(params, train_features.shape[1])
    pre = ImagePreprocessor.fit(np.asarray(train_features).reshape(-1, *shape))
    augment = None
    if params.augment:
        augment = Augment(params.max_shift, params.max_rotation, params.noise * float(pre.scale))
    return ImageClassifier(pre, ConvBackbone(shape, n_outputs, params), n_outputs, augment)


register_architecture(Architecture(
    "cnn", CNNParams, None, "convolutional network for images, with augmentation",
    tasks=frozenset({Task.classification}), build_net=build_cnn))
