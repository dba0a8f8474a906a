"""Categorical features on the monitoring side (issue #16 item 1): events whose rows hold strings
are checked against the model's kinds, stored and read back as strings on both engines, judged
for drift (chi-squared on category counts, a rise of unknown values) at the calibrated rate, and
exported to retraining as strings. One real sidecar for the module; the rest are unit tests.

The model is a real ONNX graph written here as the contract's section 2 has it: ``categories``
split by column, one ONNX-ML ``LabelEncoder`` per column (unknown -> 0), concatenated with
``input`` and reordered to ``feature_names`` order, then a small logistic head."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from modelloop.categorical import feeds
from modelloop.registry import Registry
from modelloop.schemas import (
    CATEGORIES_INPUT,
    INPUT_NAME,
    REF_LABEL,
    REF_PREDICTION,
    REF_PROBA_PREFIX,
    ModelMetadata,
    Task,
    TensorSpec,
)
from monitoring.data_quality import window_quality
from monitoring.drift import ReferenceProfile, category_p_value, check_drift
from monitoring.importance import version_importance
from monitoring.ingest import InputError, ModelCatalog, parse_events
from monitoring.records import EventRow, is_row_json, pack_row, window_frame
from monitoring.store import EventStore
from tests.monitoring.helpers import sidecar_process

NAMES = ["age", "plan", "income", "region"]
CATEGORIES = {"plan": ["basic", "plus", "pro"], "region": ["north", "south", "east", "west"]}
PLANS = ["basic", "plus", "pro", "trial"]  # "trial" is rare: not in the vocabulary (unknown)
PLAN_P = [0.5, 0.3, 0.15, 0.05]
REGIONS = ["north", "south", "east", "west"]
MODEL = "shop"


def sample(n: int, rng: np.random.Generator, plan_p: list[float] = PLAN_P,
           new_region: float = 0.0) -> pd.DataFrame:
    """Rows of the shop data: two numbers, two categories (region missing in 2% of rows;
    ``new_region`` of them "atlantis", which neither the reference nor the model knows)."""
    region = rng.choice(np.array(REGIONS, dtype=object), size=n).astype(object)
    region[rng.random(n) < 0.02] = None
    region[rng.random(n) < new_region] = "atlantis"
    return pd.DataFrame({
        "age": rng.normal(40, 10, n), "plan": rng.choice(np.array(PLANS, dtype=object), size=n, p=plan_p),
        "income": rng.lognormal(3, 0.5, n), "region": region})


def onnx_bytes() -> bytes:
    """``input`` [N, 2] float32 (age, income) and ``categories`` [N, 2] string (plan, region)
    -> ``probabilities`` [N, 2]."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Split", [CATEGORIES_INPUT], ["plan_s", "region_s"], axis=1)]
    for name in ("plan", "region"):
        nodes.append(helper.make_node(
            "LabelEncoder", [f"{name}_s"], [f"{name}_code"], domain="ai.onnx.ml",
            keys_strings=CATEGORIES[name], values_floats=[float(i + 1) for i in range(len(CATEGORIES[name]))],
            default_float=0.0))
    w = np.array([[0, 0.05], [0, 0.4], [0, 0.001], [0, -0.3]], np.float32)
    inits = [numpy_helper.from_array(np.array([0, 2, 1, 3], np.int64), "order"),
             numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([0, -2.0], np.float32), "b")]
    nodes += [helper.make_node("Concat", [INPUT_NAME, "plan_code", "region_code"], ["stacked"], axis=1),
              helper.make_node("Gather", ["stacked", "order"], ["x"], axis=1),  # feature_names order
              helper.make_node("MatMul", ["x", "w"], ["logits0"]),
              helper.make_node("Add", ["logits0", "b"], ["logits"]),
              helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)]
    graph = helper.make_graph(
        nodes, "shop",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [None, 2]),
         helper.make_tensor_value_info(CATEGORIES_INPUT, TensorProto.STRING, [None, 2])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("ai.onnx.ml", 2)])
    model.ir_version = 9
    return model.SerializeToString()


def metadata() -> ModelMetadata:
    return ModelMetadata(
        name=MODEL, task=Task.classification, architecture="logreg",
        inputs=[TensorSpec(name=INPUT_NAME, shape=[None, 2]),
                TensorSpec(name=CATEGORIES_INPUT, dtype="string", shape=[None, 2])],
        outputs=[TensorSpec(name="probabilities", shape=[None, 2])],
        feature_names=NAMES, class_labels=["no", "yes"], categories=CATEGORIES)


def predict_proba(df: pd.DataFrame) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes(), providers=["CPUExecutionProvider"])
    out: np.ndarray = session.run(None, feeds(metadata(), df[NAMES].to_numpy(dtype=object)))[0]
    return out


def reference(rows: int = 3000, seed: int = 1) -> pd.DataFrame:
    df = sample(rows, np.random.default_rng(seed))
    proba = predict_proba(df)
    df[REF_LABEL] = (np.random.default_rng(seed + 1).random(rows) < proba[:, 1]).astype(int)
    df[REF_PREDICTION] = proba.argmax(axis=1)
    for i in range(2):
        df[f"{REF_PROBA_PREFIX}{i}"] = proba[:, i]
    return df


def profile(rate: float = 0.01, ref: pd.DataFrame | None = None) -> ReferenceProfile:
    return ReferenceProfile(reference() if ref is None else ref, NAMES, method="calibrated",
                            false_alarm_rate=rate, categories=CATEGORIES)


def rows_of(df: pd.DataFrame) -> np.ndarray:
    return df[NAMES].to_numpy(dtype=object)


# -- drift ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shop_profile() -> ReferenceProfile:
    return profile()


def test_the_profile_counts_categories_and_keeps_them_out_of_the_numeric_checks(
        shop_profile: ReferenceProfile) -> None:
    p = shop_profile
    assert p.numeric == ["age", "income"] and set(p.vocabulary) == {"plan", "region"}
    # the Bonferroni family: 4 distribution tests and 2 unknown-value tests
    assert p.threshold == p.category_threshold == pytest.approx(0.01 / 6)
    assert set(p.counts["plan"]) == set(PLANS) and None not in p.counts["region"]
    assert np.isnan(p.lower[[1, 3]]).all() and np.isfinite(p.lower[[0, 2]]).all()


def test_a_stationary_categorical_window_raises_no_alarm(shop_profile: ReferenceProfile) -> None:
    result = check_drift(shop_profile, rows_of(sample(1000, np.random.default_rng(5))))
    assert result.judged and not result.dataset_drift and result.drifted_features == []
    by = {c.column: c for c in result.features}
    assert by["plan"].method == by["region"].method == "chisquare" and by["plan"].p_value
    assert by["age"].method == "ks"
    unknown = {u.column: u for u in result.unknown}
    assert unknown["plan"].share == pytest.approx(0.05, abs=0.02)  # "trial": unknown, as in the reference
    assert unknown["plan"].reference_share == pytest.approx(0.05, abs=0.01)
    assert unknown["region"].share == 0.0 and not unknown["plan"].risen


@pytest.mark.slow
def test_stationary_windows_alarm_at_the_stated_rate() -> None:
    rng = np.random.default_rng(7)
    p = profile(rate=0.1)
    windows = 200
    results = [check_drift(p, rows_of(sample(500, rng))) for _ in range(windows)]
    alarms = sum(r.dataset_drift for r in results)
    # at most 10% stated (Bonferroni over 6 tests, two of them discrete: about 8% expected);
    # fewer than 5 of 200 would mean tests far too timid to be the stated ones
    assert 5 <= alarms <= 30, alarms
    # the chi-squared p-values of a stationary column are near uniform: the rate holds at any level
    plan = np.array([next(c.score for c in r.features if c.column == "plan") for r in results])
    assert 0.05 <= (plan < 0.1).mean() <= 0.16, (plan < 0.1).mean()
    assert 0.40 <= (plan < 0.5).mean() <= 0.60, (plan < 0.5).mean()


def test_a_shift_in_one_categorys_share_is_flagged_naming_the_column(
        shop_profile: ReferenceProfile) -> None:
    shifted = sample(1000, np.random.default_rng(9), plan_p=[0.35, 0.3, 0.3, 0.05])
    result = check_drift(shop_profile, rows_of(shifted))
    assert result.dataset_drift and result.drifted_features == ["plan"]
    assert result.unknown_risen == []


def test_a_rise_of_unknown_values_is_flagged_naming_the_column(shop_profile: ReferenceProfile) -> None:
    result = check_drift(shop_profile, rows_of(sample(1000, np.random.default_rng(11), new_region=0.1)))
    unknown = {u.column: u for u in result.unknown}
    assert unknown["region"].risen and unknown["region"].share == pytest.approx(0.1, abs=0.025)
    assert unknown["region"].reference_share == 0.0 and not unknown["plan"].risen
    assert result.unknown_risen == ["region"] and "region" in result.drifted_features
    assert result.dataset_drift and "plan" not in result.drifted_features


def test_a_model_of_categories_only_and_evidentlys_fixed_thresholds() -> None:
    ref = reference()
    only = ReferenceProfile(ref, ["plan", "region"], method="calibrated", false_alarm_rate=0.01,
                            categories=CATEGORIES)
    result = check_drift(only, rows_of(sample(800, np.random.default_rng(23)))[:, [1, 3]])
    assert result.judged and result.multivariate is None and not result.dataset_drift
    # with a fixed method the categories keep a p-value threshold of their own (Evidently's 0.05)
    fixed = ReferenceProfile(ref, NAMES, method="psi", threshold=0.1, categories=CATEGORIES)
    assert fixed.category_threshold == 0.05 and fixed.threshold == 0.1
    shifted = sample(800, np.random.default_rng(24), plan_p=[0.35, 0.3, 0.3, 0.05])
    by = {c.column: c for c in check_drift(fixed, rows_of(shifted)).features}
    assert by["plan"].drifted and by["plan"].threshold == 0.05 and by["age"].method == "psi"


@pytest.mark.parametrize(
    ("reference", "current", "expected"),
    [
        # the same shares: p = 1
        ({"a": 50, "b": 50}, ["a"] * 50 + ["b"] * 50, 1.0),
        # one value only, in both: nothing to compare
        ({"a": 10}, ["a"] * 30, 1.0),
        # an empty window
        ({"a": 10, "b": 5}, [], 1.0),
        # one stray value the reference never had: no evidence (alone, its cell would add 6 to
        # the statistic); it joins the smallest category's cell
        ({"a": 1500, "b": 1500}, ["a"] * 250 + ["b"] * 249 + ["stray"], 1.0),
    ],
)
def test_category_p_value_edge_cases(reference: dict[str, int], current: list[str],
                                     expected: float) -> None:
    assert category_p_value(reference, current) == pytest.approx(expected)


def test_values_the_reference_never_had_are_pooled_into_one_cell() -> None:
    ref = {"a": 500, "b": 500}
    # 30 of 200 are values never seen, each once: one "other" cell, a strong signal
    assert category_p_value(ref, ["a"] * 85 + ["b"] * 85 + [f"new{i}" for i in range(30)]) < 1e-6
    # rare reference values (expected < 5 in the window) share a cell with the other values
    rare = {"a": 480, "b": 480, **{f"r{i}": 4 for i in range(10)}}
    assert category_p_value(rare, ["a"] * 49 + ["b"] * 49 + ["r1", "zzz"]) > 0.1


def test_data_quality_counts_missing_strings_and_no_range_for_categories(
        shop_profile: ReferenceProfile) -> None:
    rows = rows_of(sample(1000, np.random.default_rng(13)))
    rows[:100, 1] = ""  # an empty string is a missing category, like None
    rows[:50, 0] = None
    rows[50:60, 0] = 1e6  # far outside the reference's ages
    p = shop_profile
    q = window_quality(p.feature_names, p.lower, p.upper, rows)
    by = {f.feature: f for f in q.features}
    assert by["plan"].missing_share == pytest.approx(0.1)
    assert by["region"].missing_share == pytest.approx(0.02, abs=0.012)
    assert by["age"].missing_share == pytest.approx(0.05)
    assert by["age"].out_of_support_share == pytest.approx(0.01)
    assert by["plan"].out_of_support_share == 0.0 == by["region"].out_of_support_share


def test_window_frame_keeps_strings_and_makes_numbers_floats() -> None:
    rows = np.array([[1.0, "basic", None, None], [None, "pro", 2.5, "west"]], dtype=object)
    df = window_frame(rows, NAMES, ["plan", "region"])
    assert df["age"].dtype == np.float64 and np.isnan(df["age"][1]) and np.isnan(df["income"][0])
    assert df["plan"].tolist() == ["basic", "pro"] and df["region"].tolist() == [None, "west"]


# -- the store ------------------------------------------------------------------------------------
def test_rows_with_strings_round_trip_through_both_engines(store: EventStore) -> None:
    rows = [[40.0, "basic", 12.5, "north"], [None, None, 3.0, "west"], [41.5, "ünïcode ✓", 0.0, ""]]
    blobs = [pack_row(r) for r in rows]
    assert all(is_row_json(b) for b in blobs) and not is_row_json(np.zeros(4).tobytes())
    events = [EventRow(f"c{i}", MODEL, 1, 1000.0 + i, "realtime", b, 0.0, None, 0.01, 2000.0)
              for i, b in enumerate(blobs)]
    assert store.insert_events(events) == 3
    # a re-send of the same rows is no conflict: the same bytes
    assert store.insert_batches([events[:1]])[0].conflicts == 0
    win = store.window(MODEL, version=1, last_n=10)
    assert win.features is not None and win.features.dtype == object
    assert win.features.tolist() == rows
    # a numeric model's rows beside them keep their packed floats
    store.insert_events([EventRow("n0", "numbers", 1, 1000.0, "realtime",
                                  np.array([1.0, np.nan]).tobytes(), 0.0, None, 0.01, 2000.0)])
    numbers = store.window("numbers", version=1, last_n=10).features
    assert numbers is not None and numbers.dtype == np.float64 and numbers[0, 0] == 1.0
    assert np.isnan(numbers[0, 1])


# -- the sidecar --------------------------------------------------------------------------------------
WINDOW = 1000


class Shop:
    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=120)
        self.sent = 0

    def body(self, df: pd.DataFrame, **override: Any) -> dict[str, Any]:
        """The events of ``df``'s rows in columns, as serving sends a categorical model's."""
        proba = predict_proba(df)
        group = {"model": MODEL, "version": 1, "request_ids": [f"b{self.sent}"], "first_row": [0],
                 "rows": [len(df)], "timestamp": [time.time()], "latency_s": [0.003],
                 "features": [[None if isinstance(v, float) and np.isnan(v) else v for v in row]
                              for row in df[NAMES].to_numpy(dtype=object).tolist()],
                 "prediction": proba.argmax(axis=1).tolist(), "probabilities": proba.tolist()}
        return {"columns": [{**group, **override}]}

    def send(self, df: pd.DataFrame) -> None:
        resp = self.client.post("/events", json=self.body(df))
        assert resp.status_code == 200, resp.text
        labels = [{"request_id": f"b{self.sent}-{k}", "label": int(k % 3 == 0)} for k in range(len(df))]
        assert self.client.post("/feedback", json={"feedback": labels}).json()["joined"] == len(df)
        self.sent += len(df)

    def check(self) -> dict[str, Any]:
        resp = self.client.post("/check")
        assert resp.status_code == 200, resp.text
        status: dict[str, Any] = resp.json()
        return status

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = self.client.get("/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}


@pytest.fixture(scope="module")
def shop_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MODELLOOP_HOME whose registry holds the shop model, promoted."""
    home = tmp_path_factory.mktemp("shop") / "home"
    reg = Registry(home / "registry")
    meta = reg.register(metadata(), onnx_bytes(), reference=reference())
    reg.promote(MODEL, meta.version)  # runs the graph on its reference rows (modelloop/verify.py)
    return home


def test_events_one_object_each_are_checked_and_stored_as_strings(shop_home: Path) -> None:
    catalog = ModelCatalog(Registry(shop_home / "registry"))

    def event(i: int, features: list[Any]) -> dict[str, Any]:
        return {"request_id": f"e{i}", "timestamp": 1000.0, "model": MODEL, "version": 1,
                "features": features, "prediction": 0, "probabilities": [0.9, 0.1], "latency_s": 0.01}

    good = [event(0, [40, "basic", None, "north"]), event(1, [None, None, 2.5, "mars"])]
    rows = parse_events(orjson.dumps({"events": good}), catalog, 1000.0).rows
    assert [orjson.loads(r.features) for r in rows] == [[40.0, "basic", None, "north"],
                                                       [None, None, 2.5, "mars"]]
    bad = [*good, event(2, [40.0, "basic", "12", "north"]), event(3, [40.0, 1, 12.0, "north"])]
    with pytest.raises(InputError) as caught:
        parse_events(orjson.dumps({"events": bad}), catalog, 1000.0)
    assert caught.value.status == 422 and caught.value.errors == [
        "events[2].features[2]: Input should be a valid number",
        "events[3].features[1]: Input should be a string or null (feature 'plan' of shop v1 is "
        "categorical), got 1.0"]


POLICY = """
defaults: {min_samples: 500}
rules:
  - {name: regions, metric: feature_drift, features: [region]}
  - {name: plans, metric: feature_drift, features: [plan]}
"""


@pytest.fixture(scope="module")
def shop(shop_home: Path) -> Iterator[Shop]:
    policy = shop_home.parent / "policy.yaml"
    policy.write_text(POLICY)
    with sidecar_process(shop_home, shop_home.parent / "sidecar.log",
                         MODELLOOP_MONITOR_POLICY_FILE=str(policy),
                         MODELLOOP_MONITOR_CHECK_INTERVAL_S="3600",
                         MODELLOOP_MONITOR_WINDOW_EVENTS=str(WINDOW),
                         MODELLOOP_MONITOR_MIN_WINDOW_ROWS="500",
                         MODELLOOP_MONITOR_TRIGGER="none") as proc:
        yield Shop(proc.url)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("features", "error"),
    [
        # a number where the model takes a category
        ([[40.0, 3, 12.5, "north"]],
         "columns[0].features[0][1]: Input should be a string or null (feature 'plan' of shop v1 "
         "is categorical), got 3.0"),
        # a string where it takes a number
        ([[40.0, "basic", 12.5, "north"], ["40", "basic", 12.5, "north"]],
         "columns[0].features[1][0]: Input should be a valid number"),
        # two wrong values: the first in row order is named (row 1's region before row 2's age)
        ([[40.0, "basic", 12.5, "north"], [40.0, "basic", 12.5, 7], ["40", "basic", 12.5, "north"]],
         "columns[0].features[1][3]: Input should be a string or null (feature 'region' of shop v1 "
         "is categorical), got 7.0"),
        # a category longer than the schema allows
        ([[40.0, "x" * 1025, 12.5, "north"]],
         "columns[0].features[0][1]: String should have at most 1024 characters"),
    ],
)
def test_values_of_the_wrong_kind_are_refused_naming_the_field(
        shop: Shop, features: list[list[Any]], error: str) -> None:
    df = sample(len(features), np.random.default_rng(3))
    body = shop.body(df, features=features)
    resp = shop.client.post("/events", json=body)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"] == error


@pytest.mark.integration
def test_packed_rows_are_refused_for_a_categorical_model(shop: Shop) -> None:
    df = sample(2, np.random.default_rng(4))
    packed = {"dtype": "float64", "shape": [2, 4],
              "data": base64.b64encode(np.zeros((2, 4)).tobytes()).decode()}
    resp = shop.client.post("/events", json=shop.body(df, features=packed))
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"].startswith(
        "columns[0].features: shop v1 has categorical features (plan, region): send its rows as lists")


@pytest.mark.integration
@pytest.mark.slow
def test_categorical_windows_are_judged_published_and_exported_as_strings(shop: Shop) -> None:
    # 1. unchanged data: nothing drifts; the unknown shares are the reference's
    shop.send(sample(WINDOW, np.random.default_rng(21)))
    status = shop.check()
    assert status["recent_firings"] == []
    drift = status["models"][MODEL]["drift"]
    assert drift["judged"] and drift["drifted_features"] == [], drift
    assert {u["column"]: u["risen"] for u in drift["unknown"]} == {"plan": False, "region": False}
    quality = {f["feature"]: f for f in status["models"][MODEL]["data_quality"]["features"]}
    assert quality["region"]["missing_share"] == pytest.approx(0.02, abs=0.012)
    # 2. a tenth of the regions is one the model never saw: its column drifts, by name
    shop.send(sample(WINDOW, np.random.default_rng(22), new_region=0.1))
    status = shop.check()
    drift = status["models"][MODEL]["drift"]
    assert drift["dataset_drift"] and "region" in drift["drifted_features"], drift
    assert "plan" not in drift["drifted_features"]
    # the policy's rule on the region fires naming it; the one on the plan stays quiet
    assert [f["rule"] for f in status["recent_firings"]] == ["regions"]
    assert status["recent_firings"][0]["message"].endswith("samples (region)")
    m = shop.metrics()
    assert m[("modelloop_unknown_category_rise_detected", (("feature", "region"), ("model", MODEL)))] == 1.0
    assert m[("modelloop_unknown_category_rise_detected", (("feature", "plan"), ("model", MODEL)))] == 0.0
    assert m[("modelloop_unknown_category_share_ratio", (("feature", "region"), ("model", MODEL)))] == (
        pytest.approx(0.1, abs=0.025))
    assert m[("modelloop_drift_detected", (("feature", "region"), ("model", MODEL)))] in (0.0, 1.0)
    # 3. retraining reads the labelled rows with the categories as strings
    resp = shop.client.get("/export/labelled", params={"model": MODEL})
    assert resp.status_code == 200, resp.text
    df = pd.read_parquet(io.BytesIO(resp.content))
    assert len(df) == 2 * WINDOW
    assert df["age"].dtype == np.float64 and df["income"].dtype == np.float64
    assert set(df["plan"].dropna()) <= set(PLANS) and "atlantis" in set(df["region"].dropna())
    assert df["region"].isna().sum() > 0  # a missing category stays missing, not "None"



@pytest.mark.slow
def test_the_drift_report_renders_categories_and_names_unknown_values(
        shop_profile: ReferenceProfile, tmp_path: Path) -> None:
    from monitoring.reports import sidecar_section, write_drift_report

    window = sample(600, np.random.default_rng(17), new_region=0.1)
    result = check_drift(shop_profile, rows_of(window))
    extra = sidecar_section(None, None, result.unknown)
    assert "Unknown values of region" in extra and "risen" in extra
    ref = window_frame(reference()[NAMES].to_numpy(dtype=object), NAMES, ["plan", "region"])
    path = write_drift_report(tmp_path, MODEL, 1, ref, window_frame(rows_of(window), NAMES, ["plan", "region"]),
                              method="ks", threshold=shop_profile.threshold, calibrated=True,
                              drift_share=0.25, categorical=["plan", "region"], extra_html=extra)
    page = path.read_text()
    assert "Unknown values of region" in page and "atlantis" not in extra


def test_the_report_has_no_importance_for_a_categorical_model_and_says_why(shop_home: Path) -> None:
    """No child process is started for it (the explainer perturbs float rows), and the answer
    is kept: it is not a failure that the next report would try again."""
    registry = Registry(shop_home / "registry")
    result = version_importance(registry, MODEL, 1)
    assert not result.failed and result.values == {}
    assert "takes categorical features (plan, region)" in result.note, result.note
    assert version_importance(registry, MODEL, 1) is result
