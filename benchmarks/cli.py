"""Command line of the suite: ``python -m benchmarks [options]``.

Runs every selected (workload, backend) pair in its own subprocess, then
prints the comparison table and writes ``results.json`` and ``results.png``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import DEFAULT_OUT, REPO_ROOT
from benchmarks.backends import BACKENDS
from benchmarks.report import (
    add_derived_metrics,
    build_rows,
    format_table,
    write_json,
    write_png,
)
from benchmarks.runner import run_measurement, skipped
from benchmarks.spec import DASK_BACKENDS, Workload
from benchmarks.workloads import WORKLOADS, size

#: Without ``--full``, dask runs of map_noop_100k expected to take longer
#: than this are skipped (and capped at this plus start-up slack).
DASK_LARGE_MAP_BUDGET_S = 180.0
_STARTUP_SLACK_S = 30.0
#: Limit on import plus cluster start-up per run, as (full, quick) seconds.
STARTUP_TIMEOUT_S = (60.0, 15.0)
#: Consecutive hard failures (see ``_is_hard_failure``) after which the rest
#: of a backend's runs are skipped, unless ``--keep-going`` is given.
MAX_HARD_FAILURES = 2


def _csv(value: str) -> list[str]:
    """Split a comma-separated option value, dropping empty items."""
    return [item.strip() for item in value.split(",") if item.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse and validate the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark Corral against dask.distributed (see benchmarks/README.md).",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small problem sizes; the whole suite takes under 2 minutes",
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help=f"also run dask on map_noop_100k when it would exceed {DASK_LARGE_MAP_BUDGET_S:.0f} s",
    )
    parser.add_argument(
        "--backends",
        type=_csv,
        default=list(BACKENDS),
        help=f"comma-separated subset of {','.join(BACKENDS)} (default: all)",
    )
    parser.add_argument(
        "--only",
        type=_csv,
        default=None,
        metavar="NAME,...",
        help=f"comma-separated workloads: {','.join(WORKLOADS)}",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="output directory (default: benchmarks/results/)",
    )
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help=f"keep running a backend after {MAX_HARD_FAILURES} consecutive hard failures "
        "(import/start failure, timeout, crash)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="per-measurement timeout (default: per workload)",
    )
    args = parser.parse_args(argv)
    unknown = [b for b in args.backends if b not in BACKENDS]
    if unknown or not args.backends:
        parser.error(f"unknown backend(s) {unknown}; choose from {','.join(BACKENDS)}")
    if args.only is not None:
        unknown = [w for w in args.only if w not in WORKLOADS]
        if unknown or not args.only:
            parser.error(f"unknown workload(s) {unknown}; choose from {','.join(WORKLOADS)}")
    return args


def _timeout_for(workload: Workload, args: argparse.Namespace) -> float:
    """Return the subprocess timeout for one measurement of ``workload``."""
    if args.timeout is not None:
        return float(args.timeout)
    full, quick = workload.timeout_s
    return quick if args.quick else full


def _large_map_skip_reason(
    backend: str, records: dict[tuple[str, str], dict[str, Any]], quick: bool
) -> str | None:
    """Return why dask's map_noop_100k is skipped, or None to run it.

    The duration is estimated from the same backend's ``map_noop``
    throughput measured earlier in this run.
    """
    prior = records.get((backend, "map_noop"))
    if not prior or prior.get("status") != "ok":
        return None
    tasks_per_s = prior["metrics"].get("tasks_per_s") or 0.0
    if tasks_per_s <= 0:
        return None
    estimate = size("map_noop_100k", quick) / tasks_per_s
    if estimate > DASK_LARGE_MAP_BUDGET_S:
        return f"skipped: est. {estimate:.0f} s > {DASK_LARGE_MAP_BUDGET_S:.0f} s (use --full)"
    return None


def _is_hard_failure(record: dict[str, Any]) -> bool:
    """Return whether a failed run says the backend itself is broken.

    Import and cluster-start failures, timeouts and crashes count; a failed
    check or an exception inside one workload does not.
    """
    if record.get("status") != "error":
        return False
    error = str(record.get("error", ""))
    return error.startswith(("import failed", "cluster start failed", "crashed", "timed out"))


def _git_commit() -> str | None:
    """Return the repository's HEAD commit, if there is one."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _load_average() -> float | None:
    """Return the 1-minute load average, if the platform has one."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _busy_warning(load_before: float | None) -> str | None:
    """Return a warning if the machine was already busy when the suite started."""
    cpus = os.cpu_count() or 1
    if load_before is not None and load_before > cpus * 0.5:
        return (
            f"warning: load average was {load_before:.1f} on {cpus} CPUs before the suite "
            "started; other processes were probably competing for the CPUs, so these "
            "timings are unreliable"
        )
    return None


def _log(message: str) -> None:
    """Print a progress line to stderr."""
    print(message, file=sys.stderr, flush=True)


def run_suite(args: argparse.Namespace) -> dict[tuple[str, str], dict[str, Any]]:
    """Run every selected measurement and return the records by (backend, workload)."""
    workloads = [w for name, w in WORKLOADS.items() if args.only is None or name in args.only]
    backends = [b for b in BACKENDS if b in args.backends]
    pairs = [(w, b) for w in workloads for b in backends if w.applies_to(b)]
    records: dict[tuple[str, str], dict[str, Any]] = {}
    strikes: dict[str, int] = dict.fromkeys(backends, 0)
    last_error: dict[str, str] = {}
    for i, (workload, backend) in enumerate(pairs, 1):
        timeout = _timeout_for(workload, args)
        startup_timeout = min(timeout, STARTUP_TIMEOUT_S[1 if args.quick else 0])
        reason = None
        if not args.keep_going and strikes[backend] >= MAX_HARD_FAILURES:
            reason = f"skipped, earlier runs failed ({last_error[backend]})"
        elif workload.name == "map_noop_100k" and backend in DASK_BACKENDS and not args.full:
            reason = _large_map_skip_reason(backend, records, args.quick)
            if args.timeout is None:
                timeout = min(timeout, DASK_LARGE_MAP_BUDGET_S + _STARTUP_SLACK_S)
        prefix = f"[{i:2d}/{len(pairs)}] {backend:<8} {workload.name:<14}"
        if reason is not None:
            record = skipped(backend, workload.name, args.quick, reason)
        else:
            _log(f"{prefix} running (timeout {timeout:.0f} s)")
            record = run_measurement(
                backend, workload.name, args.quick, timeout, startup_timeout=startup_timeout
            )
        status = record["status"]
        detail = f" - {record.get('error')}" if status != "ok" else ""
        _log(f"{prefix} {status} in {record['elapsed_s']:.1f} s{detail}")
        records[(backend, workload.name)] = record
        if _is_hard_failure(record):
            error = str(record["error"])
            last_error[backend] = error
            # An import error will not go away: give up on the backend at once.
            strikes[backend] += MAX_HARD_FAILURES if error.startswith("import") else 1
        elif record["status"] != "skipped":
            strikes[backend] = 0
    return records


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite; print the table; write results.json and results.png."""
    args = parse_args(argv)
    started = time.perf_counter()
    load_before = _load_average()
    records = run_suite(args)
    add_derived_metrics(records)
    workloads = [w for name, w in WORKLOADS.items() if args.only is None or name in args.only]
    rows = build_rows(workloads, records, args.backends)
    elapsed = time.perf_counter() - started

    mode = "quick" if args.quick else "full"
    meta = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "mode": mode,
        "full": args.full,
        "backends": args.backends,
        "workloads": [w.name for w in workloads],
        "sizes": {w.name: size(w.name, args.quick) for w in workloads},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "git_commit": _git_commit(),
        "suite_elapsed_s": elapsed,
        "load_average_before": load_before,
        "load_average_after": _load_average(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "results.json"
    png_path = args.out / "results.png"
    write_json(json_path, meta, records.values(), rows)
    written = [str(json_path)]
    try:
        write_png(png_path, rows, f"Corral vs dask.distributed ({mode}, 2 workers)")
        written.append(str(png_path))
    except Exception as exc:  # a missing matplotlib must not lose the table
        _log(f"could not write {png_path}: {type(exc).__name__}: {exc}")

    print(format_table(rows))
    print()
    print(f"suite took {elapsed:.0f} s; wrote {' and '.join(written)}")
    busy = _busy_warning(load_before)
    if busy:
        print(busy)
    return 0
