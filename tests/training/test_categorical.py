"""Categorical features in training: text columns coded inside the exported graph.

One churn-like model (3 text columns, 5 numeric ones) is trained from a CSV file once per module;
the tests feed its ONNX file raw strings, break its vocabulary on purpose, and retrain it on
production rows that bring a new plan.
"""

from __future__ import annotations

import csv as csv_module
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from sklearn.metrics import accuracy_score, average_precision_score
from typer.testing import CliRunner

from modelloop.categorical import feeds, unknown_counts
from modelloop.cli import app
from modelloop.registry import Registry
from modelloop.schemas import (
    CATEGORIES_INPUT,
    INPUT_NAME,
    MAX_CATEGORY_CHARS,
    REF_LABEL,
    TensorSpec,
)
from modelloop.synthetic import (
    CHURN_CATEGORICAL,
    CHURN_NUMERIC,
    CHURN_TARGET,
    NEW_PLAN,
    churn_frame,
)
from training.config import TrainingConfig
from training.data import DataError, encode, load_data, prepare
from training.export import ParityError, check_parity, onnx_session
from training.models import InferenceGraph
from training.pipeline import (
    TrainedModel,
    TrainOptions,
    categorical_feed,
    categorical_parity_rows,
    code_rows,
    fit_model,
    register_trained,
    train_model,
)
from training.prune import NotPrunable, prune_version
from training.quantize import NotQuantizable, quantize_version
from training.retrain import retrain_on
from training.settings import TrainingSettings
from training.transfer import WarmStart
from training.tune import search

EPOCHS = 6
MIN_COUNT = 10
FEATURES = [*CHURN_CATEGORICAL, *CHURN_NUMERIC]


@dataclass(frozen=True)
class Churn:
    trained: TrainedModel
    registry: Registry
    settings: TrainingSettings
    csv: Path


@pytest.fixture(scope="module")
def churn(tmp_path_factory: pytest.TempPathFactory) -> Churn:
    """The churn model trained from a CSV file and registered as production; its gate judges
    by PR-AUC (its positive class is the rare one)."""
    root = tmp_path_factory.mktemp("categorical")
    csv = root / "churn.csv"
    churn_frame(1200, seed=0).to_csv(csv, index=False)
    settings = TrainingSettings(home=root / "home", progress=False, epochs=EPOCHS)
    config = TrainingConfig.from_settings(settings, target=CHURN_TARGET,
                                          min_category_count=MIN_COUNT, gate_metric="pr_auc")
    trained = train_model(csv, name="churn", options=TrainOptions(config=config, settings=settings))
    registry = Registry(settings.registry_dir)
    register_trained(trained, registry, promote=True)
    return Churn(trained, registry, settings, csv)


def _torch(trained: TrainedModel, rows: np.ndarray) -> np.ndarray:
    meta = trained.metadata
    with torch.no_grad():
        out = InferenceGraph(trained.net)(torch.from_numpy(code_rows(rows, meta.feature_names,
                                                                     meta.categories)))
    return out.numpy()


def _onnx(trained: TrainedModel, rows: np.ndarray) -> np.ndarray:
    session = onnx_session(trained.onnx_bytes)
    out: np.ndarray = session.run(None, feeds(trained.metadata, rows))[0]
    return out


def test_text_columns_become_categories_with_two_graph_inputs(churn: Churn) -> None:
    meta = churn.trained.metadata
    assert meta.feature_names == FEATURES  # the table's order, numbers and categories mixed
    assert meta.categories == {"plan": ["basic", "family", "plus", "pro"],
                               "region": ["east", "islands", "north", "south", "west"],
                               "channel": ["phone", "store", "web"]}
    assert meta.inputs == [TensorSpec(name=INPUT_NAME, dtype="float32", shape=[None, 5]),
                           TensorSpec(name=CATEGORIES_INPUT, dtype="string", shape=[None, 3])]
    assert meta.parity is not None and meta.parity.passed
    assert meta.metrics["roc_auc"] > 0.6
    session = onnx_session(churn.trained.onnx_bytes)
    assert [(i.name, i.type) for i in session.get_inputs()] == [
        (INPUT_NAME, "tensor(float)"), (CATEGORIES_INPUT, "tensor(string)")]
    # the dataset codes each value as its index + 1 and a missing one as 0
    ds = churn.trained.dataset
    raw = churn_frame(1200, seed=0)
    channel = ds.features[:, FEATURES.index("channel")]
    assert np.array_equal(channel == 0, raw["channel"].isna().to_numpy())
    assert [ds.categories["plan"][int(c) - 1] for c in ds.features[:5, 0]] == raw["plan"][:5].tolist()
    # the data report counts a categorical column's missing values (code 0), and no outliers
    assert ds.report is not None
    report = {c.name: c for c in ds.report.columns}
    assert report["channel"].missing == pytest.approx(raw["channel"].isna().mean())
    assert report["channel"].missing > 0 and report["plan"].outliers is None
    # the reference sample that drift compares with keeps the strings
    reference = churn.registry.get("churn", "production").reference()
    assert set(reference["plan"]) <= set(meta.categories["plan"])
    assert reference["tenure_months"].dtype.kind == "f"


def test_onnx_fed_raw_strings_equals_torch_fed_codes(churn: Churn) -> None:
    rows = churn_frame(300, seed=5)[FEATURES].to_numpy(object)
    rows[:, 2] = [v if isinstance(v, str) else None for v in rows[:, 2]]
    got, want = _onnx(churn.trained, rows), _torch(churn.trained, rows)
    assert got.shape == (300, 2)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_unseen_missing_and_rare_values_take_the_unknown_code(churn: Churn) -> None:
    base = churn_frame(1, seed=7)[FEATURES].to_numpy(object)
    rows = np.repeat(base, 5, axis=0)
    rows[1, 0] = "platinum"  # a plan the model never saw
    rows[2, 0] = None  # a missing plan
    rows[3, 1] = "islands"  # a region rarer than min_category_count in the training split
    rows[4, 1] = "atlantis"  # a region the model never saw
    out = _onnx(churn.trained, rows)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[1], out[2], atol=1e-6)  # unseen and missing: both code 0
    assert not np.allclose(out[0], out[1], atol=1e-4)  # a known plan is not unknown
    ds, split = churn.trained.dataset, churn.trained.split
    islands = ds.categories["region"].index("islands") + 1
    assert 0 < (ds.features[split.train, 1] == islands).sum() < MIN_COUNT
    np.testing.assert_allclose(out[3], out[4], atol=1e-6)
    np.testing.assert_allclose(out, _torch(churn.trained, rows), atol=1e-5)


def test_parity_check_catches_a_wrong_vocabulary(churn: Churn) -> None:
    trained = churn.trained
    meta = trained.metadata
    wrong = onnx.load_from_string(trained.onnx_bytes)
    (plan,) = [n for n in wrong.graph.node if n.op_type == "LabelEncoder"][:1]
    (keys,) = [a for a in plan.attribute if a.name == "keys_strings"]
    keys.strings[:] = list(reversed(keys.strings))  # the plans' codes in the wrong order
    held = categorical_parity_rows(trained.dataset, trained.split.test[:50])
    graph = InferenceGraph(trained.net)
    feed = categorical_feed(meta.feature_names, meta.categories)
    with pytest.raises(ParityError, match="probabilities at batch size 1"):
        check_parity(graph, wrong.SerializeToString(), held, tolerance=1e-4, feed=feed)
    right = check_parity(graph, trained.onnx_bytes, held, tolerance=1e-4, feed=feed)
    assert right.passed and right.rows_checked == len(held)
    # the held-out rows hold the probes: missing and unseen values
    assert any(v is None for v in held[:, 0]) and "plan" in meta.categories
    assert sum(1 for v in held[:, 0] if isinstance(v, str) and v not in meta.categories["plan"]) == 1


@pytest.mark.parametrize(
    ("frame", "categorical", "problem"),
    [
        # --categorical names a column that is not there
        (pd.DataFrame({"a": [1, 2], "y": [0, 1]}), ["b"], "categorical column 'b' is not a feature column"),
        # a categorical column with no value at all
        (pd.DataFrame({"a": [1, 2], "c": [None, None], "y": [0, 1]}), ["c"],
         "column 'c' has no values (all missing)"),
        # a column of numbers with stray text stays numeric: its text is an error
        (pd.DataFrame({"a": ["1", "2", "x"], "y": [0, 1, 0]}), [],
         "column 'a' is not numeric (value 'x' in row 3)"),
    ],
)
def test_unusable_categorical_columns_are_one_line(frame: pd.DataFrame, categorical: list[str],
                                                   problem: str) -> None:
    with pytest.raises(DataError) as err:
        prepare(frame, "y", categorical=categorical, source="t.csv")
    assert str(err.value) == f"t.csv: {problem}"


def test_an_architecture_without_categorical_support_refuses_in_one_line() -> None:
    ds = prepare(churn_frame(200, seed=3), CHURN_TARGET, source="churn.csv")
    settings = TrainingSettings(progress=False, epochs=1)
    config = TrainingConfig.from_settings(settings, target=CHURN_TARGET, architecture="autoencoder")
    with pytest.raises(DataError) as err:
        fit_model(ds, config, settings)
    assert str(err.value) == ("churn.csv: architecture 'autoencoder' does not take categorical "
                              "features; use mlp")


def test_categorical_flag_codes_an_integer_column(tmp_path: Path, home: Path) -> None:
    frame = churn_frame(600, seed=2)[["tenure_months", "support_calls", CHURN_TARGET]]
    frame.insert(0, "store_id", np.random.default_rng(2).integers(1, 12, len(frame)))
    csv = tmp_path / "stores.csv"
    frame.to_csv(csv, index=False)
    assert load_data(csv, CHURN_TARGET).categories == {}  # integers are numbers unless named
    result = CliRunner().invoke(app, ["train", "--data", str(csv), "--target", CHURN_TARGET,
                                      "--categorical", "store_id", "--min-category-count", "3",
                                      "--epochs", "2", "--no-progress", "--name", "stores",
                                      "--gate-metric", "pr_auc"])
    assert result.exit_code == 0, result.stderr
    meta = Registry(home / "registry").get("stores", 1).metadata
    assert meta.categories == {"store_id": [str(i) for i in range(1, 12)]}  # numeric order
    assert meta.config["categorical"] == ["store_id"] and meta.config["min_category_count"] == 3
    assert meta.config["gate_metric"] == "pr_auc" == meta.gate_metric
    shown = CliRunner().invoke(app, ["models", "show", "stores", "1"])
    assert shown.exit_code == 0 and "  gate:      pr_auc\n" in shown.stdout
    assert "  categorical: store_id (11 values)\n" in shown.stdout
    # a regressor's gate metric is r2: a classifier's is refused, in one line, before training
    frame[CHURN_TARGET] = np.linspace(0.0, 1.0, len(frame))
    frame.to_csv(csv, index=False)
    refused = CliRunner().invoke(app, ["train", "--data", str(csv), "--target", CHURN_TARGET,
                                       "--task", "regression", "--gate-metric", "pr_auc",
                                       "--no-progress", "--name", "stores"])
    assert refused.exit_code == 2
    assert refused.stderr.splitlines()[-1] == (f"error: {csv}: --gate-metric pr_auc is not a "
                                               "regression metric; choose r2")
    rows = np.array([[5, 10.0, 1.0], [99, 10.0, 1.0]], dtype=object)
    rows[:, 0] = ["5", "99"]
    out = onnx_session(Registry(home / "registry").get("stores", 1).onnx_path).run(
        None, feeds(meta, rows))[0]
    assert out.shape == (2, 2) and np.isfinite(out).all()


def test_encode_is_the_graph_coding() -> None:
    assert encode(["b", "a", None, "", "z"], ["a", "b"]).tolist() == [2.0, 1.0, 0.0, 0.0, 0.0]


def test_retraining_on_a_new_frequent_plan_makes_it_a_category(
        churn: Churn, caplog: pytest.LogCaptureFixture) -> None:
    champion = churn.registry.get("churn", "production").metadata
    production = churn_frame(700, seed=11, new_category=True)
    assert (production["plan"] == NEW_PLAN).sum() > 100
    rows = production[FEATURES].astype(object)
    rows = rows.where(rows.notna(), None)  # the sidecar's rows: strings, None missing
    rows[REF_LABEL] = production[CHURN_TARGET].to_numpy()  # class index ("0", "1")
    rows["version"] = champion.version
    rows["timestamp"] = time.time() - 600 + np.arange(len(rows), dtype=np.float64)
    settings = churn.settings.model_copy(update={"retrain_detect_change": False})
    # the command's --metric over the stored one: judged by accuracy, the challenger loses
    by_accuracy = retrain_on(rows, "churn", settings=settings, registry=churn.registry,
                             metric="accuracy")
    assert (by_accuracy.metric, by_accuracy.metric_source) == ("accuracy", "option")
    assert not by_accuracy.promoted, by_accuracy.reason
    with caplog.at_level(logging.INFO, logger="training.retrain"):
        result = retrain_on(rows, "churn", settings=settings, registry=churn.registry)
    assert result.challenger is not None and by_accuracy.challenger is not None
    challenger = churn.registry.get("churn", result.challenger.version).metadata
    # judged by the champion's stored PR-AUC, the same challenger (same data, same seeds) wins
    # on this imbalanced holdout: the two metrics disagree, and the stored one decided
    assert (result.metric, result.metric_source) == ("pr_auc", "champion")
    assert result.challenger.metrics == by_accuracy.challenger.metrics
    assert result.promoted, result.reason
    churn.registry.rollback("churn")  # v1 stays production for the tests after this one
    gate = challenger.lineage["gate"]
    assert (gate["metric"], gate["metric_source"], gate["promoted"]) == ("pr_auc", "champion", True)
    assert gate["champion_score"] == result.champion.metric
    assert challenger.gate_metric == "pr_auc"  # the config, metric included, travels on
    # the scores are scikit-learn's on the holdout (the most recent 30% of the rows)
    holdout = rows.iloc[-round(len(rows) * settings.retrain_holdout_fraction):]
    truth = holdout[REF_LABEL].to_numpy(np.int64)
    for version, score in ((champion, result.champion), (challenger, result.challenger)):
        proba = onnx_session(churn.registry.get("churn", version.version).onnx_path).run(
            None, feeds(version, holdout[FEATURES].to_numpy(object)))[0]
        assert score.metric == pytest.approx(average_precision_score(truth, proba[:, 1]),
                                             abs=1e-9)
        assert score.metrics["accuracy"] == pytest.approx(
            accuracy_score(truth, proba.argmax(axis=1)), abs=1e-12)
    assert by_accuracy.champion.metric == result.champion.metrics["accuracy"]
    assert NEW_PLAN not in champion.categories["plan"]
    assert challenger.categories["plan"] == ["basic", "family", "plus", "pro", NEW_PLAN]
    assert challenger.parent_version == champion.version and challenger.parity is not None
    assert challenger.parity.passed
    # the champion's weights mean other codes: the challenger trained from scratch, and said so
    assert "fine_tuned_from" not in challenger.lineage
    assert any("from scratch" in r.message and "'ultra' new" in r.message for r in caplog.records)
    new = churn_frame(300, seed=12, new_category=True)
    new_rows = new[FEATURES].to_numpy(object)
    new_rows[:, 2] = [v if isinstance(v, str) else None for v in new_rows[:, 2]]
    out = onnx_session(churn.registry.get("churn", challenger.version).onnx_path).run(
        None, feeds(challenger, new_rows))[0]
    assert np.isfinite(out).all()


def test_dynamic_quantization_keeps_the_string_input(churn: Churn) -> None:
    version = churn.registry.get("churn", "production")
    with pytest.raises(NotQuantizable) as err:
        quantize_version(version, method="static", settings=churn.settings)
    assert str(err.value) == ("churn v1 takes categorical features (plan, region, channel): static "
                              "quantization calibrates on numeric inputs only; use --method dynamic")
    quantized = quantize_version(version, method="dynamic", settings=churn.settings,
                                 speed_batches=(1,), speed_repeats=1, speed_min_time_s=0.01)
    assert quantized.report.int8_ops and quantized.report.parity_passed
    assert quantized.metadata.categories == version.metadata.categories
    assert quantized.reference is not None and quantized.reference["plan"].dtype == object
    rows = churn_frame(50, seed=9)[FEATURES].to_numpy(object)
    rows[:, 2] = [v if isinstance(v, str) else None for v in rows[:, 2]]
    rows[0, 0] = "platinum"
    int8 = onnx_session(quantized.onnx_bytes).run(None, feeds(version.metadata, rows))[0]
    np.testing.assert_allclose(int8, _onnx(churn.trained, rows), atol=0.05)


def test_fine_tuning_keeps_a_vocabulary_and_refuses_a_changed_one(churn: Churn,
                                                                  tmp_path: Path) -> None:
    parent = churn.registry.get("churn", "production")
    init = WarmStart.from_version(parent)
    config = init.config(epochs=2)
    tuned = train_model(churn.csv, name="churn", options=TrainOptions(
        config=config, settings=churn.settings, init=init))
    assert tuned.metadata.lineage["fine_tuned_from"]["version"] == parent.version
    assert any(k.startswith("preprocess.lookup_") for k in init.loaded)
    assert tuned.metadata.categories == parent.metadata.categories and tuned.metadata.parity

    new = tmp_path / "churn-new.csv"
    churn_frame(400, seed=4, new_category=True).to_csv(new, index=False)
    env = {"MODELLOOP_HOME": str(churn.settings.home)}
    args = ["train", "--data", str(new), "--target", CHURN_TARGET, "--no-progress"]
    result = CliRunner().invoke(app, [*args, "--init-from", "churn"], env=env)
    assert result.exit_code == 2
    # the data report's table, then the one line
    assert result.stderr.endswith(f"\nerror: cannot fine-tune from churn v{parent.version}: the "
                                  "values of 'plan' changed ('ultra' new); its codes would not "
                                  "match\n")
    result = CliRunner().invoke(app, [*args, "--ensemble", "2"], env=env)
    assert result.exit_code == 2
    assert result.stderr.endswith(f"\nerror: {new}: --ensemble combines models with numeric "
                                  "inputs only; this data has categorical features (plan, "
                                  "region, channel)\n")


def test_pruning_refuses_a_categorical_model_in_one_line(churn: Churn) -> None:
    with pytest.raises(NotPrunable) as err:
        prune_version(churn.registry.get("churn", "production"), settings=churn.settings)
    assert str(err.value) == ("churn v1 takes categorical features; pruning takes models with "
                              "numeric inputs only")


def test_tuning_searches_on_categorical_data(tmp_path: Path) -> None:
    settings = TrainingSettings(home=tmp_path, progress=False, epochs=2)
    base = TrainingConfig.from_settings(settings, target=CHURN_TARGET)
    ds = prepare(churn_frame(600, seed=0), CHURN_TARGET, source="churn")
    result = search(ds, name="churn", base=base, settings=settings, sampler="random", trials=2)
    assert result.counts == {"complete": 2}
    assert result.best is not None and result.best.value is not None
    assert np.isfinite(result.best.value)


def _csv_text(csv: Path, column: str) -> list[str]:
    """A column's cells exactly as the file holds them."""
    with csv.open(newline="") as f:
        return [row[column] for row in csv_module.DictReader(f)]


def test_csv_categories_are_the_text_as_written_as_serving_reads_it(tmp_path: Path) -> None:
    """Training codes a CSV's values as serving receives them: "02139" keeps its zero, "5" is
    "5" in an integer column with a missing cell, and "NA" or "null" are values, not missing
    (only the empty cell is); a numeric column's "NA" is still missing."""
    rng = np.random.default_rng(7)
    n = 400
    zips = np.array(["02139", "5", "10001", "94105"], dtype=object)[rng.integers(0, 4, n)]
    zips[rng.random(n) < 0.05] = None  # an empty cell: the column is no longer all integers
    region = np.array(["north", "south", "null"], dtype=object)[rng.integers(0, 3, n)]
    region[rng.random(n) < 0.15] = "NA"  # North America, a category
    usage = rng.normal(10, 2, n).round(2).astype(object)
    usage[rng.random(n) < 0.1] = "NA"  # a number's missing spelling
    logit = (zips == "02139") * 2.0 - (region == "NA") * 1.5 - 0.5
    frame = pd.DataFrame({"zip": zips, "region": region, "usage": usage,
                          "y": (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)})
    csv = tmp_path / "zips.csv"
    frame.to_csv(csv, index=False)
    assert "\n02139," in csv.read_text() and ",NA," in csv.read_text()

    settings = TrainingSettings(home=tmp_path / "home", progress=False, epochs=2)
    config = TrainingConfig.from_settings(settings, target="y", categorical=["zip"],
                                          min_category_count=1, clean=False)  # rows as in the file
    trained = train_model(csv, name="zips", options=TrainOptions(config=config, settings=settings))
    meta, ds = trained.metadata, trained.dataset
    assert meta.categories == {"zip": ["5", "02139", "10001", "94105"],  # numeric order
                               "region": ["NA", "north", "null", "south"]}
    # the numeric column's "NA" cells are missing values, the rest numbers
    usage_read = ds.features[:, meta.feature_names.index("usage")]
    assert np.array_equal(np.isnan(usage_read), (usage == "NA").astype(bool))
    # the reference sample drift compares production with holds "NA" as production sends it
    assert "NA" in set(trained.reference["region"]) and trained.reference["region"].notna().all()

    # ONNX Runtime fed the file's text (as /predict and batch CSV pass it on) gives what the
    # network gives on training's own coding of the same rows: no value falls to the unknown code
    rows = np.empty((n, 3), dtype=object)
    rows[:, 0] = [t or None for t in _csv_text(csv, "zip")]
    rows[:, 1] = _csv_text(csv, "region")
    rows[:, 2] = usage_read.astype(np.float64)
    assert unknown_counts(meta, rows) == {"zip": 0, "region": 0}
    with torch.no_grad():
        want = InferenceGraph(trained.net)(torch.from_numpy(ds.features)).numpy()
    np.testing.assert_allclose(_onnx(trained, rows), want, atol=1e-5)


@pytest.mark.parametrize(
    ("cell", "problem"),
    [
        # longer than serving takes (modelloop.schemas.MAX_CATEGORY_CHARS)
        ("x" * 1500, "column 'plan' has a value of 1500 characters in row 2; categories are at "
                     "most 1024"),
        # pandas' C reader would cut it at the NUL and train on "ba"
        ("ba\0sic", "column 'plan' has a value with a NUL character in row 2; categories cannot "
                    "hold one"),
    ],
)
def test_categories_serving_refuses_are_refused_in_one_line(tmp_path: Path, cell: str,
                                                            problem: str) -> None:
    csv = tmp_path / "plans.csv"
    csv.write_text(f"plan,y\nbasic,0\n{cell},1\npro,0\n")
    with pytest.raises(DataError) as err:
        load_data(csv, "y")
    assert str(err.value) == f"{csv}: {problem}"
    longest = "x" * MAX_CATEGORY_CHARS  # the longest value serving takes trains
    csv.write_text(f"plan,y\nbasic,0\n{longest},1\npro,0\n")
    assert load_data(csv, "y").categories["plan"] == ["basic", "pro", longest]


def test_an_identifier_like_categorical_column_is_warned_about(
        caplog: pytest.LogCaptureFixture) -> None:
    frame = pd.DataFrame({"customer": [f"c{i:04d}" for i in range(400)],
                          "plan": ["basic", "pro"] * 200, "y": [0, 1, 1, 0] * 100})
    with caplog.at_level(logging.WARNING, logger="training.data"):
        prepare(frame, "y", source="customers.csv")
    warned = [r.getMessage() for r in caplog.records if "distinct values" in r.getMessage()]
    assert warned == ["customers.csv: categorical column 'customer' has 400 distinct values in 400 "
                      "rows; an identifier is no feature (drop the column?)"]
