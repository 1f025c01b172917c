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

import hashlib
import pickle
import sys
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import msgpack

from ..errors import SerializationError

Frame = bytes | bytearray | memoryview

#: Buffers smaller than this stay inside the pickle: an extra frame costs more.
OUT_OF_BAND_MIN = 64 * 1024


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
    """True for objects pickle would store by reference but workers cannot import."""
    module = getattr(obj, "__module__", None)
    return module == "__main__" or module is None


def serialize(obj: Any, serializer: str = "pickle") -> Payload:
    """Serialize ``obj``; raise :class:`SerializationError` naming the cause."""
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
