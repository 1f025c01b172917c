"""The benchmark workloads.

Each workload function takes a :class:`~benchmarks.spec.Context` holding a
connected client (Corral or dask.distributed: only names shared by both APIs
are used), does a short warm-up, times the interesting part, checks the
result and returns a :class:`~benchmarks.spec.Measurement`.  A wrong result
raises :class:`~benchmarks.spec.CheckFailed`, which the suite reports as an
error cell, so a fast wrong answer never shows up as a number.

Cluster start-up is not part of any timing.  Module-level imports are kept
light: this module is also imported by the suite's parent process, which
must not import a scheduler.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Hashable
from typing import Any
from urllib.parse import urlsplit

from benchmarks import baselines, tasks
from benchmarks.spec import (
    Absolute,
    ClusterSpec,
    Context,
    Measurement,
    MetricSpec,
    VsDask,
    Workload,
    check,
)

#: Problem sizes as ``(full, quick)``; quick sizes keep ``--quick`` < 2 min.
SIZES: dict[str, tuple[int, int]] = {
    "map_noop": (20_000, 2_000),
    "map_noop_100k": (100_000, 5_000),
    "latency": (1_000, 200),
    "tree_reduce": (8_192, 1_024),
    "dask_array": (10_000, 4_000),
    "transfer": (200_000_000, 50_000_000),
    "resources": (40, 40),
    "pending_memory": (100_000, 20_000),
}


def size(workload: str, quick: bool) -> int:
    """Return the problem size of ``workload`` for the given mode."""
    full, small = SIZES[workload]
    return small if quick else full


def _warm_up(ctx: Context, n: int = 100) -> None:
    """Run a few small tasks so connections and imports are in place."""
    client = ctx.client
    results = client.gather(client.map(tasks.inc, range(n), pure=False))
    check(list(results) == [i + 1 for i in range(n)], "warm-up map returned wrong results")
    for i in range(5):
        check(client.submit(tasks.inc, i, pure=False).result() == i + 1, "warm-up submit")


def _timed_map(ctx: Context, n: int) -> float:
    """Map the identity task over ``range(n)``, gather, check; return seconds."""
    client = ctx.client
    start = time.perf_counter()
    futures = client.map(tasks.inc0, range(n), pure=False)
    results = client.gather(futures)
    elapsed = time.perf_counter() - start
    check(len(results) == n, f"gathered {len(results)} results, expected {n}")
    check(list(results) == list(range(n)), "map_noop results differ from the inputs")
    del futures, results
    return elapsed


def map_noop(ctx: Context) -> Measurement:
    """Throughput of ``client.map`` + ``client.gather`` over a no-op task."""
    n = size("map_noop", ctx.quick)
    _warm_up(ctx)
    elapsed = _timed_map(ctx, n)
    return Measurement({"tasks_per_s": n / elapsed}, {"n_tasks": n, "elapsed_s": elapsed})


def map_noop_100k(ctx: Context) -> Measurement:
    """Same as :func:`map_noop` with five times as many tasks.

    The per-task cost relative to ``map_noop`` is derived by the report from
    the two runs of the same backend.
    """
    n = size("map_noop_100k", ctx.quick)
    _warm_up(ctx)
    elapsed = _timed_map(ctx, n)
    return Measurement(
        {"tasks_per_s": n / elapsed, "us_per_task": elapsed / n * 1e6},
        {"n_tasks": n, "elapsed_s": elapsed},
    )


def latency(ctx: Context) -> Measurement:
    """Round-trip time of sequential ``submit(...).result()`` calls.

    Also measures, in the same process, an asyncio TCP ping-pong between two
    threads pinned to different CPUs as the raw floor (median of the p50s
    of several rounds).
    """
    client = ctx.client
    n = size("latency", ctx.quick)
    _warm_up(ctx)
    for i in range(20):
        client.submit(tasks.inc, i, pure=False).result()
    samples: list[float] = []
    wrong = 0
    for i in range(n):
        start = time.perf_counter()
        value = client.submit(tasks.inc, i, pure=False).result()
        samples.append(time.perf_counter() - start)
        wrong += value != i + 1
    check(wrong == 0, f"{wrong} of {n} submit results were wrong")
    # The baseline pins the two threads to different CPUs: a scheduler round
    # trip crosses processes, so it cannot stay on one core either.  In full
    # mode, unpinned, same-core and uvloop figures go to ``info`` for context.
    ms = 1e3
    rounds, trips = (3, 1000) if ctx.quick else (5, 2000)
    cross = baselines.pick_cpus(same_core=False)
    raw_rounds = [p * ms for p in baselines.ping_pong_p50s(rounds, trips, cpus=cross)]
    raw_p50 = statistics.median(raw_rounds)
    info: dict[str, Any] = {
        "n_calls": n,
        "raw_cpus": cross,
        "raw_round_trips": trips,
        "raw_p50_rounds_ms": raw_rounds,
    }
    if not ctx.quick:
        same = baselines.pick_cpus(same_core=True)
        info["raw_same_core_p50_ms"] = (
            statistics.median(baselines.ping_pong_p50s(3, cpus=same)) * ms
        )
        info["raw_unpinned_p50_ms"] = statistics.median(baselines.ping_pong_p50s(3)) * ms
        try:
            import uvloop
        except ImportError:
            pass
        else:  # Corral may run on uvloop
            uv_rounds = baselines.ping_pong_p50s(3, 2000, uvloop.new_event_loop, cpus=cross)
            info["raw_uvloop_p50_ms"] = statistics.median(uv_rounds) * ms
    p50 = baselines.percentile(samples, 50) * 1e3
    return Measurement(
        {
            "p50_ms": p50,
            "p99_ms": baselines.percentile(samples, 99) * 1e3,
            "raw_p50_ms": raw_p50,
            "p50_vs_raw": p50 / raw_p50,
        },
        info,
    )


def tree_graph(prefix: str, leaves: int) -> tuple[dict[Hashable, Any], Hashable]:
    """Build a binary-tree reduction graph in dask's dict-of-tuples format.

    Leaves are ``(prefix + "leaf", i): (inc, i)`` and inner nodes
    ``(prefix + "add", level, j): (add, left, right)``.  ``leaves`` must be a
    power of two.  Returns ``(graph, root_key)``.
    """
    check(leaves > 0 and leaves & (leaves - 1) == 0, "leaves must be a power of two")
    graph: dict[Hashable, Any] = {}
    level_keys: list[Hashable] = []
    for i in range(leaves):
        key: Hashable = (prefix + "leaf", i)
        graph[key] = (tasks.inc, i)
        level_keys.append(key)
    level = 0
    while len(level_keys) > 1:
        level += 1
        next_keys: list[Hashable] = []
        for j in range(len(level_keys) // 2):
            key = (prefix + "add", level, j)
            graph[key] = (tasks.add, level_keys[2 * j], level_keys[2 * j + 1])
            next_keys.append(key)
        level_keys = next_keys
    return graph, level_keys[0]


def tree_reduce(ctx: Context) -> Measurement:
    """Throughput of ``client.get`` on a binary-tree reduction graph."""
    leaves = size("tree_reduce", ctx.quick)
    _warm_up(ctx)
    warm_graph, warm_root = tree_graph("warm-", 64)
    check(ctx.client.get(warm_graph, warm_root) == sum(range(1, 65)), "warm-up tree")
    graph, root = tree_graph("", leaves)
    start = time.perf_counter()
    value = ctx.client.get(graph, root)
    elapsed = time.perf_counter() - start
    expected = sum(i + 1 for i in range(leaves))
    check(value == expected, f"tree result {value!r} != {expected}")
    return Measurement(
        {"tasks_per_s": len(graph) / elapsed},
        {"n_tasks": len(graph), "leaves": leaves, "elapsed_s": elapsed},
    )


def dask_array(ctx: Context) -> Measurement:
    """Wall time of ``(x + x.T).mean()`` on a chunked random dask array."""
    import dask.array as da
    from dask.base import compute as dask_compute

    compute: Callable[..., tuple[Any, ...]] = dask_compute  # dask is untyped

    n = size("dask_array", ctx.quick)
    chunk = 1000
    _warm_up(ctx)
    warm = da.random.random((2 * chunk, 2 * chunk), chunks=(chunk, chunk))
    (warm_value,) = compute((warm + warm.T).mean(), scheduler=ctx.client.get)
    check(0.9 < float(warm_value) < 1.1, f"warm-up mean {warm_value!r} out of range")
    x = da.random.random((n, n), chunks=(chunk, chunk))
    y = (x + x.T).mean()
    n_tasks = len(y.__dask_graph__())
    start = time.perf_counter()
    (value,) = compute(y, scheduler=ctx.client.get)
    elapsed = time.perf_counter() - start
    check(0.9 < float(value) < 1.1, f"mean of x + x.T is {value!r}, expected ~1.0")
    return Measurement(
        {"wall_s": elapsed},
        {"shape": [n, n], "chunks": [chunk, chunk], "n_tasks": n_tasks, "mean": float(value)},
    )


def _transfer_once(ctx: Context, n_elements: int, seed: int, src: str, dst: str) -> float:
    """Create an array on ``src``, then time a task on ``dst`` that needs it."""
    client = ctx.client
    array = client.submit(tasks.make_array, n_elements, seed, workers=[src], pure=False)
    # A dependent task pinned to the same worker waits for the array without
    # pulling it to the client, and gives the reference checksum.
    expected_sum = client.submit(tasks.checksum, array, workers=[src], pure=False).result()
    start = time.perf_counter()
    nbytes = client.submit(tasks.nbytes_of, array, workers=[dst], pure=False).result()
    elapsed = time.perf_counter() - start
    check(nbytes == n_elements * 8, f"received {nbytes} bytes, expected {n_elements * 8}")
    got_sum = client.submit(tasks.checksum, array, workers=[dst], pure=False).result()
    check(got_sum == expected_sum, f"checksum after transfer {got_sum!r} != {expected_sum!r}")
    del array
    return elapsed


def transfer(ctx: Context) -> Measurement:
    """Worker-to-worker bandwidth for one large NumPy array.

    The array (random float64) is produced on worker A and consumed by a
    task pinned to worker B; only the consuming task is timed (median of 9
    repeats after one untimed full-size warm-up: on a VM one move in five can
    run at a quarter of the usual speed, for every backend).  The raw loopback TCP copy
    of the same size is measured in the same process.
    """
    nbytes = size("transfer", ctx.quick)
    n_elements = nbytes // 8
    check(len(ctx.workers) >= 2, "transfer needs two workers")
    src, dst = ctx.workers[0], ctx.workers[1]
    _warm_up(ctx)
    _transfer_once(ctx, 125_000, 0, src, dst)  # 1 MB: opens the worker-worker link
    _transfer_once(ctx, n_elements, 1, src, dst)  # full size: warms the allocators
    repeats = 9
    seeds = range(2, repeats + 2)
    seconds = [_transfer_once(ctx, n_elements, seed, src, dst) for seed in seeds]
    rates = [nbytes / 1e6 / s for s in seconds]
    mb_per_s = statistics.median(rates)
    raw = baselines.tcp_copy_mb_per_s(nbytes, repeats=repeats)
    return Measurement(
        {"mb_per_s": mb_per_s, "raw_mb_per_s": raw, "vs_raw": mb_per_s / raw},
        {"nbytes": nbytes, "repeats_mb_per_s": rates, "best_mb_per_s": max(rates)},
    )


RESOURCE_SLOTS = 2  # "GPU" units per worker
RESOURCE_THREADS = 4  # threads per worker: more than slots, so the resource binds
RESOURCE_SLEEP_S = 0.05


def _max_concurrency(intervals: list[tuple[float, float]]) -> int:
    """Return the largest number of overlapping ``(start, end)`` intervals."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = peak = 0
    for _, delta in events:  # at equal times the end (-1) sorts first
        running += delta
        peak = max(peak, running)
    return peak


def resources(ctx: Context) -> Measurement:
    """Wall time of sleep tasks that each hold one of the workers' GPU slots.

    Workers have 4 threads but only 2 "GPU" units, so the resource is what
    limits concurrency; the check fails if any worker ever ran more than 2
    such tasks at once.  Ideal wall time is ``ceil(n / slots) * sleep``.
    """
    client = ctx.client
    n = size("resources", ctx.quick)
    slots = RESOURCE_SLOTS * len(ctx.workers)
    ideal = math.ceil(n / slots) * RESOURCE_SLEEP_S
    _warm_up(ctx)
    warm = [
        client.submit(tasks.timed_sleep, 0.0, i, resources={"GPU": 1}, pure=False)
        for i in range(2 * slots)
    ]
    client.gather(warm)
    walls: list[float] = []
    for _ in range(3):
        start = time.perf_counter()
        futures = [
            client.submit(tasks.timed_sleep, RESOURCE_SLEEP_S, i, resources={"GPU": 1}, pure=False)
            for i in range(n)
        ]
        results = client.gather(futures)
        walls.append(time.perf_counter() - start)
        check(sorted(r[0] for r in results) == list(range(n)), "resource task results wrong")
        by_pid: dict[int, list[tuple[float, float]]] = {}
        for _, pid, t0, t1 in results:
            by_pid.setdefault(pid, []).append((t0, t1))
        for pid, intervals in by_pid.items():
            peak = _max_concurrency(intervals)
            check(
                peak <= RESOURCE_SLOTS,
                f"worker pid {pid} ran {peak} GPU tasks at once (limit {RESOURCE_SLOTS})",
            )
        del futures
    wall = statistics.median(walls)
    return Measurement(
        {"wall_s": wall, "vs_ideal": wall / ideal},
        {"n_tasks": n, "ideal_s": ideal, "walls_s": walls, "gpu_slots_total": slots},
    )


class _SchedulerProbe:
    """Reads the scheduler process's RSS and, when possible, its task count.

    Uses ``client.run_on_scheduler`` (dask's API) when the client has it;
    otherwise finds the process that listens on the scheduler's port among
    this process and its descendants and reads its RSS from outside.
    """

    def __init__(self, ctx: Context) -> None:
        self.client = ctx.client
        self.remote = hasattr(self.client, "run_on_scheduler")
        if self.remote:
            self.pid = int(self.client.run_on_scheduler(tasks.process_id))
        else:
            self.pid = _pid_listening_on(ctx.cluster.scheduler_address)
        self.method = "run_on_scheduler" if self.remote else "listening port"

    def rss(self) -> int:
        """Return the scheduler process's resident set size in bytes."""
        if self.remote:
            return int(self.client.run_on_scheduler(tasks.process_rss))
        import psutil

        return int(psutil.Process(self.pid).memory_info().rss)

    def task_count(self) -> int | None:
        """Return how many tasks the scheduler holds, or None if unknown."""
        if not self.remote:
            return None
        try:
            count = self.client.run_on_scheduler(tasks.scheduler_task_count)
        except Exception:
            return None
        return count if isinstance(count, int) else None


def _pid_listening_on(address: str) -> int:
    """Return the pid of this process or a descendant listening on ``address``'s port."""
    import psutil

    port = urlsplit(address).port
    check(port is not None, f"cannot find a port in scheduler address {address!r}")
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            connections = proc.net_connections(kind="inet")
        except psutil.Error:
            continue
        for conn in connections:
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                return int(proc.pid)
    raise RuntimeError(f"no process of this run listens on {address}")


def _wait_until_stable(read: Callable[[], int], timeout: float = 10.0) -> int:
    """Sample ``read()`` every 0.25 s until two samples agree within 1%."""
    deadline = time.monotonic() + timeout
    previous = read()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        current = read()
        if abs(current - previous) <= 0.01 * max(previous, 1):
            return current
        previous = current
    return previous


def pending_memory(ctx: Context) -> Measurement:
    """Scheduler memory per pending task.

    Submits a gate task that blocks until a file exists, maps a task that
    depends on the gate over ``range(n)``, and measures the scheduler
    process's RSS before and after the graph has arrived.  Then releases the
    pending futures and opens the gate.
    """
    import psutil

    client = ctx.client
    n = size("pending_memory", ctx.quick)
    _warm_up(ctx)
    probe = _SchedulerProbe(ctx)
    me = psutil.Process()
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        gate_path = os.path.join(tmp, "open")
        baseline_count = probe.task_count()
        rss_before = probe.rss()
        client_rss_before = me.memory_info().rss
        gate = client.submit(tasks.wait_for_file, gate_path, 600.0, pure=False)
        start = time.perf_counter()
        futures = client.map(tasks.gated_identity, range(n), gate=gate, pure=False)
        # Messages from one client are handled in order, so once this later
        # task is done the scheduler has taken in the whole map.
        check(client.submit(tasks.inc, 0, pure=False).result() == 1, "barrier task")
        count = probe.task_count()
        if count is not None and baseline_count is not None:
            deadline = time.monotonic() + 60
            while count is not None and count < baseline_count + n:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"scheduler holds {count} tasks, expected >= {n}")
                time.sleep(0.1)
                count = probe.task_count()
            rss_after = probe.rss()
        else:
            rss_after = _wait_until_stable(probe.rss)
        submit_s = time.perf_counter() - start
        client_rss_after = me.memory_info().rss
        check(not gate.done(), "the gate finished early, so tasks were not pending")
        check(not any(f.done() for f in futures[:: max(1, n // 100)]), "gated tasks ran early")
        del futures  # releases (forgets) every pending task; faster than cancel()
        with open(gate_path, "w"):
            pass
        check(gate.result() is True, "gate task did not see its file")
    per_task = (rss_after - rss_before) / n
    return Measurement(
        {"bytes_per_task": per_task},
        {
            "n_tasks": n,
            "scheduler_rss_before": rss_before,
            "scheduler_rss_after": rss_after,
            "rss_method": probe.method,
            "scheduler_in_client_process": probe.pid == os.getpid(),
            "client_bytes_per_task": (client_rss_after - client_rss_before) / n,
            "scheduler_task_count": count,
            "submit_and_settle_s": submit_s,
        },
    )


_THROUGHPUT = "tasks/s"

WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "map_noop",
            "client.map(identity, range(N)) + gather",
            map_noop,
            (
                MetricSpec(
                    "tasks_per_s",
                    "throughput",
                    _THROUGHPUT,
                    True,
                    target=VsDask({"dask": 10, "dask-inf": 4}, ">=10x dask, >=4x dask-inf"),
                ),
            ),
        ),
        Workload(
            "map_noop_100k",
            "map_noop with 5x as many tasks; per-task cost vs map_noop",
            map_noop_100k,
            (
                MetricSpec("tasks_per_s", "throughput", _THROUGHPUT, True),
                MetricSpec(
                    "cost_vs_map_noop",
                    "per-task cost / map_noop's",
                    "x",
                    False,
                    compare=False,
                    derived=True,
                    target=Absolute("<=", 1.2, "<=1.2x (within 20%)"),
                ),
            ),
            timeout_s=(1800.0, 60.0),
        ),
        Workload(
            "latency",
            "sequential submit(inc, i).result() round trips",
            latency,
            (
                MetricSpec(
                    "p50_ms",
                    "p50",
                    "ms",
                    False,
                    target=VsDask({"best": 10}, "<=0.1x dask"),
                ),
                MetricSpec("p99_ms", "p99", "ms", False),
                MetricSpec("raw_p50_ms", "raw asyncio TCP p50", "ms", False, compare=False),
                MetricSpec(
                    "p50_vs_raw",
                    "p50 / raw p50",
                    "x",
                    False,
                    compare=False,
                    target=Absolute("<=", 5, "<=5x raw"),
                ),
            ),
        ),
        Workload(
            "tree_reduce",
            "binary-tree reduction graph through client.get",
            tree_reduce,
            (
                MetricSpec(
                    "tasks_per_s",
                    "throughput",
                    _THROUGHPUT,
                    True,
                    target=VsDask({"best": 5}, ">=5x dask"),
                ),
            ),
        ),
        Workload(
            "dask_array",
            "(x + x.T).mean() on a random dask array via scheduler=client.get",
            dask_array,
            (
                MetricSpec(
                    "wall_s",
                    "wall time",
                    "s",
                    False,
                    target=VsDask({"best": 1.25}, "<=0.8x dask time"),
                ),
            ),
        ),
        Workload(
            "transfer",
            "one large array moved from worker A to worker B",
            transfer,
            (
                MetricSpec(
                    "mb_per_s",
                    "bandwidth",
                    "MB/s",
                    True,
                    target=VsDask({"best": 1.0}, ">=1.0x dask"),
                ),
                MetricSpec("raw_mb_per_s", "raw TCP copy", "MB/s", True, compare=False),
                MetricSpec(
                    "vs_raw",
                    "bandwidth / raw",
                    "x",
                    True,
                    compare=False,
                    target=Absolute(">=", 0.7, ">=0.7x raw"),
                ),
            ),
        ),
        Workload(
            "resources",
            "40 x sleep(0.05) holding GPU=1 on 2 workers with GPU=2",
            resources,
            (
                MetricSpec("wall_s", "wall time", "s", False),
                MetricSpec(
                    "vs_ideal",
                    "wall / ideal",
                    "x",
                    False,
                    compare=False,
                    target=Absolute("<=", 1.05, "<=1.05x ideal"),
                ),
            ),
            cluster=ClusterSpec(
                threads_per_worker=RESOURCE_THREADS, resources={"GPU": RESOURCE_SLOTS}
            ),
        ),
        Workload(
            "pending_memory",
            "scheduler RSS per task waiting on an unfinished dependency",
            pending_memory,
            (
                MetricSpec(
                    "bytes_per_task",
                    "scheduler memory",
                    "B/task",
                    False,
                    target=Absolute("<=", 2048, "<=2 KB/task"),
                ),
            ),
            backends=("corral", "dask"),
        ),
    )
}
