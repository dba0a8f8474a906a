#!/usr/bin/env python
"""The whole machine (issue #21, item 5): `modelloop serve` alone and with a real `modelloop
monitor` receiving its events on the same machine, 1-row and 1024-row requests under wrk, with
every event sent (share 1) and with the event sample (a rows-per-second budget).

    .venv/bin/python scripts/bench_machine.py [--seconds 8] [--rounds 1] [--budget 2000]
        [--rows 1,1024] [--store-url postgresql://postgres@127.0.0.1:5432/test] [--out bench_out/machine.md]

Per case: req/s (and its ratio to serving alone in the same round), serving's and the sidecar's
CPU per request, events sent, dropped, left out by the sample, and stored by the sidecar, and the
sidecar's CPU per stored event. Counters are read before and after each run; the run's events
are given up to 20 s to settle (the sidecar's CPU includes that catch-up). The cases are
measured in alternation (--rounds), each server pair started once; the machine is shared, so
compare ratios within one run. Needs wrk.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modelloop.ports import free_port  # noqa: E402
from scripts.bench_serving import BIN, STANDARD, Server, json_body, register, servers, wrk  # noqa: E402

ALONE, ALL, SAMPLED = "serve alone", "serve + monitor, every event", "serve + monitor, sampled"


def counters(url: str, names: dict[str, dict[str, str]]) -> dict[str, float]:
    """Each of ``names`` (metric name -> labels to match) summed over its samples on url/metrics."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    out = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            for key, labels in names.items():
                name = key.split("#")[0]
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    out[key] += s.value
    return out


SERVING = {"modelloop_serving_events_sent_total": {},
           "modelloop_serving_events_dropped_total": {},
           "modelloop_serving_events_sampled_total#left_out": {"result": "left_out"}}
SIDECAR = {"modelloop_events_ingested_total": {}}


@contextlib.contextmanager
def sidecar_processes(specs: list[tuple[str, int, dict[str, str]]], tmp: Path) -> Iterator[dict[str, Server]]:
    """``modelloop monitor`` on each (name, port, env), ready; stopped after (SIGTERM)."""
    started: dict[str, Server] = {}
    try:
        for name, port, env in specs:
            log = tmp / f"sidecar-{port}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen([str(BIN / "modelloop"), "monitor", "--port", str(port)],
                                        env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
            started[name] = Server(name, proc, f"http://127.0.0.1:{port}", log)
        for srv in started.values():
            deadline = time.monotonic() + 120
            while not _answers(srv.url + "/ready"):
                if srv.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{srv.name} not ready:\n{srv.log.read_text()[-3000:]}")
                time.sleep(0.2)
        for srv in started.values():  # the reference profiles' warm-up is not the events' cost
            quiet(srv, 90)
        yield started
    finally:
        for srv in started.values():
            srv.proc.terminate()
            srv.proc.wait(60)


def quiet(srv: Server, deadline_s: float = 180) -> None:
    """Wait until ``srv`` (its process tree) uses under 0.1 s of CPU in 2 s."""
    deadline, cpu = time.monotonic() + deadline_s, srv.cpu_seconds()
    while time.monotonic() < deadline:
        time.sleep(2)
        cpu, busy = srv.cpu_seconds(), srv.cpu_seconds() - cpu
        if busy < 0.1:
            return


def first_check(sides: dict[str, Server]) -> None:
    """Each sidecar's first check of the events it has, its first drift report and the report's
    feature importance (once a model version: seconds of CPU), done and quiet: a start-up cost,
    kept out of the measured runs (the checks every minute after it are in them)."""
    for srv in sides.values():
        httpx.post(srv.url + "/check", timeout=300).raise_for_status()
    for srv in sides.values():
        quiet(srv)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def snapshot(srv: Server, side: Server | None) -> dict[str, float]:
    got = counters(srv.url, SERVING)
    got["serve_cpu"] = srv.cpu_seconds()
    if side is not None:
        got |= counters(side.url, SIDECAR)
        got["side_cpu"] = side.cpu_seconds()
    return got


def settle(srv: Server, side: Server | None, before: dict[str, float]) -> dict[str, float]:
    """Counters once the run's events stop moving (at most 20 s after the load)."""
    deadline, last = time.monotonic() + 20, snapshot(srv, side)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = snapshot(srv, side)
        moved = any(now[k] != last[k] for k in now if not k.endswith("_cpu"))
        last = now
        if not moved:
            break
    return {k: last[k] - before.get(k, 0.0) for k in last}


def run_case(srv: Server, side: Server | None, body: Path, conns: int, seconds: float,
             tmp: Path) -> dict[str, float]:
    before = snapshot(srv, side)
    got = wrk(srv.url + "/predict", body, conns, seconds, {"Content-Type": "application/json"}, tmp, srv)
    delta = settle(srv, side, before)
    requests = got["rps"] * seconds
    row = {"rps": got["rps"], "errors": got["errors"], "serve_us": delta["serve_cpu"] / requests * 1e6,
           "sent": delta["modelloop_serving_events_sent_total"],
           "dropped": delta["modelloop_serving_events_dropped_total"],
           "left_out": delta["modelloop_serving_events_sampled_total#left_out"]}
    if side is not None:
        stored = delta["modelloop_events_ingested_total"]
        row |= {"stored": stored, "side_us": delta["side_cpu"] / requests * 1e6,
                "side_us_event": delta["side_cpu"] / stored * 1e6 if stored else float("nan")}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8, help="measured seconds per case and round")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds (the median is kept)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="serving worker processes")
    parser.add_argument("--budget", type=float, default=2000.0,
                        help="EVENT_ROWS_PER_S of the sampled case (all workers together)")
    parser.add_argument("--store-url", help="the sidecars' store (default: a SQLite file each); "
                        "PostgreSQL tables get a prefix per sidecar and are dropped after")
    parser.add_argument("--check-interval-s", type=float,
                        help="the sidecars' CHECK_INTERVAL_S (default theirs, 60 s): a long one leaves "
                             "the periodic check out of the sidecar's CPU")
    parser.add_argument("--rows", default="1,1024", help="rows per request of the cases run (1 and/or 1024)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out" / "machine.md")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: run scripts/ci_services.sh")
    tmp = Path(tempfile.mkdtemp(prefix="bench-machine-"))
    home = tmp / "home"
    register(home, "standard", STANDARD)
    conns = {1: 32, 1024: 8}
    bodies = {rows: (json_body(tmp / f"rows-{rows}.json", rows), conns[rows]) for rows in map(int, args.rows.split(","))}
    bento = {"BENTOML_DO_NOT_TRACK": "True", "BENTOML_HOME": str(tmp / "bh")}
    serve_env = {"MODELLOOP_HOME": str(home), **bento, "MODELLOOP_SERVING_LOG_LEVEL": "WARNING",
                 "MODELLOOP_SERVING_MODEL": "standard"}
    serve = [str(BIN / "modelloop"), "serve", "--host", "127.0.0.1", "--workers", str(args.workers)]
    specs = [(ALONE, serve, "/v2/health/ready", serve_env, None)]
    sidecars: list[tuple[str, int, dict[str, str]]] = []
    prefixes: list[str] = []
    for name, extra in ((ALL, {}), (SAMPLED, {"MODELLOOP_SERVING_EVENT_ROWS_PER_S": str(args.budget)})):
        port = free_port()  # the sidecar's: serving must know it before either starts
        prefix = f"bench{len(prefixes)}_{os.getpid()}_"
        prefixes.append(prefix)
        side_env = {"MODELLOOP_HOME": str(home), "MODELLOOP_MONITOR_TRIGGER": "none",
                    "MODELLOOP_MONITOR_LOG_LEVEL": "WARNING",
                    "MODELLOOP_MONITOR_STORE_URL": args.store_url or f"sqlite:///{tmp / prefix}.db",
                    "MODELLOOP_MONITOR_STORE_TABLE_PREFIX": prefix}
        if args.check_interval_s:
            side_env["MODELLOOP_MONITOR_CHECK_INTERVAL_S"] = str(args.check_interval_s)
        sidecars.append((f"{name} / sidecar", port, side_env))
        specs.append((name, serve, "/v2/health/ready",
                      {**serve_env, **extra, "MODELLOOP_SERVING_SIDECAR_URL": f"http://127.0.0.1:{port}"}, None))
    load_before = os.getloadavg()
    results: dict[tuple[int, str], list[dict[str, float]]] = {}
    try:
        with sidecar_processes(sidecars, tmp) as sides, servers(specs, tmp) as group:
            first_body = next(iter(bodies.values()))[0]
            for name in (ALL, SAMPLED):  # events in each sidecar, then its first check done
                wrk(group[name].url + "/predict", first_body, 8, 2, {"Content-Type": "application/json"}, tmp)
            time.sleep(2)
            first_check(sides)
            for rows, (body, conns) in bodies.items():
                for r in range(args.rounds):
                    cases = [ALONE, ALL, SAMPLED] if r % 2 == 0 else [SAMPLED, ALL, ALONE]
                    for name in cases:
                        got = run_case(group[name], sides.get(f"{name} / sidecar"), body, conns,
                                       args.seconds, tmp)
                        results.setdefault((rows, name), []).append(got)
                        print(rows, name, {k: round(v, 1) for k, v in got.items()}, flush=True)
    finally:
        if args.store_url and args.store_url.startswith("postgresql"):
            from monitoring.store import open_store

            for prefix in prefixes:
                store = open_store(args.store_url, prefix)
                store.drop_schema()
                store.close()
    table = render(results, args, load_before)
    print("\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    shutil.rmtree(tmp, ignore_errors=True)


def render(results: dict[tuple[int, str], list[dict[str, float]]], args: argparse.Namespace,
           load_before: tuple[float, float, float]) -> str:
    def med(rows: int, name: str, key: str) -> float:
        return statistics.median(r.get(key, float("nan")) for r in results[(rows, name)])

    lines = ["| request | case | req/s | vs alone | serve CPU/req | sidecar CPU/req | sent | dropped "
             "| left out by the sample | stored | sidecar CPU/stored event |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for rows in sorted({k[0] for k in results}):
        alone = med(rows, ALONE, "rps")
        for name in (ALONE, ALL, SAMPLED):
            side = name != ALONE
            rps, side_us, stored, per_event = (med(rows, name, k) for k in ("rps", "side_us", "stored", "side_us_event"))
            lines.append(
                f"| {rows}-row | {name} | {rps:,.0f} | {rps / alone:.2f}x | {med(rows, name, 'serve_us'):,.0f} us "
                f"| {f'{side_us:,.0f} us' if side else '-'} "
                f"| {med(rows, name, 'sent'):,.0f} | {med(rows, name, 'dropped'):,.0f} "
                f"| {med(rows, name, 'left_out'):,.0f} | {f'{stored:,.0f}' if side else '-'} "
                f"| {f'{per_event:,.1f} us' if side else '-'} |")
    lines.append(f"\n{args.seconds:g} s per case, {args.rounds} round(s), {args.workers} serving workers, "
                 f"sampled case EVENT_ROWS_PER_S={args.budget:g}, store {args.store_url or 'SQLite'}, "
                 f"sidecar check interval {args.check_interval_s or 60:g} s; "
                 f"load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
