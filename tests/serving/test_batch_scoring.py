"""Batch scoring against the real server: `modelloop batch score` (equal to /predict, resumable
after being killed), the synchronous /batch/score route and the /batch/jobs API."""

from __future__ import annotations

import io
import os
import signal
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from modelloop.registry import Registry
from modelloop.synthetic import SyntheticTask
from serving.batch import parts_dir
from serving.runtime import OnnxRuntime
from tests.serving.conftest import FEATURES, MODEL, MODELLOOP, Server, Sidecar, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("show_log_on_failure")]
PROBA = [f"probability_class_{k}" for k in range(3)]


def frame(n: int, seed: int = 21) -> pd.DataFrame:
    df = SyntheticTask(n_features=20, n_classes=3).sample(n, seed=seed).drop(columns="target")
    df.insert(0, "id", np.arange(n))
    return df


def predict_all(client: httpx.Client, df: pd.DataFrame) -> pd.DataFrame:
    """The same rows through POST /predict, 500 rows a request (the server's limit)."""
    out = []
    for start in range(0, len(df), 500):
        rows = df[FEATURES].iloc[start:start + 500].to_numpy(np.float32).tolist()
        resp = client.post("/predict", json={"instances": rows})
        assert resp.status_code == 200, resp.text
        for p in resp.json()["predictions"]:
            out.append({"prediction": p["prediction"], "label": p["label"],
                        **{f"probability_{k}": v for k, v in p["probabilities"].items()}})
    return pd.DataFrame(out)


def assert_same(scored: pd.DataFrame, expected: pd.DataFrame) -> None:
    assert scored["prediction"].tolist() == expected["prediction"].tolist()
    assert scored["label"].tolist() == expected["label"].tolist()
    np.testing.assert_array_equal(scored[PROBA].to_numpy(np.float32), expected[PROBA].to_numpy(np.float32))


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELLOOP_")} | {"MODELLOOP_HOME": str(home)}
    return subprocess.run([MODELLOOP, "batch", "score", *args], env=env, capture_output=True, text=True, timeout=120)


def test_cli_scores_like_predict(main_home: Path, client: httpx.Client, tmp_path: Path) -> None:
    df = frame(2300)
    df.to_csv(tmp_path / "in.csv", index=False)
    done = cli(main_home, str(tmp_path / "in.csv"), str(tmp_path / "out.parquet"), "--name", MODEL,
               "--chunk-rows", "1000", "--keep", "id")
    assert done.returncode == 0, done.stderr
    assert f"scored 2300 rows of {tmp_path / 'in.csv'} with {MODEL} v1 on cpu into" in done.stderr
    scored = pd.read_parquet(tmp_path / "out.parquet")
    assert scored["id"].tolist() == list(range(2300))
    assert_same(scored, predict_all(client, df))


def test_cli_without_a_model_to_pick_says_to_pass_name(tmp_path: Path) -> None:
    frame(5).to_csv(tmp_path / "in.csv", index=False)
    done = cli(tmp_path / "empty-home", str(tmp_path / "in.csv"), str(tmp_path / "out.csv"))
    assert done.returncode != 0
    assert "no model is registered under" in done.stderr
    assert not (tmp_path / "out.csv").exists()


def test_cli_resumes_after_being_killed(main_home: Path, tmp_path: Path) -> None:
    df = frame(150_000, seed=3)
    src, out = tmp_path / "in.parquet", tmp_path / "out.csv"
    df.to_parquet(src, index=False, row_group_size=1000)
    env = {**os.environ, "MODELLOOP_HOME": str(main_home)}
    proc = subprocess.Popen([MODELLOOP, "batch", "score", str(src), str(out), "--chunk-rows", "500",
                             "--threads", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = parts_dir(out)
    wait_until(lambda: len(list(parts.glob("part-*.arrow"))) >= 5, 60, "the first chunks to be written",
               interval=0.005)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: the worst interruption
    proc.wait(10)
    written = len(list(parts.glob("part-*.arrow")))
    assert not out.exists() and 5 <= written < 300, "the run must be interrupted mid-way for this test"
    done = cli(main_home, str(src), str(out), "--chunk-rows", "500")
    assert done.returncode == 0, done.stderr
    assert "resuming the interrupted run" in done.stderr
    assert f"{written} of 300 chunks resumed" in done.stderr
    runtime = OnnxRuntime(Registry(main_home / "registry").get(MODEL), provider="cpu").load()
    proba = runtime.predict(df[FEATURES].to_numpy(np.float32))["probabilities"]
    scored = pd.read_csv(out)
    assert len(scored) == 150_000 and not parts.exists()
    np.testing.assert_array_equal(scored[PROBA].to_numpy(np.float32), proba)


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: d / "absent.csv", "absent.csv: no such file"),
    (lambda d: (d / "few.csv").write_text("f00,f01\n1,2\n") and d / "few.csv", "missing column(s) 'f02'"),
], ids=["missing file", "missing columns"])
def test_cli_bad_input_is_one_line_naming_the_file(main_home: Path, tmp_path: Path, make: object, message: str) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    done = cli(main_home, str(path), str(tmp_path / "out.csv"))
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], done.stderr


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_sync_batch_route_returns_the_scored_file(client: httpx.Client, fmt: str) -> None:
    df = frame(800, seed=5)
    buf = io.BytesIO()
    df.to_csv(buf, index=False) if fmt == "csv" else df.to_parquet(buf, index=False)
    ctype = "text/csv" if fmt == "csv" else "application/vnd.apache.parquet"
    resp = client.post("/batch/score", content=buf.getvalue(), headers={"Content-Type": ctype})
    assert resp.status_code == 200, resp.text
    scored = pd.read_csv(io.BytesIO(resp.content)) if fmt == "csv" else pd.read_parquet(io.BytesIO(resp.content))
    assert_same(scored, predict_all(client, df))


@pytest.mark.parametrize(("body", "ctype", "status", "code"), [
    ((",".join(FEATURES) + "\n" + "1,2,3,4,5,6,7,8,9,0,1,2,3,4,5,6,7,8,9,0\n" * 2001).encode(), "text/csv", 413,
     "too_many_rows"),
    (b"f00,f01\n1,2\n", "text/csv", 422, "missing_feature"),
    (b"id\n1\n", "application/json", 415, "unsupported_media_type"),
    (b"PAR1 broken", "application/vnd.apache.parquet", 400, "malformed_body"),
], ids=["too many rows", "missing feature", "unsupported type", "broken parquet"])
def test_sync_batch_route_rejects_bad_files(client: httpx.Client, body: bytes, ctype: str, status: int, code: str) -> None:
    resp = client.post("/batch/score", content=body, headers={"Content-Type": ctype})
    assert (resp.status_code, resp.json()["code"]) == (status, code), resp.text


HEADER = ",".join(FEATURES)
ONE_ROW = ",".join(["1.5"] * 20)


def parquet(table: pa.Table, **options: object) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, **options)
    return buf.getvalue()


def features_table(n: int, **extra: pa.Array) -> pa.Table:
    return pa.table({**{f: pa.array(np.full(n, 1.5)) for f in FEATURES}, **extra})


HOSTILE_FILES = [
    # (case, body, content type, status, code, field, message part)
    # a column name twice: pyarrow's table.column() raised KeyError (500)
    ("CSV feature named twice", (HEADER + ",f00\n" + ONE_ROW + ",2\n").encode(), "text/csv", 422, "duplicate_column", "f00",
     "column 'f00' appears twice (columns 1 and 21)"),
    ("CSV other column named twice", ("id," + HEADER + ",id\n1," + ONE_ROW + ",2\n").encode(), "text/csv", 422, "duplicate_column",
     "id", "column 'id' appears twice"),
    ("Parquet feature named twice", parquet(pa.Table.from_arrays([pa.array([1.0])] * 21, [*FEATURES, "f03"])),
     "application/vnd.apache.parquet", 422, "duplicate_column", "f03", "column 'f03' appears twice"),
    # a UTF-16 file (byte-order mark first): the header's bytes failed to decode (500)
    ("CSV in UTF-16", (HEADER + "\n" + ONE_ROW + "\n").encode("utf-16"), "text/csv", 415, "unsupported_encoding", "body",
     "the CSV is UTF-16 or UTF-32 text"),
    ("CSV in UTF-16 of one column", "f00\n1\n".encode("utf-16"), "text/csv", 415, "unsupported_encoding", "body", "send it as UTF-8"),
    ("CSV header in Latin-1", (HEADER + ",caf\xe9\n" + ONE_ROW + ",1\n").encode("latin-1"), "text/csv", 415, "unsupported_encoding",
     "body", "column 21 of the header ('caf\ufffd') is not UTF-8 text"),
    ("CSV empty", b"", "text/csv", 400, "malformed_body", "body", "the CSV is empty"),
    ("CSV text in a feature", (HEADER + "\n" + ONE_ROW + "\n1,2,x" + ",1" * 17 + "\n").encode(), "text/csv", 422, "wrong_type", "f02",
     "column 'f02': CSV conversion error to double: invalid value 'x'"),
    ("CSV ragged row", (HEADER + "\n" + ONE_ROW + ",7\n").encode(), "text/csv", 400, "malformed_body", "body", "Expected 20 columns, got 21"),
    ("Parquet feature of strings", parquet(features_table(2).set_column(3, "f03", pa.array(["a", "b"]))),
     "application/vnd.apache.parquet", 422, "wrong_type", "f03", "column 'f03' has type string, expected numbers"),
    ("Parquet missing a feature", parquet(features_table(2).drop_columns(["f07"])), "application/vnd.apache.parquet", 422,
     "missing_feature", "f07", "missing column(s) 'f07'"),
    # more rows than synchronous scoring takes, as the footer declares (the server's limit is 2,000)
    ("Parquet of too many rows", parquet(pa.table({f: pa.array(np.zeros(3000)) for f in FEATURES})),
     "application/vnd.apache.parquet", 413, "too_many_rows", "body", "the file has 3000 rows (as its footer declares)"),
    ("Parquet cut short", b"PAR1", "application/vnd.apache.parquet", 400, "malformed_body", "body", "cannot read parquet"),
    ("gzip body", b"\x1f\x8b\x08\x00", "text/csv", 415, "unsupported_encoding", "Content-Encoding", "not accepted"),
]


@pytest.mark.parametrize(("case", "body", "ctype", "status", "code", "field", "message"), HOSTILE_FILES,
                         ids=[c[0] for c in HOSTILE_FILES])
def test_sync_batch_route_names_what_is_wrong_with_a_file(client: httpx.Client, case: str, body: bytes, ctype: str,
                                                          status: int, code: str, field: str, message: str) -> None:
    headers = {"Content-Type": ctype, **({"Content-Encoding": "gzip"} if case == "gzip body" else {})}
    resp = client.post("/batch/score", content=body, headers=headers)
    assert resp.status_code == status, resp.text
    doc = resp.json()
    assert (doc["code"], doc["field"]) == (code, field)
    assert message in doc["error"], doc["error"]


def test_sync_batch_route_reads_a_wide_header_quickly(client: httpx.Client) -> None:
    """20,000 columns besides the features: only the features are converted (pyarrow inferred
    the type of every column of the first block: seconds and a gigabyte for 100,000)."""
    extra = [f"x{i}" for i in range(20_000)]
    body = (",".join([*FEATURES, *extra]) + "\n" + ONE_ROW + ",0" * len(extra) + "\n").encode()
    resp = client.post("/batch/score", content=body, headers={"Content-Type": "text/csv"})
    assert resp.status_code == 200, resp.text
    assert len(pd.read_csv(io.BytesIO(resp.content))) == 1


def test_a_job_with_a_duplicate_column_fails_naming_it(client: httpx.Client) -> None:
    resp = client.post("/batch/jobs?format=csv", content=(HEADER + ",f05\n" + ONE_ROW + ",1\n").encode())
    assert resp.status_code == 202, resp.text
    job = resp.json()["job_id"]
    status = wait_until(lambda: (s := client.get(f"/batch/jobs/{job}").json())["state"] == "failed" and s, 30, "failure")
    assert "column 'f05' appears twice (columns 6 and 21)" in status["error"], status


def test_async_job_api(client: httpx.Client, server: Server, sidecar: Sidecar, main_home: Path) -> None:
    df = frame(4500, seed=9)
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    resp = client.post("/batch/jobs", content=buf.getvalue(), headers={"Content-Type": "application/vnd.apache.parquet"})
    assert resp.status_code == 202, resp.text
    job = resp.json()["job_id"]
    assert resp.headers["location"] == f"/batch/jobs/{job}"
    status = wait_until(lambda: (s := client.get(f"/batch/jobs/{job}").json())["state"] in ("succeeded", "failed") and s,
                        60, "the job to finish")
    assert status["state"] == "succeeded" and status["rows_done"] == 4500, status
    result = client.get(f"/batch/jobs/{job}/result")
    assert result.status_code == 200
    runtime = OnnxRuntime(Registry(main_home / "registry").get(MODEL), provider="cpu").load()
    proba = runtime.predict(df[FEATURES].to_numpy(np.float32))["probabilities"]
    np.testing.assert_array_equal(pd.read_parquet(io.BytesIO(result.content))[PROBA].to_numpy(np.float32), proba)
    # its rows were counted and sent as batch events, joinable as <job>-<row>
    wait_until(lambda: sum(1 for e in sidecar.events if e["request_id"].startswith(job)) == 4500, 20, "job events")
    assert {e["mode"] for e in sidecar.events if e["request_id"].startswith(job)} == {"batch"}
    assert server.metric("modelloop_serving_rows_total", model=MODEL, mode="batch") >= 4500
    assert client.get("/batch/jobs/0123456789abcdef01234567").status_code == 404
    assert client.get("/batch/jobs/nonsense/result").json()["code"] == "not_found"


def test_failed_job_reports_why(client: httpx.Client) -> None:
    resp = client.post("/batch/jobs?format=csv", content=b"f00,f01\n1,2\n")
    job = resp.json()["job_id"]
    status = wait_until(lambda: (s := client.get(f"/batch/jobs/{job}").json())["state"] == "failed" and s, 30, "failure")
    assert "missing column(s) 'f02'" in status["error"]
    resp = client.get(f"/batch/jobs/{job}/result")
    assert resp.status_code == 409 and "failed" in resp.json()["error"]
