"""Requests the scheduler sends to several workers and the answers it collects.

Plugins, ``run`` and environments all ask a set of workers something and act
once every one of them answered (a worker that leaves first answers with an
error).  This is that bookkeeping, in one place.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from ..protocol.messages import ErrorInfo, Message, Outcome

if TYPE_CHECKING:
    from .server import Scheduler

logger = logging.getLogger("corral.scheduler")

Done = Callable[[dict[str, Outcome]], None]


class _Gathering:
    __slots__ = ("done", "outcomes", "waiting")

    def __init__(self, waiting: set[str], done: Done) -> None:
        self.waiting = waiting
        self.outcomes: dict[str, Outcome] = {}
        self.done = done


class WorkerAnswers:
    """Outstanding requests to workers, by scheduler-side request id."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self._pending: dict[int, _Gathering] = {}
        self._ids = itertools.count(1)

    def expect(self, addresses: Iterable[str], done: Done) -> int:
        """Register a request awaiting ``addresses``; return its id (to put in the message)."""
        sid = next(self._ids)
        self._pending[sid] = _Gathering(set(addresses), done)
        return sid

    def ask(self, addresses: Iterable[str], make: Callable[[int], Message], done: Done) -> None:
        """Send ``make(id)`` to each connected worker; ``done(outcomes)`` once all answered."""
        streams = self.scheduler._streams
        targets = [a for a in addresses if a in streams and not streams[a].closed]
        if not targets:
            done({})
            return
        msg = make(self.expect(targets, done))
        for address in targets:
            streams[address].send(msg)

    def awaits(self, sid: int, address: str) -> bool:
        """True if request ``sid`` still waits for ``address``."""
        gathering = self._pending.get(sid)
        return gathering is not None and address in gathering.waiting

    def answer(self, sid: int, address: str, outcome: Outcome) -> None:
        """Record ``address``'s answer; finish the request if it was the last one owed."""
        gathering = self._pending.get(sid)
        if gathering is None or address not in gathering.waiting:
            return
        gathering.waiting.discard(address)
        gathering.outcomes[address] = outcome
        if not gathering.waiting:
            del self._pending[sid]
            try:
                gathering.done(gathering.outcomes)
            except Exception:
                logger.exception("handling the answers of workers failed")

    def worker_left(self, address: str) -> None:
        """Answers a leaving worker still owed arrive as errors."""
        error = ErrorInfo(
            typename="CommClosedError", message=f"worker {address} left before it answered"
        )
        for sid, gathering in list(self._pending.items()):
            if address in gathering.waiting:
                self.answer(sid, address, Outcome(error=error))
