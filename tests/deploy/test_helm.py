"""The Helm chart: helm lint, helm template with the default and GPU values, every rendered
manifest against the Kubernetes schemas (kubernetes-validate, offline), and the bits that
matter checked one by one."""

from __future__ import annotations

import base64
import functools
import json
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy._support import (
    CHART,
    DASHBOARDS,
    RULES,
    SETTINGS_CLASSES,
    run,
    settings_class,
    tool,
)

NAME = "ml"
GPU_VALUES = CHART / "values-gpu.yaml"
# everything optional switched on, so every template is rendered and validated
ALL_ON = (
    "batch.enabled=true", "bootstrap.enabled=true", "serviceMonitor.enabled=true",
    "prometheusRule.enabled=true", "alertmanagerConfig.enabled=true", "apiKey.value=s3cret",
    "monitor.store.url=postgresql://ml@db:5432/events",
)
# Kubernetes versions validated: the chart's minimum (Chart.yaml kubeVersion) and the newest
# schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
# prometheus-operator kinds: no schema ships offline; test_operator_resources checks them.
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule", "AlertmanagerConfig"}
CASES = {
    "default": ((), ()),
    "gpu": ((GPU_VALUES,), ()),
    "all-on": ((), ALL_ON),
    "gpu-all-on": ((GPU_VALUES,), ALL_ON),
}
# schema validation covers the chart without its sidecar too
SCHEMA_CASES = {**CASES, "no-sidecar": ((), ("monitor.enabled=false", *ALL_ON))}


@functools.cache
def render(values: tuple = (), sets: tuple = (), extra: tuple = ()) -> tuple[dict[str, Any], ...]:
    args = [tool("helm"), "template", NAME, str(CHART), "--namespace", "models", *extra]
    for path in values:
        args += ["-f", str(path)]
    for item in sets:
        args += ["--set", item]
    result = run(args)
    assert result.returncode == 0, result.stderr
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def find(docs: tuple[dict, ...], kind: str, name: str | None = None) -> dict:
    matches = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(matches) == 1, f"{kind} {name}: {len(matches)} rendered"
    return matches[0]


def containers(doc: dict) -> dict[str, dict]:
    spec = doc["spec"]
    pod = (spec.get("jobTemplate", {}).get("spec", spec))["template"]["spec"]
    return {c["name"]: c for c in pod["containers"]}


def pod_spec(doc: dict) -> dict:
    spec = doc["spec"]
    return spec.get("jobTemplate", {}).get("spec", spec)["template"]["spec"]


def workloads(docs: tuple[dict, ...]) -> list[dict]:
    return [d for d in docs if d["kind"] in {"Deployment", "Job", "CronJob"}]


def settings_env(docs: tuple[dict, ...]) -> dict[str, str]:
    return find(docs, "ConfigMap", f"{NAME}-modelloop-settings")["data"]


# ----------------------------------------------------------------------------- the sidecar's keys
KEYS_SECRET = f"{NAME}-modelloop-monitor-keys"
# the sidecar's variable of each data key of the keys Secret (monitoring/settings.py)
MONITOR_KEY_ENV = {
    "MODELLOOP_MONITOR_API_KEY": "api-key",
    "MODELLOOP_MONITOR_INGEST_KEY": "ingest-key",
    "MODELLOOP_MONITOR_FEEDBACK_KEY": "feedback-key",
    "MODELLOOP_MONITOR_ALERTMANAGER_KEY": "alertmanager-key",
}
# the cases with a sidecar (its keys are checked in each)
KEYED_CASES = {
    **CASES,
    "existing-keys": ((), ("monitor.keys.existingSecret=my-keys", *ALL_ON)),
    "local-trigger": ((), ("monitor.settings.trigger=local",)),
    # values reused (helm upgrade --reuse-values) from a release before monitor.keys existed
    "reused-values": ((), ("monitor.keys=null",)),
}


def secret_refs(container: dict) -> dict[str, dict]:
    """The container's env read from Secrets: variable -> {name, key}."""
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})}


def secret_values(docs: tuple[dict, ...], name: str) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in find(docs, "Secret", name)["data"].items()}


def resolve_env(docs: tuple[dict, ...], container: dict) -> dict[str, str]:
    """The environment a container starts with: the settings ConfigMap, then its own env with
    each secretKeyRef resolved (a Secret the chart does not render holds a stand-in key)."""
    env = dict(settings_env(docs))
    rendered = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
    for entry in container.get("env", []):
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref is None:
            env[entry["name"]] = entry["value"]
        elif ref["name"] in rendered:
            env[entry["name"]] = secret_values(docs, ref["name"])[ref["key"]]
        else:
            env[entry["name"]] = f"stand-in-{ref['key']}-0123456789"
    return env


def monitor_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """MonitorSettings as the sidecar builds them from this environment (and nothing else)."""
    for key in [k for k in os.environ if k.startswith("MODELLOOP_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return settings_class("MODELLOOP_MONITOR_")()


# ----------------------------------------------------------------------------- the tools
@pytest.mark.parametrize("values", [(), (GPU_VALUES,)], ids=["default", "gpu"])
def test_helm_lint(values: tuple) -> None:
    args = [tool("helm"), "lint", "--strict", str(CHART)]
    for path in values:
        args += ["-f", str(path)]
    result = run(args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("case", sorted(SCHEMA_CASES))
@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(case: str, version: str) -> None:
    errors = []
    for doc in render(*SCHEMA_CASES[case]):
        if doc["kind"] in OPERATOR_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
    assert not errors, "\n".join(errors)


def test_schema_validation_catches_a_typo() -> None:
    deployment = json.loads(json.dumps(find(render(), "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kubernetes_validate.ValidationError, match="'periodSecond' was unexpected"):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        # the model to serve is required
        (("model=",), "values: `model` (the registered model to serve) is required"),
        # a typo in a key is caught by values.schema.json, not silently ignored
        (("serving.setings.workers=2",), "at '/serving': additional properties 'setings' not allowed"),
        # a store the sidecar cannot use
        (("monitor.store.url=mysql://db/events",), "at '/monitor/store/url': 'mysql://db/events' does not match pattern"),
        # zero GPUs asked for while GPUs are enabled
        (("serving.gpu.enabled=true", "serving.gpu.count=0"), "at '/serving/gpu/count': minimum"),
        # a settings key that is no identifier
        (("serving.settings.Max-Rows=3",), "invalid propertyName 'Max-Rows'"),
        # keys given as settings would land in the ConfigMap: refused, each where it was given
        (("monitor.settings.api_key=0123456789abcdef",),
         "values: monitor.settings.api_key would put a key into the settings ConfigMap"),
        (("monitor.settings.feedback_key=0123456789abcdef",),
         "values: monitor.settings.feedback_key would put a key into the settings ConfigMap"),
        (("serving.settings.sidecar_key=0123456789abcdef",),
         "values: serving.settings.sidecar_key would put a key into the settings ConfigMap"),
        (("jobs.trainingSettings.sidecar_key=0123456789abcdef",),
         "values: jobs.trainingSettings.sidecar_key would put a key into the settings ConfigMap"),
        # a typo in the keys' Secret is not silently a generated one
        (("monitor.keys.existingsecret=my-keys",),
         "at '/monitor/keys': additional properties 'existingsecret' not allowed"),
    ],
)
def test_bad_values_fail_with_a_clear_message(sets: tuple, message: str) -> None:
    args = [tool("helm"), "template", NAME, str(CHART)]
    for item in sets:
        args += ["--set", item]
    result = run(args)
    assert result.returncode != 0
    assert message in result.stderr


# ----------------------------------------------------------------------------- the pod
def test_serving_and_sidecar_share_one_pod_and_one_settings_configmap() -> None:
    deployment = find(render(), "Deployment")
    pods = containers(deployment)
    assert set(pods) == {"serving", "monitor"}
    assert pods["serving"]["args"] == ["serve"] and pods["monitor"]["args"] == ["monitor"]
    for container in pods.values():
        assert container["envFrom"] == [{"configMapRef": {"name": f"{NAME}-modelloop-settings"}}]
    # the sidecar watches the serving process: one process namespace, one run dir
    spec = pod_spec(deployment)
    assert spec["shareProcessNamespace"] is True
    for container in pods.values():
        assert {"name": "run", "mountPath": "/run/modelloop"} in container["volumeMounts"]


def test_probes() -> None:
    pods = containers(find(render(), "Deployment"))
    serving = pods["serving"]
    assert serving["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert serving["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert serving["startupProbe"]["failureThreshold"] * serving["startupProbe"]["periodSeconds"] >= 120
    # the sidecar's routes (monitoring/app.py)
    monitor = pods["monitor"]
    assert monitor["livenessProbe"]["httpGet"] == {"path": "/live", "port": "monitor"}
    assert monitor["startupProbe"]["httpGet"] == {"path": "/live", "port": "monitor"}
    assert monitor["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "monitor"}


@pytest.mark.parametrize("case", sorted(SCHEMA_CASES))
def test_every_pod_runs_non_root_on_a_read_only_root(case: str) -> None:
    for doc in workloads(render(*SCHEMA_CASES[case])):
        spec = pod_spec(doc)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert "emptyDir" in volumes["tmp"]
        for name, container in containers(doc).items():
            where = f"{doc['kind']}/{doc['metadata']['name']}/{name}"
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"], where


@pytest.mark.parametrize("case", sorted(CASES))
def test_only_the_repos_image_and_entrypoint_roles(case: str) -> None:
    roles = {"serve", "monitor", "retrain", "batch", "batch-shard", "bootstrap", "modelloop"}
    for doc in workloads(render(*CASES[case])):
        for container in containers(doc).values():
            assert container["image"] == "modelloop:0.1.0"
            assert container["args"][0] in roles


@pytest.mark.parametrize(
    ("sets", "serving_image"),
    [
        # default: one image, the full one, everywhere
        ((), "modelloop:0.1.0"),
        # the Dockerfile's serving target (no torch, no Evidently) for the serving container only
        (("serving.image.tag=0.1.0-serving",), "modelloop:0.1.0-serving"),
        (("serving.image.repository=registry.example.com/modelloop-serving",),
         "registry.example.com/modelloop-serving:0.1.0"),
    ],
)
def test_serving_may_run_the_serving_image_while_sidecar_and_jobs_keep_the_full_one(
    sets: tuple[str, ...], serving_image: str
) -> None:
    docs = render((), (*ALL_ON, *sets))
    for doc in workloads(docs):
        for name, container in containers(doc).items():
            expected = serving_image if (doc["kind"], name) == ("Deployment", "serving") else "modelloop:0.1.0"
            assert container["image"] == expected, (doc["kind"], name)
    # the retraining Jobs the sidecar starts train with torch: the full image
    assert settings_env(docs)["MODELLOOP_MONITOR_JOB_IMAGE"] == "modelloop:0.1.0"


def test_gpu_values_request_a_gpu_for_serving_only() -> None:
    gpu = containers(find(render((GPU_VALUES,)), "Deployment"))
    assert gpu["serving"]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["serving"]["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in gpu["monitor"]["resources"].get("limits", {})
    assert settings_env(render((GPU_VALUES,)))["MODELLOOP_SERVING_PROVIDERS"] == "cuda"
    spec = pod_spec(find(render((GPU_VALUES,)), "Deployment"))
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    default = containers(find(render(), "Deployment"))
    assert "nvidia.com/gpu" not in default["serving"]["resources"]["limits"]


def test_service_hpa_pdb_and_network_policy_select_the_serving_pods() -> None:
    docs = render()
    deployment = find(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = find(docs, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"] for c in containers(deployment).values() for p in c["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} == ports == {"http", "grpc", "monitor"}
    hpa = find(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert find(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    policy = find(docs, "NetworkPolicy", f"{NAME}-modelloop")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    monitor_rule = next(r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == "monitor")
    assert monitor_rule["from"], "the sidecar's port is not open to everyone"


def test_registry_on_a_claim_or_any_volume() -> None:
    docs = render()
    claim = find(docs, "PersistentVolumeClaim")
    volumes = {v["name"]: v for v in pod_spec(find(docs, "Deployment"))["volumes"]}
    assert volumes["registry"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert settings_env(docs)["MODELLOOP_MONITOR_K8S_REGISTRY_CLAIM"] == claim["metadata"]["name"]
    # object storage through a CSI driver instead of a claim
    csi = render((), ("registry.volume.csi.driver=s3.csi.aws.com",
                      "registry.volume.csi.volumeAttributes.bucketName=models"))
    assert not [d for d in csi if d["kind"] == "PersistentVolumeClaim"]
    volumes = {v["name"]: v for v in pod_spec(find(csi, "Deployment"))["volumes"]}
    assert volumes["registry"] == {"name": "registry", "csi": {
        "driver": "s3.csi.aws.com", "volumeAttributes": {"bucketName": "models"}}}


def test_api_key_and_store_url_come_from_secrets_not_the_configmap() -> None:
    docs = render((), ALL_ON)
    env = settings_env(docs)
    assert "s3cret" not in json.dumps(env) and "postgresql" not in json.dumps(env)
    pods = containers(find(docs, "Deployment"))
    (key,) = [e for e in pods["serving"]["env"] if e["name"] == "MODELLOOP_SERVING_API_KEY"]
    secret = find(docs, "Secret", key["valueFrom"]["secretKeyRef"]["name"])
    assert key["valueFrom"]["secretKeyRef"]["key"] in secret["data"]
    (store,) = [e for e in pods["monitor"]["env"] if e["name"] == "MODELLOOP_MONITOR_STORE_URL"]
    assert find(docs, "Secret", store["valueFrom"]["secretKeyRef"]["name"])


@pytest.mark.parametrize("case", sorted(KEYED_CASES))
def test_sidecar_and_serving_take_their_role_keys_from_the_keys_secret(case: str) -> None:
    docs = render(*KEYED_CASES[case])
    name = "my-keys" if case == "existing-keys" else KEYS_SECRET
    pods = containers(find(docs, "Deployment"))
    monitor = secret_refs(pods["monitor"])
    # required references (no `optional`): a Secret without one of them stops the pod, loudly
    assert {k: monitor.get(k) for k in MONITOR_KEY_ENV} == {
        k: {"name": name, "key": key} for k, key in MONITOR_KEY_ENV.items()}
    assert secret_refs(pods["serving"])["MODELLOOP_SERVING_SIDECAR_KEY"] == {"name": name, "key": "ingest-key"}
    assert settings_env(docs)["MODELLOOP_MONITOR_K8S_KEY_SECRET"] == name


@pytest.mark.parametrize("case", sorted(KEYED_CASES))
def test_the_sidecar_never_listens_beyond_loopback_without_a_key(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from monitoring.auth import check_exposure, is_loopback

    docs = render(*KEYED_CASES[case])
    monitor = containers(find(docs, "Deployment"))["monitor"]
    settings = monitor_settings(resolve_env(docs, monitor), monkeypatch)
    # it serves the Service, so it listens on the pod's address: with every role's key
    assert not is_loopback(settings.host)
    assert settings.allow_unauthenticated is False
    assert None not in (settings.api_key, settings.ingest_key, settings.feedback_key,
                        settings.alertmanager_key)
    check_exposure(settings)


def test_generated_keys_are_long_distinct_and_new_for_each_install() -> None:
    keys = secret_values(render(), KEYS_SECRET)
    assert set(keys) == set(MONITOR_KEY_ENV.values())
    assert len(set(keys.values())) == 4
    assert all(len(key) >= 32 and key.isalnum() for key in keys.values())
    # no cluster to read them back from: another install gets keys of its own, not a constant
    other = secret_values(render((), ("nameOverride=modelloop",)), KEYS_SECRET)
    assert not set(keys.values()) & set(other.values())


@pytest.mark.parametrize("case", sorted(KEYED_CASES))
def test_keys_appear_in_no_configmap_job_or_pod_spec(case: str) -> None:
    docs = render(*KEYED_CASES[case])
    assert not [k for k in settings_env(docs) if k.endswith("_KEY")]
    rendered = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
    keys = secret_values(docs, KEYS_SECRET).values() if KEYS_SECRET in rendered else ()
    for doc in docs:
        if doc["kind"] != "Secret":
            text = json.dumps(doc)
            assert not [k for k in keys if k in text], f"{doc['kind']}/{doc['metadata']['name']} holds a key"


def test_an_existing_keys_secret_is_used_and_none_is_made() -> None:
    docs = render(*KEYED_CASES["existing-keys"])
    assert KEYS_SECRET not in {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
    key_vars = {*MONITOR_KEY_ENV, "MODELLOOP_SERVING_SIDECAR_KEY", "MODELLOOP_TRAINING_SIDECAR_KEY"}
    refs = {(doc["metadata"]["name"], var): ref["name"] for doc in workloads(docs)
            for c in containers(doc).values() for var, ref in secret_refs(c).items() if var in key_vars}
    assert len(refs) == len(key_vars) and set(refs.values()) == {"my-keys"}, refs
    assert settings_env(docs)["MODELLOOP_MONITOR_K8S_KEY_SECRET"] == "my-keys"
    webhook = find(docs, "AlertmanagerConfig")["spec"]["receivers"][0]["webhookConfigs"][0]
    assert webhook["httpConfig"]["authorization"]["credentials"]["name"] == "my-keys"


@contextmanager
def fake_cluster(tmp_path: Path, secrets: dict[str, dict[str, str]]) -> Iterator[Path]:
    """A Kubernetes API just large enough for `helm template --dry-run=server`: discovery of the
    chart's kinds, nothing stored but ``secrets`` (name -> data) of this release. Yields the
    kubeconfig."""
    kinds: dict[str, set[str]] = {}
    for doc in render():
        kinds.setdefault(doc["apiVersion"], set()).add(doc["kind"])
    plural = {kind: (kind[:-1] + "ies" if kind.endswith("y") else kind + "s").lower()
              for names in kinds.values() for kind in names}

    def resources(group_version: str) -> dict:
        return {"kind": "APIResourceList", "groupVersion": group_version, "resources": [
            {"name": plural[k], "singularName": k.lower(), "namespaced": True, "kind": k,
             "verbs": ["get", "list"]} for k in sorted(kinds[group_version])]}

    def secret(name: str, data: dict[str, str]) -> dict:
        # what Helm wrote on install: it adopts nothing else
        return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": name, "namespace": "models",
                             "labels": {"app.kubernetes.io/managed-by": "Helm"},
                             "annotations": {"meta.helm.sh/release-name": NAME,
                                             "meta.helm.sh/release-namespace": "models"}},
                "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}

    groups = sorted(gv for gv in kinds if "/" in gv)
    routes = {
        "/version": {"major": "1", "minor": "31", "gitVersion": "v1.31.0"},
        "/api": {"kind": "APIVersions", "versions": ["v1"]},
        "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            {"name": gv.split("/")[0], "versions": [{"groupVersion": gv, "version": gv.split("/")[1]}],
             "preferredVersion": {"groupVersion": gv, "version": gv.split("/")[1]}} for gv in groups]},
        "/api/v1": resources("v1"),
        **{f"/apis/{gv}": resources(gv) for gv in groups},
        **{f"/api/v1/namespaces/models/secrets/{n}": secret(n, d) for n, d in secrets.items()},
    }

    class Api(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = routes.get(self.path.partition("?")[0])
            self.send_response(200 if body else 404)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(body or {"kind": "Status", "apiVersion": "v1",
                                                 "status": "Failure", "reason": "NotFound",
                                                 "code": 404}).encode())

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Api)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
        "users": [{"name": "fake", "user": {"token": "fake"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
    }))
    try:
        yield kubeconfig
    finally:
        server.shutdown()
        thread.join()


@pytest.mark.parametrize(
    "stored",
    [
        # an upgrade: every key of the installed release kept
        {key: f"kept-{key}-0123456789" for key in MONITOR_KEY_ENV.values()},
        # a Secret from before a role existed: the others kept, the new one made
        {key: f"kept-{key}-0123456789" for key in ("api-key", "ingest-key", "feedback-key")},
    ],
    ids=["all-kept", "one-new"],
)
def test_an_upgrade_keeps_the_generated_keys(stored: dict[str, str], tmp_path: Path) -> None:
    with fake_cluster(tmp_path, {KEYS_SECRET: stored}) as kubeconfig:
        docs = render((), (), ("--dry-run=server", "--disable-openapi-validation",
                               "--kubeconfig", str(kubeconfig)))
    keys = secret_values(docs, KEYS_SECRET)
    assert set(keys) == set(MONITOR_KEY_ENV.values())
    assert {k: v for k, v in keys.items() if k in stored} == stored
    assert all(len(v) >= 32 for k, v in keys.items() if k not in stored)


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


# ----------------------------------------------------------------------------- settings
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("prefix", sorted(SETTINGS_CLASSES))
def test_configmap_maps_one_to_one_onto_settings(
    case: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    values, sets = CASES[case]
    docs = render(values, (*sets, "jobs.trainingSettings.epochs=20"))
    env = {k: v for k, v in settings_env(docs).items() if k.startswith(prefix)}
    from_secrets = {
        e["name"] for c in containers(find(docs, "Deployment")).values()
        for e in c.get("env", []) if e["name"].startswith(prefix)
    }
    assert env, f"nothing set with {prefix}"
    cls = settings_class(prefix)
    unknown = {k.removeprefix(prefix).lower() for k in {*env, *from_secrets}} - set(cls.model_fields)
    assert not unknown, f"no such settings in {cls.__name__}: {sorted(unknown)}"
    # and the values validate as the process reads them: from its environment
    for key in [k for k in os.environ if k.startswith("MODELLOOP_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cls()


def test_policy_configmap_is_a_valid_sidecar_policy(tmp_path) -> None:
    from monitoring.policy import load_policy

    policy = find(render(), "ConfigMap", f"{NAME}-modelloop-policy")["data"]["policy.yaml"]
    path = tmp_path / "policy.yaml"
    path.write_text(policy)
    load_policy(path)
    assert settings_env(render())["MODELLOOP_MONITOR_POLICY_FILE"] == "/etc/modelloop/policy/policy.yaml"


# ----------------------------------------------------------------------------- observability
def test_operator_resources() -> None:
    docs = render((), ALL_ON)
    service = find(docs, "Service")
    monitor = find(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    jobs = {e["port"]: e["relabelings"][0]["replacement"] for e in monitor["spec"]["endpoints"]}
    # the job names the rules and dashboards (and docker-compose's Prometheus) use
    assert jobs == {"http": "modelloop-serving", "monitor": "modelloop-monitor"}
    assert jobs.keys() <= {p["name"] for p in service["spec"]["ports"]}
    rule = find(docs, "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    am = find(docs, "AlertmanagerConfig")
    assert am["spec"]["route"]["matchers"] == [{"name": "action", "value": "retrain", "matchType": "="}]
    webhook = am["spec"]["receivers"][0]["webhookConfigs"][0]
    port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "monitor")
    assert webhook["url"] == f"http://{service['metadata']['name']}.models.svc:{port}/alertmanager"
    # with the sidecar's alertmanager key, read by the operator from the keys Secret
    assert webhook["httpConfig"] == {"authorization": {
        "type": "Bearer", "credentials": {"name": KEYS_SECRET, "key": "alertmanager-key"}}}
    assert "alertmanager-key" in find(docs, "Secret", KEYS_SECRET)["data"]
    # /metrics stays open: Prometheus scrapes both ports without a key
    for endpoint in monitor["spec"]["endpoints"]:
        assert not {"authorization", "bearerTokenSecret", "basicAuth", "oauth2"} & endpoint.keys()
    # without the CRDs nothing of the operator is rendered
    assert not [d for d in render() if d["kind"] in OPERATOR_KINDS]


def test_dashboard_configmaps_carry_the_files_unchanged() -> None:
    maps = [d for d in render() if d["kind"] == "ConfigMap" and "-dashboard-" in d["metadata"]["name"]]
    files = sorted(DASHBOARDS.glob("*.json"))
    assert len(maps) == len(files) == 3
    for path in files:
        (cm,) = [m for m in maps if path.name in m["data"]]
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["data"][path.name] == path.read_text().rstrip("\n")


def test_without_the_sidecar_its_alert_and_container_are_left_out() -> None:
    docs = render((), ("monitor.enabled=false", "prometheusRule.enabled=true"))
    rules = [r["alert"] for g in find(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"]]
    # it would fire for ever (serving scraped, no sidecar)
    assert "ModelloopSidecarDown" not in rules and "ModelloopServingDown" in rules
    assert set(containers(find(docs, "Deployment"))) == {"serving"}
    assert not [k for k in settings_env(docs) if k.startswith("MODELLOOP_MONITOR_")]
    assert "MODELLOOP_SERVING_SIDECAR_URL" not in settings_env(docs)
    # nor its keys, nor references to them
    assert KEYS_SECRET not in {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
    assert not [r for doc in workloads(docs) for c in containers(doc).values()
                for r in secret_refs(c).values() if r["name"] == KEYS_SECRET]


def test_chart_compose_and_package_agree_on_the_version() -> None:
    import re
    import tomllib

    from tests.deploy._support import ROOT

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert chart["appVersion"] == version
    compose = (ROOT / "docker-compose.yml").read_text()
    assert re.search(r"image: modelloop:\$\{MODELLOOP_TAG:-" + re.escape(version) + r"\}", compose)


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
