"""The live gate (monitoring/live_gate.py) and shadow traffic (serving/shadow.py).

The paired tests on known answers and their false-decision rate over many simulated challengers
no better than the champion; then the path as it runs: a real ``modelloop serve`` shadows the
``challenger`` alias, a real ``modelloop monitor`` stores both answers, labels arrive, and the
gate promotes a better challenger (after a concept shift) and retires a worse one, each decision
in the registry's history and on /metrics; a challenger that cannot answer changes nothing for
callers."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from modelloop.registry import Registry, RegistryError
from modelloop.schemas import ALIAS_CHALLENGER, MODE_SHADOW, Task
from modelloop.synthetic import TARGET, SyntheticTask
from monitoring.live_gate import Action, LiveGate, judge, looks
from monitoring.records import EventRow, pack
from monitoring.store import EventStore
from tests.monitoring.helpers import (
    CLASS_LABELS,
    ServingProcess,
    SidecarProcess,
    TrainedModel,
    free_port,
)

MODELLOOP = str(Path(sys.executable).with_name("modelloop"))


# -- the paired tests ----------------------------------------------------------------------------
def pairs(n: int, champion_acc: float, challenger_acc: float, seed: int) -> tuple[np.ndarray, ...]:
    """Labels and two classifiers' predictions, each right with its accuracy, independently."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(float)
    a = np.where(rng.random(n) < champion_acc, y, 1 - y)
    b = np.where(rng.random(n) < challenger_acc, y, 1 - y)
    return y, a, b


def test_no_look_before_min_rows() -> None:
    y, a, b = pairs(199, 0.6, 0.95, seed=1)
    v = judge(Task.classification, y, a, b, min_rows=200, alpha=0.05)
    assert v.action == Action.wait and v.judged_rows == 0 and v.p_value is None
    assert v.reason == "199 of 200 labelled requests needed"


def test_a_clearly_better_challenger_is_promoted_and_a_worse_one_retired() -> None:
    y, a, b = pairs(300, 0.70, 0.90, seed=2)
    better = judge(Task.classification, y, a, b, min_rows=200, alpha=0.05)
    assert better.action == Action.promote
    assert better.judged_rows == 200  # the first look: the oldest 200 pairs
    assert better.challenger_score > better.champion_score
    assert better.p_value is not None and better.p_value < better.alpha == 0.025
    # McNemar's counts: requests where only one of the two was right
    ra, rb = a[:200] == y[:200], b[:200] == y[:200]
    assert (better.champion_wins, better.challenger_wins) == (int(np.sum(ra & ~rb)), int(np.sum(rb & ~ra)))
    worse = judge(Task.classification, y, b, a, min_rows=200, alpha=0.05)
    assert worse.action == Action.retire and worse.p_value == better.p_value


def test_identical_answers_never_decide() -> None:
    y, a, _ = pairs(5000, 0.8, 0.8, seed=3)
    v = judge(Task.classification, y, a, a.copy(), min_rows=200, alpha=0.05)
    assert v.action == Action.wait and v.p_value is None and v.judged_rows == 3200
    assert looks(5000, 200) == 5  # 200, 400, 800, 1600, 3200


def test_regression_uses_the_paired_absolute_errors() -> None:
    rng = np.random.default_rng(4)
    y = rng.normal(0, 1, 400)
    close, far = y + rng.normal(0, 0.1, 400), y + rng.normal(0, 0.5, 400)
    v = judge(Task.regression, y, far, close, min_rows=200, alpha=0.05)
    assert v.action == Action.promote and v.challenger_score < v.champion_score  # MAE
    assert judge(Task.regression, y, close, far, min_rows=200, alpha=0.05).action == Action.retire


def test_false_decisions_stay_below_alpha_over_all_looks() -> None:
    """Challengers exactly as good as the champion, judged after every 100 new labels up to 6,400:
    the share ever promoted or retired stays below alpha (the looks spend it, module docstring),
    where one test at alpha per check would decide far more often."""
    alpha, runs, decided, naive = 0.05, 200, 0, 0
    for seed in range(runs):
        y, a, b = pairs(6400, 0.8, 0.8, seed=100 + seed)
        for n in range(200, 6401, 100):
            v = judge(Task.classification, y[:n], a[:n], b[:n], min_rows=200, alpha=alpha)
            if v.action != Action.wait:
                decided += 1
                break
        from scipy import stats
        for n in range(200, 6401, 400):  # the naive alternative, for contrast
            ra, rb = a[:n] == y[:n], b[:n] == y[:n]
            wins_a, wins_b = int(np.sum(ra & ~rb)), int(np.sum(rb & ~ra))
            if stats.binomtest(wins_b, wins_a + wins_b, 0.5).pvalue < alpha:
                naive += 1
                break
    assert decided / runs <= alpha
    assert naive / runs > 2 * alpha  # why the looks spend alpha: without it, many false decisions


# -- the store: both answers joined to one label ------------------------------------------------
def test_store_joins_shadow_answers_to_labelled_events(store: EventStore) -> None:
    """Shadow rows are kept apart (not events, not counted as ingested), stored once per id and
    version, and paired with the champion's labelled, unambiguous events; retention forgets those
    older than the oldest event kept. SQLite and PostgreSQL."""
    def row(rid: str, version: int, mode: str, pred: float, ts: float) -> EventRow:
        return EventRow(rid, "churn", version, ts, mode, pack([0.5, 1.5]), pred, None, 0.001, ts)

    events = [row(f"r{i}", 1, "realtime", float(i % 2), 100.0 + i) for i in range(6)]
    shadow = [row(f"r{i}", 2, MODE_SHADOW, 1.0, 100.0 + i) for i in range(6)]
    stored = store.insert_batches([events + shadow[:3], shadow[3:] + shadow[:1]])  # r0's shadow re-sent
    assert [s.new for s in stored] == [{"churn": 6}, {}] and [s.shadow for s in stored] == [3, 4]
    assert store.count_events() == 6 and store.count_shadow("churn", 2) == 6
    store.set_labels([("r0", 0.0, 200.0), ("r1", 0.0, 200.0), ("r4", 1.0, 200.0)])
    store.insert_batches([[row("r4", 1, "realtime", 1.0 - 0.0, 100.0)]])  # another prediction: r4 ambiguous
    labels, champion, challenger = store.live_pairs("churn", 1, 2, since=0.0)
    assert labels.tolist() == [0.0, 0.0] and champion.tolist() == [0.0, 1.0]
    assert challenger.tolist() == [1.0, 1.0]
    assert len(store.live_pairs("churn", 1, 2, since=101.5)[0]) == 0  # r0, r1 are older
    assert len(store.live_pairs("churn", 1, 3, since=0.0)[0]) == 0  # no such challenger
    store.retain(cutoff_ts=103.0)
    assert store.count_shadow("churn", 2) == 3  # r3..r5 kept with their events


# -- against real processes ---------------------------------------------------------------------
TASK = SyntheticTask(n_features=8, n_informative=6, noise=0.2, seed=5)
SHIFT = 1.0  # the concept the traffic follows after the shift


def fitted(concept: float, rows: int, seed: int) -> TrainedModel:
    train = TASK.sample(rows, seed=seed, concept=concept)
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    pipe.fit(train[TASK.feature_names].to_numpy(np.float64), train[TARGET].to_numpy())
    return TrainedModel(TASK, pipe)


@dataclass
class Loop:
    home: Path
    serving: ServingProcess
    sidecar: SidecarProcess

    @property
    def registry(self) -> Registry:
        return Registry(self.home / "registry")

    def serving_metric(self, name: str, **labels: str) -> float:
        return _metric(httpx.get(f"{self.serving.url}/metrics", timeout=30).text, name, labels)

    def sidecar_metric(self, name: str, **labels: str) -> float:
        return _metric(httpx.get(f"{self.sidecar.url}/metrics", timeout=30).text, name, labels)

    def name_challenger(self, model: TrainedModel) -> int:
        version = model.register(self.home / "registry", promote=False).version
        self.registry.set_alias("churn", ALIAS_CHALLENGER, version)
        _wait(lambda: self._shadowing(version), 60, f"serving to shadow v{version}")
        return version

    def _shadowing(self, version: int) -> bool:
        status = httpx.get(f"{self.serving.url}/admin/model", timeout=30).json()
        return (status.get("shadow") or {}).get("version") == version

    def traffic_with_labels(self, rows: int, seed: int) -> None:
        """Requests after the shift, then every one of their labels, once all events (the
        champion's and the shadow's) are stored."""
        df = TASK.sample(rows, seed=seed, concept=SHIFT)
        before = self.serving_metric("modelloop_serving_shadow_rows_total", result="scored")
        sent = self.serving_metric("modelloop_serving_events_sent_total")  # by earlier calls too
        ids, _ = self.serving.predict(df[TASK.feature_names], rows_per_request=20)
        _wait(lambda: self.serving_metric("modelloop_serving_shadow_rows_total", result="scored")
              >= before + rows, 60, "the shadow to score every row")
        _wait(lambda: self.serving_metric("modelloop_serving_events_sent_total") >= sent + 2 * rows, 60,
              "serving to send both answers of every row")
        feedback = [{"request_id": rid, "label": CLASS_LABELS[y]}
                    for rid, y in zip(ids, df[TARGET].to_numpy(), strict=True)]
        resp = httpx.post(f"{self.sidecar.url}/feedback", json={"feedback": feedback}, timeout=60)
        assert resp.status_code == 200 and resp.json()["joined"] == rows, resp.text

    def check(self) -> dict[str, Any]:
        resp = httpx.post(f"{self.sidecar.url}/check", timeout=120)
        assert resp.status_code == 200, resp.text
        return resp.json()


def _metric(text: str, name: str, labels: dict[str, str]) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[Loop]:
    home = tmp_path / "home"
    fitted(0.0, 4000, seed=1).register(home / "registry")  # v1, production: the old concept
    sidecar_port = free_port()
    serving = ServingProcess(home, tmp_path / "serving.log", f"http://127.0.0.1:{sidecar_port}")
    serving.env["MODELLOOP_SERVING_ALIAS_POLL_INTERVAL_S"] = "0.1"
    sidecar = SidecarProcess(home, tmp_path / "sidecar.log", port=sidecar_port, env={
        "MODELLOOP_MONITOR_CHECK_INTERVAL_S": "3600",  # the test runs each check itself
        "MODELLOOP_MONITOR_LIVE_GATE_MIN_ROWS": "200"})
    lp = Loop(home, serving, sidecar)
    try:
        sidecar.start()
        serving.start()
        yield lp
    except BaseException:
        print(f"--- serving log ---\n{lp.serving.log()[-20000:]}\n--- sidecar log ---\n{sidecar.log()[-20000:]}")
        raise
    finally:
        lp.serving.close()
        sidecar.close()


@pytest.mark.integration
@pytest.mark.slow
def test_live_gate_promotes_a_better_challenger_and_retires_a_worse_one(loop: Loop) -> None:
    # a challenger trained on the new concept shadows production (v1, the old concept)
    v2 = loop.name_challenger(fitted(SHIFT, 4000, seed=2))
    loop.traffic_with_labels(300, seed=10)
    loop.check()  # (the sidecar's first scheduled check, late on a busy machine, may judge first)
    promoted = next(e for e in loop.registry.history("churn") if e["op"] == "promote" and e["version"] == v2)
    verdict = promoted["live_gate"]
    assert verdict["action"] == "promote", verdict
    assert verdict["rows"] == 300 and verdict["judged_rows"] == 200
    assert verdict["challenger_score"] > verdict["champion_score"]
    aliases = loop.registry.aliases("churn")
    assert aliases["production"] == v2 and aliases["previous"] == 1 and ALIAS_CHALLENGER not in aliases
    assert verdict["challenger_version"] == v2 and verdict["champion_version"] == 1
    assert loop.sidecar_metric("modelloop_live_gate_decisions_total", model="churn", decision="promote") == 1
    assert loop.sidecar_metric("modelloop_live_gate_score", model="churn", role="challenger") == \
        pytest.approx(verdict["challenger_score"])
    # serving follows: v2 answers, nothing shadows it any more
    _wait(lambda: loop.serving.client.post("/predict", json={"instances": [[0.0] * 8]}).json()["version"] == v2,
          60, "serving to swap to v2")
    agreed = loop.serving_metric("modelloop_serving_shadow_agreement_rows_total", model="churn")
    assert 0 < agreed < 300  # two concepts agree on some rows, not all

    # a challenger of the old concept, worse on today's traffic, is retired
    v3 = loop.name_challenger(fitted(0.0, 4000, seed=3))
    loop.traffic_with_labels(300, seed=11)
    verdict = loop.check()["models"]["churn"]["live_gate"]  # the check after the traffic judges
    assert verdict["action"] == "retire", verdict
    aliases = loop.registry.aliases("churn")
    assert aliases["production"] == v2 and ALIAS_CHALLENGER not in aliases
    retired = loop.registry.history("churn")[-1]
    assert retired["op"] == "remove_alias" and retired["live_gate"]["challenger_version"] == v3
    assert retired["live_gate"]["p_value"] == verdict["p_value"]
    assert loop.sidecar_metric("modelloop_live_gate_decisions_total", model="churn", decision="retire") == 1
    history = subprocess.run([MODELLOOP, "models", "history", "churn"], capture_output=True, text=True,
                             env={**loop.serving.env, "COLUMNS": "400"}, timeout=60)
    lines = history.stdout.splitlines()
    assert history.returncode == 0, history.stderr
    assert any(f"promote {v2}" in line and "live gate: the challenger wins" in line for line in lines)
    assert any("remove_alias challenger" in line and "live gate: the challenger loses" in line for line in lines)


def slow(onnx_bytes: bytes, size: int = 2000) -> bytes:
    """The same graph made slow: a [size, size] matrix product per batch, scaled by 0 and added
    to the logits (it depends on the input, so ONNX Runtime cannot fold it away at load)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load_from_string(onnx_bytes)
    g = model.graph
    g.initializer.extend([numpy_helper.from_array(np.ones((size, size), np.float32), "big"),
                          numpy_helper.from_array(np.zeros((), np.float32), "zero")])
    softmax = next(n for n in g.node if n.op_type == "Softmax")
    softmax.input[0] = "logits_slow"
    g.node.insert(len(g.node) - 1, helper.make_node("ReduceSum", ["input"], ["total"], keepdims=0))
    g.node.insert(len(g.node) - 1, helper.make_node("Mul", ["total", "zero"], ["nothing"]))
    g.node.insert(len(g.node) - 1, helper.make_node("Mul", ["big", "nothing"], ["m"]))
    g.node.insert(len(g.node) - 1, helper.make_node("MatMul", ["m", "big"], ["p"]))
    g.node.insert(len(g.node) - 1, helper.make_node("ReduceSum", ["p"], ["q"], keepdims=0))
    g.node.insert(len(g.node) - 1, helper.make_node("Add", ["logits", "q"], ["logits_slow"]))
    return model.SerializeToString()


@pytest.mark.integration
@pytest.mark.slow
def test_a_slow_challenger_gives_way_and_changes_nothing_for_callers(loop: Loop) -> None:
    """A challenger far slower than production (a 2000x2000 matrix product per call), behind a shadow queue of 40 rows: every caller
    gets production's answer, the shadow drops what it cannot hold (counted), and what it did
    score went to the sidecar under the callers' request ids."""
    loop.serving.close()
    serving = ServingProcess(loop.home, loop.serving.log_path, loop.serving.env["MODELLOOP_SERVING_SIDECAR_URL"])
    serving.env.update(MODELLOOP_SERVING_ALIAS_POLL_INTERVAL_S="0.1", MODELLOOP_SERVING_SHADOW_QUEUE_ROWS="40")
    loop.serving = serving.start()
    model = fitted(SHIFT, 4000, seed=4)
    meta = model.register(loop.home / "registry", promote=False)  # v2, then its slow twin v3
    reg = loop.registry
    v3 = reg.register(meta.model_copy(update={"version": 0}), slow(model.onnx_bytes()),
                      reference=model.reference(500)).version
    reg.set_alias("churn", ALIAS_CHALLENGER, v3)
    _wait(lambda: loop._shadowing(v3), 60, "serving to shadow the slow challenger")
    df = TASK.sample(2000, seed=12)
    x = df[TASK.feature_names].to_numpy(np.float32)
    expected = fitted(0.0, 4000, seed=1).predict_proba(x).argmax(axis=1)
    ids, preds = loop.serving.predict(df[TASK.feature_names], rows_per_request=10)
    assert len(ids) == 2000 and np.array_equal(preds, expected)
    _wait(lambda: httpx.get(f"{loop.serving.url}/admin/model", timeout=30).json()["shadow"]["queued_rows"] == 0,
          120, "the shadow queue to drain")
    scored = loop.serving_metric("modelloop_serving_shadow_rows_total", result="scored")
    dropped = loop.serving_metric("modelloop_serving_shadow_rows_total", result="dropped")
    assert scored + dropped == 2000 and dropped > 0 and scored > 0
    assert loop.serving_metric("modelloop_serving_shadow_rows_total", result="failed") == 0


# -- the gate's decisions on a real registry and store -------------------------------------------
@pytest.fixture
def gate(tmp_path: Path) -> Iterator[tuple[LiveGate, Registry, EventStore]]:
    """v1 production, v2 (another fit) named challenger; a real SQLite store; min_rows 200."""
    from prometheus_client import CollectorRegistry

    from monitoring.metrics import MonitorMetrics
    from monitoring.store import open_store

    registry = Registry(tmp_path / "registry")
    fitted(0.0, 500, seed=1).register(tmp_path / "registry")
    v2 = fitted(SHIFT, 500, seed=2).register(tmp_path / "registry", promote=False).version
    registry.set_alias("churn", ALIAS_CHALLENGER, v2)
    store = open_store(f"sqlite:///{tmp_path / 'events.db'}", "g_")
    yield LiveGate(registry, store, MonitorMetrics(CollectorRegistry()), min_rows=200, alpha=0.05,
                   max_age_s=3600), registry, store
    store.close()


def _pairs_stored(store: EventStore, first: int, y: np.ndarray, a: np.ndarray, b: np.ndarray,
                  labelled: range) -> None:
    """Events of v1 answering ``a`` and shadow answers of v2 answering ``b`` for requests
    ``first..``, then labels ``y`` for the requests in ``labelled``."""
    t = time.time()
    rows = [EventRow(f"q{first + i}", "churn", 1, t + i * 1e-3, "realtime", pack([0.0] * 8), float(a[i]),
                     None, 0.001, t) for i in range(len(y))]
    rows += [EventRow(f"q{first + i}", "churn", 2, t + i * 1e-3, MODE_SHADOW, pack([0.0] * 8), float(b[i]),
                      None, 0.001, t) for i in range(len(y))]
    store.insert_batches([rows])
    store.set_labels([(f"q{first + i}", float(y[i]), t + 5) for i in labelled])


def test_each_look_is_taken_once_however_late_labels_reorder_the_pairs(gate) -> None:
    live, registry, store = gate
    y, a, b = pairs(400, 0.8, 0.8, seed=7)  # equally good: look 1 finds nothing
    _pairs_stored(store, 0, y, a, b, range(200, 400))
    first = live.check("churn", time.time())
    assert first is not None and first.action == Action.wait and first.judged_rows == 200
    # late labels for the oldest requests, each one the challenger's win: judged again, the
    # oldest 200 pairs would now promote; look 1 was taken, so the gate waits for look 2
    store.set_labels([(f"q{i}", float(b[i]), time.time()) for i in range(150) if a[i] != b[i]])
    now_pairs = store.live_pairs("churn", 1, 2, since=0.0)
    assert judge(Task.classification, *now_pairs, min_rows=200, alpha=0.05).action == Action.promote
    again = live.check("churn", time.time())
    assert again is not None and again.action == Action.wait and again.rows == len(now_pairs[0])
    assert "look 1 taken" in again.reason
    assert registry.aliases("churn").get(ALIAS_CHALLENGER) == 2


def test_production_moving_retires_the_challenger(gate) -> None:
    live, registry, _ = gate
    v3 = fitted(0.0, 500, seed=3).register(registry.root, promote=True).version  # an operator promotes
    verdict = live.check("churn", time.time())
    assert verdict is not None and verdict.action == Action.retire
    assert verdict.reason.startswith(f"production moved to v{v3} while the challenger was judged")
    assert ALIAS_CHALLENGER not in registry.aliases("churn")


def test_a_challenger_of_other_classes_is_retired_not_compared(gate, tmp_path: Path) -> None:
    live, registry, _ = gate
    model = fitted(SHIFT, 500, seed=4)
    meta = model.register(tmp_path / "registry", promote=False)
    other = registry.register(meta.model_copy(update={"version": 0, "class_labels": ["stay", "churn"]}),
                              model.onnx_bytes(), reference=model.reference(500))
    registry.set_alias("churn", ALIAS_CHALLENGER, other.version)
    verdict = live.check("churn", time.time())
    assert verdict is not None and verdict.action == Action.retire
    assert "answers another task or classes" in verdict.reason


def test_the_gate_promotes_only_over_the_production_it_judged(gate) -> None:
    """Compare-and-set: a promotion decided against v1 does nothing once production moved, and
    removing the alias does nothing once it names another version."""
    _, registry, _ = gate
    with pytest.raises(RegistryError, match="production is v1, not v3 as expected"):
        registry.promote("churn", 2, expect_production=3)
    with pytest.raises(RegistryError, match="alias 'challenger' names v2, not v5 as expected"):
        registry.remove_alias("churn", ALIAS_CHALLENGER, expect_version=5)
    assert registry.aliases("churn") == {"production": 1, ALIAS_CHALLENGER: 2}
