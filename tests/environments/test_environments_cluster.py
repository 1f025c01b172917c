"""Worker environments over real processes: a scheduler and two worker subprocesses that differ.

Worker "high" declares ``MEMORY=64e9`` and a ``DB`` resource; worker "low"
declares ``MEMORY=8e9``.  The conditions below read the declared memory (the
machine's own memory when none is declared), as the seed's examples read
``psutil.virtual_memory().total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading

import pytest

import corral
from corral import Client, LocalCluster, WorkerEnvironment, get_environment_state, get_worker
from corral.environments import NotAMemberError

HIGH = {"MEMORY": 64e9, "DB": 1}
LOW = {"MEMORY": 8e9}


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(
        n_workers=2, threads_per_worker=2, processes=True, resources=[HIGH, LOW]
    ) as c:
        yield c


@pytest.fixture
def client(cluster):
    with Client(cluster) as c:
        yield c
        for name in c.environments():  # leave the shared cluster clean
            with contextlib.suppress(Exception):
                c.unregister_worker_environment(name)


def addresses(client):
    """``(high, low)`` worker addresses."""
    workers = client.scheduler_info()["workers"]
    high = next(a for a, w in workers.items() if w["resources"].get("MEMORY", 0) > 30e9)
    low = next(a for a in workers if a != high)
    return high, low


def worker_memory(worker):
    import psutil

    return worker.resources.get("MEMORY", psutil.virtual_memory().total)


# -- the seed's high-memory example, with Corral's names ------------------------------------
def has_high_memory(dask_worker):
    return worker_memory(dask_worker) > 30e9


class HighMemory(WorkerEnvironment):
    "An environment for workers with at least 30GB of RAM"

    name = "high-memory"

    def condition(self):
        return worker_memory(get_worker()) > 30e9


def where(i=None):
    return get_worker().address


def test_seed_functional_style(client):
    high, low = addresses(client)
    answer = client.register_worker_environment(name="high-memory", condition=has_high_memory)
    assert answer == {
        high: {"status": "OK", "member": True},
        low: {"status": "OK", "member": False},
    }
    assert client.environments() == {"high-memory": [high]}
    workers = client.scheduler_info()["workers"]
    assert workers[high]["environments"] == ["high-memory"]
    assert workers[low]["environments"] == []
    futures = client.map(where, range(12), environment="high-memory")
    assert set(client.gather(futures)) == {high}
    assert client.submit(where, environment=["high-memory"], pure=False).result() == high


@pytest.mark.parametrize("environment", [HighMemory, HighMemory()], ids=["class", "instance"])
def test_seed_class_based_style(client, environment):
    high, low = addresses(client)
    answer = client.register_worker_environment(name="high-memory", environment=environment)
    assert {a: r["member"] for a, r in answer.items()} == {high: True, low: False}
    assert client.environments() == {"high-memory": [high]}
    # composes with resources= and workers=
    f = client.submit(where, environment="high-memory", resources={"MEMORY": 1e9}, pure=False)
    assert f.result() == high
    f = client.submit(where, environment="high-memory", workers=[high], pure=False)
    assert f.result() == high
    client.unregister_worker_environment("high-memory")
    assert client.environments() == {}
    # the class attribute names it when no name= is given
    client.register_worker_environment(environment=environment)
    assert client.environments() == {"high-memory": [high]}


def test_name_is_required_and_checked(client):
    with pytest.raises(ValueError, match="needs a name"):
        client.register_worker_environment(condition=has_high_memory)
    with pytest.raises(ValueError, match="needs a name"):
        client.register_worker_environment(environment=WorkerEnvironment)
    with pytest.raises(TypeError, match="must be a string"):
        client.register_worker_environment(name=3, condition=has_high_memory)
    with pytest.raises(ValueError, match="must not be empty"):
        client.register_worker_environment(name="  ", condition=has_high_memory)
    with pytest.raises(TypeError, match="not both"):
        client.register_worker_environment(environment=HighMemory, setup=has_high_memory)
    with pytest.raises(TypeError, match="WorkerEnvironment"):
        client.register_worker_environment(environment=dict)
    with pytest.raises(ValueError, match="no worker environment named 'nope'"):
        client.unregister_worker_environment("nope")
    with pytest.raises(ValueError, match="no worker environment named 'nope'"):
        client.refresh_worker_environment("nope")
    with pytest.raises(TypeError, match="must be a string"):
        client.submit(where, environment=[1])
    assert client.environments() == {}


# -- a database-access environment: a real sqlite3 connection kept in the state --------------
class DatabaseAccess(WorkerEnvironment):
    """Workers with a DB resource open one connection each, kept in the environment's state."""

    name = "database-access"

    def __init__(self, path):
        self.path = path

    def condition(self, worker):
        return worker.resources.get("DB", 0) > 0

    def setup(self, worker):
        db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        db.execute("CREATE TABLE IF NOT EXISTS rows (worker TEXT, value INTEGER)")
        db.execute("INSERT INTO rows VALUES (?, ?)", (f"setup {worker.address}", -1))
        db.commit()
        state = get_environment_state(self.name)
        state["db"] = db
        state["lock"] = threading.Lock()

    def teardown(self, worker):
        state = worker.environment_state[self.name]
        with state["lock"]:
            state["db"].execute(
                "INSERT INTO rows VALUES (?, ?)", (f"teardown {worker.address}", -1)
            )
            state["db"].commit()
            state["db"].close()


def write_row(value):
    state = get_environment_state("database-access")
    with state["lock"]:
        state["db"].execute("INSERT INTO rows VALUES (?, ?)", (get_worker().address, value))
        state["db"].commit()
    return get_worker().address


def rows(path):
    with sqlite3.connect(path) as db:
        return db.execute("SELECT worker, value FROM rows ORDER BY rowid").fetchall()


def test_database_access_setup_state_tasks_and_teardown(client, tmp_path):
    high, low = addresses(client)
    path = str(tmp_path / "app.db")
    answer = client.register_worker_environment(environment=DatabaseAccess(path))
    assert {a: r["member"] for a, r in answer.items()} == {high: True, low: False}
    assert rows(path) == [(f"setup {high}", -1)]
    ran_on = client.gather(client.map(write_row, range(20), environment="database-access"))
    assert set(ran_on) == {high}
    written = rows(path)
    assert sorted(v for w, v in written if v >= 0) == list(range(20))
    assert {w for w, v in written if v >= 0} == {high}  # only on members
    # the state is this worker's; a non-member is told which environment it lacks
    f = client.submit(write_row, 99, workers=[low])
    with pytest.raises(NotAMemberError, match="not a member of the environment 'database-access'"):
        f.result()
    has_state = client.run(lambda dask_worker: sorted(dask_worker.environment_state))
    assert has_state == {high: ["database-access"], low: []}
    assert client.unregister_worker_environment("database-access") == {
        high: {"status": "OK", "member": False},
        low: {"status": "OK", "member": False},
    }
    assert rows(path)[-1] == (f"teardown {high}", -1)  # committed, then closed
    assert [w for w, _ in rows(path)].count(f"teardown {high}") == 1
    assert client.run(lambda dask_worker: dict(dask_worker.environment_state)) == {
        high: {},
        low: {},
    }


# -- setup before tasks; hooks of any shape ---------------------------------------------------
def read_ready():
    return get_environment_state("slow")["ready"]


def test_tasks_submitted_before_registration_wait_for_the_setup(client):
    f = client.submit(read_ready, environment="slow", pure=False)
    assert client.why_pending(f) == (
        "needs environment 'slow'; no environment named 'slow' is registered"
    )

    async def setup(worker):
        await asyncio.sleep(0.5)
        corral.get_environment_state("slow")["ready"] = worker.address

    answer = client.register_worker_environment(name="slow", setup=setup)
    assert all(r["member"] for r in answer.values()) and len(answer) == 2
    assert f.result() in answer


def test_hooks_may_take_no_argument(client, tmp_path):
    log = tmp_path / "log.txt"

    def setup():
        with open(log, "a") as out:
            out.write(f"setup {get_worker().name}\n")

    client.register_worker_environment(name="plain", condition=lambda: True, setup=setup)
    assert sorted(log.read_text().splitlines()) == ["setup 0", "setup 1"]
    assert sorted(client.environments()["plain"]) == sorted(addresses(client))


# -- errors ---------------------------------------------------------------------------------
def condition_needs_db(worker):
    if not worker.resources.get("DB"):
        raise RuntimeError(f"no database on {worker.name}")
    return True


def setup_needs_db(worker):
    if not worker.resources.get("DB"):
        raise LookupError("no database driver")


def test_failing_condition_is_raised_with_the_address_and_remote_traceback(client):
    high, low = addresses(client)
    with pytest.raises(RuntimeError, match="no database on 1") as info:
        client.register_worker_environment(name="needs-db", condition=condition_needs_db)
    exc = info.value
    assert any(low in note and "condition failed" in note for note in exc.__notes__)
    remote = str(exc.__cause__)
    assert "condition_needs_db" in remote and low in remote
    # the environment stays registered; the worker where it failed is not a member
    assert client.environments() == {"needs-db": [high]}
    events = [msg for _, msg in client.get_events("environments")]
    failed = [e for e in events if e["action"] == "condition-failed"]
    assert failed[-1]["worker"] == low and failed[-1]["name"] == "needs-db"
    assert "condition_needs_db" in failed[-1]["traceback"]


def test_failing_setup_is_raised_and_that_worker_is_not_a_member(client):
    high, low = addresses(client)
    with pytest.raises(LookupError, match="no database driver") as info:
        client.register_worker_environment(name="setup-db", setup=setup_needs_db)
    assert any(low in note and "setup failed" in note for note in info.value.__notes__)
    assert "setup_needs_db" in str(info.value.__cause__)
    assert client.environments() == {"setup-db": [high]}
    # no state is left behind where the setup failed
    states = client.run(lambda dask_worker: sorted(dask_worker.environment_state))
    assert states == {high: ["setup-db"], low: []}


def failing_teardown(worker):
    raise OSError(f"cannot close on {worker.name}")


def test_failing_teardown_is_raised_and_the_worker_leaves_anyway(client):
    high, low = addresses(client)
    client.register_worker_environment(
        name="bad-teardown", condition=has_high_memory, teardown=failing_teardown
    )
    with pytest.raises(OSError, match="cannot close on 0") as info:
        client.unregister_worker_environment("bad-teardown")
    assert any(high in note and "teardown failed" in note for note in info.value.__notes__)
    assert client.environments() == {}
    assert client.run(lambda dask_worker: sorted(dask_worker.environment_state)) == {
        high: [],
        low: [],
    }
    events = [msg for _, msg in client.get_events("environments")]
    assert any(e["action"] == "teardown-failed" and e["worker"] == high for e in events)


# -- replace, refresh, unregister --------------------------------------------------------------
class Versioned(WorkerEnvironment):
    name = "versioned"

    def __init__(self, version, log):
        self.version = version
        self.log = log

    def _write(self, text):
        with open(self.log, "a") as out:
            out.write(f"{get_worker().name} {text} v{self.version}\n")

    def setup(self):
        self._write("setup")
        get_environment_state(self.name)["version"] = self.version

    def teardown(self):
        self._write("teardown")


def version(i=None):
    return get_environment_state("versioned")["version"]


def test_registering_a_name_again_replaces_it(client, tmp_path):
    log = tmp_path / "log.txt"
    client.register_worker_environment(environment=Versioned(1, str(log)))
    assert set(client.gather(client.map(version, range(4), environment="versioned"))) == {1}
    client.register_worker_environment(environment=Versioned(2, str(log)))
    assert set(client.gather(client.map(version, range(4, 8), environment="versioned"))) == {2}
    for name in ("0", "1"):
        mine = [line.split(" ", 1)[1] for line in log.read_text().splitlines() if line[0] == name]
        assert mine == ["setup v1", "teardown v1", "setup v2"]
    actions = [msg["action"] for _, msg in client.get_events("environments")]
    assert "replace" in actions


def flag_condition(path):
    def condition():
        return os.path.exists(path)

    return condition


def test_refresh_checks_the_condition_again(client, tmp_path):
    flag, log = tmp_path / "flag", tmp_path / "log.txt"

    def setup(worker):
        with open(log, "a") as out:
            out.write(f"setup {worker.name}\n")

    def teardown(worker):
        with open(log, "a") as out:
            out.write(f"teardown {worker.name}\n")

    answer = client.register_worker_environment(
        name="flagged", condition=flag_condition(str(flag)), setup=setup, teardown=teardown
    )
    assert not any(r["member"] for r in answer.values())
    assert client.environments() == {"flagged": []}
    flag.touch()
    answer = client.refresh_worker_environment("flagged")
    assert all(r["member"] for r in answer.values())
    assert sorted(client.environments()["flagged"]) == sorted(addresses(client))
    client.refresh_worker_environment("flagged")  # members that still qualify: no second setup
    assert sorted(log.read_text().splitlines()) == ["setup 0", "setup 1"]
    flag.unlink()
    client.refresh_worker_environment("flagged")
    assert client.environments() == {"flagged": []}
    assert sorted(log.read_text().splitlines()) == sorted(
        ["setup 0", "setup 1", "teardown 0", "teardown 1"]
    )


def test_unregistering_sends_waiting_tasks_back_to_no_worker(client):
    client.register_worker_environment(name="gone", condition=has_high_memory)
    client.unregister_worker_environment("gone")
    f = client.submit(where, environment="gone", pure=False)
    assert client.why_pending(f) == (
        "needs environment 'gone'; no environment named 'gone' is registered"
    )
    client.cancel(f)


def test_environments_outlive_the_registering_client(cluster):
    with Client(cluster) as first:
        high, _ = addresses(first)
        first.register_worker_environment(name="kept", condition=has_high_memory)
    with Client(cluster) as second:
        assert second.environments() == {"kept": [high]}
        assert second.submit(where, environment="kept", pure=False).result() == high
        second.unregister_worker_environment("kept")


# -- dask collections: annotate, compute, persist, get -----------------------------------------
def test_dask_annotate_compute_persist_and_get(client):
    dask = pytest.importorskip("dask")
    high, _ = addresses(client)
    client.register_worker_environment(name="high-memory", condition=has_high_memory)

    located = dask.delayed(where, pure=False)

    with dask.annotate(environment="high-memory"):
        parts = [located(i) for i in range(4)]
    assert set(client.compute(parts, sync=True)) == {high}
    assert set(dask.compute(*parts, scheduler=client.get)) == {high}
    persisted = client.persist(parts)
    assert set(client.gather(client.compute(persisted))) == {high}
    with dask.annotate(environment=["high-memory"]):
        assert set(client.compute([located(i) for i in range(4)], sync=True)) == {high}
    # without annotations: arguments of get / compute
    dsk = {("w", i): (where, i) for i in range(4)}
    assert set(client.get(dsk, list(dsk), environment="high-memory")) == {high}
    assert set(
        client.compute([located(i) for i in range(4)], environment="high-memory", sync=True)
    ) == {high}
