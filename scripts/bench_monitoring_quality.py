#!/usr/bin/env python
"""How well the sidecar's monitoring judges: false alarms, detection, its accuracy estimate and
recovery from a concept shift, on a scenario grid the script builds; prints tables (results go
to BENCHMARKS.md).

A model is trained by training.pipeline.train_and_register on a generated table of 20 numeric
features of mixed distributions (f00-f05 normal, f06-f09 lognormal, f10-f13 uniform, f14-f16
Poisson, f17-f19 small integers 0-4) labelled by a noisy linear rule on six of them. One real
`modelloop monitor` runs per window size (WINDOW_EVENTS = MIN_WINDOW_ROWS = the window size, a
check interval of an hour, TRIGGER none); each judged window is that many fresh rows, posted as
serving posts them (predictions and probabilities from onnxruntime on the registered ONNX file,
fresh request ids) straight to the sidecar's /events (not through `modelloop serve`: the sidecar
judges the same events either way, and skipping BentoML keeps the run short), their true labels
to /feedback, then one `POST /check`, read from its /status JSON.

Scenarios: a stationary control (50 windows per size); mean shifts of 0.25, 0.5 and 1 sd on 1, 2
and 5 features; variance doubled on two features; two independent normal features becoming
correlated (0 -> 0.9, marginals unchanged); a feature leaving the training range (3 and 8 sd). A
shift starts at a window boundary; its delay is the first judged window after the onset that
flags it (data_drift, or the joint flag for the correlation), up to 5 windows. Then a concept
shift with labels on a window of 1,000: accuracy before, after, and after one
`modelloop retrain --name M --sidecar-url URL --max-original-drop 1`, measured on fresh
post-shift rows. `--max-original-drop 1` because by default the job holds a challenger that
contradicts the original training data for review (the guard against poisoned labels, which a
real concept shift looks like); a person who checked the labels lets it through this way.

    .venv/bin/python scripts/bench_monitoring_quality.py
    .venv/bin/python scripts/bench_monitoring_quality.py --windows 200 1000 --stationary 60
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pandas as pd
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modelloop.registry import Registry  # noqa: E402
from tests.monitoring.helpers import sidecar_process  # noqa: E402

console = Console(width=150)
MODEL = "quality"
TARGET = "target"
NAMES = [f"f{i:02d}" for i in range(20)]
FALSE_ALARM_RATE = 0.01  # the sidecar's default DRIFT_FALSE_ALARM_RATE
MAX_DELAY = 5
EPOCHS = "40"
# the labelling rule (weights on standardised features), before and after the concept shift
RULE = {"f00": 1.2, "f01": -1.0, "f06": 0.8, "f10": 0.9, "f14": -0.7, "f17": 0.6}
RULE_SHIFTED = {"f00": -1.2, "f02": 1.0, "f07": 0.8, "f11": -0.9, "f15": 0.7, "f18": 0.6}


def _draw(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` rows of the 20 features, each column independent of the others."""
    cols = [rng.normal(m, s, n) for m, s in ((0, 1), (5, 2), (-3, 0.5), (10, 4), (0, 1), (2, 3))]
    cols += [rng.lognormal(m, s, n) for m, s in ((0, 0.5), (1, 0.8), (2, 0.3), (0, 1))]
    cols += [rng.uniform(lo, hi, n) for lo, hi in ((0, 1), (-5, 5), (10, 20), (0, 100))]
    cols += [rng.poisson(lam, n).astype(float) for lam in (3, 10, 30)]
    cols += [rng.integers(0, 5, n).astype(float) for _ in range(3)]
    return np.column_stack(cols)


@dataclass
class Scenario:
    """A change to the features (``mean`` sd shifts, ``variance`` ratios, a correlated pair),
    the features it should name, and which flag is meant to catch it."""

    label: str
    mean: dict[str, float] = field(default_factory=dict)
    variance: dict[str, float] = field(default_factory=dict)
    correlate: tuple[str, str, float] | None = None
    joint: bool = False

    @property
    def features(self) -> set[str]:
        pair = set(self.correlate[:2]) if self.correlate else set()
        return set(self.mean) | set(self.variance) | pair


class MixedTable:
    """The generated table: features as :func:`_draw` makes them, a noisy linear label."""

    def __init__(self, seed: int = 0) -> None:
        big = _draw(np.random.default_rng(seed), 200_000)
        self.mean, self.sd = big.mean(axis=0), big.std(axis=0)
        self._seed = seed

    def sample(self, n: int, seed: int, scenario: Scenario | None = None,
               concept: bool = False) -> pd.DataFrame:
        rng = np.random.default_rng(self._seed * 1_000_003 + seed)
        x = _draw(rng, n)
        if scenario is not None:
            self._change(x, scenario)
        z = (x - self.mean) / self.sd
        rule = RULE_SHIFTED if concept else RULE
        logit = sum(w * z[:, NAMES.index(f)] for f, w in rule.items()) + rng.normal(0, 0.5, n)
        df = pd.DataFrame(x, columns=NAMES)
        df[TARGET] = (logit > 0).astype(np.int64)
        return df

    def _change(self, x: np.ndarray, s: Scenario) -> None:
        for f, k in s.mean.items():
            x[:, NAMES.index(f)] += k * self.sd[NAMES.index(f)]
        for f, ratio in s.variance.items():
            i = NAMES.index(f)
            x[:, i] = self.mean[i] + np.sqrt(ratio) * (x[:, i] - self.mean[i])
        if s.correlate is not None:
            a, b, rho = NAMES.index(s.correlate[0]), NAMES.index(s.correlate[1]), s.correlate[2]
            za, zb = ((x[:, i] - self.mean[i]) / self.sd[i] for i in (a, b))
            x[:, b] = self.mean[b] + self.sd[b] * (rho * za + np.sqrt(1 - rho**2) * zb)


def scenarios() -> list[Scenario]:
    sets = {1: ["f00"], 2: ["f00", "f06"], 5: ["f00", "f06", "f10", "f14", "f02"]}
    grid = [Scenario(f"mean {k:g} sd on {n}", mean=dict.fromkeys(fs, k))
            for n, fs in sets.items() for k in (0.25, 0.5, 1.0)]
    return [*grid,
            Scenario("variance x2 on 2", variance={"f01": 2.0, "f07": 2.0}),
            Scenario("correlation 0->0.9 (f04~f05)", correlate=("f04", "f05", 0.9), joint=True),
            Scenario("f01 out of range (+3 sd)", mean={"f01": 3.0}),
            Scenario("f01 out of range (+8 sd)", mean={"f01": 8.0})]


# -- the sidecar, fed as serving feeds it ---------------------------------------------------------
class Feed:
    """Posts rows as the production version's prediction events and their labels; judges."""

    def __init__(self, url: str, registry: Registry) -> None:
        self.client = httpx.Client(base_url=url, timeout=300)
        self.registry = registry
        self._session: tuple[int, ort.InferenceSession] | None = None

    def session(self) -> tuple[int, ort.InferenceSession]:
        mv = self.registry.get(MODEL)
        if self._session is None or self._session[0] != mv.version:
            self._session = (mv.version, ort.InferenceSession(
                str(mv.onnx_path), providers=["CPUExecutionProvider"]))
        return self._session

    def send(self, df: pd.DataFrame) -> None:
        version, sess = self.session()
        x = df[NAMES].to_numpy(np.float32)
        proba = sess.run(None, {"input": x})[0]
        ids = [uuid.uuid4().hex for _ in range(len(df))]
        now = time.time()
        for start in range(0, len(df), 1000):
            part = range(start, min(len(df), start + 1000))
            events = [{"request_id": ids[i], "timestamp": now, "model": MODEL,
                       "version": version, "mode": "realtime", "features": x[i].tolist(),
                       "prediction": int(proba[i].argmax()), "probabilities": proba[i].tolist(),
                       "latency_s": 0.002} for i in part]
            self._post("/events", {"events": events})
            self._post("/feedback", {"feedback": [{"request_id": ids[i], "label": str(y)}
                                                  for i, y in zip(part, df[TARGET].iloc[part],
                                                                  strict=True)]})

    def _post(self, path: str, body: dict) -> None:
        r = self.client.post(path, json=body)
        if r.status_code != 200:
            raise RuntimeError(f"{path}: {r.status_code} {r.text[:300]}")

    def judge(self, df: pd.DataFrame) -> Window:
        self.send(df)
        r = self.client.post("/check", params={"model": MODEL})
        if r.status_code != 200:
            raise RuntimeError(f"/check: {r.status_code} {r.text[:300]}")
        return Window.of(r.json()["models"][MODEL])


@dataclass
class Window:
    """What one judged window said."""

    data_drift: bool
    joint: bool
    features: set[str]
    pairs: list[str]
    realised: float
    estimated: float
    reliable: bool
    out_of_support: float

    @classmethod
    def of(cls, m: dict[str, Any]) -> Window:
        drift = m["drift"]
        if not drift.get("judged"):
            raise RuntimeError(f"window not judged: {drift.get('note')}")
        q = m["quality"][str(drift["version"])]
        return cls(bool(drift["dataset_drift"]), bool(drift["multivariate"]["drifted"]),
                   set(drift["drifted_features"]), list(drift["multivariate"]["pairs"]),
                   float(q["scores"]["count"]["accuracy"]), float(q["estimated_accuracy"]),
                   bool(q["estimate_reliable"]), float(m["data_quality"]["out_of_support_rows_share"]))

    @property
    def error(self) -> float:
        """Estimated minus realised accuracy, in points."""
        return 100 * (self.estimated - self.realised)


# -- the runs ------------------------------------------------------------------------------------
@dataclass
class Detection:
    delay: int | None
    window: Window  # the flagging window, or the first after the onset when none flagged


def detect(feed: Feed, table: MixedTable, s: Scenario, size: int, seed: int) -> Detection:
    first: Window | None = None
    for k in range(1, MAX_DELAY + 1):
        w = feed.judge(table.sample(size, seed + k, s))
        first = first or w
        if (w.joint if s.joint else w.data_drift):
            return Detection(k, w)
    assert first is not None
    return Detection(None, first)


@dataclass
class SizeResult:
    size: int
    stationary: list[Window]
    detections: dict[str, Detection]


def sidecar_env(size: int) -> dict[str, str]:
    return {"MODELLOOP_MONITOR_WINDOW_EVENTS": str(size),
            "MODELLOOP_MONITOR_MIN_WINDOW_ROWS": str(size),
            "MODELLOOP_MONITOR_CHECK_INTERVAL_S": "3600", "MODELLOOP_MONITOR_TRIGGER": "none",
            "MODELLOOP_MONITOR_GPU": "false", "MODELLOOP_MONITOR_REPORT_INTERVAL_S": "3600"}


def home_with_model(registry_dir: Path, home: Path) -> Path:
    """A fresh MODELLOOP_HOME (its own sidecar store) holding a copy of the trained registry."""
    shutil.copytree(registry_dir, home / "registry")
    return home


def run_size(table: MixedTable, registry_dir: Path, size: int, stationary: int) -> SizeResult:
    with tempfile.TemporaryDirectory() as tmp:
        home = home_with_model(registry_dir, Path(tmp))
        with sidecar_process(home, home / "sidecar.log", **sidecar_env(size)) as sc:
            feed = Feed(sc.url, Registry(home / "registry"))
            control = [feed.judge(table.sample(size, 10_000 + i)) for i in range(stationary)]
            found = {s.label: detect(feed, table, s, size, 100_000 * (j + 1))
                     for j, s in enumerate(scenarios())}
    console.print(f"window {size}: done")
    return SizeResult(size, control, found)


def accuracy(registry: Registry, version: int, df: pd.DataFrame) -> float:
    mv = registry.get(MODEL, version)
    sess = ort.InferenceSession(str(mv.onnx_path), providers=["CPUExecutionProvider"])
    proba = sess.run(None, {"input": df[NAMES].to_numpy(np.float32)})[0]
    labels = np.asarray(mv.metadata.class_labels)[proba.argmax(axis=1)]
    return float(np.mean(labels == df[TARGET].astype(str).to_numpy()))


def retrain(home: Path, url: str) -> tuple[int, dict | None, str]:
    exe = Path(sys.executable).with_name("modelloop")
    proc = subprocess.run([str(exe), "retrain", "--name", MODEL, "--sidecar-url", url,
                           "--max-original-drop", "1"], capture_output=True, text=True,
                          timeout=900, env={"MODELLOOP_HOME": str(home), "PATH": "/usr/bin:/bin",
                                            "MODELLOOP_TRAINING_EPOCHS": EPOCHS})
    return proc.returncode, json.loads(proc.stdout) if proc.returncode == 0 else None, proc.stderr


def run_concept(table: MixedTable, registry_dir: Path, size: int = 1000) -> dict[str, Any]:
    """Two windows as trained, three after the labelling rule changed, one retrain, one window
    served by whatever production is then."""
    with tempfile.TemporaryDirectory() as tmp:
        home = home_with_model(registry_dir, Path(tmp))
        registry = Registry(home / "registry")
        with sidecar_process(home, home / "sidecar.log", **sidecar_env(size)) as sc:
            feed = Feed(sc.url, registry)
            before = [feed.judge(table.sample(size, 500 + i)) for i in range(2)]
            after = [feed.judge(table.sample(size, 600 + i, concept=True)) for i in range(3)]
            code, out, err = retrain(home, sc.url)
            served = feed.judge(table.sample(size, 700, concept=True))
        fresh_old, fresh_new = table.sample(5000, 800), table.sample(5000, 801, concept=True)
        production = registry.get(MODEL).version
        return {"before": before, "after": after, "code": code, "out": out, "err": err[-500:],
                "served": served, "production": production,
                "v1_old": accuracy(registry, 1, fresh_old), "v1_new": accuracy(registry, 1, fresh_new),
                "prod_new": accuracy(registry, production, fresh_new)}


def train(table: MixedTable, home: Path, rows: int) -> Path:
    from training.data import load_data
    from training.pipeline import TrainOptions, train_and_register
    from training.settings import TrainingSettings

    path = home / "mixed.parquet"
    table.sample(rows, 1).to_parquet(path)
    settings = TrainingSettings(home=home, epochs=int(EPOCHS), progress=False)
    meta = train_and_register(load_data(path, TARGET), name=MODEL,
                              options=TrainOptions(settings=settings),
                              registry=Registry(home / "registry"), promote=True)
    console.print(f"trained {MODEL} v{meta.version} on {rows:,} rows: {meta.metrics}")
    return home / "registry"


# -- tables --------------------------------------------------------------------------------------
def _rate(flags: list[bool]) -> str:
    return f"{sum(flags)}/{len(flags)} ({100 * sum(flags) / len(flags):.1f}%)"


def false_alarm_table(results: list[SizeResult]) -> Table:
    t = Table(title="Stationary control: alarms per window (setting: false-alarm rate 0.01 per "
                    "window; per feature 0.01/20 = 0.05%)")
    for col in ("window rows", "windows", "data_drift", "joint drift", "feature flags",
                "per-feature rate", "estimate err mean abs / max (pts)", "unreliable"):
        t.add_column(col)
    for r in results:
        ws = r.stationary
        flags = sum(len(w.features) for w in ws)
        errs = np.abs([w.error for w in ws])
        t.add_row(str(r.size), str(len(ws)), _rate([w.data_drift for w in ws]),
                  _rate([w.joint for w in ws]), str(flags),
                  f"{100 * flags / (len(ws) * len(NAMES)):.3f}%",
                  f"{errs.mean():.1f} / {errs.max():.1f}",
                  str(sum(not w.reliable for w in ws)))
    return t


def _named(s: Scenario, d: Detection) -> str:
    if d.delay is None:
        return "-"
    if s.joint:
        named = {f for p in d.window.pairs for f in p.split("~")}
        return f"{d.window.pairs[0] if d.window.pairs else '?'} ({len(d.window.pairs)} pairs)" \
            if named else "-"
    right = len(d.window.features & s.features)
    return f"{right}/{len(s.features)} +{len(d.window.features - s.features)}"


def _cells(results: list[SizeResult], cell: Callable[[Scenario, Detection], str]) -> list[list[str]]:
    return [[s.label, *(cell(s, r.detections[s.label]) for r in results)] for s in scenarios()]


def detection_table(results: list[SizeResult]) -> Table:
    t = Table(title=f"Detection delay in windows after the onset (- : not within {MAX_DELAY}); "
                    "features named at that window: right/shifted +extra (joint: pairs)")
    t.add_column("scenario")
    for r in results:
        t.add_column(f"{r.size} rows")
    for row in _cells(results, lambda s, d: f"{d.delay or '-'} | {_named(s, d)}"):
        t.add_row(*row)
    return t


def estimate_table(results: list[SizeResult]) -> Table:
    t = Table(title="Estimated minus realised accuracy (points) at the first window after the "
                    "onset; rows out of support; U = flagged unreliable")
    t.add_column("scenario")
    for r in results:
        t.add_column(f"{r.size} rows")

    def cell(_: Scenario, d: Detection) -> str:
        w = d.window
        return (f"{w.error:+.1f} (acc {w.realised:.3f}) oos {100 * w.out_of_support:.0f}%"
                f"{' U' if not w.reliable else ''}")

    for row in _cells(results, cell):
        t.add_row(*row)
    return t


def concept_table(c: dict[str, Any]) -> Table:
    t = Table(title="Concept shift with labels, window 1,000 (one retrain with "
                    "--max-original-drop 1)")
    for col in ("what", "value"):
        t.add_column(col)
    out = c["out"] or {}
    change = (out.get("data") or {}).get("change")
    rows = [
        ("v1 realised, 2 windows before the shift",
         ", ".join(f"{w.realised:.3f}" for w in c["before"])),
        ("v1 realised, 3 windows after it", ", ".join(f"{w.realised:.3f}" for w in c["after"])),
        ("data_drift / joint flags after it",
         ", ".join(f"{w.data_drift}/{w.joint}" for w in c["after"])),
        ("estimate after it (est - realised, pts)",
         ", ".join(f"{w.error:+.1f}" for w in c["after"])),
        ("retrain exit, promoted, reason",
         f"{c['code']}, {out.get('promoted')}, {out.get('reason', c['err'])}"),
        ("change found at row (of 5,000 labelled)", str(change.get("index") if change else "-")),
        ("v1 on 5,000 fresh pre-shift rows", f"{c['v1_old']:.3f}"),
        ("v1 on 5,000 fresh post-shift rows", f"{c['v1_new']:.3f}"),
        (f"production (v{c['production']}) on the same post-shift rows", f"{c['prod_new']:.3f}"),
        (f"served by v{c['production']} through the sidecar, next window",
         f"{c['served'].realised:.3f}"),
    ]
    for row in rows:
        t.add_row(*row)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, nargs="+", default=[200, 500, 1000, 2000])
    ap.add_argument("--stationary", type=int, default=50, help="stationary windows per size")
    ap.add_argument("--train-rows", type=int, default=5000)
    ap.add_argument("--no-concept", action="store_true", help="skip the concept shift")
    args = ap.parse_args()
    t0 = time.monotonic()
    table = MixedTable(seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        registry_dir = train(table, Path(tmp), args.train_rows)
        concept = None if args.no_concept else run_concept(table, registry_dir)
        results = [run_size(table, registry_dir, size, args.stationary) for size in args.windows]
    console.print(false_alarm_table(results))
    console.print(detection_table(results))
    console.print(estimate_table(results))
    if concept is not None:
        console.print(concept_table(concept))
    console.print(f"total {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
