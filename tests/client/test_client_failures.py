"""Failures seen from the client: dead worker processes, bad functions, bad data."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import threading
import time
import uuid

import pytest

import corral
from corral import Client, LocalCluster

N_WORKERS = 4


def inc(x):
    return x + 1


def wait_for_release(folder):
    """Record this process's pid, then block until ``folder/release`` exists (max 60s)."""
    pid = os.getpid()
    with open(os.path.join(folder, f"started-{pid}-{uuid.uuid4().hex}"), "w"):
        pass
    deadline = time.time() + 60
    while not os.path.exists(os.path.join(folder, "release")) and time.time() < deadline:
        time.sleep(0.02)
    return pid


def counted(folder, x):
    """Return ``x * 10`` and leave one file per run in ``folder`` (name: the pid)."""
    with open(os.path.join(folder, f"run-{os.getpid()}-{uuid.uuid4().hex}"), "w"):
        pass
    return x * 10


def kill_own_worker(x):
    os._exit(1)


def make_lock():
    return threading.Lock()


def type_name(x):
    return type(x).__name__


def poll(predicate, message, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out: {message}")
        time.sleep(0.02)


def started_pids(folder):
    return [int(n.split("-")[1]) for n in os.listdir(folder) if n.startswith("started-")]


def worker_pids(client):
    return {w["pid"]: addr for addr, w in client.scheduler_info()["workers"].items()}


@pytest.fixture(scope="module")
def pcluster():
    with LocalCluster(n_workers=N_WORKERS, threads_per_worker=1, processes=True) as cluster:
        yield cluster


@pytest.fixture
def c(pcluster):
    with Client(pcluster) as client:
        yield client
    pcluster.scale(N_WORKERS)  # replace workers a test killed


# -- dead workers ------------------------------------------------------------------------
def test_worker_killed_while_running_task_is_rescheduled(c, tmp_path):
    folder = str(tmp_path)
    fut = c.submit(wait_for_release, folder, pure=False)
    [first] = poll(lambda: started_pids(folder), "the task starts")
    pids = worker_pids(c)
    assert first in pids
    os.kill(first, signal.SIGKILL)

    second = poll(
        lambda: [p for p in started_pids(folder) if p != first], "the task runs again elsewhere"
    )
    assert len(second) == 1 and second[0] in pids
    assert fut.status == "pending"
    with open(os.path.join(folder, "release"), "w"):
        pass
    assert fut.result(timeout=30) == second[0]
    assert fut.status == "finished"
    assert first not in worker_pids(c)
    # LocalCluster supervises its workers: the killed one may be back already (corral.nanny)
    assert len(c.scheduler_info()["workers"]) in (N_WORKERS - 1, N_WORKERS)
    transitions = [(start, finish) for _, start, finish, _ in c.story(fut)]
    assert transitions.count(("waiting", "processing")) == 2
    assert ("processing", "waiting") in transitions


def test_lost_result_is_recomputed(c, tmp_path):
    folder = str(tmp_path)
    a = c.submit(counted, folder, 4, pure=False)
    assert a.result() == 40
    [holder] = c.who_has(a)[a.key]
    holder_pid = c.scheduler_info()["workers"][holder]["pid"]
    os.kill(holder_pid, signal.SIGKILL)

    b = c.submit(inc, a)
    assert b.result(timeout=30) == 41
    runs = poll(lambda: len(os.listdir(folder)) == 2 and os.listdir(folder), "a ran twice")
    assert {int(name.split("-")[1]) for name in runs} - {holder_pid}
    new_holders = poll(lambda: c.who_has(a)[a.key], "a is in memory again")
    assert holder not in new_holders
    assert a.status == "finished"
    assert a.result() == 40


def big_after_first_run(folder):
    """200 kB of data; slow from the second run on (a recomputation)."""
    runs = len(os.listdir(folder))
    with open(os.path.join(folder, f"run-{os.getpid()}-{uuid.uuid4().hex}"), "w"):
        pass
    if runs:
        time.sleep(1.5)
    return b"x" * 200_000


def test_result_of_lost_large_value_waits_for_recomputation(c, tmp_path):
    folder = str(tmp_path)
    a = c.submit(big_after_first_run, folder, pure=False)
    corral.wait([a])
    assert a.status == "finished"  # the value stays on the worker: too big to travel along
    [holder] = c.who_has(a)[a.key]
    os.kill(c.scheduler_info()["workers"][holder]["pid"], signal.SIGKILL)
    poll(lambda: len(os.listdir(folder)) == 2, "the scheduler recomputes a")
    assert a.result(timeout=60) == b"x" * 200_000
    assert a.status == "finished"
    assert holder not in c.who_has(a)[a.key]


def test_task_killing_its_worker_fails_with_killed_worker(c, pcluster):
    fut = c.submit(kill_own_worker, 1)
    with pytest.raises(corral.KilledWorker) as info:
        fut.result(timeout=60)
    assert fut.status == "error"
    assert isinstance(fut.exception(), corral.KilledWorker)
    assert info.value.task == fut.key
    assert fut.key in str(info.value)
    assert "3 workers" in str(info.value)
    # allowed_failures (3) workers died; the fourth kept serving (the dead ones are
    # restarted by the cluster's supervision, and may be back already)
    assert N_WORKERS - 3 <= len(c.scheduler_info()["workers"]) <= N_WORKERS
    assert c.submit(inc, 1).result() == 2
    # a dependent of the killed task fails the same way
    child = c.submit(inc, fut)
    with pytest.raises(corral.KilledWorker):
        child.result(timeout=10)
    # dead workers are replaced by scaling back up
    pcluster.scale(N_WORKERS)
    assert len(pcluster.workers) == N_WORKERS
    assert len(c.scheduler_info()["workers"]) == N_WORKERS
    assert c.gather(c.map(inc, range(8))) == list(range(1, 9))


def test_scattered_data_lost_with_its_worker(c):
    workers = c.scheduler_info()["workers"]
    target = sorted(workers)[0]
    fut = c.scatter("only-here", workers=[target], hash=False)
    assert fut.status == "finished"
    os.kill(workers[target]["pid"], signal.SIGKILL)
    poll(lambda: fut.status == "lost", "the future is lost")
    assert fut.done()
    with pytest.raises(corral.FutureCancelledError, match="lost"):
        fut.result(timeout=5)
    assert c.submit(inc, 1, pure=False).result() == 2


# -- bad functions and data ----------------------------------------------------------------
def test_unserializable_argument_raises_naming_the_cause(c):
    lock = threading.Lock()
    with pytest.raises(TypeError, match="lock"):
        c.submit(type_name, lock)
    with pytest.raises(TypeError, match="lock"):
        c.map(type_name, [lock])
    with pytest.raises(TypeError, match="lock"):
        c.scatter([lock])
    assert c.submit(inc, 1).result() == 2  # the client is fine


def test_function_not_importable_on_worker(c, tmp_path):
    modname = f"corral_client_only_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{modname}.py").write_text(
        textwrap.dedent(
            """
            def double(x):
                return 2 * x

            class Box:
                def __init__(self, v):
                    self.v = v
            """
        )
    )
    sys.path.insert(0, str(tmp_path))  # only this (client) process can import it
    try:
        module = __import__(modname)
        pids = set(worker_pids(c))
        fut = c.submit(module.double, 21)
        with pytest.raises(ModuleNotFoundError, match=modname):
            fut.result(timeout=30)
        assert fut.status == "error"
        arg = c.submit(type_name, module.Box(1))
        with pytest.raises(ModuleNotFoundError, match=modname):
            arg.result(timeout=30)
        mapped = c.map(module.double, range(3))
        for f in mapped:
            with pytest.raises(ModuleNotFoundError, match=modname):
                f.result(timeout=30)
        # the workers keep serving
        assert set(worker_pids(c)) == pids
        assert c.gather(c.map(inc, range(10))) == list(range(1, 11))
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(modname, None)


def test_unpicklable_result_gives_clear_error(c):
    fut = c.submit(make_lock, pure=False)
    with pytest.raises(TypeError, match="cannot be serialized") as info:
        fut.result(timeout=30)
    assert "lock" in str(info.value)
    assert fut.status == "error"
    child = c.submit(type_name, fut)
    with pytest.raises(TypeError, match="cannot be serialized"):
        child.result(timeout=30)
    assert c.submit(inc, 1).result() == 2


def test_unpicklable_intermediate_moved_between_workers_errs(c):
    workers = sorted(c.scheduler_info()["workers"])
    x = c.submit(make_lock, workers=[workers[0]], pure=False)
    y = c.submit(type_name, x, workers=[workers[1]])
    del x  # not wanted by the client: no serialization when it finishes
    with pytest.raises(TypeError, match="lock"):
        y.result(timeout=3)


# -- losing the scheduler ------------------------------------------------------------------
def test_scheduler_death_marks_futures_lost():
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True) as cluster:
        client = Client(cluster)
        try:
            done = client.submit(inc, 1)
            assert done.result() == 2
            stuck = client.submit(time.sleep, 30, pure=False)
            cluster._scheduler_proc.kill()
            poll(lambda: client.status == "lost", "the client notices")
            assert stuck.status == "lost"
            assert stuck.done()
            with pytest.raises(corral.CommClosedError, match="scheduler"):
                stuck.result(timeout=5)
            assert done.status == "finished"
            with pytest.raises(corral.CommClosedError):
                client.scheduler_info()
        finally:
            client.close()
