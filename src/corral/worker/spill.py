"""A worker's data store that moves the least recently used values to disk.

:class:`SpillBuffer` is a mapping like the plain ``dict`` it replaces as
``Worker.data`` when spilling is on (``corral worker --memory-spill-fraction
0.7``).  Values live in memory (``fast``) while their estimated size
(:func:`~corral.protocol.serialize.sizeof`) stays under ``target`` bytes;
past it, the least recently used ones are pickled to files under the
worker's local directory (``slow``).  Reading a spilled value loads it back
(and it becomes the most recently used).  The worker's memory monitor also
calls :meth:`SpillBuffer.evict` while the process's RSS is above its spill
mark, since sizes are only estimates.

Values that cannot be pickled (a lock, say) stay in memory.  Safe to use from
the event loop and the task threads at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import struct
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator, MutableMapping
from typing import Any

from ..protocol.framing import Frame
from ..protocol.serialize import Payload, deserialize, serialize, sizeof

logger = logging.getLogger("corral.worker")

_U64 = struct.Struct("<Q")


class SpillBuffer(MutableMapping[str, Any]):
    """Keep values in memory up to ``target`` bytes; spill the least recently used to disk."""

    def __init__(self, directory: str | None, target: int) -> None:
        base = directory or tempfile.gettempdir()
        os.makedirs(base, exist_ok=True)
        self.directory = tempfile.mkdtemp(prefix="corral-spill-", dir=base)
        self.target = target
        self.fast: OrderedDict[str, Any] = OrderedDict()
        self.weights: dict[str, int] = {}
        self.fast_bytes = 0
        self.slow: dict[str, int] = {}  # key -> bytes on disk
        self.unspillable: set[str] = set()
        self.spilled_total = 0  # values written to disk so far
        self.unspilled_total = 0  # values read back
        self._lock = threading.RLock()

    # -- the mapping -----------------------------------------------------------------
    def __setitem__(self, key: str, value: Any) -> None:
        with self._lock:
            self._discard(key)
            weight = sizeof(value)
            self.fast[key] = value
            self.weights[key] = weight
            self.fast_bytes += weight
            self._evict_to(self.target, keep=key if weight <= self.target else None)

    def __getitem__(self, key: str) -> Any:
        with self._lock:
            if key in self.fast:
                self.fast.move_to_end(key)
                return self.fast[key]
            if key not in self.slow:
                raise KeyError(key)
            value = self._read(key)
            self._remove_file(key)
            self.unspilled_total += 1
            weight = sizeof(value)
            self.fast[key] = value
            self.weights[key] = weight
            self.fast_bytes += weight
            self._evict_to(self.target, keep=key)
            return value

    def __delitem__(self, key: str) -> None:
        with self._lock:
            if key not in self.fast and key not in self.slow:
                raise KeyError(key)
            self._discard(key)

    def __contains__(self, key: object) -> bool:
        return key in self.fast or key in self.slow

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter([*self.fast, *self.slow])

    def __len__(self) -> int:
        return len(self.fast) + len(self.slow)

    def clear(self) -> None:
        with self._lock:
            for key in list(self.slow):
                self._remove_file(key)
            self.fast.clear()
            self.weights.clear()
            self.unspillable.clear()
            self.fast_bytes = 0

    # -- spilling ----------------------------------------------------------------------
    def evict(self) -> int:
        """Spill the least recently used value that can be spilled; return its size (0: none)."""
        with self._lock:
            for key in self.fast:
                if key in self.unspillable:
                    continue
                weight = self.weights.get(key, 0)
                if self._spill(key):
                    return max(weight, 1)
            return 0

    def _evict_to(self, target: int, keep: str | None = None) -> None:
        if self.fast_bytes <= target:
            return
        for key in list(self.fast):
            if self.fast_bytes <= target:
                return
            if key == keep or key in self.unspillable:
                continue
            self._spill(key)

    def _spill(self, key: str) -> bool:
        value = self.fast[key]
        try:
            payload = serialize(value)
        except Exception:
            self.unspillable.add(key)  # kept in memory
            return False
        path = self._path(key)
        try:
            with open(path, "wb") as f:
                encoded = payload.serializer.encode()
                f.write(_U64.pack(len(encoded)) + encoded)
                f.write(_U64.pack(len(payload.frames)))
                for frame in payload.frames:
                    f.write(_U64.pack(memoryview(frame).nbytes))
                for frame in payload.frames:
                    f.write(frame)
                size = f.tell()
        except OSError:
            logger.exception("cannot spill %r to %s; keeping it in memory", key, path)
            self.unspillable.add(key)
            return False
        del self.fast[key]
        self.fast_bytes -= self.weights.pop(key, 0)
        self.slow[key] = size
        self.spilled_total += 1
        return True

    def _read(self, key: str) -> Any:
        with open(self._path(key), "rb") as f:
            (n,) = _U64.unpack(f.read(8))
            serializer = f.read(n).decode()
            (count,) = _U64.unpack(f.read(8))
            lengths = [_U64.unpack(f.read(8))[0] for _ in range(count)]
            frames: list[Frame] = [f.read(length) for length in lengths]
        return deserialize(Payload(serializer, frames))

    def _discard(self, key: str) -> None:
        if key in self.fast:
            del self.fast[key]
            self.fast_bytes -= self.weights.pop(key, 0)
        if key in self.slow:
            self._remove_file(key)
        self.unspillable.discard(key)

    def _remove_file(self, key: str) -> None:
        self.slow.pop(key, None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(key))

    def _path(self, key: str) -> str:
        return os.path.join(self.directory, hashlib.sha1(key.encode()).hexdigest())

    @property
    def spilled_bytes(self) -> int:
        """Bytes of values on disk."""
        return sum(self.slow.values())

    def close(self) -> None:
        """Forget everything and remove the spill folder."""
        self.clear()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __repr__(self) -> str:
        return (
            f"<SpillBuffer: {len(self.fast)} in memory ({self.fast_bytes} bytes), "
            f"{len(self.slow)} on disk ({self.spilled_bytes} bytes)>"
        )
