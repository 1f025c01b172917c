"""Load: 20 clients, each in its own thread with its own Client, 2,000 tasks each, at once."""

from __future__ import annotations

import threading
import time

from corral import Client, LocalCluster

N_CLIENTS = 20
N_TASKS = 2000


def triple(x: int) -> int:
    return 3 * x


def square(x: int) -> int:
    return x * x


def test_twenty_clients_two_thousand_tasks_each() -> None:
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as cluster:
        results: dict[int, object] = {}
        start = threading.Barrier(N_CLIENTS)

        def run(i: int) -> None:
            try:
                with Client(cluster, set_as_default=False) as c:
                    start.wait(60)
                    base = i * N_TASKS
                    # half as a map, half as single submits (many small messages)
                    mapped = c.map(triple, range(base, base + N_TASKS // 2))
                    single = [
                        c.submit(square, x) for x in range(base + N_TASKS // 2, base + N_TASKS)
                    ]
                    total = c.submit(sum, mapped)  # depends on 1,000 futures
                    values = c.gather(mapped + single)
                    results[i] = (values, total.result(timeout=120))
            except BaseException as exc:  # reported below, in the main thread
                results[i] = exc

        threads = [threading.Thread(target=run, args=(i,)) for i in range(N_CLIENTS)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(150)
        elapsed = time.monotonic() - t0
        assert all(not t.is_alive() for t in threads), f"clients still running after {elapsed:.0f}s"
        for i in range(N_CLIENTS):
            outcome = results.get(i)
            assert not isinstance(outcome, BaseException), f"client {i}: {outcome!r}"
            assert outcome is not None, f"client {i} produced nothing"
            values, total = outcome
            base = i * N_TASKS
            half = N_TASKS // 2
            expected = [3 * x for x in range(base, base + half)]
            expected += [x * x for x in range(base + half, base + N_TASKS)]
            assert values == expected, f"client {i}: wrong values"
            assert total == sum(expected[:half])
        # every client's keys were released when it closed: nothing is left over
        with Client(cluster, set_as_default=False) as c:
            deadline = time.monotonic() + 30
            while c.scheduler_info()["tasks"] and time.monotonic() < deadline:
                time.sleep(0.1)
            assert c.scheduler_info()["tasks"] == {}
