"""Who may see the dashboard, and over what: the policy, decided once at start.

The dashboard takes the cluster's locks (``docs/security.md``):

* ``dashboard.auth: token`` (the default): when the cluster has a token, each
  request must present it, or the read-only token derived from it
  (:func:`corral.dashboard.links.dashboard_token`), as a bearer header, a
  cookie, or once in a link.  With mutual TLS, a client certificate signed by
  the cluster's CA is enough too.  A cluster with neither lock has nothing to
  check: its dashboard is open, like the cluster itself.
* ``dashboard.auth: none``: open to anyone who can reach it.
* ``dashboard.tls: true`` (the default): when the scheduler has a TLS
  certificate, the dashboard serves HTTPS with it.

Enforcing the policy on requests is :mod:`corral.dashboard.auth`'s job.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

from ..comm.security import Security, log_exposure
from .links import dashboard_token

#: The values of ``dashboard.auth``.
AUTH_MODES = ("token", "none")


@dataclass(frozen=True)
class DashboardAccess:
    """What the dashboard requires of a request, and its HTTPS context.

    ``secrets``: the tokens a request may present (the cluster's and the
    dashboard token derived from it); empty when no token is required.
    ``link_token``: the token links carry (the derived one), or ``None``.
    ``ssl_context``: HTTPS when set.  ``client_certificates``: a client
    certificate signed by the cluster's CA authenticates a request.
    """

    secrets: tuple[str, ...] = ()
    link_token: str | None = None
    ssl_context: ssl.SSLContext | None = None
    client_certificates: bool = False

    @property
    def https(self) -> bool:
        """True when the dashboard serves HTTPS."""
        return self.ssl_context is not None

    @property
    def protected(self) -> bool:
        """True when a request must prove something (a token or a certificate)."""
        return bool(self.secrets) or self.client_certificates

    def description(self) -> dict[str, Any]:
        """What clients need to build a working link: ``{"https": ..., "token": ...}``.

        Holds no secret: a client derives the link's token from its own.
        """
        return {"https": self.https, "token": self.link_token is not None}

    def warn_if_exposed(self, host: str) -> None:
        """Log a SECURITY warning when ``host`` is reachable from elsewhere without both
        locks (a required token or certificate, and HTTPS)."""
        log_exposure("dashboard", host, authenticated=self.protected, encrypted=self.https)


def https_context(security: Security, *, verify_clients: bool) -> ssl.SSLContext:
    """A server context with the scheduler's certificate, for browsers and scrapers.

    Unlike the cluster port's context, a client certificate is never
    *required* (browsers rarely have one); with ``verify_clients`` one is
    asked for and checked against the cluster's CA when presented.
    """
    assert security.tls_cert is not None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = security.tls_min_version
    ctx.load_cert_chain(security.tls_cert, security.tls_key)
    ctx.set_alpn_protocols(["http/1.1"])
    if verify_clients and security.tls_ca_file:
        ctx.load_verify_locations(cafile=security.tls_ca_file)
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def resolve_access(
    token: str | None, security: Security | None, *, auth: str, tls: bool
) -> DashboardAccess:
    """The dashboard's policy for a scheduler with ``token`` and ``security``.

    ``auth``: ``"token"`` or ``"none"`` (``dashboard.auth``); ``tls``: serve
    HTTPS when the scheduler has a certificate (``dashboard.tls``).
    """
    if auth not in AUTH_MODES:
        raise ValueError(f"dashboard auth must be one of {', '.join(AUTH_MODES)}, got {auth!r}")
    required = auth == "token"
    serve_https = tls and security is not None and security.tls_cert is not None
    client_certificates = required and serve_https and security is not None and security.mutual
    context = None
    if serve_https:
        assert security is not None
        context = https_context(security, verify_clients=client_certificates)
    if not (required and token):
        return DashboardAccess(ssl_context=context, client_certificates=client_certificates)
    derived = dashboard_token(token)
    return DashboardAccess(
        secrets=(token, derived),
        link_token=derived,
        ssl_context=context,
        client_certificates=client_certificates,
    )
