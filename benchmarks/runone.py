"""Run one workload on one backend and print one JSON line.

Usage (from the repository root)::

    python -m benchmarks.runone BACKEND WORKLOAD [--quick] [--deadline S] [--startup-deadline S]

The suite (:mod:`benchmarks.runner`) starts this module in a fresh
subprocess per measurement.  Whatever happens, the last line on stdout is a
JSON object with ``status`` ``"ok"`` (and ``metrics``) or ``"error"`` (and
``error``); anything libraries print goes to stderr.  The result is printed
before the cluster is shut down, so a hang during shutdown loses nothing.

With ``--deadline`` (whole run) or ``--startup-deadline`` (import plus
cluster start), a watchdog thread reports which phase (import, cluster
start, workload) was still running when time ran out, dumps every thread's
stack to stderr and exits, so a hung backend yields a useful error.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import os
import sys
import threading
import time
import traceback
from typing import Any, TextIO

from benchmarks.backends import BACKENDS, wait_for_workers
from benchmarks.spec import CheckFailed, Context
from benchmarks.workloads import WORKLOADS

#: Seconds allowed for closing the client and cluster after the result is out.
_CLOSE_TIMEOUT_S = 20.0


class _Progress:
    """The phase the measurement is in, shared with the watchdog thread."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record
        self.phase = "import"
        self.lock = threading.Lock()
        self.emitted = False


def _emit(stream: TextIO, progress: _Progress, record: dict[str, Any]) -> bool:
    """Write ``record`` as one JSON line unless a record was already written."""
    with progress.lock:
        if progress.emitted:
            return False
        progress.emitted = True
        stream.write(json.dumps(record, default=str) + "\n")
        stream.flush()
        return True


def _start_watchdog(
    deadline: float | None, startup_deadline: float | None, stream: TextIO, progress: _Progress
) -> None:
    """Watch the run; on a missed deadline report the phase, dump stacks, exit.

    ``startup_deadline`` applies while importing and starting the cluster,
    ``deadline`` to the whole run (both in seconds from now).
    """
    started = time.monotonic()

    def expired() -> float | None:
        elapsed = time.monotonic() - started
        if deadline is not None and elapsed > deadline:
            return deadline
        in_startup = progress.phase in ("import", "cluster start")
        if in_startup and startup_deadline is not None and elapsed > startup_deadline:
            return startup_deadline
        return None

    def watch() -> None:
        while (limit := expired()) is None:
            time.sleep(0.2)
        record = {k: v for k, v in progress.record.items() if not k.startswith("_")}
        record.update(
            status="error", error=f"timed out after {limit:.0f} s during {progress.phase}"
        )
        if _emit(stream, progress, record):
            sys.stderr.write(f"\n--- watchdog: stacks at {limit:.0f} s ---\n")
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            sys.stderr.flush()
            os._exit(124)

    threading.Thread(target=watch, name="benchmark-watchdog", daemon=True).start()


def _error_text(exc: BaseException) -> str:
    """Return a one-line description of ``exc`` for an error cell."""
    if isinstance(exc, CheckFailed):
        return f"check failed: {exc}"
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def run_one(progress: _Progress, backend_name: str, workload_name: str, quick: bool) -> None:
    """Run the measurement in this process, filling in ``progress.record``.

    On success the record gets ``status="ok"``, ``metrics``, ``info`` and
    ``timings``; on failure ``error`` and ``traceback``.  The client and
    cluster to close afterwards are left in ``record["_cleanup"]``.
    """
    record = progress.record
    backend = BACKENDS[backend_name]
    workload = WORKLOADS[workload_name]
    backend.apply_environment()  # a no-op when started by the runner
    try:
        t0 = time.perf_counter()
        module = backend.import_module()
        record["backend_info"] = backend.config_info()
        t1 = time.perf_counter()
        progress.phase = "cluster start"
        cluster, client = backend.start(module, workload.cluster)
        record["_cleanup"] = (client, cluster)
        workers = wait_for_workers(client, workload.cluster.n_workers)
        t2 = time.perf_counter()
        progress.phase = "workload"
        ctx = Context(
            client=client,
            cluster=cluster,
            backend=backend_name,
            quick=quick,
            workers=workers,
            module=module,
        )
        measurement = workload.run(ctx)
        t3 = time.perf_counter()
    except Exception as exc:
        if progress.phase == "workload":
            record["error"] = _error_text(exc)
        else:
            record["error"] = f"{progress.phase} failed: {_error_text(exc)}"
        record["traceback"] = traceback.format_exc()
        return
    finally:
        progress.phase = "shutdown"
    record.update(
        status="ok",
        metrics=measurement.metrics,
        info=measurement.info,
        timings={"import_s": t1 - t0, "startup_s": t2 - t1, "workload_s": t3 - t2},
    )


def _close_all(objects: tuple[Any, ...]) -> None:
    """Close ``objects`` in order, ignoring errors, within a time limit."""

    def close() -> None:
        for obj in objects:
            with contextlib.suppress(Exception):
                obj.close()

    thread = threading.Thread(target=close, name="benchmark-close", daemon=True)
    thread.start()
    thread.join(_CLOSE_TIMEOUT_S)
    if thread.is_alive():
        sys.stderr.write(f"close() still running after {_CLOSE_TIMEOUT_S:.0f} s; exiting\n")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.runone", description=__doc__)
    parser.add_argument("backend", choices=sorted(BACKENDS))
    parser.add_argument("workload", choices=list(WORKLOADS))
    parser.add_argument("--quick", action="store_true", help="use the small problem sizes")
    parser.add_argument(
        "--deadline", type=float, default=None, help="give up after this many seconds"
    )
    parser.add_argument(
        "--startup-deadline",
        type=float,
        default=None,
        help="give up if import and cluster start take longer than this",
    )
    args = parser.parse_args(argv)

    real_stdout = sys.stdout
    progress = _Progress(
        {"backend": args.backend, "workload": args.workload, "quick": args.quick, "status": "error"}
    )
    if args.deadline is not None or args.startup_deadline is not None:
        _start_watchdog(args.deadline, args.startup_deadline, real_stdout, progress)
    with contextlib.redirect_stdout(sys.stderr):
        run_one(progress, args.backend, args.workload, args.quick)
        record = dict(progress.record)
        cleanup = record.pop("_cleanup", None)
        _emit(real_stdout, progress, record)
        if cleanup is not None:
            _close_all(cleanup)
    # Skip interpreter teardown: leftover scheduler threads must not hang the
    # exit, and the runner reaps whatever this process started anyway.
    sys.stderr.flush()
    os._exit(0 if record["status"] == "ok" else 1)


if __name__ == "__main__":
    raise SystemExit(main())
