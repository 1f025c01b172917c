"""Benchmark suite comparing Corral with dask.distributed.

Run it from the repository root with ``python -m benchmarks`` (see
``benchmarks/README.md``).  Every (backend, workload) pair runs in a fresh
subprocess (:mod:`benchmarks.runone`) so that one backend hanging or crashing
cannot affect another measurement.
"""

from __future__ import annotations

from pathlib import Path

#: Root of the repository (the directory that contains ``benchmarks/``).
REPO_ROOT: Path = Path(__file__).resolve().parent.parent

#: Default directory for ``results.json`` and ``results.png``.
DEFAULT_OUT: Path = REPO_ROOT / "benchmarks" / "results"

__all__ = ["DEFAULT_OUT", "REPO_ROOT"]
