"""Chaos: a 5,000-task graph finishes, correct, while worker processes are killed every second."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from operator import add

from rel_support import corral_env, corral_process, poll, scheduler_thread

from corral import Client

N_LEAVES = 2500  # 2,500 leaves + 2,499 reductions = 4,999 tasks
N_WORKERS = 3
MIN_KILLS = 5
#: Kills, one a second from the start of the graph.  Each kill loses the results
#: that worker held; in a tree reduction a lost partial sum means recomputing its
#: whole subtree from lineage, so unbounded chaos would only measure that.
KILLS = 6


def slow_inc(x: int) -> int:
    time.sleep(0.005)
    return x + 1


def slow_add(x: int, y: int) -> int:
    time.sleep(0.001)
    return x + y


def tree_graph(n: int) -> tuple[dict, tuple]:
    """Leaves ``("x", i) = i + 1`` summed pairwise, level by level, into one key."""
    dsk: dict = {("x", 0, i): (slow_inc, i) for i in range(n)}
    level, width = 0, n
    while width > 1:
        for j in range((width + 1) // 2):
            left, right = 2 * j, 2 * j + 1
            if right < width:
                dsk[("x", level + 1, j)] = (slow_add, ("x", level, left), ("x", level, right))
            else:
                dsk[("x", level + 1, j)] = (add, ("x", level, left), 0)
        level += 1
        width = (width + 1) // 2
    return dsk, ("x", level, 0)


def test_tree_reduction_survives_a_worker_killed_every_second() -> None:
    dsk, root = tree_graph(N_LEAVES)
    assert len(dsk) >= 4999
    # Every kill counts against the tasks queued on that worker: allow plenty.
    with scheduler_thread(token="t", allowed_failures=1000) as s, corral_process(
        "worker", s.address, "--nanny", "--nworkers", str(N_WORKERS), "--nthreads", "1",
        "--log-level", "ERROR", env=corral_env("t"),
    ) as nanny:  # fmt: skip
        poll(lambda: len(s.workers()) == N_WORKERS, "the workers", timeout=60)
        kills: list[int] = []
        done = threading.Event()
        rng = random.Random(8)

        def chaos() -> None:
            while len(kills) < KILLS and not done.wait(1.0):
                pids = [w["pid"] for w in s.workers().values()]
                if len(pids) < 2:
                    continue  # keep one worker making progress
                pid = rng.choice(pids)
                try:
                    os.kill(pid, signal.SIGKILL)
                    kills.append(pid)
                except ProcessLookupError:
                    pass

        killer = threading.Thread(target=chaos, daemon=True)
        with Client(s.address, token="t", set_as_default=False) as c:
            killer.start()
            try:
                start = time.monotonic()
                result = c.get(dsk, root)
                elapsed = time.monotonic() - start
            finally:
                done.set()
                killer.join()
            assert result == N_LEAVES * (N_LEAVES + 1) // 2
            assert len(kills) >= MIN_KILLS, f"only {len(kills)} kills in {elapsed:.1f}s"
            assert nanny.poll() is None
            # the cluster heals: the supervisor brings every worker back
            poll(lambda: len(s.workers()) == N_WORKERS, "the workers to come back", timeout=60)
            assert c.submit(slow_inc, 1).result(timeout=30) == 2
        # nothing is left behind, and the scheduler's state is sound
        poll(
            lambda: s.call(lambda: not s.scheduler.state.tasks),
            "tasks to be forgotten",
            timeout=30,
        )
        s.call(s.scheduler.state.validate)


def test_direct_results_survive_watched_workers_being_killed() -> None:
    """Workers that push results to the client die; every result still arrives, right."""
    with scheduler_thread(token="t", allowed_failures=1000) as s, corral_process(
        "worker", s.address, "--nanny", "--nworkers", str(N_WORKERS), "--nthreads", "1",
        "--log-level", "ERROR", env=corral_env("t"),
    ):  # fmt: skip
        poll(lambda: len(s.workers()) == N_WORKERS, "the workers", timeout=60)
        with Client(s.address, token="t", set_as_default=False) as c:
            assert c.gather(c.map(slow_inc, range(30), pure=False)) == list(range(1, 31))
            poll(lambda: any(w is not None for w in c._watching.values()), "a watched worker")
            rng = random.Random(3)
            kills = 0
            for _ in range(KILLS):
                pids = [w["pid"] for w in s.workers().values()]
                if len(pids) >= 2:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(rng.choice(pids), signal.SIGKILL)
                        kills += 1
                # sequential round trips and a map, while the cluster heals
                values = [c.submit(slow_inc, i, pure=False).result(timeout=60) for i in range(20)]
                assert values == list(range(1, 21))
                assert c.gather(c.map(slow_inc, range(100), pure=False)) == list(range(1, 101))
            assert kills >= MIN_KILLS
            poll(lambda: len(s.workers()) == N_WORKERS, "the workers to come back", timeout=60)
            # the client watches the new workers too, and they push
            assert c.gather(c.map(slow_inc, range(50), pure=False)) == list(range(1, 51))
            poll(
                lambda: sum(w is not None and not w.closed for w in c._watching.values()) >= 2,
                "the client to watch the workers that came back",
                timeout=30,
            )
        poll(lambda: s.call(lambda: not s.scheduler.state.tasks), "tasks forgotten", timeout=30)
        s.call(s.scheduler.state.validate)
