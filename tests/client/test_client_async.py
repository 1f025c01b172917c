"""The asynchronous client (``asynchronous=True``) on the caller's event loop."""

from __future__ import annotations

import asyncio

import pytest

from corral import Client, Future, LocalCluster, as_completed, wait
from corral.client.wait import FIRST_COMPLETED


def inc(x):
    return x + 1


def div(x, y):
    return x / y


def sleep_then(x, delay):
    import time

    time.sleep(delay)
    return x


@pytest.fixture(scope="module")
def address():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False) as cluster:
        yield cluster.scheduler_address


def run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_async_submit_gather_await(address):
    async def main():
        async with Client(address, asynchronous=True) as c:
            assert c.status == "running"
            fut = c.submit(inc, 1)
            assert isinstance(fut, Future)
            assert await fut == 2
            assert await fut.result() == 2
            futures = c.map(inc, range(5))
            assert await c.gather(futures) == [1, 2, 3, 4, 5]
            assert await c.gather({"a": [fut]}) == {"a": [2]}
            b = c.submit(inc, fut)
            assert await b == 3
            return c

    c = run(main())
    assert c.status == "closed"


def test_async_errors(address):
    async def main():
        async with Client(address, asynchronous=True) as c:
            bad = c.submit(div, 1, 0)
            with pytest.raises(ZeroDivisionError):
                await bad
            with pytest.raises(ZeroDivisionError):
                await c.gather([bad])
            assert await c.gather([bad, c.submit(inc, 1)], errors="skip") == [2]
            exc = await bad.exception()
            assert isinstance(exc, ZeroDivisionError)
            assert bad.status == "error"

    run(main())


def test_async_result_timeout(address):
    async def main():
        async with Client(address, asynchronous=True) as c:
            slow = c.submit(sleep_then, 1, 1.0, pure=False)
            with pytest.raises(TimeoutError):
                await slow.result(timeout=0.05)
            assert await slow == 1

    run(main())


def test_async_as_completed(address):
    async def main():
        async with Client(address, asynchronous=True) as c:
            futures = c.map(inc, range(6))
            seen = []
            async for fut in as_completed(futures):
                seen.append(await fut)
            assert sorted(seen) == [1, 2, 3, 4, 5, 6]
            pairs = []
            async for fut, result in as_completed(c.map(inc, [10, 20]), with_results=True):
                pairs.append((fut.key, result))
            assert sorted(r for _, r in pairs) == [11, 21]

    run(main())


def test_async_as_completed_add_while_iterating(address):
    async def main():
        async with Client(address, asynchronous=True) as c:
            ac = as_completed([c.submit(inc, 0)])
            values = []
            async for fut in ac:
                v = await fut
                values.append(v)
                if v < 3:
                    ac.add(c.submit(inc, v))
            assert values == [1, 2, 3]

    run(main())


def test_async_wait(address):
    async def main():
        async with Client(address, asynchronous=True) as c:
            futures = c.map(inc, range(4))
            done, not_done = await wait(futures)
            assert done == set(futures) and not not_done
            slow = c.submit(sleep_then, 1, 2.0, pure=False)
            with pytest.raises(TimeoutError):
                await wait([slow], timeout=0.05)
            quick = c.submit(inc, 100)
            done, not_done = await wait([quick, slow], return_when=FIRST_COMPLETED)
            assert quick in done and slow in not_done
            await c.cancel([slow])

    run(main())


def test_async_scatter_get_and_info(address):
    async def main():
        async with Client(address, asynchronous=True) as c:
            [x, y] = await c.scatter([1, 2])
            assert await c.submit(lambda a, b: a + b, x, y) == 3
            single = await c.scatter(41)
            assert await c.submit(inc, single) == 42
            dsk = {"a": 1, "b": (inc, "a"), "c": (inc, "b")}
            assert await c.get(dsk, ["a", ["b", "c"]]) == [1, [2, 3]]
            info = await c.scheduler_info()
            assert len(info["workers"]) == 2
            who = await c.who_has([x])
            assert list(who) == [x.key]
            await c.wait_for_workers(2)

    run(main())


def test_await_client_without_context_manager(address):
    async def main():
        c = await Client(address, asynchronous=True)
        try:
            assert await c.submit(inc, 5) == 6
        finally:
            await c.close()
        assert c.status == "closed"

    run(main())


def test_async_local_cluster_in_process():
    async def main():
        async with LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, asynchronous=True
        ) as cluster:
            assert cluster.status == "running"
            async with Client(cluster, asynchronous=True) as c:
                assert await c.submit(inc, 1) == 2
                assert len((await c.scheduler_info())["workers"]) == 2
                await cluster.scale(3)
                assert len((await c.scheduler_info())["workers"]) == 3
                assert await c.gather(c.map(inc, range(10))) == list(range(1, 11))
        assert cluster.status == "closed"

    run(main())


def test_async_client_starting_its_own_cluster():
    async def main():
        async with Client(
            asynchronous=True, n_workers=1, threads_per_worker=1, processes=False
        ) as c:
            assert await c.submit(inc, 1) == 2
            cluster = c.cluster
            assert cluster.status == "running"
        assert cluster.status == "closed"

    run(main())
