"""The event sample (serving/sampling.py, modelloop/sampling.py): which rows it keeps, as a table;
a rows-per-second budget; and between real processes, a `modelloop serve` sampling a quarter of
its rows into a real `modelloop monitor`: exact counts on both sides, every row of a request
marked as labelled kept, and feedback for a row left out answered ``not_sampled``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from modelloop.sampling import MIN_SHARE, kept_by, quantize, row_scores
from modelloop.synthetic import SyntheticTask
from monitoring.store import open_store
from serving.sampling import EventSampler, LabelledId, labelled
from tests.monitoring.helpers import ServingProcess, SidecarProcess, TrainedModel
from tests.serving.conftest import wait_until
from tests.serving.test_events_outage import metric, show


@pytest.mark.parametrize(("share", "expected"), [
    (1.0, 1.0),  # everything
    (2.0, 1.0),  # more than everything is everything
    (0.3, 0.25),  # down to a power of two, so smaller shares keep subsets of larger ones
    (0.25, 0.25),  # a power of two stays
    (1e-12, MIN_SHARE),  # never nothing
])
def test_shares_are_powers_of_two(share: float, expected: float) -> None:
    assert quantize(share) == expected


@pytest.mark.parametrize(("request_id", "expected"), [
    ("abc", None),  # not a row's id: no row number
    ("-3", None),  # no base id
    ("abc-x", None),  # the row is not a number
    ("abc-³", None),  # a digit, but not an ASCII one
])
def test_ids_that_are_not_rows_have_no_answer(request_id: str, expected: None) -> None:
    assert kept_by(request_id, 0.5) is expected


def test_the_sample_keeps_the_share_of_each_request_s_rows_by_the_shared_rule() -> None:
    sampler = EventSampler(share=0.25)
    counts = [4096, 1, 3, 1000]
    bases = ["big", "one", "three", LabelledId("labelled")]
    kept, share = sampler.select("m", bases, [0, 7, 0, 0], counts)
    assert share == 0.25 and kept.rows is not None
    chosen = set(kept.rows.tolist())
    # the 4096-row request keeps a quarter of its rows, evenly spread (a low-discrepancy rule)
    big = [r for r in chosen if r < 4096]
    assert abs(len(big) - 1024) <= 2
    assert all(abs(sum(1 for r in big if lo <= r < lo + 512) - 128) <= 2 for lo in range(0, 4096, 512))
    # the labelled request keeps every row
    assert set(range(4100, 5100)) <= chosen
    # every row's fate is the rule the sidecar evaluates again from its id alone
    ids, starts = [], np.cumsum([0, *counts])
    for request, first, n in zip(kept.requests, kept.first_rows, kept.counts, strict=True):
        ids += [f"{bases[request]}-{first + k}" for k in range(n)]
    assert len(ids) == len(chosen)
    for i, base in enumerate(bases[:3]):
        first = 7 if base == "one" else 0
        for r in range(counts[i]):
            stacked = starts[i] + r
            assert (stacked in chosen) == kept_by(f"{base}-{first + r}", share) == (row_scores(base, first + r, 1)[0] < share)
    assert labelled("x", "1") == "x" and isinstance(labelled("x", "true"), LabelledId)
    assert not isinstance(labelled("x", "0"), LabelledId) and not isinstance(labelled("x", None), LabelledId)


def test_one_row_requests_take_the_same_rule() -> None:
    ids = [f"q{i}" for i in range(2000)]
    labelled_one = LabelledId("q0")  # kept whatever its score
    kept, _ = EventSampler(share=0.125).select("m", [labelled_one, *ids[1:]], [3] * 2000, [1] * 2000)
    assert [ids[i] for i in kept.requests] == ["q0"] + [r for r in ids[1:] if kept_by(f"{r}-3", 0.125)]
    assert kept.rows is not None and kept.rows.tolist() == kept.requests and kept.counts == [1] * len(kept.requests)


def test_the_sample_is_independent_of_the_canary_split() -> None:
    from serving.canary import canary_bucket

    ids = [f"req{i}" for i in range(20_000)]
    canary = [rid for rid in ids if canary_bucket(rid) < 0.1]  # the ids a 10% canary answers
    # the sample keeps an eighth of the canary's requests and of production's, not the canary's first
    for part in (canary, [rid for rid in ids if canary_bucket(rid) >= 0.1]):
        share = sum(bool(kept_by(f"{rid}-0", 0.125)) for rid in part) / len(part)
        assert abs(share - 0.125) < 0.02


def test_a_rows_per_second_budget_lowers_the_share_while_traffic_is_larger() -> None:
    now = [0.0]
    sampler = EventSampler(rows_per_s=2000, workers=2, clock=lambda: now[0])  # 1000 a second each
    assert sampler.share("m", 0) == 1.0
    now[0] = 1.0
    assert sampler.share("m", 10_000) == 0.0625  # 10,000 rows a second: 1000 / 10,000 -> 1/16
    now[0] = 2.0
    assert sampler.share("m", 500) == 1.0  # quiet again: everything
    now[0] = 2.1  # a burst: 5000 rows in 0.1 s are more than a second's budget at share 1
    assert sampler.share("m", 5000) == 0.015625  # 50,000 a second: 1/64 at once, not a second later
    assert EventSampler(share=1.0).active is False
    assert EventSampler(shares={"m": 0.5}).configured("m") == 0.5



@pytest.fixture
def sampled(tmp_path: Path) -> Iterator[tuple[TrainedModel, Path, SidecarProcess, ServingProcess]]:
    """A real sidecar and a real server sampling a quarter of model churn's rows into it."""
    trained = TrainedModel.fit(SyntheticTask(seed=0))
    home = tmp_path / "home"
    trained.register(home / "registry")
    sidecar = SidecarProcess(home, tmp_path / "sidecar.log", {"MODELLOOP_MONITOR_CHECK_INTERVAL_S": "3600"})
    serving = ServingProcess(home, tmp_path / "serving.log", sidecar.url)
    serving.env["MODELLOOP_SERVING_EVENT_SHARES"] = '{"churn": 0.25}'
    try:
        yield trained, home, sidecar.start(), serving.start()
    except BaseException:
        show([sidecar.log_path, serving.log_path])
        raise
    finally:
        serving.close()
        sidecar.close()


@pytest.mark.integration
@pytest.mark.slow
def test_a_sampled_server_and_a_real_sidecar_keep_exact_counts_and_every_labelled_row(
        sampled: tuple[TrainedModel, Path, SidecarProcess, ServingProcess]) -> None:
    trained, home, sidecar, serving = sampled
    rows = trained.task.sample(2100, seed=5)[trained.task.feature_names]
    ids, _ = serving.predict(rows.iloc[:2000], rows_per_request=200)
    marked: list[str] = []
    for start in range(2000, 2100, 10):  # requests that will be labelled: all their rows
        resp = serving.client.post("/predict", json={"instances": rows.iloc[start:start + 10].to_dict("records")},
                                   headers={"X-Modelloop-Label-Expected": "1"})
        assert resp.status_code == 200, resp.text
        marked += [p["request_id"] for p in resp.json()["predictions"]]
    wanted = [rid for rid in ids if kept_by(rid, 0.25)] + marked
    assert 400 < len(wanted) - len(marked) < 600  # about a quarter of 2000
    wait_until(lambda: metric(serving.url, "modelloop_serving_events_sent_total") >= len(wanted), 60,
               "serving to have the sampled events acknowledged")
    assert metric(serving.url, "modelloop_serving_events_sampled_total", result="kept") == len(wanted)
    assert metric(serving.url, "modelloop_serving_events_sampled_total", result="left_out") == 2100 - len(wanted)
    assert metric(serving.url, "modelloop_serving_rows_total") == 2100
    assert metric(serving.url, "modelloop_serving_events_dropped_total") == 0
    # the sidecar stored exactly the sample and knows what it stands for
    assert metric(sidecar.url, "modelloop_events_seen_total", model="churn") == 2100
    assert metric(sidecar.url, "modelloop_events_sample_share_ratio", model="churn") == 0.25
    left = next(rid for rid in ids if not kept_by(rid, 0.25))
    answer = httpx.post(f"{sidecar.url}/feedback", json={"feedback": [
        {"request_id": marked[0], "label": 1}, {"request_id": left, "label": 0},
        {"request_id": "not-a-row", "label": 0}]}, timeout=30).json()
    assert answer == {"joined": 1, "unknown": ["not-a-row"], "duplicate": [], "ambiguous": [],
                      "not_sampled": [left]}
    assert metric(sidecar.url, "modelloop_feedback_total", model="churn", result="not_sampled") == 1
    sidecar.terminate()
    store = open_store(f"sqlite:///{home / 'monitor' / 'events.db'}")
    try:
        assert set(store.label_targets(ids + marked)) == set(wanted)
        assert store.count_events() == len(wanted)
    finally:
        store.close()


def test_the_emitter_sends_the_sample_with_what_it_stands_for_and_keeps_shadow_answers_paired() -> None:
    from serving.events import EventEmitter
    from serving.predictions import interpret
    from tests.serving.test_events import META, Sink, run, until

    sink = Sink()
    counted: list[tuple[str, int, int]] = []
    x = np.zeros((1000, 2), np.float32)
    preds = interpret(META, {"probabilities": np.tile(np.array([[0.25, 0.75]], np.float32), (1000, 1))})

    async def main() -> None:
        em = EventEmitter(sink.url, batch_size=100_000, flush_interval_s=0.05, sampler=EventSampler(share=0.125),
                          on_sampled=lambda m, kept, left: counted.append((m, kept, left)))
        await em.start()
        em.record_requests("m", 3, ["big"], [1000], x, preds, [0.001])
        em.record_requests("m", 4, ["big"], [1000], x, preds, [0.001], mode="shadow")  # the challenger's answers
        await until(lambda: em.sent and not em.pending_rows, "the sampled events")
        await em.stop()

    try:
        run(main)
    finally:
        sink.close()
    groups = [g for b in sink.bodies for g in b["columns"]]
    real = [g for g in groups if g["mode"] == "realtime"]
    shadow = [g for g in groups if g["mode"] == "shadow"]
    ids = [e["request_id"] for e in sink.events if e["mode"] == "realtime"]
    assert ids == [e["request_id"] for e in sink.events if e["mode"] == "shadow"]  # the same requests
    assert ids == [f"big-{r}" for r in range(1000) if kept_by(f"big-{r}", 0.125)] and 120 <= len(ids) <= 130
    assert sum(g["seen"] for g in real) == 1000 and sum(g["seen"] for g in shadow) == 0
    assert {g["share"] for g in groups} == {0.125}
    assert counted == [("m", len(ids), 1000 - len(ids))]  # the challenger's rows are not predictions made
