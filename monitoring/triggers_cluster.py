"""Retraining jobs on a cluster: a Kubernetes Job (``kubernetes`` client) or a Docker container
(``docker`` SDK). The Job or container is named after the job id, which is deterministic per model
and window: when two sidecar replicas fire for the same window, the second create answers
"already exists" and becomes a :class:`TriggerConflict`, not a second job.
"""

from __future__ import annotations

import logging
from typing import Any

from monitoring.triggers import (
    SIDECAR_KEY_ENV,
    JobRequest,
    JobStatus,
    RunState,
    TriggerConflict,
    TriggerError,
)

log = logging.getLogger(__name__)
HOME_MOUNT = "/var/lib/modelloop"


def job_manifest(request: JobRequest, *, namespace: str, image: str,
                 service_account: str | None = None, claim: str | None = None,
                 ttl_s: float = 86400, deadline_s: float = 21600,
                 key_secret: str | None = None) -> dict[str, Any]:
    """The ``batch/v1`` Job that runs the retraining command once (no retries: a failed
    retraining is reported, and the policy decides whether to try again after its cooldown).
    The sidecar's URL and key reach it in its environment; with ``key_secret`` the key is read
    from that Secret (key ``api-key``) rather than written into the Job's spec."""
    labels = {"app.kubernetes.io/name": "modelloop", "app.kubernetes.io/component": "retrain",
              "modelloop.io/model": _label_value(request.model),
              "modelloop.io/trigger": str(request.trigger)}
    container: dict[str, Any] = {
        "name": "retrain", "image": image, "command": request.command,
        "env": [{"name": "MODELLOOP_HOME", "value": HOME_MOUNT},
                {"name": "MODELLOOP_RETRAIN_JOB", "value": request.job_id},
                {"name": "MODELLOOP_RETRAIN_TRIGGER", "value": str(request.trigger)},
                *(({"name": k, "valueFrom": {"secretKeyRef": {"name": key_secret, "key": "api-key"}}}
                   if k == SIDECAR_KEY_ENV and key_secret else {"name": k, "value": v})
                  for k, v in request.env.items())],
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True,
                            "capabilities": {"drop": ["ALL"]}},
    }
    pod: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
    if service_account:
        pod["serviceAccountName"] = service_account
    if claim:
        container["volumeMounts"] = [{"name": "home", "mountPath": HOME_MOUNT}]
        pod["volumes"] = [{"name": "home", "persistentVolumeClaim": {"claimName": claim}}]
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": request.job_id, "namespace": namespace, "labels": labels,
                     "annotations": {"modelloop.io/reason": request.reason[:1000]}},
        "spec": {"backoffLimit": 0, "ttlSecondsAfterFinished": int(ttl_s),
                 "activeDeadlineSeconds": int(deadline_s),
                 "template": {"metadata": {"labels": labels}, "spec": pod}},
    }


def _label_value(value: str) -> str:
    # label values: up to 63 of [A-Za-z0-9_.-], starting and ending alphanumeric
    cleaned = "".join(ch if ch.isalnum() or ch in "_.-" else "-" for ch in value)[:63]
    return cleaned.strip("_.-") or "model"


class KubernetesJobTrigger:
    """Creates, watches and deletes retraining Jobs through the Kubernetes API."""

    kind = "kubernetes"

    def __init__(self, *, namespace: str, image: str, service_account: str | None = None,
                 claim: str | None = None, ttl_s: float = 86400, deadline_s: float = 21600,
                 api_url: str | None = None, key_secret: str | None = None) -> None:
        self.namespace = namespace
        self.key_secret = key_secret
        self.image = image
        self.service_account = service_account
        self.claim = claim
        self.ttl_s = ttl_s
        self.deadline_s = deadline_s
        self.api_url = api_url
        self._api: Any = None

    def _batch(self) -> Any:
        if self._api is not None:
            return self._api
        from kubernetes import client, config

        if self.api_url:
            api_client = client.ApiClient(client.Configuration(host=self.api_url))
        else:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                try:
                    config.load_kube_config()
                except (config.ConfigException, OSError) as exc:
                    raise TriggerError(f"no Kubernetes configuration: not in a cluster and no "
                                       f"kubeconfig ({exc})") from exc
            api_client = client.ApiClient()
        self._api = client.BatchV1Api(api_client)
        return self._api

    def manifest(self, request: JobRequest) -> dict[str, Any]:
        return job_manifest(request, namespace=self.namespace, image=self.image,
                            service_account=self.service_account, claim=self.claim,
                            ttl_s=self.ttl_s, deadline_s=self.deadline_s,
                            key_secret=self.key_secret)

    def start(self, request: JobRequest) -> str:
        from kubernetes.client.exceptions import ApiException

        try:
            self._batch().create_namespaced_job(self.namespace, self.manifest(request))
        except ApiException as exc:
            if exc.status == 409:
                raise TriggerConflict(f"Job {request.job_id} already exists in namespace "
                                      f"{self.namespace}") from exc
            raise TriggerError(f"Kubernetes refused Job {request.job_id}: {exc.status} "
                               f"{exc.reason}") from exc
        except OSError as exc:  # urllib3 connection errors
            raise TriggerError(f"cannot reach the Kubernetes API: {exc}") from exc
        log.info("Job %s created in namespace %s", request.job_id, self.namespace)
        return request.job_id

    def poll(self, handle: str) -> RunState:
        from kubernetes.client.exceptions import ApiException

        try:
            job = self._batch().read_namespaced_job_status(handle, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return JobStatus.failed  # deleted (or expired by its TTL) before we saw it end
            raise
        status = job.status
        if status is None:
            return JobStatus.running
        if status.succeeded:
            return JobStatus.succeeded
        if status.failed:
            return JobStatus.failed
        for cond in status.conditions or []:
            if cond.status == "True" and cond.type in ("Complete", "SuccessCriteriaMet"):
                return JobStatus.succeeded
            if cond.status == "True" and cond.type in ("Failed", "FailureTarget"):
                return JobStatus.failed
        return JobStatus.running

    def cancel(self, handle: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self._batch().delete_namespaced_job(handle, self.namespace,
                                                propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise


class DockerTrigger:
    """Runs the retraining command in a container of the modelloop image."""

    kind = "docker"

    def __init__(self, *, image: str, base_url: str | None = None,
                 volume: str | None = None) -> None:
        self.image = image
        self.base_url = base_url
        self.volume = volume
        self._client: Any = None

    def client(self) -> Any:
        if self._client is None:
            import docker

            try:
                self._client = (docker.DockerClient(base_url=self.base_url) if self.base_url
                                else docker.from_env())
                self._client.ping()
            except docker.errors.DockerException as exc:
                self._client = None
                raise TriggerError(f"no Docker engine: {exc}") from exc
        return self._client

    def container_spec(self, request: JobRequest) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "image": self.image, "command": request.command, "name": request.job_id,
            "detach": True,
            "labels": {"modelloop.io/model": request.model, "modelloop.io/job": request.job_id,
                       "modelloop.io/trigger": str(request.trigger)},
            "environment": {"MODELLOOP_HOME": HOME_MOUNT,
                            "MODELLOOP_RETRAIN_JOB": request.job_id,
                            "MODELLOOP_RETRAIN_TRIGGER": str(request.trigger), **request.env},
        }
        if self.volume:
            spec["volumes"] = {self.volume: {"bind": HOME_MOUNT, "mode": "rw"}}
        return spec

    def start(self, request: JobRequest) -> str:
        import docker

        try:
            container = self.client().containers.run(**self.container_spec(request))
        except docker.errors.APIError as exc:
            if exc.status_code == 409:
                raise TriggerConflict(f"container {request.job_id} already exists") from exc
            raise TriggerError(f"Docker refused container {request.job_id}: {exc}") from exc
        except docker.errors.DockerException as exc:
            raise TriggerError(f"Docker failed to run {request.job_id}: {exc}") from exc
        return str(container.id)

    def poll(self, handle: str) -> RunState:
        import docker

        try:
            container = self.client().containers.get(handle)
        except docker.errors.NotFound:
            return JobStatus.failed
        if container.status in ("created", "running", "restarting"):
            return JobStatus.running
        code = container.attrs.get("State", {}).get("ExitCode", 1)
        return JobStatus.succeeded if code == 0 else JobStatus.failed

    def cancel(self, handle: str) -> None:
        import docker

        try:
            self.client().containers.get(handle).stop(timeout=10)
        except docker.errors.NotFound:
            return
