"""A mixed cluster end to end: a Python scheduler, one Python worker and two
JavaScript workers (``node js/bin/corral-worker.js``, one offering ``GPU=1``).

Python tasks run only on the Python worker and JavaScript tasks only on the
JavaScript workers; each consumes the other's plain-data results.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from corral import Client, LocalCluster, Security
from corral.errors import RemoteError

ROOT = Path(__file__).resolve().parents[1]
JS_WORKER = ROOT / "js" / "bin" / "corral-worker.js"
MATHLIB = ROOT / "js" / "test" / "fixtures" / "mathlib.js"

pytestmark = [
    pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed"),
    pytest.mark.timeout(120),
]


def start_js_worker(
    address: str, token: str | None, log: Path, *extra: str
) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.pop("CORRAL_AUTH_TOKEN", None)
    if token:
        env["CORRAL_AUTH_TOKEN"] = token
    return subprocess.Popen(
        ["node", str(JS_WORKER), address, "--module", str(MATHLIB), *extra],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def workers_by_runtime(client: Client) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for w in client.scheduler_info()["workers"].values():
        out.setdefault(w["runtime"], []).append(w)
    return out


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    if not (ROOT / "js" / "node_modules" / "@msgpack" / "msgpack").exists():
        pytest.fail("the JavaScript worker's dependencies are not installed: run (cd js && npm ci)")
    logs = tmp_path_factory.mktemp("js-workers")
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False) as cluster:
        procs = [
            start_js_worker(
                cluster.scheduler_address,
                cluster.token,
                logs / "a.log",
                "--name",
                "js-a",
                "--nthreads",
                "2",
            ),
            start_js_worker(
                cluster.scheduler_address,
                cluster.token,
                logs / "gpu.log",
                "--name",
                "js-gpu",
                "--nthreads",
                "2",
                "--resources",
                "GPU=1",
            ),
        ]
        try:
            with Client(cluster) as client:
                client.wait_for_workers(3, timeout=60)
                yield client, cluster, logs
        finally:
            for p in procs:
                stop(p)


def stop_and_wait_gone(proc, client: Client, name: str) -> None:
    """SIGTERM a JavaScript worker, then wait until the scheduler no longer lists it."""
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    stop(proc)
    wait_for(lambda: all(w["name"] != name for w in workers_by_runtime(client).get("js", [])))


def holders(client: Client, futures) -> dict[str, set[str]]:
    """key -> the runtimes of the workers holding it (copies fetched by dependents too)."""
    info = client.scheduler_info()["workers"]
    return {k: {info[a]["runtime"] for a in v} for k, v in client.who_has(futures).items()}


def test_a_mixed_graph_passes_values_both_ways(mixed):
    client, _, _ = mixed
    a = client.submit(lambda n: list(range(n)), 4)  # Python: [0, 1, 2, 3]
    b = client.submit("mathlib:sum", a, runtime="js")  # JavaScript consumes a Python result: 6
    c = client.submit("mathlib:scale", a, factor=10, runtime="js")  # keyword arguments
    d = client.submit(
        lambda total, scaled: total * 100 + sum(scaled), b, c
    )  # Python consumes JS results
    assert d.result() == 6 * 100 + 60
    assert c.result() == [0, 10, 20, 30]
    # Each ran on its own runtime's workers (the other side holds fetched copies).
    held = holders(client, [a, b, c, d])
    assert "python" in held[a.key] and "js" in held[b.key] and "js" in held[c.key]
    assert held[d.key] == {"python"}


def test_large_values_travel_directly_between_python_and_javascript_workers(mixed):
    client, _, _ = mixed
    # > 64 KiB: not inlined anywhere; each side fetches from the other's peer port.
    big = client.submit(lambda n: list(range(n)), 50_000)
    total = client.submit("mathlib:sum", big, runtime="js")
    assert total.result() == sum(range(50_000))
    blob = client.submit("mathlib:bytes", 300_000, runtime="js")
    size = client.submit(len, blob)
    assert size.result() == 300_000
    assert client.gather(blob) == b"\x07" * 300_000  # the client fetches from the JS worker


def test_map_with_a_runtime_and_routing_never_mixes(mixed):
    client, _, _ = mixed
    js = client.map("mathlib:add", range(20), [100] * 20, runtime="js")
    py = client.map(lambda x: x + 1, range(20))
    assert client.gather(js) == [i + 100 for i in range(20)]
    assert client.gather(py) == [i + 1 for i in range(20)]
    assert all(r == {"js"} for r in holders(client, js).values()), holders(client, js)
    assert all(r == {"python"} for r in holders(client, py).values())
    with pytest.raises(TypeError, match="runtime="):
        client.submit("mathlib:add", 1, 2)


def test_javascript_errors_reach_python_with_their_stack(mixed):
    client, _, _ = mixed
    f = client.submit("mathlib:fail", "nope", runtime="js")
    with pytest.raises(RemoteError) as info:
        f.result()
    assert info.value.typename == "RangeError"
    assert info.value.remote_message == "nope"
    assert "mathlib.js" in info.value.traceback_text
    # A Python task depending on it fails with the same error.
    g = client.submit(lambda x: x, f)
    with pytest.raises(RemoteError, match="nope"):
        g.result()


def test_a_python_value_javascript_cannot_read_is_a_task_error(mixed):
    client, _, _ = mixed
    s = client.submit(lambda: {1, 2, 3})  # a set: not msgpack-able
    f = client.submit("mathlib:echo", s, runtime="js")
    with pytest.raises(RemoteError) as info:
        f.result()
    assert info.value.typename == "SerializationError"
    assert "pickle" in info.value.remote_message
    assert s.result() == {1, 2, 3}  # still fine for Python


def test_resources_on_javascript_workers(mixed):
    client, _, _ = mixed
    tasks = [
        client.submit("mathlib:sleep", 200, i, resources={"GPU": 1}, runtime="js", pure=False)
        for i in range(3)
    ]
    spans = sorted(client.gather(tasks), key=lambda s: s["start"])
    for prev, nxt in itertools.pairwise(spans):
        assert nxt["start"] >= prev["stop"], spans  # one GPU: one at a time
    info = client.scheduler_info()["workers"]
    assert {info[w[0]]["name"] for w in client.who_has(tasks).values()} == {"js-gpu"}
    # A Python task demanding a GPU waits: only a JavaScript worker has one.
    f = client.submit(lambda: 1, resources={"GPU": 1}, pure=False)
    wait_for(lambda: "GPU" in (client.why_pending([f]).get(f.key) or ""), what="why_pending")
    client.cancel([f])


def test_a_javascript_worker_leaving_on_sigterm_unregisters(mixed):
    client, cluster, logs = mixed
    proc = start_js_worker(
        cluster.scheduler_address, cluster.token, logs / "extra.log", "--name", "js-extra"
    )
    try:
        wait_for(
            lambda: any(w["name"] == "js-extra" for w in workers_by_runtime(client).get("js", []))
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        wait_for(
            lambda: all(w["name"] != "js-extra" for w in workers_by_runtime(client).get("js", []))
        )
    finally:
        stop(proc)


def test_a_javascript_worker_a_client_watches_still_leaves_on_sigterm(mixed):
    """Connections it serves (a watching client's) must not keep a closing worker alive."""
    client, cluster, logs = mixed
    proc = start_js_worker(
        cluster.scheduler_address, cluster.token, logs / "watched.log", "--name", "js-watched"
    )
    try:
        wait_for(lambda: any(w["name"] == "js-watched" for w in workers_by_runtime(client)["js"]))
        [addr] = [
            w["address"] for w in workers_by_runtime(client)["js"] if w["name"] == "js-watched"
        ]
        futures = client.map(
            "mathlib:add", range(5), [1] * 5, runtime="js", workers=[addr], pure=False
        )
        assert client.gather(futures) == [i + 1 for i in range(5)]
        wait_for(lambda: client._watching.get(addr) is not None, what="the client to watch it")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        stop(proc)


def test_python_only_features_meet_javascript_workers(mixed):
    client, _, _ = mixed
    js_addr = next(w["address"] for w in workers_by_runtime(client)["js"] if w["name"] == "js-a")
    # Scattered Python data kept by a JavaScript worker is served back unchanged.
    [s] = client.scatter([{"a": {1, 2}}], workers=[js_addr])
    assert client.who_has([s])[s.key] == [js_addr]
    assert client.submit(lambda d: sorted(d["a"]), s).result() == [1, 2]
    # Python code sent to run on a JavaScript worker is an error, not a hang.
    with pytest.raises(RemoteError, match="JavaScript worker cannot run Python code"):
        client.run(lambda: 1, workers=[js_addr])
    # The worker is still fine.
    assert client.submit("mathlib:add", 2, 3, runtime="js", workers=[js_addr]).result() == 5


def test_javascript_workers_push_results_to_a_watching_client(mixed):
    """watch_results is part of the protocol: the JavaScript worker pushes small results."""
    client, _, _ = mixed
    js_workers = {w["address"] for w in workers_by_runtime(client)["js"]}
    first = client.map("mathlib:sum", [[i, 1] for i in range(20)], runtime="js", pure=False)
    assert client.gather(first) == [i + 1 for i in range(20)]
    wait_for(
        lambda: all(client._watching.get(a) is not None for a in js_workers),
        what="the client to watch both JavaScript workers",
    )
    relayed: list[str] = []
    original = client._on_messages

    def on_messages(batch):
        relayed.extend(m.key for m in batch if type(m).__name__ == "KeyInMemory")
        original(batch)

    def pushed_batch() -> bool:
        futures = client.map("mathlib:sum", [[i, 2] for i in range(20)], runtime="js", pure=False)
        assert client.gather(futures) == [i + 2 for i in range(20)]
        return not set(relayed) & {f.key for f in futures}

    client._conn.set_handler(on_messages)
    try:
        # Each worker reads watch_results on a connection of its own, a moment
        # after the client has sent it: once a whole batch came pushed, all do.
        wait_for(pushed_batch, what="results pushed by the JavaScript workers")
        relayed.clear()
        futures = [
            client.submit("mathlib:sum", [i, 3], runtime="js", pure=False) for i in range(20)
        ]
        assert [f.result(timeout=30) for f in futures] == [i + 3 for i in range(20)]
    finally:
        client._conn.set_handler(original)
    assert not set(relayed) & {f.key for f in futures}


def test_a_key_scattered_over_reaches_javascript_tasks_with_its_new_value(mixed):
    """Value versions: a JavaScript worker's copy is taken only as the value it is of."""
    client, _, _ = mixed
    info = workers_by_runtime(client)
    py_addr = info["python"][0]["address"]
    js_addr = next(w["address"] for w in info["js"] if w["name"] == "js-a")
    key = f"versioned-{uuid.uuid4().hex}"

    def js_sum(future):
        return client.submit(
            "mathlib:sum", future, runtime="js", workers=[js_addr], pure=False
        ).result(timeout=30)

    def copied_to(address, future):
        wait_for(
            lambda: address in client.who_has([future])[key],
            what=f"the copy on {address} to be taken as the current value",
        )

    first = client.scatter({key: [1, 2, 3]}, workers=[py_addr])[key]
    assert js_sum(first) == 6
    # The JavaScript worker echoed the version of the value it fetched (a copy
    # said to be of another value would be answered with update_who_has and dropped).
    copied_to(js_addr, first)
    # Scattered over: a new value (a new version) on the Python worker; a
    # JavaScript task uses it, not the copy of the old one.
    second = client.scatter({key: [10, 20]}, workers=[py_addr])[key]
    assert js_sum(second) == 30
    copied_to(js_addr, second)
    # Scattered over onto the JavaScript worker: it serves the value with its
    # version (a Python worker drops a copy of another version than it wants).
    third = client.scatter({key: [5]}, workers=[js_addr])[key]
    assert client.submit(lambda xs: sum(xs), third, pure=False).result(timeout=30) == 5
    copied_to(py_addr, third)


# -- indexed resources: a JavaScript worker tells each task which indices it holds ----------


def test_a_javascript_worker_tells_each_task_its_indices(mixed):
    """Offered FPGA=[3,7] with four slots: overlapping tasks never hold the same index."""
    client, cluster, logs = mixed
    proc = start_js_worker(
        cluster.scheduler_address,
        cluster.token,
        logs / "indexed.log",
        "--name",
        "js-indexed",
        "--nthreads",
        "4",
        "--resources",
        "FPGA=[3,7]",
    )
    try:
        wait_for(lambda: any(w["name"] == "js-indexed" for w in workers_by_runtime(client)["js"]))
        [info] = [w for w in workers_by_runtime(client)["js"] if w["name"] == "js-indexed"]
        assert info["resources"] == {"FPGA": 2}  # the scheduler sees the amount
        runs = client.gather(
            [
                client.submit(
                    "mathlib:heldResources", 150, resources={"FPGA": 1}, runtime="js", pure=False
                )
                for _ in range(6)
            ]
        )
        for run in runs:
            assert len(run["before"]["FPGA"]) == 1 and run["before"]["FPGA"][0] in (3, 7), run
            assert run["after"] == run["before"], run  # still its own after other tasks ran
        for run in runs:
            overlapping = [
                o
                for o in runs
                if o is not run and o["start"] < run["stop"] and run["start"] < o["stop"]
            ]
            assert all(o["before"]["FPGA"] != run["before"]["FPGA"] for o in overlapping), runs
        assert {r["before"]["FPGA"][0] for r in runs} == {3, 7}
        # Half an FPGA each: two tasks share one index, never three.
        halves = client.gather(
            [
                client.submit(
                    "mathlib:heldResources", 150, resources={"FPGA": 0.5}, runtime="js", pure=False
                )
                for _ in range(4)
            ]
        )
        most = max(
            sum(
                o["start"] < run["stop"]
                and run["start"] < o["stop"]
                and o["before"]["FPGA"] == run["before"]["FPGA"]
                for o in halves
            )
            for run in halves
        )
        assert most == 2, halves
    finally:
        stop_and_wait_gone(proc, client, "js-indexed")


def test_a_javascript_worker_detects_visible_gpus_with_resources_auto(mixed):
    """--resources auto: GPU from CUDA_VISIBLE_DEVICES (indexed) and MEMORY, as `corral worker`."""
    client, cluster, logs = mixed
    env_before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = "4,6"
    try:
        proc = start_js_worker(
            cluster.scheduler_address,
            cluster.token,
            logs / "auto.log",
            "--name",
            "js-auto",
            "--resources",
            "auto,SLOT=1",
        )
    finally:
        if env_before is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = env_before
    try:
        wait_for(lambda: any(w["name"] == "js-auto" for w in workers_by_runtime(client)["js"]))
        [info] = [w for w in workers_by_runtime(client)["js"] if w["name"] == "js-auto"]
        assert info["resources"]["GPU"] == 2 and info["resources"]["SLOT"] == 1
        assert info["resources"]["MEMORY"] > 0
        # SLOT routes the task there (the other GPU worker offers GPU=1, not SLOT).
        run = client.submit(
            "mathlib:heldResources", 0, resources={"GPU": 1, "SLOT": 1}, runtime="js", pure=False
        ).result()
        assert run["before"]["GPU"] in ([4], [6]) and run["before"]["SLOT"] == 1
        assert run["cuda"] == str(run["before"]["GPU"][0])
    finally:
        stop_and_wait_gone(proc, client, "js-auto")


# -- TLS: a scheduler, a Python worker and JavaScript workers as processes, mutual TLS --------


def _make_pki(folder: Path):
    """tests/reliability/_certs.py's CA, node certificate and stranger (signed by another CA)."""
    spec = importlib.util.spec_from_file_location(
        "_js_cluster_certs", ROOT / "tests" / "reliability" / "_certs.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.make_pki(str(folder))


def _tls_args(ca: str, cert: str, key: str) -> list[str]:
    return ["--tls-ca-file", ca, "--tls-cert", cert, "--tls-key", key]


def _python(*args: str, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.pop("CORRAL_AUTH_TOKEN", None)
    return subprocess.Popen(
        [sys.executable, "-m", "corral", *args],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    """A TLS scheduler and Python worker (``corral ... --tls-*``) and a TLS JavaScript worker."""
    folder = tmp_path_factory.mktemp("js-tls")
    pki = _make_pki(folder)
    node = _tls_args(pki.ca.cert, pki.node.cert, pki.node.key)
    sched_file = folder / "scheduler.json"
    procs = [
        _python(
            "scheduler",
            "--port",
            "0",
            "--no-dashboard",
            "--auth",
            "none",
            "--scheduler-file",
            str(sched_file),
            *node,
            log=folder / "scheduler.log",
        )
    ]
    try:
        wait_for(
            lambda: sched_file.exists() and sched_file.stat().st_size > 0, 60, "the TLS scheduler"
        )
        address = json.loads(sched_file.read_text())["address"]
        assert address.startswith("tls://")
        procs.append(
            _python(
                "worker", address, "--no-nanny", "--nthreads", "2", *node, log=folder / "py.log"
            )
        )
        procs.append(start_js_worker(address, None, folder / "js.log", "--name", "js-tls", *node))
        security = Security(tls_ca_file=pki.ca.cert, tls_cert=pki.node.cert, tls_key=pki.node.key)
        with Client(address, security=security) as client:
            client.wait_for_workers(2, timeout=60)
            yield client, address, pki, folder
    finally:
        for p in reversed(procs):
            stop(p)


def test_values_cross_runtimes_over_tls(tls_cluster):
    client, _, _, _ = tls_cluster
    workers = workers_by_runtime(client)
    assert all(w["address"].startswith("tls://") for ws in workers.values() for w in ws), workers
    # > 64 KiB each way: peer fetches between the Python and the JavaScript worker, over TLS.
    big = client.submit(lambda n: list(range(n)), 50_000)
    total = client.submit("mathlib:sum", big, runtime="js")
    assert total.result(timeout=60) == sum(range(50_000))
    blob = client.submit("mathlib:bytes", 300_000, runtime="js")
    assert client.submit(len, blob).result(timeout=60) == 300_000
    # The client fetches from the JavaScript worker's TLS peer port.
    assert client.gather(blob) == b"\x07" * 300_000
    held = holders(client, [big, total, blob])
    assert "js" in held[big.key] and held[total.key] == {"js"} and "python" in held[blob.key]


def test_a_javascript_worker_takes_its_tls_settings_from_the_environment(tls_cluster):
    client, address, pki, folder = tls_cluster
    env = {
        "CORRAL_TLS__CA_FILE": pki.ca.cert,
        "CORRAL_TLS__CERT": pki.node.cert,
        "CORRAL_TLS__KEY": pki.node.key,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        proc = start_js_worker(address, None, folder / "js-env.log", "--name", "js-env")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        wait_for(lambda: any(w["name"] == "js-env" for w in workers_by_runtime(client)["js"]))
        [info] = [w for w in workers_by_runtime(client)["js"] if w["name"] == "js-env"]
        assert info["address"].startswith("tls://")
        f = client.submit("mathlib:add", 1, 2, runtime="js", workers=[info["address"]])
        assert f.result(timeout=30) == 3
    finally:
        stop(proc)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ("stranger", "refused the TLS connection"),
        ("none", "is a TLS address: give TLS settings"),
        ("missing-file", "--tls-cert: no such file"),
    ],
)
def test_a_javascript_worker_the_tls_cluster_cannot_trust_exits_saying_why(
    tls_cluster, settings, message
):
    client, address, pki, folder = tls_cluster
    args = {
        "stranger": _tls_args(pki.ca.cert, pki.stranger.cert, pki.stranger.key),
        "none": [],
        "missing-file": _tls_args(pki.ca.cert, str(folder / "nope.pem"), pki.node.key),
    }[settings]
    log = folder / f"refused-{settings}.log"
    proc = start_js_worker(address, None, log, "--name", f"js-{settings}", *args)
    try:
        assert proc.wait(30) != 0
    finally:
        stop(proc)
    assert message in log.read_text(), log.read_text()
    assert all(w["name"] != f"js-{settings}" for w in workers_by_runtime(client).get("js", []))
