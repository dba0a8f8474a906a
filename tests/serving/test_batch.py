"""Batch file scoring in-process: results, formats, resumption after a failure, bad files."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import serving.jobs
from modelloop.registry import Registry
from modelloop.synthetic import SyntheticTask
from serving.batch import BatchInputError, features_of, parts_dir, resumable_version, score_file
from serving.jobs import JobLimits, JobStore
from serving.runtime import OnnxRuntime
from serving.validation import RequestError
from tests.serving.conftest import wait_until
from tests.serving.onnx_models import register_mlp

FEATURES = [f"f{i:02d}" for i in range(6)]


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> OnnxRuntime:
    reg = Registry(tmp_path_factory.mktemp("reg"))
    register_mlp(reg, "m", n_features=6, n_classes=3)
    return OnnxRuntime(reg.get("m"), provider="cpu", threads=1).load()


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    df = SyntheticTask(n_features=6, n_informative=6, n_classes=3).sample(2500, seed=4, missing=0.03)
    df.insert(0, "id", [f"row{i}" for i in range(len(df))])
    return df


def expected(runtime: OnnxRuntime, df: pd.DataFrame) -> np.ndarray:
    return runtime.predict(df[FEATURES].to_numpy(np.float32))["probabilities"]


@pytest.mark.parametrize(("src", "dst"), [("csv", "parquet"), ("parquet", "csv"), ("parquet", "parquet")])
def test_scores_every_row_like_the_runtime(runtime: OnnxRuntime, frame: pd.DataFrame, tmp_path: Path,
                                           src: str, dst: str) -> None:
    inp, out = tmp_path / f"in.{src}", tmp_path / f"out.{dst}"
    frame.to_csv(inp, index=False) if src == "csv" else frame.to_parquet(inp, index=False)
    report = score_file(inp, out, runtime, chunk_rows=700, keep=["id"])
    assert (report.rows, report.chunks, report.resumed_chunks) == (2500, 4, 0)
    got = pd.read_parquet(out) if dst == "parquet" else pd.read_csv(out)
    proba = expected(runtime, frame)
    assert list(got.columns) == ["id", "prediction", "label", "probability_class_0",
                                 "probability_class_1", "probability_class_2"]
    assert got["id"].tolist() == frame["id"].tolist()
    assert got["prediction"].tolist() == proba.argmax(1).tolist()
    assert got["label"].tolist() == [f"class_{k}" for k in proba.argmax(1)]
    probs = got[[f"probability_class_{k}" for k in range(3)]].to_numpy(np.float32)
    np.testing.assert_array_equal(probs, proba)  # float32 survives CSV text exactly
    assert not parts_dir(out).exists()


def test_resumes_after_an_interruption_with_the_same_result(runtime: OnnxRuntime, frame: pd.DataFrame,
                                                            tmp_path: Path) -> None:
    inp, out, ref = tmp_path / "in.parquet", tmp_path / "out.parquet", tmp_path / "ref.parquet"
    frame.to_parquet(inp, index=False)
    score_file(inp, ref, runtime, chunk_rows=300)

    def crash_after_three(scored: object, x: object, first_row: int) -> None:
        if first_row == 600:
            raise KeyboardInterrupt  # like Ctrl-C after the third chunk was written

    with pytest.raises(KeyboardInterrupt):
        score_file(inp, out, runtime, chunk_rows=300, on_chunk=crash_after_three)
    assert not out.exists() and len(list(parts_dir(out).glob("part-*.arrow"))) == 3
    assert resumable_version(inp, out, "m", 300, []) == runtime.model_version
    report = score_file(inp, out, runtime, chunk_rows=300)
    assert (report.rows, report.chunks, report.resumed_chunks) == (2500, 9, 3)
    pd.testing.assert_frame_equal(pd.read_parquet(out), pd.read_parquet(ref))


def test_a_different_job_does_not_reuse_old_parts(runtime: OnnxRuntime, frame: pd.DataFrame, tmp_path: Path) -> None:
    inp, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    frame.to_parquet(inp, index=False)
    with pytest.raises(KeyboardInterrupt):
        score_file(inp, out, runtime, chunk_rows=300,
                   on_chunk=lambda s, x, first: (_ for _ in ()).throw(KeyboardInterrupt))
    assert resumable_version(inp, out, "m", 500, []) is None  # another chunk size: start over
    report = score_file(inp, out, runtime, chunk_rows=500)
    assert report.resumed_chunks == 0 and report.rows == 2500


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


HEADER = ",".join(FEATURES)
ONE = ",".join(["1.5"] * 6)

BAD_FILES = [
    # (case, file name, content, nan_policy, error message)
    ("unknown extension", "in.txt", HEADER + "\n" + ONE + "\n", "allow", "unknown file type '.txt'"),
    ("missing column", "in.csv", ",".join(FEATURES[:5]) + "\n1,2,3,4,5\n", "allow", "missing column(s) 'f05'"),
    ("text in a feature", "in.csv", HEADER + "\n" + ONE + "\n1,2,x,4,5,6\n", "allow", "column 'f02': CSV conversion error to double: invalid value 'x'"),
    ("infinite value", "in.csv", HEADER + "\n" + ONE + "\n1,2,3,inf,5,6\n", "allow", "row 1, column 'f03'"),
    ("float32 overflow", "in.csv", HEADER + "\n1e39,2,3,4,5,6\n", "allow", "row 0, column 'f00'"),
    ("empty cell under reject", "in.csv", HEADER + "\n" + ONE + "\n1,2,3,4,,6\n", "reject", "row 1, column 'f04': missing value"),
    # a column named twice: which one is the feature? (pyarrow's KeyError escaped before)
    ("duplicate column", "in.csv", HEADER + ",f02\n" + ONE + ",1\n", "allow", "column 'f02' appears twice (columns 3 and 7)"),
    ("UTF-16", "in.csv", (HEADER + "\n" + ONE + "\n").encode("utf-16"), "allow", "is UTF-16 or UTF-32 text"),
    ("header not UTF-8", "in.csv", (HEADER + ",\xe9t\xe9\n" + ONE + ",1\n").encode("latin-1"), "allow",
     "column 7 of the header ('\ufffdt\ufffd') is not UTF-8 text"),
    ("empty CSV", "in.csv", b"", "allow", "the CSV is empty"),
    # a header beyond pyarrow's block: cut at the block, its last name would be a wrong one
    ("header of 5 MB", "in.csv", HEADER + "," + ",".join(f"x{i}" for i in range(700_000)) + "\n", "allow",
     "the CSV header is longer than 4194304 bytes"),
    ("not Parquet", "in.parquet", b"PAR1 nothing else", "allow", "cannot read parquet"),
    # a footer of 100 MB declared in the last 8 bytes: its metadata would take about ten times that
    ("huge footer", "in.parquet", b"PAR1" + (100 << 20).to_bytes(4, "little") + b"PAR1", "allow",
     "the Parquet footer is 104857600 bytes"),
]


@pytest.mark.parametrize(("case", "name", "content", "policy", "message"), BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_files_fail_with_one_line_naming_file_and_column(runtime: OnnxRuntime, tmp_path: Path, case: str,
                                                            name: str, content: str, policy: str,
                                                            message: str) -> None:
    inp = _write(tmp_path / name, content)
    with pytest.raises(BatchInputError) as info:
        score_file(inp, tmp_path / "out.csv", runtime, chunk_rows=100, nan_policy=policy)
    text = str(info.value)
    assert message in text and str(inp) in text and "\n" not in text.strip()


def test_a_parquet_file_is_refused_from_its_footer_before_decoding(runtime: OnnxRuntime, tmp_path: Path) -> None:
    """A job decodes a row group at a time; one beyond the limit (as the footer declares) fails
    naming it, and a feature column that does not hold numbers fails from the schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({f: pa.array(np.zeros(50_000)) for f in FEATURES})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=10_000)  # 6 x 80 KB a row group
    with pytest.raises(BatchInputError) as info:
        score_file(tmp_path / "in.parquet", tmp_path / "out.csv", runtime, max_row_group_bytes=400_000)
    assert info.value.code == "too_large"
    assert "row group 0 decodes to 480000 bytes in the feature columns (as the footer declares)" in str(info.value)
    assert score_file(tmp_path / "in.parquet", tmp_path / "out.csv", runtime, max_row_group_bytes=480_000).rows == 50_000
    pq.write_table(table.set_column(2, "f02", pa.array(["x"] * 50_000)), tmp_path / "text.parquet")
    with pytest.raises(BatchInputError) as info:
        score_file(tmp_path / "text.parquet", tmp_path / "out.csv", runtime)
    assert (info.value.code, info.value.column) == ("wrong_type", "f02")


def test_feature_columns_of_any_numeric_type_become_float32_rows() -> None:
    """Integers (with a null), float64 (rounded as a JSON number would be), float32 and a column
    in several chunks: each value lands in its row and column as float32, a null as NaN."""
    import pyarrow as pa

    table = pa.table({
        "a": pa.array([1, None, -3], pa.int64()),
        "b": pa.array([0.1, 1e30, -2.5], pa.float64()),
        "c": pa.array([7, 8, 9], pa.uint8()),
        "d": pa.chunked_array([pa.array([0.5], pa.float32()), pa.array([1.5, 2.5], pa.float32())]),
    })
    x = features_of(table, ["d", "a", "b", "c"], source="in.parquet", first_row=0, nan_policy="allow")
    want = np.array([[0.5, 1, 0.1, 7], [1.5, np.nan, 1e30, 8], [2.5, -3, -2.5, 9]], np.float32)
    assert x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_array_equal(x, want)


def test_missing_input_file(runtime: OnnxRuntime, tmp_path: Path) -> None:
    with pytest.raises(BatchInputError, match="no such file"):
        score_file(tmp_path / "nope.csv", tmp_path / "out.csv", runtime)


def test_empty_cells_are_imputed_under_allow(runtime: OnnxRuntime, tmp_path: Path) -> None:
    inp = _write(tmp_path / "in.csv", HEADER + "\n1,2,3,4,,6\n")
    score_file(inp, tmp_path / "out.parquet", runtime)
    x = np.array([[1, 2, 3, 4, np.nan, 6]], np.float32)
    np.testing.assert_array_equal(
        pd.read_parquet(tmp_path / "out.parquet")[[f"probability_class_{k}" for k in range(3)]].to_numpy(np.float32),
        runtime.predict(x)["probabilities"])


def test_finished_jobs_are_deleted_after_the_retention(runtime: OnnxRuntime, frame: pd.DataFrame, tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs", chunk_rows=1000, nan_policy="allow", max_upload_bytes=10**8, retention_s=60)
    old = tmp_path / "jobs" / ("a" * 24)
    old.mkdir(parents=True)
    (old / "status.json").write_text(json.dumps({"state": "succeeded", "finished_at": time.time() - 61}))
    recent = tmp_path / "jobs" / ("b" * 24)
    recent.mkdir()
    (recent / "status.json").write_text(json.dumps({"state": "succeeded", "finished_at": time.time() - 5}))

    async def upload() -> dict[str, object]:
        async def body():  # type: ignore[no-untyped-def]
            yield frame.head(10).to_csv(index=False).encode()

        return await store.submit("csv", body(), runtime)

    status = asyncio.run(upload())
    assert not old.exists() and recent.exists()
    store.close()
    assert status["state"] == "queued"


# -- job quotas ------------------------------------------------------------------------------------
def _store(root: Path, **kw: Any) -> JobStore:
    return JobStore(root, chunk_rows=1000, nan_policy="allow", max_upload_bytes=10**8, **kw)


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def test_job_quotas_refuse_with_the_right_status(runtime: OnnxRuntime, frame: pd.DataFrame, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(tmp_path / "jobs")
    csv = frame.head(10).to_csv(index=False).encode()
    limits = JobLimits(max_active=1, max_disk_bytes=10_000)

    def submit(*parts: bytes, declared: int | None = None, lim: JobLimits = limits) -> dict[str, Any]:
        return asyncio.run(store.submit("csv", _chunks(*parts), runtime, limits=lim, declared_bytes=declared))

    def refusal(*parts: bytes, declared: int | None = None, lim: JobLimits = limits) -> RequestError:
        with pytest.raises(RequestError) as info:
            submit(*parts, declared=declared, lim=lim)
        return info.value

    first = submit(csv)["job_id"]
    # one job at work (queued or running: this process is alive) fills the quota of 1
    err = refusal(csv)
    assert (err.status, err.code, err.headers) == (429, "too_many_jobs", {"Retry-After": "30"})
    with pytest.raises(RequestError, match=r"is (queued|running); delete it once"):
        store.delete(first)
    wait_until(lambda: store.status(first)["state"] == "succeeded", 30, "the job")
    # a body larger than the whole quota: 413; one that does not fit beside what is kept: 507
    err = refusal(csv, declared=20_000)
    assert (err.status, err.code) == (413, "body_too_large") and "disk quota of 10000" in err.message
    err = refusal(csv, declared=9_500)  # beside the first job's result (537 bytes) and status
    assert (err.status, err.code) == (507, "storage_full")
    assert err.headers is not None and 86_000 < int(err.headers["Retry-After"]) <= 86_400  # when `first` expires
    # an upload without a length is measured as it arrives and cut off when it fills the quota
    monkeypatch.setattr(serving.jobs, "RECHECK_BYTES", 4096)
    err = refusal(*[b"x" * 4096] * 5, lim=JobLimits(max_active=5, max_disk_bytes=12_000))
    assert (err.status, err.code) == (507, "storage_full") and "this upload filled" in err.message
    assert len(list((tmp_path / "jobs").iterdir())) == 2  # the lock and `first`: the cut upload is gone
    assert store.delete(first) == {"job_id": first, "deleted": True}
    assert submit(csv)["state"] == "queued"
    store.close()


def test_lost_and_statusless_jobs_are_swept_after_the_retention(runtime: OnnxRuntime, frame: pd.DataFrame,
                                                                tmp_path: Path) -> None:
    """A job whose worker died never finishes; its files must not hold the disk quota for good."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    root = tmp_path / "jobs"
    now = time.time()
    jobs = {  # id: (pid, created)
        "a" * 24: (int(dead.stdout), now - 120),  # lost, and older than the retention: deleted
        "b" * 24: (int(dead.stdout), now - 5),    # lost, recent: kept (its status says why)
        "c" * 24: (os.getpid(), now - 120),       # running for long: kept
    }
    for job, (pid, created) in jobs.items():
        (root / job).mkdir(parents=True)
        (root / job / "status.json").write_text(json.dumps({"state": "running", "pid": pid, "created_at": created,
                                                            "finished_at": None}))
    (root / ("d" * 24)).mkdir()  # no status, old: deleted
    os.utime(root / ("d" * 24), (now - 120, now - 120))
    store = _store(root, retention_s=60)
    asyncio.run(store.submit("csv", _chunks(frame.head(3).to_csv(index=False).encode()), runtime))
    left = {p.name for p in root.iterdir() if p.is_dir()}
    assert {"b" * 24, "c" * 24} <= left and not {"a" * 24, "d" * 24} & left
    store.close()
