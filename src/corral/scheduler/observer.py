"""What the dashboard and ``/metrics`` see of a scheduler, gathered cheaply.

The :class:`~corral.scheduler.server.Scheduler` owns one :class:`Observer`.
It stays out of the pure state machine and out of the engine's way:

* **Task stream**: the server hands it each ``task_finished`` / ``task_erred``
  as it arrives (:meth:`Observer.task_done`: one dictionary lookup and one
  append to a bounded ring buffer, ``dashboard.task-stream-length`` entries).
  Cumulative finished/erred counts per task group are kept with it.
* **Message counts**: the server's handlers count received messages per op in
  two plain dicts (:attr:`Observer.worker_ops`, :attr:`Observer.client_ops`).
* **Event-loop lag**: one task sleeps ``interval`` seconds and records how
  late it wakes up (:meth:`Observer.monitor_lag`).
* **Samples**: :meth:`Observer.sample` walks the state (tasks by group and
  state, workers, pending reasons, events) at most once per
  ``dashboard.interval`` seconds, and never more often than 50 times its own
  cost, so sampling takes at most ~2% of the loop however big the state;
  every viewer and every ``/metrics`` scrape share the latest sample.  Nothing
  is sampled while nobody looks.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from ..protocol.messages import Message, TaskErred
from ..resources import resource_amounts
from .state import key_prefix

if TYPE_CHECKING:
    from .server import Scheduler

#: Task states in the order the dashboard shows them.
STATES = ("released", "waiting", "no-worker", "processing", "memory", "erred")
_INDEX = {s: i for i, s in enumerate(STATES)}

MAX_GROUPS = 1000  # cumulative per-group counters kept (oldest dropped beyond)
MAX_PENDING = 25  # pending tasks listed with their reason
MAX_EVENTS = 60  # recent events listed


class Observer:
    """Task stream, message counts, loop lag and shared samples of one scheduler."""

    def __init__(
        self,
        scheduler: Scheduler,
        *,
        interval: float | None = None,
        stream_length: int | None = None,
    ) -> None:
        from .. import config

        self.scheduler = scheduler
        self.interval = float(config.get("dashboard.interval", interval))
        length = int(config.get("dashboard.task-stream-length", stream_length))
        # (key, group, worker address, start, stop, erred), oldest first
        self.stream: deque[tuple[str, str, str, float, float, bool]] = deque(maxlen=length)
        self.stream_total = 0  # entries ever appended: the sequence number of the next one
        self.finished: dict[str, int] = {}  # group -> tasks finished since start
        self.erred: dict[str, int] = {}  # group -> task errors since start
        self.worker_ops: dict[type[Message], int] = {}  # message class -> received from workers
        self.client_ops: dict[type[Message], int] = {}  # message class -> received from clients
        self.loop_lag = 0.0
        self._lags: deque[float] = deque(maxlen=120)
        self.samples = 0  # samples taken (tests check that viewers share them)
        self.sample_cost = 0.0  # seconds the last sample took
        self._sample: dict[str, Any] | None = None
        self._sampled_at = -1e9

    # -- fed by the server (hot path: keep it tiny) -------------------------------------
    def task_done(self, worker: str, msg: Any) -> None:
        """Record a finished or failed run (``TaskFinished`` / ``TaskErred``)."""
        ts = self.scheduler.state.tasks.get(msg.key)
        group = ts.prefix if ts is not None else key_prefix(msg.key)
        erred = type(msg) is TaskErred
        self.stream.append((msg.key, group, worker, msg.start, msg.stop, erred))
        self.stream_total += 1
        counts = self.erred if erred else self.finished
        n = counts.get(group)
        if n is None:
            if len(counts) >= MAX_GROUPS:
                del counts[next(iter(counts))]
            counts[group] = 1
        else:
            counts[group] = n + 1

    async def monitor_lag(self) -> None:
        """Measure how late the event loop wakes up a sleeper, forever."""
        loop = asyncio.get_running_loop()
        interval = max(self.interval, 0.1)
        while True:
            start = loop.time()
            await asyncio.sleep(interval)
            lag = max(0.0, loop.time() - start - interval)
            self.loop_lag = lag
            self._lags.append(lag)

    @property
    def loop_lag_max(self) -> float:
        """The largest lag of the last minute or so."""
        return max(self._lags, default=0.0)

    # -- the task stream ---------------------------------------------------------------
    def stream_since(self, seq: int, limit: int = 2000) -> tuple[list[list[Any]], int]:
        """Entries with sequence number ``>= seq`` (the newest ``limit``), and the next seq."""
        new = min(self.stream_total - seq, len(self.stream), limit)
        if new <= 0:
            return [], self.stream_total
        entries = list(itertools.islice(reversed(self.stream), new))
        entries.reverse()
        return [list(e) for e in entries], self.stream_total

    # -- samples ---------------------------------------------------------------------------
    def sample(self) -> dict[str, Any]:
        """The latest sample of the state, taken again if it is older than allowed."""
        now = time.monotonic()
        if self._sample is not None and now - self._sampled_at < max(
            self.interval, 50 * self.sample_cost
        ):
            return self._sample
        started = time.perf_counter()
        self._sample = self._take()
        self.sample_cost = time.perf_counter() - started
        self._sampled_at = time.monotonic()
        self.samples += 1
        return self._sample

    def _take(self) -> dict[str, Any]:
        scheduler = self.scheduler
        state = scheduler.state
        groups: dict[str, list[int]] = {}
        index = _INDEX
        for ts in state.tasks.values():
            row = groups.get(ts.prefix)
            if row is None:
                row = groups[ts.prefix] = [0, 0, 0, 0, 0, 0]
            row[index[ts.state]] += 1
        counts = {s: 0 for s in STATES}
        for row in groups.values():
            for s, n in zip(STATES, row, strict=True):
                counts[s] += n
        group_rows = []
        for name in dict.fromkeys([*groups, *self.finished, *self.erred]):
            row = groups.get(name, [0, 0, 0, 0, 0, 0])
            group_rows.append(
                {
                    "name": name,
                    **dict(zip(STATES, row, strict=True)),
                    "finished": self.finished.get(name, 0),
                    "failed": self.erred.get(name, 0),
                }
            )
        workers = [self._worker(ws) for ws in state.workers.values()]
        pending = [
            {"key": ts.key, "state": ts.state, "reason": state.why_pending(ts.key)}
            for ts in itertools.islice(state.unrunnable, MAX_PENDING)
        ]
        environments = {
            name: sum(1 for ws in state.workers.values() if name in ws.environments)
            for name in state.environments
        }
        return {
            "time": time.time(),
            "scheduler": {
                "id": scheduler.id,
                "address": scheduler.address,
                "started": scheduler.started,
                "pid": os.getpid(),
                "status": scheduler.status,
                "clients": len(state.clients),
                "transitions": state.transition_counter,
                "loop_lag": self.loop_lag,
                "loop_lag_max": self.loop_lag_max,
                "sample_cost": self.sample_cost,
            },
            "counts": counts,
            "groups": group_rows,
            "workers": workers,
            "pending": pending,
            "unrunnable": len(state.unrunnable),
            "environments": environments,
            "events": self._events(),
            "ops": {
                "worker": {k.op: n for k, n in self.worker_ops.items()},
                "client": {k.op: n for k, n in self.client_ops.items()},
            },
        }

    @staticmethod
    def _worker(ws: Any) -> dict[str, Any]:
        metrics = ws.metrics
        offered = resource_amounts(ws.resources)
        available = metrics.get("resources_available")
        used: dict[str, float] = {}
        for name, amount in offered.items():
            if isinstance(available, dict) and name in available:
                used[name] = max(0.0, float(amount) - float(available[name]))
            else:  # no heartbeat yet: what the tasks placed there ask for
                used[name] = min(
                    float(amount),
                    sum((ts.resources or {}).get(name, 0.0) for ts in ws.processing),
                )
        return {
            "address": ws.address,
            "name": str(ws.name),
            "nthreads": ws.nthreads,
            "memory": metrics.get("memory", 0),
            "memory_limit": ws.memory_limit,
            "cpu": metrics.get("cpu", 0.0),
            "executing": metrics.get("executing", 0),
            "processing": len(ws.processing),
            "in_memory": len(ws.has_what),
            "nbytes": ws.nbytes,
            "resources": offered,
            "resources_used": used,
            "environments": sorted(ws.environments),
            "status": ws.status,
            "runtime": ws.runtime,
        }

    def _events(self) -> list[dict[str, Any]]:
        boxes = self.scheduler._plugin_host.events
        recent: list[tuple[float, str, Any]] = []
        for topic, box in boxes.items():
            for when, msg in itertools.islice(reversed(box), MAX_EVENTS):
                recent.append((when, topic, msg))
        recent.sort(key=lambda e: e[0])
        return [{"time": t, "topic": topic, "msg": msg} for t, topic, msg in recent[-MAX_EVENTS:]]
