"""Child processes that must not outlive the process that started them.

The explanation process of a serving worker (serving/explain.py) and the sidecar's importance
process (monitoring/importance.py) are ``ProcessPoolExecutor`` workers started with ``spawn``.
Such a worker waits for its next task on a pipe whose write end it holds itself, so when its
parent dies without shutting the pool down (SIGKILL, an OOM kill, a SIGTERM that ends the
interpreter while a task runs) the pipe never reaches end-of-file and the child, half a gigabyte
with shap and ONNX Runtime loaded, lives on under init. :func:`low_priority_child` is their
``initializer``: it lowers the child's priority and starts a thread that ends the child once its
parent is gone::

    ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                        initializer=low_priority_child, initargs=(10, os.getpid()))
"""

from __future__ import annotations

import os
import threading
import time

POLL_S = 1.0


def low_priority_child(nice: int, parent_pid: int) -> None:
    """Raise the child's niceness by ``nice``; exit it (status 0) within :data:`POLL_S` of its
    parent ``parent_pid`` ending."""
    os.nice(nice)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), name="exit-with-parent",
                     daemon=True).start()


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(POLL_S)
    os._exit(0)  # the parent is gone: nobody will read what this process would answer
