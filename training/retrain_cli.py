"""``modelloop retrain``: the command every retraining trigger runs."""

from __future__ import annotations

import json
import logging
import sys
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console

from modelloop.registry import Registry, RegistryError
from training.export import ExportError
from training.retrain import RetrainError, retrain
from training.settings import GateMetricChoice, TrainingSettings
from training.trainer import TrainingError

retrain_app = typer.Typer(add_completion=False)


@retrain_app.command()
def retrain_command(
    name: Annotated[str, typer.Option("--name", help="Registered model to retrain.")],
    sidecar_url: Annotated[str | None, typer.Option(
        "--sidecar-url", help="Sidecar to fetch labelled production data from (default: "
        "MODELLOOP_TRAINING_SIDECAR_URL).")] = None,
    trigger: Annotated[str, typer.Option(
        "--trigger", help="What started the job (recorded in the lineage).")] = "manual",
    window_s: Annotated[float | None, typer.Option(
        "--window-s", min=0, help="Only rows labelled in the last N seconds (0: all).")] = None,
    margin: Annotated[float | None, typer.Option(
        "--margin", min=0, help="How much the challenger must beat the champion by.")] = None,
    max_original_drop: Annotated[float | None, typer.Option(
        "--max-original-drop", min=0, help="How much the challenger may lose against the "
        "champion on the trusted rows of the original training data before it is held for "
        "review (default MODELLOOP_TRAINING_RETRAIN_MAX_ORIGINAL_DROP, 0.05; 1 lets labels "
        "you have checked, after a concept shift, through).")] = None,
    live_gate: Annotated[bool | None, typer.Option(
        "--live-gate/--no-live-gate", help="Name a winning challenger 'challenger' (shadowed by "
        "serving, promoted by the sidecar only if it wins on live labels) instead of promoting "
        "it (default MODELLOOP_TRAINING_RETRAIN_LIVE_GATE, off).")] = None,
    metric: Annotated[GateMetricChoice | None, typer.Option(
        "--metric", help="Judge champion and challenger by this metric instead of the one the "
        "champion stored (modelloop train --gate-metric; versions that stored none: "
        "MODELLOOP_TRAINING_RETRAIN_METRIC, r2 for a regressor).")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = False,
) -> None:
    """Retrain MODEL on its original data plus labelled production data, judge the challenger
    against the production model on the most recent labelled rows, and promote it only if it
    is better by the margin, passed its ONNX parity check, is not slower, and does not lose
    against it on the original training data (rows kept apart, labels no feedback touched):
    one that does is registered and held for review.

    Prints a JSON summary on stdout. Exit codes: 0 the job ran (see "promoted"), 2 unusable
    data or settings, 3 training diverged or the export failed its parity check, 1 any other
    failure (a registry or sidecar error).

    The labelled rows come from the sidecar's /export/labelled, an admin route: the job sends
    MODELLOOP_TRAINING_SIDECAR_KEY (the sidecar's MODELLOOP_MONITOR_API_KEY) as its bearer key.
    A job the sidecar starts is given that key and MODELLOOP_TRAINING_SIDECAR_URL.
    """
    console = Console(stderr=True)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        # only the options given: the rest come from the environment and the defaults
        overrides: dict[str, Any] = {k: v for k, v in {"sidecar_url": sidecar_url, "retrain_window_s": window_s,
                                       "retrain_margin": margin,
                                       "retrain_max_original_drop": max_original_drop,
                                       "retrain_live_gate": live_gate,
                                       }.items() if v is not None}
        settings = TrainingSettings(**overrides)
    except ValidationError as exc:
        console.print(f"[red]error:[/] settings: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}")
        raise typer.Exit(2) from exc
    registry = Registry(settings.registry_dir)
    try:
        result = retrain(name, settings=settings, registry=registry,
                         sidecar_url=settings.sidecar_url, trigger=trigger, progress=progress,
                         metric=metric.value if metric else None)
    except RetrainError as exc:
        console.print(f"[red]error:[/] {exc}", soft_wrap=True)  # one line, however long
        raise typer.Exit(2) from exc
    except (TrainingError, ExportError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(3) from exc
    except RegistryError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from exc
    typer.echo(json.dumps(result.to_json(), indent=2))
    verdict = "[green]promoted[/]" if result.promoted else "[yellow]not promoted[/]"
    console.print(f"{name}: challenger v{result.challenger.version if result.challenger else '-'} "
                  f"{verdict}: {result.reason}")
