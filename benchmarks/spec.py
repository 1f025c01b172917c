"""Plain data types shared by the workloads, the runner and the reports.

Nothing here imports a scheduler: the parent process of the suite uses these
types without ever importing dask or Corral.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

#: Outcome of checking one target: ``met``, ``missed`` or ``n/a``.
Verdict = Literal["met", "missed", "n/a"]

#: Names of the dask backends, in the order used for "best dask".
DASK_BACKENDS: tuple[str, ...] = ("dask", "dask-inf")


class CheckFailed(Exception):
    """A workload computed a wrong result (reported as an error cell)."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`CheckFailed` with ``message`` unless ``condition`` holds.

    Used instead of ``assert`` so that checks survive ``python -O``.
    """
    if not condition:
        raise CheckFailed(message)


def oriented_ratio(corral: float, other: float, higher_is_better: bool) -> float:
    """Return the ratio of ``corral`` to ``other`` oriented so >1 favours Corral."""
    if higher_is_better:
        return corral / other
    return other / corral


@dataclass(frozen=True)
class VsDask:
    """Target on the ratio of Corral to dask (>1 means Corral is better).

    ``min_ratio`` maps a dask backend name (or ``"best"`` for the better of
    the dask backends that ran) to the minimum oriented ratio Corral must
    reach against it.
    """

    min_ratio: Mapping[str, float]
    text: str

    def evaluate(self, values: Mapping[str, float | None], higher_is_better: bool) -> Verdict:
        """Judge Corral's value in ``values`` (backend name -> value or None)."""
        corral = values.get("corral")
        if corral is None or corral <= 0:
            return "n/a"
        for against, minimum in self.min_ratio.items():
            if against == "best":
                other = best_dask(values, higher_is_better)
            else:
                other = values.get(against)
            if other is None or other <= 0:
                return "n/a"
            if oriented_ratio(corral, other, higher_is_better) < minimum:
                return "missed"
        return "met"


@dataclass(frozen=True)
class Absolute:
    """Target on Corral's own value: ``value <= bound`` or ``value >= bound``."""

    op: Literal["<=", ">="]
    bound: float
    text: str

    def evaluate(self, values: Mapping[str, float | None], higher_is_better: bool) -> Verdict:
        """Judge Corral's value in ``values`` (backend name -> value or None)."""
        corral = values.get("corral")
        if corral is None:
            return "n/a"
        ok = corral <= self.bound if self.op == "<=" else corral >= self.bound
        return "met" if ok else "missed"


Target = VsDask | Absolute


def best_dask(values: Mapping[str, float | None], higher_is_better: bool) -> float | None:
    """Return the best value among the dask backends present in ``values``."""
    present = [v for name in DASK_BACKENDS if (v := values.get(name)) is not None and v > 0]
    if not present:
        return None
    return max(present) if higher_is_better else min(present)


@dataclass(frozen=True)
class MetricSpec:
    """Describes one number a workload reports.

    ``compare`` says whether the table shows Corral's ratio against the best
    dask backend for this metric (it is meaningless for e.g. "x of raw TCP").
    ``derived`` marks metrics filled in by the report from other workloads.
    """

    key: str
    label: str
    unit: str
    higher_is_better: bool
    compare: bool = True
    target: Target | None = None
    derived: bool = False


@dataclass
class Context:
    """What a workload function gets: a connected client and run settings."""

    client: Any
    cluster: Any
    backend: str
    quick: bool
    workers: list[str]
    module: Any

    def pick(self, full: int, quick: int) -> int:
        """Return ``quick`` in quick mode, otherwise ``full``."""
        return quick if self.quick else full


@dataclass
class Measurement:
    """Result of one workload run: headline metrics plus free-form details."""

    metrics: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ClusterSpec:
    """How to size the cluster for a workload."""

    n_workers: int = 2
    threads_per_worker: int = 1
    resources: Mapping[str, float] | None = None


@dataclass(frozen=True)
class Workload:
    """A named benchmark: how to run it, what it reports and where it applies.

    ``backends`` limits the backends it runs on (``None`` means all);
    ``timeout_s`` is the per-run subprocess timeout as ``(full, quick)``.
    """

    name: str
    summary: str
    run: Callable[[Context], Measurement]
    metrics: tuple[MetricSpec, ...]
    cluster: ClusterSpec = ClusterSpec()
    backends: tuple[str, ...] | None = None
    timeout_s: tuple[float, float] = (600.0, 45.0)

    def applies_to(self, backend: str) -> bool:
        """Return whether this workload is meant to run on ``backend``."""
        return self.backends is None or backend in self.backends
