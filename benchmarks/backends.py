"""The schedulers under test and how to start a local cluster on each.

Importing this module imports no scheduler; :meth:`Backend.start` does, so
it must only be called inside a benchmark subprocess, after
:meth:`Backend.environment` has been applied to ``os.environ`` (dask reads its
``DASK_*`` configuration variables at import time).
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from benchmarks import REPO_ROOT
from benchmarks.spec import ClusterSpec

SATURATION_VAR = "DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION"

#: Set for every backend so that NumPy kernels in workers stay single-threaded
#: (dask's nanny does this on its own; Corral may not).
_COMMON_ENV: dict[str, str] = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
}


@dataclass(frozen=True)
class Backend:
    """One scheduler configuration: its module and environment overrides."""

    name: str
    label: str
    module: str
    env: Mapping[str, str] = field(default_factory=dict)
    unset_env: tuple[str, ...] = ()
    cluster_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def environment(self, base: Mapping[str, str]) -> dict[str, str]:
        """Return ``base`` adjusted for this backend's benchmark subprocess.

        The repository root (for ``benchmarks.tasks``) and ``src/`` (for an
        uninstalled ``corral``) go first on ``PYTHONPATH``; cluster workers
        are subprocesses and inherit it.
        """
        env = dict(base)
        for name in self.unset_env:
            env.pop(name, None)
        env.update(_COMMON_ENV)
        env.update(self.env)
        paths = [str(REPO_ROOT), str(REPO_ROOT / "src")]
        existing = env.get("PYTHONPATH")
        if existing:
            paths.extend(p for p in existing.split(os.pathsep) if p and p not in paths)
        env["PYTHONPATH"] = os.pathsep.join(paths)
        return env

    def apply_environment(self) -> None:
        """Apply :meth:`environment` to this process (``os.environ``, ``sys.path``).

        Must run before the backend is imported: dask reads ``DASK_*``
        variables at import time.
        """
        env = self.environment(os.environ)
        for name in set(os.environ) - set(env):
            del os.environ[name]
        os.environ.update(env)
        for path in reversed(env["PYTHONPATH"].split(os.pathsep)):
            if path not in sys.path:
                sys.path.insert(0, path)

    def import_module(self) -> Any:
        """Import and return the backend's top-level module."""
        return importlib.import_module(self.module)

    def start(self, module: Any, spec: ClusterSpec) -> tuple[Any, Any]:
        """Start a ``LocalCluster`` sized by ``spec`` and connect a ``Client``."""
        kwargs: dict[str, Any] = {
            "n_workers": spec.n_workers,
            "threads_per_worker": spec.threads_per_worker,
            "processes": True,
            **self.cluster_kwargs,
        }
        if spec.resources is not None:
            kwargs["resources"] = dict(spec.resources)
        cluster = module.LocalCluster(**kwargs)
        try:
            client = module.Client(cluster)
        except BaseException:
            cluster.close()
            raise
        return cluster, client

    def config_info(self) -> dict[str, Any]:
        """Return backend settings worth recording next to the results."""
        module = self.import_module()
        info: dict[str, Any] = {"version": getattr(module, "__version__", None)}
        if self.module == "distributed":
            import dask

            info["worker_saturation"] = dask.config.get("distributed.scheduler.worker-saturation")
        return info


BACKENDS: dict[str, Backend] = {
    "corral": Backend(
        name="corral",
        label="corral",
        module="corral",
        unset_env=(SATURATION_VAR,),
    ),
    "dask": Backend(
        name="dask",
        label="dask (default)",
        module="distributed",
        unset_env=(SATURATION_VAR,),
        cluster_kwargs={"dashboard_address": None},
    ),
    "dask-inf": Backend(
        name="dask-inf",
        label="dask (saturation=inf)",
        module="distributed",
        env={SATURATION_VAR: "inf"},
        cluster_kwargs={"dashboard_address": None},
    ),
}


def wait_for_workers(client: Any, n_workers: int, timeout: float = 60.0) -> list[str]:
    """Poll ``client.scheduler_info()`` until ``n_workers`` are connected.

    Returns the sorted worker addresses; raises ``TimeoutError`` otherwise.
    """
    deadline = time.monotonic() + timeout
    while True:
        workers = sorted(client.scheduler_info()["workers"])
        if len(workers) >= n_workers:
            return workers
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(workers)} of {n_workers} workers connected")
        time.sleep(0.05)
