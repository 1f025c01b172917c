"""LocalCluster: a scheduler and workers on this machine (the embedded default)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from typing import Any

import psutil

from .. import config
from .._loop import LoopThread
from ..comm.handshake import connect_with_retry
from ..comm.security import (
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    Security,
    forget_local_token,
    generate_token,
    register_local_token,
)
from ..dashboard.links import advertised_link, without_token
from ..nanny import Slot
from ..protocol.messages import Reply, Request
from ..resources import format_resources as _format_resources
from ..resources import validate_worker_resources
from ..scheduler.server import Scheduler
from ..versions import VERSION_CHECK_MODES
from ..worker.server import Worker


def default_sizing(cores: int | None = None) -> tuple[int, int]:
    """``(n_workers, threads_per_worker)`` for a machine with ``cores`` cores."""
    cores = cores or os.cpu_count() or 1
    if cores <= 4:
        return cores, 1
    n = max(2, int(math.sqrt(cores)))
    while cores % n:
        n -= 1
    return n, cores // n


def format_resources(resources: dict[str, Any]) -> str:
    """``{"GPU": 2, "MEM": 1e9}`` -> ``"GPU=2,MEM=1000000000.0"`` (the CLI's syntax)."""
    return _format_resources(resources)


class LocalCluster:
    """A scheduler and ``n_workers`` workers on this machine.

    With ``processes=True`` (the default) each runs in its own subprocess,
    supervised by the cluster (:mod:`corral.nanny`): a worker that crashes or
    is asked to restart (``client.restart()``, ``client.restart_workers``,
    ``PipInstall(restart_workers=True)``) gets a fresh process under the same
    name.  With ``processes=False`` they run in this process, on a background
    loop, and cannot be restarted.

    Example::

        with LocalCluster(n_workers=2, threads_per_worker=1) as cluster:
            with Client(cluster) as client:
                client.submit(sum, [1, 2]).result()
    """

    def __init__(
        self,
        n_workers: int | None = None,
        threads_per_worker: int | None = None,
        processes: bool = True,
        *,
        host: str = "127.0.0.1",
        scheduler_port: int = 0,
        memory_limit: int | str | None = "auto",
        resources: dict[str, Any] | list[dict[str, Any]] | None = None,
        asynchronous: bool = False,
        token: str | bool | None = None,
        security: Security | None = None,
        startup_timeout: float = 60.0,
        log_level: str = "WARNING",
        preload: str | list[str] | None = None,
        preload_argv: list[str] | None = None,
        worker_preload: str | list[str] | None = None,
        worker_preload_argv: list[str] | None = None,
        dashboard_address: str | bool | None = None,
        version_check: str | None = None,
        **unused: Any,
    ) -> None:
        default_n, default_t = default_sizing()
        if n_workers is None:
            n_workers = (
                default_n
                if threads_per_worker is None
                else max(1, (os.cpu_count() or 1) // threads_per_worker)
            )
        self.n_workers = n_workers
        self.threads_per_worker = threads_per_worker or (default_t if n_workers == default_n else 1)
        self.processes = processes
        self.host = host
        self.scheduler_port = scheduler_port
        if isinstance(resources, list):
            resources = [
                validate_worker_resources(r, f"LocalCluster resources of worker {i}")
                for i, r in enumerate(resources)
            ]
        elif resources is not None:
            resources = validate_worker_resources(resources, "LocalCluster resources")
        self.resources = resources
        if isinstance(resources, list) and len(resources) != n_workers:
            raise ValueError(
                f"resources lists {len(resources)} entries for {n_workers} workers; "
                "give one dict per worker or one dict for all"
            )
        self.memory_limit = _memory_limit(memory_limit, max(1, n_workers))
        self.asynchronous = asynchronous
        # Every connection must know this token: a fresh random one unless given
        # (token=False: none).  ``Client(cluster)`` and, in this process,
        # ``Client(cluster.scheduler_address)`` use it without being told.
        if token is None or token is True:
            token = generate_token()
        self.token: str | None = token or None
        # TLS for every connection (tls:// addresses) when given; docs/security.md.
        self.security = security
        self.startup_timeout = startup_timeout
        self.log_level = log_level
        # Preloads (corral.preload): ``preload`` for the scheduler, ``worker_preload``
        # for every worker; None: $CORRAL_SCHEDULER_PRELOAD / $CORRAL_WORKER_PRELOAD /
        # $CORRAL_PRELOAD.
        self.preload = [preload] if isinstance(preload, str) else preload
        self.preload_argv = list(preload_argv or [])
        if isinstance(worker_preload, str):
            worker_preload = [worker_preload]
        self.worker_preload = worker_preload
        self.worker_preload_argv = list(worker_preload_argv or [])
        # The scheduler's dashboard: "[HOST]:PORT", None: the configuration's (":8787",
        # a busy port falls back to a free one), False: none.  ``cluster.dashboard_link``.
        self.dashboard_address = dashboard_address
        # The scheduler's version check (docs/consistency.md): "warn", "strict",
        # "off"; None: the configuration's (scheduler.version-check).
        if version_check is not None and version_check not in VERSION_CHECK_MODES:
            modes = ", ".join(VERSION_CHECK_MODES)
            raise ValueError(f"version_check must be one of {modes}, got {version_check!r}")
        self.version_check = version_check
        self.dashboard_port: int | None = None
        # How the scheduler says to link to its dashboard ({"https": ..., "token": ...}).
        self._dashboard_description: dict[str, Any] = {}
        self.scheduler_address = ""
        self.status = "created"
        self._tmpdir = tempfile.mkdtemp(prefix="corral-")
        self._scheduler_proc: subprocess.Popen[bytes] | None = None
        self._worker_procs: dict[str, subprocess.Popen[bytes]] = {}
        # Supervision of worker processes (corral.nanny): name -> its slot.
        self._slots: dict[str, Slot] = {}
        self._supervision = {"stopping": False}
        self._watcher: asyncio.Task[None] | None = None
        # Every process started, stopped at interpreter exit if close() never ran.
        self._all_procs: list[subprocess.Popen[bytes]] = []
        weakref.finalize(self, _kill_processes, self._all_procs, 5.0, self._supervision)
        self._scheduler: Scheduler | None = None
        self._workers: dict[str, Worker] = {}
        self._names = iter(range(10**9))
        self._loop_thread: LoopThread | None = None
        if not asynchronous:
            self._loop_thread = LoopThread(name="corral-cluster")
            try:
                self._loop_thread.run(self._start())
            except BaseException:
                self._loop_thread.run(self._close())
                self._loop_thread.stop()
                raise

    # -- lifecycle -----------------------------------------------------------------
    def __await__(self) -> Any:
        return self._start().__await__()

    async def __aenter__(self) -> LocalCluster:
        return await self._start()

    async def __aexit__(self, *exc: Any) -> None:
        await self._close()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    async def _start(self) -> LocalCluster:
        if self.status == "running":
            return self
        if self.processes:
            await self._start_scheduler_process()
        else:
            self._scheduler = await Scheduler(
                host=self.host,
                port=self.scheduler_port,
                token=self.token,
                preload=self.preload,
                preload_argv=self.preload_argv,
                security=self.security,
                dashboard_address=self.dashboard_address,
                version_check=config.get("scheduler.version-check", self.version_check),
            ).start()
            self.scheduler_address = self._scheduler.address
            self.dashboard_port = self._scheduler.services.get("dashboard")
            if self._scheduler.dashboard is not None:
                self._dashboard_description = self._scheduler.dashboard.description()
        register_local_token(self.scheduler_address, self.token)
        self.status = "running"
        if self.processes:
            self._watcher = asyncio.ensure_future(_watch(weakref.ref(self)))
        await self._scale(self.n_workers)
        return self

    async def _start_scheduler_process(self) -> None:
        sched_file = os.path.join(self._tmpdir, "scheduler.json")
        cmd = [
            sys.executable, "-m", "corral", "scheduler",
            "--host", self.host, "--port", str(self.scheduler_port),
            "--scheduler-file", sched_file, "--log-level", self.log_level,
        ]  # fmt: skip
        if self.security is not None:
            cmd += self.security.cli_args()
        if self.dashboard_address is False or self.dashboard_address == "":
            cmd += ["--no-dashboard"]
        elif self.dashboard_address is not None:
            cmd += ["--dashboard-address", str(self.dashboard_address)]
        if self.version_check is not None:
            cmd += ["--version-check", self.version_check]
        cmd += _preload_args(self.preload, self.preload_argv)
        self._scheduler_proc = subprocess.Popen(cmd, env=self._env())
        self._all_procs.append(self._scheduler_proc)
        deadline = time.monotonic() + self.startup_timeout
        while not os.path.exists(sched_file):
            if self._scheduler_proc.poll() is not None:
                raise RuntimeError(
                    f"the scheduler process exited with code {self._scheduler_proc.returncode}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError("the scheduler did not start in time")
            await asyncio.sleep(0.02)
        import json

        with open(sched_file) as f:
            info = json.load(f)
        self.scheduler_address = info["address"]
        self.dashboard_port = info.get("services", {}).get("dashboard")
        self._dashboard_description = info.get("dashboard", {})

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop(TOKEN_FILE_ENV, None)
        if self.token:
            env[TOKEN_ENV] = self.token
        else:
            env.pop(TOKEN_ENV, None)
        # Workers import what this process can import (scripts run from a folder).
        paths = [p for p in sys.path if p and os.path.isdir(p)]
        cwd = os.getcwd()
        if cwd not in paths:
            paths.insert(0, cwd)
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        return env

    def _worker_resources(self, index: int) -> dict[str, Any] | None:
        if isinstance(self.resources, list):
            return self.resources[index] if index < len(self.resources) else None
        return self.resources

    async def _start_worker(self, index: int) -> None:
        name = str(next(self._names))
        resources = self._worker_resources(index)
        if self.processes:
            cmd = [
                sys.executable, "-m", "corral", "worker", self.scheduler_address,
                "--nthreads", str(self.threads_per_worker), "--name", name,
                "--memory-limit", str(self.memory_limit), "--no-nanny",
                "--log-level", self.log_level,
            ]  # fmt: skip
            if resources is not None:  # "" too: explicit, not $CORRAL_WORKER_RESOURCES
                cmd += ["--resources", format_resources(resources)]
            if self.security is not None:
                cmd += self.security.cli_args()
            cmd += _preload_args(self.worker_preload, self.worker_preload_argv)
            slot = self._slots[name] = Slot(cmd, env=self._env(), label=f"{name!r}")
            proc = self._worker_procs[name] = slot.spawn()
            self._all_procs.append(proc)
        else:
            worker = Worker(
                self.scheduler_address,
                nthreads=self.threads_per_worker,
                name=name,
                memory_limit=self.memory_limit,
                resources=resources,
                token=self.token,
                preload=self.worker_preload,
                preload_argv=self.worker_preload_argv,
                security=self.security,
            )
            self._workers[name] = await worker.start()

    def _reap(self) -> None:
        """Restart worker processes that asked for it or crashed (see :mod:`corral.nanny`)."""
        if self._supervision["stopping"]:
            return
        for name, slot in list(self._slots.items()):
            slot.serve_plugins()  # nanny plugins handed over by the worker (corral.nanny)
            proc = self._worker_procs.get(name)
            if proc is None or slot.outcome is not None:
                continue  # stopped, or finished for good (left to _forget_dead_workers)
            if slot.restart_at is None:
                code = proc.poll()
                if code is None or slot.exited(code) != "restart":
                    continue
            if slot.due():
                new = self._worker_procs[name] = slot.spawn()
                self._all_procs.append(new)

    def _restarting(self, name: str) -> bool:
        slot = self._slots.get(name)
        return slot is not None and slot.restart_at is not None

    def _dead_workers(self) -> list[str]:
        """Names of worker processes that exited and will not be restarted."""
        self._reap()
        return [
            name
            for name, p in self._worker_procs.items()
            if p.poll() is not None and not self._restarting(name)
        ]

    def _forget_dead_workers(self) -> None:
        """Drop worker processes that exited for good: scaling replaces them."""
        for name in self._dead_workers():
            del self._worker_procs[name]
            slot = self._slots.pop(name, None)
            if slot is not None:
                slot.cleanup()
        self._all_procs[:] = [p for p in self._all_procs if p.poll() is None]

    async def _scale(self, n: int) -> None:
        self._forget_dead_workers()
        running_before = set(self._worker_procs)
        current = len(self._worker_procs) + len(self._workers)
        if n > current:
            await asyncio.gather(*(self._start_worker(i) for i in range(current, n)))
        elif n < current:
            names = sorted({*self._worker_procs, *self._workers}, key=int)[n:]
            await asyncio.gather(*(self._stop_worker(name) for name in names))
        self.n_workers = n
        await self._wait_for_workers(n, running_before)

    async def _stop_worker(self, name: str) -> None:
        slot = self._slots.pop(name, None)  # not restarted from now on
        proc = self._worker_procs.pop(name, None)
        if proc is not None:
            await _terminate(proc)
        if slot is not None:
            slot.cleanup()
        worker = self._workers.pop(name, None)
        if worker is not None:
            await worker.close()

    async def _wait_for_workers(
        self, n: int, running_before: set[str] | frozenset[str] = frozenset()
    ) -> None:
        conn, _ = await connect_with_retry(
            self.scheduler_address,
            deadline=asyncio.get_running_loop().time() + self.startup_timeout,
            role="client",
            my_id=f"cluster-{os.getpid()}-{id(self)}",
            token=self.token,
            security=self.security,
        )
        try:
            deadline = time.monotonic() + self.startup_timeout
            while True:
                conn.send(Request(id=1, method="scheduler_info"))
                reply = await conn.recv(timeout=self.startup_timeout)
                assert isinstance(reply, Reply)
                have = len(reply.result["workers"])
                dead = self._dead_workers()
                if have == n and not dead:
                    return
                if any(name not in running_before for name in dead):
                    raise RuntimeError(f"worker processes {dead} exited during startup")
                if dead:
                    # Workers that ran before this call died meanwhile (a task killed
                    # them, say): replace them so that ``n`` are running.
                    self._forget_dead_workers()
                    current = len(self._worker_procs) + len(self._workers)
                    await asyncio.gather(*(self._start_worker(i) for i in range(current, n)))
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{have} of {n} workers connected after {self.startup_timeout}s"
                    )
                await asyncio.sleep(0.02)
        finally:
            conn.close()

    def scale(self, n: int) -> Any:
        """Add or remove workers until there are ``n``."""
        if self.asynchronous:
            return self._scale(n)
        assert self._loop_thread is not None
        return self._loop_thread.run(self._scale(n))

    def close(self, timeout: float | None = None) -> Any:
        """Stop the workers and the scheduler."""
        if self.asynchronous:
            return self._close()
        if self._loop_thread is None:
            return None
        try:
            self._loop_thread.run(self._close(), timeout)
        finally:
            self._loop_thread.stop()
            self._loop_thread = None
        return None

    async def _close(self) -> None:
        if self.status == "closed":
            return
        self.status = "closed"
        self._supervision["stopping"] = True
        if self._watcher is not None:
            self._watcher.cancel()
        await asyncio.gather(*(self._stop_worker(n) for n in list(self._worker_procs)))
        await asyncio.gather(*(w.close() for w in self._workers.values()))
        self._workers.clear()
        if self._scheduler_proc is not None:
            await _terminate(self._scheduler_proc)
        if self._scheduler is not None:
            await self._scheduler.close()
        forget_local_token(self.scheduler_address)
        with contextlib.suppress(OSError):
            for f in os.listdir(self._tmpdir):
                os.unlink(os.path.join(self._tmpdir, f))
            os.rmdir(self._tmpdir)

    # -- introspection ---------------------------------------------------------------
    @property
    def workers(self) -> dict[str, Any]:
        """Worker name -> its live process (``processes=True``) or :class:`Worker` object."""
        self._forget_dead_workers()
        return {**self._worker_procs, **self._workers}

    @property
    def scheduler(self) -> Scheduler | None:
        """The in-process scheduler (``processes=False`` only)."""
        return self._scheduler

    @property
    def dashboard_link(self) -> str | None:
        """``http(s)://HOST:PORT/status[?token=...]`` of the scheduler's dashboard (``None``:
        no dashboard); it carries the token (derived from the cluster's) when one is needed."""
        if not self.dashboard_port or not self.scheduler_address:
            return None
        host = self.scheduler_address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        return advertised_link(host, self.dashboard_port, self._dashboard_description, self.token)

    def _worker_specs(self) -> dict[str, dict[str, Any]]:
        """What this cluster asked of each worker (no question to the scheduler)."""
        names = sorted(self.workers, key=lambda n: int(n) if str(n).isdigit() else 0)
        return {
            f"worker {name}": {
                "name": name,
                "nthreads": self.threads_per_worker,
                "memory_limit": self.memory_limit,
                "resources": self._worker_resources(i) or {},
            }
            for i, name in enumerate(names)
        }

    def __repr__(self) -> str:
        from .._repr import format_bytes, format_offer

        kind = "processes" if self.processes else "threads"
        n = len(self.workers)
        parts = [
            repr(self.scheduler_address),
            f"workers={n}",
            f"threads={n * self.threads_per_worker}",
            f"memory={n} x {format_bytes(self.memory_limit)}"
            if self.memory_limit
            else "memory=no limit",
        ]
        if isinstance(self.resources, list):
            parts.append("resources=[" + "; ".join(format_offer(r) for r in self.resources) + "]")
        elif self.resources:
            parts.append(f"resources={format_offer(self.resources)} each")
        parts.append(kind)
        if self.dashboard_link:  # a repr may end up in a log: no token in it
            parts.append(f"dashboard={without_token(self.dashboard_link)}")
        return f"LocalCluster({', '.join(parts)})"

    def _repr_html_(self) -> str:
        from .._repr import cluster_html

        return cluster_html(
            "LocalCluster",
            self.scheduler_address,
            self._worker_specs(),
            self.dashboard_link,
            {"status": self.status, "kind": "processes" if self.processes else "threads"},
        )


def _preload_args(preload: list[str] | None, argv: list[str]) -> list[str]:
    """``--preload`` options for a ``corral`` command, the preloads' own options last."""
    if not preload:
        return []
    return [arg for p in preload for arg in ("--preload", p)] + list(argv)


async def _watch(ref: weakref.ref[LocalCluster], interval: float = 0.1) -> None:
    """Supervise a cluster's worker processes while it runs (holding no strong reference)."""
    while True:
        cluster = ref()
        if cluster is None or cluster.status != "running":
            return
        try:
            cluster._reap()
        except Exception:  # never let supervision die silently
            import logging

            logging.getLogger("corral.deploy").exception("supervising worker processes failed")
        del cluster
        await asyncio.sleep(interval)


def _kill_processes(
    procs: list[subprocess.Popen[bytes]],
    timeout: float = 5.0,
    supervision: dict[str, bool] | None = None,
) -> None:
    """Stop processes still running (a cluster never closed): SIGTERM, then SIGKILL."""
    if supervision is not None:
        supervision["stopping"] = True  # no restarts from here on
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        with contextlib.suppress(OSError):
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in alive:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                p.kill()
                p.wait(1)
    procs.clear()


async def _terminate(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            break
        await asyncio.sleep(0.02)
    with contextlib.suppress(Exception):
        proc.wait(1)


def _memory_limit(limit: int | str | None, n_workers: int) -> int:
    if limit is None or limit == 0:
        return 0
    if limit == "auto":
        return int(psutil.virtual_memory().total / n_workers)
    if isinstance(limit, str):
        return parse_bytes(limit)
    return int(limit)


_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "": 1,
}  # fmt: skip


def parse_bytes(text: str) -> int:
    """``"4GB"`` -> ``4000000000``; ``"512MiB"`` -> ``536870912``; plain numbers are bytes."""
    s = text.strip().lower().replace(" ", "")
    i = len(s)
    while i and s[i - 1].isalpha():
        i -= 1
    number, unit = s[:i], s[i:]
    if unit not in _UNITS:
        raise ValueError(f"unknown size unit {unit!r} in {text!r}")
    try:
        value = float(number) if number else 1.0
    except ValueError:
        raise ValueError(f"cannot read a size from {text!r}") from None
    if value < 0 or math.isnan(value):
        raise ValueError(f"size must be a positive number, got {text!r}")
    return int(value * _UNITS[unit])
