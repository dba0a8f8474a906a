"""Pruning benchmark: each MLP against its pruned versions (unstructured and structured, a few
amounts) and its int8 quantization, on the test split the parent was judged on: the primary
metric, CPU rows/s on one thread at batch 1 and 256 (median of repeats, parent and pruned taking
turns) and the file and weight sizes.

    .venv/bin/python scripts/bench_prune.py [--models cancer-mlp,digits-mlp] [--repeats 5]

Trains each model in a temporary home, prunes it with ``training.prune.prune_version`` (as
``modelloop prune`` does, a 20-epoch fine-tune) and quantizes it with
``training.quantize.quantize_version``, and prints a markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
from bench_quantize import _cpu  # (scripts/ is on sys.path)

from modelloop.registry import ModelVersion, Registry
from training.config import TrainingConfig
from training.pipeline import TrainOptions, train_and_register
from training.prune import prune_version
from training.quantize import quantize_version
from training.settings import TrainingSettings

MODELS = {"cancer-mlp": "breast_cancer", "digits-mlp": "digits"}
PRUNINGS = [(False, 0.5), (False, 0.8), (True, 0.5), (True, 0.75)]


def _row(name: str, what: str, metrics: tuple[float, float], loss: float,
         speed: tuple[dict[int, float], dict[int, float]], sizes: tuple[dict[str, int], dict[str, int]],
         zeros: str, seconds: float) -> str:
    """One line of the table; ``speed`` and ``sizes`` are (before, after) pairs of
    ``{batch: rows/s}`` and of ``{"file": bytes, "weights": bytes}``."""
    (before, after), (fb, fa) = speed, sizes
    return (f"| {name} | {what} | {metrics[0]:.4f} | {metrics[1]:.4f} | {-loss + 0.0:+.2f} | "
            f"{before[1]:,.0f} -> {after[1]:,.0f} | {before[256]:,.0f} -> {after[256]:,.0f} | "
            f"{fb['file'] / 1024:.1f} -> {fa['file'] / 1024:.1f} | "
            f"{fb['weights'] / 1024:.1f} -> {fa['weights'] / 1024:.1f} | {zeros} | {seconds:.1f} |")


def _rows(version: ModelVersion, settings: TrainingSettings, repeats: int) -> list[str]:
    lines = []
    for structured, amount in PRUNINGS:
        t0 = time.perf_counter()
        r = prune_version(version, amount=amount, structured=structured, settings=settings,
                          speed_repeats=repeats).report
        what = (f"{'structured' if structured else 'unstructured'} {amount} "
                f"({'x'.join(map(str, r.hidden['pruned']))})")
        lines.append(_row(
            version.name, what, (r.parent_metrics[r.metric], r.pruned_metrics[r.metric]),
            r.loss_points, (r.rows_per_s["parent"], r.rows_per_s["pruned"]),
            ({"file": r.bytes["parent"], "weights": r.weight_bytes["parent"]},
             {"file": r.bytes["pruned"], "weights": r.weight_bytes["pruned"]}),
            f"{r.zero_weights['pruned']:.0%}", time.perf_counter() - t0))
    t0 = time.perf_counter()
    q = quantize_version(version, method="dynamic", settings=settings, speed_repeats=repeats).report
    lines.append(_row(
        version.name, "int8 dynamic", (q.fp32_metrics[q.metric], q.int8_metrics[q.metric]),
        q.loss_points, (q.rows_per_s["fp32"], q.rows_per_s["int8"]),
        ({"file": q.bytes["fp32"], "weights": q.weight_bytes["fp32"]},
         {"file": q.bytes["int8"], "weights": q.weight_bytes["int8"]}),
        "-", time.perf_counter() - t0))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    settings = TrainingSettings(home=Path(tempfile.mkdtemp(prefix="bench-prune-")), progress=False)
    registry = Registry(settings.registry_dir)
    lines = ["| model | pruning (hidden units) | metric parent | pruned | change (points) | "
             "rows/s b1 | rows/s b256 | file KiB | weights KiB | zero weights | seconds |",
             "|" + " --- |" * 11]
    for name in args.models.split(","):
        config = TrainingConfig.from_settings(settings)
        meta = train_and_register(MODELS[name], name=name, registry=registry, options=TrainOptions(
            config=config, settings=settings))
        lines += _rows(registry.get(name, meta.version), settings, args.repeats)
    print(f"ONNX Runtime {ort.__version__}, CPU execution provider, 1 thread; {_cpu()}; "
          f"median of {args.repeats} timings; metric: accuracy on the parent's test split\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
