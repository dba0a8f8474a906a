"""Hyperparameter search: Optuna trials over a :class:`TrainingConfig`, then the best one registered.

Each trial trains with :func:`training.pipeline.fit_model` on the same split and reports its
running best **validation loss** per epoch (the loss the model trains on, measured on the
validation split: cross-entropy for a classifier, MSE of the standardized target for a regressor,
reconstruction error for an autoencoder; lower is better). That is the objective: the test split
is never looked at while searching. A median pruner stops trials whose loss lags the completed
trials' at the same epoch. The study lives in SQLite under ``$MODELLOOP_HOME/studies/<study>/``,
so running the same search again resumes it::

    ds = load_data("breast_cancer")
    base = TrainingConfig.from_settings(settings, epochs=20)
    result = search(ds, name="cancer", base=base, settings=settings, sampler="bayes", trials=30)
    meta = register_best(result, ds, settings=settings, registry=registry, promote=True)

A search space maps parameter names to a range or a list of choices (:class:`ParamSpec`); names
are config fields (``learning_rate``, ``batch_size``, ...), architecture parameters
(``model.dropout``) or, for a list of widths, ``model.hidden.depth`` and ``model.hidden.width``
(``depth`` layers of ``width`` units). :func:`default_space` gives one per architecture.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import multiprocessing
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import optuna
import yaml
from filelock import FileLock, Timeout
from optuna.trial import FrozenTrial, TrialState
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from rich.console import Console

from modelloop.registry import Registry
from modelloop.schemas import ModelMetadata
from training.config import TrainingConfig
from training.data import TabularDataset
from training.models import get_architecture
from training.pipeline import TrainOptions, fit_model, register_trained, train_model
from training.settings import TrainingSettings
from training.trainer import EpochStats, TrainingError, cpu_threads

log = logging.getLogger(__name__)

SamplerName = Literal["grid", "random", "bayes"]
SAMPLERS: tuple[SamplerName, ...] = ("grid", "random", "bayes")
OBJECTIVE = "validation_loss"
"""What a trial's value is: the best epoch's loss on the validation split (minimised)."""
TRIALS_ARTIFACT = "tune_trials.json"
PRUNE_STARTUP_TRIALS = 3
"""Completed trials before the pruner may stop one (too few and it prunes on noise)."""
TUNABLE_FIELDS = ("learning_rate", "weight_decay", "l1", "batch_size", "scheduler", "grad_clip",
                  "patience", "optimizer", "momentum", "nesterov", "class_weight")
"""Config fields a space may search; epochs, seed and the split stay fixed so that trials are
comparable."""
_LIST_PARTS = ("depth", "width")
_STUDY_ATTRS = ("objective", "architecture", "dataset", "data_fingerprint", "base_config", "space")
# trials that use up the budget; a failed trial counts only if it diverged (or this run started
# it): one interrupted by a kill or Ctrl-C in an earlier run is tried again
_COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


class SpaceError(ValueError):
    """A search space is unusable; the one-line message names the parameter and the problem."""


class TuneError(RuntimeError):
    """A search cannot go on or gave nothing to register; the message says why."""


class InvalidTrial(ValueError):
    """A trial drew values the config or architecture rejects together; it fails, the search
    goes on."""


class StudyConflict(TuneError):
    """The study on disk belongs to another search (other data, config or space) or is busy."""


# -- the search space (pure) ---------------------------------------------------------------------
class ParamSpec(BaseModel):
    """One searched parameter: a ``float`` or ``int`` range, or ``categorical`` choices.

    In grid search a range becomes ``points`` values from ``low`` to ``high`` inclusive,
    log-spaced when ``log`` (an int range with at most ``points`` values keeps them all)::

        ParamSpec(type="float", low=1e-4, high=1e-2, log=True)   # grid: 1e-4, 1e-3, 1e-2
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None
    """Values a categorical parameter takes (a list of widths for ``model.hidden``)."""
    points: int = Field(default=3, ge=2)
    """Values a range takes in grid search."""

    def grid(self) -> list[Any]:
        """The discrete values grid search tries."""
        if self.type == "categorical":
            return list(self.choices or [])
        assert self.low is not None and self.high is not None
        spaced = np.geomspace if self.log else np.linspace
        if self.type == "int":
            low, high = int(self.low), int(self.high)
            if high - low + 1 <= self.points:
                return list(range(low, high + 1))
            return sorted({round(float(v)) for v in spaced(low, high, self.points)})
        return [float(f"{v:.6g}") for v in spaced(self.low, self.high, self.points)]


SearchSpace = dict[str, ParamSpec]
_RawSpace = TypeAdapter(dict[str, ParamSpec])

_COMMON: dict[str, dict[str, Any]] = {
    "learning_rate": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True},
    "weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
    "batch_size": {"type": "categorical", "choices": [16, 32, 64, 128]},
    "scheduler": {"type": "categorical", "choices": ["plateau", "cosine", "none"]},
}
_BY_ARCHITECTURE: dict[str, dict[str, dict[str, Any]]] = {
    "mlp": {
        "model.dropout": {"type": "float", "low": 0.0, "high": 0.5},
        "model.hidden.depth": {"type": "int", "low": 1, "high": 3},
        "model.hidden.width": {"type": "int", "low": 16, "high": 256, "log": True},
    },
    "cnn": {
        "model.channels": {"type": "categorical", "choices": [[8, 16], [16, 32], [32, 64]]},
        "model.hidden": {"type": "categorical", "choices": [32, 64, 128]},
        "model.dropout": {"type": "float", "low": 0.0, "high": 0.5},
    },
    # not dropout: it needs two layers or more, and half the trials would fail
    **{cell: {
        "model.hidden": {"type": "int", "low": 16, "high": 128, "log": True},
        "model.layers": {"type": "int", "low": 1, "high": 2},
    } for cell in ("gru", "lstm")},
    # not the widths: a wider code always reconstructs better, which the validation loss
    # rewards and anomaly detection does not want
    "autoencoder": {"model.dropout": {"type": "float", "low": 0.0, "high": 0.2}},
}


def default_space(base: TrainingConfig) -> SearchSpace:
    """The default space of ``base``'s architecture: learning rate (log), weight decay (log),
    batch size, scheduler and the architecture's own (for ``mlp``: dropout, depth and width)."""
    return validate_space({**_COMMON, **_BY_ARCHITECTURE.get(base.architecture, {})}, base,
                          source="the default space")


def load_space(path: str | Path, base: TrainingConfig) -> SearchSpace:
    """A space from a YAML or JSON file: ``{name: {type, low, high, log, choices, points}}``."""
    try:
        raw = yaml.safe_load(Path(path).read_text())  # YAML is a superset of JSON
    except OSError as exc:
        raise SpaceError(f"{path}: cannot read the space file: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise SpaceError(f"{path}: not YAML or JSON: {str(exc).splitlines()[0]}") from exc
    return validate_space(raw, base, source=str(path))


def validate_space(raw: object, base: TrainingConfig, *, source: str = "space") -> SearchSpace:
    """Check ``raw`` (parsed YAML/JSON) against ``base``'s config and architecture; every
    problem is named in one ``SpaceError`` line."""
    if not isinstance(raw, Mapping) or not raw:
        raise SpaceError(f"{source}: expected a mapping of parameter names to "
                         "{type, low, high, log, choices}")
    try:
        space = _RawSpace.validate_python({str(k): v for k, v in raw.items()})
    except ValidationError as exc:
        raise SpaceError(f"{source}: " + "; ".join(
            f"parameter {str(e['loc'][0])!r}: " + (
                f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" if len(e["loc"]) > 1
                else f"expected {{type, low, high, log, choices, points}}, not {e['input']!r}")
            for e in exc.errors())) from exc
    problems = [f"parameter {name!r}: {problem}"
                for name, spec in space.items() for problem in _problems(name, spec, base)]
    if problems:
        raise SpaceError(f"{source}: " + "; ".join(problems))
    return space


def _model_params(base: TrainingConfig) -> dict[str, Any]:
    """Every architecture parameter of ``base``, defaults filled in."""
    arch = get_architecture(base.architecture)
    return arch.params.model_validate(base.model).model_dump(mode="json")


def _problems(name: str, spec: ParamSpec, base: TrainingConfig) -> list[str]:
    parts = name.split(".")
    problem = _name_problem(name, parts, base) or _spec_problem(spec)
    if problem is None:
        values: list[Any] = (list(spec.choices or ()) if spec.type == "categorical"
                             else [spec.low, spec.high])
        problem = _value_problem(name, parts, spec, values, base)
    return [] if problem is None else [problem]


def _name_problem(name: str, parts: list[str], base: TrainingConfig) -> str | None:
    """Why ``name`` is not a tunable config field or parameter of the architecture, or None."""
    model = _model_params(base)
    if parts[0] == "model" and len(parts) == 3 and parts[2] in _LIST_PARTS:
        if not isinstance(model.get(parts[1]), list):
            return (f"{base.architecture} has no list parameter {parts[1]!r} "
                    f"(lists: {', '.join(k for k, v in model.items() if isinstance(v, list)) or 'none'})")
    elif parts[0] == "model" and len(parts) == 2:
        if parts[1] not in model:
            return (f"{base.architecture} has no parameter {parts[1]!r} "
                    f"(known: {', '.join(sorted(model))})")
    elif name not in TUNABLE_FIELDS:
        return (f"unknown parameter (config fields: {', '.join(TUNABLE_FIELDS)}; architecture "
                "parameters as model.NAME; a list of widths as model.NAME.depth and "
                "model.NAME.width)")
    return None


def _spec_problem(spec: ParamSpec) -> str | None:
    """What is wrong with the choices or the range themselves, or None."""
    if spec.type == "categorical":
        if spec.low is not None or spec.high is not None or spec.log:
            return "a categorical parameter takes choices, not low/high/log"
        if not spec.choices:
            return "categorical needs a non-empty list of choices"
        encoded = [_encode(c) for c in spec.choices]
        if len(set(map(json.dumps, encoded))) < len(encoded):
            return "choices repeat a value"
        return None
    if spec.choices is not None:
        return "a range takes low and high, not choices (or use type categorical)"
    if spec.low is None or spec.high is None:
        return "a range needs low and high"
    if not spec.low < spec.high:
        return f"low ({spec.low:g}) must be below high ({spec.high:g})"
    if spec.log and spec.low <= 0:
        return f"a log range needs low > 0, not {spec.low:g}"
    if spec.type == "int" and not (spec.low.is_integer() and spec.high.is_integer()):
        return f"an int range needs whole low and high, not {spec.low:g} and {spec.high:g}"
    return None


def _value_problem(name: str, parts: list[str], spec: ParamSpec, values: list[Any],
                   base: TrainingConfig) -> str | None:
    """The first of ``values`` (choices, or the range's ends) its field refuses, and why."""
    # each value against its own field; a combination the architecture rejects (GRU dropout
    # with one layer) fails only the trial that draws it
    field_type = _field_type(name, base)
    for value in values:
        value = int(value) if spec.type == "int" else value
        field_value = value
        if parts[-1] == "depth":
            field_value = [1] * value
        elif parts[-1] == "width":
            field_value = [value]
        try:
            field_type.validate_python(field_value)
        except ValidationError as exc:
            return f"value {value!r} is invalid: {exc.errors()[0]['msg']}"
    return None


def _field_type(name: str, base: TrainingConfig) -> TypeAdapter[Any]:
    """A validator of the one field ``name`` sets (its type and bounds, no cross-field
    checks)."""
    parts = name.split(".")
    model: type[BaseModel] = TrainingConfig
    if parts[0] == "model":
        model, parts = get_architecture(base.architecture).params, parts[1:]
    info = model.model_fields[parts[0]]
    kind: Any = info.annotation
    return TypeAdapter(Annotated[kind, *info.metadata] if info.metadata else kind)


def apply_params(base: TrainingConfig, params: Mapping[str, Any]) -> TrainingConfig:
    """``base`` with the searched ``params`` (names as in a space) set; validated."""
    model = _model_params(base)
    fields: dict[str, Any] = {}
    lists: dict[str, dict[str, int]] = {}
    for name, value in params.items():
        parts = name.split(".")
        if parts[0] == "model" and len(parts) == 3:
            lists.setdefault(parts[1], {})[parts[2]] = int(value)
        elif parts[0] == "model":
            model[parts[1]] = value
        else:
            fields[name] = value
    for key, sizes in lists.items():
        current = model[key] or [1]
        model[key] = [sizes.get("width", current[0])] * sizes.get("depth", len(current))
    config = TrainingConfig.model_validate({**base.model_dump(), **fields, "model": model})
    get_architecture(config.architecture).params.model_validate(config.model)
    return config


def space_json(space: SearchSpace) -> dict[str, Any]:
    return {name: spec.model_dump(mode="json", exclude_defaults=True) for name, spec in space.items()}


def grid_size(space: SearchSpace) -> int:
    return math.prod(len(spec.grid()) for spec in space.values())


def _encode(value: Any) -> Any:
    # Optuna stores str, int, float, bool or None; a list choice (widths) is stored as JSON text
    return json.dumps(value) if isinstance(value, list | dict) else value


def suggest(space: SearchSpace, trial: optuna.Trial, *, grid: bool) -> dict[str, Any]:
    """Ask ``trial`` for a value of each parameter (grid search: one of the grid's values)."""
    params: dict[str, Any] = {}
    for name, spec in space.items():
        if grid or spec.type == "categorical":
            values = spec.grid()
            encoded = [_encode(v) for v in values]
            params[name] = values[encoded.index(trial.suggest_categorical(name, encoded))]
        elif spec.type == "float":
            assert spec.low is not None and spec.high is not None
            params[name] = trial.suggest_float(name, spec.low, spec.high, log=spec.log)
        else:
            assert spec.low is not None and spec.high is not None
            params[name] = trial.suggest_int(name, int(spec.low), int(spec.high), log=spec.log)
    return params


# -- trial records (pure) ------------------------------------------------------------------------
@dataclass(frozen=True)
class TrialRecord:
    """One trial as the report shows it."""

    number: int
    state: str
    """``complete``, ``pruned``, ``fail`` or ``running``."""
    value: float | None
    """The best validation loss (a pruned trial: the last it reported)."""
    params: dict[str, Any]
    duration_s: float | None
    epochs: int | None
    """Epochs trained (a pruned trial: until it was stopped)."""
    note: str = ""
    """Why a trial was pruned or failed."""

    @classmethod
    def of(cls, trial: FrozenTrial) -> TrialRecord:
        epochs = max(trial.intermediate_values, default=None)
        note = str(trial.user_attrs.get("error", ""))
        if trial.state is TrialState.PRUNED:
            note = f"pruned at epoch {epochs}"
        return cls(trial.number, trial.state.name.lower(), trial.value, dict(trial.params),
                   trial.duration.total_seconds() if trial.duration else None, epochs, note)


@dataclass
class SearchResult:
    """A finished (or resumed and finished) search: every trial of the study and its best."""

    study: str
    directory: Path
    sampler: SamplerName
    architecture: str
    dataset: str
    space: SearchSpace
    trials: list[TrialRecord]
    ran: int
    """Trials this call ran (the rest came from earlier runs of the same study)."""
    best: TrialRecord | None
    best_config: TrainingConfig | None
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def storage(self) -> Path:
        return self.directory / "study.db"

    def report(self) -> dict[str, Any]:
        """The JSON report: the search, its best trial and every trial."""
        return {
            "study": self.study, "sampler": self.sampler, "architecture": self.architecture,
            "dataset": self.dataset, "objective": OBJECTIVE, "direction": "minimize",
            "space": space_json(self.space), "counts": self.counts,
            "best_trial": self.best.number if self.best else None,
            "best_value": self.best.value if self.best else None,
            "best_config": self.best_config.model_dump(mode="json") if self.best_config else None,
            "trials": [asdict(t) for t in self.trials],
        }

    def report_csv(self) -> str:
        names = list(self.space)
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["number", "state", "value", "duration_s", "epochs", "note",
                         *(f"params.{n}" for n in names)])
        for t in self.trials:
            writer.writerow([t.number, t.state, "" if t.value is None else repr(t.value),
                             "" if t.duration_s is None else f"{t.duration_s:.3f}",
                             "" if t.epochs is None else t.epochs, t.note,
                             *(t.params.get(n, "") for n in names)])
        return out.getvalue()


def study_name(name: str, architecture: str, sampler: SamplerName) -> str:
    return f"{name}-{architecture}-{sampler}"


# -- one trial -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Objective:
    space: SearchSpace
    base: TrainingConfig
    dataset: TabularDataset
    settings: TrainingSettings
    grid: bool

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            config = apply_params(self.base, suggest(self.space, trial, grid=self.grid))
        except ValidationError as exc:  # values valid one by one, not together
            message = "invalid combination: " + "; ".join(e["msg"] for e in exc.errors())
            trial.set_user_attr("error", message)
            raise InvalidTrial(message) from exc
        trial.set_user_attr("config", config.model_dump(mode="json"))
        best = math.inf

        def report(stats: EpochStats) -> None:
            nonlocal best
            best = min(best, stats.val_loss)
            trial.report(best, stats.epoch)
            if stats.epoch < config.epochs and trial.should_prune():  # the last epoch completes
                # fit() lets it through: its seeding, determinism flags and progress bar are
                # restored on the way out (context managers), the trial becomes PRUNED
                raise optuna.TrialPruned(f"validation loss {best:.4g} at epoch {stats.epoch}")

        try:
            fitted = fit_model(self.dataset, config, self.settings, progress=False, on_epoch=report)
        except TrainingError as exc:  # diverged: a failed trial, the search goes on
            trial.set_user_attr("error", str(exc))
            raise
        trial.set_user_attr("config", fitted.config.model_dump(mode="json"))  # task resolved
        return fitted.fit.best_val_loss


# -- the search (effects: the study in SQLite, training) -----------------------------------------
@dataclass(frozen=True)
class _Job:
    """What a search worker (this process or a spawned one) needs; picklable."""

    url: str
    study: str
    sampler: SamplerName
    sampler_seed: int
    space: SearchSpace
    base: TrainingConfig
    dataset: TabularDataset
    settings: TrainingSettings
    budget: int
    first_number: int
    """Trials numbered from here on were started by this run."""
    deadline: float | None
    prune: bool
    threads: int
    optuna_verbosity: int


def _storage(url: str) -> optuna.storages.RDBStorage:
    # several worker processes write one SQLite file: wait for its lock rather than fail
    return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})


def _sampler(kind: SamplerName, space: SearchSpace, seed: int) -> optuna.samplers.BaseSampler:
    if kind == "grid":
        return optuna.samplers.GridSampler(
            {name: [_encode(v) for v in spec.grid()] for name, spec in space.items()}, seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _pruner(prune: bool, base: TrainingConfig) -> optuna.pruners.BasePruner:
    if not prune:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=PRUNE_STARTUP_TRIALS,
                                       n_warmup_steps=max(2, base.epochs // 5))


def _counted(trials: list[FrozenTrial], first_number: int) -> int:
    return sum(1 for t in trials if t.state in _COUNTED or (
        t.state is TrialState.FAIL and ("error" in t.user_attrs or t.number >= first_number)))


def _work(job: _Job, on_trial: Callable[[FrozenTrial], None] | None = None) -> int:
    """Run trials until the study holds ``job.budget`` counted trials, the grid is covered or
    the deadline passed; returns how many this worker ran."""
    optuna.logging.set_verbosity(job.optuna_verbosity)  # a spawned worker starts at INFO
    sampler = _sampler(job.sampler, job.space, job.sampler_seed)
    study = optuna.load_study(study_name=job.study, storage=_storage(job.url), sampler=sampler,
                              pruner=_pruner(job.prune, job.base))
    objective = _Objective(job.space, job.base, job.dataset, job.settings, job.sampler == "grid")
    callbacks = [lambda _, t: on_trial(t)] if on_trial is not None else []
    # A worker claims its next trial under a lock shared by the workers, held from the budget
    # check until Optuna has created the trial (the objective's first step releases it): a check
    # then an ask in each worker could start up to jobs - 1 trials over the budget.
    slots = FileLock(job.url.removeprefix("sqlite:///") + ".slots.lock")
    ran = 0
    with cpu_threads(job.threads):
        while True:
            slots.acquire()
            held = [True]

            def claimed(trial: optuna.Trial, held: list[bool] = held) -> float:
                slots.release()  # the trial is RUNNING in the study now: others count it
                held[0] = False
                return objective(trial)

            try:
                trials = study.get_trials(deepcopy=False)
                started = sum(1 for t in trials if t.state is TrialState.RUNNING
                              and t.number >= job.first_number)
                if (_counted(trials, job.first_number) + started >= job.budget
                        or (job.deadline is not None and time.time() >= job.deadline)
                        or (isinstance(sampler, optuna.samplers.GridSampler)
                            and sampler.is_exhausted(study))):
                    break
                study.optimize(claimed, n_trials=1, catch=(TrainingError, InvalidTrial),
                               callbacks=callbacks)
                ran += 1
            finally:
                if held[0]:
                    slots.release()
    return ran


def _work_in_processes(job: _Job, jobs: int, on_trial: Callable[[FrozenTrial], None],
                       study: optuna.Study) -> int:
    # processes, not threads: torch's RNG and determinism flags are per process, so each trial
    # stays reproducible, and the GIL does not serialise the small models' Python work
    seeds = np.random.SeedSequence([job.sampler_seed, job.first_number]).generate_state(jobs)
    workers = [replace(job, threads=1, sampler_seed=job.sampler_seed if job.sampler == "grid"
                       else int(seeds[i])) for i in range(jobs)]
    seen = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    context = multiprocessing.get_context("spawn")  # fork and torch's thread pools do not mix
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = [pool.submit(_work, w) for w in workers]
        pending = set(futures)
        while pending:
            _, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for t in study.get_trials(deepcopy=False):
                if t.state.is_finished() and t.number not in seen:
                    seen.add(t.number)
                    on_trial(t)
        return sum(f.result() for f in futures)  # a worker's exception is raised here


@contextlib.contextmanager
def _locked(directory: Path, study: str) -> Iterator[None]:
    lock = FileLock(directory / ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout as exc:
        raise StudyConflict(f"study {study!r} is being run by another process "
                            f"(lock {directory / '.lock'})") from exc
    try:
        yield
    finally:
        lock.release()


def _check_study(study: optuna.Study, attrs: dict[str, Any], directory: Path) -> None:
    """A new study records what it searches; a resumed one must search the same thing."""
    stored = study.user_attrs
    if not stored:
        for key, value in attrs.items():
            study.set_user_attr(key, value)
        return
    differ = [k for k in _STUDY_ATTRS if stored.get(k) != attrs[k]]
    if differ:
        raise StudyConflict(
            f"study {study.study_name!r} ({directory}) was started with a different "
            f"{', '.join(d.replace('_', ' ') for d in differ)}; rerun it with the same options to "
            "resume it, or give another --name")


def search(
    ds: TabularDataset,
    *,
    name: str,
    base: TrainingConfig,
    settings: TrainingSettings,
    sampler: SamplerName = "bayes",
    trials: int = 20,
    jobs: int = 1,
    timeout_s: float | None = None,
    space: SearchSpace | None = None,
    prune: bool = True,
    on_start: Callable[[int], None] | None = None,
    on_trial: Callable[[TrialRecord], None] | None = None,
) -> SearchResult:
    """Run (or resume) the study ``<name>-<architecture>-<sampler>`` until it holds ``trials``
    finished trials (grid search: at most the grid), ``timeout_s`` passed (trials under way
    finish) or the grid is covered. ``jobs`` > 1 runs that many worker processes, one torch
    thread each, sharing the study. ``on_start`` is told how many trials this call will run,
    ``on_trial`` sees each as it finishes. Writes ``trials.json`` and ``trials.csv`` next to the
    study. Raises ``SpaceError`` and ``StudyConflict``."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r} (known: {', '.join(SAMPLERS)})")
    if trials < 1 or jobs < 1:
        raise ValueError("trials and jobs must be at least 1")
    space = space if space is not None else default_space(base)
    study_id = study_name(name, base.architecture, sampler)
    directory = settings.home / "studies" / study_id
    directory.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{(directory / 'study.db').resolve()}"
    budget = min(trials, grid_size(space)) if sampler == "grid" else trials
    with _locked(directory, study_id):
        study = optuna.create_study(study_name=study_id, storage=_storage(url), direction="minimize",
                                    load_if_exists=True)
        _check_study(study, {
            "objective": OBJECTIVE, "architecture": base.architecture, "dataset": ds.source,
            "data_fingerprint": ds.fingerprint, "base_config": base.model_dump(mode="json"),
            "space": space_json(space)}, directory)
        storage = _storage(url)
        sid = storage.get_study_id_from_name(study_id)
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
            # the lock says no other process runs this study: these were cut off by a kill
            storage.set_trial_state_values(
                storage.get_trial_id_from_study_id_trial_number(sid, t.number), TrialState.FAIL)
        existing = study.get_trials(deepcopy=False)
        first = len(existing)
        left = max(0, budget - _counted(existing, first))
        if on_start is not None:
            on_start(left)
        job = _Job(url, study_id, sampler, base.seed,
                   space, base, ds, settings, budget, first,
                   None if timeout_s is None else time.time() + timeout_s, prune,
                   settings.threads, optuna.logging.get_verbosity())
        if sampler != "grid":  # a resumed study must not draw the first run's values again
            job = replace(job, sampler_seed=int(
                np.random.SeedSequence([job.sampler_seed, first]).generate_state(1)[0]))

        def seen(t: FrozenTrial) -> None:
            if on_trial is not None:
                on_trial(TrialRecord.of(t))

        if left == 0:
            ran = 0
        elif jobs == 1 or left == 1:
            ran = _work(job, seen)
        else:
            ran = _work_in_processes(job, min(jobs, left), seen, study)
        result = _result(study, directory, sampler, base, ds, space, ran)
        (directory / "trials.json").write_text(json.dumps(result.report(), indent=1))
        (directory / "trials.csv").write_text(result.report_csv())
    log.info("study %s: %d trials (%d run now); best %s", study_id, len(result.trials), ran,
             f"trial {result.best.number}, {OBJECTIVE} {result.best.value:.5g}" if result.best
             else "none")
    return result


def _result(study: optuna.Study, directory: Path, sampler: SamplerName, base: TrainingConfig,
            ds: TabularDataset, space: SearchSpace, ran: int) -> SearchResult:
    frozen = study.get_trials(deepcopy=False)
    complete = [t for t in frozen if t.state is TrialState.COMPLETE]
    best = min(complete, key=lambda t: (t.value, t.number)) if complete else None
    counts: dict[str, int] = {}
    for t in frozen:
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    return SearchResult(
        study=study.study_name, directory=directory, sampler=sampler,
        architecture=base.architecture, dataset=ds.source, space=space,
        trials=[TrialRecord.of(t) for t in frozen], ran=ran,
        best=TrialRecord.of(best) if best else None,
        best_config=TrainingConfig.model_validate(best.user_attrs["config"]) if best else None,
        counts=counts)


# -- the best trial, trained again and registered ------------------------------------------------
def register_best(
    result: SearchResult,
    ds: TabularDataset,
    *,
    name: str,
    settings: TrainingSettings,
    registry: Registry | None = None,
    promote: bool = False,
    lineage: Mapping[str, Any] | None = None,
    progress: bool | None = None,
    console: Console | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> ModelMetadata:
    """Train the best trial's config again (same seed and split, so the same model on CPU),
    export, check and register it with the trials report attached as ``tune_trials.json``."""
    if result.best is None or result.best_config is None:
        raise TuneError(f"study {result.study!r}: no trial completed "
                        f"({', '.join(f'{n} {s}' for s, n in result.counts.items()) or 'none run'}); "
                        "nothing to register")
    finished = sum(n for s, n in result.counts.items() if s != "running")
    lineage = {**(lineage or {}), "trigger": "tune", "study": result.study,
               "sampler": result.sampler, "objective": OBJECTIVE, "trial": result.best.number,
               "best_value": result.best.value, "trials": finished}
    trained = train_model(ds, name=name, options=TrainOptions(
        config=result.best_config, settings=settings, lineage=lineage, progress=progress,
        console=console, on_stage=on_stage))
    again = trained.fit.best_val_loss
    if result.best.value is not None and not math.isclose(again, result.best.value, rel_tol=1e-4):
        log.warning("trial %d trained again reached %s %.6g, not %.6g (a non-deterministic "
                    "device?)", result.best.number, OBJECTIVE, again, result.best.value)
    trained.artifacts[TRIALS_ARTIFACT] = json.dumps(result.report(), indent=1).encode()
    return register_trained(trained, registry or Registry(settings.registry_dir), promote=promote)
