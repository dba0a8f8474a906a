#!/usr/bin/env python
"""What the SQLite store's request-id index costs as the table grows (issue #21): events/s and
store CPU per event of batches of 1000 events with random (UUID-like) request ids, inserted
through the store as the sidecar does, when the table already holds 0, 1M and 5M events.

    .venv/bin/python scripts/bench_sqlite_growth.py [--sizes 0,1000000,5000000] [--batches 20]

The table is filled between sizes inside SQLite (one INSERT ... SELECT over a recursive CTE,
random 32-hex ids, 160-byte feature blobs like 20 float64 features), which is far cheaper than
ingest; only the measured batches go through ``EventStore.insert_batches``. One run, a table per
line; the machine is shared, so the CPU column says more than the rate.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monitoring.records import EventRow  # noqa: E402
from monitoring.store import open_store  # noqa: E402

FILL = """
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)
INSERT INTO modelloop_events (request_id, model, version, ts, mode, features, prediction, probabilities,
                    latency_s, received_at)
SELECT {id}, 'm', 1, ?, 'realtime', randomblob(160), 0, NULL, 0.001, ? FROM n
"""
RANDOM_ID = "lower(hex(randomblob(16)))"
ORDERED_ID = "printf('%016x', ? + i) || lower(hex(randomblob(8)))"  # a counter first, then random


def batch(rng: np.random.Generator, n: int, now: float, first: int | None) -> list[EventRow]:
    """``n`` events; their ids random, or (``first``: a counter) ordered: the counter, then random."""
    feats = rng.normal(size=(n, 20)).astype(np.float64)
    ids = ([uuid.uuid4().hex for _ in range(n)] if first is None
           else [f"{first + i:016x}{uuid.uuid4().hex[:16]}" for i in range(n)])
    return [EventRow(ids[i], "m", 1, now, "realtime", feats[i].tobytes(), 0.0, None, 0.001, now)
            for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0,1000000,5000000", help="stored events before each measure")
    parser.add_argument("--batches", type=int, default=20, help="measured batches of 1000 per size")
    parser.add_argument("--ids", choices=["random", "ordered"], default="random",
                        help="request ids: random (as serving makes them now), or a counter first")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench-sqlite-growth-"))
    store = open_store(f"sqlite:///{tmp / 'events.db'}")
    rng = np.random.default_rng(0)
    stored = 0
    lines = ["| events stored before | events/s | store CPU per event | db MiB |", "| ---: | ---: | ---: | ---: |"]
    try:
        for size in sizes:
            if size > stored:
                t0 = time.perf_counter()
                with store._write() as cur:  # the benchmark's own fill, not an API
                    if args.ids == "random":
                        cur.execute(FILL.format(id=RANDOM_ID), (size - stored, time.time(), time.time()))
                    else:
                        cur.execute(FILL.format(id=ORDERED_ID), (size - stored, stored, time.time(), time.time()))
                print(f"filled to {size:,} in {time.perf_counter() - t0:.0f} s", flush=True)
                stored = size
            todo = [batch(rng, 1000, time.time(), None if args.ids == "random" else stored + 1000 * b)
                    for b in range(args.batches)]
            wall0, cpu0 = time.perf_counter(), time.process_time()
            for rows in todo:
                store.insert_batches([rows])
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            n = 1000 * args.batches
            stored += n
            mib = sum(p.stat().st_size for p in tmp.iterdir()) / 2**20
            lines.append(f"| {size:,} | {n / wall:,.0f} | {cpu / n * 1e6:.1f} us | {mib:,.0f} |")
            print(lines[-1], flush=True)
    finally:
        store.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
