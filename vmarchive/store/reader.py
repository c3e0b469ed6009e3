"""Stream reader (store layer): reconstructs a stream or any byte range of it.

Every chunk is verified (its id recomputed) before a byte of it is returned; damage
raises :class:`vmarchive.errors.DamageError` instead of returning wrong bytes.  Holes are
produced without any read.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import msgspec

from vmarchive.errors import UsageError
from vmarchive.store.codecs import StreamInfo

if TYPE_CHECKING:
    from vmarchive.store.repository import Repository


class Extent(msgspec.Struct, frozen=True):
    """A run of slots: ``length`` bytes at ``offset``, data or a hole."""

    offset: int
    length: int
    hole: bool


class StreamReader:
    """Reads one stream of a loaded archive."""

    def __init__(self, repo: Repository, stream: StreamInfo) -> None:
        self._repo = repo
        self.stream = stream
        self.name = stream.name
        self.size = stream.size
        self.chunk_size = stream.chunk_size
        self._zero = repo.codecs.zero_id
        # One-chunk cache: sequential small reads inside one chunk read it once.
        self._cached: tuple[int, bytes] | None = None

    def _slot_length(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def _chunk(self, index: int) -> bytes | None:
        """The verified data of slot ``index``, ``None`` for a hole."""
        cid = self.stream.chunk_id(index)
        if cid == self._zero:
            return None
        if self._cached is not None and self._cached[0] == index:
            return self._cached[1]
        data = self._repo.read_chunk(cid)
        expect = self._slot_length(index)
        if len(data) != expect:
            from vmarchive.errors import DamageError

            raise DamageError(
                f"stream {self.name}: chunk {cid.hex()} has {len(data)} bytes, slot needs {expect}",
                chunk_id=cid.hex(),
            )
        self._cached = (index, data)
        return data

    def read_range(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (fewer at the end of the stream).

        Raises :class:`UsageError` for a negative range, :class:`DamageError` and
        :class:`ChunkMissingError` for damage.
        """
        if offset < 0 or length < 0:
            raise UsageError("negative offset or length")
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        out = bytearray(end - offset)
        cs = self.chunk_size
        pos = offset
        while pos < end:
            index = pos // cs
            start = index * cs
            stop = min(start + cs, end)
            data = self._chunk(index)
            if data is not None:
                out[pos - offset : stop - offset] = data[pos - start : stop - start]
            pos = stop
        return bytes(out)

    def iter_chunks(self) -> Iterator[tuple[int, bytes | None]]:
        """(offset, data) per slot in order; ``None`` data is a hole of the slot's length."""
        for index in range(self.stream.slots):
            yield index * self.chunk_size, self._chunk(index)

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Runs of data and holes, merged, without reading any chunk: of the whole stream,
        or of ``[offset, offset+length)`` clipped to it (only its slots are looked at)."""
        end = self.size if length is None else min(self.size, offset + length)
        if offset >= end:
            return
        cs = self.chunk_size
        run_start = offset
        run_hole: bool | None = None
        for index in range(offset // cs, -(-end // cs)):
            hole = self.stream.chunk_id(index) == self._zero
            if run_hole is None:
                run_hole = hole
            elif hole != run_hole:
                off = index * cs
                yield Extent(run_start, off - run_start, run_hole)
                run_start, run_hole = off, hole
        if run_hole is not None:
            yield Extent(run_start, end - run_start, run_hole)

    def read_all(self) -> bytes:
        """The whole stream (small streams only: meta, devstate)."""
        return self.read_range(0, self.size)
