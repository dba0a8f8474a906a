"""``modelloop models``: list, show, promote and roll back registered versions."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from modelloop.registry import BrokenVersion, Registry, RegistryError
from modelloop.settings import HomeSettings

app = typer.Typer(help="List, show, promote and roll back registered model versions.",
                  no_args_is_help=True)
console = Console()


def _registry() -> Registry:
    return Registry(HomeSettings().registry_dir)


def _fail(exc: Exception) -> typer.Exit:
    console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)  # one line, however long
    return typer.Exit(code=1)


@app.command("list")
def list_models(
    name: Annotated[str | None, typer.Argument(help="Only this model's versions.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List registered models and their versions, with aliases and headline metrics.

    A version whose metadata cannot be read is listed as broken, with the reason."""
    reg = _registry()
    rows: list[dict[str, Any]] = []
    try:
        for model in [name] if name else reg.models():
            aliases = reg.aliases(model)
            by_version: dict[int, list[str]] = {}
            for alias, v in aliases.items():
                by_version.setdefault(v, []).append(alias)
            for number in reg.version_numbers(model):
                try:
                    meta = reg.get(model, number).metadata
                except BrokenVersion as exc:
                    rows.append({"name": model, "version": number,
                                 "aliases": sorted(by_version.get(number, [])), "error": str(exc)})
                    continue
                rows.append({
                    "name": model,
                    "version": meta.version,
                    "aliases": sorted(by_version.get(meta.version, [])),
                    "task": meta.task.value,
                    "architecture": meta.architecture,
                    "created_at": meta.created_at.isoformat(),
                    "metrics": meta.metrics,
                    "parent_version": meta.parent_version,
                })
    except RegistryError as exc:
        raise _fail(exc) from exc
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"models in {reg.root}")
    for col in ("name", "version", "aliases", "arch", "created", "accuracy/r2", "parent"):
        table.add_column(col)
    for r in rows:
        if "error" in r:
            table.add_row(r["name"], str(r["version"]), ",".join(r["aliases"]), "[red]broken[/]",
                          "", "", "")
            continue
        m = r["metrics"]
        score = m.get("accuracy", m.get("r2", m.get("roc_auc")))
        table.add_row(r["name"], str(r["version"]), ",".join(r["aliases"]), r["architecture"],
                      r["created_at"][:19], "" if score is None else f"{score:.4f}",
                      "" if r["parent_version"] is None else str(r["parent_version"]))
    console.print(table)
    for r in rows:
        if "error" in r:
            console.print(f"[red]broken:[/] {escape(r['error'])}", soft_wrap=True, highlight=False)


@app.command()
def show(
    name: Annotated[str, typer.Argument(help="Model name.")],
    ref: Annotated[str, typer.Argument(help="Version number or alias.")] = "production",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show one version: metadata, metrics, parity, lineage and the ONNX file path."""
    reg = _registry()
    try:
        mv = reg.get(name, ref)
    except RegistryError as exc:
        raise _fail(exc) from exc
    data = json.loads(mv.metadata.model_dump_json())
    data["onnx_path"] = str(mv.onnx_path.resolve())
    data["aliases"] = sorted(a for a, v in reg.aliases(name).items() if v == mv.version)
    typer.echo(json.dumps(data, indent=2) if as_json else _pretty(data))


def _pretty(data: dict[str, Any]) -> str:
    lines = [f"{data['name']} v{data['version']}  ({data['task']}, {data['architecture']})",
             f"  aliases:   {', '.join(data['aliases']) or '-'}",
             f"  onnx:      {data['onnx_path']}",
             f"  created:   {data['created_at']}",
             f"  parent:    {data['parent_version']}",
             f"  features:  {len(data['feature_names'])}",
             f"  classes:   {data['class_labels']}",
             f"  gate:      {data['config'].get('gate_metric') or '-'}"]
    categories = data.get("categories") or {}
    if categories:  # each categorical feature, with how many values its graph codes
        lines.insert(6, "  categorical: " + ", ".join(f"{name} ({len(values)} values)"
                                                      for name, values in categories.items()))
    report = data["lineage"].get("data_report")
    if isinstance(report, dict):
        lines += _data_lines(report)
    q = data["lineage"].get("quantization")
    if isinstance(q, dict):
        lines.append(f"  int8:      {q.get('method')} from v{q.get('source_version')}, "
                     f"{q.get('metric')} loss {float(q.get('loss_points', 0.0)):.2f} points, "
                     f"{'promotable' if q.get('promotable') else 'not promotable'}")
    pruning = data["lineage"].get("pruning")
    if isinstance(pruning, dict):
        hidden = pruning.get("hidden", {})
        lines.append(f"  pruned:    {'structured' if pruning.get('structured') else 'unstructured'} "
                     f"{pruning.get('amount')} from v{pruning.get('source_version')}, hidden "
                     f"{hidden.get('parent')} -> {hidden.get('pruned')}, {pruning.get('metric')} "
                     f"loss {float(pruning.get('loss_points', 0.0)):.2f} points, "
                     f"{'promotable' if pruning.get('promotable') else 'not promotable'}")
    ens = data["lineage"].get("ensemble")
    if isinstance(ens, dict):
        lines.append(f"  ensemble:  {ens.get('method')} of "
                     f"{', '.join(f'v{v}' for v in ens.get('members', []))}, {ens.get('metric')} "
                     f"{float(ens.get('gain_points', 0.0)):+.2f} points against the best member "
                     f"v{ens.get('best_member')}, "
                     f"{'promotable' if ens.get('promotable') else 'not promotable'}")
    if data.get("parity"):
        p = data["parity"]
        against = (f"int8 vs fp32 v{q.get('source_version')}" if isinstance(q, dict) else
                   "vs its members run separately" if isinstance(ens, dict) else "vs PyTorch")
        lines.append(f"  parity:    {'ok' if p['passed'] else 'FAILED'} ({against}: max abs diff "
                     f"{p['max_abs_diff']:.2e}, tolerance {p['tolerance']:.0e})")
    lines.append("  metrics:")
    lines += [f"    {k:<12} {v:.4f}" for k, v in sorted(data["metrics"].items())]
    return "\n".join(lines)


def _data_lines(report: dict[str, Any]) -> list[str]:
    """The training data report (``lineage.data_report``) in two lines."""
    columns = report.get("columns", [])
    conflicts = report.get("conflicts")
    lines = [f"  data:      {report.get('rows')} rows, {report.get('duplicates')} exact duplicates "
             f"{'removed' if report.get('cleaned') else 'kept'}, "
             f"{'-' if conflicts is None else conflicts} conflicting label groups"]
    notes = [f"constant: {', '.join(c['name'] for c in columns if c.get('constant')) or '-'}",
             "missing: " + (", ".join(f"{c['name']} {c['missing']:.1%}" for c in columns
                                      if c.get("missing")) or "-"),
             "outliers: " + (", ".join(f"{c['name']} {c['outliers']}" for c in columns
                                       if c.get("outliers")) or "-")]
    return [*lines, f"             {'; '.join(notes)}"]


def not_promotable(lineage: dict[str, Any]) -> str | None:
    """Why a version must not be promoted without ``--force``, or None: an int8 quantization
    (``modelloop quantize``) or a pruned model (``modelloop prune``) whose metric loss exceeded
    the allowed one when it was made, or an ensemble (``modelloop ensemble``) that did not beat
    its best member by the margin."""
    for key, what in (("quantization", "an int8 quantization"), ("pruning", "a pruned model")):
        q = lineage.get(key)
        if isinstance(q, dict) and q.get("promotable") is False:
            return (f"it is {what} of v{q.get('source_version')} that loses "
                    f"{float(q.get('loss_points', float('nan'))):.2f} points of {q.get('metric')} "
                    f"(at most {float(q.get('max_loss_points', float('nan'))):.2f} allowed)")
    e = lineage.get("ensemble")
    if isinstance(e, dict) and e.get("promotable") is False:
        return (f"it is an ensemble whose {e.get('metric')} is "
                f"{float(e.get('gain_points', float('nan'))):+.2f} points against its best member "
                f"v{e.get('best_member')} (at least {float(e.get('margin_points', float('nan'))):+.2f} "
                "asked: MODELLOOP_TRAINING_ENSEMBLE_MARGIN)")
    return None


@app.command()
def promote(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[str, typer.Argument(help="Version number (or alias) to make production.")],
    force: Annotated[bool, typer.Option(
        "--force", help="Promote an int8 or pruned version even though it lost more accuracy than "
        "allowed (the version is still checked: a broken one is never promoted).")] = False,
    alias: Annotated[str, typer.Option(
        "--alias", help="The alias to move: production (the default; the old one becomes "
        "'previous'), or another such as canary (see `modelloop models traffic`).")] = "production",
) -> None:
    """Make VERSION the production version; the old production becomes 'previous'.

    The version is loaded and run on its reference rows first; one that fails to load, gives
    NaN or infinity, or predicts otherwise than its reference sample is refused, --force or not.
    An int8 (`modelloop quantize`) or pruned (`modelloop prune`) version that lost more than the
    allowed accuracy is refused unless --force is given. With --alias canary (or another alias)
    only that alias moves, after the same checks.
    """
    reg = _registry()
    try:
        target = reg.get(name, version)
        why = None if force else not_promotable(target.metadata.lineage)
        if why is None and alias != "production":
            reg.set_alias(name, alias, target.version)
            console.print(f"{name}: {alias} -> v{target.version}")
            return
        if why is None:
            aliases = reg.promote(name, target.version)
    except BrokenVersion as exc:
        raise _fail(RegistryError(f"not promoted: {exc}")) from exc
    except RegistryError as exc:
        raise _fail(exc) from exc
    if why is not None:
        raise _fail(RegistryError(f"{name} v{target.version} not promoted: {why}; use --force "
                                  "to promote it anyway"))
    console.print(f"{name}: production -> v{aliases['production']}"
                  + (f" (previous v{aliases['previous']})" if "previous" in aliases else ""))


@app.command()
def rollback(name: Annotated[str, typer.Argument(help="Model name.")]) -> None:
    """Bring the previous version back into production (swap 'production' and 'previous').

    The previous version is checked first (as promote does); a broken one is refused."""
    try:
        aliases = _registry().rollback(name)
    except BrokenVersion as exc:
        raise _fail(RegistryError(f"not rolled back: {exc}")) from exc
    except RegistryError as exc:
        raise _fail(exc) from exc
    console.print(f"{name}: rolled back, production -> v{aliases['production']}"
                  + (f" (previous v{aliases['previous']})" if "previous" in aliases else
                     " (no previous version: the one replaced failed its check)"), soft_wrap=True)


@app.command()
def traffic(
    name: Annotated[str, typer.Argument(help="Model name.")],
    canary_share: Annotated[float, typer.Option(
        "--canary-share", min=0.0, max=1.0,
        help="Share of requests (0-1) that go to the 'canary' alias; 0 sends all to production.")],
) -> None:
    """Set the share of requests serving sends to the canary version (sticky by request id).

    Serving reads it when it polls the aliases: no restart. The canary alias is set with
    `modelloop models promote NAME VERSION --alias canary`, removed with `modelloop models unalias`."""
    try:
        _registry().set_canary_share(name, canary_share)
    except RegistryError as exc:
        raise _fail(exc) from exc
    console.print(f"{name}: canary share {canary_share:g}")


@app.command()
def unalias(
    name: Annotated[str, typer.Argument(help="Model name.")],
    alias: Annotated[str, typer.Argument(help="The alias to remove (canary, ...; not production).")],
) -> None:
    """Remove an alias (canary: all traffic goes back to production)."""
    try:
        aliases = _registry().remove_alias(name, alias)
    except RegistryError as exc:
        raise _fail(exc) from exc
    console.print(f"{name}: aliases {json.dumps(aliases, sort_keys=True)}")


@app.command()
def history(
    name: Annotated[str, typer.Argument(help="Model name.")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line, as stored.")] = False,
) -> None:
    """Every alias change of a model, oldest first: promotions, rollbacks, canary and challenger
    aliases, canary shares, and the live gate's decisions with their numbers."""
    reg = _registry()
    if name not in reg.models():
        raise _fail(RegistryError(f"model {name!r} is not registered under {reg.root}"))
    events = reg.history(name)
    if as_json:
        for event in events:
            typer.echo(json.dumps(event, sort_keys=True))
        return
    table = Table("time (UTC)", "change", "aliases after", "why")
    for event in events:
        when = datetime.fromtimestamp(event["time"], UTC).strftime("%Y-%m-%d %H:%M:%S")
        change = " ".join(str(event[k]) for k in ("op", "alias", "version", "share") if k in event)
        gate = event.get("live_gate")
        why = f"live gate: {gate['reason']}" if gate else event.get("not_previous", "")
        table.add_row(when, change, json.dumps(event.get("aliases", {}), sort_keys=True), escape(why))
    console.print(table)
