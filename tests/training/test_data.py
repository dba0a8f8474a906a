"""Data loading and validation: built-ins, user files, one-line errors, split, fingerprint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from modelloop.schemas import Task
from training.data import DataError, load_data, prepare, read_table, split_dataset

GOOD = "a,b,target\n1.5,2,yes\n2.5,,no\n3.5,4,yes\n"


@pytest.mark.parametrize(
    ("name", "task", "rows", "n_features", "labels"),
    [
        ("breast_cancer", Task.classification, 569, 30, ["malignant", "benign"]),
        ("wine", Task.classification, 178, 13, ["class_0", "class_1", "class_2"]),
        ("digits", Task.classification, 1797, 64, [str(d) for d in range(10)]),
        ("diabetes", Task.regression, 442, 10, None),
    ],
)
def test_builtin_datasets(name: str, task: Task, rows: int, n_features: int,
                          labels: list[str] | None) -> None:
    ds = load_data(name)
    assert (ds.task, len(ds), ds.n_features, ds.class_labels) == (task, rows, n_features, labels)
    assert ds.features.dtype == np.float32 and ds.features.shape == (rows, n_features)
    assert not np.isnan(ds.features).any()


def test_synthetic_dataset_is_seeded_and_sized() -> None:
    a, b = load_data("synthetic", rows=300, seed=1), load_data("synthetic", rows=300, seed=1)
    c = load_data("synthetic", rows=300, seed=2)
    assert len(a) == 300 and a.n_features == 20 and a.class_labels == ["0", "1"]
    assert a.fingerprint == b.fingerprint != c.fingerprint


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("filename", "content", "target", "problem"),
    [
        # no such file
        ("absent.csv", None, "target", "file not found"),
        # zero bytes
        ("empty.csv", "", "target", "file is empty"),
        # only blank lines: pandas finds no columns at all
        ("blank.csv", "\n\n", "target", "file is empty"),
        # a header and no rows
        ("header.csv", "a,b,target\n", "target", "no data rows"),
        # the named target is not a column
        ("notarget.csv", "a,b\n1,2\n", "label", "target column 'label' not found (columns: a, b)"),
        # text in a feature column is named with the first bad value and its row
        ("text.csv", "a,color,target\n1,2,x\n2,red,y\n", "target",
         "column 'color' is not numeric (value 'red' in row 2)"),
        # a feature column with no value at all
        ("allnan.csv", "a,b,target\n1,,x\n2,,y\n", "target", "column 'b' has no values (all missing)"),
        # classification needs two classes
        ("oneclass.csv", "a,target\n1,yes\n2,yes\n", "target",
         "target column 'target' has a single class ('yes'); a classifier needs at least 2"),
        # a row without a label cannot be trained on
        ("nolabel.csv", "a,target\n1,x\n2,\n3,y\n", "target",
         "target column 'target' has 1 missing value (first in row 2)"),
        # nothing to learn from
        ("onlytarget.csv", "target\nx\ny\n", "target", "no feature columns besides the target 'target'"),
        # infinities cannot be imputed or scaled
        ("inf.csv", "a,target\n1,x\ninf,y\n", "target",
         "column 'a' has an infinite or too large value in row 2"),
        # the reference sample's own columns start with _ml_
        ("reserved.csv", "_ml_label,target\n1,x\n2,y\n", "target",
         "column '_ml_label' uses the reserved prefix '_ml_'"),
        # neither CSV nor Parquet
        ("data.txt", "a,target\n1,x\n", "target", "unsupported file type '.txt'; use .csv or .parquet"),
        # not text at all
        ("binary.csv", None, "target", "not a UTF-8 text file"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path: Path, filename: str, content: str | None,
                                        target: str, problem: str) -> None:
    path = tmp_path / filename
    if content is not None:
        path.write_text(content)
    elif filename == "binary.csv":
        path.write_bytes(b"a,target\n\xff\xfe\x00\x81,1\n")
    with pytest.raises(DataError) as err:
        load_data(path, target)
    assert str(err.value) == f"{path}: {problem}"
    assert "\n" not in str(err.value)


def test_csv_and_parquet_load_the_same_data(tmp_path: Path) -> None:
    frame = pd.read_csv(_write(tmp_path, "d.csv", GOOD))
    frame.to_parquet(tmp_path / "d.parquet")
    a, b = load_data(tmp_path / "d.csv", "target"), load_data(tmp_path / "d.parquet", "target")
    assert a.fingerprint == b.fingerprint  # over the data, not the file bytes
    assert a.class_labels == ["no", "yes"]
    assert a.target.tolist() == [1, 0, 1]
    assert np.isnan(a.features[1, 1])  # a missing value stays NaN for the model to impute


def test_fingerprint_changes_with_any_value() -> None:
    frame = pd.DataFrame({"a": [1.0, 2.0, 3.0], "target": ["x", "y", "x"]})
    base = prepare(frame, "target").fingerprint
    assert base.startswith("sha256:") and prepare(frame.copy(), "target").fingerprint == base
    changed = frame.copy()
    changed.loc[2, "a"] = 3.0001
    relabelled = frame.copy()
    relabelled.loc[2, "target"] = "y"
    assert prepare(changed, "target").fingerprint != base
    assert prepare(relabelled, "target").fingerprint != base


def test_class_labels_are_strings_in_numeric_order() -> None:
    frame = pd.DataFrame({"a": range(6), "target": [10, 2, 1, 2, 10, 1]})
    ds = prepare(frame, "target", task=Task.classification)
    assert ds.class_labels == ["1", "2", "10"]
    assert ds.labels().tolist() == ["10", "2", "1", "2", "10", "1"]


def test_task_is_inferred_from_the_target() -> None:
    ints = pd.DataFrame({"a": range(30), "target": [0, 1, 2] * 10})
    floats = pd.DataFrame({"a": range(30), "target": np.linspace(0, 1, 30)})
    assert prepare(ints, "target").task is Task.classification
    assert prepare(floats, "target").task is Task.regression


def test_fixed_class_labels_keep_order_and_reject_unknown_labels() -> None:
    frame = pd.DataFrame({"a": [1.0, 2.0], "target": ["b", "b"]})
    ds = prepare(frame, "target", class_labels=["b", "a"])  # one class present: fine when fixed
    assert ds.class_labels == ["b", "a"] and ds.target.tolist() == [0, 0]
    with pytest.raises(DataError, match=r"^window: target column 'target' has labels the model "
                                        r"does not know: 'c' \(classes: a, b\)$"):
        prepare(pd.DataFrame({"a": [1.0], "target": ["c"]}), "target", class_labels=["a", "b"],
                source="window")


def test_split_is_seeded_disjoint_and_stratified() -> None:
    ds = load_data("breast_cancer")
    a = split_dataset(ds, val_fraction=0.15, test_fraction=0.2, seed=3)
    b = split_dataset(ds, val_fraction=0.15, test_fraction=0.2, seed=3)
    c = split_dataset(ds, val_fraction=0.15, test_fraction=0.2, seed=4)
    assert all(np.array_equal(x, y) for x, y in [(a.train, b.train), (a.val, b.val), (a.test, b.test)])
    assert not np.array_equal(a.test, c.test)
    everything = np.concatenate([a.train, a.val, a.test])
    assert sorted(everything.tolist()) == list(range(len(ds)))
    assert len(a.test) == 114
    share = ds.target.mean()
    for part in (a.train, a.val, a.test):
        assert abs(ds.target[part].mean() - share) < 0.02


def test_split_explains_a_class_too_small_to_stratify() -> None:
    frame = pd.DataFrame({"a": range(12), "target": ["x"] * 10 + ["y"] * 2})
    ds = prepare(frame, "target", source="tiny.csv")
    with pytest.raises(DataError) as err:
        split_dataset(ds, val_fraction=0.15, test_fraction=0.2, seed=0)
    assert str(err.value) == ("tiny.csv: class 'y' has only 2 rows; a stratified "
                              "train/validation/test split needs at least 3 per class")


def test_read_table_rejects_a_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r": is a directory, not a data file$"):
        read_table(tmp_path)
