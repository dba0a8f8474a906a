"""The docker-compose stack, checked without a Docker engine: images and files that exist,
settings that exist, and Prometheus and Alertmanager configs their own tools accept."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy._support import ROOT, RULES, run, settings_class, tool

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
MODELLOOP = {name for name, s in SERVICES.items() if s.get("build")}
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERTMANAGER_CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"


def expand(value: str) -> str:
    """Compose's ${VAR:-default} with nothing set: the default."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))


def entrypoint_roles() -> set[str]:
    text = (ROOT / "deploy/docker/entrypoint.sh").read_text()
    return set(re.findall(r"^  ([a-z-]+)(?: \| [^)]*)?\)$", text, re.M))


def test_the_stack_has_its_services() -> None:
    assert {"serving", "monitor", "prometheus", "alertmanager", "grafana"} <= set(SERVICES)
    assert {"serving", "monitor", "bootstrap"} == MODELLOOP


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_images_are_pinned_or_built_here(name: str) -> None:
    service = SERVICES[name]
    if service.get("build"):
        assert service["build"]["dockerfile"] == "Dockerfile"
        assert (ROOT / service["build"]["context"] / "Dockerfile").is_file()
    else:
        _, _, tag = service["image"].partition(":")
        assert tag and tag != "latest", service["image"]


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_bind_mounts_exist_in_the_repo(name: str) -> None:
    for volume in SERVICES[name].get("volumes", []):
        source = volume.split(":")[0]
        if source.startswith("."):
            assert (ROOT / source).exists(), f"{name} mounts {source}, which is not in the repo"
        else:
            assert source in COMPOSE["volumes"], f"{name}: named volume {source} is not declared"


@pytest.mark.parametrize("name", sorted(MODELLOOP))
def test_modelloop_commands_are_entrypoint_roles(name: str) -> None:
    assert SERVICES[name]["command"][0] in entrypoint_roles()


@pytest.mark.parametrize("name", sorted(MODELLOOP))
def test_environment_is_made_of_real_settings(name: str) -> None:
    env = {k: expand(v) for k, v in SERVICES[name]["environment"].items()}
    assert env["MODELLOOP_HOME"] == "/var/lib/modelloop"
    for prefix in ("MODELLOOP_SERVING_", "MODELLOOP_MONITOR_", "MODELLOOP_TRAINING_"):
        values = {k.removeprefix(prefix).lower(): v for k, v in env.items() if k.startswith(prefix)}
        if not values:
            continue
        cls = settings_class(prefix)
        unknown = set(values) - set(cls.model_fields)
        assert not unknown, f"{name}: {prefix}* has no such settings: {sorted(unknown)}"
        cls(**values)  # and the values validate


def test_sidecar_lives_in_the_serving_namespaces_like_a_pod() -> None:
    monitor = SERVICES["monitor"]
    assert monitor["network_mode"] == "service:serving"
    assert monitor["pid"] == "service:serving"
    serving_env = {k: expand(v) for k, v in SERVICES["serving"]["environment"].items()}
    monitor_env = {k: expand(v) for k, v in monitor["environment"].items()}
    port = monitor_env["MODELLOOP_MONITOR_PORT"]
    assert serving_env["MODELLOOP_SERVING_SIDECAR_URL"] == f"http://127.0.0.1:{port}"
    assert f"{port}:{port}" in SERVICES["serving"]["ports"]
    assert monitor_env["MODELLOOP_MONITOR_SERVING_METRICS_URL"] == (
        f"http://127.0.0.1:{serving_env['MODELLOOP_SERVING_PORT']}/metrics"
    )


def test_promtool_accepts_the_prometheus_config() -> None:
    result = run([tool("promtool"), "check", "config", str(PROMETHEUS_CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_both_processes_under_the_rules_job_names() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {j["job_name"]: j["static_configs"][0]["targets"] for j in config["scrape_configs"]}
    serving_port = expand(SERVICES["serving"]["environment"]["MODELLOOP_SERVING_PORT"])
    monitor_port = expand(SERVICES["monitor"]["environment"]["MODELLOOP_MONITOR_PORT"])
    assert jobs["modelloop-serving"] == [f"serving:{serving_port}"]
    assert jobs["modelloop-monitor"] == [f"serving:{monitor_port}"]
    # the rules address exactly these jobs
    rules = RULES.read_text()
    assert 'job="modelloop-serving"' in rules and 'job="modelloop-monitor"' in rules


def test_prometheus_loads_the_chart_rules() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (pattern,) = config["rule_files"]
    mounts = dict(v.split(":")[:2][::-1] for v in SERVICES["prometheus"]["volumes"])
    target = next(t for t in mounts if Path(t).match(pattern))
    assert (ROOT / mounts[target]).resolve() == RULES.resolve()


def test_amtool_accepts_the_alertmanager_config() -> None:
    result = run([tool("amtool"), "check-config", str(ALERTMANAGER_CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("labels", "receivers"),
    [
        # drift and accuracy alerts start retraining, and people hear of them
        (["action=retrain", "alertname=ModelloopDataDrift"], "modelloop-retrain,people"),
        # everything else is for people only
        (["action=notify", "alertname=ModelloopLatencyP99High"], "people"),
    ],
)
def test_alertmanager_routes_retrain_alerts_to_the_sidecar(labels: list[str], receivers: str) -> None:
    result = run([tool("amtool"), "config", "routes", "test",
                  f"--config.file={ALERTMANAGER_CONFIG}", *labels])
    assert result.stdout.strip() == receivers, result.stdout + result.stderr


def test_alertmanager_webhook_is_the_sidecars_receiver() -> None:
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    (receiver,) = [r for r in config["receivers"] if r["name"] == "modelloop-retrain"]
    url = receiver["webhook_configs"][0]["url"]
    port = expand(SERVICES["monitor"]["environment"]["MODELLOOP_MONITOR_PORT"])
    assert url == f"http://serving:{port}/alertmanager"
    # every rule that asks for retraining reaches that route
    assert config["route"]["routes"][0]["matchers"] == ['action="retrain"']
