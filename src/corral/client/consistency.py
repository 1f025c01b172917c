"""The client's consistency methods (mixed into :class:`~corral.Client`).

* Version checks: on connect (``Client(version_check="warn" | "strict" |
  "off")``) and on demand with :meth:`ConsistencyMethods.get_versions`.
* Shipping code: :meth:`ConsistencyMethods.upload_file`.
* Restarts: :meth:`ConsistencyMethods.restart` and
  :meth:`ConsistencyMethods.restart_workers` (workers run by a supervisor,
  see :mod:`corral.nanny`).

See ``docs/consistency.md`` for the user's guide and ``docs/protocol.md``
("Consistency") for the ops.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import warnings
from collections.abc import Coroutine, Iterable
from typing import TYPE_CHECKING, Any

from ..plugins import SchedulerUploadFile, UploadFile
from ..protocol.messages import CheckVersions, Message, Outcome, RestartWorkers, Results
from ..protocol.serialize import serialize, serialize_function
from ..versions import (
    VersionMismatchError,
    VersionMismatchWarning,
    compare_versions,
    format_mismatches,
    get_versions,
)
from .plugins import remote_error

#: Seconds a restarted worker has to come back, unless told otherwise.
DEFAULT_RESTART_TIMEOUT = 60.0


class ConsistencyMethods:
    """``get_versions``, ``upload_file``, ``restart`` and ``restart_workers``."""

    if TYPE_CHECKING:  # provided by Client and PluginMethods
        version_check: str
        timeout: float
        _request_ids: itertools.count[int]
        _requests: dict[int, asyncio.Future[Any]]

        def _send(self, msg: Message) -> None: ...
        def _sync(self, coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any: ...
        async def _request(self, method: str, **args: Any) -> Any: ...
        async def _ask(self, make: Any) -> Results: ...
        async def _register_worker_plugin(
            self, name: str, payload: Any, idempotent: bool
        ) -> dict[str, Any]: ...
        async def _unregister_worker_plugin(self, name: str) -> dict[str, Any]: ...
        async def _register_scheduler_plugin(
            self, name: str, payload: Any, idempotent: bool
        ) -> None: ...
        async def _unregister_scheduler_plugin(self, name: str) -> None: ...
        async def _run(
            self, fn: Any, packed: Any, workers: list[str] | None, wait: bool, on_error: str
        ) -> dict[str, Any]: ...
        async def _run_on_scheduler(self, fn: Any, packed: Any) -> Any: ...

    # -- versions ------------------------------------------------------------------
    async def _connect_version_check(self) -> None:
        """On connect: compare versions; warn, raise (strict) or do nothing (off)."""
        mode = self.version_check
        if mode == "off":
            return
        loop = asyncio.get_running_loop()
        rid = next(self._request_ids)
        fut: asyncio.Future[Any] = loop.create_future()
        self._requests[rid] = fut
        self._send(CheckVersions(id=rid, mode=mode))
        try:
            found = await asyncio.wait_for(fut, self.timeout)
        finally:
            self._requests.pop(rid, None)
        mismatches = compare_versions(get_versions(), found["scheduler"], found["workers"])
        if not mismatches:
            return
        text = format_mismatches(mismatches)
        if mode == "strict":
            raise VersionMismatchError(text, mismatches)
        warnings.warn(VersionMismatchWarning(text), stacklevel=2)

    def get_versions(self, check: bool = False, packages: Iterable[str] | None = None) -> Any:
        """Versions of Python and key packages on the client, the scheduler and every worker.

        Returns ``{"client": ..., "scheduler": ..., "workers": {address: ...}}``
        (each as :func:`corral.versions.get_versions`).  ``packages`` names
        more packages to report (and compare).  With ``check=True`` a mismatch
        raises :class:`~corral.VersionMismatchError`, whose message is a table
        of package | client | scheduler | workers; a package the scheduler
        lacks counts only for Python and corral/cloudpickle/msgpack.

        Example::

            client.get_versions(check=True)
        """
        return self._sync(self._get_versions(check, list(packages or ())))

    async def _get_versions(self, check: bool, packages: list[str]) -> dict[str, Any]:
        if packages:
            fn = serialize_function(get_versions)
            args = serialize(((packages,), {}))
            scheduler = await self._run_on_scheduler(fn, args)
            workers = await self._run(fn, args, None, True, "raise")
        else:
            found = await self._request("versions")
            scheduler, workers = found["scheduler"], found["workers"]
        out = {"client": get_versions(packages), "scheduler": scheduler, "workers": workers}
        if check:
            mismatches = compare_versions(out["client"], scheduler, workers, packages)
            if mismatches:
                raise VersionMismatchError(format_mismatches(mismatches), mismatches)
        return out

    # -- shipping code -------------------------------------------------------------
    def upload_file(self, filename: Any, load: bool = True) -> Any:
        """Ship a ``.py`` module or a ``.zip``/``.egg``/``.whl`` archive to every worker.

        The file becomes importable on every current worker and on every
        worker that joins later (it is kept on the scheduler like a worker
        plugin, :class:`~corral.UploadFile`), and is put on the scheduler's
        path too.  With ``load`` (default) its modules are imported at once.
        Uploading a new version of a file reloads its modules, so tasks
        submitted afterwards run the new code.  A missing or unreadable file
        raises here, before anything is sent; a file that fails to import
        (a syntax error) raises the worker's error with its traceback, and the
        previous upload of that file (if any) is put back.

        Returns ``{worker_address: {"status": "OK"}}``.

        Example::

            client.upload_file("mymodule.py")
            client.submit(lambda: __import__("mymodule").VERSION).result()
        """
        plugin = UploadFile(filename, load=load)  # file errors raise here
        return self._sync(self._upload_file(plugin))

    async def _upload_file(self, plugin: UploadFile) -> dict[str, Any]:
        uploads: dict[str, UploadFile] = self.__dict__.setdefault("_uploads", {})
        try:
            result = await self._register_worker_plugin(plugin.name, serialize(plugin), False)
        except BaseException:
            previous = uploads.get(plugin.name)
            try:  # do not leave a broken file for workers that join later
                if previous is not None:
                    await self._register_worker_plugin(plugin.name, serialize(previous), False)
                else:
                    await self._unregister_worker_plugin(plugin.name)
            except Exception:
                pass
            raise
        uploads[plugin.name] = plugin
        with contextlib.suppress(ValueError):  # the scheduler's copy of an older version
            await self._unregister_scheduler_plugin(plugin.name)
        payload = serialize(SchedulerUploadFile(plugin))
        await self._register_scheduler_plugin(plugin.name, payload, False)
        return result

    # -- restarts ------------------------------------------------------------------
    def restart(self, timeout: float | None = None, wait_for_workers: bool = True) -> Any:
        """Restart every worker process and forget every task (as ``distributed.Client.restart``).

        All futures of all clients are cancelled (their results are lost);
        workers run by a supervisor (``corral worker``, ``LocalCluster``) get
        fresh processes, which join again: plugins, uploads and environments
        are set up on them anew.  Returns once every worker is back, or raises
        ``TimeoutError`` naming a worker that did not come back within
        ``timeout`` seconds (60 by default); the others carry on.  Raises
        ``RuntimeError`` (and restarts nothing) if a worker has no supervisor.
        With ``wait_for_workers=False`` it returns as soon as the workers were
        told to restart (tasks are already forgotten), without waiting for the
        new processes to join; ``client.wait_for_workers(n)`` waits for them later.

        Example::

            client.restart()   # {"tcp://10.0.0.5:38551": "OK", ...}
        """
        return self._sync(self._restart_workers(None, timeout, True, True, wait_for_workers))

    def restart_workers(
        self,
        workers: Iterable[str] | str,
        timeout: float | None = None,
        raise_for_error: bool = True,
    ) -> Any:
        """Restart the processes of some workers (addresses or names); the others carry on.

        Their tasks move elsewhere (or wait for them) as when a worker leaves;
        the new processes join with plugins and environments set up again.
        Returns ``{address: "OK"}`` (by the workers' addresses before the
        restart); a worker that does not come back within ``timeout`` seconds raises
        ``TimeoutError`` naming it (or, with ``raise_for_error=False``, maps
        to ``"timed out"``).

        Example::

            client.restart_workers(["tcp://10.0.0.5:40123"])
        """
        if isinstance(workers, str):
            workers = [workers]
        return self._sync(self._restart_workers(list(workers), timeout, False, raise_for_error))

    async def _restart_workers(
        self,
        workers: list[str] | None,
        timeout: float | None,
        forget: bool,
        raise_for_error: bool,
        wait: bool = True,
    ) -> dict[str, Any]:
        limit = DEFAULT_RESTART_TIMEOUT if timeout is None else float(timeout)
        reason = "client.restart" if forget else "client.restart_workers"
        results = await self._ask(
            lambda rid: RestartWorkers(
                id=rid, workers=workers, timeout=limit, reason=reason, forget=forget, wait=wait
            )
        )
        outcomes: dict[str, Outcome] = results.outcomes
        out: dict[str, Any] = {}
        first: BaseException | None = None
        for address in sorted(outcomes):
            outcome = outcomes[address]
            if outcome.error is None:
                out[address] = "OK"
                continue
            error = remote_error(outcome.error)
            first = first or error
            out[address] = "timed out" if isinstance(error, TimeoutError) else error
        if first is not None and raise_for_error:
            raise first
        return out
