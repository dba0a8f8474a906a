"""``modelloop tune``: a hyperparameter search, then the best trial trained again and registered.

A shim: it builds the settings, the base config and the space from the options and calls
:func:`training.tune.search` and :func:`training.tune.register_best`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import optuna
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from modelloop.registry import ModelVersion, Registry, RegistryError
from modelloop.schemas import ModelMetadata, Task
from training.cli import (
    CleanOption,
    DataOption,
    DatasetOption,
    TargetOption,
    TaskChoice,
    data_options_problem,
    fail,
    invalid_options,
    load_settings,
    metrics_table,
    model_name,
)
from training.config import TrainingConfig
from training.data import DataError, load_data
from training.data_report import report_table
from training.export import ExportError
from training.models import architecture_names, get_architecture
from training.settings import TrainingSettings
from training.trainer import TrainingError
from training.tune import (
    OBJECTIVE,
    SearchResult,
    SpaceError,
    StudyConflict,
    TrialRecord,
    TuneError,
    default_space,
    load_space,
    register_best,
    search,
)

tune_app = typer.Typer(add_completion=False, rich_markup_mode=None)


class SamplerChoice(StrEnum):
    grid = "grid"
    random = "random"
    bayes = "bayes"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def trials_table(result: SearchResult) -> Table:
    """Every trial of the study: number, state, value, epochs, duration, parameters."""
    table = Table(title=f"study {result.study}: {OBJECTIVE.replace('_', ' ')} (lower is better)")
    for column, justify in [("trial", "right"), ("state", "left"), ("value", "right"),
                            ("epochs", "right"), ("seconds", "right"), ("params", "left")]:
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for t in result.trials:
        best = result.best is not None and t.number == result.best.number
        params = ", ".join(f"{k.removeprefix('model.')}={_short(v)}" for k, v in t.params.items())
        table.add_row(str(t.number), t.state + (" (best)" if best else ""),
                      "" if t.value is None else f"{t.value:.4f}",
                      "" if t.epochs is None else str(t.epochs),
                      "" if t.duration_s is None else f"{t.duration_s:.1f}",
                      escape(params) + (f"  [dim]{escape(t.note)}[/]" if t.note else ""),
                      style="bold green" if best else None)
    return table


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]tuning[/]"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                    console=console, disable=not enabled)


@tune_app.command(no_args_is_help=True)
def tune(
    dataset: DatasetOption = None,
    data: DataOption = None,
    target: TargetOption = None,
    task: Annotated[TaskChoice, typer.Option(
        "--task", help="For --data: auto infers it from the target column.")] = TaskChoice.auto,
    model: Annotated[str, typer.Option(
        "--model", help="Architecture (registered: " + ", ".join(architecture_names()) + ").")] = "mlp",
    name: Annotated[str | None, typer.Option(
        "--name", help="Registered model name (default: the dataset or file name); the study is "
        "NAME-MODEL-SAMPLER.")] = None,
    sampler: Annotated[SamplerChoice, typer.Option(
        "--sampler", help="grid: every combination of a discrete grid (a range becomes 3 points, "
        "or its 'points'); random: independent draws; bayes: TPE, which draws where good trials "
        "were (random for its first 10).")] = SamplerChoice.bayes,
    trials: Annotated[int, typer.Option(
        "--trials", min=1, help="Finished trials the study should hold; a rerun of the same "
        "command resumes the study and runs only the missing ones.")] = 20,
    jobs: Annotated[int, typer.Option(
        "--jobs", min=1, help="Trials run at once, each in its own process with one torch "
        "thread (at most one per free core).")] = 1,
    timeout: Annotated[float | None, typer.Option(
        "--timeout", min=0.0, help="Start no trial after this many seconds (those under way "
        "finish).")] = None,
    space: Annotated[Path | None, typer.Option(
        "--space", help="YAML or JSON: {param: {type: float|int|categorical, low, high, log, "
        "choices, points}}; params are config fields (learning_rate, batch_size, ...), "
        "model.PARAM, or model.hidden.depth / model.hidden.width. Default: a space per "
        "architecture.")] = None,
    epochs: Annotated[int | None, typer.Option(
        "--epochs", min=1, help="Maximum epochs per trial (and of the final model).")] = None,
    rows: Annotated[int | None, typer.Option(
        "--rows", min=10, help="Rows of the synthetic dataset (or a seeded subsample of a "
        "built-in one).")] = None,
    seed: Annotated[int | None, typer.Option(
        "--seed", min=0, help="Seed of the split, the weights and the sampler.")] = None,
    clean: CleanOption = None,
    prune: Annotated[bool, typer.Option(
        "--prune/--no-prune", help="Stop trials whose validation loss lags the median of "
        "completed trials at the same epoch.")] = True,
    promote: Annotated[bool, typer.Option(
        "--promote", help="Make the registered best model production.")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the result as JSON on stdout (tables and progress go to "
        "stderr).")] = False,
    progress: Annotated[bool | None, typer.Option(
        "--progress/--no-progress", help="Show progress bars (default: "
        "MODELLOOP_TRAINING_PROGRESS, on).")] = None,
) -> None:
    """Search hyperparameters with Optuna, then train the best trial again, export it to ONNX,
    check it and register it (lineage trigger "tune", the trials as tune_trials.json).

    Each trial trains on the training split and is scored by its best validation loss; the
    test split is only used for the registered model's metrics. The study is stored in
    $MODELLOOP_HOME/studies/NAME-MODEL-SAMPLER/study.db with trials.json and trials.csv.

    Examples:

      modelloop tune --dataset breast_cancer --trials 30 --epochs 40 --promote

      modelloop tune --data churn.csv --target churned --sampler grid --space space.yaml
    """
    problem = data_options_problem(dataset, data, target, task, rows)
    if problem:
        raise fail(problem, 2)
    try:
        get_architecture(model)
    except ValueError as exc:
        raise fail(f"--model: {exc}", 2) from exc
    settings = load_settings()
    base = _base_config(settings, epochs=epochs, seed=seed, model=model, target=target, task=task,
                        clean=clean)
    if progress is None:
        progress = settings.progress
    if not logging.getLogger().isEnabledFor(logging.INFO):
        # the trials table shows what Optuna would log (each failure with its traceback); -v
        # shows Optuna's own per-trial log
        optuna.logging.set_verbosity(optuna.logging.ERROR)

    source = str(dataset.value if dataset is not None else data)
    name = name or model_name(source)
    registry = Registry(settings.registry_dir)
    console = Console(stderr=True)
    out = Console(stderr=as_json)
    try:
        registry.aliases(name)  # validates the name before minutes of searching
        search_space = load_space(space, base) if space is not None else default_space(base)
        ds = load_data(source, base.target, task=base.task, rows=rows, seed=base.seed,
                       clean=base.clean, categorical=base.categorical)
        if ds.report is not None:
            console.print(report_table(ds.report, source))
        with _progress(console, progress) as bar:
            started, finished = _trial_progress(bar)
            result = search(ds, name=name, base=base, settings=settings, sampler=sampler.value,
                            trials=trials, jobs=jobs, timeout_s=timeout, space=search_space,
                            prune=prune, on_start=started, on_trial=finished)
        out.print(trials_table(result))
        out.print(f"study {result.study}: {len(result.trials)} trials ({result.ran} run now), "
                  f"report {result.directory / 'trials.json'}", soft_wrap=True)
        meta = register_best(
            result, ds, name=name, settings=settings, registry=registry, promote=promote,
            lineage={"dataset_rows": rows}, progress=progress, console=console,
            on_stage=lambda s: console.print(f"[dim]{s}...[/]"))
    except (DataError, SpaceError, StudyConflict) as exc:
        raise fail(str(exc), 2) from exc
    except (TuneError, ExportError, TrainingError, RegistryError) as exc:
        raise fail(str(exc), 1) from exc

    version = registry.get(name, meta.version)
    out.print(metrics_table(meta, promote))
    out.print(f"registered {name} v{meta.version} (trial {result.best.number if result.best else '-'}"
              f" of {result.study}): {version.onnx_path}", soft_wrap=True)
    if as_json:
        typer.echo(json.dumps(_summary(result, meta, version, promote), indent=2))


def _base_config(settings: TrainingSettings, *, epochs: int | None, seed: int | None, model: str,
                 target: str | None, task: TaskChoice, clean: bool | None) -> TrainingConfig:
    """The config every trial starts from; exit 2 naming the option it cannot take."""
    try:
        return TrainingConfig.from_settings(
            settings, epochs=epochs, seed=seed, architecture=model, target=target, clean=clean,
            task=None if task is TaskChoice.auto else Task(task.value))
    except ValidationError as exc:
        raise fail(invalid_options(exc), 2) from exc


def _trial_progress(bar: Progress) -> tuple[Callable[[int], None], Callable[[TrialRecord], None]]:
    """The search's callbacks that move ``bar``: when it starts (the trials it will run), and
    after each trial (its state and the best value so far)."""
    task_id = bar.add_task("tune", total=None, status="")
    best: dict[str, float] = {}

    def started(n: int) -> None:
        bar.update(task_id, total=n, status="" if n else "the study is complete")

    def finished(record: TrialRecord) -> None:
        if record.state == "complete" and record.value is not None and (
                record.value < best.get("value", float("inf"))):
            best.update(value=record.value, trial=record.number)
        bar.update(task_id, advance=1, status=(
            f"trial {record.number} {record.state}"
            + (f"; best {best['value']:.4f} (trial {best['trial']:.0f})" if best else "")))

    return started, finished


def _summary(result: SearchResult, meta: ModelMetadata, version: ModelVersion,
             promote: bool) -> dict[str, Any]:
    """What ``--json`` prints: the study, its best trial and the version registered from it."""
    assert result.best is not None
    return {
        "study": result.study, "sampler": result.sampler, "storage": str(result.storage),
        "report": str(result.directory / "trials.json"), "objective": OBJECTIVE,
        "trials": len(result.trials), "ran": result.ran, "counts": result.counts,
        "best": {"trial": result.best.number, "value": result.best.value,
                 "params": result.best.params},
        "registered": {"name": meta.name, "version": meta.version, "promoted": promote,
                       "onnx_path": str(version.onnx_path.resolve()),
                       "metrics": meta.metrics},
    }
