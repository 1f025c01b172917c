"""The worker's state machine: pure, no IO, no clocks, no threads.

:meth:`WorkerState.handle` takes events (messages from the scheduler, and
results of the IO the worker did) and returns instructions: run a task, fetch
keys from a peer, send a message to the scheduler, drop data.

Task life on a worker::

    waiting -> ready -> executing -> memory | error
       |         \\-> constrained -/        (constrained: waiting for resources)
    dependencies: fetch -> flight -> memory   (missing: no holder left)

A task freed while it runs becomes ``cancelled`` and its result is dropped.
Resources are taken when a task starts executing (not while its inputs are
fetched) and given back when it ends, however it ends.

Every value has a version (:attr:`WTask.version`): 0 for a key's computed
value, the scheduler's number for each scattered one.  A copy of a value the
scheduler replaced since (its key was scattered over) is never used for a task
that names the new one: it is dropped and the current value fetched.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..protocol.messages import (
    AddKeys,
    ComputeTask,
    ErrorInfo,
    Message,
    MissingData,
    SetResources,
    TaskErred,
    TaskFinished,
    UpdateWhoHas,
)
from ..resources import Allocation, ResourcePool

#: Most peers fetched from at once, and most bytes asked of one peer at once.
MAX_GATHERS = 8
GATHER_BYTES = 64 * 1024**2


class WTask:
    """The worker's record of one key: a task to run here or data to fetch."""

    __slots__ = (
        "dependents",
        "deps",
        "held",
        "key",
        "nbytes",
        "priority",
        "resources",
        "spec",
        "state",
        "version",
        "waiting_for",
        "who_has",
    )

    def __init__(self, key: str):
        self.key = key
        self.state = "released"
        self.spec: ComputeTask | None = None
        self.deps: set[WTask] = set()
        self.dependents: set[WTask] = set()
        self.waiting_for: set[WTask] = set()
        self.who_has: set[str] = set()
        self.nbytes = 0
        self.priority: tuple[Any, ...] = ()
        self.resources: dict[str, float] | None = None
        self.held: Allocation | None = None  # indices of indexed resources, while executing
        # The version of the value held (memory), or of the value local tasks want
        # (fetch, flight, missing, cancelled): 0 is the key's computed value, any
        # other number one scattered value (see AddKeys.versions).
        self.version = 0

    def __repr__(self) -> str:
        return f"<WTask {self.key!r} {self.state}>"


# Events (besides scheduler messages) ------------------------------------------------
@dataclass(frozen=True, slots=True)
class ExecuteSuccess:
    """A task returned; its value is in the data store.

    ``reported``: the IO layer already sent the scheduler ``task_finished`` for
    this run (the task thread reports a lone result itself, see
    ``ThreadPool``).  The machine then sends it only if the key was assigned
    again meanwhile (a newer run id): the scheduler ignores a stale report.
    """

    key: str
    run_id: int
    nbytes: int
    typename: str
    start: float
    stop: float
    result: Any = None  # a Payload to send to the scheduler, if asked for
    reported: bool = False


@dataclass(frozen=True, slots=True)
class ExecuteFailure:
    """A task raised."""

    key: str
    run_id: int
    error: ErrorInfo
    start: float
    stop: float


@dataclass(frozen=True, slots=True)
class GatherDone:
    """A fetch from ``peer`` finished: what arrived (key -> nbytes), what it lacked."""

    peer: str
    received: dict[str, int]
    missing: list[str]
    failed: bool = False  # the peer could not be reached at all
    # The version of each value received, as the peer said (``Data.versions``); a
    # value it did not say the version of is taken for the version asked for.
    versions: dict[str, int] | None = None


@dataclass(frozen=True, slots=True)
class DataStored:
    """Data scattered to this worker is now in the store (``versions``: as in ``Store``)."""

    nbytes: dict[str, int]
    versions: dict[str, int] | None = None


@dataclass(frozen=True, slots=True)
class ComputeEvent:
    """The scheduler assigned these tasks."""

    tasks: list[ComputeTask]


@dataclass(frozen=True, slots=True)
class PauseEvent:
    """Memory crossed the pause mark (``paused``) or fell back below it.

    While paused, no task starts and no input is fetched; running tasks,
    frees, serving peers and reports go on.
    """

    paused: bool


@dataclass(frozen=True, slots=True)
class FreeEvent:
    """The scheduler freed these keys."""

    keys: list[str]


def task_finished(ev: ExecuteSuccess, run_id: int) -> TaskFinished:
    """The scheduler's ``task_finished`` for a successful run, as assignment ``run_id``."""
    return TaskFinished(
        key=ev.key,
        run_id=run_id,
        nbytes=ev.nbytes,
        typename=ev.typename,
        start=ev.start,
        stop=ev.stop,
        result=ev.result,
    )


# Instructions ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Execute:
    """Run task ``key`` (its spec is ``spec``) in the thread pool.

    ``held``: the indices of indexed resources the task holds while it runs.
    """

    key: str
    spec: ComputeTask
    held: Allocation | None = None


@dataclass(frozen=True, slots=True)
class Gather:
    """Fetch ``keys`` from ``peer``."""

    peer: str
    keys: list[str]


@dataclass(frozen=True, slots=True)
class SendToScheduler:
    """Send ``msg`` on the scheduler stream."""

    msg: Message


@dataclass(frozen=True, slots=True)
class ReleaseData:
    """Drop these keys from the data store."""

    keys: list[str]


Instruction = Execute | Gather | SendToScheduler | ReleaseData


@dataclass
class _Log:
    entries: deque[tuple[str, str, str]] = field(default_factory=lambda: deque(maxlen=50_000))


class WorkerState:
    """Everything a worker knows about its tasks, and the rules that change it."""

    def __init__(
        self, nthreads: int, resources: dict[str, Any] | None = None, prefetch: int | None = None
    ) -> None:
        self.nthreads = nthreads
        # Tasks handed to the thread pool beyond one per thread, so a thread can
        # start its next task while the event loop reports the last one.  Only
        # tasks without resource demands are prefetched.
        self.prefetch = nthreads if prefetch is None else prefetch
        self.tasks: dict[str, WTask] = {}
        # Amounts, or lists of indices (see corral.resources); the pool's dicts
        # are updated in place.
        self.resource_pool = ResourcePool(resources)
        self.total_resources: dict[str, float] = self.resource_pool.total
        self.available_resources: dict[str, float] = self.resource_pool.available
        self.executing: set[WTask] = set()
        # peer -> keys being fetched, each with the version asked for (what lands is of it)
        self.in_flight: dict[str, dict[WTask, int]] = {}
        self._ready: list[tuple[tuple[Any, ...], int, WTask]] = []
        self._constrained: list[tuple[tuple[Any, ...], int, WTask]] = []
        self._fetch: dict[WTask, None] = {}
        self._order = itertools.count()
        self.paused = False  # memory above the pause mark: start nothing new
        self._out: list[Instruction] = []
        self.log = _Log()

    # -- entry point ---------------------------------------------------------------
    def handle(self, events: Iterable[Any]) -> list[Instruction]:
        """Apply events; return the instructions the IO layer must carry out."""
        for event in events:
            kind = type(event)
            if kind is ComputeEvent:
                self._compute(event.tasks)
            elif kind is ExecuteSuccess:
                self._execute_success(event)
            elif kind is ExecuteFailure:
                self._execute_failure(event)
            elif kind is GatherDone:
                self._gather_done(event)
            elif kind is FreeEvent:
                self._free(event.keys)
            elif kind is DataStored:
                self._stored(event.nbytes, event.versions or {})
            elif kind is UpdateWhoHas:
                self._update_who_has(event.who_has, event.versions or {})
            elif kind is SetResources:
                # Running tasks keep what they hold; nothing new starts until it fits.
                self.resource_pool.update(event.resources)
            elif kind is PauseEvent:
                self.paused = event.paused
            else:
                raise TypeError(f"the worker state has no handler for {kind.__name__}")
        self._ensure_computing()
        self._ensure_fetching()
        out, self._out = self._out, []
        return out

    def _move(self, ts: WTask, finish: str) -> None:
        self.log.entries.append((ts.key, ts.state, finish))
        ts.state = finish

    def story(self, key: str) -> list[tuple[str, str, str]]:
        """Every logged transition of ``key``."""
        return [e for e in self.log.entries if e[0] == key]

    # -- handlers ------------------------------------------------------------------
    def _compute(self, specs: list[ComputeTask]) -> None:
        for spec in specs:
            ts = self.tasks.get(spec.key)
            if ts is None:
                ts = self.tasks[spec.key] = WTask(spec.key)
            elif ts.state == "memory" and ts.version:
                # A copy of scattered data the key held before: the task computes
                # another value.  Run it.
                self._out.append(ReleaseData([ts.key]))
                ts.version = 0
                if ts in self.executing:
                    # Its run from before the data was stored over goes on: it counts.
                    ts.spec = spec
                    self._move(ts, "executing")
                    continue
            elif ts.state in ("executing", "memory", "waiting", "ready", "constrained"):
                if ts.state == "memory":
                    # Already here (fetched earlier): report it as done at once.
                    self._out.append(
                        SendToScheduler(
                            TaskFinished(key=ts.key, run_id=spec.run_id, nbytes=ts.nbytes)
                        )
                    )
                elif ts.spec is not None:
                    ts.spec = spec  # newer run id
                continue
            elif ts.state == "cancelled":
                # Freed while running and now assigned again: let the run count.
                ts.spec = spec
                self._move(ts, "executing")
                continue
            elif ts.state in ("fetch", "flight", "missing"):
                self._fetch.pop(ts, None)
            ts.spec = spec
            ts.priority = tuple(spec.priority)
            ts.resources = spec.resources or None
            ts.waiting_for = set()
            versions = spec.versions or {}
            for dep_key, holders in spec.who_has.items():
                dep = self.tasks.get(dep_key)
                if dep is None:
                    dep = self.tasks[dep_key] = WTask(dep_key)
                dep.dependents.add(ts)
                ts.deps.add(dep)
                dep.nbytes = dep.nbytes or spec.nbytes.get(dep_key, 0)
                version = versions.get(dep_key, 0)
                if dep.state == "memory":
                    if dep.version == version:
                        continue
                    # The copy here is of a value scattered over since: not this one.
                    dep.nbytes = spec.nbytes.get(dep_key, dep.nbytes)
                    self._replace(dep, holders, version)
                elif dep.version != version:
                    # Another value than the one asked for so far: from its own holders.
                    self._retarget(dep, holders, version)
                else:
                    dep.who_has.update(holders)
                ts.waiting_for.add(dep)
                if dep.state == "released" or (dep.state == "missing" and dep.who_has):
                    self._want_fetch(dep)
            if ts.waiting_for:
                self._move(ts, "waiting")
            else:
                self._make_ready(ts)

    def _want_fetch(self, dep: WTask, failed_holder: str = "") -> None:
        if dep.who_has:
            self._move(dep, "fetch")
            self._fetch[dep] = None
        else:
            self._move(dep, "missing")
            self._out.append(SendToScheduler(MissingData(key=dep.key, holder=failed_holder)))

    def _wanted(self, ts: WTask) -> bool:
        """Whether local tasks that have not started yet need ``ts``'s value."""
        return any(d.state in ("waiting", "ready", "constrained") for d in ts.dependents)

    def _replace(self, ts: WTask, holders: Iterable[str], version: int) -> None:
        """Drop the stale value ``ts`` holds and fetch the current one, for the local tasks.

        Tasks that have not started wait for it; started ones took their
        inputs when they were handed to a thread.
        """
        self._out.append(ReleaseData([ts.key]))
        ts.version = version
        ts.who_has = set(holders)
        for dts in ts.dependents:
            if dts.state in ("ready", "constrained"):
                self._move(dts, "waiting")  # their heap entries are skipped
                dts.waiting_for.add(ts)
            elif dts.state == "waiting":
                dts.waiting_for.add(ts)
        self._want_fetch(ts)

    def _retarget(self, ts: WTask, holders: Iterable[str], version: int) -> None:
        """Local tasks want another version of ``ts`` than fetched so far: from ``holders``.

        A fetch in flight goes on; what it brings is dropped (see _gather_done).
        """
        ts.version = version
        ts.who_has = set(holders)
        if ts.state == "fetch" and not ts.who_has:
            del self._fetch[ts]
            self._move(ts, "missing")

    def _make_ready(self, ts: WTask) -> None:
        self._move(ts, "ready")
        heapq.heappush(self._ready, (ts.priority, next(self._order), ts))

    def _execute_success(self, ev: ExecuteSuccess) -> None:
        ts = self._run_ended(ev.key, ev.run_id)
        if ts is None:
            # The IO layer stored the value: drop it unless the key is in memory here.
            current = self.tasks.get(ev.key)
            if current is None or current.state != "memory":
                self._out.append(ReleaseData([ev.key]))
            return
        if ts.state == "cancelled":
            if ts.dependents and ts.version == 0:
                # Local tasks wait for this key (computed elsewhere since): keep
                # the value and tell the scheduler about the copy.
                ts.nbytes = ev.nbytes
                self._move(ts, "memory")
                self._out.append(SendToScheduler(AddKeys(nbytes={ts.key: ts.nbytes}, versions={})))
                self._arrived(ts)
                return
            if ts.dependents:
                # They wait for data scattered over the key, not its computed value.
                self._out.append(ReleaseData([ts.key]))
                self._want_fetch(ts)
                return
            self._forget(ts)
            self._out.append(ReleaseData([ts.key]))
            return
        assert ts.spec is not None  # only assigned tasks run
        ts.nbytes = ev.nbytes
        ts.version = 0
        self._move(ts, "memory")
        if not (ev.reported and ts.spec.run_id == ev.run_id):
            # As the latest assignment, if the key was assigned again mid-run.
            self._out.append(SendToScheduler(task_finished(ev, ts.spec.run_id)))
        self._arrived(ts)

    def _execute_failure(self, ev: ExecuteFailure) -> None:
        ts = self._run_ended(ev.key, ev.run_id)
        if ts is None:
            return
        if ts.state == "cancelled":
            if ts.dependents:
                self._want_fetch(ts)  # local tasks wait for it: fetch it instead
                return
            self._forget(ts)
            return
        assert ts.spec is not None  # only assigned tasks run
        self._move(ts, "error")
        self._out.append(
            SendToScheduler(
                TaskErred(
                    key=ts.key, run_id=ts.spec.run_id, error=ev.error, start=ev.start, stop=ev.stop
                )
            )
        )
        # The scheduler frees errored keys; hold nothing for it meanwhile.
        self._forget(ts)

    def _run_ended(self, key: str, run_id: int) -> WTask | None:
        """Give back the thread and resources of ``key``'s run, however it ended.

        Return its record if the result still matters: ``None`` for a run whose
        record was stored over (scattered data) or dropped while it ran.
        """
        ts = self.tasks.get(key)
        if ts is not None and ts.spec is not None and ts.spec.run_id != run_id:
            # Two runs of the key may be going: one of a record dropped mid-run
            # (stored over, then freed), and the current record's.  Each gives
            # back what it holds.
            for t in self.executing:
                if t is not ts and t.key == key and t.spec is not None and t.spec.run_id == run_id:
                    self._finish_executing(t)
                    return None
        if ts is None or ts not in self.executing:
            ts = next((t for t in self.executing if t.key == key), None)
            if ts is not None:
                self._finish_executing(ts)
            return None
        self._finish_executing(ts)
        return ts if ts.state in ("executing", "cancelled") else None

    def _finish_executing(self, ts: WTask) -> None:
        self.executing.discard(ts)
        if ts.resources:
            self.resource_pool.release(ts.resources, ts.held)
            ts.held = None

    def _arrived(self, ts: WTask) -> None:
        """``ts`` is now in memory here: wake the local tasks that waited for it."""
        for dts in ts.dependents:
            if dts.state == "waiting" and ts in dts.waiting_for:
                dts.waiting_for.discard(ts)
                if not dts.waiting_for:
                    self._make_ready(dts)

    def _gather_done(self, ev: GatherDone) -> None:
        flight = self.in_flight.pop(ev.peer, {})
        arrived = {}
        versions = {}
        for ts, fetched in flight.items():
            got = ev.versions.get(ts.key, fetched) if ev.versions else fetched
            if ts.key in ev.received and ts.state == "flight" and got != ts.version:
                # Not the value local tasks want: they named another since the fetch
                # left, or the peer holds another (its key was scattered over, and
                # the peer has not yet heard, or the scheduler named it before).
                self._out.append(ReleaseData([ts.key]))
                if got != fetched or fetched == ts.version:
                    ts.who_has.discard(ev.peer)  # it does not have the version wanted
                if ts.dependents:
                    self._want_fetch(ts)  # "" blames no holder: where is it now?
                else:
                    self._forget(ts)
            elif ts.key in ev.received and ts.state == "flight":
                ts.nbytes = ev.received[ts.key]
                self._move(ts, "memory")
                arrived[ts.key] = ts.nbytes
                if ts.version:
                    versions[ts.key] = ts.version
                self._arrived(ts)
            elif ts.state == "flight":
                ts.who_has.discard(ev.peer)
                if ts.dependents:
                    self._want_fetch(ts, failed_holder=ev.peer)
                else:
                    self._forget(ts)
            else:
                # Freed, stored or made a task here while in flight.
                if ts.state == "cancelled-flight":
                    self._forget(ts)
                if ts.key in ev.received:
                    # The IO layer stored it: keep it only for a record that wants it.
                    new = self.tasks.get(ts.key)
                    if (
                        new is not None
                        and new.state in ("fetch", "flight", "missing")
                        and new.version == got
                    ):
                        # Wanted again from elsewhere: it is here now.
                        self._fetch.pop(new, None)
                        new.nbytes = ev.received[ts.key]
                        self._move(new, "memory")
                        arrived[new.key] = new.nbytes
                        if new.version:
                            versions[new.key] = new.version
                        self._arrived(new)
                    elif new is None or new.state != "memory":
                        self._out.append(ReleaseData([ts.key]))
        if ev.failed:
            stranded = []
            for ts in self._fetch:
                ts.who_has.discard(ev.peer)
                if not ts.who_has:
                    stranded.append(ts)
            for ts in stranded:  # no holder left: ask the scheduler
                del self._fetch[ts]
                self._want_fetch(ts, failed_holder=ev.peer)
        if arrived:
            # With the version of each (as the scheduler named it): the scheduler
            # takes a copy only of the value the key has now.
            self._out.append(SendToScheduler(AddKeys(nbytes=arrived, versions=versions)))

    def _stored(self, nbytes: dict[str, int], versions: dict[str, int]) -> None:
        for key, n in nbytes.items():
            ts = self.tasks.get(key)
            if ts is None:
                ts = self.tasks[key] = WTask(key)
            self._fetch.pop(ts, None)
            ts.nbytes = n
            ts.version = versions.get(key, 0)
            if ts.state != "memory":
                # A fetch in flight for it finds it in memory and is ignored.
                self._move(ts, "memory")
                self._arrived(ts)
        # The IO layer stored the values before this batch ran: a free earlier in
        # the batch (a scatter over a key held here) must not drop them.
        for i, inst in enumerate(self._out):
            if type(inst) is ReleaseData and not nbytes.keys().isdisjoint(inst.keys):
                self._out[i] = ReleaseData([k for k in inst.keys if k not in nbytes])

    def _update_who_has(self, who_has: dict[str, list[str]], versions: dict[str, int]) -> None:
        """Where the current value of keys is, and its version (keys not listed: 0)."""
        for key, holders in who_has.items():
            ts = self.tasks.get(key)
            if ts is None:
                continue
            version = versions.get(key, 0)
            if ts.state == "memory":
                if ts.version != version:
                    # The copy here is of a value the key no longer has (scattered over).
                    if self._wanted(ts):
                        self._replace(ts, holders, version)
                    else:
                        self._out.append(ReleaseData([key]))
                        self._forget(ts)
                continue
            if ts.state == "flight":
                if ts.version != version:
                    self._retarget(ts, holders, version)
                continue
            if ts.state not in ("missing", "fetch"):
                continue
            ts.version = version
            ts.who_has = set(holders)
            if ts.state == "missing" and holders:
                self._move(ts, "fetch")
                self._fetch[ts] = None
            elif ts.state == "fetch" and not holders:
                del self._fetch[ts]
                self._move(ts, "missing")

    def _free(self, keys: list[str]) -> None:
        dropped = []
        held: dict[WTask, None] = {}
        for key in keys:
            ts = self.tasks.get(key)
            if ts is None:
                continue
            if ts.state == "memory":
                held[ts] = None  # after the tasks freed with it, which may be what needs it
                continue
            if ts.state == "executing":
                self._move(ts, "cancelled")
                continue
            if ts.state == "cancelled":
                continue  # freed before: its run still holds a thread
            if ts.state == "flight":
                self._move(ts, "cancelled-flight")
                del self.tasks[key]
                continue
            self._fetch.pop(ts, None)
            self._forget(ts)
        for ts in held:
            if self._wanted(ts):
                # Local tasks that have not started still need it: the scheduler
                # replaced the value (a scatter over the key).  Ask where it is now.
                self._replace(ts, (), ts.version)
                continue
            dropped.append(ts.key)
            self._forget(ts)
        if dropped:
            self._out.append(ReleaseData(dropped))

    def _forget(self, ts: WTask) -> None:
        """Remove ``ts``'s record, and inputs fetched only for it that are not in memory."""
        if self.tasks.get(ts.key) is ts:
            del self.tasks[ts.key]
        if ts.state not in ("cancelled", "cancelled-flight"):
            self._move(ts, "forgotten")
        for dep in ts.deps:
            dep.dependents.discard(ts)
            if not dep.dependents and dep.state in ("fetch", "missing"):
                self._fetch.pop(dep, None)
                self._forget(dep)
        ts.deps = set()

    # -- choosing what to do next --------------------------------------------------
    def _fits(self, ts: WTask) -> bool:
        return not ts.resources or self.resource_pool.fits(ts.resources)

    @property
    def queued(self) -> int:
        """Tasks ready to run but not yet handed to a thread."""
        return len(self._ready) + len(self._constrained)

    def _ensure_computing(self) -> None:
        if self.paused:
            return
        while True:
            running = len(self.executing)
            if running >= self.nthreads + self.prefetch:
                return
            ts = self._next_runnable(prefetching=running >= self.nthreads)
            if ts is None:
                return
            if ts.resources:
                ts.held = self.resource_pool.acquire(ts.resources) or None
            self._move(ts, "executing")
            self.executing.add(ts)
            assert ts.spec is not None
            self._out.append(Execute(ts.key, ts.spec, ts.held))

    def _next_runnable(self, prefetching: bool) -> WTask | None:
        # Resource-constrained tasks first (they are older); never oversubscribe.
        while self._constrained and not prefetching:
            _, _, ts = self._constrained[0]
            if ts.state != "constrained":
                heapq.heappop(self._constrained)
                continue
            if not self._fits(ts):
                break
            heapq.heappop(self._constrained)
            return ts
        while self._ready:
            ts = self._ready[0][2]
            if ts.state == "ready" and prefetching and ts.resources:
                return None
            prio, order, ts = heapq.heappop(self._ready)
            if ts.state != "ready":
                continue
            if self._fits(ts):
                return ts
            self._move(ts, "constrained")
            heapq.heappush(self._constrained, (prio, order, ts))
        return None

    def _ensure_fetching(self) -> None:
        if self.paused:
            return  # fetching brings more data into memory
        if not self._fetch or len(self.in_flight) >= MAX_GATHERS:
            return
        per_peer: dict[str, list[WTask]] = {}
        for ts in self._fetch:
            if not ts.who_has:
                continue
            busy = [p for p in ts.who_has if p in self.in_flight]
            free = sorted(p for p in ts.who_has if p not in self.in_flight)
            peer = free[0] if free else sorted(busy)[0]
            if peer in self.in_flight:
                continue
            per_peer.setdefault(peer, []).append(ts)
        for peer, wanted in per_peer.items():
            if len(self.in_flight) >= MAX_GATHERS:
                break
            batch: list[WTask] = []
            total = 0
            for ts in sorted(wanted, key=lambda t: t.priority):
                if batch and total + ts.nbytes > GATHER_BYTES:
                    break
                batch.append(ts)
                total += ts.nbytes
            for ts in batch:
                del self._fetch[ts]
                self._move(ts, "flight")
            self.in_flight[peer] = {ts: ts.version for ts in batch}
            self._out.append(Gather(peer, [ts.key for ts in batch]))

    # -- invariants ----------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``AssertionError`` if an invariant is broken."""
        for ts in self.executing:
            # memory: data was stored for it while it ran; forgotten: then freed
            assert ts.state in ("executing", "cancelled", "memory", "forgotten"), ts
        # No resource oversubscribed, no index held past its capacity.
        self.resource_pool.validate([(ts.resources or {}, ts.held) for ts in self.executing])
        assert len(self.executing) <= self.nthreads + self.prefetch
        for ts in self.tasks.values():
            if ts.state == "waiting":
                assert ts.waiting_for, ts
                for dep in ts.waiting_for:
                    assert dep.state in ("fetch", "flight", "missing", "cancelled"), (ts, dep)
            if ts.state == "fetch":
                assert ts in self._fetch, ts
                assert ts.who_has, f"{ts} to fetch from nobody"
