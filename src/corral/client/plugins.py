"""The client's plugin, ``run`` and event methods (mixed into :class:`~corral.Client`).

Each method sends one op (see ``docs/protocol.md``, "Plugins and run") and
waits for the scheduler's :class:`~corral.protocol.messages.Results` with the
same id.  Remote errors are raised here as the original exception, with the
remote traceback and the address of the worker (or scheduler) where it
happened.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from ..plugins import SCHEDULER_HOOKS, NannyPlugin, SchedulerPlugin, WorkerPlugin, plugin_name
from ..protocol.messages import (
    ErrorInfo,
    Message,
    Outcome,
    RegisterSchedulerPlugin,
    RegisterWorkerPlugin,
    Results,
    Run,
    RunOnScheduler,
    UnregisterSchedulerPlugin,
    UnregisterWorkerPlugin,
)
from ..protocol.serialize import deserialize, serialize, serialize_function
from .future import rebuild_error

_WORKER_HOOKS = ("setup", "teardown", "transition")


def remote_error(error: ErrorInfo, where: str | None = None) -> BaseException:
    """Rebuild a remote exception; ``where`` (a worker address) is named in its traceback."""
    if where is not None:
        text = f"(raised on {where})\n{error.traceback_text}"
        error = dataclasses.replace(error, traceback_text=text)
    exc = rebuild_error(error)
    if where is not None and hasattr(exc, "add_note"):
        exc.add_note(f"raised on {where}")
    return exc


def _raise_first(outcomes: dict[str, Outcome]) -> None:
    for address in sorted(outcomes):
        error = outcomes[address].error
        if error is not None:
            raise remote_error(error, address)


def _status(outcomes: dict[str, Outcome]) -> dict[str, Any]:
    """``{address: status}``: ``{"status": "OK"}``, or what the worker said instead.

    A worker with no supervisor answers a nanny plugin with a pickled
    ``{"status": "no-nanny", "message": ...}``.
    """
    out: dict[str, Any] = {}
    for address in sorted(outcomes):
        result = outcomes[address].result
        out[address] = {"status": "OK"} if result is None else deserialize(result)
    return out


def _plugin_kind(plugin: Any) -> str:
    if isinstance(plugin, NannyPlugin):
        return "nanny"
    if isinstance(plugin, SchedulerPlugin):
        return "scheduler"
    if isinstance(plugin, WorkerPlugin):
        return "worker"
    if isinstance(plugin, type):
        raise TypeError(f"register_plugin needs a plugin instance, got the class {plugin!r}")
    if any(callable(getattr(plugin, h, None)) for h in _WORKER_HOOKS):
        return "worker"
    if any(callable(getattr(plugin, h, None)) for h in (*SCHEDULER_HOOKS, "start", "close")):
        return "scheduler"
    raise TypeError(
        f"{type(plugin).__name__} is neither a WorkerPlugin nor a SchedulerPlugin "
        "(it has none of their methods)"
    )


class PluginMethods:
    """``register_plugin``, ``run``, ``run_on_scheduler``, ``get_events`` and friends."""

    if TYPE_CHECKING:  # provided by Client
        _request_ids: itertools.count[int]
        _requests: dict[int, asyncio.Future[Any]]

        def _send(self, msg: Message) -> None: ...
        def _sync(self, coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any: ...
        async def _request(self, method: str, **args: Any) -> Any: ...

    async def _ask(self, make: Callable[[int], Message]) -> Results:
        """Send ``make(id)`` and wait (without a time limit) for the ``results`` answer."""
        loop = asyncio.get_running_loop()
        rid = next(self._request_ids)
        fut: asyncio.Future[Any] = loop.create_future()
        self._requests[rid] = fut
        self._send(make(rid))
        try:
            results = await fut
        finally:
            self._requests.pop(rid, None)
        if not isinstance(results, Results):
            raise RuntimeError(f"unexpected answer {results!r} from the scheduler")
        if results.error is not None:
            raise remote_error(results.error)
        return results

    # -- plugins -------------------------------------------------------------------
    def register_plugin(
        self, plugin: Any, name: str | None = None, idempotent: bool | None = None
    ) -> Any:
        """Register a worker, nanny or scheduler plugin (:class:`~corral.WorkerPlugin`, ...).

        A worker plugin is sent by value, kept by the scheduler (unopened) and
        set up on every current worker and every worker that joins later; it
        returns ``{worker_address: {"status": "OK"}}`` for the current workers,
        or raises the first setup error (with the remote traceback and the
        worker's address).  A later worker whose setup fails is logged and
        recorded under ``client.get_events("plugins")``.

        ``name`` defaults to ``plugin.name`` (else a fresh unique name).
        Registering a name again tears down the old plugin and sets up the new
        one, unless the plugin is ``idempotent`` (then the first is kept).

        A nanny plugin goes the same way to the supervisor (nanny) of every
        current and future supervised worker; a worker with no supervisor is
        reported as ``{"status": "no-nanny", "message": ...}``.  With
        ``plugin.restart`` the workers restart after its setup, and this
        returns once they are back.

        A scheduler plugin is unpickled on the scheduler, started
        (``plugin.start(scheduler)``) and added.

        Example::

            class Setup(WorkerPlugin):
                name = "setup"
                def setup(self, worker):
                    worker.my_resource = open_connection()

            client.register_plugin(Setup())
        """
        name = plugin_name(plugin, name)
        if idempotent is None:
            idempotent = bool(getattr(plugin, "idempotent", False))
        payload = serialize(plugin)
        kind = _plugin_kind(plugin)
        if kind == "scheduler":
            coro: Coroutine[Any, Any, Any] = self._register_scheduler_plugin(
                name, payload, idempotent
            )
        else:
            coro = self._register_worker_plugin(name, payload, idempotent, kind == "nanny")
        return self._sync(coro)

    async def _register_worker_plugin(
        self, name: str, payload: Any, idempotent: bool, nanny: bool = False
    ) -> dict[str, Any]:
        results = await self._ask(
            lambda rid: RegisterWorkerPlugin(
                id=rid, name=name, plugin=payload, idempotent=idempotent, nanny=nanny
            )
        )
        _raise_first(results.outcomes)
        return _status(results.outcomes)

    async def _register_scheduler_plugin(self, name: str, payload: Any, idempotent: bool) -> None:
        await self._ask(
            lambda rid: RegisterSchedulerPlugin(
                id=rid, name=name, plugin=payload, idempotent=idempotent
            )
        )

    def register_worker_plugin(
        self, plugin: Any = None, name: str | None = None, nanny: bool | None = None
    ) -> Any:
        """Register a worker plugin (dask.distributed's older name for :meth:`register_plugin`).

        ``nanny=True`` registers it as a nanny plugin (the default: a
        :class:`~corral.NannyPlugin` is one).
        """
        if nanny is None:
            nanny = isinstance(plugin, NannyPlugin)
        name = plugin_name(plugin, name)
        idempotent = bool(getattr(plugin, "idempotent", False))
        return self._sync(
            self._register_worker_plugin(name, serialize(plugin), idempotent, bool(nanny))
        )

    def register_scheduler_plugin(
        self, plugin: Any, name: str | None = None, idempotent: bool | None = None
    ) -> Any:
        """Register a scheduler plugin (an older name of :meth:`register_plugin`)."""
        name = plugin_name(plugin, name)
        if idempotent is None:
            idempotent = bool(getattr(plugin, "idempotent", False))
        return self._sync(self._register_scheduler_plugin(name, serialize(plugin), idempotent))

    def unregister_worker_plugin(self, name: str, nanny: bool | None = None) -> Any:
        """Tear down the worker plugin ``name`` on every worker and forget it.

        With ``nanny=True``: the nanny plugin ``name``, torn down in every
        worker's supervisor.  Returns ``{worker_address: {"status": "OK"}}``
        (``"no-nanny"`` for unsupervised workers); raises ``ValueError`` for
        an unknown name, or the first teardown error.
        """
        return self._sync(self._unregister_worker_plugin(name, bool(nanny)))

    async def _unregister_worker_plugin(self, name: str, nanny: bool = False) -> dict[str, Any]:
        results = await self._ask(
            lambda rid: UnregisterWorkerPlugin(id=rid, name=name, nanny=nanny)
        )
        _raise_first(results.outcomes)
        return _status(results.outcomes)

    def unregister_scheduler_plugin(self, name: str) -> Any:
        """Close and remove the scheduler plugin ``name`` (``ValueError`` if unknown)."""
        return self._sync(self._unregister_scheduler_plugin(name))

    async def _unregister_scheduler_plugin(self, name: str) -> None:
        await self._ask(lambda rid: UnregisterSchedulerPlugin(id=rid, name=name))

    # -- run -----------------------------------------------------------------------
    def run(
        self,
        function: Callable[..., Any],
        *args: Any,
        workers: Any = None,
        wait: bool = True,
        nanny: bool = False,
        on_error: str = "raise",
        **kwargs: Any,
    ) -> Any:
        """Call ``function(*args, **kwargs)`` on every worker (or on ``workers``).

        Returns ``{worker_address: result}``.  The function runs on each
        worker's event loop thread (a coroutine function is awaited; with
        ``wait=False`` it is only started and its result is ``None``), so it
        should be quick.  A parameter named ``dask_worker`` or
        ``corral_worker`` receives the :class:`~corral.Worker`.  Errors:
        ``on_error="raise"`` (default) raises the first, with the remote
        traceback; ``"return"`` puts the exception in the result; ``"ignore"``
        leaves that worker out.

        Example::

            client.run(os.getpid)                                  # {addr: pid, ...}
            client.run(lambda dask_worker: len(dask_worker.data))
        """
        if nanny:
            raise NotImplementedError("Corral has no nanny processes to run functions in")
        if on_error not in ("raise", "return", "ignore"):
            raise ValueError(f"on_error must be 'raise', 'return' or 'ignore', not {on_error!r}")
        if isinstance(workers, str):
            workers = [workers]
        fn = serialize_function(function)
        packed = serialize((args, kwargs))
        targets = list(workers) if workers is not None else None
        return self._sync(self._run(fn, packed, targets, wait, on_error))

    async def _run(
        self, fn: Any, packed: Any, workers: list[str] | None, wait: bool, on_error: str
    ) -> dict[str, Any]:
        results = await self._ask(
            lambda rid: Run(id=rid, function=fn, args=packed, workers=workers, wait=wait)
        )
        if on_error == "raise":
            _raise_first(results.outcomes)
        out: dict[str, Any] = {}
        for address in sorted(results.outcomes):
            outcome = results.outcomes[address]
            if outcome.error is not None:
                if on_error == "return":
                    out[address] = remote_error(outcome.error, address)
                continue
            out[address] = None if outcome.result is None else deserialize(outcome.result)
        return out

    def run_on_scheduler(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``function(*args, **kwargs)`` on the scheduler and return its result.

        It runs on the scheduler's event loop thread (a coroutine function is
        awaited); a parameter named ``dask_scheduler`` or ``corral_scheduler``
        receives the :class:`~corral.Scheduler`.

        Example::

            client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.workers))
        """
        fn = serialize_function(function)
        packed = serialize((args, kwargs))
        return self._sync(self._run_on_scheduler(fn, packed))

    async def _run_on_scheduler(self, fn: Any, packed: Any) -> Any:
        results = await self._ask(lambda rid: RunOnScheduler(id=rid, function=fn, args=packed))
        _raise_first(results.outcomes)
        for outcome in results.outcomes.values():
            return None if outcome.result is None else deserialize(outcome.result)
        return None

    # -- events --------------------------------------------------------------------
    def get_events(self, topic: str | None = None) -> Any:
        """Events recorded on the scheduler: ``((time, msg), ...)`` for ``topic``, else by topic.

        Topic ``"plugins"`` has plugin registrations and failures (a worker
        plugin failing to set up on a worker that joined later, a scheduler
        plugin hook raising).
        """
        return self._sync(self._get_events(topic))

    async def _get_events(self, topic: str | None) -> Any:
        events = await self._request("get_events", topic=topic)
        if topic is not None:
            return tuple(tuple(e) for e in events)
        return {t: tuple(tuple(e) for e in box) for t, box in events.items()}
