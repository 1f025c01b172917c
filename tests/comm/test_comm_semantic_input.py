"""Well-formed ops with wrong content: answered or refused, never harmful to others.

These pass the protocol layer (the types are right), so they reach the
scheduler's and workers' own logic.  Tests marked ``xfail(strict=True)``
document bugs outside the protocol layer; they start failing (XPASS) once the
bug is fixed, and the mark should then be removed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from _wire_harness import Harness, RawPeer

from corral import Client
from corral.protocol import serialize

ARGS = serialize(((1,), {})).to_wire()


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()


@pytest.fixture
def corral_client(harness: Harness) -> Iterator[Client]:
    with Client(harness.address, timeout=10) as c:
        yield c


def raw_client(harness: Harness, id: str = "raw") -> RawPeer:
    peer = RawPeer(harness.address)
    assert peer.handshake(role="client", id=id)["op"] == "welcome"
    return peer


def test_task_naming_an_unknown_function_errs(harness: Harness, corral_client: Client) -> None:
    peer = raw_client(harness)
    peer.send(
        {"op": "update_graph", "tasks": [{"key": "k", "args": ARGS, "fn": "nope"}], "wanted": ["k"]}
    )
    answer = peer.recv(timeout=5)
    assert answer["op"] == "key_erred" and answer["key"] == "k"
    harness.assert_healthy(corral_client)


def test_task_naming_an_unknown_function_harms_nobody_else(
    harness: Harness, corral_client: Client
) -> None:
    peer = raw_client(harness)
    peer.send(
        {"op": "update_graph", "tasks": [{"key": "k", "args": ARGS, "fn": "nope"}], "wanted": ["k"]}
    )
    with contextlib.suppress(EOFError, TimeoutError):
        peer.recv(timeout=2)
    peer.close()
    harness.wait_for(lambda: "raw" not in harness.scheduler.state.clients)
    harness.assert_healthy(corral_client)


def test_scattering_an_undecodable_payload_does_not_disconnect_workers(
    harness: Harness, corral_client: Client
) -> None:
    peer = raw_client(harness)
    peer.send(
        {
            "op": "scatter",
            "id": 1,
            "data": {"bad": {"serializer": "pickle", "frames": [b"not a pickle"]}},
            "nbytes": {"bad": 12},
        }
    )
    assert peer.recv()["op"] == "reply"
    harness.assert_healthy(corral_client)


def test_task_depending_on_itself_does_not_block_others(
    harness: Harness, corral_client: Client
) -> None:
    peer = raw_client(harness)
    peer.send(
        {
            "op": "update_graph",
            "tasks": [{"key": "loop", "args": ARGS, "fn": "f", "deps": ["loop"]}],
            "wanted": ["loop"],
            "functions": {"f": serialize(abs).to_wire()},
        }
    )
    harness.assert_healthy(corral_client)
    peer.close()
    harness.wait_for(lambda: "raw" not in harness.scheduler.state.clients)
    harness.call(harness.scheduler.state.validate)


def test_fake_worker_cannot_finish_other_workers_tasks(
    harness: Harness, corral_client: Client
) -> None:
    fake = RawPeer(harness.address)
    assert fake.handshake(role="worker", id="fake")["op"] == "welcome"
    fake.send(
        {"op": "register_worker", "address": "tcp://127.0.0.1:9", "nthreads": 1, "runtime": "js"}
    )
    harness.wait_for(lambda: "tcp://127.0.0.1:9" in harness.scheduler.state.workers)
    fut = corral_client.submit(_slow_identity, 5, pure=False)
    harness.wait_for(lambda: fut.key in harness.scheduler.state.tasks)
    fake.send({"op": "task_finished", "key": fut.key, "run_id": 1, "nbytes": 1})
    assert fut.result(timeout=10) == 5  # the real result, from the real worker
    fake.close()
    harness.wait_for(lambda: "tcp://127.0.0.1:9" not in harness.scheduler.state.workers)
    harness.assert_healthy(corral_client)


def test_duplicate_worker_address_is_refused(harness: Harness, corral_client: Client) -> None:
    fake = RawPeer(harness.address)
    assert fake.handshake(role="worker", id="fake")["op"] == "welcome"
    real = harness.workers[0].address
    fake.send({"op": "register_worker", "address": real, "nthreads": 1})
    assert fake.wait_closed()
    harness.assert_healthy(corral_client)


def _slow_identity(x: int) -> int:
    import time

    time.sleep(0.2)
    return x


def test_scattering_over_a_running_key_keeps_the_state_sound(
    harness: Harness, corral_client: Client
) -> None:
    fut = corral_client.submit(_slow_identity, 1, key="running-key")
    harness.wait_for(
        lambda: (
            getattr(harness.scheduler.state.tasks.get("running-key"), "state", None) == "processing"
        )
    )
    peer = raw_client(harness)
    peer.send(
        {
            "op": "scatter",
            "id": 1,
            "data": {"running-key": serialize(2).to_wire()},
            "nbytes": {"running-key": 28},
        }
    )
    assert peer.recv()["op"] == "reply"
    harness.call(harness.scheduler.state.validate)
    del fut
    harness.assert_healthy(corral_client)
