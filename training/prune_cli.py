"""``modelloop prune``: prune a registered MLP, fine-tune it, measure it, register it.

A shim: it builds the settings, resolves the version and calls
:func:`training.prune.prune_version` and :func:`training.prune.register_pruned`.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from modelloop.registry import Registry, RegistryError
from training.cli import fail, load_settings, print_derived
from training.data import DataError
from training.export import ExportError
from training.prune import FINE_TUNE_EPOCHS, PruningReport, prune_version, register_pruned
from training.trainer import TrainingError

prune_app = typer.Typer(add_completion=False, rich_markup_mode=None)


def _table(name: str, source: int, version: int, report: PruningReport) -> Table:
    kind = "structured" if report.structured else "unstructured"
    table = Table(title=f"{name}: v{source} -> v{version} pruned ({kind}, amount {report.amount})")
    for column, justify in (("", "left"), (f"parent v{source}", "right"),
                            (f"pruned v{version}", "right"), ("change", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    metric = report.metric
    table.add_row(f"{metric} (test)", f"{report.parent_metrics[metric]:.4f}",
                  f"{report.pruned_metrics[metric]:.4f}", f"{-report.loss_points + 0.0:+.2f} points")
    table.add_row("hidden units", str(report.hidden["parent"]), str(report.hidden["pruned"]), "")
    table.add_row("zero weights", f"{report.zero_weights['parent']:.0%}",
                  f"{report.zero_weights['pruned']:.0%}", "")
    for batch, parent in report.rows_per_s["parent"].items():
        pruned = report.rows_per_s["pruned"][batch]
        table.add_row(f"rows/s, batch {batch}", f"{parent:,.0f}", f"{pruned:,.0f}",
                      f"x{pruned / parent:.2f}")
    table.add_row("model file", f"{report.bytes['parent'] / 1024:,.1f} KiB",
                  f"{report.bytes['pruned'] / 1024:,.1f} KiB",
                  f"x{report.bytes['pruned'] / report.bytes['parent']:.2f}")
    return table


@prune_app.command(no_args_is_help=True)
def prune(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Option(
        "--version", help="Version number or alias to prune.")] = "production",
    amount: Annotated[float, typer.Option(
        "--amount", help="Share of the weights (unstructured) or of each hidden layer's units "
        "(--structured) to remove, between 0 and 1.")] = 0.5,
    structured: Annotated[bool, typer.Option(
        "--structured", help="Remove whole hidden units: a smaller MLP and a smaller ONNX "
        "file. Without it the weights are only zeroed.")] = False,
    epochs: Annotated[int, typer.Option(
        "--epochs", min=1, help="Epochs of the fine-tune after pruning.")] = FINE_TUNE_EPOCHS,
    promote: Annotated[bool, typer.Option(
        "--promote", help="Make the pruned version production if its metric loss is within "
        "MODELLOOP_TRAINING_PRUNE_MAX_LOSS.")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print a JSON summary on stdout (the table goes to stderr).")] = False,
) -> None:
    """Prune a registered MLP (torch.nn.utils.prune), fine-tune it briefly, compare it with its
    parent on the same test split (metric, rows/s, size) and register it as a new version.

    Exit codes: 0 registered (with --promote, "promoted" says whether the loss allowed it);
    2 unknown model or version, or a version that cannot be pruned; 1 pruning failed.

    Examples:

      modelloop prune cancer --amount 0.5 --structured --promote

      modelloop prune cancer --version 3 --amount 0.8 --json
    """
    settings = load_settings()
    registry = Registry(settings.registry_dir)
    try:
        source = registry.get(name, version)
    except RegistryError as exc:
        raise fail(str(exc), 2) from exc
    console = Console(stderr=True)
    console.print(f"[dim]pruning {name} v{source.version}, fine-tuning it and measuring it on "
                  "the test split...[/]")
    try:
        pruned = prune_version(source, amount=amount, structured=structured, settings=settings,
                               epochs=epochs)
        meta, promoted, reason = register_pruned(pruned, registry, promote=promote)
    except DataError as exc:  # NotPrunable is one
        raise fail(str(exc), 2) from exc
    except (ExportError, TrainingError, RegistryError) as exc:
        raise fail(str(exc), 1) from exc

    print_derived(registry, meta, source.version,
                  _table(name, source.version, meta.version, pruned.report), promoted=promoted,
                  reason=reason, as_json=as_json, kind="pruning", report=pruned.report.to_json())
