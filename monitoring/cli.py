"""``modelloop monitor``: run the sidecar, post feedback labels, show its status.

    modelloop monitor --port 8001              # the sidecar (same as `modelloop monitor run`)
    modelloop monitor feedback labels.csv      # request_id,label[,timestamp] rows
    modelloop monitor status                   # drift, accuracy, latency, jobs
    modelloop monitor check-policy policy.yaml # validate a policy file
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from monitoring.settings import MonitorSettings

KEYS_HELP = (
    "Keys come from the environment only, one per role: MODELLOOP_MONITOR_API_KEY (admin: every "
    "route), MODELLOOP_MONITOR_INGEST_KEY (POST /events; serving sends it as "
    "MODELLOOP_SERVING_SIDECAR_KEY), MODELLOOP_MONITOR_FEEDBACK_KEY (POST /feedback) and "
    "MODELLOOP_MONITOR_ALERTMANAGER_KEY (POST /alertmanager). A sidecar with a role key needs the "
    "admin key too, and a key of its own for each role; without an admin key it refuses to "
    "listen beyond loopback.")

app = typer.Typer(help="The monitoring sidecar and its tools. Without a command: run the sidecar.",
                  rich_markup_mode=None, add_completion=False)
console = Console(stderr=True)
log = logging.getLogger(__name__)

PortOpt = Annotated[int | None, typer.Option("--port", "-p", help="Port to listen on "
                                             "[env MODELLOOP_MONITOR_PORT, default 8001].")]
HostOpt = Annotated[str | None, typer.Option("--host", help="Interface to listen on "
                                             "[env MODELLOOP_MONITOR_HOST, default 127.0.0.1].")]
StoreOpt = Annotated[str | None, typer.Option("--store", help="sqlite:///PATH or postgresql://... "
                                              "[env MODELLOOP_MONITOR_STORE_URL].")]
PolicyOpt = Annotated[Path | None, typer.Option("--policy", help="Policy YAML "
                                                "[env MODELLOOP_MONITOR_POLICY_FILE].")]
ModelsOpt = Annotated[str | None, typer.Option("--models", help="Models to watch, comma separated "
                                               "[env MODELLOOP_MONITOR_MODELS; default all].")]
UrlOpt = Annotated[str | None, typer.Option("--url", help="The sidecar's base URL [default "
                                            "http://127.0.0.1:$MODELLOOP_MONITOR_PORT].")]


def _fail(message: str, code: int = 1) -> typer.Exit:
    console.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _settings(**overrides: Any) -> MonitorSettings:
    from pydantic import ValidationError

    try:
        return MonitorSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        if not field:  # a rule across settings: its message names them
            raise _fail(f"settings: {err['msg'].removeprefix('Value error, ')}", 2) from exc
        raise _fail(f"setting {field} (MODELLOOP_MONITOR_{field.upper()}): {err['msg']}", 2) from exc


def _serve(port: int | None, host: str | None, store: str | None, policy: Path | None,
           models: str | None) -> None:
    import uvicorn

    from monitoring.app import create_app
    from monitoring.auth import ExposureError, check_exposure
    from monitoring.policy import PolicyError
    from monitoring.sidecar import Sidecar
    from monitoring.store import StoreError

    settings = _settings(port=port, host=host, store_url=store, policy_file=policy, models=models)
    try:
        check_exposure(settings)
    except ExposureError as exc:
        raise _fail(str(exc), 2) from exc
    if logging.getLogger().level > logging.INFO:
        logging.getLogger("monitoring").setLevel(logging.INFO)  # a server says what it does
    sidecar = Sidecar(settings)
    try:
        sidecar.start()
    except (PolicyError, StoreError, ValueError, OSError) as exc:
        raise _fail(str(exc), 2) from exc
    if settings.api_key is None:
        log.warning("no MODELLOOP_MONITOR_API_KEY: every route is open to anyone on %s",
                    settings.host)
    # h11, whose buffer for a request line and headers is bounded (httptools' is not)
    uvicorn.run(create_app(sidecar), host=settings.host, port=settings.port, access_log=False,
                log_level="info", timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
                http="h11", h11_max_incomplete_event_size=settings.max_header_bytes)


@app.callback(invoke_without_command=True, help=(
    "The monitoring sidecar: `modelloop monitor --port 8001` runs it (as does `... run`); the "
    "commands below are its clients and tools.\n\n" + KEYS_HELP))
def main(ctx: typer.Context, port: PortOpt = None, host: HostOpt = None, store: StoreOpt = None,
         policy: PolicyOpt = None, models: ModelsOpt = None) -> None:
    if ctx.invoked_subcommand is None:
        _serve(port, host, store, policy, models)


@app.command("run", help="Run the sidecar: event ingest, feedback, drift, policy, retraining, "
                         "/metrics.\n\n" + KEYS_HELP)
def run(port: PortOpt = None, host: HostOpt = None, store: StoreOpt = None,
        policy: PolicyOpt = None, models: ModelsOpt = None) -> None:
    _serve(port, host, store, policy, models)


def _base_url(url: str | None) -> str:
    return url.rstrip("/") if url else _settings().self_url


def _auth(*roles: str) -> dict[str, str]:
    """The Authorization header with the first of the roles' keys found in the environment
    (``MODELLOOP_MONITOR_FEEDBACK_KEY``, ``MODELLOOP_MONITOR_API_KEY``, ...); none without."""
    s = _settings()
    for role in roles:
        key = getattr(s, f"{role}_key")
        if key is not None:
            return {"Authorization": f"Bearer {key.get_secret_value()}"}
    return {}


_FEEDBACK_LINE = re.compile(r"^feedback\[(\d+)\]\.(.*)$")


def read_feedback_csv(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, {request_id, label[, timestamp]})`` rows; ValueError naming the line."""
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror})") from exc
    rows: list[tuple[int, dict[str, Any]]] = []
    with handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        missing = [c for c in ("request_id", "label") if c not in fields]
        if missing:
            raise ValueError(f"{path}:1: header needs columns request_id and label "
                             f"(missing {', '.join(missing)}; found {', '.join(fields) or 'none'})")
        for row in reader:
            line = reader.line_num
            if None in row:
                raise ValueError(f"{path}:{line}: more values than the header has columns")
            rid = (row.get("request_id") or "").strip()
            label = (row.get("label") or "").strip()
            if not rid:
                raise ValueError(f"{path}:{line}: request_id is empty")
            if not label:
                raise ValueError(f"{path}:{line}: label is empty for request {rid!r}")
            item: dict[str, Any] = {"request_id": rid, "label": label}
            ts = (row.get("timestamp") or "").strip()
            if ts:
                try:
                    item["timestamp"] = float(ts)
                except ValueError:
                    raise ValueError(f"{path}:{line}: timestamp {ts!r} is not unix seconds") from None
                if not math.isfinite(item["timestamp"]):
                    raise ValueError(f"{path}:{line}: timestamp {ts!r} is not finite")
            rows.append((line, item))
    if not rows:
        raise ValueError(f"{path}: no feedback rows")
    return rows


@app.command("feedback")
def feedback(
    file: Annotated[Path, typer.Argument(help="CSV with columns request_id,label[,timestamp]; "
                                              "labels are class names or class indexes.")],
    url: UrlOpt = None,
    batch: Annotated[int, typer.Option(min=1, max=10_000, help="Labels per request.")] = 1000,
) -> None:
    """Post true labels to the sidecar; reports how many joined, and unknown or duplicate ids.

    Sends MODELLOOP_MONITOR_FEEDBACK_KEY as its bearer key (or, without it,
    MODELLOOP_MONITOR_API_KEY, the admin key); no other key is needed."""
    try:
        rows = read_feedback_csv(file)
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    base = _base_url(url)
    joined = 0
    unknown: list[str] = []
    duplicate: list[str] = []
    ambiguous: list[str] = []  # ids two different predictions came with: not joined
    with httpx.Client(base_url=base, timeout=60, headers=_auth("feedback", "api")) as client, Progress(
            TextColumn("feedback"), BarColumn(), MofNCompleteColumn(), console=console,
            transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("labels", total=len(rows))
        for start in range(0, len(rows), batch):
            chunk = rows[start:start + batch]
            try:
                resp = client.post("/feedback", json={"feedback": [item for _, item in chunk]})
            except httpx.HTTPError as exc:
                raise _fail(f"{file}: cannot reach the sidecar at {base}: {exc}") from exc
            if resp.status_code != 200:
                raise _fail(_line_error(file, chunk, resp))
            body = resp.json()
            joined += body["joined"]
            unknown += body["unknown"]
            duplicate += body["duplicate"]
            ambiguous += body.get("ambiguous", [])
            progress.advance(task, len(chunk))
    typer.echo(f"{file}: {joined} labels joined, {len(unknown)} unknown ids, "
               f"{len(duplicate)} duplicates" + (f", {len(ambiguous)} ambiguous ids" if ambiguous else ""))
    for kind, ids in (("unknown", unknown), ("duplicate", duplicate), ("ambiguous", ambiguous)):
        if ids:
            typer.echo(f"  {kind}: {', '.join(ids[:10])}{' ...' if len(ids) > 10 else ''}")


def _line_error(file: Path, chunk: list[tuple[int, dict[str, Any]]], resp: httpx.Response) -> str:
    try:
        message = resp.json().get("error", resp.text)
    except ValueError:
        message = resp.text[:200]
    match = _FEEDBACK_LINE.match(message)
    if match and int(match.group(1)) < len(chunk):
        return f"{file}:{chunk[int(match.group(1))][0]}: {match.group(2)}"
    return f"{file}: the sidecar answered {resp.status_code}: {message}"


def _estimate_text(q: dict[str, Any]) -> str:
    """``0.912 [0.893, 0.931]``, and ``(unreliable)`` when rows are out of support."""
    est = q.get("estimated_accuracy")
    if est is None:
        return "-"
    text = f"{est:.3f}"
    if q.get("estimate_lower") is not None:
        text += f" [{q['estimate_lower']:.3f}, {q['estimate_upper']:.3f}]"
    if q.get("estimate_reliable") is False:
        text += " (unreliable: rows out of support)"
    return text


@app.command("status")
def status(url: UrlOpt = None,
           as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON.")] = False,
           check: Annotated[bool, typer.Option("--check", help="Run a check first.")] = False) -> None:
    """Show drift, accuracy, latency, policy rules and jobs of a running sidecar.

    Sends MODELLOOP_MONITOR_API_KEY (the admin key) as its bearer key: /status and /check are
    admin routes."""
    base = _base_url(url)
    try:
        headers = _auth("api")
        resp = (httpx.post(f"{base}/check", timeout=300, headers=headers) if check
                else httpx.get(f"{base}/status", timeout=30, headers=headers))
        resp.raise_for_status()
    except httpx.HTTPError as exc:
        raise _fail(f"cannot get the status of the sidecar at {base}: {exc}") from exc
    data = resp.json()
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    typer.echo(f"sidecar at {base}: {'ready' if data['ready'] else 'not ready'}, "
               f"store {data['store']}, trigger {data['trigger']}")
    for model, st in data["models"].items():
        drift = st.get("drift", {})
        typer.echo(f"{model} v{st.get('version')}: {st.get('window_rows', 0)} rows in window")
        if drift.get("judged"):
            typer.echo(f"  drift share {drift['share']:.2f} "
                       f"(drifted: {', '.join(drift['drifted_features']) or 'none'})")
            joint = drift.get("multivariate") or {}
            typer.echo(f"  joint drift: {', '.join(joint.get('pairs') or []) or 'none'}")
        else:
            typer.echo(f"  drift not judged: {drift.get('note', '')}")
        if dq := st.get("data_quality"):
            typer.echo(f"  out of support {dq['out_of_support_rows_share']:.1%} of rows, "
                       f"missing at most {dq['max_missing_share']:.1%} of a feature")
        for version, q in (st.get("quality") or {}).items():
            count = q["scores"].get("count") or {}
            acc = f"{count['accuracy']:.3f}" if count else "-"
            typer.echo(f"  v{version}: accuracy {acc} on {q['labelled']} labels, estimated "
                       f"{_estimate_text(q)}, coverage {q['coverage']:.2f}")
        lat = st.get("latency_s") or {}
        if lat:
            typer.echo(f"  latency p50 {lat['0.5'] * 1000:.1f} ms, p95 {lat['0.95'] * 1000:.1f} ms, "
                       f"p99 {lat['0.99'] * 1000:.1f} ms")
    for rule in data["policy"]["rules"]:
        if rule["state"] not in ("ok", "insufficient"):
            typer.echo(f"rule {rule['rule']} [{rule['scope']}]: {rule['state']} "
                       f"({rule['condition']}, value {rule['value']})")
    for job in data["jobs"][:5]:
        typer.echo(f"job {job['id']}: {job['status']} ({job['trigger']}) {job['detail']}")


@app.command("check-policy")
def check_policy(file: Annotated[Path, typer.Argument(help="Policy YAML to validate.")]) -> None:
    """Validate a policy file the way the sidecar does at start-up (no sidecar, no key)."""
    from monitoring.policy import PolicyError, load_policy

    try:
        policy = load_policy(file)
    except PolicyError as exc:
        raise _fail(str(exc)) from exc
    for rule in policy.rules:
        typer.echo(f"{rule.name}: {rule.describe()} -> {rule.action} (min {rule.min_samples} "
                   f"samples, for {rule.for_s:g} s, cooldown {rule.cooldown_s:g} s)")
