"""Worker environments in the pure scheduler state machine: membership events and placement."""

from __future__ import annotations

from state_helpers import W1, W2, W3, Sched, finished, register, spec

from corral.protocol.messages import Compute, EnvironmentStatus, FreeKeys, UpdateGraph
from corral.scheduler.state import EnvironmentRegistered, EnvironmentUnregistered, WorkerLeft

C1 = "client-1"


def submit(s, *tasks):
    return s(C1, UpdateGraph(tasks=list(tasks), wanted=[t.key for t in tasks]))


def computed(out, address):
    return [t.key for m in out.get(address, []) if isinstance(m, Compute) for t in m.tasks]


def joined(name, registration="r1", member=True, **kwargs):
    return EnvironmentStatus(name=name, registration=registration, member=member, **kwargs)


def test_a_task_waits_for_a_member_and_runs_once_one_joins():
    s = Sched(W1, W2)
    out = submit(s, spec("x", environment=["gpu-box"]))
    assert out == {}
    assert s.state.tasks["x"].state == "no-worker"
    assert s.state.why_pending("x") == (
        "needs environment 'gpu-box'; no environment named 'gpu-box' is registered"
    )
    s(C1, EnvironmentRegistered("gpu-box", "r1"))
    assert s.state.why_pending("x") == "needs environment 'gpu-box'; no worker is a member"
    out = s(W2, joined("gpu-box"))
    assert computed(out, W2) == ["x"]
    assert s.state.tasks["x"].processing_on.address == W2
    assert s.state.worker_info(s.state.workers[W2])["environments"] == ["gpu-box"]
    assert s.state.worker_info(s.state.workers[W1])["environments"] == []


def test_placement_uses_only_members_and_composes_with_workers_and_resources():
    s = Sched()
    s(W1, register(W1, resources={"GPU": 1}))
    s(W2, register(W2, resources={"GPU": 1}))
    s(W3, register(W3))
    s(C1, EnvironmentRegistered("db", "r1"))
    s(W1, joined("db"))
    s(W3, joined("db"))
    out = submit(s, *(spec(f"t{i}", environment=["db"]) for i in range(6)))
    placed = {t: s.state.tasks[t].processing_on.address for t in (f"t{i}" for i in range(6))}
    assert set(placed.values()) == {W1, W3}
    assert computed(out, W2) == []
    # with resources: only W1 is a member offering a GPU
    submit(s, spec("gpu", environment=["db"], resources={"GPU": 1}))
    assert s.state.tasks["gpu"].processing_on.address == W1
    # with workers=: a non-member named explicitly is not enough
    submit(s, spec("pinned", environment=["db"], workers=[W2]))
    assert s.state.tasks["pinned"].state == "no-worker"
    assert "restricted" not in s.state.why_pending("pinned")
    assert s.state.why_pending("pinned") == "needs environment 'db'; no worker is a member"
    submit(s, spec("pinned3", environment=["db"], workers=[W3]))
    assert s.state.tasks["pinned3"].processing_on.address == W3


def test_a_list_of_environments_means_all_of_them():
    s = Sched(W1, W2)
    s(C1, EnvironmentRegistered("a", "ra"))
    s(C1, EnvironmentRegistered("b", "rb"))
    s(W1, joined("a", "ra"))
    s(W2, joined("b", "rb"))
    submit(s, spec("both", environment=["a", "b"]))
    assert s.state.why_pending("both") == (
        "needs environments 'a', 'b'; no single worker is a member of all of them"
    )
    out = s(W2, joined("a", "ra"))
    assert computed(out, W2) == ["both"]


def test_statuses_of_old_registrations_are_ignored():
    s = Sched(W1)
    s(C1, EnvironmentRegistered("db", "r1"))
    s(C1, EnvironmentRegistered("db", "r2"))  # replaced before W1 answered
    s(W1, joined("db", "r1"))
    assert s.state.workers[W1].environments == set()
    s(W1, joined("db", "r2"))
    assert s.state.workers[W1].environments == {"db"}
    s(C1, EnvironmentUnregistered("db"))
    s(W1, joined("db", "r2"))  # a late status after unregistration
    assert s.state.workers[W1].environments == set()
    s(W1, joined("never-registered", "r9"))
    assert s.state.workers[W1].environments == set()


def test_losing_membership_takes_back_tasks_queued_there():
    s = Sched(W1, W2)
    s(C1, EnvironmentRegistered("db", "r1"))
    s(W1, joined("db"))
    submit(s, spec("x", environment=["db"]), spec("plain"))
    assert s.state.tasks["x"].processing_on.address == W1
    plain_on = s.state.tasks["plain"].processing_on.address
    out = s(W1, joined("db", member=False))  # a refresh: the condition no longer holds
    assert FreeKeys(keys=["x"]) in out[W1]
    assert s.state.tasks["x"].state == "no-worker"
    assert s.state.tasks["plain"].processing_on.address == plain_on  # untouched
    # a stale report of the old run is ignored; the new member runs it
    s(W1, finished("x", run_id=s.state.tasks["x"].run_id))
    assert s.state.tasks["x"].state == "no-worker"
    out = s(W2, joined("db"))
    assert computed(out, W2) == ["x"]


def test_replacing_and_unregistering_drop_every_membership_at_once():
    s = Sched(W1, W2)
    s(C1, EnvironmentRegistered("db", "r1"))
    s(W1, joined("db"))
    s(W2, joined("db"))
    submit(s, spec("x", environment=["db"]))
    on = s.state.tasks["x"].processing_on.address
    out = s(C1, EnvironmentRegistered("db", "r2"))
    assert FreeKeys(keys=["x"]) in out[on]
    assert all(not ws.environments for ws in s.state.workers.values())
    assert s.state.tasks["x"].state == "no-worker"
    s(W1, joined("db", "r2"))
    assert s.state.tasks["x"].processing_on.address == W1
    s(C1, EnvironmentUnregistered("db"))
    assert s.state.tasks["x"].state == "no-worker"
    assert "no environment named 'db' is registered" in s.state.why_pending("x")
    assert s.state.environments == {}


def test_a_member_leaving_the_cluster_forgets_its_membership():
    s = Sched(W1)
    s(C1, EnvironmentRegistered("db", "r1"))
    s(W1, joined("db"))
    s(W1, WorkerLeft(W1))
    submit(s, spec("x", environment=["db"]))
    assert s.state.why_pending("x") == "no workers are connected"
    s(W1, register(W1))  # back, but not a member until its setup finished again
    assert s.state.why_pending("x") == "needs environment 'db'; no worker is a member"
    out = s(W1, joined("db"))
    assert computed(out, W1) == ["x"]
