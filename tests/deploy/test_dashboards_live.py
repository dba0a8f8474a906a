"""Every dashboard query returns data from a real stack: `modelloop serve` and `modelloop
monitor` as processes on OS-chosen ports, a real Prometheus scraping both with the chart's
alert rules loaded, traffic, labels, drift, a model swap and a retraining job driven through
their APIs. Also the image's healthcheck against the live servers, and the Alertmanager webhook
contract (docker-compose and the chart route `action="retrain"` alerts to /alertmanager)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from modelloop.ports import free_port
from modelloop.registry import Registry
from modelloop.synthetic import TARGET, SyntheticTask
from tests.deploy._support import (
    RULES,
    DashboardQuery,
    alert_rules,
    dashboard_queries,
    entrypoint_env,
    grafana_to_promql,
    run_entrypoint,
    tool,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "demo"
MODELLOOP = str(Path(sys.executable).with_name("modelloop"))
# Grafana's variables with a 1 s scrape interval: a rate window of several scrapes
LIVE_VARIABLES = {"$__rate_interval": "10s", "$__interval": "1s", "$__range": "5m",
                  "${model}": MODEL, "$model": MODEL}
GPU_METRICS = ("modelloop_gpu_",)
CATEGORICAL_METRICS = ("modelloop_unknown_category_",)
"""Exported for models with categorical features only; this stack's model takes numbers (their
values are checked in tests/serving and tests/monitoring test_categorical.py)."""


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``check()`` until truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except httpx.HTTPError as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


@dataclass
class Process:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)


def start(name: str, args: list[str], env: dict[str, str], logs: Path) -> Process:
    log = logs / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return Process(name, proc, log)


@dataclass
class Stack:
    serving: str
    monitor: str
    prometheus: str
    processes: list[Process]
    started: float
    home: Path

    def logs(self) -> str:
        return "\n".join(f"----- {p.name} (running: {p.alive()})\n{p.text()}" for p in self.processes)


def _prometheus_config(serving_port: int, monitor_port: int) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            # the job names of docker-compose's Prometheus and the chart's ServiceMonitor
            {"job_name": "modelloop-serving",
             "static_configs": [{"targets": [f"127.0.0.1:{serving_port}"]}]},
            {"job_name": "modelloop-monitor",
             "static_configs": [{"targets": [f"127.0.0.1:{monitor_port}"]}]},
        ],
    }


POLICY = {
    "defaults": {"min_samples": 100, "for": "0s", "cooldown": "1h"},
    "rules": [
        # low on purpose: the shifted traffic below crosses it, so a breach is counted
        {"name": "drift-share", "metric": "drift_share", "threshold": 0.05, "action": "alert"},
    ],
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, trained_home: Path) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("live")
    home = root / "home"
    import shutil

    shutil.copytree(trained_home, home)
    # v2 = v1's files as a new version, to be promoted later: a model swap to watch
    registry = Registry(home / "registry")
    v1 = registry.get(MODEL, 1)
    registry.register(v1.metadata.model_copy(update={"parent_version": 1}), v1.onnx_path,
                      reference=v1.reference())
    # v3, the same again, named challenger: serving shadows it (the champion/challenger panels)
    v3 = registry.register(v1.metadata.model_copy(update={"parent_version": 1}), v1.onnx_path,
                           reference=v1.reference())
    registry.set_alias(MODEL, "challenger", v3.version)
    policy = root / "policy.yaml"
    policy.write_text(yaml.safe_dump(POLICY))
    sp, mp, pp = free_port(), free_port(), free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("MODELLOOP_")}
    base |= {"MODELLOOP_HOME": str(home), "BENTOML_HOME": str(root / "bentoml"),
             "BENTOML_DO_NOT_TRACK": "True"}
    processes: list[Process] = []
    try:
        serving = start("serving", [MODELLOOP, "serve", "--port", str(sp), "--host", "127.0.0.1"], {
            **base,
            "MODELLOOP_SERVING_MODEL": MODEL,
            "MODELLOOP_SERVING_WORKERS": "1",
            "MODELLOOP_SERVING_SIDECAR_URL": f"http://127.0.0.1:{mp}",
            "MODELLOOP_SERVING_ALIAS_POLL_INTERVAL_S": "0.5",
            "MODELLOOP_SERVING_EVENT_FLUSH_INTERVAL_S": "0.2",
        }, root)
        processes.append(serving)
        processes.append(start("monitor", [MODELLOOP, "monitor", "--port", str(mp), "--host", "127.0.0.1"], {
            **base,
            "MODELLOOP_MONITOR_MODELS": MODEL,
            "MODELLOOP_MONITOR_POLICY_FILE": str(policy),
            "MODELLOOP_MONITOR_CHECK_INTERVAL_S": "1",
            "MODELLOOP_MONITOR_MIN_WINDOW_ROWS": "200",
            "MODELLOOP_MONITOR_WINDOW_EVENTS": "600",
            "MODELLOOP_MONITOR_TRIGGER": "local",
            # a stand-in job that runs long enough to be scraped while active
            "MODELLOOP_MONITOR_RETRAIN_COMMAND": f"{sys.executable} -c 'import time; time.sleep(3)'",
            "MODELLOOP_MONITOR_JOB_POLL_S": "0.2",
            "MODELLOOP_MONITOR_TARGET_PID": str(serving.proc.pid),
            "MODELLOOP_MONITOR_SERVING_METRICS_URL": f"http://127.0.0.1:{sp}/metrics",
        }, root))
        config = root / "prometheus.yml"
        config.write_text(yaml.safe_dump(_prometheus_config(sp, mp)))
        processes.append(start("prometheus", [
            tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={root / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{pp}", "--log.level=warn",
        ], base, root))
        s = Stack(f"http://127.0.0.1:{sp}", f"http://127.0.0.1:{mp}", f"http://127.0.0.1:{pp}",
                  processes, time.time(), home)
        try:
            for url, what in ((f"{s.serving}/v2/health/ready", "serving ready"),
                              (f"{s.monitor}/ready", "sidecar ready"),
                              (f"{s.prometheus}/-/ready", "prometheus ready")):
                wait_for(lambda url=url: all(p.alive() for p in processes)
                         and httpx.get(url, timeout=2).status_code == 200, 120, what)
        except AssertionError:
            print(s.logs())
            raise
        yield s
    finally:
        for p in reversed(processes):
            p.stop()


def _predict(stack: Stack, frame: Any) -> list[str]:
    features = frame.drop(columns=[TARGET])
    response = httpx.post(f"{stack.serving}/predict",
                          json={"instances": features.to_dict(orient="records")}, timeout=30)
    assert response.status_code == 200, response.text
    return [p["request_id"] for p in response.json()["predictions"]]


def drive(stack: Stack) -> None:
    """What a day in production does, in seconds: traffic, labels, drift, a swap, retraining."""
    task = SyntheticTask(seed=0)
    labelled = []
    for i in range(30):  # 600 stationary rows, all labelled
        frame = task.sample(20, seed=100 + i)
        labelled += zip(_predict(stack, frame), frame[TARGET].tolist(), strict=True)
    bad = httpx.post(f"{stack.serving}/predict", json={"instances": [{"nope": 1}]}, timeout=10)
    assert 400 <= bad.status_code < 500, bad.text  # a validation error, counted by reason
    # labels come after their events: wait until the sidecar has stored all of them
    wait_for(lambda: _sample_sum(stack.monitor, "modelloop_events_ingested_total") >= len(labelled),
             30, "the sidecar to ingest the prediction events")
    feedback = httpx.post(f"{stack.monitor}/feedback", timeout=30, json={
        "feedback": [{"request_id": r, "label": int(y)} for r, y in labelled]})
    assert feedback.status_code == 200, feedback.text
    assert feedback.json()["joined"] == len(labelled), feedback.text
    # judge this labelled window now, before the shifted (unlabelled) rows push it out, and
    # let Prometheus scrape its quality gauges: the shifted rows remove them from the sidecar
    _check(stack)
    for name in ("modelloop_accuracy_ratio", "modelloop_f1_ratio", "modelloop_label_lag_seconds"):
        wait_for(lambda name=name: _scraped(stack, name), 30, f"Prometheus to scrape {name}")
    for i in range(30):  # 600 rows with two features moved: the window is all shifted
        _predict(stack, task.sample(20, seed=200 + i, shift={"f03": 4.0, "f07": -4.0}))
    _check(stack)
    Registry(stack.home / "registry").promote(MODEL, 2)
    wait_for(lambda: 'version="2"' in _metric_lines(stack.serving, "modelloop_serving_model_info", " 1.0"),
             30, "serving to swap to v2")
    # Alertmanager's webhook, as docker-compose's and the chart's routes deliver it
    payload = {
        "version": "4", "status": "firing", "receiver": "modelloop-retrain", "groupKey": "{}:{}",
        "groupLabels": {"alertname": "ModelloopDataDrift"}, "commonLabels": {}, "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093", "truncatedAlerts": 0,
        "alerts": [{"status": "firing", "fingerprint": "live-test-1",
                    "labels": {"alertname": "ModelloopDataDrift", "model": MODEL,
                               "severity": "warning", "action": "retrain"},
                    "annotations": {"summary": "drifted"}, "startsAt": "2025-01-01T00:00:00Z",
                    "endsAt": "0001-01-01T00:00:00Z", "generatorURL": ""}],
    }
    answer = httpx.post(f"{stack.monitor}/alertmanager", json=payload, timeout=30)
    assert answer.status_code == 200 and answer.json()["started"], answer.text
    for i in range(10):  # traffic on v2
        _predict(stack, task.sample(20, seed=300 + i))


def _check(stack: Stack) -> None:
    response = httpx.post(f"{stack.monitor}/check", params={"model": MODEL}, timeout=60)
    assert response.status_code == 200, response.text


def _scraped(stack: Stack, name: str) -> bool:
    """Prometheus holds a current sample of ``name`` for the model."""
    response = httpx.get(f"{stack.prometheus}/api/v1/query", timeout=10,
                         params={"query": f'{name}{{model="{MODEL}"}}'})
    return bool(response.json()["data"]["result"])


def _sample_sum(url: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and s.labels.get("model") == MODEL)


def _metric_lines(url: str, name: str, suffix: str = "") -> str:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return "\n".join(line for line in text.splitlines()
                     if line.startswith(name) and line.endswith(suffix))


def _returns_data(stack: Stack, query: DashboardQuery) -> bool:
    """Data at some moment of the scenario (a table's instant query shows the state at the
    dashboard's "now", which here is any moment since the stack started)."""
    expr = grafana_to_promql(query.expr, LIVE_VARIABLES)
    response = httpx.get(f"{stack.prometheus}/api/v1/query_range", timeout=10, params={
        "query": expr, "start": stack.started, "end": time.time(), "step": "1s"})
    body = response.json()
    assert body["status"] == "success", f"{query.where}: {body}"
    return bool(body["data"]["result"])


def _no_gpu() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
        return count == 0
    except Exception:  # no driver, no library: no GPU
        return True


def test_healthcheck_passes_against_the_live_servers(stack: Stack, tmp_path: Path) -> None:
    for role, var, url in (("serve", "MODELLOOP_SERVING_PORT", stack.serving),
                           ("monitor", "MODELLOOP_MONITOR_PORT", stack.monitor)):
        (tmp_path / "role").write_text(f"{role}\n")
        result = run_entrypoint(["healthcheck"], entrypoint_env(tmp_path, **{var: url.rsplit(":", 1)[1]}))
        assert result.returncode == 0, result.stderr


def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    try:
        drive(stack)
        queries = dashboard_queries()
        gpu = [q for q in queries if all(n in q.expr for n in GPU_METRICS)]
        categorical = [q for q in queries if any(n in q.expr for n in CATEGORICAL_METRICS)]
        expected = [q for q in queries if q not in gpu and q not in categorical]
        pending = list(expected)

        def all_have_data() -> bool:
            pending[:] = [q for q in pending if not _returns_data(stack, q)]
            return not pending

        try:
            wait_for(all_have_data, 90, "every dashboard query to return data", interval=1)
        except AssertionError:
            missing = "\n".join(f"  {q.dashboard}: {q.where}: {q.expr}" for q in pending)
            raise AssertionError(f"queries without data:\n{missing}") from None
        assert not [q.where for q in categorical if _returns_data(stack, q)]
        # GPU panels: data exactly when there is a GPU; the sidecar stays quiet without one
        if _no_gpu():
            assert not [q.where for q in gpu if _returns_data(stack, q)]
        else:
            assert all(_returns_data(stack, q) for q in gpu)
    except AssertionError:
        print(stack.logs())
        raise


def test_prometheus_evaluates_every_alert_rule_on_live_data(stack: Stack) -> None:
    names = {r["alert"] for r in alert_rules()}

    def evaluated() -> dict[str, Any] | None:
        groups = httpx.get(f"{stack.prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = {r["name"]: r for g in groups for r in g["rules"]}
        done = names <= set(rules) and not any(
            rules[n]["lastEvaluation"].startswith("0001") for n in names)
        return rules if done else None

    rules = wait_for(evaluated, 30, "Prometheus to evaluate the chart's rules")
    broken = {n: rules[n].get("lastError") for n in names if rules[n]["health"] != "ok"}
    assert not broken
