"""End-to-end tests of the client API over real sockets (in-process workers).

Every test here talks to a real scheduler and two real workers through TCP; the
expected values are what ``dask.distributed`` returns for the same calls.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
import types

import pytest

import corral
from corral import Client, Future, LocalCluster, as_completed, get_worker, wait
from corral.client.wait import ALL_COMPLETED, FIRST_COMPLETED, DoneAndNotDoneFutures


def inc(x):
    return x + 1


def add(x, y=0, z=0):
    return x + y + z


def slowinc(x, delay=0.05):
    time.sleep(delay)
    return x + 1


def total(*args, **kwargs):
    """Sum of every number in args/kwargs, lists and dicts included."""

    def flat(obj):
        if isinstance(obj, list | tuple | set):
            return sum(flat(o) for o in obj)
        if isinstance(obj, dict):
            return sum(flat(v) for v in obj.values())
        return obj

    return flat(list(args)) + flat(kwargs)


def div(x, y):
    return x / y


def raise_value_error_from_task(x):
    raise ValueError(f"bad value {x}")


def wait_on_event(event_name):
    """Block until the in-process event named ``event_name`` is set (max 30s)."""
    EVENTS[event_name].wait(30)
    return event_name


EVENTS: dict[str, threading.Event] = {}


@pytest.fixture(scope="module")
def mcluster():
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=False) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def c(mcluster):
    with Client(mcluster) as client:
        yield client


@pytest.fixture
def event():
    name = f"ev-{len(EVENTS)}-{time.monotonic_ns()}"
    ev = EVENTS[name] = threading.Event()
    yield name, ev
    ev.set()
    EVENTS.pop(name, None)


# -- submit ----------------------------------------------------------------------------
def test_submit_result(c):
    fut = c.submit(inc, 10)
    assert isinstance(fut, Future)
    assert fut.result() == 11
    assert fut.status == "finished"
    assert fut.done()
    assert fut.key.startswith("inc-")


def test_submit_kwargs(c):
    assert c.submit(add, 1, y=2, z=3).result() == 6
    assert c.submit(add, x=1, z=5).result() == 6


def test_submit_lambda_and_builtin(c):
    assert c.submit(lambda a, b: a * b, 6, 7).result() == 42
    assert c.submit(sum, [1, 2, 3]).result() == 6
    assert c.submit(sum, [1, 2, 3]).key.startswith("sum-")


def test_pure_submit_dedups_to_same_key(c):
    a = c.submit(inc, 100)
    b = c.submit(inc, 100)
    assert a.key == b.key
    assert a == b
    assert a.result() == b.result() == 101
    other = c.submit(inc, 101)
    assert other.key != a.key


def test_impure_submit_gets_new_keys(c):
    a = c.submit(inc, 100, pure=False)
    b = c.submit(inc, 100, pure=False)
    assert a.key != b.key
    assert a.result() == b.result() == 101


def test_submit_explicit_key(c):
    fut = c.submit(inc, 1, key="my-explicit-key")
    assert fut.key == "my-explicit-key"
    assert fut.result() == 2
    assert c.who_has([fut])["my-explicit-key"]


def test_future_arguments_become_dependencies(c):
    a = c.submit(inc, 1)
    b = c.submit(inc, a)
    d = c.submit(add, a, y=b)
    assert b.result() == 3
    assert d.result() == 5


def test_futures_nested_in_lists_and_dicts(c):
    futs = [c.submit(inc, i) for i in range(4)]  # 1 + 2 + 3 + 4
    x = c.submit(inc, 100)
    res = c.submit(total, [futs[0], (futs[1], [futs[2]])], {"k": futs[3]}, extra={"a": [x]})
    assert res.result() == 10 + 101


def test_submit_non_callable_raises(c):
    with pytest.raises(TypeError):
        c.submit(1, 2)


def big_bytes(i):
    return bytes([i % 256]) * 100_000  # larger than what travels with the completion notice


def test_results_fetched_from_many_threads_at_once(c):
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import wait as cf_wait

    futures = c.map(big_bytes, range(40), pure=False)
    wait(futures)
    with ThreadPoolExecutor(8) as pool:
        jobs = [pool.submit(f.result) for f in futures]
        _, not_done = cf_wait(jobs, timeout=30)
        assert not not_done, "fetching results from several threads hung"
    assert [j.result() for j in jobs] == [big_bytes(i) for i in range(40)]


# -- map ---------------------------------------------------------------------------------
def test_map_single_iterable(c):
    futures = c.map(inc, range(10))
    assert len(futures) == 10
    assert c.gather(futures) == list(range(1, 11))
    assert all(f.key.startswith("inc-") for f in futures)


def test_map_several_iterables_and_kwargs(c):
    futures = c.map(add, [1, 2, 3], [10, 20, 30], z=100)
    assert c.gather(futures) == [111, 122, 133]


def test_map_stops_at_shortest_iterable(c):
    assert c.gather(c.map(add, [1, 2, 3], [10, 20])) == [11, 22]


def test_map_key_list(c):
    keys = ["mk-a", "mk-b", "mk-c"]
    futures = c.map(inc, [1, 2, 3], key=keys)
    assert [f.key for f in futures] == keys
    assert c.gather(futures) == [2, 3, 4]


def test_map_key_list_wrong_length(c):
    with pytest.raises(ValueError):
        c.map(inc, [1, 2, 3], key=["a", "b"])


def test_map_key_prefix(c):
    futures = c.map(inc, [1, 2, 3], key="myprefix")
    assert all(f.key.startswith("myprefix-") for f in futures)
    assert len({f.key for f in futures}) == 3
    assert c.gather(futures) == [2, 3, 4]


def test_map_pure_and_impure(c):
    a = c.map(inc, [5, 6])
    b = c.map(inc, [5, 6])
    assert [f.key for f in a] == [f.key for f in b]
    x = c.map(inc, [5, 6], pure=False)
    y = c.map(inc, [5, 6], pure=False)
    assert not {f.key for f in x} & {f.key for f in y}
    assert c.gather(x) == c.gather(y) == [6, 7]


def test_map_sends_large_maps_in_batches(c, mcluster):
    from corral.protocol.messages import UpdateGraph

    ops = mcluster.scheduler.observer.client_ops
    before = ops.get(UpdateGraph, 0)
    futures = c.map(inc, range(2_500), batch_size=1_000, pure=False)
    assert c.gather(futures) == list(range(1, 2_501))
    assert ops.get(UpdateGraph, 0) - before == 3  # 1,000 + 1,000 + 500


def test_map_over_futures(c):
    first = c.map(inc, range(5))
    second = c.map(inc, first)
    assert c.gather(second) == list(range(2, 7))


# -- gather ------------------------------------------------------------------------------
def test_gather_nested_structures(c):
    a, b, d = c.submit(inc, 1), c.submit(inc, 2), c.submit(inc, 3)
    out = c.gather({"x": [a, (b, 5)], "y": {"z": d}, "plain": "s"})
    assert out == {"x": [2, (3, 5)], "y": {"z": 4}, "plain": "s"}
    assert c.gather(a) == 2
    assert c.gather((a, b)) == (2, 3)


def test_gather_errors_skip(c):
    good = c.submit(inc, 1)
    bad = c.submit(div, 1, 0)
    with pytest.raises(ZeroDivisionError):
        c.gather([good, bad])
    assert c.gather([good, bad], errors="skip") == [2]
    assert c.gather({"g": good, "b": bad}, errors="skip") == {"g": 2}


def test_gather_bad_errors_argument(c):
    with pytest.raises(ValueError):
        c.gather([], errors="ignore")


# -- scatter -----------------------------------------------------------------------------
def test_scatter_list_then_submit(c):
    futures = c.scatter([1, 2, 3])
    assert isinstance(futures, list) and len(futures) == 3
    assert c.gather(c.scatter((1, 1, "a"))) == (1, 1, "a")  # tuple in, tuple out
    assert all(isinstance(f, Future) and f.status == "finished" for f in futures)
    assert c.gather(futures) == [1, 2, 3]
    assert c.submit(total, futures).result() == 6
    assert c.gather(c.map(inc, futures)) == [2, 3, 4]


def test_scatter_dict_keeps_keys(c):
    futures = c.scatter({"sc-a": 10, "sc-b": 20})
    assert set(futures) == {"sc-a", "sc-b"}
    assert futures["sc-a"].key == "sc-a"
    assert c.submit(add, futures["sc-a"], futures["sc-b"]).result() == 30


def test_scatter_single(c):
    fut = c.scatter(123)
    assert isinstance(fut, Future)
    assert repr(fut) == f"<Future: finished, type: int, key: {fut.key}>"
    assert fut.result() == 123
    assert c.submit(inc, fut).result() == 124


def test_scatter_hash_dedups(c):
    a = c.scatter("same-data")
    b = c.scatter("same-data")
    assert a.key == b.key
    x = c.scatter("same-data", hash=False)
    assert x.key != a.key


def test_scatter_broadcast(c):
    fut = c.scatter([1, 2, 3, 4, 5], broadcast=True)
    workers = set(c.scheduler_info()["workers"])
    assert len(workers) == 2
    who = c.who_has(fut)
    for f in fut:
        assert set(who[f.key]) == workers
    assert c.submit(total, fut).result() == 15


def test_scatter_to_chosen_worker(c):
    workers = sorted(c.scheduler_info()["workers"])
    for target in workers:
        futs = c.scatter([f"payload-for-{target}", 7], workers=[target])
        who = c.who_has(futs)
        assert all(who[f.key] == [target] for f in futs)
        assert c.gather(futs) == [f"payload-for-{target}", 7]
    single = c.scatter(99, workers=workers[0], hash=False)  # a bare address works too
    assert c.who_has([single])[single.key] == [workers[0]]


def test_submit_to_worker_by_name(c):
    by_name = {w["name"]: addr for addr, w in c.scheduler_info()["workers"].items()}
    fut = c.submit(inc, 1, workers=["1"], pure=False)
    assert fut.result() == 2
    assert c.who_has([fut])[fut.key] == [by_name["1"]]


def test_scatter_to_worker_by_name(c):
    by_name = {w["name"]: addr for addr, w in c.scheduler_info()["workers"].items()}
    [fut] = c.scatter(["to-name"], workers=["1"], hash=False)
    assert c.who_has([fut])[fut.key] == [by_name["1"]]


def test_scatter_unknown_worker_raises(c):
    with pytest.raises(Exception, match="unknown workers"):
        c.scatter([1], workers=["tcp://127.0.0.1:1"])


# -- get (dask graphs) -------------------------------------------------------------------
def test_get_single_key(c):
    dsk = {"a": 1, "b": (inc, "a"), "c": (add, "a", "b")}
    assert c.get(dsk, "c") == 3


def test_get_nested_keys_keep_nesting(c):
    dsk = {"k1": 1, "k2": (inc, "k1"), "k3": (add, "k1", "k2")}
    assert c.get(dsk, ["k1", ["k2", "k3"]]) == [1, [2, 3]]
    assert c.get(dsk, [["k3"], "k3"]) == [[3], 3]


def test_get_tuple_keys(c):
    dsk = {("x", 0): 1, ("x", 1): (inc, ("x", 0)), ("y", 0, 0): (add, ("x", 0), ("x", 1))}
    assert c.get(dsk, ("x", 1)) == 2
    assert c.get(dsk, [("x", 0), [("y", 0, 0)]]) == [1, [3]]


def test_get_error_propagates(c):
    dsk = {"a": 0, "b": (div, 1, "a"), "c": (inc, "b")}
    with pytest.raises(ZeroDivisionError):
        c.get(dsk, "c")


# -- Future behaviour --------------------------------------------------------------------
def test_future_status_pending_then_finished(c, event):
    name, ev = event
    fut = c.submit(wait_on_event, name, pure=False)
    assert fut.status == "pending"
    assert not fut.done()
    assert repr(fut) == f"<Future: pending, key: {fut.key}>"
    ev.set()
    assert fut.result(timeout=10) == name
    assert fut.status == "finished"
    assert repr(fut) == f"<Future: finished, type: str, key: {fut.key}>"


def test_result_timeout_raises_timeout_error(c, event):
    name, ev = event
    fut = c.submit(wait_on_event, name, pure=False)
    with pytest.raises(TimeoutError):
        fut.result(timeout=0.1)
    with pytest.raises(TimeoutError):
        fut.exception(timeout=0.05)
    ev.set()
    assert fut.result(timeout=10) == name


def test_error_status_exception_and_traceback(c):
    fut = c.submit(raise_value_error_from_task, 3)
    with pytest.raises(ValueError, match="bad value 3"):
        fut.result()
    assert fut.status == "error"
    assert fut.done()
    exc = fut.exception()
    assert type(exc) is ValueError
    assert str(exc) == "bad value 3"
    tb = fut.traceback()
    assert isinstance(tb, types.TracebackType)
    assert "raise_value_error_from_task" in "".join(traceback.format_tb(tb))
    assert repr(fut) == f"<Future: error, key: {fut.key}>"


def test_remote_traceback_visible_when_formatted(c):
    fut = c.submit(raise_value_error_from_task, 4)
    try:
        fut.result()
    except ValueError as exc:
        text = "".join(traceback.format_exception(exc))
    else:  # pragma: no cover
        pytest.fail("no error raised")
    assert "raise_value_error_from_task" in text
    assert "bad value 4" in text


def test_successful_future_has_no_exception(c):
    fut = c.submit(inc, 1)
    assert fut.exception() is None
    assert fut.traceback() is None


def test_dependent_of_failed_future_fails_with_same_type(c):
    bad = c.submit(div, 1, 0)
    child = c.submit(inc, bad)
    grandchild = c.submit(add, child, 1)
    for f in (child, grandchild):
        with pytest.raises(ZeroDivisionError):
            f.result()
        assert f.status == "error"
    # a dependent submitted after the failure is known fails as well
    late = c.submit(inc, bad, pure=False)
    with pytest.raises(ZeroDivisionError):
        late.result()


def test_cancel_future(c, event):
    name, ev = event
    blocker = c.submit(wait_on_event, name, pure=False)
    child = c.submit(inc, blocker)
    blocker.cancel()
    assert blocker.cancelled()
    assert blocker.status == "cancelled"
    assert blocker.done()
    with pytest.raises(corral.FutureCancelledError):
        blocker.result()
    with pytest.raises(corral.FutureCancelledError):
        child.result(timeout=10)
    assert child.status == "cancelled"
    ev.set()


def test_cancelled_error_is_a_concurrent_futures_cancelled_error(c, event):
    import concurrent.futures

    name, ev = event
    fut = c.submit(wait_on_event, name, pure=False)
    fut.cancel()
    ev.set()
    with pytest.raises(concurrent.futures.CancelledError):
        fut.result()


def test_client_cancel_list(c, event):
    name, ev = event
    futs = [c.submit(wait_on_event, name, pure=False) for _ in range(3)]
    c.cancel(futs)
    assert all(f.status == "cancelled" for f in futs)
    ev.set()


def test_add_done_callback(c, event):
    name, ev = event
    seen = []
    called = threading.Event()

    def cb(f):
        seen.append((f.key, f.status))
        called.set()

    fut = c.submit(wait_on_event, name, pure=False)
    fut.add_done_callback(cb)
    assert not seen
    ev.set()
    assert called.wait(10)
    assert seen == [(fut.key, "finished")]
    # registered on a finished future: called soon
    late = []
    late_called = threading.Event()
    fut.add_done_callback(lambda f: (late.append(f.status), late_called.set()))
    assert late_called.wait(10)
    assert late == ["finished"]


def test_done_callback_runs_off_the_loop_and_may_fetch_results(c):
    # as in dask.distributed: callbacks run in a separate thread, so they may block
    out = []
    called = threading.Event()

    def cb(f):
        out.append((len(f.result()), threading.current_thread() is not c._loop_thread.thread))
        called.set()

    fut = c.submit(big_bytes, 3)
    fut.add_done_callback(cb)
    assert called.wait(10)
    assert out == [(100_000, True)]


def test_add_done_callback_on_error(c):
    done = threading.Event()
    statuses = []
    fut = c.submit(div, 1, 0)

    def cb(f):
        statuses.append(f.status)
        done.set()

    fut.add_done_callback(cb)
    assert done.wait(10)
    assert statuses == ["error"]


def test_future_equality_and_hash(c):
    a = c.submit(inc, 41)
    b = Future(a.key, c)
    assert a == b and hash(a) == hash(b)
    assert b.result() == 42
    assert a.client is c


def test_future_cannot_be_pickled(c):
    import pickle

    fut = c.submit(inc, 1)
    with pytest.raises(TypeError):
        pickle.dumps(fut)


# -- wait / as_completed -----------------------------------------------------------------
def test_wait_all_completed(c):
    futs = c.map(slowinc, range(5), delay=0.01)
    result = wait(futs)
    assert isinstance(result, DoneAndNotDoneFutures)
    assert isinstance(result, tuple)
    done, not_done = result
    assert done == set(futs)
    assert not_done == set()
    assert result.done is done and result.not_done is not_done


def test_wait_first_completed(c, event):
    name, ev = event
    quick = c.submit(inc, 1000)
    blocked = c.submit(wait_on_event, name, pure=False)
    done, not_done = wait([quick, blocked], return_when=FIRST_COMPLETED)
    assert quick in done
    assert blocked in not_done
    ev.set()
    done, not_done = wait([quick, blocked], return_when=ALL_COMPLETED, timeout=10)
    assert done == {quick, blocked} and not not_done


def test_wait_timeout_raises(c, event):
    name, ev = event
    blocked = c.submit(wait_on_event, name, pure=False)
    with pytest.raises(TimeoutError):
        wait([blocked], timeout=0.1)
    with pytest.raises(TimeoutError):
        wait([blocked], timeout=0.1, return_when=FIRST_COMPLETED)
    ev.set()


def test_wait_accepts_single_future_and_counts_errors_done(c):
    bad = c.submit(div, 2, 0)
    done, not_done = wait(bad)
    assert done == {bad} and not not_done
    with pytest.raises(ValueError):
        wait([bad], return_when="SOMETIMES")


def test_as_completed_yields_all(c):
    futs = c.map(slowinc, range(6), delay=0.01)
    seen = list(as_completed(futs))
    assert set(seen) == set(futs)
    assert len(seen) == 6


def test_as_completed_with_results(c):
    futs = c.map(inc, range(5))
    pairs = list(as_completed(futs, with_results=True))
    assert sorted(r for _, r in pairs) == [1, 2, 3, 4, 5]
    for f, r in pairs:
        assert isinstance(f, Future)
        assert f.result() == r


def test_as_completed_add_while_iterating(c):
    ac = as_completed([c.submit(inc, 1)])
    results = []
    for fut in ac:
        value = fut.result()
        results.append(value)
        if value < 5:
            ac.add(c.submit(inc, value))
    assert results == [2, 3, 4, 5]
    assert ac.is_empty()


def test_as_completed_raises_remote_error_with_results(c):
    ac = as_completed([c.submit(div, 1, 0)], with_results=True)
    with pytest.raises(ZeroDivisionError):
        next(iter(ac))


# -- workers and scheduler info ----------------------------------------------------------
def task_worker_info():
    w = get_worker()
    return type(w).__name__, w.address, isinstance(w, corral.Worker)


def test_get_worker_inside_task(c):
    name, address, is_worker = c.submit(task_worker_info, pure=False).result()
    assert is_worker and name == "Worker"
    assert address in c.scheduler_info()["workers"]


def test_get_worker_outside_task_raises():
    with pytest.raises(ValueError):
        get_worker()


def test_scheduler_info_workers(c, mcluster):
    info = c.scheduler_info()
    assert info["address"] == mcluster.scheduler_address == c.scheduler_address
    workers = info["workers"]
    assert len(workers) == 2
    names = set()
    for addr, w in workers.items():
        assert addr.startswith("tcp://")
        assert w["nthreads"] == 2
        assert isinstance(w["memory_limit"], int) and w["memory_limit"] > 0
        assert w["resources"] == {}
        names.add(w["name"])
    assert names == {"0", "1"}
    assert c.nthreads() == {addr: 2 for addr in workers}


def test_who_has(c):
    fut = c.submit(inc, 555)
    fut.result()
    who = c.who_has([fut])
    assert list(who) == [fut.key]
    assert len(who[fut.key]) == 1
    assert who[fut.key][0] in c.scheduler_info()["workers"]
    assert fut.key in c.who_has()
    assert fut.key in c.scheduler_info()["workers"][who[fut.key][0]]["keys"]


def test_why_pending_and_story(c, event):
    name, ev = event
    blocked = c.submit(wait_on_event, name, pure=False)
    child = c.submit(len, blocked)
    assert "waiting for its inputs" in c.why_pending(child)
    assert "running" in c.why_pending(blocked)
    ev.set()
    child.result(timeout=10)
    story = c.story(child)
    assert story and all(t[0] == child.key for t in story)
    assert [t[2] for t in story][-1] == "memory"


def test_wait_for_workers(c):
    c.wait_for_workers(2, timeout=5)
    with pytest.raises(TimeoutError):
        c.wait_for_workers(3, timeout=0.2)


def test_default_client_and_get_client(c):
    assert corral.get_client() is not None
    other = Client(c.scheduler_address, set_as_default=False)
    try:
        assert corral.get_client() is not other
        assert other.submit(inc, 1).result() == 2
        fut = c.submit(inc, 1)
        with pytest.raises(ValueError, match="another client"):
            other.submit(inc, fut)
    finally:
        other.close()
    assert other.status == "closed"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_impure_keys_of_a_forked_child_differ_from_its_parents():
    from corral.client.client import _unique_ids

    before = _unique_ids.next()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one key, then leave at once
        os.write(write, _unique_ids.next().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.waitpid(pid, 0)
    after = _unique_ids.next()
    assert len(child) == len(before) == 32
    assert child[:16] != before[:16]  # the child drew its own random half
    assert after[:16] == before[:16] and after != before
