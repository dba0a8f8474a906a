"""``modelloop models import`` (alias ``models register``): an ONNX file made elsewhere as a new
version.

The command lives with the code it calls (``training/byo.py``); the composition root
(``modelloop/cli.py``) adds it to the ``models`` group. It is imported whenever that group is,
so the heavy modules are imported inside the command.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from training.settings import GateMetricChoice  # light: pydantic-settings only

import_app = typer.Typer(add_completion=False, rich_markup_mode=None)  # [batch, ...] in the help
ALIAS_CHALLENGER = "challenger"  # serving's shadow and `models gate` read it


class TaskChoice(StrEnum):
    auto = "auto"
    classification = "classification"
    regression = "regression"


@import_app.command()
def import_command(
    file: Annotated[Path, typer.Argument(help="The ONNX file.")],
    name: Annotated[str, typer.Option("--name", help="Registered model name.")],
    data: Annotated[Path, typer.Option(
        "--reference", "--data", help="CSV or Parquet: the feature columns (in the graph's "
        "input order, or named as its per-column inputs) and the target; what the model was "
        "trained on, or data like it (drift is measured against it).")],
    target: Annotated[str | None, typer.Option(
        "--target", help="The target column (default: `target` when the reference has one; "
        "without one the reference has no labels: no metrics, and the task and classes come "
        "from the graph or --task and --classes).")] = None,
    holdout: Annotated[Path | None, typer.Option(
        "--holdout", help="Rows the model never saw (metrics); default: a seeded split of "
        "--data.")] = None,
    task: Annotated[TaskChoice, typer.Option("--task", help="auto: inferred from the target, "
                                             "as `modelloop train` does.")] = TaskChoice.auto,
    labels: Annotated[str | None, typer.Option(
        "--classes", "--labels", help="Class labels in the order of the graph's probability "
        "columns, comma-separated (default: the graph's own, as skl2onnx writes them, else the "
        "sorted labels of the target, as scikit-learn orders them).")] = None,
    promote: Annotated[bool, typer.Option(
        "--promote", help="Make it production (after the same check `models promote` runs).")] = False,
    challenger: Annotated[bool, typer.Option(
        "--challenger", help="Point the `challenger` alias at it (after the same check): "
        "serving scores it on a copy of live traffic, `models gate` judges it.")] = False,
    gate_metric: Annotated[GateMetricChoice | None, typer.Option(
        "--gate-metric", help="What `models gate` judges this line by, stored with it: "
        "accuracy, f1 (macro), roc_auc or pr_auc for a classifier (default "
        "MODELLOOP_TRAINING_RETRAIN_METRIC), r2 for a regressor.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the new version as JSON.")] = False,
) -> None:
    """Import an ONNX FILE made elsewhere (torch.onnx, skl2onnx, ...) as a new version.

    The graph takes one float input [batch, n_features], or one numeric [batch, 1] input per
    column (skl2onnx from a DataFrame), and outputs a classifier's probabilities [batch,
    classes] (a tensor or skl2onnx's ZipMap; a graph that outputs logits is refused: end it in
    a softmax) or a regressor's [batch] or [batch, 1]; its batch axis must be dynamic. The task
    and classes are read from the graph when it says them. It is run on the reference data
    (whole and at several batch sizes) for its metrics and reference sample.
    Exit codes: 0 registered; 2 the file or the data is unusable (one line says why); 1 the
    registry refused it, or the promotion check failed (the version stays registered).
    """
    from modelloop.registry import Registry, RegistryError
    from modelloop.schemas import Task
    from training.byo import ByoError, ExampleData, register_onnx
    from training.data import TARGET, DataError, read_table
    from training.settings import TrainingSettings

    console = Console(stderr=True)
    if promote and challenger:
        console.print("[red]error:[/] --promote and --challenger exclude each other", highlight=False)
        raise typer.Exit(2)
    settings = TrainingSettings(progress=False)
    try:
        target = target or (TARGET if TARGET in read_table(data).columns else None)
        examples = ExampleData(data, target=target, holdout=holdout,
                               task=None if task is TaskChoice.auto else Task(task.value),
                               class_labels=[s.strip() for s in labels.split(",")] if labels else None)
        registry = Registry(settings.registry_dir)
        meta = register_onnx(file, examples, name=name, registry=registry, settings=settings,
                             promote=promote, gate_metric=gate_metric.value if gate_metric else None)
        if challenger:
            registry.set_alias(name, ALIAS_CHALLENGER, meta.version)
    except (ByoError, DataError) as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from exc
    except RegistryError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from exc
    if as_json:
        typer.echo(json.dumps({"name": meta.name, "version": meta.version, "task": meta.task.value,
                               "metrics": meta.metrics, "promoted": promote,
                               "challenger": challenger}, indent=2))
    console.print(f"registered {meta.name} v{meta.version} from {file.name}"
                  + (" (production)" if promote else " (challenger)" if challenger else ""),
                  highlight=False)
