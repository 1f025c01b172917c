"""Reference counting end to end: dropping the last Future frees the key everywhere."""

from __future__ import annotations

import gc
import time

import pytest

from corral import Client, LocalCluster


def inc(x):
    return x + 1


def add(x, y):
    return x + y


@pytest.fixture(scope="module")
def mcluster():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False) as cluster:
        yield cluster


@pytest.fixture
def c(mcluster):
    with Client(mcluster) as client:
        yield client
    assert_eventually(lambda: task_counts(mcluster) == {}, "a closed client leaves no tasks")


def task_counts(cluster):
    return dict(cluster.scheduler.state.task_counts())


def request_counts(client):
    return client._sync(client._request("task_counts"))


def worker_data(cluster):
    return {w.address: set(w.data) for w in cluster.workers.values()}


def assert_eventually(predicate, message, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out: {message}")
        gc.collect()
        time.sleep(0.01)


def held_keys(client):
    return {k for w in client.scheduler_info()["workers"].values() for k in w["keys"]}


def test_del_future_forgets_key_on_scheduler_and_worker(c, mcluster):
    fut = c.submit(inc, 1)
    assert fut.result() == 2
    key = fut.key
    assert key in held_keys(c)
    assert request_counts(c) == {"memory": 1}
    assert any(key in keys for keys in worker_data(mcluster).values())

    del fut
    gc.collect()
    assert_eventually(lambda: request_counts(c) == {}, "scheduler forgets the key")
    assert key not in held_keys(c)
    assert c.who_has() == {}
    assert_eventually(
        lambda: not any(key in keys for keys in worker_data(mcluster).values()),
        "worker frees the data",
    )


def test_key_kept_while_any_future_for_it_lives(c, mcluster):
    a = c.submit(inc, 10)
    b = c.submit(inc, 10)  # same key (pure)
    assert a.key == b.key
    a.result()
    key = a.key
    del a
    gc.collect()
    time.sleep(0.1)  # give a wrongly sent release time to arrive
    assert request_counts(c) == {"memory": 1}
    assert b.result() == 11
    del b
    assert_eventually(lambda: request_counts(c) == {}, "released after the last future")
    assert key not in held_keys(c)


def test_intermediate_results_freed_once_dependents_done(c, mcluster):
    a = c.submit(inc, 1)
    b = c.submit(inc, a)
    d = c.submit(add, a, b)
    assert d.result() == 5
    keys_ab = {a.key, b.key}
    del a, b
    # as in dask.distributed: the inputs' data is freed, their records stay
    # "released" (the lineage of d) while d lives
    assert_eventually(
        lambda: request_counts(c) == {"memory": 1, "released": 2}, "only d stays in memory"
    )
    assert held_keys(c) == {d.key}
    assert_eventually(
        lambda: not any(keys_ab & keys for keys in worker_data(mcluster).values()),
        "workers free a and b",
    )
    del d
    assert_eventually(lambda: request_counts(c) == {}, "everything forgotten")


def test_dependency_released_by_client_kept_until_dependent_runs(c, mcluster):
    a = c.submit(inc, 1)
    b = c.submit(inc, a)
    del a
    gc.collect()
    assert b.result() == 3
    assert_eventually(
        lambda: request_counts(c) == {"memory": 1, "released": 1}, "a freed after b ran"
    )
    assert held_keys(c) == {b.key}
    del b
    assert_eventually(lambda: request_counts(c) == {}, "everything forgotten")


def test_scattered_data_freed(c, mcluster):
    [x] = c.scatter([list(range(100))], hash=False)
    key = x.key
    assert key in held_keys(c)
    del x
    assert_eventually(lambda: request_counts(c) == {}, "scattered key forgotten")
    assert_eventually(
        lambda: not any(key in keys for keys in worker_data(mcluster).values()),
        "worker frees scattered data",
    )


def test_scatter_equal_values_share_a_key_counted_once_per_future(c, mcluster):
    [keep] = c.scatter([7])
    tmp = c.scatter([7, 7, 8])
    assert tmp[0].key == tmp[1].key == keep.key
    del tmp
    gc.collect()
    assert_eventually(lambda: request_counts(c) == {"memory": 1}, "8 forgotten, 7 kept")
    time.sleep(0.1)  # give a wrongly sent release of 7 time to arrive
    assert held_keys(c) == {keep.key}
    assert c.submit(inc, keep).result() == 8
    del keep
    assert_eventually(lambda: request_counts(c) == {}, "everything forgotten")


def test_gathered_get_graph_leaves_nothing(c, mcluster):
    dsk = {"a": 1, "b": (inc, "a"), "c": (add, "a", "b")}
    assert c.get(dsk, ["c", "b"]) == [3, 2]
    assert_eventually(lambda: request_counts(c) == {}, "client.get releases its keys")
    assert_eventually(lambda: not any(worker_data(mcluster).values()), "workers hold nothing")


def test_release_method(c, mcluster):
    fut = c.submit(inc, 5)
    fut.result()
    fut.release()
    assert_eventually(lambda: request_counts(c) == {}, "release() drops the key")


def test_submit_result_del_loop_does_not_grow(c, mcluster):
    for i in range(300):
        fut = c.submit(inc, i, pure=False)
        assert fut.result() == i + 1
        del fut
    assert_eventually(lambda: request_counts(c) == {}, "no task left after the loop")
    assert_eventually(lambda: not any(worker_data(mcluster).values()), "workers hold nothing")
    sched = mcluster.scheduler.state
    assert not sched.tasks
    assert all(not clients for clients in sched.clients.values())


def test_map_gather_del_loop_does_not_grow(c, mcluster):
    for i in range(20):
        futures = c.map(inc, range(i * 20, i * 20 + 20))
        assert c.gather(futures) == list(range(i * 20 + 1, i * 20 + 21))
        del futures
    assert_eventually(lambda: request_counts(c) == {}, "no task left after the loop")


def test_closing_client_releases_its_keys(mcluster):
    client = Client(mcluster)
    futs = client.map(inc, range(5))
    client.gather(futs)
    assert task_counts(mcluster) == {"memory": 5}
    client.close()
    assert_eventually(lambda: task_counts(mcluster) == {}, "keys of a closed client forgotten")
    assert [f.status for f in futs] == ["finished"] * 5


def test_persisted_collection_freed_when_dropped(c, mcluster):
    da = pytest.importorskip("dask.array")
    x = c.persist(da.arange(100, chunks=10) + 1)
    assert x.sum().compute(scheduler=c.get) == sum(range(1, 101))
    # the chunks stay in memory, their inputs as released lineage (as in dask)
    assert_eventually(
        lambda: request_counts(c) == {"memory": 10, "released": 10}, "only the chunks stay"
    )
    total = c.compute(x.sum())
    assert total.result() == sum(range(1, 101))
    del x, total
    assert_eventually(lambda: request_counts(c) == {}, "persisted chunks forgotten")
    assert_eventually(lambda: not any(worker_data(mcluster).values()), "workers hold nothing")


def test_failed_tasks_forgotten_when_dropped(c, mcluster):
    # The raised exceptions and their tracebacks must not keep the futures alive
    # (a traceback rebuilt on the caller's stack holds result()'s frame, and so
    # the future, from the future's own state).
    bad = c.submit(inc, "not a number")
    child = c.submit(inc, bad)
    with pytest.raises(TypeError):
        child.result()
    with pytest.raises(TypeError):
        bad.result()
    with pytest.raises(TypeError):
        c.gather([child])
    assert isinstance(bad.exception(), TypeError)
    assert bad.traceback() is not None
    with pytest.raises(TypeError):
        c.get({"a": "x", "b": (inc, "a")}, "b")
    del bad, child
    assert_eventually(lambda: request_counts(c) == {}, "erred tasks forgotten")


def test_release_then_resubmit_of_the_same_key_keeps_it(c, mcluster):
    # Releases wait a moment to leave with the next message; they must still
    # reach the scheduler before a later submit of the same key.
    fut = c.submit(inc, 41)
    key = fut.key
    assert fut.result() == 42
    del fut
    again = c.submit(inc, 41)
    assert again.key == key
    time.sleep(0.1)  # well past the lazy release delay
    assert again.result() == 42
    assert mcluster.scheduler.state.tasks[key].who_wants, "the resubmitted key lost its client"
    del again
    assert_eventually(lambda: key not in mcluster.scheduler.state.tasks, "key released")


def test_lone_release_is_sent_without_a_later_message(c, mcluster):
    fut = c.submit(inc, 7)
    key = fut.key
    assert fut.result() == 8
    del fut
    assert_eventually(lambda: key not in mcluster.scheduler.state.tasks, "lone release sent")


def test_a_finished_future_costs_the_garbage_collector_two_objects(c):
    """A client holding 100,000 futures pays for each tracked object at every full
    collection: a finished future is its Future and its FutureState, nothing more
    (no per-future lists; holders in a tuple of strings, which the collector drops)."""
    futures = c.map(inc, range(200), pure=False)
    assert c.gather(futures) == list(range(1, 201))
    gc.collect()
    for f in futures:
        state = f._state
        shared = (state.lock, type(state))
        owned = [o for o in gc.get_referents(state) if gc.is_tracked(o) and o not in shared]
        assert owned == [], (state.key, owned)
