"""The user's handle on a cluster: submit work, get results.

Method names and semantics follow ``distributed.Client`` so that moving over
is a change of import.  In synchronous mode (the default) the client runs its
own event loop in a background thread and every method blocks; with
``asynchronous=True`` it uses the caller's loop and methods are awaitable.
``submit`` and ``map`` never block in either mode: they serialize in the
calling thread and queue one message.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import logging
import os
import threading
import uuid
from collections.abc import Callable, Coroutine, Hashable, Iterable, Mapping
from typing import Any

from .. import config
from .._gc import paused_gc
from .._loop import LoopThread
from ..comm import Connection
from ..comm.handshake import connect, connect_with_retry
from ..comm.security import Security, local_token, read_scheduler_file, resolve_token
from ..errors import CommClosedError
from ..protocol.messages import (
    CancelKeys,
    Data,
    GetData,
    KeyCancelled,
    KeyErred,
    KeyInMemory,
    KeyLost,
    Message,
    ReleaseKeys,
    Reply,
    Request,
    Results,
    Scatter,
    SetResources,
    TaskSpec,
    UpdateGraph,
    WatchResults,
)
from ..protocol.serialize import (
    REF_KEY,
    FunctionTable,
    Payload,
    Ref,
    deserialize,
    payload_digest,
    serialize,
    serialize_function,
    sizeof,
)
from ..resources import validate_resources, validate_worker_resources
from ..versions import check_mode, get_versions
from .consistency import ConsistencyMethods
from .environments import EnvironmentMethods, environment_names
from .future import Future, FutureState
from .graph import ConvertedGraph, execute_node, flatten_keys, pack_results, stringify
from .plugins import PluginMethods

logger = logging.getLogger("corral.client")

#: Seconds a key release may wait to leave with the next message (see Client._send).
LAZY_FLUSH_DELAY = 0.01

#: ``map`` sends its tasks in messages of at most this many (``batch_size``).
MAP_BATCH_SIZE = 2_000

#: A graph of more than twice this many tasks is sent in parts of this many.
GRAPH_PART_SIZE = 1_000

_PLAIN = (int, float, str, bytes, bool, type(None), complex)

_current_client: list[Client] = []


def default_client() -> Client:
    """The most recently created client that is still open."""
    for client in reversed(_current_client):
        if client.status == "running":
            return client
    raise ValueError("no Corral client is running: create one with corral.Client()")


class Client(PluginMethods, EnvironmentMethods, ConsistencyMethods):
    """Connect to a Corral scheduler (or start a local cluster) and run work on it.

    Example::

        from corral import Client
        client = Client()                      # starts a LocalCluster
        future = client.submit(sum, [1, 2, 3])
        future.result()                        # 6
        client.close()
    """

    def __init__(
        self,
        address: Any = None,
        *,
        asynchronous: bool = False,
        timeout: float | None = None,
        name: str | None = None,
        token: str | None = None,
        set_as_default: bool = True,
        security: Security | None = None,
        tls_ca_file: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        scheduler_file: str | None = None,
        version_check: str = "warn",
        **cluster_kwargs: Any,
    ) -> None:
        timeout = float(config.get("client.timeout", timeout))  # default 30 s (corral.config)
        # On connect, compare versions with the scheduler's and workers' (corral.versions):
        # "warn" (a VersionMismatchWarning), "strict" (raise; the scheduler also refuses
        # mismatched workers while this client is connected) or "off".
        self.version_check = check_mode(version_check)
        # TLS for tls:// addresses: ``security=Security(...)`` or the tls_* arguments.
        self.security = Security.from_options(security, tls_ca_file, tls_cert, tls_key)
        if scheduler_file is not None:
            if address is not None:
                raise ValueError("give a scheduler address or scheduler_file, not both")
            info = read_scheduler_file(scheduler_file, timeout)
            address = str(info["address"])
            token = resolve_token(token, scheduler_info=info)
        self.asynchronous = asynchronous
        self.timeout = timeout
        self.name = name
        self.id = f"client-{uuid.uuid4().hex[:12]}"
        self.status = "created"
        self.cluster: Any = None
        self._own_cluster = False
        self._cluster_kwargs = cluster_kwargs
        if address is None:
            self._own_cluster = True
        elif hasattr(address, "scheduler_address"):
            self.cluster = address
            token = token or getattr(address, "token", None)
            self.security = self.security or getattr(address, "security", None)
        elif not isinstance(address, str):
            raise TypeError(f"Client address must be a string or a cluster, not {address!r}")
        else:
            # A cluster this process started knows its token; else $CORRAL_AUTH_TOKEN.
            token = token or local_token(address) or resolve_token(None)
        self._address = address if isinstance(address, str) else None
        self.token = token
        self._lost_reason: str | None = None
        # Re-entrant: a Future collected by the garbage collector while this
        # thread holds the lock releases its key (Future.__del__ -> _release).
        self._lock = threading.RLock()
        self._futures: dict[str, FutureState] = {}
        self._conn: Connection | None = None
        self._workers: dict[str, Connection] = {}
        # Workers that push this client's small results to it (watch_results):
        # address -> connection, or None while connecting or after a failure.
        self._watching: dict[str, Connection | None] = {}
        self._watch_max = (
            int(config.get("client.direct-results-max-workers"))
            if config.get("client.direct-results")
            else 0
        )
        self._worker_locks: dict[str, asyncio.Lock] = {}
        self._requests: dict[int, asyncio.Future[Any]] = {}
        self._request_ids = itertools.count(1)
        self._order = itertools.count()
        self._pending_out: list[Message] = []
        self._watch_tasks: set[asyncio.Task[None]] = set()
        self._flush_scheduled = False
        self._lazy_flush_scheduled = False
        self._functions: dict[int, tuple[Any, str, Payload]] = {}
        self._function_lock = threading.Lock()
        self._loop_thread: LoopThread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.set_as_default = set_as_default
        if not asynchronous:
            self._loop_thread = LoopThread(name="corral-client")
            self.loop = self._loop_thread.loop
            try:
                self._loop_thread.run(self._start(), timeout=None)
            except BaseException:
                self._loop_thread.stop()  # no thread left behind by a failed start
                raise

    # -- lifecycle -----------------------------------------------------------------
    def __await__(self) -> Any:
        return self._start().__await__()

    async def __aenter__(self) -> Client:
        await self._start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    async def _start(self) -> Client:
        if self.status == "running":
            return self
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        if self._own_cluster:
            from ..deploy.local import LocalCluster

            self.cluster = await LocalCluster(asynchronous=True, **self._cluster_kwargs)
            self.token = self.token or self.cluster.token
            self.security = self.security or self.cluster.security
        if self.cluster is not None:
            self._address = self.cluster.scheduler_address
        assert self._address is not None
        deadline = asyncio.get_running_loop().time() + self.timeout
        try:
            conn, welcome = await connect_with_retry(
                self._address,
                deadline=deadline,
                role="client",
                my_id=self.id,
                name=self.name,
                token=self.token,
                versions=get_versions(),
                security=self.security,
            )
        except BaseException:
            if self._own_cluster and self.cluster is not None:
                await self.cluster._close()
            raise
        self._conn = conn
        if self._loop_thread is not None:
            conn.allow_thread_writes()  # user threads write submits themselves
        # The scheduler's services (its dashboard port): see dashboard_link.
        self._services: dict[str, Any] = dict((welcome.info or {}).get("services") or {})
        self._dashboard: dict[str, Any] = dict((welcome.info or {}).get("dashboard") or {})
        conn.set_handler(self._on_messages)
        conn.on_close(self._on_scheduler_closed)
        self.status = "running"
        try:
            await self._connect_version_check()  # client/consistency.py
        except BaseException:
            await self._close()
            raise
        if self.set_as_default:
            _current_client.append(self)
        return self

    def close(self, timeout: float | None = None) -> Any:
        """Close the connection (and the local cluster this client started)."""
        if self.asynchronous:
            return self._close()
        if self.status == "closed" or self._loop_thread is None:
            return None
        try:
            self._loop_thread.run(self._close(), timeout=timeout or self.timeout)
        finally:
            self._loop_thread.stop()
        return None

    async def _close(self) -> None:
        if self.status == "closed":
            return
        self.status = "closed"
        if self in _current_client:
            _current_client.remove(self)
        self._flush_pending()
        if self._conn is not None:
            self._conn.close("client closing")
        for conn in self._workers.values():
            conn.close()
        watches = list(self._watch_tasks)
        for task in watches:
            task.cancel()
        if watches:
            await asyncio.wait(watches, timeout=5)
        for watch in self._watching.values():
            if watch is not None:
                watch.close("client closing")
        for fs in list(self._futures.values()):
            if not fs.done():
                fs.cancel("the client was closed")
        if self._own_cluster and self.cluster is not None:
            await self.cluster._close()

    def _on_scheduler_closed(self, conn: Connection) -> None:
        reason = f"lost the connection to the scheduler at {self._address} ({conn.close_reason})"
        for fut in self._requests.values():
            if not fut.done():
                fut.set_exception(CommClosedError(reason))
        if self.status == "closed":
            return
        self.status = "lost"
        self._lost_reason = reason
        logger.warning("%s", reason)
        # Pending futures can never finish now: result() raises CommClosedError.
        for fs in list(self._futures.values()):
            if not fs.done():
                fs.comm_lost(reason)

    def _check_connected(self) -> None:
        """Raise :class:`CommClosedError` at once if the scheduler is gone."""
        conn = self._conn
        if conn is None or conn.closed or self.status not in ("running", "created"):
            raise CommClosedError(
                self._lost_reason
                or f"not connected to the scheduler at {self._address} ({self.status})"
            )

    def _sync(self, coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        if self.asynchronous:
            return coro
        if self.status != "running":
            coro.close()
            raise CommClosedError(f"the client is {self.status}")
        assert self._loop_thread is not None
        return self._loop_thread.run(coro, timeout)

    @property
    def scheduler_address(self) -> str | None:
        """The address of the scheduler this client talks to."""
        return self._address

    @property
    def dashboard_link(self) -> str | None:
        """``http(s)://HOST:PORT/status[?token=...]``: the scheduler's dashboard (``None``
        if it serves none); the token, when it asks for one, is derived from this client's."""
        link = getattr(self.cluster, "dashboard_link", None)
        if link:
            return str(link)
        port = getattr(self, "_services", {}).get("dashboard")
        if not port or not self._address:
            return None
        from ..dashboard.links import advertised_link

        host = self._address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
        return advertised_link(host, port, getattr(self, "_dashboard", {}), self.token)

    def _workers_for_repr(self) -> dict[str, Any] | None:
        """Workers as in ``scheduler_info()`` (asked quickly, synchronous clients only)."""
        if self.asynchronous or self.status != "running" or self._loop_thread is None:
            return None
        try:
            info = self._loop_thread.run(self._request("scheduler_info"), timeout=2)
        except Exception:  # a repr must never raise
            return None
        return dict(info.get("workers", {}))

    def __repr__(self) -> str:
        workers = self._workers_for_repr()
        parts = [f"<Client: {self._address} status={self.status}"]
        if workers is not None:
            from .._repr import format_bytes, format_offer, summarize

            s = summarize(workers)
            parts.append(
                f"workers={s['workers']} threads={s['threads']} memory={format_bytes(s['memory'])}"
            )
            if s["resources"]:
                parts.append(f"resources={format_offer(s['resources'])}")
        if self.dashboard_link:
            from ..dashboard.links import without_token  # a repr may end up in a log

            parts.append(f"dashboard={without_token(self.dashboard_link)}")
        return " ".join(parts) + ">"

    def _repr_html_(self) -> str:
        from .._repr import cluster_html

        return cluster_html(
            "Client",
            self._address,
            self._workers_for_repr(),
            self.dashboard_link,
            {
                "status": self.status,
                "cluster": type(self.cluster).__name__ if self.cluster else "-",
            },
        )

    # -- futures bookkeeping -------------------------------------------------------
    def _acquire(self, key: str) -> FutureState:
        with self._lock:
            fs = self._futures.get(key)
            new = fs is None
            if fs is None:
                fs = self._futures[key] = FutureState(key, self._lock)
            fs.refs += 1
        if new and self.status == "lost":  # submitted after the scheduler went away
            fs.comm_lost(self._lost_reason or "lost the connection to the scheduler")
        return fs

    def _acquire_state(self, fs: FutureState) -> None:
        with self._lock:
            fs.refs += 1

    def _release(self, fs: FutureState) -> None:
        with self._lock:
            fs.refs -= 1
            if fs.refs > 0:
                return
            if self._futures.get(fs.key) is fs:
                del self._futures[fs.key]
        if self.status == "running":
            self._send(ReleaseKeys(keys=[fs.key]), urgent=False)

    def futures_of(self, keys: Iterable[str]) -> list[Future]:
        """Futures for keys the scheduler already holds for this client."""
        return [Future(k, self) for k in keys]

    # -- sending -------------------------------------------------------------------
    def _send(self, msg: Message, urgent: bool = True) -> None:
        """Queue ``msg`` for the scheduler from any thread; one loop wake-up per burst.

        A message that is not ``urgent`` (releasing keys) waits up to
        :data:`LAZY_FLUSH_DELAY` to leave with whatever is sent next: a loop of
        ``submit(...).result()`` then costs one message per call instead of two.
        Messages always leave in the order they were queued.
        """
        with self._lock:
            out = self._pending_out
            if type(msg) is ReleaseKeys and out and type(out[-1]) is ReleaseKeys:
                out[-1].keys.extend(msg.keys)
            else:
                out.append(msg)
            if self._flush_scheduled:
                return
            if urgent and self._write_here(out):
                return
            if urgent:
                self._flush_scheduled = True
            elif self._lazy_flush_scheduled:
                return
            else:
                self._lazy_flush_scheduled = True
        loop = self.loop
        assert loop is not None
        flush = self._flush_pending if urgent else self._flush_pending_later
        if self._in_loop():
            loop.call_soon(flush)
        else:
            loop.call_soon_threadsafe(flush)

    def _write_here(self, out: list[Message]) -> bool:
        """Write ``out`` (the pending messages) from this user thread, sparing a loop wake-up.

        Called with the lock held.  Declines in the loop's own thread (which
        batches instead) and whenever the connection cannot take a direct
        write; see :meth:`Connection.send_from_thread`.
        """
        conn = self._conn
        if conn is None or self._in_loop() or not conn.send_from_thread(out):
            return False
        self._pending_out = []
        return True

    def _flush_pending_later(self) -> None:
        assert self.loop is not None
        self.loop.call_later(LAZY_FLUSH_DELAY, self._flush_pending)

    def _in_loop(self) -> bool:
        if self._loop_thread is not None:
            return threading.current_thread() is self._loop_thread.thread
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    def _flush_pending(self) -> None:
        with self._lock:
            batch, self._pending_out = self._pending_out, []
            self._flush_scheduled = self._lazy_flush_scheduled = False
        if batch and self._conn is not None and not self._conn.closed:
            self._conn.send_many(batch)
        elif batch and self.status == "lost":
            # Sent after the scheduler went away: whoever waits for an answer
            # (plugins, run, ...) gets the error now instead of waiting forever.
            for fut in self._requests.values():
                if not fut.done():
                    fut.set_exception(CommClosedError(self._lost_reason or "no scheduler"))

    async def _request(self, method: str, **args: Any) -> Any:
        """Ask the scheduler a read-only question."""
        self._check_connected()
        loop = asyncio.get_running_loop()
        rid = next(self._request_ids)
        fut: asyncio.Future[Any] = loop.create_future()
        self._requests[rid] = fut
        self._send(Request(id=rid, method=method, args=args))
        try:
            return await asyncio.wait_for(fut, self.timeout * 10)
        finally:
            self._requests.pop(rid, None)

    # -- receiving -----------------------------------------------------------------
    def _on_messages(self, batch: list[Message]) -> None:
        futures = self._futures
        for msg in batch:
            kind = type(msg)
            if kind is KeyInMemory:
                assert isinstance(msg, KeyInMemory)
                fs = futures.get(msg.key)
                if fs is not None:
                    fs.finish(msg.who_has, msg.typename, msg.result)
                if msg.result is not None and len(self._watching) < self._watch_max:
                    for address in msg.who_has:
                        if address not in self._watching:
                            self._watch(address)
            elif kind is KeyErred:
                assert isinstance(msg, KeyErred)
                fs = futures.get(msg.key)
                if fs is not None:
                    fs.fail(msg.error)
            elif kind is KeyCancelled:
                assert isinstance(msg, KeyCancelled)
                fs = futures.get(msg.key)
                if fs is not None:
                    fs.cancel(msg.reason, lost=msg.lost)
            elif kind is KeyLost:
                assert isinstance(msg, KeyLost)
                fs = futures.get(msg.key)
                if fs is not None and not fs.has_value:
                    fs.reset()  # being recomputed; a value already here stays valid
            elif kind is Reply:
                assert isinstance(msg, Reply)
                fut = self._requests.get(msg.id)
                if fut is not None and not fut.done():
                    if msg.error is not None:
                        fut.set_exception(RuntimeError(msg.error))
                    else:
                        fut.set_result(msg.result)
            elif kind is Results:  # plugins and run (client/plugins.py)
                assert isinstance(msg, Results)
                fut = self._requests.get(msg.id)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            else:
                logger.warning("ignoring unexpected op %r from the scheduler", kind.op)

    # -- results pushed by workers (watch_results) ---------------------------------------
    def _watch(self, address: str) -> None:
        """Ask the worker at ``address`` to send this client's small results itself."""
        self._watching[address] = None  # connecting; a failure leaves it at None
        assert self.loop is not None
        task = self.loop.create_task(self._watch_worker(address))
        self._watch_tasks.add(task)
        task.add_done_callback(self._watch_tasks.discard)

    async def _watch_worker(self, address: str) -> None:
        try:
            conn, _ = await connect(
                address, role="client", my_id=self.id, token=self.token, security=self.security
            )
        except Exception as exc:  # results keep coming through the scheduler
            logger.info("cannot watch worker %s for results: %s", address, exc)
            return
        if self.status != "running":
            conn.close("client closing")
            return
        self._watching[address] = conn
        conn.set_handler(functools.partial(self._on_worker_messages, conn))

        def on_close(closed: Connection) -> None:
            if self._watching.get(address) is closed and closed.info.get("pushed"):
                # Lost after it worked (the worker left, say): watched again if
                # it shows up in a result.  One that closed at once (a worker
                # without watch_results) is left alone.
                del self._watching[address]

        conn.on_close(on_close)
        conn.send(WatchResults())

    def _on_worker_messages(self, conn: Connection, batch: list[Message]) -> None:
        """Results a watched worker pushed: the scheduler does not relay these to us."""
        conn.info["pushed"] = True
        futures = self._futures
        for msg in batch:
            if type(msg) is not KeyInMemory:
                logger.warning("ignoring unexpected op %r from a worker", type(msg).op)
                continue
            assert isinstance(msg, KeyInMemory)
            fs = futures.get(msg.key)
            if fs is not None and not fs.done():
                fs.finish(msg.who_has, msg.typename, msg.result)

    # -- submitting ----------------------------------------------------------------
    def _function_id(self, fn: Any) -> tuple[str, Payload]:
        """Serialize ``fn`` once per client (cached by identity while it lives)."""
        with self._function_lock:
            entry = self._functions.get(id(fn))
            if entry is not None and entry[0] is fn:
                return entry[1], entry[2]
        payload = serialize_function(fn)
        fid = payload_digest(payload)
        with self._function_lock:
            if len(self._functions) > 1000:
                self._functions.clear()
            self._functions[id(fn)] = (fn, fid, payload)
        return fid, payload

    def _pack_args(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Payload, list[str]]:
        if not kwargs and all(type(a) in _PLAIN for a in args):  # the common, cheap case
            return serialize((args, kwargs)), []
        deps: dict[str, None] = {}

        def walk(obj: Any) -> Any:
            kind = type(obj)
            if kind in _PLAIN:
                return obj
            if kind is Future:
                if obj._client is not self:
                    raise ValueError(f"{obj!r} belongs to another client")
                deps[obj.key] = None
                return Ref(obj.key)
            if kind is list or kind is tuple:
                return kind(walk(o) for o in obj)
            if kind is dict:
                return {k: walk(v) for k, v in obj.items()}
            if kind is set or kind is frozenset:
                return kind(walk(o) for o in obj)
            return obj

        return serialize((walk(args), walk(kwargs))), list(deps)

    def _foreign_function(self, func: Any, runtime: str, what: str) -> tuple[str, Payload]:
        """The msgpack payload naming a function of another runtime (e.g. ``"mathlib:add"``)."""
        if not isinstance(func, str) or not func:
            raise TypeError(
                f"{what} with runtime={runtime!r} needs the function's name as a string, "
                f"e.g. 'module:function', got {type(func).__name__}"
            )
        payload = serialize(func, "msgpack")
        return payload_digest(payload), payload

    def _pack_plain_args(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Payload, list[str]]:
        """Arguments of a task of another runtime: msgpack ``[args, kwargs]``.

        A future becomes ``{"__corral_ref__": key}``, which the worker replaces by
        the key's value (docs/protocol.md, section 10).
        """
        deps: dict[str, None] = {}

        def walk(obj: Any) -> Any:
            if isinstance(obj, Future):
                if obj._client is not self:
                    raise ValueError(f"{obj!r} belongs to another client")
                deps[obj.key] = None
                return {REF_KEY: obj.key}
            if isinstance(obj, list | tuple):
                return [walk(o) for o in obj]
            if isinstance(obj, dict):
                return {k: walk(v) for k, v in obj.items()}
            return obj

        return serialize([walk(args), walk(kwargs)], "msgpack"), list(deps)

    def _task_options(
        self,
        priority: int,
        workers: Any,
        allow_other_workers: bool,
        retries: int,
        resources: dict[str, float] | None,
        environment: str | list[str] | None = None,
    ) -> dict[str, Any]:
        if isinstance(workers, str):
            workers = [workers]
        # Refused here, before anything is sent: negative, NaN, infinite, non-numbers.
        resources = validate_resources(resources, "resources")
        return {
            "priority": [-priority, next(self._order)],
            "workers": list(workers) if workers else None,
            "allow_other_workers": allow_other_workers,
            "retries": retries or 0,
            "resources": resources or None,
            "environment": environment_names(environment),
        }

    def submit(
        self,
        func: Callable[..., Any],
        *args: Any,
        key: str | None = None,
        pure: bool = True,
        workers: Any = None,
        allow_other_workers: bool = False,
        retries: int = 0,
        priority: int = 0,
        resources: dict[str, float] | None = None,
        environment: str | list[str] | None = None,
        runtime: str | None = None,
        **kwargs: Any,
    ) -> Future:
        """Run ``func(*args, **kwargs)`` on the cluster; return a :class:`Future`.

        With ``runtime`` (e.g. ``"js"``), ``func`` names a function of a worker
        of that runtime (``"mathlib:add"``) and the arguments must be plain data
        (msgpack) or futures; see ``docs/javascript.md``.

        Example::

            future = client.submit(pow, 2, 10)
            future.result()   # 1024
            client.submit("mathlib:add", future, 1, runtime="js").result()   # 1025
        """
        if runtime is not None and runtime != "python":
            fid, fn_payload = self._foreign_function(func, runtime, "submit")
            args_payload, deps = self._pack_plain_args(args, kwargs)
        else:
            if not callable(func):
                raise TypeError(_not_callable("submit", func))
            fid, fn_payload = self._function_id(func)
            args_payload, deps = self._pack_args(args, kwargs)
        if key is None:
            key = _make_key(func, fid, args_payload, pure)
        spec = TaskSpec(
            key=key,
            args=args_payload,
            fn=fid,
            deps=deps,
            runtime=None if runtime == "python" else runtime,
            **self._task_options(
                priority, workers, allow_other_workers, retries, resources, environment
            ),
        )
        future = Future(key, self)
        self._send_tasks([spec], {fid: fn_payload})
        return future

    def map(
        self,
        func: Callable[..., Any],
        *iterables: Iterable[Any],
        key: str | list[str] | None = None,
        pure: bool = True,
        workers: Any = None,
        allow_other_workers: bool = False,
        retries: int = 0,
        priority: int = 0,
        resources: dict[str, float] | None = None,
        environment: str | list[str] | None = None,
        batch_size: int | None = None,
        runtime: str | None = None,
        **kwargs: Any,
    ) -> list[Future]:
        """Apply ``func`` to each element of the iterables; the function travels once.

        ``runtime``: as in :meth:`submit` (``func`` is then a function's name).
        ``batch_size``: tasks per message to the scheduler (default 2,000); each
        batch leaves as soon as it is packed, so the first tasks run while the
        rest of a long map is still being prepared.

        Example::

            futures = client.map(lambda x: x + 1, range(100))
            sum(client.gather(futures))   # 5050
        """
        foreign = runtime is not None and runtime != "python"
        if foreign:
            assert runtime is not None
            fid, fn_payload = self._foreign_function(func, runtime, "map")
        else:
            if not callable(func):
                raise TypeError(_not_callable("map", func))
            fid, fn_payload = self._function_id(func)
        columns = [list(it) for it in iterables]
        if not columns:
            return []
        items = list(zip(*columns, strict=False))
        if isinstance(key, list) and len(key) != len(items):
            raise ValueError(f"map got {len(key)} keys for {len(items)} items")
        options = self._task_options(
            priority, workers, allow_other_workers, retries, resources, environment
        )
        base_priority = options.pop("priority")
        step = batch_size or MAP_BATCH_SIZE
        futures: list[Future] = []
        chunk: list[TaskSpec] = []
        with paused_gc():  # corral._gc: what is packed here is freed by refcounting
            for i, item in enumerate(items):
                if foreign:
                    args_payload, deps = self._pack_plain_args(item, kwargs)
                else:
                    args_payload, deps = self._pack_args(item, kwargs)
                if isinstance(key, list):
                    k = key[i]
                elif isinstance(key, str):
                    k = f"{key}-{_digest(fid, args_payload, pure)}"
                else:
                    k = _make_key(func, fid, args_payload, pure)
                futures.append(Future(k, self))
                chunk.append(
                    TaskSpec(
                        key=k,
                        args=args_payload,
                        fn=fid,
                        deps=deps,
                        priority=[*base_priority, i],
                        runtime=runtime if foreign else None,
                        **options,
                    )
                )
                if len(chunk) >= step:
                    # Sent while the rest is still being packed: the cluster starts
                    # on the first tasks instead of waiting for the whole map.
                    self._send_tasks(chunk, {fid: fn_payload})
                    chunk = []
            if chunk:
                self._send_tasks(chunk, {fid: fn_payload})
        return futures

    def _send_tasks(self, specs: list[TaskSpec], functions: dict[str, Payload]) -> None:
        self._send(UpdateGraph(tasks=specs, wanted=[s.key for s in specs], functions=functions))

    # -- graphs ----------------------------------------------------------------------
    def _submit_graph(
        self,
        dsk: Any,  # a graph mapping, a HighLevelGraph or a dask expression
        keys: list[Hashable],
        *,
        priority: int = 0,
        workers: Any = None,
        allow_other_workers: bool = False,
        retries: int = 0,
        resources: dict[str, float] | None = None,
        environment: str | list[str] | None = None,
    ) -> dict[Hashable, Future]:
        # dask.annotate(...) around the call: defaults for every task (explicit
        # arguments win), as in dask.distributed; per-task annotations win over both.
        glob = _call_time_annotations()
        priority = priority or glob.get("priority", 0)
        workers = workers or glob.get("workers")
        allow_other_workers = allow_other_workers or bool(glob.get("allow_other_workers"))
        retries = retries or glob.get("retries", 0)
        resources = resources or glob.get("resources")
        environment = environment or glob.get("environment")
        with paused_gc():  # corral._gc: converting and packing only builds, no cycles
            table = FunctionTable()
            per_task: dict[str, dict[str, Any]] = {}
            graph = ConvertedGraph(dsk, annotations=per_task)
            fid, fn_payload = self._function_id(execute_node)
            options = self._task_options(
                priority, workers, allow_other_workers, retries, resources, environment
            )
            base = options.pop("priority")
            annotated = {k: _annotated_options(k, a, options, base) for k, a in per_task.items()}
            wanted = {stringify(k): k for k in keys}
            futures = {orig: Future(skey, self) for skey, orig in wanted.items()}
            # A big graph goes in parts, highest priority (inputs) first: the
            # cluster starts on them while the rest is still being pickled.  The
            # scheduler keeps each part's tasks until the last part arrives.
            in_parts = graph.topological and len(graph.nodes) > 2 * GRAPH_PART_SIZE
            hold = f"graph-{next(self._order)}" if in_parts else None
            specs: list[TaskSpec] = []
            for key in graph.keys if in_parts else graph.nodes:
                packed = graph.pack(key, table)
                if packed is None:
                    continue
                k, args, deps, order = packed
                opts, prio = annotated.get(k) or (options, base)
                specs.append(
                    TaskSpec(key=k, args=args, fn=fid, deps=deps, priority=[*prio, order], **opts)
                )
                if in_parts and len(specs) >= GRAPH_PART_SIZE:
                    self._send_graph_part(specs, [], fid, fn_payload, table, hold, more=True)
                    specs = []
            self._send_graph_part(specs, list(wanted), fid, fn_payload, table, hold, more=False)
            return futures

    def _send_graph_part(
        self,
        specs: list[TaskSpec],
        wanted: list[str],
        fid: str,
        fn_payload: Payload,
        table: FunctionTable,
        hold: str | None,
        more: bool,
    ) -> None:
        # Functions that travel by value go with every part (they are few and
        # small); every task of the part may use those met so far.
        needs = list(table.payloads) or None
        for spec in specs:
            spec.needs = needs
        functions = {fid: fn_payload, **table.payloads}
        self._send(
            UpdateGraph(tasks=specs, wanted=wanted, functions=functions, hold=hold, more=more)
        )

    def get(
        self,
        dsk: Mapping[Hashable, Any],
        keys: Any,
        *,
        sync: bool = True,
        asynchronous: bool | None = None,
        resources: dict[str, float] | None = None,
        workers: Any = None,
        allow_other_workers: bool = False,
        retries: int = 0,
        priority: int = 0,
        environment: str | list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Compute a dask-style graph and return the results of ``keys`` (same nesting).

        Works as a dask scheduler: ``dask.compute(x, scheduler=client.get)``.
        """
        flat = list(dict.fromkeys(flatten_keys(keys)))
        futures = self._submit_graph(
            dsk,
            flat,
            priority=priority,
            workers=workers,
            allow_other_workers=allow_other_workers,
            retries=retries,
            resources=resources,
            environment=environment,
        )
        if not sync:  # as dask.distributed: futures, in the nesting of ``keys``
            return pack_results(keys, futures)
        if self.asynchronous and asynchronous is not False:
            return self._get_async(keys, futures)
        values = self.gather(list(futures.values()))
        return pack_results(keys, dict(zip(futures, values, strict=True)))

    async def _get_async(self, keys: Any, futures: dict[Hashable, Future]) -> Any:
        values = await self._gather(list(futures.values()), "raise")
        return pack_results(keys, dict(zip(futures, values, strict=True)))

    def compute(self, collections: Any, sync: bool = False, **kwargs: Any) -> Any:
        """Start computing dask collections; return a future per collection.

        Example::

            import dask.array as da
            total = client.compute(da.ones(1000, chunks=100).sum())
            total.result()   # 1000.0
        """
        import dask
        from dask._expr import FinalizeCompute
        from dask.base import collections_to_expr

        single = not isinstance(collections, list | tuple)
        colls = [collections] if single else list(collections)
        futures = []
        for coll in colls:
            if not dask.is_dask_collection(coll):
                futures.append(coll)  # as dask.distributed: non-collections pass through
                continue
            # As dask.distributed: finalize inside the graph, then lower the expression
            # (dask-expr collections have no graph before ``optimize``).
            expr = collections_to_expr([coll], kwargs.get("optimize_graph", True))
            expr = FinalizeCompute(expr).optimize()
            out_keys = list(flatten_keys(expr.__dask_keys__()))
            parts = self._submit_graph(expr, out_keys, **_graph_options(kwargs))
            futures.append(parts[out_keys[0]])
        if sync:
            futures = self.gather(futures)
        return futures[0] if single else futures

    def persist(self, collections: Any, **kwargs: Any) -> Any:
        """Start computing dask collections and keep the results on the cluster."""
        import dask
        from dask.base import collections_to_expr

        single = not isinstance(collections, list | tuple)
        colls = [collections] if single else list(collections)
        out = []
        for coll in colls:
            if not dask.is_dask_collection(coll):
                out.append(coll)
                continue
            expr = collections_to_expr([coll], kwargs.get("optimize_graph", True)).optimize()
            (keys,) = expr.__dask_keys__()  # one collection: its (nested) keys
            out_keys = list(flatten_keys(keys))
            futures = self._submit_graph(expr, out_keys, **_graph_options(kwargs))
            rebuild, args = coll.__dask_postpersist__()
            out.append(rebuild(futures, *args))
        return out[0] if single else out

    # -- results -----------------------------------------------------------------------
    def _value_sync(self, future: Future) -> Any:
        fs = future._state
        if fs.status != "finished":
            raise fs.exception_to_raise()
        if fs.has_value:
            return fs.value
        if fs.payload is not None:
            return self._unpack(fs)
        return self._sync(self._fetch([fs]))[0]

    async def _result_async(self, future: Future, timeout: float | None) -> Any:
        fs = future._state
        await asyncio.wait_for(fs.wait_async(), timeout)
        if fs.status != "finished":
            raise fs.exception_to_raise()
        if fs.has_value:
            return fs.value
        if fs.payload is not None:
            return self._unpack(fs)
        return (await self._fetch([fs]))[0]

    def _unpack(self, fs: FutureState) -> Any:
        payload = fs.payload
        if payload is None:
            return fs.value
        value = deserialize(payload)
        fs.value, fs.has_value, fs.payload = value, True, None
        return value

    async def _fetch(self, states: list[FutureState]) -> list[Any]:
        """Get values of finished keys straight from the workers holding them."""
        todo = [fs for fs in states if not fs.has_value and fs.payload is None]
        for attempt in range(5):
            if not todo:
                break
            by_worker: dict[str, list[FutureState]] = {}
            unknown = [fs for fs in todo if not fs.who_has]
            if unknown or attempt:
                finishes = [fs.finishes for fs in todo]
                who_has = await self._request("who_has", keys=[fs.key for fs in todo])
                for fs in todo:
                    fs.who_has = tuple(who_has.get(fs.key, ()))
                # In memory nowhere: every holder died and the scheduler is computing the
                # key again (or will report it lost).  Wait for that, as dask does.
                again = [
                    fs for fs, n in zip(todo, finishes, strict=True)
                    if not fs.who_has and fs.finishes == n
                ]  # fmt: skip
                if again:
                    for fs in again:
                        if fs.status != "finished":  # meanwhile reported lost or erred
                            raise fs.exception_to_raise()
                        fs.reset()
                    await asyncio.gather(*(fs.wait_async() for fs in again))
                    for fs in again:
                        if fs.status != "finished":
                            raise fs.exception_to_raise()
                    todo = [fs for fs in todo if not fs.has_value and fs.payload is None]
                    continue
            for fs in todo:
                if fs.who_has:
                    by_worker.setdefault(fs.who_has[attempt % len(fs.who_has)], []).append(fs)
            results = await asyncio.gather(
                *(self._get_from_worker(w, group) for w, group in by_worker.items()),
                return_exceptions=True,
            )
            for res in results:
                if isinstance(res, BaseException):
                    logger.info("gather from a worker failed: %s", res)
            todo = [fs for fs in todo if not fs.has_value and fs.payload is None]
            if todo:
                await asyncio.sleep(0.05 * (attempt + 1))
        if todo:
            raise CommClosedError(
                f"could not fetch {[fs.key for fs in todo][:5]} from any worker holding them"
            )
        return [fs.value if fs.has_value else self._unpack(fs) for fs in states]

    async def _get_from_worker(self, address: str, group: list[FutureState]) -> None:
        lock = self._worker_locks.get(address)
        if lock is None:
            lock = self._worker_locks[address] = asyncio.Lock()
        # Replies are not tagged and a connection has one reader: one request at a
        # time per worker (several threads may be fetching results at once).
        async with lock:
            await self._get_from_worker_locked(address, group)

    async def _get_from_worker_locked(self, address: str, group: list[FutureState]) -> None:
        conn = self._workers.get(address)
        if conn is None or conn.closed:
            conn, _ = await connect(
                address, role="client", my_id=self.id, token=self.token, security=self.security
            )
            self._workers[address] = conn
        conn.send(GetData(keys=[fs.key for fs in group]))
        try:
            reply = await conn.recv(timeout=self.timeout * 10)
        except BaseException:
            conn.abort("no reply to get_data")  # a late reply must not answer the next one
            if self._workers.get(address) is conn:
                del self._workers[address]
            raise
        if not isinstance(reply, Data):
            conn.abort("unexpected reply")
            raise CommClosedError(f"unexpected reply from {address}")
        for fs in group:
            payload = reply.data.get(fs.key)
            if payload is not None and not fs.has_value:
                fs.payload = payload

    def gather(self, futures: Any, errors: str = "raise", direct: bool | None = None) -> Any:
        """Wait for futures and return their results in the same structure.

        Example::

            client.gather([client.submit(inc, i) for i in range(3)])   # [1, 2, 3]
        """
        if errors not in ("raise", "skip"):
            raise ValueError(f"errors must be 'raise' or 'skip', not {errors!r}")
        if self.asynchronous:
            return self._gather(futures, errors)
        flat = [f for f in _iter_futures(futures)]
        for f in flat:
            f._state.wait()
        states = [f._state for f in flat]
        for fs in states:
            if fs.status != "finished" and errors == "raise":
                raise fs.exception_to_raise()
        need = [
            fs
            for fs in states
            if fs.status == "finished" and not fs.has_value and fs.payload is None
        ]
        if need:
            self._sync(self._fetch(need))
        values = {
            fs.key: (fs.value if fs.has_value else self._unpack(fs))
            for fs in states
            if fs.status == "finished"
        }
        return _rebuild(futures, values, errors)

    async def _gather(self, futures: Any, errors: str) -> Any:
        flat = list(_iter_futures(futures))
        for f in flat:
            await f._state.wait_async()
        states = [f._state for f in flat]
        for fs in states:
            if fs.status != "finished" and errors == "raise":
                raise fs.exception_to_raise()
        done = [fs for fs in states if fs.status == "finished"]
        await self._fetch(done)
        return _rebuild(futures, {fs.key: fs.value for fs in done}, errors)

    def scatter(
        self, data: Any, workers: Any = None, broadcast: bool = False, hash: bool = True
    ) -> Any:
        """Move local data to workers; return futures pointing at it.

        Example::

            [big] = client.scatter([list(range(10**6))])
            client.submit(len, big).result()   # 1000000
        """
        if isinstance(workers, str):
            workers = [workers]
        single = not isinstance(data, list | tuple | set | frozenset | dict)
        items: dict[Any, Any]
        if isinstance(data, dict):
            items = dict(data)
        elif single:
            items = {None: data}
        else:
            items = {i: v for i, v in enumerate(data)}
        payloads: dict[str, Payload] = {}
        nbytes: dict[str, int] = {}
        typenames: dict[str, str] = {}
        names: dict[Any, str] = {}
        for name, value in items.items():
            payload = serialize(value)
            if isinstance(data, dict):
                key = str(name)
            elif hash:
                key = f"{type(value).__name__}-{payload_digest(payload)}"
            else:
                key = f"{type(value).__name__}-{uuid.uuid4().hex}"
            names[name] = key
            payloads[key] = payload
            nbytes[key] = sizeof(value)
            typenames[key] = type(value).__name__
        coro = self._scatter(payloads, nbytes, workers, broadcast, typenames)
        if self.asynchronous:
            return self._finish_scatter_async(coro, data, names, single)
        self._sync(coro)
        return _scatter_result(self, data, names, single)

    async def _scatter(
        self,
        payloads: dict[str, Payload],
        nbytes: dict[str, int],
        workers: Any,
        broadcast: bool,
        typenames: dict[str, str] | None = None,
    ) -> None:
        self._check_connected()
        for key in payloads:
            self._acquire(key)  # held until the public futures exist
        try:
            loop = asyncio.get_running_loop()
            rid = next(self._request_ids)
            fut: asyncio.Future[Any] = loop.create_future()
            self._requests[rid] = fut
            self._send(
                Scatter(id=rid, data=payloads, nbytes=nbytes, workers=workers, broadcast=broadcast)
            )
            try:
                who_has = await asyncio.wait_for(fut, self.timeout * 10)
            finally:
                self._requests.pop(rid, None)
            for key, holders in who_has.items():
                fs = self._futures.get(key)
                if fs is not None:
                    fs.finish(holders, (typenames or {}).get(key), None)
        except BaseException:
            for key in payloads:
                fs = self._futures.get(key)
                if fs is not None:
                    self._release(fs)
            raise

    async def _finish_scatter_async(
        self, coro: Coroutine[Any, Any, Any], data: Any, names: dict[Any, str], single: bool
    ) -> Any:
        await coro
        return _scatter_result(self, data, names, single)

    def cancel(self, futures: Any, force: bool = False) -> Any:
        """Cancel futures (and everything depending on them)."""
        keys = [f.key for f in _iter_futures(futures)]
        for f in _iter_futures(futures):
            f._state.cancel("cancelled by the client")
        self._send(CancelKeys(keys=keys))
        if self.asynchronous:
            return _noop()
        return None

    # -- questions to the scheduler ------------------------------------------------
    def scheduler_info(self) -> Any:
        """Workers (by address: name, nthreads, memory_limit, resources, ...) and more."""
        return self._sync(self._request("scheduler_info"))

    def who_has(self, futures: Any = None) -> Any:
        """Which workers hold which keys."""
        keys = None if futures is None else [f.key for f in _iter_futures(futures)]
        return self._sync(self._who_has(keys))

    async def _who_has(self, keys: list[str] | None) -> dict[str, list[str]]:
        answer: dict[str, list[str]] = await self._request("who_has", keys=keys)
        # A result a worker pushed here (watch_results) may be ahead of the
        # scheduler's record of it by a moment: what the worker said stands in.
        for key, holders in answer.items():
            if not holders:
                fs = self._futures.get(key)
                if fs is not None and fs.status == "finished" and fs.who_has:
                    answer[key] = list(fs.who_has)
        return answer

    def why_pending(self, futures: Any) -> Any:
        """Readable reasons why these futures have not finished."""
        single = isinstance(futures, Future)
        keys = [f.key for f in _iter_futures(futures)]
        coro = self._request("why_pending", keys=keys)
        if single:
            coro = _first_value(coro, keys[0])
        return self._sync(coro)

    def set_resources(self, worker: str, resources: Mapping[str, Any]) -> Any:
        """Change what ``worker`` offers, at run time; see ``Worker.set_resources``.

        The named resources are replaced (``{"GPU": 0}`` offers none,
        ``{"GPU": [0, 1]}`` two indexed GPUs); the worker's others stay.  Tasks
        waiting for a worker are placed again; tasks queued on ``worker`` that
        no longer fit go elsewhere.  Raises ``ValueError`` for invalid values
        (before anything is sent) and ``RuntimeError`` if the worker is unknown.

        Example::

            client.set_resources("tcp://10.0.0.5:40123", {"GPU": 2})
        """
        offer = validate_worker_resources(resources, "set_resources")
        return self._sync(self._set_resources(worker, offer))

    async def _set_resources(self, worker: str, offer: dict[str, Any]) -> None:
        self._check_connected()
        loop = asyncio.get_running_loop()
        rid = next(self._request_ids)
        fut: asyncio.Future[Any] = loop.create_future()
        self._requests[rid] = fut
        self._send(SetResources(resources=offer, worker=worker, id=rid))
        try:
            await asyncio.wait_for(fut, self.timeout * 10)
        finally:
            self._requests.pop(rid, None)

    def story(self, key: Any) -> Any:
        """The scheduler's transition log of one key."""
        k = key.key if isinstance(key, Future) else stringify(key)
        return self._sync(self._request("story", key=k))

    def get_scheduler_logs(self, n: int | None = None) -> Any:
        """The scheduler process's last ``n`` log records (all kept ones by default).

        A list of ``(level, text)``, oldest first (:mod:`corral.logs`).

        Example::

            for level, text in client.get_scheduler_logs(n=20):
                print(level, text)
        """
        return self._sync(_as_tuples(self._request("get_logs", n=n)))

    def get_worker_logs(
        self, n: int | None = None, workers: Any = None, nanny: bool = False
    ) -> Any:
        """Each worker process's last ``n`` log records: ``{address: [(level, text), ...]}``.

        ``workers``: addresses or names (default: every worker).  Asked through
        :meth:`run`; workers in this process (``LocalCluster(processes=False)``)
        share this process's log.

        Example::

            client.get_worker_logs(n=5, workers=["tcp://10.0.0.5:40123"])
        """
        from ..logs import get_logs

        return self.run(get_logs, n, workers=workers, nanny=nanny)

    def nthreads(self) -> Any:
        """Threads per worker address."""
        coro = self._request("scheduler_info")
        return self._sync(_map_workers(coro, "nthreads"))

    ncores = nthreads

    def wait_for_workers(self, n_workers: int = 1, timeout: float | None = None) -> Any:
        """Block until at least ``n_workers`` workers are connected."""
        return self._sync(self._wait_for_workers(n_workers, timeout))

    async def _wait_for_workers(self, n: int, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            info = await self._request("scheduler_info")
            if len(info["workers"]) >= n:
                return
            if deadline is not None and loop.time() > deadline:
                raise TimeoutError(f"only {len(info['workers'])} of {n} workers after {timeout}s")
            await asyncio.sleep(0.05)


# -- helpers --------------------------------------------------------------------------
class _UniqueIds:
    """32 hex digits unique to each call: 64 random bits per process, then a counter.

    Cheaper than ``uuid4()`` (one ``urandom`` call per key) on the path of
    every impure task; a forked child draws its own random half.
    """

    def __init__(self) -> None:
        self._counter = itertools.count()
        self._draw()
        if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
            os.register_at_fork(after_in_child=self._draw)

    def _draw(self) -> None:
        self._prefix = os.urandom(8).hex()

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter) & 0xFFFF_FFFF_FFFF_FFFF:016x}"


_unique_ids = _UniqueIds()


def _digest(fid: str, args: Payload, pure: bool) -> str:
    if not pure:
        return _unique_ids.next()
    h = hashlib.blake2b(fid.encode(), digest_size=16)
    for f in args.frames:
        h.update(f)
    return h.hexdigest()


def _not_callable(what: str, func: Any) -> str:
    hint = ""
    if isinstance(func, str):
        hint = f" (to run {func!r} on workers of another runtime, pass runtime=..., e.g. 'js')"
    return f"{what} needs a callable, got {type(func).__name__}{hint}"


def _make_key(func: Any, fid: str, args: Payload, pure: bool) -> str:
    if isinstance(func, str):  # a function of another runtime, by name: "module:function"
        name = func.rsplit(":", 1)[-1].rsplit(".", 1)[-1] or "task"
    else:
        name = getattr(func, "__name__", None) or type(func).__name__
    if name == "<lambda>":
        name = "lambda"
    return f"{name}-{_digest(fid, args, pure)}"


def _iter_futures(obj: Any) -> Iterable[Future]:
    if isinstance(obj, Future):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _iter_futures(v)
    elif isinstance(obj, list | tuple | set | frozenset) or (
        hasattr(obj, "__iter__") and not isinstance(obj, str | bytes)
    ):
        for v in obj:
            yield from _iter_futures(v)


def _rebuild(obj: Any, values: dict[str, Any], errors: str) -> Any:
    if isinstance(obj, Future):
        return values[obj.key]
    if isinstance(obj, dict):
        return {
            k: _rebuild(v, values, errors)
            for k, v in obj.items()
            if not (isinstance(v, Future) and v.key not in values)
        }
    if isinstance(obj, list | tuple | set | frozenset):
        items = [
            _rebuild(v, values, errors)
            for v in obj
            if not (isinstance(v, Future) and v.key not in values)
        ]
        return type(obj)(items)
    if hasattr(obj, "__iter__") and not isinstance(obj, str | bytes):
        return [
            _rebuild(v, values, errors)
            for v in obj
            if not (isinstance(v, Future) and v.key not in values)
        ]
    return obj


def _scatter_result(client: Client, data: Any, names: dict[Any, str], single: bool) -> Any:
    futures = {name: Future(key, client) for name, key in names.items()}
    for key in dict.fromkeys(names.values()):  # one hold per key, equal values share one
        fs = client._futures.get(key)
        if fs is not None:
            client._release(fs)  # drop the hold taken while scattering
    if single:
        return futures[None]
    if isinstance(data, dict):
        return futures
    return (
        type(data)(futures[i] for i in range(len(futures)))
        if not isinstance(data, set | frozenset)
        else list(futures.values())
    )


def _call_time_annotations() -> dict[str, Any]:
    """``dask.get_annotations()`` if dask is in use (annotations active around the call)."""
    import sys

    dask = sys.modules.get("dask")
    getter = getattr(dask, "get_annotations", None)
    return dict(getter()) if callable(getter) else {}


def _annotated_options(
    key: str, annotations: dict[str, Any], options: dict[str, Any], base: list[Any]
) -> tuple[dict[str, Any], list[Any]]:
    """The task options and base priority of one annotated graph task."""
    opts = dict(options)
    prio = base
    if "resources" in annotations:
        opts["resources"] = (
            validate_resources(annotations["resources"], f"resources annotation of {key!r}") or None
        )
    if "workers" in annotations:
        w = annotations["workers"]
        opts["workers"] = [w] if isinstance(w, str) else (list(w) if w else None)
    if "allow_other_workers" in annotations:
        opts["allow_other_workers"] = bool(annotations["allow_other_workers"])
    if "environment" in annotations:
        opts["environment"] = environment_names(
            annotations["environment"], f"environment annotation of {key!r}"
        )
    if "retries" in annotations:
        r = annotations["retries"]
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(
                f"retries annotation of {key!r} must be a non-negative integer, got {r!r}"
            )
        opts["retries"] = r
    if "priority" in annotations:
        p = annotations["priority"]
        if isinstance(p, bool) or not isinstance(p, int | float):
            raise ValueError(f"priority annotation of {key!r} must be a number, got {p!r}")
        prio = [-p, *base[1:]]
    return opts, prio


def _graph_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    allowed = ("priority", "workers", "allow_other_workers", "retries", "resources", "environment")
    return {k: kwargs[k] for k in allowed if k in kwargs}


async def _as_tuples(coro: Coroutine[Any, Any, Any]) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in await coro]


async def _noop() -> None:
    return None


async def _first_value(coro: Coroutine[Any, Any, Any], key: str) -> Any:
    return (await coro)[key]


async def _map_workers(coro: Coroutine[Any, Any, Any], field: str) -> Any:
    info = await coro
    return {addr: w[field] for addr, w in info["workers"].items()}
