"""The pure worker state machine: exact instructions out for events in, and properties.

The example tests feed events to :class:`WorkerState` and assert the exact
instructions it answers with.  The property test drives it with random
compute batches, resource demands, completion orders, fetches that succeed,
miss or fail, and frees, checking ``validate()`` after every stimulus and the
promises at quiescence.

The property test is derandomized (the same examples every run).  To search
harder: ``CORRAL_STATE_EXAMPLES=3000`` (more examples) and
``CORRAL_STATE_RANDOM=1`` (fresh random examples each run).
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from state_helpers import Worker, ctask, error

from corral.protocol.messages import (
    AddKeys,
    ComputeTask,
    MissingData,
    TaskErred,
    TaskFinished,
    UpdateWhoHas,
)
from corral.worker.state import (
    ComputeEvent,
    DataStored,
    Execute,
    ExecuteFailure,
    ExecuteSuccess,
    FreeEvent,
    Gather,
    GatherDone,
    ReleaseData,
    SendToScheduler,
)

P1 = "tcp://10.0.1.1:7001"
P2 = "tcp://10.0.1.2:7001"
P3 = "tcp://10.0.1.3:7001"


def ok(key: str, run_id: int = 1, nbytes: int = 8, reported: bool = False) -> ExecuteSuccess:
    return ExecuteSuccess(
        key=key,
        run_id=run_id,
        nbytes=nbytes,
        typename="int",
        start=1.0,
        stop=2.0,
        reported=reported,
    )


def fail(key: str, run_id: int = 1, err=None) -> ExecuteFailure:
    return ExecuteFailure(key=key, run_id=run_id, error=err or error(), start=1.0, stop=2.0)


def done(key: str, run_id: int = 1, nbytes: int = 8) -> SendToScheduler:
    return SendToScheduler(
        TaskFinished(key=key, run_id=run_id, nbytes=nbytes, typename="int", start=1.0, stop=2.0)
    )


def executes(out) -> list[str]:
    return [i.key for i in out if isinstance(i, Execute)]


# ---------------------------------------------------------------------------------
# Running tasks
# ---------------------------------------------------------------------------------
def test_task_without_inputs_runs_and_reports():
    w = Worker(nthreads=1, prefetch=0)
    a = ctask("a")
    assert w(ComputeEvent([a])) == [Execute("a", a)]
    assert w.states() == {"a": "executing"}
    assert w(ok("a")) == [done("a")]
    assert w.states() == {"a": "memory"}
    assert w.state.story("a") == [
        ("a", "released", "ready"),
        ("a", "ready", "executing"),
        ("a", "executing", "memory"),
    ]
    # The scheduler frees it: the data goes.
    assert w(FreeEvent(["a"])) == [ReleaseData(["a"])]
    assert w.states() == {}


def test_a_result_its_thread_reported_is_not_reported_again():
    w = Worker(nthreads=1, prefetch=0)
    a, b = ctask("a"), ctask("b")
    w(ComputeEvent([a, b]))
    assert w(ok("a", reported=True)) == [Execute("b", b)]
    assert w.states() == {"a": "memory", "b": "executing"}


def test_a_reported_run_of_a_key_assigned_again_since_is_reported_for_the_new_run():
    w = Worker()
    w(ComputeEvent([ctask("a", run_id=1)]))
    w(FreeEvent(["a"]))
    w(ComputeEvent([ctask("a", run_id=2)]))
    # The thread's report named run 1, which the scheduler ignores: run 2 is told.
    assert w(ok("a", run_id=1, reported=True)) == [done("a", run_id=2)]


def test_a_reported_run_freed_meanwhile_is_dropped():
    w = Worker()
    w(ComputeEvent([ctask("a")]))
    w(FreeEvent(["a"]))
    assert w(ok("a", reported=True)) == [ReleaseData(["a"])]
    assert w.states() == {}


def test_failure_reports_the_error_and_forgets_the_task():
    w = Worker()
    err = error("KeyError", "'x'")
    w(ComputeEvent([ctask("a", run_id=3)]))
    assert w(fail("a", run_id=3, err=err)) == [
        SendToScheduler(TaskErred(key="a", run_id=3, error=err, start=1.0, stop=2.0))
    ]
    assert w.states() == {}


def test_threads_bound_what_runs_and_priority_orders_it():
    w = Worker(nthreads=2, prefetch=0)
    tasks = [ctask(f"t{i}", priority=[5 - i]) for i in range(5)]
    assert executes(w(ComputeEvent(tasks))) == ["t4", "t3"]
    assert executes(w(ok("t3"))) == ["t2"]
    assert executes(w(fail("t4"))) == ["t1"]


def test_prefetch_hands_plain_tasks_to_the_pool_ahead_but_not_resource_tasks():
    w = Worker(nthreads=1, resources={"GPU": 4})
    plain = [ctask(f"p{i}", priority=[i]) for i in range(3)]
    assert executes(w(ComputeEvent(plain))) == ["p0", "p1"]
    w2 = Worker(nthreads=1, resources={"GPU": 4})
    gpu = [ctask(f"g{i}", priority=[i], resources={"GPU": 1}) for i in range(3)]
    assert executes(w2(ComputeEvent(gpu))) == ["g0"]


def test_compute_of_a_key_already_in_memory_reports_it_at_once():
    w = Worker()
    w(ComputeEvent([ctask("a", who_has={"x": [P1]}, nbytes={"x": 5})]))
    w(GatherDone(P1, {"x": 5}, []))
    assert w(ComputeEvent([ctask("x", run_id=9)])) == [
        SendToScheduler(TaskFinished(key="x", run_id=9, nbytes=5))
    ]


# ---------------------------------------------------------------------------------
# Resources
# ---------------------------------------------------------------------------------
def test_resources_are_never_oversubscribed_whatever_the_threads():
    w = Worker(nthreads=8, resources={"GPU": 1})
    g1, g2 = ctask("g1", resources={"GPU": 1}), ctask("g2", resources={"GPU": 1})
    p = ctask("p")
    out = w(ComputeEvent([g1, g2, p]))
    assert executes(out) == ["g1", "p"]
    assert w.states() == {"g1": "executing", "g2": "constrained", "p": "executing"}
    assert w.state.available_resources == {"GPU": 0}
    assert executes(w(ok("p"))) == []
    assert executes(w(ok("g1"))) == ["g2"]
    w(fail("g2"))
    assert w.state.available_resources == {"GPU": 1}


def test_fractional_demands_share_a_resource():
    w = Worker(nthreads=8, resources={"MEM": 1})
    tasks = [ctask(f"m{i}", priority=[i], resources={"MEM": 0.5}) for i in range(3)]
    assert executes(w(ComputeEvent(tasks))) == ["m0", "m1"]
    assert executes(w(ok("m1"))) == ["m2"]
    w(ok("m0"))
    w(ok("m2"))
    assert w.state.available_resources == {"MEM": 1}


def test_fractions_that_do_not_sum_exactly_still_free_the_whole_resource():
    w = Worker(nthreads=8, resources={"MEM": 1})
    parts = [ctask(f"m{i}", priority=[i], resources={"MEM": 0.1}) for i in range(3)]
    parts.append(ctask("m3", priority=[3], resources={"MEM": 0.7}))
    assert executes(w(ComputeEvent(parts))) == ["m0", "m1", "m2", "m3"]
    whole = ctask("whole", priority=[9], resources={"MEM": 1})
    assert executes(w(ComputeEvent([whole]))) == []
    for i in (2, 0, 3):
        w(ok(f"m{i}"))
    # 1 - 0.1 - 0.1 - 0.1 - 0.7 + ... in floating point is not exactly 1 again.
    assert executes(w(ok("m1"))) == ["whole"]


def test_a_task_demanding_more_than_is_left_waits_without_blocking_smaller_ones():
    w = Worker(nthreads=8, resources={"GPU": 2})
    big = ctask("big", priority=[1], resources={"GPU": 2})
    small = ctask("small", priority=[0], resources={"GPU": 1})
    assert executes(w(ComputeEvent([small, big]))) == ["small"]
    # big is constrained; the plain task behind it still runs.
    assert executes(w(ComputeEvent([ctask("plain", priority=[2])]))) == ["plain"]
    assert executes(w(ok("small"))) == ["big"]


# ---------------------------------------------------------------------------------
# Fetching inputs
# ---------------------------------------------------------------------------------
def test_inputs_are_fetched_then_the_task_runs():
    w = Worker()
    t = ctask("t", who_has={"x": [P1], "y": [P2]}, nbytes={"x": 5, "y": 6})
    out = w(ComputeEvent([t]))
    assert sorted(out, key=lambda g: g.peer) == [Gather(P1, ["x"]), Gather(P2, ["y"])]
    assert w.states() == {"t": "waiting", "x": "flight", "y": "flight"}
    assert w(GatherDone(P1, {"x": 5}, [])) == [
        SendToScheduler(AddKeys(nbytes={"x": 5}, versions={}))
    ]
    assert w(GatherDone(P2, {"y": 6}, [])) == [
        SendToScheduler(AddKeys(nbytes={"y": 6}, versions={})),
        Execute("t", t),
    ]
    assert w(ok("t")) == [done("t")]


def test_inputs_held_by_one_peer_travel_in_one_gather():
    w = Worker()
    t = ctask("t", who_has={"x": [P1], "y": [P1]}, nbytes={"x": 5, "y": 6})
    (g,) = w(ComputeEvent([t]))
    assert g.peer == P1 and sorted(g.keys) == ["x", "y"]


def test_input_missing_on_one_peer_is_fetched_from_another_then_asked_for():
    w = Worker()
    t = ctask("t", who_has={"x": [P1, P2]}, nbytes={"x": 5})
    assert w(ComputeEvent([t])) == [Gather(P1, ["x"])]
    assert w(GatherDone(P1, {}, ["x"])) == [Gather(P2, ["x"])]
    assert w(GatherDone(P2, {}, [], failed=True)) == [
        SendToScheduler(MissingData(key="x", holder=P2))
    ]
    assert w.states() == {"t": "waiting", "x": "missing"}
    # The scheduler answers with fresh locations.
    assert w(UpdateWhoHas(who_has={"x": [P3]})) == [Gather(P3, ["x"])]
    assert w(GatherDone(P3, {"x": 5}, [])) == [
        SendToScheduler(AddKeys(nbytes={"x": 5}, versions={})),
        Execute("t", t),
    ]


def test_a_failed_peer_is_dropped_for_inputs_still_queued_behind_it():
    w = Worker()
    t1 = ctask("t1", who_has={"x": [P1]}, nbytes={"x": 5})
    assert w(ComputeEvent([t1])) == [Gather(P1, ["x"])]
    # y is also only on P1, which is busy: it waits its turn.
    t2 = ctask("t2", who_has={"y": [P1]}, nbytes={"y": 5})
    assert w(ComputeEvent([t2])) == []
    assert w.states()["y"] == "fetch"
    out = w(GatherDone(P1, {}, [], failed=True))
    # P1 is unreachable: neither x nor y can come from it; the scheduler is asked for both.
    assert sorted(out, key=lambda i: i.msg.key) == [
        SendToScheduler(MissingData(key="x", holder=P1)),
        SendToScheduler(MissingData(key="y", holder=P1)),
    ]
    assert w.states() == {"t1": "waiting", "t2": "waiting", "x": "missing", "y": "missing"}


def test_scattered_data_wakes_a_waiting_task():
    w = Worker()
    t = ctask("t", who_has={"x": [P1]}, nbytes={"x": 5})
    w(ComputeEvent([t]))
    assert w(DataStored({"x": 5})) == [Execute("t", t)]
    # The fetch in flight finds x already here.
    assert w(GatherDone(P1, {"x": 5}, [])) == []


def test_input_already_here_is_not_fetched():
    w = Worker()
    w(ComputeEvent([ctask("a")]))
    w(ok("a"))
    b = ctask("b", who_has={"a": ["me"]}, nbytes={"a": 8})
    assert w(ComputeEvent([b])) == [Execute("b", b)]


def test_an_input_queued_for_fetch_that_the_scheduler_says_nobody_holds_is_missing():
    w = Worker()
    w(ComputeEvent([ctask("t0", who_has={"y": [P2]}, nbytes={"y": 1})]))
    w(ComputeEvent([ctask("t1", who_has={"x": [P1]}, nbytes={"x": 5})]))
    w(GatherDone(P1, {}, ["x"]))
    # A later task names P2 for x: queued behind the fetch of y from P2.
    w(ComputeEvent([ctask("t2", who_has={"x": [P2]}, nbytes={"x": 5})]))
    assert w.states()["x"] == "fetch"
    # The answer to the MissingData: no holder at all.
    assert w(UpdateWhoHas(who_has={"x": []})) == []
    assert w.states()["x"] == "missing"
    assert w(GatherDone(P2, {"y": 1}, [])) == [
        SendToScheduler(AddKeys(nbytes={"y": 1}, versions={})),
        Execute("t0", ctask("t0", who_has={"y": [P2]}, nbytes={"y": 1})),
    ]


def test_a_missing_input_is_fetched_when_a_later_task_names_a_holder():
    w = Worker()
    t1 = ctask("t1", who_has={"x": [P1]}, nbytes={"x": 5})
    w(ComputeEvent([t1]))
    assert w(GatherDone(P1, {}, ["x"])) == [SendToScheduler(MissingData(key="x", holder=P1))]
    t2 = ctask("t2", who_has={"x": [P2]}, nbytes={"x": 5})
    assert w(ComputeEvent([t2])) == [Gather(P2, ["x"])]


# ---------------------------------------------------------------------------------
# Frees and cancellation
# ---------------------------------------------------------------------------------
def test_task_freed_while_running_is_cancelled_and_its_result_dropped():
    w = Worker(resources={"GPU": 1})
    w(ComputeEvent([ctask("g", resources={"GPU": 1})]))
    assert w(FreeEvent(["g"])) == []
    assert w.states() == {"g": "cancelled"}
    assert w.state.available_resources == {"GPU": 0}  # still running in its thread
    assert w(ok("g")) == [ReleaseData(["g"])]
    assert w.states() == {}
    assert w.state.available_resources == {"GPU": 1}
    assert w.state.executing == set()


def test_task_freed_twice_while_running_still_gives_its_thread_back():
    w = Worker(nthreads=1, prefetch=0, resources={"GPU": 1})
    w(ComputeEvent([ctask("g", resources={"GPU": 1})]))
    w(FreeEvent(["g"]))
    w(FreeEvent(["g"]))
    assert w(ok("g")) == [ReleaseData(["g"])]
    assert w.state.executing == set() and w.state.available_resources == {"GPU": 1}
    h = ctask("h", resources={"GPU": 1})
    assert w(ComputeEvent([h])) == [Execute("h", h)]


def test_task_freed_twice_then_assigned_again_reuses_its_run():
    w = Worker(nthreads=2, prefetch=0)
    w(ComputeEvent([ctask("g", run_id=1)]))
    w(FreeEvent(["g"]))
    w(FreeEvent(["g"]))
    assert w(ComputeEvent([ctask("g", run_id=2)])) == []  # not a second run of g
    assert w(ok("g", run_id=1)) == [done("g", run_id=2)]


def test_failed_run_of_a_freed_task_reports_nothing():
    w = Worker()
    w(ComputeEvent([ctask("a")]))
    w(FreeEvent(["a"]))
    assert w(fail("a")) == []
    assert w.states() == {}


def test_task_freed_then_assigned_again_while_running_reports_the_new_run():
    w = Worker()
    w(ComputeEvent([ctask("a", run_id=1)]))
    w(FreeEvent(["a"]))
    # Assigned again before the first run ended: that run counts for the new one.
    assert w(ComputeEvent([ctask("a", run_id=2)])) == []
    assert w.states() == {"a": "executing"}
    assert w(ok("a", run_id=1)) == [done("a", run_id=2)]


def test_queued_task_freed_never_runs():
    w = Worker(nthreads=1, prefetch=0)
    w(ComputeEvent([ctask("a", priority=[0]), ctask("b", priority=[1])]))
    assert w(FreeEvent(["b"])) == []
    assert w(ok("a")) == [done("a")]
    assert w.states() == {"a": "memory"}


def test_freeing_a_waiting_task_drops_the_fetches_it_alone_needed():
    w = Worker()
    w(ComputeEvent([ctask("t1", who_has={"x": [P1]}, nbytes={"x": 5})]))
    w(ComputeEvent([ctask("t2", who_has={"y": [P1], "x": [P1]}, nbytes={"x": 5, "y": 1})]))
    assert w.states() == {"t1": "waiting", "t2": "waiting", "x": "flight", "y": "fetch"}
    assert w(FreeEvent(["t2"])) == []
    assert w.states() == {"t1": "waiting", "x": "flight"}
    out = w(GatherDone(P1, {"x": 5}, []))
    assert [type(i) for i in out] == [SendToScheduler, Execute]


def test_input_in_flight_whose_dependent_is_freed_is_kept_and_reported():
    w = Worker()
    w(ComputeEvent([ctask("t", who_has={"x": [P1]}, nbytes={"x": 5})]))
    w(FreeEvent(["t"]))
    assert w.states() == {"x": "flight"}
    # It arrived anyway: the scheduler is told, and decides.
    assert w(GatherDone(P1, {"x": 5}, [])) == [
        SendToScheduler(AddKeys(nbytes={"x": 5}, versions={}))
    ]
    assert w(FreeEvent(["x"])) == [ReleaseData(["x"])]


def test_freed_fetch_does_not_drop_the_same_key_computed_here_since():
    """x is freed while in flight, then computed here; the old fetch lands afterwards."""
    w = Worker()
    w(ComputeEvent([ctask("t", who_has={"x": [P1]}, nbytes={"x": 5})]))
    w(FreeEvent(["t", "x"]))
    assert w.states() == {}
    x = ctask("x", run_id=4)
    assert w(ComputeEvent([x])) == [Execute("x", x)]
    assert w(ok("x", run_id=4)) == [done("x", run_id=4)]
    # The IO layer wrote the fetched value over the computed one: same key, same value.
    # The state machine must not drop it.
    assert w(GatherDone(P1, {"x": 5}, [])) == []
    assert w.states() == {"x": "memory"}


def test_freed_fetch_does_not_drop_the_same_key_scattered_here_since():
    w = Worker()
    w(ComputeEvent([ctask("t", who_has={"x": [P1]}, nbytes={"x": 5})]))
    w(FreeEvent(["t", "x"]))
    w(DataStored({"x": 5}))
    assert w(GatherDone(P1, {"x": 5}, [])) == []
    assert w.states() == {"x": "memory"}


def test_freed_fetch_that_lands_serves_a_newer_fetch_of_the_same_key():
    w = Worker()
    w(ComputeEvent([ctask("t1", who_has={"x": [P1]}, nbytes={"x": 5})]))
    w(FreeEvent(["t1", "x"]))
    t2 = ctask("t2", who_has={"x": [P1, P2]}, nbytes={"x": 5})
    # P1 is still busy with the freed fetch: x is asked of P2.
    assert w(ComputeEvent([t2])) == [Gather(P2, ["x"])]
    assert w(GatherDone(P1, {"x": 5}, [])) == [
        SendToScheduler(AddKeys(nbytes={"x": 5}, versions={})),
        Execute("t2", t2),
    ]
    # P2's answer, whatever it is, changes nothing.
    assert w(GatherDone(P2, {}, ["x"])) == []
    assert w.states() == {"t2": "executing", "x": "memory"}


def test_freed_fetch_that_lands_with_no_new_owner_is_dropped():
    w = Worker()
    w(ComputeEvent([ctask("t", who_has={"x": [P1]}, nbytes={"x": 5})]))
    w(FreeEvent(["t", "x"]))
    assert w(GatherDone(P1, {"x": 5}, [])) == [ReleaseData(["x"])]


def test_input_that_is_a_cancelled_run_here_is_fetched_or_awaited():
    """x was freed while running here, computed elsewhere, then needed here."""
    w = Worker(nthreads=2, prefetch=0)
    w(ComputeEvent([ctask("x", run_id=1)]))
    w(FreeEvent(["x"]))
    t = ctask("t", run_id=3, who_has={"x": [P1]}, nbytes={"x": 5})
    w(ComputeEvent([t]))
    out = w(ok("x", run_id=1))
    # The local run's result serves t; the scheduler learns about the copy.
    assert out == [SendToScheduler(AddKeys(nbytes={"x": 8}, versions={})), Execute("t", t)]
    assert w(ok("t", run_id=3)) == [done("t", run_id=3)]


def test_input_that_is_a_cancelled_run_that_fails_is_fetched():
    w = Worker(nthreads=2, prefetch=0)
    w(ComputeEvent([ctask("x", run_id=1)]))
    w(FreeEvent(["x"]))
    t = ctask("t", run_id=3, who_has={"x": [P1]}, nbytes={"x": 5})
    w(ComputeEvent([t]))
    assert w(fail("x", run_id=1)) == [Gather(P1, ["x"])]
    assert w(GatherDone(P1, {"x": 5}, [])) == [
        SendToScheduler(AddKeys(nbytes={"x": 5}, versions={})),
        Execute("t", t),
    ]


def test_data_stored_over_a_running_task_keeps_the_data_and_frees_the_thread():
    """The scheduler scattered over a key running here: FreeKeys, then Store."""
    w = Worker(nthreads=1, prefetch=0, resources={"GPU": 1})
    w(ComputeEvent([ctask("k", resources={"GPU": 1})]))
    w(FreeEvent(["k"]))
    assert w(DataStored({"k": 3})) == []
    assert w.states() == {"k": "memory"}
    # The run ends: its thread and resources come back; the stored data stays.
    assert w(ok("k")) == []
    assert w.states() == {"k": "memory"}
    assert w.state.executing == set() and w.state.available_resources == {"GPU": 1}
    h = ctask("h", resources={"GPU": 1})
    assert w(ComputeEvent([h])) == [Execute("h", h)]


def test_data_stored_over_a_running_task_then_freed_still_frees_the_thread():
    w = Worker(nthreads=1, prefetch=0, resources={"GPU": 1})
    w(ComputeEvent([ctask("k", resources={"GPU": 1})]))
    w(DataStored({"k": 3}))
    assert w(FreeEvent(["k"])) == [ReleaseData(["k"])]
    assert w(fail("k")) == []
    w(ComputeEvent([ctask("k2", resources={"GPU": 1})]))
    w(FreeEvent(["k2"]))
    w(DataStored({"k2": 3}))
    w(FreeEvent(["k2"]))
    # The run's value, stored by the IO layer as it ended, is not kept either.
    assert w(ok("k2")) == [ReleaseData(["k2"])]
    assert w.state.executing == set() and w.state.available_resources == {"GPU": 1}
    assert w.states() == {}


def test_scatter_over_a_key_held_here_keeps_the_new_value():
    """FreeKeys then Store for the same key arrive in one batch; the IO layer
    stored the new value before the batch ran."""
    w = Worker()
    w(DataStored({"k": 3}))
    out = w(FreeEvent(["k"]), DataStored({"k": 4}))
    assert [k for i in out if isinstance(i, ReleaseData) for k in i.keys] == []
    assert w.states() == {"k": "memory"}
    assert w.state.tasks["k"].nbytes == 4


# ---------------------------------------------------------------------------------
# Versions: a key scattered over has a new value; copies of the old one never pass for it
# ---------------------------------------------------------------------------------
def test_fetched_copies_are_reported_with_the_version_the_scheduler_named():
    w = Worker()
    t = ctask("t", who_has={"s": [P1], "c": [P2]}, nbytes={"s": 5, "c": 6}, versions={"s": 4})
    w(ComputeEvent([t]))
    assert w(GatherDone(P1, {"s": 5}, [])) == [
        SendToScheduler(AddKeys(nbytes={"s": 5}, versions={"s": 4}))
    ]
    assert w(GatherDone(P2, {"c": 6}, [])) == [
        SendToScheduler(AddKeys(nbytes={"c": 6}, versions={})),  # computed: version 0
        Execute("t", t),
    ]


def test_a_copy_of_an_older_value_is_dropped_and_the_named_one_fetched():
    w = Worker()
    t1 = ctask("t1", who_has={"s": [P1]}, nbytes={"s": 5}, versions={"s": 1})
    w(ComputeEvent([t1]))
    w(GatherDone(P1, {"s": 5}, []))
    w(ok("t1"))
    # s was scattered over since (version 2, on P2): t2 must not use the copy here.
    t2 = ctask("t2", run_id=2, who_has={"s": [P2]}, nbytes={"s": 7}, versions={"s": 2})
    assert w(ComputeEvent([t2])) == [ReleaseData(["s"]), Gather(P2, ["s"])]
    assert w.states() == {"t1": "memory", "t2": "waiting", "s": "flight"}
    assert w(GatherDone(P2, {"s": 7}, [])) == [
        SendToScheduler(AddKeys(nbytes={"s": 7}, versions={"s": 2})),
        Execute("t2", t2),
    ]


def test_scattered_data_is_held_with_its_version():
    w = Worker()
    w(DataStored({"s": 3}, versions={"s": 5}))
    same = ctask("same", who_has={"s": [P1]}, nbytes={"s": 3}, versions={"s": 5})
    assert w(ComputeEvent([same])) == [Execute("same", same)]
    other = ctask("other", run_id=2, who_has={"s": [P1]}, nbytes={"s": 3}, versions={"s": 6})
    assert w(ComputeEvent([other])) == [ReleaseData(["s"]), Gather(P1, ["s"])]


def test_a_fetch_in_flight_of_an_older_value_is_dropped_when_it_lands():
    w = Worker(nthreads=2, prefetch=0)
    t1 = ctask("t1", who_has={"s": [P1]}, nbytes={"s": 5}, versions={"s": 1})
    assert w(ComputeEvent([t1])) == [Gather(P1, ["s"])]
    # A task naming version 2 (on P2) arrives while version 1 travels from P1.
    t2 = ctask("t2", run_id=2, who_has={"s": [P2]}, nbytes={"s": 5}, versions={"s": 2})
    assert w(ComputeEvent([t2])) == []
    # What lands is version 1: dropped, and version 2 fetched for both tasks.
    assert w(GatherDone(P1, {"s": 5}, [])) == [ReleaseData(["s"]), Gather(P2, ["s"])]
    out = w(GatherDone(P2, {"s": 5}, []))
    assert out[0] == SendToScheduler(AddKeys(nbytes={"s": 5}, versions={"s": 2}))
    assert sorted(executes(out)) == ["t1", "t2"]


def test_a_peer_serving_another_version_than_named_is_not_used():
    """The peer has not yet read the Store of the new value (or was named before it)."""
    w = Worker()
    t = ctask("t", who_has={"s": [P1]}, nbytes={"s": 5}, versions={"s": 2})
    w(ComputeEvent([t]))
    # P1 says its value is version 1: dropped, and the scheduler asked where v2 is
    # (blaming no holder: P1 may well get version 2 in a moment).
    assert w(GatherDone(P1, {"s": 5}, [], versions={"s": 1})) == [
        ReleaseData(["s"]),
        SendToScheduler(MissingData(key="s", holder="")),
    ]
    assert w(UpdateWhoHas(who_has={"s": [P1]}, versions={"s": 2})) == [Gather(P1, ["s"])]
    assert w(GatherDone(P1, {"s": 5}, [], versions={"s": 2})) == [
        SendToScheduler(AddKeys(nbytes={"s": 5}, versions={"s": 2})),
        Execute("t", t),
    ]


def test_a_peer_that_does_not_say_versions_is_taken_at_its_word():
    w = Worker()
    t = ctask("t", who_has={"s": [P1]}, nbytes={"s": 5}, versions={"s": 2})
    w(ComputeEvent([t]))
    assert w(GatherDone(P1, {"s": 5}, [], versions=None)) == [
        SendToScheduler(AddKeys(nbytes={"s": 5}, versions={"s": 2})),
        Execute("t", t),
    ]


def test_update_who_has_of_another_version_drops_the_copy_held_here():
    """The scheduler's answer to an AddKeys of a copy of a value scattered over since."""
    w = Worker()
    w(ComputeEvent([ctask("t", who_has={"s": [P1]}, nbytes={"s": 5}, versions={"s": 1})]))
    w(GatherDone(P1, {"s": 5}, []))
    w(ok("t"))
    assert w(UpdateWhoHas(who_has={"s": [P2]}, versions={"s": 2})) == [ReleaseData(["s"])]
    assert w.states() == {"t": "memory"}
    # The same version changes nothing.
    w2 = Worker()
    w2(DataStored({"s": 3}, versions={"s": 2}))
    assert w2(UpdateWhoHas(who_has={"s": [P2]}, versions={"s": 2})) == []
    assert w2.states() == {"s": "memory"}


def test_update_who_has_of_another_version_refetches_for_a_task_not_started():
    w = Worker(nthreads=1, prefetch=0)
    w(ComputeEvent([ctask("busy", priority=[0])]))
    t = ctask("t", run_id=2, who_has={"s": [P1]}, nbytes={"s": 5}, versions={"s": 1})
    w(ComputeEvent([t]))
    w(GatherDone(P1, {"s": 5}, []))
    assert w.states()["t"] == "ready"  # the thread is busy
    assert w(UpdateWhoHas(who_has={"s": [P2]}, versions={"s": 2})) == [
        ReleaseData(["s"]),
        Gather(P2, ["s"]),
    ]
    assert w.states()["t"] == "waiting"
    assert w(ok("busy")) == [done("busy")]  # t does not start without s
    out = w(GatherDone(P2, {"s": 5}, []))
    assert out == [SendToScheduler(AddKeys(nbytes={"s": 5}, versions={"s": 2})), Execute("t", t)]


def test_a_freed_input_that_a_task_not_started_needs_is_asked_for_again():
    """The scheduler scattered over a key held here (FreeKeys) while a task here needs it."""
    w = Worker(nthreads=1, prefetch=0)
    w(ComputeEvent([ctask("busy", priority=[0])]))
    t = ctask("t", run_id=2, who_has={"s": [P1]}, nbytes={"s": 5}, versions={"s": 1})
    w(ComputeEvent([t]))
    w(GatherDone(P1, {"s": 5}, []))
    assert w(FreeEvent(["s"])) == [
        ReleaseData(["s"]),
        SendToScheduler(MissingData(key="s", holder="")),
    ]
    assert w(UpdateWhoHas(who_has={"s": [P2]}, versions={"s": 2})) == [Gather(P2, ["s"])]
    w(ok("busy"))
    out = w(GatherDone(P2, {"s": 5}, []))
    assert out == [SendToScheduler(AddKeys(nbytes={"s": 5}, versions={"s": 2})), Execute("t", t)]
    # Freed in one message with the tasks that need it (in any order): simply dropped.
    w2 = Worker(nthreads=1, prefetch=0)
    w2(ComputeEvent([ctask("busy", priority=[0])]))
    w2(ComputeEvent([t]))
    w2(GatherDone(P1, {"s": 5}, []))
    assert w2(FreeEvent(["s", "t"])) == [ReleaseData(["s"])]
    assert w2.states() == {"busy": "executing"}


def test_a_cancelled_run_serves_local_tasks_only_when_they_want_the_computed_value():
    w = Worker(nthreads=2, prefetch=0)
    w(ComputeEvent([ctask("x", run_id=1)]))
    w(FreeEvent(["x"]))
    # x was scattered over meanwhile: t wants that value, not the run's.
    t = ctask("t", run_id=3, who_has={"x": [P1]}, nbytes={"x": 5}, versions={"x": 7})
    w(ComputeEvent([t]))
    assert w(ok("x", run_id=1)) == [ReleaseData(["x"]), Gather(P1, ["x"])]
    assert w(GatherDone(P1, {"x": 5}, [])) == [
        SendToScheduler(AddKeys(nbytes={"x": 5}, versions={"x": 7})),
        Execute("t", t),
    ]


def test_a_key_held_as_scattered_data_is_computed_when_assigned():
    """Its computed value is another value: the copy is not reported as the run's result."""
    w = Worker()
    w(DataStored({"k": 3}, versions={"k": 2}))
    k = ctask("k", run_id=5)
    assert w(ComputeEvent([k])) == [ReleaseData(["k"]), Execute("k", k)]
    assert w(ok("k", run_id=5)) == [done("k", run_id=5)]
    assert w.state.tasks["k"].version == 0


def test_two_runs_of_a_key_each_give_back_what_they_hold():
    """A run dropped mid-run (stored over, then freed) and a new run of the key."""
    w = Worker(nthreads=2, prefetch=0, resources={"GPU": 1})
    w(ComputeEvent([ctask("k", run_id=1, resources={"GPU": 1})]))
    w(FreeEvent(["k"]), DataStored({"k": 3}, versions={"k": 1}))
    w(FreeEvent(["k"]), DataStored({"k": 3}, versions={"k": 2}))
    k = ctask("k", run_id=3)
    assert w(ComputeEvent([k])) == [ReleaseData(["k"]), Execute("k", k)]
    assert w.state.available_resources == {"GPU": 0}  # the first run still holds it
    # The first run ends: its GPU comes back, its value goes; the new run goes on.
    assert w(ok("k", run_id=1)) == [ReleaseData(["k"])]
    assert w.state.available_resources == {"GPU": 1}
    assert w.states() == {"k": "executing"}
    assert w(ok("k", run_id=3)) == [done("k", run_id=3)]
    assert w.state.executing == set()


def test_stale_results_are_ignored():
    w = Worker()
    # The IO layer stored the value before telling the state machine: it goes.
    assert w(ok("never-assigned")) == [ReleaseData(["never-assigned"])]
    assert w(fail("never-assigned")) == []
    assert w(GatherDone(P1, {"zzz": 1}, [])) == []
    assert w(FreeEvent(["zzz"])) == []
    assert w(UpdateWhoHas(who_has={"zzz": [P1]})) == []


# ---------------------------------------------------------------------------------
# Property test: random batches, demands, completion orders, fetches and frees
# ---------------------------------------------------------------------------------
PEERS = (P1, P2, P3)
ME = "tcp://10.0.0.9:7001"
TOTALS = (
    {"GPU": 2, "MEM": 1},
    {"GPU": [0, 1], "MEM": 1.0},
    {"GPU": 1},
    {},
)
DEMANDS = (
    None,
    None,
    {"GPU": 1},
    {"GPU": 2},
    {"GPU": 0.5},
    {"GPU": 1.5},
    {"MEM": 0.5},
    {"MEM": 0.1},
    {"MEM": 0.2},
    {"MEM": 0.7},
    {"MEM": 1},
    {"GPU": 1, "MEM": 0.3},
)


def amount(value) -> float:
    return float(len(value)) if isinstance(value, list) else float(value)


class WorkerMachine(RuleBasedStateMachine):
    """A scheduler and an IO layer around one :class:`WorkerState`, both simulated.

    The IO layer keeps a data store and runs what ``Execute`` and ``Gather`` ask,
    finishing them in any order; the scheduler assigns random tasks (inputs held
    by peers or here), frees them, answers ``MissingData`` and reassigns, and
    scatters over keys (a new version of the value, on peers or here).  Every
    value carries its version, so the checks see which value a task starts
    with and which one a copy reported to the scheduler really is.
    """

    def __init__(self) -> None:
        super().__init__()
        self.w: Worker | None = None
        self.totals: dict[str, float] = {}
        # peer -> key -> the version of the value it holds
        self.peers: dict[str, dict[str, int]] = {p: {} for p in PEERS}
        # key -> the version of the value in the IO layer's store (0: computed)
        self.store: dict[str, int] = {}
        # key -> the version the key's value has now, for the scheduler (0 when absent)
        self.versions: dict[str, int] = {}
        # Runs in the thread pool: (key, run_id, demand).  A key may run twice
        # at once when a record was dropped (stored over, then freed) mid-run.
        self.jobs: list[tuple[str, int, dict[str, float]]] = []
        self.flights: dict[str, list[str]] = {}
        self.missing: set[str] = set()
        self.assigned: dict[str, ComputeTask] = {}  # not freed since its last Compute
        self.freed: set[str] = set()
        self.reports: dict[str, Any] = {}
        self.counter = 0

    @initialize(
        nthreads=st.integers(1, 3),
        prefetch=st.sampled_from([None, 0]),
        totals=st.sampled_from(TOTALS),
        holdings=st.lists(st.sets(st.sampled_from(PEERS)), min_size=4, max_size=4),
    )
    def start(self, nthreads, prefetch, totals, holdings):
        self.w = Worker(nthreads, totals, prefetch=prefetch)
        self.totals = {k: amount(v) for k, v in totals.items()}
        for i, peers in enumerate(holdings):
            for p in peers:
                self.peers[p][f"d{i}"] = 0

    # -- driving --------------------------------------------------------------------
    def handle(self, *events: Any) -> None:
        assert self.w is not None
        for inst in self.w(*events):
            self.carry_out(inst)
        for key, ts in self.w.state.tasks.items():
            if ts.state == "memory":
                assert key in self.store, f"{key} in memory but not in the store"
                if ts.version == self.versions.get(key, 0):
                    # Held as the current value: it is the current value.
                    assert self.store[key] == ts.version, (key, ts.version, self.store[key])

    def used(self) -> dict[str, float]:
        used: dict[str, float] = {}
        for _, _, demand in self.jobs:
            for name, x in demand.items():
                used[name] = used.get(name, 0) + x
        return used

    def carry_out(self, inst: Any) -> None:
        if isinstance(inst, Execute):
            live = [
                t
                for t in self.w.state.executing
                if t.key == inst.key and t.state in ("executing", "cancelled")
            ]
            assert len(live) == 1, f"{inst.key} executed twice at once"
            spec = self.assigned.get(inst.key)
            assert spec is not None and inst.spec.run_id == spec.run_id, inst
            versions = inst.spec.versions or {}
            for dep in inst.spec.who_has:
                assert dep in self.store, f"{inst.key} started without its input {dep}"
                # Assigned since the last scatter over the input: exactly that value.
                version = versions.get(dep, 0)
                if version == self.versions.get(dep, 0):
                    assert self.store[dep] == version, (inst.key, dep, self.store[dep], version)
            demand = dict(inst.spec.resources or {})
            used = self.used()
            for name, x in demand.items():
                assert used.get(name, 0) + x <= self.totals.get(name, 0) + 1e-9, (
                    f"{name} oversubscribed starting {inst.key}: {used} + {demand}"
                )
            self.jobs.append((inst.key, inst.spec.run_id, demand))
        elif isinstance(inst, Gather):
            assert inst.peer not in self.flights, f"two fetches from {inst.peer} at once"
            assert inst.keys
            self.flights[inst.peer] = list(inst.keys)
        elif isinstance(inst, ReleaseData):
            for key in inst.keys:
                self.store.pop(key, None)
        else:
            assert isinstance(inst, SendToScheduler), inst
            msg = inst.msg
            if isinstance(msg, TaskFinished | TaskErred):
                spec = self.assigned.get(msg.key)
                assert spec is not None, f"report of {msg.key}, which is not assigned"
                assert msg.run_id == spec.run_id, (msg, spec.run_id)
                if isinstance(msg, TaskFinished):
                    assert msg.key in self.store
                self.reports[msg.key] = msg
            elif isinstance(msg, AddKeys):
                assert msg.versions is not None
                for key in msg.nbytes:
                    assert key in self.store
                    # A copy reported as of the current value is of the current value.
                    version = msg.versions.get(key, 0)
                    if version == self.versions.get(key, 0):
                        assert self.store[key] == version, (key, self.store[key], version)
            else:
                assert isinstance(msg, MissingData), msg
                self.missing.add(msg.key)

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def holders(self, key: str) -> list[str]:
        """The peers holding the current value of ``key``."""
        version = self.versions.get(key, 0)
        return sorted(p for p in PEERS if self.peers[p].get(key) == version)

    def scatter(self, key: str) -> int:
        """A new value of ``key``: copies elsewhere are freed.  Return its version."""
        self.counter += 1
        self.versions[key] = self.counter
        for held in self.peers.values():
            held.pop(key, None)
        return self.counter

    def fits(self, demand) -> bool:
        return all(self.totals.get(k, 0) >= v for k, v in (demand or {}).items())

    def local_results(self) -> list[str]:
        return sorted(
            k
            for k, ts in self.w.state.tasks.items()
            if ts.state == "memory" and k in self.assigned and k in self.reports
        )

    # -- the scheduler --------------------------------------------------------------
    @rule(data=st.data())
    def scheduler_assigns_a_batch(self, data):
        specs = []
        # Keys held by peers; never one assigned here (the scheduler computes
        # a key only where no copy is).
        remote = sorted({k for p in PEERS for k in self.peers[p] if p in self.holders(k)})
        remote = [k for k in remote if k not in self.assigned]
        for _ in range(data.draw(st.integers(1, 4), label="ntasks")):
            demand = data.draw(st.sampled_from([d for d in DEMANDS if self.fits(d)]))
            deps = (
                data.draw(st.lists(st.sampled_from(remote), max_size=2, unique=True))
                if remote
                else []
            )
            who_has = {}
            for dep in deps:
                holders = self.holders(dep)
                if data.draw(st.integers(0, 4)) == 0:
                    holders.append(data.draw(st.sampled_from(PEERS)))  # a stale location
                    if self.peers[holders[-1]].get(dep, 0) != self.versions.get(dep, 0):
                        self.peers[holders[-1]].pop(dep, None)  # it lost its copy
                who_has[dep] = sorted(set(holders))
            local = self.local_results()
            if local and data.draw(st.booleans()):
                who_has[data.draw(st.sampled_from(local))] = [ME]
            self.counter += 1
            spec = ctask(
                f"t{self.counter}",
                run_id=self.counter,
                who_has=who_has,
                # Large inputs from one peer are split into several gathers.
                nbytes={k: data.draw(st.sampled_from([10, 40 * 2**20])) for k in who_has},
                versions={k: self.versions[k] for k in who_has if self.versions.get(k)} or None,
                # Unique priorities: the worker's choices do not hang on set order.
                priority=[data.draw(st.integers(0, 3)), self.counter],
                resources=demand,
            )
            self.assigned[spec.key] = spec
            specs.append(spec)
        self.handle(ComputeEvent(specs))

    def known_here(self) -> list[str]:
        return sorted(set(self.w.state.tasks) - set(self.assigned) - self.needed())

    @precondition(lambda self: self.known_here())
    @rule(data=st.data())
    def scheduler_assigns_a_key_known_here(self, data):
        """A key held or being fetched here becomes a task here (the scheduler lost track)."""
        key = data.draw(st.sampled_from(self.known_here()))
        self.freed.discard(key)
        self.versions.pop(key, None)  # computed here: the computed value
        for held in self.peers.values():
            held.pop(key, None)
        self.counter += 1
        spec = ctask(key, run_id=self.counter, priority=[0, self.counter])
        self.assigned[key] = spec
        self.reports.pop(key, None)
        self.handle(ComputeEvent([spec]))

    @precondition(lambda self: self.freed - self.needed())
    @rule(data=st.data())
    def scheduler_assigns_a_freed_task_again(self, data):
        # Not while another task here needs it as an input: for the scheduler,
        # such a key is in memory somewhere, so it is not computed again.
        key = data.draw(st.sampled_from(sorted(self.freed - self.needed())))
        self.freed.discard(key)
        self.versions.pop(key, None)
        for held in self.peers.values():
            held.pop(key, None)
        self.counter += 1
        spec = ctask(key, run_id=self.counter, priority=[0, self.counter])
        self.assigned[key] = spec
        self.reports.pop(key, None)
        self.handle(ComputeEvent([spec]))

    @precondition(lambda self: self.freed)
    @rule(data=st.data())
    def a_freed_task_is_computed_on_a_peer(self, data):
        """So a later task here may name it as an input held elsewhere."""
        key = data.draw(st.sampled_from(sorted(self.freed)))
        peer = data.draw(st.sampled_from(PEERS))
        if self.versions.get(key, 0) == 0:
            self.peers[peer][key] = 0

    def needed(self) -> set[str]:
        """Keys that assigned tasks not yet reported still need as inputs."""
        return {dep for k, s in self.assigned.items() if k not in self.reports for dep in s.who_has}

    @precondition(lambda self: self.assigned or self.w.state.tasks)
    @rule(data=st.data())
    def scheduler_frees(self, data):
        needed = self.needed()
        candidates = sorted((set(self.assigned) | set(self.w.state.tasks) | self.freed) - needed)
        if not candidates:
            return
        keys = data.draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=3, unique=True))
        for key in keys:
            if self.assigned.pop(key, None) is not None:
                self.freed.add(key)
            self.reports.pop(key, None)
        self.handle(FreeEvent(keys))

    @precondition(lambda self: self.missing)
    @rule(data=st.data(), how=st.sampled_from(["where", "recomputed", "lost"]))
    def scheduler_answers_missing_data(self, data, how):
        key = data.draw(st.sampled_from(sorted(self.missing)))
        self.missing.discard(key)
        if how == "where" and not self.holders(key):
            how = "lost"  # the scheduler answers with locations only while there are some
        if how == "lost":
            # No copy left: the scheduler takes back the tasks that needed it.
            waiting = sorted(k for k, s in self.assigned.items() if key in s.who_has)
            waiting = [k for k in waiting if k not in self.reports]
            for k in waiting:
                del self.assigned[k]
                self.freed.add(k)
            if waiting:
                self.handle(FreeEvent(waiting))
            return
        if how == "recomputed":  # or found elsewhere
            self.peers[data.draw(st.sampled_from(PEERS))][key] = self.versions.get(key, 0)
        self.handle(self.who_has_message(key))

    def who_has_message(self, key: str) -> UpdateWhoHas:
        version = self.versions.get(key, 0)
        return UpdateWhoHas(
            who_has={key: self.holders(key)}, versions={key: version} if version else None
        )

    @rule(data=st.data())
    def scheduler_scatters(self, data):
        key = data.draw(st.sampled_from(["d0", "d1", "d2", "d3", self.fresh("s")]))
        if key in self.w.state.tasks and self.w.state.tasks[key].spec is not None:
            return
        version = self.store[key] = self.scatter(key)
        self.handle(DataStored({key: 3}, versions={key: version}))

    @precondition(lambda self: set(self.w.state.tasks) - self.needed())
    @rule(data=st.data())
    def scheduler_scatters_over_a_key(self, data):
        """FreeKeys then Store of a key known here, in one batch (a task's key too)."""
        key = data.draw(st.sampled_from(sorted(set(self.w.state.tasks) - self.needed())))
        self.assigned.pop(key, None)
        self.reports.pop(key, None)
        version = self.store[key] = self.scatter(key)
        self.handle(FreeEvent([key]), DataStored({key: 3}, versions={key: version}))

    def remote_keys(self) -> list[str]:
        """Keys whose current value is on peers, not tasks of this worker."""
        keys = {k for held in self.peers.values() for k in held if self.holders(k)}
        return sorted(keys - set(self.assigned) - self.freed)

    @precondition(lambda self: self.remote_keys())
    @rule(data=st.data(), how=st.sampled_from(["free", "answer", "silent"]))
    def scheduler_scatters_over_a_key_on_peers(self, data, how):
        """A new value on some peers; the worker learns it one way or another, or later.

        ``free``: it held a copy the scheduler knew of; ``answer``: the answer
        to the AddKeys of its copy; ``silent``: the scheduler did not know of a
        copy here (or none is here), and only later tasks name the new version.
        """
        key = data.draw(st.sampled_from(self.remote_keys()))
        peers = data.draw(st.sets(st.sampled_from(PEERS), min_size=1))
        version = self.scatter(key)
        for p in peers:
            self.peers[p][key] = version
        ts = self.w.state.tasks.get(key)
        if ts is None or ts.state != "memory" or how == "silent":
            return
        if how == "free":
            self.handle(FreeEvent([key]))
        else:
            self.handle(self.who_has_message(key))

    @precondition(lambda self: any(self.peers.values()))
    @rule(data=st.data())
    def a_peer_loses_a_key(self, data):
        peer = data.draw(st.sampled_from(sorted(p for p in PEERS if self.peers[p])))
        del self.peers[peer][data.draw(st.sampled_from(sorted(self.peers[peer])))]

    # -- the IO layer ---------------------------------------------------------------
    def finish_job(self, index: int, success: bool, reported: bool = False) -> None:
        key, run_id, _ = self.jobs.pop(index)
        if success:
            # As the IO layer: a run's value never goes over data stored since.
            ts = self.w.state.tasks.get(key)
            if ts is not None and ts.state in ("executing", "cancelled"):
                self.store[key] = 0
            if reported:
                # The task thread reported it itself, knowing nothing of the state:
                # the scheduler takes it only if this run is still the current one.
                spec = self.assigned.get(key)
                if spec is not None and spec.run_id == run_id:
                    self.reports[key] = TaskFinished(key=key, run_id=run_id, nbytes=8)
            self.handle(ok(key, run_id, reported=reported))
        else:
            self.handle(fail(key, run_id))

    @precondition(lambda self: self.jobs)
    @rule(
        data=st.data(),
        success=st.sampled_from([True, True, False]),
        reported=st.sampled_from([False, True]),
    )
    def a_thread_finishes(self, data, success, reported):
        self.finish_job(data.draw(st.integers(0, len(self.jobs) - 1)), success, reported)

    def finish_gather(self, peer: str, reachable: bool) -> None:
        keys = self.flights.pop(peer)
        received = {k: 10 for k in keys if k in self.peers[peer]} if reachable else {}
        for key in received:
            # As the IO layer: only into a key still wanted, never over data since.
            ts = self.w.state.tasks.get(key)
            if ts is not None and ts.state in ("flight", "fetch", "missing"):
                self.store[key] = self.peers[peer][key]
        missing = [k for k in keys if k not in received] if reachable else []
        # The peer says which version each value is (Data.versions).
        versions = {k: self.peers[peer][k] for k in received}
        self.handle(GatherDone(peer, received, missing, not reachable, versions))

    @precondition(lambda self: self.flights)
    @rule(data=st.data(), reachable=st.sampled_from([True, True, True, False]))
    def a_fetch_finishes(self, data, reachable):
        self.finish_gather(data.draw(st.sampled_from(sorted(self.flights))), reachable)

    @invariant()
    def books_balance(self):
        if self.w is None:
            return
        ws = self.w.state
        assert sorted(ts.key for ts in ws.executing) == sorted(j[0] for j in self.jobs)
        assert set(ws.in_flight) == set(self.flights)
        used = self.used()
        for name, total in self.totals.items():
            assert used.get(name, 0) <= total + 1e-9
            assert abs(ws.available_resources[name] - (total - used.get(name, 0))) < 1e-6

    # -- the end --------------------------------------------------------------------
    def teardown(self) -> None:
        if self.w is None:
            return
        for _ in range(10_000):
            if self.jobs:
                self.finish_job(0, True)
            elif self.flights:
                self.finish_gather(sorted(self.flights)[0], True)
            elif self.missing:
                key = sorted(self.missing)[0]
                self.missing.discard(key)
                if not self.holders(key):
                    self.peers[P1][key] = self.versions.get(key, 0)  # recomputed
                self.handle(self.who_has_message(key))
            else:
                break
        else:
            raise AssertionError("the worker never went quiet")
        ws = self.w.state
        for key, spec in self.assigned.items():
            report = self.reports.get(key)
            assert report is not None, (key, self.w.state.story(key))
            assert report.run_id == spec.run_id
        assert {ts.state for ts in ws.tasks.values()} <= {"memory"}, self.w.states()
        assert not ws.executing and not ws.in_flight and not ws._fetch
        for name, total in self.totals.items():
            assert abs(ws.available_resources[name] - total) < 1e-6, ws.available_resources
        # The scheduler frees everything: nothing is left, in the books or the store.
        self.handle(FreeEvent(sorted(ws.tasks)))
        assert ws.tasks == {}
        assert self.store == {}, self.store


WorkerMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("CORRAL_STATE_EXAMPLES", 200)),
    stateful_step_count=40,
    derandomize=not os.environ.get("CORRAL_STATE_RANDOM"),
    deadline=None,
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_worker_state_machine = WorkerMachine.TestCase
