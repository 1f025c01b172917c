"""Length-prefixed frames: the byte layout of every Corral message on a stream.

A message is::

    u64 n_frames | u64 length[0] ... u64 length[n-1] | frame[0] ... frame[n-1]

all integers little-endian.  Frame 0 is the msgpack header; the other frames
are out-of-band buffers the header refers to.  :class:`FrameDecoder` is a pure,
incremental parser (no IO): feed it bytes through the ``get_buffer`` /
``buffer_updated`` pair that :class:`asyncio.BufferedProtocol` uses, and it
hands back whole messages.  Large frames are received straight into their own
buffer, so a 200 MB array is copied once, by the kernel.
"""

from __future__ import annotations

import contextlib
import mmap
import struct
from collections.abc import Sequence

from ..errors import ProtocolError

_U64 = struct.Struct("<Q")
_ONE_FRAME = struct.Struct("<QQ")  # the prefix of a message of one frame

#: Frames at most this long are copied out of the shared receive buffer;
#: longer ones get a buffer of their own that the socket reads into directly.
SMALL_FRAME = 64 * 1024

DEFAULT_MAX_FRAME_BYTES = 4 * 1024**3
DEFAULT_MAX_FRAMES = 65_536

Frame = bytes | bytearray | memoryview

#: Frames at least this long are received into fresh anonymous memory maps:
#: the kernel hands out zeroed pages lazily, sparing a pass over the buffer.
MMAP_FRAME = 1024 * 1024

#: Maps at least this long ask for transparent huge pages (as NumPy does for
#: its own large arrays): the socket then fills 2 MiB pages, one page fault
#: each, instead of faulting in 4 KiB at a time, which otherwise costs about
#: as much as the copy itself.
HUGE_PAGE_FRAME = 4 * 1024 * 1024


def _anonymous_map(length: int) -> mmap.mmap:
    """Private anonymous memory of ``length`` bytes (huge pages where offered).

    ``mmap.mmap(-1, n)`` alone maps *shared* memory, which Linux backs with
    shmem: slower to fault in, never in huge pages, and shared with any child
    forked later.  A private map is what ``malloc`` would give.
    """
    if not hasattr(mmap, "MAP_PRIVATE"):  # Windows
        return mmap.mmap(-1, length)
    buf = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if length >= HUGE_PAGE_FRAME and hasattr(mmap, "MADV_HUGEPAGE"):
        # A kernel without transparent huge pages refuses: small pages it is.
        with contextlib.suppress(OSError):
            buf.madvise(mmap.MADV_HUGEPAGE)
    return buf


def _allocate(length: int) -> memoryview:
    """Writable memory for one large incoming frame."""
    if length >= MMAP_FRAME:
        return memoryview(_anonymous_map(length))
    return memoryview(bytearray(length))


def frame_prefix(lengths: Sequence[int]) -> bytes:
    """Return the length prefix announcing frames of the given lengths."""
    return struct.pack(f"<{len(lengths) + 1}Q", len(lengths), *lengths)


def encode_frames(frames: Sequence[Frame]) -> list[Frame]:
    """Return the buffers to write, in order, for one message made of ``frames``.

    Small messages are joined into one buffer (one syscall); large frames are
    passed through untouched so they are never copied in user space.
    """
    if len(frames) == 1 and type(frames[0]) is bytes and len(frames[0]) <= SMALL_FRAME:
        return [_ONE_FRAME.pack(1, len(frames[0])) + frames[0]]  # a lone header: most messages
    lengths = [memoryview(f).nbytes for f in frames]
    prefix = frame_prefix(lengths)
    if sum(lengths) <= SMALL_FRAME:
        return [prefix + b"".join(frames)]
    return [prefix, *frames]


class FrameDecoder:
    """Incremental parser turning a byte stream into messages (lists of frames).

    Invalid input (too many frames, a frame over the size limit) raises
    :class:`ProtocolError`; the caller then closes that one connection.
    """

    def __init__(
        self,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_frames: int = DEFAULT_MAX_FRAMES,
        initial_buffer: int = 256 * 1024,
    ) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.max_frames = max_frames
        self._buf = bytearray(initial_buffer)
        self._view = memoryview(self._buf)
        self._lo = 0  # first unparsed byte in _buf
        self._hi = 0  # end of received bytes in _buf
        self._n_frames: int | None = None
        self._lengths: tuple[int, ...] | None = None
        self._frames: list[Frame] = []
        self._big: memoryview | None = None
        self._big_filled = 0

    # -- the BufferedProtocol side -------------------------------------------------
    def get_buffer(self) -> memoryview:
        """Return writable memory where the next received bytes should land."""
        if self._big is not None:
            return self._big[self._big_filled :]
        if self._hi == len(self._buf):
            self._make_room(SMALL_FRAME)
        return self._view[self._hi :]

    def buffer_updated(self, nbytes: int) -> list[list[Frame]]:
        """Account for ``nbytes`` written into the last buffer; return whole messages."""
        if self._big is not None:
            self._big_filled += nbytes
            if self._big_filled < len(self._big):
                return []
            self._frames.append(self._big)
            self._big = None
        else:
            self._hi += nbytes
        return self._parse()

    def feed(self, data: bytes) -> list[list[Frame]]:
        """Parse ``data`` (convenience for tests and non-buffered transports)."""
        out: list[list[Frame]] = []
        view = memoryview(data)
        while view.nbytes:
            target = self.get_buffer()
            n = min(target.nbytes, view.nbytes)
            target[:n] = view[:n]
            view = view[n:]
            out.extend(self.buffer_updated(n))
        return out

    # -- parsing -------------------------------------------------------------------
    def _make_room(self, need: int) -> None:
        """Ensure ``need`` bytes of space after the unparsed data, compacting or growing."""
        pending = self._hi - self._lo
        if self._lo and pending + need <= len(self._buf):
            self._buf[:pending] = self._view[self._lo : self._hi]
        else:
            size = max(len(self._buf), pending + need)
            new = bytearray(size * 2 if size > len(self._buf) else size)
            new[:pending] = self._view[self._lo : self._hi]
            self._view.release()
            self._buf = new
            self._view = memoryview(new)
        self._lo, self._hi = 0, pending

    def _parse(self) -> list[list[Frame]]:
        out = self._parse_whole_small() if self._n_frames is None else []
        while True:
            avail = self._hi - self._lo
            if self._n_frames is None:
                if avail < 8:
                    break
                (n,) = _U64.unpack_from(self._buf, self._lo)
                if not 1 <= n <= self.max_frames:
                    raise ProtocolError(f"message announces {n} frames (limit {self.max_frames})")
                self._n_frames = n
                self._lo += 8
                continue
            if self._lengths is None:
                need = 8 * self._n_frames
                if avail < need:
                    if self._lo + need > len(self._buf):
                        self._make_room(need)
                    break
                lengths = struct.unpack_from(f"<{self._n_frames}Q", self._buf, self._lo)
                for length in lengths:
                    if length > self.max_frame_bytes:
                        raise ProtocolError(
                            f"frame of {length} bytes exceeds the limit of "
                            f"{self.max_frame_bytes} bytes"
                        )
                self._lengths = lengths
                self._lo += need
                continue
            if len(self._frames) == len(self._lengths):
                out.append(self._frames)
                self._frames = []
                self._n_frames = None
                self._lengths = None
                continue
            length = self._lengths[len(self._frames)]
            if length <= SMALL_FRAME:
                if avail < length:
                    if self._lo + length > len(self._buf):
                        self._make_room(length)
                    break
                self._frames.append(bytes(self._view[self._lo : self._lo + length]))
                self._lo += length
                continue
            big = _allocate(length)
            take = min(avail, length)
            big[:take] = self._view[self._lo : self._lo + take]
            self._lo += take
            if take == length:
                self._frames.append(big)
                continue
            self._big = big
            self._big_filled = take
            break
        if self._lo == self._hi:
            self._lo = self._hi = 0
        return out

    def _parse_whole_small(self) -> list[list[Frame]]:
        """Take the messages of one small frame that arrived whole: the common case.

        Stops at the first other message (several frames, a large frame, or
        not all there yet), which :meth:`_parse` then reads step by step.
        """
        out: list[list[Frame]] = []
        buf, lo, hi = self._buf, self._lo, self._hi
        limit = min(SMALL_FRAME, self.max_frame_bytes)
        while hi - lo >= 16:
            n, length = _ONE_FRAME.unpack_from(buf, lo)
            end = lo + 16 + length
            if n != 1 or length > limit or end > hi:
                break
            out.append([bytes(self._view[lo + 16 : end])])
            lo = end
        self._lo = lo
        return out
