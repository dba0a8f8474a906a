#!/usr/bin/env python
"""GPU path check, in one run on a machine with an NVIDIA GPU and onnxruntime-gpu:

    python scripts/bench_gpu.py [--sections raw,served,batch] [--seconds 3] [--rows 1000000]
                                [--workers 4] [--profile] [--dry-run] [--out bench_out/gpu.md]

1. raw (section ``raw``): ONNX Runtime in-process on the CUDA provider at batch 1 to 262144
   (numpy in and out, and through IO binding with the input already on the GPU: the limit), the
   CPU provider beside it up to 65536, and the largest difference between the two providers'
   probabilities;
2. served (``served``): `modelloop serve --providers cuda` under wrk: 1-row requests with
   batching on and off (and the heavy model on the CPU provider for reference), 1024-row JSON and
   Open Inference Protocol binary requests; the provider each server reports; GPU memory (NVML,
   per process); the monitoring sidecar's own GPU and process metrics while the load runs;
3. batch (``batch``): `modelloop batch score --providers cuda` of a ``--rows`` x 30 Parquet file
   at chunks of 65536 and 262144 rows against raw CUDA at the chunk size, with its peak RSS;
   ``--profile`` then runs one more under py-spy (all threads) and prints where its time went.

A figure counts only with CUDAExecutionProvider active: the script stops when a session does not
report it first in get_providers(). Each section that fails is reported and the rest still run.
``--dry-run`` runs the same steps on the CPU provider (to check the script on a machine without
a GPU). Needs wrk on the PATH. Prints a markdown table and writes it to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serving import (
    HEAVY,
    N_FEATURES,
    ROOT,
    STANDARD,
    Server,
    batch_size,
    json_body,
    oip_binary_body,
    register,
    run_batch_score,
    servers,
    wrk,
)

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
DRY = {"provider": CUDA, "device": "cuda", "flag": "cuda"}  # --dry-run: the same steps on the CPU
MODELLOOP = [sys.executable, "-m", "modelloop.cli"]
BATCHES = (1, 64, 1024, 8192, 65536, 262144)
CPU_MAX_BATCH = 65536  # the CPU reference stops here (a heavy-model call at 262144 takes seconds)


def session(path: Path, provider: str):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    if provider == CUDA:
        provider = DRY["provider"]
    providers = [(CUDA, {"device_id": 0}), CPU] if provider == CUDA else [CPU]
    sess = ort.InferenceSession(str(path), providers=providers)
    if sess.get_providers()[0] != provider:
        raise RuntimeError(f"asked for {provider}, active: {sess.get_providers()}")
    return sess


def timed(step: Callable[[], object], rows: int, seconds: float) -> float:
    """Rows/s of ``step`` repeated for ``seconds`` (at least 3 calls) after 2 warm-up calls."""
    step(), step()
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        step()
        calls += 1
    return calls * rows / (time.perf_counter() - start)


def raw_points(path: Path, seconds: float) -> tuple[dict[tuple[str, int], float], float]:
    """(variant, batch) -> rows/s, and the largest |CUDA - CPU| over the probabilities."""
    import onnxruntime as ort

    gpu, cpu = session(path, CUDA), session(path, CPU)
    out_names = [o.name for o in gpu.get_outputs()]
    result: dict[tuple[str, int], float] = {}
    rng = np.random.default_rng(0)
    diff = 0.0
    for batch in BATCHES:
        x = rng.normal(size=(batch, N_FEATURES)).astype(np.float32)
        a, b = gpu.run(["probabilities"], {"input": x})[0], cpu.run(["probabilities"], {"input": x})[0]
        diff = max(diff, float(np.abs(a - b).max()))
        result["cuda, numpy in/out", batch] = timed(lambda x=x: gpu.run(None, {"input": x}), batch, seconds)
        # the limit: input already on the GPU, outputs left there
        x_gpu = ort.OrtValue.ortvalue_from_numpy(x, DRY["device"], 0)
        binding = gpu.io_binding()
        binding.bind_ortvalue_input("input", x_gpu)
        for name in out_names:
            binding.bind_output(name, DRY["device"], 0)

        def bound(binding=binding) -> None:  # type: ignore[no-untyped-def]
            gpu.run_with_iobinding(binding)
            binding.synchronize_outputs()

        result["cuda, IO binding on device", batch] = timed(bound, batch, seconds)
        if batch <= CPU_MAX_BATCH:
            result["cpu, all cores", batch] = timed(lambda x=x: cpu.run(None, {"input": x}), batch, seconds / 2)
    return result, diff


def nvml_memory(pids: set[int] | None = None) -> tuple[float, float]:
    """(MiB used by these processes, MiB used on GPU 0 in all)."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return float("nan"), float("nan")
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        total = pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
        if pids is None:
            return float("nan"), total
        mine = sum((p.usedGpuMemory or 0) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                   if p.pid in pids) / 2**20
        return mine, total
    finally:
        pynvml.nvmlShutdown()


def tree_pids(pid: int) -> set[int]:
    import psutil

    root = psutil.Process(pid)
    return {pid, *(p.pid for p in root.children(recursive=True))}


def provider_of(srv: Server) -> str:
    import httpx

    found = re.findall(r'^modelloop_serving_model_info\{[^}]*provider="([^"]+)"[^}]*\} 1\.0', httpx.get(srv.url + "/metrics").text, re.M)
    return ",".join(sorted(set(found))) or "?"


def batch_score(home: Path, tmp: Path, src: Path, name: str, chunk: int,
                profile: Path | None = None) -> tuple[float, float, str]:
    """(rows/s scoring as the CLI reports it, peak RSS MiB, provider line of its log); with
    ``profile``, under py-spy (all threads, raw stacks written there)."""
    spy = ["py-spy", "record", "-r", "250", "--threads", "-f", "raw", "-o", str(profile), "--"] if profile else []
    text, scoring, peak = run_batch_score(
        [*spy, *MODELLOOP, "batch", "score", str(src), str(tmp / f"out-{name}.parquet"), "--name", name,
         "--chunk-rows", str(chunk), "--providers", DRY["flag"], "--restart"], home, tmp / f"batch-{name}.log")
    provider = re.findall(r" v\d+ on (\S+) into ", text.replace("\n", " "))
    return scoring, peak, ",".join(provider) or "?"


def summarize_profile(path: Path, top: int = 14) -> list[str]:
    """Share of py-spy samples per thread and per innermost frame of our code, pyarrow or ORT."""
    import collections

    threads: collections.Counter[str] = collections.Counter()
    frames: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        parts = stack.split(";")
        threads[parts[0].split(" (")[-1].rstrip(")")[:30] if parts else "?"] += n
        ours = [f for f in parts if any(k in f for k in ("serving/", "onnxruntime", "pyarrow", "numpy"))]
        frames[(ours[-1] if ours else parts[-1]).split(" (")[0]] += n
    lines = [f"py-spy samples: {total}; by thread: " + ", ".join(f"{t} {v / total:.0%}" for t, v in threads.most_common(4))]
    lines += [f"  {v / total:6.1%}  {k}" for k, v in frames.most_common(top)]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3, help="measured seconds per load point")
    parser.add_argument("--raw-seconds", type=float, default=0.6, help="measured seconds per raw ORT point")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows for the batch CLI point")
    parser.add_argument("--workers", type=int, default=4, help="server worker processes")
    parser.add_argument("--wrk-threads", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out" / "gpu.md")
    parser.add_argument("--dry-run", action="store_true", help="run every step on the CPU provider (checks the script)")
    parser.add_argument("--profile", action="store_true", help="also profile one batch run with py-spy (when on the PATH)")
    parser.add_argument("--sections", default="raw,served,batch", help="comma-separated: raw, served, batch")
    args = parser.parse_args()
    if args.dry_run:
        DRY.update(provider=CPU, device="cpu", flag="cpu")
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    rows: list[tuple[str, str, str]] = []
    failures: list[str] = []

    def add(section: str, point: str, value: str) -> None:
        rows.append((section, point, value))
        print(f"| {section} | {point} | {value} |", flush=True)

    def attempt(label: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            failures.append(f"{label}: {traceback.format_exc()}")
            print(f"FAILED {label}:\n{traceback.format_exc()}", flush=True)

    import pynvml

    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        gpu_name, driver = pynvml.nvmlDeviceGetName(handle), pynvml.nvmlSystemGetDriverVersion()
        pynvml.nvmlShutdown()
    except pynvml.NVMLError as exc:
        gpu_name, driver = f"none ({exc})", "-"
    head = (f"GPU: {gpu_name}, driver {driver}; onnxruntime {ort.__version__}, providers "
            f"{ort.get_available_providers()}; {os.cpu_count()} CPU cores; Python {sys.version.split()[0]}")
    print(head, flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    home = tmp / "home"
    paths = {"standard": register(home, "standard", STANDARD), "heavy": register(home, "heavy", HEAVY)}
    print("first CUDA session:", session(paths["standard"], CUDA).get_providers(), flush=True)  # else stop here
    raw: dict[str, dict[tuple[str, int], float]] = {}

    def raw_section() -> None:
        for name, path in paths.items():
            raw[name], diff = raw_points(path, args.raw_seconds)
            for (variant, batch), value in raw[name].items():
                add(f"raw ORT, {name} MLP", f"{variant}, batch {batch}", f"{value:,.0f} rows/s")
            add(f"raw ORT, {name} MLP", "max abs difference CUDA vs CPU (probabilities)", f"{diff:.2e}")
        mine, total = nvml_memory({os.getpid()})
        add("GPU memory", "this process (2 CUDA sessions, after the runs)", f"{mine:,.0f} MiB (GPU total used {total:,.0f} MiB)")

    if "raw" in args.sections:
        attempt("raw ORT", raw_section)

    def served_section() -> None:
        one, big = json_body(tmp / "one.json", 1), json_body(tmp / "big.json", 1024)
        binary, bin_headers = oip_binary_body(tmp / "big.bin", 1024)
        jh = {"Content-Type": "application/json"}
        env = {"MODELLOOP_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True", "BENTOML_HOME": str(tmp / "bh"),
               "MODELLOOP_SERVING_LOG_LEVEL": "WARNING"}
        serve = [*MODELLOOP, "serve", "--workers", str(args.workers), "--providers", DRY["flag"]]
        HON, HOFF, STD = "heavy MLP, batching on", "heavy MLP, batching off", "standard MLP"
        HCPU = "heavy MLP, batching on, CPU provider (reference)"
        cpu_serve = [*MODELLOOP, "serve", "--workers", str(args.workers), "--providers", "cpu"]
        specs = [(HON, [*serve, "--name", "heavy", "--max-batch-wait-s", "0.005"], "/v2/health/ready", env, None),
                 (HOFF, [*serve, "--name", "heavy", "--no-batching"], "/v2/health/ready", env, None),
                 (STD, [*serve, "--name", "standard"], "/v2/health/ready", env, None),
                 (HCPU, [*cpu_serve, "--name", "heavy", "--max-batch-wait-s", "0.005"], "/v2/health/ready", env, None)]

        def point(srv: Server, label: str, path: str, body: Path, headers: dict[str, str], conns: int, n: int) -> None:
            m = wrk(srv.url + path, body, conns, args.seconds, headers, tmp, srv, threads=args.wrk_threads)
            value = (f"{m['rps'] * n:,.0f} rows/s ({m['rps']:,.0f} req/s), p50 {m['p50']:.1f} ms, "
                     f"p99 {m['p99']:.1f} ms, {m['errors']:.0f} errors")
            add(f"modelloop serve, {srv.name}", label, value)

        with servers(specs, tmp) as group:
            for srv in group.values():
                add(f"modelloop serve, {srv.name}", "active provider (modelloop_serving_model_info)", provider_of(srv))
            # the sidecar watches the batching server: its process and GPU metrics under load
            side_env = {"MODELLOOP_HOME": str(home), "MODELLOOP_MONITOR_TARGET_PID": str(group[HON].proc.pid),
                        "MODELLOOP_MONITOR_CHECK_INTERVAL_S": "1", "MODELLOOP_MONITOR_MODELS": "heavy",
                        "MODELLOOP_MONITOR_STORE_URL": f"sqlite:///{tmp / 'events.db'}"}
            with servers([("sidecar", [*MODELLOOP, "monitor"], "/ready", side_env, None)], tmp) as side:
                sampled: list[str] = []
                stop = threading.Event()

                def scrape() -> None:  # the sidecar's GPU lines at the busiest moment seen
                    import httpx

                    best = -1.0
                    while not stop.wait(0.5):
                        with contextlib.suppress(httpx.HTTPError):
                            text = httpx.get(side["sidecar"].url + "/metrics", timeout=2).text
                            lines = [ln for ln in text.splitlines()
                                     if ln.startswith(("modelloop_gpu_", "modelloop_process_cpu", "modelloop_process_memory"))]
                            util = [float(ln.split()[-1]) for ln in lines if ln.startswith("modelloop_gpu_utilization")]
                            if lines and (max(util, default=0.0) >= best):
                                best = max(util, default=0.0)
                                sampled[:] = lines

                scraper = threading.Thread(target=scrape, daemon=True)
                scraper.start()
                point(group[HON], "1-row, 64 connections", "/predict", one, jh, 64, 1)
                point(group[HOFF], "1-row, 64 connections", "/predict", one, jh, 64, 1)
                point(group[HCPU], "1-row, 64 connections", "/predict", one, jh, 64, 1)
                add(f"modelloop serve, {HON}", "rows per ONNX Runtime call (batching on)", f"{batch_size(group[HON]):.1f}")
                point(group[HON], "1024-row JSON /predict, 16 connections", "/predict", big, jh, 16, 1024)
                point(group[HON], "1024-row OIP binary, 16 connections", "/v2/models/heavy/infer", binary, bin_headers, 16, 1024)
                stop.set()
                scraper.join()
                for line in sampled:
                    add("sidecar /metrics (watching the batching server, under load)", line.split(" ")[0], line.split(" ")[-1])
            point(group[STD], "1-row, 32 connections", "/predict", one, jh, 32, 1)
            point(group[STD], "1024-row JSON /predict, 16 connections", "/predict", big, jh, 16, 1024)
            point(group[STD], "1024-row OIP binary, 16 connections", "/v2/models/standard/infer", binary, bin_headers, 16, 1024)
            for srv in group.values():
                mine, total = nvml_memory(tree_pids(srv.proc.pid))
                add("GPU memory", f"{srv.name} server ({args.workers} workers, NVML per process)",
                    f"{mine:,.0f} MiB (GPU total used {total:,.0f} MiB)")

    if "served" in args.sections:
        attempt("served", served_section)

    def batch_section() -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rng = np.random.default_rng(1)
        src = tmp / "batch_in.parquet"
        pq.write_table(pa.table({f"f{i:02d}": rng.normal(size=args.rows).astype(np.float32) for i in range(N_FEATURES)}),
                       src, row_group_size=65536)
        for name in paths:
            for chunk in (65536, 262144):
                runs = [batch_score(home, tmp, src, name, chunk) for _ in range(2)]
                scoring = statistics.median(r[0] for r in runs)
                if not raw.get(name):  # the raw section did not run: measure the baseline here
                    raw[name] = {}
                if ("cuda, numpy in/out", chunk) not in raw[name]:
                    sess = session(paths[name], CUDA)
                    x = np.random.default_rng(0).normal(size=(chunk, N_FEATURES)).astype(np.float32)
                    raw[name]["cuda, numpy in/out", chunk] = timed(lambda x=x, sess=sess: sess.run(None, {"input": x}), chunk, 1.0)
                base = raw[name]["cuda, numpy in/out", chunk]
                add("modelloop batch score --providers cuda", f"{args.rows:,} x {N_FEATURES} Parquet, {name} MLP, chunk {chunk}",
                    f"{scoring:,.0f} rows/s, {scoring / base:.2f}x raw CUDA numpy in/out at batch {chunk} "
                    f"({base:,.0f} rows/s); peak RSS {max(r[1] for r in runs):,.0f} MiB (2 runs: "
                    f"{', '.join(f'{r[0]:,.0f}' for r in runs)})")
        add("modelloop batch score --providers cuda", "active provider (its last line)", runs[-1][2])

    if "batch" in args.sections:
        attempt("batch", batch_section)

    def profile_section() -> None:
        if args.profile and shutil.which("py-spy") and (tmp / "batch_in.parquet").exists():
            profile = args.out.parent / "batch-profile.txt"
            # (the peak RSS it returns is py-spy's own here, so it is not reported)
            batch_score(home, tmp, tmp / "batch_in.parquet", "standard", 65536, profile)
            summary = summarize_profile(profile)
            (args.out.parent / "batch-profile-summary.txt").write_text("\n".join(summary) + "\n")
            print("\n".join(summary), flush=True)

    attempt("batch profile", profile_section)

    lines = [head, "", "| section | point | result |", "| --- | --- | --- |"]
    lines += [f"| {s} | {p} | {v} |" for s, p, v in rows]
    if failures:
        lines += ["", "Failed sections:", *[f"    {line}" for f in failures for line in f.strip().splitlines()[-12:]]]
    table = "\n".join(lines)
    print("\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
