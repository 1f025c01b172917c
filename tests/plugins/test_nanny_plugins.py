"""Nanny plugins over real processes: set up in each worker's supervisor (corral.nanny).

``LocalCluster(processes=True)`` supervises its workers from this process;
``corral worker`` (with its default ``--nanny``) is a supervisor process of its
own.  Plugin classes are made inside functions so that cloudpickle ships them
by value to a supervisor that cannot import this module.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corral import Client, Environ, LocalCluster, NannyPlugin

VAR = "CORRAL_TEST_NANNY_VAR"


def poll(predicate, what, timeout=60.0):
    """Call ``predicate`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def recorder(folder, name="recorder"):
    """A nanny plugin writing its process id to ``folder`` on setup and teardown."""

    class Recorder(NannyPlugin):
        def __init__(self):
            self.name = name
            self.folder = str(folder)

        def setup(self, nanny):
            with open(os.path.join(self.folder, f"setup-{nanny.id}"), "w") as f:
                f.write(str(os.getpid()))

        def teardown(self, nanny):
            with open(os.path.join(self.folder, f"teardown-{nanny.id}"), "w") as f:
                f.write(str(os.getpid()))

    return Recorder()


def records(folder, kind):
    """``[pid, ...]`` written by :func:`recorder` plugins for ``kind`` (setup, teardown)."""
    return [int(p.read_text()) for p in sorted(folder.glob(f"{kind}-*"))]


def failing():
    class Failing(NannyPlugin):
        name = "failing"

        def setup(self, nanny):
            raise OSError(f"no such device: nanny-setup-failure in process {os.getpid()}")

    return Failing()


# ``os.getenv`` travels by reference (``os.environ.get`` would carry this process's environ).
getenv = os.getenv


def worker_pids(client):
    return {a: w["pid"] for a, w in client.scheduler_info()["workers"].items()}


@pytest.fixture
def supervised():
    """One worker process supervised by this process (LocalCluster), and a client."""
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=True) as cluster,
        Client(cluster) as client,
    ):
        yield cluster, client


def test_setup_runs_in_the_supervisor_not_the_worker_and_teardown_on_removal(supervised, tmp_path):
    _, client = supervised
    ((address, worker_pid),) = worker_pids(client).items()
    assert client.register_plugin(recorder(tmp_path)) == {address: {"status": "OK"}}
    (setup_pid,) = records(tmp_path, "setup")
    assert setup_pid != worker_pid
    assert setup_pid == os.getpid()  # LocalCluster supervises from this process
    assert worker_pids(client) == {address: worker_pid}  # restart = False: no restart
    assert records(tmp_path, "teardown") == []

    assert client.unregister_worker_plugin("recorder", nanny=True) == {address: {"status": "OK"}}
    assert records(tmp_path, "teardown") == [os.getpid()]
    with pytest.raises(ValueError, match="no nanny plugin named 'recorder'"):
        client.unregister_worker_plugin("recorder", nanny=True)


def test_environ_restarts_workers_and_reaches_tasks_and_later_workers(supervised):
    cluster, client = supervised
    before = worker_pids(client)
    assert client.submit(getenv, VAR, pure=False).result() is None
    result = client.register_plugin(Environ({VAR: 42}))
    assert [s["status"] for s in result.values()] == ["OK"]
    after = worker_pids(client)
    assert set(after.values()).isdisjoint(before.values())  # a fresh process
    assert client.submit(getenv, VAR, pure=False).result() == "42"

    cluster.scale(2)
    client.wait_for_workers(2, timeout=60)
    # The new worker joins, its supervisor sets the plugin up and restarts it once.
    poll(
        lambda: list(client.run(getenv, VAR, on_error="ignore").values()) == ["42", "42"],
        "the later worker to restart with the variable",
    )


def test_failing_setup_is_raised_with_the_remote_traceback(supervised):
    _, client = supervised
    (address,) = worker_pids(client)
    # Raised in the supervisor: LocalCluster's is this process, not the worker.
    with pytest.raises(OSError, match=rf"nanny-setup-failure in process {os.getpid()}\b") as info:
        client.register_plugin(failing())
    remote = str(info.value.__cause__)  # the remote traceback
    assert address in remote
    assert "in setup" in remote  # the plugin's frame, in the supervisor
    # Kept registered, as worker plugins are: it can be removed.
    assert client.unregister_worker_plugin("failing", nanny=True) == {address: {"status": "OK"}}


def test_unsupervised_workers_are_reported_as_having_no_nanny():
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=False) as cluster,
        Client(cluster) as client,
    ):
        result = client.register_plugin(Environ({VAR: "x"}))
        assert len(result) == 2
        for address, status in result.items():
            assert status["status"] == "no-nanny"
            assert address in status["message"] and "supervisor" in status["message"]
        assert client.submit(getenv, VAR, pure=False).result() is None


@contextlib.contextmanager
def corral_worker(address, token, log):
    """``corral worker ADDRESS`` (a supervisor process and its worker child)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("CORRAL_AUTH_TOKEN_FILE", None)
    env.pop(VAR, None)
    if token:
        env["CORRAL_AUTH_TOKEN"] = token
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "corral", "worker", address, "--nthreads", "1"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_corral_worker_supervisor_runs_setup_and_a_later_worker_gets_it(tmp_path):
    with (
        LocalCluster(n_workers=0, processes=True) as cluster,
        Client(cluster) as client,
        corral_worker(cluster.scheduler_address, cluster.token, tmp_path / "a.log") as first,
    ):
        client.wait_for_workers(1, timeout=60)
        ((address, worker_pid),) = worker_pids(client).items()
        plugin_dir = tmp_path / "records"
        plugin_dir.mkdir()
        assert client.register_plugin(recorder(plugin_dir)) == {address: {"status": "OK"}}
        assert records(plugin_dir, "setup") == [first.pid]  # the supervisor process
        assert first.pid not in (worker_pid, os.getpid())

        client.register_plugin(Environ({VAR: "from-the-nanny"}))
        with corral_worker(cluster.scheduler_address, cluster.token, tmp_path / "b.log") as later:
            poll(lambda: len(worker_pids(client)) == 2, "the later worker")
            poll(
                lambda: (
                    list(client.run(getenv, VAR, on_error="ignore").values())
                    == ["from-the-nanny"] * 2
                ),
                "the later worker to restart with the variable",
            )
            assert sorted(records(plugin_dir, "setup")) == sorted([first.pid, later.pid])

            # A supervisor stopping for good tears its nanny plugins down.
            later.send_signal(signal.SIGTERM)
            assert later.wait(60) == 0
            assert records(plugin_dir, "teardown") == [later.pid]


def test_the_example_of_docs_plugins_md_runs_as_written(supervised):
    _, client = supervised
    doc = (Path(__file__).resolve().parents[2] / "docs" / "plugins.md").read_text()
    (example,) = [b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if "Scratch" in b]
    namespace = {"__name__": "__main__", "client": client}
    exec(example, namespace)
    assert client.submit(getenv, "MY_SETTING", pure=False).result() == "on"
    scratch = client.submit(getenv, "SCRATCH", pure=False).result()
    assert scratch and not os.path.exists(scratch)  # made by setup, removed by teardown
