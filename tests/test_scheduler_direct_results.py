"""The scheduler's side of watch_results: compute names the waiting clients, and
task_finished.notified spares the relay to those the worker told itself."""

from __future__ import annotations

import dataclasses

from state_helpers import W1, Sched, ctask, finished, spec

from corral.protocol import Payload
from corral.protocol.messages import KeyInMemory, UpdateGraph
from corral.scheduler.state import ClientJoined

C1, C2 = "client-1", "client-2"
RESULT = Payload("pickle", [b"\x80\x05K\x02."])


def _two_clients_want_x() -> Sched:
    s = Sched(W1)
    for c in (C1, C2):
        assert s(c, ClientJoined(c)) == {}
    out = s(C1, UpdateGraph(tasks=[spec("x")], wanted=["x"]))
    assert out[W1][0].tasks == [ctask("x", send_result=True, notify=[C1])]  # type: ignore[attr-defined]
    assert s(C2, UpdateGraph(tasks=[spec("x")], wanted=["x"])) == {}
    return s


def test_compute_names_the_clients_waiting_for_the_result() -> None:
    s = Sched(W1)
    assert s(C1, ClientJoined(C1)) == {}
    out = s(C1, UpdateGraph(tasks=[spec("a"), spec("b", "a")], wanted=["b"]))
    # a is only an input: no client waits for it, so no result travels and none is pushed.
    assert out[W1][0].tasks == [ctask("a")]  # type: ignore[attr-defined]
    out = s(W1, finished("a"))
    (task,) = out[W1][0].tasks  # type: ignore[attr-defined]
    assert task.send_result and task.notify == [C1]


def test_clients_the_worker_told_are_not_told_again() -> None:
    s = _two_clients_want_x()
    done = dataclasses.replace(finished("x"), result=RESULT, notified=[C1])
    out = s(W1, done)
    assert C1 not in out
    assert out[C2] == [KeyInMemory(key="x", who_has=[W1], typename="int", result=RESULT)]
    assert s.states() == {"x": "memory"}


def test_without_notified_every_waiting_client_is_told() -> None:
    s = _two_clients_want_x()
    out = s(W1, dataclasses.replace(finished("x"), result=RESULT))
    for c in (C1, C2):
        assert out[c] == [KeyInMemory(key="x", who_has=[W1], typename="int", result=RESULT)]
