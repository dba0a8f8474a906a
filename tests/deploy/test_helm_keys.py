"""The Helm chart's keys: the API key and store URL from Secrets, the sidecar's role keys from
its keys Secret (generated, or an existing one; kept on upgrade), never in a ConfigMap or pod
spec, and a sidecar that never listens beyond loopback without a key."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.deploy._helm import (
    ALL_ON,
    KEYED_CASES,
    KEYS_SECRET,
    MONITOR_KEY_ENV,
    NAME,
    containers,
    find,
    monitor_settings,
    render,
    resolve_env,
    secret_refs,
    secret_values,
    settings_env,
    workloads,
)


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
