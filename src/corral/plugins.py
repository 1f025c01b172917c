"""Plugins: code that runs around the life of workers and of the scheduler.

Three kinds, with dask.distributed's names and hook signatures so that existing
plugins work unchanged:

* :class:`WorkerPlugin`: registered with ``client.register_plugin(plugin)``.
  It travels by value (cloudpickle, so classes defined in ``__main__`` work),
  is kept on the scheduler as opaque bytes, and is set up on every current
  worker and on every worker that joins later.
* :class:`NannyPlugin`: registered the same way; set up in the supervisor
  (nanny) of every current and future supervised worker, in the
  supervisor's process (:mod:`corral.nanny`); :class:`Environ` sets
  environment variables of the worker processes that way.
* :class:`SchedulerPlugin`: added with ``scheduler.add_plugin(plugin)`` (from a
  preload) or sent with ``client.register_plugin(plugin)``; its hooks see
  workers and clients come and go, graphs arrive and tasks change state.

Where hooks run
---------------
Every hook runs on the event loop thread of its service (the worker's or the
scheduler's), never in a task thread.  A hook may be a plain function or a
coroutine function:

* ``WorkerPlugin.setup`` / ``teardown`` and ``SchedulerPlugin.start`` /
  ``close`` are awaited: messages the scheduler sends to a worker after a
  plugin's setup started are handled once it finished.
* Event hooks (``transition``, ``add_worker``, ``update_graph``, ...) are called
  as the event happens; a coroutine they return runs as a background task.
  They must be quick: the engine waits for them.  Each batch of hook calls is
  timed and a warning is logged when one plugin takes longer than
  :data:`SLOW_HOOK_SECONDS`.
* An exception in an event hook is logged (with its traceback the 1st, 2nd,
  4th, 8th, ... time) and recorded in the scheduler's ``"plugins"`` event
  topic; it never stops the engine.

Example::

    from corral import Client, WorkerPlugin

    class Counter(WorkerPlugin):
        name = "counter"

        def setup(self, worker):
            self.finished = 0

        def transition(self, key, start, finish, **kwargs):
            if finish == "memory":
                self.finished += 1

    client = Client()
    client.register_plugin(Counter())
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from .protocol.messages import Outcome
from .protocol.serialize import Payload, deserialize, serialize

__all__ = [
    "SLOW_HOOK_SECONDS",
    "Environ",
    "NannyPlugin",
    "PipInstall",
    "PipInstallError",
    "SchedulerPlugin",
    "SchedulerUploadFile",
    "UploadFile",
    "WorkerPlugin",
]

_log = logging.getLogger("corral.plugins")

#: A plugin whose hooks hold the event loop longer than this in one go is reported.
SLOW_HOOK_SECONDS = 0.1

#: At most one slow-hook warning per plugin and hook in this many seconds.
_SLOW_WARNING_INTERVAL = 10.0


class WorkerPlugin:
    """Base class of worker plugins; every method is optional.

    Give the plugin a ``name`` attribute to make registrations replace each
    other (without one, each registration gets a fresh name).  With
    ``idempotent = True``, registering a name that is already registered keeps
    the first plugin and does nothing.

    Example::

        class Tracer(WorkerPlugin):
            name = "tracer"

            def setup(self, worker):
                self.worker = worker

            def transition(self, key, start, finish, **kwargs):
                print(self.worker.address, key, start, "->", finish)
    """

    idempotent: bool = False

    def setup(self, worker: Any) -> Any:
        """Run when the plugin is registered on ``worker`` or ``worker`` joins."""

    def teardown(self, worker: Any) -> Any:
        """Run when the plugin is unregistered or replaced, or the worker closes."""

    def transition(self, key: str, start: str, finish: str, **kwargs: Any) -> None:
        """A task of this worker moved from state ``start`` to state ``finish``.

        Worker task states: ``released``, ``waiting``, ``ready``,
        ``constrained``, ``executing``, ``memory``, ``error``, ``fetch``,
        ``flight``, ``missing``, ``cancelled``, ``forgotten``.
        """


class NannyPlugin:
    """Base class of nanny plugins: they run in each worker's supervisor; every method is optional.

    Registered with ``client.register_plugin(plugin)``, like a worker plugin,
    and set up in the supervisor (nanny) of every current supervised worker
    and of every supervised worker that joins later.  The ``nanny`` passed to
    the hooks is the supervisor's :class:`~corral.nanny.Slot` for that worker:
    ``nanny.env`` is the environment the next worker process starts with.
    With ``restart = True`` the worker process is restarted after ``setup``,
    so what the plugin changed is in place when the worker starts.  Workers
    without a supervisor (``--no-nanny``, ``LocalCluster(processes=False)``)
    have no nanny: registration reports ``{"status": "no-nanny"}`` for them.

    ``name`` and ``idempotent`` work as for :class:`WorkerPlugin`; nanny
    plugins have names of their own (``client.unregister_worker_plugin(name,
    nanny=True)`` removes one).

    Example::

        class Limits(NannyPlugin):
            name = "limits"
            restart = True

            def setup(self, nanny):
                nanny.env["OMP_NUM_THREADS"] = "1"
    """

    idempotent: bool = False
    #: Restart the worker process after ``setup`` (the first time, per supervisor).
    restart: bool = False

    def setup(self, nanny: Any) -> Any:
        """Run in the supervisor when the plugin is registered or its worker joins."""

    def teardown(self, nanny: Any) -> Any:
        """Run in the supervisor when the plugin is unregistered or replaced, or it stops."""


class Environ(NannyPlugin):
    """A nanny plugin setting environment variables of the worker processes (restarts them).

    Values are turned into strings.  The variables are in place for every
    process the supervisor starts from then on; unregistering the plugin does
    not take them back (as in dask.distributed).

    Example::

        client.register_plugin(Environ({"MY_SETTING": "1"}))
    """

    restart = True

    def __init__(self, environ: dict[str, Any] | None = None) -> None:
        environ = environ or {}
        if not isinstance(environ, dict):
            raise TypeError(f"Environ takes a dict of variables, not {type(environ).__name__}")
        self.environ = {str(k): str(v) for k, v in environ.items()}

    def setup(self, nanny: Any) -> None:
        """Add the variables to the environment of ``nanny``'s next worker process."""
        nanny.env.update(self.environ)


class SchedulerPlugin:
    """Base class of scheduler plugins; every method is optional.

    Keyword arguments follow dask.distributed's, so hooks written for it
    work here (accept ``**kwargs`` to stay compatible with new arguments).

    Example::

        class Joins(SchedulerPlugin):
            def add_worker(self, scheduler=None, worker=None, **kwargs):
                print("Added a new worker at:", worker)
    """

    idempotent: bool = False

    async def start(self, scheduler: Any) -> None:
        """The scheduler started (or the plugin was registered on a running one)."""

    async def before_close(self) -> None:
        """The scheduler is about to close."""

    async def close(self) -> None:
        """The scheduler closed, or the plugin was unregistered."""

    def update_graph(
        self,
        scheduler: Any,
        *,
        client: str,
        keys: set[str],
        tasks: list[str],
        annotations: dict[str, Any],
        priority: dict[str, Any],
        dependencies: dict[str, list[str]],
        stimulus_id: str,
        **kwargs: Any,
    ) -> None:
        """A client submitted tasks: ``tasks`` (keys), of which it wants ``keys``."""

    def restart(self, scheduler: Any) -> None:
        """The cluster restarted."""

    def transition(
        self, key: str, start: str, finish: str, *args: Any, stimulus_id: str, **kwargs: Any
    ) -> None:
        """Task ``key`` moved from ``start`` to ``finish`` on the scheduler."""

    def add_worker(self, scheduler: Any, worker: str) -> None:
        """A worker joined; ``worker`` is its address."""

    def remove_worker(
        self, scheduler: Any, worker: str, *, stimulus_id: str, **kwargs: Any
    ) -> None:
        """A worker left; ``worker`` is its address."""

    def add_client(self, scheduler: Any, client: str) -> None:
        """A client connected; ``client`` is its id."""

    def remove_client(self, scheduler: Any, client: str) -> None:
        """A client disconnected."""

    def log_event(self, topic: str, msg: Any) -> None:
        """An event was recorded on the scheduler (see ``Client.get_events``)."""


#: Hooks of scheduler plugins called from scheduler events.
SCHEDULER_HOOKS = (
    "update_graph",
    "transition",
    "add_worker",
    "remove_worker",
    "add_client",
    "remove_client",
    "log_event",
    "restart",
)


def plugin_name(plugin: Any, name: str | None = None) -> str:
    """The name a plugin is registered under: ``name``, its ``name`` attribute, or a fresh one."""
    if name is not None:
        return str(name)
    own = getattr(plugin, "name", None)
    if isinstance(own, str) and own:
        return own
    return f"{type(plugin).__name__}-{uuid.uuid4()}"


def implemented_hooks(plugin: Any, base: type, names: Iterable[str]) -> set[str]:
    """The hooks ``plugin`` really implements (the base class's no-ops left out)."""
    out = set()
    for name in names:
        attr = getattr(plugin, name, None)
        if not callable(attr):
            continue
        if getattr(attr, "__func__", None) is getattr(base, name, None):
            continue
        out.add(name)
    return out


def with_service(
    fn: Callable[..., Any], kwargs: dict[str, Any], names: tuple[str, ...], service: Any
) -> dict[str, Any]:
    """Add ``service`` to ``kwargs`` under each of ``names`` that ``fn`` takes as a parameter.

    ``client.run(f)`` gives the worker to ``f(dask_worker)`` or
    ``f(corral_worker)``; ``run_on_scheduler`` the scheduler to
    ``dask_scheduler`` / ``corral_scheduler``.
    """
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return kwargs
    wanted = [n for n in names if n in params]
    if not wanted:
        return kwargs
    return {**kwargs, **dict.fromkeys(wanted, service)}


class HookRunner:
    """Calls plugin hooks for a service: errors logged, slow hooks reported.

    ``on_error(plugin_name, hook, exc)`` is told about every failure (the
    scheduler records them as events); logging is thinned out to the 1st,
    2nd, 4th, 8th, ... failure of a hook so a hook failing on every task does
    not flood the log.
    """

    def __init__(
        self,
        logger: logging.Logger,
        on_error: Callable[[str, str, BaseException], None] | None = None,
        slow: float | None = None,
    ) -> None:
        self.logger = logger
        self.on_error = on_error
        self.slow = SLOW_HOOK_SECONDS if slow is None else slow
        self.failures: dict[tuple[str, str], int] = {}
        self._slow_warned: dict[tuple[str, str], float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def failed(self, name: str, hook: str, exc: BaseException) -> None:
        """Log (thinned out) and report a failure of ``hook`` of plugin ``name``."""
        n = self.failures.get((name, hook), 0) + 1
        self.failures[(name, hook)] = n
        if n & (n - 1) == 0:  # 1, 2, 4, 8, ...
            self.logger.error(
                "plugin %r: %s failed (failure %d of this hook)",
                name,
                hook,
                n,
                exc_info=(type(exc), exc, exc.__traceback__),
            )
        if self.on_error is not None:
            try:
                self.on_error(name, hook, exc)
            except Exception:
                self.logger.exception("recording the failure of plugin %r failed", name)

    def call(self, name: str, hook: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Call one event hook: errors logged; a returned coroutine runs as a task."""
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            self.failed(name, hook, exc)
            return
        if inspect.isawaitable(result):
            self.background(name, hook, result)

    def background(self, name: str, hook: str, awaitable: Any) -> None:
        """Run an awaitable a hook returned as a task; its failure is reported too."""

        async def run() -> None:
            try:
                await awaitable
            except Exception as exc:
                self.failed(name, hook, exc)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def timed(self, name: str, hook: str, started: float, calls: int) -> None:
        """Warn when hooks of one plugin held the loop for too long (``started``: perf_counter)."""
        took = time.perf_counter() - started
        if took < self.slow:
            return
        now = time.monotonic()
        last = self._slow_warned.get((name, hook))
        if last is not None and now - last < _SLOW_WARNING_INTERVAL:
            return
        self._slow_warned[(name, hook)] = now
        self.logger.warning(
            "plugin %r: %d %s hook call(s) held the event loop for %.3fs "
            "(more than %.3fs); slow hooks delay every task",
            name,
            calls,
            hook,
            took,
            self.slow,
        )


async def maybe_await(result: Any) -> Any:
    """Await ``result`` if it is awaitable; return it (or what it gave)."""
    if inspect.isawaitable(result):
        return await result
    return result


async def call_payload(
    function: Payload, args: Payload, names: tuple[str, ...], service: Any
) -> Outcome:
    """Load and call ``function(*args, **kwargs)`` here, giving ``service`` to ``names``.

    For ``client.run`` (on workers) and ``run_on_scheduler``: runs on the
    calling (event loop) thread and awaits a coroutine.  Returns the pickled
    result, or the error with its traceback.
    """
    from .worker.execution import error_info  # the worker package imports this module

    try:
        fn = deserialize(function)
        fargs, fkwargs = deserialize(args)
        fkwargs = with_service(fn, dict(fkwargs), names, service)
        result = fn(*fargs, **fkwargs)
        if inspect.isawaitable(result):
            result = await result
    except Exception as exc:
        return Outcome(error=error_info(exc))
    try:
        return Outcome(result=serialize(result))
    except Exception as exc:
        return Outcome(error=error_info(exc))


# ---------------------------------------------------------------------------------------
# Shipping code and packages to workers (issue 6): UploadFile, PipInstall.
# ---------------------------------------------------------------------------------------
#: File kinds ``client.upload_file`` ships: a module, or an importable archive.
UPLOAD_SUFFIXES = (".py", ".zip", ".egg", ".whl", ".pyz")

_upload_dir: str | None = None


def read_upload(path: Any) -> tuple[str, bytes]:
    """``(file name, content)`` of a file to upload; clear errors for bad paths.

    Raises ``ValueError`` for a kind that cannot be imported,
    ``FileNotFoundError`` / ``IsADirectoryError`` / ``PermissionError``
    (or another ``OSError``) naming the path when it cannot be read.
    """

    path = os.fspath(path)
    filename = os.path.basename(path)
    suffix = os.path.splitext(filename)[1].lower()
    if suffix not in UPLOAD_SUFFIXES:
        raise ValueError(
            f"upload_file ships .py modules and .zip, .egg, .whl or .pyz archives, not {path!r}"
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"upload_file: no such file: {path!r}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"upload_file: {path!r} is a folder, not a file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        kind = type(exc) if type(exc) is not OSError else OSError
        raise kind(f"upload_file: cannot read {path!r}: {exc.strerror or exc}") from exc
    return filename, data


def upload_directory(service: Any = None) -> str:
    """Where uploaded files go in this process (put on ``sys.path`` by :func:`install_upload`).

    ``<local_directory>/corral-uploads`` for a service with a
    ``local_directory``, else a temporary folder of this process (removed
    at exit).
    """
    import atexit
    import shutil
    import tempfile

    global _upload_dir
    base = getattr(service, "local_directory", None)
    if base:
        folder = os.path.join(base, "corral-uploads")
        os.makedirs(folder, exist_ok=True)
        return folder
    if _upload_dir is None or not os.path.isdir(_upload_dir):
        _upload_dir = tempfile.mkdtemp(prefix="corral-uploads-")
        atexit.register(shutil.rmtree, _upload_dir, True)
    return _upload_dir


def _archive_modules(path: str) -> list[str]:
    """Top-level module and package names inside a zip-like archive."""
    import zipfile

    names: dict[str, None] = {}
    with zipfile.ZipFile(path) as z:
        for entry in z.namelist():
            head, sep, _ = entry.partition("/")
            if sep:
                if head.isidentifier() and f"{head}/__init__.py" in z.namelist():
                    names[head] = None
            elif head.endswith(".py") and head[:-3].isidentifier():
                names[head[:-3]] = None
    return list(names)


def _purge(names: Iterable[str]) -> list[str]:
    """Forget modules ``names`` and their submodules; return those that were imported."""

    dropped = []
    for mod in list(sys.modules):
        if any(mod == n or mod.startswith(n + ".") for n in names):
            del sys.modules[mod]
            dropped.append(mod)
    return dropped


def _first_on_path(entry: str) -> None:

    while entry in sys.path:
        sys.path.remove(entry)
    sys.path.insert(0, entry)


def install_upload(filename: str, data: bytes, directory: str, load: bool = True) -> list[str]:
    """Write an uploaded file into ``directory`` and make it importable; return module names.

    A ``.py`` module is compiled first (a syntax error raises before anything
    is written), written, and imported (``load``) or reloaded if it was
    imported already, so code that runs later sees the new version; if
    importing fails, the previous file is put back.  An archive (``.zip``,
    ``.egg``, ``.whl``, ``.pyz``) is stored under a name of its content and put
    first on ``sys.path`` instead of an older upload of the same file name; the
    modules it holds are purged from ``sys.modules`` and imported again.
    """

    def drop_bytecode(path: str) -> None:
        with contextlib.suppress(OSError, ValueError, NotImplementedError):
            os.unlink(importlib.util.cache_from_source(path))

    def write(path: str, content: bytes) -> None:
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(content)
        os.replace(tmp, path)

    stem, suffix = os.path.splitext(filename)
    if suffix.lower() == ".py":
        if not stem.isidentifier():
            raise ValueError(f"{filename!r} is not an importable module name")
        path = os.path.join(directory, filename)
        # A syntax error raises here, before anything is written (a <name> is never
        # read back from disk, so the error shows the uploaded text).
        compile(data, f"<uploaded {filename}>", "exec")
        previous = None
        if os.path.exists(path):
            with open(path, "rb") as f:
                previous = f.read()
        write(path, data)
        drop_bytecode(path)
        _first_on_path(directory)
        importlib.invalidate_caches()
        module = sys.modules.get(stem)
        if module is None and not load:
            return [stem]
        try:
            if module is not None:
                importlib.reload(module)
            else:
                importlib.import_module(stem)
        except BaseException:
            if previous is None:
                os.unlink(path)
            else:
                write(path, previous)
            drop_bytecode(path)
            importlib.invalidate_caches()
            if module is not None:  # back to the previous version
                try:
                    importlib.reload(module)
                except Exception:
                    sys.modules.pop(stem, None)
            else:
                sys.modules.pop(stem, None)
            raise
        return [stem]

    digest = hashlib.sha256(data).hexdigest()[:16]
    archives = os.path.join(directory, "archives")
    folder = os.path.join(archives, digest)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, filename)
    if not os.path.exists(path):
        write(path, data)
    modules = _archive_modules(path)
    older = [
        p
        for p in sys.path
        if p != path and p.startswith(archives + os.sep) and os.path.basename(p) == filename
    ]
    for p in older:
        sys.path.remove(p)
        sys.path_importer_cache.pop(p, None)
    sys.path_importer_cache.pop(path, None)
    _first_on_path(path)
    dropped = _purge(modules)
    importlib.invalidate_caches()
    wanted = modules if load else [m for m in modules if m in dropped]
    try:
        for name in wanted:
            importlib.import_module(name)
    except BaseException:
        sys.path.remove(path)
        for p in reversed(older):
            sys.path.insert(0, p)
        _purge(modules)
        importlib.invalidate_caches()
        raise
    return modules


def _forget_loaded_functions(worker: Any) -> None:
    """Drop a worker's deserialized task functions: they may come from a replaced module."""
    cache = getattr(worker, "functions", None)
    loaded = getattr(cache, "_loaded", None)
    lock = getattr(cache, "_lock", None)
    if loaded is None or lock is None:
        return
    with lock:
        loaded.clear()


class UploadFile(WorkerPlugin):
    """A worker plugin shipping a file: importable on every current and future worker.

    ``client.upload_file(path)`` registers one; see :func:`install_upload` for
    what happens on each worker (a new upload of the same file name replaces
    the previous one and reloads its modules).

    Example::

        client.register_plugin(UploadFile("mymodule.py"))
    """

    def __init__(self, filepath: Any, load: bool = True) -> None:
        self.filename, self.data = read_upload(filepath)
        self.load = load
        self.name = f"upload_file-{self.filename}"

    def setup(self, worker: Any) -> None:
        """Write the file on ``worker`` and import (or reload) what it holds."""
        modules = install_upload(self.filename, self.data, upload_directory(worker), self.load)
        _forget_loaded_functions(worker)
        _log.info("uploaded %s (modules %s)", self.filename, ", ".join(modules))


class SchedulerUploadFile(SchedulerPlugin):
    """The scheduler's copy of an upload: on its ``sys.path``, and reloaded if imported there.

    The scheduler runs no task code; this serves scheduler plugins and
    ``run_on_scheduler`` functions that import the uploaded module.
    """

    def __init__(self, upload: UploadFile) -> None:
        self.filename = upload.filename
        self.data = upload.data
        self.name = upload.name

    async def start(self, scheduler: Any) -> None:
        """Write the file; reload its modules where the scheduler imported them already."""
        install_upload(self.filename, self.data, upload_directory(scheduler), load=False)


class PipInstallError(RuntimeError):
    """``PipInstall`` failed on a worker; the message has the installer's output."""


#: Where PipInstall keeps its markers (one per environment and package list).
PIP_MARKERS = "corral-pip-install"

#: When corral was imported in this process: earlier than any package a task imports.
_PROCESS_STARTED = time.time()


class PipInstall(WorkerPlugin):
    """A worker plugin installing packages with pip on every current and future worker.

    Each environment (Python interpreter) installs a given package list once:
    a marker keyed by a hash of the packages, the options and the interpreter
    is kept in the temporary folder, so registering the same plugin again, or
    a worker restarting, does not install again (workers of one machine
    sharing an environment take turns, and the first one installs).  With
    ``uv`` on ``PATH``, ``uv pip install --python <interpreter>`` is used,
    else ``python -m pip install``.  A failure raises :class:`PipInstallError`
    with the installer's output and the worker's address.

    With ``restart_workers=True`` each worker whose process started before
    the packages were installed restarts (under its supervisor) so that new
    versions are imported; ``register_plugin`` returns once they are back.

    Example::

        from corral import PipInstall
        client.register_plugin(PipInstall(packages=["scikit-learn==1.5.2"], restart_workers=True))
    """

    def __init__(
        self,
        packages: list[str],
        pip_options: list[str] | None = None,
        restart_workers: bool = False,
        restart: bool | None = None,
    ) -> None:

        if isinstance(packages, str) or not all(isinstance(p, str) for p in packages):
            raise TypeError("PipInstall(packages=...) takes a list of requirement strings")
        if not packages:
            raise ValueError("PipInstall needs at least one package")
        self.packages = list(packages)
        self.pip_options = list(pip_options or [])
        self.restart_workers = bool(restart_workers or restart)  # ``restart``: dask's old name
        spec = json.dumps([self.packages, self.pip_options], sort_keys=True)
        self.id = hashlib.sha256(spec.encode()).hexdigest()[:16]
        self.name = f"pip-install-{self.id}"

    def command(self) -> list[str]:
        """The install command: ``uv pip install --python ...`` or ``python -m pip install``."""
        import shutil

        uv = shutil.which("uv")
        if uv:
            python = ["--python", sys.executable]
            return [uv, "pip", "install", *python, *self.pip_options, *self.packages]
        return [sys.executable, "-m", "pip", "install", *self.pip_options, *self.packages]

    def marker_path(self) -> str:
        """The marker of this package list for this process's interpreter."""
        import tempfile

        key = hashlib.sha256(f"{self.id}\0{sys.executable}".encode()).hexdigest()[:24]
        return os.path.join(tempfile.gettempdir(), PIP_MARKERS, f"{key}.json")

    def _install_once(self, where: str) -> float:
        """Install unless the marker exists; return when the packages were installed."""
        import subprocess

        marker = self.marker_path()
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        with open(marker + ".lock", "a") as lock:
            with contextlib.suppress(ImportError):
                import fcntl

                fcntl.flock(lock, fcntl.LOCK_EX)  # one install at a time per environment
            if os.path.exists(marker):
                with contextlib.suppress(OSError, ValueError), open(marker) as f:
                    return float(json.load(f)["time"])
            cmd = self.command()
            _log.info("installing %s on %s: %s", self.packages, where, " ".join(cmd))
            proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            if proc.returncode != 0:
                output = (proc.stdout + proc.stderr).strip()
                if len(output) > 8000:
                    output = "...\n" + output[-8000:]
                raise PipInstallError(
                    f"installing {self.packages} failed on worker {where} "
                    f"(`{' '.join(cmd)}` exited with status {proc.returncode}):\n{output}"
                )
            installed = time.time()
            tmp = f"{marker}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump({"time": installed, "packages": self.packages, "command": cmd}, f)
            os.replace(tmp, marker)
            importlib.invalidate_caches()
            return installed

    async def setup(self, worker: Any) -> None:
        """Install (once per environment); restart the worker if asked and needed."""
        where = getattr(worker, "address", None) or getattr(worker, "name", None) or "?"
        installed = await asyncio.to_thread(self._install_once, str(where))
        if not self.restart_workers:
            return
        if installed < _PROCESS_STARTED:
            return  # this process started after the install: it imports the new versions
        if not getattr(worker, "supervised", False):
            _log.warning(
                "PipInstall: worker %s has no supervisor and cannot restart; restart it "
                "yourself to import the new versions",
                where,
            )
            return
        worker.request_restart(f"PipInstall({self.packages})")
