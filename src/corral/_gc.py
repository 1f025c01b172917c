"""Pausing Python's cyclic garbage collector while a big batch of objects is built.

A client packing a 100,000-task ``map`` creates a few objects per task that
live until their batch is sent.  The collector, counting allocations, runs
hundreds of times meanwhile, promotes those short-lived objects to the oldest
generation and so sets off full collections, each of which walks every object
in the process (all the futures, every imported module): about a third of a
100,000-task ``map`` went there.  Nothing packed forms a reference cycle, so
reference counting frees it all; the collector resumes afterwards.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Disable automatic cyclic collection inside the block, if it was enabled.

    Nested and concurrent uses are safe: only the use that found collection
    enabled turns it back on.  A user who disabled it keeps it disabled.

    Example::

        with paused_gc():
            specs = [make_spec(i) for i in range(100_000)]
    """
    was_enabled = gc.isenabled()
    if was_enabled:
        gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
