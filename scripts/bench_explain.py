#!/usr/bin/env python
"""Explanation benchmark: what one explanation costs, and whether explanations slow predictions.

    .venv/bin/python scripts/bench_explain.py [--seconds 8] [--rounds 2] [--nice 10,19] [--out bench_out/explain.md]

1. Cost per instance (in this process, ONNX Runtime on one thread, the serving default MLP of 30
   features): model evaluations (graph rows) and milliseconds per instance, by background rows and
   permutations (modelloop/explain.py; shap's kernels compiled before timing).
2. One `modelloop serve` (one worker): the 1-row /predict p50/p99 under wrk (8 connections),
   alternately without and with a client sending 1-instance /explain requests back to back, in
   ``--rounds`` ABAB rounds, so the spread between rounds of the same kind is the noise; once
   per ``--nice`` value of the explanation process (MODELLOOP_SERVING_EXPLAIN_NICE).

Prints one markdown table (and writes it to --out). Needs `wrk`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import shap

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_serving import BIN, STANDARD, json_body, register, servers, wrk  # noqa: E402

from modelloop.explain import background_rows, explain, masks_per_permutation, session_runner  # noqa: E402
from modelloop.registry import Registry  # noqa: E402

INSTANCES = 8


def cost_rows(home: Path) -> list[tuple[str, ...]]:
    version = Registry(home / "registry").get("bench")
    meta = version.metadata
    runner = session_runner(version)
    reference = version.reference()
    x = reference[meta.feature_names].to_numpy(np.float32)[:INSTANCES]
    explain(runner, meta, x[:1], background_rows(reference, meta.feature_names, 10), permutations=1,
            shap=shap)  # compiles shap's kernels
    rows = []
    for background in (50, 100):
        bg = background_rows(reference, meta.feature_names, background)
        for permutations in (1, 10):
            start = time.perf_counter()
            expl = explain(runner, meta, x, bg, permutations=permutations, shap=shap)
            ms = (time.perf_counter() - start) / len(x) * 1e3
            budget = permutations * masks_per_permutation(meta.n_features) * len(bg)
            rows.append((f"{meta.n_features} features, {len(bg)} background rows, {permutations} permutation(s)",
                         f"{expl.evaluations:,} (budget {budget:,})", f"{ms:.1f}",
                         f"{expl.additivity_error.max():.1e}"))
    return rows


def explain_load(url: str, body: bytes, stop: threading.Event, done: list[float]) -> None:
    import httpx

    with httpx.Client(timeout=120) as client:
        while not stop.is_set():
            start = time.perf_counter()
            r = client.post(f"{url}/explain", content=body, headers={"Content-Type": "application/json"})
            r.raise_for_status()
            done.append(time.perf_counter() - start)


def load_rows(home: Path, tmp: Path, seconds: float, rounds: int, nice: int) -> list[tuple[str, ...]]:
    env = {"MODELLOOP_HOME": str(home), "BENTOML_HOME": str(tmp / "bentoml"), "BENTOML_DO_NOT_TRACK": "True",
           "MODELLOOP_SERVING_EXPLAIN_NICE": str(nice)}
    spec = ("modelloop serve", [str(BIN / "modelloop"), "serve", "--workers", "1", "--host", "127.0.0.1"],
            "/v2/health/ready", env, None)
    one_row = json_body(tmp / "one.json", 1)
    explain_body = json_body(tmp / "explain.json", 1, seed=1).read_bytes()
    rows = []
    with servers([spec], tmp) as started:
        srv = started["modelloop serve"]
        url = f"{srv.url}/predict"
        import httpx

        httpx.post(f"{srv.url}/explain", content=explain_body, timeout=300).raise_for_status()  # starts the child
        for r in range(rounds):
            for loaded in (False, True):
                stop, done = threading.Event(), []
                thread = threading.Thread(target=explain_load, args=(srv.url, explain_body, stop, done))
                if loaded:
                    thread.start()
                    time.sleep(0.5)
                result = wrk(url, one_row, 8, seconds, {"Content-Type": "application/json"}, tmp, srv)
                stop.set()
                if loaded:
                    thread.join()
                explains = (f"{len(done)} ({np.median(done) * 1e3:.0f} ms each)" if done else "-")
                rows.append((f"nice {nice}, round {r + 1}, {'with' if loaded else 'without'} explain load",
                             f"{result['rps']:,.0f}", f"{result['p50']:.2f}", f"{result['p99']:.2f}",
                             str(int(result["errors"])), explains))
    return rows


def table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--nice", default="10,19", help="EXPLAIN_NICE values to run the load with")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-explain-") as d:
        tmp = Path(d)
        home = tmp / "home"
        register(home, "bench", STANDARD)
        cost = cost_rows(home)
        load = [row for nice in args.nice.split(",")
                for row in load_rows(home, tmp, args.seconds, args.rounds, int(nice))]
    text = "\n\n".join([
        f"Explanation cost per instance (mean over {INSTANCES} instances, one ONNX Runtime thread):",
        table(("case", "model evaluations per instance", "ms per instance", "max additivity error"), cost),
        f"1-row /predict under wrk (8 connections, {args.seconds:.0f} s each), one worker, "
        "without and with back-to-back 1-instance /explain requests (EXPLAIN_MAX_EVALS 200,000: "
        "10 permutations x 61 x 100 background rows = 61,000 evaluations each):",
        table(("run", "req/s", "p50 ms", "p99 ms", "errors", "explanations done"), load),
        f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs",
    ])
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
