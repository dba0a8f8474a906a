"""Model architectures for tabular data, with the preprocessing inside the model.

Every model is a :class:`TabularNet`: a fitted :class:`Preprocessor` (median imputation, then
standardization, held as buffers) followed by a *backbone* from the architecture registry, which
maps ``[batch, n_features]`` standardized features to ``[batch, n_outputs]``. ``forward`` gives
what the loss needs (logits, or the standardized target); ``infer`` gives what serving gets
(probabilities, or the target in its own units), and :class:`InferenceGraph` is the module that
is exported to ONNX, so the graph takes raw float32 features, NaN included.

A new architecture registers a backbone builder and its parameters, and reuses the trainer,
export and registration unchanged::

    register_architecture(Architecture("resnet", ResNetParams, build_resnet, "residual MLP"))

An architecture whose input is not a row of features (an image, a sequence) or whose task is not
a label (anomaly detection) builds its own :class:`TabularNet` subclass (``Architecture.build_net``)
and overrides the hooks the pipeline calls: :meth:`TabularNet.layout` (dataset rows to the model's
input tensor), :meth:`~TabularNet.calibrate` (after training, on the validation rows),
:meth:`~TabularNet.evaluation_set`, :meth:`~TabularNet.evaluate`,
:meth:`~TabularNet.monitored_features` (the per-row features monitoring sees) and
:meth:`~TabularNet.parity_inputs`. The CNN (``training/vision.py``), the GRU/LSTM
(``training/sequence.py``) and the autoencoder (``training/anomaly.py``) do so; they register
themselves when imported, and :func:`get_architecture` imports them on first use.

A user's architecture is a ``torch.nn.Module`` class named ``package.module:Class`` (its
constructor's keyword arguments are the architecture's parameters; ``n_features`` and
``n_outputs``, when it takes them, come from the data), or an installed plugin's name: an entry
point in the group ``modelloop.architectures`` (``wide = "mypkg.nets:Wide"``). A version's config
stores ``package.module:Class`` either way (:func:`architecture_reference`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator
from torch import nn
from torch.nn import functional as F

from modelloop.schemas import INPUT_NAME, PREDICTION, PROBABILITIES, Task, TensorSpec
from training.evaluate import Evaluation, evaluate


class Preprocessor(nn.Module):
    """Median imputation of NaN, then standardization; statistics fitted on training rows.
    Categorical positions (their values' codes, 0 unknown) become one-hot columns instead.

    The statistics are registered buffers, so they are saved with the weights and become
    constants of the exported graph: serving passes raw features and cannot skew. A categorical
    feature's buffer ``lookup_<position>`` maps each dataset code to the model's own code (a
    value rarer than the minimum count in the training rows to 0, the unknown column); its
    one-hot columns follow the numeric ones, so the backbone sees :attr:`out_features` columns::

        pre = Preprocessor.fit(x_train, categorical={2: 4}, min_count=5)  # column 2: 4 values
    """

    median: torch.Tensor
    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, n_features: int,
                 categorical: Mapping[int, Sequence[int]] | None = None) -> None:
        """``categorical``: position -> its lookup (dataset code -> model code, 0 unknown)."""
        super().__init__()
        self.register_buffer("median", torch.zeros(n_features))
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("scale", torch.ones(n_features))
        lookups = dict(sorted((categorical or {}).items()))
        self.categorical = list(lookups)
        self.widths = [max(table) + 1 for table in lookups.values()]
        if lookups:
            numeric = [j for j in range(n_features) if j not in lookups]
            self.register_buffer("numeric", torch.tensor(numeric, dtype=torch.long))
            for j, table in lookups.items():
                self.register_buffer(f"lookup_{j}", torch.tensor(list(table), dtype=torch.long))

    @property
    def out_features(self) -> int:
        """The width the backbone sees: numeric columns, then each categorical one-hot block."""
        return int(self.mean.numel()) - len(self.categorical) + sum(self.widths)

    @classmethod
    def fit(cls, features: np.ndarray, categorical: Mapping[int, int] | None = None,
            min_count: int = 1) -> Preprocessor:
        """Fit on the training rows ``[rows, n_features]`` (NaN = missing). ``categorical``:
        position -> how many values the dataset codes there (1..n); a value seen fewer than
        ``min_count`` times in these rows is coded unknown."""
        x = np.asarray(features, dtype=np.float64)
        observed = ~np.isnan(x)
        # a column can be all-missing in the training rows even though the file had values
        median = np.array([np.median(col[ok]) if ok.any() else 0.0
                           for col, ok in zip(x.T, observed.T, strict=True)])
        filled = np.where(observed, x, median)
        mean, std = filled.mean(axis=0), filled.std(axis=0)
        std = np.where(std > 1e-12, std, 1.0)  # a constant column passes through centred
        lookups: dict[int, list[int]] = {}
        for j, n_values in (categorical or {}).items():
            codes = np.clip(np.nan_to_num(x[:, j]), 0, n_values).astype(np.int64)
            counts = np.bincount(codes, minlength=n_values + 1)
            kept = [v for v in range(1, n_values + 1) if counts[v] >= min_count]
            table = [0] * (n_values + 1)
            for rank, v in enumerate(kept, start=1):
                table[v] = rank
            lookups[j] = table
            median[j], mean[j], std[j] = 0.0, 0.0, 1.0  # unused: the column is one-hot
        pre = cls(x.shape[1], lookups)
        for name, value in (("median", median), ("mean", mean), ("scale", std)):
            getattr(pre, name).copy_(torch.as_tensor(value, dtype=torch.float32))
        return pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.categorical:
            x = torch.where(torch.isnan(x), self.median, x)
            return (x - self.mean) / self.scale
        numeric = self.get_buffer("numeric")
        num = x.index_select(1, numeric)
        num = torch.where(torch.isnan(num), self.median[numeric], num)
        parts = [(num - self.mean[numeric]) / self.scale[numeric]]
        for j, width in zip(self.categorical, self.widths, strict=True):
            lookup = self.get_buffer(f"lookup_{j}")
            code = torch.nan_to_num(x[:, j], nan=0.0).clamp(0, lookup.numel() - 1).long()
            kept = lookup[code]
            parts.append((kept.unsqueeze(1) == torch.arange(width, device=x.device)).to(x.dtype))
        return torch.cat(parts, dim=1)


class TabularNet(nn.Module):
    """Preprocessing, a backbone and the task's output head (see the module docstring)."""

    target_mean: torch.Tensor
    target_scale: torch.Tensor
    tasks: frozenset[Task] = frozenset({Task.classification, Task.regression})
    frozen: tuple[str, ...] = ()
    """Submodules fine-tuning keeps fixed (``training/transfer.py``): no gradient, and eval mode
    even while training, so their batch-norm statistics stay the parent's."""

    def __init__(
        self,
        preprocess: Preprocessor,
        backbone: nn.Module,
        task: Task,
        n_outputs: int,
        target_mean: float = 0.0,
        target_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if task not in self.tasks:
            raise ValueError(f"{type(self).__name__} supports "
                             f"{', '.join(sorted(t.value for t in self.tasks))}, not {task.value}")
        self.preprocess = preprocess
        self.backbone = backbone
        self.task = task
        self.n_outputs = n_outputs
        # a regressor learns the standardized target; infer() maps back to the target's units
        self.register_buffer("target_mean", torch.tensor(float(target_mean)))
        self.register_buffer("target_scale", torch.tensor(float(target_scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Training outputs: logits, or the standardized target."""
        out: torch.Tensor = self.backbone(self.preprocess(x))
        return out

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Serving outputs: class probabilities, or the prediction in the target's units."""
        out = self(x)
        if self.task is Task.classification:
            return torch.softmax(out, dim=-1)
        return out * self.target_scale + self.target_mean

    def encode_target(self, y: np.ndarray) -> torch.Tensor:
        """The target as :meth:`loss` wants it."""
        if self.task is Task.classification:
            return torch.as_tensor(y, dtype=torch.long)
        scaled = (np.asarray(y, dtype=np.float64) - float(self.target_mean)) / float(self.target_scale)
        return torch.as_tensor(scaled, dtype=torch.float32).reshape(-1, 1)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.task is Task.classification:
            return F.cross_entropy(out, y)
        return F.mse_loss(out, y)

    @property
    def output_name(self) -> str:
        return PROBABILITIES if self.task is Task.classification else PREDICTION

    def train(self, mode: bool = True) -> TabularNet:
        super().train(mode)
        for name in self.frozen:
            self.get_submodule(name).eval()
        return self

    # -- hooks of the pipeline (defaults: a row of features in, a label or value out) ----------
    def layout(self, rows: np.ndarray) -> np.ndarray:
        """Dataset rows as this model's input tensor (an image model reshapes them)."""
        return rows

    def calibrate(self, x_val: np.ndarray, y_val: np.ndarray) -> None:
        """Fit what training does not (e.g. an anomaly threshold) on validation inputs."""

    def evaluation_set(self, x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """The inputs and targets the test metrics are measured on (the test split)."""
        return x, y

    def evaluate(self, y: np.ndarray, outputs: np.ndarray, class_labels: list[str] | None) -> Evaluation:
        """Test metrics from the exported model's outputs."""
        return evaluate(self.task, y, outputs, class_labels)

    def monitored_features(self, rows: np.ndarray) -> np.ndarray:
        """``[rows, n_features]`` values monitoring sees per predicted row (the reference
        sample's feature columns): the raw features themselves for tabular and image models."""
        return rows

    def parity_inputs(self, x: np.ndarray) -> Sequence[np.ndarray]:
        """Held-out inputs the export parity check runs on (a sequence model adds other
        lengths)."""
        return [x]

    def io_specs(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """The ONNX inputs and outputs, as the conventions of ``modelloop.schemas`` say."""
        n_features = int(self.preprocess.mean.numel())
        inputs = [TensorSpec(name=INPUT_NAME, dtype="float32", shape=[None, n_features])]
        outputs = [TensorSpec(name=self.output_name, dtype="float32", shape=[None, self.n_outputs])]
        return inputs, outputs


class InferenceGraph(nn.Module):
    """The exported module: raw features in, serving outputs out (``TabularNet.infer``)."""

    def __init__(self, net: TabularNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.infer(x)


# -- architectures -------------------------------------------------------------------------------
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh,
}


class MLPParams(BaseModel):
    """Parameters of the ``mlp`` architecture."""

    model_config = ConfigDict(extra="forbid")

    hidden: list[PositiveInt] = Field(default_factory=lambda: [64, 32])
    """Width of each hidden layer."""
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    """Dropout after each hidden layer's activation."""
    batch_norm: bool = True
    """Batch normalisation before each activation."""
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"


class MLP(nn.Module):
    """Linear -> [BatchNorm] -> activation -> [Dropout], per hidden layer, then a linear head."""

    def __init__(self, n_features: int, n_outputs: int, params: MLPParams) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for h in params.hidden:
            layers.append(nn.Linear(width, h))
            if params.batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(ACTIVATIONS[params.activation]())
            if params.dropout > 0:
                layers.append(nn.Dropout(params.dropout))
            width = h
        layers.append(nn.Linear(width, n_outputs))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out


NetBuilder = Callable[..., TabularNet]
"""``(params, *, train_features, task, n_outputs, train_target) -> TabularNet``."""


@dataclass(frozen=True)
class Architecture:
    """A named backbone: its parameter model and a builder ``(params, n_features, n_outputs)``,
    or a ``build_net`` that builds the whole model (its own preprocessing and hooks)."""

    name: str
    params: type[BaseModel]
    build: Callable[[BaseModel, int, int], nn.Module] | None
    description: str
    tasks: frozenset[Task] = frozenset({Task.classification, Task.regression})
    build_net: NetBuilder | None = None
    data: Literal["tabular", "sequence"] = "tabular"
    """The dataset layout it trains on: rows ``[rows, features]`` or ``[rows, time, features]``."""


ARCHITECTURES: dict[str, Architecture] = {}
# modules defining more architectures; they register on import (see the module docstring)
BUILTIN_ARCHITECTURE_MODULES = ("training.vision", "training.sequence", "training.anomaly")


def register_architecture(arch: Architecture) -> Architecture:
    ARCHITECTURES[arch.name] = arch
    return arch


def _build_mlp(params: BaseModel, n_features: int, n_outputs: int) -> nn.Module:
    assert isinstance(params, MLPParams)
    return MLP(n_features, n_outputs, params)


register_architecture(Architecture("mlp", MLPParams, _build_mlp, "multi-layer perceptron"))


def architecture_names() -> list[str]:
    """Every known architecture (imports the built-in architecture modules)."""
    for module in BUILTIN_ARCHITECTURE_MODULES:
        importlib.import_module(module)
    return sorted(ARCHITECTURES)


class ImportedParams(BaseModel):
    """The constructor keyword arguments of an imported architecture (any JSON values)."""

    model_config = ConfigDict(extra="allow")


class ImportedBackbone(nn.Module):
    """A user's module as a backbone (``training/byo.py``): ``[batch, n_features]`` in; a 1-D
    output (a regressor's ``[batch]``) becomes ``[batch, 1]``, as the head expects."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.module(x)
        return out.unsqueeze(-1) if out.ndim == 1 else out


ENTRY_POINT_GROUP = "modelloop.architectures"
"""Installed packages add architectures here, named ``package.module:Class``."""


def plugin_architectures() -> dict[str, str]:
    """Installed plugins' architectures: entry-point name -> ``package.module:Class``."""
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def architecture_reference(name: str) -> str:
    """What a version's config stores for ``--model name``: a built-in's name, or
    ``package.module:Class`` (an installed plugin's resolved), so a retraining job imports the
    class itself whatever the plugin is called where it runs."""
    if ":" in name or name in architecture_names():
        return name
    return plugin_architectures().get(name, name)


def import_architecture(ref: str) -> Architecture:
    """The architecture ``package.module:Class``: ``Class(**params)`` is the backbone, with
    modelloop's preprocessing and head around it (``n_features`` and ``n_outputs`` are passed
    when the constructor takes them and the params do not say them). ValueError when it cannot
    be imported."""
    module_name, _, qualname = ref.partition(":")
    try:
        target: object = importlib.import_module(module_name)
        for part in qualname.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"architecture {ref!r} cannot be imported: {type(exc).__name__}: "
                         f"{exc}") from None
    cls = target
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"architecture {ref!r} is not a torch.nn.Module class")
    accepted = inspect.signature(cls).parameters
    any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())

    class Params(ImportedParams):
        @model_validator(mode="after")
        def _taken(self) -> Params:
            unknown = sorted(set(self.model_extra or {}) - set(accepted))
            if unknown and not any_keyword:
                raise ValueError(f"{ref} takes no parameter {', '.join(unknown)} (it takes "
                                 f"{', '.join(accepted) or 'none'})")
            return self

    def build(params: BaseModel, n_features: int, n_outputs: int) -> nn.Module:
        kwargs = params.model_dump()
        for key, value in (("n_features", n_features), ("n_outputs", n_outputs)):
            if key in accepted and key not in kwargs:
                kwargs[key] = value
        return ImportedBackbone(cls(**kwargs))

    return Architecture(ref, Params, build, f"imported {ref}")


def get_architecture(name: str) -> Architecture:
    """A built-in architecture, a ``package.module:Class`` or an installed plugin's, by name;
    ValueError naming the known ones when there is none."""
    if ":" in name and name not in ARCHITECTURES:  # package.module:Class, imported each time
        return import_architecture(name)
    if name not in ARCHITECTURES:
        architecture_names()
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    plugins = plugin_architectures()
    if name in plugins:
        return import_architecture(plugins[name])
    known = ", ".join([*sorted(ARCHITECTURES), *sorted(plugins)])
    raise ValueError(f"unknown architecture {name!r} (known: {known}; or package.module:Class)")


def build_model(
    architecture: str,
    params: BaseModel,
    *,
    train_features: np.ndarray,
    task: Task,
    n_outputs: int,
    train_target: np.ndarray | None = None,
    categorical: Mapping[int, int] | None = None,
    min_category_count: int = 1,
) -> TabularNet:
    """A fresh model whose preprocessing (and, for regression, target scaling) is fitted on the
    training rows. Seed the RNG first for reproducible initial weights. ``categorical``:
    position -> number of values coded there (:meth:`Preprocessor.fit`); only architectures with
    a plain backbone (``mlp``, imported modules) take categorical features."""
    arch = get_architecture(architecture)
    if task not in arch.tasks:
        raise ValueError(f"architecture {architecture!r} does not support {task.value}")
    if categorical and arch.build is None:
        raise ValueError(f"architecture {architecture!r} does not take categorical features; "
                         "use mlp")
    if arch.build_net is not None:
        return arch.build_net(params, train_features=train_features, task=task,
                              n_outputs=n_outputs, train_target=train_target)
    assert arch.build is not None, f"architecture {architecture!r} has no builder"
    pre = Preprocessor.fit(train_features, categorical, min_category_count)
    backbone = arch.build(params, pre.out_features, n_outputs)
    mean, scale = 0.0, 1.0
    if task is Task.regression and train_target is not None:
        mean = float(np.mean(train_target))
        scale = float(np.std(train_target)) or 1.0
    return TabularNet(pre, backbone, task, n_outputs, mean, scale)
