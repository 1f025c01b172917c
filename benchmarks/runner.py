"""Run one (backend, workload) measurement in a fresh subprocess.

The child is ``python -m benchmarks.runone``; it runs in a session of its
own so that, on timeout or after it exits, every process it started
(scheduler, workers, nannies) can be found and killed.  Any failure,
hang, crash or unparsable output becomes an ``"error"`` record; nothing here
raises for a misbehaving backend.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks import REPO_ROOT
from benchmarks.backends import BACKENDS

#: Extra seconds the runner waits past the child's own ``--deadline``.
_GRACE_S = 15.0


def _kill_session(sid: int) -> None:
    """SIGKILL every process in session ``sid`` (the child and what it started).

    The child is started as a session leader, so its cluster processes stay
    in its session even if they move to process groups of their own or are
    orphaned; nothing outside that session is touched.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(sid, signal.SIGKILL)
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
            if pid != os.getpid() and os.getsid(pid) == sid:
                os.kill(pid, signal.SIGKILL)


def _last_json_line(stdout: str) -> dict[str, Any] | None:
    """Return the last line of ``stdout`` that parses as a JSON object."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _signal_name(number: int) -> str:
    """Return e.g. ``"SIGSEGV"`` for a signal number."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _tail(text: str, lines: int = 60) -> str:
    """Return the last ``lines`` lines of ``text``."""
    return "\n".join(text.splitlines()[-lines:])


def run_measurement(
    backend: str,
    workload: str,
    quick: bool,
    timeout: float,
    startup_timeout: float | None = None,
) -> dict[str, Any]:
    """Run ``benchmarks.runone`` for one pair and return its result record.

    ``timeout`` bounds the whole run and ``startup_timeout`` the import and
    cluster start-up (both enforced by the child's watchdog, with the runner
    killing it ``_GRACE_S`` later as a backstop).  The record always has
    ``backend``, ``workload``, ``status`` (``"ok"`` or ``"error"``),
    ``elapsed_s`` (subprocess wall time) and, on error, a short ``error``
    string plus ``stderr_tail``.
    """
    cmd = [sys.executable, "-m", "benchmarks.runone", backend, workload]
    cmd += ["--deadline", f"{timeout:g}"]
    if startup_timeout is not None:
        cmd += ["--startup-deadline", f"{startup_timeout:g}"]
    if quick:
        cmd.append("--quick")
    env = BACKENDS[backend].environment(os.environ)
    start = time.perf_counter()
    timed_out = False
    # Output goes to files, not pipes: cluster processes may inherit the
    # descriptors and outlive the child, and a pipe would then never reach EOF.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        try:
            proc = subprocess.Popen(
                cmd,
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                text=True,
                start_new_session=True,
            )
        except OSError as exc:
            return {
                "backend": backend,
                "workload": workload,
                "quick": quick,
                "status": "error",
                "error": f"could not start subprocess: {exc}",
                "elapsed_s": 0.0,
            }
        try:
            proc.wait(timeout=timeout + _GRACE_S)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_session(proc.pid)  # the child if it hung, and what it left behind
            proc.wait()
        elapsed = time.perf_counter() - start
        out.seek(0)
        stdout = out.read()
        err.seek(0)
        stderr = err.read()

    record = _last_json_line(stdout)
    if record is None:
        if timed_out:
            reason = f"timed out after {timeout + _GRACE_S:.0f} s (watchdog did not fire)"
        elif proc.returncode and proc.returncode < 0:
            reason = f"crashed ({_signal_name(-proc.returncode)})"
        else:
            reason = f"no result (exit code {proc.returncode})"
        record = {
            "backend": backend,
            "workload": workload,
            "quick": quick,
            "status": "error",
            "error": reason,
        }
    elif timed_out:
        record.setdefault("notes", []).append("shutdown hung; the process was killed")
    record["elapsed_s"] = elapsed
    record["returncode"] = proc.returncode
    if record.get("status") != "ok":
        record["stderr_tail"] = _tail(stderr)
    return record


def skipped(backend: str, workload: str, quick: bool, reason: str) -> dict[str, Any]:
    """Return a record for a measurement that was deliberately not run."""
    return {
        "backend": backend,
        "workload": workload,
        "quick": quick,
        "status": "skipped",
        "error": reason,
        "elapsed_s": 0.0,
    }
