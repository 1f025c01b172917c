"""Preloads and plugins with real processes: the ``corral`` CLI, SIGTERM, LocalCluster scaling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from corral import Client, WorkerPlugin

HERE = os.path.dirname(os.path.abspath(__file__))

# The seed document's example, with Corral's names (corral for distributed).
SCHEDULER_SETUP = """\
# scheduler-setup.py
import click

from corral.diagnostics.plugin import SchedulerPlugin

class MyPlugin(SchedulerPlugin):
    def __init__(self, print_count):
      self.print_count = print_count
      SchedulerPlugin.__init__(self)

    def add_worker(self, scheduler=None, worker=None, **kwargs):
        print("Added a new worker at:", worker)
        if self.print_count and scheduler is not None:
            print("Total workers:", len(scheduler.workers))

@click.command()
@click.option("--print-count/--no-print-count", default=False)
def dask_setup(scheduler, print_count):
    plugin = MyPlugin(print_count)
    scheduler.add_plugin(plugin)
"""


def corral(*args):
    return [sys.executable, "-m", "corral", *args]


def env(**extra):
    out = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    out["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, out.get("PYTHONPATH")) if p)
    return out


def wait_for(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def scheduler_address(path):
    text = read(path)
    return json.loads(text)["address"] if text else None


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


def test_seed_example_click_preload_prints_joining_workers(tmp_path, procs):
    (tmp_path / "scheduler-setup.py").write_text(SCHEDULER_SETUP)
    sched_file = tmp_path / "scheduler.json"
    out = tmp_path / "scheduler.out"
    with open(out, "w") as stdout:
        procs.append(
            subprocess.Popen(
                corral(
                    "scheduler",
                    "--preload",
                    "scheduler-setup.py",
                    "--print-count",
                    "--port",
                    "0",
                    "--scheduler-file",
                    str(sched_file),
                ),
                cwd=tmp_path,
                stdout=stdout,
                stderr=subprocess.DEVNULL,
                env=env(),
            )
        )
    address = wait_for(lambda: scheduler_address(sched_file), what="the scheduler")
    procs.append(
        subprocess.Popen(
            corral("worker", address, "--nthreads", "1"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env(),
        )
    )
    text = wait_for(lambda: "Total workers" in read(out) and read(out), what="the plugin's output")
    lines = text.splitlines()
    assert lines[0].startswith("Added a new worker at: tcp://127.0.0.1:")
    assert lines[1] == "Total workers: 1"
    with Client(address) as c:
        (worker,) = c.scheduler_info()["workers"]
    assert lines[0] == f"Added a new worker at: {worker}"
    assert stop(procs[1]) == 0
    assert stop(procs[0]) == 0


def test_click_preload_rejects_unknown_options(tmp_path):
    (tmp_path / "scheduler-setup.py").write_text(SCHEDULER_SETUP)
    result = subprocess.run(
        corral("scheduler", "--preload", "scheduler-setup.py", "--port", "0", "--bogus"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=env(),
    )
    assert result.returncode == 2
    assert "No such option '--bogus'" in result.stderr
    assert "corral scheduler --preload scheduler-setup.py" in result.stderr
    # Without a click preload, an unknown option is an error too.
    result = subprocess.run(
        corral("scheduler", "--port", "0", "--print-count"),
        capture_output=True,
        text=True,
        timeout=60,
        env=env(),
    )
    assert result.returncode != 0
    assert "unexpected arguments ['--print-count']" in result.stderr


@pytest.mark.parametrize("command", ["scheduler", "worker"])
def test_failing_preload_exits_nonzero_with_a_message(tmp_path, command):
    sched_file = tmp_path / "scheduler.json"
    target = [] if command == "scheduler" else ["tcp://127.0.0.1:1"]
    result = subprocess.run(
        corral(command, *target, "--preload", "no_such_preload_mod", "--port", "0")
        if command == "scheduler"
        else corral(command, *target, "--preload", "no_such_preload_mod"),
        capture_output=True,
        text=True,
        timeout=60,
        env=env(),
    )
    assert result.returncode == 1
    assert "Error: cannot import preload 'no_such_preload_mod'" in result.stderr
    assert "ModuleNotFoundError" in result.stderr

    (tmp_path / "broken_setup.py").write_text(
        "def corral_setup(service):\n    raise RuntimeError('license server down')\n"
    )
    args = ["--port", "0", "--scheduler-file", str(sched_file)] if command == "scheduler" else []
    result = subprocess.run(
        corral(command, *target, "--preload", str(tmp_path / "broken_setup.py"), *args),
        capture_output=True,
        text=True,
        timeout=60,
        env=env(),
    )
    assert result.returncode == 1
    assert "setup failed: RuntimeError: license server down" in result.stderr
    assert not sched_file.exists()  # never half-started


class FileTeardown(WorkerPlugin):
    """Appends to a file on setup and teardown (imported by the worker from this folder)."""

    name = "file-teardown"

    def __init__(self, path):
        self.path = path

    def setup(self, worker):
        with open(self.path, "a") as f:
            f.write("plugin-setup\n")

    def teardown(self, worker):
        with open(self.path, "a") as f:
            f.write("plugin-teardown\n")


def test_sigterm_to_corral_worker_runs_plugin_and_preload_teardowns(tmp_path, procs):
    log = tmp_path / "log.txt"
    (tmp_path / "worker_preload.py").write_text(
        textwrap.dedent(
            f"""
            def corral_setup(worker):
                with open({str(log)!r}, "a") as f:
                    f.write("preload-setup\\n")

            def corral_teardown(worker):
                with open({str(log)!r}, "a") as f:
                    f.write("preload-teardown " + worker.status + "\\n")
            """
        )
    )
    sched_file = tmp_path / "scheduler.json"
    procs.append(
        subprocess.Popen(
            corral("scheduler", "--port", "0", "--scheduler-file", str(sched_file)),
            stderr=subprocess.DEVNULL,
            env=env(),
        )
    )
    address = wait_for(lambda: scheduler_address(sched_file), what="the scheduler")
    preload = str(tmp_path / "worker_preload.py")
    worker = subprocess.Popen(
        corral("worker", address, "--nthreads", "1", "--preload", preload),
        stderr=subprocess.DEVNULL,
        env=env(),
    )
    procs.append(worker)
    with Client(address) as c:
        c.wait_for_workers(1, timeout=30)
        assert list(c.register_plugin(FileTeardown(str(log))).values()) == [{"status": "OK"}]
        assert read(log).splitlines() == ["preload-setup", "plugin-setup"]
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(20) == 0
        wait_for(lambda: not c.scheduler_info()["workers"], what="the worker to leave")
    assert read(log).splitlines() == [
        "preload-setup",
        "plugin-setup",
        "plugin-teardown",
        "preload-teardown closing",
    ]


MAIN_SCRIPT = """
import sys
from corral import Client, LocalCluster, WorkerPlugin


class Marker(WorkerPlugin):  # defined in __main__: travels by value
    name = "marker"

    def __init__(self, path):
        self.path = path

    def setup(self, worker):
        with open(self.path, "a") as f:
            f.write(f"setup {worker.name}\\n")

    def teardown(self, worker):
        with open(self.path, "a") as f:
            f.write(f"teardown {worker.name}\\n")


if __name__ == "__main__":
    with LocalCluster(n_workers=0, threads_per_worker=1, processes=True) as cluster:
        with Client(cluster) as c:
            assert c.register_plugin(Marker(sys.argv[1])) == {}
            cluster.scale(2)
            print(sorted(c.run(lambda dask_worker: sorted(dask_worker.plugins)).values()))
            cluster.scale(0)
            print(len(c.scheduler_info()["workers"]))
"""


def test_plugin_from_main_set_up_on_scaled_worker_processes_and_torn_down(tmp_path):
    script = tmp_path / "main_script.py"
    script.write_text(MAIN_SCRIPT)
    log = tmp_path / "log.txt"
    result = subprocess.run(
        [sys.executable, str(script), str(log)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[['marker'], ['marker']]", "0"]
    lines = read(log).splitlines()
    assert sorted(lines) == ["setup 0", "setup 1", "teardown 0", "teardown 1"]
    assert lines.index("setup 0") < lines.index("teardown 0")
