#!/usr/bin/env python
"""Benchmarks of the monitoring sidecar; prints tables (results go to BENCHMARKS.md).

1. Drift: one check over a 100k x 20 window against a 100k-row reference, ours
   (monitoring.drift: Evidently's own stattests, reference profiled once) against Evidently's
   DataDriftPreset on the same data, measured in one run, with the per-feature decisions compared.
2. Ingest: events/s into SQLite (and PostgreSQL, with --pg-url) through the store (batches of
   1000, one transaction each), and through a real `modelloop monitor` process over HTTP
   (concurrent clients, 1000-event batches); with --only replicas, one sidecar against two
   replicas sharing PostgreSQL.
3. Retention: the SQLite store's size on disk (database, WAL) after each of 10 retention runs,
   each after a burst of ingest at full speed, against the events kept and the bounds.

    .venv/bin/python scripts/bench_monitoring.py            # everything
    .venv/bin/python scripts/bench_monitoring.py --only drift --rows 100000
    .venv/bin/python scripts/bench_monitoring.py --only ingest --pg-url postgresql://postgres@127.0.0.1:5432/test
    .venv/bin/python scripts/bench_monitoring.py --only retention [--legacy]
    .venv/bin/python scripts/bench_monitoring.py --only replicas --pg-url postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import psutil
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modelloop.synthetic import SyntheticTask  # noqa: E402
from monitoring.data_quality import window_quality  # noqa: E402
from monitoring.drift import ReferenceProfile, check_drift, stattests  # noqa: E402

console = Console(width=130)
SHIFTS: dict[str, dict[str, float]] = {
    "stationary": {},
    "two features (0.5 sd)": {"f03": 0.5, "f07": -0.5},
    "small shifts (0.1-0.2 sd)": {"f00": 0.1, "f10": 0.2, "f15": 0.15},
}


def evidently_preset(ref: pd.DataFrame, cur: pd.DataFrame) -> tuple[float, set[str]]:
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    dd = DataDefinition(numerical_columns=list(ref.columns))
    t0 = time.perf_counter()
    snap = Report([DataDriftPreset()]).run(Dataset.from_pandas(cur, data_definition=dd),
                                           Dataset.from_pandas(ref, data_definition=dd))
    elapsed = time.perf_counter() - t0
    drifted = set()
    for m in snap.dict()["metrics"][1:]:
        cfg = m["config"]
        score, threshold = float(m["value"]), float(cfg["threshold"])
        p_value = "p_value" in cfg["method"]
        if (score <= threshold) if p_value else (score >= threshold):
            drifted.add(cfg["column"])
    return elapsed, drifted


def bench_drift(rows: int) -> None:
    task = SyntheticTask(seed=0)
    names = task.feature_names
    ref = task.sample(rows, seed=1)[names].astype(np.float64)
    stattests()  # import Evidently before timing (both sides use it)
    t0 = time.perf_counter()
    profile = ReferenceProfile(ref, names)
    prep = time.perf_counter() - t0
    table = Table(title=f"Drift check, {rows:,} x {len(names)} window vs {rows:,}-row reference "
                        f"(reference profiled once: {prep:.2f} s)")
    for col in ("shift", "Evidently preset s", "ours s", "ratio", "ours drifted",
                "same decisions"):
        table.add_column(col)
    for label, shift in SHIFTS.items():
        cur = task.sample(rows, seed=2, shift=shift)[names].astype(np.float64)
        x = cur.to_numpy()
        t0 = time.perf_counter()
        ours = check_drift(profile, x)
        ours_s = time.perf_counter() - t0
        ev_s, ev_drifted = evidently_preset(ref, cur)
        same = set(ours.drifted_features) == ev_drifted
        table.add_row(label, f"{ev_s:.2f}", f"{ours_s:.3f}", f"{ours_s / ev_s:.3f}",
                      ", ".join(ours.drifted_features) or "-", "yes" if same else
                      f"NO (Evidently: {sorted(ev_drifted)})")
    console.print(table)
    # the parts of "ours" that are not per-feature tests, and the data-quality shares beside it
    t0 = time.perf_counter()
    profile.dependence.check(x)
    joint_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    window_quality(names, profile.lower, profile.upper, x)
    quality_s = time.perf_counter() - t0
    console.print(f"Of which the joint-distribution check {joint_s:.3f} s; data quality (missing, "
                  f"out of support) beside it {quality_s:.3f} s")
    read_s, check_s = _from_store(task, profile, rows)
    console.print(f"From the sidecar's SQLite store: reading the {rows:,}-event window "
                  f"{read_s:.3f} s + check {check_s:.3f} s = {read_s + check_s:.3f} s")


def _from_store(task: SyntheticTask, profile: ReferenceProfile, rows: int) -> tuple[float, float]:
    """The sidecar's real path: the window read back from SQLite, then checked."""
    from monitoring.records import EventRow
    from monitoring.store import open_store

    x = task.sample(rows, seed=3, shift={"f03": 0.5})[task.feature_names].to_numpy(np.float64)
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(f"sqlite:///{tmp}/e.db")
        proba = np.array([0.4, 0.6]).tobytes()
        for start in range(0, rows, 10_000):
            store.insert_events([EventRow(f"e{i}", "m", 1, float(i), "batch", x[i].tobytes(), 1.0,
                                          proba, 0.002, 0.0)
                                 for i in range(start, min(rows, start + 10_000))])
        t0 = time.perf_counter()
        window = store.window("m", version=1, last_n=rows)
        read_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        check_drift(profile, window.features, window.prediction)
        check_s = time.perf_counter() - t0
        store.close()
    return read_s, check_s


# -- ingest --------------------------------------------------------------------------------------
def _events(n: int, tag: str, n_features: int = 20) -> list[dict]:
    rng = np.random.default_rng(abs(hash(tag)) % 2**32)
    x = rng.normal(size=(n, n_features))
    return [{"request_id": f"{tag}-{i}", "timestamp": time.time(), "model": "bench", "version": 1,
             "mode": "realtime", "features": x[i].tolist(), "prediction": 1,
             "probabilities": [0.4, 0.6], "latency_s": 0.002} for i in range(n)]


def _columns(n: int, tag: str, n_features: int = 20, packed: bool = True) -> dict:
    """The same events in columns: one column group of ``n`` one-row requests, the features and
    probabilities packed as serving sends them, or as JSON lists of numbers."""
    from modelloop.schemas import PackedMatrix

    rng = np.random.default_rng(abs(hash(tag)) % 2**32)
    x = rng.normal(size=(n, n_features)).astype(np.float32)
    p = np.tile(np.array([0.4, 0.6], np.float32), (n, 1))
    return {"model": "bench", "version": 1, "mode": "realtime",
            "request_ids": [f"{tag}r{i}" for i in range(n)], "first_row": [0] * n, "rows": [1] * n,
            "timestamp": [time.time()] * n, "latency_s": [0.002] * n,
            "features": PackedMatrix.pack(x) if packed else x.tolist(),
            "prediction": p.argmax(axis=1).tolist(),
            "probabilities": PackedMatrix.pack(p) if packed else p.tolist()}


def _register(home: Path) -> None:
    from modelloop.registry import Registry
    from modelloop.schemas import ModelMetadata, Task, TensorSpec

    names = [f"f{i:02d}" for i in range(20)]
    meta = ModelMetadata(name="bench", task=Task.classification,
                         inputs=[TensorSpec(name="input", shape=[None, 20])],
                         outputs=[TensorSpec(name="probabilities", shape=[None, 2])],
                         feature_names=names, class_labels=["a", "b"])
    Registry(home / "registry").register(meta, b"not-run-by-the-sidecar")


PG_PREFIX = "bench_ingest_"
"""The tables the benchmark makes (and drops) in a PostgreSQL database."""


def bench_store(total: int, batch: int, pg_url: str | None) -> list[tuple[str, float, float]]:
    from modelloop.schemas import EventBatch
    from monitoring.records import EventRow
    from monitoring.store import open_store

    out = []
    batches = [[EventRow.from_event(ev, 0.0) for ev in EventBatch.model_validate(
        {"events": _events(batch, f"s{b}")}).events] for b in range(total // batch)]
    stores = [(f"store: SQLite WAL, synchronous={sync}", "sqlite:///{tmp}/e.db", sync)
              for sync in ("FULL", "NORMAL")]
    if pg_url:
        stores.append(("store: PostgreSQL", pg_url, "FULL"))
    for name, url, sync in stores:
        with tempfile.TemporaryDirectory() as tmp:
            store = open_store(url.format(tmp=tmp), PG_PREFIX, sqlite_synchronous=sync)
            store.drop_schema()
            store.create_schema()
            t0, cpu0 = time.perf_counter(), time.process_time()
            for rows in batches:
                store.insert_events(rows)
            out.append((name, total / (time.perf_counter() - t0), total / (time.process_time() - cpu0)))
            store.drop_schema()
            store.close()
    return out


def _until_idle(proc: psutil.Process, deadline_s: float = 120.0) -> None:
    """Wait until ``proc`` uses under 2% of a CPU over a second (its start-up work done), so
    that the CPU measured after is ingest's alone."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end and proc.cpu_percent(interval=1.0) >= 2.0:
        pass


def _drop_pg(url: str) -> None:
    from monitoring.store import open_store

    store = open_store(url, PG_PREFIX)
    store.drop_schema()
    store.close()


def _client(url: str, bodies: list[bytes], results: mp.Queue) -> None:
    import httpx

    with httpx.Client(timeout=60) as client:
        for body in bodies:
            r = client.post(url, content=body, headers={"content-type": "application/json"})
            assert r.status_code == 200, r.text
    results.put(len(bodies))


def _start_sidecar(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    """A ``modelloop monitor`` on a free port, ready and idle (its drift warm-up done)."""
    import httpx

    from modelloop.ports import free_port

    port = free_port()
    exe = Path(sys.executable).with_name("modelloop")
    proc = subprocess.Popen([str(exe), "monitor", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.terminate()
            raise RuntimeError("sidecar did not start")
        time.sleep(0.1)
    _until_idle(psutil.Process(proc.pid))  # the drift warm-up (Evidently's import) done
    return proc, url


def bench_http(total: int, batch: int, clients: int, columns: str = "",
               pg_url: str | None = None, replicas: int = 1) -> tuple[str, float, float]:
    """``columns``: "" one JSON object per event, "lists" columns of JSON numbers, "packed" columns
    with packed features and probabilities (as serving sends them). ``pg_url``: the sidecar's
    store is PostgreSQL there (else SQLite). ``replicas``: sidecars sharing that store, the
    clients spread over them (events per CPU-second of all of them together)."""
    import httpx

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        _register(home)
        env = {**os.environ, "MODELLOOP_HOME": str(home), "MODELLOOP_MONITOR_CHECK_INTERVAL_S": "3600",
               "MODELLOOP_MONITOR_GPU": "false"}
        if pg_url:
            _drop_pg(pg_url)
            env |= {"MODELLOOP_MONITOR_STORE_URL": pg_url,
                    "MODELLOOP_MONITOR_STORE_TABLE_PREFIX": PG_PREFIX}
        started: list[subprocess.Popen[bytes]] = []
        try:
            urls = []
            for _ in range(replicas):
                proc, url = _start_sidecar(env)
                started.append(proc)
                urls.append(url)
            n = total // batch
            bodies = [orjson.dumps({"columns": [_columns(batch, f"h{b}", packed=columns == "packed")]}
                                   if columns else {"events": _events(batch, f"h{b}")}) for b in range(n)]
            per = [bodies[i::clients] for i in range(clients)]
            results: mp.Queue = mp.Queue()
            workers = [mp.Process(target=_client, args=(f"{urls[i % replicas]}/events", p, results))
                       for i, p in enumerate(per)]
            sidecars = [psutil.Process(p.pid) for p in started]
            cpu0 = sum(sum(p.cpu_times()[:2]) for p in sidecars)
            t0 = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            elapsed = time.perf_counter() - t0
            cpu = sum(sum(p.cpu_times()[:2]) for p in sidecars) - cpu0
            ingested = 0.0
            for url in urls:
                for line in httpx.get(f"{url}/metrics").text.splitlines():
                    if line.startswith('modelloop_events_ingested_total{model="bench"}'):
                        ingested += float(line.split()[-1])
            assert ingested == n * batch, f"{ingested} events stored, {n * batch} sent"
        finally:
            for proc in started:
                proc.terminate()
                proc.wait(30)
            if pg_url:
                _drop_pg(pg_url)
    form = {"": "one object per event", "lists": "columns, numbers in JSON lists",
            "packed": "columns, features and probabilities packed (as serving sends them)"}[columns]
    engine = "PostgreSQL" if pg_url else "SQLite FULL"
    sidecars = f"{replicas} monitor replicas on one store" if replicas > 1 else "modelloop monitor"
    return (f"HTTP: {sidecars}, {clients} client processes, {engine}, {form}",
            total / elapsed, total / cpu)


def bench_replicas(total: int, batch: int, clients: int, pg_url: str) -> None:
    """One sidecar against two replicas on one PostgreSQL, the same clients and events."""
    clients = max(clients, 2)
    rows = [bench_http(total, batch, clients, columns="packed", pg_url=pg_url, replicas=r) for r in (1, 2)]
    _print_rates(f"Replicas on one PostgreSQL, {total:,} events in batches of {batch}",
                 "events per CPU-second of the sidecars", rows)


def _print_rates(title: str, per_cpu_column: str, rows: list[tuple[str, float, float]]) -> None:
    table = Table(title=title)
    table.add_column("path")
    table.add_column("events/s (wall)", justify="right")
    table.add_column(per_cpu_column, justify="right")
    for name, rate, per_cpu in rows:
        table.add_row(name, f"{rate:,.0f}", f"{per_cpu:,.0f}")
    console.print(table)


def bench_ingest(total: int, batch: int, clients: int, pg_url: str | None) -> None:
    rows = bench_store(total, batch, pg_url)
    rows.append(bench_http(total, batch, clients))
    rows.append(bench_http(total, batch, clients, columns="lists"))
    rows.append(bench_http(total, batch, clients, columns="packed"))
    if pg_url:
        rows.append(bench_http(total, batch, clients, columns="packed", pg_url=pg_url))
    _print_rates(f"Ingest, {total:,} events of 20 features in batches of {batch}",
                 "events per CPU-second of the writer", rows)


# -- retention -----------------------------------------------------------------------------------
def _event_rows(n: int, seed: int, n_features: int = 20) -> list:
    """Store rows as serving's events become: UUID request ids, 20 float64 features."""
    from monitoring.records import EventRow

    x = np.random.default_rng(seed).normal(size=(n, n_features))
    proba = np.array([0.4, 0.6]).tobytes()
    now = time.time()
    return [EventRow(str(uuid.uuid4()), "bench", 1, now, "realtime", x[i].tobytes(), 1.0, proba,
                     0.002, now) for i in range(n)]


def bench_retention(cycles: int, burst: int, batch: int, max_events: int, max_bytes: int,
                    legacy: bool = False) -> None:
    """``legacy``: a file made without incremental auto-vacuum, each bound deleted in one
    transaction (as the store did before retention was chunked)."""
    import sqlite3

    from monitoring.store import RETENTION_CHUNK_ROWS, SQLiteStore

    mib = 1024 * 1024
    how = ("a file without auto-vacuum, one transaction per bound" if legacy else
           f"auto_vacuum=INCREMENTAL, chunks of {RETENTION_CHUNK_ROWS:,}")
    table = Table(title=f"SQLite store ({how}) over {cycles} retention runs, each after "
                        f"{burst:,} events ingested at full speed (batches of {batch}); bounds "
                        f"{max_events:,} events, {max_bytes / mib:.0f} MiB")
    for col in ("run", "ingest events/s", "WAL after ingest MiB", "retention s",
                "deleted by count, by bytes", "WAL peak in retention MiB", "kept events",
                "used MiB", "db MiB", "WAL MiB"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "e.db"
        wal = path.with_name(path.name + "-wal")
        if legacy:
            sqlite3.connect(path).execute("CREATE TABLE made_before (x)").connection.close()
        store = SQLiteStore(path, vacuum_at_open_max_bytes=0)
        chunk_rows = 2**62 if legacy else RETENTION_CHUNK_ROWS

        def size(p: Path) -> float:
            return p.stat().st_size / mib if p.exists() else 0.0

        for run in range(1, cycles + 1):
            batches = [_event_rows(batch, run * 1000 + b) for b in range(burst // batch)]
            t0 = time.perf_counter()
            for rows in batches:
                store.insert_events(rows)
            rate = burst / (time.perf_counter() - t0)
            del batches
            after_ingest = size(wal)
            peak = [0.0]  # the WAL's size after each chunk, before it is truncated
            t0 = time.perf_counter()
            done = store.retain(cutoff_ts=time.time() - 7 * 24 * 3600, max_events=max_events,
                                max_bytes=max_bytes, chunk_rows=chunk_rows,
                                on_chunk=lambda _, p=peak: p.append(size(wal)))
            took = time.perf_counter() - t0
            table.add_row(str(run), f"{rate:,.0f}", f"{after_ingest:.1f}", f"{took:.2f}",
                          f"{done.by_count:,}, {done.by_bytes:,}", f"{max(peak):.1f}",
                          f"{store.count_events():,}", f"{store.used_bytes() / mib:.1f}",
                          f"{size(path):.1f}", f"{size(wal):.1f}")
        store.close()
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["drift", "ingest", "retention", "replicas"])
    parser.add_argument("--rows", type=int, default=100_000, help="rows of window and reference")
    parser.add_argument("--events", type=int, default=200_000, help="events to ingest")
    parser.add_argument("--batch", type=int, default=1000, help="events per batch")
    parser.add_argument("--clients", type=int, default=2, help="HTTP client processes")
    parser.add_argument("--pg-url", help="ingest into this PostgreSQL database too (tables "
                        f"{PG_PREFIX}*, dropped after)")
    parser.add_argument("--cycles", type=int, default=10, help="retention runs")
    parser.add_argument("--burst", type=int, default=60_000, help="events ingested per run")
    parser.add_argument("--max-events", type=int, default=100_000, help="retention's count bound")
    parser.add_argument("--max-mib", type=int, default=20, help="retention's size bound (MiB)")
    parser.add_argument("--legacy", action="store_true",
                        help="retention as before: a file without auto-vacuum, one transaction")
    args = parser.parse_args()
    console.print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    if args.only in (None, "drift"):
        bench_drift(args.rows)
    if args.only in (None, "ingest"):
        bench_ingest(args.events, args.batch, args.clients, args.pg_url)
    if args.only == "replicas":
        if not args.pg_url:
            parser.error("--only replicas: needs --pg-url (the replicas share a PostgreSQL store)")
        bench_replicas(args.events, args.batch, args.clients, args.pg_url)
    if args.only in (None, "retention"):
        bench_retention(args.cycles, args.burst, args.batch, args.max_events,
                        args.max_mib * 1024 * 1024, args.legacy)


if __name__ == "__main__":
    main()
