"""An asyncio event loop running in a background thread, for synchronous APIs."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's when installed (faster), asyncio's otherwise.

    ``CORRAL_EVENT_LOOP=asyncio`` forces the standard library's loop.
    """
    if os.environ.get("CORRAL_EVENT_LOOP", "").lower() != "asyncio":
        try:
            import uvloop

            return uvloop.new_event_loop()
        except ImportError:
            pass
    return asyncio.new_event_loop()


class LoopThread:
    """Owns an event loop running forever in a daemon thread."""

    def __init__(self, name: str = "corral-loop") -> None:
        self.loop = new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.thread.start()
        self._ready.wait()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result from this (other) thread."""
        if threading.current_thread() is self.thread:
            raise RuntimeError("cannot block on the event loop from its own thread")
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            if fut.done():
                raise  # the coroutine itself raised TimeoutError: keep its message
            fut.cancel()
            raise TimeoutError(f"operation did not finish within {timeout}s") from None

    def stop(self) -> None:
        """Stop the loop and wait for its thread to end."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout=10)
