"""``modelloop demo``: the whole loop on one machine, with embedded defaults.

It trains v1 on the synthetic task, starts the serving process and the monitoring sidecar (and a
local Prometheus when one is installed), sends traffic through ``/predict`` and feeds the true
labels back, then shifts the data: two features move and the concept changes. The sidecar sees
the drift and the falling accuracy and fires the retraining job, which trains v2 on the new data
and judges it against v1 on the most recent labels; passing, v2 is named the challenger. Serving
scores a copy of live traffic with it (shadow), the sidecar compares both on the same labelled
requests and promotes v2 when it wins with significance (the live gate); serving swaps to it under
load.
The demo prints a timeline of what happened, with the numbers, and where to look.

The demo composes the parts only through their command lines and HTTP APIs (like a user would),
so it imports none of the packages; it compresses days into minutes, so its windows are short.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
import numpy as np
import pandas as pd
import typer
from rich.console import Console
from rich.table import Table

from modelloop.ports import free_port
from modelloop.registry import Registry
from modelloop.synthetic import TARGET, SyntheticTask

app = typer.Typer(add_completion=False)
console = Console()

MODEL = "demo"
SHIFT = {"f03": 2.0, "f07": -1.5}
POLICY = """\
# The demo's policy: the same rules as the default, on windows that fit a few minutes.
defaults: {{min_samples: 300, for: 0s, cooldown: 10m}}
rules:
  - {{name: data-drift, metric: data_drift, min_samples: {drift_rows}, action: retrain}}
  - {{name: accuracy-floor, metric: accuracy, window: count, threshold: 0.8, min_samples: 300,
     action: retrain}}
  - {{name: estimated-accuracy-floor, metric: estimated_accuracy, threshold: 0.75, action: alert}}
  - {{name: latency-p95, metric: latency_p95, threshold: 0.25, min_samples: 100, action: alert}}
"""
PROMETHEUS = """\
global: {{scrape_interval: 2s, evaluation_interval: 2s}}
rule_files: [{rules}]
scrape_configs:
  - job_name: modelloop-serving
    static_configs: [{{targets: ["127.0.0.1:{serve}"]}}]
  - job_name: modelloop-monitor
    static_configs: [{{targets: ["127.0.0.1:{monitor}"]}}]
"""


def _exe() -> str:
    return str(Path(sys.executable).with_name("modelloop"))


@dataclass
class Timeline:
    """What happened when, printed as it happens and again as a table at the end."""

    start: float = field(default_factory=time.monotonic)
    rows: list[tuple[float, str, str]] = field(default_factory=list)

    def __call__(self, what: str, numbers: str = "") -> None:
        t = time.monotonic() - self.start
        self.rows.append((t, what, numbers))
        console.print(f"[dim]{t:6.1f}s[/] [bold]{what}[/] {numbers}")

    def table(self) -> Table:
        table = Table(title="modelloop demo: timeline")
        for col in ("t", "what happened", "numbers"):
            table.add_column(col)
        for t, what, numbers in self.rows:
            table.add_row(f"{t:.1f}s", what, numbers)
        return table


class Stack:
    """The processes of the demo: serving, sidecar and (optionally) Prometheus."""

    def __init__(self, home: Path, keep_logs: Path) -> None:
        self.home = home
        self.logs = keep_logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.serve_port, self.monitor_port = free_port(), free_port()
        self.serve_url = f"http://127.0.0.1:{self.serve_port}"
        self.monitor_url = f"http://127.0.0.1:{self.monitor_port}"
        self.prometheus_url: str | None = None
        # the sidecar's role keys, new each run, as a deployment would hold them
        self.keys = {role: secrets.token_hex(24) for role in ("api", "ingest", "feedback")}

    def key_env(self) -> dict[str, str]:
        return {f"MODELLOOP_MONITOR_{role.upper()}_KEY": key for role, key in self.keys.items()}

    def monitor(self, role: str) -> dict[str, str]:
        """The Authorization header of a role's key (``api`` is the admin key)."""
        return {"Authorization": f"Bearer {self.keys[role]}"}

    def start(self, name: str, args: list[str], env: dict[str, str], ready_url: str,
              timeout: float = 180.0) -> None:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(args, env={**os.environ, **env}, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited with {self.procs[name].returncode}; "
                                   f"see {self.logs / (name + '.log')}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(ready_url, timeout=1).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{name} not ready after {timeout:.0f} s; see {self.logs / (name + '.log')}")

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@dataclass
class Load:
    """Single-row requests in a loop (a client that never stops), counting failures: the swap
    must fail none of them."""

    url: str
    rows: pd.DataFrame
    sent: int = 0
    failed: int = 0
    versions: set[int] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        records = self.rows.to_dict("records")
        with httpx.Client(base_url=self.url, timeout=30) as client:
            i = 0
            while not self._stop.is_set():
                try:
                    resp = client.post("/predict", json={"instances": [records[i % len(records)]]})
                    ok = resp.status_code == 200
                    if ok:
                        self.versions.add(int(resp.json()["version"]))
                    elif len(self.errors) < 5:
                        self.errors.append(f"{resp.status_code} {resp.text[:100]}")
                except httpx.HTTPError as exc:
                    ok = False
                    if len(self.errors) < 5:
                        self.errors.append(repr(exc))
                self.sent += 1
                self.failed += not ok
                i += 1
                time.sleep(0.01)

    @contextlib.contextmanager
    def running(self) -> Iterator[Load]:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(30)


def _predict(client: httpx.Client, df: pd.DataFrame) -> tuple[list[str], np.ndarray, int]:
    resp = client.post("/predict", json={"instances": df.drop(columns=[TARGET]).to_dict("records")})
    resp.raise_for_status()
    body = resp.json()
    preds = np.array([int(p["prediction"]) for p in body["predictions"]])
    return [p["request_id"] for p in body["predictions"]], preds, int(body["version"])


def _ingested(monitor_url: str) -> float:
    text = httpx.get(f"{monitor_url}/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("modelloop_events_ingested_total{"))


def _feedback(stack: Stack, ids: list[str], labels: np.ndarray, expected: float) -> None:
    """Labels arrive after their predictions (from a label provider holding the feedback key):
    wait until the sidecar holds the events."""
    deadline = time.monotonic() + 30
    while _ingested(stack.monitor_url) < expected and time.monotonic() < deadline:
        time.sleep(0.1)
    body = {"feedback": [{"request_id": r, "label": str(y)} for r, y in zip(ids, labels, strict=True)]}
    httpx.post(f"{stack.monitor_url}/feedback", json=body, timeout=30,
               headers=stack.monitor("feedback")).raise_for_status()


def _check(stack: Stack) -> None:
    httpx.post(f"{stack.monitor_url}/check", timeout=120,
               headers=stack.monitor("api")).raise_for_status()


def _model_status(stack: Stack) -> dict[str, Any]:
    resp = httpx.get(f"{stack.monitor_url}/status", timeout=30, headers=stack.monitor("api"))
    status = resp.raise_for_status().json()
    return {"model": status["models"].get(MODEL, {}), "jobs": status["jobs"]}


def run_demo(home: Path, *, keep_running: bool, batch_rows: int, timeout_s: float) -> int:
    tl = Timeline()
    if home.exists():
        shutil.rmtree(home)
    logs = home / "logs"
    logs.mkdir(parents=True)
    env = {"MODELLOOP_HOME": str(home.resolve()), "BENTOML_HOME": str((home / "bentoml").resolve()),
           "BENTOML_DO_NOT_TRACK": "True"}
    console.rule("modelloop demo")
    console.print(f"state under {home}, logs under {logs}")

    # 1. train, export, check and register v1 on the synthetic task; promote it
    tl("training v1", "synthetic task, 5000 rows, 20 features")
    proc = subprocess.run([_exe(), "train", "--dataset", "synthetic", "--name", MODEL,
                           "--promote", "--json", "--no-progress"],
                          env={**os.environ, **env}, capture_output=True, text=True)
    if proc.returncode != 0:
        console.print(proc.stderr)
        return proc.returncode
    registry = Registry(home / "registry")
    v1 = registry.get(MODEL, "production").metadata
    tl("v1 registered and promoted",
       f"test accuracy {v1.metrics['accuracy']:.3f}, ROC-AUC {v1.metrics['roc_auc']:.3f}, "
       f"ONNX parity max diff {v1.parity.max_abs_diff if v1.parity else float('nan'):.1e}")

    # 2. the sidecar and serving
    stack = Stack(home, logs)
    policy = home / "policy.yaml"
    policy.write_text(POLICY.format(drift_rows=batch_rows * 2))
    # the demo's labels are the synthetic task's own, and its concept shift is real: the job may
    # promote a challenger that contradicts the original data, which by default it holds for a
    # person to review (labels meant to poison retraining look the same)
    retrain_cmd = (f"{_exe()} retrain --name {{model}} --sidecar-url {stack.monitor_url} "
                   f"--trigger {{trigger}} --max-original-drop 1 --live-gate")
    try:
        stack.start("sidecar", [_exe(), "monitor", "--port", str(stack.monitor_port)], {
            **env, **stack.key_env(),
            "MODELLOOP_MONITOR_MODELS": MODEL, "MODELLOOP_MONITOR_POLICY_FILE": str(policy),
            "MODELLOOP_MONITOR_CHECK_INTERVAL_S": "2", "MODELLOOP_MONITOR_WINDOW_EVENTS": str(batch_rows * 4),
            "MODELLOOP_MONITOR_MIN_WINDOW_ROWS": str(batch_rows * 2),
            "MODELLOOP_MONITOR_REPORT_INTERVAL_S": "10", "MODELLOOP_MONITOR_RETRAIN_COMMAND": retrain_cmd,
            "MODELLOOP_MONITOR_LIVE_GATE_MIN_ROWS": str(batch_rows),
        }, f"{stack.monitor_url}/ready")
        stack.start("serving", [_exe(), "serve", "--port", str(stack.serve_port),
                                "--host", "127.0.0.1", "--workers", "1"], {
            **env, "MODELLOOP_SERVING_MODEL": MODEL, "MODELLOOP_SERVING_SIDECAR_URL": stack.monitor_url,
            "MODELLOOP_SERVING_SIDECAR_KEY": stack.keys["ingest"],
            "MODELLOOP_SERVING_EVENT_FLUSH_INTERVAL_S": "0.2",
            "MODELLOOP_SERVING_ALIAS_POLL_INTERVAL_S": "1",
        }, f"{stack.serve_url}/v2/health/ready")
        tl("serving and sidecar up", f"{stack.serve_url}  {stack.monitor_url}")
        _start_prometheus(stack, tl)
        code = _loop(stack, registry, tl, batch_rows=batch_rows, timeout_s=timeout_s)
        console.print(tl.table())
        _where_to_look(stack, home)
        if keep_running and code == 0:
            console.print("[bold]--keep-running:[/] the stack stays up; Ctrl-C stops it.")
            with contextlib.suppress(KeyboardInterrupt):
                while all(p.poll() is None for p in stack.procs.values()):
                    time.sleep(1)
        return code
    finally:
        stack.stop()


def _start_prometheus(stack: Stack, tl: Timeline) -> None:
    binary = shutil.which("prometheus")
    rules = Path(__file__).resolve().parents[1] / "helm" / "modelloop" / "files" / "prometheus" / "rules.yml"
    if binary is None:
        tl("no local Prometheus", "(install the Debian package 'prometheus' to scrape the demo)")
        return
    port = free_port()
    config = stack.home / "prometheus.yml"
    config.write_text(PROMETHEUS.format(serve=stack.serve_port, monitor=stack.monitor_port,
                                        rules=f'"{rules}"' if rules.exists() else ""))
    stack.prometheus_url = f"http://127.0.0.1:{port}"
    try:
        stack.start("prometheus", [binary, f"--config.file={config}",
                                   f"--storage.tsdb.path={stack.home / 'prometheus'}",
                                   f"--web.listen-address=127.0.0.1:{port}"], {},
                    f"{stack.prometheus_url}/-/ready", timeout=60)
        tl("Prometheus scraping serving and sidecar", stack.prometheus_url)
    except RuntimeError as exc:
        stack.prometheus_url = None
        tl("Prometheus did not start", str(exc))


class _Traffic:
    """Labelled batches sent to serving with their labels sent to the sidecar, and the accuracy
    of each batch by phase and served version."""

    def __init__(self, stack: Stack, client: httpx.Client) -> None:
        self.stack = stack
        self.client = client
        self.sent = 0
        self.accuracy: dict[str, list[float]] = {}

    def step(self, df: pd.DataFrame, phase: str) -> tuple[int, float]:
        """Predict ``df``, label it; the version that served it and its accuracy."""
        ids, preds, version = _predict(self.client, df)
        self.sent += len(ids)
        _feedback(self.stack, ids, df[TARGET].to_numpy(), self.sent)
        a = float((preds == df[TARGET].to_numpy()).mean())
        self.accuracy.setdefault(f"{phase} v{version}", []).append(a)
        return version, a


def _loop(stack: Stack, registry: Registry, tl: Timeline, *, batch_rows: int,
          timeout_s: float) -> int:
    task = SyntheticTask(seed=0)
    client = httpx.Client(base_url=stack.serve_url, timeout=60)
    traffic = _Traffic(stack, client)

    # 3. stationary traffic: no drift, accuracy as at training time
    for i in range(4):
        traffic.step(task.sample(batch_rows, seed=100 + i), "stationary")
    _check(stack)  # judge now
    state = _model_status(stack)["model"]
    drift = state.get("drift", {})
    tl("stationary traffic sent with labels",
       f"{4 * batch_rows} rows; v1 accuracy {np.mean(traffic.accuracy['stationary v1']):.3f}; "
       f"drift share {drift.get('share', float('nan')):.2f}, drifted "
       f"{drift.get('drifted_features', [])}")

    # 4. the world changes: two features shift and the concept moves
    tl("data shifts", f"covariate shift {SHIFT}, concept shift 1.0 (the retraining job is told the "
       "labels were checked: --max-original-drop 1)")
    load = Load(stack.serve_url, task.sample(500, seed=999, shift=SHIFT, concept=1.0).drop(columns=[TARGET]))
    deadline = time.monotonic() + timeout_s
    with load.running():
        swapped = _shifted(stack, registry, tl, traffic, task, batch_rows=batch_rows,
                           deadline=deadline)
    client.close()
    _summary(stack, tl, load, traffic.accuracy, batch_rows)
    if not swapped:
        tl("no new version was served before the timeout", f"{timeout_s:.0f} s")
        return 1
    return 0 if load.failed == 0 else 1


def _shifted(stack: Stack, registry: Registry, tl: Timeline, traffic: _Traffic,
             task: SyntheticTask, *, batch_rows: int, deadline: float) -> bool:
    """Shifted traffic until a retrained version served four batches (or the retraining failed,
    or the deadline passed), telling the timeline what happens; whether a new version served."""
    seen_drift = seen_job = seen_challenger = False
    swapped_at: float | None = None
    i = 0
    while time.monotonic() < deadline:
        version, a = traffic.step(task.sample(batch_rows, seed=200 + i, shift=SHIFT, concept=1.0),
                                  "shifted")
        i += 1
        time.sleep(0.5)  # steady traffic, not a flood
        st = _model_status(stack)
        drift = st["model"].get("drift", {})
        if not seen_drift and drift.get("drifted_features"):
            seen_drift = True
            q = st["model"].get("quality", {}).get("1", {})
            tl("drift detected", f"drifted {drift['drifted_features']}, share "
               f"{drift['share']:.2f}; v1 accuracy on shifted data {a:.3f}, estimated "
               f"{q.get('estimated_accuracy', float('nan')):.3f} (a confidence-based "
               f"estimate cannot see a concept shift: labels can)")
        if not seen_job and st["jobs"]:
            seen_job = True
            job = st["jobs"][0]
            tl("retraining fired", f"job {job.get('id', '')} by {job.get('trigger', '')}: "
               f"{str(job.get('reason', ''))[:90]}")
        challenger = registry.aliases(MODEL).get("challenger")
        if challenger is not None and not seen_challenger:
            seen_challenger = True
            gate = registry.get(MODEL, challenger).metadata.lineage.get("gate", {})
            tl(f"v{challenger} named challenger, shadowing v1",
               f"holdout {gate.get('metric')}: v{challenger} {gate.get('challenger_score', 0):.3f} "
               f"vs v1 {gate.get('champion_score', 0):.3f} (won by "
               f"{gate.get('challenger_score', 0) - gate.get('champion_score', 0):+.3f}); serving "
               "scores a copy of live traffic with it, off the request path")
        if version > 1 and swapped_at is None:
            swapped_at = time.monotonic()
            live: dict[str, Any] = next((e.get("live_gate", {}) for e in reversed(registry.history(MODEL))
                         if e.get("op") == "promote" and e.get("version") == version), {})
            tl(f"live gate promoted v{version}, swapped in",
               f"live accuracy v{version} {live.get('challenger_score', float('nan')):.3f} vs v1 "
               f"{live.get('champion_score', float('nan')):.3f} on the same "
               f"{live.get('judged_rows', 0)} labelled requests (McNemar p "
               f"{live.get('p_value') or float('nan'):.1e})")
        if swapped_at is not None and len(traffic.accuracy.get(f"shifted v{version}", [])) >= 4:
            break
        if st["jobs"] and st["jobs"][0].get("status") == "failed":
            tl("retraining failed", f"see {stack.home / 'jobs'}")
            break
    return swapped_at is not None


def _summary(stack: Stack, tl: Timeline, load: Load, accuracy: dict[str, list[float]],
             batch_rows: int) -> None:
    """The sidecar's view of each served version, the load during the swap, and the accuracy
    of the traffic by phase and version."""
    _check(stack)
    quality = _model_status(stack)["model"].get("quality", {})
    tl("sidecar's view of the served version", "; ".join(
        f"v{v}: realised accuracy {(q['scores'].get('count') or {}).get('accuracy', float('nan')):.3f} "
        f"over {q['labelled']} labels, estimated {q.get('estimated_accuracy') or float('nan'):.3f}"
        for v, q in sorted(quality.items())))
    tl("load during the swap", f"{load.sent} single-row requests, {load.failed} failed, "
       f"versions served {sorted(load.versions)}" + (f"; errors {load.errors}" if load.errors else ""))
    table = Table(title="accuracy on the traffic, by phase and served version")
    table.add_column("phase / version")
    table.add_column("rows")
    table.add_column("accuracy")
    for key, values in accuracy.items():
        table.add_row(key, str(len(values) * batch_rows), f"{np.mean(values):.3f}")
    console.print(table)


def _where_to_look(stack: Stack, home: Path) -> None:
    console.print("\n[bold]Where to look[/]")
    keys = home / "sidecar-keys.env"
    keys.write_text("".join(f"export {k}={v}\n" for k, v in stack.key_env().items()))
    keys.chmod(0o600)
    lines = [
        f"serving          {stack.serve_url}/predict  (metrics: {stack.serve_url}/metrics)",
        f"sidecar keys     {keys}  (`source` it; then curl -H \"Authorization: Bearer "
        "$MODELLOOP_MONITOR_API_KEY\" ...)",
        f"sidecar status   {stack.monitor_url}/status",
        f"drift report     {stack.monitor_url}/reports/drift/latest",
        f"sidecar metrics  {stack.monitor_url}/metrics",
        f"registry         modelloop models list   (MODELLOOP_HOME={home})",
        f"retrain job logs {home / 'jobs'}",
        f"process logs     {home / 'logs'}",
    ]
    if stack.prometheus_url:
        lines.append(f"Prometheus       {stack.prometheus_url}/alerts")
    for line in lines:
        console.print("  " + line)


@app.command()
def demo(
    home: Annotated[Path, typer.Option(
        "--home", help="Where the demo keeps its state (wiped at start).")] = Path(".modelloop/demo"),
    keep_running: Annotated[bool, typer.Option(
        "--keep-running", help="Leave serving, sidecar and Prometheus up after the loop.")] = False,
    batch_rows: Annotated[int, typer.Option(
        "--batch-rows", min=50, help="Rows per traffic step (labels follow each step).")] = 250,
    timeout_s: Annotated[float, typer.Option(
        "--timeout-s", min=30, help="Give up on the loop after this long.")] = 420.0,
) -> None:
    """Run the whole loop: train v1, serve it, watch it, shift the data, detect drift and
    falling accuracy, retrain, shadow v2 as the challenger, promote it only if it beats v1 on live
    labels, swap it in under load."""
    raise typer.Exit(run_demo(home, keep_running=keep_running, batch_rows=batch_rows,
                              timeout_s=timeout_s))
