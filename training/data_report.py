"""What a table of training data holds before a model learns from it: the data report.

:func:`build_report` looks at the validated feature matrix and target (pure numpy, no effects)
and counts what usually signals a broken export or a labelling problem:

- exact duplicate rows (features and target equal): removed when cleaning, the first kept;
- conflicting labels (a classifier's rows with equal features and different labels): groups
  counted, the first listed by row number, always kept;
- constant columns (one value, or one value and missing ones): kept, with a warning (the model's
  scaling treats a zero spread safely, so the served input stays as the file has it);
- the missing share per column;
- outliers per column, by a robust rule: ``|x - median| > 5 x 1.4826 x MAD`` (the MAD scaled to
  a normal's standard deviation), counted, never removed; a column whose MAD is 0 is skipped.

Row numbers are 1-based data rows, as the data errors name them::

    report, keep = build_report(features, target, names, classification=True, clean=True)
    features, target = features[keep], target[keep]
    Console(stderr=True).print(report_table(report, "churn.csv"))
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Group
from rich.table import Table
from rich.text import Text

OUTLIER_MADS = 5.0
"""A value further than this many (normal-scaled) MADs from its column's median is an outlier."""
MAD_TO_SD = 1.4826  # the MAD of a normal distribution times this is its standard deviation
LISTED_ROWS = 10  # row numbers of the first conflicting group shown at most


@dataclass(frozen=True)
class ColumnReport:
    """One feature column: missing share, outliers (None where its MAD is 0, or for a
    categorical column) and constancy."""

    name: str
    missing: float
    """Share of rows (0-1) where the value is missing."""
    outliers: int | None
    constant: bool


@dataclass(frozen=True)
class DataReport:
    """The data report of one table, as read (before any row is removed)."""

    rows: int
    """Data rows read."""
    duplicates: int
    """Rows equal to an earlier row in features and target."""
    cleaned: bool
    """True when the duplicates were removed (the rows trained on are ``rows - duplicates``)."""
    conflicts: int | None
    """Groups of rows with equal features and different labels (None for regression)."""
    conflict_rows: list[int]
    """Row numbers of the first such group (at most 10)."""
    columns: list[ColumnReport]

    @property
    def removed(self) -> int:
        return self.duplicates if self.cleaned else 0

    @property
    def constant_columns(self) -> list[str]:
        return [c.name for c in self.columns if c.constant]

    def warnings(self) -> list[str]:
        """One line per problem kept in the data (conflicting labels, constant columns)."""
        out: list[str] = []
        if self.conflicts:
            rows = ", ".join(map(str, self.conflict_rows))
            out.append(f"{self.conflicts} group(s) of rows have the same features and different "
                       f"labels (kept); the first: rows {rows}")
        out += [f"column {name!r} is constant (kept; it carries no information)"
                for name in self.constant_columns]
        return out

    def to_dict(self) -> dict[str, Any]:
        """A plain dict for the version's metadata (``lineage["data_report"]``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataReport:
        return cls(**{**data, "columns": [ColumnReport(**c) for c in data["columns"]]})


def build_report(features: np.ndarray, target: np.ndarray, names: list[str], *,
                 classification: bool, clean: bool,
                 categorical: Collection[str] = ()) -> tuple[DataReport, np.ndarray]:
    """The report of ``features`` (``[rows, columns]`` float32, NaN missing) and ``target``, and
    the indexes of the rows to keep: all of them, or with ``clean`` all but the duplicates.
    ``categorical`` columns hold codes (0 missing): their missing share and constancy are
    reported, outliers are not (a code has no distance)."""
    groups = _row_groups(features)
    # a (features, target) pair per row; the first row of each pair is kept
    labels = pd.factorize(target, use_na_sentinel=False)[0]
    first = np.flatnonzero(~pd.Series(groups * (labels.max() + 1) + labels).duplicated().to_numpy())
    duplicates = len(target) - len(first)
    conflicts, conflict_rows = _conflicts(groups, first) if classification else (None, [])
    report = DataReport(rows=len(target), duplicates=duplicates, cleaned=clean,
                        conflicts=conflicts, conflict_rows=conflict_rows,
                        columns=_columns(features, names, categorical))
    keep = first if clean else np.arange(len(target))
    return report, keep


def _row_groups(features: np.ndarray) -> np.ndarray:
    """An id per row, equal for rows with equal features (NaN equal to NaN, -0.0 to 0.0): rows
    grouped by a 64-bit hash of their bits, each checked against its group's first row, so a
    hash collision (never seen in practice) falls back to comparing the columns one by one."""
    x = features + np.float32(0.0)  # -0.0 + 0.0 is 0.0
    x[np.isnan(x)] = np.float32("nan")  # one NaN bit pattern
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    groups = pd.factorize(pd.util.hash_pandas_object(pd.DataFrame(bits), index=False))[0]
    first = np.empty(int(groups.max(initial=-1)) + 1, dtype=np.int64)
    first[groups[::-1]] = np.arange(len(groups))[::-1]
    if (bits == bits[first[groups]]).all():
        return groups.astype(np.int64)
    return _column_groups(bits)


def _column_groups(bits: np.ndarray) -> np.ndarray:
    """:func:`_row_groups` without hashing rows: the columns' value codes combined one column
    at a time."""
    groups = np.zeros(len(bits), dtype=np.int64)
    for column in bits.T:
        codes = pd.factorize(column)[0]
        groups = pd.factorize(groups * (codes.max() + 1) + codes)[0]
    return groups


def _conflicts(groups: np.ndarray, first: np.ndarray) -> tuple[int, list[int]]:
    """Feature groups holding more than one label, and the row numbers of the one whose first
    row comes first."""
    labels_per_group = np.bincount(groups[first], minlength=int(groups.max()) + 1)
    conflicting = labels_per_group > 1
    count = int(conflicting.sum())
    if not count:
        return 0, []
    in_conflict = np.flatnonzero(conflicting[groups])
    rows = np.flatnonzero(groups == groups[in_conflict[0]])
    return count, [int(r) + 1 for r in rows[:LISTED_ROWS]]


def _columns(features: np.ndarray, names: list[str],
             categorical: Collection[str] = ()) -> list[ColumnReport]:
    out = []
    for name, column in zip(names, np.asfortranarray(features).T, strict=True):
        if name in categorical:
            codes = column[column > 0]
            out.append(ColumnReport(name, 1.0 - len(codes) / len(column), None,
                                    bool(len(codes) == 0 or codes.min() == codes.max())))
            continue
        values = column[~np.isnan(column)]
        if not len(values):  # all missing (a table is refused for it before training)
            out.append(ColumnReport(name, 1.0, None, True))
            continue
        median = np.median(values)
        distance = np.abs(values - median)
        mad = float(np.median(distance)) * MAD_TO_SD
        outliers = int((distance > OUTLIER_MADS * mad).sum()) if mad > 0 else None
        out.append(ColumnReport(name, 1.0 - len(values) / len(column), outliers,
                                bool(values.min() == values.max())))
    return out


def report_table(report: DataReport, source: str) -> Group:
    """The report for a console: the row counts, and a table with a row per column that has
    something to note (missing values, outliers, a constant value). The warnings are logged
    where the report is made (:func:`training.data.prepare`), not repeated here."""
    removed = "removed" if report.cleaned else "kept"
    conflicts = "-" if report.conflicts is None else str(report.conflicts)
    noted = [c for c in report.columns if c.missing or c.outliers or c.constant]
    lines = [f"{Path(source).name}: {report.rows} rows, {report.duplicates} exact duplicates "
             f"{removed}, {conflicts} conflicting label groups"]
    if len(noted) < len(report.columns):
        lines.append(f"{len(report.columns) - len(noted)} of {len(report.columns)} columns: no "
                     "missing values, outliers or constant value")
    if not noted:
        return Group(Text("\n".join(lines)))
    table = Table()
    for col, justify in (("column", "left"), ("missing", "right"), ("outliers", "right"),
                         ("note", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for c in noted:
        table.add_row(c.name, f"{c.missing:.1%}", "-" if c.outliers is None else str(c.outliers),
                      "constant" if c.constant else "")
    return Group(Text("\n".join(lines)), table)
