"""Transport: framed batched connections, servers and the opening handshake."""

from .connection import (
    Connection,
    Server,
    format_address,
    open_connection,
    parse_address,
    start_server,
)
from .handshake import accept, connect, connect_with_retry
from .security import Security

__all__ = [
    "Connection",
    "Security",
    "Server",
    "accept",
    "connect",
    "connect_with_retry",
    "format_address",
    "open_connection",
    "parse_address",
    "start_server",
]
