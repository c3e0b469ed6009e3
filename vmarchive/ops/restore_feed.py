"""Writing the regenerated migration stream to QEMU's FIFO on a thread of its own.

Generating the stream is CPU work (reading chunks, framing pages); a write into the
FIFO sleeps until QEMU has read all but the pipe's last megabyte.  Done by one thread,
the two took turns: QEMU idled while the next 4 MiB were generated and the generator
idled while QEMU read them, so a restore took about the sum of both (measured with
scripts/bench_restore.py: 1.4 s of stream for 465 MiB where either alone takes 0.5-0.7 s).
:class:`FifoWriter` lets them overlap: ``write`` queues, a thread writes, and up to
``limit`` bytes wait between them -- which also lets generation run ahead while QEMU
is still starting.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import deque

#: Bytes queued for the FIFO at most (memory held besides the generator's own buffer).
QUEUE_BYTES = 32 << 20

#: Buffers per writev(2) at most (the limit of Linux).
IOV_MAX = 1024


class FifoWriter:
    """Writes whatever :meth:`write` queues to ``fd`` on a thread, in order.

    ``write`` takes ownership: ``bytes`` and views of ``bytes`` are queued as they are,
    anything mutable is copied first.  An error of the thread (QEMU closed the FIFO)
    is raised by the next ``write`` or by :meth:`close`.  :meth:`abort` drops what is
    queued and stops the thread after the ``writev`` it is in (which carries what was
    queued when it began); that call ends once the reader reads or goes away, so the
    caller must make sure one of those happens before it :meth:`join`\\ s.  The fd is
    the caller's to close, after :meth:`join`.
    """

    def __init__(self, fd: int, limit: int = QUEUE_BYTES) -> None:
        self.fd = fd
        self.limit = limit
        self._queue: deque[bytes | memoryview | None] = deque()
        self._queued = 0
        self._cond = threading.Condition()
        self._aborted = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="restore-fifo", daemon=True)
        self._thread.start()

    def write(self, b: bytes | bytearray | memoryview, /) -> int:
        item: bytes | memoryview
        if type(b) is bytes or (
            isinstance(b, memoryview)
            and type(b.obj) is bytes
            and b.c_contiguous
            and b.itemsize == 1
        ):
            item = b
        else:
            item = bytes(b)
        n = len(item)
        if not n:
            return 0
        with self._cond:
            # One item larger than the limit still goes (alone), or it never would.
            while self._queued and self._queued + n > self.limit and self._ok():
                self._cond.wait()
            self._raise_if_failed()
            self._queue.append(item)
            self._queued += n
            self._cond.notify_all()
        return n

    def _ok(self) -> bool:
        return self.error is None and not self._aborted

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error
        if self._aborted:
            raise BrokenPipeError("FIFO writer aborted")

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._aborted:
                        self._cond.wait()
                    if self._aborted:
                        return
                    # everything queued in one call: this thread needs the GIL again
                    # only after it, and the GIL can take a switch interval (5 ms) to
                    # come back while the generator computes -- QEMU empties the pipe's
                    # megabyte in about one.
                    batch = list(itertools.islice(self._queue, IOV_MAX))
                end = batch.index(None) if None in batch else len(batch)
                if end:
                    n = os.writev(self.fd, batch[:end])  # type: ignore[arg-type]
                with self._cond:
                    if self._aborted:  # abort() emptied the queue already
                        return
                    if not end:
                        return  # close(): all written
                    self._consumed(n)
                    self._cond.notify_all()
        except BaseException as e:
            with self._cond:
                self.error = e
                self._queue.clear()
                self._queued = 0
                self._cond.notify_all()

    def _consumed(self, n: int) -> None:
        """Drop ``n`` written bytes from the head of the queue (a partial write leaves
        the rest of an item in its place)."""
        self._queued -= n
        while n:
            head = self._queue[0]
            assert head is not None
            if len(head) <= n:
                n -= len(head)
                self._queue.popleft()
            else:
                self._queue[0] = memoryview(head)[n:]
                n = 0

    def close(self) -> None:
        """Wait until everything queued is written; raise the thread's error if any."""
        with self._cond:
            self._raise_if_failed()
            self._queue.append(None)
            self._cond.notify_all()
        self._thread.join()
        self._raise_if_failed()

    def abort(self) -> None:
        with self._cond:
            self._aborted = True
            self._queue.clear()
            self._queued = 0
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; True once it has ended."""
        self._thread.join(timeout)
        return not self._thread.is_alive()
