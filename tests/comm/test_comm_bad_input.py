"""Bad input over real sockets closes that one connection and nothing else.

Each attack runs against a real Scheduler's port and a real Worker's peer
port.  Afterwards a connection opened before the attack still works, a normal
Client still submits and gets correct results (big ones through the workers'
peer ports), the workers kept their scheduler streams, and the scheduler's
state passes ``validate()``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import msgpack
import pytest
from _wire_harness import Harness, RawPeer, frame, pack, prefix

from corral import Client
from corral.comm import handshake as handshake_module
from corral.comm.connection import HANDSHAKE_MAX_FRAME_BYTES
from corral.protocol.framing import DEFAULT_MAX_FRAME_BYTES

TARGETS = ["scheduler", "worker"]


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()


@pytest.fixture
def corral_client(harness: Harness) -> Iterator[Client]:
    with Client(harness.address, timeout=10) as c:
        yield c


def role_for(target: str) -> str:
    return "client" if target == "scheduler" else "peer"


def shake(peer: RawPeer, target: str, id: str = "attacker") -> None:
    answer = peer.handshake(role=role_for(target), id=id)
    assert answer["op"] == "welcome", answer


# -- attacks before the handshake: (send, expected refusal reason or None) -------------
def garbage(peer: RawPeer, target: str) -> None:
    peer.send_raw(b"GET / HTTP/1.1\r\nHost: corral\r\n\r\n")


def zero_frames(peer: RawPeer, target: str) -> None:
    peer.send_raw(prefix(0, []))


def oversized_length(peer: RawPeer, target: str) -> None:
    peer.send_raw(prefix(1, [DEFAULT_MAX_FRAME_BYTES + 1]))


def big_frame_before_handshake(peer: RawPeer, target: str) -> None:
    # under the general limit, but a stranger may not make the server allocate it
    peer.send_raw(prefix(1, [HANDSHAKE_MAX_FRAME_BYTES + 1]) + b"\x00" * 1000)


def many_frames_before_handshake(peer: RawPeer, target: str) -> None:
    peer.send_raw(prefix(1000, [1] * 1000))


def undecodable_msgpack(peer: RawPeer, target: str) -> None:
    peer.send_raw(frame(b"\xc1\xc1\xc1"))


def header_not_maps(peer: RawPeer, target: str) -> None:
    peer.send_raw(frame(msgpack.packb([1, "two", None])))


def truncated_then_eof(peer: RawPeer, target: str) -> None:
    peer.send_raw(pack({"op": "handshake", "protocol": 1, "role": "client", "id": "x"})[:20])
    peer.shutdown_write()


def invalid_handshake(peer: RawPeer, target: str) -> None:
    peer.recv()  # hello
    peer.send({"op": "handshake", "protocol": 1, "role": "client"})  # no id: ProtocolError


PRE_HANDSHAKE: dict[str, Callable[[RawPeer, str], None]] = {
    f.__name__: f
    for f in [
        garbage,
        zero_frames,
        oversized_length,
        big_frame_before_handshake,
        many_frames_before_handshake,
        undecodable_msgpack,
        header_not_maps,
        truncated_then_eof,
        invalid_handshake,
    ]
}


def op_before_handshake(peer: RawPeer, target: str) -> str:
    peer.send({"op": "get_data", "keys": ["x"]})
    return "expected a handshake, got op 'get_data'"


def wrong_protocol_version(peer: RawPeer, target: str) -> str:
    assert peer.handshake(role=role_for(target), protocol=99)["op"] == "refused"
    return "protocol version 99 is not supported"


def wrong_role(peer: RawPeer, target: str) -> str:
    role = "peer" if target == "scheduler" else "scheduler"
    assert peer.handshake(role=role)["op"] == "refused"
    return f"role {role!r} may not connect here"


REFUSED: dict[str, Callable[[RawPeer, str], str]] = {
    f.__name__: f for f in [op_before_handshake, wrong_protocol_version, wrong_role]
}


# -- attacks after a correct handshake ---------------------------------------------------
def unknown_op(peer: RawPeer, target: str) -> None:
    shake(peer, target)
    peer.send({"op": "frobnicate", "keys": []})


def mistyped_op(peer: RawPeer, target: str) -> None:
    shake(peer, target)
    if target == "scheduler":
        peer.send({"op": "release_keys", "keys": "not-a-list"})
    else:
        peer.send({"op": "get_data", "keys": [1, 2]})


def forbidden_op(peer: RawPeer, target: str) -> None:
    """A client sending a worker's op; a peer sending a scheduler's op to a worker."""
    shake(peer, target)
    if target == "scheduler":
        peer.send({"op": "task_finished", "key": "x", "run_id": 1, "nbytes": 8})
    else:
        peer.send({"op": "compute", "tasks": [], "functions": {}})


def second_handshake(peer: RawPeer, target: str) -> None:
    shake(peer, target)
    peer.send({"op": "handshake", "protocol": 1, "role": "client", "id": "again"})


def garbage_after_handshake(peer: RawPeer, target: str) -> None:
    shake(peer, target)
    peer.send_raw(b"\xff" * 64)


def oversized_after_handshake(peer: RawPeer, target: str) -> None:
    shake(peer, target)
    peer.send_raw(prefix(2, [10, DEFAULT_MAX_FRAME_BYTES + 1]))


def undecodable_after_handshake(peer: RawPeer, target: str) -> None:
    shake(peer, target)
    peer.send_raw(frame(b"\x92\xc1"))


def bad_frame_reference(peer: RawPeer, target: str) -> None:
    shake(peer, target)
    ref = msgpack.ExtType(1, (7).to_bytes(4, "little"))
    header = msgpack.packb([{"op": "get_data", "keys": [ref]}])
    peer.send_raw(frame(header, b"frame 1"))


def truncated_after_handshake(peer: RawPeer, target: str) -> None:
    shake(peer, target)
    peer.send_raw(pack({"op": "get_data", "keys": ["x" * 100]})[:-10])
    peer.shutdown_write()


POST_HANDSHAKE: dict[str, Callable[[RawPeer, str], None]] = {
    f.__name__: f
    for f in [
        unknown_op,
        mistyped_op,
        forbidden_op,
        second_handshake,
        garbage_after_handshake,
        oversized_after_handshake,
        undecodable_after_handshake,
        bad_frame_reference,
        truncated_after_handshake,
    ]
}


def attack(
    harness: Harness, client: Client, target: str, run: Callable[[RawPeer, str], object]
) -> RawPeer:
    bystanders = [
        ("scheduler", harness.bystander("scheduler")),
        ("worker", harness.bystander("worker")),
    ]
    peer = RawPeer(harness.address_of(target))
    started = time.monotonic()
    run(peer, target)
    assert peer.wait_closed(), "the server kept a misbehaving connection open"
    assert time.monotonic() - started < 5  # at once, not after some timeout
    peer.close()
    harness.assert_healthy(client, bystanders)
    return peer


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", list(PRE_HANDSHAKE))
def test_bad_bytes_before_the_handshake(
    harness: Harness, corral_client: Client, target: str, name: str
) -> None:
    peer = attack(harness, corral_client, target, PRE_HANDSHAKE[name])
    assert all(op["op"] in ("hello", "refused") for op in peer.received)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", list(REFUSED))
def test_bad_handshakes_are_refused_with_a_reason(
    harness: Harness, corral_client: Client, target: str, name: str
) -> None:
    reason: list[str] = []
    peer = attack(harness, corral_client, target, lambda p, t: reason.append(REFUSED[name](p, t)))
    assert [op["op"] for op in peer.received] == ["hello", "refused"]
    assert reason[0] in peer.refusals()[0]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", list(POST_HANDSHAKE))
def test_bad_input_after_the_handshake(
    harness: Harness, corral_client: Client, target: str, name: str
) -> None:
    peer = attack(harness, corral_client, target, POST_HANDSHAKE[name])
    assert [op["op"] for op in peer.received] == ["hello", "welcome"]
    # the scheduler forgot the attacking client entirely
    harness.wait_for(lambda: "attacker" not in harness.scheduler.state.clients)
    harness.wait_for(lambda: "attacker" not in harness.scheduler._streams)


@pytest.mark.parametrize("target", TARGETS)
def test_no_handshake_at_all_times_out(
    harness: Harness, corral_client: Client, target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(handshake_module, "HANDSHAKE_TIMEOUT", 0.3)
    peer = RawPeer(harness.address_of(target))
    assert peer.recv()["op"] == "hello"
    started = time.monotonic()
    assert peer.wait_closed()
    assert 0.25 < time.monotonic() - started < 5
    assert "no handshake within 0.3s" in peer.refusals()[0]
    monkeypatch.undo()
    harness.assert_healthy(corral_client)


def test_silent_connections_do_not_block_others(harness: Harness, corral_client: Client) -> None:
    """Half-open connections waiting in the handshake cost nothing to anyone else."""
    idle = [RawPeer(harness.address_of(t)) for t in TARGETS * 5]
    harness.assert_healthy(corral_client)
    for peer in idle:
        assert peer.recv()["op"] == "hello"
        peer.close()


def test_worker_role_sending_client_ops_is_dropped_and_forgotten(
    harness: Harness, corral_client: Client
) -> None:
    peer = RawPeer(harness.address)
    shake_answer = peer.handshake(role="worker", id="fake-worker")
    assert shake_answer["op"] == "welcome"
    peer.send(
        {"op": "register_worker", "address": "tcp://127.0.0.1:1", "nthreads": 1, "name": "fake"}
    )
    harness.wait_for(lambda: "tcp://127.0.0.1:1" in harness.scheduler.state.workers)
    peer.send({"op": "update_graph", "tasks": [], "wanted": []})
    assert peer.wait_closed()
    harness.wait_for(lambda: "tcp://127.0.0.1:1" not in harness.scheduler.state.workers)
    harness.assert_healthy(corral_client)


def test_worker_role_must_register_first(harness: Harness, corral_client: Client) -> None:
    peer = RawPeer(harness.address)
    assert peer.handshake(role="worker", id="fake-worker")["op"] == "welcome"
    peer.send({"op": "task_finished", "key": "x", "run_id": 1, "nbytes": 8})
    assert peer.wait_closed()
    harness.assert_healthy(corral_client)


def test_a_batch_with_one_bad_op_is_rejected_whole(harness: Harness, corral_client: Client) -> None:
    peer = RawPeer(harness.address)
    shake(peer, "scheduler")
    peer.send(
        {"op": "request", "id": 1, "method": "task_counts"},
        {"op": "request", "id": 2},  # no method
    )
    assert peer.wait_closed()
    assert [op["op"] for op in peer.received] == ["hello", "welcome"]  # no reply to id 1
    harness.assert_healthy(corral_client)


def test_bad_requests_get_error_replies_not_disconnects(
    harness: Harness, corral_client: Client
) -> None:
    """Well-formed but wrong requests are answered: they are not protocol errors."""
    peer = RawPeer(harness.address)
    shake(peer, "scheduler")
    peer.send(
        {"op": "request", "id": 1, "method": "no_such_method"},
        {"op": "request", "id": 2, "method": "story", "args": {"wrong_arg": 1}},
        {"op": "request", "id": 3, "method": "who_has", "args": {"keys": 5}},
        {"op": "request", "id": 4, "method": "task_counts"},
    )
    replies = [peer.recv() for _ in range(4)]
    assert [r["id"] for r in replies] == [1, 2, 3, 4]
    assert "unknown request method 'no_such_method'" in replies[0]["error"]
    assert "TypeError" in replies[1]["error"] and "TypeError" in replies[2]["error"]
    assert "error" not in replies[3] and isinstance(replies[3]["result"], dict)
    peer.close()
    harness.assert_healthy(corral_client)


def test_nothing_after_a_violation_is_handled(harness: Harness, corral_client: Client) -> None:
    """Ops that arrived in the same read as a forbidden one are dropped with it."""
    args = {"serializer": "pickle", "frames": [b"\x80\x05N."]}
    peer = RawPeer(harness.address)
    shake(peer, "scheduler")
    peer.send_raw(
        pack({"op": "task_finished", "key": "x", "run_id": 1, "nbytes": 8})
        + pack(
            {
                "op": "update_graph",
                "tasks": [{"key": "after-violation", "args": args, "runtime": "none"}],
                "wanted": ["after-violation"],
            }
        )
        + pack({"op": "request", "id": 5, "method": "task_counts"})
    )
    assert peer.wait_closed()
    assert [op["op"] for op in peer.received] == ["hello", "welcome"]
    harness.wait_for(lambda: "attacker" not in harness.scheduler.state.clients)
    assert harness.call(lambda: harness.scheduler.state.story("after-violation")) == []
    harness.assert_healthy(corral_client)
