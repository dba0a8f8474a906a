"""Resources of the serving process (a real busy child process, the real cgroup of this machine),
GPUs through NVML (absent here: the sidecar must carry on quietly), latency quantiles and the
error rate from serving's own counters."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import psutil
import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from monitoring.performance import (
    ErrorRateTracker,
    RequestCounts,
    latency_quantiles,
    parse_request_counts,
)
from monitoring.resources import CgroupSampler, GpuSampler, ProcessSampler

BURN = "import time\nwhile time.process_time() < 0.6: pass\nprint('done', flush=True)\ntime.sleep(60)"


@pytest.fixture
def worker_tree() -> Iterator[subprocess.Popen[str]]:
    """A process with a child, like BentoML's supervisor and worker: the child burns 0.6 s of
    CPU, says so, and idles; the parent holds ~50 MB and relays the child's line."""
    code = ("import subprocess, sys, time; b = bytearray(50_000_000); "
            f"c = subprocess.Popen([sys.executable, '-c', {BURN!r}], stdout=subprocess.PIPE, text=True); "
            "print(c.stdout.readline().strip(), flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    yield proc
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.kill()
    proc.kill()
    proc.wait()


def test_process_cpu_and_memory_include_children(worker_tree: subprocess.Popen[str]) -> None:
    tree = ProcessSampler(worker_tree.pid, include_children=True)
    alone = ProcessSampler(worker_tree.pid, include_children=False)
    t0 = time.monotonic()
    assert tree.sample().cpu_ratio is None  # a rate needs two samples
    alone.sample()
    assert worker_tree.stdout is not None and worker_tree.stdout.readline().strip() == "done"
    both, parent = tree.sample(), alone.sample()
    elapsed = time.monotonic() - t0
    # CPU seconds, not wall time, so the machine's load does not matter: the child's 0.6 s of
    # work plus two interpreters starting up
    assert both.cpu_ratio is not None and 0.55 <= both.cpu_ratio * elapsed <= 1.5
    assert parent.cpu_ratio is not None and parent.cpu_ratio * elapsed < 0.45
    assert both.memory_bytes > parent.memory_bytes > 50e6


def test_a_gone_process_raises_no_such_process() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    sampler = ProcessSampler(proc.pid)
    proc.wait()
    with pytest.raises(psutil.NoSuchProcess):
        sampler.sample()


def test_cgroup_v1_of_this_machine() -> None:
    root = Path("/sys/fs/cgroup")
    if not (root / "cpuacct" / "cpuacct.usage").exists():
        pytest.skip("this machine has no cgroup v1 hierarchy")
    sampler = CgroupSampler(root)
    assert sampler.version == 1
    sampler.sample()
    t = time.time()
    while time.time() - t < 0.3:  # burn some CPU in this cgroup
        pass
    s = sampler.sample()
    assert s.cpu_ratio is not None and s.cpu_ratio > 0.1 and s.memory_bytes > 0


def test_cgroup_v2_files(tmp_path: Path) -> None:
    # the v2 interface files as the kernel writes them
    (tmp_path / "cpu.stat").write_text("usage_usec 1000000\nuser_usec 800000\nsystem_usec 200000\n")
    (tmp_path / "memory.current").write_text("268435456\n")
    sampler = CgroupSampler(tmp_path)
    assert sampler.version == 2 and sampler.sample().memory_bytes == 268435456
    (tmp_path / "cpu.stat").write_text("usage_usec 3000000\n")
    assert sampler.sample().cpu_ratio > 0


def test_a_directory_that_is_no_cgroup_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"{tmp_path} is not a cgroup directory"):
        CgroupSampler(tmp_path)


def test_without_a_gpu_nvml_degrades_quietly(caplog: pytest.LogCaptureFixture) -> None:
    sampler = GpuSampler()
    with caplog.at_level(logging.INFO, logger="monitoring.resources"):
        first = sampler.sample()
        second = sampler.sample()
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("this machine has a GPU; the degradation path is not taken")
    except pynvml.NVMLError:
        pass
    assert first == [] and second == []
    assert sampler.unavailable is not None and sampler.unavailable.startswith("NVMLError")
    assert len([r for r in caplog.records if "no GPU metrics" in r.message]) == 1  # said once
    sampler.close()


class FakeNvml:
    """NVML's API surface (no GPU here to run the real one): two GPUs, the second failing."""

    class NVMLError(Exception):
        pass

    def nvmlInit(self) -> None: ...

    def nvmlShutdown(self) -> None: ...

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        if h == 1:
            raise self.NVMLError("GPU is lost")
        return SimpleNamespace(gpu=37, memory=10)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return SimpleNamespace(used=2 * 2**30, total=80 * 2**30, free=78 * 2**30)


def test_gpu_readings_and_a_lost_gpu_do_not_stop_sampling() -> None:
    samples = GpuSampler(FakeNvml()).sample()
    assert [(s.index, s.utilization_ratio, s.memory_used_bytes, s.memory_total_bytes)
            for s in samples] == [("0", 0.37, 2 * 2**30, 80 * 2**30)]


def test_latency_quantiles() -> None:
    values = np.linspace(0.001, 0.1, 1000)
    q = latency_quantiles(values)
    assert q is not None
    assert q[0.5] == pytest.approx(np.quantile(values, 0.5))
    assert q[0.99] == pytest.approx(np.quantile(values, 0.99))
    assert latency_quantiles(np.array([])) is None


def serving_exposition(counts: dict[tuple[str, str, str], float]) -> str:
    """What serving's /metrics shows for its request counter (its real client library)."""
    registry = CollectorRegistry()
    c = Counter("modelloop_serving_requests_total", "HTTP requests", ("model", "route", "code"),
                registry=registry)
    for labels, v in counts.items():
        c.labels(*labels).inc(v)
    return generate_latest(registry).decode()


def test_request_counts_sum_routes_and_count_5xx() -> None:
    text = serving_exposition({("churn", "predict", "200"): 90, ("churn", "infer", "503"): 4,
                               ("churn", "predict", "422"): 5, ("churn", "batch", "500"): 1,
                               ("other", "predict", "200"): 7})
    assert parse_request_counts(text) == {"churn": RequestCounts(100, 5), "other": RequestCounts(7, 0)}


def test_error_rate_over_the_window_survives_a_serving_restart() -> None:
    tracker = ErrorRateTracker(None, window_s=60)
    tracker.observe({"m": RequestCounts(100, 0)}, now=0)
    assert tracker.error_rate("m") is None  # one scrape is not a rate
    tracker.observe({"m": RequestCounts(200, 10)}, now=30)
    assert tracker.error_rate("m") == (0.1, 100)
    tracker.observe({"m": RequestCounts(50, 5)}, now=50)  # serving restarted: counters reset
    assert tracker.error_rate("m") == pytest.approx((15 / 150, 150))
    tracker.observe({"m": RequestCounts(50, 5)}, now=200)  # idle: no requests in the window
    assert tracker.error_rate("m") is None


def test_scraping_an_unreachable_serving_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    tracker = ErrorRateTracker("http://127.0.0.1:1/metrics", window_s=60, timeout_s=1)
    assert tracker.scrape() is False and tracker.last_error
    assert ErrorRateTracker(None, 60).scrape() is False
