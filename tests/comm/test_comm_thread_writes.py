"""Connection.send_from_thread: another thread writes the socket directly, in order."""

from __future__ import annotations

import asyncio
import random
import socket
import ssl
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _loops import loop_factories

from corral.comm import Security, start_server
from corral.comm.connection import THREAD_WRITE_MAX, Connection, format_address, open_connection
from corral.protocol import Payload
from corral.protocol.messages import Data, Heartbeat, Message

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="thread writes are POSIX only")


class LoopInThread:
    """An event loop in its own thread, as a synchronous Client runs one."""

    def __init__(self, factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
        self.loop = factory()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], Any]) -> Any:
        async def call() -> Any:
            return fn()

        return self.run(call())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


async def _pair(
    ssl_server: Any = None, ssl_client: Any = None
) -> tuple[Any, Connection, Connection]:
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[Connection] = loop.create_future()

    async def on_connection(conn: Connection) -> None:
        accepted.set_result(conn)

    server = await start_server("127.0.0.1", 0, on_connection, ssl_context=ssl_server)
    scheme = "tls" if ssl_server is not None else "tcp"
    address = format_address("127.0.0.1", server.sockets[0].getsockname()[1], scheme)
    conn = await open_connection(address, ssl_context=ssl_client)
    theirs = await accepted
    theirs.lift_limits()
    return server, conn, theirs


class Sender:
    """Sends from any thread the way the client does: directly when allowed, else via the loop.

    Once one message goes through the loop, later ones follow it there until
    the loop has handed them to the connection, so the order never changes.
    """

    def __init__(self, conn: Connection, loop: asyncio.AbstractEventLoop) -> None:
        self.conn, self.loop = conn, loop
        self.lock = threading.Lock()
        self.pending: list[Message] = []
        self.direct = self.via_loop = 0

    def send(self, msg: Message) -> None:
        with self.lock:
            self.pending.append(msg)
            if len(self.pending) > 1:
                return  # a flush through the loop is already on its way
            if self.conn.send_from_thread(self.pending):
                self.pending = []
                self.direct += 1
                return
            self.via_loop += 1
        self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self.lock:
            batch, self.pending = self.pending, []
        self.conn.send_many(batch)


def _receive_all(loop: LoopInThread, conn: Connection, n: int) -> list[Message]:
    async def receive() -> list[Message]:
        return [await conn.recv(timeout=30) for _ in range(n)]

    return loop.run(receive(), timeout=60)


@pytest.mark.parametrize("loop_factory", loop_factories())
def test_threads_write_directly_and_every_thread_keeps_its_order(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    lt = LoopInThread(loop_factory)
    try:
        server, conn, theirs = lt.run(_pair())
        lt.call(conn.allow_thread_writes)
        sender = Sender(conn, lt.loop)
        n_threads, per_thread = 4, 300

        def work(t: int) -> None:
            for i in range(per_thread):
                sender.send(Heartbeat(metrics={"t": t, "i": i}))

        threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        got = _receive_all(lt, theirs, n_threads * per_thread)
        for t in range(n_threads):
            beats = [m for m in got if isinstance(m, Heartbeat) and m.metrics["t"] == t]
            assert [m.metrics["i"] for m in beats] == list(range(per_thread))
        assert sender.direct > 0  # the direct path was really taken
        lt.call(conn.close)
        lt.run(theirs.wait_closed())
        lt.call(server.close)
    finally:
        lt.stop()


@pytest.mark.parametrize("loop_factory", loop_factories())
def test_what_the_socket_cannot_take_goes_to_the_loop_first(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """A full socket: the thread's unwritten rest is written before anything sent later."""
    lt = LoopInThread(loop_factory)
    rng = random.Random(7)
    try:
        server, conn, theirs = lt.run(_pair())
        sock = conn._transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        lt.call(conn.allow_thread_writes)
        lt.call(theirs._transport.pause_reading)
        sender = Sender(conn, lt.loop)
        sent = [
            Data(data={"x": Payload("pickle", [rng.randbytes(150_000)])}, missing=[str(i)])
            for i in range(60)  # 9 MB: far more than the kernel buffers hold
        ]
        for msg in sent:
            sender.send(msg)
        assert sender.direct > 0 and sender.via_loop > 0  # some writes were cut short
        lt.call(theirs._transport.resume_reading)
        assert _receive_all(lt, theirs, len(sent)) == sent
        lt.call(conn.close)
        lt.call(server.close)
    finally:
        lt.stop()


def test_large_messages_are_queued_for_the_loop_in_order() -> None:
    lt = LoopInThread(asyncio.new_event_loop)
    try:
        server, conn, theirs = lt.run(_pair())
        lt.call(conn.allow_thread_writes)
        blob = random.Random(1).randbytes(THREAD_WRITE_MAX * 3)
        big = Data(data={"x": Payload("pickle", [blob])})
        small = Heartbeat(metrics={"after": True})
        sender = Sender(conn, lt.loop)
        sender.send(big)
        sender.send(small)
        assert _receive_all(lt, theirs, 2) == [big, small]
        lt.call(conn.close)
        lt.call(server.close)
    finally:
        lt.stop()


def test_tls_and_closed_connections_decline(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent.parent / "reliability"))
    from _certs import make_pki

    pki = make_pki(str(tmp_path))
    sec = Security(tls_ca_file=pki.ca.cert, tls_cert=pki.node.cert, tls_key=pki.node.key)
    server_ctx: ssl.SSLContext = sec.server_context()
    lt = LoopInThread(asyncio.new_event_loop)
    try:
        server, conn, theirs = lt.run(_pair(server_ctx, sec.client_context()))
        lt.call(conn.allow_thread_writes)
        assert not conn.send_from_thread([Heartbeat(metrics={})])  # TLS: the loop writes
        lt.call(conn.close)
        lt.call(server.close)

        server, conn, theirs = lt.run(_pair())
        lt.call(conn.allow_thread_writes)
        assert conn.send_from_thread([Heartbeat(metrics={"n": 1})])
        assert _receive_all(lt, theirs, 1) == [Heartbeat(metrics={"n": 1})]
        lt.call(conn.close)
        lt.run(conn.wait_closed())
        assert not conn.send_from_thread([Heartbeat(metrics={})])
        assert conn._thread_fd is None  # its descriptor is closed with the connection
        lt.call(server.close)
    finally:
        lt.stop()
