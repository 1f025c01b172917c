"""Choosing a worker for a task: filters first, then one cost.

Filters, in order: the worker runs the task's runtime; explicit ``workers=``
restrictions (relaxed with ``allow_other_workers``); membership of every
worker environment the task names (``environment=``: the environment's setup
finished on that worker); resources offered in at least the demanded amount.
Among what is left the cost is the estimated time until the task could start
there: queued work per thread (or, for a task demanding resources, per unit
of the scarcest demanded resource) plus the time to move the input bytes the
worker does not hold.  Every constraint composes because each is just another
filter.

Free tasks (no inputs, no constraints: the roots of a graph, a ``map``) have
no cost but load, so a batch of them is placed as a whole by :func:`plan_runs`:
contiguous runs in priority order, one run per worker, sized to even out the
queued work per thread.  Graph priorities (``dask.order``) put the roots that
feed the same dependents next to each other, so a run keeps them on one
worker; dealing them out one by one would send neighbours to different
workers and make their dependents fetch.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .state import TaskState, WorkerInfo

#: Assumed network bandwidth (bytes/s) when pricing data movement.
BANDWIDTH = 100e6


def offers(worker: WorkerInfo, demand: dict[str, float] | None) -> bool:
    """True if ``worker`` offers every resource in ``demand`` in at least that amount."""
    if not demand:
        return True
    have = worker.resources
    return all(have.get(name, 0) >= amount for name, amount in demand.items())


def member_of(worker: WorkerInfo, environments: list[str] | None) -> bool:
    """True if ``worker`` is a member of every environment in ``environments``."""
    if not environments:
        return True
    have = worker.environments
    return all(name in have for name in environments)


def resolve_workers(idents: Iterable[str], workers: dict[str, WorkerInfo]) -> list[WorkerInfo]:
    """The connected workers named by address, name or host (unknown ones left out)."""
    chosen = []
    for ident in idents:
        ws = workers.get(ident)
        if ws is None:  # a name or bare host instead of an address
            ws = next((w for w in workers.values() if ident in (w.name, w.host)), None)
        if ws is not None:
            chosen.append(ws)
    return chosen


def _restricted(ts: TaskState, workers: dict[str, WorkerInfo]) -> list[WorkerInfo]:
    assert ts.workers is not None
    return resolve_workers(ts.workers, workers)


def candidates(ts: TaskState, workers: dict[str, WorkerInfo]) -> list[WorkerInfo]:
    """Every worker allowed to run ``ts``, whatever its load."""
    pool: Iterable[WorkerInfo] = workers.values()
    if ts.workers:
        restricted = _restricted(ts, workers)
        if restricted or not ts.allow_other_workers:
            pool = restricted
    runtime = ts.runtime or "python"
    envs = ts.environment
    return [
        ws
        for ws in pool
        if ws.runtime == runtime and member_of(ws, envs) and offers(ws, ts.resources)
    ]


def start_cost(ts: TaskState, ws: WorkerInfo) -> float:
    """Estimated seconds before ``ts`` could start on ``ws``."""
    missing = 0
    for dep in ts.deps:
        if ws not in dep.who_has:
            missing += dep.nbytes
    return _queue_time(ts, ws) + missing / BANDWIDTH


def _queue_time(ts: TaskState, ws: WorkerInfo) -> float:
    """Queued work per thread, or per unit of a demanded resource if that is scarcer.

    A worker with many threads but one GPU runs one GPU task at a time: for a
    GPU task its queue is the GPU work assigned to it divided by its GPUs.
    """
    queued = ws.occupancy / ws.nthreads
    if ts.resources:
        occ = ws.resource_occupancy
        for name in ts.resources:
            total = ws.resources.get(name, 0)
            if total > 0:
                queued = max(queued, occ.get(name, 0.0) / total)
    return queued


def choose_worker(ts: TaskState, workers: dict[str, WorkerInfo]) -> WorkerInfo | None:
    """The best worker for ``ts`` now, or ``None`` if no worker may run it."""
    if not workers:
        return None
    if not (ts.workers or ts.resources or ts.runtime or ts.deps or ts.environment):
        # The hot path of a plain ``map``: least loaded Python worker.
        return min(
            (ws for ws in workers.values() if ws.runtime == "python"), key=_load, default=None
        )
    pool = candidates(ts, workers)
    if not pool:
        return None
    if len(pool) == 1:
        return pool[0]
    if ts.deps and len(pool) > 8:
        # Price only the workers holding inputs, plus the least loaded one.
        holders = {ws for dep in ts.deps for ws in dep.who_has}
        near = [ws for ws in pool if ws in holders]
        near.append(min(pool, key=lambda ws: (_queue_time(ts, ws), len(ws.processing))))
        pool = near
    return min(pool, key=lambda ws: (start_cost(ts, ws), len(ws.processing), ws.address))


def _load(ws: WorkerInfo) -> tuple[float, int]:
    return ws.occupancy / ws.nthreads, len(ws.processing)


def is_free(ts: TaskState) -> bool:
    """True if ``ts`` may run on any Python worker and needs no inputs: only load matters."""
    if ts.workers or ts.resources or ts.deps or ts.environment:
        return False
    return ts.runtime is None or ts.runtime == "python"


def plan_runs(
    durations: Sequence[float], workers: dict[str, WorkerInfo]
) -> list[WorkerInfo] | None:
    """Workers for a batch of free tasks (in priority order), in contiguous runs.

    ``durations``: each task's expected duration.  The batch is poured onto
    the least loaded workers until their queued work per thread is level
    (water-filling), and each worker takes the tasks whose midpoints fall in
    its share: the least loaded worker the first run (it starts soonest), the
    next one the following run, and so on.  A single task goes to the least
    loaded worker, as :func:`choose_worker` would send it.  ``None`` if no
    Python worker is connected.
    """
    pool = sorted(
        (ws for ws in workers.values() if ws.runtime == "python"),
        key=lambda ws: (*_load(ws), ws.address),
    )
    if not pool:
        return None
    if len(pool) == 1:
        return [pool[0]] * len(durations)
    work = float(sum(durations))
    if work <= 0.0:  # nothing known about their cost: count tasks instead
        durations = [1.0] * len(durations)
        work = float(len(durations))
    # The level the queues rise to: the largest prefix of the pool (least
    # loaded first) whose workers all stay below it.
    busy = threads = 0.0
    level = 0.0
    used = 0
    for ws in pool:
        if used and ws.occupancy / ws.nthreads >= level:
            break
        busy += ws.occupancy
        threads += ws.nthreads
        level = (work + busy) / threads
        used += 1
    ends = []  # cumulative end of each worker's share of ``work``
    total = 0.0
    for ws in pool[:used]:
        total += max(0.0, level * ws.nthreads - ws.occupancy)
        ends.append(total)
    chosen = []
    w = 0
    done = 0.0
    for d in durations:
        middle = done + d / 2
        while w < used - 1 and middle > ends[w]:
            w += 1
        chosen.append(pool[w])
        done += d
    return chosen


def why_no_worker(
    ts: TaskState,
    workers: dict[str, WorkerInfo],
    environments: Container[str] | None = None,
) -> str:
    """A readable reason why no worker may run ``ts`` (empty if one may).

    ``environments``: the registered worker environments (for a task that
    names one that is not).
    """
    if ts.environment and environments is not None:
        for name in ts.environment:
            if name not in environments:
                return f"needs environment {name!r}; no environment named {name!r} is registered"
    if not workers:
        return "no workers are connected"
    pool = list(workers.values())
    if ts.workers:
        restricted = _restricted(ts, workers)
        if not restricted and not ts.allow_other_workers:
            return f"restricted to workers {ts.workers}, none of which is connected"
        if restricted:
            pool = restricted
    runtime = ts.runtime or "python"
    if not any(ws.runtime == runtime for ws in pool):
        return f"needs runtime {runtime!r}; no worker runs it"
    pool = [ws for ws in pool if ws.runtime == runtime]
    if ts.environment:
        for name in ts.environment:
            if not any(name in ws.environments for ws in pool):
                return f"needs environment {name!r}; no worker is a member"
        members = [ws for ws in pool if member_of(ws, ts.environment)]
        if not members:
            names = ", ".join(repr(n) for n in ts.environment)
            return f"needs environments {names}; no single worker is a member of all of them"
        pool = members
    if ts.resources:
        for name, amount in ts.resources.items():
            best = max((ws.resources.get(name, 0) for ws in pool), default=0)
            if best < amount:
                if best == 0:
                    return f"needs {name}={amount:g}; no worker offers {name}"
                return f"needs {name}={amount:g}; the most any worker offers is {best:g}"
        if not any(offers(ws, ts.resources) for ws in pool):
            wanted = ", ".join(f"{k}={v:g}" for k, v in ts.resources.items())
            return f"needs {wanted}; no single worker offers all of it"
    return ""
