"""Batch scoring of CSV and Parquet files: streamed in chunks, resumable, same results as /predict.

:func:`score_file` reads the input ``chunk_rows`` rows at a time (pyarrow's streaming readers, so
memory stays bounded by a few chunks whatever the file size), runs each chunk through the same
:class:`~serving.runtime.OnnxRuntime` and :func:`~serving.predictions.interpret` as ``/predict``,
and writes each scored chunk as a part file next to the output (``OUT.parts/part-000042.arrow``,
written then renamed, so a part exists whole or not at all). A manifest in that folder pins the
input file, chunk size and model version; after an interruption the same command skips the chunks
whose parts exist and scores the rest with the same model version. When every chunk is done the
parts are joined into OUT (written then renamed) and the folder is removed.

Example::

    report = score_file(Path("in.csv"), Path("out.parquet"), runtime, chunk_rows=65536)
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from modelloop.schemas import MAX_CATEGORY_CHARS
from serving.predictions import interpret, to_columns
from serving.runtime import OnnxRuntime
from serving.settings import NanPolicy
from serving.validation import category_problem

logger = logging.getLogger(__name__)

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
F32_MAX = float(np.finfo(np.float32).max)
Progress = Callable[[int, int], None]  # (rows scored so far, input units done: rows or bytes)


class BatchInputError(Exception):
    """The input file cannot be scored; the message names the file, column and, if known, row.

    ``code`` says what kind of problem it is (the HTTP routes answer with it): ``malformed_body``
    (not readable as its format), ``unsupported_encoding`` (not UTF-8), ``too_many_rows`` and
    ``too_large`` (refused before decoding), ``duplicate_column``, ``missing_feature``,
    ``wrong_type``, ``not_finite``, ``missing_value``; ``column`` the column concerned, if one is."""

    def __init__(self, message: str, *, code: str = "invalid_value", column: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.column = None if column is None else column[:100]


CSV_BLOCK_BYTES = 1 << 22
"""The block pyarrow's CSV reader parses at a time; a header (or any row) longer fails to read."""

MAX_PARQUET_FOOTER_BYTES = 64 << 20
"""Largest Parquet footer read: its metadata takes about ten times its size in memory (a 12 MB
footer of 200,000 column chunks took 118 MB), and a job's file may be gigabytes."""

_WIDE_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")  # UTF-16 LE/BE, UTF-32 (LE starts FF FE)


def _shown(name: str) -> str:
    return repr(name if len(name) <= 60 else name[:60] + "...")


def _unique(names: Sequence[str], source: str) -> None:
    seen: dict[str, int] = {}
    for k, name in enumerate(names):
        if name in seen:
            raise BatchInputError(f"{source}: column {_shown(name)} appears twice (columns {seen[name] + 1} "
                                  f"and {k + 1}); column names must be unique", code="duplicate_column",
                                  column=name)
        seen[name] = k


def csv_header(head: bytes, source: str) -> list[str]:
    """The column names of a CSV whose first bytes are ``head`` (its first line at least), read
    as pyarrow's reader reads them (commas, double quotes, leading empty lines and a UTF-8
    byte-order mark skipped) but with Python's csv module: pyarrow infers the type of every
    column of the first block to name the columns (1.4 s and 0.9 GB for 100,000 names).
    A UTF-16 or UTF-32 file, a name that is not UTF-8 and a name used twice are refused."""
    if head.startswith(_WIDE_BOMS):
        raise BatchInputError(f"{source}: the CSV is UTF-16 or UTF-32 text (it starts with a byte-order mark "
                              "of one); send it as UTF-8", code="unsupported_encoding")
    head = head.removeprefix(b"\xef\xbb\xbf").lstrip(b"\r\n")
    ends = [i for i in (head.find(b"\n", 0, CSV_BLOCK_BYTES), head.find(b"\r", 0, CSV_BLOCK_BYTES)) if i >= 0]
    if not ends and len(head) >= CSV_BLOCK_BYTES:  # cut short, its last name would be wrong
        raise BatchInputError(f"{source}: the CSV header is longer than {CSV_BLOCK_BYTES} bytes, the most read",
                              code="malformed_body")
    line = head[:min(ends, default=len(head))]
    try:
        names = next(csv.reader([line.decode("utf-8", "surrogateescape")]), [])
    except csv.Error as exc:  # a name beyond csv's field size limit (128 KiB)
        raise BatchInputError(f"{source}: cannot read the CSV header: {exc}", code="malformed_body") from None
    if not names:
        raise BatchInputError(f"{source}: the CSV is empty (no header)", code="malformed_body")
    for k, name in enumerate(names):
        if not name.isascii():
            try:
                name.encode()
            except UnicodeEncodeError:
                shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                raise BatchInputError(f"{source}: column {k + 1} of the header ({_shown(shown)}) is not UTF-8 "
                                      "text; send the file as UTF-8", code="unsupported_encoding") from None
    _unique(names, source)
    return names


def open_parquet(source: Path | bytes, name: str) -> pq.ParquetFile:
    """The reader of a Parquet file (a path, or the bytes of one) with its footer read and no data
    decoded. A footer beyond :data:`MAX_PARQUET_FOOTER_BYTES` is refused unread, and column
    names must be UTF-8 and unique."""
    if isinstance(source, bytes):
        tail, handle = source[-8:], pa.BufferReader(source)
    else:
        with open(source, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8))
            tail, handle = f.read(8), source
    footer = int.from_bytes(tail[:4], "little") if tail[4:] == b"PAR1" else 0
    if footer > MAX_PARQUET_FOOTER_BYTES:
        raise BatchInputError(f"{name}: the Parquet footer is {footer} bytes, more than the {MAX_PARQUET_FOOTER_BYTES} "
                              "read", code="too_large")
    try:
        pfile = pq.ParquetFile(handle)
        names = pfile.schema_arrow.names
    except (pa.ArrowException, OSError, ValueError) as exc:  # ValueError: a name that is not UTF-8
        raise BatchInputError(f"{name}: cannot read parquet: {exc}", code="malformed_body") from None
    _unique(names, name)
    return pfile


def parquet_sizes(pfile: pq.ParquetFile, features: Sequence[str], source: str) -> tuple[int, list[int]]:
    """The rows of a Parquet file and, per row group, the bytes its ``features`` columns decode
    to, as its footer declares them: per column chunk the larger of its uncompressed size (a
    compressed page of zeros) and 8 bytes a row (a dictionary- or run-length-encoded column
    declares a few bytes for millions of rows). Nothing is decoded."""
    md = pfile.metadata
    wanted = set(features)
    leaves = [i for i in range(md.num_columns) if md.schema.column(i).path in wanted]
    rows, sizes = md.num_rows, []
    for g in range(md.num_row_groups):
        group = md.row_group(g)
        declared = [group.num_rows, *(group.column(i).total_uncompressed_size for i in leaves)]
        if min(declared) < 0:
            raise BatchInputError(f"{source}: row group {g} declares a negative size", code="malformed_body")
        sizes.append(sum(max(size, 8 * group.num_rows) for size in declared[1:]))
    return max(rows, sum(md.row_group(g).num_rows for g in range(md.num_row_groups))), sizes


def _is_number(t: pa.DataType) -> bool:
    return bool(pa.types.is_floating(t) or pa.types.is_integer(t))


def _is_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t))


def check_feature_types(schema: pa.Schema, features: Sequence[str], source: str,
                        categorical: Collection[str] = ()) -> None:
    """Every feature column holds numbers, a categorical one strings or integers (an integer
    column declared categorical at training, whose values the graph knows as their decimal
    text) (checked on a Parquet schema before decoding)."""
    for name in features:
        t = schema.field(name).type
        if name in categorical:
            if not (_is_text(t) or pa.types.is_integer(t)):
                raise BatchInputError(f"{source}: column {name!r} has type {t}, expected strings (a "
                                      "categorical feature)", code="wrong_type", column=name)
        elif not _is_number(t):
            raise BatchInputError(f"{source}: column {name!r} has type {t}, expected numbers",
                                  code="wrong_type", column=name)


def column_types(features: Sequence[str], categorical: Collection[str] = ()) -> dict[str, pa.DataType]:
    """How a CSV's feature columns are read: numbers, and a categorical feature's as text
    (an empty cell is the empty string, which the graph codes as unknown, like a missing value)."""
    return {f: pa.string() if f in categorical else pa.float64() for f in features}


def read_upload(body: bytes, fmt: str, features: Sequence[str], *, max_rows: int,
                max_decoded_bytes: int, categorical: Collection[str] = ()) -> pa.Table:
    """A file sent to be scored at once (``POST /batch/score``, named ``body`` in errors) as a
    table of its feature columns. What is too large is refused before it is decoded: a Parquet
    file's rows and decoded bytes as its footer declares them (a file of a megabyte can declare
    gigabytes), a CSV's rows as they are read (its decoded size is a few times its text's)."""
    if fmt == "parquet":
        pfile = open_parquet(body, "body")
        check_present(pfile.schema_arrow.names, features, (), "body")
        check_feature_types(pfile.schema_arrow, features, "body", categorical)
        rows, sizes = parquet_sizes(pfile, features, "body")
        if rows > max_rows:
            raise BatchInputError(f"body: the file has {rows} rows (as its footer declares), more than {max_rows} "
                                  "for synchronous scoring (MODELLOOP_SERVING_SYNC_BATCH_MAX_ROWS); submit it "
                                  "to POST /batch/jobs", code="too_many_rows")
        if sum(sizes) > max_decoded_bytes:
            raise BatchInputError(f"body: the feature columns decode to {sum(sizes)} bytes (as the file's footer "
                                  f"declares), more than {max_decoded_bytes} for synchronous scoring "
                                  "(MODELLOOP_SERVING_SYNC_BATCH_MAX_DECODED_BYTES); submit it to POST /batch/jobs",
                                  code="too_large")
        try:  # one column at a time: a page's buffer is what its header says, and headers can lie
            return pfile.read(columns=list(features), use_threads=False)
        except (pa.ArrowException, OSError) as exc:
            raise BatchInputError(f"body: cannot read parquet: {exc}", code="malformed_body") from None
    names = csv_header(body[:CSV_BLOCK_BYTES], "body")
    check_present(names, features, (), "body")
    batches, rows = [], 0
    try:
        reader = pacsv.open_csv(pa.BufferReader(body), read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                                convert_options=pacsv.ConvertOptions(
                                    include_columns=list(features),
                                    column_types=column_types(features, categorical)))
        for batch in reader:
            rows += batch.num_rows
            if rows > max_rows:
                raise BatchInputError(f"body: more than {max_rows} rows for synchronous scoring "
                                      "(MODELLOOP_SERVING_SYNC_BATCH_MAX_ROWS); submit it to POST /batch/jobs",
                                      code="too_many_rows")
            batches.append(batch)
    except pa.ArrowException as exc:
        raise _csv_error("body", str(exc), names) from None
    return pa.Table.from_batches(batches, reader.schema)


def _csv_error(source: str, message: str, columns: Sequence[str]) -> BatchInputError:
    """pyarrow says "In CSV column #2: ..." (an index into the file's columns); say which
    column that is. A value that is not a number is ``wrong_type``, anything else unreadable."""
    found = re.match(r"In CSV column #(\d+): (.*)", message, re.S)
    if found and int(found.group(1)) < len(columns):
        name = columns[int(found.group(1))]
        return BatchInputError(f"{source}: column {name!r}: {found.group(2)}".replace("\n", " "),
                               code="wrong_type", column=name)
    return BatchInputError(f"{source}: cannot read csv: {message}".replace("\n", " "), code="malformed_body")


def file_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise BatchInputError(f"{path}: unknown file type {path.suffix!r}; use .csv or .parquet")
    return fmt


class _CountingReader(io.RawIOBase):
    """A file that counts the bytes read (progress of a CSV of unknown row count)."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.raw.readinto(buffer)
        self.count += n or 0
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


def _rechunk(batches: Iterator[pa.RecordBatch], chunk_rows: int) -> Iterator[pa.Table]:
    """Exactly chunk_rows rows per table (the last may be shorter): chunk k means the same rows
    on every run, which resuming relies on."""
    pending: list[pa.RecordBatch] = []
    rows = 0
    for batch in batches:
        pending.append(batch)
        rows += batch.num_rows
        while rows >= chunk_rows:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, chunk_rows)
            rest = table.slice(chunk_rows)
            pending = rest.to_batches()
            rows = rest.num_rows
    if rows:
        yield pa.Table.from_batches(pending)


def _parquet_batches(pfile: pq.ParquetFile, columns: list[str], chunk_rows: int) -> Iterator[pa.RecordBatch]:
    """The file's rows in order. A row group of up to 4 chunks is read whole (its column chunks
    decoded in parallel: twice the speed of the batch iterator here); a larger one is streamed
    ``chunk_rows`` at a time, so memory stays bounded by a few chunks either way."""
    for i in range(pfile.num_row_groups):
        if pfile.metadata.row_group(i).num_rows <= 4 * chunk_rows:
            yield from pfile.read_row_group(i, columns=columns).to_batches()
        else:
            yield from pfile.iter_batches(batch_size=chunk_rows, row_groups=[i], columns=columns)


def warm_arrow_numpy_bridge() -> None:
    """pyarrow imports pandas at its first numpy conversion (0.2-0.3 s); start that import on
    a thread now, so it overlaps the model's load instead of stalling the first chunk (nobody
    joins it: the import lock makes a later user wait for the import to finish)."""
    import threading

    def touch() -> None:
        pa.array(np.zeros(1, np.float32))

    threading.Thread(target=touch, name="arrow-warm-up", daemon=True).start()


@dataclass
class InputFile:
    """A CSV or Parquet input: its columns, size, and a chunk iterator."""

    path: Path
    fmt: str
    columns: list[str]
    total_rows: int | None  # known for Parquet
    size: int
    _reader: _CountingReader | None = field(default=None, repr=False)
    _parquet: pq.ParquetFile | None = field(default=None, repr=False)

    @classmethod
    def open(cls, path: Path) -> InputFile:
        """The file's columns (a Parquet footer or a CSV header; no data decoded), refusing
        duplicate column names, names that are not UTF-8 and an oversized Parquet footer."""
        fmt = file_format(path)
        if not path.is_file():
            raise BatchInputError(f"{path}: no such file")
        size = path.stat().st_size
        if fmt == "parquet":
            pfile = open_parquet(path, str(path))
            return cls(path, fmt, pfile.schema_arrow.names, pfile.metadata.num_rows, size, _parquet=pfile)
        try:
            with open(path, "rb") as f:
                head = f.read(CSV_BLOCK_BYTES)
        except OSError as exc:
            raise BatchInputError(f"{path}: cannot read csv: {exc}", code="malformed_body") from exc
        return cls(path, fmt, csv_header(head, str(path)), None, size)

    def check_parquet(self, features: Sequence[str], max_row_group_bytes: int | None,
                      categorical: Collection[str] = ()) -> None:
        """Before decoding a Parquet file: its feature columns hold numbers, and no row group
        decodes to more than ``max_row_group_bytes`` as the footer declares (row groups are
        decoded one at a time). A no-op for a CSV, whose features are read as numbers."""
        if self._parquet is None:
            return
        check_feature_types(self._parquet.schema_arrow, features, str(self.path), categorical)
        if max_row_group_bytes is None:
            return
        _, sizes = parquet_sizes(self._parquet, features, str(self.path))
        for g, size in enumerate(sizes):
            if size > max_row_group_bytes:
                raise BatchInputError(f"{self.path}: row group {g} decodes to {size} bytes in the feature columns "
                                      f"(as the footer declares), more than the limit of {max_row_group_bytes}; "
                                      "write the file with smaller row groups", code="too_large")

    def consumed(self, rows_read: int) -> int:
        """Progress in the input's unit: rows for Parquet, bytes for CSV."""
        return rows_read if self.fmt == "parquet" else (self._reader.count if self._reader else 0)

    def chunks(self, columns: Sequence[str], chunk_rows: int, features: Sequence[str],
               categorical: Collection[str] = ()) -> Iterator[pa.Table]:
        try:
            if self.fmt == "parquet":
                yield from _rechunk(_parquet_batches(pq.ParquetFile(self.path, pre_buffer=True), list(columns),
                                                     chunk_rows), chunk_rows)
                return
            self._reader = _CountingReader(open(self.path, "rb", buffering=0))  # noqa: SIM115 - closed below
            try:
                reader = pacsv.open_csv(
                    io.BufferedReader(self._reader, 1 << 20),
                    read_options=pacsv.ReadOptions(block_size=1 << 22),
                    convert_options=pacsv.ConvertOptions(
                        include_columns=list(columns),
                        column_types=column_types(features, categorical),
                    ),
                )
                yield from _rechunk(iter(reader), chunk_rows)
            finally:
                self._reader.close()
        except pa.ArrowException as exc:
            raise _csv_error(str(self.path), str(exc), self.columns) from exc


def features_of(table: pa.Table, features: Sequence[str], *, source: str, first_row: int,
                nan_policy: NanPolicy, categorical: Collection[str] = ()) -> np.ndarray:
    """The feature columns as float32 ``[rows, features]``, checked like a /predict request
    (float64 values are rounded to float32 exactly as a JSON number is); with ``categorical``
    features, the object rows of modelloop/categorical.py (their strings beside the numbers)."""
    check_feature_types(table.schema, features, source, categorical)
    if categorical:
        return _categorical_features(table, features, categorical, source=source, first_row=first_row,
                                     nan_policy=nan_policy)
    columns = [table.column(name).to_numpy(zero_copy_only=False) for name in features]  # nulls become NaN
    # each column cast straight into its place in the rows: 2.7 ms for 65536 x 30, against
    # 3.7 ms for np.stack and 7 ms for a column-major matrix transposed
    x = np.empty((table.num_rows, len(features)), np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # beyond float32 becomes inf, reported below
        for j, column in enumerate(columns):
            x[:, j] = column
    inf = np.isinf(x)
    if inf.any():
        r, c = (int(v) for v in np.argwhere(inf)[0])
        value = table.column(features[c])[r].as_py()
        raise BatchInputError(f"{source}: row {first_row + r}, column {features[c]!r}: value "
                              f"{value!r} is not a finite float32 number", code="not_finite", column=features[c])
    if nan_policy == "reject":
        missing = np.isnan(x)
        if missing.any():
            r, c = (int(v) for v in np.argwhere(missing)[0])
            raise BatchInputError(f"{source}: row {first_row + r}, column {features[c]!r}: missing "
                                  "value is not allowed (nan_policy=reject)", code="missing_value",
                                  column=features[c])
    return x


def _categorical_features(table: pa.Table, features: Sequence[str], categorical: Collection[str], *,
                          source: str, first_row: int, nan_policy: NanPolicy) -> np.ndarray:
    """:func:`features_of` for a model with categorical features: the numeric columns checked and
    rounded as there, the categorical ones as strings (None missing)."""
    numeric = [f for f in features if f not in categorical]
    out = np.empty((table.num_rows, len(features)), dtype=object)
    if numeric:
        x = features_of(table.select(numeric), numeric, source=source, first_row=first_row, nan_policy=nan_policy)
        out[:, [features.index(f) for f in numeric]] = x  # float32 values, as Python floats
    for j, name in enumerate(features):
        if name not in categorical:
            continue
        column = table.column(name)
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        if pa.types.is_null(column.type) or pa.types.is_integer(column.type):  # (nothing but nulls; 3 -> "3")
            column = column.cast(pa.string())
        if nan_policy == "reject" and column.null_count:
            r = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise BatchInputError(f"{source}: row {first_row + r}, column {name!r}: missing value is not "
                                  "allowed (nan_policy=reject)", code="missing_value", column=name)
        _check_utf8(column, name, source=source, first_row=first_row)
        values = column.to_pylist()
        # what no event may carry (serving/validation.py): looked for by pyarrow, found in Python
        longest = pc.max(pc.utf8_length(column)).as_py() if len(column) else None
        if (longest or 0) > MAX_CATEGORY_CHARS or pc.any(pc.match_substring(column, "\x00")).as_py():
            r, problem = next((r, p) for r, v in enumerate(values) if v is not None and (p := category_problem(v)))
            raise BatchInputError(f"{source}: row {first_row + r}, column {name!r}: {problem[1]}",
                                  code=problem[0], column=name)
        out[:, j] = values
    return out


def _check_utf8(column: pa.ChunkedArray, name: str, *, source: str, first_row: int) -> None:
    """A string column holds UTF-8 text: Parquet's reader does not check it (CSV's does), and
    a value that is not UTF-8 cannot become a Python string; else the error naming the first row
    and the column."""
    try:
        column.validate(full=True)
    except pa.ArrowInvalid:
        raw = column.cast(pa.large_binary()).to_pylist()
        r = next(r for r, v in enumerate(raw) if v is not None and not _decodes(v))
        raise BatchInputError(f"{source}: row {first_row + r}, column {name!r}: not UTF-8 text",
                              code="wrong_type", column=name) from None


def _decodes(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def reuse_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed chunk buffers for reuse instead of returning each to
    the kernel (buffers over 128 KiB are mmapped and unmapped per allocation by default): every
    chunk then page-faults its megabytes anew, which cost a one-off ``batch score`` process a
    third of its scoring time in system time here. Memory stays bounded (a chunk's buffers are
    reused for the next); a no-op where the C library is not glibc. True when applied."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30) and mallopt(m_trim_threshold, 1 << 30))


def check_scorable(runtime: OnnxRuntime, source: str) -> None:
    """Batch scoring reads rows of features (an image model's pixels too); a sequence model's
    input has a time axis that a row of a table cannot hold."""
    if not runtime.takes_rows:
        raise BatchInputError(
            f"{source}: {runtime.name} v{runtime.model_version} takes sequences "
            f"[rows, steps, {runtime.n_features}], and batch scoring reads one row of features "
            "per prediction; send sequences to /predict or /v2/models/{name}/infer")


def score_table(runtime: OnnxRuntime, table: pa.Table, *, source: str, first_row: int = 0,
                nan_policy: NanPolicy = "allow", keep: Sequence[str] = (),
                x: np.ndarray | None = None) -> tuple[pa.Table, np.ndarray]:
    """Score one table; returns the output table (kept columns, then predictions) and its
    features (``x``, when given, are the table's features already extracted). Callers check
    :func:`check_scorable` once, before the first table."""
    if x is None:
        x = features_of(table, runtime.metadata.feature_names, source=source, first_row=first_row,
                        nan_policy=nan_policy, categorical=runtime.metadata.categories)
    preds = interpret(runtime.metadata, runtime.predict(x))
    out = {name: table.column(name) for name in keep}
    out.update({k: v if isinstance(v, pa.Array) else pa.array(v) for k, v in to_columns(preds).items()})
    return pa.table(out), x


def check_columns(src: InputFile, features: Sequence[str], keep: Sequence[str]) -> None:
    """Every feature (and kept) column must be in the file; the error names the first few missing."""
    check_present(src.columns, features, keep, str(src.path))


def check_present(columns: Sequence[str], features: Sequence[str], keep: Sequence[str], source: str) -> None:
    """:func:`check_columns` for a list of column names."""
    present = set(columns)
    missing = [c for c in [*features, *keep] if c not in present]
    if missing:
        shown = ", ".join(map(repr, missing[:5])) + (f", ... ({len(missing)} missing)" if len(missing) > 5 else "")
        raise BatchInputError(f"{source}: missing column(s) {shown}; the model needs "
                              f"{len(features)} features: {', '.join(features[:6])}, ...",
                              code="missing_feature", column=missing[0])


@dataclass
class Manifest:
    """What a partial run was doing; a resumed run must match it."""

    input: str
    input_size: int
    input_mtime_ns: int
    model: str
    version: int
    chunk_rows: int
    keep: list[str]

    @classmethod
    def read(cls, parts: Path) -> Manifest | None:
        try:
            return cls(**json.loads((parts / "manifest.json").read_text()))
        except (FileNotFoundError, TypeError, ValueError):
            return None

    def write(self, parts: Path) -> None:
        tmp = parts / "manifest.json.tmp"
        tmp.write_text(json.dumps(asdict(self)))
        os.replace(tmp, parts / "manifest.json")


def parts_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def manifest_for(input_path: Path, model: str, version: int, chunk_rows: int, keep: Sequence[str]) -> Manifest:
    st = input_path.stat()
    return Manifest(str(input_path.resolve()), st.st_size, st.st_mtime_ns, model, version, chunk_rows, list(keep))


def resumable_version(input_path: Path, output: Path, model: str, chunk_rows: int, keep: Sequence[str]) -> int | None:
    """The model version of an interrupted run of the same job, if there is one to resume."""
    old = Manifest.read(parts_dir(output))
    if old is None or not input_path.is_file():
        return None
    probe = manifest_for(input_path, model, old.version, chunk_rows, keep)
    return old.version if old == probe else None


@dataclass
class ScoreReport:
    input: str
    output: str
    model: str
    version: int
    rows: int
    chunks: int
    resumed_chunks: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def score_file(input_path: Path, output: Path, runtime: OnnxRuntime, *, chunk_rows: int = 65536,
               nan_policy: NanPolicy = "allow", keep: Sequence[str] = (), progress: Progress | None = None,
               on_chunk: Callable[[pa.Table, np.ndarray, int], None] | None = None,
               max_row_group_bytes: int | None = None) -> ScoreReport:
    """Score ``input_path`` into ``output`` chunk by chunk, resuming a matching interrupted run.

    ``on_chunk(scored, features, first_row)`` is called after each newly scored chunk;
    ``max_row_group_bytes`` refuses a Parquet file whose footer declares a row group that large
    (see :meth:`InputFile.check_parquet`), before anything is decoded."""
    start = time.perf_counter()
    out_fmt = file_format(output)
    check_scorable(runtime, str(input_path))
    src = InputFile.open(input_path)
    features = runtime.metadata.feature_names
    categorical = runtime.metadata.categories
    check_columns(src, features, keep)
    src.check_parquet(features, max_row_group_bytes, categorical)
    parts = parts_dir(output)
    manifest = manifest_for(input_path, runtime.name, runtime.model_version, chunk_rows, keep)
    if Manifest.read(parts) != manifest:
        if parts.exists():
            logger.warning("%s: discarding parts of a different earlier run", parts)
            shutil.rmtree(parts)
        parts.mkdir(parents=True)
        manifest.write(parts)
    done = {p.name for p in parts.glob("part-*.arrow")}
    if done:
        logger.info("resuming %s: %d chunks already scored", output, len(done))
    columns = list(dict.fromkeys([*features, *keep]))
    rows = chunks = resumed = 0
    sink = _Output(output, out_fmt, parts)

    def prepared() -> Iterator[tuple[pa.Table, np.ndarray | None]]:
        for k, table in enumerate(src.chunks(columns, chunk_rows, features, categorical)):
            if f"part-{k:06d}.arrow" in done:
                yield table, None
            else:
                yield table, features_of(table, features, source=str(input_path),
                                         first_row=k * chunk_rows, nan_policy=nan_policy, categorical=categorical)

    reader = prepared()

    # A three-stage pipeline: the next chunk is read, decoded and turned into a feature matrix,
    # and the previous one written, on threads while this chunk runs through ONNX Runtime
    # (pyarrow, numpy and ONNX Runtime release the GIL). At most one chunk is read ahead and one
    # write pending, so memory stays bounded, and writes happen in chunk order.
    try:
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="batch-io") as pool:
            pending_read = pool.submit(next, reader, None)
            pending_write: Future[None] | None = None
            while (item := pending_read.result()) is not None:
                table, x = item
                pending_read = pool.submit(next, reader, None)
                name = f"part-{chunks:06d}.arrow"
                first_row = chunks * chunk_rows
                scored: pa.Table | None = None
                if name in done:
                    resumed += 1
                else:
                    scored, x = score_table(runtime, table, source=str(input_path), first_row=first_row,
                                            nan_policy=nan_policy, keep=keep, x=x)
                if pending_write is not None:
                    pending_write.result()
                pending_write = pool.submit(sink.write, name, scored)
                if scored is not None and x is not None and on_chunk is not None:
                    on_chunk(scored, x, first_row)
                rows += table.num_rows
                chunks += 1
                if progress is not None:
                    progress(rows, src.consumed(rows))
            if pending_write is not None:
                pending_write.result()
        sink.commit()
    finally:
        sink.close()
    shutil.rmtree(parts)
    return ScoreReport(str(input_path), str(output), runtime.name, runtime.model_version, rows,
                       chunks, resumed, time.perf_counter() - start)


class _Output:
    """The output file, written in chunk order while scoring, plus the part files that make an
    interrupted run resumable.

    Each newly scored chunk goes to its part file (the checkpoint: written, then renamed) and is
    appended to ``.OUT.tmp``; a chunk an earlier run scored is read back from its part. OUT appears
    by rename only when every chunk is in, so an interrupted run never leaves a partial OUT.
    """

    def __init__(self, output: Path, fmt: str, parts: Path) -> None:
        self.output = output
        self.fmt = fmt
        self.parts = parts
        self.tmp = output.with_name(f".{output.name}.tmp")
        self._writer: Any = None

    def write(self, name: str, scored: pa.Table | None) -> None:
        if scored is None:  # resumed: scored by an earlier run
            with pa.memory_map(str(self.parts / name)) as source:
                scored = pa.ipc.open_file(source).read_all()
        else:
            # Arrow IPC, uncompressed: a checkpoint costs little more than a memory copy
            tmp = self.parts / f".{name}.tmp"
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, scored.schema) as writer:
                writer.write_table(scored)
            os.replace(tmp, self.parts / name)
        if self._writer is None:
            # dictionary pages for every column but the floats (probabilities, scores): those
            # rarely repeat, and trying them costs more than half of the Parquet write
            dictionary = [f.name for f in scored.schema if not pa.types.is_floating(f.type)]
            self._writer = (pq.ParquetWriter(self.tmp, scored.schema, use_dictionary=dictionary)
                            if self.fmt == "parquet" else pacsv.CSVWriter(self.tmp, scored.schema))
        self._writer.write_table(scored)

    def commit(self) -> None:
        self.close()
        if not self.tmp.exists():  # an empty input gives an empty output
            self.tmp.write_bytes(b"")
        os.replace(self.tmp, self.output)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
