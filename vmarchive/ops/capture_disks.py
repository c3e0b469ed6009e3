"""Reading point-in-time disk images into ``disk`` streams (ops layer).

The capture exposes each disk's frozen view (the base under a switchover overlay, or a
fleecing node) over NBD; :func:`read_disk` reads it with block status, so ranges the
image does not allocate or knows to be zero are never transferred and become holes.
For a shut-off domain :func:`local_nbd` serves the image files with ``qemu-nbd``
(read-only, shared) so the same reader applies.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmarchive.errors import HostPreconditionError, HypervisorError, InterruptedError_
from vmarchive.hypervisor.nbd import BASE_ALLOCATION, NBDClient, data_ranges
from vmarchive.ops import export_qcow2
from vmarchive.progress import Progress

log = logging.getLogger(__name__)

#: Bytes per NBD read request, whatever the chunk size, and requests in flight, for full
#: and incremental reads (:func:`read_pieces`).  Requests of one 64 KiB chunk each were
#: QEMU's bottleneck (an 8 GiB disk in 64 KiB chunks read in 4.0-4.7 s, in 256 KiB requests
#: 3.1 s); requests of one 4 MiB chunk each as well (4.6-4.9 s against 2.6-2.8 s for 256 KiB
#: chunks); 1 MiB requests were slower than 256 KiB ones.
REQUEST = 256 << 10
DEPTH = 8


@dataclass
class DiskRead:
    """What reading one disk cost."""

    target: str
    size: int
    bytes_read: int = 0
    bytes_stored: int = 0
    holes: int = 0
    chunks: int = 0
    bytes_referenced: int = 0  # incrementals: bytes left as the parent's chunks
    dirty_slots: int = 0


class StreamSink:
    """What :func:`read_disk` writes into (a store ``StreamWriter``, or a test double)."""

    chunk_size: int

    def write_chunk(
        self, index: int, data: bytes | bytearray | memoryview, *, handed_over: bool = False
    ) -> object: ...


def read_disk(
    address: str,
    export: str,
    sink: Any,
    target: str,
    progress: Progress,
    *,
    cancelled: Callable[[], bool] = lambda: False,
    connect_timeout: float = 60.0,
) -> DiskRead:
    """Read the NBD ``export`` at unix socket ``address`` into ``sink`` chunk by chunk.

    Only chunks that intersect allocated, non-zero extents are read; the others stay
    holes in the stream.  ``cancelled`` is polled between reads.

    Raises:
        NBDError: the export failed.
        InterruptedError_: ``cancelled`` became true.
    """
    with NBDClient.connect(
        address, export, meta_contexts=(BASE_ALLOCATION,), timeout=connect_timeout
    ) as c:
        size = c.size
        cs = int(sink.chunk_size)
        ranges = data_ranges(c.extents(BASE_ALLOCATION), cs, size=size)
        total = sum(n for _o, n in ranges)
        res = DiskRead(target=target, size=size)
        task = progress.task(f"disk {target}", total=total)
        # Whole chunks are read into one buffer per group: one chunk, or as many small
        # chunks as fill a request.
        group = max(cs, REQUEST // cs * cs)
        groups = (
            (g, min(group, end - g))
            for off, n in ranges
            for end in (off + n,)
            for g in range(off, end, group)
        )
        try:
            with contextlib.closing(read_pieces(c, groups)) as pieces:
                for g, view in pieces:
                    if cancelled():
                        raise InterruptedError_(f"reading disk {target} cancelled")
                    for at in range(0, len(view), cs):
                        # each group is read into a buffer of its own: nothing
                        # writes to it again, so the store keeps it instead of a copy
                        sink.write_chunk((g + at) // cs, view[at : at + cs], handed_over=True)
                    res.bytes_read += len(view)
                    task.advance(len(view))
        finally:
            task.close()
        return res


def read_pieces(
    c: NBDClient, pieces: Iterable[tuple[int, int]]
) -> Generator[tuple[int, memoryview], None, None]:
    """Each ``(offset, length)`` piece of the export, read into a buffer of its own by
    requests of at most :data:`REQUEST` bytes (:data:`DEPTH` in flight); yields
    ``(offset, data)`` in the order given, each once all of it is there.

    Raises NBDError as :meth:`NBDClient.read_many_into`.
    """
    filling: collections.deque[tuple[int, memoryview]] = collections.deque()

    def targets() -> Iterator[tuple[int, memoryview]]:
        for off, n in pieces:
            if n <= 0:
                raise ValueError(f"empty piece at {off}")  # it would never be answered
            view = memoryview(bytearray(n))
            filling.append((off, view))
            for at in range(0, n, REQUEST):
                yield off + at, view[at : at + REQUEST]

    with contextlib.closing(c.read_many_into(targets(), depth=DEPTH)) as replies:
        for off, part in replies:
            first, view = filling[0]
            if off + len(part) == first + len(view):  # its last request (replies in order)
                filling.popleft()
                yield first, view


@contextlib.contextmanager
def local_nbd(path: str, fmt: str | None, export: str = "disk") -> Iterator[str]:
    """Serve image ``path`` read-only over NBD with ``qemu-nbd``; yields the socket path.

    For disks of a shut-off domain (no QEMU to export them).

    Raises:
        HostPreconditionError: qemu-nbd is not installed.
        HypervisorError: qemu-nbd did not start.
    """
    exe = shutil.which("qemu-nbd")
    if exe is None:
        raise HostPreconditionError("qemu-nbd is needed to read disks of a shut-off domain")
    d = tempfile.mkdtemp(prefix="vmarchive-nbd-")
    sock = os.path.join(d, "nbd.sock")
    cmd = [exe, "--read-only", "--shared=4", "--persistent", "-k", sock, "-x", export]
    if fmt:
        cmd += ["-f", fmt]
    cmd.append(path)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def failed() -> HypervisorError:
        err = (proc.stderr.read() if proc.stderr else b"").decode(errors="replace")
        last = err.strip().splitlines()[-1:]
        why = last[0].removeprefix("qemu-nbd: ") if last else "?"
        return HypervisorError(f"qemu-nbd cannot serve {path}: {why}")

    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if proc.poll() is not None:
                raise failed()
            if time.monotonic() > deadline:
                raise HypervisorError(f"qemu-nbd did not start for {path}")
            time.sleep(0.01)
        try:
            yield sock
        except HypervisorError as e:
            # qemu-nbd listens before it opens the image: an image it cannot open (missing,
            # unreadable, damaged) shows first as a refused or closed NBD connection.
            try:
                code = proc.wait(0.5)
            except subprocess.TimeoutExpired:
                raise e from None
            if code != 0:
                raise failed() from e
            raise
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        shutil.rmtree(d, ignore_errors=True)


class DiskThreads:
    """Runs one reader per disk in threads; collects results and the first error."""

    def __init__(self) -> None:
        self.results: dict[str, DiskRead] = {}
        self.errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []
        self._cancel = threading.Event()

    def start(self, target: str, fn: Callable[..., DiskRead]) -> None:
        """Run ``fn(cancelled=...)`` in a thread (a reader such as :func:`read_disk`)."""

        def run() -> None:
            try:
                self.results[target] = fn(cancelled=self._cancel.is_set)
            except BaseException as e:
                log.debug("disk %s failed", target, exc_info=True)
                self.errors.append(e)
                self._cancel.set()

        t = threading.Thread(target=run, name=f"disk-{target}", daemon=True)
        self._threads.append(t)
        t.start()

    def cancel(self) -> None:
        self._cancel.set()

    def join(self) -> None:
        for t in self._threads:
            t.join()

    def raise_first(self) -> None:
        if self.errors:
            raise self.errors[0]


def empty_qcow2(path: Path, size: int) -> None:
    """Create an empty qcow2 image of ``size`` bytes (no backing file) at ``path``: a
    capture's temporary overlay or fleecing image, which QEMU opens from an fd with its
    backing node given: the image ``qemu-img create -f qcow2`` makes (version 3, 64 KiB
    clusters, 16-bit refcounts), its header and tables laid out as an export lays them.
    A ``qemu-img`` process per image cost the capture's thread 1-7 ms to start and ~10 ms
    of CPU beside it, before the instant.

    Raises OSError (``FileExistsError`` when something is at ``path``: never written over).
    """
    layout = export_qcow2.plan(size, [])
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        for offset, data in export_qcow2.metadata(layout):
            os.pwrite(fd, data, offset)
        os.ftruncate(fd, layout.file_size)  # to the end of its last cluster
    finally:
        os.close(fd)
