"""Splitting a byte stream into whole frames (see `protocol` for the frame layout)."""

from __future__ import annotations

import struct

from layerswarm.swarm.messages import MAX_FRAME_BYTES
from layerswarm.swarm.schema import check_length

_LENGTH = struct.Struct(">I")


class FrameReader:
    """Split a byte stream into whole frames, with at most one copy of each byte.

    Small frames are cut out of a scratch buffer; a frame larger than it gets a buffer of its
    own that the socket reads into directly. Use `get_buffer`/`buffer_updated` from an
    `asyncio.BufferedProtocol`, or `feed` with bytes.
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES, scratch_bytes: int = 2**16) -> None:
        if scratch_bytes < 64:
            raise ValueError(f"scratch_bytes={scratch_bytes} is below 64")
        self.max_frame_bytes = max_frame_bytes
        self._scratch = bytearray(scratch_bytes)
        self._start = 0  # first unconsumed byte in the scratch buffer
        self._end = 0  # one past the last received byte in the scratch buffer
        self._big: bytearray | None = None  # a large frame being received
        self._big_filled = 0

    def buffered_bytes(self) -> int:
        """Bytes received that are not yet part of a returned frame."""
        if self._big is not None:
            return self._big_filled
        return self._end - self._start

    def get_buffer(self) -> memoryview:
        """Where the next received bytes go; call `buffer_updated` with how many arrived."""
        if self._big is not None:
            return memoryview(self._big)[self._big_filled :]
        if self._start > 0:  # move a partial frame to the front to make room
            remaining = self._end - self._start
            self._scratch[:remaining] = self._scratch[self._start : self._end]
            self._start, self._end = 0, remaining
        return memoryview(self._scratch)[self._end :]

    def buffer_updated(self, nbytes: int) -> list[bytearray]:
        """Account for `nbytes` written into the last buffer; return the frames now whole.

        Raises:
            ProtocolError: a frame's length field is oversized or too small.
        """
        if self._big is not None:
            self._big_filled += nbytes
            if self._big_filled < len(self._big):
                return []
            frame, self._big = self._big, None
            return [frame]
        self._end += nbytes
        frames: list[bytearray] = []
        scratch = self._scratch
        while self._end - self._start >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(scratch, self._start)
            check_length(length, self.max_frame_bytes)
            total = _LENGTH.size + length
            available = self._end - self._start
            if available >= total:
                frames.append(scratch[self._start : self._start + total])
                self._start += total
            elif total > len(scratch):
                self._big = bytearray(total)
                self._big[:available] = scratch[self._start : self._end]
                self._big_filled = available
                self._start = self._end = 0
                break
            else:
                break
        if self._start == self._end:
            self._start = self._end = 0
        return frames

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytearray]:
        """Add received bytes; return the frames now whole.

        Raises:
            ProtocolError: a frame's length field is oversized or too small.
        """
        source = memoryview(data).cast("B")
        frames: list[bytearray] = []
        while source:
            target = self.get_buffer()
            n = min(len(target), len(source))
            target[:n] = source[:n]
            target.release()
            source = source[n:]
            frames.extend(self.buffer_updated(n))
        return frames
