"""The Helm chart's jobs: the sidecar may create retraining Jobs (serving holds no token), the
suspended retraining CronJob and the indexed batch Job, the Job the sidecar builds from the
chart's settings, and a retraining command of one's own."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import kubernetes_validate
import pytest

from tests.deploy._helm import (
    ALL_ON,
    KEYS_SECRET,
    KUBE_VERSIONS,
    NAME,
    containers,
    find,
    monitor_settings,
    pod_spec,
    render,
    resolve_env,
    secret_refs,
    settings_env,
)
from tests.deploy._support import (
    run,
    settings_class,
)


def test_sidecar_may_create_retraining_jobs_and_serving_holds_no_token() -> None:
    docs = render()
    deployment = find(docs, "Deployment")
    spec = pod_spec(deployment)
    assert spec["automountServiceAccountToken"] is False
    pods = containers(deployment)
    token_path = "/var/run/secrets/kubernetes.io/serviceaccount"
    assert any(m["mountPath"] == token_path for m in pods["monitor"]["volumeMounts"])
    assert not any(m["mountPath"] == token_path for m in pods["serving"]["volumeMounts"])
    role = find(docs, "Role")
    assert {"apiGroups": ["batch"], "resources": ["jobs"],
            "verbs": ["create", "get", "list", "watch", "delete"]} in role["rules"]
    binding = find(docs, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": spec["serviceAccountName"],
                                    "namespace": "models"}]
    env = settings_env(docs)
    assert env["MODELLOOP_MONITOR_TRIGGER"] == "kubernetes"
    job_account = find(docs, "ServiceAccount", env["MODELLOOP_MONITOR_K8S_SERVICE_ACCOUNT"])
    assert job_account["automountServiceAccountToken"] is False
    # with another trigger the sidecar gets no API access at all
    local = render((), ("monitor.settings.trigger=local",))
    assert not [d for d in local if d["kind"] in {"Role", "RoleBinding"}]


def test_retraining_cronjob_is_a_suspended_template_and_batch_is_indexed() -> None:
    docs = render((), ALL_ON)
    cron = find(docs, "CronJob")
    assert cron["spec"]["suspend"] is True
    assert containers(cron)["retrain"]["args"] == ["retrain", "--name", "demo", "--trigger", "schedule"]
    # it fetches labelled data from the sidecar with the admin key; batch and bootstrap get none
    assert secret_refs(containers(cron)["retrain"]) == {
        "MODELLOOP_TRAINING_SIDECAR_KEY": {"name": KEYS_SECRET, "key": "api-key"}}
    for job in [d for d in docs if d["kind"] == "Job"]:
        assert not [r for c in containers(job).values() for r in secret_refs(c).values()
                    if r["name"] == KEYS_SECRET], job["metadata"]["name"]
    batch = find(docs, "Job", f"{NAME}-modelloop-batch-1")
    assert batch["spec"]["completionMode"] == "Indexed"
    (container,) = containers(batch).values()
    assert container["args"][:3] == ["batch-shard", "/var/lib/modelloop/batch/in", "/var/lib/modelloop/batch/out"]
    completions = {e["name"]: e["value"] for e in container["env"]}["JOB_COMPLETIONS"]
    assert completions == str(batch["spec"]["completions"])


def _peer_admits(peer: dict, labels: dict[str, str]) -> bool:
    """A NetworkPolicy `from` peer of this namespace whose pod selector matches ``labels``."""
    return "namespaceSelector" not in peer and peer["podSelector"]["matchLabels"].items() <= labels.items()


def test_sidecar_started_jobs_work_with_the_charts_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Job the sidecar itself builds (monitoring/jobs.py, monitoring/triggers_cluster.py) from
    the settings and keys the chart gives it: valid, in this release's account, claim and image,
    told the Service's URL, its admin key a reference to the keys Secret (never the key itself),
    and let through the NetworkPolicy to fetch the labelled data."""
    import shlex
    from dataclasses import replace

    from monitoring.jobs import build_trigger, job_env
    from monitoring.triggers import JobRequest, render_command

    docs = render()
    settings = monitor_settings(resolve_env(docs, containers(find(docs, "Deployment"))["monitor"]),
                                monkeypatch)
    request = JobRequest(job_id="retrain-demo-1", model="demo", version=1, trigger="alertmanager",
                         reason="ModelloopDataDrift", env=job_env(settings))
    request = replace(request, command=render_command(settings.retrain_command, request))
    assert request.command == ["modelloop", "retrain", "--name", "demo", "--trigger", "alertmanager"]
    job = build_trigger(settings).manifest(request)  # type: ignore[attr-defined]
    kubernetes_validate.validate(job, KUBE_VERSIONS[0], strict=True)
    service = find(docs, "Service")
    port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "monitor")
    url = f"http://{service['metadata']['name']}.models.svc:{port}"
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MODELLOOP_TRAINING_SIDECAR_URL"]["value"] == url
    assert env["MODELLOOP_TRAINING_SIDECAR_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": KEYS_SECRET, "key": "api-key"}
    assert settings.api_key.get_secret_value() not in json.dumps(job)
    assert settings_env(docs)["MODELLOOP_TRAINING_SIDECAR_URL"] == url  # the chart's own jobs
    assert find(docs, "ServiceAccount", pod["serviceAccountName"])
    assert find(docs, "PersistentVolumeClaim", pod["volumes"][0]["persistentVolumeClaim"]["claimName"])
    assert container["image"] == containers(find(docs, "Deployment"))["serving"]["image"]
    policy = find(docs, "NetworkPolicy", f"{NAME}-modelloop")
    (monitor_rule,) = [r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == "monitor"]
    job_labels = job["spec"]["template"]["metadata"]["labels"]
    cron_labels = find(docs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    assert any(_peer_admits(p, job_labels) for p in monitor_rule["from"])
    assert any(_peer_admits(p, cron_labels) for p in monitor_rule["from"])
    # and the retraining command reads what it is given
    program = request.command[0]
    help_text = run([str(Path(sys.executable).with_name(program)), "retrain", "--help"], timeout=60)
    assert "--trigger" in help_text.stdout, help_text.stdout + help_text.stderr
    assert {"sidecar_url", "sidecar_key"} <= set(settings_class("MODELLOOP_TRAINING_").model_fields)
    assert shlex.split(settings.retrain_command)[0] == program


def test_a_retrain_command_of_ones_own_replaces_the_default() -> None:
    env = settings_env(render((), ("monitor.settings.retrain_command=my-retrain {model}",)))
    assert env["MODELLOOP_MONITOR_RETRAIN_COMMAND"] == "my-retrain {model}"
