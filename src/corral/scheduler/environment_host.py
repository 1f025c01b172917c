"""The scheduler's side of worker environments (see :mod:`corral.environments`).

The :class:`~corral.scheduler.server.Scheduler` owns one :class:`EnvironmentHost`.

* Registered environments are kept as opaque payloads (the scheduler never
  loads them), by name, and outlive the client that registered them.  Each
  current worker, and each worker that joins later (right after its worker
  plugins), gets a ``check_environment``.
* Membership is state-machine state: registering, replacing and
  unregistering are events (:class:`~corral.scheduler.state.EnvironmentRegistered`,
  :class:`~corral.scheduler.state.EnvironmentUnregistered`), and each worker's
  ``environment_status`` goes through :meth:`SchedulerState.handle` like any
  other worker message; placement only ever sees members.
* Answers are gathered per request until every asked worker answered or
  left; then the client gets :class:`~corral.protocol.messages.Results`.
  Every failure (condition, setup, teardown, on any worker) is also recorded
  in the ``"environments"`` event topic.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..protocol.messages import (
    CheckEnvironment,
    EnvironmentStatus,
    Message,
    Outcome,
    RefreshWorkerEnvironment,
    RegisterWorkerEnvironment,
    Results,
    TeardownEnvironment,
    UnregisterWorkerEnvironment,
)
from ..protocol.serialize import Payload, serialize
from ..worker.execution import error_info
from .state import EnvironmentRegistered, EnvironmentUnregistered
from .worker_answers import Done, WorkerAnswers

if TYPE_CHECKING:
    from ..comm import Connection
    from .server import Scheduler

logger = logging.getLogger("corral.scheduler.environments")

#: Client ops handled here (the scheduler's allowlist includes them).
ENVIRONMENT_CLIENT_OPS = frozenset(
    {RegisterWorkerEnvironment, UnregisterWorkerEnvironment, RefreshWorkerEnvironment}
)

#: The event topic of environment registrations and failures.
TOPIC = "environments"


@dataclass
class EnvironmentEntry:
    """A registered environment: opaque to the scheduler."""

    name: str
    payload: Payload
    registration: str
    client: str


class EnvironmentHost:
    """Worker environments of one scheduler."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.entries: dict[str, EnvironmentEntry] = {}
        self._answers = WorkerAnswers(scheduler)

    # -- read-only -----------------------------------------------------------------
    def environments(self) -> dict[str, list[str]]:
        """Each registered environment -> addresses of its members (request ``environments``)."""
        workers = self.scheduler.state.workers.values()
        return {
            name: sorted(ws.address for ws in workers if name in ws.environments)
            for name in self.entries
        }

    # -- workers ---------------------------------------------------------------------
    def worker_joining(self, address: str, conn: Connection) -> None:
        """Ask a joining worker to check every registered environment (in registration order)."""
        for entry in self.entries.values():
            conn.send(self._check(self._answers.expect({address}, _ignore), entry))

    def worker_status(self, address: str, msg: EnvironmentStatus) -> None:
        """A worker's ``environment_status`` (the state machine has handled it already)."""
        if msg.error is not None:
            self._record_failure(address, msg)
        if msg.id is None:
            return
        if not self._answers.awaits(msg.id, address):
            return
        result = serialize({"member": msg.member, "stage": msg.stage}, "msgpack")
        error = msg.error
        if error is not None:
            header = f"worker environment {msg.name!r}: {msg.stage} failed on {address}\n"
            error = dataclasses.replace(error, traceback_text=header + error.traceback_text)
        self._answers.answer(msg.id, address, Outcome(result=result, error=error))

    def worker_left(self, address: str) -> None:
        """Answers a leaving worker still owed arrive as errors."""
        self._answers.worker_left(address)

    def _record_failure(self, address: str, msg: EnvironmentStatus) -> None:
        err = msg.error
        assert err is not None
        logger.warning(
            "worker environment %r: %s failed on %s: %s: %s\n%s",
            msg.name,
            msg.stage,
            address,
            err.typename,
            err.message,
            err.traceback_text,
        )
        self.scheduler.log_event(
            TOPIC,
            {
                "action": f"{msg.stage}-failed",
                "name": msg.name,
                "worker": address,
                "member": msg.member,
                "exception": f"{err.typename}: {err.message}",
                "traceback": err.traceback_text,
            },
        )

    def _ask_workers(self, make: Callable[[int], Message], done: Done) -> None:
        """Send ``make(sid)`` to every current worker; ``done(outcomes)`` once all answered."""
        self._answers.ask(list(self.scheduler.state.workers), make, done)

    @staticmethod
    def _check(sid: int, entry: EnvironmentEntry) -> CheckEnvironment:
        return CheckEnvironment(
            id=sid, name=entry.name, environment=entry.payload, registration=entry.registration
        )

    # -- client ops ----------------------------------------------------------------
    def handle_client(self, client_id: str, conn: Connection, msg: Message) -> None:
        """Carry out one environment op from a client; the answer goes back on ``conn``."""

        def reply(outcomes: dict[str, Outcome] | None = None, error: Any = None) -> None:
            if not conn.closed:
                rid = msg.id  # type: ignore[attr-defined]
                conn.send(Results(id=rid, outcomes=outcomes or {}, error=error))

        try:
            if isinstance(msg, RegisterWorkerEnvironment):
                self._register(client_id, msg, reply)
            elif isinstance(msg, UnregisterWorkerEnvironment):
                self._unregister(client_id, msg, reply)
            elif isinstance(msg, RefreshWorkerEnvironment):
                self._refresh(client_id, msg, reply)
        except Exception as exc:
            logger.exception("handling %s from %s failed", type(msg).op, client_id)
            reply(error=error_info(exc))

    def _register(
        self, client_id: str, msg: RegisterWorkerEnvironment, reply: Callable[..., None]
    ) -> None:
        if not msg.name.strip():
            empty = ValueError("the name of a worker environment must not be empty")
            reply(error=error_info(empty))
            return
        replaced = self.entries.pop(msg.name, None) is not None  # a new registration goes last
        entry = EnvironmentEntry(msg.name, msg.environment, uuid.uuid4().hex, client_id)
        self.entries[msg.name] = entry
        self.scheduler._apply(client_id, [EnvironmentRegistered(entry.name, entry.registration)])
        self.scheduler.log_event(
            TOPIC,
            {
                "action": "replace" if replaced else "register",
                "name": msg.name,
                "client": client_id,
            },
        )
        self._ask_workers(lambda sid: self._check(sid, entry), reply)

    def _unregister(
        self, client_id: str, msg: UnregisterWorkerEnvironment, reply: Callable[..., None]
    ) -> None:
        if self.entries.pop(msg.name, None) is None:
            reply(error=error_info(ValueError(f"no worker environment named {msg.name!r}")))
            return
        self.scheduler._apply(client_id, [EnvironmentUnregistered(msg.name)])
        self.scheduler.log_event(
            TOPIC, {"action": "unregister", "name": msg.name, "client": client_id}
        )
        self._ask_workers(lambda sid: TeardownEnvironment(id=sid, name=msg.name), reply)

    def _refresh(
        self, client_id: str, msg: RefreshWorkerEnvironment, reply: Callable[..., None]
    ) -> None:
        entry = self.entries.get(msg.name)
        if entry is None:
            reply(error=error_info(ValueError(f"no worker environment named {msg.name!r}")))
            return
        self.scheduler.log_event(
            TOPIC, {"action": "refresh", "name": msg.name, "client": client_id}
        )
        self._ask_workers(lambda sid: self._check(sid, entry), reply)


def _ignore(outcomes: dict[str, Outcome]) -> None:
    """Answers of a joining worker go to no client (failures are already recorded)."""
