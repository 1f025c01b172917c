"""Resources in the pure state machines: exact messages and instructions out."""

from __future__ import annotations

import math

from state_helpers import W1, W2, W3, Sched, ctask, erred, finished, register, spec
from state_helpers import Worker as WState

from corral.protocol.messages import (
    Compute,
    ErrorInfo,
    FreeKeys,
    KeyErred,
    SetResources,
    UpdateGraph,
)
from corral.worker.state import (
    ComputeEvent,
    Execute,
    ExecuteFailure,
    ExecuteSuccess,
    FreeEvent,
    SendToScheduler,
)

C1 = "client-1"


def submit(s, *tasks, wanted=None):
    keys = [t.key for t in tasks] if wanted is None else wanted
    return s(C1, UpdateGraph(tasks=list(tasks), wanted=keys))


def computed(out, address):
    """Keys sent to ``address`` in Compute messages."""
    return [t.key for m in out.get(address, []) if isinstance(m, Compute) for t in m.tasks]


def executes(instructions):
    return [i for i in instructions if isinstance(i, Execute)]


def success(key, run_id=1):
    return ExecuteSuccess(key=key, run_id=run_id, nbytes=8, typename="int", start=0, stop=1)


def failure(key, run_id=1):
    err = ErrorInfo(typename="ValueError", message="boom")
    return ExecuteFailure(key=key, run_id=run_id, error=err, start=0, stop=1)


# -- the scheduler ----------------------------------------------------------------------
def test_invalid_demands_from_the_wire_err_the_task_and_its_dependents():
    s = Sched(W1)
    out = submit(
        s,
        spec("bad", resources={"GPU": -1}),
        spec("nan", resources={"GPU": math.nan}),
        spec("dep", "bad"),
        spec("ok", resources={}),
    )
    errors = {m.key: m.error for m in out[C1] if isinstance(m, KeyErred)}
    assert set(errors) == {"bad", "nan", "dep"}
    assert errors["bad"].typename == "ValueError"
    assert (
        errors["bad"].message
        == "resources of task 'bad': GPU must be a finite non-negative number, got -1"
    )
    assert "got nan" in errors["nan"].message
    assert computed(out, W1) == ["ok"]
    assert set(s.tasks) == {"ok"}


def test_no_worker_task_runs_when_set_resources_offers_what_it_needs():
    s = Sched(W1, W2)
    out = submit(s, spec("g", resources={"GPU": 1}))
    assert s.states() == {"g": "no-worker"}
    assert s.state.why_pending("g") == "needs GPU=1; no worker offers GPU"
    # A client asks: the scheduler tells the worker, then places the task there.
    out = s(C1, SetResources(resources={"GPU": [0, 1]}, worker=W2, id=1))
    assert out[W2][0] == SetResources(resources={"GPU": [0, 1]})
    assert computed(out, W2) == ["g"]
    assert s.state.workers[W2].resources == {"GPU": 2}


def test_worker_told_change_is_not_echoed_back():
    s = Sched(W1)
    submit(s, spec("g", resources={"GPU": 1}))
    out = s(W1, SetResources(resources={"GPU": 1}))
    assert [type(m) for m in out[W1]] == [Compute]
    assert s.state.workers[W1].resources == {"GPU": 1}


def test_removing_a_resource_takes_back_tasks_queued_there():
    s = Sched()
    s(W1, register(W1, resources={"GPU": 1}))
    submit(s, spec("g", resources={"GPU": 1}), spec("p"))
    assert s.tasks["g"].processing_on.address == W1
    out = s(C1, SetResources(resources={"GPU": 0}, worker=W1, id=1))
    assert out[W1][0] == SetResources(resources={"GPU": 0})
    assert FreeKeys(keys=["g"]) in out[W1]
    assert s.states() == {"g": "no-worker", "p": "processing"}
    # A worker with a GPU joins: the task goes there.
    out = s(W2, register(W2, resources={"GPU": 1}))
    assert computed(out, W2) == ["g"]


def test_set_resources_for_an_unknown_worker_changes_nothing():
    s = Sched(W1)
    assert s(C1, SetResources(resources={"GPU": 1}, worker=W3, id=1)) == {}
    assert s.state.workers[W1].resources == {}


def test_gpu_tasks_balance_by_gpus_not_threads():
    # W1 has 8 threads but one GPU; W2 one thread and one GPU.  Thread-based
    # occupancy would give W1 nearly all GPU work; each should get half.
    s = Sched()
    s(W1, register(W1, nthreads=8, resources={"GPU": 1}))
    s(W2, register(W2, nthreads=1, resources={"GPU": 1}))
    out = submit(s, *[spec(f"g{i}", resources={"GPU": 1}) for i in range(10)])
    assert len(computed(out, W1)) == 5 and len(computed(out, W2)) == 5


def test_resource_occupancy_is_given_back():
    s = Sched()
    s(W1, register(W1, resources={"GPU": 2}))
    submit(s, spec("a", resources={"GPU": 1}), spec("b", resources={"GPU": 0.5}))
    assert s.state.workers[W1].resource_occupancy["GPU"] > 0
    s(W1, finished("a", s.tasks["a"].run_id))
    s(W1, erred("b", s.tasks["b"].run_id))
    assert s.state.workers[W1].resource_occupancy == {"GPU": 0.0}


def test_input_data_moves_to_the_constrained_task():
    # The big input lives on W1, which has no GPU: the GPU task runs on W2 and
    # is told to fetch its input from W1.
    s = Sched()
    s(W1, register(W1))
    s(W2, register(W2, resources={"GPU": 1}))
    submit(s, spec("load", workers=[W1]), spec("process", "load", resources={"GPU": 1}))
    out = s(W1, finished("load", s.tasks["load"].run_id, nbytes=10**9))
    [batch] = [m for m in out[W2] if isinstance(m, Compute)]
    assert batch.tasks[0].key == "process"
    assert batch.tasks[0].who_has == {"load": [W1]}
    assert batch.tasks[0].resources == {"GPU": 1}


def test_among_qualifying_workers_the_one_holding_the_input_wins():
    s = Sched()
    for w in (W1, W2, W3):
        s(w, register(w, resources={"GPU": 1}))
    submit(s, spec("load", workers=[W3]))
    submit(s, spec("process", "load", resources={"GPU": 1}))
    out = s(W3, finished("load", s.tasks["load"].run_id, nbytes=10**9))
    assert computed(out, W3) == ["process"]


# -- the worker ---------------------------------------------------------------------
def test_worker_runs_no_more_than_it_offers_and_names_indices():
    w = WState(nthreads=4, resources={"GPU": [0, 1]})
    out = w(ComputeEvent([ctask(f"t{i}", resources={"GPU": 1}) for i in range(3)]))
    ex = executes(out)
    assert [(e.key, e.held) for e in ex] == [
        ("t0", {"GPU": [(0, 1.0)]}),
        ("t1", {"GPU": [(1, 1.0)]}),
    ]
    assert w.states()["t2"] == "constrained"
    out = w(success("t1"))
    [e] = executes(out)
    assert (e.key, e.held) == ("t2", {"GPU": [(1, 1.0)]})


def test_worker_fractions_share_an_index():
    w = WState(nthreads=4, resources={"GPU": [0]})
    out = w(ComputeEvent([ctask(f"h{i}", resources={"GPU": 0.5}) for i in range(3)]))
    assert [(e.key, e.held) for e in executes(out)] == [
        ("h0", {"GPU": [(0, 0.5)]}),
        ("h1", {"GPU": [(0, 0.5)]}),
    ]


def test_worker_gives_resources_back_after_an_error_and_a_cancel():
    w = WState(nthreads=2, resources={"GPU": 1})
    w(ComputeEvent([ctask("a", resources={"GPU": 1}), ctask("b", resources={"GPU": 1})]))
    out = w(failure("a"))
    assert [e.key for e in executes(out)] == ["b"]
    assert any(isinstance(i, SendToScheduler) for i in out)
    w(FreeEvent(["b"]))  # cancelled while running: still holds its GPU
    assert w.state.available_resources == {"GPU": 0}
    w(ComputeEvent([ctask("c", resources={"GPU": 1})]))
    assert w.states()["c"] == "constrained"
    out = w(success("b"))
    assert [e.key for e in executes(out)] == ["c"]


def test_worker_set_resources_never_oversubscribes_running_tasks():
    w = WState(nthreads=4, resources={"GPU": [0, 1]})
    w(ComputeEvent([ctask("a", resources={"GPU": 1}), ctask("b", resources={"GPU": 1})]))
    out = w(SetResources(resources={"GPU": [0]}))
    assert executes(out) == []
    w(ComputeEvent([ctask("c", resources={"GPU": 1})]))
    assert w.states()["c"] == "constrained"
    assert executes(w(success("b"))) == []  # 1 GPU total, "a" still holds one
    out = w(success("a"))
    [e] = executes(out)
    assert (e.key, e.held) == ("c", {"GPU": [(0, 1.0)]})
    out = w(SetResources(resources={"GPU": [0, 5]}))
    w(ComputeEvent([ctask("d", resources={"GPU": 1})]))
    assert w.states()["d"] == "executing"
    assert w.state.resource_pool.usage == {"GPU": {0: 1.0, 5: 1.0}}


def test_worker_grows_and_starts_waiting_tasks():
    w = WState(nthreads=4, resources={})
    w(ComputeEvent([ctask("a", resources={"MEM": 5})]))
    assert w.states()["a"] == "constrained"
    out = w(SetResources(resources={"MEM": 5}))
    assert [e.key for e in executes(out)] == ["a"]
