"""Logging in to the dashboard in a real browser (headless Chromium).

Without the token the browser gets the login page; pasting the token there
opens the dashboard (its WebSocket admitted by the cookie, which page
scripts cannot read); when the browser is no longer let in, the open page
goes back to the login page by itself.
"""

from __future__ import annotations

import asyncio

from _cdp import Browser, browser_test_marks, find_chromium

from corral import Scheduler

CHROMIUM = find_chromium()
TOKEN = "s3cret-cluster-token_for-tests"

pytestmark = browser_test_marks(timeout=180)


def test_login_page_form_and_return_to_login_in_a_browser(monkeypatch):
    monkeypatch.setenv("CORRAL_CONFIG", "")
    monkeypatch.delenv("CORRAL_DASHBOARD__AUTH", raising=False)
    asyncio.run(_browse())


async def _browse():
    scheduler = await Scheduler(port=0, token=TOKEN, dashboard_address="127.0.0.1:0").start()
    try:
        await asyncio.wait_for(scheduler.dashboard.ready.wait(), 30)
        status = f"http://127.0.0.1:{scheduler.services['dashboard']}/status"
        assert CHROMIUM is not None
        async with Browser(CHROMIUM) as browser:
            page = await browser.new_page(status)  # no token in this address
            await page.wait_for("document.querySelector('input[name=token]') !== null")
            assert await page.evaluate("document.title") == "Corral dashboard: log in"
            assert await page.evaluate("window.corralDashboard === undefined")

            await page.evaluate(
                f"document.querySelector('input[name=token]').value = {TOKEN!r};"
                "document.querySelector('form').submit()"
            )
            await page.wait_for(
                "window.corralDashboard && window.corralDashboard.frames > 0",
                what="the dashboard's first frame after logging in",
            )
            assert await page.evaluate("location.pathname + location.search") == "/status"
            assert await page.evaluate("document.cookie") == ""  # HttpOnly: not for scripts

            # The browser loses its cookie (as after a token change) and the WebSocket
            # closes: the page asks, is refused, and shows the login page.
            await page.send("Network.enable")
            await page.send("Network.clearBrowserCookies")
            for viewer in list(scheduler.dashboard._viewers):
                await viewer.ws.close()
            await page.wait_for(
                "location.pathname === '/login'", what="the page going back to the login page"
            )
            assert await page.evaluate("location.search") == "?next=%2Fstatus"
            assert await page.evaluate("document.querySelector('input[name=next]').value") == (
                "/status"
            )
    finally:
        await scheduler.close()
