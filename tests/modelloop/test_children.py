"""A pool child started with :func:`modelloop.children.low_priority_child` ends when its parent
is killed (SIGKILL: no shutdown runs), instead of waiting on its task pipe under init forever."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PARENT = """
import multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from modelloop.children import low_priority_child

if __name__ == "__main__":
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                               initializer=low_priority_child, initargs=(5, os.getpid()))
    child = pool.submit(os.getpid).result()
    niceness = pool.submit(os.nice, 0).result()
    print(child, niceness, flush=True)
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state  # a zombie has ended; only its entry waits for a reaper


def test_the_child_ends_soon_after_its_parent_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    try:
        line = parent.stdout.readline() if parent.stdout else ""
        child, niceness = (int(v) for v in line.split())
        assert niceness == os.nice(0) + 5  # the child runs at lower priority
        assert _alive(child)
        time.sleep(1.5)  # the child lives on while its parent does
        assert _alive(child)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
    deadline = time.monotonic() + 15
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), f"pool child {child} outlived its killed parent"
