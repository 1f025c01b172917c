"""Memory: a worker pauses above its pause mark and leaves (to be restarted) above its
terminate mark; its tasks finish elsewhere and every result is correct."""

from __future__ import annotations

import os
import sys

import pytest
from rel_support import corral_env, corral_process, poll, scheduler_thread

from corral import Client
from corral.protocol.messages import Compute, UpdateGraph
from corral.scheduler.state import WorkerStatus
from corral.worker.memory import MEMORY_EXIT_CODE, MemoryPolicy, decide
from corral.worker.state import ComputeEvent, Execute, ExecuteSuccess, PauseEvent

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from state_helpers import FN, W1, W2, Sched, ctask, finished, spec
from state_helpers import Worker as WState

MiB = 2**20


# -- the pure parts -----------------------------------------------------------------------------
def test_decide() -> None:
    policy = MemoryPolicy(pause=0.8, terminate=0.95)
    assert decide(50, 100, policy, paused=False) is None
    assert decide(80, 100, policy, paused=False) == "pause"
    assert decide(78, 100, policy, paused=True) is None  # hysteresis
    assert decide(74, 100, policy, paused=True) == "resume"
    assert decide(95, 100, policy, paused=True) == "terminate"
    assert decide(10**12, 0, policy, paused=False) is None  # no limit
    assert decide(99, 100, MemoryPolicy(pause=None), paused=False) is None
    with pytest.raises(ValueError):
        MemoryPolicy(pause=0)


def test_a_paused_worker_state_starts_nothing_until_it_resumes() -> None:
    w = WState(nthreads=1, prefetch=0)
    assert w(PauseEvent(True)) == []
    out = w(ComputeEvent([ctask("a"), ctask("b")]))
    assert not any(isinstance(i, Execute) for i in out)
    out = w(PauseEvent(False))
    assert [i.key for i in out if isinstance(i, Execute)] == ["a"]
    # paused while "a" runs: "a" finishes and is reported, "b" waits
    w(PauseEvent(True))
    out = w(ExecuteSuccess("a", 1, 8, "int", 0.0, 1.0))
    assert not any(isinstance(i, Execute) for i in out)
    assert w.states()["a"] == "memory" and w.states()["b"] == "ready"
    out = w(PauseEvent(False))
    assert [i.key for i in out if isinstance(i, Execute)] == ["b"]


def _placed(out: dict) -> dict[str, list[str]]:
    return {
        addr: [t.key for m in msgs if isinstance(m, Compute) for t in m.tasks]
        for addr, msgs in out.items()
        if any(isinstance(m, Compute) for m in msgs)
    }


def test_the_scheduler_places_nothing_on_a_paused_worker() -> None:
    s = Sched(W1, W2)
    s(W1, WorkerStatus(W1, "paused"))
    out = s(
        "c",
        UpdateGraph(
            tasks=[spec(f"t{i}", fn="f") for i in range(4)],
            wanted=[f"t{i}" for i in range(4)],
            functions={"f": FN},
        ),
    )
    assert _placed(out) == {W2: ["t0", "t1", "t2", "t3"]}
    assert s.state.worker_info(s.state.workers[W1])["status"] == "paused"
    # a task only W1 may run waits, and says why
    out = s(
        "c",
        UpdateGraph(
            tasks=[spec("only1", fn="f", workers=[W1])], wanted=["only1"], functions={"f": FN}
        ),
    )
    assert _placed(out) == {}
    assert "paused" in s.state.why_pending("only1")
    # resuming places it
    out = s(W1, WorkerStatus(W1, "running"))
    assert _placed(out) == {W1: ["only1"]}
    run_id = s.tasks["only1"].run_id
    s(W1, finished("only1", run_id=run_id))
    assert s.tasks["only1"].state == "memory"
    # every worker paused: tasks wait (no-worker), nothing is lost
    s(W1, WorkerStatus(W1, "paused"))
    s(W2, WorkerStatus(W2, "paused"))
    out = s("c", UpdateGraph(tasks=[spec("late", fn="f")], wanted=["late"], functions={"f": FN}))
    assert _placed(out) == {} and s.tasks["late"].state == "no-worker"
    out = s(W2, WorkerStatus(W2, "running"))
    assert _placed(out) == {W2: ["late"]}


# -- real processes ------------------------------------------------------------------------------
def hold_memory(fraction: float):
    """Return an array that brings this worker's RSS to ``fraction`` of its memory limit.

    (A NumPy array: it is serialized out of band, without a second copy.)
    """
    import numpy as np
    import psutil

    from corral import get_worker

    limit = get_worker().memory_limit
    rss = psutil.Process().memory_info().rss
    return np.ones(max(0, int(fraction * limit) - rss), dtype=np.uint8)


def hog(nbytes: int, seconds: float) -> str:
    """Hold ``nbytes`` for a while; return the name of the worker that managed it."""
    import time

    from corral import get_worker

    block = bytearray(nbytes)
    time.sleep(seconds)
    del block
    return str(get_worker().name)


def where(x: int) -> tuple[int, str]:
    from corral import get_worker

    return x * 2, str(get_worker().name)


SMALL_LIMIT = 320 * MiB


@pytest.fixture
def two_workers():
    """A scheduler here; a supervised worker with a small memory limit, one with a big one."""
    with scheduler_thread(token="t") as s:
        env = corral_env("t")
        common = ["--nthreads", "1", "--log-level", "WARNING"]
        with (
            corral_process(
                "worker", s.address, "--nanny", "--name", "small",
                "--memory-limit", str(SMALL_LIMIT), *common, env=env,
            ) as small_proc,
            corral_process(
                "worker", s.address, "--no-nanny", "--name", "big", "--memory-limit", "8GiB",
                *common, env=env,
            ),
        ):  # fmt: skip
            poll(lambda: len(s.workers()) == 2, "both workers", timeout=60)
            yield s, small_proc


def _by_name(s) -> dict[str, dict]:
    """Workers by name; a supervisor may suffix names ("small-0"): keyed "small" then."""
    return {w["name"].split("-")[0]: w for w in s.workers().values()}


def test_memory_pause_then_resume(two_workers) -> None:
    s, _ = two_workers
    with Client(s.address, token="t", set_as_default=False) as c:
        small = _by_name(s)["small"]["address"]
        held = c.submit(hold_memory, 0.87, workers=[small], pure=False)
        poll(lambda: _by_name(s)["small"]["status"] == "paused", "the small worker to pause")
        # new work goes to the running worker, even work that prefers the paused one
        futures = [
            c.submit(where, i, workers=[small], allow_other_workers=True, pure=False)
            for i in range(10)
        ]
        assert [(v, n.split("-")[0]) for v, n in c.gather(futures)] == [
            (2 * i, "big") for i in range(10)
        ]
        pinned = c.submit(where, 100, workers=[small], pure=False)
        poll(lambda: "paused" in c.why_pending(pinned), "why_pending to say paused")
        assert not pinned.done()
        del held  # the big buffer is freed: the worker resumes and runs the pinned task
        value, name = pinned.result(timeout=30)
        assert value == 200 and name.startswith("small")
        assert _by_name(s)["small"]["status"] == "running"


def test_memory_terminate_restarts_the_worker_and_its_tasks_finish_elsewhere(two_workers) -> None:
    s, small_proc = two_workers
    with Client(s.address, token="t", set_as_default=False) as c:
        before = _by_name(s)["small"]
        small = before["address"]
        # Runs first on "small" (one thread), which passes its terminate mark and leaves.
        big_task = c.submit(
            hog, SMALL_LIMIT, 2.0, workers=[small], allow_other_workers=True, pure=False
        )
        queued = [
            c.submit(where, i, workers=[small], allow_other_workers=True, pure=False)
            for i in range(10)
        ]
        assert big_task.result(timeout=60).startswith("big")
        assert [(v, n.split("-")[0]) for v, n in c.gather(queued)] == [
            (2 * i, "big") for i in range(10)
        ]
        # the supervisor started a fresh "small" process (new pid, new address)
        after = poll(
            lambda: (w := _by_name(s).get("small")) and w["pid"] != before["pid"] and w,
            "a restarted small worker",
            timeout=60,
        )
        assert after["address"] != small
        assert small_proc.poll() is None  # the supervisor itself lives on
        assert (
            c.submit(where, 7, workers=[after["address"]], pure=False).result(timeout=30)[0] == 14
        )
        story = c.story(big_task)
        assert sum(1 for t in story if t[2] == "processing") == 2  # ran twice: small, then big
    assert MEMORY_EXIT_CODE not in (0, 75, 78)  # not "clean", "restart me", "refused"


# -- spilling to disk ----------------------------------------------------------------------------
def test_spill_buffer_round_trips_values_through_disk(tmp_path) -> None:
    import threading

    from corral.worker.spill import SpillBuffer

    buf = SpillBuffer(str(tmp_path), target=3_000)
    for i in range(10):
        buf[f"k{i}"] = bytes([i]) * 1_000
    assert len(buf) == 10 and set(buf) == {f"k{i}" for i in range(10)}
    assert buf.fast_bytes <= 3_000 and len(buf.slow) >= 7
    assert len(os.listdir(buf.directory)) == len(buf.slow)
    assert buf["k0"] == b"\x00" * 1_000  # read back from disk, now most recently used
    assert "k0" in buf.fast
    buf["lock"] = threading.Lock()  # cannot be pickled: stays in memory
    for i in range(10, 20):
        buf[f"k{i}"] = bytes([i]) * 1_000
    assert "lock" in buf.fast and "lock" in buf.unspillable
    assert buf.evict() > 0
    del buf["k1"]
    buf.pop("k2")
    assert "k1" not in buf and "k2" not in buf
    assert all(buf[f"k{i}"] == bytes([i]) * 1_000 for i in range(3, 20))
    buf.close()
    assert not os.path.exists(buf.directory)


def big(i: int) -> bytes:
    return bytes([i % 256]) * 500_000


def test_a_worker_spills_results_to_its_local_directory(tmp_path) -> None:
    from corral import Worker
    from corral.worker.spill import SpillBuffer

    with scheduler_thread(token="t") as s:
        worker = s.loop_thread.run(
            Worker(
                s.address,
                nthreads=1,
                token="t",
                memory_limit=4 * MiB,
                memory_spill_fraction=0.5,
                memory_pause_fraction=None,
                local_directory=str(tmp_path),
            ).start()
        )
        try:
            assert isinstance(worker.data, SpillBuffer)
            with Client(s.address, token="t", set_as_default=False) as c:
                parts = c.map(big, range(20))
                total = c.submit(lambda xs: sum(len(x) for x in xs), parts)
                assert total.result(timeout=30) == 20 * 500_000
                assert s.call(lambda: len(worker.data.slow)) > 0  # on disk now
                assert os.listdir(worker.data.directory)
                values = c.gather(parts)  # served from disk
                assert values == [big(i) for i in range(20)]
                info = c.scheduler_info()["workers"][worker.address]
                poll(
                    lambda: "spilled" in c.scheduler_info()["workers"][worker.address]["metrics"],
                    "spill metrics",
                )
                assert info["memory_limit"] == 4 * MiB
        finally:
            s.loop_thread.run(worker.close())
        assert not os.path.exists(worker.data.directory)
