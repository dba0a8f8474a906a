"""The Helm chart's settings: its ConfigMap maps one to one onto each process's settings, and
its policy ConfigMap is a valid sidecar policy."""

from __future__ import annotations

import os

import pytest

from tests.deploy._helm import (
    CASES,
    NAME,
    containers,
    find,
    render,
    settings_env,
)
from tests.deploy._support import (
    SETTINGS_CLASSES,
    settings_class,
)


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


@pytest.mark.parametrize(("models", "served", "watched"), [
    ("", "demo", "demo"),                          # the one model of the release
    ("fraud", "fraud", "demo,fraud"),              # serving adds `model` itself (the default)
    (r"demo\,fraud", "demo,fraud", "demo,fraud"),
    ("fraud-*", "fraud-*", ""),                    # a glob: the sidecar watches every model
])
def test_models_serves_and_watches_more_than_one(models: str, served: str, watched: str) -> None:
    env = settings_env(render(sets=(f"models={models}",)))
    assert env["MODELLOOP_SERVING_MODEL"] == "demo"
    assert env["MODELLOOP_SERVING_MODELS"] == served
    assert env["MODELLOOP_MONITOR_MODELS"] == watched


def test_many_models_and_shadow_values_reach_serving() -> None:
    env = settings_env(render(sets=("serving.settings.max_loaded_models=5", "serving.settings.shadow=false",
                                    "jobs.trainingSettings.retrain_live_gate=true")))
    assert env["MODELLOOP_SERVING_MAX_LOADED_MODELS"] == "5"
    assert env["MODELLOOP_SERVING_SHADOW"] == "false"
    assert env["MODELLOOP_SERVING_SHADOW_QUEUE_ROWS"] == "4096"
    assert env["MODELLOOP_SERVING_SHADOW_SHARE"] == "1"
    assert env["MODELLOOP_TRAINING_RETRAIN_LIVE_GATE"] == "true"
