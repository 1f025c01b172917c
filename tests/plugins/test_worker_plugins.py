"""Worker plugins over real sockets: setup, transitions, replacement, teardown, errors."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from corral import Client, LocalCluster, WorkerPlugin, get_worker
from corral.errors import RemoteTraceback


def _log(worker, *entry):
    if not hasattr(worker, "plugin_log"):
        worker.plugin_log = []
    worker.plugin_log.append(entry)


def plugin_log(dask_worker):
    return list(getattr(dask_worker, "plugin_log", []))


class Recorder(WorkerPlugin):
    """Logs setup/teardown into ``worker.plugin_log`` and keeps every transition."""

    def __init__(self, tag="a", name="recorder", idempotent=False):
        self.tag = tag
        self.name = name
        self.idempotent = idempotent
        self.transitions = []

    def setup(self, worker):
        _log(worker, "setup", self.name, self.tag)

    def teardown(self, worker):
        _log(worker, "teardown", self.name, self.tag)

    def transition(self, key, start, finish, **kwargs):
        self.transitions.append((key, start, finish))


class FailingSetup(WorkerPlugin):
    name = "failing-setup"

    def setup(self, worker):
        raise_setup_error(worker.address)


def raise_setup_error(address):
    raise RuntimeError(f"setup broke on {address}")


class FailingTeardown(WorkerPlugin):
    name = "failing-teardown"

    def teardown(self, worker):
        raise OSError("teardown broke")


class AsyncSetup(WorkerPlugin):
    name = "async-setup"

    async def setup(self, worker):
        await asyncio.sleep(0.3)
        worker.async_ready = True


class SlowTransitions(WorkerPlugin):
    name = "slow"

    def transition(self, key, start, finish, **kwargs):
        if finish == "executing":
            time.sleep(0.15)


def inc(x):
    return x + 1


def fail(x):
    raise ZeroDivisionError(f"no {x}")


def transitions_of(name):
    def get(dask_worker):
        return list(dask_worker.plugins[name].transitions)

    return get


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


@pytest.fixture
def one_worker():
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=False) as cluster,
        Client(cluster) as client,
    ):
        yield client


def test_transition_sequences_of_a_successful_and_a_failing_task(one_worker):
    c = one_worker
    assert c.register_plugin(Recorder()) == {
        addr: {"status": "OK"} for addr in c.scheduler_info()["workers"]
    }
    good = c.submit(inc, 1, key="good")
    assert good.result() == 2
    bad = c.submit(fail, 1, key="bad")
    with pytest.raises(ZeroDivisionError):
        bad.result()
    del good, bad  # released: the worker forgets both

    def seen():
        (log,) = c.run(transitions_of("recorder")).values()
        return log

    wait_until(lambda: ("good", "memory", "forgotten") in seen())
    log = seen()
    assert [t for t in log if t[0] == "good"] == [
        ("good", "released", "ready"),
        ("good", "ready", "executing"),
        ("good", "executing", "memory"),
        ("good", "memory", "forgotten"),
    ]
    assert [t for t in log if t[0] == "bad"] == [
        ("bad", "released", "ready"),
        ("bad", "ready", "executing"),
        ("bad", "executing", "error"),
        ("bad", "error", "forgotten"),
    ]


def test_setup_runs_on_every_worker_and_the_worker_is_passed(client):
    result = client.register_plugin(Recorder(tag="x"))
    workers = sorted(client.scheduler_info()["workers"])
    assert sorted(result) == workers
    logs = client.run(plugin_log)
    assert logs == {w: [("setup", "recorder", "x")] for w in workers}
    # Tasks see the plugin through their worker.
    names = client.submit(lambda: sorted(get_worker().plugins), pure=False).result()
    assert names == ["recorder"]


def test_same_name_replaces_unless_idempotent(client):
    client.register_plugin(Recorder(tag="first"))
    client.register_plugin(Recorder(tag="second"))
    expected = [
        ("setup", "recorder", "first"),
        ("teardown", "recorder", "first"),
        ("setup", "recorder", "second"),
    ]
    assert set(map(tuple, client.run(plugin_log).values())) == {tuple(expected)}
    # Idempotent: the registered one is kept, nothing runs.
    assert client.register_plugin(Recorder(tag="third", idempotent=True)) == {}
    assert set(map(tuple, client.run(plugin_log).values())) == {tuple(expected)}
    # Another name is another plugin.
    client.register_plugin(Recorder(tag="other", name="recorder-2"))
    assert all(
        log[-1] == ("setup", "recorder-2", "other") for log in client.run(plugin_log).values()
    )
    names = client.run(lambda dask_worker: sorted(dask_worker.plugins))
    assert set(map(tuple, names.values())) == {("recorder", "recorder-2")}


def test_unnamed_plugins_get_unique_names(client):
    class Anonymous(WorkerPlugin):
        pass

    client.register_plugin(Anonymous())
    client.register_plugin(Anonymous())
    names = client.run(lambda dask_worker: sorted(dask_worker.plugins))
    for found in names.values():
        assert len(found) == 2 and all(n.startswith("Anonymous-") for n in found)


def test_unregister_tears_down_everywhere_and_unknown_name_raises(client):
    client.register_plugin(Recorder(tag="u"))
    result = client.unregister_worker_plugin("recorder")
    assert sorted(result) == sorted(client.scheduler_info()["workers"])
    for log in client.run(plugin_log).values():
        assert log == [("setup", "recorder", "u"), ("teardown", "recorder", "u")]
    assert client.run(lambda dask_worker: dict(dask_worker.plugins)) == {w: {} for w in result}
    with pytest.raises(ValueError, match="no worker plugin named 'recorder'"):
        client.unregister_worker_plugin("recorder")
    with pytest.raises(ValueError, match="nope"):
        client.unregister_worker_plugin("nope")


def test_failing_setup_is_raised_with_traceback_and_worker_address(client):
    workers = sorted(client.scheduler_info()["workers"])
    with pytest.raises(RuntimeError, match="setup broke on") as info:
        client.register_plugin(FailingSetup())
    exc = info.value
    assert str(exc) == f"setup broke on {workers[0]}"
    assert f"raised on {workers[0]}" in getattr(exc, "__notes__", [])
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert "raise_setup_error" in str(exc.__cause__)
    assert workers[0] in str(exc.__cause__)


def test_plugin_registered_before_workers_is_set_up_on_joining_workers():
    with LocalCluster(n_workers=0, processes=False) as cluster, Client(cluster) as c:
        assert c.register_plugin(Recorder(tag="early")) == {}
        assert c.register_plugin(AsyncSetup()) == {}
        cluster.scale(2)
        logs = c.run(plugin_log)
        assert len(logs) == 2
        assert all(log == [("setup", "recorder", "early")] for log in logs.values())
        # Messages sent after the (async) setup started wait for it: the first task sees it.
        assert c.submit(lambda: get_worker().async_ready, pure=False).result() is True
        workers = list(cluster.workers.values())
        cluster.scale(0)
        for w in workers:
            assert w.plugin_log[-1] == ("teardown", "recorder", "early")
            assert w.plugins == {}


def test_failing_setup_on_a_joining_worker_is_logged_and_recorded(caplog):
    with LocalCluster(n_workers=0, processes=False) as cluster, Client(cluster) as c:
        c.register_plugin(FailingSetup())
        with caplog.at_level(logging.WARNING, logger="corral"):
            cluster.scale(1)
            (address,) = c.scheduler_info()["workers"]

            def failures():
                return [
                    msg for _, msg in c.get_events("plugins") if msg["action"] == "setup-failed"
                ]

            wait_until(lambda: failures())
        (event,) = failures()
        assert event["name"] == "failing-setup"
        assert event["worker"] == address
        assert event["exception"] == f"RuntimeError: setup broke on {address}"
        assert "raise_setup_error" in event["traceback"]
        assert any("failing-setup" in r.getMessage() for r in caplog.records)
        all_topics = c.get_events()
        assert "plugins" in all_topics
        # The worker still runs tasks.
        assert c.submit(inc, 41).result() == 42


def test_failing_teardown_is_logged_and_the_worker_still_closes(caplog):
    with LocalCluster(n_workers=1, processes=False) as cluster, Client(cluster) as c:
        c.register_plugin(FailingTeardown())
        c.register_plugin(Recorder(tag="t"))
        (worker,) = cluster.workers.values()
        with caplog.at_level(logging.ERROR, logger="corral"):
            cluster.scale(0)
        assert worker.status == "closed"
        assert worker.plugin_log[-1] == ("teardown", "recorder", "t")
        assert any(
            "failing-teardown" in r.getMessage() and "teardown" in r.getMessage()
            for r in caplog.records
        )


def test_failing_teardown_on_unregister_is_raised(client):
    client.register_plugin(FailingTeardown())
    with pytest.raises(OSError, match="teardown broke"):
        client.unregister_worker_plugin("failing-teardown")
    left = client.run(lambda dask_worker: sorted(dask_worker.plugins))
    assert list(left.values()) == [[], []]


def test_slow_transition_hook_is_reported(one_worker, caplog):
    one_worker.register_plugin(SlowTransitions())
    with caplog.at_level(logging.WARNING, logger="corral.worker.plugins"):
        assert one_worker.submit(inc, 1).result() == 2
    assert any(
        "'slow'" in r.getMessage() and "held the event loop" in r.getMessage()
        for r in caplog.records
    )


def test_failing_transition_hook_does_not_stop_tasks(one_worker, caplog):
    class Broken(WorkerPlugin):
        name = "broken"

        def transition(self, key, start, finish, **kwargs):
            raise KeyError(key)

    one_worker.register_plugin(Broken())
    with caplog.at_level(logging.ERROR, logger="corral.worker.plugins"):
        assert one_worker.gather(one_worker.map(inc, range(10))) == list(range(1, 11))
    messages = [r.getMessage() for r in caplog.records if "'broken'" in r.getMessage()]
    assert messages and len(messages) < 10  # thinned out: 1st, 2nd, 4th, 8th, ...


def test_duck_typed_plugin_and_register_worker_plugin_alias(client):
    class Duck:
        def setup(self, worker):
            _log(worker, "setup", "duck", "-")

    client.register_worker_plugin(Duck(), name="duck")
    assert all(log == [("setup", "duck", "-")] for log in client.run(plugin_log).values())
    with pytest.raises(TypeError):
        client.register_plugin(object())
    with pytest.raises(TypeError, match="instance"):
        client.register_plugin(Recorder)
