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
    env = {**os.environ, "MODELLOOP_HOME": str(home)}
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
