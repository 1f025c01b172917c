"""Waiting on many futures: :func:`wait` and :class:`as_completed`."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from .future import Future, FutureState

ALL_COMPLETED = "ALL_COMPLETED"
FIRST_COMPLETED = "FIRST_COMPLETED"


class DoneAndNotDoneFutures(NamedTuple):
    """What :func:`wait` returns."""

    done: set[Future]
    not_done: set[Future]


def _split(futures: set[Future]) -> DoneAndNotDoneFutures:
    done = {f for f in futures if f.done()}
    return DoneAndNotDoneFutures(done, futures - done)


def wait(
    fs: Iterable[Future] | Future,
    timeout: float | None = None,
    return_when: str = ALL_COMPLETED,
) -> Any:
    """Wait until all (or the first of) ``fs`` are done; return ``(done, not_done)``.

    Raises ``TimeoutError`` if ``timeout`` seconds pass first.  With an
    asynchronous client this returns an awaitable.

    Example::

        done, not_done = wait(client.map(inc, range(10)))
    """
    futures = {fs} if isinstance(fs, Future) else set(fs)
    if return_when not in (ALL_COMPLETED, FIRST_COMPLETED):
        raise ValueError(
            f"return_when must be ALL_COMPLETED or FIRST_COMPLETED, not {return_when!r}"
        )
    if not futures:
        return DoneAndNotDoneFutures(set(), set())
    client = next(iter(futures)).client
    if client.asynchronous:
        return _wait_async(futures, timeout, return_when)
    deadline = None if timeout is None else time.monotonic() + timeout
    if return_when == ALL_COMPLETED:
        for f in futures:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not f._state.wait(remaining):
                raise TimeoutError(
                    f"{len(_split(futures).not_done)} futures not done within {timeout}s"
                )
        return _split(futures)
    event = threading.Event()
    for f in futures:
        if not f._state.add_callback(lambda _s: event.set()):
            event.set()
            break
    if not event.wait(timeout):
        raise TimeoutError(f"no future finished within {timeout}s")
    return _split(futures)


async def _wait_async(
    futures: set[Future], timeout: float | None, return_when: str
) -> DoneAndNotDoneFutures:
    waits = [asyncio.ensure_future(f._state.wait_async()) for f in futures]
    mode = asyncio.ALL_COMPLETED if return_when == ALL_COMPLETED else asyncio.FIRST_COMPLETED
    done, pending = await asyncio.wait(waits, timeout=timeout, return_when=mode)
    for p in pending:
        p.cancel()
    if not done or (return_when == ALL_COMPLETED and pending):
        raise TimeoutError(f"futures not done within {timeout}s")
    return _split(futures)


class as_completed:
    """Iterate over futures in the order they finish; more can be added meanwhile.

    Example::

        for future, result in as_completed(futures, with_results=True):
            print(future.key, result)
    """

    def __init__(
        self, futures: Iterable[Future] = (), with_results: bool = False, raise_errors: bool = True
    ):
        self.with_results = with_results
        self.raise_errors = raise_errors
        self._queue: queue.SimpleQueue[Future] = queue.SimpleQueue()
        self._async_queue: asyncio.Queue[Future] | None = None
        self._pending = 0
        self._lock = threading.Lock()
        for f in futures:
            self.add(f)

    def add(self, future: Future) -> None:
        """Also yield ``future`` once it is done."""
        with self._lock:
            self._pending += 1

        def done(_: FutureState) -> None:
            self._queue.put(future)
            if self._async_queue is not None:
                self._async_queue.put_nowait(future)

        if not future._state.add_callback(done):
            done(future._state)

    def update(self, futures: Iterable[Future]) -> None:
        """Add several futures."""
        for f in futures:
            self.add(f)

    def count(self) -> int:
        """How many futures have not been yielded yet."""
        return self._pending

    def is_empty(self) -> bool:
        """True when every added future has been yielded."""
        return self._pending == 0

    def _result(self, future: Future) -> Any:
        with self._lock:
            self._pending -= 1
        if not self.with_results:
            return future
        if future.status == "error" and not self.raise_errors:
            return future, future._state.exception()
        return future, future.result()

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._pending == 0:
            raise StopIteration
        return self._result(self._queue.get())

    def __aiter__(self) -> as_completed:
        if self._async_queue is None:
            self._async_queue = asyncio.Queue()
            while True:
                try:
                    self._async_queue.put_nowait(self._queue.get_nowait())
                except queue.Empty:
                    break
        return self

    async def __anext__(self) -> Any:
        if self._pending == 0:
            raise StopAsyncIteration
        assert self._async_queue is not None
        future = await self._async_queue.get()
        with self._lock:
            self._pending -= 1
        if not self.with_results:
            return future
        return future, await future.result()

    def next_batch(self, block: bool = True) -> list[Any]:
        """Everything done now (at least one future if ``block``)."""
        out = []
        if block and self._pending:
            out.append(next(self))
        while self._pending:
            try:
                out.append(self._result(self._queue.get_nowait()))
            except queue.Empty:
                break
        return out

    def batches(self) -> Iterator[list[Any]]:
        """Yield lists of finished futures as they come."""
        while self._pending:
            yield self.next_batch()
