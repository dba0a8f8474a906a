"""Ensemble benchmark: three MLPs of one split (different widths) against their ensembles (mean,
vote, weighted), all on the members' common test split, at a few training lengths.

    .venv/bin/python scripts/bench_ensemble.py [--datasets digits,breast_cancer] [--epochs 3,30]

Trains the members in a temporary home (as ``modelloop train`` does, seeded, one split), builds
each ensemble with ``training.ensemble.build_ensemble`` (as ``modelloop ensemble`` does: parity
against the members run separately, accuracy on the test split) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from modelloop.registry import Registry
from training.config import TrainingConfig
from training.ensemble import Method, build_ensemble
from training.pipeline import TrainOptions, train_and_register
from training.settings import TrainingSettings

WIDTHS = ([64, 32], [128], [96, 48])


def bench(dataset: str, epochs: int, home: Path) -> list[str]:
    settings = TrainingSettings(home=home, progress=False)
    registry = Registry(settings.registry_dir)
    members = []
    for hidden in WIDTHS:
        config = TrainingConfig.from_settings(settings, epochs=epochs, model={"hidden": hidden})
        meta = train_and_register(dataset, name=dataset, registry=registry, promote=False,
                                  options=TrainOptions(config=config, settings=settings))
        members.append(registry.get(dataset, meta.version))
    accs = " / ".join(f"{m.metadata.metrics['accuracy']:.4f}" for m in members)
    rows = []
    for method in Method:
        start = time.perf_counter()
        built = build_ensemble(members, method=method, settings=settings)
        seconds = time.perf_counter() - start
        r = built.report
        parity = built.metadata.parity
        rows.append(f"| {dataset} | {epochs} | {accs} | {method.value} | {r.ensemble_metric:.4f} | "
                    f"{r.gain_points:+.2f} | {'yes' if r.promotable else 'no'} | "
                    f"{parity.max_abs_diff if parity else float('nan'):.1e} | "
                    f"{len(built.onnx_bytes) / 1024:,.0f} | {seconds:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="digits,breast_cancer")
    parser.add_argument("--epochs", default="3,30")
    args = parser.parse_args()
    print("| dataset | epochs | members' accuracy | method | ensemble accuracy | vs best member "
          "(points) | promotable (margin 0) | parity max abs diff | graph KiB | build s |")
    print("| --- | ---: | --- | --- | ---: | ---: | --- | ---: | ---: | ---: |")
    for dataset in args.datasets.split(","):
        for epochs in map(int, args.epochs.split(",")):
            with tempfile.TemporaryDirectory() as home:
                for row in bench(dataset, epochs, Path(home)):
                    print(row, flush=True)


if __name__ == "__main__":
    main()
