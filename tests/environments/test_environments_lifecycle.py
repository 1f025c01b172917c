"""Worker environments as workers come and go: late joiners, closing, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from corral import Client, LocalCluster, WorkerEnvironment, get_environment_state, get_worker

HERE = os.path.dirname(os.path.abspath(__file__))


def wait_for(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def lines(path):
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


class Logged(WorkerEnvironment):
    """Writes ``<worker name> setup|teardown <env name>`` lines to a file; members: ``names``."""

    def __init__(self, name, log, names=None, fail_setup_on=()):
        self.name = name
        self.log = log
        self.names = names
        self.fail_setup_on = fail_setup_on

    def _write(self, worker, what):
        with open(self.log, "a") as f:
            f.write(f"{worker.name} {what} {self.name}\n")

    def condition(self, worker):
        return self.names is None or worker.name in self.names

    def setup(self, worker):
        if worker.name in self.fail_setup_on:
            raise RuntimeError(f"setup refused on worker {worker.name}")
        self._write(worker, "setup")
        get_environment_state(self.name)["joined"] = time.time()

    def teardown(self, worker):
        self._write(worker, "teardown")


def located():
    return get_worker().name, get_environment_state("gpu-box")["joined"]


def test_late_joiners_waiting_tasks_failures_and_teardown_on_close(tmp_path):
    log = str(tmp_path / "log.txt")
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True)
    with cluster, Client(cluster) as client:
        client.register_worker_environment(environment=Logged("everywhere", log))
        client.register_worker_environment(environment=Logged("gpu-box", log, names=["1"]))
        client.register_worker_environment(environment=Logged("flaky", log, fail_setup_on=["1"]))
        assert lines(log) == ["0 setup everywhere", "0 setup flaky"]
        # no member yet: the task waits, and says why
        f = client.submit(located, environment="gpu-box", pure=False)
        wait_for(lambda: client.why_pending(f) != f"{f.key!r} is not known to the scheduler")
        assert client.why_pending(f) == "needs environment 'gpu-box'; no worker is a member"
        assert not f.done()
        cluster.scale(2)  # worker "1" joins: condition on every environment, setups
        name, joined = f.result(timeout=30)
        assert name == "1" and joined < time.time()
        new = [a for a, w in client.scheduler_info()["workers"].items() if w["name"] == "1"]
        envs = client.environments()
        assert envs["everywhere"] == sorted(client.scheduler_info()["workers"])
        assert envs["gpu-box"] == new
        assert new[0] not in envs["flaky"]
        # the failing setup of a later joiner is an event, with the remote traceback
        failed = [
            msg for _, msg in client.get_events("environments") if msg["action"] == "setup-failed"
        ]
        assert [(e["name"], e["worker"]) for e in failed] == [("flaky", new[0])]
        assert "setup refused on worker 1" in failed[0]["exception"]
        assert "in setup" in failed[0]["traceback"]
        mine = sorted(line for line in lines(log) if line.startswith("1 "))
        assert mine == ["1 setup everywhere", "1 setup gpu-box"]  # exactly once each
    # closing the cluster (SIGTERM to each worker process) tears every member down once
    teardowns = sorted(line for line in lines(log) if "teardown" in line)
    assert teardowns == [
        "0 teardown everywhere",
        "0 teardown flaky",
        "1 teardown everywhere",
        "1 teardown gpu-box",
    ]


# -- SIGTERM to a `corral worker` process ------------------------------------------------------
class Database(WorkerEnvironment):
    name = "database-access"

    def __init__(self, path):
        self.path = path

    def setup(self, worker):
        db = sqlite3.connect(self.path, check_same_thread=False)
        db.execute("CREATE TABLE IF NOT EXISTS rows (what TEXT)")
        get_environment_state(self.name)["db"] = db

    def teardown(self, worker):
        db = get_environment_state(self.name)["db"]
        db.execute("INSERT INTO rows VALUES ('teardown')")
        db.commit()
        db.close()


def insert(value):
    db = get_environment_state("database-access")["db"]
    db.execute("INSERT INTO rows VALUES (?)", (value,))
    db.commit()
    return value


def corral_env():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, env.get("PYTHONPATH")) if p)
    return env


def stop(proc, timeout=15):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)


@pytest.fixture
def procs():
    started = []
    yield started
    for p in started:
        stop(p)


def test_sigterm_to_corral_worker_runs_the_teardown(tmp_path, procs):
    sched_file = tmp_path / "scheduler.json"
    corral = [sys.executable, "-m", "corral"]
    procs.append(
        subprocess.Popen(
            [*corral, "scheduler", "--port", "0", "--scheduler-file", str(sched_file)],
            stderr=subprocess.DEVNULL,
            env=corral_env(),
        )
    )
    wait_for(lambda: sched_file.exists() and sched_file.read_text(), what="the scheduler")
    address = json.loads(sched_file.read_text())["address"]
    worker = subprocess.Popen(
        [*corral, "worker", address, "--nthreads", "1"],
        stderr=subprocess.DEVNULL,
        env=corral_env(),
    )
    procs.append(worker)
    path = str(tmp_path / "app.db")
    with Client(address) as client:
        client.wait_for_workers(1, timeout=30)
        answer = client.register_worker_environment(environment=Database(path))
        assert [r["member"] for r in answer.values()] == [True]
        assert client.gather(client.map(insert, ["a", "b"], environment="database-access")) == [
            "a",
            "b",
        ]
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(20) == 0
        wait_for(lambda: not client.scheduler_info()["workers"], what="the worker to leave")
        assert client.environments() == {"database-access": []}  # outlives its members
    with sqlite3.connect(path) as db:
        assert [r for (r,) in db.execute("SELECT what FROM rows ORDER BY rowid")] == [
            "a",
            "b",
            "teardown",
        ]


def _slow_task_using(env_name, log, seconds):
    state = get_environment_state(env_name)
    with open(log, "a") as f:
        f.write(f"task start {state['joined'] > 0}\n")
    time.sleep(seconds)
    with open(log, "a") as f:
        f.write("task end\n")
    return True


def test_teardown_waits_for_the_running_tasks_that_target_the_environment(tmp_path):
    log = str(tmp_path / "log.txt")
    with (
        LocalCluster(n_workers=1, threads_per_worker=2, processes=False) as cluster,
        Client(cluster) as client,
    ):
        client.register_worker_environment(environment=Logged("db", log))
        running = client.submit(_slow_task_using, "db", log, 1.0, environment="db", pure=False)
        wait_for(lambda: "task start True" in lines(log), what="the task to start")
        client.unregister_worker_environment("db")
        wait_for(lambda: "0 teardown db" in lines(log), what="the teardown")
        assert lines(log) == ["0 setup db", "task start True", "task end", "0 teardown db"]
        # Its run was taken back when the environment went away: it waits for one.
        assert running.status == "pending"
        assert "no environment named 'db' is registered" in client.why_pending(running)
