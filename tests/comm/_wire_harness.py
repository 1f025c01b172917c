"""Helpers for the comm tests: an in-process cluster and a raw-socket peer.

The cluster (a real :class:`Scheduler` and real :class:`Worker` objects) runs
on a background event loop; the raw peer is a plain blocking socket in the
test's thread that speaks (or mangles) the wire protocol byte by byte.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

from corral import Client
from corral._loop import LoopThread
from corral.comm import parse_address
from corral.protocol.codec import decode
from corral.protocol.framing import FrameDecoder, encode_frames
from corral.scheduler.server import Scheduler
from corral.worker.server import Worker

WAIT = 10.0  # seconds: generous upper bounds, never slept through


def prefix(n_frames: int, lengths: list[int]) -> bytes:
    """The framing prefix: u64 LE frame count, then a u64 LE length per frame."""
    return struct.pack(f"<{1 + len(lengths)}Q", n_frames, *lengths)


def frame(*frames: bytes) -> bytes:
    """One complete wire message made of ``frames``."""
    return b"".join(bytes(b) for b in encode_frames(list(frames)))


def pack(*ops: dict[str, Any]) -> bytes:
    """One complete wire message whose header is the array ``ops``."""
    return frame(msgpack.packb(list(ops), use_bin_type=True))


class RawPeer:
    """A blocking socket speaking the protocol by hand."""

    def __init__(self, address: str, timeout: float = WAIT) -> None:
        _, host, port = parse_address(address)
        self.address = address
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._decoder = FrameDecoder()
        self.received: list[dict[str, Any]] = []  # every op received, in order
        self._unread: list[dict[str, Any]] = []
        self.hello: dict[str, Any] | None = None

    # -- sending -------------------------------------------------------------------
    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, *ops: dict[str, Any]) -> None:
        self.send_raw(pack(*ops))

    # -- receiving -----------------------------------------------------------------
    def _take(self, data: bytes) -> None:
        for frames in self._decoder.feed(data):
            ops = decode(frames)
            self.received.extend(ops)
            self._unread.extend(ops)

    def recv(self, timeout: float = WAIT) -> dict[str, Any]:
        """The next op from the server; ``EOFError`` if the server closed first."""
        self.sock.settimeout(timeout)
        while not self._unread:
            try:
                data = self.sock.recv(1 << 16)
            except ConnectionResetError:
                data = b""
            if not data:
                raise EOFError(f"{self.address} closed the connection")
            self._take(data)
        return self._unread.pop(0)

    def wait_closed(self, timeout: float = WAIT) -> bool:
        """True once the server has closed the connection (False if it did not in time)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 16)
            except (ConnectionResetError, BrokenPipeError):
                return True
            except TimeoutError:
                return False
            if not data:
                return True
            self._take(data)

    def shutdown_write(self) -> None:
        """Half-close: the server sees the end of the stream."""
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()

    # -- the handshake -------------------------------------------------------------
    def handshake(
        self,
        role: str = "client",
        id: str = "raw",
        token: str | None = None,
        protocol: int = 1,
        **extra: Any,
    ) -> dict[str, Any]:
        """Do the connector side by hand; return the server's answer (welcome/refused)."""
        self.hello = self.recv()
        assert self.hello["op"] == "hello", self.hello
        challenge = self.hello.get("challenge")
        response = None
        if challenge is not None:
            key = (token or "").encode()
            response = hmac.new(key, bytes(challenge), hashlib.sha256).digest()
        op = {"op": "handshake", "protocol": protocol, "role": role, "id": id}
        if response is not None:
            op["response"] = response
        self.send({**op, **extra})
        return self.recv()

    def refusals(self) -> list[str]:
        return [op["reason"] for op in self.received if op.get("op") == "refused"]


class Harness:
    """A real Scheduler and real Workers, in process, on a background loop."""

    def __init__(self, n_workers: int = 2, token: str | None = None) -> None:
        self.token = token
        self.n_workers = n_workers
        self.loop_thread = LoopThread(name="corral-test-harness")
        self.scheduler: Scheduler
        self.workers: list[Worker] = []
        self._ids = itertools.count()
        try:
            self.run(self._start())
        except BaseException:
            self.close()
            raise
        # each worker's stream to the scheduler: a reconnect would replace it
        self.streams = {w.address: w._scheduler for w in self.workers}

    async def _start(self) -> None:
        self.scheduler = await Scheduler(port=0, token=self.token).start()
        for _ in range(self.n_workers):
            worker = Worker(self.scheduler.address, nthreads=1, token=self.token, reconnect=True)
            self.workers.append(await worker.start())
        deadline = time.monotonic() + WAIT
        while len(self.scheduler.state.workers) < self.n_workers:
            assert time.monotonic() < deadline, "workers did not register"
            await asyncio.sleep(0.005)

    @property
    def address(self) -> str:
        return self.scheduler.address

    def address_of(self, target: str) -> str:
        return self.address if target == "scheduler" else self.workers[0].address

    def run(self, coro: Any, timeout: float = WAIT) -> Any:
        return self.loop_thread.run(coro, timeout)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a plain function on the cluster's loop (no races with its state)."""

        async def call() -> Any:
            return fn(*args)

        return self.run(call())

    def wait_for(self, predicate: Callable[[], bool], timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not self.call(predicate):
            assert time.monotonic() < deadline, f"timed out waiting for {predicate}"
            time.sleep(0.005)

    def close(self) -> None:
        async def close() -> None:
            for w in self.workers:
                await w.close()
            if getattr(self, "scheduler", None) is not None:
                await self.scheduler.close()

        try:
            self.run(close())
        finally:
            self.loop_thread.stop()

    # -- health --------------------------------------------------------------------
    def bystander(self, target: str) -> RawPeer:
        """A well-behaved raw connection opened before an attack."""
        peer = RawPeer(self.address_of(target))
        role = "client" if target == "scheduler" else "peer"
        welcome = peer.handshake(role=role, id=f"bystander-{next(self._ids)}", token=self.token)
        assert welcome["op"] == "welcome", welcome
        return peer

    def assert_healthy(
        self, client: Client, bystanders: Sequence[tuple[str, RawPeer]] = ()
    ) -> None:
        """Everything but the attacking connection still works, and the state is sound."""
        n = next(self._ids)
        for target, peer in bystanders:
            if target == "scheduler":
                peer.send({"op": "request", "id": 1000 + n, "method": "scheduler_info"})
                reply = peer.recv()
                assert reply["op"] == "reply" and reply["id"] == 1000 + n, reply
                assert len(reply["result"]["workers"]) == self.n_workers
            else:
                peer.send({"op": "get_data", "keys": [f"nothing-{n}"]})
                reply = peer.recv()
                assert reply == {"op": "data", "data": {}, "missing": [f"nothing-{n}"]}, reply
        # a normal client still submits and gets correct results ...
        futures = client.map(_add, range(n * 10, n * 10 + 10), [n] * 10)
        assert client.gather(futures) == [x + n for x in range(n * 10, n * 10 + 10)]
        # ... including big ones, fetched through each worker's peer port
        for w in self.workers:
            fut = client.submit(_blob, 100_000 + n, workers=[w.address], pure=False)
            assert client.gather(fut) == _blob(100_000 + n)
            key = fut.key
            peer = RawPeer(w.address)
            assert (
                peer.handshake(role="client", id=f"check-{n}", token=self.token)["op"] == "welcome"
            )
            peer.send({"op": "get_data", "keys": [key]})
            data = peer.recv()
            assert data["op"] == "data" and list(data["data"]) == [key] and data["missing"] == []
            peer.close()
        info = client.scheduler_info()
        assert sorted(info["workers"]) == sorted(w.address for w in self.workers)
        for w in self.workers:
            assert w.status == "running"
            assert w._scheduler is self.streams[w.address], "a worker lost its scheduler stream"
        self.call(self.scheduler.state.validate)


def _add(x: int, y: int) -> int:
    return x + y


def _blob(n: int) -> bytes:
    return bytes(i % 251 for i in range(n))
