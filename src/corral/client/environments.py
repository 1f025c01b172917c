"""The client's worker environment methods (mixed into :class:`~corral.Client`).

See :mod:`corral.environments` and ``docs/environments.md``.  Each method
sends one op (``docs/protocol.md``, "Worker environments") and waits for the
scheduler's :class:`~corral.protocol.messages.Results`.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from ..environments import as_environment, check_name
from ..protocol.messages import (
    Message,
    Outcome,
    RefreshWorkerEnvironment,
    RegisterWorkerEnvironment,
    Results,
    UnregisterWorkerEnvironment,
)
from ..protocol.serialize import deserialize, serialize
from .plugins import remote_error


def environment_names(environment: Any, what: str = "environment") -> list[str] | None:
    """``environment=`` of a task: a name or a list of names -> a list (None when unset)."""
    if environment is None:
        return None
    names = [environment] if isinstance(environment, str) else environment
    try:
        names = list(names)
    except TypeError:
        raise TypeError(
            f"{what} must be an environment name or a list of names, got {environment!r}"
        ) from None
    for name in names:
        check_name(name)
    return list(dict.fromkeys(names)) or None


def _answers(name: str, outcomes: dict[str, Outcome]) -> dict[str, Any]:
    """``{address: {"status": "OK", "member": bool}}``; raise the first error."""
    out: dict[str, Any] = {}
    first: BaseException | None = None
    for address in sorted(outcomes):
        outcome = outcomes[address]
        info = deserialize(outcome.result) if outcome.result is not None else {}
        if outcome.error is not None and first is None:
            exc = remote_error(outcome.error, address)
            stage = info.get("stage")
            if stage and hasattr(exc, "add_note"):
                exc.add_note(f"worker environment {name!r}: {stage} failed on {address}")
            first = exc
        out[address] = {"status": "OK", "member": bool(info.get("member", False))}
    if first is not None:
        raise first
    return out


class EnvironmentMethods:
    """``register_worker_environment``, ``unregister_worker_environment``, ... ."""

    if TYPE_CHECKING:  # provided by Client and PluginMethods
        _request_ids: itertools.count[int]
        _requests: dict[int, asyncio.Future[Any]]

        def _sync(self, coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any: ...
        async def _request(self, method: str, **args: Any) -> Any: ...
        async def _ask(self, make: Callable[[int], Message]) -> Results: ...

    def register_worker_environment(
        self,
        environment: Any = None,
        *,
        name: str | None = None,
        condition: Callable[..., Any] | None = None,
        setup: Callable[..., Any] | None = None,
        teardown: Callable[..., Any] | None = None,
    ) -> Any:
        """Register a worker environment; check and set it up on every current and future worker.

        Either the functional style, ``name=`` with ``condition``, ``setup``
        and ``teardown`` functions (each optional, taking no argument or the
        worker), or ``environment=``: a :class:`~corral.WorkerEnvironment`
        subclass or instance (``name=`` then overrides its name).

        The condition runs on every worker; those where it holds run the
        setup and become members.  Returns ``{address: {"status": "OK",
        "member": bool}}`` for the current workers, once every setup finished.
        A condition or setup that raises on a current worker is raised here
        (the original exception, with the worker's address and the remote
        traceback; the environment stays registered and that worker is not a
        member); on a worker that joins later it is recorded under
        ``client.get_events("environments")``.  Registering a name again
        replaces the environment: members tear the old one down first.

        Example::

            def has_high_memory(dask_worker):
                import psutil
                return psutil.virtual_memory().total > 30e9

            client.register_worker_environment(name="high-memory", condition=has_high_memory)
            client.submit(f, environment="high-memory")
        """
        env = as_environment(
            environment, name=name, condition=condition, setup=setup, teardown=teardown
        )
        assert env.name is not None
        return self._sync(self._register_worker_environment(env.name, serialize(env)))

    async def _register_worker_environment(self, name: str, payload: Any) -> dict[str, Any]:
        results = await self._ask(
            lambda rid: RegisterWorkerEnvironment(id=rid, name=name, environment=payload)
        )
        return _answers(name, results.outcomes)

    def unregister_worker_environment(self, name: str) -> Any:
        """Forget the environment ``name``; every member runs its teardown and leaves.

        Tasks that target it and have not started wait again (``why_pending``
        says no such environment is registered).  Returns ``{address:
        {"status": "OK", "member": False}}``; raises ``ValueError`` for an
        unknown name, or the first teardown error.
        """
        check_name(name)
        return self._sync(self._unregister_worker_environment(name))

    async def _unregister_worker_environment(self, name: str) -> dict[str, Any]:
        results = await self._ask(lambda rid: UnregisterWorkerEnvironment(id=rid, name=name))
        return _answers(name, results.outcomes)

    def refresh_worker_environment(self, name: str) -> Any:
        """Check the condition of ``name`` again on every worker.

        Workers that now qualify run the setup and join; members that no longer
        qualify run the teardown and leave; members that still qualify stay as
        they are (no second setup).  Returns and raises as
        :meth:`register_worker_environment`.
        """
        check_name(name)
        return self._sync(self._refresh_worker_environment(name))

    async def _refresh_worker_environment(self, name: str) -> dict[str, Any]:
        results = await self._ask(lambda rid: RefreshWorkerEnvironment(id=rid, name=name))
        return _answers(name, results.outcomes)

    def environments(self) -> Any:
        """Registered environments and their members: ``{name: [worker addresses]}``.

        Each worker's memberships are also in
        ``scheduler_info()["workers"][address]["environments"]``.
        """
        return self._sync(self._request("environments"))
