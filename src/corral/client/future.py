"""Futures: handles on results that live on the cluster."""

from __future__ import annotations

import _thread
import asyncio
import concurrent.futures
import contextlib
import copy
import os
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import (
    CommClosedError,
    FutureCancelledError,
    KilledWorker,
    LostDataError,
    RemoteError,
    RemoteTraceback,
)
from ..protocol.messages import ErrorInfo
from ..protocol.serialize import Payload, deserialize

if TYPE_CHECKING:
    from .client import Client

DONE = frozenset({"finished", "error", "cancelled", "lost"})

_callbacks: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None
_callbacks_lock = threading.Lock()


def _callback_executor() -> concurrent.futures.ThreadPoolExecutor:
    """The thread running ``add_done_callback`` callbacks (one per process)."""
    global _callbacks
    with _callbacks_lock:
        if _callbacks is None or _callbacks[0] != os.getpid():  # new after a fork
            pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="corral-callback")
            _callbacks = (os.getpid(), pool)
        return _callbacks[1]


_KNOWN_ERRORS: dict[str, type[Exception]] = {
    "KilledWorker": KilledWorker,
    "LostDataError": LostDataError,
}


def rebuild_error(error: ErrorInfo, key: str | None = None) -> BaseException:
    """The original exception with its remote traceback, when it can be rebuilt."""
    exc: BaseException | None = None
    if error.exception is not None:
        try:
            exc = deserialize(error.exception)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        cls = _KNOWN_ERRORS.get(error.typename)
        if cls is KilledWorker:
            exc = KilledWorker(error.message, key=key)
        elif cls is not None:
            exc = cls(error.message)
        else:
            exc = RemoteError(error.typename, error.message, error.traceback_text)
    if error.traceback is not None:
        with contextlib.suppress(Exception):  # a traceback is a nicety, never a new failure
            exc = exc.with_traceback(deserialize(error.traceback))
    if error.traceback_text and exc.__cause__ is None:
        exc.__cause__ = RemoteTraceback(f"\n\nRemote traceback:\n{error.traceback_text}")
    return exc


def _rebuild_off_stack(error: ErrorInfo, key: str) -> BaseException:
    """:func:`rebuild_error` in a short-lived thread.

    tblib rebuilds a traceback by raising in frames whose ``f_back`` is the
    stack of the caller; the caller's frames hold futures (``result(self)``),
    and the error is kept on the future's state, so every future that ever
    failed would stay alive and its key would never be released.  A fresh
    thread's stack holds none of them.
    """
    out: list[BaseException] = []

    def run() -> None:
        try:
            out.append(rebuild_error(error, key))
        except Exception as exc:  # pragma: no cover - rebuild_error falls back itself
            message = f"{error.message} ({exc})"
            out.append(RemoteError(error.typename, message, error.traceback_text))

    thread = threading.Thread(target=run, name="corral-rebuild-error", daemon=True)
    thread.start()
    thread.join()
    return out[0]


class FutureState:
    """What the client knows of one key; shared by every Future for it."""

    __slots__ = (
        "_async_waiters",
        "_callbacks",
        "_waiters",
        "error",
        "exception_obj",
        "finishes",
        "has_value",
        "key",
        "lock",
        "payload",
        "refs",
        "status",
        "typename",
        "value",
        "who_has",
    )

    def __init__(self, key: str, lock: threading.RLock):
        self.key = key
        self.status = "pending"
        self.payload: Payload | None = None
        self.value: Any = None
        self.has_value = False
        self.error: ErrorInfo | None = None
        self.exception_obj: BaseException | None = None
        # A tuple: once it holds only strings the garbage collector stops
        # tracking it (a client may hold 100,000 futures; see _complete too).
        self.who_has: tuple[str, ...] = ()
        self.typename: str | None = None
        self.finishes = 0  # how many times the scheduler said the key is in memory
        self.refs = 0
        self.lock = lock
        # One held lock per blocked thread, released when done: a bare C lock
        # wakes a waiter without the Python-level Condition of threading.Event.
        self._waiters: list[_thread.LockType] | None = None
        # Made on first use: most futures get neither, and every list is one
        # more object for each garbage collection to visit.
        self._async_waiters: list[asyncio.Future[None]] | None = None
        self._callbacks: list[Callable[[FutureState], None]] | None = None

    def done(self) -> bool:
        """True once the key finished, failed, was cancelled or lost."""
        return self.status in DONE

    # -- set from the client's event loop ------------------------------------------
    def finish(self, who_has: Sequence[str], typename: str | None, payload: Payload | None) -> None:
        """The key is in memory on the cluster."""
        self.who_has = tuple(who_has)
        self.typename = typename
        self.finishes += 1
        if payload is not None and not self.has_value:
            self.payload = payload
        self._complete("finished")

    def fail(self, error: ErrorInfo) -> None:
        """The key failed."""
        self.error = error
        self.exception_obj = None
        self._complete("error")

    def cancel(self, reason: str, lost: bool = False) -> None:
        """The key was cancelled (or lost beyond recovery)."""
        self.error = ErrorInfo(typename="CancelledError", message=reason)
        self._complete("lost" if lost else "cancelled")

    def comm_lost(self, reason: str) -> None:
        """The connection to the scheduler is gone: the key can never finish here.

        Its status is ``lost``; ``result()`` raises :class:`CommClosedError`
        naming the scheduler, and ``exception()`` returns that error.
        """
        self.error = ErrorInfo(typename="CommClosedError", message=reason)
        self.exception_obj = CommClosedError(reason)
        self._complete("lost")

    @property
    def failed(self) -> bool:
        """True if the key erred, or can never finish because the scheduler is gone."""
        return self.status == "error" or (
            self.status == "lost" and isinstance(self.exception_obj, CommClosedError)
        )

    def reset(self) -> None:
        """The key is being computed again (its data was lost)."""
        with self.lock:
            self.status = "pending"
            self.payload = None
            self.has_value = False
            self.value = None

    def _complete(self, status: str) -> None:
        with self.lock:
            self.status = status
            waiters, self._waiters = self._waiters, None
            callbacks, self._callbacks = self._callbacks, None
        if waiters:
            for waiter in waiters:
                waiter.release()
        async_waiters, self._async_waiters = self._async_waiters, None
        if async_waiters:
            for w in async_waiters:
                if not w.done():
                    w.set_result(None)
        if callbacks:
            for cb in callbacks:
                cb(self)

    # -- waiting ---------------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> bool:
        """Block this (non-loop) thread until done; False on timeout."""
        if self.status in DONE:
            return True
        waiter = _thread.allocate_lock()
        waiter.acquire()
        with self.lock:
            if self.status in DONE:
                return True
            if self._waiters is None:
                self._waiters = [waiter]
            else:
                self._waiters.append(waiter)
        if waiter.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            return True
        with self.lock:  # timed out: stop waiting (unless released just now)
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)
        return self.status in DONE

    async def wait_async(self) -> None:
        """Wait on the client's event loop until done."""
        if self.status in DONE:
            return
        fut = asyncio.get_running_loop().create_future()
        if self._async_waiters is None:
            self._async_waiters = []
        self._async_waiters.append(fut)
        await fut

    def add_callback(self, cb: Callable[[FutureState], None]) -> bool:
        """Call ``cb(self)`` when done; return False (and do not register) if done already."""
        with self.lock:
            if self.status in DONE:
                return False
            if self._callbacks is None:
                self._callbacks = []
            self._callbacks.append(cb)
            return True

    def exception_to_raise(self) -> BaseException:
        """A copy of :meth:`exception` to raise.

        Raising adds the frames it passes to the exception's traceback; those
        frames hold the futures, so on the cached exception they would keep
        every future that ever raised alive (its key never released).
        """
        exc = self.exception()
        try:
            fresh = copy.copy(exc)
        except Exception:
            return exc
        if type(fresh) is not type(exc) or fresh is exc:
            return exc
        fresh.__cause__ = exc.__cause__
        fresh.__suppress_context__ = exc.__suppress_context__
        return fresh.with_traceback(exc.__traceback__)

    def exception(self) -> BaseException:
        """The exception to raise for an erred, cancelled or lost key."""
        if self.exception_obj is None:
            assert self.error is not None
            if self.status in ("cancelled", "lost"):
                self.exception_obj = FutureCancelledError(self.key, self.error.message)
            else:
                self.exception_obj = _rebuild_off_stack(self.error, self.key)
        return self.exception_obj


class Future:
    """A remote result.  Mirrors ``distributed.Future``.

    Example::

        fut = client.submit(inc, 1)
        fut.result()   # 2
    """

    __slots__ = ("__weakref__", "_client", "_state", "key")

    #: dask recognises futures in graphs by this flag (persisted collections hold futures)
    __dask_future__ = True

    def __init__(self, key: str, client: Client, state: FutureState | None = None):
        self.key = key
        self._client = client
        self._state = state if state is not None else client._acquire(key)
        if state is not None:
            client._acquire_state(state)

    @property
    def client(self) -> Client:
        """The client this future belongs to."""
        return self._client

    @property
    def status(self) -> str:
        """``pending``, ``finished``, ``error``, ``cancelled`` or ``lost``."""
        return self._state.status

    def done(self) -> bool:
        """True if the computation is complete (finished, failed or cancelled)."""
        return self._state.done()

    def cancelled(self) -> bool:
        """True if the future was cancelled."""
        return self._state.status == "cancelled"

    def result(self, timeout: float | None = None) -> Any:
        """Wait for and return the result; raise the task's exception if it failed.

        In asynchronous mode this returns an awaitable.
        """
        if self._client.asynchronous:
            return self._client._result_async(self, timeout)
        if not self._state.wait(timeout):
            raise TimeoutError(f"result of {self.key!r} not ready within {timeout}s")
        return self._client._value_sync(self)

    def exception(self, timeout: float | None = None) -> Any:
        """Wait, then return the exception of a failed future (``None`` if it succeeded)."""
        if self._client.asynchronous:
            return self._exception_async(timeout)
        if not self._state.wait(timeout):
            raise TimeoutError(f"{self.key!r} not done within {timeout}s")
        return self._state.exception() if self._state.failed else None

    async def _exception_async(self, timeout: float | None) -> BaseException | None:
        await asyncio.wait_for(self._state.wait_async(), timeout)
        return self._state.exception() if self._state.failed else None

    def traceback(self, timeout: float | None = None) -> Any:
        """The remote traceback object of a failed future (``None`` if it succeeded)."""
        exc = self.exception(timeout) if not self._client.asynchronous else None
        if exc is None and self._client.asynchronous and self._state.failed:
            exc = self._state.exception()
        return exc.__traceback__ if exc is not None else None

    def cancel(self) -> Any:
        """Cancel this future and everything that depends on it."""
        return self._client.cancel([self])

    def add_done_callback(self, fn: Callable[[Future], Any]) -> None:
        """Call ``fn(self)`` once done (soon if already done).

        As in dask.distributed, callbacks run one at a time in a callback
        thread, never on the client's event loop: they may block or call
        ``result()``.
        """

        def run() -> None:
            try:
                fn(self)
            except Exception:
                import logging

                logging.getLogger("corral.client").exception("done callback %r failed", fn)

        def call(_: FutureState) -> None:
            _callback_executor().submit(run)

        if not self._state.add_callback(call):
            call(self._state)

    def release(self) -> None:
        """Drop this handle now (the result is freed when no handle is left)."""
        state, self._state = self._state, None  # type: ignore[assignment]
        if state is not None:
            self._client._release(state)

    def __await__(self) -> Any:
        return self._client._result_async(self, None).__await__()

    def __del__(self) -> None:
        try:
            state = self._state
        except AttributeError:
            return
        if state is not None:
            with contextlib.suppress(Exception):  # interpreter shutdown, closed loop
                self._client._release(state)

    def __reduce__(self) -> Any:
        raise TypeError(
            "a Future cannot be pickled; pass it as an argument to submit() and the "
            "task receives its value"
        )

    def __dask_tokenize__(self) -> tuple[str, str]:
        return (type(self).__name__, self.key)

    def __repr__(self) -> str:
        extra = f", type: {self._state.typename}" if self._state.typename else ""
        return f"<Future: {self.status}{extra}, key: {self.key}>"

    def _repr_html_(self) -> str:
        return f"<b>Future: {self.key}</b> status: {self.status}"

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Future) and other.key == self.key
