"""The worker process's IO: scheduler stream, peer server, thread pool, data store.

:class:`Worker` feeds events to the pure :class:`~corral.worker.state.WorkerState`
and carries out the instructions it returns.  It reconnects (and starts
afresh) if the scheduler goes away and comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import threading
import uuid
from collections.abc import MutableMapping
from typing import Any

import psutil

from ..comm import Connection, Server, connect, format_address, parse_address, start_server
from ..comm.handshake import accept
from ..comm.security import Security, server_ssl, warn_if_exposed
from ..errors import CommClosedError, HandshakeError, SerializationError
from ..nanny import EXIT_REFUSED, EXIT_RESTART
from ..protocol.messages import (
    CloseWorker,
    Compute,
    Data,
    FreeKeys,
    GetData,
    Heartbeat,
    KeyInMemory,
    Message,
    MissingData,
    RegisterWorker,
    RestartWorker,
    SetResources,
    Store,
    Supervised,
    TaskFinished,
    Unregister,
    UpdateWhoHas,
    WatchResults,
    WorkerRestarting,
)
from ..protocol.serialize import deserialize, serialize, sizeof
from ..resources import resource_amounts, task_resources, validate_worker_resources
from ..versions import get_versions
from .environment_host import ENVIRONMENT_WORKER_OPS, WorkerEnvironmentHost
from .execution import FunctionCache, ThreadPool, error_info, run_task
from .memory import MEMORY_EXIT_CODE, MONITOR_INTERVAL, TERMINATE_GRACE, MemoryPolicy, decide
from .plugin_host import PLUGIN_WORKER_OPS, WorkerPluginHost
from .spill import SpillBuffer
from .state import (
    ComputeEvent,
    DataStored,
    Execute,
    ExecuteSuccess,
    FreeEvent,
    Gather,
    GatherDone,
    PauseEvent,
    ReleaseData,
    SendToScheduler,
    WorkerState,
    task_finished,
)

logger = logging.getLogger("corral.worker")

HEARTBEAT_INTERVAL = 1.0
BUSY_FLUSH_DELAY = 0.002


class Worker:
    """A Corral worker: runs tasks, holds results, serves them to peers.

    Example::

        worker = Worker("tcp://127.0.0.1:8786", nthreads=2, resources={"GPU": 1})
        await worker.start()
        ...
        await worker.close()
    """

    def __init__(
        self,
        scheduler_address: str,
        *,
        nthreads: int | None = None,
        name: str | None = None,
        memory_limit: int = 0,
        resources: dict[str, Any] | None = None,
        host: str | None = None,
        port: int = 0,
        local_directory: str | None = None,
        token: str | None = None,
        reconnect: bool = True,
        connect_timeout: float | None = None,
        preload: str | list[str] | None = None,
        preload_argv: list[Any] | None = None,
        security: Security | None = None,
        max_frame_bytes: int | None = None,
        memory_pause_fraction: float | None = 0.8,
        memory_terminate_fraction: float | None = None,
        memory_spill_fraction: float | None = None,
        nanny_slot: str | None = None,
        nanny_channel: str | None = None,
    ) -> None:
        self.scheduler_address = scheduler_address
        self.nthreads = nthreads or os.cpu_count() or 1
        self.name = name
        self.memory_limit = memory_limit
        # What this worker offers: amounts, or lists of indices ("GPU": [0, 1]),
        # see corral.resources; ``resources`` are the amounts (as in dask).
        self.resource_offer = validate_worker_resources(resources, "Worker resources")
        self.resources: dict[str, float] = resource_amounts(self.resource_offer)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.host = host
        self.port = port
        self.local_directory = local_directory
        self.token = token
        # TLS (tls:// peer address) when ``security`` has a certificate.
        self.security = security
        self.max_frame_bytes = max_frame_bytes
        # Memory marks (corral.worker.memory); terminate is for workers owning
        # their process (``corral worker`` sets it): the process then exits with
        # ``exit_code`` (MEMORY_EXIT_CODE) and its supervisor starts a fresh one.
        self.memory_policy = MemoryPolicy(
            pause=memory_pause_fraction,
            terminate=memory_terminate_fraction,
            spill=memory_spill_fraction,
        )
        self.memory_paused = False
        self.exit_code: int | None = None
        # Run by a supervisor (corral.nanny) that restarts this process: its slot id.
        self.nanny_slot = nanny_slot
        # Where nanny plugins go to that supervisor (corral.nanny_channel).
        self.nanny_channel = nanny_channel
        self._restart_reason: str | None = None
        self.reconnect = reconnect
        self.connect_timeout = connect_timeout
        self.id = f"worker-{uuid.uuid4().hex[:12]}"
        self.address = ""
        # Results by key: a dict, or a SpillBuffer moving the least recently used
        # ones to disk (under local_directory) when spilling is on.
        self.data: MutableMapping[str, Any] = {}
        if memory_spill_fraction and memory_limit > 0:
            self.data = SpillBuffer(local_directory, int(memory_spill_fraction * memory_limit))
        self.state = WorkerState(self.nthreads, self.resource_offer)
        self.functions = FunctionCache()
        self.status = "created"
        self._scheduler: Connection | None = None
        self._server: Server | None = None
        self._pool: ThreadPool | None = None
        self._peers: dict[str, Connection] = {}
        # Clients that asked for their results straight from here (watch_results).
        self._watchers: dict[str, Connection] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._generation = 0
        # Results their task thread reported itself (see _report_from_thread).
        self.reported_by_threads = 0
        self._closed = asyncio.Event()
        self._registered = asyncio.Event()
        self._process = psutil.Process()
        from ..logs import install as _install_log_buffer

        _install_log_buffer()  # a bounded in-memory log: client.get_worker_logs()
        # Plugins and preloads (corral.worker.plugin_host); preloads import here.
        self._plugin_host = WorkerPluginHost(self, preload, preload_argv)
        self.plugins: dict[str, Any] = self._plugin_host.plugins
        # Worker environments (corral.worker.environment_host): name -> state dict.
        self._environment_host = WorkerEnvironmentHost(self)
        self.environment_state: dict[str, dict[str, Any]] = self._environment_host.state

    # -- lifecycle -----------------------------------------------------------------
    async def start(self) -> Worker:
        """Open the peer server, connect to the scheduler and register."""
        loop = self._loop = asyncio.get_running_loop()
        _, sched_host, _ = parse_address(self.scheduler_address)
        listen_host = self.host or ("127.0.0.1" if _is_loopback(sched_host) else "0.0.0.0")
        tls = server_ssl(self.security)
        self._server = await start_server(
            listen_host,
            self.port,
            self._serve_peer,
            max_frame_bytes=self.max_frame_bytes,
            ssl_context=tls,
        )
        port = self._server.sockets[0].getsockname()[1]
        advertised = (
            listen_host if listen_host not in ("0.0.0.0", "::") else _outbound_ip(sched_host)
        )
        self.address = format_address(advertised, port, "tls" if tls else "tcp")
        warn_if_exposed("worker", listen_host, token=self.token, security=self.security)
        if self.name is None:
            self.name = self.address
        self._pool = ThreadPool(
            self.nthreads, loop, self._on_results, worker=self, report=self._report_from_thread
        )
        try:
            await self._plugin_host.preloads.setup(self)  # before contacting the scheduler
        except BaseException:
            await self.close(report=False)
            raise
        self.status = "connecting"
        try:
            await self._connect()
        except BaseException as exc:
            if isinstance(exc, HandshakeError):  # refused (strict versions, token): final
                self.exit_code = EXIT_REFUSED
            await self.close(report=False)
            raise
        self._spawn(self._heartbeat_loop())
        if self.memory_limit > 0:
            self._spawn(self._memory_monitor())
        self.status = "running"
        logger.info(
            "worker %s (%s) connected to %s", self.name, self.address, self.scheduler_address
        )
        return self

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = None if self.connect_timeout is None else loop.time() + self.connect_timeout
        delay = 0.05
        while True:
            try:
                conn, _ = await connect(
                    self.scheduler_address,
                    role="worker",
                    my_id=self.id,
                    name=self.name,
                    token=self.token,
                    versions=get_versions(),
                    security=self.security,
                )
                break
            except (OSError, TimeoutError) as exc:
                if deadline is not None and loop.time() > deadline:
                    raise TimeoutError(
                        f"worker could not reach the scheduler at {self.scheduler_address}: {exc}"
                    ) from exc
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 2.0)
        self._generation += 1
        self._scheduler = conn
        conn.allow_thread_writes()  # task threads report lone results themselves
        conn.set_handler(self._on_scheduler_messages)
        conn.on_close(self._on_scheduler_closed)
        conn.send(
            RegisterWorker(
                address=self.address,
                nthreads=self.nthreads,
                name=self.name,
                memory_limit=self.memory_limit,
                resources=dict(self.resources),
                pid=os.getpid(),
                versions=get_versions(),
            )
        )
        if self.nanny_slot:  # the scheduler may restart us, and knows us when we are back
            conn.send(Supervised(slot=self.nanny_slot))
        if self.memory_paused:  # still paused from before a reconnection
            conn.send(Heartbeat(metrics=self._metrics()))

    def _on_scheduler_closed(self, conn: Connection) -> None:
        if self.status not in ("running", "connecting") or conn is not self._scheduler:
            return
        logger.warning("lost the scheduler (%s)", conn.close_reason)
        # A restarted scheduler knows nothing of our tasks or data: start afresh.
        self.data.clear()
        self.state = WorkerState(self.nthreads, self.resource_offer)
        self.state.paused = self.memory_paused
        self.functions.trim()
        if self.reconnect:
            self.status = "connecting"
            self._spawn(self._reconnect())
        else:
            self._spawn(self.close(report=False))

    async def _reconnect(self) -> None:
        try:
            await self._connect()
            self.status = "running"
            logger.info("reconnected to %s", self.scheduler_address)
        except Exception as exc:
            logger.exception("reconnecting failed; closing")
            if isinstance(exc, HandshakeError):
                self.exit_code = EXIT_REFUSED  # the supervisor must not start it again
            await self.close(report=False)

    async def close(self, report: bool = True, reason: str = "closing") -> None:
        """Tell the scheduler we leave, stop serving, let running tasks finish."""
        if self.status in ("closing", "closed"):
            await self._closed.wait()
            return
        self.status = "closing"
        # Leave environments first, while the scheduler can still hear about it.
        await self._environment_host.close()
        if report and self._scheduler is not None and not self._scheduler.closed:
            with contextlib.suppress(CommClosedError):
                self._scheduler.send(Unregister(reason=reason))
            self._scheduler.close(reason)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for conn in self._peers.values():
            conn.close()
        if self._pool is not None:
            self._pool.shutdown()
        others = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        if others:  # let them unwind, so none is left pending when the loop stops
            await asyncio.wait(others, timeout=5)
        await self._plugin_host.close()  # plugin teardowns, then preload teardowns
        self.data.clear()
        if isinstance(self.data, SpillBuffer):
            self.data.close()
        self.status = "closed"
        self._closed.set()

    async def finished(self) -> None:
        """Wait until the worker has closed."""
        await self._closed.wait()

    async def plugin_add(self, plugin: Any, name: str | None = None) -> None:
        """Set up a :class:`~corral.WorkerPlugin` on this worker only (e.g. from a preload)."""
        await self._plugin_host.add(plugin, name=name)

    async def plugin_remove(self, name: str) -> None:
        """Tear down and forget the plugin ``name`` on this worker."""
        await self._plugin_host.remove(name)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- restarts (corral.nanny) -------------------------------------------------------
    @property
    def supervised(self) -> bool:
        """True when a supervisor (``corral worker``, ``LocalCluster``) restarts this process."""
        return bool(self.nanny_slot)

    def request_restart(self, reason: str = "requested") -> None:
        """Restart this worker's process: leave cleanly, exit, let the supervisor start it again.

        Plugins call it from their ``setup`` (``PipInstall(restart_workers=True)``):
        the restart waits until the plugin setups under way finished and were
        answered.  The scheduler is told first and waits for the worker to come
        back.  Safe from any thread.  Raises ``RuntimeError`` when no
        supervisor runs this worker.
        """
        if not self.supervised:
            raise RuntimeError(
                f"worker {self.address or self.name} cannot restart: it does not run under a "
                "supervisor (start it with `corral worker` without --no-nanny, or in "
                "LocalCluster(processes=True))"
            )
        loop = self._loop
        try:
            on_loop = loop is not None and asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if not on_loop:
            assert loop is not None
            loop.call_soon_threadsafe(self._restart_asked, reason, True)
            return
        self._restart_asked(reason, True)

    def _restart_asked(self, reason: str, tell_scheduler: bool = False) -> None:
        if self._restart_reason is not None or self.status not in ("running", "connecting"):
            return
        if not self.supervised:
            logger.error("asked to restart, but no supervisor runs this worker: ignored")
            return
        self._restart_reason = reason
        conn = self._scheduler
        if tell_scheduler and conn is not None and not conn.closed:
            conn.send(WorkerRestarting(reason=reason))
        self._spawn(self._restart_when_idle(reason))

    async def _restart_when_idle(self, reason: str) -> None:
        while self._plugin_host._held is not None:  # a plugin setup/teardown is running
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)  # its answer leaves first
        logger.info("worker %s restarting (%s)", self.name, reason)
        self.exit_code = EXIT_RESTART
        await self.close(reason=f"restart: {reason}")

    # -- scheduler stream ----------------------------------------------------------
    def _on_scheduler_messages(self, batch: list[Message]) -> None:
        if self._pool is not None:
            self._pool.drain()  # results reported by task threads come before replies to them
        if self._plugin_host.holding(batch):
            return  # a plugin setup/teardown is running: these wait for it
        events: list[Any] = []
        for i, msg in enumerate(batch):
            kind = type(msg)
            if kind is Compute:
                assert isinstance(msg, Compute)
                self.functions.add(msg.functions)
                events.append(ComputeEvent(msg.tasks))
            elif kind is FreeKeys:
                assert isinstance(msg, FreeKeys)
                events.append(FreeEvent(msg.keys))
            elif kind is Store:
                assert isinstance(msg, Store)
                events.append(self._store(msg))
            elif kind is UpdateWhoHas:
                events.append(msg)
            elif kind is SetResources:
                assert isinstance(msg, SetResources)
                self._record_offer(msg.resources)  # kept for a re-registration
                events.append(msg)
            elif kind is CloseWorker:
                self._spawn(self.close(reason="asked by the scheduler"))
                return
            elif kind is RestartWorker:
                assert isinstance(msg, RestartWorker)
                self._restart_asked(msg.reason)
                return
            elif kind in ENVIRONMENT_WORKER_OPS:
                self._environment_host.handle(msg)
            elif kind in PLUGIN_WORKER_OPS:
                if self._plugin_host.handle(msg, batch[i + 1 :]):
                    break  # the rest of the batch waits for the plugin setup/teardown
            else:
                logger.warning("ignoring unexpected op %r from the scheduler", kind.op)
        self._handle(events)

    def set_resources(self, **resources: Any) -> Any:
        """Change what this worker offers, at run time (as ``distributed.Worker.set_resources``).

        The named resources are replaced (``GPU=0`` offers none; ``GPU=[0, 1]``
        two indexed GPUs); others stay.  Running tasks keep what they hold and
        nothing new starts until it fits, so the worker never runs more than
        it offers.  The scheduler is told: it places tasks that wait for a
        worker again, and takes back tasks queued here that no longer fit.

        Safe from any thread (a task may call ``get_worker().set_resources(GPU=1)``;
        it returns once applied).  On the worker's event loop it applies at once
        and returns an awaitable, so ``await worker.set_resources(GPU=1)`` works.

        Example::

            worker.set_resources(GPU=2, MEMORY=64e9)
        """
        offer = validate_worker_resources(resources, "set_resources")
        loop = self._loop
        try:
            on_loop = loop is not None and asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if loop is None or on_loop or loop.is_closed():
            self._apply_resources(offer)
            if on_loop:
                assert loop is not None
                done = loop.create_future()
                done.set_result(None)
                return done
            return None
        applied = threading.Event()

        def apply() -> None:
            try:
                self._apply_resources(offer)
            finally:
                applied.set()

        loop.call_soon_threadsafe(apply)
        if not applied.wait(timeout=60):
            raise TimeoutError("the worker's event loop did not apply set_resources within 60s")
        return None

    def _record_offer(self, offer: dict[str, Any]) -> None:
        self.resource_offer.update(offer)
        self.resources.update(resource_amounts(offer))

    def _apply_resources(self, offer: dict[str, Any]) -> None:
        self._record_offer(offer)
        conn = self._scheduler
        if conn is not None and not conn.closed and self.status == "running":
            conn.send(SetResources(resources=offer))
        self._handle([SetResources(resources=offer)])

    def _store(self, msg: Store) -> DataStored:
        nbytes = {}
        for key, payload in msg.data.items():
            try:
                value = deserialize(payload)
            except Exception:
                # Undecodable data is not held: the scheduler learns it is missing here.
                logger.exception("cannot deserialize scattered data %r", key)
                if self._scheduler is not None and not self._scheduler.closed:
                    self._scheduler.send(MissingData(key=key, holder=self.address))
                continue
            self.data[key] = value
            nbytes[key] = sizeof(value)
        return DataStored(nbytes, msg.versions)

    def _handle(self, events: list[Any]) -> None:
        mark = self._plugin_host.mark(self.state)  # for plugins' transition hooks
        instructions = self.state.handle(events)
        sends: list[Message] = []
        pushes: list[tuple[Connection, KeyInMemory]] = []
        for inst in instructions:
            kind = type(inst)
            if kind is Execute:
                assert isinstance(inst, Execute) and self._pool is not None
                self._pool.submit(self._job(inst))
            elif kind is SendToScheduler:
                assert isinstance(inst, SendToScheduler)
                msg = inst.msg
                if self._watchers and type(msg) is TaskFinished:
                    assert isinstance(msg, TaskFinished)
                    ts = self.state.tasks.get(msg.key)
                    if ts is not None and ts.spec is not None:
                        pushes += self._pushes_for(msg, ts.spec.notify)
                sends.append(msg)
            elif kind is Gather:
                assert isinstance(inst, Gather)
                self._spawn(self._gather(inst.peer, inst.keys, self._generation))
            elif kind is ReleaseData:
                assert isinstance(inst, ReleaseData)
                for key in inst.keys:
                    self.data.pop(key, None)
        if sends and self._scheduler is not None and not self._scheduler.closed:
            # Busy (work queued here): let reports gather for a moment; idle: send now.
            delay = BUSY_FLUSH_DELAY if self.state.queued else 0.0
            self._scheduler.send_many(sends, delay=delay)
            # Then the clients' copies: the scheduler hears of a result first, so
            # a client that asks it about the key right away finds it in memory.
            for conn, push in pushes:
                conn.send_many([push], delay=delay)
        if not self.state.tasks:
            self.functions.trim()
        self._plugin_host.transitions(self.state, mark)

    def _pushes_for(
        self, msg: TaskFinished, notify: list[str] | None
    ) -> list[tuple[Connection, KeyInMemory]]:
        """The ``key_in_memory`` copies of a small result for the waiting clients watching here.

        ``notify``: the clients waiting for it (``compute.tasks[].notify``).
        Lists them in ``msg.notified``: the scheduler relays the result only
        to the clients not listed.  Safe from a task thread.
        """
        if msg.result is None or not notify:
            return []  # a large result is fetched from here by the client anyway
        pushes = []
        for client_id in notify:
            conn = self._watchers.get(client_id)
            if conn is not None and not conn.closed:
                push = KeyInMemory(
                    key=msg.key, who_has=[self.address], typename=msg.typename, result=msg.result
                )
                pushes.append((conn, push))
        if pushes:
            msg.notified = [conn.info["client"] for conn, _ in pushes]
        return pushes

    def _job(self, inst: Execute) -> Any:
        spec, functions, generation = inst.spec, self.functions, self._generation
        held = task_resources(spec.resources, inst.held) if spec.resources else None
        # The inputs as they are now: one dropped before a thread takes the task
        # (its key was scattered over since) must not vanish from under it.
        data = self.data
        inputs = {key: data[key] for key in spec.who_has if key in data} if spec.who_has else {}

        def job() -> Any:
            return (generation, spec, *run_task(spec, functions, inputs, held))

        return job

    def _report_from_thread(self, outcome: Any) -> Any:
        """On the task thread: report a lone task's result to the scheduler (and pushes) now.

        The loop's wake-up and bookkeeping then happen after the result left,
        not before.  Only plain-TCP connections nothing is queued on are written
        from here (``Connection.send_from_thread``); otherwise, for failures,
        and for results of a run from before a reconnection, the loop reports
        as usual.  The state machine learns it was sent (``reported``) and
        sends it again only for a newer run of the key.
        """
        generation, spec, event, value = outcome
        conn = self._scheduler
        if (
            type(event) is not ExecuteSuccess
            or generation != self._generation
            or conn is None
            or self.status != "running"
        ):
            return outcome
        msg = task_finished(event, event.run_id)
        pushes = self._pushes_for(msg, spec.notify) if self._watchers else []
        if not conn.send_from_thread([msg]):
            return outcome
        for client_conn, push in pushes:
            if not client_conn.send_from_thread([push]):
                self._loop_call(_send_if_open, client_conn, [push])
        self.reported_by_threads += 1
        return generation, spec, dataclasses.replace(event, reported=True), value

    def _loop_call(self, fn: Any, *args: Any) -> None:
        """Run ``fn(*args)`` on the worker's event loop, from any thread."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the worker is gone
                loop.call_soon_threadsafe(fn, *args)

    def _on_results(self, batch: list[Any]) -> None:
        events = []
        for generation, _spec, event, value in batch:
            if generation != self._generation:
                continue  # finished after a scheduler restart: nobody wants it
            if isinstance(event, ExecuteSuccess) and self._stores_result(event.key):
                self.data[event.key] = value
            events.append(event)
        if events:
            self._handle(events)

    def _stores_result(self, key: str) -> bool:
        """Whether a run's value may go into the store: not over data stored since."""
        ts = self.state.tasks.get(key)
        return ts is not None and ts.state in ("executing", "cancelled")

    # -- fetching from peers -------------------------------------------------------
    async def _peer(self, address: str) -> Connection:
        conn = self._peers.get(address)
        if conn is None or conn.closed:
            conn, _ = await connect(
                address, role="peer", my_id=self.id, token=self.token, security=self.security
            )
            self._peers[address] = conn
        return conn

    async def _gather(self, peer: str, keys: list[str], generation: int) -> None:
        received: dict[str, int] = {}
        missing: list[str] = list(keys)
        versions: dict[str, int] | None = None
        failed = False
        try:
            conn = await self._peer(peer)
            conn.send(GetData(keys=keys))
            reply = await conn.recv(timeout=300)
            if not isinstance(reply, Data):
                raise CommClosedError(f"unexpected reply {type(reply).op!r} from {peer}")
            for key, payload in reply.data.items():
                value = deserialize(payload)
                if generation == self._generation and self._fetches(key):
                    self.data[key] = value
                received[key] = sizeof(value)
            missing = [k for k in keys if k not in received]
            versions = reply.versions
        except (OSError, TimeoutError, CommClosedError, HandshakeError) as exc:
            logger.info("could not fetch %d keys from %s: %s", len(keys), peer, exc)
            failed = True
            self._peers.pop(peer, None)
        except Exception:
            logger.exception("error fetching from %s", peer)
            failed = True
        if generation == self._generation and self.status == "running":
            self._handle([GatherDone(peer, received, missing, failed, versions)])

    def _fetches(self, key: str) -> bool:
        """Whether a fetched value may go into the store: only while the key is wanted.

        Never over a value stored or computed here since the fetch left: the
        copy that lands may be of an older value of the key.
        """
        ts = self.state.tasks.get(key)
        return ts is not None and ts.state in ("flight", "fetch", "missing")

    # -- serving peers and clients ---------------------------------------------------
    async def _serve_peer(self, conn: Connection) -> None:
        try:
            hello = await accept(
                conn,
                role="worker",
                server_id=self.id,
                token=self.token,
                allowed_roles=("peer", "client", "worker"),
            )
        except Exception:
            return
        while not conn.closed:
            try:
                msg = await conn.recv()
            except CommClosedError:
                return
            if isinstance(msg, GetData):
                if self._pool is not None:
                    self._pool.drain()  # a result a task thread reported is served
                conn.send(self._get_data(msg.keys, msg.serializers))
            elif isinstance(msg, WatchResults) and hello.role == "client":
                self._watch(hello.id, conn)
            else:
                conn.abort(f"op {type(msg).op!r} is not served on a worker's peer port")
                return

    def _watch(self, client_id: str, conn: Connection) -> None:
        """Push ``client_id``'s small results on ``conn`` until either side closes it."""
        old = self._watchers.get(client_id)
        if old is not None and old is not conn:
            old.close("replaced by a newer watch_results connection")
        self._watchers[client_id] = conn
        conn.info["client"] = client_id
        conn.allow_thread_writes()  # task threads push lone results themselves

        def forget(closed: Connection) -> None:
            if self._watchers.get(client_id) is closed:
                del self._watchers[client_id]

        conn.on_close(forget)

    def _get_data(self, keys: list[str], serializers: list[str] | None = None) -> Data:
        data = {}
        missing = []
        versions: dict[str, int] = {}  # of each value sent: the asker learns which it got
        tasks = self.state.tasks
        for key in keys:
            if key in self.data:
                ts = tasks.get(key)
                versions[key] = ts.version if ts is not None else 0
                try:
                    data[key] = _serialize_for_peer(self.data[key], serializers)
                except Exception as exc:
                    logger.exception("cannot serialize %r for a peer", key)
                    missing.append(key)
                    self._report_unservable(key, exc)
            else:
                missing.append(key)
        for key in missing:
            versions.pop(key, None)
        return Data(data=data, missing=missing, versions=versions or None)

    def _report_unservable(self, key: str, exc: Exception) -> None:
        """Tell the scheduler a value held here cannot be serialized (recomputing won't help)."""
        conn = self._scheduler
        if conn is None or conn.closed:
            return
        error = error_info(
            TypeError(f"the result of {key!r} cannot be serialized to send it elsewhere: {exc}")
        )
        conn.send(MissingData(key=key, holder=self.address, error=error))

    # -- heartbeats ----------------------------------------------------------------
    async def _heartbeat_loop(self) -> None:
        while self.status in ("running", "connecting"):
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            conn = self._scheduler
            if conn is None or conn.closed:
                continue
            conn.send(Heartbeat(metrics=self._metrics()))

    def _metrics(self) -> dict[str, Any]:
        try:
            mem = self._process.memory_info().rss
            cpu = self._process.cpu_percent()
        except psutil.Error:
            mem, cpu = 0, 0.0
        return {
            "memory": mem,
            "cpu": cpu,
            "executing": len(self.state.executing),
            "in_memory": len(self.data),
            **(
                {"spilled": len(self.data.slow), "spilled_bytes": self.data.spilled_bytes}
                if isinstance(self.data, SpillBuffer)
                else {}
            ),
            "resources_available": dict(self.state.available_resources),
            "status": "paused" if self.memory_paused else "running",
        }

    # -- memory (corral.worker.memory) -------------------------------------------------
    async def _memory_monitor(self) -> None:
        """Sample RSS; pause above the pause mark, resume below it, leave above terminate."""
        while self.status in ("running", "connecting"):
            await asyncio.sleep(MONITOR_INTERVAL)
            try:
                rss = self._process.memory_info().rss
            except psutil.Error:
                continue
            if (
                self.memory_policy.spill is not None
                and isinstance(self.data, SpillBuffer)
                and rss > self.memory_policy.spill * self.memory_limit
            ):  # results to disk first: that may be enough
                rss = self._spill_until(int(self.memory_policy.spill * self.memory_limit), rss)
            action = decide(rss, self.memory_limit, self.memory_policy, self.memory_paused)
            if action == "terminate":
                self._memory_terminate(rss)
                return
            if action in ("pause", "resume"):
                self._set_paused(action == "pause", rss)

    def _spill_until(self, target: int, rss: int, most: int = 100) -> int:
        """Spill least recently used results until RSS is under ``target`` (or nothing is left)."""
        assert isinstance(self.data, SpillBuffer)
        for _ in range(most):
            if rss <= target or not self.data.evict():
                break
            try:
                rss = self._process.memory_info().rss
            except psutil.Error:
                break
        return rss

    def _set_paused(self, paused: bool, rss: int) -> None:
        self.memory_paused = paused
        used = f"{rss / 2**20:.0f} MiB of {self.memory_limit / 2**20:.0f} MiB"
        if paused:
            logger.warning("worker %s paused: memory %s is above its pause mark", self.name, used)
        else:
            logger.info("worker %s resumes: memory %s", self.name, used)
        self._handle([PauseEvent(paused)])
        conn = self._scheduler
        if conn is not None and not conn.closed:
            conn.send(Heartbeat(metrics=self._metrics()))  # the scheduler learns it now

    def _memory_terminate(self, rss: int) -> None:
        logger.error(
            "worker %s uses %.0f MiB, above %.0f%% of its memory limit (%.0f MiB): leaving so "
            "that its supervisor restarts it (exit code %d); its tasks move elsewhere",
            self.name,
            rss / 2**20,
            100 * (self.memory_policy.terminate or 0),
            self.memory_limit / 2**20,
            MEMORY_EXIT_CODE,
        )
        self.exit_code = MEMORY_EXIT_CODE
        if self._scheduler is not None:
            # No goodbye: the scheduler counts the running tasks as suspicious.
            self._scheduler.abort("worker memory above its terminate mark")
        # If closing hangs (a plugin teardown, say), the process leaves anyway.
        timer = threading.Timer(TERMINATE_GRACE, os._exit, (MEMORY_EXIT_CODE,))
        timer.daemon = True
        timer.start()
        self._spawn(self.close(report=False, reason="memory above its terminate mark"))


def _send_if_open(conn: Connection, msgs: list[Message]) -> None:
    """Queue ``msgs`` on ``conn`` unless it closed meanwhile (a client that left)."""
    if not conn.closed:
        conn.send_many(msgs)


def _serialize_for_peer(value: Any, serializers: list[str] | None) -> Any:
    """The first of the asker's ``serializers`` that can encode ``value``, else pickle.

    A JavaScript peer asks for ``["msgpack"]``: plain values (numbers, strings,
    lists, dicts, bytes) reach it as msgpack; anything else still goes as
    pickle, and the asker reports that it cannot read it (a task error).
    """
    for name in serializers or ():
        if name in ("pickle", "msgpack"):
            with contextlib.suppress(SerializationError):
                return serialize(value, name)
    return serialize(value)


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")


def _outbound_ip(target_host: str) -> str:
    """The local IP address used to reach ``target_host``."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((target_host, 9))
        return str(s.getsockname()[0])
    return socket.gethostbyname(socket.gethostname())
