"""``client.run`` and ``client.run_on_scheduler``: service injection, errors, options."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from corral import Client, Scheduler, Worker
from corral.errors import RemoteTraceback


def whoami(dask_worker):
    return dask_worker.address


def whoami_corral(corral_worker, suffix=""):
    return corral_worker.name + suffix


def on_loop(dask_worker):
    return threading.current_thread() is not None and asyncio.get_running_loop() is not None


async def async_double(x, dask_worker=None):
    await asyncio.sleep(0.01)
    return (x * 2, dask_worker.address)


async def async_mark(dask_worker):
    await asyncio.sleep(0.05)
    dask_worker.marked = True


def explode(x):
    raise KeyError(f"explode-{x}")


def scheduler_workers(dask_scheduler):
    return sorted(dask_scheduler.workers)


def scheduler_id(prefix, corral_scheduler=None):
    return prefix + corral_scheduler.id


def test_run_on_every_worker_with_worker_injection(client):
    workers = sorted(client.scheduler_info()["workers"])
    assert client.run(whoami) == {w: w for w in workers}
    names = {w: info["name"] for w, info in client.scheduler_info()["workers"].items()}
    assert client.run(whoami_corral, suffix="!") == {w: names[w] + "!" for w in workers}
    assert client.run(os.getpid) == dict.fromkeys(workers, os.getpid())  # in-process cluster
    assert set(client.run(on_loop).values()) == {True}  # runs on the worker's event loop


def test_run_on_some_workers_by_address_or_name(client):
    info = client.scheduler_info()["workers"]
    first, second = sorted(info)
    assert client.run(whoami, workers=[first]) == {first: first}
    assert client.run(whoami, workers=first) == {first: first}
    assert client.run(whoami, workers=[info[second]["name"]]) == {second: second}
    with pytest.raises(ValueError, match="unknown workers"):
        client.run(whoami, workers=["tcp://127.0.0.1:1"])


def test_run_coroutine_functions_and_wait_false(client):
    results = client.run(async_double, 21)
    assert results == {w: (42, w) for w in results}
    assert client.run(async_mark, wait=False) == dict.fromkeys(results)
    for _ in range(100):
        marks = client.run(lambda dask_worker: getattr(dask_worker, "marked", False))
        if all(marks.values()):
            break
        asyncio.run(asyncio.sleep(0.02))
    assert all(marks.values())


def test_run_errors_raise_with_remote_traceback(client):
    workers = sorted(client.scheduler_info()["workers"])
    with pytest.raises(KeyError, match="explode-3") as info:
        client.run(explode, 3)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "def explode" in str(info.value.__cause__) or "explode" in str(info.value.__cause__)
    assert workers[0] in str(info.value.__cause__)
    returned = client.run(explode, 4, on_error="return")
    assert sorted(returned) == workers
    assert all(isinstance(e, KeyError) for e in returned.values())
    assert client.run(explode, 5, on_error="ignore") == {}
    with pytest.raises(ValueError):
        client.run(explode, 5, on_error="bogus")


def test_run_on_scheduler_with_scheduler_injection(client, cluster):
    assert client.run_on_scheduler(scheduler_workers) == sorted(client.scheduler_info()["workers"])
    assert client.run_on_scheduler(scheduler_id, "id:") == "id:" + cluster.scheduler.id
    assert client.run_on_scheduler(lambda x, y=1: x + y, 1, y=2) == 3

    async def coro(dask_scheduler):
        await asyncio.sleep(0.01)
        return dask_scheduler.address

    assert client.run_on_scheduler(coro) == client.scheduler_address
    with pytest.raises(KeyError, match="explode-9") as info:
        client.run_on_scheduler(explode, 9)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert client.scheduler_address in str(info.value.__cause__)


def test_unpicklable_result_is_an_error(client):
    with pytest.raises(Exception, match=r"serialize|pickle"):
        client.run(lambda: threading.Lock())


def test_async_client_run():
    async def main():
        scheduler = await Scheduler(port=0).start()
        worker = await Worker(scheduler.address, nthreads=1).start()
        async with Client(scheduler.address, asynchronous=True) as c:
            assert await c.run(whoami) == {worker.address: worker.address}
            assert await c.run_on_scheduler(scheduler_workers) == [worker.address]
            assert await c.get_events("plugins") == ()
        await worker.close()
        await scheduler.close()

    asyncio.run(main())
