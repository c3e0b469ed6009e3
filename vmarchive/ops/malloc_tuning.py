"""Keep freed memory in the process instead of giving it back to the kernel at once.

A restore moves a gigabyte through buffers of 64 KiB - 4 MiB on seven threads: chunks
read and decoded on the reader threads, freed by the stream and disk threads, joined
4 MiB output buffers freed by the FIFO writer.  glibc's defaults hand such memory back
(a large block goes to ``munmap``, a free top of a heap is trimmed), so the next buffer
is faulted in and zeroed by the kernel again: 55-65 thousand page faults per restore of
the benchmark guest, against 17 thousand with the thresholds below, and the restore was
faster in each of 5 alternating pairs (median 1.59 -> 1.44 s, scripts/bench_restore.py's
guest); its peak RSS rose from ~100 to ~110 MiB.

A capture reads the migration stream from its socket into a new 1 MiB buffer per read,
freed by the parser's thread; with glibc's defaults that thread's heap top was often
trimmed and the next reads faulted their pages in again: a second capture of the
benchmark guest took 12-28 thousand page faults (median 19.6 thousand), with the
thresholds 11-13 thousand, and 0.364 -> 0.358 s median (mean 0.377 -> 0.355 s; faster in
15 of 20 alternating pairs).  First captures: no change in time or peak RSS (4 pairs).
So captures set them too.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

# mallopt(3) parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: A free heap top below this stays mapped.
TRIM_THRESHOLD = 256 << 20
#: Blocks below this come from the heaps, not from a mapping of their own (32 MiB is the
#: largest value glibc accepts on 64-bit hosts; setting it also stops glibc adjusting it).
MMAP_THRESHOLD = 32 << 20


def keep_freed_memory() -> bool:
    """Raise glibc's trim and mmap thresholds for this process; True if glibc took them.

    Process-wide and not undone: meant for a command's process.  Elsewhere (musl, no
    ``mallopt``) it does nothing and returns False.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    )
    if not ok:
        log.debug("mallopt refused the restore's thresholds")
    return ok
