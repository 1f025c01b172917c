"""Faults seen from the client: the scheduler dies, a peer goes silent; nothing hangs."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
from rel_support import poll, scheduler_thread

import corral
from corral import Client, LocalCluster, Worker
from corral.comm import start_server
from corral.comm.handshake import accept


def inc(x: int) -> int:
    return x + 1


def test_scheduler_killed_while_futures_pending_raises_comm_closed_error() -> None:
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True) as cluster:
        client = Client(cluster, set_as_default=False)
        try:
            done = client.submit(inc, 1)
            assert done.result(timeout=30) == 2
            pending = [client.submit(time.sleep, 30, pure=False) for _ in range(3)]
            address = cluster.scheduler_address
            start = time.monotonic()
            cluster._scheduler_proc.kill()
            with pytest.raises(corral.CommClosedError, match=address):
                pending[0].result()  # no timeout given: it must not hang
            assert time.monotonic() - start < 10
            with pytest.raises(corral.CommClosedError):
                client.gather(pending)
            assert isinstance(pending[1].exception(), corral.CommClosedError)
            assert all(f.done() and f.status == "lost" for f in pending)
            assert done.result() == 2  # what arrived before stays
            # after the loss: new work and questions fail at once, clearly
            late = client.submit(inc, 5)
            with pytest.raises(corral.CommClosedError):
                late.result(timeout=5)
            with pytest.raises(corral.CommClosedError):
                client.scheduler_info()
        finally:
            client.close()


def test_async_client_sees_comm_closed_error() -> None:
    with scheduler_thread(token="t") as s:
        worker = s.loop_thread.run(Worker(s.address, nthreads=1, token="t").start())

        async def main() -> None:
            async with Client(s.address, asynchronous=True, token="t", set_as_default=False) as c:
                fut = c.submit(time.sleep, 30, pure=False)
                await asyncio.sleep(0.2)
                s.loop_thread.loop.call_soon_threadsafe(
                    lambda: [
                        conn.abort("test: scheduler gone")
                        for conn in list(s.scheduler._streams.values())
                    ]
                )
                with pytest.raises(corral.CommClosedError, match="scheduler"):
                    await asyncio.wait_for(fut, 10)
                with pytest.raises(corral.CommClosedError):
                    await c.scheduler_info()
                with pytest.raises(corral.CommClosedError):  # answers that never come
                    await asyncio.wait_for(c.run(time.time), 10)

        try:
            asyncio.run(main())
        finally:
            s.loop_thread.run(worker.close())


class SilentServer:
    """Accepts TCP connections and never says anything (a hung or wrong service)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def test_connecting_to_a_silent_server_times_out() -> None:
    server = SilentServer()
    try:
        start = time.monotonic()
        with pytest.raises((TimeoutError, OSError)):
            Client(server.address, timeout=1.5, set_as_default=False)
        assert time.monotonic() - start < 8
    finally:
        server.close()


def test_requests_to_a_scheduler_that_never_answers_time_out() -> None:
    """A scheduler that accepts the handshake and then never replies."""
    from corral._loop import LoopThread

    loop = LoopThread(name="mute-scheduler")

    async def serve(conn) -> None:
        await accept(
            conn, role="scheduler", server_id="mute", token=None, allowed_roles=("client",)
        )
        conn.set_handler(lambda batch: None)  # read everything, answer nothing

    async def start():
        return await start_server("127.0.0.1", 0, serve)

    server = loop.run(start())
    address = f"tcp://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        client = Client(address, timeout=0.3, set_as_default=False, version_check="off")
        try:
            start_t = time.monotonic()
            with pytest.raises(TimeoutError):
                client.scheduler_info()
            assert time.monotonic() - start_t < 10
            poll(lambda: client.status == "running", "the client to stay connected", timeout=1)
        finally:
            client.close()
    finally:
        loop.loop.call_soon_threadsafe(server.close)
        loop.stop()
