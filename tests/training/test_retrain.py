"""The retraining job against a real sidecar process: it fetches labelled production data,
trains a challenger with the champion's config, judges both on the same recent holdout and
promotes only a better model."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest

from modelloop.registry import Registry
from modelloop.synthetic import TARGET, SyntheticTask
from tests.monitoring.helpers import sidecar_process, wait_for_job
from training.data import load_data
from training.pipeline import TrainOptions, train_and_register
from training.retrain import Score, decide
from training.settings import TrainingSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SHIFT = {"f03": 2.0, "f07": -1.5}
# the sidecar's policy starts no job of its own: each test runs the jobs it judges
MANUAL_ONLY = {"MODELLOOP_MONITOR_TRIGGER": "none"}


def _send(url: str, registry: Registry, df: pd.DataFrame, t0: float,
          keys: dict[str, str] | None = None, flip: bool = False) -> None:
    """Predict ``df`` with the production model as serving would, send the events, then the
    true labels as feedback (with the ingest and feedback ``keys`` of a keyed sidecar), or each
    one's opposite (``flip``, a binary task), as a label provider out to poison retraining."""
    auth = {role: {"Authorization": f"Bearer {key}"} for role, key in (keys or {}).items()}
    mv = registry.get("demo")
    sess = ort.InferenceSession(str(mv.onnx_path), providers=["CPUExecutionProvider"])
    x = df[mv.metadata.feature_names].to_numpy(np.float32)
    proba = sess.run(None, {"input": x})[0]
    ids = [uuid.uuid4().hex for _ in range(len(df))]
    events = [{"request_id": rid, "timestamp": t0 + i * 0.01, "model": "demo",
               "version": mv.version, "features": row.tolist(), "prediction": int(p.argmax()),
               "probabilities": p.tolist(), "latency_s": 0.001}
              for i, (rid, row, p) in enumerate(zip(ids, x, proba, strict=True))]
    for start in range(0, len(events), 500):
        r = httpx.post(f"{url}/events", json={"events": events[start:start + 500]}, timeout=60,
                       headers=auth.get("ingest"))
        assert r.status_code == 200, r.text
    truth = 1 - df[TARGET] if flip else df[TARGET]
    labels = [{"request_id": rid, "label": str(y)} for rid, y in zip(ids, truth, strict=True)]
    r = httpx.post(f"{url}/feedback", json={"feedback": labels}, timeout=60,
                   headers=auth.get("feedback"))
    assert r.status_code == 200, r.text


def _retrain(home: Path, url: str, *args: str) -> tuple[int, dict | None, str]:
    exe = Path(sys.executable).with_name("modelloop")
    proc = subprocess.run([str(exe), "retrain", "--name", "demo", "--sidecar-url", url, *args],
                          capture_output=True, text=True, timeout=600,
                          env={"MODELLOOP_HOME": str(home), "PATH": "/usr/bin:/bin",
                               "MODELLOOP_TRAINING_EPOCHS": "40"})
    out = json.loads(proc.stdout) if proc.returncode == 0 else None
    return proc.returncode, out, proc.stderr


@pytest.fixture
def champion(home: Path) -> Registry:
    registry = Registry(home / "registry")
    settings = TrainingSettings(home=home, epochs=40, progress=False)
    train_and_register(load_data("synthetic", rows=3000), name="demo", registry=registry,
                       promote=True, options=TrainOptions(settings=settings,
                                                          lineage={"dataset_rows": 3000}))
    return registry


def test_better_challenger_is_promoted_with_lineage(home: Path, champion: Registry,
                                                    tmp_path: Path) -> None:
    task = SyntheticTask(seed=0)
    with sidecar_process(home, tmp_path / "sidecar.log", **MANUAL_ONLY) as sidecar:
        # production data drifted: two features moved and the concept changed
        _send(sidecar.url, champion, task.sample(1500, seed=50, shift=SHIFT, concept=1.0),
              time.time() - 60)
        code, out, err = _retrain(home, sidecar.url)
    assert code == 0, err
    assert out is not None and out["promoted"], out["reason"] if out else err
    assert out["challenger"]["metric"] >= out["champion"]["metric"] + out["margin"]
    # trained without --gate-metric, the champion stored the setting's accuracy, which decided
    assert (out["metric"], out["metric_source"]) == ("accuracy", "champion")
    assert out["data"]["holdout_rows"] == 450 and out["data"]["production_rows"] == 1500
    v2 = champion.get("demo", "production").metadata
    assert v2.version == 2 and v2.parent_version == 1
    assert champion.aliases("demo") == {"production": 2, "previous": 1}
    gate = v2.lineage["gate"]
    assert gate["promoted"] and gate["champion_version"] == 1
    assert v2.lineage["original_dataset"] == "synthetic"
    assert v2.config == champion.get("demo", 1).metadata.config  # the champion's configuration
    # fine-tuned from the champion's weights: every tensor fits, none trained from scratch
    assert v2.lineage["fine_tuned_from"]["version"] == 1
    assert v2.lineage["fine_tuned_from"]["tensors_fresh"] == []


def test_a_job_of_a_keyed_sidecar_retrains_a_model_trained_elsewhere(home: Path,
                                                                     tmp_path: Path) -> None:
    """A model trained with ``--data train.csv`` in one directory; the sidecar (keyed, on a port
    of its own, in another directory) starts its job: the job finds the data, fetches the
    labelled rows with the key it was given, and records what started it."""
    exe = str(Path(sys.executable).with_name("modelloop"))
    task = SyntheticTask(seed=0)
    workdir = tmp_path / "where-i-trained"
    workdir.mkdir()
    rows = task.sample(2000, seed=1)
    # 100 exact duplicates, which training removes before its split (the data report)
    pd.concat([rows, rows.iloc[:100]], ignore_index=True).to_csv(workdir / "train.csv",
                                                                 index=False)
    env = {"MODELLOOP_HOME": str(home), "PATH": "/usr/bin:/bin", "MODELLOOP_TRAINING_EPOCHS": "30"}
    trained = subprocess.run([exe, "train", "--data", "train.csv", "--target", TARGET, "--name",
                              "demo", "--promote", "--no-progress"], cwd=workdir, env=env,
                             capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr
    registry = Registry(home / "registry")
    assert registry.get("demo").metadata.dataset == str(workdir / "train.csv")
    keys = {"api": "a" * 32, "ingest": "i" * 32, "feedback": "f" * 32}
    with sidecar_process(home, tmp_path / "sidecar.log", MODELLOOP_TRAINING_EPOCHS="30",
                         MODELLOOP_MONITOR_RETRAIN_COMMAND=f"{exe} retrain --name {{model}} "
                                                           "--trigger {trigger}",
                         **{f"MODELLOOP_MONITOR_{r.upper()}_KEY": k for r, k in keys.items()}) as sc:
        _send(sc.url, registry, task.sample(1000, seed=51, shift=SHIFT, concept=1.0),
              time.time() - 60, keys)
        admin = {"Authorization": f"Bearer {keys['api']}"}
        started = httpx.post(f"{sc.url}/retrain", json={"model": "demo"}, headers=admin)
        assert started.status_code == 202, started.text
        job = wait_for_job(sc.url, headers=admin)
    log = (home / "jobs" / f"{job['id']}.log").read_text()
    assert job["status"] == "succeeded", log
    challenger = registry.get("demo", 2).metadata
    assert challenger.lineage["trigger"] == "manual"
    assert challenger.lineage["original_dataset"] == str(workdir / "train.csv")
    # the job rebuilt v1's own test split from the file, duplicates removed the same way
    v1 = registry.get("demo", 1).metadata
    assert v1.lineage["data_report"]["duplicates"] == 100 and v1.lineage["data_report"]["cleaned"]
    assert challenger.lineage["data_window"]["trusted_rows"] == v1.evaluation["split_rows"]["test"]


def test_challenger_that_is_not_better_is_not_promoted(home: Path, champion: Registry,
                                                       tmp_path: Path) -> None:
    task = SyntheticTask(seed=0)
    with sidecar_process(home, tmp_path / "sidecar.log", **MANUAL_ONLY) as sidecar:
        # nothing changed: the challenger cannot beat the champion by 5 points
        _send(sidecar.url, champion, task.sample(1000, seed=60), time.time() - 60)
        code, out, err = _retrain(home, sidecar.url, "--margin", "0.05")
    assert code == 0, err
    assert out is not None and not out["promoted"], out
    assert "does not beat champion" in out["reason"]
    assert out["data"]["change"] is None  # the champion's errors did not change
    assert champion.aliases("demo") == {"production": 1}
    rejected = champion.get("demo", 2).metadata
    assert rejected.lineage["gate"]["promoted"] is False


def test_labels_that_contradict_the_original_data_hold_the_challenger(
        home: Path, champion: Registry, tmp_path: Path) -> None:
    task = SyntheticTask(seed=0)
    with sidecar_process(home, tmp_path / "sidecar.log", **MANUAL_ONLY) as sidecar:
        # a feedback key holder sends the opposite of every true label: the challenger fits
        # them and beats the champion on the (equally poisoned) production holdout
        _send(sidecar.url, champion, task.sample(1500, seed=80), time.time() - 60, flip=True)
        code, out, err = _retrain(home, sidecar.url)
        assert code == 0, err
        assert out is not None and not out["promoted"], out
        assert out["challenger"]["metric"] >= out["champion"]["metric"] + out["margin"], out
        assert "held for review" in out["reason"] and "original training data" in out["reason"]
        assert champion.aliases("demo") == {"production": 1}
        gate = champion.get("demo", 2).metadata.lineage["gate"]
        assert gate["champion_original_score"] - gate["challenger_original_score"] > 0.3, gate
        # the trusted rows are the champion's own test split, which it never trained on
        v1 = champion.get("demo", 1).metadata
        assert out["data"]["trusted_rows"] == v1.evaluation["split_rows"]["test"] > 0
        assert gate["champion_original_score"] == pytest.approx(v1.metrics["accuracy"])
        # someone who has checked the labels (a concept shift, say) lets it through
        code, out, err = _retrain(home, sidecar.url, "--max-original-drop", "1")
    assert code == 0, err
    assert out is not None and out["promoted"], out["reason"] if out else err
    assert champion.aliases("demo") == {"production": 3, "previous": 1}


def _accuracy(registry: Registry, version: int, df: pd.DataFrame) -> float:
    mv = registry.get("demo", version)
    sess = ort.InferenceSession(str(mv.onnx_path), providers=["CPUExecutionProvider"])
    proba = sess.run(None, {"input": df[mv.metadata.feature_names].to_numpy(np.float32)})[0]
    labels = np.asarray(mv.metadata.class_labels)[proba.argmax(axis=1)]
    return float(np.mean(labels == df[TARGET].astype(str).to_numpy()))


def test_after_a_concept_shift_the_challenger_learns_the_new_concept(
        home: Path, champion: Registry, tmp_path: Path) -> None:
    task = SyntheticTask(seed=0)
    t0 = time.time() - 600
    with sidecar_process(home, tmp_path / "sidecar.log", **MANUAL_ONLY) as sidecar:
        # 1,000 labelled rows as trained, then the labelling rule changes for the next 2,500
        _send(sidecar.url, champion, task.sample(1000, seed=90), t0)
        _send(sidecar.url, champion, task.sample(2500, seed=91, concept=1.0), t0 + 60)
        # labels checked by a person: a concept shift, so the job may leave the original data
        code, out, err = _retrain(home, sidecar.url, "--max-original-drop", "1")
    assert code == 0, err
    assert out is not None and out["promoted"], out["reason"] if out else err
    change = out["data"]["change"]
    assert change is not None and 950 <= change["index"] <= 1050, change
    assert change["moved"] > 0.8 and change["error_after"] > change["error_before"] + 0.2
    # the holdout is a random share of the rows after the change, not the most recent ones
    assert out["data"]["holdout_rows"] == round((3500 - change["index"]) * 0.3)
    assert out["data"]["holdout_start"] < t0 + 60 + 5
    fresh = task.sample(2000, seed=92, concept=1.0)
    before = champion.get("demo", 1).metadata.metrics["accuracy"]
    after = _accuracy(champion, 2, fresh)
    # back near the champion's accuracy before the shift (its test split), from 0.51 after it
    assert after >= before - 0.05, (before, _accuracy(champion, 1, fresh), after)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        # no labelled production data at all
        (0, "only 0 labelled production rows"),
        # too few rows to judge
        (50, "only 50 labelled production rows"),
    ],
)
def test_unusable_production_data_exits_2(home: Path, champion: Registry, tmp_path: Path,
                                          rows: int, message: str) -> None:
    with sidecar_process(home, tmp_path / "sidecar.log", **MANUAL_ONLY) as sidecar:
        if rows:
            _send(sidecar.url, champion, SyntheticTask(seed=0).sample(rows, seed=70), time.time())
        code, _, err = _retrain(home, sidecar.url)
    assert code == 2
    assert message in err
    assert champion.aliases("demo") == {"production": 1}


def test_sidecar_unreachable_exits_2(home: Path, champion: Registry) -> None:
    code, _, err = _retrain(home, "http://127.0.0.1:9")
    assert code == 2 and "cannot reach the sidecar" in err


def _score(metric: float, latency: float = 1e-4) -> Score:
    return Score(version=1, metric=metric, metrics={}, latency_p50_s=latency)


@pytest.mark.parametrize(
    ("champ", "chall", "parity", "promote", "reason"),
    [
        # clearly better, as fast
        (_score(0.60), _score(0.90), True, True, "beats champion"),
        # better, but by less than the margin
        (_score(0.90), _score(0.905), True, False, "does not beat champion"),
        # worse
        (_score(0.90), _score(0.80), True, False, "does not beat champion"),
        # better but much slower
        (_score(0.60), _score(0.90, latency=1e-3), True, False, "latency"),
        # better but its export is not faithful
        (_score(0.60), _score(0.90), False, False, "parity"),
    ],
)
@pytest.mark.parametrize("original", [None, (0.95, 0.92)])  # none known (models gate), or within
def test_gate(champ: Score, chall: Score, parity: bool, promote: bool, reason: str,
              original: tuple[float, float] | None) -> None:
    decision, why = decide(champ, chall, parity_ok=parity, margin=0.01, latency_tolerance=0.5,
                           metric="accuracy", original=original, max_original_drop=0.05)
    assert decision is promote
    assert reason in why


@pytest.mark.parametrize(
    ("original", "promote"),
    [((0.95, 0.90), True), ((0.95, 0.8999), False), ((0.95, 0.99), True), ((0.95, 0.10), False)],
)
def test_gate_on_the_original_data(original: tuple[float, float], promote: bool) -> None:
    decision, why = decide(_score(0.60), _score(0.90), parity_ok=True, margin=0.01,
                           latency_tolerance=0.5, metric="accuracy", original=original,
                           max_original_drop=0.05)
    assert decision is promote, why
    assert ("held for review" in why) is not promote
