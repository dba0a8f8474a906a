#!/usr/bin/env python
"""Random search against Bayesian search (TPE) at the same trial budget; prints a markdown table.

For each task and seed both samplers search the default MLP space with the same budget, data,
split and training seed (pruning on, as ``modelloop tune`` runs), one torch thread, one trial at
a time. The objective is the best trial's validation loss (lower is better); the best trial's
config is then trained again (same seed: the same model) and scored on the test split, which the
search never saw. TPE's first 10 trials are random draws, so the budget is what is left after.

    .venv/bin/python scripts/bench_tune.py                      # synthetic (3000 rows) and digits
    .venv/bin/python scripts/bench_tune.py --tasks wine --trials 30 --seeds 0,1,2,3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.config import TrainingConfig  # noqa: E402
from training.data import load_data  # noqa: E402
from training.pipeline import fit_model  # noqa: E402
from training.settings import TrainingSettings  # noqa: E402
from training.tune import SAMPLERS, search  # noqa: E402

ROWS = {"synthetic": 3000}


@dataclass(frozen=True)
class Run:
    task: str
    sampler: str
    seed: int
    best_value: float
    test_accuracy: float
    completed: int
    pruned: int
    seconds: float


def run(task: str, sampler: str, seed: int, *, trials: int, epochs: int, home: Path) -> Run:
    settings = TrainingSettings(home=home, progress=False, threads=1)
    base = TrainingConfig.from_settings(settings, epochs=epochs, seed=seed)
    ds = load_data(task, rows=ROWS.get(task), seed=seed)
    started = time.perf_counter()
    result = search(ds, name=f"{task}-s{seed}", base=base, settings=settings, sampler=sampler,  # type: ignore[arg-type]
                    trials=trials)
    seconds = time.perf_counter() - started
    assert result.best is not None and result.best.value is not None and result.best_config
    fitted = fit_model(ds, result.best_config, settings, progress=False)
    x_test, y_test = ds.features[fitted.split.test], ds.target[fitted.split.test]
    with torch.no_grad():
        probs = fitted.net.infer(torch.from_numpy(fitted.net.layout(x_test))).numpy()
    accuracy = float((probs.argmax(axis=1) == y_test).mean())
    return Run(task, sampler, seed, result.best.value, accuracy,
               result.counts.get("complete", 0), result.counts.get("pruned", 0), seconds)


def table(runs: list[Run]) -> str:
    lines = ["| task | sampler | seeds | best validation loss, mean | per seed | test accuracy "
             "of the best trial, mean | per seed | completed / pruned trials | wall time (s) |",
             "| --- | --- | --- | ---: | --- | ---: | --- | --- | ---: |"]
    keys = dict.fromkeys((r.task, r.sampler) for r in runs)
    for task, sampler in keys:
        rs = [r for r in runs if (r.task, r.sampler) == (task, sampler)]
        lines.append(
            f"| {task} | {sampler} | {','.join(str(r.seed) for r in rs)} "
            f"| {statistics.mean(r.best_value for r in rs):.4f} "
            f"| {' '.join(f'{r.best_value:.4f}' for r in rs)} "
            f"| {statistics.mean(r.test_accuracy for r in rs):.4f} "
            f"| {' '.join(f'{r.test_accuracy:.4f}' for r in rs)} "
            f"| {sum(r.completed for r in rs)} / {sum(r.pruned for r in rs)} "
            f"| {sum(r.seconds for r in rs):.0f} |")
    return "\n".join(lines)


def verdict(runs: list[Run]) -> str:
    pairs = [(r, b) for r in runs if r.sampler == "random" for b in runs
             if b.sampler == "bayes" and (b.task, b.seed) == (r.task, r.seed)]
    wins = [(r.task, r.seed) for r, b in pairs if b.best_value < r.best_value]
    lines = [f"bayes (TPE) reached a lower best validation loss than random in {len(wins)} of "
             f"{len(pairs)} (task, seed) pairs."]
    for task in sorted({r.task for r, _ in pairs}):
        rnd = statistics.mean(r.best_value for r, _ in pairs if r.task == task)
        bay = statistics.mean(b.best_value for _, b in pairs if b.task == task)
        lines.append(f"{task}: mean best validation loss random {rnd:.4f}, bayes {bay:.4f} "
                     f"({'a tie' if bay == rnd else ('bayes' if bay < rnd else 'random') + f' better by {abs(rnd - bay):.4f}'}); "
                     f"bayes won on {sum(t == task for t, _ in wins)} of "
                     f"{sum(r.task == task for r, _ in pairs)} seeds.")
    lines.append("Tasks where bayes is better on the mean: " + (", ".join(
        t for t in sorted({r.task for r, _ in pairs})
        if statistics.mean(b.best_value for r, b in pairs if r.task == t)
        < statistics.mean(r.best_value for r, _ in pairs if r.task == t)) or "none") + ".")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="synthetic,digits")
    parser.add_argument("--trials", type=int, default=25)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    runs: list[Run] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as home:
        for task in args.tasks.split(","):
            for seed in map(int, args.seeds.split(",")):
                for sampler in [s for s in SAMPLERS if s != "grid"]:
                    runs.append(run(task, sampler, seed, trials=args.trials, epochs=args.epochs,
                                    home=Path(home)))
                    r = runs[-1]
                    print(f"{task} seed {seed} {sampler}: best {r.best_value:.4f}, test accuracy "
                          f"{r.test_accuracy:.4f}, {r.seconds:.0f} s", file=sys.stderr, flush=True)
    print(f"Trials per search: {args.trials}, epochs per trial at most {args.epochs}, default "
          f"mlp space, median pruning, 1 torch thread, one trial at a time; total "
          f"{time.perf_counter() - started:.0f} s.\n")
    print(table(runs))
    print()
    print(verdict(runs))


if __name__ == "__main__":
    main()
