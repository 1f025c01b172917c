"""The scheduler process's IO: accept connections and drive :class:`SchedulerState`.

Every connection opens with the handshake (:mod:`corral.comm.handshake`);
then each batch of messages from a peer is checked against what that peer's
role may send, given to the pure state machine, and the messages it returns
are queued on the recipients' streams.  A peer sending something it may not
loses its connection; nobody else notices.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from .. import config, logs
from ..comm import Connection, Server, format_address, start_server
from ..comm.handshake import accept
from ..comm.security import Security, server_ssl, warn_if_exposed, write_scheduler_file
from ..protocol.messages import (
    AddKeys,
    CancelKeys,
    CloseWorker,
    EnvironmentStatus,
    Heartbeat,
    Message,
    MissingData,
    RegisterWorker,
    ReleaseKeys,
    Reply,
    Request,
    Scatter,
    SetResources,
    TaskErred,
    TaskFinished,
    Unregister,
    UpdateGraph,
    WorkerResult,
)
from ..resources import validate_resources, validate_worker_resources
from ..versions import get_versions
from .consistency import CONSISTENCY_CLIENT_OPS, CONSISTENCY_WORKER_OPS, ConsistencyHost
from .environment_host import ENVIRONMENT_CLIENT_OPS, EnvironmentHost
from .observer import Observer
from .placement import resolve_workers
from .plugin_host import PLUGIN_CLIENT_OPS, PluginHost
from .state import (
    WORKER_STATUSES,
    ClientJoined,
    ClientLeft,
    SchedulerState,
    WorkerLeft,
    WorkerStatus,
)

logger = logging.getLogger("corral.scheduler")

DEFAULT_PORT = 8786

WORKER_OPS = frozenset(
    {TaskFinished, TaskErred, AddKeys, MissingData, Heartbeat, Unregister, SetResources}
)
CLIENT_OPS = frozenset(
    {UpdateGraph, ReleaseKeys, CancelKeys, Scatter, Request, Heartbeat, SetResources}
)
# Plugins and run (corral.scheduler.plugin_host)
WORKER_OPS = WORKER_OPS | {WorkerResult}
CLIENT_OPS = CLIENT_OPS | PLUGIN_CLIENT_OPS
# Version checks and restarts (corral.scheduler.consistency)
WORKER_OPS = WORKER_OPS | CONSISTENCY_WORKER_OPS
CLIENT_OPS = CLIENT_OPS | CONSISTENCY_CLIENT_OPS
# Worker environments (corral.scheduler.environment_host)
WORKER_OPS = WORKER_OPS | {EnvironmentStatus}
CLIENT_OPS = CLIENT_OPS | ENVIRONMENT_CLIENT_OPS


class Scheduler:
    """The Corral scheduler: one per cluster.

    Example::

        scheduler = Scheduler(port=8786)
        await scheduler.start()
        print(scheduler.address)   # tcp://127.0.0.1:8786
        await scheduler.finished()
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        token: str | None = None,
        scheduler_file: str | None = None,
        allowed_failures: int = 3,
        preload: str | list[str] | None = None,
        preload_argv: list[Any] | None = None,
        security: Security | None = None,
        max_frame_bytes: int | None = None,
        token_in_scheduler_file: bool = False,
        version_check: str = "warn",
        dashboard_address: str | bool | None = None,
        dashboard_auth: str | None = None,
        dashboard_tls: bool | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.token = token
        self.scheduler_file = scheduler_file
        # TLS (tls:// address) when ``security`` has a certificate; see corral.comm.security.
        self.security = security
        self.max_frame_bytes = max_frame_bytes
        # Write the token into the scheduler file (0600) for workers and clients
        # that read it (``corral scheduler --auth generate``).
        self.token_in_scheduler_file = token_in_scheduler_file
        self.id = f"scheduler-{uuid.uuid4().hex[:12]}"
        self.state = SchedulerState(allowed_failures=allowed_failures)
        self.address = ""
        self.status = "created"
        self.started = time.time()
        self._server: Server | None = None
        self._streams: dict[str, Connection] = {}
        self._closed = asyncio.Event()
        self.requests: dict[str, Callable[..., Any]] = {
            "scheduler_info": self.scheduler_info,
            "who_has": lambda keys=None: self.state.who_has(keys),
            "why_pending": lambda keys: {k: self.state.why_pending(k) for k in keys},
            "story": lambda key: [list(t) for t in self.state.story(key)],
            "task_counts": self.state.task_counts,
            "versions": self.versions,
        }
        # Plugins, preloads (imported here), run and events: corral.scheduler.plugin_host.
        self._plugin_host = PluginHost(self, preload, preload_argv)
        self.plugins: dict[str, Any] = self._plugin_host.plugins
        self.requests["get_events"] = self._plugin_host.get_events
        # Worker environments: corral.scheduler.environment_host.
        self._environment_host = EnvironmentHost(self)
        self.requests["environments"] = self._environment_host.environments
        # Version checks ("warn", "strict": refuse mismatched workers, "off") and
        # worker restarts: corral.scheduler.consistency.
        self._consistency = ConsistencyHost(self, version_check)
        self._accepting = asyncio.Event()  # set once preloads are set up
        # Dashboard and /metrics (corral.dashboard), fed by the observer (task stream,
        # message counts, loop lag, shared samples: corral.scheduler.observer).
        # dashboard_address: "[HOST]:PORT"; None: the configuration's; False or "": none.
        self._dashboard_address = dashboard_address
        # "token"/"none", serve HTTPS with our certificate; None: the configuration's.
        self._dashboard_access: dict[str, Any] = {"auth": dashboard_auth, "tls": dashboard_tls}
        self.observer = Observer(self)
        self.dashboard: Any = None
        self.services: dict[str, int] = {}  # name -> port (scheduler_info()["services"])
        self._lag_monitor: asyncio.Task[None] | None = None
        logs.install()  # a bounded in-memory log: client.get_scheduler_logs()
        self.requests["get_logs"] = logs.get_logs

    # -- lifecycle -----------------------------------------------------------------
    async def start(self) -> Scheduler:
        """Start listening; write the scheduler file if one was asked for."""
        tls = server_ssl(self.security)
        self._server = await start_server(
            self.host,
            self.port,
            self._on_connection,
            max_frame_bytes=self.max_frame_bytes,
            ssl_context=tls,
        )
        sock = self._server.sockets[0].getsockname()
        self.address = format_address(self.host, sock[1], "tls" if tls else "tcp")
        warn_if_exposed("scheduler", self.host, token=self.token, security=self.security)
        try:
            await self._start_dashboard()
            await self._plugin_host.start()  # preload setups, then plugins' start
        except BaseException:
            await self.close()
            raise
        self.status = "running"
        self._accepting.set()
        if self.scheduler_file:
            info: dict[str, Any] = {"address": self.address, "id": self.id, "pid": os.getpid()}
            if self.token and self.token_in_scheduler_file:
                info["token"] = self.token
            info.update(self._welcome_info() or {})
            write_scheduler_file(self.scheduler_file, info)  # owner-only (0600)
        logger.info("scheduler at %s", self.address)
        return self

    async def close(self) -> None:
        """Ask workers to close, drop every connection, stop listening."""
        if self.status == "closed":
            return
        self.status = "closed"
        for conn in list(self._streams.values()):
            if conn.closed:
                continue
            if conn.info.get("role") == "worker":
                conn.send(CloseWorker(reason="scheduler closing"))
            conn.close("scheduler closing")
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self._accepting.set()
        await self._plugin_host.close()  # plugins' before_close/close, preload teardowns
        await self._stop_dashboard()
        self._closed.set()

    async def finished(self) -> None:
        """Wait until the scheduler has closed."""
        await self._closed.wait()

    async def _start_dashboard(self) -> None:
        address = self._dashboard_address
        if address is None:
            address = config.get("dashboard.address") if config.get("dashboard.enabled") else False
        if address is False or address == "":
            return
        from ..dashboard.server import DashboardServer

        host, port = config.parse_address(str(address), self.host)
        self.dashboard = DashboardServer(self, self.observer, host, port, **self._dashboard_access)
        self.services["dashboard"] = self.dashboard.bind()
        await self.dashboard.start()  # warns if it is exposed without token or HTTPS
        self._lag_monitor = asyncio.ensure_future(self.observer.monitor_lag())

    async def _stop_dashboard(self) -> None:
        if self._lag_monitor is not None:
            self._lag_monitor.cancel()
        if self.dashboard is not None:
            await self.dashboard.close()

    @property
    def dashboard_link(self) -> str | None:
        """``http(s)://HOST:PORT/status[?token=...]`` when a dashboard is served, else ``None``."""
        served = self.dashboard is not None and "dashboard" in self.services
        return self.dashboard.link if served else None

    def _welcome_info(self) -> dict[str, Any] | None:
        """What connectors learn: service ports, and how to link to the dashboard."""
        if not self.services:
            return None
        info: dict[str, Any] = {"services": dict(self.services)}
        if self.dashboard is not None:
            info["dashboard"] = self.dashboard.description()  # no secret in it
        return info

    # -- plugins and events (corral.scheduler.plugin_host) ---------------------------
    @property
    def workers(self) -> dict[str, Any]:
        """Connected workers: address -> their record (``name``, ``nthreads``, ...)."""
        return self.state.workers

    def add_plugin(
        self, plugin: Any, *, idempotent: bool | None = None, name: str | None = None
    ) -> None:
        """Add a :class:`~corral.SchedulerPlugin` (from a preload, say) to this scheduler."""
        self._plugin_host.add_plugin(plugin, idempotent=idempotent, name=name)

    def remove_plugin(self, name: str) -> None:
        """Remove the scheduler plugin ``name`` (``ValueError`` if unknown)."""
        self._plugin_host.remove_plugin(name)

    def log_event(self, topic: str | list[str], msg: Any) -> None:
        """Record an event; clients read them with ``client.get_events(topic)``."""
        self._plugin_host.log_event(topic, msg)

    def get_events(self, topic: str | None = None) -> Any:
        """Recorded events of ``topic`` (``[[time, msg], ...]``), or of every topic."""
        return self._plugin_host.get_events(topic)

    # -- connections ---------------------------------------------------------------
    async def _on_connection(self, conn: Connection) -> None:
        if not self._accepting.is_set():
            await self._accepting.wait()  # preloads first
        if self.status != "running":
            conn.close("the scheduler is not running")
            return
        try:
            hs = await accept(
                conn,
                role="scheduler",
                server_id=self.id,
                token=self.token,
                allowed_roles=("client", "worker"),
                check=self._consistency.check_handshake,
                info=self._welcome_info(),
            )
        except Exception:
            return
        if hs.role == "worker":
            await self._serve_worker(conn)
        else:
            if hs.id not in self._streams:
                self._consistency.client_joined(hs.id, hs.versions)
            self._serve_client(conn, hs.id)

    async def _serve_worker(self, conn: Connection) -> None:
        try:
            reg = await conn.recv(timeout=30)
        except Exception as exc:
            conn.abort(f"worker sent no registration: {exc}")
            return
        if not isinstance(reg, RegisterWorker):
            conn.abort(f"expected register_worker, got {type(reg).op!r}")
            return
        address = reg.address
        if address in self._streams:
            conn.abort(f"a worker is already registered at {address}")
            return
        try:
            validate_resources(reg.resources, f"resources of worker {address}")
        except ValueError as exc:
            logger.warning("refused worker %s: %s", address, exc)
            conn.abort(f"refused: {exc}")
            return
        self._consistency.worker_joining(address, reg.versions)  # logs a mismatch
        conn.info["address"] = address
        self._streams[address] = conn
        self._plugin_host.worker_joining(address, conn)  # its plugins go first
        self._environment_host.worker_joining(address, conn)  # then environment checks
        self._apply(address, [reg])
        logger.info("worker %s joined (%s, %d threads)", address, reg.name, reg.nthreads)
        self.log_event("workers", {"action": "add-worker", "worker": address, "name": reg.name})
        counts = self.observer.worker_ops  # per-op message counts (corral.scheduler.observer)
        task_done = self.observer.task_done  # the dashboard's task stream

        def on_messages(batch: list[Message]) -> None:
            for msg in batch:
                kind = type(msg)
                if kind not in WORKER_OPS:
                    conn.abort(f"op {kind.op!r} is not allowed from a worker")
                    return
                counts[kind] = counts.get(kind, 0) + 1
                if kind is TaskFinished or kind is TaskErred:
                    task_done(address, msg)
            events: list[Any] = []  # messages, and internal events (WorkerStatus)
            statuses: list[EnvironmentStatus] = []
            for msg in batch:
                if isinstance(msg, Heartbeat):
                    ws = self.state.workers.get(address)
                    if ws is not None:
                        ws.metrics = msg.metrics
                        # Memory pause/resume (corral.worker.memory): a state event.
                        status = msg.metrics.get("status")
                        if status in WORKER_STATUSES and status != ws.status:
                            events.append(WorkerStatus(address, status))
                elif isinstance(msg, Unregister):
                    conn.info["expected"] = True
                elif isinstance(msg, SetResources):
                    try:
                        validate_worker_resources(msg.resources, f"resources of worker {address}")
                    except ValueError as exc:
                        logger.warning("closing worker %s: %s", address, exc)
                        conn.abort(f"invalid set_resources: {exc}")
                        return
                    events.append(SetResources(resources=msg.resources))
                elif isinstance(msg, WorkerResult):
                    self._plugin_host.worker_result(address, msg)
                elif type(msg) in CONSISTENCY_WORKER_OPS:
                    self._consistency.handle_worker(address, msg)
                else:
                    if isinstance(msg, EnvironmentStatus):
                        statuses.append(msg)
                    events.append(msg)
            if events:
                self._apply(address, events)
            for env_status in statuses:  # answered once membership is in the state
                self._environment_host.worker_status(address, env_status)

        conn.set_handler(on_messages)
        conn.on_close(self._on_worker_closed)

    def _on_worker_closed(self, conn: Connection) -> None:
        address = conn.info["address"]
        if self._streams.get(address) is conn:
            del self._streams[address]
        expected = bool(conn.info.get("expected"))
        logger.info("worker %s left (%s)", address, conn.close_reason)
        self.log_event(
            "workers", {"action": "remove-worker", "worker": address, "reason": conn.close_reason}
        )
        self._plugin_host.worker_left(address)
        self._environment_host.worker_left(address)
        self._consistency.worker_left(address)
        if self.status == "running":
            self._apply(address, [WorkerLeft(address, expected=expected)])

    def _serve_client(self, conn: Connection, client_id: str) -> None:
        if client_id in self._streams:
            conn.abort(f"client id {client_id} is already connected")
            return
        self._streams[client_id] = conn
        self._apply(client_id, [ClientJoined(client_id)])
        counts = self.observer.client_ops  # per-op message counts (corral.scheduler.observer)

        def on_messages(batch: list[Message]) -> None:
            events: list[Message] = []
            for msg in batch:
                kind = type(msg)
                if kind not in CLIENT_OPS:
                    conn.abort(f"op {kind.op!r} is not allowed from a client")
                    return
                counts[kind] = counts.get(kind, 0) + 1
                if kind is Request:
                    assert isinstance(msg, Request)
                    if events:
                        self._apply(client_id, events)
                        events = []
                    conn.send(self._answer(msg))
                elif kind is Scatter:
                    assert isinstance(msg, Scatter)
                    if events:
                        self._apply(client_id, events)
                        events = []
                    self._scatter(client_id, conn, msg)
                elif kind is SetResources:
                    assert isinstance(msg, SetResources)
                    if events:
                        self._apply(client_id, events)
                        events = []
                    self._set_resources(client_id, conn, msg)
                elif kind in PLUGIN_CLIENT_OPS:
                    if events:
                        self._apply(client_id, events)
                        events = []
                    self._plugin_host.handle_client(client_id, conn, msg)
                elif kind in ENVIRONMENT_CLIENT_OPS:
                    if events:
                        self._apply(client_id, events)
                        events = []
                    self._environment_host.handle_client(client_id, conn, msg)
                elif kind in CONSISTENCY_CLIENT_OPS:
                    if events:
                        self._apply(client_id, events)
                        events = []
                    self._consistency.handle_client(client_id, conn, msg)
                elif kind is not Heartbeat:
                    events.append(msg)
            if events:
                self._apply(client_id, events)

        def on_close(conn: Connection) -> None:
            if self._streams.get(client_id) is conn:
                del self._streams[client_id]
                self._consistency.client_left(client_id)
            if self.status == "running":
                self._apply(client_id, [ClientLeft(client_id)])

        conn.set_handler(on_messages)
        conn.on_close(on_close)

    # -- driving the state machine -------------------------------------------------
    def _apply(self, source: str, events: list[Any]) -> None:
        plugins = self._plugin_host
        mark = plugins.mark()
        try:
            out = self.state.handle(source, events)
        except Exception:
            # A bug in the state machine must not take the scheduler down silently.
            logger.exception(
                "scheduler state failed handling %d events from %s", len(events), source
            )
            raise
        for recipient, msgs in out.items():
            conn = self._streams.get(recipient)
            if conn is not None and not conn.closed:
                conn.send_many(msgs)
        if plugins.active:
            plugins.after(source, events, mark)  # scheduler plugin hooks

    def _set_resources(self, client_id: str, conn: Connection, msg: SetResources) -> None:
        error = None
        if msg.worker not in self.state.workers:
            error = f"unknown worker {msg.worker!r}"
        else:
            try:
                validate_worker_resources(msg.resources, f"resources of worker {msg.worker}")
            except ValueError as exc:
                error = str(exc)
        if error is None:
            self._apply(client_id, [msg])
        if msg.id is not None:
            conn.send(Reply(id=msg.id, error=error, result=None if error else True))

    def _scatter(self, client_id: str, conn: Connection, msg: Scatter) -> None:
        if msg.workers:
            known = self.state.workers
            unknown = [w for w in msg.workers if not resolve_workers([w], known)]
            if unknown:
                conn.send(Reply(id=msg.id, error=f"unknown workers: {unknown}"))
                return
        if not self.state.workers:
            conn.send(Reply(id=msg.id, error="no workers to scatter to"))
            return
        self._apply(client_id, [msg])
        conn.send(Reply(id=msg.id, result=self.state.who_has(list(msg.data))))

    def _answer(self, req: Request) -> Reply:
        method = self.requests.get(req.method)
        if method is None:
            return Reply(id=req.id, error=f"unknown request method {req.method!r}")
        try:
            return Reply(id=req.id, result=method(**req.args))
        except Exception as exc:
            logger.exception("request %s failed", req.method)
            return Reply(id=req.id, error=f"{type(exc).__name__}: {exc}")

    # -- read-only answers ---------------------------------------------------------
    def scheduler_info(self) -> dict[str, Any]:
        """Identity and workers, in dask.distributed's layout."""
        return {
            "type": "Scheduler",
            "id": self.id,
            "address": self.address,
            "pid": os.getpid(),
            "started": self.started,
            "workers": {
                addr: self.state.worker_info(ws) for addr, ws in self.state.workers.items()
            },
            "tasks": self.state.task_counts(),
            "services": dict(self.services),
        }

    def versions(self) -> dict[str, Any]:
        """Versions of the scheduler and of every worker."""
        return {
            "scheduler": get_versions(),
            "workers": {addr: ws.versions for addr, ws in self.state.workers.items()},
        }
