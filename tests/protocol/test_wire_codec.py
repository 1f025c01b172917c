"""Encoder / decode: msgpack headers and out-of-band binary frames."""

from __future__ import annotations

import struct

import msgpack
import pytest

from corral.errors import ProtocolError
from corral.protocol import Payload, serialize
from corral.protocol.codec import FRAME_REF, Encoder, decode
from corral.protocol.framing import FrameDecoder, encode_frames
from corral.protocol.messages import Data, GetData, Store, decode_message
from corral.protocol.serialize import OUT_OF_BAND_MIN, deserialize


def ref(index: int) -> msgpack.ExtType:
    return msgpack.ExtType(FRAME_REF, struct.pack("<I", index))


def header(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def test_big_payload_frames_travel_out_of_band() -> None:
    big1 = bytes(range(256)) * (OUT_OF_BAND_MIN // 256 + 1)
    big2 = b"\x07" * (2 * 1024 * 1024)
    small = b"tiny"
    msg = Data(data={"a": Payload("pickle", [small, big1]), "b": Payload("msgpack", [big2])})
    frames = Encoder().encode([msg])
    assert len(frames) == 3
    assert frames[1] is big1 and frames[2] is big2  # no copies in user space
    assert len(frames[0]) < 200  # the header only refers to them
    raw = msgpack.unpackb(frames[0], raw=False, ext_hook=lambda c, d: (c, d))
    assert raw[0]["data"]["a"]["frames"] == [small, (1, struct.pack("<I", 1))]
    assert raw[0]["data"]["b"]["frames"] == [(1, struct.pack("<I", 2))]
    [got] = [decode_message(m) for m in decode(frames)]
    assert got == msg


def test_threshold_is_inclusive() -> None:
    at = b"a" * OUT_OF_BAND_MIN
    below = b"b" * (OUT_OF_BAND_MIN - 1)
    frames = Encoder().encode([Store(data={"x": Payload("pickle", [below, at])})])
    assert len(frames) == 2 and frames[1] is at


def test_pickle5_buffers_are_not_copied_into_the_header() -> None:
    np = pytest.importorskip("numpy")
    array = np.arange(3 * OUT_OF_BAND_MIN, dtype="uint8")
    payload = serialize(array)
    assert len(payload.frames) == 2  # pickle head + the array's buffer, out of band
    frames = Encoder().encode([Store(data={"k": payload})])
    assert len(frames) == 2
    assert memoryview(frames[1]).obj is array  # still the user's memory
    [msg] = [decode_message(m) for m in decode(frames)]
    assert isinstance(msg, Store)
    assert (deserialize(msg.data["k"]) == array).all()


def test_full_stack_round_trip_over_frames() -> None:
    enc = Encoder()
    msgs = [
        GetData(keys=["x", "y"]),
        Data(data={"x": Payload("pickle", [b"p" * 100_000, b"q"])}, missing=["y"]),
    ]
    stream = b"".join(bytes(b) for b in encode_frames(enc.encode(msgs)))
    stream += b"".join(bytes(b) for b in encode_frames(enc.encode(msgs[:1])))
    decoder = FrameDecoder()
    batches = decoder.feed(stream)
    assert [[decode_message(m) for m in decode(fr)] for fr in batches] == [msgs, msgs[:1]]


def test_encoder_recovers_after_an_unencodable_object() -> None:
    enc = Encoder()
    with pytest.raises(TypeError, match="cannot encode object"):
        enc.encode([GetData(keys=[object()])])  # type: ignore[list-item]
    frames = enc.encode([GetData(keys=["ok"])])
    assert [decode_message(m) for m in decode(frames)] == [GetData(keys=["ok"])]


def test_a_single_map_header_is_accepted() -> None:
    assert decode([header({"op": "get_data", "keys": []})]) == [{"op": "get_data", "keys": []}]


@pytest.mark.parametrize("index", [0, 2, 3, 2**32 - 1])
def test_frame_references_out_of_range_are_rejected(index: int) -> None:
    frames = [header([{"op": "store", "data": {"k": {"serializer": "x", "frames": [ref(index)]}}}])]
    frames.append(b"only frame 1 exists")
    with pytest.raises(ProtocolError, match=f"frame reference {index} out of range"):
        decode(frames)


def test_frame_reference_in_range_resolves_to_that_frame() -> None:
    frames = [header([{"op": "x", "v": [ref(2), ref(1)]}]), b"one", b"two"]
    assert decode(frames) == [{"op": "x", "v": [b"two", b"one"]}]


@pytest.mark.parametrize(
    ("ext", "match"),
    [
        (msgpack.ExtType(2, struct.pack("<I", 1)), "unknown msgpack extension type 2"),
        (msgpack.ExtType(FRAME_REF, b"\x01\x00\x00"), "unknown msgpack extension type 1"),
        (msgpack.ExtType(FRAME_REF, b"\x01\x00\x00\x00\x00"), "unknown msgpack extension"),
    ],
)
def test_malformed_extension_types_are_rejected(ext: msgpack.ExtType, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode([header([{"op": "x", "v": ext}]), b"frame"])


@pytest.mark.parametrize(
    "frame0",
    [
        b"",  # empty
        b"\xc1",  # a byte msgpack never uses
        b"\x92\x80",  # array of 2 with 1 element: truncated
        header([{"op": "x"}]) + b"\x00",  # trailing bytes
        b"\xdd\xff\xff\xff\xff",  # array announcing 4 billion items
    ],
)
def test_undecodable_headers_are_rejected(frame0: bytes) -> None:
    with pytest.raises(ProtocolError, match="undecodable message header"):
        decode([frame0])


@pytest.mark.parametrize("obj", [1, "op", b"bin", None, [1], [{"op": "x"}, "y"], [[{}]]])
def test_headers_must_be_maps_or_arrays_of_maps(obj: object) -> None:
    with pytest.raises(ProtocolError, match="map or an array of maps"):
        decode([header(obj)])
