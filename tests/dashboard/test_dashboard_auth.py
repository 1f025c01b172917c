"""Dashboard authentication and HTTPS, over real sockets.

Real schedulers (in this process, or ``corral scheduler`` processes) serve
the dashboard; aiohttp's client and urllib talk to it as Prometheus, curl
and a browser would.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.cookiejar
import logging
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from corral import Client, LocalCluster, Scheduler, Security
from corral.comm.security import exposure_warning
from corral.dashboard import auth
from corral.dashboard.links import advertised_link, dashboard_token, without_token

pytestmark = pytest.mark.timeout(120)

TOKEN = "s3cret-cluster-token_for-tests"
HTML = {"Accept": "text/html,application/xhtml+xml"}


@pytest.fixture(autouse=True)
def no_dashboard_settings_from_the_machine(monkeypatch):
    for name in ("CORRAL_DASHBOARD__AUTH", "CORRAL_DASHBOARD__TLS", "CORRAL_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CORRAL_CONFIG", "")  # no ~/.config/corral/corral.yaml


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A throwaway CA and a certificate for 127.0.0.1 signed by it (tests/reliability)."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "reliability"))
    from _certs import make_pki

    return make_pki(str(tmp_path_factory.mktemp("pki")))


@contextlib.asynccontextmanager
async def serving(**kwargs: Any) -> AsyncIterator[Scheduler]:
    """A scheduler in this loop whose dashboard is ready on a free loopback port."""
    kwargs.setdefault("dashboard_address", "127.0.0.1:0")
    scheduler = await Scheduler(port=0, **kwargs).start()
    try:
        await asyncio.wait_for(scheduler.dashboard.ready.wait(), 30)
        yield scheduler
    finally:
        await scheduler.close()


def base_url(scheduler: Scheduler, scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{scheduler.services['dashboard']}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def browser_session(**kwargs: Any) -> aiohttp.ClientSession:
    """A session that keeps cookies as a browser does (aiohttp's jar refuses IP hosts
    unless told it may take them; browsers take them)."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), **kwargs)


async def get(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, str]:
    async with session.get(url, **kwargs) as response:
        return response.status, await response.text()


# -- refused without the token ------------------------------------------------------------
def test_requests_without_the_token_get_401_and_no_data():
    asyncio.run(_refused_without_token())


async def _refused_without_token():
    async with serving(token=TOKEN) as scheduler, aiohttp.ClientSession() as session:
        base = base_url(scheduler)
        for path in ("/metrics", "/api/snapshot", "/status", "/", "/static/dashboard.js"):
            async with session.get(base + path, allow_redirects=False) as response:
                text = await response.text()
                assert response.status == 401, (path, response.status)
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
                assert "corral_scheduler" not in text and '"snapshot"' not in text
                assert "Authorization: Bearer" in text  # says how to get in
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(base + "/ws")
        assert refused.value.status == 401
        # A browser gets a small page saying how to log in, still with 401.
        status, page = await get(session, base + "/status", headers=HTML)
        assert status == 401 and "<form" in page and "?token=" in page
        assert 'id="token-login" hidden' not in page
        assert 'id="certificate-login" hidden' in page  # no mutual TLS here
        assert "client.dashboard_link" in page and "workers-section" not in page


def test_wrong_tokens_are_refused():
    asyncio.run(_wrong_tokens())


async def _wrong_tokens():
    async with serving(token=TOKEN) as scheduler, aiohttp.ClientSession() as session:
        base = base_url(scheduler)
        for headers in (
            bearer("wrong"),
            bearer(TOKEN[:-1]),
            bearer(TOKEN + "x"),
            {"Authorization": f"Basic {TOKEN}"},  # the right secret under another scheme
            {"Cookie": f"corral-dashboard-{scheduler.services['dashboard']}=wrong"},
        ):
            status, _ = await get(session, base + "/metrics", headers=headers)
            assert status == 401, headers
        # A link with a wrong token: the login page, no cookie.
        async with session.get(
            base + "/status?token=wrong", headers=HTML, allow_redirects=False
        ) as response:
            assert response.status == 401 and "Set-Cookie" not in response.headers
            page = await response.text()
            assert "not this cluster" in page
            assert 'value="/status"' in page  # logging in leads back, without the bad token


# -- programs: bearer tokens ---------------------------------------------------------------
def test_bearer_token_opens_metrics_and_snapshot():
    asyncio.run(_bearer())


async def _bearer():
    async with serving(token=TOKEN) as scheduler, aiohttp.ClientSession() as session:
        base = base_url(scheduler)
        # The cluster's token, and the read-only token that links carry.
        for token in (TOKEN, dashboard_token(TOKEN)):
            status, text = await get(session, base + "/metrics", headers=bearer(token))
            assert status == 200 and "corral_scheduler_tasks" in text
            status, text = await get(session, base + "/api/snapshot", headers=bearer(token))
            assert status == 200 and '"snapshot"' in text
        status, _ = await get(
            session, base + "/metrics", headers={"Authorization": "bearer  " + TOKEN}
        )
        assert status == 200  # the scheme is case-insensitive
        async with session.ws_connect(base + "/ws", headers=bearer(TOKEN)) as ws:
            frame = await ws.receive_json(timeout=10)
            assert "snapshot" in frame


def test_tokens_are_compared_in_constant_time(monkeypatch):
    compared = []
    original = auth.hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return original(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    asyncio.run(_one_bearer_request("a guess"))
    guesses = [pair for pair in compared if pair[0] == b"a guess"]
    # Checked against the cluster token and the derived one, both through compare_digest.
    assert {b for _, b in guesses} == {TOKEN.encode(), dashboard_token(TOKEN).encode()}


async def _one_bearer_request(token: str) -> None:
    async with serving(token=TOKEN) as scheduler, aiohttp.ClientSession() as session:
        status, _ = await get(session, base_url(scheduler) + "/metrics", headers=bearer(token))
        assert status == 401


# -- browsers: the link, the cookie, the WebSocket -----------------------------------------
def test_link_token_becomes_a_cookie_for_status_and_websocket():
    asyncio.run(_cookie_flow())


async def _cookie_flow():
    async with serving(token=TOKEN) as scheduler:
        port = scheduler.services["dashboard"]
        link = scheduler.dashboard_link
        assert link == f"http://127.0.0.1:{port}/status?token={dashboard_token(TOKEN)}"
        assert TOKEN not in link  # never the cluster's own token
        async with browser_session() as session:
            async with session.get(link, allow_redirects=False) as response:
                assert response.status == 303
                assert response.headers["Location"] == "/status"  # the clean address
                assert response.headers["Referrer-Policy"] == "no-referrer"
                cookie = SimpleCookie(response.headers["Set-Cookie"])[f"corral-dashboard-{port}"]
                assert cookie.value == dashboard_token(TOKEN)
                assert cookie["httponly"] and cookie["samesite"] == "Lax"
                assert cookie["path"] == "/" and not cookie["secure"]  # plain HTTP here
            status, page = await get(session, link)  # follow the redirect, with the cookie
            assert status == 200 and "<title>Corral dashboard</title>" in page
            status, _ = await get(session, base_url(scheduler) + "/api/snapshot")
            assert status == 200
            async with session.ws_connect(base_url(scheduler) + "/ws") as ws:
                frame = await ws.receive_json(timeout=10)
                assert frame["snapshot"]["workers"] == []
            # The same cookie sent by a page of another site: refused.
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(base_url(scheduler) + "/ws", origin="http://evil.test")
            assert refused.value.status == 403
            # Other query parameters survive the trade.
            async with session.get(
                f"{base_url(scheduler)}/status?x=1&token={TOKEN}", allow_redirects=False
            ) as response:
                assert response.status == 303 and response.headers["Location"] == "/status?x=1"


def test_login_form_sets_the_cookie_and_stays_on_this_server():
    asyncio.run(_login_form())


async def _login_form():
    async with serving(token=TOKEN) as scheduler, browser_session() as session:
        login = base_url(scheduler) + "/login"
        status, page = await get(session, login + "?next=/metrics")
        assert status == 200 and 'value="/metrics"' in page
        async with session.post(
            login, data={"token": "nope", "next": "/metrics"}, allow_redirects=False
        ) as response:
            assert response.status == 401 and "Set-Cookie" not in response.headers
        async with session.post(
            login, data={"token": TOKEN, "next": "//evil.test/x"}, allow_redirects=False
        ) as response:
            assert response.status == 303 and response.headers["Location"] == "/status"
        status, text = await get(session, base_url(scheduler) + "/metrics")
        assert status == 200 and "corral_scheduler_tasks" in text


def test_health_stays_open():
    asyncio.run(_health())


async def _health():
    async with serving(token=TOKEN) as scheduler, aiohttp.ClientSession() as session:
        assert await get(session, base_url(scheduler) + "/health") == (200, "ok")


# -- open dashboards -----------------------------------------------------------------------
def test_auth_none_opens_the_dashboard(monkeypatch):
    asyncio.run(_open_dashboard(dashboard_auth="none"))
    monkeypatch.setenv("CORRAL_DASHBOARD__AUTH", "none")  # the configuration says the same
    asyncio.run(_open_dashboard())


def test_a_cluster_without_a_token_has_an_open_dashboard():
    asyncio.run(_open_dashboard(token=None))


async def _open_dashboard(token: str | None = TOKEN, **kwargs: Any) -> None:
    async with serving(token=token, **kwargs) as scheduler, aiohttp.ClientSession() as session:
        base = base_url(scheduler)
        assert scheduler.dashboard_link == base + "/status"  # no token to carry
        assert scheduler.dashboard.description() == {"https": False, "token": False}
        status, text = await get(session, base + "/metrics")
        assert status == 200 and "corral_scheduler_tasks" in text
        status, _ = await get(session, base + "/status")
        assert status == 200
        async with session.ws_connect(base + "/ws") as ws:
            assert "snapshot" in await ws.receive_json(timeout=10)


# -- HTTPS ---------------------------------------------------------------------------------
def test_https_with_the_scheduler_certificate(pki):
    asyncio.run(_https(pki))


async def _https(pki):
    security = Security(tls_cert=pki.node.cert, tls_key=pki.node.key)  # TLS, no client certs
    trust = ssl.create_default_context(cafile=pki.ca.cert)
    async with serving(token=TOKEN, security=security) as scheduler:
        port = scheduler.services["dashboard"]
        link = scheduler.dashboard_link
        assert link.startswith(f"https://127.0.0.1:{port}/status?token=")
        assert scheduler.dashboard.description() == {"https": True, "token": True}
        base = base_url(scheduler, "https")
        async with aiohttp.ClientSession() as session:
            status, _ = await get(session, base + "/metrics", ssl=trust)
            assert status == 401
            status, text = await get(session, base + "/metrics", ssl=trust, headers=bearer(TOKEN))
            assert status == 200 and "corral_scheduler_tasks" in text
            assert await get(session, base + "/health", ssl=trust) == (200, "ok")
            # Plain HTTP on the HTTPS port gets nothing.
            with pytest.raises(aiohttp.ClientError):
                await get(session, base_url(scheduler) + "/health")
        async with browser_session() as session:
            async with session.get(link, ssl=trust, allow_redirects=False) as response:
                cookie = SimpleCookie(response.headers["Set-Cookie"])[f"corral-dashboard-{port}"]
                assert response.status == 303 and cookie["secure"]  # HTTPS only
            status, page = await get(session, link, ssl=trust)
            assert status == 200 and "Corral dashboard" in page
            async with session.ws_connect(base.replace("https", "wss") + "/ws", ssl=trust) as ws:
                assert "snapshot" in await ws.receive_json(timeout=10)


def test_https_can_be_turned_off(pki):
    asyncio.run(_https_off(pki))


async def _https_off(pki):
    security = Security(tls_cert=pki.node.cert, tls_key=pki.node.key)
    async with serving(token=TOKEN, security=security, dashboard_tls=False) as scheduler:
        assert scheduler.dashboard_link.startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession() as session:
            status, _ = await get(session, base_url(scheduler) + "/metrics", headers=bearer(TOKEN))
            assert status == 200


def test_mutual_tls_client_certificate_admits_without_a_token(pki):
    asyncio.run(_mutual(pki))


async def _mutual(pki):
    security = Security(tls_ca_file=pki.ca.cert, tls_cert=pki.node.cert, tls_key=pki.node.key)
    anonymous = ssl.create_default_context(cafile=pki.ca.cert)
    with_certificate = ssl.create_default_context(cafile=pki.ca.cert)
    with_certificate.load_cert_chain(pki.node.cert, pki.node.key)
    async with serving(token=None, security=security) as scheduler:
        base = base_url(scheduler, "https")
        assert scheduler.dashboard_link == base + "/status"  # nothing to carry
        async with aiohttp.ClientSession() as session:
            status, page = await get(session, base + "/status", ssl=anonymous, headers=HTML)
            assert status == 401  # a browser without a certificate: how to log in
            assert 'id="certificate-login" hidden' not in page  # says: with a certificate
            assert 'id="token-login" hidden' in page  # no token to paste
            status, _ = await get(session, base + "/metrics", ssl=with_certificate)
            assert status == 200
            async with session.ws_connect(base + "/ws", ssl=with_certificate) as ws:
                assert "snapshot" in await ws.receive_json(timeout=10)


# -- links that work -----------------------------------------------------------------------
def open_with_cookies(url: str, context: ssl.SSLContext | None = None) -> tuple[int, str]:
    """Open ``url`` as a browser would: follow redirects, keep cookies."""
    handlers: list[Any] = [urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    with urllib.request.build_opener(*handlers).open(url, timeout=30) as response:
        return response.status, response.read().decode()


def test_client_and_cluster_links_open_the_dashboard():
    with LocalCluster(n_workers=1, processes=False, dashboard_address="127.0.0.1:0") as cluster:
        deadline = time.monotonic() + 30
        while not cluster.scheduler.dashboard.ready.is_set():
            assert time.monotonic() < deadline, "the dashboard did not start"
            time.sleep(0.02)
        link = cluster.dashboard_link
        assert link == cluster.scheduler.dashboard_link
        assert link.endswith(f"/status?token={dashboard_token(cluster.token)}")
        with Client(cluster) as client:
            assert client.dashboard_link == link
        # A client that only knows the address builds the link from the welcome.
        with Client(cluster.scheduler_address, token=cluster.token, set_as_default=False) as client:
            assert client.cluster is None and client.dashboard_link == link
        status, page = open_with_cookies(link)
        assert status == 200 and "<title>Corral dashboard</title>" in page
        with pytest.raises(urllib.error.HTTPError) as refused:
            open_with_cookies(without_token(link))
        assert refused.value.code == 401


def test_process_cluster_link_over_https(pki):
    """The scheduler in its own process: the link comes from its scheduler file."""
    security = Security(tls_ca_file=pki.ca.cert, tls_cert=pki.node.cert, tls_key=pki.node.key)
    with LocalCluster(
        n_workers=0, processes=True, security=security, dashboard_address="127.0.0.1:0"
    ) as cluster:
        link = cluster.dashboard_link
        assert link.startswith("https://127.0.0.1:") and "?token=" in link
        trust = ssl.create_default_context(cafile=pki.ca.cert)
        deadline = time.monotonic() + 30
        while True:  # aiohttp starts serving a moment after the port is bound
            try:
                status, page = open_with_cookies(link, trust)
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline, "the dashboard did not answer"
                time.sleep(0.1)
        assert status == 200 and "Corral dashboard" in page


def test_scheduler_command_prints_a_working_link(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update(CORRAL_CONFIG="", CORRAL_AUTH_TOKEN=TOKEN)
    link = _printed_link(env, [])
    assert link.endswith(f"/status?token={dashboard_token(TOKEN)}")
    assert _open_when_ready(link) == 200
    link = _printed_link(env, ["--dashboard-auth", "none"])
    assert "token" not in link
    assert _open_when_ready(link.replace("/status", "/metrics")) == 200


def _printed_link(env: dict[str, str], args: list[str]) -> str:
    """Start ``corral scheduler``, read its ``Dashboard at:`` line; it is stopped at exit."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral", "scheduler", "--port", "0",
         "--dashboard-address", "127.0.0.1:0", *args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _running.append(proc)
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("Dashboard at: "):
            return line.split("Dashboard at: ", 1)[1].strip()
    raise AssertionError(f"no 'Dashboard at:' line (exit status {proc.wait()})")


_running: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def stop_scheduler_processes():
    yield
    while _running:
        proc = _running.pop()
        proc.terminate()
        proc.wait(30)


def _open_when_ready(url: str) -> int:
    deadline = time.monotonic() + 30
    while True:
        try:
            return open_with_cookies(url)[0]
        except urllib.error.URLError as exc:
            if isinstance(exc, urllib.error.HTTPError) or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# -- warnings and links --------------------------------------------------------------------
def test_exposed_dashboard_warnings_say_what_is_missing(pki, caplog):
    secure = Security(tls_cert=pki.node.cert, tls_key=pki.node.key)
    cases = [
        ({"token": TOKEN}, "without TLS"),
        ({"token": TOKEN, "dashboard_auth": "none"}, "NO authentication and NO encryption"),
        ({"token": None, "security": secure}, "with NO authentication:"),  # but HTTPS
        ({"token": TOKEN, "security": secure}, None),
    ]
    for kwargs, expected in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="corral.security"):
            asyncio.run(_start_exposed(**kwargs))
        warnings = [r.getMessage() for r in caplog.records if "the dashboard" in r.getMessage()]
        if expected is None:
            assert warnings == [], kwargs
        else:
            assert len(warnings) == 1 and expected in warnings[0], (kwargs, warnings)
    text = exposure_warning("dashboard", "10.0.0.5", authenticated=False, encrypted=False)
    assert text is not None and "watch the cluster" in text and "dashboard.auth" in text
    assert exposure_warning("dashboard", "127.0.0.1", authenticated=False, encrypted=False) is None


async def _start_exposed(**kwargs: Any) -> None:
    async with serving(dashboard_address="0.0.0.0:0", **kwargs):
        pass


def test_links_carry_a_derived_read_only_token():
    derived = dashboard_token(TOKEN)
    assert derived == dashboard_token(TOKEN) and derived != dashboard_token(TOKEN + "!")
    assert TOKEN not in derived and len(derived) >= 43
    assert advertised_link("::1", 8787, {}, TOKEN) == "http://[::1]:8787/status"  # old scheduler
    link = advertised_link("h", 1, {"https": True, "token": True}, TOKEN)
    assert link == f"https://h:1/status?token={derived}"
    assert advertised_link("h", 1, {"token": True}, None) == "http://h:1/status"
    assert without_token(link) == "https://h:1/status"
    assert without_token("http://h:1/status?a=1&token=x") == "http://h:1/status?a=1"
