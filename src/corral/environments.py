"""Worker environments: named sets of workers, found by a condition and prepared by a setup.

An environment has

1. a unique ``name`` such as ``"high-memory"`` or ``"database-access"``;
2. a ``condition``, called on each worker: does this worker qualify?
3. a ``setup``, run on each worker that qualifies, as it joins;
4. a ``teardown``, run on each member as it leaves (unregistration,
   replacement, a refresh whose condition fails, or the worker closing);
5. per-worker ``state``: ``worker.environment_state[name]``, a dict that the
   setup, the teardown and tasks read and write (``get_environment_state``).

``condition``, ``setup`` and ``teardown`` take no argument or one, the
:class:`~corral.Worker` (a parameter named ``worker``, ``dask_worker`` or
``corral_worker``, or a single positional parameter, receives it); each may be
a plain function or a coroutine function.  They run on the worker's event loop
thread, one environment operation at a time, so a slow setup should be
``async`` (or hand its blocking part to ``asyncio.to_thread``).

Example (functional)::

    def has_high_memory(dask_worker):
        import psutil
        return psutil.virtual_memory().total > 30e9

    client.register_worker_environment(name="high-memory", condition=has_high_memory)
    client.submit(big_job, environment="high-memory")

Example (class-based)::

    class HighMemory(WorkerEnvironment):
        "An environment for workers with at least 30GB of RAM"
        name = "high-memory"

        def condition(self):
            import psutil
            return psutil.virtual_memory().total > 30e9

    client.register_worker_environment(environment=HighMemory)
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Callable
from typing import Any

__all__ = ["NotAMemberError", "WorkerEnvironment", "get_environment_state"]

#: Parameter names that receive the worker (as in ``client.run``).
WORKER_PARAMETERS = ("worker", "dask_worker", "corral_worker")

#: The worker whose environment hook is running (setup and teardown run on its loop).
_hook_worker: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "corral_environment_worker", default=None
)


class NotAMemberError(KeyError):
    """``get_environment_state(name)`` on a worker that is not a member of ``name``."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class WorkerEnvironment:
    """Base class of worker environments; override ``condition``, ``setup``, ``teardown``.

    Set ``name`` as a class attribute (or pass ``name=`` to the constructor or
    to ``register_worker_environment``).  The instance travels by value
    (cloudpickle) to every worker, where it is loaded once per registration.

    Example::

        class DatabaseAccess(WorkerEnvironment):
            name = "database-access"

            def condition(self, worker):
                return os.path.exists("/data/app.db")

            def setup(self, worker):
                state = worker.environment_state[self.name]
                state["db"] = sqlite3.connect("/data/app.db", check_same_thread=False)

            def teardown(self, worker):
                worker.environment_state[self.name]["db"].close()
    """

    name: str | None = None

    def __init__(
        self,
        name: str | None = None,
        *,
        condition: Callable[..., Any] | None = None,
        setup: Callable[..., Any] | None = None,
        teardown: Callable[..., Any] | None = None,
    ) -> None:
        if name is not None:
            self.name = name
        # The functional style: the given functions are attached as they are
        # (not bound), so they are called with no argument or the worker.
        for hook, fn in (("condition", condition), ("setup", setup), ("teardown", teardown)):
            if fn is None:
                continue
            if not callable(fn):
                raise TypeError(f"{hook} of a worker environment must be callable, got {fn!r}")
            setattr(self, hook, fn)

    # Overrides take no argument or the worker (``def setup(self, worker)``).
    def condition(self, *args: Any, **kwargs: Any) -> Any:
        """Does this worker qualify?  (Default: every worker does.)"""
        return True

    def setup(self, *args: Any, **kwargs: Any) -> Any:
        """Prepare this worker as it joins (default: nothing)."""

    def teardown(self, *args: Any, **kwargs: Any) -> Any:
        """Undo the setup as this worker leaves (default: nothing)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def check_name(name: Any) -> str:
    """Return ``name`` if it is a valid environment name; else ``TypeError`` or ``ValueError``."""
    if name is None:
        raise ValueError(
            "a worker environment needs a name: pass name=... or set the class attribute `name`"
        )
    if not isinstance(name, str):
        raise TypeError(f"the name of a worker environment must be a string, not {name!r}")
    if not name.strip():
        raise ValueError("the name of a worker environment must not be empty")
    return name


def as_environment(
    environment: Any = None,
    *,
    name: str | None = None,
    condition: Callable[..., Any] | None = None,
    setup: Callable[..., Any] | None = None,
    teardown: Callable[..., Any] | None = None,
) -> WorkerEnvironment:
    """The environment ``register_worker_environment`` was given, with a checked name."""
    functions = {"condition": condition, "setup": setup, "teardown": teardown}
    given = [k for k, v in functions.items() if v is not None]
    if environment is None:
        env = WorkerEnvironment(name, **functions)
    else:
        if given:
            raise TypeError(
                f"give either environment= or {'/'.join(given)}=, not both "
                "(override the methods of the WorkerEnvironment instead)"
            )
        if isinstance(environment, type):
            if not issubclass(environment, WorkerEnvironment):
                raise TypeError(
                    f"environment must be a WorkerEnvironment subclass or instance, "
                    f"got {environment!r}"
                )
            environment = environment()
        elif not isinstance(environment, WorkerEnvironment):
            has_hooks = any(callable(getattr(environment, h, None)) for h in functions)
            if not has_hooks:
                raise TypeError(
                    "environment must be a WorkerEnvironment subclass or instance, "
                    f"got {type(environment).__name__}"
                )
        env = environment
        if name is not None:
            env.name = name
    env.name = check_name(getattr(env, "name", None))
    return env


def _takes_worker(fn: Callable[..., Any]) -> tuple[str, str] | None:
    """How ``fn`` wants the worker: ``("keyword", name)``, ``("positional", "")`` or None."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    for wanted in WORKER_PARAMETERS:
        p = params.get(wanted)
        if p is not None and p.kind is not inspect.Parameter.POSITIONAL_ONLY:
            return ("keyword", wanted)
    positional = [
        p
        for p in params.values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if positional and positional[0].default is inspect.Parameter.empty:
        return ("positional", "")
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params.values()):
        return ("positional", "")
    return None


async def call_hook(fn: Callable[..., Any], worker: Any) -> Any:
    """Call an environment hook with the worker if it takes it; await a coroutine."""
    how = _takes_worker(fn)
    token = _hook_worker.set(worker)
    try:
        if how is None:
            result = fn()
        elif how[0] == "keyword":
            result = fn(**{how[1]: worker})
        else:
            result = fn(worker)
        if inspect.isawaitable(result):
            result = await result
        return result
    finally:
        _hook_worker.reset(token)


def environment_worker() -> Any:
    """The worker whose environment ``condition``/``setup``/``teardown`` is running, or None."""
    return _hook_worker.get()


def get_environment_state(name: str) -> dict[str, Any]:
    """This worker's state of environment ``name``: a dict shared by its setup and tasks.

    Call it inside a task (or inside the environment's setup or teardown).
    Raises ``ValueError`` outside a worker, and :class:`NotAMemberError` (a
    ``KeyError``) naming the
    environment if this worker is not a member of it.

    Example::

        def add_row(value):
            db = corral.get_environment_state("database-access")["db"]
            db.execute("INSERT INTO t VALUES (?)", (value,))

        client.submit(add_row, 1, environment="database-access")
    """
    from .worker.execution import current_worker

    worker = current_worker() or environment_worker()
    if worker is None:
        raise ValueError(
            f"get_environment_state({name!r}) called outside a task running on a Corral worker"
        )
    states = getattr(worker, "environment_state", {})
    try:
        return states[name]
    except KeyError:
        members = sorted(states)
        raise NotAMemberError(
            f"worker {worker.address} is not a member of the environment {name!r} "
            f"(it is a member of {members or 'none'}); submit the task with "
            f"environment={name!r} to run it on a member"
        ) from None
