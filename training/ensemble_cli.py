"""``modelloop ensemble``: one ONNX graph of registered members, measured, registered, gated.

A shim: it builds the settings, resolves the members and calls
:func:`training.ensemble.build_ensemble` and :func:`training.ensemble.register_ensemble`.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console

from modelloop.registry import Registry, RegistryError
from training.cli import fail, load_settings
from training.data import DataError
from training.ensemble import Method, build_ensemble, register_ensemble
from training.export import ExportError

ensemble_app = typer.Typer(add_completion=False, rich_markup_mode=None)


@ensemble_app.command(no_args_is_help=True)
def ensemble(
    name: Annotated[str, typer.Argument(help="Registered model name (the members' line).")],
    members: Annotated[str, typer.Option(
        "--members", help="Comma-separated versions (or aliases) to combine, e.g. 3,5,7.")],
    method: Annotated[Method, typer.Option(
        "--method", help="mean of the probabilities; weighted by each member's validation "
        "accuracy; vote: majority of the members' classes, ties to the mean.")] = Method.mean,
    promote: Annotated[bool, typer.Option(
        "--promote", help="Make the ensemble production if its test accuracy beats the best "
        "member's by MODELLOOP_TRAINING_ENSEMBLE_MARGIN (0: a tie is enough).")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print a JSON summary on stdout.")] = False,
) -> None:
    """Combine registered classifiers of one line (same features, classes, data and split) into
    one ONNX graph, check it against the members run separately, measure it on their common test
    split and register it as a new version.

    Exit codes: 0 registered (with --promote, "promoted" says whether the margin allowed it);
    2 unknown model or version, or members that cannot make an ensemble; 1 building failed.

    Example:

      modelloop ensemble digits --members 3,5,7 --method vote --promote
    """
    settings = load_settings()
    registry = Registry(settings.registry_dir)
    try:
        versions = [registry.get(name, v.strip()) for v in members.split(",") if v.strip()]
    except RegistryError as exc:
        raise fail(str(exc), 2) from exc
    console = Console(stderr=True)
    console.print(f"[dim]building the {method.value} ensemble of {name} "
                  f"{', '.join(f'v{v.version}' for v in versions)}...[/]")
    try:
        built = build_ensemble(versions, method=method, settings=settings)
        meta, promoted, reason = register_ensemble(built, registry, promote=promote)
    except DataError as exc:  # NotEnsemblable is one
        raise fail(str(exc), 2) from exc
    except (ExportError, RegistryError) as exc:
        raise fail(str(exc), 1) from exc
    report = built.report
    out = Console(stderr=as_json)
    for version, metric in report.member_metrics.items():
        out.print(f"  member v{version}: {report.metric} {metric:.4f}")
    out.print(f"  ensemble v{meta.version} ({report.method}): {report.metric} "
              f"{report.ensemble_metric:.4f}; parity max abs diff {meta.parity.max_abs_diff:.2e}"
              if meta.parity else "")
    out.print(reason, soft_wrap=True)
    if as_json:
        typer.echo(json.dumps({
            "name": name, "version": meta.version, "promoted": promoted, "reason": reason,
            "onnx_path": str(registry.get(name, meta.version).onnx_path.resolve()),
            "metrics": meta.metrics, "parity": meta.parity.model_dump() if meta.parity else None,
            "ensemble": report.to_json(),
        }, indent=2))
