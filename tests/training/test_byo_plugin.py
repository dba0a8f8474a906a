"""An architecture installed as a plugin (an entry point in the group `modelloop.architectures`,
found through importlib.metadata) trained by name with `modelloop train --model wide`, retrained
by the job the sidecar's policy starts after a drift, quantized and fine-tuned with `--init-from`; and, where
the plugin is not installed, each command's one-line refusal, exit 2.

The plugin is "installed" for the subprocesses only: a package and its dist-info directory (with
its entry_points.txt, which is what importlib.metadata reads) in a temporary directory on their
PYTHONPATH; the test's own environment is left as it is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from modelloop.registry import Registry
from modelloop.synthetic import TARGET, SyntheticTask
from tests.monitoring.helpers import sidecar_process, wait_for_job
from tests.training.test_retrain import SHIFT, _send

MODELLOOP = str(Path(sys.executable).with_name("modelloop"))
REFERENCE = "plugnets:Wide"
pytestmark = [pytest.mark.integration, pytest.mark.slow]

PLUGIN = '''"""A plugin's architecture: a wide hidden layer with a skip connection."""

import torch
from torch import nn


class Wide(nn.Module):
    def __init__(self, n_features: int, n_outputs: int, width: int = 48) -> None:
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(n_features, width), nn.ReLU(),
                                    nn.Linear(width, n_features))
        self.head = nn.Linear(n_features, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(x + self.hidden(x)))
'''


def install_plugin(site: Path) -> Path:
    (site / "plugnets").mkdir(parents=True)
    (site / "plugnets" / "__init__.py").write_text(PLUGIN)
    info = site / "plugnets-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plugnets\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[modelloop.architectures]\nwide = {REFERENCE}\n")
    return site


def run(home: Path, cwd: Path, *args: str, site: Path | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"MODELLOOP_HOME": str(home), "MODELLOOP_TRAINING_EPOCHS": "30",
                "MODELLOOP_TRAINING_PROGRESS": "false"})
    if site is not None:
        env["PYTHONPATH"] = str(site)
    return subprocess.run([MODELLOOP, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def plugged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(site, home, workdir): the plugin, and `demo` v1 trained with `--model wide`."""
    root = tmp_path_factory.mktemp("plugin")
    site, home, workdir = install_plugin(root / "site"), root / "home", root / "work"
    workdir.mkdir()
    SyntheticTask(seed=0).sample(2000, seed=1).to_csv(workdir / "train.csv", index=False)
    done = run(home, workdir, "train", "--data", "train.csv", "--target", TARGET, "--model",
               "wide", "--param", "width=32", "--name", "demo", "--promote", "--json", site=site)
    assert done.returncode == 0, done.stderr
    return site, home, workdir


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # the retraining job, where the plugin is not installed
        (["retrain", "--name", "demo", "--sidecar-url", "http://127.0.0.1:9"],
         "error: demo v1 cannot be retrained: architecture 'plugnets:Wide' cannot be imported: "
         "ModuleNotFoundError: No module named 'plugnets' (install the package that defines it "
         "where the job runs)"),
        # fine-tuning from a version the plugin made
        (["train", "--data", "train.csv", "--target", TARGET, "--init-from", "demo@1"],
         "error: architecture 'plugnets:Wide' cannot be imported: ModuleNotFoundError: No module "
         "named 'plugnets'"),
    ],
    ids=["retrain", "init-from"],
)
def test_without_the_plugin(plugged: tuple[Path, Path, Path], tmp_path: Path, args: list[str],
                            message: str) -> None:
    _, home, workdir = plugged
    before = [m.version for m in Registry(home / "registry").versions("demo")]
    done = run(home, workdir, *args, site=None)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(message), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert [m.version for m in Registry(home / "registry").versions("demo")] == before


def test_an_unknown_name_lists_the_installed_plugins(plugged: tuple[Path, Path, Path]) -> None:
    site, home, workdir = plugged
    done = run(home, workdir, "train", "--data", "train.csv", "--target", TARGET, "--model",
               "narrow", site=site)
    assert done.returncode == 2
    assert "unknown architecture 'narrow'" in done.stderr and "wide" in done.stderr


def test_a_parameter_the_plugin_does_not_take(plugged: tuple[Path, Path, Path]) -> None:
    site, home, workdir = plugged
    done = run(home, workdir, "train", "--data", "train.csv", "--target", TARGET, "--model",
               "wide", "--param", "depth=3", site=site)
    assert done.returncode == 2
    assert done.stderr == ("error: invalid option --param: Value error, plugnets:Wide takes no "
                           "parameter depth (it takes n_features, n_outputs, width)\n")



def test_a_plugin_is_trained_retrained_quantized_and_fine_tuned(plugged: tuple[Path, Path, Path],
                                                                tmp_path: Path) -> None:
    site, home, workdir = plugged
    registry = Registry(home / "registry")
    v1 = registry.get("demo", 1).metadata
    assert v1.config["architecture"] == REFERENCE  # the entry point's target, not its name
    assert v1.config["model"] == {"width": 32}
    assert v1.architecture == REFERENCE and v1.metrics["accuracy"] > 0.7

    # production drifts; the sidecar's policy sees it and starts the retraining job, whose
    # environment has the plugin
    task = SyntheticTask(seed=0)
    policy = tmp_path / "policy.yaml"
    policy.write_text("defaults: {for: 0s, cooldown: 1h}\n"
                      "rules:\n  - {name: data-drift, metric: data_drift, min_samples: 500, action: retrain}\n")
    with sidecar_process(home, tmp_path / "sidecar.log", PYTHONPATH=str(site),
                         MODELLOOP_TRAINING_EPOCHS="30", MODELLOOP_MONITOR_POLICY_FILE=str(policy),
                         MODELLOOP_MONITOR_CHECK_INTERVAL_S="3600", MODELLOOP_MONITOR_MIN_WINDOW_ROWS="500",
                         MODELLOOP_MONITOR_RETRAIN_COMMAND=f"{MODELLOOP} retrain --name {{model}} "
                                                           "--trigger {trigger}") as sidecar:
        _send(sidecar.url, registry, task.sample(1000, seed=51, shift=SHIFT, concept=1.0),
              time.time() - 60)
        checked = httpx.post(f"{sidecar.url}/check", timeout=120)  # the check a timer runs
        assert checked.status_code == 200, checked.text
        assert checked.json()["models"]["demo"]["drift"]["drifted_features"], checked.text
        jobs = httpx.get(f"{sidecar.url}/jobs", timeout=30).json()["jobs"]
        assert [j["trigger"] for j in jobs] == ["policy"], jobs
        job = wait_for_job(sidecar.url)
    assert job["status"] == "succeeded", (home / "jobs" / f"{job['id']}.log").read_text()
    v2 = registry.get("demo", 2).metadata
    assert v2.config["architecture"] == REFERENCE and v2.parent_version == 1
    assert v2.lineage["fine_tuned_from"]["tensors_fresh"] == []  # the plugin's own tensors

    done = run(home, workdir, "quantize", "demo", "--version", "1", "--method", "dynamic",
               "--json", site=site)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["version"] == 3

    # fine-tuned on new data from v2's weights, under a new name
    task.sample(800, seed=52, shift=SHIFT, concept=1.0).to_csv(workdir / "new.csv", index=False)
    done = run(home, workdir, "train", "--data", "new.csv", "--target", TARGET, "--init-from",
               "demo@2", "--name", "demo-ft", "--json", site=site)
    assert done.returncode == 0, done.stderr
    tuned = registry.get("demo-ft", 1).metadata
    assert tuned.config["architecture"] == REFERENCE
    assert tuned.lineage["fine_tuned_from"]["version"] == 2
