"""Version checks: the comparison rules, and mismatches seen over real processes.

A mismatched worker is simulated with the test hook ``CORRAL_TEST_FAKE_VERSIONS``
(read by ``corral.versions``), never by touching installed packages.
"""

from __future__ import annotations

import json
import warnings

import pytest
from consistency_helpers import FAKE_NUMPY, Corral, corral_env, poll

from corral import Client, LocalCluster, VersionMismatchError, VersionMismatchWarning
from corral.versions import (
    FAKE_VERSIONS_ENV,
    compare_versions,
    format_mismatches,
    get_versions,
    joining_worker_mismatches,
)


def report(**packages):
    base = {"python": "3.11.7", "corral": "0.1.0", "cloudpickle": "3.0", "msgpack": "1.0"}
    base.update(packages)
    return {"host": {}, "packages": base}


# -- the rules ------------------------------------------------------------------------------
def test_matching_versions_are_no_mismatch():
    same = report(numpy="2.0")
    assert compare_versions(same, same, {"tcp://a:1": same, "tcp://b:2": same}) == []


def test_a_worker_with_another_numpy_is_a_mismatch_and_the_table_says_so():
    good, odd = report(numpy="2.0"), report(numpy="0.0.1")
    rows = compare_versions(good, good, {"tcp://a:1": good, "tcp://b:2": odd})
    assert [(r.package, r.client, r.scheduler) for r in rows] == [("numpy", "2.0", "2.0")]
    assert rows[0].workers == {"tcp://a:1": "2.0", "tcp://b:2": "0.0.1"}
    text = format_mismatches(rows)
    header = next(line for line in text.splitlines() if line.startswith("| Package"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "Package",
        "Client",
        "Scheduler",
        "Workers",
    ]
    [row] = [line for line in text.splitlines() if line.startswith("| numpy")]
    assert "0.0.1 (tcp://b:2)" in row and "2.0 (tcp://a:1)" in row


def test_the_scheduler_lacking_an_optional_package_is_not_a_mismatch():
    full = report(numpy="2.0", pandas="2.2")
    bare = report()  # no numpy, no pandas
    assert compare_versions(full, bare, {"tcp://a:1": full}) == []
    # ... nor another version of it: the scheduler runs no task code
    assert compare_versions(full, report(numpy="1.0"), {"tcp://a:1": full}) == []
    # but a required package counts on the scheduler too
    [row] = compare_versions(full, report(msgpack="0.9"), {"tcp://a:1": full})
    assert (row.package, row.scheduler) == ("msgpack", "0.9")


def test_missing_is_shown_as_missing():
    with_pandas, without = report(pandas="2.2"), report()
    [row] = compare_versions(with_pandas, with_pandas, {"tcp://a:1": without})
    assert (row.package, row.workers) == ("pandas", {"tcp://a:1": "missing"})
    assert "missing" in format_mismatches([row])


def test_a_joining_worker_is_compared_with_scheduler_clients_and_workers():
    good, odd = report(numpy="2.0"), report(numpy="0.0.1")
    rows = joining_worker_mismatches(odd, report(), {"client-1": good}, {"tcp://a:1": good})
    assert rows == [("numpy", "0.0.1", "missing", {"client-1": "2.0"}, {"tcp://a:1": "2.0"})]
    assert joining_worker_mismatches(good, report(), {"client-1": good}, {}) == []
    assert joining_worker_mismatches(None, report(), {}, {}) == []  # a worker in another language


def test_fake_versions_hook(monkeypatch):
    real = get_versions()["packages"]
    monkeypatch.setenv(FAKE_VERSIONS_ENV, json.dumps({"numpy": "0.0.1", "pandas": None}))
    fake = get_versions()["packages"]
    assert fake["numpy"] == "0.0.1" and fake["pandas"] is None
    assert fake["corral"] == real["corral"]
    monkeypatch.setenv(FAKE_VERSIONS_ENV, "not json")
    with pytest.raises(ValueError, match=FAKE_VERSIONS_ENV):
        get_versions()
    monkeypatch.delenv(FAKE_VERSIONS_ENV)
    assert get_versions()["packages"] == real


def test_bad_version_check_values_are_refused():
    with pytest.raises(ValueError, match="version_check"):
        Client("tcp://127.0.0.1:1", version_check="loud")


# -- over real processes ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_cluster():
    """One worker as installed, then one that reports NumPy 0.0.1 (joined later)."""
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True) as cluster:
        with Client(cluster, version_check="off") as c:
            (good,) = c.scheduler_info()["workers"]
        with pytest.MonkeyPatch.context() as m:
            m.setenv(FAKE_VERSIONS_ENV, FAKE_NUMPY)  # read by the worker started now
            cluster.scale(2)
        with Client(cluster, version_check="off") as c:
            (odd,) = set(c.scheduler_info()["workers"]) - {good}
        yield cluster, good, odd


def test_a_later_worker_with_a_mismatch_is_in_the_event_log(mixed_cluster):
    cluster, good, odd = mixed_cluster
    with Client(cluster, version_check="off") as c:
        events = [msg for _, msg in c.get_events("versions")]
    [event] = [e for e in events if e["worker"] == odd]
    assert event["action"] == "mismatch"
    assert event["packages"] == {"numpy": "0.0.1"}
    assert "| numpy" in event["table"] and "0.0.1" in event["table"]
    assert not [e for e in events if e["worker"] == good]


def test_connecting_warns_with_one_table(mixed_cluster):
    cluster, good, odd = mixed_cluster
    numpy = get_versions()["packages"]["numpy"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Client(cluster) as c:
            assert c.submit(sum, [1, 2]).result() == 3  # a warning, not an error
    [warning] = [w for w in caught if issubclass(w.category, VersionMismatchWarning)]
    text = str(warning.message)
    assert "Mismatched versions" in text
    lines = text.splitlines()
    assert any(line.startswith("| Package") and "Workers" in line for line in lines)
    [row] = [line for line in lines if line.startswith("| numpy")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:3] == ["numpy", numpy, numpy]
    assert f"0.0.1 ({odd})" in cells[3] and f"{numpy} ({good})" in cells[3]
    assert not any(line.startswith(("| corral", "| python")) for line in lines)


def test_get_versions_check_raises_and_reports_every_party(mixed_cluster):
    cluster, good, odd = mixed_cluster
    with Client(cluster, version_check="off") as c:
        versions = c.get_versions()
        assert set(versions) == {"client", "scheduler", "workers"}
        assert set(versions["workers"]) == {good, odd}
        assert versions["workers"][odd]["packages"]["numpy"] == "0.0.1"
        corral = versions["client"]["packages"]["corral"]
        assert versions["scheduler"]["packages"]["corral"] == corral
        with pytest.raises(VersionMismatchError, match="numpy") as info:
            c.get_versions(check=True)
        assert [m.package for m in info.value.mismatches] == ["numpy"]
        extra = c.get_versions(packages=["psutil"])
        assert extra["workers"][good]["packages"]["psutil"] is not None


def test_strict_client_raises_on_connect(mixed_cluster):
    cluster, _, _ = mixed_cluster
    with pytest.raises(VersionMismatchError, match=r"0\.0\.1"):
        Client(cluster, version_check="strict")


def test_strict_client_has_later_mismatched_workers_refused(tmp_path):
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=True) as cluster,
        Client(cluster, version_check="strict") as c,
    ):
        worker = Corral(
            tmp_path / "worker.log",
            "worker",
            cluster.scheduler_address,
            "--no-nanny",
            "--nthreads",
            "1",
            env=corral_env(token=cluster.token, fake=FAKE_NUMPY),
        )
        try:
            code = worker.wait(60)
        finally:
            worker.stop()
        out = worker.output()
        assert code == 78, out
        assert "refused" in out and "versions do not match" in out
        assert "strict" in out and "| numpy" in out and "0.0.1" in out
        assert len(c.scheduler_info()["workers"]) == 1
        events = [msg for _, msg in c.get_events("versions")]
        assert [e["action"] for e in events] == ["refused"]
        assert events[0]["packages"] == {"numpy": "0.0.1"}


def test_strict_scheduler_refuses_a_mismatched_worker(tmp_path):
    sched_file = tmp_path / "scheduler.json"
    # This scheduler has no NumPy or pandas: no reason to refuse anyone by itself.
    scheduler = Corral(
        tmp_path / "scheduler.log",
        "scheduler",
        "--port",
        "0",
        "--scheduler-file",
        str(sched_file),
        "--version-check",
        "strict",
        env=corral_env(fake='{"numpy": null, "pandas": null}'),
    )
    procs = [scheduler]
    try:
        address = poll(lambda: sched_file.exists() and json.loads(sched_file.read_text()), "file")
        address = address["address"]

        def worker(name, fake=None):
            proc = Corral(
                tmp_path / f"{name}.log",
                "worker",
                address,
                "--no-nanny",
                "--nthreads",
                "1",
                "--name",
                name,
                env=corral_env(fake=fake),
            )
            procs.append(proc)
            return proc

        worker("good")
        with Client(address, version_check="off") as c:
            c.wait_for_workers(1, timeout=60)
            odd = worker("odd", fake=FAKE_NUMPY)
            assert odd.wait(60) == 78, odd.output()
            out = odd.output()
            assert "refused the connection" in out and "versions do not match" in out
            assert "| numpy" in out and "0.0.1" in out
            assert [w["name"] for w in c.scheduler_info()["workers"].values()] == ["good"]
            [event] = [msg for _, msg in c.get_events("versions")]
            assert event["action"] == "refused" and event["worker"] == "odd"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with Client(address) as c:  # a full client, a bare scheduler: no mismatch
                assert c.submit(sum, [2, 3]).result() == 5
                c.get_versions(check=True)
        assert not [w for w in caught if issubclass(w.category, VersionMismatchWarning)]
    finally:
        for p in procs:
            p.stop()


def test_local_cluster_version_check_option(monkeypatch):
    with pytest.raises(ValueError, match="version_check must be one of"):
        LocalCluster(n_workers=0, version_check="loud")
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, version_check="strict"
    ) as cluster:
        monkeypatch.setenv(FAKE_VERSIONS_ENV, FAKE_NUMPY)  # read by the worker started now
        with pytest.raises(RuntimeError, match="exited during startup"):  # refused
            cluster.scale(2)
        monkeypatch.delenv(FAKE_VERSIONS_ENV)
        with Client(cluster, version_check="off") as c:
            events = poll(lambda: [msg for _, msg in c.get_events("versions")], "an event")
            assert [e["action"] for e in events] == ["refused"]
            assert len(c.scheduler_info()["workers"]) == 1
