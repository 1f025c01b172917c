"""A tiny Chrome DevTools Protocol client: headless Chromium driven over a WebSocket.

Why the DevTools protocol and not ``--dump-dom`` / ``--screenshot``: those
load a page once and print it; the dashboard's point is that it updates
while tasks run, so the test keeps one page open, reads its DOM several
times as tasks progress (``Runtime.evaluate``) and takes screenshots of
that same live page (``Page.captureScreenshot``).  aiohttp (a Corral
dependency) is the WebSocket client.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Any

import aiohttp

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    """The path of a Chromium binary, or ``None``."""
    for name in CHROMIUM_CANDIDATES:
        path = name if os.path.isabs(name) and os.access(name, os.X_OK) else shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """``async with Browser() as b: page = await b.new_page(url)``."""

    def __init__(self, binary: str, width: int = 1400, height: int = 1000) -> None:
        self.binary = binary
        self.width = width
        self.height = height
        self.proc: subprocess.Popen[str] | None = None
        self._profile = tempfile.mkdtemp(prefix="corral-chromium-")
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._ws: Any = None
        self._reader: asyncio.Task[None] | None = None
        self.stderr: list[str] = []

    async def __aenter__(self) -> Browser:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--remote-debugging-port=0",
                f"--user-data-dir={self._profile}",
                f"--window-size={self.width},{self.height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        url = await asyncio.get_running_loop().run_in_executor(None, self._devtools_url)
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(url, max_msg_size=0)
        self._reader = asyncio.ensure_future(self._read())
        return self

    def _devtools_url(self) -> str:
        """Read Chromium's stderr until it prints its DevTools WebSocket address."""
        assert self.proc is not None and self.proc.stderr is not None
        deadline = time.monotonic() + 60
        found: list[str] = []

        def pump() -> None:
            assert self.proc is not None and self.proc.stderr is not None
            for line in self.proc.stderr:
                self.stderr.append(line)
                match = re.search(r"DevTools listening on (ws://\S+)", line)
                if match and not found:
                    found.append(match.group(1))

        threading.Thread(target=pump, daemon=True).start()
        while not found:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"chromium exited ({self.proc.returncode}): {''.join(self.stderr)[-2000:]}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"chromium printed no DevTools address: {''.join(self.stderr)[-2000:]}"
                )
            time.sleep(0.05)
        return found[0]

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            fut = self._waiting.pop(data.get("id", -1), None)
            if fut is not None and not fut.done():
                if "error" in data:
                    fut.set_exception(RuntimeError(f"CDP error: {data['error']}"))
                else:
                    fut.set_result(data.get("result", {}))

    async def send(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> Any:
        """Call a DevTools method (on a page when ``session`` is given); return its result."""
        mid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[mid] = fut
        message: dict[str, Any] = {"id": mid, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        await self._ws.send_str(json.dumps(message))
        return await asyncio.wait_for(fut, 60)

    async def new_page(self, url: str) -> Page:
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        page = Page(self, attached["sessionId"])
        await page.send("Page.enable")
        await page.send("Runtime.enable")
        await page.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False},
        )
        await page.send("Page.navigate", {"url": url})
        return page

    async def __aexit__(self, *exc: Any) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
        if self._session is not None:
            await self._session.close()
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self._profile, ignore_errors=True)


class Page:
    """One tab, attached with a flat session."""

    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session

    async def send(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return await self.browser.send(method, params, self.session)

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-able values)."""
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"page raised: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 30.0, what: str = "") -> Any:
        """Poll ``expression`` until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or expression}")
            await asyncio.sleep(0.1)

    async def screenshot(self, path: str) -> None:
        """Save a PNG of the whole page."""
        height = await self.evaluate("document.documentElement.scrollHeight")
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            {
                "width": self.browser.width,
                "height": max(self.browser.height, int(height or 0)),
                "deviceScaleFactor": 1,
                "mobile": False,
            },
        )
        data = await self.send("Page.captureScreenshot", {"format": "png"})
        with open(path, "wb") as f:
            f.write(base64.b64decode(data["data"]))


def browser_test_marks(timeout: int) -> list[Any]:
    """Marks of a test that drives Chromium: a time limit, skipped where there is none."""
    import pytest

    return [
        pytest.mark.timeout(timeout),
        pytest.mark.skipif(
            find_chromium() is None,
            reason="no Chromium binary (apt-get install chromium; .ci/run installs it): "
            "the browser test cannot run",
        ),
    ]
