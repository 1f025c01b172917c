"""The scheduler's state machine: pure, no IO, no clocks, no threads.

:meth:`SchedulerState.handle` takes the messages that arrived from one peer
(or an internal event such as a worker leaving) and returns the messages to
send, grouped by recipient id (a worker address or a client id).  The IO
layer (:mod:`corral.scheduler.server`) only moves bytes.

Task states::

    released -> waiting -> processing -> memory
                  |  \\-> no-worker -/     \\-> erred
                  \\-> erred

``released`` tasks keep their record (and so their lineage) while a
dependent record exists; ``forgotten`` tasks are removed.  Handlers only mark
tasks ready; one batched pass at the end of each stimulus places them.
"""

from __future__ import annotations

import itertools
import re
import sys
from collections import deque
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

from ..protocol.messages import (
    AddKeys,
    CancelKeys,
    Compute,
    ComputeTask,
    EnvironmentStatus,
    ErrorInfo,
    FreeKeys,
    KeyCancelled,
    KeyErred,
    KeyInMemory,
    KeyLost,
    Message,
    MissingData,
    RegisterWorker,
    ReleaseKeys,
    Scatter,
    SetResources,
    Store,
    TaskErred,
    TaskFinished,
    UpdateGraph,
    UpdateWhoHas,
)
from ..protocol.serialize import Payload
from ..resources import resource_amounts, validate_resources
from . import placement

#: state -> states it may move to; anything else is a bug and raises at once.
TRANSITIONS: dict[str, frozenset[str]] = {
    "released": frozenset({"waiting", "memory", "erred", "forgotten"}),
    "waiting": frozenset({"processing", "no-worker", "erred", "released", "memory"}),
    "no-worker": frozenset({"processing", "erred", "released", "waiting", "memory"}),
    "processing": frozenset({"memory", "erred", "released", "waiting", "no-worker"}),
    "memory": frozenset({"released", "memory"}),
    "erred": frozenset({"released"}),
}

_PENDING = frozenset({"waiting", "no-worker", "processing"})

DEFAULT_DURATION = 0.5  # seconds assumed for a task prefix never seen finishing

_NONE: frozenset[Any] = frozenset()


def _grow(items: AbstractSet[Any], item: Any) -> set[Any]:
    """Add ``item`` to a task's lazily created set and return the set to keep."""
    if type(items) is set:
        items.add(item)
        return items
    return {*items, item}


def _shrink(items: AbstractSet[Any], item: Any) -> AbstractSet[Any]:
    """Remove ``item`` from a task's lazily created set; return the set to keep."""
    if type(items) is set:
        items.discard(item)
        return items
    if item in items:  # a shared frozen singleton (see TaskState.alone)
        return _NONE if len(items) == 1 else set(items) - {item}
    return items


class InvalidTransition(RuntimeError):
    """A transition not in :data:`TRANSITIONS` was attempted."""

    def __init__(self, key: str, start: str, finish: str):
        super().__init__(f"illegal transition of {key!r}: {start} -> {finish}")


class TaskState:
    """The scheduler's record of one task."""

    __slots__ = (
        "_alone",
        "allow_other_workers",
        "args",
        "dependents",
        "deps",
        "duration",
        "environment",
        "error",
        "fn",
        "holds",
        "key",
        "nbytes",
        "needs",
        "prefix",
        "priority",
        "processing_on",
        "resources",
        "retries",
        "run_id",
        "runtime",
        "state",
        "suspicious",
        "typename",
        "version",
        "waiters",
        "waiting_on",
        "who_has",
        "who_wants",
        "workers",
    )

    def __init__(self, key: str, args: Payload | None = None, fn: str | None = None):
        self.key = key
        self.state = "released"
        self.args = args
        self.fn = fn
        self.needs: list[str] | None = None
        self.deps: tuple[TaskState, ...] = ()
        # The five sets start as the shared empty frozenset and become real sets
        # on their first item (see _grow): most of a big graph's tasks sit
        # pending with most of them empty, and an empty set costs 216 bytes.
        self.dependents: AbstractSet[TaskState] = _NONE
        self.waiting_on: AbstractSet[TaskState] = _NONE
        self.waiters: AbstractSet[TaskState] = _NONE
        self.who_has: AbstractSet[WorkerInfo] = _NONE
        self.who_wants: AbstractSet[str] = _NONE
        self.processing_on: WorkerInfo | None = None
        self.priority: tuple[Any, ...] = ()
        self.resources: dict[str, float] | None = None
        self.workers: list[str] | None = None
        self.allow_other_workers = False
        self.retries = 0
        self.suspicious = 0
        self.run_id = 0
        self.nbytes = 0
        self.duration = 0.0
        self.error: ErrorInfo | None = None
        self.typename: str | None = None
        self.runtime: str | None = None
        self.environment: list[str] | None = None
        self.prefix = key_prefix(key)
        self._alone: frozenset[TaskState] | None = None
        self.holds = 0  # open parts of graphs being sent that keep this task (UpdateGraph.hold)
        # Which value the key has: 0 for its computed value (every run of a key
        # computes the same value), a number of its own for each scatter.  Workers
        # echo it with the copies they report (AddKeys.versions), so a copy of a
        # value scattered over since is never taken for the current one.
        self.version = 0

    def alone(self) -> frozenset[TaskState]:
        """A frozen set holding just this task, shared by every dependent waiting on it alone.

        Many tasks waiting on one input (a map over a gate, a fan-out) then
        share one set instead of holding 216 bytes each.
        """
        if self._alone is None:
            self._alone = frozenset((self,))
        return self._alone

    def functions_used(self) -> list[str]:
        """Ids of the function payloads this task needs on its worker."""
        used = [self.fn] if self.fn is not None else []
        if self.needs:
            used.extend(self.needs)
        return used

    def __repr__(self) -> str:
        return f"<Task {self.key!r} {self.state}>"


class WorkerInfo:
    """The scheduler's record of one connected worker."""

    __slots__ = (
        "address",
        "environments",
        "has_what",
        "host",
        "memory_limit",
        "metrics",
        "name",
        "nbytes",
        "nthreads",
        "occupancy",
        "pid",
        "processing",
        "resource_occupancy",
        "resources",
        "runtime",
        "status",
        "versions",
    )

    def __init__(self, reg: RegisterWorker):
        self.address = reg.address
        self.name = reg.name if reg.name is not None else reg.address
        self.host = reg.address.split("://")[-1].rsplit(":", 1)[0]
        self.nthreads = max(1, reg.nthreads)
        self.memory_limit = reg.memory_limit
        self.resources: dict[str, Any] = dict(reg.resources)
        self.runtime = reg.runtime
        self.pid = reg.pid
        self.versions = reg.versions or {}
        self.processing: set[TaskState] = set()
        self.has_what: set[TaskState] = set()
        self.occupancy = 0.0
        # resource name -> sum of (expected duration x amount) of tasks processing here
        self.resource_occupancy: dict[str, float] = {}
        self.nbytes = 0
        self.metrics: dict[str, Any] = {}
        # "running", or "paused" (memory above its pause mark): no new tasks go there.
        self.status = "running"
        # Worker environments this worker is a member of (its setup finished there).
        self.environments: set[str] = set()

    def __repr__(self) -> str:
        return f"<Worker {self.address} processing={len(self.processing)}>"


_PREFIX = re.compile(r"""\(?['"]?([^-',"() ]*)""")


def key_prefix(key: str) -> str:
    """The group a key belongs to: ``inc-1a2b`` -> ``inc``, ``('x', 0)`` -> ``x``."""
    match = _PREFIX.match(key)
    # Interned: every task of a map shares its prefix, so one copy serves all.
    return sys.intern((match.group(1) if match else "") or key)


# Internal events produced by the IO layer -------------------------------------------
@dataclass(frozen=True, slots=True)
class ClientJoined:
    """A client completed its handshake."""

    client: str


@dataclass(frozen=True, slots=True)
class ClientLeft:
    """A client's connection closed."""

    client: str


@dataclass(frozen=True, slots=True)
class WorkerLeft:
    """A worker's connection closed (``expected`` when it said goodbye first)."""

    address: str
    expected: bool = False


#: What a worker may report as its status (``heartbeat.metrics["status"]``).
WORKER_STATUSES = frozenset({"running", "paused"})


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """A worker paused (its memory is above its pause mark) or runs again."""

    address: str
    status: str  # one of WORKER_STATUSES


@dataclass(frozen=True, slots=True)
class EnvironmentRegistered:
    """A worker environment was registered (or replaced: members of the old one are dropped)."""

    name: str
    registration: str


@dataclass(frozen=True, slots=True)
class EnvironmentUnregistered:
    """A worker environment was unregistered: no worker is a member any more."""

    name: str


class SchedulerState:
    """All of the scheduler's knowledge, and the rules that change it."""

    def __init__(self, allowed_failures: int = 3, log_length: int = 100_000) -> None:
        self.tasks: dict[str, TaskState] = {}
        self.workers: dict[str, WorkerInfo] = {}
        self.clients: dict[str, set[TaskState]] = {}
        self.functions: dict[str, Payload] = {}
        self.function_refs: dict[str, int] = {}
        self.unrunnable: dict[TaskState, None] = {}
        self.paused: set[str] = set()  # addresses of paused workers (memory)
        # client -> frozenset({client}): what ``who_wants`` holds for the (usual)
        # task wanted by one client, shared instead of a set per task.
        self._only_client: dict[str, frozenset[str]] = {}
        # (client, hold id) -> tasks kept for a graph still arriving in parts.
        self._holds: dict[tuple[str, str], list[TaskState]] = {}
        # Registered worker environments: name -> current registration id.
        self.environments: dict[str, str] = {}
        self.allowed_failures = allowed_failures
        self.durations: dict[str, float] = {}
        # Occupancy bookkeeping per key prefix, for prefixes with tasks processing:
        # the duration every such task counts for in its worker's occupancy, and
        # how many run on each worker.  When the measured duration drifts far
        # from that estimate, every worker's occupancy is corrected at once
        # (see _learn_duration): estimates made before a prefix ever finished,
        # or from the slow first runs on fresh workers, would otherwise weigh
        # on placement until the last task assigned under them finishes.
        self._estimates: dict[str, float] = {}
        self._running: dict[str, dict[WorkerInfo, int]] = {}
        self.transition_log: deque[tuple[str, str, str, str]] = deque(maxlen=log_length)
        self.transition_counter = 0
        self._ready: list[TaskState] = []
        self._outbox: dict[str, list[Message]] = {}
        self._compute: dict[WorkerInfo, list[ComputeTask]] = {}
        self._stimulus = ""
        self._stimulus_ids = itertools.count()
        # Run ids are unique across records, so a late report of a run freed
        # before its key was submitted again never passes for the new run.
        self._run_ids = itertools.count(1)
        # Versions of scattered values (TaskState.version): unique across records too.
        self._versions = itertools.count(1)
        self._handlers: dict[type, Callable[[str, Any], None]] = {
            UpdateGraph: self._update_graph,
            TaskFinished: self._task_finished,
            TaskErred: self._task_erred,
            ReleaseKeys: self._release_keys,
            CancelKeys: self._cancel_keys,
            AddKeys: self._add_keys,
            MissingData: self._missing_data,
            RegisterWorker: self._worker_joined,
            WorkerLeft: self._worker_left,
            ClientJoined: self._client_joined,
            ClientLeft: self._client_left,
            SetResources: self._set_resources,
            Scatter: self._scatter,
            EnvironmentRegistered: self._environment_registered,
            EnvironmentUnregistered: self._environment_unregistered,
            EnvironmentStatus: self._environment_status,
            WorkerStatus: self._worker_status,
        }

    # -- entry point ---------------------------------------------------------------
    def handle(self, source: str, events: Iterable[Any]) -> dict[str, list[Message]]:
        """Apply ``events`` that came from ``source``; return messages by recipient."""
        for event in events:
            handler = self._handlers.get(type(event))
            if handler is None:
                raise TypeError(f"the scheduler state has no handler for {type(event).__name__}")
            self._stimulus = f"{type(event).__name__}-{next(self._stimulus_ids)}"
            handler(source, event)
        self._schedule()
        out, self._outbox = self._outbox, {}
        return out

    def _send(self, to: str, msg: Message) -> None:
        box = self._outbox.get(to)
        if box is None:
            self._outbox[to] = [msg]
        else:
            box.append(msg)

    def _free(self, worker: str, key: str) -> None:
        """Tell ``worker`` to forget ``key``; consecutive frees share one message."""
        box = self._outbox.get(worker)
        if box and type(box[-1]) is FreeKeys:
            box[-1].keys.append(key)
        else:
            self._send(worker, FreeKeys(keys=[key]))

    def _move(self, ts: TaskState, finish: str) -> None:
        start = ts.state
        if finish not in TRANSITIONS[start]:
            raise InvalidTransition(ts.key, start, finish)
        ts.state = finish
        self.transition_counter += 1
        self.transition_log.append((ts.key, start, finish, self._stimulus))

    def story(self, key: str) -> list[tuple[str, str, str, str]]:
        """Every logged transition of ``key``: ``(key, start, finish, stimulus_id)``."""
        return [t for t in self.transition_log if t[0] == key]

    # -- clients -------------------------------------------------------------------
    def _client_joined(self, client: str, event: ClientJoined) -> None:
        self.clients.setdefault(event.client, set())

    def _client_left(self, client: str, event: ClientLeft) -> None:
        self._only_client.pop(event.client, None)
        for hold in [h for h in self._holds if h[0] == event.client]:
            self._drop_hold(hold)
        wanted = self.clients.pop(event.client, set())
        for ts in wanted:
            ts.who_wants = _shrink(ts.who_wants, event.client)
        for ts in wanted:
            self._release_if_unneeded(ts)

    def _want(self, ts: TaskState, client: str) -> None:
        if ts.who_wants:
            ts.who_wants = _grow(ts.who_wants, client)
        else:
            only = self._only_client.get(client)
            if only is None:
                only = self._only_client[client] = frozenset((client,))
            ts.who_wants = only

    def _update_graph(self, client: str, msg: UpdateGraph) -> None:
        wanted = self.clients.setdefault(client, set())
        for fid, payload in msg.functions.items():
            self.functions.setdefault(fid, payload)
        new: list[tuple[TaskState, list[str]]] = []
        invalid: list[tuple[TaskState, ErrorInfo]] = []
        for spec in msg.tasks:
            if spec.key in self.tasks:
                continue
            ts = TaskState(spec.key, spec.args, spec.fn)
            ts.priority = tuple(spec.priority)
            ts.resources = spec.resources or None
            if ts.resources:
                try:
                    validate_resources(ts.resources, f"resources of task {spec.key!r}")
                except ValueError as exc:
                    invalid.append((ts, ErrorInfo(typename="ValueError", message=str(exc))))
                    ts.resources = None
            ts.workers = spec.workers or None
            ts.allow_other_workers = spec.allow_other_workers
            ts.retries = spec.retries
            ts.runtime = spec.runtime
            ts.environment = list(dict.fromkeys(spec.environment)) if spec.environment else None
            self.tasks[spec.key] = ts
            ts.needs = spec.needs or None
            for fid in ts.functions_used():
                self.function_refs[fid] = self.function_refs.get(fid, 0) + 1
                if fid not in self.functions:
                    message = f"function {fid} of task {spec.key!r} was never sent"
                    invalid.append((ts, ErrorInfo(typename="ValueError", message=message)))
            new.append((ts, spec.deps))
        missing_deps: list[tuple[TaskState, str]] = []
        for ts, dep_keys in new:
            deps = []
            for dk in dep_keys:
                dep = self.tasks.get(dk)
                if dep is None:
                    missing_deps.append((ts, dk))
                    continue
                deps.append(dep)
                dep.dependents = _grow(dep.dependents, ts)
            ts.deps = tuple(deps)
        # A task with an unknown input can never run, nor can anything built on
        # it: their records are dropped (no later graph may run them without the
        # input) and the clients that want them get the error.
        doomed: dict[str, ErrorInfo] = {}
        orphans: list[TaskState] = []
        for ts, dk in missing_deps:
            stack = [ts]
            err = ErrorInfo(
                typename="CancelledError",
                message=f"dependency {dk!r} of {ts.key!r} is unknown to the scheduler "
                "(its future was released or cancelled)",
            )
            while stack:
                t = stack.pop()
                if t.key not in doomed:
                    doomed[t.key] = err
                    orphans.append(t)
                    stack.extend(t.dependents)
        # Invalid tasks (bad resource demands, a function never sent) doom the same way.
        for bad, err in invalid:
            stack = [bad]
            while stack:
                t = stack.pop()
                if t.key not in doomed:
                    doomed[t.key] = err
                    orphans.append(t)
                    stack.extend(t.dependents)
        for key in msg.wanted:
            if key in doomed:
                self._send(client, KeyErred(key=key, error=doomed[key]))
                continue
            wanted_ts = self.tasks.get(key)
            if wanted_ts is None:
                self._send(client, KeyCancelled(key=key, reason="unknown key", lost=True))
                continue
            ts = wanted_ts
            self._want(ts, client)
            wanted.add(ts)
            if ts.state == "released":
                self._make_waiting(ts)
            elif ts.state == "memory":
                self._send(client, self._in_memory_message(ts, None))
            elif ts.state == "erred":
                assert ts.error is not None
                self._send(client, KeyErred(key=ts.key, error=ts.error))
        for ts in orphans:
            ts.dependents = _NONE  # all doomed too
        for ts in orphans:
            self._forget_if_unneeded(ts)
        if msg.hold is not None and msg.more:
            self._hold(client, msg.hold, [spec.key for spec in msg.tasks if spec.key not in doomed])
        for ts, _ in new:
            if ts.state == "released":
                self._forget_if_unneeded(ts)
        if msg.hold is not None and not msg.more:
            self._drop_hold((client, msg.hold))

    def _hold(self, client: str, hold: str, keys: list[str]) -> None:
        """Compute and keep these tasks: the rest of their graph is on its way.

        Its first parts start running while the client still packs the rest;
        nothing is released before the last part says what is wanted.
        """
        held = self._holds.setdefault((client, hold), [])
        for key in keys:
            ts = self.tasks.get(key)
            if ts is None:
                continue
            ts.holds += 1
            held.append(ts)
            if ts.state == "released":
                self._make_waiting(ts)

    def _drop_hold(self, hold: tuple[str, str]) -> None:
        held = self._holds.pop(hold, [])
        for ts in held:
            ts.holds -= 1
        for ts in held:
            self._release_if_unneeded(ts)

    def _release_keys(self, client: str, msg: ReleaseKeys) -> None:
        wanted = self.clients.get(client, set())
        for key in msg.keys:
            ts = self.tasks.get(key)
            if ts is None or client not in ts.who_wants:
                continue
            ts.who_wants = _shrink(ts.who_wants, client)
            wanted.discard(ts)
            self._release_if_unneeded(ts)

    def _cancel_keys(self, client: str, msg: CancelKeys) -> None:
        doomed: dict[TaskState, None] = {}
        stack = [self.tasks[k] for k in msg.keys if k in self.tasks]
        while stack:
            ts = stack.pop()
            if ts in doomed:
                continue
            doomed[ts] = None
            stack.extend(dts for dts in ts.dependents if dts.state != "memory")
        for ts in doomed:
            for c in ts.who_wants:
                self._send(c, KeyCancelled(key=ts.key, reason="cancelled"))
                self.clients.get(c, set()).discard(ts)
            ts.who_wants = _NONE
        for ts in doomed:
            self._release_if_unneeded(ts)

    def _scatter(self, client: str, msg: Scatter) -> None:
        if msg.workers:
            pool = placement.resolve_workers(msg.workers, self.workers)
        else:
            pool = list(self.workers.values())
            running = [ws for ws in pool if ws.status == "running"]
            pool = running or pool  # not onto paused workers while others run
        if not pool:
            return  # the IO layer answers the request with an error before calling us
        wanted = self.clients.setdefault(client, set())
        for key, payload in msg.data.items():
            if msg.broadcast:
                targets = pool
            else:
                targets = [min(pool, key=lambda ws: (ws.nbytes, len(ws.has_what)))]
            ts = self.tasks.get(key)
            if ts is None:
                ts = self.tasks[key] = TaskState(key)
            elif ts.state != "released":
                self._release_data(ts)
                self._take_back(ts)
                if ts.state != "released":
                    self._move(ts, "released")
            ts.nbytes = msg.nbytes.get(key, 0)
            # A new value: copies of the old one still travelling must not pass for it.
            ts.version = next(self._versions)
            for ws in targets:
                self._send(ws.address, Store(data={key: payload}, versions={key: ts.version}))
                self._add_replica(ts, ws)
            self._move(ts, "memory")
            self._want(ts, client)
            wanted.add(ts)
            # Over a pending key: its dependents have it now, and it needs no inputs.
            ts.waiting_on = _NONE
            for dts in ts.dependents:
                if dts.state == "waiting" and ts in dts.waiting_on:
                    dts.waiting_on = _shrink(dts.waiting_on, ts)
                    if not dts.waiting_on:
                        self._ready.append(dts)
            for dep in ts.deps:
                if ts in dep.waiters:
                    dep.waiters = _shrink(dep.waiters, ts)
                    self._release_if_unneeded(dep)

    # -- workers -------------------------------------------------------------------
    def _worker_joined(self, source: str, reg: RegisterWorker) -> None:
        self.workers[reg.address] = WorkerInfo(reg)
        self._retry_unrunnable()

    def _retry_unrunnable(self) -> None:
        """Give every ``no-worker`` task another placement attempt."""
        if self.unrunnable:
            self._ready.extend(self.unrunnable)
            for ts in self.unrunnable:
                self._move(ts, "waiting")
            self.unrunnable.clear()

    def _set_resources(self, source: str, msg: SetResources) -> None:
        """A worker's resources changed (it told us, or a client asked: then tell it).

        The IO layer has validated ``msg``.  Tasks processing on the worker that
        it no longer offers enough for are taken back (a run in progress goes
        on holding its resources there; its result is dropped) and placed again.
        """
        if msg.worker is None:
            ws = self.workers.get(source)
        else:
            ws = self.workers.get(msg.worker)
            if ws is not None:
                self._send(ws.address, SetResources(resources=msg.resources))
        if ws is None:
            return
        ws.resources.update(resource_amounts(msg.resources))
        unfit = [t for t in ws.processing if t.resources and not placement.offers(ws, t.resources)]
        for ts in unfit:
            self._unassign(ts)
            self._free(ws.address, ts.key)
            self._move(ts, "waiting")
            self._ready.append(ts)
        self._retry_unrunnable()

    # -- worker environments -------------------------------------------------------
    def _environment_registered(self, source: str, event: EnvironmentRegistered) -> None:
        """A new registration: members of a replaced one wait for the new setup."""
        self.environments[event.name] = event.registration
        self._drop_membership(event.name, list(self.workers.values()))

    def _environment_unregistered(self, source: str, event: EnvironmentUnregistered) -> None:
        self.environments.pop(event.name, None)
        self._drop_membership(event.name, list(self.workers.values()))

    def _environment_status(self, source: str, msg: EnvironmentStatus) -> None:
        """A worker joined an environment (its setup finished) or left it."""
        ws = self.workers.get(source)
        if ws is None or self.environments.get(msg.name) != msg.registration:
            return  # a status of a replaced or unregistered registration
        if msg.member:
            if msg.name not in ws.environments:
                ws.environments.add(msg.name)
                self._retry_unrunnable()
        else:
            self._drop_membership(msg.name, [ws])

    def _drop_membership(self, name: str, workers: list[WorkerInfo]) -> None:
        """``workers`` are no longer members of ``name``: tasks queued there that need it move."""
        for ws in workers:
            if name not in ws.environments:
                continue
            ws.environments.discard(name)
            # As for resources: a run already going on there goes on, its result dropped.
            unfit = [t for t in ws.processing if t.environment and name in t.environment]
            for ts in unfit:
                self._unassign(ts)
                self._free(ws.address, ts.key)
                self._move(ts, "waiting")
                self._ready.append(ts)

    def _worker_status(self, source: str, event: WorkerStatus) -> None:
        """A worker paused (no new tasks are placed there) or runs again.

        Tasks already queued there stay: the worker starts them once it runs
        again, or they move elsewhere if it dies.
        """
        ws = self.workers.get(event.address)
        if ws is None or event.status not in WORKER_STATUSES or ws.status == event.status:
            return
        ws.status = event.status
        if event.status == "paused":
            self.paused.add(ws.address)
        else:
            self.paused.discard(ws.address)
            self._retry_unrunnable()

    def _worker_left(self, source: str, event: WorkerLeft) -> None:
        self.paused.discard(event.address)
        ws = self.workers.pop(event.address, None)
        if ws is None:
            return
        for ts in list(ws.processing):
            if ts.processing_on is not ws:
                continue  # released meanwhile (only for a task that failed above)
            self._unassign(ts)
            if not event.expected:
                ts.suspicious += 1
            if ts.suspicious >= self.allowed_failures:
                self._fail(
                    ts,
                    ErrorInfo(
                        typename="KilledWorker",
                        message=(
                            f"task {ts.key!r} was running on {ts.suspicious} workers that "
                            f"died while running it; the last was {ws.address}"
                        ),
                    ),
                )
            else:
                self._requeue(ts)
        for ts in list(ws.has_what):
            if ws not in ts.who_has:
                continue  # released meanwhile (an input of a task that failed above)
            ts.who_has = _shrink(ts.who_has, ws)
            if not ts.who_has:
                self._lost(ts)
        ws.has_what.clear()
        ws.processing.clear()

    def _requeue(self, ts: TaskState) -> None:
        """Put a task whose worker went away back to waiting on whatever is missing."""
        self._move(ts, "waiting")
        ts.waiting_on = {dep for dep in ts.deps if dep.state != "memory"}
        for dep in ts.waiting_on:
            if dep.state == "released":
                self._make_waiting(dep)
        if not ts.waiting_on:
            self._ready.append(ts)

    def _lost(self, ts: TaskState) -> None:
        """Every copy of a task's result is gone."""
        ts.nbytes = 0
        self._move(ts, "released")
        needed = bool(ts.who_wants or ts.waiters)
        for dts in ts.dependents:
            if dts.state == "processing":
                # Its input vanished: take it back and wait for the recomputation.
                self._take_back(dts)
                self._move(dts, "waiting")
                dts.waiting_on = {d for d in dts.deps if d.state != "memory"}
            elif dts.state in ("waiting", "no-worker"):
                if dts.state == "no-worker":
                    self.unrunnable.pop(dts, None)
                    self._move(dts, "waiting")
                dts.waiting_on = _grow(dts.waiting_on, ts)
        if not needed:
            self._forget_if_unneeded(ts)
            return
        if ts.args is None:  # scattered data has no lineage
            for c in ts.who_wants:
                self._send(c, KeyCancelled(key=ts.key, reason="lost: its worker left", lost=True))
            self._fail(
                ts,
                ErrorInfo(
                    typename="LostDataError",
                    message=f"{ts.key!r} was scattered data held only by workers that left",
                ),
                notify=False,
            )
            return
        for c in ts.who_wants:
            self._send(c, KeyLost(key=ts.key))
        self._make_waiting(ts)

    def _add_keys(self, source: str, msg: AddKeys) -> None:
        """A worker holds copies of these keys now (fetched, or kept from a cancelled run).

        A copy counts only if it is of the key's current value: its version
        (``msg.versions``; 0 when not listed) must be the key's.  A copy of a
        value scattered over while the copy travelled is answered with where
        the current value is and its version, and the worker drops its copy;
        a copy of a key no longer in memory is freed.  A worker that holds the
        current value since (stored there) or runs the key gets neither: that
        would drop the value, or cancel the run.  Copies from a worker that
        does not track versions (no ``versions``) are taken as they are.
        """
        ws = self.workers.get(source)
        if ws is None:
            return
        versions = msg.versions
        stale = []
        replaced = []
        for key, nbytes in msg.nbytes.items():
            ts = self.tasks.get(key)
            if ts is None or ts.state != "memory":
                if ts is None or ts.processing_on is not ws:
                    stale.append(key)
                continue
            if versions is not None and versions.get(key, 0) != ts.version:
                if ws not in ts.who_has:
                    replaced.append(ts)
                continue
            ts.nbytes = ts.nbytes or nbytes
            self._add_replica(ts, ws)
        if stale:
            self._send(source, FreeKeys(keys=stale))
        if replaced:
            self._send(source, self._who_has_message(replaced))

    def _who_has_message(self, tasks: list[TaskState]) -> UpdateWhoHas:
        """Where the current values of ``tasks`` are, with their versions (0: left out)."""
        versions = {ts.key: ts.version for ts in tasks if ts.version}
        return UpdateWhoHas(
            who_has={ts.key: [w.address for w in ts.who_has] for ts in tasks},
            versions=versions or None,
        )

    def _missing_data(self, source: str, msg: MissingData) -> None:
        ts = self.tasks.get(msg.key)
        holder = self.workers.get(msg.holder)
        if ts is None:
            self._send(source, UpdateWhoHas(who_has={msg.key: []}))
            return
        if msg.error is not None and holder is not None and holder.address == source:
            if ts.state == "memory":
                self._release_data(ts)
                self._move(ts, "released")
                self._fail(ts, msg.error)
            return
        if holder is not None and holder in ts.who_has:
            ts.who_has = _shrink(ts.who_has, holder)
            holder.has_what.discard(ts)
            holder.nbytes -= ts.nbytes
            if not ts.who_has and ts.state == "memory":
                # A live worker failing to serve a result it computed again and
                # again (an unserializable value, say) must not loop forever.
                ts.suspicious += 1
                if ts.suspicious >= self.allowed_failures:
                    self._give_up_serving(ts, holder)
                    return
                self._lost(ts)
        if ts.state == "memory":
            self._send(source, self._who_has_message([ts]))

    def _give_up_serving(self, ts: TaskState, holder: WorkerInfo) -> None:
        self._release_data(ts)
        self._move(ts, "released")
        self._fail(
            ts,
            ErrorInfo(
                typename="LostDataError",
                message=(
                    f"the result of {ts.key!r} could not be sent from the worker holding it "
                    f"({holder.address}) {ts.suspicious} times; is it serializable? "
                    "See that worker's log"
                ),
            ),
        )

    # -- task results --------------------------------------------------------------
    def _current(self, source: str, key: str, run_id: int) -> TaskState | None:
        ts = self.tasks.get(key)
        if (
            ts is None
            or ts.state != "processing"
            or ts.processing_on is None
            or ts.processing_on.address != source
            or ts.run_id != run_id
        ):
            return None
        return ts

    def _task_finished(self, source: str, msg: TaskFinished) -> None:
        ts = self._current(source, msg.key, msg.run_id)
        if ts is None:
            ws = self.workers.get(source)
            known = self.tasks.get(msg.key)
            # Not to the worker running the current run: FreeKeys would cancel it.
            if ws is not None and (
                known is None or (ws not in known.who_has and known.processing_on is not ws)
            ):
                self._free(source, msg.key)
            return
        ws = ts.processing_on
        assert ws is not None
        self._unassign(ts)
        self._learn_duration(ts.prefix, max(0.0, msg.stop - msg.start))
        ts.nbytes = msg.nbytes
        ts.typename = msg.typename
        ts.version = 0  # its computed value (it may have held scattered data before)
        self._move(ts, "memory")
        self._add_replica(ts, ws)
        for dts in ts.dependents:
            if dts.state == "waiting" and ts in dts.waiting_on:
                dts.waiting_on = _shrink(dts.waiting_on, ts)
                if not dts.waiting_on:
                    self._ready.append(dts)
        told = msg.notified
        for c in ts.who_wants:
            if told is None or c not in told:  # the worker told the others itself
                self._send(c, self._in_memory_message(ts, msg.result))
        for dep in ts.deps:
            dep.waiters = _shrink(dep.waiters, ts)
            self._release_if_unneeded(dep)
        self._release_if_unneeded(ts)

    def _task_erred(self, source: str, msg: TaskErred) -> None:
        ts = self._current(source, msg.key, msg.run_id)
        if ts is None:
            return
        self._unassign(ts)
        if ts.retries > 0:
            ts.retries -= 1
            self._move(ts, "waiting")
            self._ready.append(ts)
            return
        self._fail(ts, msg.error)

    def _in_memory_message(self, ts: TaskState, result: Payload | None) -> KeyInMemory:
        return KeyInMemory(
            key=ts.key,
            who_has=[ws.address for ws in ts.who_has],
            typename=ts.typename,
            result=result,
        )

    def _fail(self, ts: TaskState, error: ErrorInfo, notify: bool = True) -> None:
        """Mark ``ts`` and every task waiting on it erred with ``error``."""
        stack = [ts]
        failed = []
        while stack:
            t = stack.pop()
            if t.state in ("erred", "memory"):
                continue
            failed.append(t)
            self._take_back(t)
            self._move(t, "erred")
            t.error = error
            t.waiting_on = _NONE
            if notify or t is not ts:
                for c in t.who_wants:
                    self._send(c, KeyErred(key=t.key, error=error))
            stack.extend(d for d in t.dependents if d.state in _PENDING)
            for dep in t.deps:
                dep.waiters = _shrink(dep.waiters, t)
                self._release_if_unneeded(dep)
        for t in failed:
            self._release_if_unneeded(t)

    # -- bookkeeping ---------------------------------------------------------------
    def _add_replica(self, ts: TaskState, ws: WorkerInfo) -> None:
        if ws not in ts.who_has:
            ts.who_has = _grow(ts.who_has, ws)
            ws.has_what.add(ts)
            ws.nbytes += ts.nbytes

    def _take_back(self, ts: TaskState) -> None:
        """Stop a task running (its worker drops it) or waiting for a worker."""
        if ts.state == "processing":
            worker = ts.processing_on
            self._unassign(ts)
            if worker is not None and self.workers.get(worker.address) is worker:
                self._free(worker.address, ts.key)  # not to a worker leaving right now
        elif ts.state == "no-worker":
            self.unrunnable.pop(ts, None)

    def _unassign(self, ts: TaskState) -> None:
        ws = ts.processing_on
        if ws is not None:
            ws.processing.discard(ts)
            prefix = ts.prefix
            estimate = self._estimates[prefix]
            ws.occupancy = max(0.0, ws.occupancy - estimate) if ws.processing else 0.0
            counts = self._running[prefix]
            count = counts[ws] - 1
            if count:
                counts[ws] = count
            else:
                del counts[ws]
                if not counts:
                    del self._running[prefix], self._estimates[prefix]
            if ts.resources:
                occ = ws.resource_occupancy
                for name, amount in ts.resources.items():
                    left = occ.get(name, 0.0) - ts.duration * amount
                    occ[name] = left if ws.processing and left > 1e-12 else 0.0
        ts.processing_on = None

    def _make_waiting(self, root: TaskState) -> None:
        """Make a released task and its released inputs wait to be computed."""
        stack = [root]
        while stack:
            ts = stack.pop()
            if ts.state != "released":
                continue
            if ts.args is None:
                self._fail(
                    ts,
                    ErrorInfo(
                        typename="LostDataError",
                        message=f"{ts.key!r} has no data and cannot be recomputed",
                    ),
                )
                continue
            self._move(ts, "waiting")
            waiting_on: set[TaskState] = set()
            erred: TaskState | None = None
            for dep in ts.deps:
                dep.waiters = _grow(dep.waiters, ts)
                if dep.state == "memory":
                    continue
                if dep.state == "erred":
                    erred = dep
                    continue
                waiting_on.add(dep)
                if dep.state == "released":
                    stack.append(dep)
            if len(waiting_on) > 1:
                ts.waiting_on = waiting_on
            else:
                ts.waiting_on = waiting_on.pop().alone() if waiting_on else _NONE
            if erred is not None:
                assert erred.error is not None
                self._fail(ts, erred.error)
            elif not waiting_on:
                self._ready.append(ts)

    def _needed(self, ts: TaskState) -> bool:
        return bool(ts.who_wants or ts.waiters or ts.holds)

    def _release_if_unneeded(self, root: TaskState) -> None:
        """Free the data and computation of tasks no client or dependent needs."""
        stack = [root]
        while stack:
            ts = stack.pop()
            if ts.state == "released" or self._needed(ts):
                if ts.state == "released":
                    self._forget_if_unneeded(ts)
                continue
            if ts.state == "memory":
                self._release_data(ts)
            else:
                self._take_back(ts)
            ts.waiting_on = _NONE
            ts.error = None
            self._move(ts, "released")
            for dep in ts.deps:
                if ts in dep.waiters:
                    dep.waiters = _shrink(dep.waiters, ts)
                    stack.append(dep)
            self._forget_if_unneeded(ts)

    def _release_data(self, ts: TaskState) -> None:
        for ws in ts.who_has:
            ws.has_what.discard(ts)
            ws.nbytes -= ts.nbytes
            if self.workers.get(ws.address) is ws:  # not to a worker leaving right now
                self._free(ws.address, ts.key)
        ts.who_has = _NONE

    def _forget_if_unneeded(self, root: TaskState) -> None:
        """Drop released records that no live record depends on (their lineage too)."""
        stack = [root]
        while stack:
            ts = stack.pop()
            if ts.state != "released" or ts.who_wants or ts.dependents or ts.holds:
                continue
            if self.tasks.get(ts.key) is not ts:
                continue
            del self.tasks[ts.key]
            self.transition_log.append((ts.key, "released", "forgotten", self._stimulus))
            for fid in ts.functions_used():
                refs = self.function_refs.get(fid, 1) - 1
                if refs <= 0:
                    self.function_refs.pop(fid, None)
                    self.functions.pop(fid, None)
                else:
                    self.function_refs[fid] = refs
            for dep in ts.deps:
                dep.dependents = _shrink(dep.dependents, ts)
                dep.waiters = _shrink(dep.waiters, ts)
                stack.append(dep)

    # -- placement -----------------------------------------------------------------
    def _schedule(self) -> None:
        """Place every ready task (highest priority first); batch per worker."""
        if self._ready:
            ready, self._ready = self._ready, []
            if len(ready) > 1:
                ready.sort(key=_priority)
            workers = self.workers
            if self.paused:  # paused workers take no new tasks
                workers = {a: w for a, w in workers.items() if a not in self.paused}
            planned = self._plan_free(ready, workers)
            for ts in ready:
                if ts.state != "waiting" or ts.waiting_on:
                    continue
                ws = planned.get(ts)
                if ws is None:
                    ws = placement.choose_worker(ts, workers)
                if ws is None:
                    self._move(ts, "no-worker")
                    self.unrunnable[ts] = None
                else:
                    self._assign(ts, ws)
        if self._compute:
            batches, self._compute = self._compute, {}
            for ws, tasks in batches.items():
                functions = {}
                for t in tasks:
                    if t.fn is not None and t.fn not in functions:
                        functions[t.fn] = self.functions[t.fn]
                    for fid in t.needs or ():
                        if fid not in functions:
                            functions[fid] = self.functions[fid]
                self._send(ws.address, Compute(tasks=tasks, functions=functions))

    def _plan_free(
        self, ready: list[TaskState], workers: dict[str, WorkerInfo]
    ) -> dict[TaskState, WorkerInfo]:
        """Workers for the free tasks among ``ready`` (sorted), placed as one batch.

        See :func:`placement.plan_runs`: neighbours in priority order share a
        worker.  Empty when fewer than two are free (nothing to plan).
        """
        if len(ready) < 2:
            return {}  # a lone task (a submit): nothing to plan
        free = [
            ts
            for ts in dict.fromkeys(ready)
            if ts.state == "waiting" and not ts.waiting_on and placement.is_free(ts)
        ]
        if len(free) < 2:
            return {}
        chosen = placement.plan_runs([self._expected(ts.prefix) for ts in free], workers)
        if chosen is None:
            return {}
        return dict(zip(free, chosen, strict=True))

    def _expected(self, prefix: str) -> float:
        """The duration a task of ``prefix`` is expected to take (its occupancy estimate)."""
        estimate = self._estimates.get(prefix)
        if estimate is None:
            estimate = self.durations.get(prefix, DEFAULT_DURATION)
        return estimate

    def _learn_duration(self, prefix: str, duration: float) -> None:
        """Fold a measured duration into the prefix's average; correct occupancies if far off.

        Occupancies are corrected only when the average leaves [estimate/2,
        2 x estimate], so a busy prefix costs a pass over its workers rarely,
        not at every finish.
        """
        old = self.durations.get(prefix)
        new = duration if old is None else 0.5 * old + 0.5 * duration
        self.durations[prefix] = new
        estimate = self._estimates.get(prefix)
        if estimate is not None and not 0.5 * estimate <= new <= 2.0 * estimate:
            self._estimates[prefix] = new
            for ws, count in self._running[prefix].items():
                ws.occupancy = max(0.0, ws.occupancy + count * (new - estimate))

    def _assign(self, ts: TaskState, ws: WorkerInfo) -> None:
        self._move(ts, "processing")
        ts.processing_on = ws
        ts.run_id = next(self._run_ids)
        prefix = ts.prefix
        estimate = self._estimates.get(prefix)
        if estimate is None:
            estimate = self._estimates[prefix] = self.durations.get(prefix, DEFAULT_DURATION)
            counts = self._running[prefix] = {}
        else:
            counts = self._running[prefix]
        counts[ws] = counts.get(ws, 0) + 1
        ts.duration = estimate
        ws.processing.add(ts)
        ws.occupancy += estimate
        if ts.resources:
            occ = ws.resource_occupancy
            for name, amount in ts.resources.items():
                occ[name] = occ.get(name, 0.0) + ts.duration * amount
        assert ts.args is not None
        deps = ts.deps
        task = ComputeTask(
            key=ts.key,
            args=ts.args,
            fn=ts.fn,
            needs=ts.needs,
            run_id=ts.run_id,
            who_has={d.key: [w.address for w in d.who_has] for d in deps} if deps else {},
            nbytes={d.key: d.nbytes for d in deps} if deps else {},
            versions=({d.key: d.version for d in deps if d.version} or None) if deps else None,
            priority=list(ts.priority),
            resources=ts.resources,
            send_result=bool(ts.who_wants),
            environment=ts.environment,
            notify=list(ts.who_wants) if ts.who_wants else None,
        )
        batch = self._compute.get(ws)
        if batch is None:
            self._compute[ws] = [task]
        else:
            batch.append(task)

    # -- read-only views -----------------------------------------------------------
    def why_pending(self, key: str) -> str:
        """A readable reason why ``key`` has not finished yet."""
        ts = self.tasks.get(key)
        if ts is None:
            return f"{key!r} is not known to the scheduler"
        if ts.state == "no-worker":
            reason = placement.why_no_worker(ts, self.workers, self.environments)
            if not reason and self.paused:
                reason = "every worker that may run it is paused (memory above its pause mark)"
            return reason or "waiting for a worker"
        if ts.state == "waiting":
            names = ", ".join(repr(d.key) for d in list(ts.waiting_on)[:5])
            return f"waiting for its inputs {names}"
        if ts.state == "processing":
            assert ts.processing_on is not None
            return f"running (or queued) on {ts.processing_on.address}"
        return f"{ts.state}"

    def who_has(self, keys: Iterable[str] | None = None) -> dict[str, list[str]]:
        """Map each key to the addresses of the workers holding it."""
        if keys is None:
            keys = [k for k, ts in self.tasks.items() if ts.state == "memory"]
        out = {}
        for key in keys:
            ts = self.tasks.get(key)
            out[key] = [ws.address for ws in ts.who_has] if ts is not None else []
        return out

    def worker_info(self, ws: WorkerInfo) -> dict[str, Any]:
        """The public description of one worker (as in ``scheduler_info()``)."""
        return {
            "address": ws.address,
            "name": ws.name,
            "nthreads": ws.nthreads,
            "memory_limit": ws.memory_limit,
            "resources": dict(ws.resources),
            "runtime": ws.runtime,
            "pid": ws.pid,
            "processing": len(ws.processing),
            "nbytes": ws.nbytes,
            "keys": [ts.key for ts in ws.has_what],
            "metrics": dict(ws.metrics),
            "status": ws.status,
            "environments": sorted(ws.environments),
        }

    def task_counts(self) -> dict[str, int]:
        """How many tasks are in each state."""
        counts: dict[str, int] = {}
        for ts in self.tasks.values():
            counts[ts.state] = counts.get(ts.state, 0) + 1
        return counts

    # -- invariants (tests call this after every stimulus) ----------------------------
    def validate(self) -> None:
        """Raise ``AssertionError`` if any internal invariant is broken."""
        assert self.paused == {a for a, w in self.workers.items() if w.status == "paused"}
        for key, ts in self.tasks.items():
            assert ts.key == key
            assert ts.state in TRANSITIONS, ts
            if ts.state == "processing":
                assert ts.processing_on is not None, ts
                assert ts in ts.processing_on.processing, ts
                assert ts.processing_on.address in self.workers, ts
                if ts.environment:
                    missing = set(ts.environment) - ts.processing_on.environments
                    assert not missing, f"{ts} runs outside environments {missing}"
            else:
                assert ts.processing_on is None, ts
            if ts.state == "memory":
                assert ts.who_has, f"{ts} has no holder"
            else:
                assert not ts.who_has, f"{ts} has holders {ts.who_has}"
            for ws in ts.who_has:
                assert ts in ws.has_what and ws.address in self.workers
            if ts.state == "waiting":
                for dep in ts.waiting_on:
                    assert dep in ts.deps and dep.state != "memory", (ts, dep)
                    assert dep.state in ("waiting", "processing", "no-worker"), (ts, dep)
            if ts.state == "no-worker":
                assert ts in self.unrunnable
            for dep in ts.deps:
                assert ts in dep.dependents
                assert self.tasks.get(dep.key) is dep, f"{ts} depends on forgotten {dep}"
            for c in ts.who_wants:
                assert ts in self.clients.get(c, ()), (ts, c)
        for ts in self.unrunnable:
            assert ts.state == "no-worker"
        holds: dict[TaskState, int] = {}
        for held in self._holds.values():
            for ts in held:
                holds[ts] = holds.get(ts, 0) + 1
        for ts in self.tasks.values():
            assert ts.holds == holds.get(ts, 0), (ts, ts.holds)
        assert self._running.keys() == self._estimates.keys()
        running: dict[str, dict[WorkerInfo, int]] = {}
        for ws in self.workers.values():
            assert ws.environments <= self.environments.keys(), ws
            for ts in ws.processing:
                assert ts.processing_on is ws
                counts = running.setdefault(ts.prefix, {})
                counts[ws] = counts.get(ws, 0) + 1
            expected = sum(self._estimates[ts.prefix] for ts in ws.processing)
            assert abs(ws.occupancy - expected) <= 1e-6 * max(1.0, expected), ws
            for ts in ws.has_what:
                assert ws in ts.who_has
        assert running == self._running, (running, self._running)


def _priority(ts: TaskState) -> tuple[Any, ...]:
    return ts.priority
