"""The opening handshake: protocol version, roles, and token authentication (HMAC)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import socket
import threading
from collections.abc import Iterator

import pytest
from _wire_harness import Harness, RawPeer

from corral import Client
from corral.comm import Server, connect, start_server
from corral.comm.connection import Connection, format_address
from corral.comm.handshake import answer_challenge
from corral.errors import HandshakeError, ProtocolError
from corral.protocol.messages import GetData, Hello, Welcome
from corral.worker.server import Worker

TOKEN = "s3cret-t0ken-value"


@pytest.fixture
def secured() -> Iterator[Harness]:
    h = Harness(token=TOKEN)
    yield h
    h.close()


def test_client_without_a_token_is_told_authentication_is_needed(secured: Harness) -> None:
    with pytest.raises(HandshakeError, match="requires an authentication token"):
        Client(secured.address, timeout=5)


def test_client_with_a_wrong_token_is_refused(secured: Harness) -> None:
    with pytest.raises(HandshakeError, match="authentication failed"):
        Client(secured.address, token="wrong", timeout=5)


def test_client_with_the_right_token_works(secured: Harness) -> None:
    with Client(secured.address, token=TOKEN, timeout=10) as client:
        secured.assert_healthy(client)  # incl. fetching from the workers' peer ports


def test_workers_need_the_token_too(secured: Harness) -> None:
    async def join(token: str | None) -> None:
        worker = Worker(secured.address, nthreads=1, token=token, reconnect=False)
        try:
            await worker.start()
        finally:
            await worker.close(report=False)

    with pytest.raises(HandshakeError, match="authentication failed"):
        secured.run(join("wrong"))
    with pytest.raises(HandshakeError, match="requires an authentication token"):
        secured.run(join(None))
    assert len(secured.call(lambda: secured.scheduler.state.workers)) == 2


@pytest.mark.parametrize("target", ["scheduler", "worker"])
def test_raw_hmac_handshake(secured: Harness, target: str) -> None:
    """The documented computation: response = HMAC-SHA256(token, challenge)."""
    role = "client" if target == "scheduler" else "peer"
    good = RawPeer(secured.address_of(target))
    assert good.handshake(role=role, token=TOKEN, id="good")["op"] == "welcome"
    assert good.hello is not None
    challenge = good.hello["challenge"]
    assert isinstance(challenge, bytes) and len(challenge) == 32
    good.close()

    wrong = RawPeer(secured.address_of(target))
    assert wrong.handshake(role=role, token="not it", id="wrong")["op"] == "refused"
    assert "authentication failed" in wrong.refusals()[0]
    assert wrong.wait_closed()

    missing = RawPeer(secured.address_of(target))
    missing.recv()  # hello
    missing.send({"op": "handshake", "protocol": 1, "role": role, "id": "none"})
    assert missing.recv()["op"] == "refused"
    assert missing.wait_closed()


def test_challenges_are_fresh_so_responses_cannot_be_replayed(secured: Harness) -> None:
    first = RawPeer(secured.address)
    assert first.handshake(token=TOKEN, id="first")["op"] == "welcome"
    assert first.hello is not None
    old_response = hmac.new(TOKEN.encode(), first.hello["challenge"], hashlib.sha256).digest()

    replay = RawPeer(secured.address)
    hello = replay.recv()
    assert hello["challenge"] != first.hello["challenge"]
    replay.send(
        {"op": "handshake", "protocol": 1, "role": "client", "id": "r", "response": old_response}
    )
    assert replay.recv()["op"] == "refused"
    assert replay.wait_closed()


def test_server_without_a_token_sends_no_challenge() -> None:
    h = Harness(n_workers=1)
    try:
        peer = RawPeer(h.address)
        assert peer.handshake()["op"] == "welcome"
        assert peer.hello == {"op": "hello", "protocol": 1, "role": "scheduler"}
    finally:
        h.close()


def test_answer_challenge() -> None:
    challenge = bytes(range(32))
    expected = hmac.new(b"tok", challenge, hashlib.sha256).digest()
    assert answer_challenge("tok", challenge) == expected
    assert answer_challenge("tok", None) is None
    assert answer_challenge(None, challenge) == b""


class RecordingProxy:
    """A TCP proxy that keeps every byte it forwards, both ways."""

    def __init__(self, target: str) -> None:
        host, port = target.split("://")[1].rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = format_address("127.0.0.1", self.listener.getsockname()[1])
        self.sent = bytearray()  # connector -> server
        self.received = bytearray()  # server -> connector
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(
                target=self._pipe, args=(conn, upstream, self.sent), daemon=True
            ).start()
            threading.Thread(
                target=self._pipe, args=(upstream, conn, self.received), daemon=True
            ).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, record: bytearray) -> None:
        try:
            while data := src.recv(1 << 16):
                with self.lock:
                    record += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


def test_the_token_never_crosses_the_wire(secured: Harness) -> None:
    proxy = RecordingProxy(secured.address)
    try:
        with Client(proxy.address, token=TOKEN, timeout=10) as client:
            assert client.submit(sum, [1, 2, 3]).result(timeout=10) == 6
        with pytest.raises(HandshakeError):
            Client(proxy.address, token="a-wrong-guess", timeout=5)
        with proxy.lock:
            sent, received = bytes(proxy.sent), bytes(proxy.received)
        assert b"handshake" in sent and b"challenge" in received  # we saw the handshakes
        for secret in (TOKEN, "a-wrong-guess"):
            assert secret.encode() not in sent + received
    finally:
        proxy.close()


# -- the connector's side --------------------------------------------------------------
async def fake_server(on_connection: object) -> tuple[Server, str]:
    server = await start_server("127.0.0.1", 0, on_connection)  # type: ignore[arg-type]
    return server, format_address("127.0.0.1", server.sockets[0].getsockname()[1])


def test_connector_rejects_a_server_speaking_another_protocol_version() -> None:
    async def speak_v2(conn: Connection) -> None:
        conn.send(Hello(protocol=2, role="scheduler"))

    async def main() -> None:
        server, address = await fake_server(speak_v2)
        async with server:
            with pytest.raises(HandshakeError, match="speaks protocol 2, this side 1"):
                await connect(address, role="client", my_id="c", timeout=5)

    asyncio.run(main())


def test_connector_rejects_a_server_that_does_not_say_hello() -> None:
    async def rude(conn: Connection) -> None:
        conn.send(GetData(keys=["x"]))

    async def main() -> None:
        server, address = await fake_server(rude)
        async with server:
            with pytest.raises(ProtocolError, match="expected hello"):
                await connect(address, role="client", my_id="c", timeout=5)

    asyncio.run(main())


def test_connector_times_out_on_a_silent_server() -> None:
    async def silent(conn: Connection) -> None:
        await asyncio.sleep(10)

    async def main() -> None:
        server, address = await fake_server(silent)
        async with server:
            with pytest.raises(TimeoutError, match="no message"):
                await connect(address, role="client", my_id="c", timeout=0.2)

    asyncio.run(main())


def test_connector_gets_the_welcome() -> None:
    async def polite(conn: Connection) -> None:
        conn.send(Hello(protocol=1, role="scheduler"))
        await conn.recv()
        conn.send(Welcome(id="srv", info={"motd": "hi"}))

    async def main() -> None:
        server, address = await fake_server(polite)
        async with server:
            conn, welcome = await connect(address, role="client", my_id="c", timeout=5)
            assert welcome == Welcome(id="srv", info={"motd": "hi"})
            assert conn.info == {"role": "scheduler", "id": "srv"}
            conn.close()

    asyncio.run(main())


def test_a_refused_client_leaves_no_thread_behind(secured: Harness) -> None:
    before = set(threading.enumerate())
    with pytest.raises(HandshakeError):
        Client(secured.address, token="wrong", timeout=5)
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert leaked == []
