#!/usr/bin/env python
"""Many models and shadow traffic (issue #17, the Acceptance's second bullet), with wrk against
real `modelloop serve` (and `modelloop monitor`) processes.

    .venv/bin/python scripts/bench_models.py [--seconds 8] [--rounds 3] [--models 10]
        [--only spread,shadow] [--out bench_out/models.md]

spread: 1-row `/models/{name}/predict` requests spread in turn over --models small models (the
standard MLP registered under as many names) served by one `modelloop serve`, against the same
load on one model served alone, same workers and connections.

shadow: the champion's req/s, p99 and server CPU per request with a `challenger` alias (a second
version of the same architecture) scored in shadow, against the same server with
MODELLOOP_SERVING_SHADOW=false; each server sends its events to its own real `modelloop monitor`,
so the shadow's events are really sent and stored. Counters are read before each run and once
the run's events stop moving (bench_machine's settle): the server CPU per request includes the
shadow's catch-up after the load, and the shadow's rows scored and dropped come from serving's
/metrics.

The two cases of a section run in alternation, in paired rounds (which goes first alternates);
the target is the median of the per-round ratios. The machine is shared: the load average is
printed with the results. Needs wrk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modelloop.ports import free_port  # noqa: E402
from modelloop.registry import Registry  # noqa: E402
from scripts.bench_machine import counters, first_check, settle, sidecar_processes, snapshot  # noqa: E402
from scripts.bench_serving import (  # noqa: E402
    BIN,
    STANDARD,
    Server,
    batch_size,
    json_body,
    register,
    servers,
    wrk,
)

SECTIONS = ("spread", "shadow")
JSON = {"Content-Type": "application/json"}
SHADOW = {"modelloop_serving_requests_total#requests": {},  # warm-up included, as in the CPU
          **{f"modelloop_serving_shadow_rows_total#{r}": {"result": r} for r in ("scored", "dropped", "failed")}}
Row = dict[str, float]
Spec = tuple[str, list[str], str, dict[str, str], Path | None]  # bench_serving.servers' (name, command, ready, env, cwd)


def paired(names: tuple[str, str], rounds: int, run: Callable[[str], Row]) -> dict[str, list[Row]]:
    """``rounds`` rounds of both cases back to back, the first of each pair alternating."""
    out: dict[str, list[Row]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            out[name].append(run(name))
            print(r, name, {k: round(v, 1) for k, v in out[name][-1].items()}, flush=True)
    return out


def spread(home: Path, tmp: Path, args: argparse.Namespace, env: dict[str, str]) -> list[str]:
    """One model against --models models in one server: the table's lines."""
    names = [f"m{i:02d}" for i in range(args.models)]
    for name in names:
        register(home, name, STANDARD)
    one, many = "1 model served", f"{args.models} models served"
    serve = [str(BIN / "modelloop"), "serve", "--host", "127.0.0.1", "--workers", str(args.workers)]
    specs: list[Spec] = [(one, serve, "/v2/health/ready", {**env, "MODELLOOP_SERVING_MODELS": names[0]}, None),
             (many, serve, "/v2/health/ready", env, None)]
    routes = {one: [f"/models/{names[0]}/predict"], many: [f"/models/{n}/predict" for n in names]}
    body = json_body(tmp / "one.json", 1)
    with servers(specs, tmp) as group:
        for name in (one, many):  # every worker loads every model before the measured runs
            wrk(group[name].url, body, args.connections, 3, JSON, tmp, paths=routes[name])
        runs = paired((one, many), args.rounds, lambda name: wrk(
            group[name].url, body, args.connections, args.seconds, JSON, tmp, group[name], paths=routes[name]))
        batch_rows = {name: batch_size(srv) for name, srv in group.items()}
    ratios = [m["rps"] / o["rps"] for o, m in zip(runs[one], runs[many], strict=True)]
    lines = ["| case | req/s (per round) | p99 ms (per round) | server CPU/request | rows per ONNX Runtime call "
             "| errors |", "| --- | --- | --- | ---: | ---: | ---: |"]
    lines += [_row(*_cells(name, runs[name], "cpu_us"), f"{batch_rows[name]:.2f}",
                   f"{sum(r['errors'] for r in runs[name]):,.0f}") for name in (one, many)]
    lines.append(f"\n{args.models} models / 1 model, req/s: median {statistics.median(ratios):.2f}x "
                 f"(per round {', '.join(f'{x:.2f}' for x in ratios)}; target >= 0.8x).")
    return lines


def shadow(home: Path, tmp: Path, args: argparse.Namespace, env: dict[str, str]) -> list[str]:
    """The champion with its challenger in shadow against without: the table's lines."""
    register(home, "standard", STANDARD)
    register(home, "standard", STANDARD)  # version 2 becomes production, version 1 the challenger
    Registry(home / "registry").set_alias("standard", "challenger", 1)
    on = "shadow on" if args.shadow_share >= 1 else f"shadow on, share {args.shadow_share:g}"
    off = "shadow off"
    serve = [str(BIN / "modelloop"), "serve", "--host", "127.0.0.1", "--workers", str(args.workers)]
    sides: list[tuple[str, int, dict[str, str]]] = []
    specs: list[Spec] = []
    for name, extra in ((on, {"MODELLOOP_SERVING_SHADOW_SHARE": str(args.shadow_share)}),
                        (off, {"MODELLOOP_SERVING_SHADOW": "false"})):
        port = free_port()
        sides.append((name, port, {"MODELLOOP_HOME": str(home), "MODELLOOP_MONITOR_TRIGGER": "none",
                                   "MODELLOOP_MONITOR_LOG_LEVEL": "WARNING",
                                   "MODELLOOP_MONITOR_STORE_URL": f"sqlite:///{tmp / name.replace(' ', '-')}.db"}))
        specs.append((name, serve, "/v2/health/ready", {**env, **extra, "MODELLOOP_SERVING_MODEL": "standard",
                                                        "MODELLOOP_SERVING_SIDECAR_URL": f"http://127.0.0.1:{port}"},
                      None))
    body = json_body(tmp / "one.json", 1)
    with sidecar_processes(sides, tmp) as side, servers(specs, tmp) as group:
        shadowing(group[on], body, tmp, args.shadow_share)
        # each sidecar's first check of these events, its drift report and the report's feature
        # importance (once a model version) are done before the rounds: a start-up cost, not
        # the shadow's (the checks every minute after it are in the rounds)
        wrk(group[off].url + "/predict", body, 8, 2, JSON, tmp)
        time.sleep(2)
        first_check(side)

        def case(name: str) -> Row:
            srv = group[name]
            before = snapshot(srv, side[name]) | counters(srv.url, SHADOW)
            got = wrk(srv.url + "/predict", body, args.connections, args.seconds, JSON, tmp, srv)
            delta = settle(srv, side[name], before)
            shadowed = {k.split("#")[1]: v - before[k] for k, v in counters(srv.url, SHADOW).items()}
            requests = shadowed.pop("requests")
            return {**got, "requests": requests, "serve_us": delta["serve_cpu"] / requests * 1e6,
                    "side_us": delta["side_cpu"] / requests * 1e6,
                    "stored": delta["modelloop_events_ingested_total"],
                    "dropped_events": delta["modelloop_serving_events_dropped_total"],
                    **shadowed}

        runs = paired((on, off), args.rounds, case)
    per_round = [(a["rps"] / b["rps"], a["p99"] / b["p99"], a["serve_us"] - b["serve_us"])
                 for a, b in zip(runs[on], runs[off], strict=True)]
    lines = ["| case | req/s (per round) | p99 ms (per round) | serve CPU/request (incl. catch-up) "
             "| sidecar CPU/request | requests | production events stored | events dropped | shadow rows scored | shadow rows dropped "
             "| shadow rows failed | errors |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in (on, off):
        rs = runs[name]
        lines.append(_row(*_cells(name, rs, "serve_us"), f"{_med(rs, 'side_us'):,.0f} us",
                          *(f"{sum(r[k] for r in rs):,.0f}" for k in
                            ("requests", "stored", "dropped_events", "scored", "dropped", "failed", "errors"))))

    def each(i: int, fmt: str) -> str:
        return f"median {fmt.format(statistics.median(p[i] for p in per_round))} (per round " + ", ".join(
            fmt.format(p[i]) for p in per_round) + ")"

    lines.append(f"\nShadow on / off: req/s {each(0, '{:.2f}x')}, target >= 0.9x; p99 {each(1, '{:.2f}x')}; "
                 f"server CPU the shadow costs per request (on - off) {each(2, '{:,.0f} us')}. "
                 "Counts are summed over the rounds, each run's 1 s wrk warm-up included (as in the CPU "
                 "per request).")
    return lines


def shadowing(srv: Server, body: Path, tmp: Path, share: float = 1.0) -> None:
    """Wait until every worker shadows (each loads its challenger at an alias poll after start):
    short loads until the challenger scores as many rows as the server answered (the share of
    them, give or take)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        before = counters(srv.url, SHADOW)
        wrk(srv.url + "/predict", body, 8, 2, JSON, tmp)
        time.sleep(3)  # the shadow's queue drains and the metrics flush
        after = counters(srv.url, SHADOW)
        done = {k.split("#")[1]: after[k] - before[k] for k in after}
        if done["scored"] >= done["requests"] * (1.0 if share >= 1 else 0.7 * share) and done["requests"] > 0:
            return
    raise RuntimeError(f"{srv.name}: the challenger does not score every request:\n{srv.log.read_text()[-3000:]}")


def _med(runs: list[Row], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _cells(name: str, runs: list[Row], cpu: str) -> list[str]:
    """The case, its median req/s and p99 with each round's, and its median CPU per request."""
    rps = ", ".join(f"{r['rps']:,.0f}" for r in runs)
    p99 = ", ".join(f"{r['p99']:.1f}" for r in runs)
    return [name, f"{_med(runs, 'rps'):,.0f} ({rps})", f"{_med(runs, 'p99'):.1f} ({p99})", f"{_med(runs, cpu):,.0f} us"]


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8, help="measured seconds per case and round")
    parser.add_argument("--rounds", type=int, default=3, help="paired rounds per section")
    parser.add_argument("--models", type=int, default=10, help="models the spread case serves")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="serving worker processes")
    parser.add_argument("--shadow-share", type=float, default=1.0,
                        help="MODELLOOP_SERVING_SHADOW_SHARE of the shadow-on server")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated, of {','.join(SECTIONS)}")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out" / "models.md")
    args = parser.parse_args()
    only = args.only.split(",")
    if set(only) - set(SECTIONS):
        parser.error(f"--only: choose from {', '.join(SECTIONS)}")
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: run scripts/ci_services.sh")
    tmp = Path(tempfile.mkdtemp(prefix="bench-models-"))
    env = {"MODELLOOP_HOME": "", "BENTOML_DO_NOT_TRACK": "True", "BENTOML_HOME": str(tmp / "bh"),
           "MODELLOOP_SERVING_LOG_LEVEL": "WARNING"}
    load_before = os.getloadavg()
    lines: list[str] = []
    for section in SECTIONS:
        if section in only:
            home = tmp / section  # a registry each: the sections' models do not mix
            lines += [f"**{section}**", "", *{"spread": spread, "shadow": shadow}[section](
                home, tmp, args, {**env, "MODELLOOP_HOME": str(home)}), ""]
    lines.append(f"{args.seconds:g} s per case and round, {args.rounds} paired rounds, {args.workers} serving "
                 f"workers, {args.connections} wrk connections, 1-row JSON; {os.cpu_count()} cores shared with "
                 f"wrk and other work, load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}.")
    table = "\n".join(lines)
    print("\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
