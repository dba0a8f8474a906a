"""The docker-compose stack, checked without a Docker engine: images and files that exist,
settings that exist, and Prometheus and Alertmanager configs their own tools accept."""

from __future__ import annotations

import os
import re
import stat
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
COMPOSE_KEYS = ROOT / "scripts" / "compose_keys.sh"
# the variables scripts/compose_keys.sh writes into .env, and the role each is the key of
KEY_VARS = {
    "MODELLOOP_MONITOR_API_KEY": "admin",
    "MODELLOOP_MONITOR_INGEST_KEY": "ingest",
    "MODELLOOP_MONITOR_FEEDBACK_KEY": "feedback",
    "MODELLOOP_MONITOR_ALERTMANAGER_KEY": "alertmanager",
}
# what .env holds after the script ran (stand-ins of the right form)
DOTENV = {name: f"{role}-0123456789abcdef" for name, role in KEY_VARS.items()}


class Unset(Exception):
    """A required variable (${VAR:?message}) is not set: compose stops with the message."""


def expand(value: str, env: dict[str, str] = DOTENV) -> str:
    """Compose's interpolation of ${VAR}, ${VAR:-default} and ${VAR:?message} from ``env``."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise Unset(f"{name}: {arg}")
        return arg if op == ":-" else ""

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, str(value))


def service_env(name: str, env: dict[str, str] = DOTENV) -> dict[str, str]:
    return {k: expand(v, env) for k, v in SERVICES[name].get("environment", {}).items()}


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


# the entrypoint's roles the serving image runs (it refuses monitor, retrain and bootstrap)
SERVING_IMAGE_ROLES = {"serve", "batch", "batch-shard", "healthcheck"}


@pytest.mark.parametrize("name", sorted(MODELLOOP))
def test_each_service_builds_a_target_that_runs_its_role(name: str) -> None:
    service = SERVICES[name]
    target = service["build"]["target"]
    assert re.search(rf"^FROM \S+ AS {target}$", (ROOT / "Dockerfile").read_text(), re.M)
    # one tag per target, so the two images do not overwrite each other
    assert service["image"].endswith("-serving") == (target == "serving")
    if target == "serving":
        assert service["command"][0] in SERVING_IMAGE_ROLES
    # the service that only serves gets the image without torch and Evidently
    assert (target == "serving") == (name == "serving")


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
    env = service_env(name)
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
    serving_env = service_env("serving")
    monitor_env = service_env("monitor")
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


# ----------------------------------------------------------------------------- the sidecar's keys
def test_sidecar_holds_every_role_key_and_serving_its_ingest_key() -> None:
    monitor, serving = service_env("monitor"), service_env("serving")
    assert {k: monitor.get(k) for k in KEY_VARS} == {k: DOTENV[k] for k in KEY_VARS}
    assert serving["MODELLOOP_SERVING_SIDECAR_KEY"] == DOTENV["MODELLOOP_MONITOR_INGEST_KEY"]
    # serving holds no other key of the sidecar's (least privilege)
    assert not {v for k, v in serving.items() if k != "MODELLOOP_SERVING_SIDECAR_KEY"} & set(DOTENV.values())


@pytest.mark.parametrize(("service", "variable"), [
    # each key the sidecar reads, and the one serving sends, is required: compose stops, naming the fix
    *(("monitor", name) for name in KEY_VARS),
    ("serving", "MODELLOOP_MONITOR_INGEST_KEY"),
])
def test_a_missing_key_stops_compose_with_the_fix(service: str, variable: str) -> None:
    without = {k: v for k, v in DOTENV.items() if k != variable}
    with pytest.raises(Unset, match=rf"^{variable}: run scripts/compose_keys.sh"):
        service_env(service, without)


def test_the_sidecar_never_listens_beyond_loopback_without_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from monitoring.auth import check_exposure, is_loopback

    for key in [k for k in os.environ if k.startswith("MODELLOOP_")]:
        monkeypatch.delenv(key)
    for key, value in service_env("monitor").items():
        monkeypatch.setenv(key, value)
    settings = settings_class("MODELLOOP_MONITOR_")()
    # published on the host, so beyond loopback: only with the admin key
    assert not is_loopback(settings.host)
    assert settings.api_key is not None and not settings.allow_unauthenticated
    check_exposure(settings)
    # and without the key there is no sidecar at all (the test above: compose stops)
    assert "MODELLOOP_MONITOR_ALLOW_UNAUTHENTICATED" not in SERVICES["monitor"]["environment"]


def test_alertmanager_sends_the_alertmanager_key_from_a_compose_secret() -> None:
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    (receiver,) = [r for r in config["receivers"] if r["name"] == "modelloop-retrain"]
    auth = receiver["webhook_configs"][0]["http_config"]["authorization"]
    assert auth.get("type", "Bearer") == "Bearer"
    path = Path(auth["credentials_file"])
    assert path.parent == Path("/run/secrets")  # where compose mounts a service's secrets
    assert path.name in SERVICES["alertmanager"]["secrets"]
    # the secret is the variable the sidecar takes its alertmanager key from
    source = COMPOSE["secrets"][path.name]["environment"]
    assert source == "MODELLOOP_MONITOR_ALERTMANAGER_KEY"
    assert SERVICES["monitor"]["environment"]["MODELLOOP_MONITOR_ALERTMANAGER_KEY"].startswith(f"${{{source}:?")


@pytest.mark.parametrize("name", ["prometheus", "alertmanager"])
def test_services_without_authentication_are_published_on_loopback_only(name: str) -> None:
    # an alert posted to an open Alertmanager would reach the sidecar with its key
    for port in SERVICES[name]["ports"]:
        assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_compose_keys_script_writes_strong_keys_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run([tool("shellcheck"), str(COMPOSE_KEYS)]).returncode == 0
    env_file = tmp_path / ".env"
    env_file.write_text("MODELLOOP_MODEL=churn\nMODELLOOP_MONITOR_FEEDBACK_KEY=")  # no newline
    result = run(["bash", str(COMPOSE_KEYS), str(env_file)])
    assert result.returncode == 0, result.stdout + result.stderr
    lines = env_file.read_text().splitlines()
    values = dict(line.split("=", 1) for line in lines)
    assert len(lines) == len(values) == 5  # nothing doubled, nothing run together
    assert values["MODELLOOP_MODEL"] == "churn"
    keys = {k: values[k] for k in KEY_VARS}
    assert len(set(keys.values())) == 4
    assert all(re.fullmatch(r"[0-9a-f]{64}", key) for key in keys.values())
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    # the sidecar takes them (its own checks on keys)
    for key in [k for k in os.environ if k.startswith("MODELLOOP_")]:
        monkeypatch.delenv(key)
    for key, value in service_env("monitor", keys).items():
        monkeypatch.setenv(key, value)
    settings_class("MODELLOOP_MONITOR_")()
    # a second run keeps them
    again = run(["bash", str(COMPOSE_KEYS), str(env_file)])
    assert again.returncode == 0 and env_file.read_text().splitlines() == lines


def test_the_keys_file_is_not_committed() -> None:
    result = run(["git", "check-ignore", "-q", ".env"])
    assert result.returncode == 0, ".env (the compose keys) is not gitignored"
