"""Turning user objects into payloads and back.

A :class:`Payload` is what travels for functions, arguments and results: a
serializer name plus a list of binary frames.  The scheduler never looks
inside one.  Two serializers exist:

* ``"pickle"``: cloudpickle with pickle protocol 5; large buffers (bytes,
  NumPy arrays) become extra frames instead of being copied into the pickle.
* ``"msgpack"``: plain data (numbers, strings, lists, maps, bytes), readable by
  workers and clients written in any language.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import pickle
import sys
import threading
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import msgpack

from ..errors import SerializationError

Frame = bytes | bytearray | memoryview

#: Buffers smaller than this stay inside the pickle: an extra frame costs more.
OUT_OF_BAND_MIN = 64 * 1024

#: In the msgpack arguments of a task of another runtime, ``{REF_KEY: key}``
#: stands for the value of ``key`` (the msgpack counterpart of :class:`Ref`).
REF_KEY = "__corral_ref__"


@dataclass(slots=True)
class Payload:
    """Opaque serialized data: ``serializer`` names how ``frames`` decode."""

    serializer: str
    frames: list[Frame] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Total size of the frames in bytes."""
        return sum(memoryview(f).nbytes for f in self.frames)

    def to_wire(self) -> dict[str, Any]:
        """Return the protocol's map form of this payload."""
        return {"serializer": self.serializer, "frames": self.frames}

    @classmethod
    def from_wire(cls, obj: Any) -> Payload:
        """Build a payload from its map form, validating the shape."""
        if isinstance(obj, Payload):
            return obj
        if (
            not isinstance(obj, dict)
            or not isinstance(obj.get("serializer"), str)
            or not isinstance(obj.get("frames"), list)
        ):
            raise SerializationError(f"malformed payload: {type(obj).__name__}")
        frames = obj["frames"]
        for f in frames:
            if not isinstance(f, bytes | bytearray | memoryview):
                raise SerializationError("payload frames must be binary")
        return cls(obj["serializer"], frames)


class Ref:
    """Placeholder for a dependency's value inside pickled task arguments."""

    __slots__ = ("key",)

    def __init__(self, key: str):
        self.key = key

    def __reduce__(self) -> tuple[Any, ...]:
        return (Ref, (self.key,))

    def __repr__(self) -> str:
        return f"Ref({self.key!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ref) and other.key == self.key

    def __hash__(self) -> int:
        return hash(("corral-ref", self.key))


def _dumps_pickle(obj: Any) -> list[Frame]:
    buffers: list[pickle.PickleBuffer] = []

    def keep_large(buf: pickle.PickleBuffer) -> bool:
        if buf.raw().nbytes < OUT_OF_BAND_MIN:
            return True  # serialize in band
        buffers.append(buf)
        return False

    try:
        head = pickle.dumps(obj, protocol=5, buffer_callback=keep_large)
        if b"__main__" in head:
            # Something from the user's script or notebook: workers must get it by value.
            raise pickle.PicklingError("refers to __main__")
    except Exception:
        buffers.clear()
        head = cloudpickle.dumps(obj, protocol=5, buffer_callback=keep_large)
    return [head, *(b.raw() for b in buffers)]


def _needs_by_value(obj: Any) -> bool:
    """True for functions pickle would store by reference but workers cannot import."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", "")
    return module in ("__main__", None) or "<lambda>" in qualname or "<locals>" in qualname


#: Types pickled as they are: nothing in them travels out of band or by value.
_SCALARS = frozenset({int, float, bool, str, type(None), complex})


def serialize(obj: Any, serializer: str = "pickle") -> Payload:
    """Serialize ``obj``; raise :class:`SerializationError` naming the cause."""
    if type(obj) in _SCALARS and serializer == "pickle":  # most small results
        return Payload("pickle", [pickle.dumps(obj, protocol=5)])
    try:
        if serializer == "msgpack":
            return Payload("msgpack", [msgpack.packb(obj, use_bin_type=True)])
        if serializer != "pickle":
            raise SerializationError(f"unknown serializer {serializer!r}")
        if callable(obj) and _needs_by_value(obj):
            return Payload("pickle", [cloudpickle.dumps(obj, protocol=5)])
        return Payload("pickle", _dumps_pickle(obj))
    except SerializationError:
        raise
    except Exception as exc:
        raise SerializationError(
            f"cannot serialize object of type {type(obj).__name__}: {exc}"
        ) from exc


def serialize_function(fn: Any) -> Payload:
    """Serialize a callable by value when needed (``__main__``, lambdas, closures)."""
    try:
        if getattr(fn, "__module__", None) in (None, "__main__") or "<lambda>" in getattr(
            fn, "__qualname__", ""
        ):
            return Payload("pickle", [cloudpickle.dumps(fn, protocol=5)])
        try:
            return Payload("pickle", [pickle.dumps(fn, protocol=5)])
        except Exception:
            return Payload("pickle", [cloudpickle.dumps(fn, protocol=5)])
    except Exception as exc:
        raise SerializationError(f"cannot serialize function {fn!r}: {exc}") from exc


_resolver = threading.local()


def function_by_id(fid: str) -> Any:
    """Resolve a function shipped once in a batch's ``functions`` table (worker side)."""
    lookup = getattr(_resolver, "lookup", None)
    if lookup is None:
        raise SerializationError(f"function {fid} referenced outside a task")
    return lookup(fid)


@contextlib.contextmanager
def resolving_functions(lookup: Callable[[str], Any]) -> Iterator[None]:
    """Within this block, :func:`function_by_id` resolves ids with ``lookup``."""
    previous = getattr(_resolver, "lookup", None)
    _resolver.lookup = lookup
    try:
        yield
    finally:
        _resolver.lookup = previous


class FunctionTable:
    """Pickles objects, sending functions that need by-value pickling only once.

    Functions from ``__main__``, lambdas and closures are serialized once each
    into :attr:`payloads` (by content id) and referenced from every pickle
    that uses them, instead of being cloudpickled into each.
    """

    def __init__(self) -> None:
        self.payloads: dict[str, Payload] = {}
        self._ids: dict[int, tuple[Any, str]] = {}

    def _fid(self, fn: Any) -> str:
        entry = self._ids.get(id(fn))
        if entry is not None and entry[0] is fn:
            return entry[1]
        payload = Payload("pickle", [cloudpickle.dumps(fn, protocol=5)])
        fid = payload_digest(payload)
        self.payloads[fid] = payload
        self._ids[id(fn)] = (fn, fid)
        return fid

    def dumps(self, obj: Any) -> tuple[Payload, list[str]]:
        """Pickle ``obj``; return the payload and the function ids it refers to."""
        # Fast path, all in C: plain pickle refuses lambdas and local functions
        # and names __main__ for the rest of what must travel by value.
        try:
            head = pickle.dumps(obj, protocol=5)
        except Exception:
            pass
        else:
            if b"__main__" not in head:
                return Payload("pickle", [head]), []
        buf = io.BytesIO()
        pickler = _TablePickler(buf, self)
        try:
            pickler.dump(obj)
        except Exception:
            return serialize(obj), []
        head = buf.getvalue()
        if b"__main__" in head:  # e.g. an instance of a class defined in __main__
            return serialize(obj), []
        return Payload("pickle", [head]), list(pickler.used)


class _TablePickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, table: FunctionTable) -> None:
        super().__init__(file, protocol=5)
        self.table = table
        self.used: dict[str, None] = {}

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is types.FunctionType and _needs_by_value(obj):
            fid = self.table._fid(obj)
            self.used[fid] = None
            return function_by_id, (fid,)
        return NotImplemented


def deserialize(payload: Payload) -> Any:
    """Rebuild the object a payload holds."""
    if payload.serializer == "pickle":
        if not payload.frames:
            raise SerializationError("pickle payload has no frames")
        head, *buffers = payload.frames
        return pickle.loads(head, buffers=buffers)
    if payload.serializer == "msgpack":
        if not payload.frames:
            raise SerializationError("msgpack payload has no frames")
        return msgpack.unpackb(payload.frames[0], raw=False, strict_map_key=False)
    raise SerializationError(f"unknown serializer {payload.serializer!r}")


def payload_digest(payload: Payload) -> str:
    """Content hash identifying a payload (used to send a function once)."""
    h = hashlib.blake2b(digest_size=12)
    h.update(payload.serializer.encode())
    for f in payload.frames:
        h.update(f)
    return h.hexdigest()


def sizeof(obj: Any) -> int:
    """Best-effort size in bytes of a Python object, for placement decisions."""
    kind = type(obj)
    if kind is int or kind is float or kind is bool or obj is None:
        return sys.getsizeof(obj)  # spares the failed attribute look-up below
    nbytes = getattr(obj, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if isinstance(obj, bytes | bytearray | str):
        return len(obj)
    if isinstance(obj, memoryview):
        return obj.nbytes
    if isinstance(obj, list | tuple | set | frozenset) and len(obj) < 1000:
        return sys.getsizeof(obj) + sum(sizeof(o) for o in obj)
    try:
        return sys.getsizeof(obj)
    except Exception:
        return 64
