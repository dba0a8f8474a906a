"""`modelloop monitor ...` and the sidecar's settings."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from modelloop.cli import app as root_app
from modelloop.synthetic import SyntheticTask
from monitoring.app import create_app
from monitoring.cli import read_feedback_csv
from monitoring.settings import MonitorSettings, default_policy_file
from monitoring.sidecar import Sidecar
from tests.monitoring.helpers import TrainedModel, serve_in_thread
from tests.monitoring.test_app import events_for, make_settings

runner = CliRunner()


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MODELLOOP_HOME", str(tmp_path))
    monkeypatch.setenv("MODELLOOP_MONITOR_MODELS", "churn, fraud")
    monkeypatch.setenv("MODELLOOP_MONITOR_DRIFT_METHOD", "psi")
    monkeypatch.setenv("MODELLOOP_MONITOR_TARGET_PID", "123")
    s = MonitorSettings()
    assert s.models == ["churn", "fraud"] and s.drift_method == "psi" and s.target_pid == 123
    assert s.store_dsn == f"sqlite:///{tmp_path / 'monitor' / 'events.db'}"
    assert s.reports_dir == tmp_path / "reports" / "drift"
    assert s.policy_file == default_policy_file() and s.policy_file.exists()
    assert s.retrain_command == "modelloop retrain --name {model} --trigger {trigger}"


@pytest.mark.parametrize(
    ("env", "field", "message"),
    [
        ({"MODELLOOP_MONITOR_STORE_URL": "mysql://x"}, "store_url",
         "Value error, must start with sqlite:/// or postgresql://"),
        ({"MODELLOOP_MONITOR_STORE_TABLE_PREFIX": "Bad-Prefix"}, "store_table_prefix",
         "Value error, must be lower-case letters, digits or '_', starting with a letter"),
        ({"MODELLOOP_MONITOR_DRIFT_METHOD": "magic"}, "drift_method",
         "Input should be 'calibrated', 'auto', 'ks', 'psi', 'wasserstein', 'jensenshannon' or 'chisquare'"),
        ({"MODELLOOP_MONITOR_TRIGGER": "cron"}, "trigger",
         "Input should be 'local', 'kubernetes', 'docker', 'webhook' or 'none'"),
        ({"MODELLOOP_MONITOR_DRIFT_SHARE": "0"}, "drift_share", "Input should be greater than 0"),
    ],
)
def test_bad_settings_name_the_field(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                     field: str, message: str) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValidationError) as err:
        MonitorSettings()
    first = err.value.errors()[0]
    assert (first["loc"][0], first["msg"]) == (field, message)


@pytest.mark.parametrize(
    ("content", "error"),
    [
        # no label column
        ("request_id,lbl\na,1\n", "{f}:1: header needs columns request_id and label (missing label; "
                                  "found request_id, lbl)"),
        # an empty file
        ("", "{f}:1: header needs columns request_id and label (missing request_id, label; found none)"),
        # only the header
        ("request_id,label\n", "{f}: no feedback rows"),
        # an empty request id on the third line
        ("request_id,label\na,yes\n,no\n", "{f}:3: request_id is empty"),
        # an empty label
        ("request_id,label\na,\n", "{f}:2: label is empty for request 'a'"),
        # a timestamp that is not a number
        ("request_id,label,timestamp\na,yes,yesterday\n", "{f}:2: timestamp 'yesterday' is not unix seconds"),
        # a row with more values than columns
        ("request_id,label\na,yes,extra\n", "{f}:2: more values than the header has columns"),
    ],
)
def test_bad_feedback_files_name_the_file_and_line(tmp_path: Path, content: str, error: str) -> None:
    f = tmp_path / "labels.csv"
    f.write_text(content)
    with pytest.raises(ValueError) as err:
        read_feedback_csv(f)
    assert str(err.value) == error.format(f=f)
    result = runner.invoke(root_app, ["monitor", "feedback", str(f), "--url", "http://127.0.0.1:1"])
    assert result.exit_code == 1
    assert " ".join(result.output.split()) == f"error: {error.format(f=f)}"


@pytest.fixture
def running(home: Path, registered: TrainedModel, task: SyntheticTask) -> Iterator[str]:
    sidecar = Sidecar(make_settings(home))
    sidecar.start(background=False)
    with serve_in_thread(create_app(sidecar)) as url:
        import httpx

        events, _ = events_for(registered, task.sample(300, seed=8), "cli")
        assert httpx.post(f"{url}/events", json={"events": events}).status_code == 200
        yield url


def test_feedback_command_posts_labels_and_reports(running: str, tmp_path: Path) -> None:
    f = tmp_path / "labels.csv"
    rows = "".join(f"cli-{i},{'yes' if i % 2 else 'no'},{time.time():.3f}\n" for i in range(250))
    f.write_text("request_id,label,timestamp\n" + rows + f"ghost,no,{time.time()}\ncli-0,yes,\n")
    result = runner.invoke(root_app, ["monitor", "feedback", str(f), "--url", running, "--batch", "100"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"{f}: 250 labels joined, 1 unknown ids, 1 duplicates"
    assert lines[1:] == ["  unknown: ghost", "  duplicate: cli-0"]
    status = runner.invoke(root_app, ["monitor", "status", "--url", running, "--check"])
    assert status.exit_code == 0, status.output
    assert "churn v1: 300 rows in window" in status.output
    assert "v1: accuracy" in status.output and "on 250 labels" in status.output
    # the estimate with its interval, and the window's data quality
    assert re.search(r"estimated 0\.\d{3} \[0\.\d{3}, (0|1)\.\d{3}\]", status.output), status.output
    assert "missing at most 0.0% of a feature" in status.output


def test_a_label_the_sidecar_refuses_names_its_line(running: str, tmp_path: Path) -> None:
    f = tmp_path / "labels.csv"
    f.write_text("request_id,label\ncli-0,yes\ncli-1,maybe\n")
    result = runner.invoke(root_app, ["monitor", "feedback", str(f), "--url", running])
    assert result.exit_code == 1
    assert " ".join(result.output.split()) == (
        f"error: {f}:3: label: 'maybe' is not a class of churn v1 (classes: no, yes)")


def test_status_of_a_sidecar_that_is_not_there() -> None:
    result = runner.invoke(root_app, ["monitor", "status", "--url", "http://127.0.0.1:1"])
    assert result.exit_code == 1
    assert result.output.startswith("error: cannot get the status of the sidecar at http://127.0.0.1:1")


def test_check_policy_command(tmp_path: Path) -> None:
    ok = runner.invoke(root_app, ["monitor", "check-policy", str(default_policy_file())])
    assert ok.exit_code == 0 and "data-drift: data_drift: drift -> retrain" in ok.output
    bad = tmp_path / "p.yaml"
    bad.write_text("rules:\n  - {name: r, metric: nope}\n")
    result = runner.invoke(root_app, ["monitor", "check-policy", str(bad)])
    assert result.exit_code == 1
    assert " ".join(result.output.split()).startswith(
        f"error: {bad}: rule 'r' (rules[0]): field 'metric': unknown metric 'nope'")


def test_monitor_help_lists_its_commands() -> None:
    result = runner.invoke(root_app, ["monitor", "--help"])
    assert result.exit_code == 0
    for command in ("run", "feedback", "status", "check-policy", "--port"):
        assert command in result.output


@pytest.mark.parametrize(
    ("command", "keys"),
    [
        # the sidecar takes every role's key
        ([], ["MODELLOOP_MONITOR_API_KEY (admin: every route)", "MODELLOOP_MONITOR_INGEST_KEY "
              "(POST /events; serving sends it as MODELLOOP_SERVING_SIDECAR_KEY)",
              "MODELLOOP_MONITOR_FEEDBACK_KEY (POST /feedback)",
              "MODELLOOP_MONITOR_ALERTMANAGER_KEY (POST /alertmanager)"]),
        (["run"], ["MODELLOOP_MONITOR_API_KEY (admin: every route)",
                   "MODELLOOP_MONITOR_ALERTMANAGER_KEY (POST /alertmanager)"]),
        # the clients say which one they send
        (["feedback"], ["Sends MODELLOOP_MONITOR_FEEDBACK_KEY as its bearer key (or, without it, "
                        "MODELLOOP_MONITOR_API_KEY, the admin key)"]),
        (["status"], ["Sends MODELLOOP_MONITOR_API_KEY (the admin key) as its bearer key"]),
        (["check-policy"], ["(no sidecar, no key)"]),
    ],
)
def test_monitor_help_says_which_key_each_command_uses(command: list[str], keys: list[str]) -> None:
    result = runner.invoke(root_app, ["monitor", *command, "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for key in keys:
        assert key in text, text


def test_a_fixed_drift_threshold_is_refused_with_the_calibrated_method(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELLOOP_MONITOR_DRIFT_THRESHOLD", "0.1")
    with pytest.raises(ValidationError, match="not used with drift_method calibrated"):
        MonitorSettings()
    monkeypatch.setenv("MODELLOOP_MONITOR_DRIFT_METHOD", "wasserstein")
    assert MonitorSettings().drift_threshold == 0.1
