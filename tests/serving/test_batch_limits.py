"""A real `modelloop serve` (one worker, small limits) against hostile batch files and job floods:
Parquet files that decode to far more than they weigh are refused from their footer, or have only
their feature columns decoded, without the worker's memory growing; batch jobs have a quota of
jobs at work and of bytes on disk."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from modelloop.registry import Registry
from tests.serving.conftest import FEATURES, MODEL, Server, start_server, stop_server, wait_until
from tests.serving.onnx_models import register_mlp

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("show_log_on_failure")]
PARQUET = {"Content-Type": "application/vnd.apache.parquet"}
CSV = {"Content-Type": "text/csv"}
ONE_ROW = ",".join(["1.5"] * 20)
DISK_QUOTA = 3_000_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("limits-home")
    register_mlp(Registry(home / "registry"), MODEL, n_features=20, n_classes=3, seed=0)
    env = {
        "MODELLOOP_SERVING_MAX_BODY_BYTES": str(4 << 20),
        "MODELLOOP_SERVING_SYNC_BATCH_MAX_ROWS": "100000",
        "MODELLOOP_SERVING_SYNC_BATCH_MAX_DECODED_BYTES": str(8 << 20),
        "MODELLOOP_SERVING_MAX_ACTIVE_JOBS": "2",
        "MODELLOOP_SERVING_MAX_JOBS_DISK_BYTES": str(DISK_QUOTA),
    }
    srv = start_server(home, tmp_path_factory.mktemp("limits-log") / "server.log", env, "--workers", "1")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _memory(server: Server, reset: bool = False) -> int:
    """The peak resident size (VmHWM) of the server's worker, the largest of its processes;
    ``reset`` first brings each process's peak down to its present size (``clear_refs``)."""
    peaks = []
    for proc in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            if reset:
                Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except OSError:
            continue
        peaks += [int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:")]
    return max(peaks)


def parquet(table: pa.Table, **options: object) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, **options)
    return buf.getvalue()


def features(n: int, value: float = 1.5) -> dict[str, pa.Array]:
    return {f: pa.array(np.full(n, value)) for f in FEATURES}


@pytest.fixture(scope="module")
def warm(client: httpx.Client) -> None:
    """One ordinary file first: the first batch request loads what any does (pandas, ...)."""
    resp = client.post("/batch/score", content=parquet(pa.table(features(100))), headers=PARQUET)
    assert resp.status_code == 200, resp.text


BOMBS = [
    # (case, body, status, code, message part); the first must come first: pyarrow's memory pool
    # keeps what an earlier case decoded, which would hide its growth
    # 64 rows and a column the model does not read of 64 x 4 MB strings (256 MB decoded): only the
    # features are decoded now, so the file is scored
    ("a huge column besides the features",
     lambda: parquet(pa.table({**features(64), "blob": pa.array(["a" * (4 << 20)] * 64)}), compression="zstd",
                     use_dictionary=False), 200, None, None),
    # 5M rows of zeros in the features: 460 KB that decoded to 800 MB before the rows were
    # counted (the report's 1.35 MB body took a worker to 3.0 GB); now refused from the footer
    ("millions of rows", lambda: parquet(pa.table(features(5_000_000, 0.0)), compression="zstd"), 413,
     "too_many_rows", "the file has 5000000 rows (as its footer declares)"),
    # 100,000 rows (allowed) whose features decode to 16 MB, more than this server's 8 MB
    ("features beyond the decoded limit", lambda: parquet(pa.table(features(100_000, 0.0)), compression="zstd"),
     413, "too_large", "MODELLOOP_SERVING_SYNC_BATCH_MAX_DECODED_BYTES"),
]


@pytest.mark.usefixtures("warm")
@pytest.mark.parametrize(("case", "make", "status", "code", "message"), BOMBS, ids=[b[0] for b in BOMBS])
def test_a_parquet_bomb_does_not_grow_the_worker(client: httpx.Client, server: Server, case: str, make: object,
                                                 status: int, code: str | None, message: str | None) -> None:
    body = make()  # type: ignore[operator]
    assert len(body) < 1 << 20
    before = _memory(server, reset=True)
    resp = client.post("/batch/score", content=body, headers=PARQUET)
    assert resp.status_code == status, resp.text[:300]
    if code is not None:
        assert resp.json()["code"] == code and message in resp.json()["error"], resp.text
    else:
        assert pq.read_table(io.BytesIO(resp.content)).num_rows == 64
    grown = _memory(server) - before
    assert grown < 100 << 20, f"the worker's peak memory grew by {grown >> 20} MB"


def jobs_with_state(server: Server, state: str) -> list[str]:
    """The ids of the jobs in ``state``, from their status files."""
    found = []
    for path in (server.home / "serving" / "jobs").glob("*/status.json"):
        try:
            if json.loads(path.read_bytes())["state"] == state:
                found.append(path.parent.name)
        except (OSError, ValueError):  # deleted meanwhile
            continue
    return found


def jobs_in(server: Server, state: str) -> int:
    return len(jobs_with_state(server, state))


def test_jobs_beyond_the_active_quota_get_429(client: httpx.Client, server: Server) -> None:
    """Two uploads still arriving hold both places (the quota is 2); a third job waits its turn."""
    release = threading.Event()
    answers: list[httpx.Response] = []

    def slow_upload() -> None:
        def body() -> Iterator[bytes]:
            yield (",".join(FEATURES) + "\n").encode()
            release.wait(30)
            yield (ONE_ROW + "\n").encode()

        answers.append(httpx.post(f"{server.url}/batch/jobs", content=body(), headers=CSV, timeout=60))

    threads = [threading.Thread(target=slow_upload) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: jobs_in(server, "uploading") == 2, 20, "two uploads to be admitted")
        resp = client.post("/batch/jobs", content=(",".join(FEATURES) + "\n" + ONE_ROW + "\n").encode(), headers=CSV)
        assert resp.status_code == 429, resp.text
        assert resp.json()["code"] == "too_many_jobs"
        assert "MODELLOOP_SERVING_MAX_ACTIVE_JOBS=2" in resp.json()["error"]
        assert int(resp.headers["retry-after"]) > 0
    finally:
        release.set()
        for t in threads:
            t.join(30)
    assert [a.status_code for a in answers] == [202, 202]
    for job in (a.json()["job_id"] for a in answers):
        wait_until(lambda job=job: client.get(f"/batch/jobs/{job}").json()["state"] == "succeeded", 30, "the job")
        assert client.delete(f"/batch/jobs/{job}").json() == {"job_id": job, "deleted": True}


def test_jobs_beyond_the_disk_quota_get_507_until_one_is_deleted(client: httpx.Client) -> None:
    rows = 2_000_000 // (len(ONE_ROW) + 1)
    big = (",".join(FEATURES) + "\n" + (ONE_ROW + "\n") * rows).encode()  # 2 MB of the 3 MB quota
    first = client.post("/batch/jobs", content=big, headers=CSV)
    assert first.status_code == 202, first.text
    job = first.json()["job_id"]
    status = wait_until(lambda: (s := client.get(f"/batch/jobs/{job}").json())["state"] == "succeeded" and s, 60, "job")
    assert status["rows_done"] == rows
    # its result stays on disk: another 2 MB does not fit (Content-Length says so before reading)
    resp = client.post("/batch/jobs", content=big, headers=CSV)
    assert resp.status_code == 507, resp.text
    assert resp.json()["code"] == "storage_full"
    assert f"MODELLOOP_SERVING_MAX_JOBS_DISK_BYTES={DISK_QUOTA}" in resp.json()["error"]
    assert "DELETE /batch/jobs/{id}" in resp.json()["error"]
    assert 0 < int(resp.headers["retry-after"]) <= 86400  # when the finished job expires
    # larger than the whole quota: retrying cannot help
    huge = client.post("/batch/jobs", content=big + big, headers=CSV)
    assert (huge.status_code, huge.json()["code"]) == (413, "body_too_large"), huge.text
    # deleting the finished job makes room
    assert client.delete(f"/batch/jobs/{job}").status_code == 200
    assert client.get(f"/batch/jobs/{job}").status_code == 404
    again = client.post("/batch/jobs", content=big, headers=CSV)
    assert again.status_code == 202, again.text
    job = again.json()["job_id"]
    wait_until(lambda: client.get(f"/batch/jobs/{job}").json()["state"] == "succeeded", 60, "job")
    client.delete(f"/batch/jobs/{job}")


def test_a_job_at_work_cannot_be_deleted(client: httpx.Client, server: Server) -> None:
    release = threading.Event()

    def body() -> Iterator[bytes]:
        yield (",".join(FEATURES) + "\n").encode()
        release.wait(30)

    upload = threading.Thread(target=lambda: httpx.post(f"{server.url}/batch/jobs", content=body(), headers=CSV,
                                                        timeout=60))
    upload.start()
    try:
        wait_until(lambda: jobs_in(server, "uploading") == 1, 20, "the upload to be admitted")
        (job,) = jobs_with_state(server, "uploading")
        resp = client.delete(f"/batch/jobs/{job}")
        assert (resp.status_code, resp.json()["code"]) == (409, "not_finished"), resp.text
        assert "is uploading; delete it once it has finished" in resp.json()["error"]
    finally:
        release.set()
        upload.join(30)
