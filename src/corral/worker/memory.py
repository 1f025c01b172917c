"""A worker's memory policy: pause above one mark, leave above another.

The worker (:mod:`corral.worker.server`) samples its process's resident
memory (RSS) every :data:`MONITOR_INTERVAL` seconds and asks :func:`decide`
what to do, as fractions of its ``memory_limit``:

* above ``pause`` (default 80%): **pause**: start no new task and fetch no
  input; tell the scheduler (``heartbeat.metrics["status"] = "paused"``),
  which stops placing tasks there.  Running tasks go on; results are served.
* below ``pause - RESUME_MARGIN``: **resume**.
* above ``terminate`` (default 95%, only for workers that own their process,
  as started by ``corral worker``): **terminate**: the worker drops its
  scheduler connection without saying goodbye (so the tasks it was running
  count as suspicious and move elsewhere), closes, and its process exits with
  :data:`MEMORY_EXIT_CODE`; a supervisor (``corral worker --nanny``) starts a
  fresh one.

Optionally, above ``spill`` (off by default) results are moved to disk
(:class:`~corral.worker.spill.SpillBuffer`) before any of this happens.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Exit status of a worker process that left because it passed its terminate mark.
MEMORY_EXIT_CODE = 79

#: Seconds between two samples of the process's memory.
MONITOR_INTERVAL = 0.1

#: A paused worker resumes once its memory is this fraction of its limit below
#: the pause mark (so it does not flap around the mark).
RESUME_MARGIN = 0.05

#: Seconds a terminating worker has to close cleanly before its process exits anyway.
TERMINATE_GRACE = 5.0


@dataclass(frozen=True)
class MemoryPolicy:
    """Fractions of the memory limit; ``None`` turns that step off."""

    pause: float | None = 0.8
    terminate: float | None = None
    spill: float | None = None

    def __post_init__(self) -> None:
        for name in ("pause", "terminate", "spill"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1.5:
                raise ValueError(f"memory {name} fraction must be in (0, 1.5], got {value!r}")


def decide(rss: int, limit: int, policy: MemoryPolicy, paused: bool) -> str | None:
    """``"terminate"``, ``"pause"``, ``"resume"`` or ``None`` (nothing to change).

    Pure: the caller measures ``rss`` and acts.  ``limit`` 0 means no limit.
    """
    if limit <= 0:
        return "resume" if paused else None
    used = rss / limit
    if policy.terminate is not None and used >= policy.terminate:
        return "terminate"
    if policy.pause is None:
        return "resume" if paused else None
    if not paused and used >= policy.pause:
        return "pause"
    if paused and used < policy.pause - RESUME_MARGIN:
        return "resume"
    return None
