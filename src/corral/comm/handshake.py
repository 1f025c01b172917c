"""The opening handshake of every connection: protocol version, role and auth.

The server speaks first with :class:`~corral.protocol.messages.Hello`,
carrying a random challenge when it requires a token.  The connector answers
with :class:`~corral.protocol.messages.Handshake`, whose ``response`` is
``HMAC-SHA256(token, challenge)``: the token itself never crosses the wire.
The server answers ``welcome`` or ``refused`` (and closes).  No other op is
read before this completes.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import CommClosedError, HandshakeError, ProtocolError
from ..protocol.messages import PROTOCOL_VERSION, Handshake, Hello, Refused, Welcome
from .connection import Connection, open_connection
from .security import Security, client_ssl

logger = logging.getLogger("corral.comm")

#: Seconds a peer has to complete the handshake (read at call time: tests lower it).
HANDSHAKE_TIMEOUT = 10.0


def answer_challenge(token: str | None, challenge: bytes | None) -> bytes | None:
    """Return the HMAC answer to ``challenge`` (``None`` without a challenge)."""
    if challenge is None:
        return None
    if token is None:
        return b""
    return hmac.new(token.encode(), bytes(challenge), hashlib.sha256).digest()


async def accept(
    conn: Connection,
    *,
    role: str,
    server_id: str,
    token: str | None,
    allowed_roles: Iterable[str],
    info: dict[str, Any] | None = None,
    timeout: float | None = None,
    check: Callable[[Handshake], str | None] | None = None,
) -> Handshake:
    """Run the server side; return the peer's handshake or raise :class:`HandshakeError`.

    On failure the connection is closed after telling the peer why.  ``timeout``
    defaults to :data:`HANDSHAKE_TIMEOUT`.  ``check(handshake)``, called last,
    may return a reason to refuse the peer (the scheduler's strict version check).
    """
    if timeout is None:
        timeout = HANDSHAKE_TIMEOUT
    challenge = secrets.token_bytes(32) if token else None
    conn.send(Hello(protocol=PROTOCOL_VERSION, role=role, challenge=challenge))

    def refuse(reason: str) -> HandshakeError:
        logger.warning("refused connection from %s: %s", conn.peer, reason)
        if not conn.closed:
            conn.send(Refused(reason=reason))
            conn.close(reason)
        return HandshakeError(reason)

    try:
        msg = await conn.recv(timeout=timeout)
    except TimeoutError:
        raise refuse(f"no handshake within {timeout}s") from None
    if not isinstance(msg, Handshake):
        raise refuse(f"expected a handshake, got op {type(msg).op!r}")
    if msg.protocol != PROTOCOL_VERSION:
        raise refuse(f"protocol version {msg.protocol} is not supported (need {PROTOCOL_VERSION})")
    if msg.role not in allowed_roles:
        raise refuse(f"role {msg.role!r} may not connect here")
    expected = answer_challenge(token, challenge)
    if expected is not None and not hmac.compare_digest(expected, bytes(msg.response or b"")):
        raise refuse("authentication failed: wrong or missing token")
    reason = check(msg) if check is not None else None  # e.g. strict version checks
    if reason:
        raise refuse(reason)
    conn.send(Welcome(id=server_id, info=info))
    conn.lift_limits()
    conn.info.update(role=msg.role, id=msg.id, name=msg.name)
    return msg


async def connect(
    address: str,
    *,
    role: str,
    my_id: str,
    name: str | None = None,
    token: str | None = None,
    versions: dict[str, Any] | None = None,
    timeout: float | None = None,
    security: Security | None = None,
) -> tuple[Connection, Welcome]:
    """Open a connection to ``address`` and run the connector side of the handshake.

    ``tls://`` addresses use ``security``'s client context; a TLS refusal
    (certificates) raises :class:`HandshakeError` at once.
    """
    if timeout is None:
        timeout = HANDSHAKE_TIMEOUT
    conn = await open_connection(address, timeout=timeout, ssl_context=client_ssl(security))
    try:
        try:
            hello = await conn.recv(timeout=timeout)
        except CommClosedError as exc:
            if address.startswith("tls://"):
                # TLS 1.3: the server checks our certificate after our side of the
                # TLS handshake finished; a refusal is the connection closing
                # before the server says hello.  Retrying would not help.
                detail = conn.lost_exception or "closed before the server said hello"
                raise HandshakeError(
                    f"{address} refused the TLS connection ({detail}): does it accept this "
                    "side's certificate (mutual TLS needs tls_cert/tls_key signed by its CA)?"
                ) from exc
            raise
        if not isinstance(hello, Hello):
            raise ProtocolError(f"expected hello from {address}, got {type(hello).op!r}")
        if hello.protocol != PROTOCOL_VERSION:
            raise HandshakeError(
                f"{address} speaks protocol {hello.protocol}, this side {PROTOCOL_VERSION}"
            )
        if hello.challenge is not None and token is None:
            raise HandshakeError(f"{address} requires an authentication token and none was given")
        conn.send(
            Handshake(
                protocol=PROTOCOL_VERSION,
                role=role,
                id=my_id,
                name=name,
                response=answer_challenge(token, hello.challenge),
                versions=versions,
            )
        )
        reply = await conn.recv(timeout=timeout)
        if isinstance(reply, Refused):
            raise HandshakeError(f"{address} refused the connection: {reply.reason}")
        if not isinstance(reply, Welcome):
            raise ProtocolError(f"expected welcome from {address}, got {type(reply).op!r}")
        conn.info.update(role=hello.role, id=reply.id)
        return conn, reply
    except BaseException:
        conn.close("handshake failed")
        raise


async def connect_with_retry(
    address: str, *, deadline: float | None, delay: float = 0.1, **kwargs: Any
) -> tuple[Connection, Welcome]:
    """Like :func:`connect`, retrying refused or unreachable addresses until ``deadline``.

    ``deadline`` is a ``loop.time()`` value, or ``None`` to retry forever.
    Handshake refusals (wrong token, bad version) are not retried.
    """
    loop = asyncio.get_running_loop()
    while True:
        if deadline is not None and "timeout" not in kwargs:
            # One attempt never outlives the deadline (a silent server, say).
            attempt = min(HANDSHAKE_TIMEOUT, max(0.1, deadline - loop.time()))
            kw: dict[str, Any] = {**kwargs, "timeout": attempt}
        else:
            kw = kwargs
        try:
            return await connect(address, **kw)
        except (OSError, TimeoutError) as exc:
            if deadline is not None and loop.time() + delay > deadline:
                raise TimeoutError(f"could not connect to {address}: {exc}") from exc
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 2.0)
