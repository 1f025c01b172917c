"""The pure scheduler state machine: exact messages out for events in, and properties.

The example tests feed protocol messages to :class:`SchedulerState` and assert
the exact messages it answers with (h11 style).  The property test drives it
with random graphs, clients and workers joining and leaving, and a simulated
execution loop, checking ``validate()`` after every stimulus and the
end-to-end promises at quiescence.

The property test is derandomized (the same examples every run).  To search
harder: ``CORRAL_STATE_EXAMPLES=3000`` (more examples) and
``CORRAL_STATE_RANDOM=1`` (fresh random examples each run).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule
from state_helpers import (
    ARGS,
    FN,
    W1,
    W2,
    W3,
    W4,
    Sched,
    compute,
    ctask,
    erred,
    error,
    finished,
    spec,
)
from state_helpers import register as reg

from corral.protocol.messages import (
    AddKeys,
    CancelKeys,
    Compute,
    ComputeTask,
    ErrorInfo,
    FreeKeys,
    KeyCancelled,
    KeyErred,
    KeyInMemory,
    KeyLost,
    MissingData,
    ReleaseKeys,
    Scatter,
    Store,
    TaskFinished,
    TaskSpec,
    UpdateGraph,
    UpdateWhoHas,
)
from corral.protocol.serialize import Payload
from corral.scheduler.placement import plan_runs
from corral.scheduler.state import (
    ClientJoined,
    ClientLeft,
    InvalidTransition,
    SchedulerState,
    WorkerInfo,
    WorkerLeft,
)

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
    assert out == {W1: [compute(ctask("b", run_id=2, who_has={"a": [W1]}, nbytes={"a": 100}))]}

    out = s(W1, finished("b", run_id=2, nbytes=50))
    # b's dependent is placed; a is no longer needed by anyone: freed.
    assert out == {
        W1: [
            FreeKeys(keys=["a"]),
            compute(ctask("c", run_id=3, who_has={"b": [W1]}, nbytes={"b": 50}, send_result=True)),
        ]
    }
    assert s.states() == {"a": "released", "b": "memory", "c": "processing"}

    result = Payload("pickle", [b"42"])
    out = s(W1, TaskFinished(key="c", run_id=3, nbytes=8, typename="int", result=result))
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


def part(s: Sched, client: str, tasks, wanted=(), hold="g1", more=True):
    msg = UpdateGraph(tasks=list(tasks), wanted=list(wanted), hold=hold, more=more)
    return s(client, msg)


def test_a_graph_in_parts_runs_its_first_part_at_once_and_frees_only_at_the_end():
    s = Sched(W1)
    s(C1, ClientJoined(C1))
    # Part 1: inputs nobody wants yet are computed, not forgotten.
    out = part(s, C1, [spec("a"), spec("b")])
    assert s.states() == {"a": "processing", "b": "processing"}
    assert [t.key for t in out[W1][0].tasks] == ["a", "b"]
    s(W1, finished("a", run_id=1))
    s(W1, finished("b", run_id=2))
    assert s.states() == {"a": "memory", "b": "memory"}  # kept for the parts to come
    # Part 2 uses them; "c" is not wanted either, but held.
    part(s, C1, [spec("c", "a", "b"), spec("x")])
    assert s.states()["c"] == "processing"
    s(W1, finished("x", run_id=4))
    out = s(W1, finished("c", run_id=3))
    assert s.states() == {"a": "memory", "b": "memory", "c": "memory", "x": "memory"}
    assert W1 not in out  # nothing freed while the graph is still arriving
    # The last part says what is wanted; everything else is released then.
    out = part(s, C1, [spec("d", "c")], wanted=["d"], more=False)
    # a and b keep their records as c's lineage; x, needed by nothing, is gone.
    assert s.states() == {"a": "released", "b": "released", "c": "memory", "d": "processing"}
    assert sorted(out[W1][0].keys) == ["a", "b", "x"]  # FreeKeys first, then compute
    s(W1, finished("d", run_id=5))
    assert s.states() == {"a": "released", "b": "released", "c": "released", "d": "memory"}
    assert s.state._holds == {}
    s(C1, ReleaseKeys(keys=["d"]))
    assert s.tasks == {}


def test_held_parts_are_released_when_their_client_leaves():
    s = Sched(W1)
    s(C1, ClientJoined(C1))
    part(s, C1, [spec("a"), spec("b", "a")])
    s(W1, finished("a", run_id=1))
    assert s.states() == {"a": "memory", "b": "processing"}
    s(C1, ClientLeft(C1))
    assert s.tasks == {}
    assert s.state._holds == {}


def test_parts_of_two_graphs_of_one_client_are_held_apart():
    s = Sched(W1)
    s(C1, ClientJoined(C1))
    part(s, C1, [spec("a")], hold="g1")
    part(s, C1, [spec("b")], hold="g2")
    part(s, C1, [], hold="g2", more=False)  # g2 ends wanting nothing: b goes
    assert set(s.tasks) == {"a"}
    part(s, C1, [spec("c", "a")], wanted=["c"], hold="g1", more=False)
    assert s.states() == {"a": "processing", "c": "waiting"}


def test_independent_tasks_spread_over_workers_and_functions_travel_once():
    s = Sched(W1, W2)
    tasks = [spec(f"inc-{i}", fn="f1") for i in range(4)]
    out = submit(s, C1, tasks, [t.key for t in tasks], functions={"f1": FN})
    # Half each, in runs of neighbours (priority order), one batch per worker.
    assert out == {
        W1: [
            compute(
                ctask("inc-0", run_id=1, fn="f1", send_result=True),
                ctask("inc-1", run_id=2, fn="f1", send_result=True),
                functions={"f1": FN},
            )
        ],
        W2: [
            compute(
                ctask("inc-2", run_id=3, fn="f1", send_result=True),
                ctask("inc-3", run_id=4, fn="f1", send_result=True),
                functions={"f1": FN},
            )
        ],
    }
    for i in range(4):
        s(W1 if i < 2 else W2, finished(f"inc-{i}", run_id=i + 1))
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
        assert out == {
            W1: [compute(ctask("x", run_id=1, priority=[0]))],
            W2: [compute(ctask("y", run_id=2, priority=[1]))],
        }
        assert s(W1, finished("x", run_id=1, nbytes=nbytes["x"])) == {}
        out = s(W2, finished("y", run_id=2, nbytes=nbytes["y"]))
        assert out == {
            big_on: [
                compute(
                    ctask(
                        "z",
                        run_id=3,
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
        W2: [
            compute(ctask("z", run_id=12, who_has={"x": [W1]}, nbytes={"x": 10}, send_result=True))
        ]
    }


def test_free_tasks_go_to_workers_in_runs_of_neighbours():
    """Roots next to each other in priority order share a worker, so their dependents fetch nothing.

    As ``dask.order`` orders ``x + x.T``: each pair of roots feeding one
    dependent is adjacent.  Dealt out one by one, every pair would be split.
    """
    s = Sched(W1, W2)
    pairs = [("a", "b"), ("c", "d"), ("e", "f"), ("g", "h")]
    tasks = []
    for i, (x, y) in enumerate(pairs):
        tasks += [spec(x, priority=[3 * i]), spec(y, priority=[3 * i + 1])]
        tasks.append(spec(f"sum-{x}{y}", x, y, priority=[3 * i + 2]))
    out = submit(s, C1, tasks, [f"sum-{x}{y}" for x, y in pairs])
    assert [t.key for t in out[W1][0].tasks] == ["a", "b", "c", "d"]
    assert [t.key for t in out[W2][0].tasks] == ["e", "f", "g", "h"]
    for x, y in pairs:
        holder = s.tasks[x].processing_on
        assert holder is not None
        for key in (x, y):
            s(holder.address, finished(key, run_id=s.tasks[key].run_id, nbytes=8_000_000))
        dependent = s.tasks[f"sum-{x}{y}"]
        assert dependent.processing_on is holder  # both inputs there: nothing to move


def test_free_tasks_fill_the_emptier_worker_first():
    """A batch of free tasks levels the queues: the busy worker gets only what overflows."""
    s = Sched(W1, W2)
    busy = [spec(f"busy-{i}", workers=[W1]) for i in range(4)]
    submit(s, C1, busy, [t.key for t in busy])  # 4 x 0.5 s estimated on W1
    keys = [f"x-{i}" for i in range(6)]
    out = submit(s, C1, [spec(k, priority=[i]) for i, k in enumerate(keys)], keys)
    # 2 s queued on W1, 3 s of new work: the level is 2.5 s, W2 takes 5, W1 one.
    assert [t.key for t in out[W2][0].tasks] == keys[:5]
    assert [t.key for t in out[W1][0].tasks] == keys[5:]


def test_plan_runs_weighs_threads_and_counts_tasks_of_unknown_cost():
    w1 = WorkerInfo(reg(W1, nthreads=3))
    w2 = WorkerInfo(reg(W2, nthreads=1))
    js = WorkerInfo(reg(W3, runtime="js"))
    workers = {W1: w1, W2: w2, W3: js}
    # Shares follow threads: 3 of every 4 tasks to W1, in one run; none to a JS worker.
    assert plan_runs([1.0] * 8, workers) == [w1] * 6 + [w2] * 2
    # Durations all zero (tasks too quick to measure): tasks are counted instead.
    assert plan_runs([0.0] * 4, workers) == [w1] * 3 + [w2]
    # One task: the least loaded worker, as choose_worker would pick.
    w1.occupancy = 6.0
    assert plan_runs([1.0], workers) == [w2]
    assert plan_runs([1.0], {W3: js}) is None


def test_placement_stops_pricing_by_a_stale_duration_estimate():
    """Queued work is re-priced when a prefix turns out much faster than assumed.

    Before any ``slow`` task finished, each counts 0.5 s (the default).  Once
    one finished in 10 ms, the queued ones count about that too, so a
    dependent with a large input on W1 stays with it instead of moving to an
    emptier W2 whose queue difference only looked longer than the transfer.
    """
    s = Sched(W1, W2)
    roots = [spec(f"slow-{i}", priority=[i]) for i in range(8)]
    submit(s, C1, roots, [t.key for t in roots])
    w1, w2 = s.state.workers[W1], s.state.workers[W2]
    assert w1.occupancy == w2.occupancy == 2.0
    done = finished("slow-0", run_id=s.tasks["slow-0"].run_id, nbytes=50_000_000)
    s(W1, dataclasses.replace(done, start=1.0, stop=1.01))
    assert w1.occupancy == pytest.approx(3 * 0.01)
    assert w2.occupancy == pytest.approx(4 * 0.01)
    out = submit(s, C1, [spec("big", "slow-0")], ["big"])
    assert list(out) == [W1]


def test_shared_input_is_freed_only_after_its_last_dependent():
    s = Sched(W1)
    submit(s, C1, [spec("a"), spec("b", "a"), spec("c", "a")], ["b", "c"])
    out = s(W1, finished("a"))
    ((batch,),) = out.values()
    run = {t.key: t.run_id for t in batch.tasks}
    assert sorted(run) == ["b", "c"]
    assert s(W1, finished("b", run["b"])) == {
        C1: [KeyInMemory(key="b", who_has=[W1], typename="int")]
    }
    assert s(W1, finished("c", run["c"])) == {
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
    s(W1, finished("a", run_id=1))
    s(W1, finished("b", run_id=2))
    assert s.states() == {"a": "released", "b": "memory"}
    # A new task needs a again: its record is still there, so it is recomputed.
    out = submit(s, C1, [spec("c", "a")], ["c"])
    assert out == {W1: [compute(ctask("a", run_id=3))]}
    out = s(W1, finished("a", run_id=3))
    assert out == {
        W1: [compute(ctask("c", run_id=4, who_has={"a": [W1]}, nbytes={"a": 8}, send_result=True))]
    }


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
    assert s(W1, finished("a", run_id=2)) == {
        C1: [KeyInMemory(key="a", who_has=[W1], typename="int")]
    }


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
    assert out == {W2: [compute(ctask("a", run_id=3))]}
    assert s.states() == {"a": "processing", "b": "waiting"}
    assert s.tasks["b"].suspicious == 1
    out = s(W2, finished("a", run_id=3, nbytes=100))
    assert out == {
        W2: [
            compute(ctask("b", run_id=4, who_has={"a": [W2]}, nbytes={"a": 100}, send_result=True))
        ]
    }
    assert s(W2, finished("b", run_id=4)) == {
        C1: [KeyInMemory(key="b", who_has=[W2], typename="int")],
        W2: [FreeKeys(keys=["a"])],
    }
    assert [t[1:3] for t in s.state.story("a")][3:6] == [
        ("memory", "released"),
        ("released", "waiting"),
        ("waiting", "processing"),
    ]


def test_lost_wanted_key_is_announced_then_reported_again():
    s = Sched(W1, W2)
    submit(s, C1, [spec("a", workers=[W1], allow_other_workers=True)], ["a"])
    s(W1, finished("a"))
    out = s(W1, WorkerLeft(W1))
    assert out == {C1: [KeyLost(key="a")], W2: [compute(ctask("a", run_id=2, send_result=True))]}
    assert s(W2, finished("a", run_id=2)) == {
        C1: [KeyInMemory(key="a", who_has=[W2], typename="int")]
    }


def test_worker_loss_recomputes_a_released_input_from_lineage():
    s = Sched(W1, W2)
    submit(s, C1, [spec("a", workers=[W1]), spec("b", "a", workers=[W1]), spec("c", "b")], ["c"])
    s(W1, finished("a", run_id=1))
    s(W1, finished("b", run_id=2))
    assert s.states() == {"a": "released", "b": "memory", "c": "processing"}
    s(W1, WorkerLeft(W1))
    assert s.states() == {"a": "no-worker", "b": "waiting", "c": "waiting"}
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


def test_killed_worker_frees_inputs_on_the_workers_left_only():
    s = Sched(W1, W2, allowed_failures=1)
    submit(s, C1, [spec("a", workers=[W1]), spec("b", "a", workers=[W1])], ["b"])
    s(W1, finished("a"))
    s(W2, AddKeys(nbytes={"a": 8}))
    out = s(W1, WorkerLeft(W1))
    # b failed; a, needed by nobody now, is freed on W2 and nothing goes to W1.
    assert set(out) == {C1, W2}
    assert out[W2] == [FreeKeys(keys=["a"])]
    assert [m.error.typename for m in out[C1]] == ["KilledWorker"]


def test_killed_worker_releasing_a_sibling_queued_on_the_same_worker_sends_it_nothing():
    """x and y run on W1, only for d; W1 dies: the first to fail releases the other.

    The other was still queued on W1: nothing may be sent to W1 (it is gone), and
    the released task is neither failed nor placed again.
    """
    s = Sched(W1, allowed_failures=1)
    submit(s, C1, [spec("x"), spec("y"), spec("d", "x", "y")], ["d"])
    assert s.states() == {"x": "processing", "y": "processing", "d": "waiting"}
    out = s(W1, WorkerLeft(W1))
    assert set(out) == {C1}
    ((msg,),) = out.values()
    assert msg.key == "d" and msg.error.typename == "KilledWorker"
    # Nobody needs x or y any more: neither runs again (nor is failed twice).
    assert s.states() == {"x": "released", "y": "released", "d": "erred"}
    s(C1, ReleaseKeys(keys=["d"]))
    assert s.tasks == {}


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
    # Each scattered value has a version of its own; workers learn it with the value.
    assert out == {W1: [Store(data={"x": data}, versions={"x": 1})]}
    out = s(C1, Scatter(id=2, data={"y": data}, nbytes={"y": 10}))
    assert out == {W2: [Store(data={"y": data}, versions={"y": 2})]}
    assert s.states() == {"x": "memory", "y": "memory"}
    out = submit(s, C1, [spec("z", "x")], ["z"])
    # A task using it names the version it expects.
    z = ctask("z", who_has={"x": [W1]}, nbytes={"x": 10}, versions={"x": 1}, send_result=True)
    assert out == {W1: [compute(z)]}


def test_scatter_broadcast_stores_everywhere():
    s = Sched(W1, W2)
    data = Payload("pickle", [b"x"])
    out = s(C1, Scatter(id=1, data={"x": data}, nbytes={"x": 1}, broadcast=True))
    stored = Store(data={"x": data}, versions={"x": 1})
    assert out == {W1: [stored], W2: [stored]}
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


def test_scatter_over_a_pending_key_wakes_its_dependents():
    for pending in ("processing", "no-worker"):
        s = Sched(W1)
        restrict = [W1] if pending == "processing" else [W2]
        submit(s, C1, [spec("a", workers=restrict), spec("b", "a")], ["b"])
        assert s.states() == {"a": pending, "b": "waiting"}
        out = s(C1, Scatter(id=1, data={"a": ARGS}, nbytes={"a": 10}))
        expected = [
            Store(data={"a": ARGS}, versions={"a": 1}),
            compute(
                ctask(
                    "b",
                    run_id=2 if pending == "processing" else 1,
                    who_has={"a": [W1]},
                    nbytes={"a": 10},
                    versions={"a": 1},
                    send_result=True,
                )
            ),
        ]
        if pending == "processing":
            expected.insert(0, FreeKeys(keys=["a"]))
        assert out == {W1: expected}
        assert s.states() == {"a": "memory", "b": "processing"}


def test_worker_holding_two_scattered_inputs_of_a_task_leaves():
    """Losing the first fails the task, which releases the second mid-way."""
    s = Sched(W1)
    s(C1, Scatter(id=1, data={"x": ARGS, "y": ARGS}, nbytes={"x": 1, "y": 1}))
    submit(s, C1, [spec("d", "x", "y")], ["d"])
    s(C1, ReleaseKeys(keys=["x", "y"]))
    assert s.states() == {"x": "memory", "y": "memory", "d": "processing"}
    out = s(W1, WorkerLeft(W1))
    assert set(out) == {C1}
    ((msg,),) = out.values()
    assert msg.key == "d" and msg.error.typename == "LostDataError"
    assert s.states() == {"x": "released", "y": "released", "d": "erred"}
    s(C1, ReleaseKeys(keys=["d"]))
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
    assert out == {W2: [compute(ctask("b", run_id=2, send_result=True))]}


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
    assert out == {W1: [compute(ctask("r", run_id=2, send_result=True))]}


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
    assert s(W1, finished("a", run_id=1)) == {
        C1: [KeyInMemory(key="a", who_has=[W1], typename="int")]
    }
    # A duplicate report from the holder changes nothing.
    assert s(W1, finished("a", run_id=1)) == {}


def test_finish_of_a_freed_run_does_not_cancel_the_new_run_on_the_same_worker():
    """The worker finished run 1 before it read FreeKeys; run 2 is already assigned to it."""
    s = Sched(W1)
    submit(s, C1, [spec("a")], ["a"])
    assert s(C1, ReleaseKeys(keys=["a"])) == {W1: [FreeKeys(keys=["a"])]}
    assert submit(s, C1, [spec("a")], ["a"]) == {
        W1: [compute(ctask("a", run_id=2, send_result=True))]
    }
    # The late report of run 1 is neither taken for run 2 nor answered with FreeKeys.
    assert s(W1, finished("a", run_id=1)) == {}
    assert s.states() == {"a": "processing"}
    assert s(W1, finished("a", run_id=2)) == {
        C1: [KeyInMemory(key="a", who_has=[W1], typename="int")]
    }


def test_stale_add_keys_frees_the_copy():
    s = Sched(W1, W2)
    submit(s, C1, [spec("a")], ["a"])
    assert s(W2, AddKeys(nbytes={"a": 8, "gone": 1})) == {W2: [FreeKeys(keys=["a", "gone"])]}


def test_a_copy_of_a_value_scattered_over_since_is_not_taken_for_the_new_one():
    """W1 copies s1, C1 scatters over s1 twice, then W1's AddKeys of its copy arrives.

    Without versions the scheduler took the old copy for the new value: W1
    would be sent tasks expecting the new s1 and use the old one (here it even
    dropped its copy meanwhile, told to by the second scatter).
    """
    s = Sched(W2)
    assert s(C1, Scatter(id=1, data={"s1": ARGS}, nbytes={"s1": 10})) == {
        W2: [Store(data={"s1": ARGS}, versions={"s1": 1})]
    }
    s(W1, reg(W1))
    # W1 fetches s1 (version 1) from W2; its AddKeys is on its way while C1
    # scatters over s1, once to W1, once to W2.
    new = Payload("pickle", [b"new"])
    assert s(C1, Scatter(id=2, data={"s1": new}, nbytes={"s1": 10}, workers=[W1])) == {
        W2: [FreeKeys(keys=["s1"])],
        W1: [Store(data={"s1": new}, versions={"s1": 2})],
    }
    newer = Payload("pickle", [b"newer"])
    assert s(C1, Scatter(id=3, data={"s1": newer}, nbytes={"s1": 10}, workers=[W2])) == {
        W1: [FreeKeys(keys=["s1"])],
        W2: [Store(data={"s1": newer}, versions={"s1": 3})],
    }
    # W1 reports the copy of version 1: not a copy of s1 now.  It learns where
    # the current value is, and drops its copy.
    out = s(W1, AddKeys(nbytes={"s1": 10}, versions={"s1": 1}))
    assert out == {W1: [UpdateWhoHas(who_has={"s1": [W2]}, versions={"s1": 3})]}
    assert s.state.who_has(["s1"]) == {"s1": [W2]}
    # A task on s1 names the version it needs, so no older copy is used for it.
    out = submit(s, C1, [spec("t", "s1", workers=[W1])], ["t"])
    t = ctask("t", who_has={"s1": [W2]}, nbytes={"s1": 10}, versions={"s1": 3}, send_result=True)
    assert out == {W1: [compute(t)]}
    # A copy of the current value is taken.
    assert s(W1, AddKeys(nbytes={"s1": 10}, versions={"s1": 3})) == {}
    assert sorted(s.state.who_has(["s1"])["s1"]) == [W1, W2]


def test_a_stale_copy_reported_by_a_holder_of_the_current_value_is_ignored():
    """The old copy's AddKeys crossed the Store of the new value to the same worker."""
    s = Sched(W1, W2)
    s(C1, Scatter(id=1, data={"x": ARGS}, nbytes={"x": 10}, workers=[W1]))
    s(C1, Scatter(id=2, data={"x": ARGS}, nbytes={"x": 10}, workers=[W2]))
    # W2 fetched x (version 1) before it was stored there (version 2).
    assert s(W2, AddKeys(nbytes={"x": 10}, versions={"x": 1})) == {}
    assert s.state.who_has(["x"]) == {"x": [W2]}


def test_a_copy_of_a_computed_value_matches_any_run_and_not_scattered_data():
    s = Sched(W1, W2)
    submit(s, C1, [spec("a", workers=[W1])], ["a"])
    s(W1, finished("a"))
    # Every run of a key computes the same value: version 0, left out.
    assert s(W2, AddKeys(nbytes={"a": 8}, versions={})) == {}
    assert sorted(s.state.who_has(["a"])["a"]) == [W1, W2]
    # Scattered over: a copy of the computed value is not one of the new value.
    s(C1, Scatter(id=1, data={"a": ARGS}, nbytes={"a": 10}, workers=[W1]))
    assert s(W2, AddKeys(nbytes={"a": 8}, versions={})) == {
        W2: [UpdateWhoHas(who_has={"a": [W1]}, versions={"a": 1})]
    }


def test_add_keys_without_versions_is_taken_as_it_is():
    """Workers that do not track versions (older ones, or another language's)."""
    s = Sched(W1, W2)
    s(C1, Scatter(id=1, data={"x": ARGS}, nbytes={"x": 10}, workers=[W1]))
    assert s(W2, AddKeys(nbytes={"x": 10})) == {}
    assert sorted(s.state.who_has(["x"])["x"]) == [W1, W2]


def test_add_keys_of_a_key_running_on_that_worker_does_not_cancel_it():
    """A copy reported after the key was lost and assigned to the same worker."""
    s = Sched(W1, W2)
    submit(s, C1, [spec("a", workers=[W2], allow_other_workers=True)], ["a"])
    s(W2, finished("a"))
    # W1 fetched a copy; before its AddKeys arrives, W2 leaves: a runs again, on W1.
    out = s(W2, WorkerLeft(W2))
    assert out == {C1: [KeyLost(key="a")], W1: [compute(ctask("a", run_id=2, send_result=True))]}
    # The copy is not freed: that would cancel the run (the worker reports the copy
    # it holds as the run's result).
    assert s(W1, AddKeys(nbytes={"a": 8}, versions={})) == {}
    assert s.states() == {"a": "processing"}


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
    assert out == {W2: [FreeKeys(keys=["b"])], W1: [compute(ctask("a", run_id=3))]}
    assert s.states() == {"a": "processing", "b": "waiting"}
    out = s(W1, finished("a", run_id=3))
    assert out == {
        W2: [compute(ctask("b", run_id=4, who_has={"a": [W1]}, nbytes={"a": 8}, send_result=True))]
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


# ---------------------------------------------------------------------------------
# Property test: random graphs, clients and workers, with a simulated execution loop
# ---------------------------------------------------------------------------------
POOL = (W1, W2, W3, W4)
CLIENTS = (C1, C2)
OFFERS = ({}, {"GPU": 1}, {"GPU": 2, "MEM": 0.5})
FULL = {"GPU": 2, "MEM": 1}
DEMANDS = (None, None, None, {"GPU": 1}, {"GPU": 2}, {"MEM": 0.5}, {"GPU": 0.5, "MEM": 0.25})
FUNCTIONS = {"f0": Payload("pickle", [b"f0"]), "f1": Payload("pickle", [b"f1"])}


class SimWorker:
    """What a worker really runs and holds, as the scheduler's messages leave it."""

    def __init__(self, address: str, resources: dict) -> None:
        self.address = address
        self.resources = resources
        self.running: dict[str, ComputeTask] = {}
        # key -> the version of the value held, as the worker knows it (0: computed).
        self.held: dict[str, int] = {}
        # Copies fetched, not yet told with AddKeys (or told, the message still on
        # its way), with the version each is of.
        self.unreported: list[tuple[str, int]] = []


class SchedulerMachine(RuleBasedStateMachine):
    """Clients submit random graphs, workers come and go and run what they are given.

    After every stimulus: ``validate()``, and the scheduler's view matches what
    the simulated workers really run and hold.  At the end every wanted key is
    settled and, once the clients let go, nothing is left anywhere.
    """

    def __init__(self) -> None:
        super().__init__()
        self.s = SchedulerState(allowed_failures=2)
        self.sim: dict[str, SimWorker] = {}
        self.wanted: dict[str, set[str]] = {c: set() for c in CLIENTS}
        self.last: dict[str, dict[str, Any]] = {c: {} for c in CLIENTS}
        self.specs: dict[str, TaskSpec] = {}
        self.counter = 0
        self.scatter_id = 0
        # Graphs a client is still sending in parts (UpdateGraph.hold with more).
        self.open_holds: dict[str, set[str]] = {c: set() for c in CLIENTS}
        # Runs that finished on a worker before it read the FreeKeys that ended them.
        self.stale: list[tuple[str, str, int]] = []

    # -- driving --------------------------------------------------------------------
    def handle(self, source: str, *events: Any) -> None:
        out = self.s.handle(source, events)
        self.s.validate()
        # Locations named in this batch (key, address, version of the value there),
        # checked once every worker got its messages.
        self.claims: list[tuple[str, str, int]] = []
        for recipient, msgs in out.items():
            if recipient not in CLIENTS:
                assert recipient in self.sim, f"message to a worker not connected: {recipient}"
                for m in msgs:
                    self.to_worker(self.sim[recipient], m)
        for recipient, msgs in out.items():
            if recipient in CLIENTS:
                for m in msgs:
                    self.to_client(recipient, m)
        for key, address, version in self.claims:
            assert key in self.sim[address].held, f"{address} said to hold {key}"
            held = self.sim[address].held[key]
            assert held == version, f"{address} said to hold {key} v{version}, holds v{held}"
        self.check_views()

    def to_client(self, client: str, m: Any) -> None:
        # KeyLost: it was in memory, every copy is gone, it is being computed again.
        assert isinstance(m, KeyInMemory | KeyErred | KeyCancelled | KeyLost), m
        assert m.key in self.wanted[client], (client, m)
        self.last[client][m.key] = m
        if isinstance(m, KeyInMemory):
            assert m.who_has
            version = self.s.tasks[m.key].version
            self.claims.extend((m.key, address, version) for address in m.who_has)

    def to_worker(self, w: SimWorker, m: Any) -> None:
        if isinstance(m, Compute):
            for t in m.tasks:
                assert t.key not in w.running, f"{t.key} assigned twice to {w.address}"
                if t.fn is not None:
                    assert m.functions[t.fn] == FUNCTIONS[t.fn]
                for name, amount in (t.resources or {}).items():
                    assert w.resources.get(name, 0) >= amount, (t, w.resources)
                ts_spec = self.specs.get(t.key)
                assert ts_spec is not None, f"{t.key} was never submitted"
                # Every input of the task, each with a holder that really has it.
                assert sorted(t.who_has) == sorted(ts_spec.deps), (t, ts_spec)
                if ts_spec.workers and not ts_spec.allow_other_workers:
                    assert w.address in ts_spec.workers
                versions = t.versions or {}
                for dep, holders in t.who_has.items():
                    assert holders, f"{t.key} sent without a holder of {dep}"
                    version = versions.get(dep, 0)
                    self.claims.extend((dep, h, version) for h in holders)
                    if w.held.get(dep, version) != version:
                        del w.held[dep]  # a copy of another value: fetched again
                w.running[t.key] = t
        elif isinstance(m, FreeKeys):
            for key in m.keys:
                t = w.running.pop(key, None)
                if t is not None:
                    self.stale.append((w.address, key, t.run_id))
                w.held.pop(key, None)
        elif isinstance(m, Store):
            assert m.versions is not None and m.versions.keys() == m.data.keys(), m
            w.held.update(m.versions)
        else:
            assert isinstance(m, UpdateWhoHas), m
            versions = m.versions or {}
            for key, holders in m.who_has.items():
                version = versions.get(key, 0)
                self.claims.extend((key, h, version) for h in holders)
                # A copy of another value of the key is dropped (the worker fetches
                # the current one when a task needs it: see run_one).
                if key in w.held and w.held[key] != version:
                    del w.held[key]
                # Tasks waiting for it fetch from these holders now.
                for k, t in w.running.items():
                    if key in t.who_has:
                        w.running[k] = dataclasses.replace(
                            t,
                            who_has={**t.who_has, key: holders},
                            versions={**(t.versions or {}), key: version},
                        )

    def check_views(self) -> None:
        assert set(self.s.workers) == set(self.sim)
        for address, ws in self.s.workers.items():
            w = self.sim[address]
            assert {ts.key: ts.run_id for ts in ws.processing} == {
                k: t.run_id for k, t in w.running.items()
            }
            held = {ts.key for ts in ws.has_what}
            assert held <= set(w.held), f"{address} said to hold {held - set(w.held)}"
            for ts in ws.has_what:
                assert w.held[ts.key] == ts.version, (address, ts, w.held[ts.key], ts.version)
            assert ws.nbytes == sum(ts.nbytes for ts in ws.has_what), address

    def fresh_key(self, prefix: str = "t") -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    # -- workers --------------------------------------------------------------------
    def join(self, address: str, resources: dict, nthreads: int = 1) -> None:
        self.sim[address] = SimWorker(address, dict(resources))
        self.handle(address, reg(address, nthreads=nthreads, resources=dict(resources)))

    def leave(self, address: str, expected: bool) -> None:
        del self.sim[address]
        self.stale = [s for s in self.stale if s[0] != address]
        self.handle(address, WorkerLeft(address, expected=expected))

    @rule(address=st.sampled_from(POOL), offer=st.sampled_from(OFFERS), nthreads=st.integers(1, 2))
    def worker_joins(self, address, offer, nthreads):
        if address not in self.sim:
            self.join(address, offer, nthreads)

    @rule(address=st.sampled_from(POOL), expected=st.booleans())
    def worker_leaves(self, address, expected):
        if address in self.sim:
            self.leave(address, expected)

    def run_one(self, w: SimWorker, key: str, ok: bool, nbytes: int, duration: float = 0.0) -> None:
        """``w`` fetches the inputs of ``key`` from their holders, then runs it."""
        t = w.running[key]
        versions = t.versions or {}
        fetched = {}
        for dep, holders in t.who_has.items():
            if dep in w.held:
                continue
            live = [h for h in holders if h in self.sim and dep in self.sim[h].held]
            if not live:
                gone = holders[0] if holders else ""
                self.handle(w.address, MissingData(key=dep, holder=gone))
                return
            # The worker takes what the holder has for the version it was told.
            # Named since the last scatter over the key, that is exactly it.
            version = versions.get(dep, 0)
            current = self.s.tasks.get(dep)
            if current is not None and current.state == "memory" and current.version == version:
                assert self.sim[live[0]].held[dep] == version, (t, dep, live[0])
            fetched[dep] = version
        del w.running[key]
        w.held.update(fetched)
        events: list[Any] = []
        if fetched:
            copies = {k: t.nbytes.get(k, 0) for k in fetched}
            events.append(AddKeys(nbytes=copies, versions={k: v for k, v in fetched.items() if v}))
        if ok:
            w.held[key] = 0  # its computed value
            done = finished(key, t.run_id, nbytes=nbytes)
            events.append(dataclasses.replace(done, start=100.0, stop=100.0 + duration))
        else:
            events.append(erred(key, t.run_id, err=error("ValueError", key)))
        self.handle(w.address, *events)

    @precondition(lambda self: any(w.running for w in self.sim.values()))
    @rule(data=st.data(), ok=st.sampled_from([True, True, True, False]))
    def worker_runs_a_task(self, data, ok):
        busy = sorted(a for a, w in self.sim.items() if w.running)
        w = self.sim[data.draw(st.sampled_from(busy))]
        key = data.draw(st.sampled_from(sorted(w.running)))
        nbytes = data.draw(st.sampled_from([1, 100, 10**9]))
        # Durations far from the estimates too: occupancies get corrected.
        self.run_one(w, key, ok, nbytes, data.draw(st.sampled_from([0.0, 0.001, 0.5, 30.0])))

    @precondition(lambda self: self.stale)
    @rule(data=st.data(), ok=st.booleans())
    def late_report_of_a_freed_run(self, data, ok):
        address, key, run_id = entry = data.draw(st.sampled_from(sorted(self.stale)))
        self.stale.remove(entry)
        if ok:
            # The worker dropped the result when it read FreeKeys.
            self.handle(address, finished(key, run_id))
        else:
            self.handle(address, erred(key, run_id))

    @precondition(lambda self: len(self.sim) > 1 and any(w.held for w in self.sim.values()))
    @rule(data=st.data())
    def worker_fetches_a_copy(self, data):
        """A copy made for some reason of the worker's own; reported later with AddKeys."""
        held = sorted({k for w in self.sim.values() for k in w.held})
        key = data.draw(st.sampled_from(held))
        source = data.draw(st.sampled_from(sorted(a for a, w in self.sim.items() if key in w.held)))
        w = self.sim[data.draw(st.sampled_from(sorted(self.sim)))]
        if key not in w.held:
            version = self.sim[source].held[key]
            w.held[key] = version
            w.unreported.append((key, version))

    def report_copies(self, w: SimWorker) -> None:
        """One AddKeys per copy, with its version: a key may have been copied twice."""
        copies, w.unreported = w.unreported, []
        reports = [AddKeys(nbytes={k: 10}, versions={k: v} if v else {}) for k, v in copies]
        self.handle(w.address, *reports)

    @precondition(lambda self: any(w.unreported for w in self.sim.values()))
    @rule(data=st.data())
    def worker_reports_its_copies(self, data):
        """Stale if the key was released (or lost and recomputed) meanwhile."""
        self.report_copies(
            self.sim[
                data.draw(st.sampled_from(sorted(a for a, w in self.sim.items() if w.unreported)))
            ]
        )

    @precondition(lambda self: any(w.held for w in self.sim.values()))
    @rule(data=st.data())
    def holder_loses_a_replica(self, data):
        """A holder lost a key (say it restarted its store); a peer reports MissingData."""
        holding = sorted(a for a, w in self.sim.items() if w.held)
        w = self.sim[data.draw(st.sampled_from(holding))]
        key = data.draw(st.sampled_from(sorted(w.held)))
        del w.held[key]
        w.unreported = [(k, v) for k, v in w.unreported if k != key]
        reporter = data.draw(st.sampled_from(sorted(self.sim)))
        self.handle(reporter, MissingData(key=key, holder=w.address))

    # -- clients --------------------------------------------------------------------
    @rule(client=st.sampled_from(CLIENTS), data=st.data())
    def client_submits(self, client, data):
        batch: list[TaskSpec] = []
        older = sorted(self.specs) + sorted(k for k in self.s.tasks if k not in self.specs)
        for _ in range(data.draw(st.integers(1, 5), label="ntasks")):
            if older and data.draw(st.integers(0, 3)) == 0:
                # The same key again (known, or forgotten since): the earlier spec.
                key = data.draw(st.sampled_from(older))
                if key in self.specs:
                    batch.append(self.specs[key])
                continue
            key = self.fresh_key()
            candidates = [t.key for t in batch] + older[-8:]
            if candidates:
                deps = data.draw(st.lists(st.sampled_from(candidates), max_size=3, unique=True))
            else:
                deps = data.draw(st.sampled_from([[]] * 9 + [["never-submitted"]]))
            restrict = data.draw(st.sampled_from([None] * 6 + [[a] for a in POOL]))
            ts = spec(
                key,
                *deps,
                fn=data.draw(st.sampled_from([None, "f0", "f1"])),
                priority=[self.counter],
                resources=data.draw(st.sampled_from(DEMANDS)),
                workers=restrict,
                allow_other_workers=bool(restrict) and data.draw(st.booleans()),
                retries=data.draw(st.sampled_from([0, 0, 1])),
            )
            self.specs[key] = ts
            batch.append(ts)
        keys = [t.key for t in batch] + older[-4:]
        wanted = data.draw(st.lists(st.sampled_from(keys), min_size=1, unique=True)) if keys else []
        fns = {t.fn for t in batch if t.fn is not None}
        self.wanted[client].update(wanted)
        # Sometimes a part of a graph sent in parts: held until its last part.
        hold = data.draw(st.sampled_from([None, None, None, "g1", "g2"]), label="hold")
        more = hold is not None and data.draw(st.booleans(), label="more")
        if hold is not None:
            (self.open_holds[client].add if more else self.open_holds[client].discard)(hold)
        functions = {f: FUNCTIONS[f] for f in fns}
        self.handle(
            client,
            UpdateGraph(tasks=batch, wanted=wanted, functions=functions, hold=hold, more=more),
        )

    @precondition(lambda self: self.stale)
    @rule(client=st.sampled_from(CLIENTS), data=st.data())
    def client_submits_a_freed_key_again(self, client, data):
        """The same key again while a worker may still report its freed run."""
        _, key, _ = data.draw(st.sampled_from(sorted(self.stale)))
        if key in self.specs:
            self.wanted[client].add(key)
            fn = self.specs[key].fn
            functions = {fn: FUNCTIONS[fn]} if fn is not None else {}
            self.handle(
                client, UpdateGraph(tasks=[self.specs[key]], wanted=[key], functions=functions)
            )

    @precondition(lambda self: self.sim)
    @rule(client=st.sampled_from(CLIENTS), broadcast=st.booleans())
    def client_scatters(self, client, broadcast):
        key = self.fresh_key("s")
        self.scatter_id += 1
        self.wanted[client].add(key)
        self.handle(
            client,
            Scatter(id=self.scatter_id, data={key: ARGS}, nbytes={key: 10}, broadcast=broadcast),
        )

    @precondition(lambda self: self.sim and self.s.tasks)
    @rule(client=st.sampled_from(CLIENTS), data=st.data(), broadcast=st.booleans())
    def client_scatters_over_a_known_key(self, client, data, broadcast):
        """A new value for the key; sometimes onto a chosen worker (one holding a copy, say)."""
        key = data.draw(st.sampled_from(sorted(self.s.tasks)))
        workers = data.draw(st.sampled_from([None, *([a] for a in sorted(self.sim))]))
        self.scatter_id += 1
        self.wanted[client].add(key)
        msg = Scatter(
            id=self.scatter_id,
            data={key: ARGS},
            nbytes={key: 10},
            workers=workers,
            broadcast=broadcast,
        )
        self.handle(client, msg)

    @precondition(lambda self: any(self.wanted.values()))
    @rule(client=st.sampled_from(CLIENTS), data=st.data())
    def client_releases(self, client, data):
        if not self.wanted[client]:
            return
        keys = data.draw(
            st.lists(st.sampled_from(sorted(self.wanted[client])), min_size=1, unique=True)
        )
        self.wanted[client].difference_update(keys)
        for k in keys:
            self.last[client].pop(k, None)
        self.handle(client, ReleaseKeys(keys=keys))

    @precondition(lambda self: any(self.wanted.values()))
    @rule(client=st.sampled_from(CLIENTS), data=st.data())
    def client_cancels(self, client, data):
        pool = sorted(self.wanted[C1] | self.wanted[C2])
        keys = data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=2, unique=True))
        self.handle(client, CancelKeys(keys=keys))

    @rule(client=st.sampled_from(CLIENTS))
    def client_leaves_and_comes_back(self, client):
        self.wanted[client].clear()
        self.last[client].clear()
        self.open_holds[client].clear()
        self.handle(client, ClientLeft(client))
        self.handle(client, ClientJoined(client))

    # -- the end --------------------------------------------------------------------
    def run_to_quiescence(self) -> None:
        # Every address a task may be restricted to, offering every resource.
        for address in POOL:
            w = self.sim.get(address)
            if w is not None and w.resources != FULL:
                self.leave(address, expected=True)
            if address not in self.sim:
                self.join(address, FULL, nthreads=2)
        for w in list(self.sim.values()):
            if w.unreported:
                self.report_copies(w)
        for _ in range(10_000):
            busy = sorted(a for a, w in self.sim.items() if w.running)
            if not busy:
                break
            w = self.sim[busy[0]]
            self.run_one(w, next(iter(w.running)), True, 8)
        else:
            raise AssertionError("the cluster never went quiet")

    def teardown(self) -> None:
        self.stale.clear()
        self.run_to_quiescence()
        for key, ts in self.s.tasks.items():
            assert ts.state in ("memory", "erred", "released"), (key, ts.state, self.s.story(key))
        for client in CLIENTS:
            for key in self.wanted[client]:
                last = self.last[client].get(key)
                if isinstance(last, KeyCancelled):
                    continue  # cancelled (by either client) or lost beyond recovery
                ts = self.s.tasks.get(key)
                if ts is None or client not in ts.who_wants:
                    # Built on a key the scheduler no longer knew: it erred at once
                    # and the scheduler kept no record (perhaps submitted anew since).
                    assert isinstance(last, KeyErred), (client, key, last)
                    assert last.error.typename == "CancelledError"
                    continue
                assert client in ts.who_wants
                if ts.state == "memory":
                    assert isinstance(last, KeyInMemory), (client, key, last)
                else:
                    assert ts.state == "erred", (key, ts.state, self.s.story(key))
                    assert isinstance(last, KeyErred) and last.error == ts.error, (key, last)
        # The clients let go: the scheduler forgets everything and every copy is freed.
        for hold in sorted(self.open_holds[C1]):  # C1 ends the graphs it was sending
            self.handle(C1, UpdateGraph(tasks=[], wanted=[], hold=hold, more=False))
        self.handle(C1, ReleaseKeys(keys=sorted(self.wanted[C1])))
        self.handle(C2, ClientLeft(C2))
        assert self.s.tasks == {}, self.s.task_counts()
        assert self.s.unrunnable == {}
        assert self.s.functions == {} and self.s.function_refs == {}
        for address, ws in self.s.workers.items():
            assert not ws.processing and not ws.has_what and ws.occupancy == 0 and ws.nbytes == 0
            assert self.sim[address].held == {}, (address, self.sim[address].held)
            assert self.sim[address].running == {}


SchedulerMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("CORRAL_STATE_EXAMPLES", 200)),
    stateful_step_count=40,
    derandomize=not os.environ.get("CORRAL_STATE_RANDOM"),
    deadline=None,
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_scheduler_state_machine = SchedulerMachine.TestCase
