"""The training loop, shared by every architecture.

:func:`fit` takes any ``nn.Module`` and a loss ``(outputs, targets) -> scalar`` and trains it with
the optimiser the config names (AdamW by default; Adam, SGD with momentum, RMSprop), weight
decay on weight matrices only, an optional L1 penalty, gradient clipping, a plateau or cosine LR
schedule and early stopping on the validation loss; the weights of the best
epoch are restored at the end. It is seeded and, on CPU, deterministic: the same seed, data and
config give bit-identical weights::

    with seeded(config.seed):
        net = build_model(...)
    result = fit(net, net.loss, (x_train, y_train), (x_val, y_val), config, device=resolve_device("auto"))
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from training.config import TrainingConfig

log = logging.getLogger(__name__)

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
EVAL_BATCH = 8192  # rows per forward pass when computing the validation loss


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says what to change."""


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    train_loss: float
    val_loss: float
    learning_rate: float
    seconds: float


@dataclass
class FitResult:
    """What happened during :func:`fit` (the model itself is trained in place)."""

    best_epoch: int
    best_val_loss: float
    epochs_run: int
    stopped_early: bool
    device: str
    seconds: float
    history: list[EpochStats] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (without the per-epoch history)."""
        return {k: v for k, v in asdict(self).items() if k != "history"}


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device 'cuda' was asked for (MODELLOOP_TRAINING_DEVICE) but no GPU is available")
    return torch.device(device)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Seed torch and use deterministic algorithms inside the block, restoring the caller's RNG
    state and determinism flags afterwards (so training leaves no global side effects)."""
    cuda = device is not None and device.type == "cuda"
    devices = [device.index or 0] if cuda and device is not None else []
    was_det = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        # on CUDA some kernels have no deterministic variant: warn instead of failing there
        torch.use_deterministic_algorithms(True, warn_only=cuda)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was_det, warn_only=was_warn)


@contextlib.contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Let torch use ``n`` intra-op CPU threads inside the block (0: leave torch's default)."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _param_groups(model: nn.Module, weight_decay: float) -> tuple[list[dict[str, Any]], list[nn.Parameter]]:
    # decay (and L1) only on weight matrices: penalising biases and norm scales only hurts
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": rest, "weight_decay": 0.0}], decay


def _optimizer(groups: list[dict[str, Any]], config: TrainingConfig) -> torch.optim.Optimizer:
    """The optimiser ``config.optimizer`` names, over the parameter ``groups``."""
    lr = config.learning_rate
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0)
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=lr)


def balanced_class_weights(y: np.ndarray, n_classes: int) -> torch.Tensor:
    """``rows / (classes * rows of the class)`` per class (scikit-learn's ``balanced``); a class
    absent from ``y`` gets weight 1."""
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 1.0)
    return torch.as_tensor(weights, dtype=torch.float32)


def weighted_cross_entropy(weight: torch.Tensor) -> Loss:
    """Cross-entropy with per-class ``weight`` (moved to the logits' device)."""
    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y, weight=weight.to(out.device))
    return loss


def _mean_loss(model: nn.Module, loss_fn: Loss, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(x), EVAL_BATCH):
            xb, yb = x[start:start + EVAL_BATCH], y[start:start + EVAL_BATCH]
            total += float(loss_fn(model(xb), yb)) * len(xb)
    return total / max(len(x), 1)


def _progress(enabled: bool, console: Console | None) -> Progress:
    return Progress(
        TextColumn("[bold]training[/]"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
        console=console or Console(stderr=True), disable=not enabled,
    )


def _scheduler(opt: torch.optim.Optimizer, config: TrainingConfig) -> Any:
    """The learning-rate schedule ``config.scheduler`` names, or None."""
    if config.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, factor=0.5, patience=max(1, config.patience // 3))
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs)
    return None


def _train_epoch(model: nn.Module, loss_fn: Loss, opt: torch.optim.Optimizer,
                 train: tuple[torch.Tensor, torch.Tensor], order: torch.Tensor,
                 config: TrainingConfig, penalised: list[nn.Parameter]) -> float:
    """One pass over the training rows in ``order``, a step per batch; the mean training loss."""
    x_train, y_train = train
    n = len(x_train)
    model.train()
    total = torch.zeros((), device=x_train.device)  # summed on the device: no sync per batch
    for start in range(0, n, config.batch_size):
        idx = order[start:start + config.batch_size]
        if len(idx) < 2 < n:  # batch norm cannot train on one row; it is reshuffled next epoch
            continue
        loss = loss_fn(model(x_train[idx]), y_train[idx])
        total += loss.detach() * len(idx)
        if config.l1 > 0:
            loss = loss + config.l1 * sum(p.abs().sum() for p in penalised)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
    return float(total) / n


def fit(
    model: nn.Module,
    loss_fn: Loss,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    config: TrainingConfig,
    *,
    device: torch.device | None = None,
    progress: bool = True,
    console: Console | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> FitResult:
    """Train ``model`` in place and restore its best weights (see the module docstring).

    ``on_epoch`` is called after each epoch (e.g. to report to a hyperparameter search, which may
    raise to stop the trial). The model is left on ``device`` in eval mode.
    """
    device = device or torch.device("cpu")
    x_train, y_train = train[0].to(device), train[1].to(device)
    x_val, y_val = val[0].to(device), val[1].to(device)
    model.to(device)
    groups, penalised = _param_groups(model, config.weight_decay)
    opt = _optimizer(groups, config)
    scheduler = _scheduler(opt, config)

    n = len(x_train)
    best_val, best_epoch, best_state = math.inf, 0, copy.deepcopy(model.state_dict())
    history: list[EpochStats] = []
    stopped_early = False
    started = time.perf_counter()
    with seeded(config.weights_seed, device), _progress(progress, console) as bar:
        task = bar.add_task("train", total=config.epochs, status="")
        shuffle = torch.Generator().manual_seed(config.weights_seed)  # batch order, on the CPU
        for epoch in range(1, config.epochs + 1):
            t0 = time.perf_counter()
            order = torch.randperm(n, generator=shuffle).to(device)
            train_loss = _train_epoch(model, loss_fn, opt, (x_train, y_train), order, config,
                                      penalised)
            val_loss = _mean_loss(model, loss_fn, x_val, y_val)
            if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
                raise TrainingError(
                    f"training diverged at epoch {epoch} (train loss {train_loss}, validation "
                    f"loss {val_loss}); lower the learning rate ({config.learning_rate})")
            lr = opt.param_groups[0]["lr"]
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(val_loss)
            elif scheduler is not None:
                scheduler.step()
            if val_loss < best_val:
                best_val, best_epoch = val_loss, epoch
                best_state = copy.deepcopy(model.state_dict())
            stats = EpochStats(epoch, train_loss, val_loss, lr, time.perf_counter() - t0)
            history.append(stats)
            bar.update(task, advance=1, status=(
                f"loss {train_loss:.4f}  val {val_loss:.4f}  best {best_val:.4f}@{best_epoch}"))
            if on_epoch is not None:
                on_epoch(stats)
            if epoch - best_epoch >= config.patience:
                stopped_early = True
                bar.update(task, total=epoch, status=(
                    f"stopped early; best val {best_val:.4f} at epoch {best_epoch}"))
                break
    model.load_state_dict(best_state)
    model.eval()
    result = FitResult(best_epoch, best_val, len(history), stopped_early, str(device),
                       time.perf_counter() - started, history)
    log.info("trained %d epochs on %s in %.1f s%s; best validation loss %.4f at epoch %d",
             result.epochs_run, device, result.seconds,
             " (stopped early)" if stopped_early else "", best_val, best_epoch)
    return result
