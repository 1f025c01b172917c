"""The scheduler's side of plugins, preloads, ``run`` and the event log.

The :class:`~corral.scheduler.server.Scheduler` owns one :class:`PluginHost`
and calls it at a few points: on start and close, when a worker joins or
leaves, after each batch the state machine handled (scheduler plugin hooks),
for the plugin and run ops of clients, and for ``worker_result`` messages.

* Worker plugins are kept as opaque payloads (the scheduler never loads them)
  and handed to each worker that joins, before anything else is sent to it.
  Nanny plugins too (``nanny``: a name space of their own, handed over
  first): the worker passes them on to its supervisor (:mod:`corral.nanny`).
* Scheduler plugins are Python objects living here; their hooks run on the
  scheduler's event loop (see :mod:`corral.plugins`).
* Requests that need an answer from several workers (plugin setup and
  teardown, ``run``) get one scheduler-side id; answers are gathered until
  every asked worker answered or left, then the client gets :class:`Results`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..plugins import (
    SCHEDULER_HOOKS,
    HookRunner,
    SchedulerPlugin,
    call_payload,
    implemented_hooks,
    maybe_await,
    plugin_name,
)
from ..preload import PreloadError, Preloads
from ..protocol.messages import (
    Message,
    Outcome,
    RegisterSchedulerPlugin,
    RegisterWorker,
    RegisterWorkerPlugin,
    Results,
    Run,
    RunOnScheduler,
    SetupPlugin,
    TeardownPlugin,
    UnregisterSchedulerPlugin,
    UnregisterWorkerPlugin,
    UpdateGraph,
    WorkerResult,
    WorkerRun,
)
from ..protocol.serialize import Payload, deserialize
from ..worker.execution import error_info
from .state import ClientJoined, ClientLeft, WorkerLeft
from .worker_answers import Done, WorkerAnswers

if TYPE_CHECKING:
    from ..comm import Connection
    from .server import Scheduler

logger = logging.getLogger("corral.scheduler.plugins")

#: Client ops handled here (the scheduler's allowlist includes them).
PLUGIN_CLIENT_OPS = frozenset(
    {
        RegisterWorkerPlugin,
        UnregisterWorkerPlugin,
        RegisterSchedulerPlugin,
        UnregisterSchedulerPlugin,
        Run,
        RunOnScheduler,
    }
)

#: Events kept per topic.
EVENTS_PER_TOPIC = 1000


@dataclass
class WorkerPluginEntry:
    """A registered worker plugin: opaque to the scheduler."""

    name: str
    payload: Payload
    registration: str
    nanny: bool = False  # for the workers' supervisors


class PluginHost:
    """Plugins, preloads, run requests and events of one scheduler."""

    def __init__(
        self,
        scheduler: Scheduler,
        preload: str | list[str] | None = None,
        preload_argv: list[str] | list[list[str]] | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.preloads = Preloads("scheduler", preload, preload_argv)
        self.plugins: dict[str, Any] = {}
        self.worker_plugins: dict[str, WorkerPluginEntry] = {}
        self.nanny_plugins: dict[str, WorkerPluginEntry] = {}
        self.events: dict[str, deque[tuple[float, Any]]] = {}
        self.hooks = HookRunner(logger, on_error=self._hook_failed)
        self._hooks: dict[str, set[str]] = {}  # plugin name -> hooks it implements
        self._by_hook: dict[str, list[tuple[str, Any]]] = {}  # hook -> [(name, plugin)]
        self._answers = WorkerAnswers(scheduler)
        # Joining workers whose plugin setups are still running: address ->
        # [setups left, callbacks to call once none is left] (see when_set_up).
        self._joining: dict[str, list[Any]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        """Run preload setups, then ``start`` of every plugin added so far."""
        await self.preloads.setup(self.scheduler)
        for name, plugin in list(self.plugins.items()):
            if "start" not in self._hooks.get(name, ()):
                continue
            try:
                await maybe_await(plugin.start(self.scheduler))
            except Exception as exc:
                logger.error("scheduler plugin %r failed to start", name, exc_info=True)
                raise PreloadError(
                    f"scheduler plugin {name!r}: start failed: {type(exc).__name__}: {exc}"
                ) from exc

    async def close(self) -> None:
        """``before_close`` and ``close`` of every plugin, then preload teardowns."""
        for hook in ("before_close", "close"):
            for name, plugin in list(self.plugins.items()):
                if hook not in self._hooks.get(name, ()):
                    continue
                try:
                    await maybe_await(getattr(plugin, hook)())
                except Exception as exc:
                    self.hooks.failed(name, hook, exc)
        await self.preloads.teardown(self.scheduler)
        for task in list(self._tasks):
            task.cancel()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- scheduler plugins ---------------------------------------------------------
    def add_plugin(
        self, plugin: Any, *, idempotent: bool | None = None, name: str | None = None
    ) -> None:
        """Add a scheduler plugin (its ``start`` is not called: see :meth:`register`)."""
        name = plugin_name(plugin, name)
        if idempotent is None:
            idempotent = bool(getattr(plugin, "idempotent", False))
        if name in self.plugins:
            if idempotent:
                return
            logger.warning("a scheduler plugin named %r is already added; replacing it", name)
        self.plugins[name] = plugin
        self._hooks[name] = implemented_hooks(
            plugin, SchedulerPlugin, (*SCHEDULER_HOOKS, "start", "before_close", "close")
        )
        self._index()

    def remove_plugin(self, name: str) -> Any:
        """Remove the scheduler plugin ``name`` (``ValueError`` if unknown); return it."""
        try:
            plugin = self.plugins.pop(name)
        except KeyError:
            raise ValueError(f"no scheduler plugin named {name!r}") from None
        self._hooks.pop(name, None)
        self._index()
        return plugin

    def _index(self) -> None:
        by_hook: dict[str, list[tuple[str, Any]]] = {}
        for name, plugin in self.plugins.items():
            for hook in self._hooks[name]:
                by_hook.setdefault(hook, []).append((name, plugin))
        self._by_hook = by_hook

    # -- hooks around the state machine --------------------------------------------
    def mark(self) -> Any:
        """Remember the newest transition before a batch, if a plugin watches transitions."""
        if "transition" not in self._by_hook:
            return False  # nobody watches: after() skips transitions
        log = self.scheduler.state.transition_log
        return log[-1] if log else None

    @property
    def active(self) -> bool:
        """True when some plugin has event hooks (else the scheduler skips the calls)."""
        return bool(self._by_hook)

    def after(self, source: str, events: list[Any], mark: Any) -> None:
        """Call plugin hooks for a batch of events the state machine just handled."""
        by_hook = self._by_hook
        watching = mark is not False  # decided before the batch, as hooks may add plugins
        scheduler = self.scheduler
        for event in events:
            kind = type(event)
            if kind is RegisterWorker:
                self._call("add_worker", scheduler=scheduler, worker=event.address)
            elif kind is WorkerLeft:
                self._call(
                    "remove_worker",
                    scheduler=scheduler,
                    worker=event.address,
                    stimulus_id=f"remove-worker-{time.time()}",
                    expected=event.expected,
                )
            elif kind is ClientJoined:
                self._call("add_client", scheduler=scheduler, client=event.client)
            elif kind is ClientLeft:
                self._call("remove_client", scheduler=scheduler, client=event.client)
            elif kind is UpdateGraph and "update_graph" in by_hook:
                self._call(
                    "update_graph",
                    scheduler,
                    client=source,
                    keys=set(event.wanted),
                    tasks=[t.key for t in event.tasks],
                    annotations={t.key: t.annotations for t in event.tasks if t.annotations},
                    priority={t.key: tuple(t.priority) for t in event.tasks},
                    dependencies={t.key: list(t.deps) for t in event.tasks},
                    stimulus_id=f"update-graph-{time.time()}",
                )
        if watching:
            self._transitions(mark)

    def _call(self, hook: str, *args: Any, **kwargs: Any) -> None:
        for name, plugin in self._by_hook.get(hook, ()):
            started = time.perf_counter()
            self.hooks.call(name, hook, getattr(plugin, hook), *args, **kwargs)
            self.hooks.timed(name, hook, started, 1)

    def _transitions(self, mark: Any) -> None:
        log = self.scheduler.state.transition_log
        new: list[tuple[str, str, str, str]] = []
        for entry in reversed(log):
            if entry is mark:
                break
            new.append(entry)
        if not new:
            return
        new.reverse()
        for name, plugin in self._by_hook.get("transition", ()):
            hook = plugin.transition
            started = time.perf_counter()
            for key, start, finish, stimulus in new:
                self.hooks.call(name, "transition", hook, key, start, finish, stimulus_id=stimulus)
            self.hooks.timed(name, "transition", started, len(new))

    # -- events --------------------------------------------------------------------
    def log_event(self, topic: str | list[str], msg: Any) -> None:
        """Record ``msg`` under ``topic`` (or each of several topics), with the time."""
        topics = [topic] if isinstance(topic, str) else list(topic)
        now = time.time()
        for t in topics:
            box = self.events.get(t)
            if box is None:
                box = self.events[t] = deque(maxlen=EVENTS_PER_TOPIC)
            box.append((now, msg))
            for name, plugin in self._by_hook.get("log_event", ()):
                self.hooks.call(name, "log_event", plugin.log_event, t, msg)

    def get_events(self, topic: str | None = None) -> Any:
        """Events of ``topic`` as ``[[time, msg], ...]``, or of every topic by name."""
        if topic is not None:
            return [list(e) for e in self.events.get(topic, ())]
        return {t: [list(e) for e in box] for t, box in self.events.items()}

    def _hook_failed(self, name: str, hook: str, exc: BaseException) -> None:
        if hook == "log_event":
            return  # recording it would call the failing hook again
        self.log_event(
            "plugins",
            {
                "action": "scheduler-plugin-failed",
                "name": name,
                "hook": hook,
                "exception": f"{type(exc).__name__}: {exc}",
            },
        )

    # -- workers coming and going --------------------------------------------------
    def worker_joining(self, address: str, conn: Connection) -> None:
        """Hand every registered worker plugin to a joining worker (before anything else)."""
        # Nanny plugins first: one may restart the worker, which then gets all again.
        entries = [*self.nanny_plugins.values(), *self.worker_plugins.values()]
        if entries:
            self._joining[address] = [len(entries), []]
        for entry in entries:
            sid = self._answers.expect(
                {address}, functools.partial(self._joined_setup_done, entry.name)
            )
            conn.send(
                SetupPlugin(
                    id=sid,
                    name=entry.name,
                    plugin=entry.payload,
                    registration=entry.registration,
                    nanny=entry.nanny,
                )
            )

    def when_set_up(self, address: str, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once the plugins handed to joining ``address`` were set up."""
        joining = self._joining.get(address)
        if joining is None:
            callback()
        else:
            joining[1].append(callback)

    def _joined_setup_done(self, name: str, outcomes: dict[str, Outcome]) -> None:
        for address in outcomes:
            joining = self._joining.get(address)
            if joining is not None:
                joining[0] -= 1
                if joining[0] <= 0:
                    del self._joining[address]
                    for callback in joining[1]:
                        callback()
        for address, outcome in outcomes.items():
            if outcome.error is None:
                continue
            err = outcome.error
            logger.warning(
                "worker plugin %r failed to set up on joining worker %s: %s: %s\n%s",
                name,
                address,
                err.typename,
                err.message,
                err.traceback_text,
            )
            self.log_event(
                "plugins",
                {
                    "action": "setup-failed",
                    "name": name,
                    "worker": address,
                    "exception": f"{err.typename}: {err.message}",
                    "traceback": err.traceback_text,
                },
            )

    def worker_left(self, address: str) -> None:
        """Answers a leaving worker still owed arrive as errors."""
        self._answers.worker_left(address)

    def worker_result(self, address: str, msg: WorkerResult) -> None:
        """A worker answered a request sent from here."""
        self._answers.answer(msg.id, address, msg.outcome)

    def _ask_workers(
        self, addresses: list[str], make: Callable[[int], Message], done: Done
    ) -> None:
        """Send ``make(sid)`` to each worker; call ``done(outcomes)`` once all answered."""
        self._answers.ask(addresses, make, done)

    # -- client ops ----------------------------------------------------------------
    def handle_client(self, client_id: str, conn: Connection, msg: Message) -> None:
        """Carry out one plugin or run op from a client; the answer goes back on ``conn``."""

        def reply(outcomes: dict[str, Outcome] | None = None, error: Any = None) -> None:
            if not conn.closed:
                rid = msg.id  # type: ignore[attr-defined]
                conn.send(Results(id=rid, outcomes=outcomes or {}, error=error))

        try:
            kind = type(msg)
            if kind is RegisterWorkerPlugin:
                assert isinstance(msg, RegisterWorkerPlugin)
                self._register_worker_plugin(client_id, msg, reply)
            elif kind is UnregisterWorkerPlugin:
                assert isinstance(msg, UnregisterWorkerPlugin)
                self._unregister_worker_plugin(client_id, msg, reply)
            elif kind is Run:
                assert isinstance(msg, Run)
                self._run(msg, reply)
            elif kind is RegisterSchedulerPlugin:
                assert isinstance(msg, RegisterSchedulerPlugin)
                self._spawn(self._register_scheduler_plugin(client_id, msg, reply))
            elif kind is UnregisterSchedulerPlugin:
                assert isinstance(msg, UnregisterSchedulerPlugin)
                self._spawn(self._unregister_scheduler_plugin(msg, reply))
            elif kind is RunOnScheduler:
                assert isinstance(msg, RunOnScheduler)
                self._spawn(self._run_on_scheduler(msg, reply))
        except Exception as exc:
            logger.exception("handling %s from %s failed", type(msg).op, client_id)
            reply(error=error_info(exc))

    def _register_worker_plugin(
        self, client_id: str, msg: RegisterWorkerPlugin, reply: Callable[..., None]
    ) -> None:
        registry = self.nanny_plugins if msg.nanny else self.worker_plugins
        if msg.name in registry and msg.idempotent:
            reply({})
            return
        entry = WorkerPluginEntry(msg.name, msg.plugin, uuid.uuid4().hex, msg.nanny)
        registry.pop(msg.name, None)  # a new registration goes last
        registry[msg.name] = entry
        kind = "nanny" if msg.nanny else "worker"
        self.log_event(
            "plugins", {"action": f"register-{kind}-plugin", "name": msg.name, "client": client_id}
        )
        self._ask_workers(
            list(self.scheduler.state.workers),
            lambda sid: SetupPlugin(
                id=sid,
                name=entry.name,
                plugin=entry.payload,
                registration=entry.registration,
                nanny=entry.nanny,
            ),
            # A setup may restart its worker (PipInstall(restart_workers=True)): the
            # answer waits until such workers are back (corral.scheduler.consistency).
            lambda outcomes: self.scheduler._consistency.after_restarts(outcomes, reply),
        )

    def _unregister_worker_plugin(
        self, client_id: str, msg: UnregisterWorkerPlugin, reply: Callable[..., None]
    ) -> None:
        registry = self.nanny_plugins if msg.nanny else self.worker_plugins
        kind = "nanny" if msg.nanny else "worker"
        if registry.pop(msg.name, None) is None:
            reply(error=error_info(ValueError(f"no {kind} plugin named {msg.name!r}")))
            return
        self.log_event(
            "plugins",
            {"action": f"unregister-{kind}-plugin", "name": msg.name, "client": client_id},
        )
        self._ask_workers(
            list(self.scheduler.state.workers),
            lambda sid: TeardownPlugin(id=sid, name=msg.name, nanny=msg.nanny),
            reply,
        )

    def _run(self, msg: Run, reply: Callable[..., None]) -> None:
        workers = self.scheduler.state.workers
        if msg.workers is None:
            targets = list(workers)
        else:
            by_name = {str(ws.name): addr for addr, ws in workers.items()}
            targets, unknown = [], []
            for w in msg.workers:
                if w in workers:
                    targets.append(w)
                elif w in by_name:
                    targets.append(by_name[w])
                else:
                    unknown.append(w)
            if unknown:
                reply(error=error_info(ValueError(f"unknown workers: {unknown}")))
                return
        self._ask_workers(
            list(dict.fromkeys(targets)),
            lambda sid: WorkerRun(id=sid, function=msg.function, args=msg.args, wait=msg.wait),
            reply,
        )

    async def _register_scheduler_plugin(
        self, client_id: str, msg: RegisterSchedulerPlugin, reply: Callable[..., None]
    ) -> None:
        if msg.name in self.plugins and msg.idempotent:
            reply({})
            return
        try:
            plugin = deserialize(msg.plugin)
            if callable(getattr(plugin, "start", None)):
                await maybe_await(plugin.start(self.scheduler))
            self.add_plugin(plugin, name=msg.name, idempotent=msg.idempotent)
        except Exception as exc:
            logger.warning(
                "scheduler plugin %r from %s failed to start: %r", msg.name, client_id, exc
            )
            reply(error=error_info(exc))
            return
        self.log_event(
            "plugins",
            {"action": "register-scheduler-plugin", "name": msg.name, "client": client_id},
        )
        reply({self.scheduler.address: Outcome()})

    async def _unregister_scheduler_plugin(
        self, msg: UnregisterSchedulerPlugin, reply: Callable[..., None]
    ) -> None:
        try:
            hooks = self._hooks.get(msg.name, set())
            plugin = self.remove_plugin(msg.name)
            if "close" in hooks:
                await maybe_await(plugin.close())
        except Exception as exc:
            reply(error=error_info(exc))
            return
        reply({self.scheduler.address: Outcome()})

    async def _run_on_scheduler(self, msg: RunOnScheduler, reply: Callable[..., None]) -> None:
        names = ("dask_scheduler", "corral_scheduler")
        outcome = await call_payload(msg.function, msg.args, names, self.scheduler)
        reply({self.scheduler.address: outcome})
