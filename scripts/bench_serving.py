#!/usr/bin/env python
"""Serving benchmark: raw ONNX Runtime, a bare uvicorn endpoint, a default BentoML service and
`modelloop serve`, all in one run on this machine, with wrk as the load generator.

    .venv/bin/python scripts/bench_serving.py [--seconds 6] [--rows 1000000] [--out bench_out/serving.md]
        [--only one-row,big,heavy,batch,grpc,models-rss]

Prints one markdown table (and writes it to --out). Compare ratios within one run: the machine
is shared, the load average is printed with the results. Needs `wrk`, and `h2load` for the grpc
section (scripts/ci_services.sh installs both).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modelloop.ports import free_port  # noqa: E402
from modelloop.registry import Registry  # noqa: E402
from tests.serving.onnx_models import (  # noqa: E402
    metadata_for,
    mlp_graph,
    random_mlp,
    reference_sample,
)

BIN = Path(sys.executable).parent
N_FEATURES = 30
STANDARD = (128, 64)  # the training package's default MLP shape
HEAVY = (1024, 1024, 1024, 1024)
SECTIONS = ("one-row", "big", "heavy", "batch", "grpc", "models-rss")
MODEL_COUNTS = (1, 10, 50)  # models loaded in one server for the models-rss section

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
async def events(request):  # a stand-in sidecar: reads the batch and acknowledges it
    await request.body()
    return Response(b'{"accepted": 0}', media_type="application/json")
async def ready(request):
    return Response(b"ok")
app = Starlette(routes=[Route("/events", events, methods=["POST"]), Route("/ready", ready)])
"""


@dataclass
class Server:
    """A server under test: its process group and where to send load."""

    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of the whole process tree so far."""
        import psutil

        total = 0.0
        try:
            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    t = p.cpu_times()
                    total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
        return total


@contextlib.contextmanager
def servers(specs: list[tuple[str, list[str], str, dict[str, str], Path | None]], tmp: Path) -> Iterator[dict[str, Server]]:
    """Start every (name, command, ready path, env, cwd) at once; wait until all answer; stop them.
    Running side by side, they can be measured in alternation under the same background load."""
    import httpx

    started: dict[str, Server] = {}
    try:
        for name, cmd, ready, env, cwd in specs:
            port = free_port()
            log = tmp / f"{re.sub(r'[^a-z0-9]+', '-', name.lower())}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen([*cmd, "--port", str(port)], env={**os.environ, **env}, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)
            started[name] = Server(name, proc, f"http://127.0.0.1:{port}", log)
            started[name].ready = ready  # type: ignore[attr-defined]
        deadline = time.monotonic() + 180
        for srv in started.values():
            while True:
                if srv.proc.poll() is not None:
                    raise RuntimeError(f"{srv.name} exited:\n{srv.log.read_text()[-3000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(srv.url + srv.ready, timeout=1).status_code == 200:  # type: ignore[attr-defined]
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{srv.name} not ready:\n{srv.log.read_text()[-3000:]}")
                time.sleep(0.2)
        yield started
    finally:
        for srv in started.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(srv.proc.pid, signal.SIGTERM)
        for srv in started.values():
            try:
                srv.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(srv.proc.pid, signal.SIGKILL)


def wrk(url: str, body: Path, connections: int, seconds: float, headers: dict[str, str], tmp: Path,
        server: Server | None = None, threads: int = 2, paths: Sequence[str] = ()) -> dict[str, float]:
    """Run wrk with a POST body: req/s, p50/p99 (ms), errors (non-2xx + socket errors), and the
    server's CPU microseconds per request. ``paths``: each request goes to the next of them in
    turn (url's host), instead of url's path."""
    lua = tmp / "post.lua"
    lines = ['wrk.method = "POST"', f'local f = io.open("{body}", "rb")', "wrk.body = f:read('*a')", "f:close()"]
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    if paths:
        lines += ["local paths = {" + ", ".join(f'"{p}"' for p in paths) + "}", "local i = 0",
                  "request = function() i = i % #paths + 1; return wrk.format(nil, paths[i]) end"]
    lua.write_text("\n".join(lines) + "\n")
    threads = min(threads, connections)
    # a short warm-up, then the measured run
    subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", "-d1s", "-s", str(lua), url], capture_output=True)
    cpu0 = server.cpu_seconds() if server else 0.0
    done = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{round(seconds)}s", "--latency", "-s",
                           str(lua), url], capture_output=True, text=True)
    cpu1 = server.cpu_seconds() if server else 0.0
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
    count = int(re.findall(r"(\d+) requests in", out)[0])
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, sock.groups())) if sock else 0)
    return {"rps": rps, "p50": ms("50"), "p99": ms("99"), "errors": errors,
            "cpu_us": (cpu1 - cpu0) / count * 1e6 if count and server else float("nan")}


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


GRPC_PATH = "/inference.GRPCInferenceService/ModelInfer"


def grpc_body(path: Path, rows: int) -> Path:
    """The HTTP/2 body of a gRPC ModelInfer call (flag byte, big-endian length, message) with the
    same rows as :func:`oip_binary_body`, as ``raw_input_contents``."""
    from serving.proto import predict_v2_pb2 as pb

    x = np.random.default_rng(0).normal(size=(rows, N_FEATURES)).astype(np.float32)
    request = pb.ModelInferRequest(model_name="standard")
    request.inputs.add(name="input", datatype="FP32", shape=[rows, N_FEATURES])
    request.raw_input_contents.append(x.tobytes())
    message = request.SerializeToString()
    path.write_bytes(b"\0" + len(message).to_bytes(4, "big") + message)
    return path


def grpc_check(target: str, body: Path) -> None:
    """One ModelInfer call with ``body``'s message through grpcio: it must answer (an error raises)."""
    import grpc

    from serving.proto import predict_v2_pb2 as pb
    from serving.proto import predict_v2_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelInfer(pb.ModelInferRequest.FromString(body.read_bytes()[5:]), timeout=30)


def h2load(url: str, body: Path, connections: int, seconds: float, server: Server) -> dict[str, float]:
    """gRPC load with h2load, closed-loop like wrk (one stream per HTTP/2 connection): req/s, mean
    latency in ms (h2load reports no percentiles), errors (streams failed or errored at the
    HTTP level; a call refused in its gRPC status shows in the server's metrics) and the server's
    CPU microseconds per request."""
    cmd = ["h2load", f"-t{min(2, connections)}", f"-c{connections}", "-m1", "-d", str(body),
           "-H", "content-type: application/grpc", "-H", "te: trailers"]
    subprocess.run([*cmd, "-D1", url], capture_output=True)  # warm-up
    cpu0 = server.cpu_seconds()
    done = subprocess.run([*cmd, f"-D{round(seconds)}", url], capture_output=True, text=True)
    cpu1 = server.cpu_seconds()
    out = done.stdout
    found = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    counts = re.search(r"requests: \d+ total, \d+ started, (\d+) done, \d+ succeeded, (\d+) failed, "
                       r"(\d+) errored", out)
    latency = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)\s", out)
    if not (found and counts and latency):
        raise RuntimeError(f"h2load failed: {out}\n{done.stderr}")
    value, unit = float(latency.group(1)), latency.group(2)
    count = int(counts.group(1))
    return {"rps": float(found.group(1)), "mean": value / 1000 if unit == "us" else value * 1000 if unit == "s" else value,
            "errors": int(counts.group(2)) + int(counts.group(3)),
            "cpu_us": (cpu1 - cpu0) / count * 1e6 if count else float("nan")}


def grpc_refused(server: Server) -> float:
    """ModelInfer calls the server answered with another status than OK, from its /metrics."""
    import httpx

    text = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(float(v) for code, v in re.findall(
        r'^modelloop_serving_requests_total\{[^}]*code="(\d+)"[^}]*route="grpc_infer"[^}]*\} (\S+)', text, re.M)
        if code != "200")


def raw_ort(onnx_path: Path, batch: int, seconds: float = 2.0, threads: int = 0) -> float:
    """Rows/s of ONNX Runtime in-process at one batch size (threads 0: all cores)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(batch, N_FEATURES)).astype(np.float32)
    session.run(None, {"input": x})
    rows, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(None, {"input": x})
        rows += batch
    return rows / (time.perf_counter() - start)


def register(home: Path, name: str, hidden: tuple[int, ...]) -> Path:
    """A random MLP registered with a reference sample of its own predictions (an alias moves
    only to a version that reproduces its reference) and promoted."""
    import pandas as pd

    from modelloop.schemas import Task
    from modelloop.synthetic import TARGET

    mlp = random_mlp(N_FEATURES, hidden, 2)
    features = [f"f{i:02d}" for i in range(N_FEATURES)]
    onnx_bytes = mlp_graph(mlp, N_FEATURES)
    rows = pd.DataFrame(np.random.default_rng(1).normal(size=(200, N_FEATURES)), columns=features)
    rows[TARGET] = 0
    reg = Registry(home / "registry")
    meta = reg.register(metadata_for(name, mlp, features, ["no", "yes"]), onnx_bytes,
                        reference=reference_sample(onnx_bytes, rows, features, Task.classification))
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
    runs = []
    for r in range(3):  # alternate the CLI and raw ORT, keep the medians
        start = time.perf_counter()
        _, scoring, peak = run_batch_score(
            [str(BIN / "modelloop"), "batch", "score", str(src), str(tmp / "batch_out.parquet"), "--name", "standard",
             "--chunk-rows", str(chunk)], home, tmp / f"batch-{r}.log")
        wall = time.perf_counter() - start
        raw = raw_ort(onnx_path, chunk, seconds=2)
        runs.append({"scoring": scoring, "raw": raw, "ratio": scoring / raw, "wall": rows / wall, "rss": peak})
    m = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
    each = ", ".join(f"{run['ratio']:.2f}" for run in runs)
    return [
        (f"{rows:,} x {N_FEATURES} Parquet -> Parquet, chunk {chunk}",
         f"{m['scoring']:,.0f} rows/s scoring, {m['ratio']:.2f}x raw ORT at batch {chunk} ({m['raw']:,.0f} rows/s) "
         f"(ratios of 3 runs: {each}); {m['wall']:,.0f} rows/s "
         "including process start-up and model load"),
        ("peak RSS of `modelloop batch score` (sampled every 10 ms)", f"{max(run['rss'] for run in runs):,.0f} MiB"),
    ]


def run_batch_score(cmd: list[str], home: Path, log: Path) -> tuple[str, float, float]:
    """Run a `modelloop batch score` command line: (its log, the rows/s it reports, its peak
    resident memory in MiB, sampled every 10 ms). Raises when it fails."""
    import psutil

    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, "MODELLOOP_HOME": str(home), "COLUMNS": "200"})
        peak = 0
        with contextlib.suppress(psutil.NoSuchProcess):
            watched = psutil.Process(proc.pid)
            while proc.poll() is None:
                peak = max(peak, watched.memory_info().rss)
                time.sleep(0.01)
        proc.wait()
    text = log.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"modelloop batch score failed:\n{text[-3000:]}")
    return text, float(re.findall(r"\(([\d,]+) rows/s", text)[-1].replace(",", "")), peak / 2**20


def models_rss(tmp: Path, counts: tuple[int, ...] = MODEL_COUNTS) -> list[tuple[str, str, str]]:
    """RSS of one `modelloop serve` worker with 1, then more, small models loaded (the standard
    MLP, registered under as many names; each loads on its first /models/{name}/predict).
    The worker's RSS is read after each step, the server's whole process tree's beside it."""
    import httpx
    import psutil

    home = tmp / "rss-home"
    for i in range(max(counts)):
        register(home, f"m{i:02d}", STANDARD)
    port = free_port()
    env = {**os.environ, "MODELLOOP_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True",
           "BENTOML_HOME": str(tmp / "rss-bh"), "MODELLOOP_SERVING_MODEL": "m00",
           "MODELLOOP_SERVING_LOG_LEVEL": "WARNING"}
    log = open(tmp / "rss.log", "wb")  # noqa: SIM115 - the server writes to it for its whole life
    proc = subprocess.Popen([str(BIN / "modelloop"), "serve", "--workers", "1", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    row = {"instances": [[0.1] * N_FEATURES]}
    out = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        else:
            raise SystemExit(f"modelloop serve did not start:\n{(tmp / 'rss.log').read_text()}")
        server = psutil.Process(proc.pid)
        loaded = 0
        for count in counts:
            for i in range(loaded, count):
                resp = httpx.post(f"{url}/models/m{i:02d}/predict", json=row, timeout=30)
                resp.raise_for_status()
            loaded = count
            for _ in range(20):  # settle: the allocator returns what the loads freed
                httpx.post(f"{url}/predict", json=row, timeout=30)
            workers = [c for c in server.children(recursive=True) if "_bentoml_impl.worker" in " ".join(c.cmdline())]
            worker_mb = sum(c.memory_info().rss for c in workers) / 2**20
            tree_mb = (server.memory_info().rss + sum(c.memory_info().rss
                                                      for c in server.children(recursive=True))) / 2**20
            out.append(("modelloop serve, 1 worker", f"{count} small model{'s' if count > 1 else ''} loaded (the standard MLP, 30-128-64-2)",
                        f"worker RSS {worker_mb:,.0f} MiB; server's process tree {tree_mb:,.0f} MiB"))
            print(out[-1], flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        log.close()
    return out


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """Median of each number over the rounds; errors are summed."""
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out["errors"] = sum(r["errors"] for r in runs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4, help="measured seconds per load point and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per point (the median is kept)")
    parser.add_argument("--pair-rounds", type=int, default=8,
                        help="extra back-to-back rounds of events on and off per connection count (the "
                             "on/off target is the median of their paired ratios: one pair of runs "
                             "moves by 10-30%% on this machine)")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows for the batch CLI point")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="server worker processes")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out" / "serving.md")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run, of {','.join(SECTIONS)} (the ratios "
                             "table keeps the ratios whose points ran)")
    args = parser.parse_args()
    only = set(args.only.split(","))
    if only - set(SECTIONS):
        parser.error(f"--only: unknown section(s) {', '.join(sorted(only - set(SECTIONS)))}; "
                     f"choose from {', '.join(SECTIONS)}")
    if only == {"models-rss"}:  # needs no load generator
        tmp = Path(tempfile.mkdtemp(prefix="bench-serving-"))
        rows = models_rss(tmp)
        table = "\n".join(["| server | point | result |", "| --- | --- | --- |",
                           *(f"| {s} | {p} | {v} |" for s, p, v in rows)])
        print("\n" + table)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: run scripts/ci_services.sh")
    if "grpc" in only and not shutil.which("h2load"):
        sys.exit("h2load (the grpc section's load) is not installed: run scripts/ci_services.sh, "
                 "or leave the section out with --only")
    tmp = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    home = tmp / "home"
    std_path = register(home, "standard", STANDARD)
    heavy_path = register(home, "heavy", HEAVY)
    one, big = json_body(tmp / "one.json", 1), json_body(tmp / "big.json", 1024)
    binary, binary_headers = oip_binary_body(tmp / "big.bin", 1024)
    jh = {"Content-Type": "application/json"}
    rows_out: list[tuple[str, str, str]] = []  # (server, point, result)
    load_before = os.getloadavg()
    w = str(args.workers)

    Point = tuple[str, str, Path, dict[str, str]]  # (server, path, body, headers)

    def measure(group: dict[str, Server], label: str, points: dict[str, Point], conns: int,
                rows: int = 1) -> dict[str, dict[str, float]]:
        """Alternate the points for --rounds rounds; report each one's medians."""
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in points}
        for r in range(args.rounds):
            for name in list(points) if r % 2 == 0 else list(reversed(points)):
                server, path, body, headers = points[name]
                srv = group[server]
                runs[name].append(wrk(srv.url + path, body, conns, args.seconds, headers, tmp, srv))
        result = {}
        for name, rs in runs.items():
            m = result[name] = median_run(rs)
            m["rows_s"] = m["rps"] * rows
            value = (f"{m['rps']:,.0f} req/s, p50 {m['p50']:.1f} ms, p99 {m['p99']:.1f} ms, "
                     if rows == 1 else f"{m['rows_s']:,.0f} rows/s ({m['rps']:,.0f} req/s), ")
            value += f"{m['errors']:.0f} errors, {m['cpu_us']:,.0f} us server CPU/request"
            rows_out.append((name, label, value))
            print(f"{name:<40} {label:<34} {value}", flush=True)
        return result

    def pairs(group: dict[str, Server], a: str, b: str, conns: int) -> list[tuple[float, float]]:
        """--pair-rounds rounds of a and b back to back (which goes first alternates): per round,
        a's req/s over b's and b's server CPU per request over a's. Pairing cancels the slow drift
        of the machine's other load, which the medians of separate runs keep."""
        out = []
        errors = 0
        for r in range(args.pair_rounds):
            order = (a, b) if r % 2 == 0 else (b, a)
            got = {n: wrk(group[n].url + "/predict", one, conns, args.seconds, jh, tmp, group[n]) for n in order}
            errors += int(got[a]["errors"] + got[b]["errors"])
            out.append((got[a]["rps"] / got[b]["rps"] if got[b]["rps"] else float("nan"),
                        got[b]["cpu_us"] / got[a]["cpu_us"] if got[a]["cpu_us"] else float("nan")))
        ratios = ", ".join(f"{x:.2f}" for x, _ in out)
        rows_out.append((f"{a} / {b}", f"1-row, {conns} connections, {len(out)} paired rounds",
                         f"req/s ratio per round: {ratios}; {errors} errors"))
        print(rows_out[-1], flush=True)
        return out

    paired: dict[int, list[tuple[float, float]]] = {}
    raw = {}
    for batch in (1, 64, 1024):
        raw[batch] = raw_ort(std_path, batch)
        rows_out.append(("raw ONNX Runtime (in-process, all cores)", f"standard MLP, batch {batch}", f"{raw[batch]:,.0f} rows/s"))
    heavy_raw = {}
    for batch in (1, 32):
        heavy_raw[batch] = raw_ort(heavy_path, batch, threads=1)
        rows_out.append(("raw ONNX Runtime (in-process, 1 thread)", f"heavy MLP, batch {batch}",
                         f"{heavy_raw[batch]:,.0f} rows/s"))
    for row in rows_out:
        print(row, flush=True)

    (tmp / "bare_app.py").write_text(BARE_APP.format(path=str(std_path)))
    (tmp / "default_bento.py").write_text(DEFAULT_BENTO.format(path=str(std_path), workers=w))
    (tmp / "sink_app.py").write_text(SINK_APP)
    sink_port = free_port()
    bento_env = {"BENTOML_DO_NOT_TRACK": "True", "BENTOML_HOME": str(tmp / "bh")}
    ours_env = {"MODELLOOP_HOME": str(home), **bento_env, "MODELLOOP_SERVING_LOG_LEVEL": "WARNING"}
    uvicorn = [str(BIN / "uvicorn"), "--log-level", "warning", "--no-access-log"]
    serve = [str(BIN / "modelloop"), "serve", "--workers", w]
    BARE, DEFAULT = "bare uvicorn+Starlette+ORT", "default BentoML service"
    ON, OFF, SLOW = "modelloop serve, events on", "modelloop serve, events off", "modelloop serve, fast path off"
    OIP = "modelloop serve, events on, OIP binary"
    std = {**ours_env, "MODELLOOP_SERVING_MODEL": "standard"}
    events = {"MODELLOOP_SERVING_SIDECAR_URL": f"http://127.0.0.1:{sink_port}"}
    grpc_ratios: list[tuple[str, float, str]] = []
    sink = subprocess.Popen([*uvicorn, "sink_app:app", "--port", str(sink_port)], cwd=tmp, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        specs = [
            (BARE, [*uvicorn, "bare_app:app", "--workers", w], "/ready", {}, tmp),
            (DEFAULT, [str(BIN / "bentoml"), "serve", "default_bento:DefaultBento"], "/readyz", bento_env, tmp),
            (ON, serve, "/v2/health/ready", {**std, **events}, None),
            (OFF, serve, "/v2/health/ready", std, None),
            (SLOW, serve, "/v2/health/ready", {**std, **events, "MODELLOOP_SERVING_FAST_PATH": "false"}, None),
        ]
        one_row: dict[int, dict[str, dict[str, float]]] = {}
        big_rows: dict[str, dict[str, float]] = {}
        heavy: dict[str, dict[str, float]] = {}
        if only & {"one-row", "big"}:
            if "one-row" not in only:
                specs = [spec for spec in specs if spec[0] in (BARE, ON, OFF)]
            with servers(specs, tmp) as group:
                if "one-row" in only:
                    pts = {n: (n, "/predict", one, jh) for n in (BARE, DEFAULT, ON, OFF, SLOW)}
                    one_row = {c: measure(group, f"1-row, {c} connections", pts, c) for c in (32, 128)}
                    for c in (32, 128):
                        paired[c] = pairs(group, ON, OFF, c)
                if "big" in only:
                    big_rows = measure(group, "1024-row requests, 8 connections", {
                        BARE: (BARE, "/predict", big, jh),
                        ON: (ON, "/predict", big, jh),
                        OFF: (OFF, "/predict", big, jh),
                        OIP: (ON, "/v2/models/standard/infer", binary, binary_headers),
                    }, 8, rows=1024)
        if "grpc" in only:
            # REST /v2 (binary extension, wrk) and gRPC (raw contents, h2load) on one server
            GRPC = "modelloop serve, events on, gRPC on"
            grpc_port = free_port()
            one_bin, one_bin_headers = oip_binary_body(tmp / "one.bin", 1)
            grpc_one, grpc_big = grpc_body(tmp / "one.grpc", 1), grpc_body(tmp / "big.grpc", 1024)
            grpc_env = {**std, **events, "MODELLOOP_SERVING_GRPC_PORT": str(grpc_port)}
            with servers([(GRPC, serve, "/v2/health/ready", grpc_env, None)], tmp) as group:
                srv = group[GRPC]
                grpc_check(f"127.0.0.1:{grpc_port}", grpc_big)
                grpc_url = f"http://127.0.0.1:{grpc_port}{GRPC_PATH}"
                for label, conns, rows, rest_body, rest_headers, grpc_request in (
                        ("1-row", 32, 1, one_bin, one_bin_headers, grpc_one),
                        ("1024-row", 8, 1024, binary, binary_headers, grpc_big)):
                    runs: dict[str, list[dict[str, float]]] = {"REST": [], "gRPC": []}
                    for r in range(args.rounds):
                        for kind in ("REST", "gRPC") if r % 2 == 0 else ("gRPC", "REST"):
                            runs[kind].append(
                                wrk(srv.url + "/v2/models/standard/infer", rest_body, conns, args.seconds,
                                    rest_headers, tmp, srv) if kind == "REST"
                                else h2load(grpc_url, grpc_request, conns, args.seconds, srv))
                    got = {}
                    for kind, rs in runs.items():
                        m = got[kind] = median_run(rs)
                        speed = (f"{m['rps']:,.0f} req/s" if rows == 1
                                 else f"{m['rps'] * rows:,.0f} rows/s ({m['rps']:,.0f} req/s)")
                        wait = (f"p50 {m['p50']:.1f} ms, p99 {m['p99']:.1f} ms" if kind == "REST"
                                else f"mean {m['mean']:.1f} ms")
                        point = f"{label} {'/v2 binary (wrk)' if kind == 'REST' else 'ModelInfer raw (h2load)'}, {conns} connections"
                        rows_out.append((GRPC, point, f"{speed}, {wait}, {m['errors']:.0f} errors, "
                                                      f"{m['cpu_us']:,.0f} us server CPU/request"))
                        print(rows_out[-1], flush=True)
                    grpc_ratios += [
                        (f"gRPC / REST /v2 binary, {label}, {conns} connections: req/s",
                         got["gRPC"]["rps"] / got["REST"]["rps"], "(reference)"),
                        (f"gRPC / REST /v2 binary, {label}: server CPU per request",
                         got["gRPC"]["cpu_us"] / got["REST"]["cpu_us"], "(reference)"),
                    ]
                rows_out.append((GRPC, "ModelInfer calls answered with an error status (server metrics)",
                                 f"{grpc_refused(srv):.0f}"))
        heavy_env = {**ours_env, "MODELLOOP_SERVING_MODEL": "heavy"}
        HON, HOFF = "heavy MLP 4x1024, batching on", "heavy MLP 4x1024, batching off"
        batch_rows = float("nan")
        if "heavy" in only:
            with servers([(HON, [*serve, "--max-batch-wait-s", "0.005"], "/v2/health/ready", heavy_env, None),
                          (HOFF, [*serve, "--no-batching"], "/v2/health/ready", heavy_env, None)], tmp) as group:
                heavy = measure(group, "1-row, 64 connections",
                                {n: (n, "/predict", one, jh) for n in (HON, HOFF)}, 64)
                batch_rows = batch_size(group[HON])
    finally:
        os.killpg(sink.pid, signal.SIGTERM)
        sink.wait(10)

    if "batch" in only:
        for label, value in batch_cli(home, tmp, args.rows, 65536, std_path):
            rows_out.append(("batch scoring", label, value))
            print(rows_out[-1], flush=True)

    ratios: list[tuple[str, float, str]] = []
    if one_row:
        b32, b128 = one_row[32], one_row[128]
        ratios += [
            ("events on / bare, 1-row, 32 connections: req/s", b32[ON]["rps"] / b32[BARE]["rps"], ">= 0.5"),
            ("events on / bare, 1-row, 32 connections: p99", b32[ON]["p99"] / b32[BARE]["p99"], "<= 2"),
            ("events on / events off, 32 connections: req/s (medians above)", b32[ON]["rps"] / b32[OFF]["rps"],
             "(reference)"),
            ("events on / events off, 128 connections: req/s (medians above)", b128[ON]["rps"] / b128[OFF]["rps"],
             "(reference)"),
            *((f"events on / events off, {c} connections: req/s, median of {len(v)} paired rounds",
               statistics.median(x for x, _ in v), ">= 0.95") for c, v in paired.items() if v),
            *((f"events off / events on: server CPU per request, {c} connections, median of {len(v)} paired rounds",
               statistics.median(y for _, y in v), "(reference)") for c, v in paired.items() if v),
            ("default BentoML / bare, 32 connections: req/s", b32[DEFAULT]["rps"] / b32[BARE]["rps"], "(reference)"),
            ("fast path off / bare, 32 connections: req/s", b32[SLOW]["rps"] / b32[BARE]["rps"], "(reference)"),
        ]
    if heavy:
        ratios += [("heavy: batching on / off, rows/s", heavy[HON]["rps"] / heavy[HOFF]["rps"], ">= 3, no 503"),
                   ("heavy: raw ORT rows/s at batch 32 / batch 1 (what batching can give on this CPU)",
                    heavy_raw[32] / heavy_raw[1], "(reference)")]
    if big_rows:
        ratios += [
            ("1024-row JSON /predict / raw ORT at batch 1024", big_rows[ON]["rows_s"] / raw[1024], ">= 0.3"),
            ("1024-row JSON, events off / raw ORT at batch 1024", big_rows[OFF]["rows_s"] / raw[1024], "(reference)"),
            ("1024-row JSON bare / raw ORT at batch 1024", big_rows[BARE]["rows_s"] / raw[1024], "(reference)"),
            ("1024-row OIP binary / raw ORT at batch 1024", big_rows[OIP]["rows_s"] / raw[1024], "more than JSON"),
        ]
    ratios += grpc_ratios
    if "models-rss" in only:
        rows_out += models_rss(tmp)
    lines = [f"Load average before: {load_before[0]:.2f}, after: {os.getloadavg()[0]:.2f} "
             f"({os.cpu_count()} cores, {args.workers} workers per server, wrk on the same cores; "
             f"medians of {args.rounds} alternating rounds of {args.seconds:g} s). "
             + (f"Heavy model, batching on: {batch_rows:.1f} rows per ONNX Runtime call on average."
                if heavy else f"Sections run: {args.only}."), "",
             "| server | point | result |", "| --- | --- | --- |"]
    lines += [f"| {s} | {p} | {v} |" for s, p, v in rows_out]
    lines += ["", "| ratio | measured | target |", "| --- | --- | --- |"]
    lines += [f"| {name} | {value:.2f} | {target} |" for name, value, target in ratios]
    table = "\n".join(lines)
    print("\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    shutil.rmtree(tmp, ignore_errors=True)


def batch_size(server: Server) -> float:
    """Average rows per ONNX Runtime call, from the server's /metrics."""
    import httpx

    text = httpx.get(server.url + "/metrics").text
    total = sum(float(v) for v in re.findall(r"^modelloop_serving_batch_size_rows_sum\{[^}]*\} (\S+)", text, re.M))
    count = sum(float(v) for v in re.findall(r"^modelloop_serving_batch_size_rows_count\{[^}]*\} (\S+)", text, re.M))
    return total / count if count else float("nan")


if __name__ == "__main__":
    main()
