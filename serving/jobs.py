"""Asynchronous batch scoring jobs: submit a file, poll its status, fetch the result.

Each job is a folder under ``$MODELLOOP_HOME/serving/jobs/<id>/`` holding the uploaded input
(streamed to disk, never held in memory), ``status.json`` and, when done, the result. The job runs
:func:`serving.batch.score_file` on a thread of the worker that accepted it; because its state is on
disk, any worker answers status and result requests. A job whose worker died is reported ``lost``.

Quotas (:class:`JobLimits`, from the serving settings) hold for all the workers of one home
together, counted on disk under a file lock: a job is refused with 429 and ``Retry-After`` while
``max_active`` jobs are uploading, queued or running, and with 507 while the jobs' files
(uploads, results, the parts of a running job) take ``max_disk_bytes``; an upload that fills the
quota while it is read is cut off with 507. ``DELETE /batch/jobs/{id}`` frees a finished job's
files before its retention ends.

Example (HTTP)::

    POST /batch/jobs            body: the CSV or Parquet file  -> {"job_id": "...", "state": "queued"}
    GET  /batch/jobs/{id}       -> {"state": "running", "rows_done": 131072, ...}
    GET  /batch/jobs/{id}/result -> the scored file (same format as the input)
    DELETE /batch/jobs/{id}     -> {"job_id": "...", "deleted": true}
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from modelloop.registry import atomic_write_bytes
from serving.batch import BatchInputError, score_file
from serving.runtime import OnnxRuntime
from serving.settings import NanPolicy
from serving.validation import RequestError

logger = logging.getLogger(__name__)

EXTENSIONS = {"csv": ".csv", "parquet": ".parquet"}
# (runtime, scored table, features, job id, first row): counts rows and sends their events
ChunkHook = Callable[[OnnxRuntime, pa.Table, np.ndarray, str, int], None]
_ID_CHARS = set("0123456789abcdef")
ACTIVE = ("uploading", "queued", "running")
RETRY_AFTER_S = 30
"""``Retry-After`` of a job refused while others run (when they finish is not known)."""
RECHECK_BYTES = 16 << 20
"""An upload re-measures the jobs' disk use each time it has written this much."""


@dataclass(frozen=True)
class JobLimits:
    """What the batch jobs of one home may take (serving settings ``max_active_jobs``,
    ``max_jobs_disk_bytes``, ``job_max_row_group_bytes``)."""

    max_active: int
    max_disk_bytes: int
    max_row_group_bytes: int | None = None


def _tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (a job's folder: its input, result and parts)."""
    total = 0
    try:
        entries = list(os.scandir(path))
    except OSError:  # deleted meanwhile
        return 0
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                total += _tree_bytes(Path(entry.path))
            else:
                total += entry.stat(follow_symlinks=False).st_size
        except OSError:
            continue
    return total


def _pid_alive(pid: Any) -> bool:
    if type(pid) is not int or pid <= 0:  # (kill(0) would signal our own process group)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class JobStore:
    """Batch jobs on disk, run on one background thread per worker (see the module docstring)."""

    def __init__(self, root: Path, *, chunk_rows: int, nan_policy: NanPolicy, max_upload_bytes: int,
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

    def _too_large(self, size: int) -> RequestError:
        return RequestError(413, "body_too_large", "body",
                            f"body: upload exceeds {self.max_upload_bytes} bytes "
                            f"({size} bytes; MODELLOOP_SERVING_MAX_UPLOAD_BYTES)")

    async def submit(self, fmt: str, body: AsyncIterator[bytes], runtime: OnnxRuntime,
                     on_chunk: ChunkHook | None = None, *, limits: JobLimits | None = None,
                     declared_bytes: int | None = None) -> dict[str, Any]:
        """Stream the upload to disk, queue the job, return its status. With ``limits``, the
        quotas of the module docstring apply (``declared_bytes``, the body's Content-Length,
        lets a body that cannot fit be refused before it is read)."""
        if declared_bytes is not None and declared_bytes > self.max_upload_bytes:
            raise self._too_large(declared_bytes)
        status = await asyncio.to_thread(self._admit, fmt, runtime, limits, declared_bytes or 0)
        path = self.root / status["job_id"]
        input_path = path / f"input{EXTENSIONS[fmt]}"
        size = checked = 0
        try:
            with open(input_path, "wb") as f:
                async for chunk in body:
                    size += len(chunk)
                    if size > self.max_upload_bytes:
                        raise self._too_large(size)
                    f.write(chunk)
                    if limits is not None and size - checked >= RECHECK_BYTES:
                        checked = size
                        used = await asyncio.to_thread(_tree_bytes, self.root)
                        if used > limits.max_disk_bytes:
                            raise self._disk_full(used, limits, uploading=True)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        status.update(state="queued", input_bytes=size)
        self._write_status(path, status)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-job")
        queued = dict(status)  # the job thread updates `status` from now on
        self._executor.submit(self._run, path, status, runtime, on_chunk,
                              limits.max_row_group_bytes if limits else None)
        logger.info("batch job %s queued (%d bytes, %s v%d)", path.name, size, runtime.name, runtime.model_version)
        return queued

    def _admit(self, fmt: str, runtime: OnnxRuntime, limits: JobLimits | None, declared: int) -> dict[str, Any]:
        """Under the jobs' lock: sweep old jobs, check the quotas, and create the job's folder
        with its status ``uploading`` (so that it counts for the next submit at once)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            self._sweep()
            if limits is not None:
                self._check_quota(limits, declared)
            job_id = secrets.token_hex(12)
            (self.root / job_id).mkdir()
            status = {"job_id": job_id, "state": "uploading", "format": fmt, "input_bytes": 0,
                      "model": runtime.name, "version": runtime.model_version, "rows_done": 0,
                      "error": None, "created_at": time.time(), "finished_at": None, "pid": os.getpid()}
            self._write_status(self.root / job_id, status)
        return status

    def _jobs(self) -> list[tuple[Path, dict[str, Any] | None]]:
        """Every job folder with its status (None when it has none or it cannot be read)."""
        jobs: list[tuple[Path, dict[str, Any] | None]] = []
        if not self.root.exists():
            return jobs
        for path in self.root.iterdir():
            if not path.is_dir():
                continue
            try:
                jobs.append((path, json.loads((path / "status.json").read_bytes())))
            except (OSError, ValueError):
                jobs.append((path, None))
        return jobs

    def _check_quota(self, limits: JobLimits, declared: int) -> None:
        jobs = self._jobs()
        active = sum(1 for _, s in jobs if s and s.get("state") in ACTIVE and _pid_alive(s.get("pid")))
        if active >= limits.max_active:
            raise RequestError(429, "too_many_jobs", "body",
                               f"body: {active} batch jobs are queued or running, the most at once "
                               f"(MODELLOOP_SERVING_MAX_ACTIVE_JOBS={limits.max_active}); retry when one has "
                               "finished", {"Retry-After": str(RETRY_AFTER_S)})
        if declared > limits.max_disk_bytes:
            raise RequestError(413, "body_too_large", "body",
                               f"body: {declared} bytes is more than the batch jobs' disk quota of "
                               f"{limits.max_disk_bytes} (MODELLOOP_SERVING_MAX_JOBS_DISK_BYTES)")
        used = sum(_tree_bytes(path) for path, _ in jobs)
        if used + declared > limits.max_disk_bytes:
            raise self._disk_full(used, limits, uploading=False, jobs=jobs)

    def _disk_full(self, used: int, limits: JobLimits, *, uploading: bool,
                   jobs: list[tuple[Path, dict[str, Any] | None]] | None = None) -> RequestError:
        """507: the jobs' files fill their quota. A later try passes once finished jobs are
        deleted (by DELETE, or when their retention ends: ``Retry-After`` says when the first
        does) or running ones have removed their uploads."""
        now = time.time()
        expiries = [s["finished_at"] + self.retention_s - now
                    for _, s in (jobs if jobs is not None else self._jobs()) if s and s.get("finished_at")]
        retry = max(1, int(min(expiries))) if expiries else RETRY_AFTER_S
        what = "this upload filled" if uploading else "they fill"
        return RequestError(507, "storage_full", "body",
                            f"body: batch jobs hold {used} bytes on disk and {what} their quota "
                            f"(MODELLOOP_SERVING_MAX_JOBS_DISK_BYTES={limits.max_disk_bytes}); delete finished "
                            f"jobs (DELETE /batch/jobs/{{id}}) or retry in {retry} s",
                            {"Retry-After": str(retry)})

    def _run(self, path: Path, status: dict[str, Any], runtime: OnnxRuntime,
             on_chunk: ChunkHook | None, max_row_group_bytes: int | None = None) -> None:
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
                max_row_group_bytes=max_row_group_bytes,
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
        """Delete finished jobs older than the retention, and as old ones whose worker died
        before they finished (lost) or that have no status (their files would hold the disk
        quota for good)."""
        now = time.time()
        cutoff = now - self.retention_s
        for path, status in self._jobs():
            if status is None:
                try:
                    stale = path.stat().st_mtime < cutoff
                except OSError:
                    continue
                reason = "no status"
            elif status.get("finished_at"):
                stale = status["finished_at"] < cutoff
                reason = f"finished {now - status['finished_at']:.0f} s ago"
            else:
                stale = status.get("created_at", now) < cutoff and not _pid_alive(status.get("pid"))
                reason = "lost"
            if stale:
                shutil.rmtree(path, ignore_errors=True)
                logger.info("deleted batch job %s (%s)", path.name, reason)

    def status(self, job_id: str) -> dict[str, Any]:
        status: dict[str, Any] = json.loads((self._dir(job_id) / "status.json").read_bytes())
        if status["state"] in ("queued", "running") and not _pid_alive(status["pid"]):
            status["state"] = "lost"
            status["error"] = f"the worker (pid {status['pid']}) running the job exited"
        return status

    def delete(self, job_id: str) -> dict[str, Any]:
        """Delete a finished (or lost) job and its files; a job still at work is refused (409)."""
        status = self.status(job_id)
        if status["state"] in ACTIVE:
            raise RequestError(409, "not_finished", "job_id",
                               f"job_id: job {job_id} is {status['state']}; delete it once it has finished")
        shutil.rmtree(self._dir(job_id), ignore_errors=True)
        logger.info("deleted batch job %s (on request)", job_id)
        return {"job_id": job_id, "deleted": True}

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
