"""The private channel between a supervised worker and its supervisor, for nanny plugins.

The scheduler never talks to a supervisor: it hands a nanny plugin (opaque
bytes, as every worker plugin) to the supervised worker in ``setup_plugin``
with ``nanny: true``, and the worker passes it on here.  The channel is a
folder the supervisor creates per slot and names to its child in
``CORRAL_NANNY_PLUGINS`` (see :mod:`corral.nanny`):

* the worker writes one request file ``<seq>-<id>.req`` (written aside and
  renamed, so it is never read half written): a pickled :class:`Request`;
* the supervisor (:meth:`SupervisorEnd.serve`, called from its polling loop) carries
  the requests out in order, in its own process, and answers each with a
  pickled :class:`Answer` in ``<seq>-<id>.res``;
* the worker waits for that file, reads and removes it.

Both processes run the same code, as the same user, in a folder only the
supervisor created, so plain pickle of these small records is fine here;
the plugin inside is loaded only by the supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import os
import pickle
import threading
import time
import traceback
import uuid
from typing import Any

from .protocol.messages import ErrorInfo
from .protocol.serialize import Payload, deserialize

logger = logging.getLogger("corral.nanny")

#: Environment variable naming the channel folder to a supervised worker.
CHANNEL_ENV = "CORRAL_NANNY_PLUGINS"

#: How often the worker looks for the supervisor's answer (seconds).
_POLL = 0.02


@dataclasses.dataclass
class Request:
    """One thing asked of the supervisor: set up or tear down a nanny plugin."""

    action: str  # "setup" or "teardown"
    name: str
    registration: str = ""
    serializer: str = ""
    frames: list[bytes] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Answer:
    """The supervisor's answer: an error, and whether the worker must restart."""

    error: ErrorInfo | None = None
    restart: bool = False


def _plain(payload: Payload | None) -> Payload | None:
    """``payload`` with its frames as bytes (memoryviews do not pickle)."""
    if payload is None:
        return None
    return Payload(payload.serializer, [bytes(f) for f in payload.frames])


def _portable(error: ErrorInfo) -> ErrorInfo:
    return dataclasses.replace(
        error, exception=_plain(error.exception), traceback=_plain(error.traceback)
    )


def _write(path: str, obj: Any) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(obj, f)
    os.replace(tmp, path)


# -- the worker's side ----------------------------------------------------------------
class WorkerEnd:
    """The worker's end: send a request, wait for the supervisor's answer."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    async def ask(self, request: Request, timeout: float | None = None) -> Answer:
        """Hand ``request`` to the supervisor and wait for its answer.

        Raises ``TimeoutError`` after ``timeout`` seconds (none by default: a
        setup may take long), naming the plugin.
        """
        stem = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        _write(os.path.join(self.folder, stem + ".req"), request)
        answer_path = os.path.join(self.folder, stem + ".res")
        deadline = None if timeout is None else time.monotonic() + timeout
        while not os.path.exists(answer_path):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(
                    f"the supervisor did not answer the {request.action} of nanny plugin "
                    f"{request.name!r} within {timeout}s"
                )
            await asyncio.sleep(_POLL)
        with open(answer_path, "rb") as f:
            answer = pickle.load(f)
        with contextlib.suppress(OSError):
            os.unlink(answer_path)
        if not isinstance(answer, Answer):
            raise RuntimeError(f"unexpected answer {answer!r} from the supervisor")
        return answer


def request(
    action: str, name: str, payload: Payload | None = None, registration: str = ""
) -> Request:
    """A :class:`Request` for plugin ``name``, carrying ``payload`` (its pickled bytes)."""
    plain = _plain(payload)
    return Request(
        action=action,
        name=name,
        registration=registration,
        serializer=plain.serializer if plain else "",
        frames=list(plain.frames) if plain else [],  # type: ignore[arg-type]
    )


# -- the supervisor's side ------------------------------------------------------------
def _call(fn: Any, *args: Any) -> None:
    """Call a hook; run a coroutine it returns to completion in a thread of its own.

    The supervisor may be running an event loop in this thread already
    (``LocalCluster``), where ``asyncio.run`` is not allowed.
    """
    result = fn(*args)
    if not inspect.isawaitable(result):
        return
    failure: list[BaseException] = []

    def run() -> None:
        async def wait() -> None:
            await result

        try:
            asyncio.run(wait())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, name="corral-nanny-plugin")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


class SupervisorEnd:
    """The supervisor's end, for one slot: its nanny plugins and their requests.

    ``nanny`` is what plugin hooks receive (the :class:`~corral.nanny.Slot`).
    """

    def __init__(self, folder: str, nanny: Any) -> None:
        self.folder = folder
        self.nanny = nanny
        self.plugins: dict[str, Any] = {}
        self.registrations: dict[str, str] = {}

    def serve(self) -> None:
        """Carry out the requests waiting in the folder, oldest first."""
        try:
            names = sorted(n for n in os.listdir(self.folder) if n.endswith(".req"))
        except OSError:
            return
        for name in names:
            path = os.path.join(self.folder, name)
            try:
                with open(path, "rb") as f:
                    req = pickle.load(f)
            except (OSError, EOFError, pickle.UnpicklingError):
                logger.exception("unreadable nanny plugin request %s", path)
                continue
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            answer = self.handle(req)
            _write(os.path.join(self.folder, name[: -len(".req")] + ".res"), answer)

    def handle(self, req: Request) -> Answer:
        """Carry out one request here, in the supervisor's process."""
        from .worker.execution import error_info  # heavy: only once a plugin arrives

        try:
            if req.action == "setup":
                return self._setup(req)
            if req.action == "teardown":
                if req.name in self.plugins:
                    self.remove(req.name)
                return Answer()
            raise ValueError(f"unknown nanny plugin action {req.action!r}")
        except Exception as exc:
            logger.exception("nanny plugin %r: %s failed", req.name, req.action)
            # The user's frames only: this module's are noise in the client's traceback.
            tb = exc.__traceback__
            while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
                tb = tb.tb_next
            text = "".join(traceback.format_exception(type(exc), exc, tb))
            return Answer(error=_portable(error_info(exc, text)))

    def _setup(self, req: Request) -> Answer:
        if self.registrations.get(req.name) == req.registration and req.name in self.plugins:
            return Answer()  # set up already: the worker restarted, or reconnected
        plugin = deserialize(Payload(req.serializer, list(req.frames)))
        if req.name in self.plugins:
            self.remove(req.name, raise_errors=False)
        # Kept even when setup raises (as worker plugins are), so it is torn down later.
        self.plugins[req.name] = plugin
        self.registrations[req.name] = req.registration
        setup = getattr(plugin, "setup", None)
        if callable(setup):
            _call(setup, self.nanny)
        return Answer(restart=bool(getattr(plugin, "restart", False)))

    def remove(self, name: str, raise_errors: bool = True) -> None:
        """Tear down and forget plugin ``name``."""
        plugin = self.plugins.pop(name)
        self.registrations.pop(name, None)
        teardown = getattr(plugin, "teardown", None)
        if not callable(teardown):
            return
        try:
            _call(teardown, self.nanny)
        except Exception:
            if raise_errors:
                raise
            logger.exception("nanny plugin %r failed to tear down", name)

    def close(self) -> None:
        """Tear down every plugin, newest first; failures are logged."""
        for name in reversed(list(self.plugins)):
            self.remove(name, raise_errors=False)
