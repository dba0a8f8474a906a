"""``modelloop models gate``: judge a registered challenger against production, promote a winner.

The command lives with the code it calls (``training/gate.py``); the composition root
(``modelloop/cli.py``) adds it to the ``models`` group. It is imported whenever that group is,
so the heavy modules are imported inside the command.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from training.settings import GateMetricChoice  # light: pydantic-settings only

gate_app = typer.Typer(add_completion=False, rich_markup_mode=None)


@gate_app.command()
def gate_command(
    name: Annotated[str, typer.Argument(help="Registered model.")],
    version: Annotated[int, typer.Argument(min=1, help="The challenger: a registered version.")],
    sidecar_url: Annotated[str | None, typer.Option(
        "--sidecar-url", help="Sidecar to fetch labelled production data from (default: "
        "MODELLOOP_TRAINING_SIDECAR_URL).")] = None,
    margin: Annotated[float | None, typer.Option(
        "--margin", min=0, help="How much the challenger must beat the champion by (default "
        "MODELLOOP_TRAINING_RETRAIN_MARGIN).")] = None,
    window_s: Annotated[float | None, typer.Option(
        "--window-s", min=0, help="Only rows labelled in the last N seconds (0: all).")] = None,
    since: Annotated[float | None, typer.Option(
        "--since", min=0, help="Judge on every labelled row from this Unix time on (rows the "
        "challenger did not train on); default: the most recent "
        "MODELLOOP_TRAINING_RETRAIN_HOLDOUT_FRACTION of the window.")] = None,
    metric: Annotated[GateMetricChoice | None, typer.Option(
        "--metric", help="Judge by this metric instead of the one the champion stored "
        "(--gate-metric; versions that stored none: MODELLOOP_TRAINING_RETRAIN_METRIC).")] = None,
) -> None:
    """Judge VERSION of NAME against production on labelled rows; promote only a winner.

    Both are scored on the sidecar's recent labelled rows with the gate `modelloop retrain`
    uses: VERSION is promoted only when it beats the champion by the margin and is not slower.
    The challenger must not have been trained on the holdout: the most recent rows of the
    window, or those from --since on.

    Prints a JSON summary on stdout, as `modelloop retrain` does. Exit codes: 0 the gate ran
    (see "promoted"), 2 unusable data or arguments, 1 a registry or sidecar failure (a
    promotion whose check failed leaves production as it was).
    """
    from pydantic import ValidationError

    from modelloop.registry import ModelNotFound, Registry, RegistryError
    from training.gate import gate
    from training.retrain import RetrainError
    from training.settings import TrainingSettings

    console = Console(stderr=True)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides: dict[str, Any] = {k: v for k, v in {
        "sidecar_url": sidecar_url, "retrain_margin": margin, "retrain_window_s": window_s,
    }.items() if v is not None}
    try:
        settings = TrainingSettings(progress=False, **overrides)
    except ValidationError as exc:
        console.print(f"[red]error:[/] settings: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}")
        raise typer.Exit(2) from exc
    try:
        result = gate(name, version, settings=settings, registry=Registry(settings.registry_dir),
                      sidecar_url=settings.sidecar_url, since=since,
                      metric=metric.value if metric else None)
    except (RetrainError, RegistryError) as exc:  # one line each; a missing version is an argument
        console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
        unusable = isinstance(exc, RetrainError | ModelNotFound)
        raise typer.Exit(2 if unusable else 1) from exc
    typer.echo(json.dumps(result.to_json(), indent=2))
    verdict = "promoted" if result.promoted else "not promoted"
    console.print(f"{name}: v{version} {verdict}: {result.reason}", highlight=False)
