"""Who may connect: tokens, TLS, mutual TLS, frame limits, op allowlists, exposure warnings."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import ssl
import stat
import struct
import time

import pytest
from _certs import PKI
from rel_support import corral_env, corral_process, poll, scheduler_thread

from corral import Client, LocalCluster, Security, Worker
from corral._loop import LoopThread
from corral.comm import connect, parse_address
from corral.comm import handshake as handshake_module
from corral.comm.connection import default_max_frame_bytes, parse_frame_size
from corral.comm.security import exposure_warning, is_loopback, read_token_file, warn_if_exposed
from corral.errors import CommClosedError, HandshakeError
from corral.protocol.messages import Compute, GetData, RunOnScheduler


def inc(x: int) -> int:
    return x + 1


def add(x: int, y: int) -> int:
    return x + y


def blob(n: int) -> bytes:
    return b"x" * n


def where() -> str:
    from corral import get_worker

    return get_worker().address


def _run(coro, timeout: float = 30):
    loop = LoopThread(name="test-connect")
    try:
        return loop.run(coro, timeout)
    finally:
        loop.stop()


# -- tokens ---------------------------------------------------------------------------------
def test_wrong_token_and_no_token_are_refused_by_scheduler_and_worker() -> None:
    with scheduler_thread(token="right") as s:
        with pytest.raises(HandshakeError, match="authentication failed"):
            Client(s.address, token="wrong", timeout=5, set_as_default=False)
        with pytest.raises(HandshakeError, match="requires an authentication token"):
            Client(s.address, token=None, timeout=5, set_as_default=False)
        with pytest.raises(HandshakeError, match="authentication failed"):
            s.loop_thread.run(Worker(s.address, nthreads=1, token="wrong", reconnect=False).start())
        worker = s.loop_thread.run(Worker(s.address, nthreads=1, token="right").start())
        try:
            # The worker's peer port asks for the same token.
            for role in ("peer", "client"):
                with pytest.raises(HandshakeError, match="authentication failed"):
                    _run(connect(worker.address, role=role, my_id="intruder", token="wrong"))
                with pytest.raises(HandshakeError, match="requires an authentication token"):
                    _run(connect(worker.address, role=role, my_id="intruder"))
            assert s.call(lambda: len(s.scheduler.state.clients)) == 0  # none of the refused
            with Client(s.address, token="right", set_as_default=False) as c:
                assert c.submit(inc, 1).result(timeout=30) == 2
        finally:
            s.loop_thread.run(worker.close())


def test_local_cluster_makes_a_token_by_default() -> None:
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False) as cluster:
        assert cluster.token and len(cluster.token) >= 32
        with pytest.raises(HandshakeError):
            _run(connect(cluster.scheduler_address, role="client", my_id="stranger"))
        with pytest.raises(HandshakeError):
            Client(cluster.scheduler_address, token="guess", timeout=5, set_as_default=False)
        with Client(cluster, set_as_default=False) as c:
            assert c.submit(inc, 41).result(timeout=30) == 42
        # This process started the cluster: its address alone is enough here.
        with Client(cluster.scheduler_address, set_as_default=False) as c:
            assert c.submit(inc, 1).result(timeout=30) == 2
    with LocalCluster(n_workers=1, processes=False, token=False) as open_cluster:
        assert open_cluster.token is None
        with Client(open_cluster.scheduler_address, set_as_default=False) as c:
            assert c.submit(inc, 2).result(timeout=30) == 3


def test_token_file_is_read_and_wide_permissions_warned(tmp_path, caplog) -> None:
    path = tmp_path / "token"
    path.write_text("  s3cret\n")
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="corral.security"):
        assert read_token_file(str(path)) == "s3cret"
    assert "readable by other users" in caplog.text
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_token_file(str(empty))


# -- TLS ------------------------------------------------------------------------------------
def _security(pki: PKI, cert: bool = True, stranger: bool = False) -> Security:
    files = pki.stranger if stranger else pki.node
    return Security(
        tls_ca_file=pki.ca.cert,
        tls_cert=files.cert if cert else None,
        tls_key=files.key if cert else None,
    )


def test_mutual_tls_end_to_end(pki: PKI) -> None:
    sec = _security(pki)
    with scheduler_thread(security=sec) as s:
        assert s.address.startswith("tls://")
        workers = [
            s.loop_thread.run(Worker(s.address, nthreads=1, security=sec, name=f"w{i}").start())
            for i in range(2)
        ]
        try:
            assert all(w.address.startswith("tls://") for w in workers)
            with Client(s.address, security=sec, set_as_default=False) as c:
                assert all(a.startswith("tls://") for a in c.scheduler_info()["workers"])
                a, b = (w.address for w in workers)
                x = c.submit(blob, 300_000, workers=[a])  # fetched by a peer, and by us
                y = c.submit(len, x, workers=[b])
                assert y.result(timeout=30) == 300_000
                assert x.result(timeout=30) == b"x" * 300_000
                assert sorted(c.gather(c.map(inc, range(50)))) == list(range(1, 51))
                assert c.submit(where, workers=[b], pure=False).result(timeout=30) == b
            # the tls_* keyword arguments work as security= does
            with Client(
                s.address,
                tls_ca_file=pki.ca.cert,
                tls_cert=pki.node.cert,
                tls_key=pki.node.key,
                set_as_default=False,
            ) as c:
                assert c.submit(add, 1, 2).result(timeout=30) == 3
        finally:
            for w in workers:
                s.loop_thread.run(w.close())


def test_tls_refusals(pki: PKI) -> None:
    sec = _security(pki)
    with scheduler_thread(security=sec) as s:
        # no client certificate: mutual TLS says no
        with pytest.raises(HandshakeError, match="TLS"):
            Client(s.address, security=_security(pki, cert=False), timeout=5, set_as_default=False)
        # a certificate from another CA
        with pytest.raises(HandshakeError, match="TLS"):
            Client(
                s.address, security=_security(pki, stranger=True), timeout=5, set_as_default=False
            )
        # a client that does not trust the scheduler's CA
        distrust = Security(
            tls_ca_file=pki.other_ca.cert, tls_cert=pki.stranger.cert, tls_key=pki.stranger.key
        )
        with pytest.raises(HandshakeError, match="certificate verify failed"):
            Client(s.address, security=distrust, timeout=5, set_as_default=False)
        # no TLS settings at all for a tls:// address: a clear error, at once
        with pytest.raises(ValueError, match="TLS address"):
            Client(s.address, timeout=5, set_as_default=False)
        assert s.call(lambda: len(s.scheduler.state.clients)) == 0


def test_plain_tcp_against_a_tls_port_is_refused(pki: PKI, monkeypatch) -> None:
    monkeypatch.setattr(handshake_module, "HANDSHAKE_TIMEOUT", 1.0)
    with scheduler_thread(security=_security(pki)) as s:
        _, host, port = parse_address(s.address)
        plain = f"tcp://{host}:{port}"
        start = time.monotonic()
        with pytest.raises((TimeoutError, OSError)):
            Client(plain, timeout=2, set_as_default=False)
        assert time.monotonic() - start < 15
        # Raw bytes of a corral handshake: the server answers nothing in clear
        # text and drops the connection once the TLS handshake fails.
        with socket.create_connection((host, port), timeout=5) as sock:
            header = b"\x81\xa2op\xa9handshake"
            sock.sendall(struct.pack("<QQ", 1, len(header)) + header)
            sock.settimeout(5)
            received = b""
            while True:
                try:
                    chunk = sock.recv(4096)
                except (ConnectionResetError, TimeoutError):
                    break
                if not chunk:
                    break
                received += chunk
            assert not received or received[0] == 0x15  # nothing, or a TLS alert record
        assert s.call(lambda: len(s.scheduler.state.clients)) == 0
    # and TLS against a plain port fails too (the server sees garbage, closes)
    with scheduler_thread() as s:
        _, host, port = parse_address(s.address)
        with pytest.raises((HandshakeError, OSError, TimeoutError)):
            Client(f"tls://{host}:{port}", security=_security(pki), timeout=3, set_as_default=False)


# -- the command line -------------------------------------------------------------------------
def test_cli_generated_token_token_file_and_tls(tmp_path, pki: PKI) -> None:
    sched_file = str(tmp_path / "scheduler.json")
    tls = ["--tls-ca-file", pki.ca.cert, "--tls-cert", pki.node.cert, "--tls-key", pki.node.key]
    env = corral_env()
    with corral_process(
        "scheduler", "--port", "0", "--auth", "generate", "--scheduler-file", sched_file,
        "--log-level", "WARNING", *tls, env=env,
    ):  # fmt: skip
        poll(lambda: os.path.exists(sched_file), "the scheduler file")
        assert stat.S_IMODE(os.stat(sched_file).st_mode) == 0o600
        with open(sched_file) as f:
            info = json.load(f)
        assert info["address"].startswith("tls://") and len(info["token"]) >= 32
        token_file = tmp_path / "token"
        token_file.write_text(info["token"] + "\n")
        os.chmod(token_file, 0o600)
        with (
            # one worker finds the token in the scheduler file, one in a token file
            corral_process(
                "worker", "--scheduler-file", sched_file, "--nthreads", "1", "--name", "from-file",
                "--log-level", "WARNING", *tls, env=env,
            ),
            corral_process(
                "worker", info["address"], "--auth-token-file", str(token_file), "--nthreads", "1",
                "--name", "from-token-file", "--log-level", "WARNING", *tls, env=env,
            ),
        ):  # fmt: skip
            sec = _security(pki)
            with Client(scheduler_file=sched_file, security=sec, set_as_default=False) as c:
                c.wait_for_workers(2, timeout=60)
                names = {w["name"] for w in c.scheduler_info()["workers"].values()}
                assert names == {"from-file", "from-token-file"}
                futures = [c.submit(where, workers=[name], pure=False) for name in sorted(names)]
                assert all(a.startswith("tls://") for a in c.gather(futures))
            with pytest.raises(HandshakeError, match="authentication failed"):
                Client(
                    info["address"], security=sec, token="wrong", timeout=5, set_as_default=False
                )


# -- limits and allowlists ----------------------------------------------------------------------
def test_frame_size_limit(monkeypatch) -> None:
    with scheduler_thread(token="t", max_frame_bytes=1024**2) as s:
        worker = s.loop_thread.run(Worker(s.address, nthreads=1, token="t").start())
        try:
            big = Client(s.address, token="t", set_as_default=False)
            try:
                with pytest.raises(CommClosedError):
                    big.scatter(b"x" * (2 * 1024**2))  # one 2 MiB frame: over the limit
                poll(lambda: big.status == "lost", "the client to see its connection closed")
            finally:
                big.close()
            with Client(s.address, token="t", set_as_default=False) as c:  # others unaffected
                [small] = c.scatter([b"y" * 100_000])
                assert c.submit(len, small).result(timeout=30) == 100_000
        finally:
            s.loop_thread.run(worker.close())
    monkeypatch.setenv("CORRAL_MAX_FRAME_SIZE", "64MiB")
    assert default_max_frame_bytes() == 64 * 2**20
    with pytest.raises(ValueError, match="at least 64 KiB"):
        parse_frame_size("1KB")


def test_ops_from_the_wrong_peer_close_that_connection() -> None:
    ran = []

    def on_scheduler() -> None:  # pragma: no cover - must never run
        ran.append(True)

    with scheduler_thread(token="t") as s:
        worker = s.loop_thread.run(Worker(s.address, nthreads=1, token="t").start())
        try:

            async def attempts() -> list[str]:
                from corral.protocol.serialize import serialize, serialize_function

                reasons = []
                # a "worker" sending a client-only op (code execution on the scheduler)
                conn, _ = await connect(s.address, role="worker", my_id="fake-worker", token="t")
                conn.send(
                    RunOnScheduler(
                        id=1, function=serialize_function(on_scheduler), args=serialize(((), {}))
                    )
                )
                await asyncio.wait_for(conn.wait_closed(), 10)
                reasons.append("worker-op")
                # a client on a worker's peer port sending a scheduler-only op
                conn, _ = await connect(worker.address, role="client", my_id="fake", token="t")
                conn.send(Compute(tasks=[], functions={}))
                await asyncio.wait_for(conn.wait_closed(), 10)
                reasons.append("peer-op")
                # the peer port still serves honest requests
                conn, _ = await connect(worker.address, role="peer", my_id="honest", token="t")
                conn.send(GetData(keys=["nothing"]))
                reply = await conn.recv(timeout=10)
                conn.close()
                reasons.append(type(reply).op)
                return reasons

            assert _run(attempts()) == ["worker-op", "peer-op", "data"]
            assert not ran
            with Client(s.address, token="t", set_as_default=False) as c:
                assert c.submit(inc, 1).result(timeout=30) == 2
        finally:
            s.loop_thread.run(worker.close())


# -- exposure warnings ---------------------------------------------------------------------------
def test_listening_beyond_loopback_without_auth_or_tls_warns(pki: PKI, caplog) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("10.1.2.3")
    assert exposure_warning("scheduler", "127.0.0.1", authenticated=False, encrypted=False) is None
    assert exposure_warning("scheduler", "0.0.0.0", authenticated=True, encrypted=True) is None
    loud = exposure_warning("scheduler", "0.0.0.0", authenticated=False, encrypted=False)
    assert loud is not None and "arbitrary code" in loud and "NO authentication" in loud
    worker = exposure_warning("worker", "10.0.0.5", authenticated=False, encrypted=False)
    assert worker is not None and "read every result" in worker
    clear = exposure_warning("scheduler", "0.0.0.0", authenticated=True, encrypted=False)
    assert clear is not None and "unencrypted" in clear
    with caplog.at_level(logging.WARNING, logger="corral.security"):
        warn_if_exposed("scheduler", "0.0.0.0", token=None, security=None)
        warn_if_exposed("scheduler", "0.0.0.0", token=None, security=_security(pki))  # mTLS
        warn_if_exposed("scheduler", "127.0.0.1", token=None, security=None)
    assert caplog.text.count("SECURITY") == 1
    # a TLS server context demands client certificates once a CA is given
    assert _security(pki).server_context().verify_mode == ssl.CERT_REQUIRED
