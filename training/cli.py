"""``modelloop train``: train, evaluate, export to ONNX (checked) and register a model.

A shim: it builds the settings and the config from the options and calls
:func:`training.pipeline.train_and_register`.
"""

from __future__ import annotations

import json
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, get_args

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from modelloop.registry import Registry, RegistryError
from modelloop.schemas import ModelMetadata, Task
from training.config import TrainingConfig
from training.data import BUILTINS, DataError, load_data
from training.data_report import report_table
from training.ensemble import ensemble_of, member_configs
from training.export import ExportError
from training.models import architecture_names, get_architecture
from training.pipeline import TrainOptions, train_and_register
from training.settings import ClassWeight, GateMetricChoice, Optimizer, TrainingSettings
from training.trainer import TrainingError
from training.transfer import WarmStart

train_app = typer.Typer(add_completion=False, rich_markup_mode=None)

DatasetName = StrEnum("DatasetName", {name: name for name in BUILTINS})  # type: ignore[misc]


class TaskChoice(StrEnum):
    auto = "auto"
    classification = "classification"
    regression = "regression"


OptimizerChoice = StrEnum("OptimizerChoice", {o: o for o in get_args(Optimizer)})  # type: ignore[misc]
ClassWeightChoice = StrEnum("ClassWeightChoice", {w: w for w in get_args(ClassWeight)})  # type: ignore[misc]


DATASETS_HELP = "; ".join(f"{d.name}: {d.description}" for d in BUILTINS.values())


def model_name(source: str) -> str:
    # a file stem can hold anything; registry names are letters, digits, '_', '-', '.'
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(source).stem).strip("_.-")
    return name[:64] or "model"


def _ref(text: str) -> int | str:
    """``3`` -> version 3, ``previous`` -> that alias, empty -> production."""
    return int(text) if text.isdigit() else (text or "production")


def fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)  # one plain line: no wrapping, no traceback
    return typer.Exit(code=code)


def invalid_options(exc: ValidationError) -> str:
    """A config's validation errors as one line naming the options."""
    # no location: the architecture's parameters as a whole (--param)
    return "; ".join(f"invalid option {'.'.join(map(str, e['loc'])) or '--param'}: {e['msg']}"
                     for e in exc.errors())


def data_options_problem(dataset: DatasetName | None, data: Path | None, target: str | None,
                         task: TaskChoice, rows: int | None) -> str | None:
    """What is wrong with a command's data options (``train``, ``tune``), or None."""
    if (dataset is None) == (data is None):
        return "give exactly one of --dataset NAME or --data FILE"
    if data is not None and not target:
        return "--data needs --target COLUMN"
    if dataset is not None and target:
        return "--target is for --data; built-in datasets know their target"
    if dataset is not None and task is not TaskChoice.auto:
        return "--task is for --data; built-in datasets know their task"
    if data is not None and rows is not None:
        return "--rows is for --dataset; a file is used whole"
    return None


def load_settings() -> TrainingSettings:
    """The settings from the environment, or exit 2 with one line naming each bad variable."""
    try:
        return TrainingSettings()
    except ValidationError as exc:
        raise fail("; ".join(
            f"setting MODELLOOP_TRAINING_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}"
            for e in exc.errors()), 2) from exc


def print_derived(registry: Registry, meta: ModelMetadata, source_version: int, table: Table, *,
                  promoted: bool, reason: str, as_json: bool, kind: str,
                  report: dict[str, Any]) -> None:
    """What ``quantize`` and ``prune`` print after registering a version derived from
    ``source_version``: the comparison table, the file, the gate's reason, and with ``as_json``
    a JSON summary on stdout (the rest then goes to stderr) whose ``kind`` key holds ``report``."""
    onnx_path = registry.get(meta.name, meta.version).onnx_path
    out = Console(stderr=as_json)
    out.print(table)
    out.print(f"registered {meta.name} v{meta.version}: {onnx_path}", soft_wrap=True)
    out.print(reason, soft_wrap=True)
    if as_json:
        typer.echo(json.dumps({
            "name": meta.name, "version": meta.version, "source_version": source_version,
            "promoted": promoted, "reason": reason, "onnx_path": str(onnx_path.resolve()),
            "metrics": meta.metrics, kind: report,
        }, indent=2))


def metrics_table(meta: ModelMetadata, promoted: bool) -> Table:
    table = Table(title=f"{meta.name} v{meta.version}" + (" (production)" if promoted else ""))
    table.add_column("metric")
    table.add_column("test", justify="right")
    for key, value in meta.metrics.items():
        table.add_row(key, f"{value:.4f}")
    if meta.parity is not None:
        table.add_row("onnx parity", f"max diff {meta.parity.max_abs_diff:.1e}")
    return table


# the data options of `train` and `tune`
DatasetOption = Annotated[DatasetName | None, typer.Option(
    "--dataset", help=f"A built-in dataset ({DATASETS_HELP}).")]
DataOption = Annotated[Path | None, typer.Option(
    "--data", help="A CSV or Parquet file of numeric features and a target column.")]
TargetOption = Annotated[str | None, typer.Option("--target", help="The target column of --data.")]
CleanOption = Annotated[bool | None, typer.Option(
    "--clean/--no-clean", help="Remove exact duplicate rows before the split (default: "
    "MODELLOOP_TRAINING_CLEAN, on; with --init-from, the parent's choice). The data report "
    "counts them either way.")]


@train_app.command(no_args_is_help=True)
def train(
    dataset: DatasetOption = None,
    data: DataOption = None,
    target: TargetOption = None,
    task: Annotated[TaskChoice, typer.Option(
        "--task", help="auto: a float target or an integer one with over 20 values is "
        "regression, anything else classification.")] = TaskChoice.auto,
    model: Annotated[str | None, typer.Option(
        "--model", help="Architecture (registered: " + ", ".join(architecture_names())
        + "; default mlp, or the parent's with --init-from).")] = None,
    name: Annotated[str | None, typer.Option(
        "--name", help="Registered model name (default: the parent's with --init-from, "
        "else the dataset or file name).")] = None,
    promote: Annotated[bool, typer.Option(
        "--promote", help="Make the new version production.")] = False,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Maximum epochs.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", min=0, help="Seed of split, weights, "
                                             "batches (and of the synthetic data).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1)] = None,
    learning_rate: Annotated[float | None, typer.Option("--learning-rate", min=0.0)] = None,
    optimizer: Annotated[OptimizerChoice | None, typer.Option(
        "--optimizer", help="adamw (default), adam, sgd (momentum 0.9; MODELLOOP_TRAINING_NESTEROV "
        "for Nesterov's) or rmsprop.")] = None,
    class_weight: Annotated[ClassWeightChoice | None, typer.Option(
        "--class-weight", help="none (default) or balanced: each class weighs rows / (classes x "
        "its rows) in the loss, for imbalanced classes.")] = None,
    hidden: Annotated[str | None, typer.Option(
        "--hidden", help="MLP hidden layer widths, e.g. 128,64.")] = None,
    gate_metric: Annotated[GateMetricChoice | None, typer.Option(
        "--gate-metric", help="What `modelloop retrain` and `models gate` judge this model line "
        "by, stored with it: accuracy, f1 (macro), roc_auc or pr_auc for a classifier "
        "(default MODELLOOP_TRAINING_RETRAIN_METRIC, accuracy), r2 for a regressor.")] = None,
    param: Annotated[list[str] | None, typer.Option(
        "--param", metavar="KEY=VALUE", help="An architecture parameter (repeatable; the value "
        "as JSON, else text): --param width=64, --param channels=[16,32].")] = None,
    clean: CleanOption = None,
    categorical: Annotated[str | None, typer.Option(
        "--categorical", metavar="COL,COL", help="Columns of integers to treat as categories "
        "(columns of text always are).")] = None,
    min_category_count: Annotated[int | None, typer.Option(
        "--min-category-count", min=1, help="A categorical value seen fewer times in the "
        "training split is coded unknown (default 5).")] = None,
    rows: Annotated[int | None, typer.Option(
        "--rows", min=10, help="Rows of the synthetic dataset (or a seeded subsample of a "
        "built-in one).")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the registered version as JSON on stdout (the table goes to "
        "stderr).")] = False,
    init_from: Annotated[str | None, typer.Option(
        "--init-from", metavar="NAME[@VERSION|ALIAS]", help="Fine-tune: start from this "
        "registered version's weights (default alias production) with its configuration, "
        "instead of training from scratch. The data must have the same features.")] = None,
    freeze: Annotated[int, typer.Option(
        "--freeze", min=0, help="With --init-from: keep the first N weight layers fixed "
        "(0: train them all).")] = 0,
    progress: Annotated[bool | None, typer.Option(
        "--progress/--no-progress", help="Show the progress bar (default: "
        "MODELLOOP_TRAINING_PROGRESS, on).")] = None,
    ensemble: Annotated[int | None, typer.Option(
        "--ensemble", min=2, metavar="K", help="Train K members on one split (initialisation "
        "seeds seed, seed+1, ...), register each, then their mean ensemble (modelloop "
        "ensemble); --promote promotes the ensemble if it ties or beats the best member.")] = None,
) -> None:
    """Train a model, evaluate it on a held-out test split, export it to ONNX, check the export
    against PyTorch and register it as a new version under $MODELLOOP_HOME/registry.

    Examples:

      modelloop train --dataset breast_cancer --promote

      modelloop train --data churn.csv --target churned --name churn --epochs 50

      modelloop train --data churn.csv --target churned --categorical zip_code

      modelloop train --data churn-2026.csv --target churned --init-from churn --freeze 1
    """
    problem = data_options_problem(dataset, data, target, task, rows)
    if problem:
        raise typer.BadParameter(problem)
    if freeze and not init_from:
        raise typer.BadParameter("--freeze is for --init-from", param_hint="--freeze")
    if ensemble and init_from:
        raise typer.BadParameter("--ensemble trains from scratch, not --init-from",
                                 param_hint="--ensemble")
    try:
        get_architecture(model or "mlp")
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--model") from exc
    overrides: dict[str, Any] = {"epochs": epochs, "seed": seed, "batch_size": batch_size,
                                 "learning_rate": learning_rate, "architecture": model,
                                 "optimizer": optimizer.value if optimizer else None,
                                 "class_weight": class_weight.value if class_weight else None,
                                 "gate_metric": gate_metric.value if gate_metric else None,
                                 "clean": clean, "target": target,
                                 "categorical": _columns(categorical) if categorical else None,
                                 "min_category_count": min_category_count,
                                 "task": None if task is TaskChoice.auto else Task(task.value)}
    params = _params(param or []) | ({"hidden": _widths(hidden)} if hidden else {})
    if params:
        overrides["model"] = params

    settings = load_settings()
    registry = Registry(settings.registry_dir)
    config, init = _train_config(settings, registry, overrides, init_from, freeze)
    source = str(dataset.value if dataset is not None else data)
    name = name or (init.name if init else model_name(source))
    console = Console(stderr=True)
    try:
        registry.aliases(name)  # validates the name before minutes of training
        ds = load_data(source, config.target, task=config.task, rows=rows, seed=config.seed,
                       clean=config.clean, categorical=config.categorical)
        if ds.report is not None:
            console.print(report_table(ds.report, source))
        if ensemble and ds.categories:
            raise DataError(f"{source}: --ensemble combines models with numeric inputs only; "
                            f"this data has categorical features ({', '.join(ds.categories)})")
        members = [train_and_register(
            ds, name=name, registry=registry, promote=promote and not ensemble,
            options=TrainOptions(
                config=member, settings=settings, progress=progress, console=console, init=init,
                parent_version=init.version if init and init.name == name else None,
                on_stage=lambda s: console.print(f"[dim]{s}...[/]"),
                lineage={"trigger": "cli", "dataset_rows": rows}),
        ) for member in member_configs(config, ensemble or 1)]
        meta, promoted = members[0], promote
        if ensemble:
            meta, promoted, reason = ensemble_of(members, registry, settings, promote=promote)
            console.print(reason, soft_wrap=True)
    except DataError as exc:
        raise fail(str(exc), 2) from exc
    except (ExportError, TrainingError, RegistryError) as exc:
        raise fail(str(exc), 1) from exc

    version = registry.get(name, meta.version)
    out = Console(stderr=as_json)
    out.print(metrics_table(meta, promoted))
    out.print(f"registered {name} v{meta.version}: {version.onnx_path}", soft_wrap=True)
    if as_json:
        typer.echo(json.dumps({
            "name": meta.name, "version": meta.version, "promoted": promoted,
            "onnx_path": str(version.onnx_path.resolve()), "metrics": meta.metrics,
            "parity": meta.parity.model_dump() if meta.parity else None,
            "dataset": meta.dataset, "data_fingerprint": meta.data_fingerprint,
        }, indent=2))


def _widths(hidden: str) -> list[int]:
    """``--hidden 128,64`` as the MLP's layer widths."""
    try:
        return [int(w) for w in hidden.split(",")]
    except ValueError as exc:
        raise typer.BadParameter(f"not a comma-separated list of widths: {hidden!r}",
                                 param_hint="--hidden") from exc


def _columns(names: str) -> list[str]:
    """``--categorical plan,region`` as column names."""
    return [n.strip() for n in names.split(",") if n.strip()]


def _params(pairs: list[str]) -> dict[str, Any]:
    """``--param KEY=VALUE`` pairs: each value JSON when it parses, else text."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"not KEY=VALUE: {pair!r}", param_hint="--param")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def _train_config(settings: TrainingSettings, registry: Registry, overrides: dict[str, Any],
                  init_from: str | None, freeze: int) -> tuple[TrainingConfig, WarmStart | None]:
    """The run's config: the settings with the options over them, or with ``--init-from`` the
    parent version's config with the options over it (and the warm start); exit 2 naming what
    is wrong."""
    init: WarmStart | None = None
    try:
        if init_from:
            parent, _, ref = init_from.partition("@")
            init = WarmStart.from_registry(registry, parent, _ref(ref), freeze=freeze)
            config = init.config(**overrides)
        else:
            config = TrainingConfig.from_settings(settings, **overrides)
        get_architecture(config.architecture).params.model_validate(config.model)
    except ValidationError as exc:
        raise fail(invalid_options(exc), 2) from exc
    except ValueError as exc:  # DataError, or an architecture that cannot be imported
        raise fail(str(exc), 2) from exc
    return config, init
