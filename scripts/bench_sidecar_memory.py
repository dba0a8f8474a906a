#!/usr/bin/env python
"""The sidecar's memory under a burst of maximal event bodies; prints a table (results go to
BENCHMARKS.md).

A real `modelloop monitor` takes 8 bodies of about 24 MB at once (events with their features as
JSON lists of numbers, the costliest form to parse), each retried after its Retry-After while it is
answered 503, as serving does. Meanwhile a one-event POST is timed every 50 ms. Measured with the
default ingest budget (MODELLOOP_MONITOR_INGEST_QUEUE_BYTES, 64 MiB) and with a budget no burst
reaches (the sidecar before the budget): peak and final RSS, answers, and the one-event latency.

    .venv/bin/python scripts/bench_sidecar_memory.py
    .venv/bin/python scripts/bench_sidecar_memory.py --bodies 8 --events 45000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import psutil
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_monitoring import _columns, _register, _start_sidecar  # noqa: E402

console = Console(width=130)


def run(budget: int | None, bodies: list[bytes]) -> dict[str, float | int | str]:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        _register(home)
        env = {**os.environ, "MODELLOOP_HOME": str(home), "MODELLOOP_MONITOR_GPU": "false",
               "MODELLOOP_MONITOR_CHECK_INTERVAL_S": "3600"}
        if budget is not None:
            env["MODELLOOP_MONITOR_INGEST_QUEUE_BYTES"] = str(budget)
        proc, url = _start_sidecar(env)  # ready, its drift warm-up (Evidently's import) done
        try:
            side = psutil.Process(proc.pid)
            rss0 = side.memory_info().rss
            peak = rss0
            done = threading.Event()
            answers: dict[int, int] = {}
            small: list[float] = []
            lock = threading.Lock()

            def sample() -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, side.memory_info().rss)
                    time.sleep(0.01)

            def send(body: bytes) -> None:
                with httpx.Client(timeout=120) as client:
                    while True:
                        r = client.post(f"{url}/events", content=body,
                                        headers={"content-type": "application/json"})
                        with lock:
                            answers[r.status_code] = answers.get(r.status_code, 0) + 1
                        if r.status_code != 503:
                            return
                        time.sleep(float(r.headers.get("retry-after", "1")))

            def one_event() -> None:
                i = 0
                with httpx.Client(timeout=120) as client:
                    while not done.is_set():
                        body = orjson.dumps({"columns": [_columns(1, f"one{i}", packed=False)]})
                        t0 = time.perf_counter()
                        client.post(f"{url}/events", content=body,
                                    headers={"content-type": "application/json"})
                        small.append(time.perf_counter() - t0)
                        i += 1
                        time.sleep(0.05)

            helpers = [threading.Thread(target=sample), threading.Thread(target=one_event)]
            for t in helpers:
                t.start()
            t0 = time.perf_counter()
            senders = [threading.Thread(target=send, args=(b,)) for b in bodies]
            for t in senders:
                t.start()
            for t in senders:
                t.join()
            elapsed = time.perf_counter() - t0
            done.set()
            for t in helpers:
                t.join()
            time.sleep(1)
            rss_end = side.memory_info().rss
            stored = sum(float(line.rsplit(" ", 1)[1]) for line in
                         httpx.get(f"{url}/metrics").text.splitlines()
                         if line.startswith("modelloop_events_ingested_total{"))
        finally:
            proc.terminate()
            proc.wait(30)
    mib = 1024 * 1024
    return {"rss_start": rss0 / mib, "rss_peak": peak / mib, "rss_end": rss_end / mib,
            "answers": ", ".join(f"{k}: {v}" for k, v in sorted(answers.items())),
            "elapsed": elapsed, "stored": int(stored),
            "p50": float(np.percentile(small, 50)) * 1000, "max": max(small) * 1000}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bodies", type=int, default=8, help="parallel maximal bodies")
    ap.add_argument("--events", type=int, default=45_000,
                    help="events per body (45,000 with 20 features as JSON lists: about 24 MB)")
    args = ap.parse_args()
    bodies = [orjson.dumps({"columns": [_columns(args.events, f"b{i}", packed=False)]})
              for i in range(args.bodies)]
    size = len(bodies[0]) / 1024 / 1024
    table = Table(title=f"Sidecar memory: {args.bodies} parallel bodies of {size:.1f} MiB "
                        f"({args.events:,} events each), retried after Retry-After while 503")
    for col in ("ingest budget", "RSS start MiB", "RSS peak MiB", "RSS after MiB", "answers",
                "all stored in s", "events stored", "1-event POST p50 ms", "max ms"):
        table.add_column(col)
    for label, budget in (("64 MiB (default)", None), ("none (4 GiB: before the budget)", 4 << 30)):
        r = run(budget, bodies)
        table.add_row(label, f"{r['rss_start']:.0f}", f"{r['rss_peak']:.0f}", f"{r['rss_end']:.0f}",
                      str(r["answers"]), f"{r['elapsed']:.1f}", f"{r['stored']:,}",
                      f"{r['p50']:.0f}", f"{r['max']:.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
