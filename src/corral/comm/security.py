"""Who may connect: TLS settings, authentication tokens, exposure warnings.

Two independent locks on the door, usable together (see ``docs/security.md``):

* **a shared token**: every connection's handshake proves knowledge of it with
  an HMAC answer to a fresh challenge (:mod:`corral.comm.handshake`);
* **TLS** (``tls://`` addresses): the stream is encrypted and the server proves
  its identity with a certificate; with a CA file on the server side, every
  connector must present a certificate signed by that CA (mutual TLS).

:class:`Security` holds the TLS settings and builds the
:class:`ssl.SSLContext` objects once; the helpers below find the token
(argument, token file, ``$CORRAL_AUTH_TOKEN``, scheduler file) and say when a
listening socket is exposed without either lock.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import secrets
import ssl
import stat
import time
from typing import Any

logger = logging.getLogger("corral.security")

#: Environment variable holding the shared authentication token.
TOKEN_ENV = "CORRAL_AUTH_TOKEN"
#: Environment variable naming a file that holds the token.
TOKEN_FILE_ENV = "CORRAL_AUTH_TOKEN_FILE"

# Tokens of clusters started by this process (LocalCluster), by scheduler
# address: ``Client(cluster.scheduler_address)`` then works without repeating
# the token.  Only this process's own clusters are in it.
_local_tokens: dict[str, str] = {}


class Security:
    """TLS settings for schedulers, workers and clients (as ``distributed.Security``).

    ``tls_cert`` / ``tls_key``: this side's certificate chain and private key
    (PEM files; the key may be inside the certificate file).  A server needs
    them; a client presents them for mutual TLS.

    ``tls_ca_file``: the certificate authority to trust.  On a server it turns
    on mutual TLS: every connector must present a certificate signed by it.
    On a connector it is what the server's certificate must be signed by
    (without it, the system's CAs are used and the host name is checked).

    ``tls_check_hostname``: check that the server's certificate names the
    host connected to.  Default: only when no ``tls_ca_file`` is given (a
    private CA's signature is the identity; cluster addresses are often bare
    IPs that certificates do not list).

    Example::

        sec = Security(tls_ca_file="ca.pem", tls_cert="me.pem", tls_key="me.key")
        client = Client("tls://10.0.0.5:8786", security=sec)
    """

    def __init__(
        self,
        tls_ca_file: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        *,
        tls_check_hostname: bool | None = None,
        tls_min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
    ) -> None:
        if tls_key and not tls_cert:
            raise ValueError("tls_key given without tls_cert")
        for what, path in (
            ("tls_ca_file", tls_ca_file),
            ("tls_cert", tls_cert),
            ("tls_key", tls_key),
        ):
            if path is not None and not os.path.isfile(path):
                raise FileNotFoundError(f"{what}: no such file {path!r}")
        self.tls_ca_file = tls_ca_file
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self.tls_check_hostname = (
            tls_ca_file is None if tls_check_hostname is None else tls_check_hostname
        )
        self.tls_min_version = tls_min_version
        self._server_ctx: ssl.SSLContext | None = None
        self._client_ctx: ssl.SSLContext | None = None

    @classmethod
    def from_options(
        cls,
        security: Security | None = None,
        tls_ca_file: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> Security | None:
        """A ``security=`` argument or the ``tls_*`` keyword arguments, not both."""
        if security is not None:
            if tls_ca_file or tls_cert or tls_key:
                raise ValueError("give security= or tls_* arguments, not both")
            return security
        if tls_ca_file or tls_cert or tls_key:
            return cls(tls_ca_file=tls_ca_file, tls_cert=tls_cert, tls_key=tls_key)
        return None

    @property
    def tls(self) -> bool:
        """True when any TLS setting is given."""
        return bool(self.tls_ca_file or self.tls_cert)

    @property
    def mutual(self) -> bool:
        """True when a server with these settings requires client certificates."""
        return bool(self.tls_ca_file and self.tls_cert)

    def server_context(self) -> ssl.SSLContext:
        """The context for a listening socket (needs ``tls_cert``)."""
        if self._server_ctx is None:
            if not self.tls_cert:
                raise ValueError("a TLS server needs a certificate: give tls_cert (and tls_key)")
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = self.tls_min_version
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
            if self.tls_ca_file:
                ctx.load_verify_locations(cafile=self.tls_ca_file)
                ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS
            self._server_ctx = ctx
        return self._server_ctx

    def client_context(self) -> ssl.SSLContext:
        """The context for outgoing connections."""
        if self._client_ctx is None:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.tls_ca_file)
            ctx.minimum_version = self.tls_min_version
            ctx.check_hostname = self.tls_check_hostname
            ctx.verify_mode = ssl.CERT_REQUIRED
            if self.tls_cert:
                ctx.load_cert_chain(self.tls_cert, self.tls_key)
            self._client_ctx = ctx
        return self._client_ctx

    def cli_args(self) -> list[str]:
        """The ``corral scheduler`` / ``corral worker`` options for these settings."""
        args: list[str] = []
        if self.tls_ca_file:
            args += ["--tls-ca-file", self.tls_ca_file]
        if self.tls_cert:
            args += ["--tls-cert", self.tls_cert]
        if self.tls_key:
            args += ["--tls-key", self.tls_key]
        return args

    def __repr__(self) -> str:
        return (
            f"Security(tls_ca_file={self.tls_ca_file!r}, tls_cert={self.tls_cert!r}, "
            f"tls_key={'<set>' if self.tls_key else None})"
        )


def server_ssl(security: Security | None) -> ssl.SSLContext | None:
    """The server context of ``security`` when it has a certificate, else ``None``."""
    if security is None or not security.tls_cert:
        return None
    return security.server_context()


def client_ssl(security: Security | None) -> ssl.SSLContext | None:
    """The client context of ``security`` when it has TLS settings, else ``None``."""
    if security is None or not security.tls:
        return None
    return security.client_context()


# -- tokens ------------------------------------------------------------------------------
def generate_token() -> str:
    """A fresh random token (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


def read_token_file(path: str) -> str:
    """The token stored in ``path`` (surrounding whitespace removed).

    Warns when the file is readable by other users: they could join the
    cluster and run code on it.
    """
    with open(path) as f:
        token = f.read().strip()
    if not token:
        raise ValueError(f"the token file {path} is empty")
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = 0
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning(
            "the token file %s is readable by other users (mode %o): anyone who can read it "
            "can run code on the cluster; chmod 600 it",
            path,
            stat.S_IMODE(mode),
        )
    return token


def resolve_token(
    token: str | None = None,
    token_file: str | None = None,
    scheduler_info: dict[str, Any] | None = None,
    *,
    env: bool = True,
) -> str | None:
    """The token to use: ``token``, else ``token_file``, else ``$CORRAL_AUTH_TOKEN``
    (or the file named by ``$CORRAL_AUTH_TOKEN_FILE``), else the scheduler file's."""
    if token:
        return token
    if token_file:
        return read_token_file(token_file)
    if env:
        if os.environ.get(TOKEN_ENV):
            return os.environ[TOKEN_ENV]
        if os.environ.get(TOKEN_FILE_ENV):
            return read_token_file(os.environ[TOKEN_FILE_ENV])
    if scheduler_info and scheduler_info.get("token"):
        return str(scheduler_info["token"])
    return None


def register_local_token(address: str, token: str | None) -> None:
    """Remember the token of a cluster this process started (see :func:`local_token`)."""
    if token:
        _local_tokens[address] = token


def forget_local_token(address: str) -> None:
    """Forget a cluster's token (it closed)."""
    _local_tokens.pop(address, None)


def local_token(address: str) -> str | None:
    """The token of a cluster at ``address`` that this process started, if any."""
    return _local_tokens.get(address)


# -- scheduler files ---------------------------------------------------------------------
def write_scheduler_file(path: str, info: dict[str, Any]) -> None:
    """Write ``info`` as JSON to ``path`` atomically, readable by the owner only (0600)."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with contextlib.suppress(AttributeError, OSError):  # platforms without fchmod
        os.fchmod(fd, 0o600)  # an older file of that name may have had wider rights
    with open(fd, "w") as f:
        json.dump(info, f)
    os.replace(tmp, path)


def read_scheduler_file(path: str, timeout: float = 60.0) -> dict[str, Any]:
    """The JSON of a scheduler file, waiting up to ``timeout`` seconds for it to appear."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path) as f:
                info = json.load(f)
            if isinstance(info, dict) and info.get("address"):
                return info
        except FileNotFoundError:
            pass
        except json.JSONDecodeError:
            pass  # being written
        if time.monotonic() > deadline:
            raise TimeoutError(f"scheduler file {path} did not appear within {timeout}s")
        time.sleep(0.1)


# -- exposure ----------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (``localhost``, ``127.x``, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name, or "" (every interface)


#: What a stranger who reaches each kind of port without passing a lock can do.
_EXPOSURE_RISKS = {
    "scheduler": (
        "anyone who can reach this port can submit tasks, that is run arbitrary "
        "code as this user on every worker (and on the scheduler)"
    ),
    "worker": "anyone who can reach this port can read every result this worker holds",
    "dashboard": (
        "anyone who can reach this port can watch the cluster: task keys, worker "
        "addresses, events and metrics"
    ),
}
_LOCK_ADVICE = (
    "Give a token (--auth-token-file, $CORRAL_AUTH_TOKEN, --auth generate) and TLS with "
    "client certificates (--tls-cert, --tls-key, --tls-ca-file), or listen on 127.0.0.1 "
    "behind a firewall"
)
_DASHBOARD_LOCK_ADVICE = (
    "Give the cluster a token (--auth-token-file, $CORRAL_AUTH_TOKEN, --auth generate) and "
    "keep dashboard.auth: token, or listen on 127.0.0.1 (--dashboard-address 127.0.0.1:8787)"
)
_CLEARTEXT_RISKS = {
    "dashboard": (
        "the token keeps strangers out, but it crosses the network in clear text with "
        "every request (link, cookie or Authorization header), and so does what the "
        "dashboard shows; give the scheduler --tls-cert/--tls-key and keep dashboard.tls "
        "on to serve HTTPS"
    ),
}
_CLEARTEXT_RISK = (
    "the token keeps strangers out, but data and tasks cross the network unencrypted and "
    "can be read or altered on the way; give --tls-cert/--tls-key"
)


def exposure_warning(
    service: str, host: str, *, authenticated: bool, encrypted: bool
) -> str | None:
    """The warning to log when ``service`` listens on ``host`` without auth or TLS.

    ``service``: ``"scheduler"``, ``"worker"`` or ``"dashboard"``.
    ``authenticated``: a token or client certificates (mutual TLS) are
    required; ``encrypted``: the port speaks TLS (HTTPS for the dashboard).
    ``None`` when the host is loopback or both locks are on.
    """
    if is_loopback(host) or (authenticated and encrypted):
        return None
    if not authenticated:
        locks = "NO authentication and NO encryption" if not encrypted else "NO authentication"
        advice = _DASHBOARD_LOCK_ADVICE if service == "dashboard" else _LOCK_ADVICE
        return (
            f"SECURITY: the {service} listens on {host or 'every interface'} (not loopback) "
            f"with {locks}: {_EXPOSURE_RISKS[service]}.  {advice}; see docs/security.md"
        )
    return (
        f"SECURITY: the {service} listens on {host or 'every interface'} (not loopback) "
        f"without TLS: {_CLEARTEXT_RISKS.get(service, _CLEARTEXT_RISK)}; see docs/security.md"
    )


def log_exposure(service: str, host: str, *, authenticated: bool, encrypted: bool) -> None:
    """Log :func:`exposure_warning` (loudly) if there is one."""
    message = exposure_warning(service, host, authenticated=authenticated, encrypted=encrypted)
    if message:
        logger.warning(message)


def warn_if_exposed(
    service: str, host: str, *, token: str | None, security: Security | None
) -> None:
    """Log :func:`exposure_warning` for a cluster port (scheduler or worker) if there is one."""
    encrypted = security is not None and security.tls_cert is not None
    mutual = encrypted and security is not None and security.mutual
    log_exposure(service, host, authenticated=bool(token) or mutual, encrypted=encrypted)
