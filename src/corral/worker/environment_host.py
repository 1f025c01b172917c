"""The worker's side of worker environments (see :mod:`corral.environments`).

The :class:`~corral.worker.server.Worker` owns one :class:`WorkerEnvironmentHost`.
The scheduler sends ``check_environment`` (register, replace, refresh, a
worker joining) and ``teardown_environment`` (unregister); they are carried
out one at a time, in the order they arrived, on the worker's event loop,
while the worker goes on running tasks.  Each ends with an
``environment_status`` to the scheduler, sent only once the setup (or
teardown) finished: the scheduler places a task that targets an environment
only on workers whose status said they are members, so the setup always
finished before such a task arrives.

``worker.environment_state`` maps each environment this worker is a member
of (or is setting up) to its state dict; the entry is created empty just
before the setup runs and removed after the teardown.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..environments import call_hook
from ..protocol.messages import (
    CheckEnvironment,
    EnvironmentStatus,
    ErrorInfo,
    Message,
    TeardownEnvironment,
)
from ..protocol.serialize import deserialize
from .execution import error_info

if TYPE_CHECKING:
    from .server import Worker

logger = logging.getLogger("corral.worker.environments")

#: Scheduler -> worker ops handled here.
ENVIRONMENT_WORKER_OPS = frozenset({CheckEnvironment, TeardownEnvironment})

#: A worker closing waits this long for an environment setup in progress.
CLOSE_WAIT_SECONDS = 10.0

#: A teardown waits at most this long for running tasks that target the environment.
TEARDOWN_WAIT_SECONDS = 300.0

#: How often a waiting teardown looks whether those tasks finished.
_POLL_SECONDS = 0.01


@dataclass
class _Held:
    """One registration of an environment as loaded on this worker."""

    env: Any
    registration: str
    member: bool = False


@dataclass
class _Failure:
    stage: str
    error: ErrorInfo


class WorkerEnvironmentHost:
    """Environments of one worker: loading, condition, setup, teardown, state."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.held: dict[str, _Held] = {}
        self.state: dict[str, dict[str, Any]] = {}
        self._queue: deque[tuple[Message, int]] = deque()
        self._runner: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def members(self) -> list[str]:
        """Names of the environments this worker is a member of, in joining order."""
        return [name for name, held in self.held.items() if held.member]

    # -- scheduler ops ---------------------------------------------------------------
    def handle(self, msg: Message) -> None:
        """Queue a ``check_environment`` / ``teardown_environment``; they run in order."""
        if self._closing:
            return
        self._queue.append((msg, self.worker._generation))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self._queue and not self._closing:
            msg, generation = self._queue.popleft()
            try:
                if isinstance(msg, CheckEnvironment):
                    status = await self._check(msg)
                else:
                    assert isinstance(msg, TeardownEnvironment)
                    status = await self._teardown_op(msg)
            except Exception:  # a bug here must not stop later operations
                logger.exception("handling %s failed", type(msg).op)
                continue
            if generation != self.worker._generation:
                status.id = None  # asked on a previous scheduler connection
            self._send(status)

    def _send(self, status: EnvironmentStatus) -> None:
        conn = self.worker._scheduler
        if conn is not None and not conn.closed:
            conn.send(status)

    async def _check(self, msg: CheckEnvironment) -> EnvironmentStatus:
        name = msg.name
        failure: _Failure | None = None
        held = self.held.get(name)
        if held is not None and held.registration != msg.registration:
            failure = await self._leave(name)  # replaced: the old one goes first
            held = None
        if held is None:
            try:
                env = deserialize(msg.environment)
            except Exception as exc:
                failure = failure or self._failed(name, "load", exc)
                return self._status(name, msg.registration, False, msg.id, failure)
            held = self.held[name] = _Held(env, msg.registration)
        qualifies = False
        condition = getattr(held.env, "condition", None)
        try:
            qualifies = True if condition is None else bool(await call_hook(condition, self.worker))
        except Exception as exc:
            failure = failure or self._failed(name, "condition", exc)
        if qualifies and not held.member:
            self.state[name] = {}
            setup = getattr(held.env, "setup", None)
            try:
                if setup is not None:
                    await call_hook(setup, self.worker)
            except Exception as exc:
                self.state.pop(name, None)
                failure = failure or self._failed(name, "setup", exc)
            else:
                held.member = True
        elif not qualifies and held.member:
            failure = await self._teardown(name, held) or failure
        return self._status(name, msg.registration, held.member, msg.id, failure)

    async def _teardown_op(self, msg: TeardownEnvironment) -> EnvironmentStatus:
        held = self.held.get(msg.name)
        if held is None:
            return self._status(msg.name, "", False, msg.id, None)
        failure = await self._leave(msg.name)
        return self._status(msg.name, held.registration, False, msg.id, failure)

    async def _leave(self, name: str) -> _Failure | None:
        """Tear down (if a member) and forget environment ``name``."""
        held = self.held.pop(name)
        if not held.member:
            return None
        return await self._teardown(name, held)

    async def _teardown(self, name: str, held: _Held) -> _Failure | None:
        """Run the teardown of a member; it is no longer a member however that ends.

        Tasks running here that target the environment finish first: their
        code may still be using its state (the database connection, the model).
        """
        held.member = False
        await self._wait_for_tasks_of(name)
        teardown = getattr(held.env, "teardown", None)
        try:
            if teardown is not None:
                await call_hook(teardown, self.worker)
        except Exception as exc:
            return self._failed(name, "teardown", exc)
        finally:
            self.state.pop(name, None)
        return None

    def _running_tasks_of(self, name: str) -> list[str]:
        return [
            ts.key
            for ts in self.worker.state.executing
            if ts.spec is not None and ts.spec.environment and name in ts.spec.environment
        ]

    async def _wait_for_tasks_of(self, name: str) -> None:
        limit = CLOSE_WAIT_SECONDS if self._closing else TEARDOWN_WAIT_SECONDS
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while running := self._running_tasks_of(name):
            if loop.time() > deadline:
                logger.warning(
                    "worker environment %r: tearing down on %s while %d of its tasks still "
                    "run after %gs: %s",
                    name,
                    self.worker.address,
                    len(running),
                    limit,
                    running[:5],
                )
                return
            await asyncio.sleep(_POLL_SECONDS)

    def _failed(self, name: str, stage: str, exc: BaseException) -> _Failure:
        logger.warning(
            "worker environment %r: %s failed on %s",
            name,
            stage,
            self.worker.address,
            exc_info=(type(exc), exc, exc.__traceback__),
        )
        return _Failure(stage, error_info(exc))

    def _status(
        self, name: str, registration: str, member: bool, sid: int | None, failure: _Failure | None
    ) -> EnvironmentStatus:
        return EnvironmentStatus(
            name=name,
            registration=registration,
            member=member,
            id=sid,
            stage=failure.stage if failure else None,
            error=failure.error if failure else None,
        )

    # -- closing ---------------------------------------------------------------------
    async def close(self) -> None:
        """Leave every environment (teardowns newest first); report to the scheduler if connected.

        An operation in progress may finish first (for up to
        :data:`CLOSE_WAIT_SECONDS`); operations still queued are dropped.
        """
        if self._closing:
            return
        self._closing = True
        self._queue.clear()
        runner = self._runner
        if runner is not None and not runner.done() and runner is not asyncio.current_task():
            await asyncio.wait({runner}, timeout=CLOSE_WAIT_SECONDS)
            if not runner.done():
                logger.warning("an environment operation did not finish in time; cancelling it")
                runner.cancel()
                await asyncio.wait({runner})
        for name in reversed(list(self.held)):
            held = self.held[name]
            failure = await self._leave(name)
            self._send(self._status(name, held.registration, False, None, failure))
        self.state.clear()  # a setup cancelled half-way
