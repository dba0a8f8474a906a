"""A real `modelloop monitor` judges what per-feature drift cannot see, and says when its accuracy
estimate stops meaning anything: two features that become correlated (joint drift), a feature
moved outside the reference's range (the estimate marked unreliable, its rule silent), missing
values (the missing-share rule); each in /status, on /metrics and in the policy."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from modelloop.synthetic import TARGET, SyntheticTask
from tests.monitoring.helpers import TrainedModel, sidecar_process

pytestmark = [pytest.mark.integration, pytest.mark.slow]
WINDOW = 1000
POLICY = """
defaults: {min_samples: 500}
rules:
  - {name: joint, metric: multivariate_drift}
  - {name: missing, metric: missing_share, threshold: 0.1}
  - {name: outside, metric: out_of_support_share, threshold: 0.05}
  - {name: estimate-floor, metric: estimated_accuracy, threshold: 0.99}
"""


class Sidecar:
    def __init__(self, url: str, trained: TrainedModel) -> None:
        self.client = httpx.Client(base_url=url, timeout=120)
        self.trained = trained
        self.sent = 0

    def send(self, df: pd.DataFrame, names: list[str]) -> None:
        """Post the window's rows as prediction events, then their true labels."""
        x = df[names].to_numpy(np.float64)
        proba = self.trained.predict_proba(np.nan_to_num(x))  # serving's graph imputes; so here
        events = [{"request_id": f"r{self.sent + i}", "timestamp": time.time(), "model": "churn",
                   "version": 1, "features": [None if np.isnan(v) else float(v) for v in row],
                   "prediction": int(p.argmax()), "probabilities": p.tolist(), "latency_s": 0.003}
                  for i, (row, p) in enumerate(zip(x, proba, strict=True))]
        assert self.client.post("/events", json={"events": events}).status_code == 200
        labels = [{"request_id": e["request_id"], "label": int(y)}
                  for e, y in zip(events, df[TARGET], strict=True)]
        joined = self.client.post("/feedback", json={"feedback": labels}).json()["joined"]
        assert joined == len(df)
        self.sent += len(df)

    def check(self) -> dict[str, Any]:
        resp = self.client.post("/check")
        assert resp.status_code == 200, resp.text
        return resp.json()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = self.client.get("/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}


@pytest.fixture
def sidecar(home: Path, registered: TrainedModel, tmp_path: Path) -> Iterator[Sidecar]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    with sidecar_process(home, tmp_path / "sidecar.log",
                         MODELLOOP_MONITOR_POLICY_FILE=str(policy),
                         MODELLOOP_MONITOR_CHECK_INTERVAL_S="3600",
                         MODELLOOP_MONITOR_WINDOW_EVENTS=str(WINDOW),
                         MODELLOOP_MONITOR_MIN_WINDOW_ROWS="500",
                         MODELLOOP_MONITOR_TRIGGER="none") as proc:
        yield Sidecar(proc.url, registered)


def rules(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["rule"]: r for r in status["policy"]["rules"]}


def fired(status: dict[str, Any]) -> set[str]:
    return {f["rule"] for f in status["recent_firings"]}


def test_joint_drift_out_of_support_and_missing_values(sidecar: Sidecar,
                                                       task: SyntheticTask) -> None:
    names = task.feature_names
    # 1. unchanged data: nothing drifts, the estimate is reliable and near the realised accuracy
    sidecar.send(task.sample(WINDOW, seed=71), names)
    status = sidecar.check()
    churn = status["models"]["churn"]
    assert churn["drift"]["drifted_features"] == []
    assert churn["drift"]["multivariate"]["drifted"] is False
    assert churn["drift"]["multivariate"]["tested_pairs"] == 190
    assert churn["data_quality"]["out_of_support_rows_share"] < 0.05
    assert churn["data_quality"]["max_missing_share"] == 0.0
    q = churn["quality"]["1"]
    realised = q["scores"]["count"]["accuracy"]
    assert q["estimate_reliable"] is True
    assert q["estimated_accuracy"] == pytest.approx(realised, abs=0.03)
    assert q["estimate_lower"] < q["estimated_accuracy"] < q["estimate_upper"]
    assert fired(status) == {"estimate-floor"}  # a reliable estimate below 0.99 is acted on
    m = sidecar.metrics()
    assert m[("modelloop_estimate_reliable", (("model", "churn"), ("version", "1")))] == 1.0
    assert m[("modelloop_multivariate_drift_detected", (("model", "churn"),))] == 0.0
    assert m[("modelloop_missing_ratio", (("feature", "f04"), ("model", "churn")))] == 0.0

    # 2. f12 and f17 become correlated (0.9), each keeping its distribution: joint drift only
    df = task.sample(WINDOW, seed=72)
    z12, z17 = ((df[f] - df[f].mean()) / df[f].std() for f in ("f12", "f17"))
    df["f12"] = df["f12"].mean() + df["f12"].std() * (0.9 * z17 + np.sqrt(1 - 0.81) * z12)
    sidecar.send(df, names)
    status = sidecar.check()
    drift = status["models"]["churn"]["drift"]
    assert drift["drifted_features"] == []
    pairs = drift["multivariate"]["pairs"]
    # strongest first; f12 now also follows f17's neighbours and leaves its own (f11, f13)
    assert drift["multivariate"]["drifted"] is True and pairs[0] == "f12~f17"
    assert all("f12" in pair.split("~") for pair in pairs), pairs
    firing = next(f for f in status["recent_firings"] if f["rule"] == "joint")
    assert "f12~f17" in firing["message"]
    assert sidecar.metrics()[("modelloop_multivariate_drift_detected", (("model", "churn"),))] == 1

    # 3. f02 moved far outside the reference's range, f04 missing in 20% of rows: the estimate is
    #    marked unreliable and its rule does not act on it; the data-quality rules fire
    df = task.sample(WINDOW, seed=73, shift={"f02": 8.0})
    df.loc[df.index[::5], "f04"] = np.nan
    sidecar.send(df, names)
    status = sidecar.check()
    churn = status["models"]["churn"]
    by_feature = {f["feature"]: f for f in churn["data_quality"]["features"]}
    assert by_feature["f02"]["out_of_support_share"] > 0.95
    assert by_feature["f04"]["missing_share"] == pytest.approx(0.2)
    assert churn["quality"]["1"]["estimate_reliable"] is False
    assert rules(status)["estimate-floor"]["state"] == "insufficient"
    assert {"outside", "missing"} <= fired(status)
    m = sidecar.metrics()
    assert m[("modelloop_estimate_reliable", (("model", "churn"), ("version", "1")))] == 0.0
    assert m[("modelloop_out_of_support_ratio", (("feature", "f02"), ("model", "churn")))] > 0.95
    assert m[("modelloop_missing_ratio", (("feature", "f04"), ("model", "churn")))] == \
        pytest.approx(0.2)
    assert m[("modelloop_out_of_support_rows_ratio", (("model", "churn"),))] > 0.95
