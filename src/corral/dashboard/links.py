"""Links to the dashboard, and the read-only token they carry.

Links are built in three places (the scheduler's ``Dashboard at:`` line,
``LocalCluster.dashboard_link``, ``Client.dashboard_link``), always here.  A
link to a dashboard that asks for the token carries it once
(``/status?token=...``): the dashboard trades it for a cookie and redirects
to the clean address.

The token in links is not the cluster's token but one derived from it
(:func:`dashboard_token`): it opens the dashboard only, so a link that ends
up in a log, a browser history or a chat message cannot be used to run code
on the cluster.  The dashboard accepts either.

Nothing here imports aiohttp: clients import this module.

Example::

    dashboard_url("10.0.0.1", 8787, https=True, token=dashboard_token("s3cret"))
    # 'https://10.0.0.1:8787/status?token=...'
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..comm.connection import format_address

#: The query parameter a link carries the token in.
TOKEN_PARAM = "token"

# A fixed label: the dashboard token is the HMAC of it under the cluster token,
# so anyone holding the cluster token can compute it and nobody can go back.
_DERIVATION_LABEL = b"corral dashboard token v1"


def dashboard_token(cluster_token: str) -> str:
    """The read-only dashboard token derived from ``cluster_token`` (URL-safe text)."""
    digest = hmac.new(cluster_token.encode(), _DERIVATION_LABEL, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def dashboard_url(
    host: str, port: int, *, https: bool, token: str | None, path: str = "/status"
) -> str:
    """``http(s)://HOST:PORT/status``, with ``?token=`` when ``token`` is given."""
    url = format_address(host, port, "https" if https else "http") + path
    if token:
        url += "?" + urlencode({TOKEN_PARAM: token})
    return url


def advertised_link(
    host: str, port: int, description: Mapping[str, Any], cluster_token: str | None
) -> str:
    """The link to a dashboard as its scheduler describes it (``https``, ``token``).

    ``description`` is what the scheduler sends in its welcome and writes in
    its scheduler file (:meth:`corral.dashboard.server.DashboardServer.description`);
    an older scheduler sends none: plain HTTP, no token.
    """
    token = None
    if description.get("token") and cluster_token:
        token = dashboard_token(cluster_token)
    return dashboard_url(host, port, https=bool(description.get("https")), token=token)


def without_token(link: str) -> str:
    """``link`` without its token: for text that may be logged (``repr(client)``)."""
    parts = urlsplit(link)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != TOKEN_PARAM]
    return urlunsplit(parts._replace(query=urlencode(query)))
