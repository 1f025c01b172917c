"""``/metrics`` (parsed with prometheus_client's own parser), the observer and the server."""

from __future__ import annotations

import asyncio
import http.cookiejar
import json
import logging
import socket
import time
import urllib.request

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from corral import Client, LocalCluster, Scheduler

pytestmark = pytest.mark.timeout(120)


def inc(x):
    return x + 1


def fail(x):
    raise ValueError(x)


def fetch(url: str, token: str | None = None) -> str:
    """GET ``url`` as a program does: with a bearer token when given."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
        return r.read().decode()


def browser() -> urllib.request.OpenerDirector:
    """An opener that keeps cookies and follows redirects, as a browser does."""
    cookies = urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
    return urllib.request.build_opener(cookies)


def open_page(opener: urllib.request.OpenerDirector, url: str) -> str:
    with opener.open(url, timeout=30) as r:
        return r.read().decode()


def wait_ready(scheduler, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not scheduler.dashboard.ready.is_set():
        assert time.monotonic() < deadline, "the dashboard did not start"
        time.sleep(0.02)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def gpu_cluster():
    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=False,
        resources=[{"GPU": 2}, {}],
        dashboard_address="127.0.0.1:0",
    ) as cluster:
        yield cluster


def test_metrics_in_prometheus_text(gpu_cluster):
    cluster = gpu_cluster
    scheduler = cluster.scheduler
    with Client(cluster) as client:
        assert client.dashboard_link == cluster.dashboard_link == scheduler.dashboard_link
        assert client.scheduler_info()["services"] == {"dashboard": cluster.dashboard_port}
        ok = client.map(inc, range(30))  # held: their results stay in memory
        client.gather(ok)
        bad = client.map(fail, range(2))
        client.gather(bad, errors="skip")
        client.register_worker_environment(name="gpu-box", condition=lambda w: "GPU" in w.resources)
        wait_ready(scheduler)
        time.sleep(1.2)  # a heartbeat with each worker's memory and resources
        scheduler.observer._sampled_at = -1e9  # a fresh sample now
        text = fetch(f"http://127.0.0.1:{cluster.dashboard_port}/metrics", cluster.token)
        del ok, bad
    values = samples(text)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["corral_scheduler_tasks"].type == "gauge"
    assert families["corral_scheduler_messages_received"].type == "counter"
    assert values[("corral_scheduler_tasks", (("state", "memory"),))] == 30
    assert values[("corral_scheduler_tasks", (("state", "erred"),))] == 2
    assert values[("corral_scheduler_task_group_finished_total", (("group", "inc"),))] == 30
    assert values[("corral_scheduler_task_group_erred_total", (("group", "fail"),))] == 2
    assert values[("corral_scheduler_workers", (("status", "running"),))] == 2
    assert values[("corral_scheduler_clients", ())] >= 1
    msgs = {
        k[1]: v for k, v in values.items() if k[0] == "corral_scheduler_messages_received_total"
    }
    assert msgs[(("op", "task_finished"), ("role", "worker"))] == 30
    assert msgs[(("op", "task_erred"), ("role", "worker"))] == 2
    assert msgs[(("op", "update_graph"), ("role", "client"))] >= 2
    offered = {
        dict(k[1])["resource"]: v
        for k, v in values.items()
        if k[0] == "corral_worker_resource_offered"
    }
    assert offered == {"GPU": 2.0}
    used = [v for k, v in values.items() if k[0] == "corral_worker_resource_used"]
    assert used == [0.0]
    threads = [v for k, v in values.items() if k[0] == "corral_worker_threads"]
    assert threads == [1.0, 1.0]
    assert all(v > 0 for k, v in values.items() if k[0] == "corral_worker_memory_limit_bytes")
    assert values[("corral_environment_members", (("environment", "gpu-box"),))] == 1
    assert ("corral_scheduler_event_loop_lag_seconds", ()) in values
    assert ("corral_scheduler_transitions_total", ()) in values
    assert ("process_resident_memory_bytes", ()) in values  # the scheduler process


def test_snapshot_api_and_pages(gpu_cluster):
    scheduler = gpu_cluster.scheduler
    link = gpu_cluster.dashboard_link
    base = f"http://127.0.0.1:{gpu_cluster.dashboard_port}"
    with Client(gpu_cluster) as client:
        client.gather(client.map(inc, range(5)))
        wait_ready(scheduler)
        scheduler.observer._sampled_at = -1e9
        data = json.loads(fetch(base + "/api/snapshot", gpu_cluster.token))
    snap = data["snapshot"]
    assert len(snap["workers"]) == 2
    assert {g["name"]: g["finished"] for g in snap["groups"]} == {"inc": 5}
    assert [e[1] for e in data["stream"]] == ["inc"] * 5
    _key, _group, worker, start, stop, erred = data["stream"][0]
    assert worker in scheduler.workers and stop >= start and erred is False
    viewer = browser()
    page = open_page(viewer, link)  # the link's token becomes a cookie
    assert "<title>Corral dashboard</title>" in page and "/static/dashboard.js" in page
    assert "corralDashboard" in open_page(viewer, base + "/static/dashboard.js")
    assert fetch(base + "/health") == "ok"
    assert open_page(viewer, base + "/") == page  # redirected to /status


def test_viewers_share_samples_and_the_stream_is_bounded(monkeypatch):
    monkeypatch.setenv("CORRAL_DASHBOARD__INTERVAL", "0.1")
    monkeypatch.setenv("CORRAL_DASHBOARD__TASK_STREAM_LENGTH", "100")
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address="127.0.0.1:0"
        ) as cluster,
        Client(cluster) as client,
    ):
        scheduler = cluster.scheduler
        obs = scheduler.observer
        assert obs.interval == 0.1 and obs.stream.maxlen == 100
        wait_ready(scheduler)
        client.gather(client.map(inc, range(300)))
        # Results pushed by the worker can reach the client a moment before
        # the scheduler has read every task_finished.
        deadline = time.monotonic() + 10
        while obs.stream_total < 300 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert obs.stream_total == 300 and len(obs.stream) == 100
        assert obs.finished == {"inc": 300}
        entries, next_seq = obs.stream_since(250)
        assert len(entries) == 50 and next_seq == 300
        assert obs.stream_since(0)[0] == [list(e) for e in obs.stream]  # only what is kept
        url = cluster.dashboard_link.replace("http://", "ws://").replace("/status", "/ws")
        before = obs.samples
        frames = asyncio.run(_watch(url, viewers=4, seconds=1.5))
    assert min(len(f) for f in frames) >= 5
    # Four viewers, about one sample per interval: shared, not one per viewer.
    taken = obs.samples - before
    assert taken <= max(len(f) for f in frames) + 3, (taken, [len(f) for f in frames])
    first = frames[0][0]
    assert len(first["stream"]) == 100  # a new viewer gets the kept task stream
    assert all(f["stream"] == [] for f in frames[0][1:])  # then only what is new


async def _watch(url: str, viewers: int, seconds: float) -> list[list[dict]]:
    async with aiohttp.ClientSession() as session:

        async def one() -> list[dict]:
            got = []
            async with session.ws_connect(url) as ws:
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    try:
                        msg = await ws.receive(timeout=max(0.01, deadline - time.monotonic()))
                    except asyncio.TimeoutError:
                        break
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        got.append(json.loads(msg.data))
            return got

        return await asyncio.gather(*(one() for _ in range(viewers)))


def test_dashboard_off_and_busy_port(caplog):
    with LocalCluster(n_workers=1, processes=False, dashboard_address=False) as cluster:
        assert cluster.dashboard_link is None and cluster.scheduler.services == {}
        with Client(cluster) as client:
            assert client.dashboard_link is None
            assert "dashboard" not in repr(client)

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        with caplog.at_level(logging.WARNING, logger="corral.dashboard"):
            scheduler = asyncio.run(_start_and_close(f"127.0.0.1:{port}"))
        assert scheduler.services["dashboard"] != port
        assert f"dashboard port {port} is in use" in caplog.text
    finally:
        busy.close()


async def _start_and_close(address: str) -> Scheduler:
    scheduler = await Scheduler(port=0, dashboard_address=address).start()
    await asyncio.wait_for(scheduler.dashboard.ready.wait(), 30)
    await scheduler.close()
    return scheduler


def test_dashboard_address_from_the_configuration(monkeypatch):
    monkeypatch.setenv("CORRAL_DASHBOARD__ENABLED", "false")
    scheduler = asyncio.run(_start_and_close_default())
    assert scheduler.services == {} and scheduler.dashboard is None


async def _start_and_close_default() -> Scheduler:
    scheduler = await Scheduler(port=0).start()
    await scheduler.close()
    return scheduler


def test_bad_dashboard_address_fails_clearly():
    with pytest.raises(ValueError, match="HOST"):
        asyncio.run(_start_and_close("nonsense"))
