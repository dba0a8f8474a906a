"""The Helm chart rendered for the tests of tests/deploy/test_helm*.py: the cases (values and
--set lists), ``render`` (cached, so each case renders once per session) and the lookups into
the rendered manifests."""

from __future__ import annotations

import base64
import functools
import os
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy._support import (
    CHART,
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
