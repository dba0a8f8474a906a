#!/usr/bin/env python
"""Prediction events lost while the monitoring sidecar is down, under full one-row load.

    .venv/bin/python scripts/bench_outage.py [--outage-s 30] [--connections 32] [--workers N]
        [--buffer-rows N] [--out bench_out/outage.md]

A real `modelloop monitor` (with an ingest key) and a real `modelloop serve` sending it events;
wrk sends one-row /predict requests on as many connections as it can answer. After a few seconds
the sidecar is killed (SIGKILL); a new one is started on the same port and store so that it is
ready about --outage-s after the kill (the actual outage is printed). When wrk is done and
serving has sent or dropped every event, the events in the sidecar's store are counted against
the rows serving predicted. Loopback only; it runs for about a minute. Needs `wrk`
(scripts/ci_services.sh).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from bench_serving import (  # (scripts/ is on sys.path)
    BIN,
    N_FEATURES,
    ROOT,
    STANDARD,
    free_port,
    json_body,
)

from modelloop.registry import Registry
from serving.settings import ServingSettings
from tests.serving.onnx_models import register_mlp

WARM_S = 5.0  # load before the kill
AFTER_S = 15.0  # load after the sidecar is back
ADMIN, INGEST = "admin-" + "a" * 20, "ingest-" + "i" * 20


class Process:
    """A server process in its own group, its log kept, ready when ``ready_url`` answers 200."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], ready_url: str, log: Path) -> None:
        self.name, self.ready_url, self.log = name, ready_url, log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait_ready(self, timeout: float = 180) -> float:
        """Seconds until ready; raises with the log when it exits or the deadline passes."""
        start = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.ready_url, timeout=1).status_code == 200:
                    return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"{self.name} not ready:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def rss_mib(self) -> float:
        """Resident memory of the process and its children (serving's workers)."""
        import psutil

        total = 0
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    total += p.memory_info().rss
        return total / 2**20


def metrics(url: str) -> dict[str, float]:
    """``name{labels}`` -> value of a /metrics page, and each name summed over its labels."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def stored_events(home: Path) -> int:
    from monitoring.store import open_store  # (bench_serving put the repository on sys.path)

    store = open_store(f"sqlite:///{home / 'monitor' / 'events.db'}")
    try:
        return store.count_events()
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outage-s", type=float, default=30.0, help="seconds from the kill until the sidecar is back")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="serving worker processes")
    parser.add_argument("--buffer-rows", type=int, default=None,
                        help="MODELLOOP_SERVING_EVENT_BUFFER_ROWS (default: the setting's default)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out" / "outage.md")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: run scripts/ci_services.sh")
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench-outage-"))
    home = tmp / "home"
    register_mlp(Registry(home / "registry"), "standard", n_features=N_FEATURES, n_classes=2, hidden=STANDARD)
    body = json_body(tmp / "one.json", 1)
    (tmp / "post.lua").write_text(f'wrk.method = "POST"\nlocal f = io.open("{body}", "rb")\n'
                                  "wrk.body = f:read('*a')\nf:close()\n"
                                  'wrk.headers["Content-Type"] = "application/json"\n')
    side_port, serve_port = free_port(), free_port()
    base_env = {"MODELLOOP_HOME": str(home), "BENTOML_HOME": str(tmp / "bh"), "BENTOML_DO_NOT_TRACK": "True"}
    side_env = {**base_env, "MODELLOOP_MONITOR_API_KEY": ADMIN, "MODELLOOP_MONITOR_INGEST_KEY": INGEST,
                "MODELLOOP_MONITOR_CHECK_INTERVAL_S": "3600"}
    serve_env = {**base_env, "MODELLOOP_SERVING_SIDECAR_URL": f"http://127.0.0.1:{side_port}",
                 "MODELLOOP_SERVING_SIDECAR_KEY": INGEST, "MODELLOOP_SERVING_LOG_LEVEL": "INFO"}
    if args.buffer_rows:
        serve_env["MODELLOOP_SERVING_EVENT_BUFFER_ROWS"] = str(args.buffer_rows)
    monitor = [str(BIN / "modelloop"), "monitor", "--port", str(side_port)]
    serve_url, side_url = f"http://127.0.0.1:{serve_port}", f"http://127.0.0.1:{side_port}"

    sidecar = Process("sidecar", monitor, side_env, f"{side_url}/ready", tmp / "sidecar-1.log")
    serving = Process("serving", [str(BIN / "modelloop"), "serve", "--port", str(serve_port), "--host", "127.0.0.1",
                                  "--workers", str(args.workers)], serve_env, f"{serve_url}/v2/health/ready",
                      tmp / "serving.log")
    back: Process | None = None
    try:
        start_s = sidecar.wait_ready()
        serving.wait_ready()
        rss = {"before": serving.rss_mib(), "peak": 0.0}
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.2):
                rss["peak"] = max(rss["peak"], serving.rss_mib())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        total_s = WARM_S + args.outage_s + start_s * 2 + AFTER_S  # room for a slower start under load
        wrk = subprocess.Popen(["wrk", "-t2", f"-c{args.connections}", f"-d{round(total_s)}s", "-s",
                                str(tmp / "post.lua"), f"{serve_url}/predict"], stdout=subprocess.PIPE, text=True)
        began = time.monotonic()
        time.sleep(WARM_S)
        rows_at_kill = metrics(serve_url).get("modelloop_serving_rows_total", 0.0)
        sidecar.kill()
        killed = time.monotonic()
        # start the new one early by the first one's start-up time, so it is back about on time
        time.sleep(max(0.0, args.outage_s - start_s))
        back = Process("sidecar", monitor, side_env, f"{side_url}/ready", tmp / "sidecar-2.log")
        back.wait_ready()
        outage_s = time.monotonic() - killed
        rows_at_back = metrics(serve_url).get("modelloop_serving_rows_total", 0.0)
        rows_in_outage = rows_at_back - rows_at_kill
        while True:  # how long until what was held at the return is acknowledged (or dropped)
            m = metrics(serve_url)
            settled = m.get("modelloop_serving_events_sent_total", 0.0) + m.get("modelloop_serving_events_dropped_total", 0.0)
            if settled >= rows_at_back or wrk.poll() is not None:
                break
            time.sleep(0.2)
        caught_up_s = time.monotonic() - killed - outage_s
        wrk_out, _ = wrk.communicate(timeout=total_s + 120)
        load_s = time.monotonic() - began
        sampling.set()
        sampler.join()
        # serving has sent (or dropped) every event it recorded
        deadline = time.monotonic() + 120
        while True:
            m = metrics(serve_url)
            rows = m.get("modelloop_serving_rows_total", 0.0)
            done = m.get("modelloop_serving_events_sent_total", 0.0) + m.get("modelloop_serving_events_dropped_total", 0.0)
            if done >= rows or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        dropped = {k.split("reason=")[1].rstrip("}"): v for k, v in m.items()
                   if k.startswith("modelloop_serving_events_dropped_total{") and "reason=" in k}
        serving.stop()
        back.kill()
        stored = stored_events(home)
    finally:
        for p in (serving, sidecar, *([back] if back else [])):
            p.stop()
    requests = re.search(r"(\d+) requests in", wrk_out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", wrk_out)
    log = (tmp / "serving.log").read_text(errors="replace")
    buffer = f"{args.buffer_rows:,}" if args.buffer_rows else f"default ({ServingSettings().event_buffer_rows:,})"
    lines = [
        f"Load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}. "
        f"Outage {outage_s:.1f} s (SIGKILL, then a new sidecar on the same port and store), "
        f"{args.workers} serving workers, wrk {args.connections} connections for {load_s:.0f} s on the same "
        f"{os.cpu_count()} cores, event buffer {buffer} rows per worker.",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| requests answered (wrk) | {int(requests[1]) if requests else 0:,} ({int(non2xx[1]) if non2xx else 0} non-2xx) |",
        f"| rows predicted (serving) | {rows:,.0f} |",
        f"| of them while the sidecar was down | {rows_in_outage:,.0f} ({rows_in_outage / outage_s:,.0f} rows/s) |",
        f"| backlog acknowledged, after the sidecar was back | {caught_up_s:.1f} s |",
        f"| events acknowledged by the sidecar (serving) | {m.get('modelloop_serving_events_sent_total', 0.0):,.0f} |",
        f"| events in the sidecar's store | {stored:,} |",
        f"| **events lost** (rows predicted - events stored) | **{rows - stored:,.0f}** |",
        f"| events dropped by serving, by reason | {', '.join(f'{k} {v:,.0f}' for k, v in sorted(dropped.items())) or 'none'} |",
        f"| serving RSS before / peak (all processes) | {rss['before']:,.0f} / {rss['peak']:,.0f} MiB |",
        f"| serving logged the failure and the recovery | {'keeping prediction events' in log} / {'answers again after' in log} |",
    ]
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    print(f"\n(written to {args.out}; logs in {tmp})")


if __name__ == "__main__":
    main()
