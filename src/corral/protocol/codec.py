"""Encoding typed messages to frames and decoding frames to typed messages.

Frame 0 of every wire message is a msgpack array of op maps (a batch of one
or more messages).  Binary data of at least :data:`OUT_OF_BAND_MIN` bytes
inside a payload is moved to its own frame and replaced by the msgpack
extension type 1, whose 4-byte little-endian body is the frame's index.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import msgpack

from ..errors import ProtocolError
from .framing import Frame
from .serialize import OUT_OF_BAND_MIN, Payload

FRAME_REF = 1
_U32 = struct.Struct("<I")


class Encoder:
    """Packs batches of messages; not thread-safe (one per connection)."""

    def __init__(self) -> None:
        self._frames: list[Frame] = []
        self._packer = msgpack.Packer(default=self._default, use_bin_type=True, autoreset=True)

    def _default(self, obj: Any) -> Any:
        if isinstance(obj, Payload):  # the most common object inside a message
            frames = obj.frames
            for f in frames:
                if (len(f) if type(f) is bytes else memoryview(f).nbytes) >= OUT_OF_BAND_MIN:
                    frames = [self._out_of_band(f) for f in frames]
                    break
            return {"serializer": obj.serializer, "frames": frames}
        to_wire = getattr(obj, "to_wire", None)
        if to_wire is None:
            raise TypeError(f"cannot encode {type(obj).__name__} in a message header")
        return to_wire()

    def _out_of_band(self, frame: Frame) -> Any:
        """A large frame travels as its own frame; the header refers to it."""
        if memoryview(frame).nbytes < OUT_OF_BAND_MIN:
            return frame
        self._frames.append(frame)
        return msgpack.ExtType(FRAME_REF, _U32.pack(len(self._frames)))

    def encode(self, messages: Sequence[Any]) -> list[Frame]:
        """Return the frames of one wire message carrying ``messages``."""
        self._frames = []
        try:
            header = self._packer.pack(list(messages))
        except Exception:
            self._packer.reset()
            raise
        frames, self._frames = self._frames, []
        return [header, *frames]


def decode(frames: Sequence[Frame]) -> list[dict[str, Any]]:
    """Decode one wire message into its list of op maps (not yet typed)."""

    def ext_hook(code: int, data: bytes) -> Any:
        if code != FRAME_REF or len(data) != 4:
            raise ProtocolError(f"unknown msgpack extension type {code}")
        (index,) = _U32.unpack(data)
        if not 1 <= index < len(frames):
            raise ProtocolError(f"frame reference {index} out of range")
        return frames[index]

    try:
        obj = msgpack.unpackb(
            frames[0], raw=False, ext_hook=ext_hook, strict_map_key=False, use_list=True
        )
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"undecodable message header: {exc}") from None
    if isinstance(obj, dict):
        obj = [obj]
    if not isinstance(obj, list) or not all(isinstance(m, dict) for m in obj):
        raise ProtocolError("message header must be a map or an array of maps")
    return obj
