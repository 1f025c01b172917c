"""Helpers shared by the consistency tests (real schedulers and worker processes)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from corral.versions import FAKE_VERSIONS_ENV

FAKE_NUMPY = '{"numpy": "0.0.1"}'


def poll(predicate, what, timeout=60.0, interval=0.05):
    """Call ``predicate`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(interval)


def worker_pids(client):
    """``{address: pid}`` of the connected workers."""
    return {a: w["pid"] for a, w in client.scheduler_info()["workers"].items()}


def worker_names(client):
    """``{name: address}`` of the connected workers."""
    return {str(w["name"]): a for a, w in client.scheduler_info()["workers"].items()}


def corral_env(token=None, fake=None, **extra):
    """The environment for a ``python -m corral`` child: this process's, plus test settings."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    env.pop(FAKE_VERSIONS_ENV, None)
    env.pop("CORRAL_AUTH_TOKEN_FILE", None)
    if token:
        env["CORRAL_AUTH_TOKEN"] = token
    else:
        env.pop("CORRAL_AUTH_TOKEN", None)
    if fake is not None:
        env[FAKE_VERSIONS_ENV] = fake
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    return env


class Corral:
    """A ``python -m corral ...`` child, its output in a file; ``stop`` kills its process group."""

    def __init__(self, log_path, *args, env=None):
        self.log = log_path
        self._out = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "corral", *args],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    @property
    def pid(self):
        return self.proc.pid

    def output(self):
        return self.log.read_text(errors="replace")

    def wait(self, timeout=60):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running after {timeout}s; output:\n{self.output()}")

    def terminate(self, timeout=30):
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def stop(self):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._out.close()
