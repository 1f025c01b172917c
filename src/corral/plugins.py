"""Plugins: code that runs around the life of workers and of the scheduler.

Two kinds, with dask.distributed's names and hook signatures so that existing
plugins work unchanged:

* :class:`WorkerPlugin`: registered with ``client.register_plugin(plugin)``.
  It travels by value (cloudpickle, so classes defined in ``__main__`` work),
  is kept on the scheduler as opaque bytes, and is set up on every current
  worker and on every worker that joins later.
* :class:`SchedulerPlugin`: added with ``scheduler.add_plugin(plugin)`` (from a
  preload) or sent with ``client.register_plugin(plugin)``; its hooks see
  workers and clients come and go, graphs arrive and tasks change state.

Where hooks run
---------------
Every hook runs on the event loop thread of its service (the worker's or the
scheduler's), never in a task thread.  A hook may be a plain function or a
coroutine function:

* ``WorkerPlugin.setup`` / ``teardown`` and ``SchedulerPlugin.start`` /
  ``close`` are awaited: messages the scheduler sends to a worker after a
  plugin's setup started are handled once it finished.
* Event hooks (``transition``, ``add_worker``, ``update_graph``, ...) are called
  as the event happens; a coroutine they return runs as a background task.
  They must be quick: the engine waits for them.  Each batch of hook calls is
  timed and a warning is logged when one plugin takes longer than
  :data:`SLOW_HOOK_SECONDS`.
* An exception in an event hook is logged (with its traceback the 1st, 2nd,
  4th, 8th, ... time) and recorded in the scheduler's ``"plugins"`` event
  topic; it never stops the engine.

Example::

    from corral import Client, WorkerPlugin

    class Counter(WorkerPlugin):
        name = "counter"

        def setup(self, worker):
            self.finished = 0

        def transition(self, key, start, finish, **kwargs):
            if finish == "memory":
                self.finished += 1

    client = Client()
    client.register_plugin(Counter())
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from .protocol.messages import Outcome
from .protocol.serialize import Payload, deserialize, serialize

__all__ = ["SLOW_HOOK_SECONDS", "SchedulerPlugin", "WorkerPlugin"]

#: A plugin whose hooks hold the event loop longer than this in one go is reported.
SLOW_HOOK_SECONDS = 0.1

#: At most one slow-hook warning per plugin and hook in this many seconds.
_SLOW_WARNING_INTERVAL = 10.0


class WorkerPlugin:
    """Base class of worker plugins; every method is optional.

    Give the plugin a ``name`` attribute to make registrations replace each
    other (without one, each registration gets a fresh name).  With
    ``idempotent = True``, registering a name that is already registered keeps
    the first plugin and does nothing.

    Example::

        class Tracer(WorkerPlugin):
            name = "tracer"

            def setup(self, worker):
                self.worker = worker

            def transition(self, key, start, finish, **kwargs):
                print(self.worker.address, key, start, "->", finish)
    """

    idempotent: bool = False

    def setup(self, worker: Any) -> Any:
        """Run when the plugin is registered on ``worker`` or ``worker`` joins."""

    def teardown(self, worker: Any) -> Any:
        """Run when the plugin is unregistered or replaced, or the worker closes."""

    def transition(self, key: str, start: str, finish: str, **kwargs: Any) -> None:
        """A task of this worker moved from state ``start`` to state ``finish``.

        Worker task states: ``released``, ``waiting``, ``ready``,
        ``constrained``, ``executing``, ``memory``, ``error``, ``fetch``,
        ``flight``, ``missing``, ``cancelled``, ``forgotten``.
        """


class SchedulerPlugin:
    """Base class of scheduler plugins; every method is optional.

    Keyword arguments follow dask.distributed's, so hooks written for it
    work here (accept ``**kwargs`` to stay compatible with new arguments).

    Example::

        class Joins(SchedulerPlugin):
            def add_worker(self, scheduler=None, worker=None, **kwargs):
                print("Added a new worker at:", worker)
    """

    idempotent: bool = False

    async def start(self, scheduler: Any) -> None:
        """The scheduler started (or the plugin was registered on a running one)."""

    async def before_close(self) -> None:
        """The scheduler is about to close."""

    async def close(self) -> None:
        """The scheduler closed, or the plugin was unregistered."""

    def update_graph(
        self,
        scheduler: Any,
        *,
        client: str,
        keys: set[str],
        tasks: list[str],
        annotations: dict[str, Any],
        priority: dict[str, Any],
        dependencies: dict[str, list[str]],
        stimulus_id: str,
        **kwargs: Any,
    ) -> None:
        """A client submitted tasks: ``tasks`` (keys), of which it wants ``keys``."""

    def restart(self, scheduler: Any) -> None:
        """The cluster restarted."""

    def transition(
        self, key: str, start: str, finish: str, *args: Any, stimulus_id: str, **kwargs: Any
    ) -> None:
        """Task ``key`` moved from ``start`` to ``finish`` on the scheduler."""

    def add_worker(self, scheduler: Any, worker: str) -> None:
        """A worker joined; ``worker`` is its address."""

    def remove_worker(
        self, scheduler: Any, worker: str, *, stimulus_id: str, **kwargs: Any
    ) -> None:
        """A worker left; ``worker`` is its address."""

    def add_client(self, scheduler: Any, client: str) -> None:
        """A client connected; ``client`` is its id."""

    def remove_client(self, scheduler: Any, client: str) -> None:
        """A client disconnected."""

    def log_event(self, topic: str, msg: Any) -> None:
        """An event was recorded on the scheduler (see ``Client.get_events``)."""


#: Hooks of scheduler plugins called from scheduler events.
SCHEDULER_HOOKS = (
    "update_graph",
    "transition",
    "add_worker",
    "remove_worker",
    "add_client",
    "remove_client",
    "log_event",
    "restart",
)


def plugin_name(plugin: Any, name: str | None = None) -> str:
    """The name a plugin is registered under: ``name``, its ``name`` attribute, or a fresh one."""
    if name is not None:
        return str(name)
    own = getattr(plugin, "name", None)
    if isinstance(own, str) and own:
        return own
    return f"{type(plugin).__name__}-{uuid.uuid4()}"


def implemented_hooks(plugin: Any, base: type, names: Iterable[str]) -> set[str]:
    """The hooks ``plugin`` really implements (the base class's no-ops left out)."""
    out = set()
    for name in names:
        attr = getattr(plugin, name, None)
        if not callable(attr):
            continue
        if getattr(attr, "__func__", None) is getattr(base, name, None):
            continue
        out.add(name)
    return out


def with_service(
    fn: Callable[..., Any], kwargs: dict[str, Any], names: tuple[str, ...], service: Any
) -> dict[str, Any]:
    """Add ``service`` to ``kwargs`` under each of ``names`` that ``fn`` takes as a parameter.

    ``client.run(f)`` gives the worker to ``f(dask_worker)`` or
    ``f(corral_worker)``; ``run_on_scheduler`` the scheduler to
    ``dask_scheduler`` / ``corral_scheduler``.
    """
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return kwargs
    wanted = [n for n in names if n in params]
    if not wanted:
        return kwargs
    return {**kwargs, **dict.fromkeys(wanted, service)}


class HookRunner:
    """Calls plugin hooks for a service: errors logged, slow hooks reported.

    ``on_error(plugin_name, hook, exc)`` is told about every failure (the
    scheduler records them as events); logging is thinned out to the 1st,
    2nd, 4th, 8th, ... failure of a hook so a hook failing on every task does
    not flood the log.
    """

    def __init__(
        self,
        logger: logging.Logger,
        on_error: Callable[[str, str, BaseException], None] | None = None,
        slow: float | None = None,
    ) -> None:
        self.logger = logger
        self.on_error = on_error
        self.slow = SLOW_HOOK_SECONDS if slow is None else slow
        self.failures: dict[tuple[str, str], int] = {}
        self._slow_warned: dict[tuple[str, str], float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def failed(self, name: str, hook: str, exc: BaseException) -> None:
        """Log (thinned out) and report a failure of ``hook`` of plugin ``name``."""
        n = self.failures.get((name, hook), 0) + 1
        self.failures[(name, hook)] = n
        if n & (n - 1) == 0:  # 1, 2, 4, 8, ...
            self.logger.error(
                "plugin %r: %s failed (failure %d of this hook)",
                name,
                hook,
                n,
                exc_info=(type(exc), exc, exc.__traceback__),
            )
        if self.on_error is not None:
            try:
                self.on_error(name, hook, exc)
            except Exception:
                self.logger.exception("recording the failure of plugin %r failed", name)

    def call(self, name: str, hook: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Call one event hook: errors logged; a returned coroutine runs as a task."""
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            self.failed(name, hook, exc)
            return
        if inspect.isawaitable(result):
            self.background(name, hook, result)

    def background(self, name: str, hook: str, awaitable: Any) -> None:
        """Run an awaitable a hook returned as a task; its failure is reported too."""

        async def run() -> None:
            try:
                await awaitable
            except Exception as exc:
                self.failed(name, hook, exc)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def timed(self, name: str, hook: str, started: float, calls: int) -> None:
        """Warn when hooks of one plugin held the loop for too long (``started``: perf_counter)."""
        took = time.perf_counter() - started
        if took < self.slow:
            return
        now = time.monotonic()
        last = self._slow_warned.get((name, hook))
        if last is not None and now - last < _SLOW_WARNING_INTERVAL:
            return
        self._slow_warned[(name, hook)] = now
        self.logger.warning(
            "plugin %r: %d %s hook call(s) held the event loop for %.3fs "
            "(more than %.3fs); slow hooks delay every task",
            name,
            calls,
            hook,
            took,
            self.slow,
        )


async def maybe_await(result: Any) -> Any:
    """Await ``result`` if it is awaitable; return it (or what it gave)."""
    if inspect.isawaitable(result):
        return await result
    return result


async def call_payload(
    function: Payload, args: Payload, names: tuple[str, ...], service: Any
) -> Outcome:
    """Load and call ``function(*args, **kwargs)`` here, giving ``service`` to ``names``.

    For ``client.run`` (on workers) and ``run_on_scheduler``: runs on the
    calling (event loop) thread and awaits a coroutine.  Returns the pickled
    result, or the error with its traceback.
    """
    from .worker.execution import error_info  # the worker package imports this module

    try:
        fn = deserialize(function)
        fargs, fkwargs = deserialize(args)
        fkwargs = with_service(fn, dict(fkwargs), names, service)
        result = fn(*fargs, **fkwargs)
        if inspect.isawaitable(result):
            result = await result
    except Exception as exc:
        return Outcome(error=error_info(exc))
    try:
        return Outcome(result=serialize(result))
    except Exception as exc:
        return Outcome(error=error_info(exc))
