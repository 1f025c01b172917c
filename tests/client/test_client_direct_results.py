"""Small results pushed by the worker that computed them (watch_results)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from corral import Client, LocalCluster
from corral.comm import connect
from corral.errors import CommClosedError
from corral.protocol.messages import GetData, KeyInMemory, Message, WatchResults


def inc(x: int) -> int:
    return x + 1


def big(n: int) -> bytes:
    return b"x" * n


class Relayed:
    """Records the key_in_memory messages the scheduler sends a client."""

    def __init__(self, client: Client) -> None:
        self.keys: list[str] = []
        self.lock = threading.Lock()
        original = client._on_messages

        def on_messages(batch: list[Message]) -> None:
            with self.lock:
                self.keys += [m.key for m in batch if isinstance(m, KeyInMemory)]
            original(batch)

        assert client._conn is not None
        client._conn.set_handler(on_messages)


def _wait_watching(client: Client, n: int, cluster: Any = None, timeout: float = 10) -> None:
    """Until the client watches ``n`` workers (and, in-process, they have its request)."""
    deadline = time.monotonic() + timeout
    while sum(c is not None for c in client._watching.values()) < n or (
        cluster is not None and any(client.id not in w._watchers for w in cluster.workers.values())
    ):
        assert time.monotonic() < deadline, f"watching {client._watching}"
        time.sleep(0.01)


def _until_pushed(client: Client, relayed: Relayed, timeout: float = 10) -> None:
    """Until a map's results all come pushed (the workers read watch_results by then)."""
    deadline = time.monotonic() + timeout
    while True:
        futures = client.map(inc, range(20), pure=False)
        client.gather(futures)
        with relayed.lock:
            if not {f.key for f in futures} & set(relayed.keys):
                return
        assert time.monotonic() < deadline, "results still relayed by the scheduler"


def test_results_come_from_the_worker_once_it_is_watched(cluster: Any) -> None:
    with Client(cluster) as client:
        relayed = Relayed(client)
        # The first result of each worker comes through the scheduler and names it.
        first = client.map(inc, range(20), pure=False)
        assert client.gather(first) == list(range(1, 21))
        _wait_watching(client, 2, cluster)
        for worker in cluster.workers.values():
            assert client.id in worker._watchers
        relayed.keys.clear()
        futures = [client.submit(inc, i, pure=False) for i in range(50)]
        assert [f.result(timeout=10) for f in futures] == list(range(1, 51))
        # Pushed by the workers: the scheduler relayed none of them.
        assert not set(relayed.keys) & {f.key for f in futures}


def test_large_results_still_travel_through_a_fetch(cluster: Any) -> None:
    with Client(cluster) as client:
        assert client.gather(client.map(inc, range(10), pure=False)) == list(range(1, 11))
        _wait_watching(client, 2)
        value = client.submit(big, 1_000_000, pure=False).result(timeout=10)
        assert value == b"x" * 1_000_000


def test_a_client_that_does_not_watch_still_gets_every_result(
    cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Client(cluster) as watcher:
        assert watcher.gather(watcher.map(inc, range(10))) == list(range(1, 11))
        _wait_watching(watcher, 2)
        monkeypatch.setenv("CORRAL_CLIENT__DIRECT_RESULTS", "false")
        with Client(cluster) as other:
            relayed = Relayed(other)
            # The same keys, wanted by both: each client is told once.
            a = watcher.map(inc, range(100, 140))
            b = other.map(inc, range(100, 140))
            assert other.gather(b) == list(range(101, 141))
            assert watcher.gather(a) == list(range(101, 141))
            assert not other._watching
            assert {f.key for f in b} <= set(relayed.keys)


def test_a_lost_watch_falls_back_to_the_scheduler(cluster: Any) -> None:
    with Client(cluster) as client:
        assert client.gather(client.map(inc, range(10), pure=False)) == list(range(1, 11))
        _wait_watching(client, 2, cluster)
        for worker in cluster.workers.values():
            conn = worker._watchers[client.id]
            worker._loop.call_soon_threadsafe(conn.abort, "test drops the watch")
        deadline = time.monotonic() + 10
        while any(client.id in w._watchers for w in cluster.workers.values()):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        futures = [client.submit(inc, i, pure=False) for i in range(30)]
        assert [f.result(timeout=10) for f in futures] == list(range(1, 31))
        _wait_watching(client, 2)  # watched again, named by a relayed result


def test_only_clients_may_watch(cluster: Any) -> None:
    worker = next(iter(cluster.workers.values()))

    async def as_peer() -> str | None:
        conn, _ = await connect(worker.address, role="peer", my_id="someone", token=cluster.token)
        conn.send(WatchResults())
        conn.send(GetData(keys=["x"]))
        try:
            await conn.recv(timeout=10)
        except CommClosedError:
            return conn.close_reason
        return None

    import asyncio

    reason = asyncio.run(as_peer())
    assert reason is not None  # closed instead of answered
    assert "someone" not in worker._watchers


@pytest.mark.parametrize("processes", [True])
def test_watched_worker_processes_push_results(processes: bool) -> None:
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=processes) as cluster,
        Client(cluster) as client,
    ):
        relayed = Relayed(client)
        assert client.gather(client.map(inc, range(20), pure=False)) == list(range(1, 21))
        _wait_watching(client, 2)
        _until_pushed(client, relayed)  # worker processes: nothing to look at but results
        relayed.keys.clear()
        values = [client.submit(inc, i, pure=False).result(timeout=10) for i in range(30)]
        assert values == list(range(1, 31))
        assert relayed.keys == []


def test_a_pushed_result_arrives_while_the_scheduler_has_not_read_it(cluster: Any) -> None:
    """The worker's push does not wait for the scheduler; who_has answers from it meanwhile."""
    with Client(cluster) as client:
        assert client.gather(client.map(inc, range(20), pure=False)) == list(range(1, 21))
        _wait_watching(client, 2, cluster)
        scheduler = cluster.scheduler
        streams = [scheduler._streams[w.address] for w in cluster.workers.values()]
        run = cluster._loop_thread.run  # the cluster's event loop

        async def set_reading(on: bool) -> None:
            for conn in streams:
                transport = conn._transport
                assert transport is not None
                (transport.resume_reading if on else transport.pause_reading)()

        run(set_reading(False))
        try:
            fut = client.submit(inc, 41, pure=False)
            assert fut.result(timeout=10) == 42  # pushed: the scheduler has not heard yet
            assert scheduler.state.tasks[fut.key].state == "processing"
            (holder,) = client.who_has([fut])[fut.key]
            assert holder in {w.address for w in cluster.workers.values()}
        finally:
            run(set_reading(True))
        deadline = time.monotonic() + 10
        while scheduler.state.tasks[fut.key].state != "memory":
            assert time.monotonic() < deadline
            time.sleep(0.01)


def test_a_lone_result_is_reported_once_by_its_task_thread(cluster: Any) -> None:
    from corral.protocol.messages import TaskFinished

    with Client(cluster) as client:
        assert [client.submit(inc, i, pure=False).result(timeout=10) for i in range(40)] == list(
            range(1, 41)
        )
        workers = list(cluster.workers.values())
        assert sum(w.reported_by_threads for w in workers) > 0
        counts = cluster.scheduler.observer.worker_ops
        deadline = time.monotonic() + 10
        while counts.get(TaskFinished, 0) < 40:  # the client may hear before the scheduler
            assert time.monotonic() < deadline, counts
            time.sleep(0.01)
        time.sleep(0.1)
        assert counts[TaskFinished] == 40  # never twice: the loop knew it was sent
        # A value a thread reported is served at once, to the other worker and its task.
        for i in range(10):
            a = client.submit(inc, i, pure=False)
            assert a.result(timeout=10) == i + 1
            (holder,) = client.who_has([a])[a.key]
            other = next(w.address for w in workers if w.address != holder)
            assert client.submit(inc, a, workers=[other]).result(timeout=10) == i + 2
