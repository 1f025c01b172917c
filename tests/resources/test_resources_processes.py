"""Resources with real processes: the user guide's example on a heterogeneous cluster,
workers killed mid-task, workers joining later from the command line, and the CLI's
``--resources`` / ``CORRAL_WORKER_RESOURCES`` / ``auto``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import corral
from corral import Client, LocalCluster


def max_overlap(intervals):
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


# -- the example of docs/resources.md -------------------------------------------------------
def load(fn):
    return list(range(fn * 10, fn * 10 + 10))


def process(data):
    start = time.time()
    time.sleep(0.3)
    return sum(data), (corral.get_worker().address, start, time.time())


def aggregate(processed):
    total = sum(p[0] for p in processed)
    return total, [p[1] for p in processed], corral.get_worker().address


def test_seed_example_on_a_heterogeneous_cluster():
    with (
        LocalCluster(
            n_workers=3,
            threads_per_worker=4,
            processes=True,
            resources=[{"GPU": 2}, {"GPU": 2}, {"MEMORY": 100e9}],
        ) as cluster,
        Client(cluster) as client,
    ):
        by_name = {w["name"]: a for a, w in client.scheduler_info()["workers"].items()}
        gpu_workers = {by_name["0"], by_name["1"]}
        memory_worker = by_name["2"]
        filenames = range(12)

        data = [client.submit(load, fn) for fn in filenames]
        processed = [client.submit(process, d, resources={"GPU": 1}) for d in data]
        final = client.submit(aggregate, processed, resources={"MEMORY": 70e9})

        total, runs, where = final.result(timeout=60)
        assert total == sum(range(120))
        assert where == memory_worker
        per_worker: dict[str, list[tuple[float, float]]] = {}
        for address, start, end in runs:
            per_worker.setdefault(address, []).append((start, end))
        assert set(per_worker) <= gpu_workers
        for address, intervals in per_worker.items():
            assert max_overlap(intervals) <= 2, (address, intervals)
        # Balanced among the qualifying workers.
        assert set(per_worker) == gpu_workers
        assert all(len(v) >= 3 for v in per_worker.values()), per_worker


# -- a worker killed mid-task ------------------------------------------------------------------
def slow_gpu(i):
    start = time.time()
    time.sleep(0.4)
    return corral.get_worker().address, start, time.time()


def test_gpu_tasks_finish_elsewhere_when_a_worker_is_killed():
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=2, processes=True, resources={"GPU": 1}
        ) as cluster,
        Client(cluster) as client,
    ):
        by_name = {w["name"]: a for a, w in client.scheduler_info()["workers"].items()}
        futures = client.map(slow_gpu, range(6), resources={"GPU": 1}, pure=False)
        # Kill worker "0" while it runs a GPU task.
        deadline = time.monotonic() + 30
        while client.scheduler_info()["workers"][by_name["0"]]["processing"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.1)
        cluster.workers["0"].send_signal(signal.SIGKILL)
        runs = client.gather(futures)
        dead = by_name["0"]
        per_worker: dict[str, list[tuple[float, float]]] = {}
        for address, start, end in runs:
            per_worker.setdefault(address, []).append((start, end))
        for address, intervals in per_worker.items():
            assert max_overlap(intervals) == 1, (address, intervals)
        # The dead worker is gone (LocalCluster's nanny may start a new one);
        # the GPUs left are free again for new work.
        info = client.scheduler_info()["workers"]
        assert dead not in info and by_name["1"] in info
        again = client.map(slow_gpu, range(4), resources={"GPU": 1}, pure=False)
        assert dead not in {address for address, _, _ in client.gather(again)}


# -- workers joining later, from the command line ------------------------------------------------
def held_gpus():
    return (
        corral.get_task_resources(),
        corral.task_env().get("CUDA_VISIBLE_DEVICES"),
        corral.get_worker().name,
    )


def worker_env(cluster, **extra):
    env = dict(os.environ)
    env.pop("CORRAL_WORKER_RESOURCES", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env["CORRAL_AUTH_TOKEN"] = cluster.token or ""
    env.update(extra)
    return env


def start_cli_worker(cluster, name, *args, **env):
    return subprocess.Popen(
        [sys.executable, "-m", "corral", "worker", cluster.scheduler_address, "--nthreads", "2",
         "--name", name, "--no-nanny", "--log-level", "WARNING", *args],
        env=worker_env(cluster, **env),
    )  # fmt: skip


@pytest.fixture
def plain_cluster():
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False) as cluster:
        yield cluster


def test_pending_task_runs_when_a_worker_with_the_resource_joins(plain_cluster):
    with Client(plain_cluster) as client:
        fut = client.submit(held_gpus, resources={"GPU": 1}, pure=False)
        deadline = time.monotonic() + 10
        while client.why_pending(fut) != "needs GPU=1; no worker offers GPU":
            assert time.monotonic() < deadline, client.why_pending(fut)
            time.sleep(0.02)
        proc = start_cli_worker(plain_cluster, "gpu-box", CORRAL_WORKER_RESOURCES="GPU=[0,1]")
        try:
            held, visible, name = fut.result(timeout=60)
            assert name == "gpu-box"
            assert held["GPU"] in ([0], [1])
            assert visible == str(held["GPU"][0])
            info = {w["name"]: w for w in client.scheduler_info()["workers"].values()}
            assert info["gpu-box"]["resources"] == {"GPU": 2}
        finally:
            proc.terminate()
            proc.wait(30)


def test_resources_auto_detects_visible_gpus_and_memory(plain_cluster):
    import psutil

    with Client(plain_cluster) as client:
        proc = start_cli_worker(
            plain_cluster, "auto-box", "--resources", "auto", CUDA_VISIBLE_DEVICES="2,3"
        )
        try:
            client.wait_for_workers(2, timeout=60)
            info = {w["name"]: w for w in client.scheduler_info()["workers"].values()}
            assert info["auto-box"]["resources"] == {
                "GPU": 2,
                "MEMORY": psutil.virtual_memory().total,
            }
            futures = client.map(lambda _: held_gpus(), range(2), resources={"GPU": 1}, pure=False)
            for held, visible, name in client.gather(futures):
                assert name == "auto-box" and held["GPU"] in ([2], [3])
                assert visible == str(held["GPU"][0])
        finally:
            proc.terminate()
            proc.wait(30)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--resources", "GPU=-1"], {}, "GPU must be a finite non-negative number, got -1"),
        (["--resources", "GPU=[0,1"], {}, "GPU: '[0,1' has no closing bracket"),
        (
            [],
            {"CORRAL_WORKER_RESOURCES": "MEMORY=lots"},
            "CORRAL_WORKER_RESOURCES: MEMORY: 'lots' is not a number",
        ),
    ],
)
def test_cli_refuses_bad_resources(args, env, message):
    full_env = {k: v for k, v in os.environ.items() if k != "CORRAL_WORKER_RESOURCES"}
    full_env.update(env)
    out = subprocess.run(
        [sys.executable, "-m", "corral", "worker", "tcp://127.0.0.1:1", "--no-nanny", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out
    assert message in out.stderr, out.stderr
