"""FrameDecoder / encode_frames: the byte layout of every message on a stream."""

from __future__ import annotations

import itertools
import os
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.errors import ProtocolError
from corral.protocol.framing import (
    DEFAULT_MAX_FRAME_BYTES,
    SMALL_FRAME,
    FrameDecoder,
    encode_frames,
    frame_prefix,
)

DETERMINISTIC = settings(derandomize=True, database=None, deadline=None, max_examples=150)

# Sizes around every boundary the decoder treats specially, plus small random ones.
SIZES = st.one_of(
    st.integers(0, 300),
    st.sampled_from([7, 8, 9, SMALL_FRAME - 1, SMALL_FRAME, SMALL_FRAME + 1, 200_000]),
)


def blob(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def wire(messages: list[list[bytes]]) -> bytes:
    return b"".join(bytes(buf) for frames in messages for buf in encode_frames(frames))


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@st.composite
def message_streams(draw: st.DrawFn) -> list[list[bytes]]:
    n_messages = draw(st.integers(1, 5))
    messages = []
    for _ in range(n_messages):
        sizes = draw(st.lists(SIZES, min_size=1, max_size=4))
        messages.append([blob(size, draw(st.integers(0, 2**32))) for size in sizes])
    return messages


@DETERMINISTIC
@given(messages=message_streams(), cuts=st.lists(st.integers(0, 2**31), max_size=40))
def test_round_trip_with_random_chunking(messages: list[list[bytes]], cuts: list[int]) -> None:
    decoder = FrameDecoder(initial_buffer=1024)  # small: forces compaction and growth
    got: list[list[bytes]] = []
    for chunk in chunked(wire(messages), cuts):
        got.extend(decoder.feed(chunk))
    # compared only at the end: frames handed out must not alias reused buffers
    assert [[bytes(f) for f in m] for m in got] == messages


@DETERMINISTIC
@given(messages=message_streams(), steps=st.lists(st.integers(1, 70_000), min_size=1, max_size=30))
def test_round_trip_through_get_buffer(messages: list[list[bytes]], steps: list[int]) -> None:
    """Drive the BufferedProtocol pair directly: the socket fills less than offered."""
    data = memoryview(wire(messages))
    decoder = FrameDecoder(initial_buffer=4096)
    got: list[list[bytes]] = []
    i = 0
    while data.nbytes:
        target = decoder.get_buffer()
        assert target.nbytes > 0
        step = max(steps[i % len(steps)], data.nbytes // 200)  # bounded iterations
        n = min(target.nbytes, data.nbytes, step)
        target[:n] = data[:n]
        data = data[n:]
        got.extend(decoder.buffer_updated(n))
        i += 1
    assert [[bytes(f) for f in m] for m in got] == messages


def test_nothing_is_returned_until_a_message_is_complete() -> None:
    data = wire([[b"header", b"x" * 100]])
    decoder = FrameDecoder()
    for i in range(len(data) - 1):
        assert decoder.feed(data[i : i + 1]) == []
    assert [[bytes(f) for f in m] for m in decoder.feed(data[-1:])] == [[b"header", b"x" * 100]]


@pytest.mark.parametrize("chunk", [1 << 20, 65_537, 10_000_000])
def test_multi_megabyte_frames_arrive_intact(chunk: int) -> None:
    big = blob(8 * 1024 * 1024 + 3, seed=1)
    other = blob(3 * 1024 * 1024, seed=2)
    data = wire([[b"head", big, b"tail", other], [b"next"]])
    decoder = FrameDecoder()
    got = []
    for start in range(0, len(data), chunk):
        got.extend(decoder.feed(data[start : start + chunk]))
    assert len(got) == 2
    head, got_big, tail, got_other = got[0]
    assert bytes(head) == b"head" and bytes(tail) == b"tail"
    assert len(got_big) == len(big) and got_big == big
    assert got_other == other
    assert [bytes(f) for f in got[1]] == [b"next"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_large_frames_are_private_memory_not_shared_with_children() -> None:
    """A received array must not change under a forked child that writes to it."""
    size = 8 * 1024 * 1024  # above MMAP_FRAME and HUGE_PAGE_FRAME
    [[_, frame]] = FrameDecoder().feed(wire([[b"head", bytes(size)]]))
    view = memoryview(frame)
    assert not view.readonly
    pid = os.fork()
    if pid == 0:  # the child scribbles on its copy and leaves at once
        view[:4] = b"\xff" * 4
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert bytes(view[:4]) == bytes(4)


def test_layout_matches_the_spec() -> None:
    """u64 LE frame count, u64 LE length per frame, then the frames (docs/protocol.md)."""
    [buf] = encode_frames([b"\x91\x80", b"abc"])
    assert bytes(buf) == (
        struct.pack("<Q", 2) + struct.pack("<Q", 2) + struct.pack("<Q", 3) + b"\x91\x80abc"
    )
    assert frame_prefix([2, 3]) == bytes(buf)[:24]


def test_small_messages_are_one_buffer_and_big_frames_are_not_copied() -> None:
    small = encode_frames([b"a", b"b" * 100])
    assert len(small) == 1
    big = bytearray(SMALL_FRAME + 1)
    out = encode_frames([b"header", big])
    assert len(out) == 3
    assert out[2] is big  # passed through untouched: no user-space copy
    view = memoryview(big)
    assert encode_frames([b"h", view])[2] is view


def prefix(n_frames: int, lengths: list[int]) -> bytes:
    return struct.pack(f"<{1 + len(lengths)}Q", n_frames, *lengths)


def test_too_many_frames_is_rejected_on_the_count_alone() -> None:
    decoder = FrameDecoder(max_frames=4)
    with pytest.raises(ProtocolError, match=r"5 frames \(limit 4\)"):
        decoder.feed(struct.pack("<Q", 5))


def test_exactly_max_frames_is_accepted() -> None:
    decoder = FrameDecoder(max_frames=4)
    frames = [b"h", b"1", b"2", b"3"]
    assert [[bytes(f) for f in m] for m in decoder.feed(wire([frames]))] == [frames]


@pytest.mark.parametrize("n", [0, 2**64 - 1, 2**63])
def test_absurd_frame_counts_are_rejected(n: int) -> None:
    with pytest.raises(ProtocolError, match="frames"):
        FrameDecoder().feed(struct.pack("<Q", n))


def test_frame_over_the_size_limit_is_rejected_before_its_bytes_arrive() -> None:
    decoder = FrameDecoder(max_frame_bytes=1000)
    with pytest.raises(ProtocolError, match="1001 bytes exceeds the limit of 1000"):
        decoder.feed(prefix(2, [10, 1001]))


def test_frame_at_the_size_limit_is_accepted() -> None:
    decoder = FrameDecoder(max_frame_bytes=1000)
    frames = [b"h", b"z" * 1000]
    assert [[bytes(f) for f in m] for m in decoder.feed(wire([frames]))] == [frames]


@pytest.mark.parametrize("length", [DEFAULT_MAX_FRAME_BYTES + 1, 2**63, 2**64 - 1])
def test_default_limit_rejects_huge_lengths_without_allocating(length: int) -> None:
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        FrameDecoder().feed(prefix(1, [length]))


def test_limits_can_change_between_messages() -> None:
    """Connections start with small limits and lift them after the handshake."""
    decoder = FrameDecoder(max_frame_bytes=10, max_frames=1)
    assert len(decoder.feed(wire([[b"0123456789"]]))) == 1
    decoder.max_frame_bytes, decoder.max_frames = 1000, 3
    assert len(decoder.feed(wire([[b"x" * 500, b"y", b"z"]]))) == 1
