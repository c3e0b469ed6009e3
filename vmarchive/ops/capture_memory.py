"""The memory side of a capture: read QEMU's migration stream and store it (ops layer).

QEMU writes its migration stream into a channel (a unix socket; a pipe in tests); a
:class:`PipeReader` thread drains it (QEMU must never block on a full channel, even after
we failed) and feeds a consumer:

* :class:`OpaqueMemory` stores the raw bytes as one ``stream`` (the fallback), or
* a parsed consumer (see :mod:`vmarchive.ops.capture_parse`) that turns the stream into
  per-RAMBlock page images (:class:`RamImage`) plus the verbatim device state.

:class:`RamImage` keeps memory bounded whatever the RAM size: it assembles pages into
store chunks in a small LRU of open chunks.  A chunk that must be reopened (a page re-sent
by a later precopy pass, or pages arriving out of order in snapshot mode) is read back
from the writer, patched and stored again under the same slot.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from vmarchive.format import migstream as ms
from vmarchive.progress import Task

log = logging.getLogger(__name__)

READ_SIZE = 1 << 20
#: After a read shorter than SHORT_READ the reading thread naps SHORT_READ_NAP seconds before
#: the next one.  QEMU writes its stream 32 KiB at a time; a reader that is always ready
#: woke for each write, and each wake took the GIL and woke the parser: 13-20 thousand
#: context switches in one thread during a 512 MiB capture to S3, ~0.4 s of CPU on two
#: cores (perf: most of it in the scheduler).  QEMU fills 200 us worth (~280 KiB at its
#: /dev/null rate through a pipe) into the channel's buffer meanwhile (0.4-2 MiB, after
#: the host's net.core.wmem_max), so it is held up little if at all, and a nap ends on its
#: own: nothing waits on QEMU to wake us (no deadlock while it holds its lock).
SHORT_READ = 256 << 10
SHORT_READ_NAP = 0.0002


class Consumer(Protocol):
    """Receives the migration stream bytes in order."""

    def feed(self, data: memoryview) -> None: ...

    def finish(self) -> None: ...


class PipeReader(threading.Thread):
    """Drains ``fd`` until EOF, feeding ``consumer``; remembers the consumer's first error.

    Two threads: this one only reads the channel into a buffer (``os.read`` releases the GIL,
    so QEMU is not held up by our hashing and compression); a second one feeds the
    consumer -- or, for a consumer with a thread of its own (``attach(take, failed)``, see
    :meth:`ParsedConsumer.attach <vmarchive.ops.capture_parsed.ParsedConsumer.attach>`),
    that thread takes the buffers itself and this one calls its ``finish`` at the end.
    At most ``max_buffer`` bytes wait in between, except while :meth:`hold` is in effect.
    After a consumer error the rest of the stream is read and discarded, so QEMU never
    blocks on the channel (the capture cancels the migration, which ends it).
    """

    def __init__(
        self,
        fd: int,
        consumer: Consumer,
        task: Task,
        max_buffer: int = 16 << 20,
        max_hold_s: float = 5.0,
        skip: int = 0,
    ) -> None:
        super().__init__(name="migration-pipe", daemon=True)
        self.fd = fd
        #: bytes at the start of the channel that are not QEMU's (the set-up gate's filler)
        self.skip = skip
        self.consumer = consumer
        self.task = task
        self.bytes_read = 0
        self.error: BaseException | None = None
        self.eof = threading.Event()
        self.max_buffer = max_buffer
        self.max_hold_s = max_hold_s
        self._buf: collections.deque[bytes | None] = collections.deque()
        self._buffered = 0
        self._cond = threading.Condition()
        self._held_until = 0.0
        self._feeder = threading.Thread(target=self._feed, name="migration-parse", daemon=True)
        self._start_lock = threading.Lock()

    def hold(self) -> None:
        """Stop feeding the consumer for a moment (at most ``max_hold_s``).

        Used across the switchover: parsing, hashing and compressing would otherwise take
        the GIL and the CPU from our QMP calls and from QEMU while the guest is stopped.
        While held, the channel is still drained and the buffer has no limit: QEMU writes the
        last dirty pages and the device state while holding its big lock, so it must never
        block on the channel then (that deadlocked our own ``cont``).
        """
        with self._cond:
            self._held_until = time.monotonic() + self.max_hold_s
            self._cond.notify_all()

    def ensure_started(self) -> None:
        """Start draining the channel, unless that was done already (from any thread)."""
        with self._start_lock:
            if self.ident is None:
                self.start()

    def go(self) -> None:
        """Resume feeding the consumer."""
        with self._cond:
            self._held_until = 0.0
            self._cond.notify_all()

    def _held(self) -> bool:
        return time.monotonic() < self._held_until

    def _put(self, data: bytes | None) -> None:
        with self._cond:
            while (
                data is not None
                and self._buffered >= self.max_buffer
                and not self._held()
                and self.error is None
            ):
                self._cond.wait(0.1)
            self._buf.append(data)
            self._buffered += len(data) if data else 0
            self._cond.notify_all()

    def _get(self) -> bytes | None:
        with self._cond:
            while not self._buf or (self._held() and self._buf[0] is not None):
                self._cond.wait(0.05)
            data = self._buf.popleft()
            self._buffered -= len(data) if data else 0
            self._cond.notify_all()
            return data

    def _consumer_failed(self, e: BaseException) -> None:
        with self._cond:
            if self.error is None:
                self.error = e
            self._cond.notify_all()  # a _put waiting for room stops waiting

    def run(self) -> None:
        attach = getattr(self.consumer, "attach", None)
        if attach is not None:
            attach(self._get, self._consumer_failed)
        else:
            self._feeder.start()
        try:
            with open(self.fd, "rb", buffering=0, closefd=True) as f:
                skip = self.skip
                while skip > 0:
                    data = f.read(min(skip, READ_SIZE))
                    if not data:
                        break
                    skip -= len(data)
                while True:
                    data = f.read(READ_SIZE)
                    if not data:
                        break
                    self.bytes_read += len(data)
                    self.task.advance(len(data))
                    if self.error is None:
                        self._put(data)
                    if len(data) < SHORT_READ:
                        time.sleep(SHORT_READ_NAP)
        except OSError as e:
            if self.error is None:
                self.error = e
        finally:
            self._put(None)
            if attach is None:
                self._feeder.join()
            else:
                try:
                    self.consumer.finish()
                except BaseException as e:
                    self._consumer_failed(e)
            self.eof.set()

    def _feed(self) -> None:
        failed = False
        while True:
            data = self._get()
            if data is None:
                break
            if failed:
                continue
            try:
                self.consumer.feed(memoryview(data))
            except BaseException as e:
                log.debug("memory consumer failed", exc_info=True)
                self.error = e
                failed = True
        if not failed and self.error is None:
            try:
                self.consumer.finish()
            except BaseException as e:
                self.error = e


class OpaqueMemory:
    """Stores the whole stream, unparsed, into one stream writer (``append``)."""

    def __init__(self, sw: Any) -> None:
        self.sw = sw

    def feed(self, data: memoryview) -> None:
        self.sw.append(data)

    def finish(self) -> None:
        pass


def _slot_id(sw: Any, index: int) -> bytes:
    """The chunk id currently in slot ``index`` of a store StreamWriter."""
    return bytes(sw.slot_id(index))


class RamImage:
    """The page image of one RAMBlock, built from pages in any order, any number of times.

    ``sw`` is a store StreamWriter (size = block length) and ``read_chunk`` reads a chunk
    back (``ArchiveWriter.read_chunk``).  Pages never sent stay zero (holes).  ``witness``
    is told each slot as it is filled in the stream (its index and content, which nobody
    changes afterwards; a slot filled again is told again), chunks the store holds already
    (holes too) only when ``witness_known``; ``witness_holes(first, count)`` is told runs
    of whole slots of zero records stored as holes at once (else ``witness`` is told each
    of them, with zeros).  The third argument: for a whole slot given with the records
    it was read from (``wire``), their :func:`~vmarchive.format.migstream.wire_digest`,
    unless the slot was written to again since; else None.
    """

    def __init__(
        self,
        sw: Any,
        read_chunk: Callable[[bytes], bytes],
        *,
        zero_id: bytes = bytes(16),
        max_open: int = 64,
        witness: Callable[[int, bytes | bytearray, bytes | None], None] | None = None,
        witness_known: bool = True,
        witness_holes: Callable[[int, int], None] | None = None,
    ) -> None:
        self.sw = sw
        self.witness = witness
        self.witness_known = witness_known
        self.witness_holes = witness_holes
        self.size = int(sw.size)
        self.cs = int(sw.chunk_size)
        self.read_chunk = read_chunk
        self.zero_id = zero_id
        self.max_open = max_open
        self._open: collections.OrderedDict[int, bytes | bytearray] = collections.OrderedDict()
        self._stored: set[int] = set()
        #: content ids of the whole chunks in _open as they came (see write_if_present)
        self._ids: dict[int, bytes] = {}
        #: wire digests of the whole chunks in _open that came as wired runs, to witness
        self._wires: dict[int, bytes] = {}
        self._zeros = bytes(self.cs)
        self.pages = 0
        self.reopened = 0

    def _slot_len(self, index: int) -> int:
        return min(self.cs, self.size - index * self.cs)

    def page(
        self,
        offset: int,
        data: bytes | bytearray | memoryview | None,
        length: int,
        pages: int = 1,
        wire: memoryview | None = None,
    ) -> None:
        """Set ``length`` bytes at ``offset`` to ``data`` (None: zeros); ``pages``: how
        many pages that is (for the count); ``wire``: the records ``data`` was parsed from,
        when they were one group (:meth:`~vmarchive.format.migstream.StreamSink.
        ram_pages_wired`), valid during the call only."""
        if offset < 0 or offset + length > self.size:
            raise ValueError(f"page at {offset:#x} outside the block ({self.size:#x})")
        self.pages += pages
        first = offset // self.cs
        if data is None and not offset % self.cs and not length % self.cs:
            # Whole slots of zero pages (untouched RAM, most of a guest's records): slots
            # seen first are holes at once, without a zeroed buffer waiting its turn (a
            # hole has no place in a pack to keep in order), stored a run at a time.
            end = first + length // self.cs
            run = first
            for index in range(first, end):
                if index in self._open or index in self._stored:
                    self._holes(run, index - run)
                    self._chunk(index)[:] = self._zeros
                    run = index + 1
            self._holes(run, end - run)
            return
        if (
            length == self.cs
            and isinstance(data, bytes)
            and not offset % self.cs
            and first not in self._open
            and first not in self._stored
        ):
            # A whole chunk, first seen, as immutable bytes (the parser's runs): kept as it
            # is, without a zeroed buffer and a copy into it.  It still waits its turn
            # among the open chunks: storing it at once put whole chunks ahead of their
            # partly-sent neighbours, which scattered the image over its packs (a restore
            # from S3 then made 810 range reads where it had made 43).
            cid = self.sw.write_if_present(first, data)
            if cid is None:
                # nothing to store (the chunk is known, e.g. unchanged since the parent
                # capture): no place in a pack to wait for
                self._stored.add(first)
                if self.witness is not None and self.witness_known:
                    self.witness(first, data, None if wire is None else ms.wire_digest(wire))
                return
            self._ids[first] = cid
            if wire is not None and self.witness is not None:
                self._wires[first] = ms.wire_digest(wire)
            self._open[first] = data
            self._evict()
            return
        if data is not None and not isinstance(data, memoryview):
            data = memoryview(data)  # slices below without copies
        while length:
            index = offset // self.cs
            within = offset - index * self.cs
            n = min(length, self.cs - within)
            buf = self._chunk(index)
            if data is None:
                buf[within : within + n] = bytes(n)
            else:
                buf[within : within + n] = data[:n]
                data = data[n:]
            offset += n
            length -= n

    def _chunk(self, index: int) -> bytearray:
        got = self._open.get(index)
        if got is not None:
            self._open.move_to_end(index)
            if isinstance(got, bytearray):
                return got
            self._ids.pop(index, None)
            self._wires.pop(index, None)  # its records are no longer those read
            buf = self._open[index] = bytearray(got)  # a whole chunk written to again
            return buf
        if index in self._stored:
            self.reopened += 1
            cid = _slot_id(self.sw, index)
            if cid == self.zero_id:
                buf = bytearray(self._slot_len(index))
            else:
                buf = bytearray(self.read_chunk(cid))
        else:
            buf = bytearray(self._slot_len(index))
        self._open[index] = buf
        self._evict()
        return buf

    def _evict(self) -> None:
        while len(self._open) > self.max_open:
            old, obuf = self._open.popitem(last=False)
            self._store(old, obuf)

    def _holes(self, first: int, count: int) -> None:
        """Slots ``first`` .. ``first + count - 1``, neither open nor stored, are holes."""
        if count <= 0:
            return
        if self.witness is not None and self.witness_known and self.witness_holes is None:
            for index in range(first, first + count):
                self._store(index, self._zeros)
            return
        self.sw.write_holes(first, count)
        self._stored.update(range(first, first + count))
        if self.witness_holes is not None and self.witness_known:
            self.witness_holes(first, count)

    def _store(self, index: int, buf: bytes | bytearray) -> None:
        new = self.sw.write_chunk(index, buf, self._ids.pop(index, None))
        self._stored.add(index)
        wire = self._wires.pop(index, None)
        if self.witness is not None and (new or self.witness_known):
            self.witness(index, buf, wire)  # no longer in _open: nothing here changes it again

    def flush(self) -> None:
        """Store every open chunk (the image is complete in the store afterwards)."""
        while self._open:
            index, buf = self._open.popitem(last=False)
            self._store(index, buf)
