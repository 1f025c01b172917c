"""Enforcing the dashboard's policy (:mod:`corral.dashboard.access`) on HTTP requests.

An aiohttp middleware admits a request that presents, checked in constant
time against the cluster's token and the dashboard token derived from it:

* ``Authorization: Bearer TOKEN`` (programs: Prometheus, ``curl``);
* the cookie ``corral-dashboard-PORT`` (browsers; one name per port, since
  cookies do not tell ports apart and two clusters may share a host);
* with mutual TLS, a client certificate signed by the cluster's CA.

A link carrying the token (``/status?token=...``) is traded for the cookie
(HttpOnly, SameSite=Lax, Secure over HTTPS) and a redirect to the same
address without the token, as Jupyter does; a WebSocket cannot follow a
redirect, so on ``/ws`` such a token is checked in place.  ``/login`` shows
a form to paste the token into.  A WebSocket admitted by a credential that
browsers send by themselves (the cookie, a certificate) must come from a
page of this dashboard (its ``Origin``), so that no other site can read it.

Refused requests get ``401``: the login page for browsers, a short text with
``WWW-Authenticate: Bearer`` for programs.  ``/health`` stays open.

Imported only once aiohttp is (in the dashboard's start-up thread).
"""

from __future__ import annotations

import hmac
import html
import os
from string import Template
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Handler
from yarl import URL

from .access import DashboardAccess
from .links import TOKEN_PARAM

#: Paths anyone may fetch.
OPEN_PATHS = frozenset({"/health", "/login"})

_LOGIN_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "login.html")
_UNAUTHORIZED_TEXT = (
    "401 Unauthorized: this dashboard needs the cluster's token. Programs send "
    "'Authorization: Bearer TOKEN'; browsers open the link the scheduler printed "
    "(/status?token=...) or /login. See docs/dashboard.md.\n"
)
# Credentials a browser attaches by itself, also to requests another site makes it send.
_AMBIENT = frozenset({"cookie", "certificate"})


class DashboardAuth:
    """Admits the requests :class:`DashboardAccess` allows; serves the login page.

    Example (what :class:`~corral.dashboard.server.DashboardServer` does)::

        app = web.Application()
        DashboardAuth(access, port).install(app)
    """

    def __init__(self, access: DashboardAccess, port: int) -> None:
        self.access = access
        self.cookie_name = f"corral-dashboard-{port}"
        self._secrets = tuple(secret.encode() for secret in access.secrets)
        with open(_LOGIN_PAGE, encoding="utf-8") as f:
            self._login_template = Template(f.read())

    def install(self, app: web.Application) -> None:
        """Check every request of ``app``; add ``/login``."""
        app.middlewares.append(self.middleware)
        app.router.add_get("/login", self.login_page)
        app.router.add_post("/login", self.login)

    # -- the check -------------------------------------------------------------------
    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Pass admitted requests on to ``handler``; answer the others."""
        if request.path in OPEN_PATHS:
            return await handler(request)
        link_token = request.query.get(TOKEN_PARAM)
        if link_token is not None and not _is_websocket(request):
            return self._trade_link_token(request, link_token)
        credential = self.credential(request)
        if credential is None:
            return self._refuse(request)
        if credential in _AMBIENT and _is_websocket(request) and not _same_origin(request):
            return web.Response(
                status=403, text="403 Forbidden: a page of another site opened this WebSocket\n"
            )
        return await handler(request)

    def credential(self, request: web.Request) -> str | None:
        """Which valid credential ``request`` presents (``"bearer"``, ``"link"``,
        ``"cookie"``, ``"certificate"``), or ``None``."""
        if self.valid_token(_bearer_token(request)):
            return "bearer"
        if _is_websocket(request) and self.valid_token(request.query.get(TOKEN_PARAM)):
            return "link"
        if self.valid_token(request.cookies.get(self.cookie_name)):
            return "cookie"
        if self.access.client_certificates and _has_verified_certificate(request):
            return "certificate"
        return None

    def valid_token(self, presented: str | None) -> bool:
        """True when ``presented`` is one of the accepted tokens (constant time)."""
        if not presented:
            return False
        candidate = presented.encode()
        matched = False
        for secret in self._secrets:  # every one is compared: no early exit to time
            matched |= hmac.compare_digest(candidate, secret)
        return matched

    # -- answers ---------------------------------------------------------------------
    def _trade_link_token(self, request: web.Request, token: str) -> web.StreamResponse:
        """A link's token: the cookie and a redirect to the clean address, or a refusal."""
        clean = request.rel_url.with_query(
            [(k, v) for k, v in request.query.items() if k != TOKEN_PARAM]
        )
        if not self.valid_token(token):
            return self._refuse(request, "The token in that link is not this cluster's.", clean)
        return self._admit(str(clean))

    def _admit(self, target: str) -> web.StreamResponse:
        """A redirect to ``target`` that sets the cookie."""
        # The token leaves the address bar: keep it out of caches and Referer headers too.
        response = web.Response(
            status=303,
            headers={
                "Location": target,
                "Cache-Control": "no-store",
                "Referrer-Policy": "no-referrer",
            },
        )
        assert self.access.link_token is not None  # protected by a token: it has one
        response.set_cookie(
            self.cookie_name,
            self.access.link_token,
            path="/",
            httponly=True,
            samesite="Lax",  # sent when a link from elsewhere is followed, not on sub-requests
            secure=self.access.https,
        )
        return response

    def _refuse(
        self, request: web.Request, message: str = "", back_to: URL | None = None
    ) -> web.StreamResponse:
        """401: the login page (leading back to ``back_to``, else the request's address)
        for a browser, a short text for a program."""
        if "text/html" in request.headers.get("Accept", ""):
            target = _local_path(str(back_to or request.rel_url))
            return self._login_response(target, message, status=401)
        return web.Response(
            status=401,
            text=_UNAUTHORIZED_TEXT,
            headers={"WWW-Authenticate": 'Bearer realm="corral dashboard"'},
        )

    def _login_response(self, next_path: str, message: str, status: int) -> web.Response:
        has_tokens = bool(self._secrets)
        page = self._login_template.substitute(
            message=html.escape(message),
            next=html.escape(next_path, quote=True),
            token_hidden="" if has_tokens else "hidden",
            certificate_hidden="" if self.access.client_certificates else "hidden",
        )
        return web.Response(
            status=status,
            text=page,
            content_type="text/html",
            headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"},
        )

    # -- /login ----------------------------------------------------------------------
    async def login_page(self, request: web.Request) -> web.StreamResponse:
        """``GET /login``: the form (``?next=/path`` to return to)."""
        return self._login_response(_local_path(request.query.get("next")), "", status=200)

    async def login(self, request: web.Request) -> web.StreamResponse:
        """``POST /login`` with ``token`` (and ``next``): the cookie, or the form again."""
        form = await request.post()
        token, target = form.get("token"), _local_path(form.get("next"))
        if self._secrets and isinstance(token, str) and self.valid_token(token.strip()):
            return self._admit(target)
        return self._login_response(target, "That is not this cluster's token.", status=401)


def _bearer_token(request: web.Request) -> str | None:
    """The credentials of an ``Authorization: Bearer ...`` header."""
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else None


def _is_websocket(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


def _same_origin(request: web.Request) -> bool:
    """True unless a browser says a page of another origin made the request."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True  # not a browser: it attached no ambient credential by itself
    return urlsplit(origin).netloc.lower() == request.host.lower()


def _has_verified_certificate(request: web.Request) -> bool:
    """True when the TLS peer presented a certificate (the handshake verified it)."""
    transport = request.transport
    return transport is not None and bool(transport.get_extra_info("peercert"))


def _local_path(target: object) -> str:
    """``target`` when it is a path on this server, else ``/status`` (no open redirect)."""
    if (
        isinstance(target, str)
        and target.startswith("/")
        and not target.startswith("//")
        and "\\" not in target
        and target.isprintable()
    ):
        return target
    return "/status"
