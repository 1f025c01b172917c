"""Exceptions that Corral raises to its users and between its own layers."""

from __future__ import annotations

import concurrent.futures


class CorralError(Exception):
    """Base class of Corral's own errors."""


class ProtocolError(CorralError):
    """A peer sent bytes or a message that break the wire protocol."""


class HandshakeError(CorralError):
    """A connection was refused during the opening handshake."""


class CommClosedError(CorralError, ConnectionError):
    """The connection to a peer closed while a request was outstanding."""


class KilledWorker(CorralError):
    """A task was running on too many workers that died while running it."""

    def __init__(self, message: str, key: str | None = None, last_worker: str | None = None):
        super().__init__(message)
        self.task = key
        self.last_worker = last_worker


class FutureCancelledError(CorralError, concurrent.futures.CancelledError):
    """The result of a cancelled future was asked for."""

    def __init__(self, key: str, reason: str = "cancelled"):
        super().__init__(f"{key} {reason}")
        self.key = key
        self.reason = reason


class LostDataError(CorralError):
    """The only copies of a result were lost and it cannot be recomputed."""


class RemoteError(CorralError):
    """A task failed with an exception that could not be rebuilt on this side."""

    def __init__(self, typename: str, message: str, traceback_text: str = ""):
        super().__init__(f"{typename}: {message}")
        self.typename = typename
        self.remote_message = message
        self.traceback_text = traceback_text


class SerializationError(CorralError, TypeError):
    """A value could not be serialized or deserialized."""


class RemoteTraceback(Exception):
    """Carries the formatted remote traceback as the ``__cause__`` of a rebuilt error."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text
