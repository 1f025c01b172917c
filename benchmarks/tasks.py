"""Task functions executed on the workers.

They live in an importable module (not in ``__main__``) so that both backends
can ship them by reference.  The runner puts the repository root on
``PYTHONPATH`` before starting a cluster, and worker subprocesses inherit that
environment, so ``benchmarks.tasks`` is importable on every worker.

Keep this module free of heavy imports: NumPy and psutil are imported inside
the functions that need them.
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any


def inc0(x: int) -> int:
    """Return ``x`` unchanged (the no-op task)."""
    return x


def inc(x: int) -> int:
    """Return ``x + 1``."""
    return x + 1


def add(x: int, y: int) -> int:
    """Return ``x + y``."""
    return x + y


def make_array(n_elements: int, seed: int) -> Any:
    """Return a float64 NumPy array of ``n_elements`` uniform random numbers.

    Random rather than constant data so that a transport that compresses
    frames cannot look faster than the bytes it really moves.
    """
    import numpy as np

    return np.random.default_rng(seed).random(n_elements)


def nbytes_of(array: Any) -> int:
    """Return ``array.nbytes`` (the timed task of the transfer workload)."""
    return int(array.nbytes)


def checksum(array: Any) -> int:
    """Return an exact checksum of ``array``'s bytes (wrapping uint64 sum).

    Integer addition is associative, so unlike a float sum the result does
    not depend on the buffer's alignment or on how NumPy blocks the loop.
    """
    import numpy as np

    words = np.ascontiguousarray(array).view(np.uint64)
    return int(words.sum(dtype=np.uint64))


def timed_sleep(duration: float, index: int) -> tuple[int, int, float, float]:
    """Sleep ``duration`` seconds; return ``(index, pid, start, end)``.

    ``start`` and ``end`` come from :func:`time.monotonic`, so they are only
    comparable between tasks that ran in the same worker process (same pid).
    """
    start = time.monotonic()
    time.sleep(duration)
    return index, os.getpid(), start, time.monotonic()


def wait_for_file(path: str, timeout: float) -> bool:
    """Block until ``path`` exists (polling every 10 ms) or ``timeout`` expires.

    Used as the gate of the pending-memory workload: the driver creates the
    file once it has measured memory, which releases the gate promptly
    instead of leaving a long ``sleep`` that would delay cluster shutdown.
    Returns whether the file appeared.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        time.sleep(0.01)
    return False


def gated_identity(x: int, gate: Any = None) -> int:
    """Return ``x``; ``gate`` is a dependency that only orders execution."""
    return x


def process_rss() -> int:
    """Return the resident set size of the calling process, after a GC pass.

    Run through ``client.run_on_scheduler`` to measure the scheduler process.
    """
    import psutil

    gc.collect()
    return int(psutil.Process().memory_info().rss)


def process_id() -> int:
    """Return the pid of the calling process."""
    return os.getpid()


def scheduler_task_count(dask_scheduler: Any = None) -> int | None:
    """Return how many tasks the scheduler holds, when it can be inspected.

    dask.distributed injects its scheduler object into a ``dask_scheduler``
    parameter of a function run with ``run_on_scheduler``; Corral may do the
    same.  When nothing is injected (or the object has no ``tasks`` mapping)
    this returns ``None`` and the caller falls back to other means.
    """
    tasks = getattr(dask_scheduler, "tasks", None)
    if tasks is None:
        return None
    try:
        return len(tasks)
    except TypeError:
        return None
