"""``corral.progress``, repr/HTML of Client and LocalCluster, logs and events."""

from __future__ import annotations

import asyncio
import io
import logging
import sys
import time
import types

import pytest
from rich.console import Console

import corral
from corral import Client, LocalCluster, progress
from corral.dashboard.links import without_token
from corral.diagnostics.progress import ProgressBars

pytestmark = pytest.mark.timeout(120)


def slow_inc(x):
    time.sleep(0.02)
    return x + 1


def boom(x):
    raise ValueError(x)


def console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=120, force_terminal=False, color_system=None), buf


def test_progress_draws_one_bar_per_group(client):
    good = client.map(slow_inc, range(10))
    bad = client.map(boom, range(3))
    con, buf = console()
    assert progress(good + bad, console=con) is None
    assert all(f.done() for f in good + bad)
    lines = buf.getvalue().splitlines()
    (inc_line,) = [line for line in lines if "slow_inc" in line]
    (boom_line,) = [line for line in lines if line.lstrip().startswith("boom")]
    assert "10/10" in inc_line and "0 erred" in inc_line
    assert "3/3" in boom_line and "3 erred" in boom_line


def test_progress_single_bar_and_nested_arguments(client):
    futures = {"a": client.map(slow_inc, range(4)), "b": [client.submit(slow_inc, 100)]}
    con, buf = console()
    progress(futures, multi=False, console=con)
    assert "total" in buf.getvalue() and "5/5" in buf.getvalue()
    with pytest.raises(TypeError, match="takes futures"):
        progress([1, 2])


def test_progress_bars_counts_and_html(client):
    futures = [*client.map(slow_inc, range(6)), client.submit(boom, 1)]
    client.gather(futures, errors="skip")
    bars = ProgressBars(futures)
    assert bars.finished
    assert bars.groups == {
        "slow_inc": {"total": 6, "done": 6, "erred": 0},
        "boom": {"total": 1, "done": 1, "erred": 1},
    }
    page = bars._repr_html_()
    assert "<table>" in page and "slow_inc" in page and "6 / 6" in page and "(1 erred)" in page
    assert repr(bars) == "<ProgressBars slow_inc: 6/6, boom: 1/1>"


def test_progress_in_a_notebook_updates_html(client, monkeypatch):
    shown = []

    class Handle:
        def update(self, obj):
            shown.append(obj.data)

    def display(obj, display_id=False):
        shown.append(obj.data)
        return Handle()

    class HTML:
        def __init__(self, data):
            self.data = data

    ipython = types.ModuleType("IPython")
    ipython_display = types.ModuleType("IPython.display")
    ipython_display.display = display
    ipython_display.HTML = HTML
    ipython.display = ipython_display
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", ipython_display)
    futures = client.map(slow_inc, range(8))
    progress(futures, notebook=True, interval=0.01)
    assert len(shown) >= 2 and "8 / 8" in shown[-1]


def test_progress_awaited_with_an_asynchronous_client():
    asyncio.run(_progress_awaited())


async def _progress_awaited():
    async with (
        LocalCluster(
            n_workers=1, processes=False, asynchronous=True, dashboard_address=False
        ) as cluster,
        Client(cluster, asynchronous=True) as client,
    ):
        futures = client.map(slow_inc, range(5))
        con, buf = console()
        await progress(futures, console=con)
        assert "5/5" in buf.getvalue()


# -- repr and HTML -------------------------------------------------------------------------
def test_cluster_and_client_describe_themselves():
    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=False,
        resources=[{"GPU": 2}, {}],
        memory_limit="1GiB",
        dashboard_address="127.0.0.1:0",
    ) as cluster:
        text = repr(cluster)
        assert text.startswith(f"LocalCluster('{cluster.scheduler_address}', workers=2, threads=2")
        assert "memory=2 x 1.00 GiB" in text and "resources=[GPU=2; -]" in text
        # Text may be logged: the link without its token; Jupyter's HTML: the working link.
        assert "?token=" in cluster.dashboard_link
        assert f"dashboard={without_token(cluster.dashboard_link)})" in text
        assert "token=" not in text
        page = cluster._repr_html_()
        assert "<table>" in page and f"href='{cluster.dashboard_link}'" in page
        assert "GPU=2" in page and "1.00 GiB" in page
        with Client(cluster) as client:
            client.register_worker_environment(
                name="gpu-box", condition=lambda w: "GPU" in w.resources
            )
            text = repr(client)
            assert text.startswith(f"<Client: {cluster.scheduler_address} status=running")
            assert "workers=2 threads=2 memory=2.00 GiB resources=GPU=2" in text
            assert f"dashboard={without_token(cluster.dashboard_link)}>" in text
            assert "token=" not in text
            page = client._repr_html_()
            assert "gpu-box" in page and "GPU=2" in page and cluster.dashboard_link in page
        assert "status=closed" in repr(client)  # no question asked once closed


def test_asynchronous_client_repr_does_not_block():
    asyncio.run(_async_repr())


async def _async_repr():
    async with (
        LocalCluster(
            n_workers=1, processes=False, asynchronous=True, dashboard_address="127.0.0.1:0"
        ) as cluster,
        Client(cluster, asynchronous=True) as client,
    ):
        text = repr(client)
        assert "status=running" in text and "dashboard=http://127.0.0.1:" in text
        assert client.dashboard_link == cluster.dashboard_link
        assert "<table>" in client._repr_html_()


# -- logs and events -------------------------------------------------------------------------
def say_hello():
    logging.getLogger("corral.test").warning("hello from the worker")
    return True


def test_logs_of_scheduler_and_worker_processes():
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=False) as cluster,
        Client(cluster) as client,
    ):
        assert client.run(say_hello) == {a: True for a in client.scheduler_info()["workers"]}
        logs = client.get_scheduler_logs()
        assert all(isinstance(r, tuple) and len(r) == 2 for r in logs)
        joined = [(level, text) for level, text in logs if "joined" in text]
        assert len(joined) == 2 and all(level == "INFO" for level, _ in joined)
        assert len(client.get_scheduler_logs(n=1)) == 1
        worker_logs = client.get_worker_logs()
        assert set(worker_logs) == set(client.scheduler_info()["workers"])
        for records in worker_logs.values():
            assert ("WARNING" in {lvl for lvl, _ in records}) and any(
                "hello from the worker" in text for _, text in records
            )
        one = next(iter(worker_logs))
        assert list(client.get_worker_logs(n=1, workers=[one])) == [one]
        events = client.get_events("workers")
        assert [e[1]["action"] for e in events] == ["add-worker", "add-worker"]
        assert "workers" in client.get_events()


def test_public_api_exports_progress():
    assert corral.progress is progress and "progress" in corral.__all__
