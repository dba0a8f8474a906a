#!/usr/bin/env python
"""Serving benchmark: raw ONNX Runtime, a bare uvicorn endpoint, a default BentoML service and
`modelloop serve`, all in one run on this machine, with wrk as the load generator.

    .venv/bin/python scripts/bench_serving.py [--seconds 6] [--rows 1000000] [--out bench_out/serving.md]

Prints one markdown table (and writes it to --out). Compare ratios within one run: the machine
is shared, the load average is printed with the results. Needs `wrk` (scripts/ci_services.sh).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modelloop.registry import Registry  # noqa: E402
from tests.serving.onnx_models import metadata_for, mlp_graph, random_mlp  # noqa: E402

BIN = Path(sys.executable).parent
N_FEATURES = 30
STANDARD = (128, 64)  # the training package's default MLP shape
HEAVY = (1024, 1024, 1024, 1024)

BARE_APP = """
import numpy as np, onnxruntime as ort, orjson
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
opts = ort.SessionOptions(); opts.intra_op_num_threads = 1
SESSION = ort.InferenceSession({path!r}, opts, providers=["CPUExecutionProvider"])
async def predict(request):
    doc = orjson.loads(await request.body())
    x = np.asarray(doc["instances"], dtype=np.float32)
    proba = SESSION.run(None, {{"input": x}})[0]
    return Response(orjson.dumps({{"predictions": proba.tolist()}}), media_type="application/json")
async def ok(request):
    return Response(b"ok")
app = Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/ready", ok)])
"""

DEFAULT_BENTO = """
import bentoml, numpy as np, onnxruntime as ort
@bentoml.service(workers={workers})
class DefaultBento:
    def __init__(self):
        self.session = ort.InferenceSession({path!r}, providers=["CPUExecutionProvider"])
    @bentoml.api
    def predict(self, instances: list[list[float]]) -> dict:
        proba = self.session.run(None, {{"input": np.asarray(instances, dtype=np.float32)}})[0]
        return {{"predictions": proba.tolist()}}
"""

SINK_APP = """
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
async def events(request):
    body = await request.body()
    return Response(b'{"accepted": %d}' % body.count(b'"request_id"'), media_type="application/json")
async def ready(request):
    return Response(b"ok")
app = Starlette(routes=[Route("/events", events, methods=["POST"]), Route("/ready", ready)])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def process(cmd: list[str], ready_url: str, env: dict[str, str], log: Path, cwd: Path | None = None) -> Iterator[None]:
    """Start a server process group, wait until ready_url answers 200, stop it afterwards."""
    import httpx

    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=cwd)
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(ready_url, timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cmd} not ready:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def wrk(url: str, body: Path, connections: int, seconds: float, headers: dict[str, str], tmp: Path) -> dict[str, float]:
    """Run wrk with a POST body; returns req/s, p50/p99 (ms), errors (non-2xx + socket errors)."""
    lua = tmp / "post.lua"
    lines = ['wrk.method = "POST"', f'local f = io.open("{body}", "rb")', "wrk.body = f:read('*a')", "f:close()"]
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    lua.write_text("\n".join(lines) + "\n")
    threads = min(2, connections)
    # a short warm-up, then the measured run
    subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", "-d1s", "-s", str(lua), url], capture_output=True)
    done = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{round(seconds)}s", "--latency", "-s",
                           str(lua), url], capture_output=True, text=True)
    out = done.stdout
    if "Requests/sec" not in out:
        raise RuntimeError(f"wrk failed: {done.stdout}\n{done.stderr}")

    def ms(label: str) -> float:
        found = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not found:
            return float("nan")
        value, unit = float(found.group(1)), found.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rps = float(re.findall(r"Requests/sec:\s+([\d.]+)", out)[0])
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, sock.groups())) if sock else 0)
    return {"rps": rps, "p50": ms("50"), "p99": ms("99"), "errors": errors}


def json_body(path: Path, rows: int, seed: int = 0) -> Path:
    x = np.random.default_rng(seed).normal(size=(rows, N_FEATURES)).astype(np.float32)
    path.write_bytes(json.dumps({"instances": x.tolist()}).encode())
    return path


def oip_binary_body(path: Path, rows: int) -> tuple[Path, dict[str, str]]:
    x = np.random.default_rng(0).normal(size=(rows, N_FEATURES)).astype(np.float32)
    header = json.dumps({"inputs": [{"name": "input", "shape": [rows, N_FEATURES], "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()
    path.write_bytes(header + x.tobytes())
    return path, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}


def raw_ort(onnx_path: Path, batch: int, seconds: float = 2.0) -> float:
    """Rows/s of ONNX Runtime in-process (all cores) at one batch size."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(batch, N_FEATURES)).astype(np.float32)
    session.run(None, {"input": x})
    rows, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(None, {"input": x})
        rows += batch
    return rows / (time.perf_counter() - start)


def register(home: Path, name: str, hidden: tuple[int, ...]) -> Path:
    mlp = random_mlp(N_FEATURES, hidden, 2)
    features = [f"f{i:02d}" for i in range(N_FEATURES)]
    reg = Registry(home / "registry")
    meta = reg.register(metadata_for(name, mlp, features, ["no", "yes"]), mlp_graph(mlp, N_FEATURES))
    reg.promote(name, meta.version)
    return reg.get(name).onnx_path


def batch_cli(home: Path, tmp: Path, rows: int, chunk: int, onnx_path: Path) -> list[tuple[str, str]]:
    """modelloop batch score of a rows x 30 Parquet file: rows/s and peak RSS vs raw ORT at the chunk size."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(1)
    cols = {f"f{i:02d}": rng.normal(size=rows).astype(np.float32) for i in range(N_FEATURES)}
    src = tmp / "batch_in.parquet"
    pq.write_table(pa.table(cols), src, row_group_size=chunk)
    del cols
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run([str(BIN / "modelloop"), "batch", "score", str(src), str(tmp / "batch_out.parquet"),
                    "--name", "standard", "--chunk-rows", str(chunk)], check=True, capture_output=True,
                   env={**os.environ, "MODELLOOP_HOME": str(home)})
    seconds = time.perf_counter() - start
    rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    raw = raw_ort(onnx_path, chunk, seconds=3)
    note = "" if rss_mb > before / 1024 else " (peak of an earlier child)"
    return [
        (f"batch CLI {rows:,} x {N_FEATURES} Parquet, chunk {chunk}", f"{rows / seconds:,.0f} rows/s "
         f"({rows / seconds / raw:.2f}x raw ORT at batch {chunk}: {raw:,.0f} rows/s)"),
        ("batch CLI peak RSS", f"{rss_mb:,.0f} MiB{note}"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6, help="measured seconds per load point")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows for the batch CLI point")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="server worker processes")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out" / "serving.md")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: run scripts/ci_services.sh")
    tmp = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    home = tmp / "home"
    std_path = register(home, "standard", STANDARD)
    register(home, "heavy", HEAVY)
    one, big = json_body(tmp / "one.json", 1), json_body(tmp / "big.json", 1024)
    binary, binary_headers = oip_binary_body(tmp / "big.bin", 1024)
    jh = {"Content-Type": "application/json"}
    results: list[tuple[str, str, str]] = []  # (section, point, value)
    load_before = os.getloadavg()
    secs, w = args.seconds, str(args.workers)

    def point(section: str, label: str, url: str, body: Path, conns: int, headers: dict[str, str] = jh,
              rows: int = 1) -> dict[str, float]:
        r = wrk(url, body, conns, secs, headers, tmp)
        value = (f"{r['rps']:,.0f} req/s, p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms, {r['errors']} errors"
                 if rows == 1 else f"{r['rps'] * rows:,.0f} rows/s ({r['rps']:,.0f} req/s), {r['errors']} errors")
        results.append((section, label, value))
        print(f"{section:<28} {label:<44} {value}", flush=True)
        r["rows_s"] = r["rps"] * rows
        return r

    for batch in (1, 64, 1024):
        rows_s = raw_ort(std_path, batch)
        results.append(("raw ONNX Runtime", f"standard MLP, batch {batch}", f"{rows_s:,.0f} rows/s"))
        print(results[-1], flush=True)
    raw1024 = raw_ort(std_path, 1024)

    port = free_port()
    (tmp / "bare_app.py").write_text(BARE_APP.format(path=str(std_path)))
    with process([str(BIN / "uvicorn"), "bare_app:app", "--port", str(port), "--workers", w, "--no-access-log",
                  "--log-level", "warning"], f"http://127.0.0.1:{port}/ready", {}, tmp / "bare.log", cwd=tmp):
        url = f"http://127.0.0.1:{port}/predict"
        bare = {c: point("bare uvicorn+Starlette+ORT", f"1-row, {c} connections", url, one, c) for c in (32, 128)}
        point("bare uvicorn+Starlette+ORT", "1024-row JSON, 8 connections", url, big, 8, rows=1024)

    port = free_port()
    (tmp / "default_bento.py").write_text(DEFAULT_BENTO.format(path=str(std_path), workers=w))
    with process([str(BIN / "bentoml"), "serve", "default_bento:DefaultBento", "--port", str(port)],
                 f"http://127.0.0.1:{port}/readyz", {"BENTOML_DO_NOT_TRACK": "True", "BENTOML_HOME": str(tmp / "bh")},
                 tmp / "default.log", cwd=tmp):
        for c in (32, 128):
            point("default BentoML service", f"1-row, {c} connections", f"http://127.0.0.1:{port}/predict", one, c)

    sink_port = free_port()
    (tmp / "sink_app.py").write_text(SINK_APP)
    ours: dict[str, dict[int, dict[str, float]]] = {}
    heavy: dict[str, dict[str, float]] = {}
    sink_cmd = [str(BIN / "uvicorn"), "sink_app:app", "--port", str(sink_port), "--log-level", "warning",
                "--no-access-log"]
    with process(sink_cmd, f"http://127.0.0.1:{sink_port}/ready", {}, tmp / "sink.log", cwd=tmp):
        for label, extra in (("events on", {"MODELLOOP_SERVING_SIDECAR_URL": f"http://127.0.0.1:{sink_port}"}),
                             ("events off", {}), ("BentoML middleware (fast path off)", {"MODELLOOP_SERVING_FAST_PATH": "false"})):
            port = free_port()
            env = {"MODELLOOP_HOME": str(home), "BENTOML_HOME": str(tmp / "bh"), "MODELLOOP_SERVING_MODEL": "standard",
                   "MODELLOOP_SERVING_LOG_LEVEL": "WARNING", **extra}
            with process([str(BIN / "modelloop"), "serve", "--port", str(port), "--workers", w],
                         f"http://127.0.0.1:{port}/v2/health/ready", env, tmp / f"ours-{label[:6]}.log"):
                section = f"modelloop serve, {label}"
                url = f"http://127.0.0.1:{port}"
                conns = (32, 128) if "fast path" not in label else (32,)
                ours[label] = {c: point(section, f"1-row, {c} connections", f"{url}/predict", one, c) for c in conns}
                if label == "events on":
                    r = point(section, "1024-row JSON /predict, 8 connections", f"{url}/predict", big, 8, rows=1024)
                    results.append((section, "  vs raw ORT at batch 1024", f"{r['rows_s'] / raw1024:.2f}x"))
                    r = point(section, "1024-row OIP binary, 8 connections", f"{url}/v2/models/standard/infer",
                              binary, 8, binary_headers, rows=1024)
                    results.append((section, "  vs raw ORT at batch 1024", f"{r['rows_s'] / raw1024:.2f}x"))
        for label, flag in (("batching on", "--batching"), ("batching off", "--no-batching")):
            port = free_port()
            env = {"MODELLOOP_HOME": str(home), "BENTOML_HOME": str(tmp / "bh"), "MODELLOOP_SERVING_MODEL": "heavy",
                   "MODELLOOP_SERVING_LOG_LEVEL": "WARNING"}
            with process([str(BIN / "modelloop"), "serve", "--port", str(port), "--workers", w, flag],
                         f"http://127.0.0.1:{port}/v2/health/ready", env, tmp / f"heavy-{label[:9]}.log"):
                heavy[label] = point(f"heavy MLP 4x1024, {label}", "1-row, 64 connections",
                                     f"http://127.0.0.1:{port}/predict", one, 64)

    for label, value in batch_cli(home, tmp, args.rows, 65536, std_path):
        results.append(("batch", label, value))
        print(results[-1], flush=True)

    on, off = ours["events on"], ours["events off"]
    ratios = [
        ("ours (events on) / bare, 32 conns, req/s", on[32]["rps"] / bare[32]["rps"], ">= 0.5"),
        ("ours (events on) / bare, 32 conns, p99", on[32]["p99"] / bare[32]["p99"], "<= 2"),
        ("events on / events off, 32 conns, req/s", on[32]["rps"] / off[32]["rps"], ">= 0.95"),
        ("events on / events off, 128 conns, req/s", on[128]["rps"] / off[128]["rps"], ">= 0.95"),
        ("heavy: batching on / off, rows/s", heavy["batching on"]["rps"] / heavy["batching off"]["rps"], ">= 3"),
    ]
    lines = [f"Load average before: {load_before[0]:.2f}, after: {os.getloadavg()[0]:.2f} "
             f"({os.cpu_count()} cores, {args.workers} server workers, wrk on the same cores).", "",
             "| section | point | result |", "| --- | --- | --- |"]
    lines += [f"| {s} | {p} | {v} |" for s, p, v in results]
    lines += ["", "| ratio | measured | target |", "| --- | --- | --- |"]
    lines += [f"| {name} | {value:.2f} | {target} |" for name, value, target in ratios]
    table = "\n".join(lines)
    print("\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
