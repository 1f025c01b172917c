"""The worker's side of plugins, preloads and ``client.run``.

The :class:`~corral.worker.server.Worker` owns one :class:`WorkerPluginHost`.
Everything here runs on the worker's event loop thread:

* ``setup_plugin`` / ``teardown_plugin`` from the scheduler: the plugin's
  ``setup``/``teardown`` is called (and awaited if it is a coroutine); the
  worker holds back the scheduler's later messages until it finished, so tasks
  sent after a plugin was registered run with the plugin set up.
* ``worker_run``: the function is called on the event loop thread (a coroutine
  function is awaited, or only started with ``wait=False``), so it can look at
  the worker's state safely; it must not block for long.
* ``setup_plugin`` / ``teardown_plugin`` with ``nanny``: the plugin is a
  nanny plugin, for this worker's supervisor; it is passed on unopened
  through the private channel (:mod:`corral.nanny_channel`), and the worker
  restarts when the supervisor says so.  A worker with no supervisor answers
  ``{"status": "no-nanny", ...}`` (pickled in the outcome's ``result``).
* ``transition`` hooks are called after each batch of state changes, with the
  transitions of that batch in order, read from the worker state's own log
  (``WorkerState.log``): the state machine stays free of hooks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from .. import nanny_channel
from ..plugins import (
    HookRunner,
    WorkerPlugin,
    call_payload,
    implemented_hooks,
    maybe_await,
    plugin_name,
)
from ..preload import Preloads
from ..protocol.messages import (
    CloseWorker,
    Message,
    Outcome,
    SetupPlugin,
    TeardownPlugin,
    WorkerResult,
    WorkerRun,
)
from ..protocol.serialize import deserialize, serialize
from .execution import error_info

if TYPE_CHECKING:
    from .server import Worker
    from .state import WorkerState

logger = logging.getLogger("corral.worker.plugins")

#: Scheduler -> worker ops handled here.
PLUGIN_WORKER_OPS = frozenset({SetupPlugin, TeardownPlugin, WorkerRun})

RUN_NAMES = ("dask_worker", "corral_worker")


class WorkerPluginHost:
    """Plugins and preloads of one worker."""

    def __init__(
        self,
        worker: Worker,
        preload: str | list[str] | None = None,
        preload_argv: list[str] | list[list[str]] | None = None,
    ) -> None:
        self.worker = worker
        self.preloads = Preloads("worker", preload, preload_argv)
        self.plugins: dict[str, Any] = {}
        self.registrations: dict[str, str] = {}
        self.hooks = HookRunner(logger)
        self._transition_hooks: list[tuple[str, Any]] = []
        self._held: list[Message] | None = None
        self._held_generation = 0
        self._tasks: set[asyncio.Task[Any]] = set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- plugins -------------------------------------------------------------------
    async def add(self, plugin: Any, name: str | None = None, registration: str = "") -> None:
        """Set up ``plugin`` under ``name``, tearing down one of the same name first.

        The plugin stays registered even if its setup raises (as in
        dask.distributed), so it is torn down later; the error is raised.
        """
        name = plugin_name(plugin, name)
        if name in self.plugins:
            await self.remove(name, raise_errors=False)
        self.plugins[name] = plugin
        self.registrations[name] = registration
        self._index()
        if callable(getattr(plugin, "setup", None)):
            await maybe_await(plugin.setup(self.worker))

    async def remove(self, name: str, raise_errors: bool = True) -> None:
        """Tear down and forget plugin ``name`` (``ValueError`` if unknown)."""
        try:
            plugin = self.plugins.pop(name)
        except KeyError:
            raise ValueError(f"no worker plugin named {name!r} on this worker") from None
        self.registrations.pop(name, None)
        self._index()
        if not callable(getattr(plugin, "teardown", None)):
            return
        try:
            await maybe_await(plugin.teardown(self.worker))
        except Exception as exc:
            if raise_errors:
                raise
            self.hooks.failed(name, "teardown", exc)

    async def close(self) -> None:
        """Tear down every plugin, then the preloads; failures are logged, never raised."""
        for name in reversed(list(self.plugins)):
            await self.remove(name, raise_errors=False)
        await self.preloads.teardown(self.worker)
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()

    def _index(self) -> None:
        self._transition_hooks = [
            (name, plugin.transition)
            for name, plugin in self.plugins.items()
            if "transition" in implemented_hooks(plugin, WorkerPlugin, ("transition",))
        ]

    # -- transitions -----------------------------------------------------------------
    def mark(self, state: WorkerState) -> Any:
        """The newest logged transition, taken before a batch (``False``: nobody watches)."""
        if not self._transition_hooks:
            return False
        entries = state.log.entries
        return entries[-1] if entries else None

    def transitions(self, state: WorkerState, mark: Any) -> None:
        """Call ``transition`` hooks for the transitions logged since ``mark``."""
        if mark is False or not self._transition_hooks:
            return
        new: list[tuple[str, str, str]] = []
        for entry in reversed(state.log.entries):
            if entry is mark:
                break
            new.append(entry)
        if not new:
            return
        new.reverse()
        for name, hook in self._transition_hooks:
            started = time.perf_counter()
            for key, start, finish in new:
                self.hooks.call(name, "transition", hook, key, start, finish)
            self.hooks.timed(name, "transition", started, len(new))

    # -- scheduler ops ---------------------------------------------------------------
    def handle(self, msg: Message, rest: list[Message]) -> bool:
        """Start handling a plugin or run op; ``rest``: the messages after it in its batch.

        Returns True when the worker must stop handling the batch: a plugin
        setup or teardown started, and ``rest`` (with whatever the scheduler
        sends meanwhile) is handed back to the worker once it finished.
        """
        if isinstance(msg, SetupPlugin | TeardownPlugin):
            op = self._setup(msg) if isinstance(msg, SetupPlugin) else self._teardown(msg)
            held = self._held = list(rest)
            self._held_generation = self.worker._generation
            self._spawn(self._then_release(op, held))
            return True
        if isinstance(msg, WorkerRun):
            self._spawn(self._run(msg))
        return False

    def holding(self, batch: list[Message]) -> bool:
        """Keep ``batch`` back if a plugin setup or teardown is running (True if kept)."""
        if self._held is None:
            return False
        if self._held_generation != self.worker._generation:
            self._held = None  # left from a previous scheduler connection
            return False
        self._held.extend(batch)
        if any(type(m) is CloseWorker for m in batch):
            self.worker._spawn(self.worker.close(reason="asked by the scheduler"))
        return True

    async def _then_release(self, op: Awaitable[None], held: list[Message]) -> None:
        generation = self._held_generation
        try:
            await op
        finally:
            if self._held is held:
                self._held = None
                worker = self.worker
                alive = worker.status not in ("closing", "closed")
                if held and alive and generation == worker._generation:
                    worker._on_scheduler_messages(held)

    def _reply(self, sid: int, outcome: Outcome) -> None:
        conn = self.worker._scheduler
        if conn is not None and not conn.closed:
            conn.send(WorkerResult(id=sid, outcome=outcome))

    def _no_nanny(self) -> Outcome:
        where = self.worker.address or self.worker.name
        return Outcome(
            result=serialize(
                {
                    "status": "no-nanny",
                    "message": f"worker {where} runs without a supervisor (nanny): "
                    "nanny plugins are not set up for it",
                }
            )
        )

    async def _nanny_op(self, msg: SetupPlugin | TeardownPlugin) -> None:
        """Pass a nanny plugin op to the supervisor; restart when it says so."""
        generation = self.worker._generation
        folder = self.worker.nanny_channel
        if folder is None:
            outcome = self._no_nanny()
        else:
            if isinstance(msg, SetupPlugin):
                req = nanny_channel.request("setup", msg.name, msg.plugin, msg.registration)
            else:
                req = nanny_channel.request("teardown", msg.name)
            try:
                answer = await nanny_channel.WorkerEnd(folder).ask(req)
            except Exception as exc:
                logger.exception("handing nanny plugin %r to the supervisor failed", msg.name)
                outcome = Outcome(error=error_info(exc))
            else:
                outcome = Outcome(error=answer.error)
                if answer.restart and answer.error is None:
                    # Told before the answer leaves, so the scheduler answers the
                    # client once the fresh process is back (as PipInstall).
                    self.worker.request_restart(f"nanny plugin {msg.name!r}")
        if generation == self.worker._generation:
            self._reply(msg.id, outcome)

    async def _setup(self, msg: SetupPlugin) -> None:
        if msg.nanny:
            await self._nanny_op(msg)
            return
        generation = self.worker._generation
        if msg.name in self.plugins and self.registrations.get(msg.name) == msg.registration:
            self._reply(msg.id, Outcome())  # set up already (this worker reconnected)
            return
        try:
            plugin = deserialize(msg.plugin)
            await self.add(plugin, name=msg.name, registration=msg.registration)
            outcome = Outcome()
        except Exception as exc:
            logger.exception("worker plugin %r failed to set up", msg.name)
            outcome = Outcome(error=error_info(exc))
        if generation == self.worker._generation:
            self._reply(msg.id, outcome)

    async def _teardown(self, msg: TeardownPlugin) -> None:
        if msg.nanny:
            await self._nanny_op(msg)
            return
        generation = self.worker._generation
        try:
            if msg.name in self.plugins:
                await self.remove(msg.name)
            outcome = Outcome()
        except Exception as exc:
            logger.exception("worker plugin %r failed to tear down", msg.name)
            outcome = Outcome(error=error_info(exc))
        if generation == self.worker._generation:
            self._reply(msg.id, outcome)

    async def _run(self, msg: WorkerRun) -> None:
        if msg.wait:
            outcome = await call_payload(msg.function, msg.args, RUN_NAMES, self.worker)
            self._reply(msg.id, outcome)
            return
        # Without waiting: start it, answer at once; a failure is only logged.
        self._reply(msg.id, Outcome())
        outcome = await call_payload(msg.function, msg.args, RUN_NAMES, self.worker)
        if outcome.error is not None:
            logger.error(
                "function run with wait=False failed: %s: %s\n%s",
                outcome.error.typename,
                outcome.error.message,
                outcome.error.traceback_text,
            )
