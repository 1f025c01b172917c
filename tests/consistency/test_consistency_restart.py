"""Restarting supervised workers: client.restart, restart_workers, crashes, timeouts.

Workers run under a supervisor: ``LocalCluster(processes=True)`` supervises its
worker processes, ``corral worker`` runs each worker as a supervised child.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from consistency_helpers import Corral, corral_env, poll, worker_names, worker_pids

from corral import Client, FutureCancelledError, LocalCluster, WorkerPlugin


def slow_inc(x, delay=0.0):
    time.sleep(delay)
    return x + 1


def pid_of(_=None):
    return os.getpid()


class RecordSetup(WorkerPlugin):
    """Appends ``setup <pid>`` to a file each time it is set up on a worker."""

    name = "record-setup"

    def __init__(self, path):
        self.path = path

    def setup(self, worker):
        with open(self.path, "a") as f:
            f.write(f"setup {os.getpid()}\n")
        worker.recorded = True


def setups(path):
    try:
        with open(path) as f:
            return [int(line.split()[1]) for line in f if line.startswith("setup")]
    except FileNotFoundError:
        return []


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as c:
        yield c


@pytest.fixture
def client(cluster):
    with Client(cluster) as c:
        yield c
        c.wait_for_workers(2, timeout=60)


def test_restart_brings_every_worker_back_with_plugins_set_up_again(client, cluster, tmp_path):
    record = str(tmp_path / "setups.txt")
    client.register_plugin(RecordSetup(record))
    before = worker_pids(client)
    assert sorted(setups(record)) == sorted(before.values())
    done = client.submit(slow_inc, 1)
    assert done.result() == 2
    running = client.submit(slow_inc, 2, delay=30)
    procs = dict(cluster.workers)

    assert client.restart() == dict.fromkeys(before, "OK")

    after = worker_pids(client)
    assert len(after) == 2
    assert not set(after.values()) & set(before.values())  # fresh processes
    assert sorted(worker_names(client)) == ["0", "1"]  # under the same names
    assert sorted(setups(record)) == sorted([*before.values(), *after.values()])
    assert set(client.run(lambda dask_worker: dask_worker.recorded).values()) == {True}
    assert all(p.poll() is not None for p in procs.values())  # the old ones exited
    # Futures from before are cancelled: their results are lost.
    for f in (done, running):
        assert f.status == "cancelled"
        with pytest.raises(FutureCancelledError, match="restart"):
            f.result(timeout=5)
    assert client.submit(slow_inc, 10).result() == 11
    client.unregister_worker_plugin("record-setup")


def test_restart_without_waiting_returns_before_the_workers_are_back(client):
    before = worker_pids(client)
    pending = client.submit(slow_inc, 1, delay=30)

    assert client.restart(wait_for_workers=False) == dict.fromkeys(before, "OK")

    assert pending.status == "cancelled"  # tasks are forgotten before it returns

    def fresh_workers_joined():
        pids = set(worker_pids(client).values())
        return len(pids) == 2 and not pids & set(before.values())

    poll(fresh_workers_joined, "two fresh worker processes")
    assert client.submit(slow_inc, 10).result(timeout=30) == 11


def test_restart_workers_restarts_one_and_the_rest_carries_on(client):
    before = worker_pids(client)
    names = worker_names(client)
    target, other = names["0"], names["1"]
    busy = client.submit(slow_inc, 5, delay=1.0, workers=[other])

    assert client.restart_workers([target]) == {target: "OK"}

    after = worker_pids(client)
    assert after[other] == before[other]  # untouched
    new = worker_names(client)["0"]
    assert new != target and after[new] != before[target]
    assert busy.result(timeout=30) == 6
    assert client.submit(pid_of, workers=[new], pure=False).result() == after[new]
    # By name, too.
    assert client.restart_workers("1") == {other: "OK"}
    assert worker_pids(client)[worker_names(client)["1"]] != before[other]


def test_a_crashed_worker_is_restarted_by_its_supervisor(client, cluster):
    before = worker_pids(client)
    victim = worker_names(client)["1"]
    os.kill(before[victim], signal.SIGKILL)
    poll(
        lambda: len(pids := worker_pids(client)) == 2 and before[victim] not in pids.values(),
        "the crashed worker to come back",
    )
    assert "1" in worker_names(client)
    assert len(cluster.workers) == 2
    assert client.gather(client.map(slow_inc, range(4))) == [1, 2, 3, 4]
    events = [msg["action"] for _, msg in client.get_events("restarts")]
    assert "restarted" in events


def test_in_process_workers_cannot_be_restarted(client):
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=False) as local,
        Client(local) as c,
    ):
        with pytest.raises(RuntimeError, match="supervisor"):
            c.restart()
        with pytest.raises(ValueError, match="unknown workers"):
            c.restart_workers(["tcp://127.0.0.1:1"])
        assert c.submit(slow_inc, 1).result() == 2


HANG_ON_RESTART = """\
import os, time

def corral_setup(worker):
    seen = os.path.join({folder!r}, "seen-" + str(worker.name))
    if worker.name == "0" and os.path.exists(seen):
        time.sleep(600)  # the restarted process never connects
    open(seen, "w").close()
"""


def test_a_restart_that_does_not_come_back_raises_naming_the_worker(tmp_path):
    preload = tmp_path / "hang_on_restart.py"
    preload.write_text(HANG_ON_RESTART.format(folder=str(tmp_path)))
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, worker_preload=str(preload)
        ) as cluster,
        Client(cluster) as c,
    ):
        names = worker_names(c)
        stuck, other = names["0"], names["1"]
        with pytest.raises(TimeoutError, match="did not come back within 5s") as info:
            c.restart_workers([stuck], timeout=5)
        assert stuck in str(info.value) and "'0'" in str(info.value)
        assert list(c.scheduler_info()["workers"]) == [other]
        assert c.submit(slow_inc, 1).result() == 2  # the rest of the cluster carries on
        events = [msg for _, msg in c.get_events("restarts")]
        assert {"action": "timeout", "worker": stuck, "name": "0"} in events


def test_corral_worker_supervises_its_worker_by_default(tmp_path):
    with LocalCluster(n_workers=0, processes=True) as cluster, Client(cluster) as c:
        supervisor = Corral(
            tmp_path / "worker.log",
            "worker",
            cluster.scheduler_address,
            "--nthreads",
            "1",
            "--name",
            "cli",
            env=corral_env(token=cluster.token),
        )
        try:
            c.wait_for_workers(1, timeout=60)
            first = worker_pids(c)[worker_names(c)["cli"]]
            assert first != supervisor.pid  # a child of the supervisor

            os.kill(first, signal.SIGKILL)  # a crash: the supervisor starts it again
            second = poll(
                lambda: [p for p in worker_pids(c).values() if p != first],
                "the crashed worker to come back",
            )[0]
            assert list(worker_names(c)) == ["cli"]

            old = worker_names(c)["cli"]
            assert c.restart_workers(["cli"]) == {old: "OK"}
            third = worker_pids(c)[worker_names(c)["cli"]]
            assert third not in (first, second)
            assert c.submit(pid_of, pure=False).result() == third

            assert supervisor.terminate() == 0
            poll(lambda: not c.scheduler_info()["workers"], "the worker to leave")
        finally:
            supervisor.stop()
