"""Settings of the training process (env prefix ``MODELLOOP_TRAINING_``).

Build them once in the entry point (the CLI, a retraining job) and pass them down::

    settings = TrainingSettings()                 # reads MODELLOOP_TRAINING_* and MODELLOOP_HOME
    config = TrainingConfig.from_settings(settings, epochs=20)

The hyperparameter fields are the *defaults* of a :class:`training.config.TrainingConfig`; the
config actually used is stored with each registered version, so a retraining job trains with the
champion's config, not with whatever these defaults are at that time.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal, get_args

from pydantic import (
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    SecretStr,
)
from pydantic_settings import SettingsConfigDict

from modelloop.settings import HomeSettings

Device = Literal["auto", "cpu", "cuda"]
Scheduler = Literal["plateau", "cosine", "none"]
Optimizer = Literal["adamw", "adam", "sgd", "rmsprop"]
ClassWeight = Literal["none", "balanced"]
ClassifierGateMetric = Literal["accuracy", "f1", "roc_auc", "pr_auc"]
GateMetric = Literal["accuracy", "f1", "roc_auc", "pr_auc", "r2"]
"""What the champion/challenger gate judges by: a classifier's accuracy, macro F1, ROC-AUC or
PR-AUC (``training.evaluate``), a regressor's r2."""
GateMetricChoice = StrEnum("GateMetricChoice", {m: m for m in get_args(GateMetric)})  # type: ignore[misc]
"""The CLI's choices of ``--gate-metric`` and ``--metric``."""


class TrainingSettings(HomeSettings):
    """Settings of ``modelloop train`` and of every job that trains a model."""

    model_config = SettingsConfigDict(
        env_prefix="MODELLOOP_TRAINING_", extra="ignore", populate_by_name=True,
        use_attribute_docstrings=True,
    )

    # -- export check --------------------------------------------------------------------------
    parity_tolerance: NonNegativeFloat = 1e-4
    """Largest absolute difference allowed between an ONNX Runtime output and the PyTorch output
    for the same rows; any larger difference fails the export with a ``ParityError``."""

    parity_batch_sizes: list[PositiveInt] = Field(default_factory=lambda: [1, 7, 4096], min_length=1)
    """Batch sizes at which the exported model is run against PyTorch (held-out rows are tiled
    to fill the largest)."""

    parity_rows: PositiveInt = 512
    """At most this many held-out rows are checked one by one (batch size 1) and in small
    batches; enough to catch a bad export without making large data slow."""

    # -- int8 quantization (`modelloop quantize`) ----------------------------------------------
    quantize_max_loss: NonNegativeFloat = 0.01
    """Largest drop of the primary test metric (accuracy for classifiers, R² for regressors,
    ROC-AUC for anomaly detectors) an int8 version may show against its fp32 source and still
    be promotable, as a fraction: 0.01 is one point."""

    # -- pruning (`modelloop prune`) -----------------------------------------------------------
    prune_max_loss: NonNegativeFloat = 0.01
    """Largest drop of the primary test metric a pruned version may show against its parent
    and still be promotable, as a fraction: 0.01 is one point."""

    # -- ensembles (`modelloop ensemble`) ------------------------------------------------------
    ensemble_margin: float = Field(default=0.0, ge=-1.0, le=1.0)
    """How much an ensemble's test accuracy must exceed its best member's to be promotable, as a
    fraction: 0.0 (the default) means at least a tie, 0.01 one point more."""

    # -- defaults of the training config -------------------------------------------------------
    clean: bool = True
    """Remove exact duplicate rows (features and target) from a table before the split, the
    first of each kept (``modelloop train --no-clean`` keeps them). The data report counts them
    either way, with conflicting labels, constant columns, missing values and outliers."""

    epochs: PositiveInt = 150
    """Maximum number of passes over the training split (early stopping usually ends sooner)."""

    batch_size: PositiveInt = 32
    """Rows per optimisation step."""

    optimizer: Optimizer = "adamw"
    """``adamw`` (Adam with decoupled weight decay), ``adam`` (weight decay as an L2 term in the
    gradient), ``sgd`` (with ``momentum``, Nesterov's with ``nesterov``) or ``rmsprop`` (with
    ``momentum``)."""

    momentum: float = Field(default=0.9, ge=0, lt=1)
    """Momentum of ``sgd`` and ``rmsprop``."""

    nesterov: bool = False
    """Nesterov momentum for ``sgd``."""

    learning_rate: PositiveFloat = 1e-3
    """The optimiser's initial learning rate."""

    weight_decay: NonNegativeFloat = 1e-4
    """Weight decay (L2), applied to weight matrices, not to biases or norms (decoupled with
    ``adamw``)."""

    class_weight: ClassWeight = "none"
    """Weights of the classes in a classifier's loss: ``none``, or ``balanced`` (each class
    weighs ``rows / (classes * its rows)`` in the training split, so a rare class counts as much
    as a common one)."""

    l1: NonNegativeFloat = 0.0
    """L1 penalty on the weight matrices added to the loss (0 disables it)."""

    patience: PositiveInt = 15
    """Epochs without a better validation loss before training stops; the best weights are
    restored."""

    scheduler: Scheduler = "plateau"
    """Learning-rate schedule: ``plateau`` halves it when the validation loss stalls, ``cosine``
    anneals it to zero over ``epochs``, ``none`` keeps it constant."""

    grad_clip: NonNegativeFloat = 1.0
    """Largest gradient norm per step (0 disables clipping)."""

    seed: NonNegativeInt = 0
    """Seed of the split, the weight initialisation, dropout and batch order. On CPU the same
    seed gives bit-identical weights."""

    val_fraction: float = Field(default=0.15, gt=0, lt=0.5)
    """Share of rows held out for early stopping and the LR schedule."""

    test_fraction: float = Field(default=0.2, gt=0, lt=0.5)
    """Share of rows held out for the metrics stored with the version."""

    # -- process -------------------------------------------------------------------------------
    device: Device = "auto"
    """Where to train: ``auto`` uses CUDA when available, else the CPU. Export always runs on
    the CPU."""

    threads: NonNegativeInt = 1
    """CPU threads for PyTorch and ONNX Runtime while training and checking a model (0: their
    defaults, one per core). Small tabular models are fastest on one thread: hand-offs between
    threads cost more than they save, and under CPU contention they cost ten times more."""

    reference_rows: PositiveInt = 2000
    """At most this many training rows (features, labels, predictions) are stored with each
    version as the reference that drift is measured against."""

    progress: bool = True
    """Show a progress bar while training (on stderr)."""

    # -- the retraining job (`modelloop retrain`) -------------------------------------------------
    sidecar_url: str = "http://127.0.0.1:8001"
    """Where the retraining job fetches labelled production data (the sidecar's
    ``/export/labelled``)."""

    sidecar_key: SecretStr | None = None
    """The sidecar's admin key, sent to ``/export/labelled`` (the sidecar sets it, with
    ``sidecar_url``, in the environment of every job it starts)."""

    retrain_window_s: NonNegativeFloat = 7 * 24 * 3600
    """Only production rows labelled within this many seconds count (0: all)."""

    retrain_max_rows: PositiveInt = 100_000
    """At most this many labelled production rows are fetched."""

    retrain_min_rows: PositiveInt = 200
    """Fewer labelled production rows than this and the job refuses to train (exit 2)."""

    retrain_min_class_share: NonNegativeFloat = 0.02
    """Each class must be at least this share of the labelled production rows."""

    retrain_holdout_fraction: float = Field(default=0.3, gt=0, lt=1)
    """The most recent share of labelled production rows: both champion and challenger are
    judged on it, and the challenger never trains on it."""

    retrain_detect_change: bool = True
    """Look for a change in the champion's errors over the labelled rows (CUSUM at 1%): after one,
    the challenger trains on the rows after it, the holdout is a random share of those, and older
    production rows and the original data are kept in proportion to how little the concept moved
    (none when the champion became no better than chance)."""

    retrain_min_segment: PositiveInt = 50
    """Rows at least on each side of a change point."""

    retrain_original_ratio: NonNegativeFloat = 1.0
    """Original training rows kept per production training row (the rest are sampled away), so
    new data is not drowned by old."""

    retrain_fine_tune: bool = True
    """The challenger starts from the champion's weights (fine-tuning, ``training.transfer``)
    when the champion stored them; off: it trains from scratch with the champion's config."""

    retrain_metric: ClassifierGateMetric = "accuracy"
    """Metric of the champion/challenger gate for classifiers (``accuracy``, ``f1`` (macro),
    ``roc_auc``, ``pr_auc``); regressors use ``r2``. A version stores its own
    (``modelloop train --gate-metric``, this by default) and the gate judges by the champion's;
    this is the fallback for versions that stored none."""

    retrain_margin: NonNegativeFloat = 0.01
    """The challenger is promoted only when its metric beats the champion's by at least this."""

    retrain_max_original_drop: NonNegativeFloat = 0.05
    """The challenger's metric on the trusted rows of the original training data (the test split
    of the line's first training, which no version trains on) may be at most this much below the
    champion's, or it is held for review (registered, not promoted). Those labels come from
    whoever built the model, not from feedback: production labels that
    contradict them (a concept shift, or labels sent to poison retraining) need a person's
    ``modelloop models promote``. 1 promotes on the production holdout alone."""

    retrain_live_gate: bool = False
    """A challenger that passes the gate is named ``challenger`` instead of promoted: serving
    scores a copy of live traffic with it (shadow) and the sidecar promotes it only when it beats
    the champion on the same live labelled requests, with significance (monitoring/live_gate.py),
    or retires it."""

    retrain_latency_tolerance: NonNegativeFloat = 0.5
    """The challenger may be at most this much slower (single-row median ONNX Runtime call) than
    the champion; 0.5 allows 1.5x, room for a noisy machine."""
