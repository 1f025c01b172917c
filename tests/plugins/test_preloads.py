"""Preloads in process: import, setup/teardown names, click options, errors, environment."""

from __future__ import annotations

import asyncio
import sys
import textwrap

import click
import pytest

from corral import Client, LocalCluster, Scheduler, Worker
from corral.preload import PreloadError, Preloads, preload_names

RECORDING = """
import sys
CALLS = sys.modules.setdefault("_corral_preload_calls", type(sys)("_corral_preload_calls"))
if not hasattr(CALLS, "log"):
    CALLS.log = []

def record(*entry):
    CALLS.log.append(entry)
"""


@pytest.fixture
def calls():
    module = sys.modules.setdefault("_corral_preload_calls", type(sys)("_corral_preload_calls"))
    module.log = []
    yield module.log
    module.log = []


def write(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(RECORDING + textwrap.dedent(body))
    return str(path)


def test_corral_setup_and_teardown_run_around_the_scheduler(tmp_path, calls):
    path = write(
        tmp_path,
        "sched_pre.py",
        """
        def corral_setup(scheduler):
            record("setup", type(scheduler).__name__, scheduler.address)

        async def corral_teardown(scheduler):
            record("teardown", scheduler.address)
        """,
    )

    async def main():
        scheduler = Scheduler(port=0, preload=[path])
        assert calls == []  # imported, not set up yet
        await scheduler.start()
        assert calls == [("setup", "Scheduler", scheduler.address)]
        await scheduler.close()
        assert calls[-1] == ("teardown", scheduler.address)

    asyncio.run(main())


def test_dask_names_and_async_setup_on_a_worker(tmp_path, calls):
    path = write(
        tmp_path,
        "worker_pre.py",
        """
        import asyncio

        async def dask_setup(worker):
            await asyncio.sleep(0.01)
            # the worker has its address but has not registered yet
            record("setup", type(worker).__name__, bool(worker.address), worker.status)

        def dask_teardown(worker):
            record("teardown", worker.status)
        """,
    )

    async def main():
        scheduler = await Scheduler(port=0).start()
        worker = await Worker(scheduler.address, nthreads=1, preload=path).start()
        assert calls == [("setup", "Worker", True, "created")]
        for _ in range(200):
            if scheduler.workers:
                break
            await asyncio.sleep(0.01)
        assert len(scheduler.workers) == 1
        await worker.close()
        assert calls[-1] == ("teardown", "closing")
        await scheduler.close()

    asyncio.run(main())


def test_module_name_preload_and_click_options(tmp_path, calls, monkeypatch):
    write(
        tmp_path,
        "clicky_pre.py",
        """
        import click

        @click.command()
        @click.option("--count", type=int, default=1)
        @click.option("--flag/--no-flag", default=False)
        def corral_setup(scheduler, count, flag):
            record("setup", count, flag)
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    async def main(argv):
        scheduler = await Scheduler(port=0, preload="clicky_pre", preload_argv=argv).start()
        await scheduler.close()

    asyncio.run(main(["--count", "3", "--flag"]))
    asyncio.run(main([]))
    assert calls == [("setup", 3, True), ("setup", 1, False)]
    with pytest.raises(click.UsageError, match="--bogus"):
        Scheduler(port=0, preload="clicky_pre", preload_argv=["--bogus"])


def test_arguments_without_a_click_preload_are_refused(tmp_path):
    path = write(tmp_path, "plain_pre.py", "def corral_setup(s):\n    pass\n")
    with pytest.raises(PreloadError, match="unexpected arguments"):
        Preloads("scheduler", [path], ["--x"])


def test_import_errors_are_preload_errors(tmp_path):
    with pytest.raises(PreloadError, match="cannot import preload 'no_such_module_xyz'"):
        Scheduler(port=0, preload="no_such_module_xyz")
    with pytest.raises(PreloadError, match="no such file"):
        Worker("tcp://127.0.0.1:1", preload=str(tmp_path / "missing.py"))
    bad = tmp_path / "bad_pre.py"
    bad.write_text("raise ImportError('needs numpy 9')\n")
    with pytest.raises(PreloadError, match="needs numpy 9"):
        Scheduler(port=0, preload=str(bad))


def test_failing_setup_stops_the_start_and_tears_down_what_started(tmp_path, calls):
    ok = write(
        tmp_path,
        "ok_pre.py",
        """
        def corral_setup(s):
            record("ok-setup")

        def corral_teardown(s):
            record("ok-teardown")
        """,
    )
    bad = write(
        tmp_path,
        "bad_setup_pre.py",
        """
        def corral_setup(s):
            raise RuntimeError("no database")

        def corral_teardown(s):
            record("bad-teardown")
        """,
    )

    async def main():
        scheduler = Scheduler(port=0, preload=[ok, bad])
        with pytest.raises(PreloadError, match="setup failed: RuntimeError: no database"):
            await scheduler.start()
        assert scheduler.status == "closed"
        await asyncio.wait_for(scheduler.finished(), 1)
        running = await Scheduler(port=0).start()
        worker = Worker(running.address, preload=[ok, bad])
        with pytest.raises(PreloadError, match="no database"):
            await worker.start()
        assert worker.status == "closed"
        assert running.workers == {}  # it never registered
        await running.close()

    asyncio.run(main())
    assert calls == [("ok-setup",), ("ok-teardown",), ("ok-setup",), ("ok-teardown",)]


def test_environment_variables(monkeypatch):
    monkeypatch.setenv("CORRAL_PRELOAD", "a, b")
    assert preload_names("worker", None) == ["a", "b"]
    monkeypatch.setenv("CORRAL_WORKER_PRELOAD", "c")
    assert preload_names("worker", None) == ["c"]
    assert preload_names("scheduler", None) == ["a", "b"]
    assert preload_names("scheduler", ["x"]) == ["x"]  # explicit wins
    assert preload_names("scheduler", "y") == ["y"]


def test_environment_preload_is_used(tmp_path, calls, monkeypatch):
    path = write(
        tmp_path, "env_pre.py", "def corral_setup(s):\n    record('env', type(s).__name__)\n"
    )
    monkeypatch.setenv("CORRAL_SCHEDULER_PRELOAD", path)

    async def main():
        await (await Scheduler(port=0).start()).close()

    asyncio.run(main())
    assert calls == [("env", "Scheduler")]


def test_local_cluster_preloads_in_process(tmp_path, calls):
    sched = write(
        tmp_path,
        "lc_sched_pre.py",
        """
        import click

        @click.command()
        @click.option("--tag")
        def corral_setup(scheduler, tag):
            record("scheduler", tag)
        """,
    )
    work = write(tmp_path, "lc_work_pre.py", "def corral_setup(w):\n    record('worker', w.name)\n")
    with (
        LocalCluster(
            n_workers=2,
            processes=False,
            preload=sched,
            preload_argv=["--tag", "t1"],
            worker_preload=[work],
        ) as cluster,
        Client(cluster) as c,
    ):
        assert len(c.scheduler_info()["workers"]) == 2
    assert calls[0] == ("scheduler", "t1")
    assert sorted(calls[1:]) == [("worker", "0"), ("worker", "1")]


def test_plugin_added_by_a_preload_failing_to_start_stops_the_scheduler(tmp_path):
    path = write(
        tmp_path,
        "bad_plugin_pre.py",
        """
        from corral import SchedulerPlugin

        class NoStart(SchedulerPlugin):
            async def start(self, scheduler):
                raise ConnectionError("metrics backend unreachable")

        def corral_setup(scheduler):
            scheduler.add_plugin(NoStart(), name="nostart")
        """,
    )

    async def main():
        scheduler = Scheduler(port=0, preload=path)
        with pytest.raises(PreloadError, match="'nostart': start failed: ConnectionError"):
            await scheduler.start()
        assert scheduler.status == "closed"

    asyncio.run(main())
