"""Helpers for the reliability and security tests: certificates, schedulers, worker processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from corral import Scheduler
from corral._loop import LoopThread

sys.path.insert(0, os.path.dirname(__file__))

from _certs import PKI, make_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """A private CA, a certificate it signs (for every node) and a stranger's certificate."""
    return make_pki(str(tmp_path_factory.mktemp("pki")))


def poll(
    predicate: Callable[[], Any], what: str, timeout: float = 30.0, interval: float = 0.05
) -> Any:
    """Wait until ``predicate()`` is truthy; return its value, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class SchedulerThread:
    """A real :class:`Scheduler` on a background event loop in this process."""

    def __init__(self, **kwargs: Any) -> None:
        self.loop_thread = LoopThread(name="test-scheduler")
        kwargs.setdefault("port", 0)
        self.scheduler: Scheduler = self.loop_thread.run(self._start(kwargs))
        self.address = self.scheduler.address

    @staticmethod
    async def _start(kwargs: dict[str, Any]) -> Scheduler:
        return await Scheduler(**kwargs).start()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` on the scheduler's loop (to read its state safely)."""

        async def run() -> Any:
            return fn()

        return self.loop_thread.run(run(), timeout=30)

    def workers(self) -> dict[str, Any]:
        return self.call(
            lambda: {
                a: self.scheduler.state.worker_info(w)
                for a, w in self.scheduler.state.workers.items()
            }
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.loop_thread.run(self.scheduler.close(), timeout=30)
        self.loop_thread.stop()


@contextlib.contextmanager
def scheduler_thread(**kwargs: Any) -> Iterator[SchedulerThread]:
    s = SchedulerThread(**kwargs)
    try:
        yield s
    finally:
        s.close()


def corral_env(token: str | None = None) -> dict[str, str]:
    """This process's environment for a ``corral`` subprocess (tests importable, token set)."""
    env = dict(os.environ)
    env.pop("CORRAL_AUTH_TOKEN", None)
    env.pop("CORRAL_AUTH_TOKEN_FILE", None)
    if token:
        env["CORRAL_AUTH_TOKEN"] = token
    paths = [os.path.dirname(__file__), *[p for p in sys.path if p and os.path.isdir(p)]]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


@contextlib.contextmanager
def corral_process(
    *args: str, token: str | None = None, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m corral ARGS`` as a subprocess, stopped (SIGTERM, then SIGKILL) at the end."""
    proc = subprocess.Popen([sys.executable, "-m", "corral", *args], env=env or corral_env(token))
    try:
        yield proc
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
