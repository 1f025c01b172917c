"""The ``corral`` command in real subprocesses: scheduler, workers, demo."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from corral import Client

# Workers started from the command line cannot import this test module:
# lambdas travel by value.
inc = lambda x: x + 1  # noqa: E731
pid_of_task = lambda _: __import__("os").getpid()  # noqa: E731


class Proc:
    """A ``python -m corral ...`` subprocess whose output goes to a file."""

    def __init__(self, tmp_path, name, *args):
        self.log = tmp_path / f"{name}.log"
        self._out = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "corral", *args],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: teardown kills its children too
        )

    @property
    def pid(self):
        return self.proc.pid

    def output(self):
        return self.log.read_text(errors="replace")

    def terminate(self, timeout=30):
        """SIGTERM, then the exit code (SIGKILL and fail if it does not stop)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"did not stop on SIGTERM; output:\n{self.output()}")

    def stop(self):
        """Kill what is left of the process and of its children (whatever happened)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._out.close()


@pytest.fixture
def procs(tmp_path):
    started = []

    def start(name, *args):
        p = Proc(tmp_path, name, *args)
        started.append(p)
        return p

    yield start
    for p in reversed(started):
        p.stop()


def wait_for_file(path, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.proc.poll() is not None:
            pytest.fail(f"exited with {proc.proc.returncode}:\n{proc.output()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{path} did not appear; output:\n{proc.output()}")
        time.sleep(0.05)
    with open(path) as f:
        return json.load(f)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(predicate, message, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out: {message}")
        time.sleep(0.05)


def test_scheduler_and_workers_from_the_command_line(procs, tmp_path):
    sched_file = str(tmp_path / "scheduler.json")
    sched = procs("scheduler", "scheduler", "--port", "0", "--scheduler-file", sched_file)
    info = wait_for_file(sched_file, sched)
    assert info["address"].startswith("tcp://127.0.0.1:")
    assert info["pid"] == sched.pid
    workers = procs(
        "workers", "worker", "--scheduler-file", sched_file, "--nworkers", "2", "--nthreads", "1"
    )
    with Client(info["address"], timeout=60) as client:
        client.wait_for_workers(2, timeout=60)
        winfo = client.scheduler_info()["workers"]
        assert len(winfo) == 2
        assert {w["nthreads"] for w in winfo.values()} == {1}
        pids = {w["pid"] for w in winfo.values()}
        assert len(pids) == 2 and workers.pid not in pids and sched.pid not in pids
        assert client.gather(client.map(inc, range(10))) == list(range(1, 11))
        ran_on = set(client.gather(client.map(pid_of_task, range(20))))
        assert ran_on <= pids

        assert workers.terminate() == 0
        poll(lambda: not client.scheduler_info()["workers"], "the workers leave the scheduler")
        poll(lambda: not any(psutil.pid_exists(p) for p in pids), "worker processes exit")
    assert sched.terminate() == 0
    assert f"Scheduler at: {info['address']}" in sched.output()
    assert "Traceback" not in sched.output()
    assert "Traceback" not in workers.output()


def test_worker_started_before_scheduler_retries(procs, tmp_path):
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    worker = procs("worker", "worker", address, "--nthreads", "1", "--name", "early")
    time.sleep(1.0)  # the worker is retrying a refused address meanwhile
    assert worker.proc.poll() is None, worker.output()
    sched = procs("scheduler", "scheduler", "--port", str(port))
    with Client(address, timeout=60) as client:
        client.wait_for_workers(1, timeout=60)
        [w] = client.scheduler_info()["workers"].values()
        assert w["name"] == "early"
        # the worker process itself, or the one its nanny started
        assert worker.pid in (w["pid"], psutil.Process(w["pid"]).ppid())
        assert client.submit(inc, 1).result(timeout=30) == 2
    # stopping the scheduler stops a worker cleanly too
    assert sched.terminate() == 0
    assert worker.proc.wait(30) == 0, worker.output()


def test_worker_waits_for_scheduler_file(procs, tmp_path):
    sched_file = str(tmp_path / "later.json")
    worker = procs("worker", "worker", "--scheduler-file", sched_file, "--nthreads", "1")
    time.sleep(0.5)
    assert worker.proc.poll() is None, worker.output()
    sched = procs("scheduler", "scheduler", "--port", "0", "--scheduler-file", sched_file)
    info = wait_for_file(sched_file, sched)
    with Client(info["address"], timeout=60) as client:
        client.wait_for_workers(1, timeout=60)
        assert client.submit(inc, 41).result(timeout=30) == 42
    assert worker.terminate() == 0
    assert sched.terminate() == 0


def test_worker_cli_rejects_bad_options(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "corral", "worker", "tcp://127.0.0.1:1", "--nworkers", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "--nworkers" in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "corral", "worker"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0
    assert "scheduler-file" in out.stderr


def test_version():
    import corral

    out = subprocess.run(
        [sys.executable, "-m", "corral", "--version"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    assert corral.__version__ in out.stdout


def test_demo_runs_and_narrates():
    out = subprocess.run(
        [sys.executable, "-m", "corral", "demo", "--tasks", "200"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    text = out.stdout
    assert lines[0].startswith("Started a local cluster at tcp://")
    assert sum(1 for line in lines if line.strip().startswith("worker ")) == 2
    assert f"sum of squares {sum(i * i for i in range(200))}" in text
    assert f"-> {sum(i * i for i in range(1024))}" in text
    assert "square(square(12)) = 20736" in text
    assert "caught ValueError(odd input 3)" in text
    assert "dask.array: (x * 2).mean() over 10 chunks = 999999.0" in text
    assert lines[-1].startswith("Closed the cluster.")
    assert "Traceback" not in out.stderr
