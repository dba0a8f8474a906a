"""Tabular data for training: built-in datasets, user files, validation, split and fingerprint.

Every source ends as a :class:`TabularDataset`: a float32 feature matrix (NaN marks a missing
value), the target (class index or value), feature names and class labels. A column of text (or
an integer column named in ``categorical``) is a categorical feature: its values, sorted, are the
dataset's vocabulary (``TabularDataset.categories``) and the matrix holds each value's code
(index + 1; 0 for a missing value), so the trainer, evaluation and tuning see numbers only. User data is checked
where it enters, and each problem is one :class:`DataError` whose one-line message names the file
and the problem, so the CLI can print it as is::

    ds = load_data("breast_cancer")                      # built-in
    ds = load_data("data/churn.csv", target="churned")   # CSV or Parquet
    ds = prepare(frame, "target", source="feedback window")
    split = split_dataset(ds, val_fraction=0.15, test_fraction=0.2, seed=0)
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from pandas._libs.parsers import STR_NA_VALUES
from sklearn import datasets as skd
from sklearn.model_selection import train_test_split

from modelloop.schemas import MAX_CATEGORY_CHARS, Task
from modelloop.synthetic import TARGET as SYNTHETIC_TARGET
from modelloop.synthetic import SyntheticTask
from training.data_report import DataReport, build_report

log = logging.getLogger(__name__)

TARGET = "target"
"""The target column of every built-in dataset."""

RESERVED_PREFIX = "_ml_"  # the reference sample's own columns (modelloop.schemas.REF_*)
SYNTHETIC_ROWS = 5000
# an integer target with at most this many distinct values is taken as class labels
MAX_INFERRED_CLASSES = 20


class DataError(ValueError):
    """Training data cannot be used; the message is one line naming the source and the problem."""


@dataclass(frozen=True)
class TabularDataset:
    """Validated training data: raw float32 features (NaN = missing) and the target."""

    source: str
    features: np.ndarray
    """``[rows, n_features]`` float32, NaN where a value is missing (``[rows, time,
    n_features]`` for sequences)."""
    target: np.ndarray
    """Class index into ``class_labels`` (int64) or the value to predict (float64)."""
    feature_names: list[str]
    target_name: str
    task: Task
    class_labels: list[str] | None = None
    report: DataReport | None = field(default=None, compare=False)
    """What the table held as read (:mod:`training.data_report`); None for data that is not a
    table (sequences)."""
    categories: dict[str, list[str]] = field(default_factory=dict)
    """Categorical feature -> its values in this dataset, sorted: ``features`` holds the code of
    ``values[i]`` as ``i + 1`` and 0 for a missing value. Features not named are numeric."""

    def __len__(self) -> int:
        return len(self.target)

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @property
    def fingerprint(self) -> str:
        """``sha256:<hex>`` over feature names, values and target: same data, same fingerprint."""
        h = hashlib.sha256()
        h.update("\x1f".join([*self.feature_names, "|", self.target_name]).encode())
        for name, values in self.categories.items():  # a code means nothing without its value
            h.update("\x1f".join([name, *values, "|"]).encode())
        # one NaN bit pattern, so equal data hashes equal whichever way the NaN was produced
        x = np.where(np.isnan(self.features), np.float32("nan"), self.features)
        h.update(np.ascontiguousarray(x, dtype="<f4").tobytes())
        if self.class_labels is not None:
            h.update("\x1f".join(self.class_labels[i] for i in self.target).encode())
        else:
            h.update(np.ascontiguousarray(self.target, dtype="<f8").tobytes())
        return "sha256:" + h.hexdigest()

    def labels(self) -> np.ndarray:
        """The target as the user wrote it: class label strings, or values."""
        if self.class_labels is None:
            return self.target
        return np.asarray(self.class_labels, dtype=object)[self.target]

    def to_frame(self) -> pd.DataFrame:
        """Features and target as a DataFrame (labels as strings; categorical values as their
        strings, None missing), e.g. to add new rows to."""
        frame = pd.DataFrame(self.features, columns=self.feature_names)
        for name, values in self.categories.items():
            frame[name] = decode(frame[name].to_numpy(), values)
        frame[self.target_name] = self.labels()
        return frame

    def raw_rows(self, rows: np.ndarray | None = None) -> np.ndarray:
        """The features as the model's users hold them (modelloop/categorical.py): an object
        matrix with floats (NaN missing) and the categorical values' strings (None missing);
        the float32 matrix itself when no feature is categorical. ``rows``: indices, or all."""
        x = self.features if rows is None else self.features[rows]
        return raw_features(x, self.feature_names, self.categories)


def raw_features(x: np.ndarray, feature_names: Sequence[str],
                 categories: Mapping[str, Sequence[str]]) -> np.ndarray:
    """A coded feature matrix as object rows (:meth:`TabularDataset.raw_rows`)."""
    if not categories:
        return x
    out = x.astype(object)
    for j, name in enumerate(feature_names):
        if name in categories:
            out[:, j] = decode(x[:, j], categories[name])
    return out


def decode(codes: np.ndarray, values: Sequence[str]) -> np.ndarray:
    """Dataset codes (1-based; 0 or NaN missing) as an object array of their values (None)."""
    table = np.array([None, *values], dtype=object)
    c = np.nan_to_num(np.asarray(codes, dtype=np.float64), nan=0.0).astype(np.int64)
    return table[np.clip(c, 0, len(values))]


def encode(values: Sequence[object] | np.ndarray, vocabulary: Sequence[str]) -> np.ndarray:
    """Values (str; None or "" missing) as float32 codes of ``vocabulary`` (index + 1; 0 for a
    value it does not hold and a missing one): the coding the exported graph does."""
    index = {v: i + 1 for i, v in enumerate(vocabulary)}
    return np.fromiter((index.get(v, 0) if isinstance(v, str) else 0 for v in values),
                       dtype=np.float32, count=len(values))


# -- built-in datasets ---------------------------------------------------------------------------
def _sklearn(loader: Callable[..., object], *, labels: bool) -> Callable[[int | None, int], pd.DataFrame]:
    def load(rows: int | None, seed: int) -> pd.DataFrame:
        bunch = loader(as_frame=True)
        frame: pd.DataFrame = bunch.frame.copy()  # type: ignore[attr-defined]
        if labels:  # sklearn's class names, e.g. "malignant"/"benign", in sklearn's order
            names = [str(n) for n in bunch.target_names]  # type: ignore[attr-defined]
            frame[TARGET] = [names[i] for i in bunch.target]  # type: ignore[attr-defined]
        if rows is not None and rows < len(frame):
            frame = frame.sample(n=rows, random_state=seed).reset_index(drop=True)
        return frame

    return load


def _synthetic(rows: int | None, seed: int) -> pd.DataFrame:
    frame = SyntheticTask(seed=seed).sample(rows or SYNTHETIC_ROWS)
    return frame.rename(columns={SYNTHETIC_TARGET: TARGET})


def _diabetes(as_frame: bool) -> object:
    # the raw (unscaled) features: scaling is the model's job, inside the exported graph
    return skd.load_diabetes(as_frame=as_frame, scaled=False)


@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    task: Task
    description: str
    load: Callable[[int | None, int], pd.DataFrame] | None
    class_labels: Callable[[], list[str]] | None = None
    dataset: Callable[[int | None, int], TabularDataset] | None = None
    """Builds the dataset itself, for data that is not a table (sequences)."""


def _sequences(rows: int | None, seed: int) -> TabularDataset:
    from training.sequence import load_sequences  # it imports this module

    return load_sequences(rows, seed)


def _names(loader: Callable[[], object]) -> Callable[[], list[str]]:
    return lambda: [str(n) for n in loader().target_names]  # type: ignore[attr-defined]


BUILTINS: dict[str, BuiltinDataset] = {
    d.name: d
    for d in [
        BuiltinDataset("breast_cancer", Task.classification,
                       "569 tumours, 30 features, malignant/benign",
                       _sklearn(skd.load_breast_cancer, labels=True),
                       _names(skd.load_breast_cancer)),
        BuiltinDataset("wine", Task.classification, "178 wines, 13 features, 3 cultivars",
                       _sklearn(skd.load_wine, labels=True), _names(skd.load_wine)),
        BuiltinDataset("digits", Task.classification,
                       "1797 8x8 images of digits as 64 pixel features, 10 classes",
                       _sklearn(skd.load_digits, labels=True), _names(skd.load_digits)),
        BuiltinDataset("diabetes", Task.regression,
                       "442 patients, 10 features, disease progression (regression)",
                       _sklearn(_diabetes, labels=False)),
        BuiltinDataset("synthetic", Task.classification,
                       f"seeded synthetic task, 20 features, binary ({SYNTHETIC_ROWS} rows unless --rows)",
                       _synthetic, lambda: ["0", "1"]),
        BuiltinDataset("sequences", Task.classification,
                       "seeded synthetic sequences [rows, 24 steps, 3 channels], 4 shape classes "
                       "(4000 rows unless --rows; for --model gru/lstm)",
                       None, dataset=_sequences),
    ]
}


# -- reading user files --------------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def read_table(path: str | Path, categorical: Sequence[str] = ()) -> pd.DataFrame:
    """Read a CSV or Parquet file; a missing, empty or unreadable file is a :class:`DataError`.

    A CSV's text columns, and the ``categorical`` ones, hold their values as written ("02139",
    "NA"): only the empty cell is missing, as serving reads them. Numeric columns also read
    pandas' missing spellings ("NA", "NaN", "null", ...) as missing (:func:`_numbers_as_read`).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a data file")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}; use .csv or .parquet")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path, dtype=dict.fromkeys(categorical, str), keep_default_na=False,
                                na_values=[""],
                                # pandas' C parser cuts a value at a NUL; the Python one keeps it,
                                # so that it is refused (_categorical_column) and not shortened
                                engine="python" if _has_nul(path) else "c")
            return _numbers_as_read(frame, categorical)
        return pd.read_parquet(path)
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path}: file is empty") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a UTF-8 text file") from exc
    except (pd.errors.ParserError, ValueError, OSError) as exc:
        kind = "CSV" if suffix == ".csv" else "Parquet"
        raise DataError(f"{path}: cannot read {kind}: {_first_line(exc)}") from exc


def _has_nul(path: Path) -> bool:
    with path.open("rb") as f:
        return any(b"\0" in chunk for chunk in iter(lambda: f.read(1 << 20), b""))


def _numbers_as_read(frame: pd.DataFrame, categorical: Sequence[str]) -> pd.DataFrame:
    """A CSV read with only the empty cell missing, its numeric columns as pandas reads them by
    default: a column of numbers with "NA" or "NaN" cells is numbers with missing values."""
    for c in frame.columns:
        col = frame[c]
        if str(c) in categorical or col.dtype != object:
            continue
        missing = col.isin(STR_NA_VALUES)
        if missing.any() and not _is_text(col[~missing]):
            col = col.mask(missing)
            numbers = pd.to_numeric(col, errors="coerce")
            # all numbers: the column as pandas reads it; stray text stays, to be refused
            frame[c] = numbers if numbers.notna().sum() == col.notna().sum() else col
    return frame


# -- validation ----------------------------------------------------------------------------------
def _row(mask: np.ndarray) -> int:
    """1-based number of the first data row where ``mask`` holds."""
    return int(np.flatnonzero(mask)[0]) + 1


def _numeric_column(source: str, name: str, col: pd.Series) -> np.ndarray:
    if pd.api.types.is_bool_dtype(col):
        col = col.astype(float)
    if not pd.api.types.is_numeric_dtype(col):
        coerced = pd.to_numeric(col, errors="coerce")
        bad = (coerced.isna() & col.notna()).to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{source}: column {name!r} is not numeric (value {col.iloc[i]!r} in row {i + 1})"
            )
        col = coerced
    with np.errstate(over="ignore"):  # values beyond float32 become inf, reported below
        values = col.to_numpy(dtype=np.float64, na_value=np.nan).astype(np.float32)
    if np.isnan(values).all():
        raise DataError(f"{source}: column {name!r} has no values (all missing)")
    inf = np.isinf(values)
    if inf.any():
        raise DataError(f"{source}: column {name!r} has an infinite or too large value in row {_row(inf)}")
    return values


def _is_text(col: pd.Series) -> bool:
    """A column of text: not numbers, and fewer than half of its values read as numbers (a
    column of numbers with stray text stays numeric, and its first bad value is an error)."""
    if pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
        return False
    present = col.dropna()
    if len(present) == 0:
        return False
    numbers = pd.to_numeric(present, errors="coerce").notna().sum()
    return bool(numbers * 2 < len(present))


def _categorical_column(source: str, name: str, col: pd.Series) -> tuple[np.ndarray, list[str]]:
    """A categorical column as codes (float32, 0 missing) and its sorted values."""
    present = col.notna().to_numpy()
    if not present.any():
        raise DataError(f"{source}: column {name!r} has no values (all missing)")
    text = np.array([_label_text(v) if ok else None for v, ok in zip(col, present, strict=True)],
                    dtype=object)
    text[text == ""] = None  # the empty string is how serving sends a missing value
    _check_servable(source, name, text)
    values = _sort_labels({t for t in text.tolist() if t is not None})
    return encode(text, values), values


def _check_servable(source: str, name: str, text: np.ndarray) -> None:
    """Refuse a value serving could never take (modelloop.schemas.Category): too long, or NUL."""
    for i, t in enumerate(text.tolist()):
        if t is None:
            continue
        if len(t) > MAX_CATEGORY_CHARS:
            raise DataError(f"{source}: column {name!r} has a value of {len(t)} characters in row "
                            f"{i + 1}; categories are at most {MAX_CATEGORY_CHARS}")
        if "\0" in t:
            raise DataError(f"{source}: column {name!r} has a value with a NUL character in row "
                            f"{i + 1}; categories cannot hold one")


def _label_text(value: object) -> str:
    # 1.0 read from a CSV column with a missing value is the class "1", not "1.0"
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _sort_labels(labels: set[str]) -> list[str]:
    try:  # numeric labels in numeric order ("2" before "10")
        return sorted(labels, key=float)
    except ValueError:
        return sorted(labels)


def _infer_task(col: pd.Series) -> Task:
    if pd.api.types.is_float_dtype(col):
        return Task.regression
    if pd.api.types.is_integer_dtype(col) and col.nunique() > MAX_INFERRED_CLASSES:
        return Task.regression
    return Task.classification


def prepare(
    frame: pd.DataFrame,
    target: str,
    *,
    task: Task | None = None,
    class_labels: Sequence[str] | None = None,
    source: str = "dataframe",
    clean: bool = False,
    categorical: Sequence[str] = (),
) -> TabularDataset:
    """Validate ``frame`` and turn it into a :class:`TabularDataset` with its data report.

    A column of text is categorical, and so is each column named in ``categorical`` (integers,
    say); their codes are this frame's sorted values (:attr:`TabularDataset.categories`).

    ``task`` None infers it: a float target, or an integer one with more than 20 distinct values,
    is regression; anything else is classification. ``class_labels`` fixes the classes and their
    order (a retrained model keeps its champion's); otherwise they are the sorted distinct labels.
    ``clean`` removes exact duplicate rows (the first of each kept, in order), before any split.
    """
    names = _feature_names(frame, target, source)
    unknown = [c for c in categorical if c not in names]
    if unknown:
        raise DataError(f"{source}: categorical column {unknown[0]!r} is not a feature column")
    columns: list[np.ndarray] = []
    categories: dict[str, list[str]] = {}
    for c in frame.columns:
        if c == target:
            continue
        if str(c) in categorical or _is_text(frame[c]):
            codes, categories[str(c)] = _categorical_column(source, str(c), frame[c])
            columns.append(codes)
        else:
            columns.append(_numeric_column(source, str(c), frame[c]))
    features = np.column_stack(columns).astype(np.float32)
    for column, vocabulary in categories.items():
        if len(vocabulary) * 2 > len(frame):  # an ID, say: a code per row teaches nothing
            log.warning("%s: categorical column %r has %d distinct values in %d rows; an "
                        "identifier is no feature (drop the column?)", source, column,
                        len(vocabulary), len(frame))

    y = frame[target]
    missing = y.isna().to_numpy()
    if missing.any():
        k = int(missing.sum())
        raise DataError(
            f"{source}: target column {target!r} has {k} missing {'value' if k == 1 else 'values'}"
            f" (first in row {_row(missing)})"
        )
    task = task or _infer_task(y)
    labels: list[str] | None = None
    if task is Task.regression:
        values = _numeric_column(source, f"{target}", y).astype(np.float64)
    elif task is Task.classification:
        values, labels = _class_codes(y, class_labels, target, source)
    else:
        raise DataError(f"{source}: task {task.value!r} is not supported for tabular training")
    report, keep = build_report(features, values, names,
                                classification=task is Task.classification, clean=clean,
                                categorical=categories)
    for warning in report.warnings():
        log.warning("%s: %s", source, warning)
    if report.removed:
        log.info("%s: removed %d exact duplicate rows", source, report.removed)
        features, values = features[keep], values[keep]
    return TabularDataset(source, features, values, names, target, task, labels, report, categories)


def _feature_names(frame: pd.DataFrame, target: str, source: str) -> list[str]:
    """The feature columns' names: every column but the target, each once, none reserved."""
    if len(frame.columns) == 0:
        raise DataError(f"{source}: file is empty")
    if target not in frame.columns:
        cols = [str(c) for c in frame.columns]
        shown = ", ".join(cols[:12]) + (", ..." if len(cols) > 12 else "")
        raise DataError(f"{source}: target column {target!r} not found (columns: {shown})")
    if len(frame) == 0:
        raise DataError(f"{source}: no data rows")
    names = [str(c) for c in frame.columns if c != target]
    if not names:
        raise DataError(f"{source}: no feature columns besides the target {target!r}")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise DataError(f"{source}: column {dup!r} appears more than once")
    for name in names:
        if name.startswith(RESERVED_PREFIX):
            raise DataError(f"{source}: column {name!r} uses the reserved prefix {RESERVED_PREFIX!r}")
    return names


def _class_codes(y: pd.Series, class_labels: Sequence[str] | None, target: str,
                 source: str) -> tuple[np.ndarray, list[str]]:
    """A classification target as class indexes, and the classes in their order:
    ``class_labels`` when given (a label outside them is refused), else the sorted labels seen."""
    text = y.map(_label_text).to_numpy(dtype=object)
    seen = set(text.tolist())
    if class_labels is None:
        labels = _sort_labels(seen)
        if len(labels) < 2:
            raise DataError(
                f"{source}: target column {target!r} has a single class ({labels[0]!r}); "
                "a classifier needs at least 2"
            )
    else:
        labels = [str(c) for c in class_labels]
        unknown = sorted(seen - set(labels))
        if unknown:
            raise DataError(
                f"{source}: target column {target!r} has labels the model does not know: "
                f"{', '.join(map(repr, unknown[:5]))} (classes: {', '.join(labels)})"
            )
    index = {label: i for i, label in enumerate(labels)}
    codes = np.fromiter((index[t] for t in text), dtype=np.int64, count=len(text))
    return codes, labels


def load_data(
    source: str | Path,
    target: str = TARGET,
    *,
    task: Task | None = None,
    rows: int | None = None,
    seed: int = 0,
    class_labels: Sequence[str] | None = None,
    clean: bool = False,
    categorical: Sequence[str] = (),
) -> TabularDataset:
    """A built-in dataset by name (``rows`` and ``seed`` subsample it or seed the synthetic
    task), or a CSV/Parquet file with the named ``target`` column. ``clean`` removes exact
    duplicate rows (see :func:`prepare`; the sequences dataset has none to remove); ``categorical``
    names integer columns to treat as categories (text columns always are)."""
    name = str(source)
    if name in BUILTINS:
        builtin = BUILTINS[name]
        if builtin.dataset is not None:
            return builtin.dataset(rows, seed)
        assert builtin.load is not None
        frame = builtin.load(rows, seed)
        labels = class_labels or (builtin.class_labels() if builtin.class_labels else None)
        return prepare(frame, TARGET, task=builtin.task, class_labels=labels, source=name,
                       clean=clean, categorical=categorical)
    return prepare(read_table(source, categorical), target, task=task, class_labels=class_labels, source=name,
                   clean=clean, categorical=categorical)


# -- split ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Split:
    """Row indices of the train, validation and test parts of a dataset."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def split_dataset(
    ds: TabularDataset, *, val_fraction: float, test_fraction: float, seed: int
) -> Split:
    """A seeded split, stratified by class for classification (same seed, same split)."""
    idx = np.arange(len(ds))
    stratify = ds.target if ds.task is Task.classification else None
    if stratify is not None:
        counts = np.bincount(stratify, minlength=len(ds.class_labels or []))
        present = counts[counts > 0]
        if present.min() < 3:
            label = (ds.class_labels or [])[int(np.flatnonzero(counts == present.min())[0])]
            raise DataError(
                f"{ds.source}: class {label!r} has only {int(present.min())} rows; "
                "a stratified train/validation/test split needs at least 3 per class"
            )
    try:
        rest, test = train_test_split(idx, test_size=test_fraction, random_state=seed,
                                      stratify=stratify)
        val_share = val_fraction / (1.0 - test_fraction)
        train, val = train_test_split(rest, test_size=val_share, random_state=seed,
                                      stratify=None if stratify is None else stratify[rest])
    except ValueError as exc:
        raise DataError(
            f"{ds.source}: too few rows ({len(ds)}) for a train/validation/test split: "
            f"{_first_line(exc)}"
        ) from exc
    return Split(np.sort(train), np.sort(val), np.sort(test))
