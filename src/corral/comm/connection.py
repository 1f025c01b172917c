"""A framed, batched message stream over one TCP connection.

:class:`Connection` is an :class:`asyncio.BufferedProtocol`: received bytes
land directly in the :class:`~corral.protocol.framing.FrameDecoder`'s buffers,
and whole messages are decoded and either handed to a handler callback (the
hot path: no coroutine per message) or queued for :meth:`Connection.recv`.

Sending is batched by the event loop: :meth:`Connection.send` appends to an
outbox and schedules one flush for the end of the current loop iteration, so
a lone message leaves at once while a burst leaves as one write.

A connection can also be written from another thread
(:meth:`Connection.send_from_thread`): a synchronous client's user thread
writes a submit straight to the socket instead of waking the event loop to
do it, which takes a thread hand-off out of every round trip.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import threading
import typing
from collections import deque
from collections.abc import Callable
from typing import Any

from ..errors import CommClosedError, HandshakeError, ProtocolError
from ..protocol.codec import Encoder, decode
from ..protocol.framing import (
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_FRAMES,
    FrameDecoder,
    encode_frames,
)
from ..protocol.messages import Message, decode_message

logger = logging.getLogger("corral.comm")

Handler = Callable[[list[Message]], None]

#: Buffers larger than this reach the transport in pieces of this size.
WRITE_CHUNK = 1024 * 1024

#: Write flow control: the transport pauses us as soon as it holds bytes the
#: socket did not take, and resumes us once it has handed them all over.  The
#: kernel's socket buffer already keeps the link busy meanwhile; bytes parked
#: in the transport only cost: asyncio's own transport (before Python 3.12)
#: copies them into one bytearray and shifts it after every send (with 4 MiB
#: limits, 191 of every 200 MB sent went through that copy).  1, not 0:
#: asyncio's TLS transport pauses at ``size >= high``, so 0 would pause it
#: after every write, even one that left nothing behind.
WRITE_HIGH_WATER = 1
WRITE_LOW_WATER = 0

#: :meth:`Connection.send_from_thread` writes at most this much itself; more
#: goes through the event loop.  Small writes are the latency-bound ones; a
#: big one (a graph part) is better written by the loop thread while the
#: sending thread goes on packing the next part.
THREAD_WRITE_MAX = 32 * 1024

#: Until a server has accepted the handshake, a peer may send only small
#: messages: an unauthenticated stranger must not make it allocate big buffers.
HANDSHAKE_MAX_FRAME_BYTES = 1024**2
HANDSHAKE_MAX_FRAMES = 16


class Connection(asyncio.BufferedProtocol):
    """One peer connection: send typed messages, receive typed messages."""

    def __init__(
        self,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        on_connected: Callable[[Connection], None] | None = None,
        guarded: bool = False,
    ) -> None:
        self._on_connected = on_connected
        self._max_frame_bytes = max_frame_bytes
        if guarded:  # a server's connection: small limits until lift_limits()
            self._decoder = FrameDecoder(
                max_frame_bytes=min(max_frame_bytes, HANDSHAKE_MAX_FRAME_BYTES),
                max_frames=HANDSHAKE_MAX_FRAMES,
            )
        else:
            self._decoder = FrameDecoder(max_frame_bytes=max_frame_bytes)
        self._encoder = Encoder()
        self._outbox: list[Message] = []
        self._write_queue: deque[memoryview] = deque()
        self._flush_handle: asyncio.Handle | asyncio.TimerHandle | None = None
        self._flush_soon = False
        self._write_paused = False
        # Taken by every write: the event loop's flushes and send_from_thread.
        self._write_lock = threading.RLock()
        self._thread_fd: int | None = None  # our own descriptor for send_from_thread
        self._handing_over = False  # a thread's unwritten rest is on its way to the loop
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._handler: Handler | None = None
        self._inbox: deque[Message] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = self._loop.create_future()
        self._close_callbacks: list[Callable[[Connection], None]] = []
        self.peer: str = "?"
        self.close_reason: str | None = None
        self.lost_exception: BaseException | None = None  # why the transport was lost
        self.info: dict[str, Any] = {}  # owner's bookkeeping: role, id, ...

    # -- asyncio.BufferedProtocol --------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = typing.cast(asyncio.Transport, transport)  # uvloop's too
        self._transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _set_keepalive(sock)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = f"{peer[0]}:{peer[1]}"
        if self._on_connected is not None:
            self._on_connected(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._decoder.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            wire_messages = self._decoder.buffer_updated(nbytes)
            for frames in wire_messages:
                if self.closed:
                    return  # closed by a handler (e.g. a forbidden op): nothing more is handled
                batch = [decode_message(m) for m in decode(frames)]
                self._deliver(batch)
        except ProtocolError as exc:
            self.abort(f"protocol error from {self.peer}: {exc}")
        except Exception as exc:  # a handler bug must not kill the event loop
            logger.exception("error handling messages from %s", self.peer)
            self.abort(f"internal error handling messages: {exc!r}")

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        with self._write_lock:
            if self._thread_fd is not None:
                os.close(self._thread_fd)
                self._thread_fd = None
        self.lost_exception = exc
        if self.close_reason is None:
            self.close_reason = f"connection lost: {exc}" if exc else "closed by peer"
        if not self._closed.done():
            self._closed.set_result(None)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        callbacks, self._close_callbacks = self._close_callbacks, []
        for cb in callbacks:
            try:
                cb(self)
            except Exception:
                logger.exception("close callback failed")

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._pump()
        if self._outbox and self._flush_handle is None and not self._write_paused:
            self._flush()

    # -- receiving -----------------------------------------------------------------
    def _deliver(self, batch: list[Message]) -> None:
        if self._handler is not None and not self._inbox:
            self._handler(batch)
            return
        self._inbox.extend(batch)
        if self._handler is not None:
            self._drain_inbox()
        elif self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _drain_inbox(self) -> None:
        assert self._handler is not None
        batch = list(self._inbox)
        self._inbox.clear()
        if batch:
            self._handler(batch)

    def lift_limits(self) -> None:
        """Allow full-size messages from now on (the handshake was accepted)."""
        self._decoder.max_frame_bytes = self._max_frame_bytes
        self._decoder.max_frames = DEFAULT_MAX_FRAMES

    def set_handler(self, handler: Handler) -> None:
        """Deliver every received batch to ``handler`` from now on (queued ones first)."""
        self._handler = handler
        if self._inbox:
            self._loop.call_soon(self._drain_queued)

    def _drain_queued(self) -> None:
        """Hand over what arrived before the handler was set, as buffer_updated would."""
        if self.closed or self._handler is None:
            self._inbox.clear()
            return
        try:
            self._drain_inbox()
        except Exception as exc:
            logger.exception("error handling messages from %s", self.peer)
            self.abort(f"internal error handling messages: {exc!r}")

    async def recv(self, timeout: float | None = None) -> Message:
        """Return the next message; raise :class:`CommClosedError` if the stream ends."""
        while not self._inbox:
            if self.closed:
                raise CommClosedError(self.close_reason or "connection closed")
            self._waiter = self._loop.create_future()
            try:
                await asyncio.wait_for(self._waiter, timeout)
            except asyncio.TimeoutError:
                raise TimeoutError(f"no message from {self.peer} within {timeout}s") from None
            finally:
                self._waiter = None
        return self._inbox.popleft()

    # -- sending -------------------------------------------------------------------
    def send(self, msg: Message) -> None:
        """Queue ``msg``; it leaves at the end of this event-loop iteration."""
        if self.closed:
            raise CommClosedError(self.close_reason or "connection closed")
        self._outbox.append(msg)
        if not self._flush_soon:
            self._schedule_flush(0.0)

    def send_many(self, msgs: list[Message], delay: float = 0.0) -> None:
        """Queue several messages; with ``delay``, wait that long for more to batch.

        A busy sender passes a small delay so a burst leaves as one write; an
        idle one passes none so the message leaves at once.
        """
        if not msgs:
            return
        if self.closed:
            raise CommClosedError(self.close_reason or "connection closed")
        self._outbox.extend(msgs)
        if not self._flush_soon:
            self._schedule_flush(delay)

    def _schedule_flush(self, delay: float) -> None:
        if self._flush_handle is not None:
            if delay > 0:
                return  # a flush is already on its way
            self._flush_handle.cancel()
        if delay > 0:
            self._flush_handle = self._loop.call_later(delay, self._flush)
        else:
            self._flush_handle = self._loop.call_soon(self._flush)
            self._flush_soon = True

    def _flush(self) -> None:
        self._flush_handle = None
        self._flush_soon = False
        with self._write_lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if self._write_paused or self._handing_over or not self._outbox or self._transport is None:
            return
        if self._transport.is_closing():
            self._outbox.clear()
            return
        batch, self._outbox = self._outbox, []
        try:
            frames = self._encoder.encode(batch)
        except Exception as exc:
            logger.exception("cannot encode messages for %s", self.peer)
            self.abort(f"cannot encode outgoing message: {exc!r}")
            return
        queue = self._write_queue
        for buf in encode_frames(frames):
            view = memoryview(buf).cast("B")
            if not queue and view.nbytes <= WRITE_CHUNK:
                self._transport.write(view)
            else:
                queue.append(view)
        if queue:
            self._pump_locked()

    def _pump(self) -> None:
        with self._write_lock:
            self._pump_locked()

    def _pump_locked(self) -> None:
        """Hand queued large buffers to the transport a chunk at a time.

        Transports copy what the socket does not take at once, and some
        (asyncio's before Python 3.12) shift their whole buffer after every
        send: feeding a 200 MB frame piecewise, until the transport holds
        anything back (it pauses us, see :data:`WRITE_HIGH_WATER`), keeps both
        costs to at most part of one chunk per pause.
        """
        queue = self._write_queue
        transport = self._transport
        while queue and not self._write_paused and not self._handing_over and transport is not None:
            view = queue[0]
            if view.nbytes <= WRITE_CHUNK:
                queue.popleft()
                transport.write(view)
            else:
                transport.write(view[:WRITE_CHUNK])
                queue[0] = view[WRITE_CHUNK:]

    # -- writing from another thread ---------------------------------------------------
    def allow_thread_writes(self) -> None:
        """Let :meth:`send_from_thread` write this connection's socket directly.

        Plain TCP on POSIX only (TLS state lives in the transport); elsewhere
        :meth:`send_from_thread` always declines.  Call from the event loop.
        """
        transport = self._transport
        if os.name != "posix" or transport is None or transport.is_closing():
            return
        if transport.get_extra_info("sslcontext") is not None:
            return
        sock = transport.get_extra_info("socket")
        if sock is None:
            return
        with self._write_lock:
            # Our own descriptor: however the loop closes its own, ours never
            # names another file; the socket ends when both are closed.
            self._thread_fd = os.dup(sock.fileno())

    def send_from_thread(self, msgs: list[Message]) -> bool:
        """Write ``msgs`` now from the calling (non-loop) thread; False if it must not.

        It writes only when nothing is queued ahead (in this connection or in
        its transport), so messages keep their order; otherwise, or for TLS,
        a paused or closed stream, nothing is written and the caller sends
        through the loop.  Messages of more than :data:`THREAD_WRITE_MAX`
        bytes are encoded here and written by the loop; what the socket does
        not take at once also goes to the loop, ahead of anything queued later.
        """
        with self._write_lock:
            fd, transport = self._thread_fd, self._transport
            if (
                fd is None
                or transport is None
                or self._outbox
                or self._write_queue
                or self._write_paused
                or self._handing_over
                or self.closed
                or transport.get_write_buffer_size()
            ):
                return False
            buffers = encode_frames(self._encoder.encode(msgs))
            # One small frame, joined with its prefix, is the common case.
            data = buffers[0] if len(buffers) == 1 and type(buffers[0]) is bytes else b""
            if not data or len(data) > THREAD_WRITE_MAX:
                self._write_queue.extend(memoryview(b).cast("B") for b in buffers)
                self._hand_over()
                return True
            try:
                written = os.write(fd, data)
            except (BlockingIOError, InterruptedError):
                written = 0
            except OSError:
                # Broken socket: the loop sees it too and closes the connection.
                return True
            if written < len(data):
                self._write_queue.append(memoryview(data)[written:])
                self._hand_over()
            return True

    def _hand_over(self) -> None:
        """Have the loop write the queued rest of a thread's message before anything else."""
        self._handing_over = True
        self._loop.call_soon_threadsafe(self._write_handed_over)

    def _write_handed_over(self) -> None:
        with self._write_lock:
            self._handing_over = False
            if self._transport is None or self._transport.is_closing():
                self._write_queue.clear()  # closed meanwhile: close() wrote what it could
                return
            self._pump_locked()
            if self._outbox and not self._flush_soon:
                self._schedule_flush(0.0)

    @property
    def closed(self) -> bool:
        """True once the connection is closed or closing."""
        return self._closed.done() or self._transport is None or self._transport.is_closing()

    def on_close(self, callback: Callable[[Connection], None]) -> None:
        """Call ``callback(self)`` once the connection is gone."""
        if self._closed.done():
            self._loop.call_soon(callback, self)
        else:
            self._close_callbacks.append(callback)

    async def wait_closed(self) -> None:
        """Wait until the connection has closed."""
        await asyncio.shield(self._closed)

    def close(self, reason: str = "closed") -> None:
        """Flush what is queued, then close."""
        if self.close_reason is None:
            self.close_reason = reason
        if self._transport is not None and not self._transport.is_closing():
            with self._write_lock:
                self._write_paused = False  # the transport keeps what it cannot send yet
                self._handing_over = False  # the rest is at the head of the queue
                self._flush_locked()
                while self._write_queue:
                    self._transport.write(self._write_queue.popleft())
                self._transport.close()

    def abort(self, reason: str) -> None:
        """Drop the connection at once (bad input): log the reason."""
        if self.close_reason is None:
            self.close_reason = reason
            logger.warning("closing connection to %s: %s", self.peer, reason)
        with self._write_lock:
            self._outbox.clear()
            self._write_queue.clear()
            if self._transport is not None:
                self._transport.abort()


#: TCP keepalive: a peer that vanished without closing (host down, cable cut) is
#: noticed after about KEEPALIVE_IDLE + KEEPALIVE_COUNT * KEEPALIVE_INTERVAL seconds.
KEEPALIVE_IDLE = 10
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3


def _set_keepalive(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        if hasattr(socket, "TCP_KEEPINTVL"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        if hasattr(socket, "TCP_KEEPCNT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    except OSError:  # pragma: no cover - exotic sockets
        pass


def parse_address(address: str) -> tuple[str, str, int]:
    """Split ``tcp://host:port`` into ``("tcp", host, port)``."""
    scheme, sep, rest = address.rpartition("://")
    if not sep:
        scheme, rest = "tcp", address
    if scheme not in ("tcp", "tls"):
        raise ValueError(f"unsupported address scheme {scheme!r} in {address!r}")
    host, colon, port = rest.rpartition(":")
    if not colon or not port.isdigit():
        raise ValueError(f"address {address!r} has no port")
    return scheme, host.strip("[]") or "127.0.0.1", int(port)


def format_address(host: str, port: int, scheme: str = "tcp") -> str:
    """Build ``tcp://host:port`` (IPv6 hosts in brackets)."""
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


async def open_connection(
    address: str,
    timeout: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
    **kwargs: Any,
) -> Connection:
    """Open a connection to ``address``; raise ``OSError`` or ``TimeoutError``.

    A ``tls://`` address needs ``ssl_context`` (a client context, e.g.
    ``Security.client_context()``); a ``tcp://`` one is plain TCP.  ``timeout``
    covers the TCP connection and the TLS handshake together.
    """
    scheme, host, port = parse_address(address)
    tls: ssl.SSLContext | None = None
    if scheme == "tls":
        if ssl_context is None:
            raise ValueError(
                f"{address} is a TLS address: give TLS settings "
                "(security=Security(...), tls_ca_file=..., or --tls-ca-file)"
            )
        tls = ssl_context
    loop = asyncio.get_running_loop()
    extra: dict[str, Any] = {}
    if tls is not None:
        extra = {"ssl": tls, "server_hostname": host, "ssl_handshake_timeout": timeout}
    try:
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: Connection(**kwargs), host, port, **extra), timeout
        )
    except asyncio.TimeoutError:
        raise TimeoutError(f"timed out connecting to {address} after {timeout}s") from None
    except ssl.SSLError as exc:  # certificates do not match: retrying will not help
        raise HandshakeError(f"TLS handshake with {address} failed: {exc}") from exc
    return conn


class Server:
    """A listening port and the connections it accepted.

    Closing it stops listening, closes every accepted connection and cancels
    their handlers, so no handler is left waiting when the event loop ends.
    """

    def __init__(self) -> None:
        self.listener: asyncio.Server | None = None
        self._handlers: dict[asyncio.Task[Any], Connection] = {}

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets (``sockets[0].getsockname()`` gives the port)."""
        assert self.listener is not None
        return tuple(self.listener.sockets)

    def _serve(self, on_connection: Callable[[Connection], Any], conn: Connection) -> None:
        task = asyncio.get_running_loop().create_task(on_connection(conn))
        self._handlers[task] = conn
        task.add_done_callback(lambda t: self._handlers.pop(t, None))

    def close(self) -> None:
        """Stop listening; close the accepted connections and cancel their handlers."""
        if self.listener is not None:
            self.listener.close()
        for task, conn in list(self._handlers.items()):
            conn.close("server closing")
            task.cancel()

    async def wait_closed(self, timeout: float = 5.0) -> None:
        """Wait (up to ``timeout`` seconds) until every handler has ended."""
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=timeout)

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()


async def start_server(
    host: str,
    port: int,
    on_connection: Callable[[Connection], Any],
    max_frame_bytes: int | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> Server:
    """Listen on ``host:port``; run ``on_connection(conn)`` (a coroutine) per connection.

    With ``ssl_context`` (a server context) the port speaks TLS only; a peer
    that does not complete the TLS handshake within the handshake timeout is
    dropped.  ``max_frame_bytes`` defaults to :func:`default_max_frame_bytes`.
    """
    if max_frame_bytes is None:
        max_frame_bytes = default_max_frame_bytes()
    loop = asyncio.get_running_loop()
    server = Server()

    def connected(conn: Connection) -> None:
        server._serve(on_connection, conn)

    server.listener = await loop.create_server(
        lambda: Connection(max_frame_bytes=max_frame_bytes, on_connected=connected, guarded=True),
        host,
        port,
        reuse_address=True,
        ssl=ssl_context,
        ssl_handshake_timeout=_handshake_timeout() if ssl_context is not None else None,
    )
    return server


def _handshake_timeout() -> float:
    from . import handshake  # read at call time: tests lower it

    return float(handshake.HANDSHAKE_TIMEOUT)


#: Environment variable setting the largest frame a server accepts (bytes, or "64MiB").
MAX_FRAME_ENV = "CORRAL_MAX_FRAME_SIZE"


def default_max_frame_bytes() -> int:
    """The largest frame a server accepts: ``$CORRAL_MAX_FRAME_SIZE`` or 4 GiB."""
    text = os.environ.get(MAX_FRAME_ENV)
    if not text:
        return DEFAULT_MAX_FRAME_BYTES
    return parse_frame_size(text)


def parse_frame_size(text: str | int) -> int:
    """``"64MiB"`` / ``"100MB"`` / ``1048576`` -> bytes (at least 64 KiB)."""
    if isinstance(text, int):
        value = text
    else:
        from ..deploy.local import parse_bytes

        value = parse_bytes(text)
    if value < MIN_MAX_FRAME_BYTES:
        raise ValueError(f"the frame size limit must be at least 64 KiB, got {text!r}")
    return value


#: Smallest accepted frame size limit: headers of ordinary batches must fit.
MIN_MAX_FRAME_BYTES = 64 * 1024
