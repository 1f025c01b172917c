"""LocalCluster with worker subprocesses, scaling, and ``Client()`` starting its own."""

from __future__ import annotations

import os
import subprocess

import psutil
import pytest

from corral import Client, LocalCluster


def inc(x):
    return x + 1


def task_pid(_=None):
    import os

    return os.getpid()


def test_process_cluster_runs_tasks_in_subprocesses(process_cluster):
    with Client(process_cluster) as c:
        info = c.scheduler_info()
        assert len(info["workers"]) == 2
        pids = {w["pid"] for w in info["workers"].values()}
        assert os.getpid() not in pids
        assert all(psutil.pid_exists(p) for p in pids)
        assert {w["nthreads"] for w in info["workers"].values()} == {1}
        assert c.submit(inc, 1).result() == 2
        assert c.gather(c.map(inc, range(20))) == list(range(1, 21))
        ran_on = set(c.gather(c.map(task_pid, range(20), pure=False)))
        assert ran_on <= pids and os.getpid() not in ran_on
        a = c.submit(inc, 10, workers=[sorted(info["workers"])[0]])
        b = c.submit(inc, a, workers=[sorted(info["workers"])[1]])
        assert b.result() == 12  # data moved worker to worker between processes


def fail_in_subprocess(x):
    raise KeyError(f"missing {x}")


def test_process_cluster_remote_error_and_traceback(process_cluster):
    import traceback

    with Client(process_cluster) as c:
        fut = c.submit(fail_in_subprocess, "thing")
        with pytest.raises(KeyError, match="missing thing") as info:
            fut.result()
        text = "".join(traceback.format_exception(info.value))
        assert "fail_in_subprocess" in text
        assert "fail_in_subprocess" in "".join(traceback.format_tb(fut.traceback()))
        # a dependent fails with the same exception type
        with pytest.raises(KeyError):
            c.submit(inc, fut).result()


def test_process_cluster_dask_collections(process_cluster):
    da = pytest.importorskip("dask.array")
    dd = pytest.importorskip("dask.dataframe")
    pd = pytest.importorskip("pandas")

    pdf = pd.DataFrame({"g": [i % 3 for i in range(60)], "x": range(60)})
    ddf = dd.from_pandas(pdf, npartitions=4)
    x = da.arange(400, chunks=50)
    with Client(process_cluster) as c:
        got = ddf.groupby("g").x.sum().compute(scheduler=c.get)
        pd.testing.assert_series_equal(got, pdf.groupby("g").x.sum())
        assert (x * 2).sum().compute(scheduler=c.get) == 2 * sum(range(400))
        assert c.compute(x.max()).result() == 399


def test_process_cluster_workers_property_and_repr(process_cluster):
    workers = process_cluster.workers
    assert len(workers) == 2
    assert all(isinstance(p, subprocess.Popen) for p in workers.values())
    assert all(p.poll() is None for p in workers.values())
    assert process_cluster.scheduler_address.startswith("tcp://")
    assert "workers=2" in repr(process_cluster)
    assert "processes" in repr(process_cluster)


def test_scale_up_and_down():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as cluster:
        assert len(cluster.workers) == 2
        with Client(cluster) as c:
            cluster.scale(3)
            assert len(cluster.workers) == 3
            assert len(c.scheduler_info()["workers"]) == 3
            procs = list(cluster.workers.values())
            cluster.scale(1)
            assert len(cluster.workers) == 1
            assert len(c.scheduler_info()["workers"]) == 1
            stopped = [p for p in procs if p not in cluster.workers.values()]
            assert len(stopped) == 2
            assert all(p.poll() is not None for p in stopped)
            assert c.gather(c.map(inc, range(5))) == [1, 2, 3, 4, 5]
        scheduler_proc = cluster._scheduler_proc
        remaining = list(cluster.workers.values())
    assert cluster.status == "closed"
    assert scheduler_proc is not None and scheduler_proc.poll() is not None
    assert all(p.poll() is not None for p in remaining)


def test_client_without_address_starts_and_closes_its_cluster():
    with Client(n_workers=2, threads_per_worker=1) as c:
        cluster = c.cluster
        assert isinstance(cluster, LocalCluster)
        assert cluster.processes  # dask.distributed's default
        assert c.scheduler_address == cluster.scheduler_address
        assert c.submit(inc, 41).result() == 42
        assert len(c.scheduler_info()["workers"]) == 2
        procs = [cluster._scheduler_proc, *cluster.workers.values()]
    assert c.status == "closed"
    assert cluster.status == "closed"
    assert all(p is not None and p.poll() is not None for p in procs)


def test_client_without_address_threads():
    c = Client(processes=False, n_workers=1, threads_per_worker=2)
    try:
        assert c.cluster.scheduler is not None
        assert c.nthreads() == {next(iter(c.nthreads())): 2}
        assert c.submit(inc, 1).result() == 2
    finally:
        c.close()
    assert c.cluster.status == "closed"


def test_cluster_close_is_idempotent_and_cluster_outlives_client():
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=False)
    try:
        with Client(cluster) as c:
            assert c.submit(inc, 1).result() == 2
        assert cluster.status == "running"  # a client given a cluster does not close it
        with Client(cluster.scheduler_address) as c2:
            assert c2.submit(inc, 2).result() == 3
    finally:
        cluster.close()
        cluster.close()
    assert cluster.status == "closed"


def test_worker_resources_and_memory_limit_in_scheduler_info():
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=False,
            resources=[{"GPU": 2}, {"FOO": 1}],
            memory_limit="1GB",
        ) as cluster,
        Client(cluster) as c,
    ):
        workers = sorted(c.scheduler_info()["workers"].values(), key=lambda w: w["name"])
        assert [w["name"] for w in workers] == ["0", "1"]
        assert [w["resources"] for w in workers] == [{"GPU": 2}, {"FOO": 1}]
        assert [w["memory_limit"] for w in workers] == [10**9, 10**9]
        assert c.submit(inc, 1, resources={"FOO": 1}).result() == 2


def test_cluster_never_closed_stops_its_processes_at_exit(tmp_path):
    import json
    import sys
    import textwrap
    import time

    pid_file = tmp_path / "pids.json"
    script = textwrap.dedent(
        f"""
        import json
        from corral import Client, LocalCluster

        cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True)
        client = Client(cluster)
        assert client.submit(sum, [1, 2]).result() == 3
        pids = [cluster._scheduler_proc.pid, *(p.pid for p in cluster.workers.values())]
        with open({str(pid_file)!r}, "w") as f:
            json.dump(pids, f)
        # exits without closing the client or the cluster
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=120,
    )
    assert proc.returncode == 0
    pids = json.loads(pid_file.read_text())
    assert len(pids) == 2
    deadline = time.monotonic() + 15
    try:
        while any(_running(p) for p in pids):
            assert time.monotonic() < deadline, "processes outlived their cluster's program"
            time.sleep(0.05)
    finally:
        for p in pids:
            if _running(p):
                os.kill(p, 9)


def _running(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _closed_port_address():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def test_client_to_dead_address_fails_and_leaves_no_thread():
    import threading

    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(OSError):  # TimeoutError is an OSError, as in dask.distributed
        Client(_closed_port_address(), timeout=0.5)
    left = [t.name for t in threading.enumerate() if t.ident not in before]
    assert left == []


def test_client_to_dead_address_error_names_the_address():
    address = _closed_port_address()
    with pytest.raises(OSError, match=address.split("//")[1]):
        Client(address, timeout=0.5)


def test_client_address_type_error():
    with pytest.raises(TypeError):
        Client(12345)
