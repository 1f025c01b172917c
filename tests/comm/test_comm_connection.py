"""Connection over real sockets: typed messages, big payloads, limits, closing."""

from __future__ import annotations

import asyncio
import random
import ssl
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from _loops import loop_factories

from corral.comm import Security, Server, open_connection, start_server
from corral.comm.connection import HANDSHAKE_MAX_FRAME_BYTES, Connection, format_address
from corral.errors import CommClosedError
from corral.protocol import Payload
from corral.protocol.messages import Data, GetData, Heartbeat, Refused, Store


async def pair(
    serve: Callable[[Connection], Awaitable[Any]] | None = None, **server_kwargs: Any
) -> tuple[Server, Connection, asyncio.Future[Connection]]:
    """A server and a connection to it; the future gives the server's side."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[Connection] = loop.create_future()

    async def on_connection(conn: Connection) -> None:
        accepted.set_result(conn)
        if serve is not None:
            await serve(conn)

    server = await start_server("127.0.0.1", 0, on_connection, **server_kwargs)
    address = format_address("127.0.0.1", server.sockets[0].getsockname()[1])
    return server, await open_connection(address), accepted


def test_messages_and_multi_megabyte_payloads_arrive_intact() -> None:
    big = random.Random(0).randbytes(12 * 1024 * 1024 + 5)

    async def main() -> None:
        server, conn, accepted = await pair()
        async with server:
            theirs = await accepted
            theirs.lift_limits()  # as accept() does after the handshake
            sent = [
                GetData(keys=["a"]),
                Store(data={"x": Payload("pickle", [b"head", big]), "y": Payload("msgpack", [])}),
                Heartbeat(metrics={"n": 1}),
            ]
            for msg in sent:
                conn.send(msg)
            got = [await theirs.recv(timeout=10) for _ in sent]
            assert got == sent
            # and back the other way, through the handler path
            batches: list[Any] = []
            done = asyncio.Event()

            def handler(batch: list[Any]) -> None:
                batches.extend(batch)
                done.set()

            conn.set_handler(handler)
            theirs.send(Data(data={"x": Payload("pickle", [big])}, missing=["z"]))
            await asyncio.wait_for(done.wait(), 10)
            assert batches == [Data(data={"x": Payload("pickle", [big])}, missing=["z"])]
            conn.close()
            await theirs.wait_closed()

    asyncio.run(main())


@pytest.fixture(scope="module")
def tls_contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) TLS contexts from a throwaway CA."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "reliability"))
    from _certs import make_pki

    pki = make_pki(str(tmp_path_factory.mktemp("pki")))
    sec = Security(tls_ca_file=pki.ca.cert, tls_cert=pki.node.cert, tls_key=pki.node.key)
    return sec.server_context(), sec.client_context()


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
@pytest.mark.parametrize("loop_factory", loop_factories())
def test_big_frames_both_ways_at_once_with_small_messages_between(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], tls: bool, request: pytest.FixtureRequest
) -> None:
    """Write flow control pauses and resumes many times; nothing stalls or reorders."""
    server_ctx, client_ctx = request.getfixturevalue("tls_contexts") if tls else (None, None)
    big = [random.Random(i).randbytes(9 * 1024 * 1024 + i) for i in range(2)]
    msgs = [
        Heartbeat(metrics={"i": 0}),
        Data(data={"x": Payload("pickle", [b"head", big[0]])}),
        Heartbeat(metrics={"i": 1}),
        Data(data={"y": Payload("pickle", [big[1], b"tail"])}),
        Heartbeat(metrics={"i": 2}),
    ]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future[Connection] = loop.create_future()

        async def on_connection(conn: Connection) -> None:
            accepted.set_result(conn)

        server = await start_server("127.0.0.1", 0, on_connection, ssl_context=server_ctx)
        scheme = "tls" if tls else "tcp"
        address = format_address("127.0.0.1", server.sockets[0].getsockname()[1], scheme)
        async with server:
            conn = await open_connection(address, ssl_context=client_ctx)
            theirs = await accepted
            theirs.lift_limits()
            for msg in msgs:  # one message per loop iteration, both ways at once
                conn.send(msg)
                theirs.send(msg)
                await asyncio.sleep(0)
            assert [await theirs.recv(timeout=30) for _ in msgs] == msgs
            assert [await conn.recv(timeout=30) for _ in msgs] == msgs
            conn.close()
            await asyncio.wait_for(theirs.wait_closed(), 10)

    loop = loop_factory()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def test_server_connections_take_only_small_messages_until_the_handshake() -> None:
    async def main() -> None:
        server, conn, accepted = await pair()
        async with server:
            theirs = await accepted
            conn.send(
                Store(data={"x": Payload("pickle", [b"z" * (HANDSHAKE_MAX_FRAME_BYTES + 1)])})
            )
            await asyncio.wait_for(theirs.wait_closed(), 5)
            assert "exceeds the limit" in (theirs.close_reason or "")
            await asyncio.wait_for(conn.wait_closed(), 5)

    asyncio.run(main())


def test_limits_lifted_after_the_handshake() -> None:
    async def main() -> None:
        server, conn, accepted = await pair()
        async with server:
            theirs = await accepted
            theirs.lift_limits()
            msg = Store(data={"x": Payload("pickle", [b"z" * (HANDSHAKE_MAX_FRAME_BYTES + 1)])})
            conn.send(msg)
            assert await theirs.recv(timeout=5) == msg
            conn.close()

    asyncio.run(main())


def test_max_frame_bytes_applies_after_the_handshake() -> None:
    async def main() -> None:
        server, conn, accepted = await pair(max_frame_bytes=1000)
        async with server:
            theirs = await accepted
            theirs.lift_limits()
            conn.send(Store(data={"x": Payload("pickle", [b"z" * 900])}))  # header < 1000
            assert isinstance(await theirs.recv(timeout=5), Store)
            conn.send(Store(data={"x": Payload("pickle", [b"z" * 2000])}))
            with pytest.raises(CommClosedError, match="exceeds the limit of 1000"):
                await theirs.recv(timeout=5)

    asyncio.run(main())


def test_close_sends_what_is_queued_even_while_writing_is_paused() -> None:
    async def main() -> None:
        server, conn, accepted = await pair()
        async with server:
            theirs = await accepted
            theirs.pause_writing()  # as the transport does when its buffer is full
            theirs.send(Refused(reason="bye"))
            theirs.close("bye")
            assert await conn.recv(timeout=5) == Refused(reason="bye")
            with pytest.raises(CommClosedError):
                await conn.recv(timeout=5)

    asyncio.run(main())


def test_protocol_error_closes_with_a_reason_and_fails_recv() -> None:
    async def main() -> None:
        server, conn, accepted = await pair()
        async with server:
            theirs = await accepted
            assert conn._transport is not None
            conn._transport.write(b"\x01" + b"\x00" * 7 + b"\x01" + b"\x00" * 7 + b"\xc1")
            with pytest.raises(CommClosedError, match="undecodable message header"):
                await theirs.recv(timeout=5)
            assert theirs.closed
            with pytest.raises(CommClosedError):
                theirs.send(GetData(keys=[]))

    asyncio.run(main())


def test_recv_times_out_without_closing() -> None:
    async def main() -> None:
        server, conn, accepted = await pair()
        async with server:
            theirs = await accepted
            with pytest.raises(TimeoutError):
                await theirs.recv(timeout=0.05)
            assert not theirs.closed
            conn.send(GetData(keys=["still fine"]))
            assert await theirs.recv(timeout=5) == GetData(keys=["still fine"])
            conn.close()

    asyncio.run(main())


def test_closing_a_server_closes_what_it_accepted_and_ends_the_handlers() -> None:
    ended: list[str] = []

    async def serve(conn: Connection) -> None:
        try:
            while True:
                await conn.recv()
        except CommClosedError:
            ended.append("closed")
        except asyncio.CancelledError:
            ended.append("cancelled")
            raise

    async def main() -> None:
        server, conn, accepted = await pair(serve)
        await accepted
        server.close()
        await server.wait_closed()
        assert ended, "the handler was still waiting after the server closed"
        await asyncio.wait_for(conn.wait_closed(), 5)  # the client side sees it go

    asyncio.run(main())
