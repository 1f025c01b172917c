"""Dask collections computed on Corral: ``client.get`` as a dask scheduler, compute, persist."""

from __future__ import annotations

import time

import pytest

from corral import Client, Future, LocalCluster, wait

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
db = pytest.importorskip("dask.bag")
np = pytest.importorskip("numpy")
pd = pytest.importorskip("pandas")
dd = pytest.importorskip("dask.dataframe")


@pytest.fixture(scope="module")
def c():
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=False) as cluster,
        Client(cluster) as client,
    ):
        yield client


@pytest.fixture
def array():
    return da.arange(1000, chunks=100).reshape(10, 100).rechunk((5, 50))


@pytest.fixture
def bag():
    return db.from_sequence(range(100), npartitions=7)


@pytest.fixture
def frame():
    pdf = pd.DataFrame(
        {"g": [i % 4 for i in range(200)], "x": range(200), "y": [i * 0.5 for i in range(200)]}
    )
    return pdf, dd.from_pandas(pdf, npartitions=5)


# -- dask.compute(..., scheduler=client.get) -------------------------------------------------
def test_array_compute_with_client_get(c, array):
    expr = (array * 2 + 1).sum(axis=0)
    expected = expr.compute(scheduler="sync")
    got = expr.compute(scheduler=c.get)
    np.testing.assert_array_equal(got, expected)
    (both,) = dask.compute(expr, scheduler=c.get)
    np.testing.assert_array_equal(both, expected)


def test_array_full_result_and_several_collections(c, array):
    x = array.T @ array
    y = array.mean()
    gx, gy = dask.compute(x, y, scheduler=c.get)
    ex, ey = dask.compute(x, y, scheduler="sync")
    np.testing.assert_array_equal(gx, ex)
    assert gy == ey


def test_bag_compute_with_client_get(c, bag):
    expr = bag.map(lambda v: v * 3).filter(lambda v: v % 2 == 0)
    assert expr.compute(scheduler=c.get) == expr.compute(scheduler="sync")
    freq = bag.map(lambda v: v % 5).frequencies()
    assert sorted(freq.compute(scheduler=c.get)) == sorted(freq.compute(scheduler="sync"))
    assert bag.sum().compute(scheduler=c.get) == sum(range(100))


def test_dataframe_compute_with_client_get(c, frame):
    pdf, ddf = frame
    agg = ddf.groupby("g").x.sum()
    pd.testing.assert_series_equal(agg.compute(scheduler=c.get), pdf.groupby("g").x.sum())
    filtered = ddf[ddf.x > 50].y.mean()
    assert filtered.compute(scheduler=c.get) == pytest.approx(pdf[pdf.x > 50].y.mean())
    whole = (ddf.assign(z=ddf.x + ddf.y)).compute(scheduler=c.get)
    pd.testing.assert_frame_equal(whole, pdf.assign(z=pdf.x + pdf.y))


def test_delayed_compute_with_client_get(c):
    @dask.delayed
    def add(a, b):
        return a + b

    out = add(add(1, 2), add(3, 4))
    assert out.compute(scheduler=c.get) == 10
    assert dask.compute({"a": out, "b": [out, 5]}, scheduler=c.get) == ({"a": 10, "b": [10, 5]},)


def test_collection_error_raises_original_type(c):
    @dask.delayed
    def boom(x):
        raise KeyError(x)

    with pytest.raises(KeyError):
        boom(3).compute(scheduler=c.get)


# -- client.compute / client.persist ---------------------------------------------------------
def test_client_compute_returns_future(c, array, frame):
    fut = c.compute(array.sum())
    assert isinstance(fut, Future)
    assert fut.result() == array.sum().compute(scheduler="sync")

    pdf, ddf = frame
    futs = c.compute([ddf.x.max(), array.max()])
    assert isinstance(futs, list) and all(isinstance(f, Future) for f in futs)
    assert c.gather(futs) == [pdf.x.max(), 999]

    np.testing.assert_array_equal(c.compute(array, sync=True), np.arange(1000).reshape(10, 100))


def test_client_compute_bag(c, bag):
    fut = c.compute(bag.map(lambda v: v + 1))
    assert fut.result() == list(range(1, 101))


def test_persist_then_compute_through_client_get(c, array):
    y = c.persist(array + 1)
    # the persisted collection's graph holds one future per chunk, nothing to recompute
    keys = list(dask.core.flatten(y.__dask_keys__()))
    graph = dict(y.__dask_graph__())
    assert len(graph) == len(keys) == 4
    assert all(isinstance(v, Future) for v in graph.values())
    wait(list(graph.values()))
    who = c.who_has()
    assert all(who.get(str(k)) for k in keys)
    np.testing.assert_array_equal(y.compute(scheduler=c.get), np.arange(1000).reshape(10, 100) + 1)
    assert (y * 2).sum().compute(scheduler=c.get) == int(((np.arange(1000) + 1) * 2).sum())
    assert c.compute(y.sum()).result() == int((np.arange(1000) + 1).sum())


def test_persist_dataframe_and_several(c, frame, bag):
    pdf, ddf = frame
    pddf, pbag = c.persist([ddf[ddf.x % 2 == 0], bag.map(lambda v: -v)])
    pd.testing.assert_frame_equal(pddf.compute(scheduler=c.get), pdf[pdf.x % 2 == 0])
    assert pbag.compute(scheduler=c.get) == [-v for v in range(100)]
    assert pddf.x.sum().compute(scheduler=c.get) == pdf[pdf.x % 2 == 0].x.sum()


def inc(x):
    return x + 1


def add(x, y=0):
    return x + y


def total_of(d):
    return d["a"] + d["b"][0] + sum(d["b"][1])


def test_graphs_holding_futures(c):
    f = c.submit(inc, 1)
    assert c.get({"x": f, "y": (inc, "x")}, "y") == 3
    assert c.get({"y": (add, f, 10)}, "y") == 12
    assert c.get({"a": 1, "b": ["a", 2, (inc, "a")]}, "b") == [1, 2, 2]
    assert c.get({"a": 1, "b": (sum, ["a", f, (inc, "a")])}, "b") == 5


def test_delayed_calls_with_future_arguments(c):
    f = c.submit(inc, 1)  # 2
    positional = dask.delayed(add)(f, 100)
    keyword = dask.delayed(add)(1, y=f)
    nested = dask.delayed(sum)([f, f, 1])
    deeper = dask.delayed(total_of)({"a": f, "b": (f, [f, 1])})
    assert dask.compute(positional, keyword, nested, deeper, scheduler=c.get) == (102, 3, 5, 7)
    assert c.compute(positional).result() == 102


def test_persist_delayed_and_compute_mixed(c):
    d = dask.delayed(inc)(5)
    p = c.persist(d)
    assert p.compute(scheduler=c.get) == 6
    assert c.compute(p).result() == 6
    assert c.compute(dask.delayed(add)(p, 1)).result() == 7
    # non-collections pass through compute unchanged, as in dask.distributed
    futures = c.compute([d, 7])
    assert isinstance(futures[0], Future) and futures[1] == 7
    assert c.compute([d, 7], sync=True) == [6, 7]


def test_get_sync_false_returns_futures_in_key_nesting(c):
    dsk = {"a": 1, "b": (inc, "a"), "c": (add, "a", "b")}
    out = c.get(dsk, ["a", ["b", "c"]], sync=False)
    assert isinstance(out, list) and isinstance(out[1], list)
    assert all(isinstance(f, Future) for f in [out[0], *out[1]])
    assert c.gather(out) == [1, [2, 3]]


# -- big graphs go in parts -----------------------------------------------------------------
def _add(x, y):
    return x + y


def _tree(leaves):
    graph: dict = {("leaf", i): (_add, i, 1) for i in range(leaves)}
    level, keys = 0, [("leaf", i) for i in range(leaves)]
    while len(keys) > 1:
        level += 1
        nxt: list = [("add", level, j) for j in range(len(keys) // 2)]
        graph.update({k: (_add, keys[2 * j], keys[2 * j + 1]) for j, k in enumerate(nxt)})
        keys = nxt
    return graph, keys[0]


def test_a_big_graph_is_sent_in_parts_and_leaves_nothing_behind():
    from corral.client.client import GRAPH_PART_SIZE
    from corral.protocol.messages import UpdateGraph

    leaves = 2048  # 4,095 tasks: more than twice a part
    assert 2 * leaves > 2 * GRAPH_PART_SIZE
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=False) as cluster,
        Client(cluster) as client,
    ):
        assert cluster.scheduler is not None
        ops = cluster.scheduler.observer.client_ops
        before = ops.get(UpdateGraph, 0)
        graph, root = _tree(leaves)
        assert client.get(graph, root) == sum(range(1, leaves + 1))
        assert ops.get(UpdateGraph, 0) - before == -(-len(graph) // GRAPH_PART_SIZE)
        state = cluster.scheduler.state
        assert state._holds == {}
        # The result went to the client and its future is gone: nothing is kept.
        deadline = time.monotonic() + 10
        while state.tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state.tasks == {}
