"""Resources end to end on an in-process cluster: indices, fractions, errors, run-time
changes, ``dask.annotate`` through dask's optimisation, and validation at every door."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time

import pytest

import corral
from corral import Client, LocalCluster, Worker

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
np = pytest.importorskip("numpy")


@pytest.fixture(scope="module")
def cluster():
    # Worker "0": two indexed GPUs.  Worker "1": memory and one FPGA (the only one).
    with LocalCluster(
        n_workers=2,
        threads_per_worker=4,
        processes=False,
        resources=[{"GPU": [0, 1]}, {"MEMORY": 100, "FPGA": 1}],
    ) as c:
        yield c


@pytest.fixture(scope="module")
def c(cluster):
    with Client(cluster) as client:
        yield client


def address_of(client, name):
    return next(a for a, w in client.scheduler_info()["workers"].items() if w["name"] == name)


def record(x=None, delay=0.2):
    """Run for ``delay`` seconds; say where, when, and what the task held."""
    start = time.time()
    time.sleep(delay)
    return {
        "worker": corral.get_worker().name,
        "start": start,
        "end": time.time(),
        "held": corral.get_task_resources(),
        "x": x,
    }


def max_overlap(intervals):
    """The most intervals open at once."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def overlapping(a, b):
    return a["start"] < b["end"] and b["start"] < a["end"]


# -- indexed and fractional resources ------------------------------------------------------
def test_indexed_gpus_are_never_held_twice(c):
    runs = c.gather(c.map(record, range(6), resources={"GPU": 1}, pure=False))
    assert {r["worker"] for r in runs} == {"0"}
    for r in runs:
        assert r["held"]["GPU"] in ([0], [1])
    for i, a in enumerate(runs):
        for b in runs[i + 1 :]:
            if overlapping(a, b):
                assert a["held"]["GPU"] != b["held"]["GPU"], (a, b)
    assert max_overlap([(r["start"], r["end"]) for r in runs]) <= 2


def test_two_gpus_held_by_one_task(c):
    assert c.submit(record, resources={"GPU": 2}, pure=False).result()["held"] == {"GPU": [0, 1]}


def show_visible_devices():
    env = corral.task_env()
    out = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return corral.get_task_resources()["GPU"], out.stdout.strip()


def test_task_env_gives_a_subprocess_the_tasks_gpus(c):
    held, seen = c.submit(show_visible_devices, resources={"GPU": 1}, pure=False).result()
    assert seen == ",".join(str(i) for i in held)


def test_fractions_let_two_tasks_share_one_fpga(c):
    halves = c.gather(c.map(record, range(4), resources={"FPGA": 0.5}, pure=False))
    assert {r["worker"] for r in halves} == {"1"}
    assert max_overlap([(r["start"], r["end"]) for r in halves]) == 2
    wholes = c.gather(c.map(record, range(3), resources={"FPGA": 1}, pure=False))
    assert max_overlap([(r["start"], r["end"]) for r in wholes]) == 1


def test_fractions_of_indexed_gpus_pack_onto_one_index(c):
    runs = c.gather(c.map(record, range(4), resources={"GPU": 0.5}, pure=False))
    for r in runs:
        assert len(r["held"]["GPU"]) == 1
        sharing = [o for o in runs if overlapping(r, o) and o["held"] == r["held"]]
        assert len(sharing) <= 2  # itself and at most one other half


def test_get_task_resources_outside_a_task_raises():
    with pytest.raises(ValueError, match="outside a task"):
        corral.get_task_resources()


def test_a_task_without_demands_holds_nothing(c):
    assert c.submit(record, delay=0, pure=False).result()["held"] == {}


# -- resources come back after errors --------------------------------------------------------
def fail(x):
    raise RuntimeError(f"failed {x}")


def test_resources_are_given_back_after_errors(c, cluster):
    bad = c.map(fail, range(5), resources={"FPGA": 1}, pure=False)
    for f in bad:
        with pytest.raises(RuntimeError, match="failed"):
            f.result()
    assert c.submit(record, resources={"FPGA": 1}, pure=False).result()["worker"] == "1"
    worker = cluster.workers["1"]
    deadline = time.monotonic() + 5
    while worker.state.available_resources != {"MEMORY": 100, "FPGA": 1}:
        assert time.monotonic() < deadline, worker.state.available_resources
        time.sleep(0.01)


# -- changing resources at run time --------------------------------------------------------
def test_client_set_resources_runs_a_pending_task(c):
    fut = c.submit(record, resources={"TPU": 1}, pure=False)
    deadline = time.monotonic() + 5
    while c.why_pending(fut) != "needs TPU=1; no worker offers TPU":
        assert time.monotonic() < deadline, c.why_pending(fut)
        time.sleep(0.02)
    addr = address_of(c, "1")
    c.set_resources(addr, {"TPU": 1})
    try:
        assert fut.result(timeout=10)["worker"] == "1"
        assert c.scheduler_info()["workers"][addr]["resources"]["TPU"] == 1
    finally:
        c.set_resources(addr, {"TPU": 0})
    assert c.scheduler_info()["workers"][addr]["resources"]["TPU"] == 0


def grant_tpu_here():
    corral.get_worker().set_resources(TPU=1)
    return corral.get_worker().name


def test_worker_set_resources_from_a_task_reaches_the_scheduler(c, cluster):
    name = c.submit(grant_tpu_here, workers=[address_of(c, "0")], pure=False).result()
    assert name == "0"
    try:
        assert (
            c.submit(record, resources={"TPU": 1}, pure=False).result(timeout=10)["worker"] == "0"
        )
        # The worker's own record is kept for a re-registration.
        assert cluster.workers["0"].resources["TPU"] == 1
        assert cluster.workers["0"].resource_offer["TPU"] == 1
    finally:
        c.set_resources(address_of(c, "0"), {"TPU": 0})


def test_worker_set_resources_is_awaitable_on_its_loop(cluster):
    worker = cluster.workers["1"]

    async def change():
        await worker.set_resources(LIC=2)
        return dict(worker.state.total_resources)

    assert cluster._loop_thread.run(change())["LIC"] == 2


def test_set_resources_refuses_bad_values_and_unknown_workers(c):
    with pytest.raises(ValueError, match="GPU must be a finite non-negative number, got nan"):
        c.set_resources(address_of(c, "0"), {"GPU": math.nan})
    with pytest.raises(RuntimeError, match="unknown worker"):
        c.set_resources("tcp://127.0.0.1:1", {"GPU": 1})


# -- input data moves to the constrained task ---------------------------------------------------
def load(n):
    return bytes(n)


def process(data):
    return len(data), corral.get_worker().name


def test_input_data_moves_to_the_worker_with_the_resource(c):
    data = c.submit(load, 10**6, workers=[address_of(c, "0")])
    assert c.submit(process, data, resources={"FPGA": 1}).result() == (10**6, "1")


# -- dask.annotate through dask's optimisation -------------------------------------------------
def where(x):
    return corral.get_worker().name


def where_block(block):
    return np.full(block.shape, int(corral.get_worker().name))


def test_annotated_delayed_tasks_run_where_the_resource_is(c):
    with dask.annotate(resources={"FPGA": 1}):
        parts = [dask.delayed(where)(i) for i in range(4)]
    total = dask.delayed(lambda xs: xs)(parts)
    for result in (
        dask.compute(total, scheduler=c.get)[0],
        total.compute(scheduler=c.get),
        c.compute(total).result(),
        c.persist(total).compute(scheduler=c.get),
    ):
        assert result == ["1"] * 4


def test_array_annotation_survives_fusion(c):
    from dask.base import collections_to_expr

    base = da.arange(12, chunks=3)
    with dask.annotate(resources={"FPGA": 1}):
        placed = base.map_blocks(where_block, dtype=int)
    total = placed.sum()
    # With optimisation on, dask fuses the annotated blocks into other tasks
    # and the optimised graph carries no annotations of its own.
    optimized = collections_to_expr([total], True).optimize()
    annotated_keys = set(placed.__dask_keys__())
    assert not annotated_keys & set(optimized.__dask_graph__())
    assert not optimized.__dask_annotations__()
    assert dask.compute(total, scheduler=c.get)[0] == 12  # every element made on worker "1"
    assert placed.compute(scheduler=c.get).tolist() == [1] * 12
    assert c.compute(total).result() == 12
    assert c.persist(placed).compute(scheduler=c.get).tolist() == [1] * 12


def test_annotation_around_the_call_applies_to_every_task(c):
    parts = [dask.delayed(where)(i) for i in range(3)]
    with dask.annotate(resources={"FPGA": 1}):
        assert c.compute(parts, sync=True) == ["1", "1", "1"]
        assert dask.compute(*parts, scheduler=c.get) == ("1", "1", "1")


_attempts: dict[str, int] = {}
_lock = threading.Lock()


def flaky(tag):
    with _lock:
        _attempts[tag] = _attempts.get(tag, 0) + 1
        n = _attempts[tag]
    if n < 3:
        raise OSError(f"attempt {n}")
    return n


def test_retries_workers_and_priority_annotations(c):
    with dask.annotate(retries=2, workers=[address_of(c, "0")], priority=10):
        a = dask.delayed(flaky)("annotated", dask_key_name="flaky-annotated")
        b = dask.delayed(where)(1, dask_key_name="where-annotated")
    assert dask.compute(a, b, scheduler=c.get) == (3, "0")


def test_bad_annotation_is_refused_before_sending(c):
    with dask.annotate(resources={"FPGA": -1}):
        x = dask.delayed(where)(1)
    with pytest.raises(ValueError, match="FPGA must be a finite non-negative number, got -1"):
        dask.compute(x, scheduler=c.get)


# -- validation at every door ---------------------------------------------------------------
BAD = [
    ({"GPU": -1}, "GPU must be a finite non-negative number, got -1"),
    ({"GPU": math.nan}, "GPU must be a finite non-negative number, got nan"),
    ({"GPU": math.inf}, "GPU must be a finite non-negative number, got inf"),
    ({"GPU": "one"}, "GPU must be a number, got 'one'"),
    ({"GPU": [0]}, "GPU must be a number"),
]


@pytest.mark.parametrize(("bad", "match"), BAD)
def test_submit_map_get_compute_persist_refuse_bad_demands(c, bad, match):
    x = dask.delayed(where)(1)
    with pytest.raises(ValueError, match=match):
        c.submit(where, 1, resources=bad)
    with pytest.raises(ValueError, match=match):
        c.map(where, [1, 2], resources=bad)
    with pytest.raises(ValueError, match=match):
        c.get({"k": (where, 1)}, "k", resources=bad)
    with pytest.raises(ValueError, match=match):
        c.compute(x, resources=bad)
    with pytest.raises(ValueError, match=match):
        c.persist(x, resources=bad)
    assert c.submit(where, 2).result() in ("0", "1")  # nothing half-sent broke the client


@pytest.mark.parametrize(
    ("resources", "match"),
    [
        ({"GPU": -1}, "LocalCluster resources: GPU must be a finite non-negative number, got -1"),
        ([{"GPU": math.nan}], "LocalCluster resources of worker 0: GPU must be a finite"),
        ({"GPU": [0, 0]}, "GPU lists index 0 twice"),
        ({"GPU": "2"}, "GPU must be a number, got '2'"),
    ],
)
def test_local_cluster_refuses_bad_resources(resources, match):
    with pytest.raises(ValueError, match=match):
        LocalCluster(n_workers=1, processes=False, resources=resources)


def test_worker_refuses_bad_resources():
    with pytest.raises(ValueError, match="Worker resources: GPU must be a finite"):
        Worker("tcp://127.0.0.1:1", resources={"GPU": -2})
    with pytest.raises(ValueError, match="set_resources: GPU must be a finite"):
        Worker("tcp://127.0.0.1:1").set_resources(GPU=math.inf)


def test_scheduler_refuses_a_worker_registering_bad_resources(cluster, caplog):
    from corral.comm.handshake import connect
    from corral.protocol.messages import RegisterWorker

    async def register():
        conn, _ = await connect(
            cluster.scheduler_address, role="worker", my_id="rogue", token=cluster.token
        )
        conn.send(RegisterWorker(address="tcp://127.0.0.1:9", nthreads=1, resources={"GPU": -1.0}))
        with pytest.raises(Exception):  # noqa: B017 - closed by the scheduler
            await conn.recv(timeout=10)
        return conn.close_reason

    with caplog.at_level("WARNING", logger="corral.scheduler"):
        reason = cluster._loop_thread.run(register())
    assert reason  # the scheduler closed the connection
    assert "refused worker tcp://127.0.0.1:9" in caplog.text
    assert "GPU must be a finite non-negative number, got -1" in caplog.text
    assert "tcp://127.0.0.1:9" not in cluster.scheduler.state.workers


def test_scheduler_errs_a_task_with_bad_resources_on_the_wire(c):
    # A client that skips validation (another language, an old version).
    from corral.protocol.messages import TaskSpec, UpdateGraph
    from corral.protocol.serialize import serialize

    fid, payload = c._function_id(where)
    spec = TaskSpec(key="rogue-task", args=serialize(((1,), {})), fn=fid, resources={"GPU": -5.0})
    fut = corral.Future("rogue-task", c)
    c._send(UpdateGraph(tasks=[spec], wanted=["rogue-task"], functions={fid: payload}))
    with pytest.raises(Exception, match="resources of task 'rogue-task': GPU must be a finite"):
        fut.result(timeout=10)


def test_worker_resources_are_amounts_and_the_offer_keeps_indices(cluster):
    worker = cluster.workers["0"]
    assert worker.resources["GPU"] == 2  # as in dask: conditions compare numbers
    assert worker.resource_offer["GPU"] == [0, 1]
