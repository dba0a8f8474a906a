"""Quantization benchmark: fp32 against int8 (ONNX Runtime) for each architecture, on the test
split each model was judged on: the task's primary metric, CPU rows/s on one thread at batch 1
and 256 (median of repeats, fp32 and int8 taking turns) and the sizes.

    .venv/bin/python scripts/bench_quantize.py [--models digits-cnn,cancer-mlp] [--repeats 5]

Trains each model in a temporary home (epochs capped so the whole run takes a couple of
minutes), quantizes it with ``training.quantize.quantize_version`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort

from modelloop.registry import Registry
from training.config import TrainingConfig
from training.data import load_data
from training.pipeline import TrainOptions, train_and_register
from training.quantize import NotQuantizable, QuantizeError, quantize_version
from training.settings import TrainingSettings


@dataclass(frozen=True)
class Spec:
    name: str
    dataset: str
    architecture: str
    method: str
    overrides: dict[str, Any] = field(default_factory=dict)
    rows: int | None = None


SPECS = [
    Spec("digits-cnn", "digits", "cnn", "static", {"epochs": 30}),
    Spec("digits-cnn", "digits", "cnn", "dynamic", {"epochs": 30}),
    Spec("digits-mlp", "digits", "mlp", "dynamic"),
    Spec("cancer-mlp", "breast_cancer", "mlp", "dynamic"),
    Spec("cancer-mlp", "breast_cancer", "mlp", "static"),
    Spec("digits-autoencoder", "digits", "autoencoder", "dynamic"),
    Spec("sequences-gru", "sequences", "gru", "dynamic", {"epochs": 20}, rows=2000),
]


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(dict.fromkeys(s.name for s in SPECS)))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    wanted = set(args.models.split(","))

    home = Path(tempfile.mkdtemp(prefix="bench-quantize-"))
    settings = TrainingSettings(home=home, progress=False)
    registry = Registry(settings.registry_dir)
    trained: dict[str, int] = {}
    lines = [
        "| model | method | metric | fp32 | int8 | change (points) | rows/s b1 fp32 | int8 | "
        "speed-up | rows/s b256 fp32 | int8 | speed-up | file KiB fp32 -> int8 | "
        "weights KiB fp32 -> int8 | kept float |",
        "|" + " --- |" * 15,
    ]
    notes: list[str] = []
    for spec in SPECS:
        if spec.name not in wanted:
            continue
        if spec.name not in trained:
            t0 = time.perf_counter()
            config = TrainingConfig.from_settings(settings, architecture=spec.architecture,
                                                  **spec.overrides)
            data = load_data(spec.dataset, rows=spec.rows, seed=config.seed)
            meta = train_and_register(data, name=spec.name, registry=registry, options=TrainOptions(
                config=config, settings=settings, lineage={"dataset_rows": spec.rows}))
            trained[spec.name] = meta.version
            notes.append(f"{spec.name}: trained in {time.perf_counter() - t0:.0f} s "
                         f"({meta.evaluation['training']['epochs_run']} epochs)")
        version = registry.get(spec.name, trained[spec.name])
        try:
            report = quantize_version(version, method=spec.method, settings=settings,
                                      speed_repeats=args.repeats).report
        except (NotQuantizable, QuantizeError) as exc:
            notes.append(f"{spec.name} {spec.method}: skipped: {exc}")
            continue
        r, m = report.rows_per_s, report.metric
        lines.append(
            f"| {spec.name} | {report.method} | {m} | {report.fp32_metrics[m]:.4f} | "
            f"{report.int8_metrics[m]:.4f} | {-report.loss_points + 0.0:+.2f} | "
            f"{r['fp32'][1]:,.0f} | {r['int8'][1]:,.0f} | x{report.speedup[1]:.2f} | "
            f"{r['fp32'][256]:,.0f} | {r['int8'][256]:,.0f} | x{report.speedup[256]:.2f} | "
            f"{report.bytes['fp32'] / 1024:.1f} -> {report.bytes['int8'] / 1024:.1f} | "
            f"{report.weight_bytes['fp32'] / 1024:.1f} -> {report.weight_bytes['int8'] / 1024:.1f} | "
            f"{', '.join(report.kept_float) or '-'} |")
    print(f"ONNX Runtime {ort.__version__}, CPU execution provider, 1 thread; {_cpu()}; "
          f"median of {args.repeats} timings\n")
    print("\n".join(lines))
    print()
    for note in notes:
        print(f"* {note}")


if __name__ == "__main__":
    main()
