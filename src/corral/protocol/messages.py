"""Every op of the wire protocol, declared once as a typed dataclass.

A message on the wire is a msgpack map ``{"op": NAME, field: value, ...}``.
Fields whose value is ``None`` may be omitted: an optional field sent as
``None`` takes its default.  Fields this side does not know are ignored.
:func:`decode_message` validates a received map strictly (unknown op, missing
or mistyped field, non-string map key all raise :class:`ProtocolError` naming
the op and the field) and returns the typed message; the
:class:`~corral.protocol.codec.Encoder` turns typed messages back into maps.
``docs/protocol.md`` documents each op; keep the two in step.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar, Union

from ..errors import ProtocolError
from . import fast_decode
from .serialize import Payload

if typing.TYPE_CHECKING:
    from typing_extensions import dataclass_transform
else:

    def dataclass_transform(**kwargs: Any) -> Callable[[Any], Any]:
        return lambda decorator: decorator


PROTOCOL_VERSION = 1

Converter = Callable[[Any], Any]

#: op name -> message class
OPS: dict[str, type[Message]] = {}


class Record:
    """Base of typed maps: a message or a record nested inside one."""

    __slots__ = ()
    _converters: ClassVar[dict[str, tuple[Converter, bool]]]

    def to_wire(self) -> dict[str, Any]:
        """Return the map sent on the wire (``None`` fields left out).

        Generated per class by :func:`record`.
        """
        raise NotImplementedError

    @classmethod
    def from_wire(cls, obj: Any) -> Any:
        """Validate a received map and build the record.

        Generated per class by :func:`record`.
        """
        raise NotImplementedError


class Message(Record):
    """Base of the protocol's ops."""

    __slots__ = ()
    op: ClassVar[str]


def _expect(kind: type | tuple[type, ...], label: str) -> Converter:
    def check(value: Any) -> Any:
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ProtocolError(f"expected {label}, got {type(value).__name__}")
        return value

    return check


def _number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(f"expected a number, got {type(value).__name__}")
    return value


def _any(value: Any) -> Any:
    return value


def _at(convert: Converter, value: Any, where: str) -> Any:
    """Convert an item of a container, naming the item in the error."""
    try:
        return convert(value)
    except ProtocolError as exc:
        raise ProtocolError(f"{where}: {exc}") from None


def _list_of(convert: Converter, check: Converter) -> Converter:
    """Convert every item of an array; an error names the item's position."""

    def convert_list(value: Any) -> list[Any]:
        items = check(value)
        try:
            return [convert(x) for x in items]
        except ProtocolError:
            # Found again item by item: naming it costs nothing on the good path.
            for i, x in enumerate(items):
                _at(convert, x, f"item {i}")
            raise

    return convert_list


def _map_of(convert: Converter, check: Converter) -> Converter:
    """Convert every value of a map; an error names the key."""

    def convert_map(value: Any) -> dict[Any, Any]:
        entries = check(value)
        try:
            return {k: convert(x) for k, x in entries.items()}
        except ProtocolError:
            for k, x in entries.items():
                _at(convert, x, f"key {k!r}")
            raise

    return convert_map


def _string_keys(check: Converter) -> Converter:
    """Wrap a map check: every key must be a string (ids, keys and names are)."""

    def check_keys(value: Any) -> Any:
        value = check(value)
        for k in value:
            if type(k) is not str:
                raise ProtocolError(f"map keys must be strings, got {type(k).__name__}")
        return value

    return check_keys


def _payload(value: Any) -> Payload:
    try:
        return Payload.from_wire(value)
    except Exception as exc:
        raise ProtocolError(str(exc)) from None


def _converter(tp: Any) -> Converter:
    """Compile a type annotation into a validating converter."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return _any
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = _converter(args[0]) if len(args) == 1 else _any
        return lambda v: None if v is None else inner(v)
    if tp is str:
        return _expect(str, "a string")
    if tp is bool:
        return _expect(bool, "a boolean")
    if tp is int:
        return _expect(int, "an integer")
    if tp is float:
        return _number
    if tp is bytes:
        return _expect((bytes, bytearray, memoryview), "binary data")
    if tp is Payload:
        return _payload
    if isinstance(tp, type) and issubclass(tp, Record):
        return tp.from_wire
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        item_conv = _converter(item)
        check = _expect(list, "an array")
        if item_conv is _any:
            return check
        return _list_of(item_conv, check)
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        value_conv = _converter(value_tp)
        check = _expect(dict, "a map")
        if key_tp is str:
            check = _string_keys(check)
        if value_conv is _any:
            return check
        return _map_of(value_conv, check)
    if tp is list:
        return _expect(list, "an array")
    if tp is dict:
        return _expect(dict, "a map")
    raise TypeError(f"unsupported field type {tp!r}")


R = TypeVar("R", bound=type[Record])


@dataclass_transform(field_specifiers=(dataclasses.field,))
def record(cls: R) -> R:
    """Class decorator: make ``cls`` a slotted dataclass with validating converters."""
    dc: Any = dataclasses.dataclass(slots=True)(cls)
    hints = typing.get_type_hints(dc)
    converters: dict[str, tuple[Converter, bool]] = {}
    for f in dataclasses.fields(dc):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        converters[f.name] = (_converter(hints[f.name]), required)
    dc._converters = converters
    dc.to_wire = _generate_to_wire(dc)
    dc.from_wire = classmethod(_with_fast_path(fast_decode.generate(dc, _MISSING), dc))
    op = getattr(dc, "op", None)
    if op is not None:
        if op in OPS:
            raise TypeError(f"op {op!r} declared twice")
        OPS[op] = dc
    return typing.cast(R, dc)


_INLINE_CHECKS = {str: "str", bool: "bool"}
_MISSING = object()


def _generate_to_wire(cls: Any) -> Callable[[Any], dict[str, Any]]:
    # Generated code: the hot path encodes tens of thousands of messages a second.
    op = getattr(cls, "op", None)
    lines = ["def to_wire(self):", f"    out = {{'op': {op!r}}}" if op else "    out = {}"]
    for name in cls._converters:
        lines += [f"    v = self.{name}", "    if v is not None:", f"        out[{name!r}] = v"]
    lines.append("    return out")
    namespace: dict[str, Any] = {}
    exec("\n".join(lines), namespace)
    return typing.cast(Callable[[Any], dict[str, Any]], namespace["to_wire"])


def _with_fast_path(fast: Converter, cls: Any) -> Callable[..., Any]:
    """``from_wire``: the generated fast decoder, else the careful one (which names errors)."""
    careful = _generate_from_wire(cls)

    def from_wire(_cls: Any, obj: Any) -> Any:
        try:
            return fast(obj)
        except Exception:  # fast_decode.Fallback, or anything it did not foresee
            return careful(_cls, obj)

    return from_wire


def _generate_from_wire(cls: Any) -> Callable[..., Any]:
    # Generated code with inline type checks: decoding is on every message's path.
    hints = typing.get_type_hints(cls)
    env: dict[str, Any] = {"ProtocolError": ProtocolError, "MISSING": _MISSING, "cls": cls}
    op = getattr(cls, "op", None)
    name_of = f"{op} ({cls.__name__})" if op is not None else cls.__name__
    lines = [
        "def from_wire(_cls, obj):",
        "    if type(obj) is not dict:",
        f"        raise ProtocolError('{name_of} must be a map, not ' + type(obj).__name__)",
        "    get = obj.get",
    ]
    args = []
    for f in dataclasses.fields(cls):
        convert, required = cls._converters[f.name]
        env[f"conv_{f.name}"] = convert
        tp = hints[f.name]
        convert_lines = [
            "    try:",
            f"        v = conv_{f.name}(v)",
            "    except ProtocolError as e:",
            f"        raise ProtocolError({f'{name_of} field {f.name!r}: '!r} + str(e)) from None",
        ]
        lines.append(f"    v = get({f.name!r}, MISSING)")
        if required:
            lines += [
                "    if v is MISSING:",
                f"        raise ProtocolError({f'{name_of} is missing the field {f.name!r}'!r})",
            ]
            if tp in _INLINE_CHECKS:
                t = _INLINE_CHECKS[tp]
                lines += [
                    f"    if type(v) is not {t}:",
                    "        raise ProtocolError("
                    f"{f'{name_of} field {f.name!r}: expected {t}, got '!r} + type(v).__name__)",
                ]
            else:
                lines += convert_lines
        else:
            default = fast_decode.default_expression(f, env, f"default_{f.name}")
            lines += [
                "    if v is MISSING or v is None:",
                f"        v = {default}",
                "    else:",
                *("    " + line for line in convert_lines),
            ]
        lines.append(f"    f_{f.name} = v")
        args.append(f"{f.name}=f_{f.name}")
    lines.append(f"    return cls({', '.join(args)})")
    source = "\n".join(lines)
    exec(source, env)
    generated = env["from_wire"]

    def from_wire(_cls: Any, obj: Any) -> Any:
        try:
            return generated(_cls, obj)
        except ProtocolError:
            raise
        except Exception as exc:
            raise ProtocolError(f"invalid {name_of}: {exc}") from None

    return from_wire


def decode_message(obj: dict[str, Any]) -> Message:
    """Validate one op map and return its typed message."""
    op = obj.get("op")
    cls = OPS.get(op) if isinstance(op, str) else None
    if cls is None:
        raise ProtocolError(f"unknown op {op!r}")
    return typing.cast(Message, cls.from_wire(obj))


# ---------------------------------------------------------------------------
# Records nested inside messages
# ---------------------------------------------------------------------------
@record
class ErrorInfo(Record):
    """A task's failure: readable by any language, rebuildable by Python."""

    typename: str
    message: str
    traceback_text: str = ""
    exception: Payload | None = None  # pickled exception (Python peers)
    traceback: Payload | None = None  # pickled traceback (tblib), may be absent


@record
class TaskSpec(Record):
    """A task as a client submits it."""

    key: str
    args: Payload  # (args, kwargs) for python; for other runtimes see protocol.md
    fn: str | None = None  # id into UpdateGraph.functions
    needs: list[str] | None = None  # ids of further functions the args refer to
    deps: list[str] = dataclasses.field(default_factory=list)
    priority: list[float] = dataclasses.field(default_factory=list)
    resources: dict[str, float] | None = None
    workers: list[str] | None = None
    allow_other_workers: bool = False
    retries: int = 0
    runtime: str | None = None
    environment: list[str] | None = None
    annotations: dict[str, Any] | None = None


@record
class ComputeTask(Record):
    """A task as the scheduler hands it to a worker."""

    key: str
    args: Payload
    run_id: int
    fn: str | None = None
    needs: list[str] | None = None
    who_has: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    nbytes: dict[str, int] = dataclasses.field(default_factory=dict)
    # The version of each input's value (see AddKeys); inputs not listed: 0, a computed value.
    versions: dict[str, int] | None = None
    priority: list[float] = dataclasses.field(default_factory=list)
    resources: dict[str, float] | None = None
    send_result: bool = False
    environment: list[str] | None = None  # environments it targets (teardown waits for it)
    # Clients waiting for the result: told straight from the worker when they watch it.
    notify: list[str] | None = None


# ---------------------------------------------------------------------------
# Handshake: the first messages of every connection
# ---------------------------------------------------------------------------
@record
class Hello(Message):
    """Server -> connector, first message: who I am and the auth challenge."""

    op: ClassVar[str] = "hello"
    protocol: int
    role: str
    challenge: bytes | None = None


@record
class Handshake(Message):
    """Connector -> server: role, identity and the answer to the challenge."""

    op: ClassVar[str] = "handshake"
    protocol: int
    role: str  # "client" | "worker" | "peer"
    id: str
    name: str | None = None
    response: bytes | None = None
    versions: dict[str, Any] | None = None


@record
class Welcome(Message):
    """Server -> connector: the handshake succeeded."""

    op: ClassVar[str] = "welcome"
    id: str
    info: dict[str, Any] | None = None


@record
class Refused(Message):
    """Server -> connector: the handshake failed; the server closes the connection."""

    op: ClassVar[str] = "refused"
    reason: str


# ---------------------------------------------------------------------------
# Worker -> scheduler
# ---------------------------------------------------------------------------
@record
class RegisterWorker(Message):
    """A worker joins: where peers reach it and what it offers."""

    op: ClassVar[str] = "register_worker"
    address: str
    nthreads: int
    name: str | None = None
    memory_limit: int = 0
    resources: dict[str, float] = dataclasses.field(default_factory=dict)
    pid: int = 0
    runtime: str = "python"
    versions: dict[str, Any] | None = None


@record
class TaskFinished(Message):
    """A task ran and its result is in the worker's memory."""

    op: ClassVar[str] = "task_finished"
    key: str
    run_id: int
    nbytes: int
    typename: str | None = None
    start: float = 0.0
    stop: float = 0.0
    result: Payload | None = None
    notified: list[str] | None = None  # clients the worker told itself (key_in_memory)


@record
class TaskErred(Message):
    """A task raised; ``error`` describes the exception."""

    op: ClassVar[str] = "task_erred"
    key: str
    run_id: int
    error: ErrorInfo
    start: float = 0.0
    stop: float = 0.0


@record
class AddKeys(Message):
    """The worker now holds copies of these keys (fetched from peers).

    ``versions`` names the value each copy is of, as the scheduler told the
    worker (``ComputeTask.versions``, ``UpdateWhoHas.versions``): 0 (keys not
    listed) is a key's computed value, and every scatter gives the key's new
    value a version of its own.  The scheduler takes a copy only if it is of
    the key's current value, so a copy of a value scattered over since never
    passes for the new one.  A worker that does not track versions leaves the
    field out; its copies are taken as they are.
    """

    op: ClassVar[str] = "add_keys"
    nbytes: dict[str, int]
    versions: dict[str, int] | None = None


@record
class MissingData(Message):
    """The worker could not get ``key`` from ``holder``; ask for fresh locations."""

    op: ClassVar[str] = "missing_data"
    key: str
    holder: str
    error: ErrorInfo | None = None  # the holder itself cannot serve it, and why


@record
class Unregister(Message):
    """A worker is leaving on purpose: its running tasks are not suspects."""

    op: ClassVar[str] = "unregister"
    reason: str = ""


@record
class Heartbeat(Message):
    """Periodic liveness and metrics from a worker or client."""

    op: ClassVar[str] = "heartbeat"
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------
# Scheduler -> worker
# ---------------------------------------------------------------------------
@record
class Compute(Message):
    """Run these tasks; ``functions`` holds each function the batch needs, once."""

    op: ClassVar[str] = "compute"
    tasks: list[ComputeTask]
    functions: dict[str, Payload] = dataclasses.field(default_factory=dict)


@record
class FreeKeys(Message):
    """Forget these keys: drop their data, cancel them if not started."""

    op: ClassVar[str] = "free_keys"
    keys: list[str]


@record
class Store(Message):
    """Keep this data in memory (scattered by a client)."""

    op: ClassVar[str] = "store"
    data: dict[str, Payload]
    versions: dict[str, int] | None = None  # the version of each value (see AddKeys)


@record
class UpdateWhoHas(Message):
    """Where the current value of these keys is (empty list: nowhere), and its version.

    The answer to ``missing_data``, and to ``add_keys`` reporting a copy of a
    value the key no longer has: a worker holding another version of a key
    listed here drops that copy.
    """

    op: ClassVar[str] = "update_who_has"
    who_has: dict[str, list[str]]
    versions: dict[str, int] | None = None  # keys not listed: 0 (see AddKeys)


@record
class CloseWorker(Message):
    """Shut down cleanly."""

    op: ClassVar[str] = "close_worker"
    reason: str = ""


# ---------------------------------------------------------------------------
# Peer <-> worker (workers and clients fetching data)
# ---------------------------------------------------------------------------
@record
class GetData(Message):
    """Ask a worker for the values of ``keys``.

    ``serializers``: the payload serializers the asker can read, best first
    (a JavaScript peer sends ``["msgpack"]``); ``None``: any (Python peers).
    """

    op: ClassVar[str] = "get_data"
    keys: list[str]
    serializers: list[str] | None = None


@record
class Data(Message):
    """The answer to :class:`GetData`: values found, and keys not held."""

    op: ClassVar[str] = "data"
    data: dict[str, Payload]
    missing: list[str] = dataclasses.field(default_factory=list)
    # The version of each value sent (see AddKeys).  A value sent but not listed
    # is taken for the version asked for (workers not tracking versions list none).
    versions: dict[str, int] | None = None


@record
class WatchResults(Message):
    """A client asks a worker to send it ``key_in_memory`` for the tasks it waits on.

    Sent on a connection of its own; from then on the worker writes there the
    small results of tasks whose ``compute`` names this client in ``notify``,
    sparing the scheduler's relay.  The scheduler still learns every result.
    """

    op: ClassVar[str] = "watch_results"


# ---------------------------------------------------------------------------
# Client -> scheduler
# ---------------------------------------------------------------------------
@record
class UpdateGraph(Message):
    """Submit tasks; ``wanted`` are the keys this client holds futures for."""

    op: ClassVar[str] = "update_graph"
    tasks: list[TaskSpec]
    wanted: list[str]
    functions: dict[str, Payload] = dataclasses.field(default_factory=dict)
    # A graph sent in parts: parts with ``more`` are computed and kept under
    # the id ``hold`` until the part without ``more`` (same id) arrives.
    hold: str | None = None
    more: bool = False


@record
class ReleaseKeys(Message):
    """The client dropped its last future for these keys."""

    op: ClassVar[str] = "release_keys"
    keys: list[str]


@record
class CancelKeys(Message):
    """Cancel these keys and everything that depends on them."""

    op: ClassVar[str] = "cancel_keys"
    keys: list[str]


@record
class Scatter(Message):
    """Place client data on workers; answered by a :class:`Reply`."""

    op: ClassVar[str] = "scatter"
    id: int
    data: dict[str, Payload]
    nbytes: dict[str, int]
    workers: list[str] | None = None
    broadcast: bool = False


@record
class Request(Message):
    """A read-only question to the scheduler (``method``), answered by a :class:`Reply`."""

    op: ClassVar[str] = "request"
    id: int
    method: str
    args: dict[str, Any] = dataclasses.field(default_factory=dict)


@record
class Reply(Message):
    """Answer to a request with the same ``id``: ``result`` or ``error``."""

    op: ClassVar[str] = "reply"
    id: int
    result: Any = None
    error: str | None = None


# ---------------------------------------------------------------------------
# Scheduler -> client
# ---------------------------------------------------------------------------
@record
class KeyInMemory(Message):
    """A wanted key finished; small results come inline."""

    op: ClassVar[str] = "key_in_memory"
    key: str
    who_has: list[str] = dataclasses.field(default_factory=list)
    typename: str | None = None
    result: Payload | None = None


@record
class KeyErred(Message):
    """A wanted key failed (or depends on one that failed)."""

    op: ClassVar[str] = "key_erred"
    key: str
    error: ErrorInfo


@record
class KeyCancelled(Message):
    """A wanted key was cancelled or lost beyond recovery."""

    op: ClassVar[str] = "key_cancelled"
    key: str
    reason: str = "cancelled"
    lost: bool = False


@record
class KeyLost(Message):
    """Every copy of a finished key was lost; it is being computed again."""

    op: ClassVar[str] = "key_lost"
    key: str


# ---------------------------------------------------------------------------
# Worker resources (issue 3): changing what a worker offers at run time
# ---------------------------------------------------------------------------
@record
class SetResources(Message):
    """Change what a worker offers; the named resources are replaced, others kept.

    Values are amounts, or lists of indices (``[0, 1]``: indexed, amount 2).
    Three uses, told apart by the sender:

    * client -> scheduler: set the resources of ``worker``; answered by a
      :class:`Reply` with the same ``id`` (an error if the worker is unknown or
      the values are invalid);
    * scheduler -> worker: your resources are now these;
    * worker -> scheduler: my resources are now these (``worker`` and ``id``
      unset), after ``Worker.set_resources`` on the worker itself.
    """

    op: ClassVar[str] = "set_resources"
    resources: dict[str, Any]
    worker: str | None = None
    id: int | None = None


# ---------------------------------------------------------------------------
# Plugins and run (issue 4): code shipped to workers and the scheduler.
# Payloads here are opaque to the scheduler, except those of
# register_scheduler_plugin and run_on_scheduler, which are meant to run on it.
# ---------------------------------------------------------------------------
@record
class Outcome(Record):
    """One worker's (or the scheduler's) answer: a pickled ``result`` or an ``error``."""

    result: Payload | None = None
    error: ErrorInfo | None = None


@record
class RegisterWorkerPlugin(Message):
    """Client -> scheduler: keep this worker plugin and set it up on every worker.

    ``plugin`` stays opaque to the scheduler; it is handed to every current
    worker and to every worker that joins later (``setup_plugin``).  A name
    already registered is replaced (torn down, then set up anew) unless
    ``idempotent``, which keeps the first.  Answered by :class:`Results`: one
    outcome per current worker.
    """

    op: ClassVar[str] = "register_worker_plugin"
    id: int
    name: str
    plugin: Payload
    idempotent: bool = False
    nanny: bool = False  # a NannyPlugin: set up by each worker's supervisor


@record
class UnregisterWorkerPlugin(Message):
    """Client -> scheduler: forget a worker plugin and tear it down on every worker.

    Answered by :class:`Results`; an unknown ``name`` is an error (ValueError).
    """

    op: ClassVar[str] = "unregister_worker_plugin"
    id: int
    name: str
    nanny: bool = False  # the nanny plugin of that name (they have names of their own)


@record
class RegisterSchedulerPlugin(Message):
    """Client -> scheduler: unpickle this plugin on the scheduler, start and add it.

    The one op (with ``run_on_scheduler``) whose payload the scheduler loads:
    accepted from clients only, that is from peers that passed the handshake
    (and its token check when the scheduler has a token).  Answered by
    :class:`Results`.
    """

    op: ClassVar[str] = "register_scheduler_plugin"
    id: int
    name: str
    plugin: Payload
    idempotent: bool = False


@record
class UnregisterSchedulerPlugin(Message):
    """Client -> scheduler: close and remove a scheduler plugin; answered by :class:`Results`."""

    op: ClassVar[str] = "unregister_scheduler_plugin"
    id: int
    name: str


@record
class Run(Message):
    """Client -> scheduler: call ``function(*args, **kwargs)`` on workers.

    ``args`` holds the pickled ``(args, kwargs)``.  ``workers``: addresses or
    names (all workers when unset).  The scheduler forwards ``worker_run`` to
    each and answers with :class:`Results`, one outcome per worker.  With
    ``wait`` false, a coroutine function is started and not awaited.
    """

    op: ClassVar[str] = "run"
    id: int
    function: Payload
    args: Payload
    workers: list[str] | None = None
    wait: bool = True


@record
class RunOnScheduler(Message):
    """Client -> scheduler: call ``function(*args, **kwargs)`` on the scheduler itself.

    Clients only (see :class:`RegisterSchedulerPlugin`); answered by
    :class:`Results` with one outcome under the scheduler's address.
    """

    op: ClassVar[str] = "run_on_scheduler"
    id: int
    function: Payload
    args: Payload


@record
class Results(Message):
    """Scheduler -> client: the answer to the ops above with the same ``id``.

    ``outcomes`` maps each worker address (or the scheduler's) to what it
    answered; ``error`` is set when the request as a whole failed.
    """

    op: ClassVar[str] = "results"
    id: int
    outcomes: dict[str, Outcome] = dataclasses.field(default_factory=dict)
    error: ErrorInfo | None = None


@record
class SetupPlugin(Message):
    """Scheduler -> worker: load and set up this plugin (replacing one of the same name).

    ``registration`` identifies one registration: a worker that already set
    it up (it reconnected) answers at once.  Messages after this one are
    handled once the setup finished.  Answered by :class:`WorkerResult`.
    """

    op: ClassVar[str] = "setup_plugin"
    id: int
    name: str
    plugin: Payload
    registration: str
    nanny: bool = False  # hand it to this worker's supervisor (corral.nanny_channel)


@record
class TeardownPlugin(Message):
    """Scheduler -> worker: tear down and forget plugin ``name``.

    Answered by :class:`WorkerResult`.
    """

    op: ClassVar[str] = "teardown_plugin"
    id: int
    name: str
    nanny: bool = False  # the supervisor's nanny plugin of that name


@record
class WorkerRun(Message):
    """Scheduler -> worker: call a function on the worker (see :class:`Run`).

    Answered by :class:`WorkerResult`.
    """

    op: ClassVar[str] = "worker_run"
    id: int
    function: Payload
    args: Payload
    wait: bool = True


@record
class WorkerResult(Message):
    """Worker -> scheduler: the answer to ``setup_plugin``, ``teardown_plugin``, ``worker_run``."""

    op: ClassVar[str] = "worker_result"
    id: int
    outcome: Outcome


# ---------------------------------------------------------------------------
# Worker environments (issue 5): named sets of workers, prepared by a setup.
# The environment payload is opaque to the scheduler (a pickled
# ``corral.WorkerEnvironment``); membership travels as ``environment_status``.
# ---------------------------------------------------------------------------
@record
class RegisterWorkerEnvironment(Message):
    """Client -> scheduler: keep this environment; check it on every current and future worker.

    A name already registered is replaced: workers tear the old one down, then
    check the new one's condition and set it up where it holds.  Answered by
    :class:`Results`, one outcome per current worker (the pickled membership,
    ``True`` or ``False``, and the error of a failing condition or setup).
    """

    op: ClassVar[str] = "register_worker_environment"
    id: int
    name: str
    environment: Payload


@record
class UnregisterWorkerEnvironment(Message):
    """Client -> scheduler: forget an environment; every member tears it down.

    Answered by :class:`Results`; an unknown ``name`` is an error (ValueError).
    """

    op: ClassVar[str] = "unregister_worker_environment"
    id: int
    name: str


@record
class RefreshWorkerEnvironment(Message):
    """Client -> scheduler: check the environment's condition again on every worker.

    Workers that now qualify join (setup); members that no longer do leave
    (teardown).  Answered by :class:`Results` as ``register_worker_environment``.
    """

    op: ClassVar[str] = "refresh_worker_environment"
    id: int
    name: str


@record
class CheckEnvironment(Message):
    """Scheduler -> worker: check this environment's condition; join (setup) or leave.

    ``registration`` identifies one registration: a worker holding another
    registration of ``name`` tears that one down first.  A member whose
    condition still holds stays a member without a second setup.  Answered by
    :class:`EnvironmentStatus` with the same ``id``.
    """

    op: ClassVar[str] = "check_environment"
    id: int
    name: str
    environment: Payload
    registration: str


@record
class TeardownEnvironment(Message):
    """Scheduler -> worker: leave environment ``name`` (teardown if a member) and forget it.

    Answered by :class:`EnvironmentStatus` with the same ``id``.
    """

    op: ClassVar[str] = "teardown_environment"
    id: int
    name: str


@record
class EnvironmentStatus(Message):
    """Worker -> scheduler: this worker's membership of ``name`` (after setup, or after it left).

    Sent in answer to ``check_environment`` / ``teardown_environment`` (with
    their ``id``) and when the worker leaves environments as it closes.  Only
    a status for the current ``registration`` of ``name`` changes membership.
    ``stage`` and ``error``: what failed (``"load"``, ``"condition"``,
    ``"setup"`` or ``"teardown"``) and how.
    """

    op: ClassVar[str] = "environment_status"
    name: str
    registration: str
    member: bool
    id: int | None = None
    stage: str | None = None
    error: ErrorInfo | None = None


# ---------------------------------------------------------------------------
# Consistency (issue 6): version checks and worker restarts.
# Versions travel in the handshake (``handshake.versions``); a scheduler in
# strict mode refuses a mismatched worker there, with ``refused``.
# ---------------------------------------------------------------------------
@record
class CheckVersions(Message):
    """Client -> scheduler: the versions of the scheduler and of every worker, please.

    ``mode`` is the client's ``version_check``: with ``"strict"`` the
    scheduler also refuses workers whose versions differ from this client's
    for as long as it stays connected.  Answered by :class:`Reply` with
    ``{"scheduler": versions, "workers": {address: versions}}``.
    """

    op: ClassVar[str] = "check_versions"
    id: int
    mode: str = "warn"


@record
class RestartWorkers(Message):
    """Client -> scheduler: restart these workers' processes (all workers when unset).

    Only workers run by a supervisor (``supervised``) can be restarted; an
    unknown or unsupervised worker makes the whole request fail before
    anything happens.  With ``forget`` (``client.restart()``) every task of
    every client is cancelled first.  Answered by :class:`Results`: per
    worker, the new process's address, or an error (``TimeoutError`` when it
    did not come back within ``timeout`` seconds).  Without ``wait``, the
    answer comes as soon as the workers were told to restart, with no result.
    """

    op: ClassVar[str] = "restart_workers"
    id: int
    workers: list[str] | None = None
    timeout: float = 60.0
    reason: str = ""
    forget: bool = False
    wait: bool = True


@record
class RestartWorker(Message):
    """Scheduler -> worker: leave (``unregister``) and exit; the supervisor starts afresh."""

    op: ClassVar[str] = "restart_worker"
    reason: str = ""


@record
class Supervised(Message):
    """Worker -> scheduler, right after ``register_worker``: a supervisor restarts me.

    ``slot`` stays the same across restarts of this worker's process, so the
    scheduler knows the new process for the old one.
    """

    op: ClassVar[str] = "supervised"
    slot: str


@record
class WorkerRestarting(Message):
    """Worker -> scheduler: I am restarting on my own (e.g. ``PipInstall(restart_workers=True)``).

    Sent before the worker leaves; the scheduler waits for it to come back as
    for a requested restart (an answer owed to a client waits too).
    """

    op: ClassVar[str] = "worker_restarting"
    reason: str = ""
