"""The hyperparameter search: real small searches on breast_cancer (4-6 epochs, a few trials),
the study in SQLite, resuming, grid coverage, pruning, the registered best trial and the CLI."""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from typer.testing import CliRunner

from modelloop.cli import app
from modelloop.registry import Registry
from training.config import TrainingConfig
from training.data import TabularDataset, load_data
from training.settings import TrainingSettings
from training.tune import (
    TRIALS_ARTIFACT,
    ParamSpec,
    SpaceError,
    StudyConflict,
    TuneError,
    apply_params,
    default_space,
    load_space,
    register_best,
    search,
    validate_space,
)

MODELLOOP = str(Path(sys.executable).with_name("modelloop"))
SMALL = {"learning_rate": {"type": "float", "low": 3e-3, "high": 3e-2, "log": True},
         "batch_size": {"type": "categorical", "choices": [32, 64]}}


@pytest.fixture(scope="module")
def cancer() -> TabularDataset:
    return load_data("breast_cancer")


@pytest.fixture
def settings(tmp_path: Path) -> TrainingSettings:
    return TrainingSettings(home=tmp_path / "home", progress=False)


def _base(settings: TrainingSettings, **overrides: Any) -> TrainingConfig:
    return TrainingConfig.from_settings(settings, **{"epochs": 4, **overrides})


# -- the space (pure) ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "grid"),
    [
        # a log range: powers apart
        ({"type": "float", "low": 1e-4, "high": 1e-2, "log": True}, [1e-4, 1e-3, 1e-2]),
        # a linear range, ends included
        ({"type": "float", "low": 0.0, "high": 0.5}, [0.0, 0.25, 0.5]),
        # a short int range keeps every value
        ({"type": "int", "low": 1, "high": 3}, [1, 2, 3]),
        # a long one takes `points` values
        ({"type": "int", "low": 1, "high": 10, "points": 4}, [1, 4, 7, 10]),
        # an int log range, rounded
        ({"type": "int", "low": 16, "high": 256, "log": True}, [16, 64, 256]),
        # choices as given
        ({"type": "categorical", "choices": ["cosine", "none"]}, ["cosine", "none"]),
    ],
)
def test_grid_values_of_a_parameter(spec: dict[str, Any], grid: list[Any]) -> None:
    assert ParamSpec.model_validate(spec).grid() == grid


def test_params_set_config_fields_architecture_parameters_and_widths(settings: TrainingSettings) -> None:
    config = apply_params(_base(settings), {"learning_rate": 0.01, "model.dropout": 0.3,
                                            "model.hidden.depth": 3, "model.hidden.width": 48})
    assert config.learning_rate == 0.01 and config.epochs == 4
    assert config.model["dropout"] == 0.3 and config.model["hidden"] == [48, 48, 48]
    # a list of widths as one categorical choice
    assert apply_params(_base(settings), {"model.hidden": [128, 64]}).model["hidden"] == [128, 64]


@pytest.mark.parametrize("architecture", ["mlp", "cnn", "gru", "lstm", "autoencoder"])
def test_every_architecture_has_a_valid_default_space(architecture: str,
                                                      settings: TrainingSettings) -> None:
    space = default_space(_base(settings, architecture=architecture))
    assert {"learning_rate", "weight_decay", "batch_size", "scheduler"} <= set(space)
    assert space["learning_rate"].log


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # a misspelt name
        ("learnin_rate: {type: float, low: 1.0e-4, high: 0.01}",
         "parameter 'learnin_rate': unknown parameter (config fields: learning_rate, "
         "weight_decay, l1, batch_size, scheduler, grad_clip, patience, optimizer, momentum, nesterov, class_weight; architecture parameters "
         "as model.NAME; a list of widths as model.NAME.depth and model.NAME.width)"),
        # bounds the wrong way round
        ("learning_rate: {type: float, low: 0.01, high: 1.0e-4}",
         "parameter 'learning_rate': low (0.01) must be below high (0.0001)"),
        # a log range through zero
        ("weight_decay: {type: float, low: 0, high: 0.01, log: true}",
         "parameter 'weight_decay': a log range needs low > 0, not 0"),
        # half a range
        ("learning_rate: {type: float, low: 1.0e-4}",
         "parameter 'learning_rate': a range needs low and high"),
        # an unknown type
        ("learning_rate: {type: real, low: 1.0e-4, high: 1}",
         "parameter 'learning_rate': type: Input should be 'float', 'int' or 'categorical'"),
        # an unknown key
        ("learning_rate: {type: float, lo: 1.0e-4, high: 1}",
         "parameter 'learning_rate': lo: Extra inputs are not permitted"),
        # a bare value instead of a spec
        ("learning_rate: 0.1",
         "parameter 'learning_rate': expected {type, low, high, log, choices, points}, not 0.1"),
        # categorical without choices
        ("batch_size: {type: categorical}",
         "parameter 'batch_size': categorical needs a non-empty list of choices"),
        # a choice the config rejects
        ("batch_size: {type: categorical, choices: [32, big]}",
         "parameter 'batch_size': value 'big' is invalid: Input should be a valid integer, "
         "unable to parse string as an integer"),
        # an architecture bound
        ("model.dropout: {type: float, low: 0, high: 1}",
         "parameter 'model.dropout': value 1.0 is invalid: Input should be less than 1"),
        # not a parameter of the architecture
        ("model.width: {type: int, low: 8, high: 64}",
         "parameter 'model.width': mlp has no parameter 'width' (known: activation, batch_norm, "
         "dropout, hidden)"),
        # depth of something that is not a list
        ("model.dropout.depth: {type: int, low: 1, high: 3}",
         "parameter 'model.dropout.depth': mlp has no list parameter 'dropout' (lists: hidden)"),
        # a fractional int bound
        ("batch_size: {type: int, low: 8, high: 64.5}",
         "parameter 'batch_size': an int range needs whole low and high, not 8 and 64.5"),
        # the grid needs at least two points of a range
        ("learning_rate: {type: float, low: 1.0e-4, high: 0.01, points: 1}",
         "parameter 'learning_rate': points: Input should be greater than or equal to 2"),
        # not a mapping
        ("[learning_rate]", "expected a mapping of parameter names to {type, low, high, log, choices}"),
        # not YAML
        ("learning_rate: [", "not YAML or JSON: while parsing a flow node"),
    ],
)
def test_a_bad_space_file_is_one_line_naming_the_parameter(text: str, message: str, tmp_path: Path,
                                                           settings: TrainingSettings) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError) as err:
        load_space(path, _base(settings))
    assert str(err.value) == f"{path}: {message}"
    assert "\n" not in str(err.value)


def test_every_problem_of_a_space_is_named(settings: TrainingSettings) -> None:
    with pytest.raises(SpaceError, match=r"^space: parameter 'l2': unknown parameter .*; "
                                         r"parameter 'patience': a range needs low and high$"):
        validate_space({"l2": {"type": "float", "low": 0, "high": 1},
                        "patience": {"type": "int", "low": 3}}, _base(settings))


# -- searches ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["grid", "random", "bayes"])
def test_each_sampler_stores_its_trials_in_sqlite(sampler: str, cancer: TabularDataset,
                                                  settings: TrainingSettings) -> None:
    base = _base(settings)
    result = search(cancer, name="cancer", base=base, settings=settings, sampler=sampler,  # type: ignore[arg-type]
                    trials=3, space=validate_space(SMALL, base), prune=False)
    folder = settings.home / "studies" / f"cancer-mlp-{sampler}"
    assert result.study == f"cancer-mlp-{sampler}" and result.storage == folder / "study.db"
    stored = optuna.load_study(study_name=result.study, storage=f"sqlite:///{result.storage}")
    assert [t.state for t in stored.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert result.ran == 3 and result.counts == {"complete": 3}
    for trial in stored.trials:
        assert 3e-3 <= trial.params["learning_rate"] <= 3e-2 and trial.params["batch_size"] in (32, 64)
        config = TrainingConfig.model_validate(trial.user_attrs["config"])
        assert config.learning_rate == trial.params["learning_rate"] and config.epochs == 4
        assert trial.value is not None
        assert 0 < trial.value < 0.7  # the validation loss of a trained model, not of chance
    assert stored.user_attrs["data_fingerprint"] == cancer.fingerprint
    best = min(stored.trials, key=lambda t: t.value or 0.0)
    assert result.best is not None and (result.best.number, result.best.value) == (best.number, best.value)

    report = json.loads((folder / "trials.json").read_text())
    assert report == json.loads(json.dumps(result.report()))
    assert report["objective"] == "validation_loss" and report["best_trial"] == best.number
    rows = list(csv.DictReader(io.StringIO((folder / "trials.csv").read_text())))
    assert [int(r["number"]) for r in rows] == [0, 1, 2]
    assert float(rows[best.number]["value"]) == best.value


def test_a_rerun_resumes_the_study_and_runs_only_the_missing_trials(
        cancer: TabularDataset, settings: TrainingSettings) -> None:
    base = _base(settings)
    kwargs: dict[str, Any] = {"name": "cancer", "base": base, "settings": settings,
                              "sampler": "random", "space": validate_space(SMALL, base),
                              "prune": False}
    first = search(cancer, trials=2, **kwargs)
    assert first.ran == 2
    seen: list[int] = []
    again = search(cancer, trials=5, on_start=seen.append, **kwargs)
    assert (again.ran, len(again.trials), seen) == (3, 5, [3])
    # the resumed sampler does not draw the first run's values again
    assert again.trials[2].params != first.trials[0].params
    assert search(cancer, trials=5, **kwargs).ran == 0

    # a trial cut off by a killed run is marked failed and tried again
    optuna.load_study(study_name=again.study, storage=f"sqlite:///{again.storage}").ask()
    after_kill = search(cancer, trials=6, **kwargs)
    assert after_kill.ran == 1 and after_kill.counts == {"complete": 6, "fail": 1}


def test_resuming_with_other_options_is_refused(cancer: TabularDataset,
                                                settings: TrainingSettings) -> None:
    space = validate_space(SMALL, _base(settings))
    search(cancer, name="cancer", base=_base(settings), settings=settings, sampler="random",
           trials=1, space=space)
    with pytest.raises(StudyConflict, match=r"^study 'cancer-mlp-random' \(.*\) was started with a "
                                            r"different base config; rerun it with the same"):
        search(cancer, name="cancer", base=_base(settings, epochs=5), settings=settings,
               sampler="random", trials=2, space=space)


def test_grid_search_covers_exactly_its_grid(cancer: TabularDataset, settings: TrainingSettings) -> None:
    base = _base(settings)
    space = validate_space({"learning_rate": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True},
                            "batch_size": {"type": "categorical", "choices": [32, 64]}}, base)
    result = search(cancer, name="cancer", base=base, settings=settings, sampler="grid", trials=50,
                    space=space)
    assert result.ran == 6 and len(result.trials) == 6
    tried = sorted((t.params["learning_rate"], t.params["batch_size"]) for t in result.trials)
    assert tried == sorted(itertools.product([0.001, 0.01, 0.1], [32, 64]))


def test_pruning_stops_trials_with_an_absurd_learning_rate(cancer: TabularDataset,
                                                           settings: TrainingSettings) -> None:
    base = _base(settings, epochs=6)
    space = validate_space({
        "learning_rate": {"type": "categorical", "choices": [5e-3, 1e-2, 2e-2, 3e-2, 1e-9]},
        "batch_size": {"type": "categorical", "choices": [32, 64]}}, base)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    result = search(cancer, name="cancer", base=base, settings=settings, sampler="grid", trials=10,
                    space=space)
    pruned = [t for t in result.trials if t.state == "pruned"]
    assert any(t.params["learning_rate"] == 1e-9 for t in pruned), result.trials
    for t in pruned:
        assert t.epochs is not None and t.epochs < 6 and t.note == f"pruned at epoch {t.epochs}"
    assert result.best is not None and result.best.params["learning_rate"] != 1e-9
    # a trial stopped from inside fit() leaves torch's global state as it was
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (
        threads, deterministic)


def test_a_diverging_trial_fails_and_the_search_goes_on(cancer: TabularDataset,
                                                        settings: TrainingSettings) -> None:
    base = _base(settings)
    space = validate_space({"learning_rate": {"type": "categorical", "choices": [1e-2, 1e30]}}, base)
    result = search(cancer, name="cancer", base=base, settings=settings, sampler="grid", trials=2,
                    space=space)
    assert result.counts == {"complete": 1, "fail": 1}
    failed = next(t for t in result.trials if t.state == "fail")
    assert failed.params == {"learning_rate": 1e30}
    assert failed.note.startswith("training diverged at epoch 1")
    assert result.best is not None and result.best.params == {"learning_rate": 1e-2}

    only_bad = validate_space({"learning_rate": {"type": "categorical", "choices": [1e30]}}, base)
    nothing = search(cancer, name="bad", base=base, settings=settings, sampler="grid", trials=1,
                     space=only_bad)
    with pytest.raises(TuneError, match=r"^study 'bad-mlp-grid': no trial completed \(1 fail\); "):
        register_best(nothing, cancer, name="bad", settings=settings)


def test_values_the_architecture_rejects_together_fail_only_their_trial(
        settings: TrainingSettings) -> None:
    base = _base(settings, epochs=2, architecture="gru", model={"hidden": 8})
    # each value is valid alone; GRU dropout with one layer is not
    space = validate_space({"model.layers": {"type": "int", "low": 1, "high": 2},
                            "model.dropout": {"type": "categorical", "choices": [0.0, 0.2]}}, base)
    result = search(load_data("sequences", rows=200), name="seq", base=base, settings=settings,
                    sampler="grid", trials=4, space=space, prune=False)
    assert result.counts == {"complete": 3, "fail": 1}
    failed = next(t for t in result.trials if t.state == "fail")
    assert failed.params == {"model.layers": 1, "model.dropout": 0.2}
    assert failed.note == ("invalid combination: Value error, dropout between layers needs "
                           "layers > 1")


@pytest.mark.slow
def test_parallel_jobs_share_the_study(cancer: TabularDataset, settings: TrainingSettings) -> None:
    base = _base(settings)
    seen: list[int] = []
    result = search(cancer, name="cancer", base=base, settings=settings, sampler="bayes", trials=4,
                    jobs=2, space=validate_space(SMALL, base), prune=False,
                    on_trial=lambda t: seen.append(t.number))
    assert result.ran == 4 and result.counts == {"complete": 4}
    assert sorted(seen) == [0, 1, 2, 3]


def test_the_best_trial_is_registered_with_lineage_and_the_trials_report(
        cancer: TabularDataset, settings: TrainingSettings) -> None:
    base = _base(settings)
    result = search(cancer, name="cancer", base=base, settings=settings, sampler="random", trials=3,
                    space=validate_space(SMALL, base), prune=False)
    registry = Registry(settings.registry_dir)
    meta = register_best(result, cancer, name="cancer", settings=settings, registry=registry,
                         promote=True)
    assert result.best is not None and result.best_config is not None
    assert {k: meta.lineage[k] for k in ("trigger", "study", "sampler", "trial", "best_value",
                                         "trials")} == {
        "trigger": "tune", "study": "cancer-mlp-random", "sampler": "random",
        "trial": result.best.number, "best_value": result.best.value, "trials": 3}
    assert meta.config == result.best_config.model_dump(mode="json")
    # the same config and seed train the same model: the trial's score is the model's
    assert meta.evaluation["training"]["best_val_loss"] == pytest.approx(result.best.value, rel=1e-6)
    version = registry.get("cancer", "production")
    assert version.version == meta.version
    attached = json.loads((version.path / TRIALS_ARTIFACT).read_text())
    assert attached["best_trial"] == result.best.number and len(attached["trials"]) == 3


# -- the CLI -------------------------------------------------------------------------------------
runner = CliRunner()


@pytest.mark.slow
def test_tune_end_to_end_then_resume(tmp_path: Path, home: Path) -> None:
    space = tmp_path / "space.json"
    space.write_text(json.dumps(SMALL))
    args = ["tune", "--dataset", "breast_cancer", "--name", "cx", "--sampler", "random",
            "--epochs", "4", "--space", str(space), "--json", "--no-progress"]
    env = {**os.environ, "MODELLOOP_HOME": str(home), "COLUMNS": "160"}
    run = subprocess.run([MODELLOOP, *args, "--trials", "3", "--promote"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)  # stdout holds only the JSON
    assert (out["study"], out["trials"], out["ran"]) == ("cx-mlp-random", 3, 3)
    assert out["registered"]["name"] == "cx" and out["registered"]["version"] == 1
    assert out["registered"]["promoted"] and out["registered"]["metrics"]["accuracy"] > 0.85
    assert Path(out["storage"]) == home / "studies" / "cx-mlp-random" / "study.db"
    assert "study cx-mlp-random" in run.stderr and "complete (best)" in run.stderr
    meta = Registry(home / "registry").get("cx", "production").metadata
    assert meta.lineage["trigger"] == "tune" and meta.lineage["trial"] == out["best"]["trial"]

    resumed = runner.invoke(app, [*args, "--trials", "4"])
    assert resumed.exit_code == 0, resumed.stderr
    again = json.loads(resumed.stdout)
    assert (again["trials"], again["ran"], again["registered"]["version"]) == (4, 1, 2)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # neither source
        (["--trials", "3"], "give exactly one of --dataset NAME or --data FILE"),
        # a file without its target column
        (["--data", "x.csv"], "--data needs --target COLUMN"),
        # a file is used whole
        (["--data", "x.csv", "--target", "y", "--rows", "100"], "--rows is for --dataset; a file "
                                                                "is used whole"),
        # an unknown architecture
        (["--dataset", "wine", "--model", "transformer"], "--model: unknown architecture "
                                                          "'transformer' (known: "),
        # a space file that is not there
        (["--dataset", "wine", "--space", "nowhere.yaml"], "nowhere.yaml: cannot read the space "
                                                           "file: No such file or directory"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args: list[str], message: str, home: Path) -> None:
    result = runner.invoke(app, ["tune", *args])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {message}") and result.stderr.count("\n") == 1
    assert not (home / "studies").exists()


def test_a_bad_space_and_a_conflicting_rerun_are_one_line_errors(tmp_path: Path, home: Path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("model.dropout: {type: float, low: 0, high: 1}\n")
    bad = runner.invoke(app, ["tune", "--dataset", "wine", "--space", str(space)])
    assert bad.exit_code == 2
    assert bad.stderr == (f"error: {space}: parameter 'model.dropout': value 1.0 is invalid: "
                          "Input should be less than 1\n")

    space.write_text("learning_rate: {type: categorical, choices: [0.01]}\n")
    args = ["tune", "--dataset", "wine", "--space", str(space), "--trials", "1", "--no-progress"]
    assert runner.invoke(app, [*args, "--epochs", "3"]).exit_code == 0
    conflict = runner.invoke(app, [*args, "--epochs", "4"])
    assert conflict.exit_code == 2
    report, _, error = conflict.stderr.partition("error: ")  # the data report comes first
    assert report.startswith("wine: 178 rows, 0 exact duplicates removed")
    assert error.startswith("study 'wine-mlp-bayes' (") and error.count("\n") == 1
