"""Writing image files: whole positional writes, handed to the kernel's writeback as they
go (ops layer; used by restore and export).

A file written from start to end and then fsynced went to disk in that fsync: on a host
with much memory nothing else starts the writeback (the dirty thresholds are gigabytes),
so a 512 MiB image took 0.3 s in the final fsync here.  :class:`ImageWriter` starts the
writeback of what it wrote every :data:`WRITEBACK_BYTES`
(``sync_file_range(SYNC_FILE_RANGE_WRITE)``: it does not wait, and the pages stay cached
for whoever reads them next), so the fsync finds little left.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable

#: Bytes written between two writeback starts.
WRITEBACK_BYTES = 32 << 20
_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, pos: int) -> int:
    """Write all of ``data`` at ``pos`` (short writes continued); returns its length."""
    view = memoryview(data).cast("B")
    total = view.nbytes
    while view:
        n = os.pwrite(fd, view, pos)
        view = view[n:]
        pos += n
    return total


@functools.cache
def sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (Linux), or None where there is none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing the dirty pages of ``fd`` in that range to disk, without waiting
    for them.  Best effort: the caller's fsync is what makes the data durable."""
    fn = sync_file_range()
    if fn is not None:
        fn(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


class ImageWriter:
    """Positional writes to one file; the range written since the last writeback start
    is handed over once it spans :data:`WRITEBACK_BYTES` (writes land mostly in order, so
    one range covers them)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lo = -1
        self._hi = -1

    def write(self, data: bytes | bytearray | memoryview, pos: int) -> int:
        """Write all of ``data`` at ``pos``; returns its length."""
        n = pwrite_all(self.fd, data, pos)
        self._lo = pos if self._lo < 0 else min(self._lo, pos)
        self._hi = max(self._hi, pos + n)
        if self._hi - self._lo >= WRITEBACK_BYTES:
            start_writeback(self.fd, self._lo, self._hi - self._lo)
            self._lo = self._hi = -1
        return n

    def fsync(self) -> None:
        os.fsync(self.fd)
