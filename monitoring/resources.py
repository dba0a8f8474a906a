"""CPU and memory of the serving process (by pid or cgroup), and GPUs through NVML.

CPU is a ratio of one core (1.0 = one core busy) from the CPU time consumed between two samples;
memory is resident set size in bytes. A pid target adds its child processes (BentoML's workers);
a cgroup target reads the kernel's accounting (v2 ``cpu.stat``/``memory.current``, or v1
``cpuacct.usage``/``memory.usage_in_bytes``). Without an NVIDIA driver, :class:`GpuSampler`
answers no GPUs and logs that once; it never raises.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessSample:
    cpu_ratio: float | None
    """None on the first sample (a rate needs two)."""
    memory_bytes: float


class ProcessSampler:
    """CPU and RSS of a process and (optionally) its children."""

    def __init__(self, pid: int, include_children: bool = True) -> None:
        self.pid = pid
        self.include_children = include_children
        self._root = psutil.Process(pid)
        self._last: tuple[float, float] | None = None
        # per-process cumulative CPU seconds seen, so a child that exits does not make the total
        # go backwards
        self._seen: dict[int, float] = {}
        self._gone = 0.0

    def sample(self) -> ProcessSample:
        """Raises :class:`psutil.NoSuchProcess` when the target has exited."""
        procs = [self._root]
        if self.include_children:
            with contextlib.suppress(psutil.NoSuchProcess):
                procs += self._root.children(recursive=True)
        now = time.monotonic()
        rss = 0.0
        current: dict[int, float] = {}
        for p in procs:
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    current[p.pid] = t.user + t.system
                    rss += p.memory_info().rss
            except psutil.NoSuchProcess:
                if p is self._root:
                    raise
        for pid, cpu in self._seen.items():
            if pid not in current:
                self._gone += cpu
        self._seen = current
        total = self._gone + sum(current.values())
        ratio = None
        if self._last is not None and now > self._last[0]:
            ratio = max(0.0, (total - self._last[1]) / (now - self._last[0]))
        self._last = (now, total)
        return ProcessSample(cpu_ratio=ratio, memory_bytes=rss)


class CgroupSampler:
    """CPU and memory of a cgroup (a container or a pod) from the kernel's files."""

    def __init__(self, root: Path) -> None:
        root = Path(root)
        if (root / "cpu.stat").exists() and (root / "memory.current").exists():
            self.version = 2
            self._cpu, self._mem = root / "cpu.stat", root / "memory.current"
        elif (root / "cpuacct" / "cpuacct.usage").exists() and (
                root / "memory" / "memory.usage_in_bytes").exists():
            self.version = 1
            self._cpu = root / "cpuacct" / "cpuacct.usage"
            self._mem = root / "memory" / "memory.usage_in_bytes"
        else:
            raise ValueError(f"{root} is not a cgroup directory: no cpu.stat and memory.current "
                             "(v2), nor cpuacct/cpuacct.usage and memory/memory.usage_in_bytes (v1)")
        self.root = root
        self._last: tuple[float, float] | None = None

    def _cpu_seconds(self) -> float:
        text = self._cpu.read_text()
        if self.version == 1:
            return int(text.strip()) / 1e9  # nanoseconds
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) / 1e6
        raise ValueError(f"{self._cpu} has no usage_usec line")

    def sample(self) -> ProcessSample:
        now = time.monotonic()
        cpu = self._cpu_seconds()
        memory = float(int(self._mem.read_text().strip()))
        ratio = None
        if self._last is not None and now > self._last[0]:
            ratio = max(0.0, (cpu - self._last[1]) / (now - self._last[0]))
        self._last = (now, cpu)
        return ProcessSample(cpu_ratio=ratio, memory_bytes=memory)


@dataclass(frozen=True)
class GpuSample:
    index: str
    utilization_ratio: float
    memory_used_bytes: float
    memory_total_bytes: float


class GpuSampler:
    """GPU utilisation and memory through NVML; no GPUs (and one log line) where NVML fails."""

    def __init__(self, nvml: Any | None = None) -> None:
        self._nvml = nvml
        self._handles: list[Any] | None = None
        self.unavailable: str | None = None

    def _init(self) -> list[Any]:
        if self._handles is not None:
            return self._handles
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            self._nvml.nvmlInit()
            count = self._nvml.nvmlDeviceGetCount()
            self._handles = [self._nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...: no GPU here
            self.unavailable = f"{type(exc).__name__}: {exc}"
            log.info("no GPU metrics: NVML is unavailable (%s)", self.unavailable)
            self._handles = []
        return self._handles

    def sample(self) -> list[GpuSample]:
        out: list[GpuSample] = []
        handles = self._init()
        nvml: Any = self._nvml
        for i, handle in enumerate(handles):
            try:
                util = nvml.nvmlDeviceGetUtilizationRates(handle)
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception as exc:  # a GPU that fell off the bus must not stop the sidecar
                log.warning("cannot read GPU %d through NVML: %s", i, exc)
                continue
            out.append(GpuSample(str(i), util.gpu / 100.0, float(mem.used), float(mem.total)))
        return out

    def close(self) -> None:
        if self._handles and self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception as exc:
                log.debug("nvmlShutdown failed: %s", exc)
        self._handles = None
