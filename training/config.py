"""The training configuration: everything needed to train the same model again on new data.

It is stored whole in each version's ``ModelMetadata.config``; a retraining job rebuilds it with
``TrainingConfig.model_validate(champion.config)`` and trains a challenger with it. Defaults come
from :class:`training.settings.TrainingSettings`::

    config = TrainingConfig.from_settings(settings, epochs=30, model={"hidden": [128, 64]})
"""

from __future__ import annotations

from typing import Any, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    field_validator,
)

from modelloop.schemas import Task
from training.settings import (
    ClassifierGateMetric,
    ClassWeight,
    GateMetric,
    Optimizer,
    Scheduler,
    TrainingSettings,
)


class TrainingConfig(BaseModel):
    """How to train one model: data columns, architecture, optimiser, schedule, split, seed."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    target: str = "target"
    """The target column (``target`` for the built-in datasets)."""
    task: Task | None = None
    """``classification`` or ``regression``; None infers it from the target column. The stored
    config always holds the task that was used."""
    architecture: str = "mlp"
    """A name from ``training.models.ARCHITECTURES``, or ``package.module:Class`` (an installed
    plugin's name is stored as the ``package.module:Class`` it names)."""
    model: dict[str, Any] = Field(default_factory=dict)
    """The architecture's parameters (for ``mlp``: hidden, dropout, batch_norm, activation);
    missing ones take the architecture's defaults, and the stored config lists them all."""
    clean: bool = False
    """Whether exact duplicate rows were removed from the table before the split (a config
    stored before cleaning existed reads as not cleaned, so its data reloads as it was)."""
    categorical: list[str] = Field(default_factory=list)
    """Columns of integers to treat as categories (``--categorical``); columns of text always are."""
    min_category_count: PositiveInt = 5
    """A categorical value seen fewer times in the training split is coded unknown (0) by the
    model (``--min-category-count``)."""
    epochs: PositiveInt
    batch_size: PositiveInt
    optimizer: Optimizer = "adamw"
    momentum: float = Field(default=0.9, ge=0, lt=1)
    nesterov: bool = False
    class_weight: ClassWeight = "none"
    learning_rate: float = Field(gt=0)
    weight_decay: NonNegativeFloat
    l1: NonNegativeFloat
    patience: PositiveInt
    scheduler: Scheduler
    grad_clip: NonNegativeFloat
    seed: NonNegativeInt
    init_seed: NonNegativeInt | None = None
    """Seed of the weight initialisation, dropout and batch order when it differs from ``seed``
    (which also seeds the split): the members of ``modelloop train --ensemble K`` share one
    split and differ by this."""
    val_fraction: float = Field(gt=0, lt=0.5)
    test_fraction: float = Field(gt=0, lt=0.5)
    gate_metric: GateMetric | None = None
    """What the champion/challenger gate judges this model line by (``--gate-metric``): a
    classifier's ``accuracy``, ``f1`` (macro), ``roc_auc`` or ``pr_auc``, a regressor's ``r2``.
    None takes ``retrain_metric`` (classifiers) or r2 when the model trains, so the stored config
    always names one; a config stored before the field existed reads None, and the gate then
    uses the setting."""

    @field_validator("architecture")
    @classmethod
    def _plugin_as_reference(cls, name: str) -> str:
        from training.models import architecture_reference  # torch: only once a config is made

        return architecture_reference(name)

    @property
    def weights_seed(self) -> int:
        """The seed of the weights, dropout and batch order (``init_seed``, else ``seed``)."""
        return self.seed if self.init_seed is None else self.init_seed

    @classmethod
    def from_settings(cls, settings: TrainingSettings, **overrides: Any) -> TrainingConfig:
        """The default config of ``settings`` with ``overrides`` (None values are ignored)."""
        fields = {
            name: getattr(settings, name)
            for name in cls.model_fields
            if name in TrainingSettings.model_fields
        }
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(fields)


def resolve_gate_metric(chosen: str | None, task: Task, default: str) -> str | None:
    """The gate metric a model of ``task`` stores: ``chosen`` (``--gate-metric``), else
    ``default`` (``retrain_metric``) for a classifier and r2 for a regressor; None for an
    anomaly detector (no champion/challenger gate). ValueError for a metric of the other task
    ("pr_auc is not a regression metric; choose r2")."""
    if task is Task.anomaly:
        return None
    allowed: tuple[str, ...] = (get_args(ClassifierGateMetric)
                                if task is Task.classification else ("r2",))
    metric = chosen or (default if task is Task.classification else "r2")
    if metric not in allowed:
        raise ValueError(f"{metric} is not a {task.value} metric; choose {' or '.join(allowed)}")
    return metric
