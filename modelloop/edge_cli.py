"""``modelloop models export``: write a registered version's edge bundle.

A shim: it resolves ``NAME[@VERSION]`` and calls :func:`modelloop.edge.export_bundle`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelloop.edge import BundleError, BundleFormat, ConversionError, export_bundle
from modelloop.registry import Registry, RegistryError
from modelloop.settings import HomeSettings

export_app = typer.Typer(add_completion=False, rich_markup_mode=None)


@export_app.command(no_args_is_help=True)
def export(
    ref: Annotated[str, typer.Argument(
        metavar="NAME[@VERSION]", help="Model name, and a version number or alias "
        "(default production).")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write (new or empty).")],
    fmt: Annotated[BundleFormat, typer.Option(
        "--format", help="onnx: the registered graph; ort: ONNX Runtime's format with the "
        "operator list its minimal build takes.")] = BundleFormat.onnx,
) -> None:
    """Write a self-contained bundle for the edge: the graph, schema.json, reference_stats.json
    and predict.py, which needs only onnxruntime and numpy.

    Exit codes: 0 written; 2 unknown model or version, or a folder that is not empty; 1 the
    conversion failed.

    Examples:

      modelloop models export cancer --out edge/cancer

      modelloop models export cancer@3 --format ort --out edge/cancer-v3

      cd edge/cancer && python -c "from predict import Predictor; print(Predictor('.').predict([[...]]))"
    """
    name, _, version = ref.partition("@")
    try:
        source = Registry(HomeSettings().registry_dir).get(name, version or "production")
    except RegistryError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    try:
        bundle = export_bundle(source, out, fmt)
    except ConversionError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    except BundleError as exc:  # the caller's: a folder that is not empty, say
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"{name} v{source.version} ({fmt.value}) -> {bundle.root}: {', '.join(bundle.files)}")
