"""The pure scheduler state machine: exact messages out for events in, and properties.

The example tests feed protocol messages to :class:`SchedulerState` and assert
the exact messages it answers with (h11 style).  The property test drives it
with random graphs, clients and workers joining and leaving, and a simulated
execution loop, checking ``validate()`` after every stimulus and the
end-to-end promises at quiescence.
"""

from __future__ import annotations

import pytest
from state_helpers import ARGS, FN, W1, W2, W3, W4, Sched, compute, ctask, erred, error, finished
from state_helpers import register as reg
from state_helpers import spec

from corral.protocol.messages import (
    AddKeys,
    CancelKeys,
    ErrorInfo,
    FreeKeys,
    KeyCancelled,
    KeyErred,
    KeyInMemory,
    MissingData,
    ReleaseKeys,
    Scatter,
    Store,
    TaskFinished,
    UpdateGraph,
    UpdateWhoHas,
)
from corral.protocol.serialize import Payload
from corral.scheduler.state import ClientJoined, ClientLeft, InvalidTransition, WorkerLeft

C1 = "client-1"
C2 = "client-2"


def submit(s: Sched, client: str, tasks, wanted, functions=None):
    return s(client, UpdateGraph(tasks=list(tasks), wanted=list(wanted), functions=functions or {}))


# ---------------------------------------------------------------------------------
# The happy path
# ---------------------------------------------------------------------------------
def test_chain_runs_in_order_and_frees_intermediates():
    s = Sched(W1, W2)
    assert s(C1, ClientJoined(C1)) == {}
    out = submit(s, C1, [spec("a"), spec("b", "a"), spec("c", "b")], ["c"])
    # Only the root is ready; the chain waits for it.
    assert out == {W1: [compute(ctask("a"))]}
    assert s.states() == {"a": "processing", "b": "waiting", "c": "waiting"}
    assert s.state.why_pending("b") == "waiting for its inputs 'a'"

    out = s(W1, finished("a", nbytes=100))
    # b goes where its input already is; a stays while b needs it.
    assert out == {W1: [compute(ctask("b", who_has={"a": [W1]}, nbytes={"a": 100}))]}

    out = s(W1, finished("b", nbytes=50))
    # b's dependent is placed; a is no longer needed by anyone: freed.
    assert out == {
        W1: [
            FreeKeys(keys=["a"]),
            compute(ctask("c", who_has={"b": [W1]}, nbytes={"b": 50}, send_result=True)),
        ]
    }
    assert s.states() == {"a": "released", "b": "memory", "c": "processing"}

    result = Payload("pickle", [b"42"])
    out = s(W1, TaskFinished(key="c", run_id=1, nbytes=8, typename="int", result=result))
    assert out == {
        C1: [KeyInMemory(key="c", who_has=[W1], typename="int", result=result)],
        W1: [FreeKeys(keys=["b"])],
    }
    assert s.states() == {"a": "released", "b": "released", "c": "memory"}
    assert [t[1:3] for t in s.state.story("a")] == [
        ("released", "waiting"),
        ("waiting", "processing"),
        ("processing", "memory"),
        ("memory", "released"),
    ]

    # The client drops its future: the whole lineage is forgotten.
    out = s(C1, ReleaseKeys(keys=["c"]))
    assert out == {W1: [FreeKeys(keys=["c"])]}
    assert s.tasks == {}
    assert s.state.story("c")[-1][1:3] == ("released", "forgotten")


def test_independent_tasks_spread_over_workers_and_functions_travel_once():
    s = Sched(W1, W2)
    tasks = [spec(f"inc-{i}", fn="f1") for i in range(4)]
    out = submit(s, C1, tasks, [t.key for t in tasks], functions={"f1": FN})
    # Least loaded first: the four tasks alternate, one batch per worker.
    assert out == {
        W1: [
            compute(
                ctask("inc-0", fn="f1", send_result=True),
                ctask("inc-2", fn="f1", send_result=True),
                functions={"f1": FN},
            )
        ],
        W2: [
            compute(
                ctask("inc-1", fn="f1", send_result=True),
                ctask("inc-3", fn="f1", send_result=True),
                functions={"f1": FN},
            )
        ],
    }
    for i in range(4):
        s(W1 if i % 2 == 0 else W2, finished(f"inc-{i}"))
    s(C1, ReleaseKeys(keys=[t.key for t in tasks]))
    assert s.tasks == {}
    # The function's payload is dropped with its last task.
    assert s.state.functions == {} and s.state.function_refs == {}


def test_priority_orders_placement_within_a_batch():
    s = Sched(W1)
    out = submit(s, C1, [spec("x-1", priority=[1]), spec("x-0", priority=[0])], ["x-0", "x-1"])
    assert [t.key for t in out[W1][0].tasks] == ["x-0", "x-1"]


def test_data_locality_sends_a_dependent_to_its_large_input():
    for big_on, nbytes in ((W1, {"x": 10**9, "y": 10}), (W2, {"x": 10, "y": 10**9})):
        s = Sched(W1, W2)
        tasks = [spec("x", priority=[0]), spec("y", priority=[1]), spec("z", "x", "y")]
        out = submit(s, C1, tasks, ["z"])
        assert out == {W1: [compute(ctask("x", priority=[0]))], W2: [compute(ctask("y", priority=[1]))]}
        assert s(W1, finished("x", nbytes=nbytes["x"])) == {}
        out = s(W2, finished("y", nbytes=nbytes["y"]))
        assert out == {
            big_on: [
                compute(
                    ctask(
                        "z",
                        who_has={"x": [W1], "y": [W2]},
                        nbytes=nbytes,
                        send_result=True,
                    )
                )
            ]
        }


def test_data_locality_gives_way_to_a_busy_holder():
    """A small input does not pin its dependent to a worker with a long queue."""
    s = Sched(W1, W2)
    submit(s, C1, [spec("x")], ["x"])
    s(W1, finished("x", nbytes=10))
    # Ten unrelated tasks, all restricted to W1, make it busy.
    busy = [spec(f"busy-{i}", workers=[W1]) for i in range(10)]
    submit(s, C1, busy, [t.key for t in busy])
    out = submit(s, C1, [spec("z", "x")], ["z"])
    assert out == {
        W2: [compute(ctask("z", who_has={"x": [W1]}, nbytes={"x": 10}, send_result=True))]
    }


def test_shared_input_is_freed_only_after_its_last_dependent():
    s = Sched(W1)
    submit(s, C1, [spec("a"), spec("b", "a"), spec("c", "a")], ["b", "c"])
    out = s(W1, finished("a"))
    assert [t.key for t in out[W1][0].tasks] == sorted(t.key for t in out[W1][0].tasks)
    assert s(W1, finished("b")) == {C1: [KeyInMemory(key="b", who_has=[W1], typename="int")]}
    assert s(W1, finished("c")) == {
        C1: [KeyInMemory(key="c", who_has=[W1], typename="int")],
        W1: [FreeKeys(keys=["a"])],
    }


# ---------------------------------------------------------------------------------
# Clients wanting and releasing keys
# ---------------------------------------------------------------------------------
def test_released_wanted_key_is_forgotten_while_processing():
    s = Sched(W1)
    submit(s, C1, [spec("a")], ["a"])
    out = s(C1, ReleaseKeys(keys=["a"]))
    assert out == {W1: [FreeKeys(keys=["a"])]}
    assert s.tasks == {} and s.state.workers[W1].processing == set()
    # The run the worker finished meanwhile is stale: its data is freed.
    assert s(W1, finished("a")) == {W1: [FreeKeys(keys=["a"])]}
    assert s.tasks == {}


def test_key_wanted_by_two_clients_lives_until_both_release():
    s = Sched(W1)
    submit(s, C1, [spec("a")], ["a"])
    assert submit(s, C2, [spec("a")], ["a"]) == {}  # same key: not submitted twice
    out = s(W1, finished("a"))
    assert out == {
        C1: [KeyInMemory(key="a", who_has=[W1], typename="int")],
        C2: [KeyInMemory(key="a", who_has=[W1], typename="int")],
    }
    assert s(C1, ReleaseKeys(keys=["a"])) == {}
    assert s.states() == {"a": "memory"}
    # A key in memory is reported at once to a client that asks for it later.
    assert submit(s, C1, [], ["a"]) == {C1: [KeyInMemory(key="a", who_has=[W1], typename="int")]}
    assert s(C2, ClientLeft(C2)) == {}
    assert s(C1, ClientLeft(C1)) == {W1: [FreeKeys(keys=["a"])]}
    assert s.tasks == {}


def test_release_of_a_key_not_wanted_by_that_client_is_ignored():
    s = Sched(W1)
    submit(s, C1, [spec("a")], ["a"])
    assert s(C2, ReleaseKeys(keys=["a", "unknown"])) == {}
    assert s.states() == {"a": "processing"}


def test_wanting_an_unknown_key_answers_cancelled():
    s = Sched(W1)
    assert submit(s, C1, [], ["ghost"]) == {
        C1: [KeyCancelled(key="ghost", reason="unknown key", lost=True)]
    }


def test_released_input_is_recomputed_from_lineage_for_a_new_dependent():
    s = Sched(W1)
    submit(s, C1, [spec("a"), spec("b", "a")], ["b"])
    s(W1, finished("a"))
    s(W1, finished("b"))
    assert s.states() == {"a": "released", "b": "memory"}
    # A new task needs a again: its record is still there, so it is recomputed.
    out = submit(s, C1, [spec("c", "a")], ["c"])
    assert out == {W1: [compute(ctask("a", run_id=2))]}
    out = s(W1, finished("a", run_id=2))
    assert out == {W1: [compute(ctask("c", who_has={"a": [W1]}, nbytes={"a": 8}, send_result=True))]}


# ---------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------
def test_error_propagates_the_same_info_to_dependents_and_their_clients():
    s = Sched(W1)
    submit(s, C1, [spec("a"), spec("b", "a"), spec("c", "a"), spec("d", "c")], ["b", "d"])
    submit(s, C2, [spec("d", "c")], ["d"])
    err = error("ValueError", "bad input")
    out = s(W1, erred("a", err=err))
    assert set(out) == {C1, C2}
    assert sorted(out[C1], key=lambda m: m.key) == [
        KeyErred(key="b", error=err),
        KeyErred(key="d", error=err),
    ]
    assert out[C2] == [KeyErred(key="d", error=err)]
    assert s.states() == {"a": "released", "b": "erred", "c": "released", "d": "erred"}
    assert s.tasks["b"].error is err and s.tasks["d"].error is err
    # A client asking later for an erred key hears it at once.
    assert submit(s, C2, [], ["b"]) == {C2: [KeyErred(key="b", error=err)]}
    for c in (C1, C2):
        s(c, ClientLeft(c))
    assert s.tasks == {}


def test_dependent_of_an_erred_key_submitted_later_errs_at_once():
    s = Sched(W1)
    submit(s, C1, [spec("a")], ["a"])
    err = error()
    assert s(W1, erred("a", err=err)) == {C1: [KeyErred(key="a", error=err)]}
    assert submit(s, C1, [spec("b", "a")], ["b"]) == {C1: [KeyErred(key="b", error=err)]}


def test_error_frees_a_sibling_running_only_for_the_failed_branch():
    s = Sched(W1, W2)
    submit(s, C1, [spec("x", priority=[0]), spec("y", priority=[1]), spec("z", "x", "y")], ["z"])
    err = error()
    out = s(W1, erred("x", err=err))
    # z can never run: y, still running for it alone, is taken back.
    assert out == {C1: [KeyErred(key="z", error=err)], W2: [FreeKeys(keys=["y"])]}
    assert s.state.workers[W2].processing == set()


def test_retries_rerun_a_failed_task_then_report_the_last_error():
    s = Sched(W1, W2)
    submit(s, C1, [spec("a", retries=2)], ["a"])
    assert s(W1, erred("a", run_id=1)) == {W1: [compute(ctask("a", run_id=2, send_result=True))]}
    # A late duplicate of the first failure changes nothing.
    assert s(W1, erred("a", run_id=1)) == {}
    assert s(W1, erred("a", run_id=2)) == {W1: [compute(ctask("a", run_id=3, send_result=True))]}
    last = error("OSError", "third time")
    assert s(W1, erred("a", run_id=3, err=last)) == {C1: [KeyErred(key="a", error=last)]}


def test_retry_that_succeeds_reports_memory():
    s = Sched(W1)
    submit(s, C1, [spec("a", retries=1)], ["a"])
    s(W1, erred("a", run_id=1))
    assert s(W1, finished("a", run_id=2)) == {C1: [KeyInMemory(key="a", who_has=[W1], typename="int")]}


# ---------------------------------------------------------------------------------
# Workers leaving
# ---------------------------------------------------------------------------------
def test_worker_loss_reschedules_processing_and_recomputes_lost_results():
    s = Sched(W1, W2)
    submit(s, C1, [spec("a", workers=[W1], allow_other_workers=True), spec("b", "a")], ["b"])
    s(W1, finished("a", nbytes=100))
    assert s.states() == {"a": "memory", "b": "processing"}
    # W1 dies while running b, holding the only copy of a.
    out = s(W1, WorkerLeft(W1))
    assert out == {W2: [compute(ctask("a", run_id=2))]}
    assert s.states() == {"a": "processing", "b": "waiting"}
    assert s.tasks["b"].suspicious == 1
    out = s(W2, finished("a", run_id=2, nbytes=100))
    assert out == {
        W2: [
            compute(ctask("b", run_id=2, who_has={"a": [W2]}, nbytes={"a": 100}, send_result=True))
        ]
    }
    assert s(W2, finished("b", run_id=2)) == {
        C1: [KeyInMemory(key="b", who_has=[W2], typename="int")],
        W2: [FreeKeys(keys=["a"])],
    }
    assert [t[1:3] for t in s.state.story("a")][3:6] == [
        ("memory", "released"),
        ("released", "waiting"),
        ("waiting", "processing"),
    ]


def test_worker_loss_recomputes_a_released_input_from_lineage():
    s = Sched(W1, W2)
    submit(s, C1, [spec("a", workers=[W1]), spec("b", "a", workers=[W1]), spec("c", "b")], ["c"])
    s(W1, finished("a"))
    s(W1, finished("b"))
    assert s.states() == {"a": "released", "b": "memory", "c": "processing"}
    s(W1, WorkerLeft(W1))
    s(W1, reg(W1))
    # b's only copy went with W1 and a had been freed: both are computed again.
    assert s.states() == {"a": "processing", "b": "waiting", "c": "waiting"}


def test_worker_loss_with_a_replica_left_recomputes_nothing():
    s = Sched(W1, W2)
    submit(s, C1, [spec("a", workers=[W1]), spec("b", "a", workers=[W2])], ["b"])
    s(W1, finished("a"))
    # W2 fetched a to run b.
    assert s(W2, AddKeys(nbytes={"a": 8})) == {}
    assert {w.address for w in s.tasks["a"].who_has} == {W1, W2}
    assert s(W1, WorkerLeft(W1)) == {}
    assert s.states() == {"a": "memory", "b": "processing"}


def test_task_on_three_workers_that_died_fails_with_killed_worker():
    s = Sched(W1, W2, W3, W4)
    submit(s, C1, [spec("a"), spec("b", "a")], ["a", "b"])
    assert s(W1, WorkerLeft(W1)) == {W2: [compute(ctask("a", run_id=2, send_result=True))]}
    # A worker that said goodbye first does not make the task suspect.
    assert s(W2, WorkerLeft(W2, expected=True)) == {
        W3: [compute(ctask("a", run_id=3, send_result=True))]
    }
    assert s(W3, WorkerLeft(W3)) == {W4: [compute(ctask("a", run_id=4, send_result=True))]}
    out = s(W4, WorkerLeft(W4))
    assert set(out) == {C1}
    assert [type(m) for m in out[C1]] == [KeyErred, KeyErred]
    (e,) = {m.error.typename for m in out[C1]}
    assert e == "KilledWorker"
    assert "3 workers" in out[C1][0].error.message and W4 in out[C1][0].error.message
    assert s.states() == {"a": "erred", "b": "erred"}
    assert s.tasks["b"].error is s.tasks["a"].error


def test_killed_worker_threshold_is_configurable():
    s = Sched(W1, W2, allowed_failures=1)
    submit(s, C1, [spec("a")], ["a"])
    out = s(W1, WorkerLeft(W1))
    assert [m.error.typename for m in out[C1]] == ["KilledWorker"]


def test_last_worker_leaving_leaves_tasks_without_a_worker_until_one_joins():
    s = Sched(W1)
    submit(s, C1, [spec("a")], ["a"])
    assert s(W1, WorkerLeft(W1)) == {}
    assert s.states() == {"a": "no-worker"}
    assert s.state.why_pending("a") == "no workers are connected"
    assert s(W2, reg(W2)) == {W2: [compute(ctask("a", run_id=2, send_result=True))]}


def test_messages_from_a_departed_worker_are_ignored():
    s = Sched(W1, W2)
    submit(s, C1, [spec("a")], ["a"])
    s(W1, WorkerLeft(W1))
    assert s(W1, finished("a", run_id=1)) == {}
    assert s(W1, erred("a", run_id=1)) == {}
    assert s(W1, AddKeys(nbytes={"a": 1})) == {}
    assert s.states() == {"a": "processing"}
    assert s.tasks["a"].processing_on.address == W2


# ---------------------------------------------------------------------------------
# Cancel
# ---------------------------------------------------------------------------------
def test_cancel_cancels_dependents_and_frees_running_work():
    s = Sched(W1)
    submit(s, C1, [spec("a"), spec("b", "a")], ["a", "b"])
    submit(s, C2, [spec("c", "b")], ["c"])
    out = s(C1, CancelKeys(keys=["a"]))
    assert set(out) == {C1, C2, W1}
    assert sorted(out[C1], key=lambda m: m.key) == [
        KeyCancelled(key="a"),
        KeyCancelled(key="b"),
    ]
    assert out[C2] == [KeyCancelled(key="c")]
    assert out[W1] == [FreeKeys(keys=["a"])]
    assert s.tasks == {}
    # The worker's late answer is stale.
    assert s(W1, finished("a")) == {W1: [FreeKeys(keys=["a"])]}


def test_cancel_spares_inputs_in_memory_that_others_want():
    s = Sched(W1)
    submit(s, C1, [spec("a"), spec("b", "a")], ["a", "b"])
    s(W1, finished("a"))
    out = s(C1, CancelKeys(keys=["b"]))
    assert out == {C1: [KeyCancelled(key="b")], W1: [FreeKeys(keys=["b"])]}
    assert s.states() == {"a": "memory"}


# ---------------------------------------------------------------------------------
# Scatter
# ---------------------------------------------------------------------------------
def test_scatter_stores_data_on_the_emptiest_worker_and_dependents_use_it():
    s = Sched(W1, W2)
    data = Payload("pickle", [b"x" * 10])
    out = s(C1, Scatter(id=1, data={"x": data}, nbytes={"x": 10}))
    assert out == {W1: [Store(data={"x": data})]}
    out = s(C1, Scatter(id=2, data={"y": data}, nbytes={"y": 10}))
    assert out == {W2: [Store(data={"y": data})]}
    assert s.states() == {"x": "memory", "y": "memory"}
    out = submit(s, C1, [spec("z", "x")], ["z"])
    assert out == {W1: [compute(ctask("z", who_has={"x": [W1]}, nbytes={"x": 10}, send_result=True))]}


def test_scatter_broadcast_stores_everywhere():
    s = Sched(W1, W2)
    data = Payload("pickle", [b"x"])
    out = s(C1, Scatter(id=1, data={"x": data}, nbytes={"x": 1}, broadcast=True))
    assert out == {W1: [Store(data={"x": data})], W2: [Store(data={"x": data})]}
    assert s(W1, WorkerLeft(W1)) == {}
    assert s.states() == {"x": "memory"}


def test_scattered_data_lost_with_its_only_holder_is_cancelled_as_lost():
    s = Sched(W1, W2)
    s(C1, Scatter(id=1, data={"x": ARGS}, nbytes={"x": 10}))
    submit(s, C1, [spec("y", "x")], ["y"])
    assert s.states() == {"x": "memory", "y": "processing"}
    out = s(W1, WorkerLeft(W1))
    assert set(out) == {C1}
    cancelled, failed = out[C1]
    assert cancelled == KeyCancelled(key="x", reason="lost: its worker left", lost=True)
    # Its dependent cannot be computed any more: it errs, naming the cause.
    assert failed.key == "y" and failed.error.typename == "LostDataError"
    assert s.states() == {"x": "erred", "y": "erred"}
    s(C1, ReleaseKeys(keys=["x", "y"]))
    assert s.tasks == {}


def test_scatter_without_matching_workers_does_nothing():
    s = Sched(W1)
    assert s(C1, Scatter(id=1, data={"x": ARGS}, nbytes={"x": 1}, workers=[W2])) == {}
    assert s.tasks == {}


# ---------------------------------------------------------------------------------
# Restrictions and resources
# ---------------------------------------------------------------------------------
def test_restricted_task_waits_for_its_worker():
    s = Sched(W1)
    out = submit(s, C1, [spec("a", workers=[W3])], ["a"])
    assert out == {}
    assert s.states() == {"a": "no-worker"}
    assert s.state.why_pending("a") == (
        f"restricted to workers ['{W3}'], none of which is connected"
    )
    assert s(W2, reg(W2)) == {}
    assert s.states() == {"a": "no-worker"}
    assert s(W3, reg(W3)) == {W3: [compute(ctask("a", send_result=True))]}


def test_restriction_by_name_and_by_host():
    s = Sched()
    s(W1, reg(W1, name="alice"))
    s(W2, reg(W2))
    out = submit(s, C1, [spec("a", workers=["alice"])], ["a"])
    assert out == {W1: [compute(ctask("a", send_result=True))]}
    out = submit(s, C1, [spec("b", workers=["10.0.0.2"])], ["b"])
    assert out == {W2: [compute(ctask("b", send_result=True))]}


def test_allow_other_workers_relaxes_a_restriction_to_an_absent_worker():
    s = Sched(W1)
    out = submit(s, C1, [spec("a", workers=[W3], allow_other_workers=True)], ["a"])
    assert out == {W1: [compute(ctask("a", send_result=True))]}


def test_unmet_resources_leave_a_task_without_worker_until_one_offers_them():
    s = Sched(W1)
    s(W2, reg(W2, resources={"GPU": 0.5}))
    out = submit(s, C1, [spec("g", resources={"GPU": 1})], ["g"])
    assert out == {}
    assert s.states() == {"g": "no-worker"}
    assert s.state.why_pending("g") == "needs GPU=1; the most any worker offers is 0.5"
    out = s(W3, reg(W3, resources={"MEM": 4}))
    assert out == {}
    assert s(W4, reg(W4, resources={"GPU": 2})) == {
        W4: [compute(ctask("g", resources={"GPU": 1}, send_result=True))]
    }


def test_why_pending_names_the_missing_resource():
    s = Sched(W1)
    submit(s, C1, [spec("g", resources={"GPU": 1})], ["g"])
    assert s.state.why_pending("g") == "needs GPU=1; no worker offers GPU"
    s(W2, reg(W2, resources={"GPU": 1}))
    assert s.state.why_pending("g") == f"running (or queued) on {W2}"
    s2 = Sched()
    s2(W1, reg(W1, resources={"GPU": 1}))
    s2(W2, reg(W2, resources={"MEM": 8}))
    submit(s2, C1, [spec("g", resources={"GPU": 1, "MEM": 8})], ["g"])
    assert s2.state.why_pending("g") == "needs GPU=1, MEM=8; no single worker offers all of it"
    assert s2.state.why_pending("nope") == "'nope' is not known to the scheduler"


def test_resources_and_restrictions_compose():
    s = Sched()
    s(W1, reg(W1, resources={"GPU": 1}))
    s(W2, reg(W2))
    s(W3, reg(W3, resources={"GPU": 1}))
    out = submit(s, C1, [spec("g", workers=[W1, W2], resources={"GPU": 1})], ["g"])
    assert out == {W1: [compute(ctask("g", resources={"GPU": 1}, send_result=True))]}


def test_plain_task_never_goes_to_a_worker_of_another_runtime():
    s = Sched()
    s(W1, reg(W1, runtime="rust"))
    assert submit(s, C1, [spec("a")], ["a"]) == {}
    assert s.states() == {"a": "no-worker"}
    assert s.state.why_pending("a") == "needs runtime 'python'; no worker runs it"
    assert s(W2, reg(W2)) == {W2: [compute(ctask("a", send_result=True))]}
    out = submit(s, C1, [spec("r", runtime="rust")], ["r"])
    assert out == {W1: [compute(ctask("r", send_result=True))]}


# ---------------------------------------------------------------------------------
# Stale and unexpected messages
# ---------------------------------------------------------------------------------
def test_stale_task_finished_is_ignored():
    s = Sched(W1, W2)
    submit(s, C1, [spec("a")], ["a"])
    # Wrong run id from the right worker: the worker is still running the current run.
    assert s(W1, finished("a", run_id=7)) == {}
    # Right run id from the wrong worker: that worker holds data nobody asked for.
    assert s(W2, finished("a", run_id=1)) == {W2: [FreeKeys(keys=["a"])]}
    assert s(W2, erred("a", run_id=1)) == {}
    assert s.states() == {"a": "processing"}
    assert s(W1, finished("a", run_id=1)) == {C1: [KeyInMemory(key="a", who_has=[W1], typename="int")]}
    # A duplicate report from the holder changes nothing.
    assert s(W1, finished("a", run_id=1)) == {}


def test_finish_of_a_freed_run_does_not_cancel_the_new_run_on_the_same_worker():
    """The worker finished run 1 before it read FreeKeys; run 2 is already assigned to it."""
    s = Sched(W1)
    submit(s, C1, [spec("a")], ["a"])
    assert s(C1, ReleaseKeys(keys=["a"])) == {W1: [FreeKeys(keys=["a"])]}
    assert submit(s, C1, [spec("a")], ["a"]) == {W1: [compute(ctask("a", send_result=True))]}
    # run_id restarts with the new record; make the old report distinguishable.
    s.tasks["a"].run_id = 2
    assert s(W1, finished("a", run_id=1)) == {}
    assert s.states() == {"a": "processing"}
    assert s(W1, finished("a", run_id=2)) == {C1: [KeyInMemory(key="a", who_has=[W1], typename="int")]}


def test_stale_add_keys_frees_the_copy():
    s = Sched(W1, W2)
    submit(s, C1, [spec("a")], ["a"])
    assert s(W2, AddKeys(nbytes={"a": 8, "gone": 1})) == {W2: [FreeKeys(keys=["a", "gone"])]}


def test_missing_data_with_other_holders_answers_their_locations():
    s = Sched(W1, W2, W3)
    submit(s, C1, [spec("a", workers=[W1]), spec("b", "a", workers=[W3])], ["b"])
    s(W1, finished("a"))
    s(W2, AddKeys(nbytes={"a": 8}))
    out = s(W3, MissingData(key="a", holder=W1))
    assert out == {W3: [UpdateWhoHas(who_has={"a": [W2]})]}
    assert {w.address for w in s.tasks["a"].who_has} == {W2}
    # A holder the scheduler never knew about changes nothing but still answers.
    assert s(W3, MissingData(key="a", holder=W4)) == {W3: [UpdateWhoHas(who_has={"a": [W2]})]}


def test_missing_data_of_the_only_holder_recomputes_and_takes_the_dependent_back():
    s = Sched(W1, W2)
    submit(s, C1, [spec("a", workers=[W1]), spec("b", "a", workers=[W2])], ["b"])
    s(W1, finished("a"))
    out = s(W2, MissingData(key="a", holder=W1))
    assert out == {W2: [FreeKeys(keys=["b"])], W1: [compute(ctask("a", run_id=2))]}
    assert s.states() == {"a": "processing", "b": "waiting"}
    out = s(W1, finished("a", run_id=2))
    assert out == {
        W2: [compute(ctask("b", run_id=2, who_has={"a": [W1]}, nbytes={"a": 8}, send_result=True))]
    }


def test_missing_data_for_a_forgotten_key_answers_no_holders():
    s = Sched(W1)
    assert s(W1, MissingData(key="zzz", holder=W2)) == {W1: [UpdateWhoHas(who_has={"zzz": []})]}


def test_unknown_dependency_errs_the_task_and_its_dependents():
    s = Sched(W1)
    out = submit(s, C1, [spec("b", "gone"), spec("c", "b"), spec("d")], ["b", "c", "d"])
    assert set(out) == {C1, W1}
    assert out[W1] == [compute(ctask("d", send_result=True))]
    errs = sorted(out[C1], key=lambda m: m.key)
    assert [(m.key, type(m), m.error.typename) for m in errs] == [
        ("b", KeyErred, "CancelledError"),
        ("c", KeyErred, "CancelledError"),
    ]
    assert "'gone'" in errs[0].error.message
    assert "b" not in s.tasks or s.tasks["b"].state == "erred"


def test_unknown_dependency_of_an_unwanted_intermediate_never_runs_it():
    s = Sched(W1)
    out = submit(s, C1, [spec("b", "gone"), spec("c", "b")], ["c"])
    assert set(out) == {C1}
    ((msg,),) = out.values()
    assert isinstance(msg, KeyErred) and msg.key == "c"
    assert msg.error.typename == "CancelledError"
    assert s.state.workers[W1].processing == set()
    # Nor does a later dependent of the same intermediate.
    out = submit(s, C2, [spec("e", "b")], ["e"])
    assert s.state.workers[W1].processing == set()
    s(C1, ClientLeft(C1))
    s(C2, ClientLeft(C2))
    assert s.tasks == {}


def test_illegal_transition_raises_with_key_and_states():
    s = Sched(W1)
    submit(s, C1, [spec("a")], ["a"])
    with pytest.raises(InvalidTransition, match=r"'a': processing -> forgotten"):
        s.state._move(s.tasks["a"], "forgotten")


def test_unknown_event_type_raises():
    s = Sched()
    with pytest.raises(TypeError, match="no handler for ErrorInfo"):
        s.state.handle(C1, [ErrorInfo(typename="x", message="y")])
