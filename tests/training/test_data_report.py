"""The data report at training: it counts what a table holds (planted here), ``prepare`` removes
exact duplicates only when cleaning, and ``modelloop train`` prints, stores and shows it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from modelloop.cli import app
from modelloop.registry import Registry
from training.config import TrainingConfig
from training.data import prepare
from training.data_report import DataReport, _column_groups, _row_groups, build_report
from training.quantize import training_data

BASE_ROWS = 300
DUPLICATED = [3, 10, 11, 12, 40, 41, 42]  # rows copied whole: 7 exact duplicates
CONFLICTING = [5, 60, 61]  # rows copied with the other label: 3 conflicting groups
MISSING = range(100, 120)  # 'd' is missing in these 20 rows
OUTLIERS = [200, 201, 202, 203]  # 'e' is 100 standard deviations out in these


def planted() -> pd.DataFrame:
    """A 310-row classification table: 7 exact duplicates and 3 conflicting copies appended,
    a constant column 'c', 20 missing values in 'd', 4 outliers in 'e' (none of them copied)."""
    rng = np.random.default_rng(7)
    frame = pd.DataFrame(rng.normal(size=(BASE_ROWS, 4)), columns=["a", "b", "d", "e"])
    frame.insert(2, "c", 1.0)
    frame["target"] = np.where(frame["a"] + frame["b"] > 0, "yes", "no")
    frame.loc[list(MISSING), "d"] = np.nan
    frame.loc[OUTLIERS, "e"] = 100.0
    flipped = frame.loc[CONFLICTING].assign(
        target=lambda f: f["target"].map({"yes": "no", "no": "yes"}))
    return pd.concat([frame, frame.loc[DUPLICATED], flipped], ignore_index=True)


def test_the_report_counts_what_was_planted(caplog: pytest.LogCaptureFixture) -> None:
    frame = planted()
    with caplog.at_level(logging.WARNING, logger="training.data"):
        ds = prepare(frame, "target", source="planted", clean=True)
    report = ds.report
    assert report is not None
    assert (report.rows, report.duplicates, report.removed, report.cleaned) == (310, 7, 7, True)
    # the first conflicting group: row 6 and its copy with the other label (after the duplicates)
    assert (report.conflicts, report.conflict_rows) == (3, [6, BASE_ROWS + len(DUPLICATED) + 1])
    columns = {c.name: c for c in report.columns}
    assert report.constant_columns == ["c"] and columns["c"].outliers is None  # MAD 0: skipped
    assert columns["d"].missing == pytest.approx(20 / 310)
    assert [columns[n].missing for n in "abce"] == [0.0] * 4
    assert columns["e"].outliers == 4 and [columns[n].outliers for n in "abd"] == [0, 0, 0]
    # the warnings name what is kept
    assert "planted: column 'c' is constant" in caplog.text
    assert "planted: 3 group(s) of rows have the same features and different labels" in caplog.text
    # the duplicates went, the first of each kept in order; the conflicting rows stay
    assert len(ds) == 303
    np.testing.assert_array_equal(ds.features[:BASE_ROWS, 0], frame["a"].to_numpy(np.float32)[:BASE_ROWS])


def test_without_cleaning_every_row_stays() -> None:
    frame = planted()
    ds = prepare(frame, "target", clean=False)
    assert ds.report is not None and (ds.report.duplicates, ds.report.removed) == (7, 0)
    assert len(ds) == 310
    assert ds.fingerprint != prepare(frame, "target", clean=True).fingerprint


@pytest.mark.parametrize(
    ("features", "target", "duplicates", "conflicts"),
    [
        # NaN equals NaN and -0.0 equals 0.0 when rows are compared
        ([[np.nan, 0.0], [np.nan, -0.0]], [1, 1], 1, 0),
        # a row met three times is two duplicates
        ([[1.0, 2.0]] * 3, [0, 0, 0], 2, 0),
        # same features, different labels: one group, no duplicate
        ([[1.0, 2.0], [1.0, 2.0], [1.0, 3.0]], [0, 1, 0], 0, 1),
        # rows that differ only in a later column are not duplicates
        ([[1.0, 2.0], [1.0, 3.0], [2.0, 3.0]], [0, 0, 0], 0, 0),
    ],
)
def test_rows_compare_as_values(features: list[list[float]], target: list[int], duplicates: int,
                                conflicts: int) -> None:
    report, keep = build_report(np.asarray(features, np.float32), np.asarray(target, np.int64),
                                ["x", "y"], classification=True, clean=True)
    assert (report.duplicates, report.conflicts) == (duplicates, conflicts)
    assert len(keep) == len(target) - duplicates


def test_the_fallback_without_row_hashes_groups_rows_alike() -> None:
    # what a hash collision falls back to: the same groups, however numbered
    features = prepare(planted(), "target").features
    by_hash = _row_groups(features)
    bits = np.where(np.isnan(features), np.float32("nan"), features + np.float32(0.0))
    by_column = _column_groups(np.ascontiguousarray(bits).view(np.uint32))
    np.testing.assert_array_equal(pd.factorize(by_hash)[0], pd.factorize(by_column)[0])
    assert by_hash.max() + 1 == 300  # 310 rows, 10 of them copies


def test_a_regression_table_has_no_label_conflicts() -> None:
    frame = pd.DataFrame({"x": [1.0, 1.0, 2.0, 3.0], "y": [0.5, 0.7, 0.5, 0.5]})
    ds = prepare(frame, "y", clean=True)
    assert ds.report is not None and ds.report.conflicts is None and len(ds) == 4


def test_the_report_survives_the_metadata_round_trip() -> None:
    report = prepare(planted(), "target").report
    assert report is not None and DataReport.from_dict(report.to_dict()) == report


def test_a_config_stored_before_cleaning_reads_as_not_cleaned() -> None:
    stored = TrainingConfig.model_validate(
        {"epochs": 3, "batch_size": 32, "learning_rate": 0.001, "weight_decay": 0.0, "l1": 0.0,
         "patience": 5, "scheduler": "none", "grad_clip": 1.0, "seed": 0, "val_fraction": 0.15,
         "test_fraction": 0.2})
    assert stored.clean is False


runner = CliRunner()


@pytest.mark.slow
def test_train_prints_stores_and_shows_the_report(tmp_path: Path, home: Path) -> None:
    path = tmp_path / "planted.csv"
    planted().to_csv(path, index=False)
    common = ["train", "--data", str(path), "--target", "target", "--epochs", "3", "--no-progress"]
    cleaned = runner.invoke(app, [*common, "--name", "cleaned"], env={"COLUMNS": "120"})
    assert cleaned.exit_code == 0, cleaned.stderr
    assert ("planted.csv: 310 rows, 7 exact duplicates removed, 3 conflicting label groups"
            in cleaned.stderr)
    assert "constant" in cleaned.stderr and "6.5%" in cleaned.stderr  # c; d's missing share

    kept = runner.invoke(app, [*common, "--name", "kept", "--no-clean"], env={"COLUMNS": "120"})
    assert kept.exit_code == 0, kept.stderr
    assert "7 exact duplicates kept" in kept.stderr

    registry = Registry(home / "registry")
    metas = {name: registry.get(name, 1).metadata for name in ("cleaned", "kept")}
    for name, rows, clean in (("cleaned", 303, True), ("kept", 310, False)):
        meta = metas[name]
        assert sum(meta.evaluation["split_rows"].values()) == rows
        assert meta.config["clean"] is clean
        report = meta.lineage["data_report"]
        assert (report["rows"], report["duplicates"], report["cleaned"]) == (310, 7, clean)
        assert report["conflicts"] == 3
        # the data reloads as it was trained on (what quantize and retrain check)
        assert training_data(meta).fingerprint == meta.data_fingerprint

    shown = runner.invoke(app, ["models", "show", "cleaned", "1"])
    assert shown.exit_code == 0, shown.output
    assert "data:      310 rows, 7 exact duplicates removed, 3 conflicting label groups" in shown.stdout
    assert "constant: c; missing: d 6.5%; outliers: e 4" in shown.stdout
