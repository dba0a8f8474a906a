"""The issue's acceptance: a real `modelloop serve` sends prediction events to a real
`modelloop monitor`. Stationary traffic flags no drift over several windows; shifting two features
flags exactly those two, the drift share crosses its threshold and one retraining job fires (the
cooldown holds off a second); feedback labels give scikit-learn's accuracy on the same pairs;
every sidecar metric of docs/metrics.md is on /metrics; with the sidecar stopped, serving still
answers every request."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sklearn.metrics import accuracy_score, average_precision_score, f1_score

from modelloop.synthetic import TARGET, SyntheticTask
from tests.monitoring.helpers import (
    CLASS_LABELS,
    ServingProcess,
    SidecarProcess,
    TrainedModel,
    free_port,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
WINDOW = 2000
POLICY = """
rules:
  - {name: data-drift, metric: drift_share, threshold: 0.1, min_samples: 1000, cooldown: 1h,
     action: retrain}
  - {name: prediction-drift, metric: prediction_drift, min_samples: 1000, action: alert}
  - {name: accuracy-floor, metric: accuracy, threshold: 0.5, min_samples: 100, action: alert}
"""
# appends "<model> <job>" to a file: the retraining job of this test
RECORD = ("import sys,pathlib; pathlib.Path(sys.argv[1]).open('a')"
          ".write(sys.argv[2]+' '+sys.argv[3]+chr(10))")


@dataclass
class Stack:
    serving: ServingProcess
    sidecar: SidecarProcess
    home: Path
    jobs_file: Path

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = httpx.get(f"{self.sidecar.url}/metrics", timeout=30).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    def metric(self, name: str, **labels: str) -> float:
        return sum(v for (n, lab), v in self.metrics().items()
                   if n == name and all(dict(lab).get(k) == x for k, x in labels.items()))

    def send(self, df: Any) -> tuple[list[str], np.ndarray]:
        """Predict through serving, then wait until the sidecar has stored every event."""
        before = self.metric("modelloop_events_ingested_total", model="churn")
        ids, preds = self.serving.predict(df)
        deadline = time.monotonic() + 60
        while self.metric("modelloop_events_ingested_total", model="churn") < before + len(ids):
            assert time.monotonic() < deadline, "the sidecar did not receive serving's events"
            time.sleep(0.1)
        return ids, preds

    def check(self) -> dict[str, Any]:
        resp = httpx.post(f"{self.sidecar.url}/check", timeout=120)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def jobs(self) -> list[dict[str, Any]]:
        return httpx.get(f"{self.sidecar.url}/jobs", timeout=30).json()["jobs"]


@pytest.fixture
def stack(home: Path, registered: TrainedModel, tmp_path: Path) -> Iterator[Stack]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    jobs_file = tmp_path / "retrained.txt"
    sidecar_port = free_port()
    serving = ServingProcess(home, tmp_path / "serving.log", f"http://127.0.0.1:{sidecar_port}")
    sidecar: SidecarProcess | None = None
    try:
        serving.start()
        sidecar = SidecarProcess(home, tmp_path / "sidecar.log", port=sidecar_port, env={
            "MODELLOOP_MONITOR_POLICY_FILE": str(policy),
            "MODELLOOP_MONITOR_CHECK_INTERVAL_S": "3600",  # the test runs each check itself
            "MODELLOOP_MONITOR_WINDOW_EVENTS": str(WINDOW),
            "MODELLOOP_MONITOR_MIN_WINDOW_ROWS": "1000",
            "MODELLOOP_MONITOR_JOB_POLL_S": "0.2",
            "MODELLOOP_MONITOR_TARGET_PID": str(serving.pid),
            "MODELLOOP_MONITOR_SERVING_METRICS_URL": f"{serving.url}/metrics",
            "MODELLOOP_MONITOR_RETRAIN_COMMAND":
                f'{sys.executable} -c "{RECORD}" {jobs_file} {{model}} {{job}}',
        }).start()
        yield Stack(serving, sidecar, home, jobs_file)
    except BaseException:
        print(f"--- serving log ---\n{serving.log()[-20000:]}")
        if sidecar is not None:
            print(f"--- sidecar log ---\n{sidecar.log()[-20000:]}")
        raise
    finally:
        if sidecar is not None:
            sidecar.close()
        serving.close()


def sidecar_metric_names() -> list[str]:
    """The sidecar's metric names, from the catalog in docs/metrics.md."""
    text = (ROOT / "docs" / "metrics.md").read_text()
    section = text.split("## Sidecar", 1)[1]
    names: list[str] = []
    for line in section.splitlines():
        if line.startswith("| `modelloop_"):
            names += re.findall(r"`(modelloop_[a-z_]+)`", line.split("|")[1])
    return names


def test_the_closed_loop_through_real_serving_and_sidecar(
        stack: Stack, task: SyntheticTask, registered: TrainedModel, tmp_path: Path) -> None:
    features = task.feature_names
    # 1. stationary traffic: no drift over several windows, no job
    for w in range(3):
        stack.send(task.sample(WINDOW, seed=100 + w)[features])
        status = stack.check()
        drift = status["models"]["churn"]["drift"]
        assert drift["judged"] and drift["rows"] == WINDOW
        assert drift["drifted_features"] == [] and drift["share"] == 0.0, drift
    assert stack.jobs() == []

    # 2. two features shift: exactly those drift, the share crosses 0.1, one job fires
    stack.send(task.sample(WINDOW, seed=200, shift={"f03": 1.0, "f07": -1.0})[features])
    status = stack.check()
    drift = status["models"]["churn"]["drift"]
    assert drift["drifted_features"] == ["f03", "f07"]
    assert drift["share"] == pytest.approx(0.1)
    fired = [f for f in status["recent_firings"] if f["rule"] == "data-drift"]
    assert len(fired) == 1 and fired[0]["job"]["status"] == "running"
    deadline = time.monotonic() + 60
    while [j["status"] for j in stack.jobs()] != ["succeeded"]:
        assert time.monotonic() < deadline, stack.jobs()
        time.sleep(0.2)
    job_id = stack.jobs()[0]["id"]
    assert stack.jobs_file.read_text().splitlines() == [f"churn {job_id}"]

    # 3. still drifted: the rule stays in its cooldown, no second job
    shifted = task.sample(WINDOW, seed=201, shift={"f03": 1.0, "f07": -1.0})
    ids, preds = stack.send(shifted[features])
    status = stack.check()
    assert status["models"]["churn"]["drift"]["drifted_features"] == ["f03", "f07"]
    rule = next(r for r in status["policy"]["rules"] if r["rule"] == "data-drift")
    assert rule["state"] == "cooldown"
    assert len(stack.jobs()) == 1 and len(stack.jobs_file.read_text().splitlines()) == 1
    assert stack.metric("modelloop_retrain_jobs_total", trigger="policy", result="started") == 1
    assert stack.metric("modelloop_threshold_breaches_total", rule="data-drift") == 1

    # 4. feedback labels (through the CLI) give scikit-learn's accuracy on the same pairs
    truth = shifted[TARGET].to_numpy()
    labels_csv = tmp_path / "labels.csv"
    with labels_csv.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["request_id", "label"])
        writer.writerows((rid, CLASS_LABELS[y]) for rid, y in zip(ids, truth, strict=True))
    cli = subprocess.run([str(Path(sys.executable).with_name("modelloop")), "monitor", "feedback",
                          str(labels_csv), "--url", stack.sidecar.url], capture_output=True,
                         text=True, env={**os.environ, "MODELLOOP_HOME": str(stack.home)},
                         timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.splitlines()[0] == (f"{labels_csv}: {WINDOW} labels joined, 0 unknown ids, "
                                          f"0 duplicates")
    stack.check()
    stack.check()  # a second scrape of serving's counters gives the error rate
    expected_acc = accuracy_score(truth, preds)
    expected_f1 = f1_score(truth, preds, average="macro")
    for window in ("count", "time"):
        assert stack.metric("modelloop_accuracy_ratio", version="1", window=window) == \
            pytest.approx(expected_acc, abs=1e-12)
        assert stack.metric("modelloop_f1_ratio", version="1", window=window) == \
            pytest.approx(expected_f1, abs=1e-12)
    assert stack.metric("modelloop_labelled_samples", version="1") == WINDOW
    # the version's stored gate metric (PR-AUC) from the events' probabilities: the served
    # graph's, which ONNX Runtime gives here too (float32 near-ties may rank apart: 1e-4)
    session = ort.InferenceSession(registered.onnx_bytes(), providers=["CPUExecutionProvider"])
    proba = session.run(None, {"input": shifted[features].to_numpy(np.float32)})[0]
    assert stack.metric("modelloop_gate_metric_ratio", version="1", metric="pr_auc") == \
        pytest.approx(average_precision_score(truth, proba[:, 1]), abs=1e-4)
    assert stack.metric("modelloop_label_coverage_ratio", version="1") == 1.0
    estimated = stack.metric("modelloop_estimated_accuracy_ratio", version="1")
    assert abs(estimated - expected_acc) < 0.1  # the estimate is in the realised one's range

    # 5. every sidecar metric of the catalog is exported (GPU ones only where NVML sees a GPU,
    # categorical ones only for a model with categorical features)
    exported = {name for name, _ in stack.metrics()}
    status = httpx.get(f"{stack.sidecar.url}/status").json()
    no_gpu = "gpu_unavailable" in status["resources"]
    for name in sidecar_metric_names():
        present = any(e == name or e == f"{name}_total" or e.startswith(f"{name}_")
                      for e in exported) if name.endswith("_total") else name in exported
        if no_gpu and name.startswith("modelloop_gpu_"):
            assert not present, f"{name} exported without a GPU"
        elif name.startswith("modelloop_unknown_category_"):  # this model's features are numbers
            assert not present, f"{name} exported for a model without categorical features"
        else:
            assert present, f"{name} is missing from /metrics"
    assert stack.metric("modelloop_process_memory_bytes", target="serving") > 10e6
    assert stack.metric("modelloop_error_rate_ratio", model="churn") == 0.0

    # 6. with the sidecar stopped, serving still answers every request
    assert stack.sidecar.terminate() in (0, -15)
    for seed in range(10):
        ids, _ = stack.serving.predict(task.sample(50, seed=300 + seed)[features])
        assert len(ids) == 50
