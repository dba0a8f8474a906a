"""Training benchmark: time per stage of `modelloop train` on each built-in dataset, and the
exported model's inference speed in ONNX Runtime against PyTorch (CPU, both on
MODELLOOP_TRAINING_THREADS threads, default 1).

    .venv/bin/python scripts/bench_training.py [--datasets breast_cancer,wine,...] [--repeat 3]

Prints two markdown tables (the ones in BENCHMARKS.md, "## Training").
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from training.config import TrainingConfig
from training.data import load_data, split_dataset
from training.evaluate import evaluate
from training.export import check_parity, export_onnx, onnx_session
from training.models import InferenceGraph, MLPParams, build_model
from training.settings import TrainingSettings
from training.trainer import cpu_threads, fit, seeded


def _stage_times(name: str, settings: TrainingSettings) -> dict[str, float | str]:
    config = TrainingConfig.from_settings(settings)
    t0 = time.perf_counter()
    ds = load_data(name, rows=20000 if name == "synthetic" else None)
    split = split_dataset(ds, val_fraction=config.val_fraction, test_fraction=config.test_fraction,
                          seed=config.seed)
    t1 = time.perf_counter()
    with seeded(config.seed):
        net = build_model("mlp", MLPParams(), train_features=ds.features[split.train], task=ds.task,
                          n_outputs=len(ds.class_labels or [0]), train_target=ds.target[split.train])
    result = fit(net, net.loss,
                 (torch.from_numpy(ds.features[split.train]), net.encode_target(ds.target[split.train])),
                 (torch.from_numpy(ds.features[split.val]), net.encode_target(ds.target[split.val])),
                 config, progress=False)
    net = net.cpu().eval()
    t2 = time.perf_counter()
    graph = InferenceGraph(net)
    x_test = ds.features[split.test]
    data = export_onnx(graph, n_features=ds.n_features, output_names=[net.output_name], example=x_test)
    t3 = time.perf_counter()
    parity = check_parity(graph, data, x_test, tolerance=settings.parity_tolerance,
                          batch_sizes=settings.parity_batch_sizes, max_rows=settings.parity_rows)
    t4 = time.perf_counter()
    out = onnx_session(data).run(None, {"input": x_test})[0]
    metrics = evaluate(ds.task, ds.target[split.test], out, ds.class_labels).metrics
    score = f"acc {metrics['accuracy']:.3f}" if "accuracy" in metrics else f"r2 {metrics['r2']:.3f}"
    return {"dataset": name, "rows": len(ds), "epochs": result.epochs_run, "load_s": t1 - t0,
            "train_s": t2 - t1, "export_s": t3 - t2, "parity_s": t4 - t3, "score": score,
            "parity_diff": parity.max_abs_diff, "onnx": data, "net": net, "x": x_test}


def _rows_per_s(fn: object, x: np.ndarray, batch: int, budget_s: float = 1.0) -> float:
    rows = x[np.arange(batch) % len(x)]
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget_s:
        fn(rows)  # type: ignore[operator]
        done += batch
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="breast_cancer,wine,digits,diabetes,synthetic")
    parser.add_argument("--repeat", type=int, default=1, help="runs per dataset (median shown)")
    args = parser.parse_args()
    settings = TrainingSettings(progress=False)

    print("| dataset | rows | epochs | train s | export s | parity s | test score | parity max diff |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    speed_rows = []
    for name in args.datasets.split(","):
        with cpu_threads(settings.threads):  # as `modelloop train` runs
            runs = [_stage_times(name, settings) for _ in range(args.repeat)]
        med = {k: statistics.median(float(r[k]) for r in runs)  # type: ignore[arg-type]
               for k in ("train_s", "export_s", "parity_s")}
        r = runs[-1]
        print(f"| {name} | {r['rows']} | {r['epochs']} | {med['train_s']:.2f} | "
              f"{med['export_s']:.2f} | {med['parity_s']:.2f} | {r['score']} | "
              f"{float(r['parity_diff']):.1e} |")  # type: ignore[arg-type]
        speed_rows.append(r)

    print()
    print("| dataset | batch | onnxruntime rows/s | torch rows/s | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for r in speed_rows:
        net = r["net"]

        def torch_run(x: np.ndarray, n=net) -> object:
            with torch.inference_mode():
                return n.infer(torch.from_numpy(x))  # type: ignore[attr-defined]

        # torch first: ONNX Runtime's worker threads spin after a run and would slow it down;
        # both on the same number of threads
        with cpu_threads(settings.threads):
            torch_speed = {b: _rows_per_s(torch_run, r["x"], b) for b in (1, 64, 4096)}  # type: ignore[arg-type]
        session = onnx_session(r["onnx"], settings.threads)  # type: ignore[arg-type]

        def ort_run(x: np.ndarray, s=session) -> object:
            return s.run(None, {"input": x})

        for batch in (1, 64, 4096):
            a, b = _rows_per_s(ort_run, r["x"], batch), torch_speed[batch]  # type: ignore[arg-type]
            print(f"| {r['dataset']} | {batch} | {a:,.0f} | {b:,.0f} | {a / b:.1f}x |")
        del session

if __name__ == "__main__":
    main()
