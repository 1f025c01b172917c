"""Running tasks: a small thread pool and the code that runs one task.

The pool hands finished work back to the event loop in batches: a thread
wakes the loop only if no wake-up is already pending, so a burst of short
tasks costs one loop wake-up instead of one per task.  A lone result (no
other job queued) may first be reported by the thread itself (``report``),
so the loop's wake-up is not on the way to whoever waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
import traceback
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from typing import Any

import tblib.pickling_support

from ..protocol.messages import ComputeTask, ErrorInfo
from ..protocol.serialize import (
    Payload,
    Ref,
    deserialize,
    resolving_functions,
    serialize,
    sizeof,
)
from .state import ExecuteFailure, ExecuteSuccess

logger = logging.getLogger("corral.worker")

tblib.pickling_support.install()

#: Results at most this large travel to the client with the completion notice.
INLINE_RESULT_BYTES = 64 * 1024

_context = threading.local()


def current_worker() -> Any:
    """The worker whose thread is running this code, or ``None``."""
    return getattr(_context, "worker", None)


def current_task_key() -> str | None:
    """The key of the task running in this thread, or ``None``."""
    return getattr(_context, "key", None)


def current_task_resources() -> dict[str, Any] | None:
    """What the task running in this thread holds (indices or amounts), or ``None``."""
    return getattr(_context, "resources", None)


class ThreadPool:
    """``nthreads`` threads running jobs; results come back to the loop in batches."""

    def __init__(
        self,
        nthreads: int,
        loop: asyncio.AbstractEventLoop,
        on_done: Callable[[list[Any]], None],
        worker: Any = None,
        name: str = "corral-task",
        report: Callable[[Any], Any] | None = None,
    ) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], Any] | None] = queue.SimpleQueue()
        self._done: deque[Any] = deque()
        self._lock = threading.Lock()
        self._wake_pending = False
        self._loop = loop
        self._on_done = on_done
        # Called on the task thread with a lone job's result (nothing else queued,
        # so nothing to batch it with); returns what to hand to ``on_done``.
        self._report = report
        self._threads = [
            threading.Thread(target=self._main, args=(worker,), name=f"{name}-{i}", daemon=True)
            for i in range(nthreads)
        ]
        for t in self._threads:
            t.start()

    def submit(self, job: Callable[[], Any]) -> None:
        """Run ``job()`` on a free thread; its return value goes to ``on_done``."""
        self._jobs.put(job)

    def _main(self, worker: Any) -> None:
        _context.worker = worker
        while True:
            job = self._jobs.get()
            if job is None:
                return
            result = job()
            with self._lock:
                # Under the lock: once the loop can see the result (drain), any
                # report of it has been written, and nothing the loop sends
                # after handling it can overtake that report.
                if self._report is not None and self._jobs.empty():
                    result = self._report(result)
                self._done.append(result)
                wake = not self._wake_pending
                self._wake_pending = True
            # Drop our references now: an idle thread (a paused worker's, say)
            # must not keep its last job's arguments and result alive.
            job = result = None
            if wake:
                try:
                    self._loop.call_soon_threadsafe(self._drain)
                except RuntimeError:  # the loop is closed: the worker is gone
                    return

    def drain(self) -> None:
        """Hand finished jobs to ``on_done`` now (on the loop), without waiting for the wake-up.

        The worker calls it before handling any message, so a reply to a
        result a thread reported itself never finds that result unknown.
        """
        if self._done:  # one appended after this look wakes the loop itself
            self._drain()

    def _drain(self) -> None:
        with self._lock:
            batch = list(self._done)
            self._done.clear()
            self._wake_pending = False
        if batch:
            self._on_done(batch)

    def shutdown(self) -> None:
        """Let the threads exit once their current job ends."""
        for _ in self._threads:
            self._jobs.put(None)


class FunctionCache:
    """Deserialized task functions by id, most recently used kept."""

    def __init__(self, size: int = 512) -> None:
        self.payloads: dict[str, Payload] = {}
        self._loaded: OrderedDict[str, Any] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def add(self, functions: Mapping[str, Payload]) -> None:
        """Remember payloads sent with a compute batch."""
        self.payloads.update(functions)

    def get(self, fid: str) -> Any:
        """Return the callable for ``fid``, deserializing it on first use."""
        fn = self._loaded.get(fid)
        if fn is not None:
            # Single C calls are atomic: no lock for the common case.
            with contextlib.suppress(KeyError):  # dropped by another thread just now
                self._loaded.move_to_end(fid)
            return fn
        payload = self.payloads.get(fid)
        if payload is None:
            raise KeyError(f"function {fid} was not sent to this worker")
        fn = deserialize(payload)
        with self._lock:
            self._loaded[fid] = fn
            if len(self._loaded) > self._size:
                self._loaded.popitem(last=False)
        return fn

    def trim(self) -> None:
        """Forget payloads when nothing is queued (they come again with new tasks)."""
        self.payloads.clear()


def substitute(obj: Any, data: Mapping[str, Any]) -> Any:
    """Replace every :class:`Ref` inside lists, tuples, dicts and sets by its value."""
    kind = type(obj)
    if kind is Ref:
        return data[obj.key]
    if kind is tuple or kind is list:
        return kind(substitute(o, data) for o in obj)
    if kind is dict:
        return {k: substitute(v, data) for k, v in obj.items()}
    if kind is set or kind is frozenset:
        return kind(substitute(o, data) for o in obj)
    return obj


def error_info(exc: BaseException, tb_text: str | None = None) -> ErrorInfo:
    """Describe an exception for the wire, pickling it (and its traceback) if possible."""
    text = tb_text if tb_text is not None else "".join(traceback.format_exception(exc))
    exception = traceback_payload = None
    try:
        exception = serialize(exc)
        # the worker's own frames (this module) are noise to the user
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
            tb = tb.tb_next
        if tb is not None:
            traceback_payload = serialize(tb)
    except Exception:
        exception = None
    return ErrorInfo(
        typename=type(exc).__name__,
        message=str(exc),
        traceback_text=text,
        exception=exception,
        traceback=traceback_payload,
    )


def run_task(
    spec: ComputeTask,
    functions: FunctionCache,
    data: Mapping[str, Any],
    resources: dict[str, Any] | None = None,
) -> tuple[ExecuteSuccess | ExecuteFailure, Any]:
    """Run one task in the calling thread; return the event and the value.

    ``resources``: what the task holds (indices of indexed resources, amounts
    of the others), exposed to it by :func:`corral.get_task_resources`.
    """
    start = time.time()
    _context.key = spec.key
    _context.resources = resources if resources is not None else {}
    try:
        if spec.fn is None:
            raise ValueError(f"task {spec.key!r} names no function")
        try:
            fn = functions.get(spec.fn)
        except Exception as exc:
            raise type(exc)(f"could not load the function of task {spec.key!r}: {exc}") from exc
        if spec.needs:  # the arguments refer to functions shipped with the batch
            with resolving_functions(functions.get):
                args, kwargs = deserialize(spec.args)
        else:
            args, kwargs = deserialize(spec.args)
        if spec.who_has:
            args = substitute(args, data)
            kwargs = substitute(kwargs, data)
        value = fn(*args, **kwargs)
        stop = time.time()
        result = None
        nbytes = sizeof(value)
        # Only results that look small are serialized here (to travel inline);
        # a large one is fetched by the client later, so it is not copied twice.
        if spec.send_result and nbytes <= INLINE_RESULT_BYTES:
            try:
                payload = serialize(value)
            except Exception as exc:
                raise TypeError(
                    f"the result of task {spec.key!r} (type {type(value).__name__}) "
                    f"cannot be serialized: {exc}"
                ) from exc
            if payload.nbytes <= INLINE_RESULT_BYTES:
                result = payload
        return (
            ExecuteSuccess(
                key=spec.key,
                run_id=spec.run_id,
                nbytes=nbytes,
                typename=type(value).__name__,
                start=start,
                stop=stop,
                result=result,
            ),
            value,
        )
    except BaseException as exc:
        return (
            ExecuteFailure(
                key=spec.key,
                run_id=spec.run_id,
                error=error_info(exc),
                start=start,
                stop=time.time(),
            ),
            None,
        )
    finally:
        _context.key = None
        _context.resources = None
