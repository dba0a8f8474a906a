"""What the SQLite event table's layout costs a stored event (issue #21's 15 us a stored event):
the layout `monitoring/store.py` made until 2477df0 (2026-12-07), the one it makes since (one time index),
and two it could take, in plain SQLite, so only the layout differs.

    .venv/bin/python scripts/bench_store_layout.py [--rounds 6] [--batch 1000]

- ``two ingest indexes``: one row per event with its features and probabilities (float64 blobs),
  a unique request-id index, (model, version, seq), (model, ts) and the partial index of
  labelled events: the store until 2477df0.
- ``one time index``: the same, with (model, version, ts) in place of the two ingest indexes (a
  read across versions merges one range per version): the store since.
- ``features per group``: a row per column group holding its features and probabilities, and a
  slim row per event pointing at its group and row, with the two ingest indexes.
- ``both``: features per group and the one time index.

Per layout: CPU microseconds per event to insert batches of ``--batch`` events (30 features,
time-ordered request ids as serving makes them), one transaction each, ``synchronous=FULL``,
into a table that grows by 100,000 events a round, the layouts taking turns; the median of the
rounds.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

N_FEATURES = 30
EVENT = """CREATE TABLE events (seq INTEGER PRIMARY KEY, request_id TEXT NOT NULL UNIQUE,
    model TEXT NOT NULL, version INTEGER NOT NULL, ts REAL NOT NULL, {payload},
    prediction REAL NOT NULL, latency_s REAL NOT NULL, received_at REAL NOT NULL, label REAL,
    label_ts REAL, ambiguous INTEGER NOT NULL DEFAULT 0)"""
LABELLED = "CREATE INDEX labelled ON events (model, version, ts) WHERE label IS NOT NULL"
TWO_INDEXES = ["CREATE INDEX mvs ON events (model, version, seq)", "CREATE INDEX mts ON events (model, ts)"]
ROW_PAYLOAD = "mode TEXT NOT NULL, features BLOB NOT NULL, probabilities BLOB"

LAYOUTS: dict[str, list[str]] = {
    "two ingest indexes": [EVENT.format(payload=ROW_PAYLOAD), *TWO_INDEXES, LABELLED],
    "one time index": [EVENT.format(payload=ROW_PAYLOAD),
                       "CREATE INDEX mvt ON events (model, version, ts)", LABELLED],
    "features per group": [
        """CREATE TABLE groups (id INTEGER PRIMARY KEY, model TEXT NOT NULL, version INTEGER NOT NULL,
            mode TEXT NOT NULL, rows INTEGER NOT NULL, features BLOB NOT NULL, probabilities BLOB)""",
        EVENT.format(payload="grp INTEGER NOT NULL, row INTEGER NOT NULL"), *TWO_INDEXES, LABELLED],
}
LAYOUTS["both"] = [*LAYOUTS["features per group"][:2], "CREATE INDEX mvt ON events (model, version, ts)", LABELLED]


def request_ids(n: int) -> list[str]:
    """Ids as serving makes them: microseconds since the epoch, 32 random bits, the row."""
    return [f"{time.time_ns() // 1000:013x}{os.urandom(4).hex()}-0" for _ in range(n)]


def insert_rows(conn: sqlite3.Connection, ids: list[str], feats: np.ndarray, probs: np.ndarray) -> None:
    now = time.time()
    f, p = feats.tobytes(), probs.tobytes()
    fs, ps = feats.shape[1] * 8, probs.shape[1] * 8
    conn.executemany(
        "INSERT INTO events (request_id, model, version, ts, mode, features, probabilities, prediction, "
        "latency_s, received_at) VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT (request_id) DO NOTHING",
        [(rid, "m", 1, now, "realtime", f[i * fs:(i + 1) * fs], p[i * ps:(i + 1) * ps], 1.0, 0.001, now)
         for i, rid in enumerate(ids)])


def insert_group(conn: sqlite3.Connection, ids: list[str], feats: np.ndarray, probs: np.ndarray) -> None:
    now = time.time()
    grp = conn.execute("INSERT INTO groups (model, version, mode, rows, features, probabilities) "
                       "VALUES (?,?,?,?,?,?)", ("m", 1, "realtime", len(ids), feats.tobytes(),
                                                probs.tobytes())).lastrowid
    conn.executemany(
        "INSERT INTO events (request_id, model, version, ts, grp, row, prediction, latency_s, received_at) "
        "VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT (request_id) DO NOTHING",
        [(rid, "m", 1, now, grp, i, 1.0, 0.001, now) for i, rid in enumerate(ids)])


def open_layout(layout: str, tmp: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(tmp / f"{layout.replace(' ', '_')}.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    for ddl in LAYOUTS[layout]:
        conn.execute(ddl)
    return conn


def one_round(layout: str, conn: sqlite3.Connection, batch: int) -> float:
    """CPU us per event of a round of 100,000 events."""
    insert: Callable[..., None] = insert_group if layout in ("features per group", "both") else insert_rows
    rng = np.random.default_rng(0)
    feats, probs = rng.normal(size=(batch, N_FEATURES)), rng.random((batch, 2))
    cpu = 0.0
    for _ in range(100_000 // batch):
        ids = request_ids(batch)
        c0 = time.process_time()
        conn.execute("BEGIN")
        insert(conn, ids, feats, probs)
        conn.execute("COMMIT")
        cpu += time.process_time() - c0
    return 1e6 * cpu / (100_000 // batch * batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6, help="rounds of 100,000 events per layout")
    parser.add_argument("--batch", type=int, default=1000, help="events per transaction")
    args = parser.parse_args()
    rounds: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
    with tempfile.TemporaryDirectory() as tmp:
        conns = {layout: open_layout(layout, Path(tmp)) for layout in LAYOUTS}
        for _ in range(args.rounds):  # the layouts in turn, so a busier minute of the machine
            for layout, conn in conns.items():  # falls on each of them
                rounds[layout].append(one_round(layout, conn, args.batch))
        for conn in conns.values():
            conn.close()
    base = statistics.median(rounds[next(iter(LAYOUTS))])
    print("| layout | CPU us per event (median) | vs the first | per round |\n| --- | ---: | ---: | --- |")
    for layout, r in rounds.items():
        print(f"| {layout} | {statistics.median(r):.2f} | {statistics.median(r) / base:.2f}x | "
              f"{', '.join(f'{x:.2f}' for x in r)} |")
    print(f"\n{args.rounds} rounds of 100,000 events per layout, the layouts in turn, batches of "
          f"{args.batch}, {N_FEATURES} features, SQLite {sqlite3.sqlite_version}, synchronous=FULL; "
          f"load average {os.getloadavg()[0]:.1f}.")


if __name__ == "__main__":
    main()
