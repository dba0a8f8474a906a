"""``modelloop``: the command line, and the composition root.

Each package owns its commands (``training/cli.py``, ``serving/cli.py``, ``monitoring/cli.py``);
this module only knows where they are and imports one when it runs, so ``modelloop serve`` never
loads torch and ``modelloop --help`` starts fast.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

import click
import typer
from typer.core import TyperGroup

# command -> (module, attribute, one-line help shown by `modelloop --help`)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("training.cli", "train_app", "Train, evaluate, export to ONNX and register a model."),
    "tune": ("training.tune_cli", "tune_app", "Hyperparameter search (grid, random, Bayesian)."),
    "retrain": ("training.retrain_cli", "retrain_app", "Retrain on production data; promote if better."),
    "quantize": ("training.quantize_cli", "quantize_app", "Quantize a registered version to int8."),
    "prune": ("training.prune_cli", "prune_app", "Prune a registered MLP, fine-tune and measure it."),
    "ensemble": ("training.ensemble_cli", "ensemble_app",
                 "Combine registered classifiers into one ONNX graph; promote if it beats them."),
    "models": ("modelloop.models_cli", "app",
               "List, show, promote, roll back, import, gate and export model versions."),
    "serve": ("serving.cli", "serve_app", "Serve the production model over REST (BentoML)."),
    "batch": ("serving.cli", "batch_app", "Score CSV/Parquet files in bounded memory."),
    "monitor": ("monitoring.cli", "app", "The monitoring sidecar and its tools."),
    "demo": ("modelloop.demo", "app", "Run the whole loop: train, serve, drift, retrain, swap."),
}
# commands another package adds to a group: (group, command) -> (module, attribute). The module
# is imported with its group, so it imports its heavy dependencies inside the command.
SUBCOMMANDS: dict[tuple[str, str], tuple[str, str, str]] = {
    ("models", "import"): ("training.byo_cli", "import_app",
                           "Import an ONNX FILE made elsewhere (torch.onnx, skl2onnx, ...) as a "
                           "new version."),
    ("models", "register"): ("training.byo_cli", "import_app", "The same as models import."),
    ("models", "gate"): ("training.gate_cli", "gate_app",
                         "Judge VERSION of NAME against production on labelled rows; promote "
                         "only a winner."),
    ("models", "export"): ("modelloop.edge_cli", "export_app",
                           "Write a self-contained bundle for the edge (the graph, its schema and "
                           "a predictor needing only onnxruntime and numpy)."),
}
"""Subcommands of a core group that live in a part: imported only when they run (``modelloop
models`` on a serving node has no torch), listed in the group's help with the line here."""


def _load(cmd_name: str, module: str, attr: str) -> Any:
    try:
        target: Any = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise typer.BadParameter(f"command {cmd_name!r} is unavailable: {exc}") from exc
    command = typer.main.get_command(target) if isinstance(target, typer.Typer) else target
    command.name = cmd_name
    return command


class LazyCommand(click.Command):
    """A subcommand from :data:`SUBCOMMANDS`: named and described without importing its module,
    which is imported when the subcommand runs (or shows its own help)."""

    def __init__(self, name: str, module: str, attr: str, help_line: str) -> None:
        super().__init__(name, help=help_line, short_help=help_line)
        self._spec = (module, attr)

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        real: click.Command = _load(self.name or "", *self._spec)
        return real.make_context(info_name, args, parent=parent, **extra)


class LazyGroup(TyperGroup):
    """A command group whose subcommands are imported only when invoked."""

    def list_commands(self, ctx: Any) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[cmd_name]
        command = _load(cmd_name, module, attr)
        for (group, sub), (sub_module, sub_attr, help_line) in SUBCOMMANDS.items():
            if group == cmd_name:
                command.add_command(LazyCommand(sub, sub_module, sub_attr, help_line), sub)
        return command

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        # Listed from the table above, so `--help` imports no command module.
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


app = typer.Typer(
    cls=LazyGroup,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        from modelloop import __version__

        typer.echo(f"modelloop {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: int = typer.Option(0, "-v", "--verbose", count=True, help="-v info, -vv debug logs."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """modelloop: train PyTorch models, serve them on ONNX Runtime through BentoML, watch them
    with a monitoring sidecar, and retrain and swap them when their data drifts.

    Local state lives under $MODELLOOP_HOME (default ./.modelloop).
    """
    level = os.environ.get("MODELLOOP_LOG_LEVEL") or (
        "DEBUG" if verbose > 1 else "INFO" if verbose else "WARNING"
    )
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
