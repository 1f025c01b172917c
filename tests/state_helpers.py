"""Small builders shared by the tests of the pure scheduler and worker state machines.

Every helper here only builds protocol messages or drives a state machine and
checks its invariants after each stimulus; nothing does IO.
"""

from __future__ import annotations

from typing import Any

from corral.protocol.messages import (
    Compute,
    ComputeTask,
    ErrorInfo,
    Message,
    RegisterWorker,
    TaskErred,
    TaskFinished,
    TaskSpec,
)
from corral.protocol.serialize import Payload
from corral.scheduler.state import SchedulerState
from corral.worker.state import WorkerState

#: The arguments of every task: their content is irrelevant to the state machines.
ARGS = Payload("pickle", [b"args"])
FN = Payload("pickle", [b"function"])

W1 = "tcp://10.0.0.1:7001"
W2 = "tcp://10.0.0.2:7001"
W3 = "tcp://10.0.0.3:7001"
W4 = "tcp://10.0.0.4:7001"


def spec(key: str, *deps: str, **kwargs: Any) -> TaskSpec:
    """A task as a client submits it."""
    return TaskSpec(key=key, args=ARGS, deps=list(deps), **kwargs)


def register(address: str, nthreads: int = 1, **kwargs: Any) -> RegisterWorker:
    """A worker joining the scheduler."""
    return RegisterWorker(address=address, nthreads=nthreads, **kwargs)


def error(typename: str = "ZeroDivisionError", message: str = "division by zero") -> ErrorInfo:
    """A task failure as a worker reports it."""
    return ErrorInfo(typename=typename, message=message, traceback_text="Traceback ...")


def finished(key: str, run_id: int = 1, nbytes: int = 8, typename: str = "int") -> TaskFinished:
    """A worker reporting a task done."""
    return TaskFinished(key=key, run_id=run_id, nbytes=nbytes, typename=typename)


def erred(key: str, run_id: int = 1, err: ErrorInfo | None = None) -> TaskErred:
    """A worker reporting a task failed."""
    return TaskErred(key=key, run_id=run_id, error=err if err is not None else error())


#: The client the unit tests submit from (their ``C1``).
WANTING_CLIENT = "client-1"


def ctask(key: str, run_id: int = 1, **kwargs: Any) -> ComputeTask:
    """A task as the scheduler hands it to a worker (``send_result``: wanted by C1)."""
    if kwargs.get("send_result") and "notify" not in kwargs:
        kwargs["notify"] = [WANTING_CLIENT]
    return ComputeTask(key=key, args=ARGS, run_id=run_id, **kwargs)


def compute(*tasks: ComputeTask, functions: dict[str, Payload] | None = None) -> Compute:
    """One batch of tasks for a worker."""
    return Compute(tasks=list(tasks), functions=functions or {})


class Sched:
    """A :class:`SchedulerState` that validates its invariants after every stimulus."""

    def __init__(self, *workers: str, **kwargs: Any) -> None:
        self.state = SchedulerState(**kwargs)
        for address in workers:
            assert self(address, register(address)) == {}

    def __call__(self, source: str, *events: Any) -> dict[str, list[Message]]:
        out = self.state.handle(source, events)
        self.state.validate()
        return out

    @property
    def tasks(self) -> dict[str, Any]:
        return self.state.tasks

    def states(self) -> dict[str, str]:
        """Every known key and its state."""
        return {key: ts.state for key, ts in self.state.tasks.items()}


class Worker:
    """A :class:`WorkerState` that validates its invariants after every stimulus."""

    def __init__(
        self,
        nthreads: int = 1,
        resources: dict[str, Any] | None = None,
        prefetch: int | None = None,
    ) -> None:
        self.state = WorkerState(nthreads, resources, prefetch=prefetch)

    def __call__(self, *events: Any) -> list[Any]:
        out = self.state.handle(events)
        self.state.validate()
        return out

    def states(self) -> dict[str, str]:
        """Every known key and its state."""
        return {key: ts.state for key, ts in self.state.tasks.items()}
