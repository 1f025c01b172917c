"""``corral demo``: a real workload on the embedded local cluster, narrated."""

from __future__ import annotations

import operator
import os
import sqlite3
import tempfile
import threading
import time
from typing import Any

from .client import Client
from .diagnostics.progress import progress
from .environments import WorkerEnvironment, get_environment_state


def square(x: int) -> int:
    """x squared."""
    return x * x


def slow_square(x: int) -> int:
    """x squared, slowly (for the progress bars)."""
    time.sleep(0.01)
    return x * x


def fails(x: int) -> int:
    """Raise for odd inputs, to show remote errors."""
    if x % 2:
        raise ValueError(f"odd input {x}")
    return x


class DemoDatabase(WorkerEnvironment):
    """A worker environment: even-numbered workers keep a sqlite connection open."""

    name = "database-access"

    def __init__(self, path: str) -> None:
        self.path = path

    def condition(self, worker: Any) -> bool:
        name = str(worker.name)
        return name.isdigit() and int(name) % 2 == 0

    def setup(self, worker: Any) -> None:
        db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        db.execute("CREATE TABLE IF NOT EXISTS rows (worker TEXT, value INTEGER)")
        state = get_environment_state(self.name)
        state["db"], state["lock"] = db, threading.Lock()

    def teardown(self, worker: Any) -> None:
        state = get_environment_state(self.name)
        with state["lock"]:
            state["db"].execute("INSERT INTO rows VALUES ('teardown', -1)")
            state["db"].commit()
            state["db"].close()


def write_row(value: int) -> str:
    """A task that writes through its worker's own database connection."""
    from . import get_worker

    state = get_environment_state("database-access")
    with state["lock"]:
        state["db"].execute("INSERT INTO rows VALUES (?, ?)", (get_worker().name, value))
        state["db"].commit()
    return str(get_worker().name)


def run_demo(n_workers: int = 2, tasks: int = 2000) -> None:
    """Start a local cluster, run several workloads on it, print what happened."""

    def say(text: str) -> None:
        print(text, flush=True)

    t0 = time.perf_counter()
    with Client(n_workers=n_workers, threads_per_worker=1) as client:
        info = client.scheduler_info()
        say(
            f"Started a local cluster at {client.scheduler_address} "
            f"in {time.perf_counter() - t0:.2f}s"
        )
        for addr, w in info["workers"].items():
            say(f"  worker {w['name']:>3} at {addr}: {w['nthreads']} thread(s)")
        if client.dashboard_link:
            say(f"  dashboard: {client.dashboard_link}")

        t = time.perf_counter()
        futures = client.map(square, range(tasks))
        total = sum(client.gather(futures))
        elapsed = time.perf_counter() - t
        assert total == sum(i * i for i in range(tasks))
        say(
            f"map: {tasks} tasks -> sum of squares {total} in {elapsed:.2f}s "
            f"({tasks / elapsed:,.0f} tasks/s)"
        )
        del futures

        t = time.perf_counter()
        leaves = 1024
        dsk: dict[object, object] = {("leaf", i): (square, i) for i in range(leaves)}
        level, width = 0, leaves
        names: list[tuple[object, ...]] = [("leaf", i) for i in range(leaves)]
        while width > 1:
            level += 1
            nxt: list[tuple[object, ...]] = []
            for i in range(0, width, 2):
                key = ("add", level, i // 2)
                dsk[key] = (operator.add, names[i], names[i + 1])
                nxt.append(key)
            names, width = nxt, len(nxt)
        result = client.get(dsk, names[0])
        assert result == sum(i * i for i in range(leaves))
        say(
            f"tree reduction: {len(dsk)} tasks as a dask-style graph -> {result} "
            f"in {time.perf_counter() - t:.2f}s"
        )

        say("progress: corral.progress(futures) draws one bar per task group")
        slow = client.map(slow_square, range(100)) + client.map(fails, range(40))
        progress(slow)
        del slow

        a = client.submit(square, 12)
        b = client.submit(square, a)  # futures as arguments become dependencies
        say(f"dependencies: square(square(12)) = {b.result()} (data moved worker to worker)")

        bad = client.submit(fails, 3)
        try:
            bad.result()
        except ValueError as exc:
            say(f"errors: the task raised on the worker and here we caught ValueError({exc})")

        with tempfile.TemporaryDirectory(prefix="corral-demo-") as tmp:
            path = os.path.join(tmp, "demo.db")
            answer = client.register_worker_environment(environment=DemoDatabase(path))
            members = sorted(a for a, r in answer.items() if r["member"])
            say(
                f"environments: 'database-access' (even-numbered workers) set up a sqlite "
                f"connection on {len(members)} of {len(answer)} workers"
            )
            names = client.gather(client.map(write_row, range(20), environment="database-access"))
            client.unregister_worker_environment("database-access")
            with sqlite3.connect(path) as db:
                written = db.execute("SELECT COUNT(*) FROM rows WHERE value >= 0").fetchone()[0]
                closed = db.execute("SELECT COUNT(*) FROM rows WHERE value < 0").fetchone()[0]
            say(
                f"  20 tasks with environment='database-access' ran on workers "
                f"{sorted(set(names))} and wrote {written} rows through their connections; "
                f"unregistering ran {closed} teardown(s), each committing and closing one"
            )

        try:
            import dask.array as da

            x = da.arange(1_000_000, chunks=100_000)
            t = time.perf_counter()
            mean = (x * 2).mean().compute(scheduler=client.get)
            say(
                f"dask.array: (x * 2).mean() over 10 chunks = {mean} "
                f"in {time.perf_counter() - t:.2f}s"
            )
        except ImportError:
            say("dask.array: dask is not installed, skipped")
    say(f"Closed the cluster. Total {time.perf_counter() - t0:.2f}s")
