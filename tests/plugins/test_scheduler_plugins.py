"""Scheduler plugins: registered by a client or added on the scheduler, hooks, failures."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from corral import Client, LocalCluster, Scheduler, SchedulerPlugin, Worker
from corral.diagnostics.plugin import SchedulerPlugin as CompatSchedulerPlugin


class Watcher(SchedulerPlugin):
    name = "watcher"

    def __init__(self):
        self.seen = []

    async def start(self, scheduler):
        self.seen.append(("start", scheduler.address))

    def add_worker(self, scheduler=None, worker=None, **kwargs):
        self.seen.append(("add_worker", worker, len(scheduler.workers)))

    def remove_worker(self, scheduler=None, worker=None, *, stimulus_id=None, **kwargs):
        self.seen.append(("remove_worker", worker, len(scheduler.workers)))

    def add_client(self, scheduler=None, client=None, **kwargs):
        self.seen.append(("add_client", client))

    def remove_client(self, scheduler=None, client=None, **kwargs):
        self.seen.append(("remove_client", client))

    def update_graph(self, scheduler, *, client, keys, tasks, stimulus_id, **kwargs):
        self.seen.append(("update_graph", client, sorted(keys), sorted(tasks)))

    def transition(self, key, start, finish, *args, stimulus_id, **kwargs):
        self.seen.append(("transition", key, start, finish))

    async def close(self):
        self.seen.append(("close",))


class Broken(SchedulerPlugin):
    name = "broken"

    def transition(self, key, start, finish, *args, **kwargs):
        raise ValueError("hook broke")

    async def add_client(self, scheduler=None, client=None):
        raise RuntimeError("async hook broke")


class FailsToStart(SchedulerPlugin):
    name = "fails"

    def start(self, scheduler):
        raise LookupError("cannot start")


def inc(x):
    return x + 1


def seen_by(name):
    def get(dask_scheduler):
        return list(dask_scheduler.plugins[name].seen)

    return get


def test_registered_scheduler_plugin_sees_events():
    assert CompatSchedulerPlugin is SchedulerPlugin
    with LocalCluster(n_workers=1, processes=False) as cluster, Client(cluster) as c:
        assert c.register_plugin(Watcher()) is None
        seen = c.run_on_scheduler(seen_by("watcher"))
        assert seen == [("start", c.scheduler_address)]
        assert c.submit(inc, 1, key="inc-1").result() == 2
        cluster.scale(2)
        (new,) = set(c.scheduler_info()["workers"]) - {w.address for w in [cluster.workers["0"]]}
        with Client(cluster) as other:
            other_id = other.id
        cluster.scale(1)
        seen = c.run_on_scheduler(seen_by("watcher"))
    assert ("update_graph", c.id, ["inc-1"], ["inc-1"]) in seen
    assert [e for e in seen if e[0] == "transition"] == [
        ("transition", "inc-1", "released", "waiting"),
        ("transition", "inc-1", "waiting", "processing"),
        ("transition", "inc-1", "processing", "memory"),
        ("transition", "inc-1", "memory", "released"),  # its future was dropped
        ("transition", "inc-1", "released", "forgotten"),
    ]
    assert ("add_worker", new, 2) in seen  # the new worker is already counted
    assert ("add_client", other_id) in seen and ("remove_client", other_id) in seen
    assert ("remove_worker", new, 1) in seen  # and already gone


def test_unregister_scheduler_plugin_closes_it():
    with LocalCluster(n_workers=0, processes=False) as cluster, Client(cluster) as c:
        c.register_plugin(Watcher())
        plugin = cluster.scheduler.plugins["watcher"]
        c.unregister_scheduler_plugin("watcher")
        assert plugin.seen[-1] == ("close",)
        assert "watcher" not in cluster.scheduler.plugins
        with pytest.raises(ValueError, match="no scheduler plugin named 'watcher'"):
            c.unregister_scheduler_plugin("watcher")


def test_failing_hooks_are_logged_and_recorded_never_fatal(caplog):
    with LocalCluster(n_workers=1, processes=False) as cluster, Client(cluster) as c:
        with caplog.at_level(logging.ERROR, logger="corral"):
            c.register_plugin(Broken())
            assert c.gather(c.map(inc, range(5))) == list(range(1, 6))
            with Client(cluster):
                pass
            deadline = time.monotonic() + 5
            while not any("async hook broke" in str(r.exc_info) for r in caplog.records):
                assert time.monotonic() < deadline
                time.sleep(0.02)
        events = [m for _, m in c.get_events("plugins") if m["action"] == "scheduler-plugin-failed"]
        assert {e["hook"] for e in events} == {"transition", "add_client"}
        assert any(e["exception"] == "ValueError: hook broke" for e in events)
        # Logged thinned out: 15 transitions failed, fewer log records.
        logged = [r for r in caplog.records if "'broken'" in r.getMessage()]
        assert 2 <= len(logged) < 15
        assert c.submit(inc, 10).result() == 11  # the scheduler is fine


def test_plugin_whose_start_fails_is_reported_and_not_added():
    with LocalCluster(n_workers=0, processes=False) as cluster, Client(cluster) as c:
        with pytest.raises(LookupError, match="cannot start"):
            c.register_plugin(FailsToStart())
        assert "fails" not in cluster.scheduler.plugins


def test_add_plugin_on_the_scheduler_and_start_on_startup():
    async def main():
        scheduler = Scheduler(port=0)
        watcher = Watcher()
        scheduler.add_plugin(watcher)
        scheduler.add_plugin(Watcher(), idempotent=True)  # same name, first kept
        assert scheduler.plugins["watcher"] is watcher
        await scheduler.start()
        assert watcher.seen == [("start", scheduler.address)]
        worker = await Worker(scheduler.address, nthreads=1).start()
        for _ in range(100):
            if len(watcher.seen) > 1:
                break
            await asyncio.sleep(0.01)
        assert watcher.seen[1] == ("add_worker", worker.address, 1)
        await worker.close()
        await scheduler.close()
        assert watcher.seen[-1] == ("close",)
        scheduler.remove_plugin("watcher")
        with pytest.raises(ValueError):
            scheduler.remove_plugin("watcher")

    asyncio.run(main())
