"""The dashboard in a real browser (headless Chromium) while a real cluster works.

A LocalCluster of two worker processes, one offering ``GPU=2``, an
environment ``gpu-box`` registered; the page must show the workers, their
resources and environments, the task groups progressing while tasks run
(read several times from one live page), the task stream with its errors,
the pending tasks with their reason and the event log.  Screenshots go to
``tests/dashboard/artifacts/`` (git-ignored).
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from _cdp import Browser, browser_test_marks, find_chromium

from corral import Client, LocalCluster

ARTIFACTS = os.path.join(os.path.dirname(__file__), "artifacts")
CHROMIUM = find_chromium()

pytestmark = browser_test_marks(timeout=240)


def has_gpu(worker):
    return "GPU" in worker.resources


def gpu_work(i):
    time.sleep(0.25)
    return i


def cpu_work(i):
    time.sleep(0.05)
    return i


def boom(i):
    raise ValueError(f"boom {i}")


def needs_tpu():
    return 1


async def rows(page, table):
    return await page.evaluate(
        f"""[...document.querySelectorAll('#{table} tbody tr')].map(tr => ({{
            data: Object.assign({{}}, tr.dataset), text: tr.textContent}}))"""
    )


async def group(page, name):
    for row in await rows(page, "groups"):
        if row["data"].get("group") == name:
            return {k: int(v) for k, v in row["data"].items() if k != "group"}
    return None


def test_dashboard_shows_a_working_cluster_live():
    os.makedirs(ARTIFACTS, exist_ok=True)
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            resources=[{"GPU": 2}, {}],
            dashboard_address="127.0.0.1:0",
        ) as cluster,
        Client(cluster) as client,
    ):
        link = client.dashboard_link
        assert link and link == cluster.dashboard_link and "/status?token=" in link
        answer = client.register_worker_environment(name="gpu-box", condition=has_gpu)
        assert sum(r["member"] for r in answer.values()) == 1
        asyncio.run(_drive(client, link))


async def _drive(client, link):
    async with Browser(CHROMIUM) as browser:
        page = await browser.new_page(link)
        await page.wait_for(
            "window.corralDashboard && window.corralDashboard.frames > 0", what="a frame"
        )
        await page.wait_for(
            "document.querySelectorAll('#workers tbody tr').length === 2", what="two workers"
        )
        await page.wait_for(
            "document.querySelector('[data-environment=\"gpu-box\"]') !== null",
            what="the environment",
        )
        workers = await rows(page, "workers")
        gpu_rows = [r for r in workers if "GPU" in r["text"]]
        assert len(gpu_rows) == 1, workers
        assert "GPU 0/2" in gpu_rows[0]["text"]
        assert "gpu-box" in gpu_rows[0]["text"]
        other = next(r for r in workers if r is not gpu_rows[0])
        assert "gpu-box" not in other["text"] and "GPU" not in other["text"]
        for r in workers:
            assert r["data"]["worker"].startswith("tcp://127.0.0.1:")
            assert "GiB" in r["text"] or "MiB" in r["text"]  # memory used / limit
        frames_before = await page.evaluate("window.corralDashboard.frames")

        # Work: a GPU group (on the GPU worker only), a CPU group, failures, and
        # a task no worker can run.
        gpu = client.map(gpu_work, range(12), resources={"GPU": 1})
        cpu = client.map(cpu_work, range(40))
        bad = client.map(boom, range(3))
        tpu = client.submit(needs_tpu, resources={"TPU": 1})

        seen_finished = set()
        seen_gpu_in_use = False
        screenshot_taken = False
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            g = await group(page, "gpu_work")
            if g is not None:
                seen_finished.add(g["finished"])
                if g["finished"] == 12:
                    break
                if not screenshot_taken and g["finished"] >= 3:
                    await page.screenshot(os.path.join(ARTIFACTS, "dashboard-running.png"))
                    screenshot_taken = True
            chip = await page.evaluate(
                "(document.querySelector('[data-resource=\"GPU\"]') || {}).textContent || ''"
            )
            seen_gpu_in_use = seen_gpu_in_use or chip == "GPU 1/2"
            await asyncio.sleep(0.2)
        client.gather(gpu + cpu)
        # Live: the page showed the GPU group part done at several moments, then all done.
        partial = {n for n in seen_finished if 0 < n < 12}
        assert len(partial) >= 2, f"no live progress seen: {sorted(seen_finished)}"
        assert seen_gpu_in_use, "the GPU worker never showed a GPU in use"
        await page.wait_for(
            "(() => { const r = document.querySelector('#groups tr[data-group=\"cpu_work\"]');"
            " return r && r.dataset.finished === '40'; })()",
            what="cpu_work finished",
        )
        assert (await group(page, "gpu_work"))["finished"] == 12
        await page.wait_for(
            "(() => { const r = document.querySelector('#groups tr[data-group=\"boom\"]');"
            " return r && r.dataset.erred === '3'; })()",
            what="three erred boom tasks",
        )
        assert await page.evaluate("window.corralDashboard.frames") > frames_before + 3

        # Task stream: bars drawn for the recent tasks, errors marked.
        drawn = int(await page.evaluate("document.getElementById('task-stream').dataset.drawn"))
        errors = int(await page.evaluate("document.getElementById('task-stream').dataset.errors"))
        assert drawn >= 50 and errors == 3, (drawn, errors)
        legend = await page.evaluate(
            "[...document.querySelectorAll('#stream-legend [data-group]')]"
            ".map(e => e.dataset.group)"
        )
        assert {"gpu_work", "cpu_work"} <= set(legend)

        # Pending: the TPU task, with its reason.
        pending = await page.wait_for(
            "[...document.querySelectorAll('#pending tbody tr')].map(tr => tr.textContent)"
            ".filter(t => t.includes('needs_tpu'))",
            what="the pending TPU task",
        )
        assert "TPU" in pending[0], pending
        assert tpu.status == "pending"

        # Events: workers joining, the environment registered.
        events = await page.evaluate(
            "[...document.querySelectorAll('#events tbody tr')].map(tr => tr.textContent)"
        )
        text = "\n".join(events)
        assert "add-worker" in text and "gpu-box" in text, text

        # The snapshot JSON agrees with the page.
        snap = json.loads(await page.evaluate("JSON.stringify(window.corralDashboard.snapshot)"))
        assert {w["name"] for w in snap["workers"]} == {"0", "1"}
        assert snap["environments"] == {"gpu-box": 1}

        await page.screenshot(os.path.join(ARTIFACTS, "dashboard.png"))
        assert os.path.getsize(os.path.join(ARTIFACTS, "dashboard.png")) > 10_000
        del bad, tpu
