"""Asynchronous batch scoring jobs: submit a file, poll its status, fetch the result.

Each job is a folder under ``$MODELLOOP_HOME/serving/jobs/<id>/`` holding the uploaded input
(streamed to disk, never held in memory), ``status.json`` and, when done, the result. The job runs
:func:`serving.batch.score_file` on a thread of the worker that accepted it; because its state is on
disk, any worker answers status and result requests. A job whose worker died is reported ``lost``.

Example (HTTP)::

    POST /batch/jobs            body: the CSV or Parquet file  -> {"job_id": "...", "state": "queued"}
    GET  /batch/jobs/{id}       -> {"state": "running", "rows_done": 131072, ...}
    GET  /batch/jobs/{id}/result -> the scored file (same format as the input)
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from modelloop.registry import atomic_write_bytes
from serving.batch import BatchInputError, score_file
from serving.runtime import OnnxRuntime
from serving.validation import RequestError

logger = logging.getLogger(__name__)

EXTENSIONS = {"csv": ".csv", "parquet": ".parquet"}
# (runtime, scored table, features, job id, first row): counts rows and sends their events
ChunkHook = Callable[[OnnxRuntime, pa.Table, np.ndarray, str, int], None]
_ID_CHARS = set("0123456789abcdef")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class JobStore:
    """Batch jobs on disk, run on one background thread per worker (see the module docstring)."""

    def __init__(self, root: Path, *, chunk_rows: int, nan_policy: str, max_upload_bytes: int,
                 retention_s: float = 86400.0) -> None:
        self.root = Path(root)
        self.retention_s = retention_s
        self.chunk_rows = chunk_rows
        self.nan_policy = nan_policy
        self.max_upload_bytes = max_upload_bytes
        self._executor: ThreadPoolExecutor | None = None

    def _dir(self, job_id: str) -> Path:
        if len(job_id) != 24 or not set(job_id) <= _ID_CHARS:
            raise RequestError(404, "not_found", "job_id", f"job_id: no job {job_id!r}")
        path = self.root / job_id
        if not (path / "status.json").exists():
            raise RequestError(404, "not_found", "job_id", f"job_id: no job {job_id!r}")
        return path

    def _write_status(self, path: Path, status: dict[str, Any]) -> None:
        atomic_write_bytes(path / "status.json", json.dumps(status).encode())

    async def submit(self, fmt: str, body: AsyncIterator[bytes], runtime: OnnxRuntime,
                     on_chunk: ChunkHook | None = None) -> dict[str, Any]:
        """Stream the upload to disk, queue the job, return its status."""
        self._sweep()
        job_id = secrets.token_hex(12)
        path = self.root / job_id
        path.mkdir(parents=True)
        input_path = path / f"input{EXTENSIONS[fmt]}"
        size = 0
        try:
            with open(input_path, "wb") as f:
                async for chunk in body:
                    size += len(chunk)
                    if size > self.max_upload_bytes:
                        raise RequestError(413, "body_too_large", "body",
                                           f"body: upload exceeds {self.max_upload_bytes} bytes "
                                           "(MODELLOOP_SERVING_MAX_UPLOAD_BYTES)")
                    f.write(chunk)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        status = {"job_id": job_id, "state": "queued", "format": fmt, "input_bytes": size,
                  "model": runtime.name, "version": runtime.model_version, "rows_done": 0,
                  "error": None, "created_at": time.time(), "finished_at": None, "pid": os.getpid()}
        self._write_status(path, status)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-job")
        queued = dict(status)  # the job thread updates `status` from now on
        self._executor.submit(self._run, path, status, runtime, on_chunk)
        logger.info("batch job %s queued (%d bytes, %s v%d)", job_id, size, runtime.name, runtime.model_version)
        return queued

    def _run(self, path: Path, status: dict[str, Any], runtime: OnnxRuntime,
             on_chunk: ChunkHook | None) -> None:
        fmt = status["format"]
        status.update(state="running", started_at=time.time())
        self._write_status(path, status)
        last = 0.0

        def progress(rows: int, _units: int) -> None:
            nonlocal last
            status["rows_done"] = rows
            if time.monotonic() - last > 1.0:
                last = time.monotonic()
                self._write_status(path, status)

        try:
            report = score_file(
                path / f"input{EXTENSIONS[fmt]}", path / f"result{EXTENSIONS[fmt]}", runtime,
                chunk_rows=self.chunk_rows, nan_policy=self.nan_policy, progress=progress,
                on_chunk=None if on_chunk is None else (
                    lambda t, x, first: on_chunk(runtime, t, x, path.name, first)),
            )
            status.update(state="succeeded", rows_done=report.rows, seconds=report.seconds)
        except BatchInputError as exc:
            status.update(state="failed", error=str(exc).replace(str(path) + "/", ""))
        except Exception as exc:
            logger.exception("batch job %s failed", path.name)
            status.update(state="failed", error=f"internal error: {type(exc).__name__}: {exc}")
        status["finished_at"] = time.time()
        self._write_status(path, status)
        (path / f"input{EXTENSIONS[fmt]}").unlink(missing_ok=True)
        logger.info("batch job %s %s (%d rows)", path.name, status["state"], status["rows_done"])

    def _sweep(self) -> None:
        """Delete finished jobs older than the retention."""
        if not self.root.exists():
            return
        cutoff = time.time() - self.retention_s
        for path in self.root.iterdir():
            try:
                status = json.loads((path / "status.json").read_bytes())
            except (OSError, ValueError):
                continue
            if status.get("finished_at") and status["finished_at"] < cutoff:
                shutil.rmtree(path, ignore_errors=True)
                logger.info("deleted batch job %s (finished %.0f s ago)", path.name, time.time() - status["finished_at"])

    def status(self, job_id: str) -> dict[str, Any]:
        status: dict[str, Any] = json.loads((self._dir(job_id) / "status.json").read_bytes())
        if status["state"] in ("queued", "running") and not _pid_alive(status["pid"]):
            status["state"] = "lost"
            status["error"] = f"the worker (pid {status['pid']}) running the job exited"
        return status

    def result(self, job_id: str) -> tuple[Path, str]:
        status = self.status(job_id)
        if status["state"] != "succeeded":
            raise RequestError(409, "not_ready", "job_id",
                               f"job_id: job {job_id} is {status['state']}, no result"
                               + (f": {status['error']}" if status.get("error") else ""))
        return self._dir(job_id) / f"result{EXTENSIONS[status['format']]}", status["format"]

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
