"""How a retraining job runs: a local process, a Kubernetes Job, a Docker container or a webhook.

Every trigger does three things with a :class:`JobRequest`: ``start`` it (returning a handle: a
pid, a Job name, a container id), ``poll`` the handle (``running``, ``succeeded``, ``failed``) and
``cancel`` it. Which job may start, and when, is :mod:`monitoring.jobs`' business; the job name
comes from there too (deterministic per model and window). The cluster triggers live in
:mod:`monitoring.triggers_cluster`.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import httpx
import psutil

from monitoring.records import JobStatus, Requester

log = logging.getLogger(__name__)
RunState = Literal[JobStatus.running, JobStatus.succeeded, JobStatus.failed]
"""What a trigger's ``poll`` reports of a started job."""
SIDECAR_URL_ENV = "MODELLOOP_TRAINING_SIDECAR_URL"
SIDECAR_KEY_ENV = "MODELLOOP_TRAINING_SIDECAR_KEY"


class TriggerError(Exception):
    """A job could not be started; the message says why."""


class TriggerConflict(TriggerError):
    """A job of this name exists already (another replica started it): not an error."""


@dataclass(frozen=True)
class JobRequest:
    job_id: str
    """Deterministic per model and window; also the Job or container name."""
    model: str
    version: int | None
    trigger: Requester
    """What asked for it."""
    reason: str
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    """What the job needs to know of the sidecar that started it, set in the job's
    environment: its URL (:data:`SIDECAR_URL_ENV`) and admin key (:data:`SIDECAR_KEY_ENV`)."""

    def fields(self) -> dict[str, str]:
        return {"model": self.model, "version": "" if self.version is None else str(self.version),
                "job": self.job_id, "trigger": str(self.trigger), "reason": self.reason}


def render_command(template: str, request: JobRequest) -> list[str]:
    """The retraining command for a request: the template split like a shell would, then each
    argument filled in (so a reason with spaces stays one argument)."""
    try:
        return [arg.format(**request.fields()) for arg in shlex.split(template)]
    except (KeyError, IndexError, ValueError) as exc:
        raise TriggerError(f"bad retrain command template {template!r}: {exc}") from exc


def local_command(command: list[str], path: str | None) -> list[str]:
    """``command`` as a local process runs it. A leading ``modelloop`` is the one installed beside
    this interpreter when there is one (a virtual environment's bin folder need not be on PATH);
    a program not found (on ``path``, the job's PATH) is a :class:`TriggerError` naming it."""
    program = command[0]
    if program == "modelloop":
        own = Path(sys.executable).with_name("modelloop")
        if own.is_file() and os.access(own, os.X_OK):
            return [str(own), *command[1:]]
    if shutil.which(program, path=path) is None:
        where = "" if os.sep in program else f" on PATH ({path or 'empty'})"
        raise TriggerError(f"cannot start {program!r}: no such executable{where}; check "
                           f"MODELLOOP_MONITOR_RETRAIN_COMMAND")
    return command


class Trigger(Protocol):
    kind: str

    def start(self, request: JobRequest) -> str: ...

    def poll(self, handle: str) -> RunState: ...

    def cancel(self, handle: str) -> None: ...


class NoTrigger:
    """``trigger: none``: retraining requests are refused (rules still alert)."""

    kind = "none"

    def start(self, request: JobRequest) -> str:
        raise TriggerError("retraining is switched off (MODELLOOP_MONITOR_TRIGGER=none)")

    def poll(self, handle: str) -> RunState:
        return JobStatus.failed

    def cancel(self, handle: str) -> None:
        return None


class LocalProcessTrigger:
    """Runs the command as a child process in its own session, logging to
    ``jobs_dir/<job>.log``; its exit status goes to ``<job>.exit``, so a restarted sidecar still
    learns how a job it started ended. The program is found as :func:`local_command` says, so one
    that does not exist fails to start, naming it, rather than exiting 127 later."""

    kind = "local"

    def __init__(self, jobs_dir: Path) -> None:
        self.jobs_dir = Path(jobs_dir)
        self._procs: dict[int, subprocess.Popen[bytes]] = {}

    def paths(self, job_id: str) -> tuple[Path, Path]:
        return self.jobs_dir / f"{job_id}.log", self.jobs_dir / f"{job_id}.exit"

    def start(self, request: JobRequest) -> str:
        if not request.command:
            raise TriggerError("no retrain command")
        env = {**os.environ, **request.env}
        command = local_command(request.command, env.get("PATH"))
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        log_path, exit_path = self.paths(request.job_id)
        exit_path.unlink(missing_ok=True)
        # a tiny shell wrapper records the exit status next to the log
        script = f'"$@"; code=$?; echo $code > {shlex.quote(str(exit_path))}; exit $code'
        with open(log_path, "ab") as out:
            try:
                proc = subprocess.Popen(["/bin/sh", "-c", script, "sh", *command],
                                        stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True, env=env)
            except OSError as exc:
                raise TriggerError(f"cannot start {command[0]!r}: {exc}") from exc
        self._procs[proc.pid] = proc
        log.info("job %s started as pid %d: %s (log %s)", request.job_id, proc.pid,
                 shlex.join(command), log_path)
        return f"{proc.pid}:{request.job_id}"

    def poll(self, handle: str) -> RunState:
        pid_s, _, job_id = handle.partition(":")
        pid = int(pid_s)
        proc = self._procs.get(pid)
        if proc is not None:
            code = proc.poll()
            if code is None:
                return JobStatus.running
            del self._procs[pid]
            return JobStatus.succeeded if code == 0 else JobStatus.failed
        exit_path = self.paths(job_id)[1]
        if exit_path.exists():
            text = exit_path.read_text().strip()
            return JobStatus.succeeded if text == "0" else JobStatus.failed
        if psutil.pid_exists(pid):
            return JobStatus.running
        return JobStatus.failed  # gone without an exit status: killed with its wrapper

    def cancel(self, handle: str) -> None:
        pid = int(handle.partition(":")[0])
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        proc = self._procs.get(pid)
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(pid, signal.SIGKILL)


class WebhookTrigger:
    """POSTs the job request as JSON; a 2xx answer means the receiver took the job over (its
    progress is not visible here, so the job counts as done when delivered)."""

    kind = "webhook"

    def __init__(self, url: str, timeout_s: float = 10.0, client: httpx.Client | None = None) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._client = client

    def payload(self, request: JobRequest) -> dict[str, Any]:
        return {"job": request.job_id, "model": request.model, "version": request.version,
                "trigger": str(request.trigger), "reason": request.reason, "command": request.command,
                "sidecar_url": request.env.get(SIDECAR_URL_ENV)}

    def start(self, request: JobRequest) -> str:
        try:
            if self._client is not None:
                resp = self._client.post(self.url, json=self.payload(request), timeout=self.timeout_s)
            else:
                resp = httpx.post(self.url, json=self.payload(request), timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            raise TriggerError(f"webhook {self.url} failed: {exc}") from exc
        if resp.status_code == 409:
            raise TriggerConflict(f"webhook {self.url} answered 409: job exists")
        if not resp.is_success:
            raise TriggerError(f"webhook {self.url} answered {resp.status_code}: {resp.text[:200]}")
        return f"webhook:{resp.status_code}"

    def poll(self, handle: str) -> RunState:
        return JobStatus.succeeded

    def cancel(self, handle: str) -> None:
        return None
