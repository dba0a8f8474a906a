"""The image's entrypoint, run directly (no Docker engine here) with the real `modelloop` CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from modelloop.ports import free_port
from tests.deploy._support import ENTRYPOINT, entrypoint_env, run, run_entrypoint, tool


def env_for(run_dir: Path, **extra: str) -> dict[str, str]:
    return entrypoint_env(run_dir, **extra)


def entrypoint(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_entrypoint(args, env)


def test_shellcheck() -> None:
    result = run([tool("shellcheck"), "--severity=style", str(ENTRYPOINT)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("args", "command", "usage"),
    [
        (["serve", "--help"], "serve", "Usage: modelloop serve"),
        (["monitor", "--help"], "monitor", "Usage: modelloop monitor"),
        (["retrain", "--help"], "retrain", "Usage: modelloop retrain"),
        (["batch", "--help"], "batch", "Usage: modelloop batch"),
        (["modelloop", "models", "--help"], "models", "Usage: modelloop models"),
    ],
)
def test_command_selects_the_modelloop_command(
    tmp_path: Path, args: list[str], command: str, usage: str
) -> None:
    result = entrypoint(args, env_for(tmp_path, MODELLOOP_PID_WAIT_S="0"))
    assert result.returncode == 0, result.stderr
    assert usage in result.stdout


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        # no command at all
        ([], {}, "modelloop-entrypoint: no command given"),
        # a typo
        (["srve"], {}, "modelloop-entrypoint: unknown command 'srve' (serve, monitor, retrain, batch, batch-shard, bootstrap, healthcheck, modelloop)"),
        # bootstrap without a model name
        (["bootstrap"], {}, "modelloop-entrypoint: bootstrap needs the model NAME (got nothing)"),
        # batch-shard without its folders
        (["batch-shard", "in"], {}, "modelloop-entrypoint: batch-shard needs IN_DIR OUT_DIR (got: in)"),
        # an input folder that is not there
        (["batch-shard", "/nonexistent/in", "out"], {"JOB_COMPLETION_INDEX": "0", "JOB_COMPLETIONS": "2"},
         "modelloop-entrypoint: batch-shard: input folder /nonexistent/in does not exist"),
        # not run by an Indexed Job
        (["batch-shard", "{tmp}", "out"], {}, "modelloop-entrypoint: batch-shard: JOB_COMPLETION_INDEX must be a number (got '')"),
        # zero shards
        (["batch-shard", "{tmp}", "out"], {"JOB_COMPLETION_INDEX": "0", "JOB_COMPLETIONS": "0"},
         "modelloop-entrypoint: batch-shard: JOB_COMPLETIONS must be a positive number (got '0')"),
        # an index past the last shard
        (["batch-shard", "{tmp}", "out"], {"JOB_COMPLETION_INDEX": "3", "JOB_COMPLETIONS": "3"},
         "modelloop-entrypoint: batch-shard: JOB_COMPLETION_INDEX 3 is not below JOB_COMPLETIONS 3"),
    ],
)
def test_usage_errors_exit_64_with_one_clear_line(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = entrypoint(args, env_for(tmp_path, **env))
    assert result.returncode == 64
    assert result.stderr.strip().splitlines()[-1] == message


@pytest.mark.parametrize(
    ("args", "refused"),
    [
        # the sidecar needs the monitoring extra (Evidently)
        (["monitor"], True),
        # retraining and bootstrap train with torch
        (["retrain", "--name", "demo"], True),
        (["bootstrap", "demo"], True),
        # what the serving image is for
        (["serve", "--help"], False),
        (["batch", "--help"], False),
        (["healthcheck"], False),
    ],
)
def test_the_serving_image_refuses_training_and_monitoring_in_one_line(
    tmp_path: Path, args: list[str], refused: bool
) -> None:
    result = entrypoint(args, env_for(tmp_path, MODELLOOP_IMAGE_TARGET="serving"))
    if not refused:
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode == 64
    assert result.stderr.splitlines() == [
        f"modelloop-entrypoint: this serving image has no training or monitoring and cannot run "
        f"'{args[0]}'; use the full image (docker build --target full, the default target)"
    ]
    assert not (tmp_path / "role").exists(), "refused before it noted a role"


def test_help_lists_the_roles(tmp_path: Path) -> None:
    result = entrypoint(["--help"], env_for(tmp_path))
    assert result.returncode == 0
    for role in ("serve", "monitor", "retrain", "batch", "batch-shard", "bootstrap", "healthcheck"):
        assert f"\n  {role} " in result.stdout


def test_serve_records_its_role_and_its_own_pid(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [str(ENTRYPOINT), "serve", "--help"], env=env_for(tmp_path),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    # exec keeps the pid: the file names the serving process itself, which the sidecar watches
    assert (tmp_path / "serving.pid").read_text().strip() == str(proc.pid)
    assert (tmp_path / "role").read_text() == "serve\n"


@pytest.mark.parametrize(
    ("pid_file", "extra", "message"),
    [
        # serving's pid file names a live process: watched
        ("live", {}, "modelloop-entrypoint: watching serving process {pid}"),
        # a stale pid file from a container that is gone
        ("dead", {}, "modelloop-entrypoint: no serving process visible"),
        # no pid file within the wait
        (None, {}, "modelloop-entrypoint: no serving process visible"),
        # an explicit target wins and nothing is waited for
        (None, {"MODELLOOP_MONITOR_TARGET_PID": "1"}, None),
    ],
)
def test_monitor_finds_the_serving_process(
    tmp_path: Path, pid_file: str | None, extra: dict[str, str], message: str | None
) -> None:
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        tmp_path.mkdir(exist_ok=True)
        pids = {"live": live.pid, "dead": dead.pid}
        if pid_file:
            (tmp_path / "serving.pid").write_text(f"{pids[pid_file]}\n")
        result = entrypoint(["monitor", "--help"], env_for(tmp_path, MODELLOOP_PID_WAIT_S="0", **extra))
    finally:
        live.kill()
        live.wait()
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("modelloop-entrypoint")]
    if message is None:
        assert lines == []
    else:
        assert lines and lines[0].startswith(message.format(pid=live.pid))
    assert (tmp_path / "role").read_text() == "monitor\n"


@pytest.mark.parametrize(
    ("role", "port_var", "healthy"),
    [
        (None, None, True),  # nothing started yet through the entrypoint: nothing to probe
        ("job", None, True),  # retraining and batch jobs have no HTTP server
        ("serve", "MODELLOOP_SERVING_PORT", False),  # serving not answering
        ("monitor", "MODELLOOP_MONITOR_PORT", False),  # sidecar not answering
    ],
)
def test_healthcheck_by_role(tmp_path: Path, role: str | None, port_var: str | None, healthy: bool) -> None:
    if role:
        (tmp_path / "role").write_text(f"{role}\n")
    extra = {port_var: str(free_port())} if port_var else {}
    result = entrypoint(["healthcheck"], env_for(tmp_path, **extra))
    assert (result.returncode == 0) is healthy, result.stderr
    if not healthy:
        assert "Connection refused" in result.stderr


@pytest.mark.slow
def test_bootstrap_trains_once_then_leaves_the_registry_alone(
    model_home: Path, tmp_path: Path
) -> None:
    env = env_for(tmp_path, MODELLOOP_HOME=str(model_home))
    shown = subprocess.run(
        ["modelloop", "models", "show", "demo", "production", "--json"],
        env=env, capture_output=True, text=True, check=False,
    )
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["version"] == 1
    # a second bootstrap (a restarted compose stack) trains nothing
    again = entrypoint(["bootstrap", "demo", "--dataset", "synthetic"], env)
    assert again.returncode == 0, again.stderr
    assert "demo already has a production version; nothing to train" in again.stderr
    assert sorted(p.name for p in (model_home / "registry/demo/versions").iterdir()) == ["1"]


def test_batch_shard_of_an_empty_folder_runs_without_a_writable_run_dir(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    blocker = tmp_path / "file"
    blocker.write_text("")
    # a run dir that cannot be created (as on a read-only root without its emptyDir)
    env = env_for(tmp_path, MODELLOOP_RUN_DIR=str(blocker / "run"),
                  JOB_COMPLETION_INDEX="0", JOB_COMPLETIONS="1")
    result = entrypoint(["batch-shard", str(tmp_path / "in"), str(tmp_path / "out")], env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[-1] == (
        "modelloop-entrypoint: shard 0/1 scored 0 file(s), 0 done before"
    )


@pytest.mark.slow
def test_batch_shards_split_the_files_and_a_retry_skips_what_is_done(
    model_home: Path, tmp_path: Path
) -> None:
    import pandas as pd

    from modelloop.synthetic import TARGET, SyntheticTask

    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    task = SyntheticTask(seed=0)
    sizes = {"a.csv": 7, "b.parquet": 5, "c.csv": 3}
    for name, rows in sizes.items():
        frame = task.sample(rows, seed=rows).drop(columns=[TARGET])
        if name.endswith(".csv"):
            frame.to_csv(inp / name, index=False)
        else:
            frame.to_parquet(inp / name)
    (inp / "notes.txt").write_text("not a data file")
    scored: dict[int, list[str]] = {}
    for index in (0, 1):
        env = env_for(tmp_path, MODELLOOP_HOME=str(model_home), JOB_COMPLETION_INDEX=str(index),
                      JOB_COMPLETIONS="2")
        result = run_entrypoint(["batch-shard", str(inp), str(out), "--name", "demo"], env,
                                timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        scored[index] = [line.rsplit(" ", 1)[1] for line in result.stderr.splitlines()
                         if " scores " in line]
    # sorted a, b, c: shard 0 takes positions 0 and 2, shard 1 position 1
    assert scored == {0: ["a.csv", "c.csv"], 1: ["b.parquet"]}
    for name, rows in sizes.items():
        frame = pd.read_parquet(out / f"{name.rsplit('.', 1)[0]}.parquet")
        assert len(frame) == rows
        assert {"prediction", "label"} <= set(frame.columns)
    # the pod of shard 0 is retried: nothing is scored twice
    env = env_for(tmp_path, MODELLOOP_HOME=str(model_home), JOB_COMPLETION_INDEX="0",
                  JOB_COMPLETIONS="2")
    again = run_entrypoint(["batch-shard", str(inp), str(out), "--name", "demo"], env)
    assert again.returncode == 0, again.stderr
    assert again.stderr.splitlines()[-1] == (
        "modelloop-entrypoint: shard 0/2 scored 0 file(s), 2 done before"
    )
