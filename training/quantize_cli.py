"""``modelloop quantize``: quantize a registered version to int8, measure it, register it.

A shim: it builds the settings, resolves the version and calls
:func:`training.quantize.quantize_version` and :func:`training.quantize.register_quantized`.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from modelloop.registry import Registry, RegistryError
from training.cli import fail, load_settings, print_derived
from training.data import DataError
from training.quantize import (
    Method,
    NotQuantizable,
    QuantizationReport,
    QuantizeError,
    quantize_version,
    register_quantized,
)

quantize_app = typer.Typer(add_completion=False, rich_markup_mode=None)


def _table(name: str, source: int, version: int, report: QuantizationReport) -> Table:
    table = Table(title=f"{name}: v{source} fp32 -> v{version} int8 ({report.method})")
    table.add_column("")
    table.add_column(f"fp32 v{source}", justify="right")
    table.add_column(f"int8 v{version}", justify="right")
    table.add_column("change", justify="right")
    metric = report.metric
    table.add_row(f"{metric} (test)", f"{report.fp32_metrics[metric]:.4f}",
                  f"{report.int8_metrics[metric]:.4f}", f"{-report.loss_points + 0.0:+.2f} points")
    for batch, speedup in report.speedup.items():
        table.add_row(f"rows/s, batch {batch}", f"{report.rows_per_s['fp32'][batch]:,.0f}",
                      f"{report.rows_per_s['int8'][batch]:,.0f}", f"x{speedup:.2f}")
    table.add_row("model file", f"{report.bytes['fp32'] / 1024:,.1f} KiB",
                  f"{report.bytes['int8'] / 1024:,.1f} KiB",
                  f"x{report.bytes['int8'] / report.bytes['fp32']:.2f}")
    table.add_row("max abs diff", "", f"{report.max_abs_diff:.2e}", "")
    return table


@quantize_app.command(no_args_is_help=True)
def quantize(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Option(
        "--version", help="Version number or alias to quantize.")] = "production",
    method: Annotated[Method, typer.Option(
        "--method", help="auto: static for the CNN, dynamic otherwise; dynamic: int8 weights, "
        "activations quantized at run time; static: activations calibrated on training "
        "rows.")] = Method.auto,
    promote: Annotated[bool, typer.Option(
        "--promote", help="Make the int8 version production if its metric loss is within "
        "MODELLOOP_TRAINING_QUANTIZE_MAX_LOSS.")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print a JSON summary on stdout (the table goes to stderr).")] = False,
) -> None:
    """Quantize a registered version to int8 with ONNX Runtime, compare it with the fp32
    version on the same test split (metric, rows/s, size) and register it as a new version.

    Exit codes: 0 registered (with --promote, "promoted" says whether the loss allowed it);
    2 unknown model or version, or a version that cannot be quantized; 1 quantization failed.

    Examples:

      modelloop quantize digits-cnn --promote

      modelloop quantize cancer --version 3 --method dynamic --json
    """
    settings = load_settings()
    registry = Registry(settings.registry_dir)
    try:
        source = registry.get(name, version)
    except RegistryError as exc:
        raise fail(str(exc), 2) from exc
    console = Console(stderr=True)
    console.print(f"[dim]quantizing {name} v{source.version} ({source.metadata.architecture}) "
                  "and measuring it on the test split...[/]")
    try:
        quantized = quantize_version(source, method=method, settings=settings)
        meta, promoted, reason = register_quantized(quantized, registry, promote=promote)
    except (NotQuantizable, DataError) as exc:
        raise fail(str(exc), 2) from exc
    except (QuantizeError, RegistryError) as exc:
        raise fail(str(exc), 1) from exc

    print_derived(registry, meta, source.version,
                  _table(name, source.version, meta.version, quantized.report), promoted=promoted,
                  reason=reason, as_json=as_json, kind="quantization",
                  report=quantized.report.to_json())
