"""Preloads: user modules run around the life of a scheduler or a worker.

``corral scheduler --preload NAME`` / ``corral worker --preload NAME``
(repeatable), ``Scheduler(preload=...)`` / ``Worker(preload=...)``,
``LocalCluster(preload=..., worker_preload=...)``, or the environment:
``CORRAL_SCHEDULER_PRELOAD`` / ``CORRAL_WORKER_PRELOAD``, else
``CORRAL_PRELOAD`` (comma-separated; used when no preload is given
explicitly).  ``NAME`` is a module name (importable from ``sys.path``) or the
path of a ``.py`` file.

* The module is imported when the service is created, before it opens any
  connection.
* ``corral_setup(service)`` (or ``dask_setup``) is called as the service
  starts, with the :class:`~corral.Scheduler` or :class:`~corral.Worker`; the
  scheduler is already listening (``service.address`` is set) but handles no
  connection until every setup finished; the worker has its address but has
  not contacted the scheduler yet.  It may be a coroutine function.
* ``corral_teardown(service)`` (or ``dask_teardown``) is called as the
  service closes (also on SIGTERM/SIGINT to ``corral scheduler``/``worker``).
* If ``corral_setup`` is a :func:`click.command`, the command line arguments
  the ``corral`` command does not know are parsed by it, and its options are
  passed as keyword arguments after the service::

      @click.command()
      @click.option("--print-count/--no-print-count", default=False)
      def corral_setup(scheduler, print_count):
          ...

A preload that cannot be imported, rejects its arguments or whose setup
raises stops the service from starting (:class:`PreloadError`); the
``corral`` command prints the reason and exits with a non-zero status.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import click

from .errors import CorralError

logger = logging.getLogger("corral.preload")

__all__ = ["Preload", "PreloadError", "Preloads", "import_preload", "preload_names"]

SETUP_NAMES = ("corral_setup", "dask_setup")
TEARDOWN_NAMES = ("corral_teardown", "dask_teardown")


class PreloadError(CorralError):
    """A preload could not be imported, parsed its arguments badly or failed to set up."""


def preload_names(kind: str, preload: str | Sequence[str] | None) -> list[str]:
    """The preloads of a ``kind`` ("scheduler" or "worker") service.

    ``preload`` when given (a name or a list); otherwise the environment
    variable ``CORRAL_<KIND>_PRELOAD``, else ``CORRAL_PRELOAD``
    (comma-separated names).
    """
    if preload is None:
        text = os.environ.get(f"CORRAL_{kind.upper()}_PRELOAD") or os.environ.get(
            "CORRAL_PRELOAD", ""
        )
        return [p.strip() for p in text.split(",") if p.strip()]
    if isinstance(preload, str):
        return [preload]
    return [str(p) for p in preload]


def import_preload(name: str) -> ModuleType:
    """Import a preload given as a module name or a ``.py`` path."""
    try:
        if name.endswith(".py") or os.sep in name:
            path = os.path.abspath(os.path.expanduser(name))
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no such file: {path}")
            modname = os.path.splitext(os.path.basename(path))[0]
            spec = importlib.util.spec_from_file_location(modname, path)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load {path} as a Python module")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            # Reachable by name afterwards (pickling by reference), unless that shadows a module.
            sys.modules.setdefault(modname, module)
            return module
        return importlib.import_module(name)
    except Exception as exc:
        logger.error("preload %r failed to import", name, exc_info=True)
        raise PreloadError(f"cannot import preload {name!r}: {type(exc).__name__}: {exc}") from exc


def _find(module: ModuleType, names: tuple[str, ...]) -> Any:
    for n in names:
        fn = getattr(module, n, None)
        if fn is not None:
            return fn
    return None


class Preload:
    """One preload module: imported (and its click options parsed) on creation."""

    def __init__(self, kind: str, name: str, argv: Sequence[str] = ()) -> None:
        self.kind = kind
        self.name = name
        self.argv = list(argv)
        self.module = import_preload(name)
        self.setup_fn = _find(self.module, SETUP_NAMES)
        self.teardown_fn = _find(self.module, TEARDOWN_NAMES)
        self.params: dict[str, Any] = {}
        self.is_command = isinstance(self.setup_fn, click.Command)
        if self.is_command:
            # click's own parsing: errors are click.UsageError (exit status 2 from the CLI).
            ctx = self.setup_fn.make_context(f"corral {kind} --preload {name}", list(self.argv))
            self.params = dict(ctx.params)

    async def setup(self, service: Any) -> None:
        """Call ``corral_setup(service, **options)`` (or ``dask_setup``), if present."""
        fn = self.setup_fn
        if fn is None:
            return
        result = fn.callback(service, **self.params) if self.is_command else fn(service)
        if inspect.isawaitable(result):
            await result

    async def teardown(self, service: Any) -> None:
        """Call ``corral_teardown(service)`` (or ``dask_teardown``), if present."""
        fn = self.teardown_fn
        call = fn.callback if isinstance(fn, click.Command) else fn
        if call is None:
            return
        result = call(service)
        if inspect.isawaitable(result):
            await result

    def __repr__(self) -> str:
        return f"<Preload {self.name!r}>"


class Preloads:
    """The preloads of one service, set up in order and torn down in reverse.

    ``argv``: the extra command-line arguments, given to every preload whose
    setup is a click command (a flat list), or one list per preload.
    Arguments with no click preload to take them are an error.
    """

    def __init__(
        self,
        kind: str,
        preload: str | Sequence[str] | None = None,
        argv: Sequence[str] | Sequence[Sequence[str]] | None = None,
    ) -> None:
        names = preload_names(kind, preload)
        argv = list(argv or [])
        per_preload: list[list[str]]
        if argv and all(isinstance(a, list | tuple) for a in argv):
            if len(argv) != len(names):
                raise PreloadError(f"{len(argv)} argument lists for {len(names)} preloads")
            per_preload = [list(a) for a in argv]
        else:
            per_preload = [[str(a) for a in argv]] * len(names)
        self.items = [Preload(kind, n, a) for n, a in zip(names, per_preload, strict=True)]
        self._started: list[Preload] = []
        leftover = [str(a) for a in argv if isinstance(a, str)]
        if leftover and not any(p.is_command for p in self.items):
            raise PreloadError(
                f"unexpected arguments {leftover}: no --preload module of this {kind} "
                "takes command-line options (its corral_setup is not a click command)"
            )

    def __len__(self) -> int:
        return len(self.items)

    async def setup(self, service: Any) -> None:
        """Set up every preload in order; the first failure raises :class:`PreloadError`."""
        for p in self.items:
            try:
                await p.setup(service)
            except Exception as exc:
                logger.error("preload %r: setup failed", p.name, exc_info=True)
                raise PreloadError(
                    f"preload {p.name!r}: setup failed: {type(exc).__name__}: {exc}"
                ) from exc
            self._started.append(p)

    async def teardown(self, service: Any) -> None:
        """Tear down the preloads that were set up, newest first; failures are logged."""
        while self._started:
            p = self._started.pop()
            try:
                await p.teardown(service)
            except Exception:
                logger.exception("preload %r: teardown failed", p.name)
