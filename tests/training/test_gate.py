"""Retraining a model modelloop did not train: a scikit-learn pipeline (scaler and logistic
regression, converted with skl2onnx) registered from its ONNX file, a real sidecar with labelled
production data after a concept shift, and the owner's own retraining pipeline, configured in the
sidecar for that model, started by the sidecar's policy when it sees the drift: it trains on the older labelled rows,
imports its challenger with ``modelloop models import --challenger`` and asks ``modelloop models gate``,
which promotes a better challenger and keeps a worse one out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from modelloop.registry import Registry
from modelloop.synthetic import TARGET, SyntheticTask
from tests.monitoring.helpers import sidecar_process
from tests.monitoring.test_retraining_process import wait_for_job
from tests.training.conftest import quiet_settings
from tests.training.test_retrain import SHIFT, _send
from training.byo import ExampleData, register_onnx

pytestmark = [pytest.mark.integration, pytest.mark.slow]
MODELLOOP = str(Path(sys.executable).with_name("modelloop"))

# The owner's pipeline, as a user would write it: argv model, mode (better: the labels as given;
# worse: each label flipped), and a folder for the gate's answer. It trains on the older 70% of
# the labelled rows and lets the gate judge on the rest (--since), which it never saw.
PIPELINE = """
import io, json, os, subprocess, sys
from pathlib import Path

import httpx, pandas as pd
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

model, mode, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
modelloop = str(Path(sys.executable).with_name("modelloop"))
url, key = os.environ["MODELLOOP_TRAINING_SIDECAR_URL"], os.environ.get("MODELLOOP_TRAINING_SIDECAR_KEY")
resp = httpx.get(url + "/export/labelled", params={"model": model}, timeout=60,
                 headers={"Authorization": "Bearer " + key} if key else {})
resp.raise_for_status()
rows = pd.read_parquet(io.BytesIO(resp.content)).sort_values("timestamp", kind="stable")
features = [c for c in rows.columns if c.startswith("f")]
train = rows.iloc[:int(len(rows) * 0.7)]
since = float(rows["timestamp"].iloc[len(train)])
y = train["_ml_label"].round().astype(int)
if mode == "worse":
    y = 1 - y
x = train[features].to_numpy("float32")
pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x, y)
proto = to_onnx(pipe, initial_types=[("x", FloatTensorType([None, len(features)]))],
                options={LogisticRegression: {"zipmap": False}}, target_opset=17)
(out / "challenger.onnx").write_bytes(proto.SerializeToString())
frame = train[features].copy()
frame["target"] = y.to_numpy()
frame.to_csv(out / "train.csv", index=False)
done = subprocess.run([modelloop, "models", "import", str(out / "challenger.onnx"), "--name",
                       model, "--reference", str(out / "train.csv"), "--challenger", "--json"],
                      capture_output=True, text=True, check=True)
version = json.loads(done.stdout)["version"]
gate = subprocess.run([modelloop, "models", "gate", model, str(version), "--since", str(since)],
                      capture_output=True, text=True)
sys.stderr.write(gate.stderr)
(out / "gate.json").write_text(json.dumps({"code": gate.returncode, "stdout": gate.stdout}))
sys.exit(gate.returncode)
"""


@pytest.fixture
def champion(home: Path, tmp_path: Path) -> Registry:
    """A scikit-learn pipeline trained on the original concept, registered from its ONNX file
    and promoted."""
    task = SyntheticTask(seed=0)
    data = task.sample(2000, seed=1)
    x = data[task.feature_names].to_numpy(np.float32)
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x, data[TARGET])
    proto = to_onnx(pipe, initial_types=[("x", FloatTensorType([None, x.shape[1]]))],
                    options={LogisticRegression: {"zipmap": False}}, target_opset=17)
    (tmp_path / "champion.onnx").write_bytes(proto.SerializeToString())
    registry = Registry(home / "registry")
    register_onnx(tmp_path / "champion.onnx", ExampleData(data, target=TARGET), name="demo",
                  registry=registry, settings=quiet_settings(home), promote=True)
    return registry


@pytest.mark.parametrize(("mode", "promoted", "reason"), [
    # trained on the new concept's labels: beats the champion on the rows after --since
    ("better", True, "beats champion"),
    # trained on flipped labels: registered, judged, kept out of production
    ("worse", False, "does not beat champion"),
])
def test_a_per_model_command_retrains_an_onnx_model_through_the_gate(
        home: Path, champion: Registry, tmp_path: Path, mode: str, promoted: bool,
        reason: str) -> None:
    (tmp_path / "pipeline.py").write_text(PIPELINE)
    out = tmp_path / "out"
    out.mkdir()
    commands = {"demo": f"{sys.executable} {tmp_path / 'pipeline.py'} {{model}} {mode} {out}"}
    policy = tmp_path / "policy.yaml"
    policy.write_text("defaults: {for: 0s, cooldown: 1h}\n"
                      "rules:\n  - {name: data-drift, metric: data_drift, min_samples: 500, action: retrain}\n")
    with sidecar_process(home, tmp_path / "sidecar.log",
                         MODELLOOP_MONITOR_CHECK_INTERVAL_S="3600",
                         MODELLOOP_MONITOR_POLICY_FILE=str(policy), MODELLOOP_MONITOR_MIN_WINDOW_ROWS="500",
                         MODELLOOP_MONITOR_JOB_POLL_S="0.1",
                         # the default command cannot start: only the model's own may run
                         MODELLOOP_MONITOR_RETRAIN_COMMAND="modelloop-nope {model}",
                         MODELLOOP_MONITOR_RETRAIN_COMMANDS=json.dumps(commands)) as sidecar:
        _send(sidecar.url, champion, SyntheticTask(seed=0).sample(
            1500, seed=50, shift=SHIFT, concept=1.0), time.time() - 60)
        checked = httpx.post(f"{sidecar.url}/check", timeout=120)  # the policy judges the drift
        assert checked.status_code == 200, checked.text
        jobs = httpx.get(f"{sidecar.url}/jobs", timeout=30).json()["jobs"]
        assert [j["trigger"] for j in jobs] == ["policy"], jobs
        job = wait_for_job(sidecar.url, jobs[0]["id"], "succeeded")
    log = (home / "jobs" / f"{job['id']}.log").read_text()
    answer = json.loads((out / "gate.json").read_text())
    assert answer["code"] == 0, log
    summary = json.loads(answer["stdout"])
    assert summary["promoted"] is promoted and reason in summary["reason"], summary
    assert summary["champion"]["version"] == 1 and summary["challenger"]["version"] == 2
    assert summary["data"]["holdout"] == "since" and summary["data"]["holdout_rows"] == 450
    assert summary["data"]["original_check"] is None
    assert (summary["metric"], summary["metric_source"]) == ("accuracy", "champion")
    v2 = champion.get("demo", 2).metadata
    assert v2.lineage["source"] == "onnx"
    assert champion.aliases("demo") == ({"production": 2, "previous": 1} if promoted
                                        else {"production": 1}) | {"challenger": 2}


@pytest.mark.parametrize(("version", "error"), [
    # the challenger is the champion itself
    ("1", "error: demo v1 is production already: nothing to gate"),
    # no such version
    ("9", "error: model 'demo' has no version 9"),
])
def test_the_gate_refuses_arguments_it_cannot_judge(home: Path, champion: Registry,
                                                    version: str, error: str) -> None:
    done = subprocess.run([MODELLOOP, "models", "gate", "demo", version, "--sidecar-url",
                           "http://127.0.0.1:9"], env={**os.environ, "MODELLOOP_HOME": str(home)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == error
    assert done.stdout == ""
