"""The dashboard's HTTP server: aiohttp, in the scheduler's own event loop.

Routes:

* ``/status`` (and ``/``): the page (``static/index.html``, plain JS/CSS);
* ``/ws``: a WebSocket pushing one JSON frame per ``dashboard.interval``
  seconds: ``{"snapshot": ..., "stream": [[key, group, worker, start, stop,
  erred], ...]}``, the stream part holding only the tasks finished since the
  viewer's previous frame;
* ``/api/snapshot``: the same as one JSON document (for ``curl`` and tests);
* ``/metrics``: Prometheus text (:mod:`corral.dashboard.metrics`);
* ``/health``: ``ok`` (open to anyone);
* ``/login``: a form to paste the token into (when one is required).

Who may see the rest, and whether it is served over HTTPS, is decided once
(:mod:`corral.dashboard.access`: the cluster's token, or with mutual TLS a
client certificate; HTTPS with the scheduler's certificate) and enforced by a
middleware (:mod:`corral.dashboard.auth`).  Links come from
:mod:`corral.dashboard.links`.

The listening socket is bound synchronously when the scheduler starts (so
its port is known at once: ``scheduler_info()["services"]["dashboard"]``);
aiohttp is imported in a thread and starts serving on that socket a moment
later, so the scheduler's own start is not delayed.  A busy port falls back
to a free one, with a warning.  Every viewer shares the observer's samples;
a slow viewer skips frames (its task stream catches up in the next one).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from .. import config
from .access import resolve_access
from .links import dashboard_url, without_token

if TYPE_CHECKING:
    from ..scheduler.observer import Observer
    from ..scheduler.server import Scheduler

logger = logging.getLogger("corral.dashboard")

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
STREAM_PER_FRAME = 2000  # newest finished tasks sent per frame at most


def _import_web() -> Any:
    """Import aiohttp and prometheus_client (slow-ish: done in a thread)."""
    import prometheus_client  # noqa: F401
    from aiohttp import web

    from . import auth, metrics  # noqa: F401

    return web


def bind(host: str, port: int) -> socket.socket:
    """A listening, non-blocking socket on ``host:port`` (a free port if that one is busy)."""
    infos = socket.getaddrinfo(
        host or "0.0.0.0", port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or port == 0:
                raise
            sock.bind((sockaddr[0], 0, *sockaddr[2:]))
            logger.warning(
                "dashboard port %d is in use (another cluster?): serving the dashboard on "
                "port %d instead",
                port,
                sock.getsockname()[1],
            )
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _frame(snapshot_json: str, stream: list[Any]) -> str:
    """One frame's JSON text; the snapshot is serialized once and shared by every viewer."""
    return '{"snapshot":' + snapshot_json + ',"stream":' + json.dumps(stream) + "}"


class _Viewer:
    __slots__ = ("busy", "seq", "ws")

    def __init__(self, ws: Any, seq: int) -> None:
        self.ws = ws
        self.seq = seq
        self.busy = False


class DashboardServer:
    """Serves one scheduler's dashboard and metrics.

    Example (what :class:`~corral.Scheduler` does)::

        dashboard = DashboardServer(scheduler, scheduler.observer, "127.0.0.1", 8787)
        port = dashboard.bind()
        await dashboard.start()
        dashboard.link          # 'http://127.0.0.1:8787/status?token=...'
        ...
        await dashboard.close()

    ``auth`` (``"token"`` or ``"none"``) and ``tls`` (serve HTTPS with the
    scheduler's certificate) default to ``dashboard.auth`` and
    ``dashboard.tls`` of the configuration; the token and the certificate
    are the scheduler's (``scheduler.token``, ``scheduler.security``).
    """

    def __init__(
        self,
        scheduler: Scheduler,
        observer: Observer,
        host: str,
        port: int,
        *,
        auth: str | None = None,
        tls: bool | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.observer = observer
        self.host = host
        self.port = port
        self.access = resolve_access(
            scheduler.token,
            scheduler.security,
            auth=config.get("dashboard.auth", auth),
            tls=config.get("dashboard.tls", tls),
        )
        self.sock: socket.socket | None = None
        self.ready = asyncio.Event()
        self._runner: Any = None
        self._task: asyncio.Task[None] | None = None
        self._broadcaster: asyncio.Task[None] | None = None
        self._viewers: set[_Viewer] = set()
        self._sends: set[asyncio.Task[None]] = set()
        self._registry: Any = None
        self._snapshot_text: tuple[int, str] = (-1, "")
        self._closed = False

    def bind(self) -> int:
        """Bind the listening socket now; return its port."""
        try:
            self.sock = bind(self.host, self.port)
        except OSError as exc:
            raise RuntimeError(
                f"cannot serve the dashboard on {self.host}:{self.port}: {exc} "
                "(choose another --dashboard-address, or --no-dashboard)"
            ) from None
        self.port = self.sock.getsockname()[1]
        return self.port

    @property
    def link(self) -> str:
        """The address to open: ``http(s)://HOST:PORT/status``, carrying the token when
        one is required (the dashboard trades it for a cookie)."""
        host = self.host
        if host in ("", "0.0.0.0", "::"):  # every interface: name this machine
            host = socket.gethostname()
        return dashboard_url(host, self.port, https=self.access.https, token=self.access.link_token)

    def description(self) -> dict[str, Any]:
        """What a client needs to build its link (``{"https": ..., "token": ...}``; no secret)."""
        return self.access.description()

    async def start(self) -> None:
        """Start serving in the background (aiohttp is imported in a thread)."""
        if self.sock is None:
            self.bind()
        self.access.warn_if_exposed(self.host)
        self._task = asyncio.ensure_future(self._serve())

    async def _serve(self) -> None:
        try:
            loop = asyncio.get_running_loop()
            web = await loop.run_in_executor(None, _import_web)
            from .metrics import make_registry

            self._registry = make_registry(self.observer)
            app = web.Application()
            if self.access.protected:
                from .auth import DashboardAuth

                DashboardAuth(self.access, self.port).install(app)
            app.router.add_get("/", self._index)
            app.router.add_get("/status", self._index)
            app.router.add_get("/ws", self._ws)
            app.router.add_get("/api/snapshot", self._snapshot)
            app.router.add_get("/metrics", self._metrics)
            app.router.add_get("/health", self._health)
            app.router.add_static("/static/", STATIC)
            runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
            await runner.setup()
            self._runner = runner
            if self._closed:
                return
            assert self.sock is not None
            await web.SockSite(runner, self.sock, ssl_context=self.access.ssl_context).start()
            self.ready.set()
            logger.info("dashboard at %s", without_token(self.link))
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("the dashboard failed to start")

    async def close(self) -> None:
        """Stop serving and close every viewer's connection."""
        self._closed = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self._broadcaster is not None:
            self._broadcaster.cancel()
        for viewer in list(self._viewers):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(viewer.ws.close(code=1001, message=b"scheduler closing"), 1)
        self._viewers.clear()
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await self._runner.cleanup()
        if self.sock is not None:
            self.sock.close()

    # -- handlers --------------------------------------------------------------------
    async def _index(self, request: Any) -> Any:
        from aiohttp import web

        if request.path == "/":
            raise web.HTTPFound("/status")
        return web.FileResponse(os.path.join(STATIC, "index.html"))

    async def _health(self, request: Any) -> Any:
        from aiohttp import web

        return web.Response(text="ok")

    async def _snapshot(self, request: Any) -> Any:
        from aiohttp import web

        obs = self.observer
        stream, _ = obs.stream_since(0, STREAM_PER_FRAME)
        text = _frame(self._snapshot_json(), stream)
        return web.Response(text=text, content_type="application/json")

    async def _metrics(self, request: Any) -> Any:
        from aiohttp import web
        from prometheus_client import CONTENT_TYPE_LATEST

        from .metrics import render

        return web.Response(
            body=render(self._registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _ws(self, request: Any) -> Any:
        from aiohttp import web

        ws = web.WebSocketResponse(heartbeat=30)
        await ws.prepare(request)
        obs = self.observer
        viewer = _Viewer(ws, max(0, obs.stream_total - min(len(obs.stream), STREAM_PER_FRAME)))
        self._viewers.add(viewer)
        self._send_frame(viewer, {})
        if self._broadcaster is None or self._broadcaster.done():
            self._broadcaster = asyncio.ensure_future(self._broadcast())
        try:
            async for _ in ws:
                pass  # viewers send nothing that matters
        finally:
            self._viewers.discard(viewer)
        return ws

    # -- pushing frames ------------------------------------------------------------------
    def _snapshot_json(self) -> str:
        sample = self.observer.sample()
        number = self.observer.samples
        if self._snapshot_text[0] != number:
            self._snapshot_text = (number, json.dumps(sample, default=str))
        return self._snapshot_text[1]

    def _send_frame(self, viewer: _Viewer, frames: dict[int, tuple[str, int]]) -> None:
        """Queue the next frame for ``viewer`` (frames are shared by viewers at one seq)."""
        if viewer.busy or viewer.ws.closed:
            return  # a slow viewer skips this frame
        frame = frames.get(viewer.seq)
        if frame is None:
            stream, next_seq = self.observer.stream_since(viewer.seq, STREAM_PER_FRAME)
            text = _frame(self._snapshot_json(), stream)
            frame = frames[viewer.seq] = (text, next_seq)
        viewer.seq = frame[1]
        viewer.busy = True
        task = asyncio.ensure_future(self._send(viewer, frame[0]))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _send(self, viewer: _Viewer, text: str) -> None:
        try:
            await viewer.ws.send_str(text)
        except Exception:
            self._viewers.discard(viewer)
        finally:
            viewer.busy = False

    async def _broadcast(self) -> None:
        while self._viewers and not self._closed:
            await asyncio.sleep(self.observer.interval)
            frames: dict[int, tuple[str, int]] = {}
            for viewer in list(self._viewers):
                self._send_frame(viewer, frames)
