"""The streaming archive writer (store layer).

Data flows: caller thread (zero test, chunk id, dedup lookup) -> thread pool (zstd and,
in encrypted repositories, AES-GCM: both release the GIL, so every core works) -> the
pack being built -> one uploader thread (publishes whole packs) -> index files -> the
manifest at commit.

Memory is bounded by constants, never by input size: at most ``max_inflight`` chunks
wait for compression, packs being built hold at most 1.5 packs' worth of blobs, and
``max_uploads`` packs are being uploaded.  Packs are built in place, each in a mapping
that a published pack's builder gave back (fresh pages cost more to touch here than the
copies this saves), so a blob is copied once into its pack and the pack is written from
there.  What grows with the input is only what must:
the slot tables of the manifest (16 bytes per chunk) and the chunk index (about 43 bytes
per *new* chunk).  Index entries of published packs are
written out every ``index_flush_entries`` entries, so they do not accumulate either.

Write ordering (crash safety): a pack is durable before an index names it, every index
naming this writer's packs is durable before the manifest is published, and the manifest
is published whole under a new key.  Leaving without :meth:`ArchiveWriter.commit` lists
nothing; packs and index files already published are garbage that gc reclaims.  A writer
may also end with :meth:`ArchiveWriter.publish_chunks` (packs and index objects, no
manifest) for another writer of the same repository that adopts them
(:meth:`ArchiveWriter.adopt_index`) and names the chunks in its manifest: a capture's disk
reader process and the capture.

Each stream fills packs of its own: streams written at the same time (the memory image
and every disk of a capture) would otherwise interleave in every pack, and a reader of
one stream -- a restore fills its disks one after another while it feeds the memory to
QEMU -- would fetch each pack once per stream in it.  Measured on a 512 MiB guest with
one disk restored from S3: 1.45-1.55x the archive's bytes downloaded with mixed packs.
When the packs being built together hold more than 1.5 packs' worth, the fullest is
closed early (packs of at least 3/4 of the target for two streams written at the same
rate), so more streams cost smaller packs, not memory (a capture's peak RSS has a
300 MiB target, and a full builder is 16 MiB).
"""

from __future__ import annotations

import collections
import functools
import logging
import mmap
import operator
import os
import struct
import threading
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from vmarchive.errors import ChunkMissingError, UsageError
from vmarchive.progress import NULL_PROGRESS, Progress, Task
from vmarchive.store import batchread, crashpoint
from vmarchive.store.chunkindex import Location

if TYPE_CHECKING:
    from vmarchive.format.pack import PackBuilder
    from vmarchive.store.locking import Lock
    from vmarchive.store.repository import Repository

log = logging.getLogger(__name__)

STREAM_KINDS = frozenset({"meta", "ram", "devstate", "stream", "disk"})
REQUIRED_METADATA = ("time", "domain", "kind")


#: the one field of a ``struct.iter_unpack("16s", ...)`` item: a slot's chunk id
_first = operator.itemgetter(0)


@functools.cache
def _differs_from(value: int) -> bytes:
    """A translation table mapping ``value`` to 0 and every other byte to 1."""
    return bytes(int(b != value) for b in range(256))


def count_slots_holding(table: bytes | bytearray, chunk_id: bytes) -> int:
    """How many 16-byte slots of a slot table hold ``chunk_id``.

    Byte k of every slot is one strided slice; mapped to 0 where it equals byte k of the
    id and to 1 elsewhere, and the 16 slices OR-ed together (as integers), a slot holds
    the id exactly where its byte of the result is 0.  Slot by slot in Python it took
    ~0.14 us a slot: 0.1 s for a 200 GiB disk's table, at every close.
    """
    n = len(table) // 16
    acc = 0
    for k in range(16):
        acc |= int.from_bytes(
            table[k : 16 * n : 16].translate(_differs_from(chunk_id[k])), "little"
        )
    return acc.to_bytes(n, "little").count(0)


class StreamStats(msgspec.Struct, frozen=True):
    """What one stream cost: logical bytes given, bytes actually stored new, slots."""

    bytes_written: int
    bytes_new: int
    chunks: int
    holes: int


@dataclass(frozen=True)
class WriterOptions:
    """Tuning knobs; the defaults bound memory to roughly 3 packs + the in-flight chunks."""

    workers: int = max(2, os.cpu_count() or 2)
    max_inflight: int = 0  # 0: 4 per worker
    index_flush_entries: int = 200_000
    #: Packs assembled and published concurrently (each holds one pack in memory).
    max_uploads: int = 2


class StreamWriter:
    """Writes one named stream of an archive; obtained from :meth:`ArchiveWriter.stream`."""

    def __init__(
        self,
        writer: ArchiveWriter,
        name: str,
        kind: str,
        size: int | None,
        chunk_size: int,
        attrs: Mapping[str, Any],
        read_back: bool = False,
    ) -> None:
        self._w = writer
        self.name = name
        self.kind = kind
        #: the caller reads this stream's chunks back before the writer is done
        self.read_back = read_back
        self.size = size
        self.chunk_size = chunk_size
        self.attrs = dict(attrs)
        nslots = 0 if size is None else -(-size // chunk_size)
        self._table = bytearray(16 * nslots)
        self._end = 0  # end of the data written so far (streams of unknown size)
        self._final_partial = False
        self._pending = bytearray()
        self._append_offset = 0
        self.closed = False
        self._bytes_written = 0
        self._bytes_new = 0
        self._chunks = 0
        self._holes_written = 0
        self._task: Task = writer.progress.task(name, total=size)

    # -- feeding -----------------------------------------------------------------
    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` at ``offset`` (a multiple of the chunk size).

        ``data`` is split into chunks; only the last chunk of the stream may be short.
        Raises :class:`UsageError` for a misaligned offset, a short chunk before the
        end, or data past the declared size.
        """
        if offset % self.chunk_size:
            raise UsageError(f"stream {self.name}: offset {offset} not chunk-aligned")
        view = memoryview(data).cast("B")
        cs = self.chunk_size
        index = offset // cs
        for start in range(0, len(view), cs):
            self.write_chunk(index, view[start : start + cs])
            index += 1

    def append(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes of any length at the end of the stream (buffers a partial chunk)."""
        cs = self.chunk_size
        view = memoryview(data).cast("B")
        if self._pending:
            take = min(cs - len(self._pending), len(view))
            self._pending += view[:take]
            view = view[take:]
            if len(self._pending) == cs:
                self.write_chunk(self._append_offset // cs, self._pending)
                self._append_offset += cs
                self._pending = bytearray()
        whole = len(view) - len(view) % cs
        if whole:
            self.write(self._append_offset, view[:whole])
            self._append_offset += whole
        if whole < len(view):
            self._pending += view[whole:]

    def write_if_present(self, index: int, data: bytes) -> bytes | None:
        """Fill slot ``index`` of a stream of known size with ``data`` (a whole slot)
        when nothing needs storing: zeros (a hole), or a chunk the repository or this
        writer holds already.  Returns None then; otherwise the chunk id, for
        :meth:`write_chunk` (``chunk_id=``) when the caller stores the data later.

        Raises :class:`UsageError` for a slot past the end or a wrong length.
        """
        self._check_open()
        n = len(data)
        if self.size is None or n != self._slot_length(index):
            raise UsageError(f"stream {self.name}: slot {index} needs a whole slot, got {n}")
        w = self._w
        cid = w.content_id(data)
        if cid != w.zero_id and not w._has_chunk(cid):
            return cid
        self._record(index, cid, n, new=False)
        return None

    def write_chunk(
        self,
        index: int,
        data: bytes | bytearray | memoryview,
        chunk_id: bytes | None = None,
        *,
        handed_over: bool = False,
    ) -> bool:
        """Store one slot; all-zero data becomes a hole and is never stored.
        ``chunk_id``: the content id of ``data``, from :meth:`write_if_present`.
        ``handed_over``: nothing writes to ``data``'s buffer after this call (a fresh
        buffer per read), so the writer keeps it rather than a copy.  Returns whether the
        chunk was new (stored by this call; not a hole, not known already).

        Raises :class:`UsageError` for a slot past the end or a wrong length.
        """
        self._check_open()
        n = len(data)
        expect = self._slot_length(index)
        if n != expect and not (self.size is None and 0 < n < self.chunk_size):
            raise UsageError(
                f"stream {self.name}: slot {index} needs {expect} bytes, got {n}"
                + ("" if self.size is not None else " (only the last chunk may be short)")
            )
        if self.size is None:
            if self._final_partial and index * self.chunk_size >= self._end - 1:
                raise UsageError(f"stream {self.name}: data after the short last chunk")
            if n < self.chunk_size:
                self._final_partial = True
            self._grow(index)
            self._end = max(self._end, index * self.chunk_size + n)
        cid, new = self._w._store_chunk(data, self.name, chunk_id, handed_over)
        self._record(index, cid, n, new)
        return new

    def write_holes(self, first: int, count: int) -> None:
        """Slots ``first`` to ``first + count - 1`` of a stream of known size hold zeros:
        :meth:`write_chunk` of all-zero data for each (holes, counted as written), without
        the zero check and a Python step per slot.  A guest's untouched RAM comes as runs
        of zero records: 131,072 slots of an 8 GiB guest took 0.48 s slot by slot.

        Raises :class:`UsageError` for a stream of unknown size or a slot past the end.
        """
        self._check_open()
        if count <= 0:
            return
        if self.size is None:
            raise UsageError(f"stream {self.name}: holes need a stream of known size")
        self._slot_length(first)
        self._slot_length(first + count - 1)  # past the end: raises
        end = min(self.size, (first + count) * self.chunk_size)
        n = end - first * self.chunk_size
        self._table[16 * first : 16 * (first + count)] = self._w.zero_id * count
        self._bytes_written += n
        self._holes_written += count
        self._task.advance(n)

    def _record(self, index: int, cid: bytes, n: int, new: bool) -> None:
        """Slot ``index`` holds ``cid`` (``n`` bytes; ``new``: stored by this call)."""
        self._table[16 * index : 16 * index + 16] = cid
        self._bytes_written += n
        if cid == self._w.zero_id:
            self._holes_written += 1
        else:
            self._chunks += 1
            if new:
                self._bytes_new += n
        self._task.advance(n)

    def set_chunk(self, index: int, chunk_id: bytes) -> None:
        """Point slot ``index`` at a chunk already in the repository (incrementals).

        Raises :class:`ChunkMissingError` if the repository lacks the chunk,
        :class:`UsageError` for a slot past the end.
        """
        self._check_open()
        if self.size is not None:
            self._slot_length(index)
        else:
            self._grow(index)
            self._end = max(self._end, (index + 1) * self.chunk_size)
        if len(chunk_id) != 16:
            raise UsageError("chunk ids are 16 bytes")
        if chunk_id != self._w.zero_id and not self._w._has_chunk(chunk_id):
            raise ChunkMissingError(
                f"stream {self.name}: chunk {chunk_id.hex()} is not in the repository",
                chunk_id=chunk_id.hex(),
            )
        self._table[16 * index : 16 * index + 16] = chunk_id
        if chunk_id == self._w.zero_id:
            self._holes_written += 1
        else:
            self._chunks += 1

    def set_chunks(self, table: bytes | bytearray | memoryview, slots: Iterable[int]) -> int:
        """Point each slot in ``slots`` at the chunk ``table`` lists for it (16 bytes per
        slot, this stream's chunk size: a parent archive's table); return how many of them
        hold a chunk (the others are holes).

        :meth:`set_chunk` for many slots at once: each distinct chunk is looked up once,
        under one lock, and the table is copied in runs of adjacent slots (slot by slot it
        took ~20 us a slot: a minute for the 3.3 million slots of a 200 GiB disk).

        ``slots`` as a ``range`` (all of a stream: how a capture takes its disk reader
        process's tables) is taken without a Python step per slot: its ids come from
        ``struct.iter_unpack`` and the table is copied at once.  Slot by slot, that part took
        0.29 s of CPU for the 819,200 slots of a 200 GiB disk of 256 KiB chunks; 0.12 s so.

        Raises :class:`ChunkMissingError` if the repository lacks one of the chunks
        (then no slot is set), :class:`UsageError` for a slot past the end or past
        ``table``.
        """
        self._check_open()
        idx: Sequence[int]
        if isinstance(slots, range) and slots.step == 1:
            idx, span = slots, True
        else:
            idx, span = sorted(set(slots)), False
        if not idx:
            return 0
        if idx[0] < 0:
            raise UsageError(f"stream {self.name}: negative slot")
        first, last = idx[0], idx[-1]
        tb = bytes(table)
        if len(tb) < 16 * (last + 1):
            raise UsageError(f"stream {self.name}: slot {last} is past the table given")
        if self.size is not None:
            self._slot_length(last)
        if span:
            ids = list(map(_first, struct.iter_unpack("16s", tb[16 * first : 16 * (last + 1)])))
        else:
            ids = [tb[16 * i : 16 * i + 16] for i in idx]
        zero = self._w.zero_id
        holes = ids.count(zero)
        wanted = set(ids)
        wanted.discard(zero)
        # Without the writer's mutex (the memory's parser waits for it while a disk's
        # thread asks about its 4,096 slots), as _has_chunk: a chunk of this writer's
        # enters the index before it leaves _unpublished, so asking in this order misses
        # none.
        mine = self._w._unpublished
        missing = self._w.repo._missing_chunks(c for c in wanted if c not in mine)
        if missing:
            raise ChunkMissingError(
                f"stream {self.name}: chunk {missing[0].hex()} is not in the repository",
                chunk_id=missing[0].hex(),
            )
        if self.size is None:
            self._grow(last)
            self._end = max(self._end, (last + 1) * self.chunk_size)
        if span:
            self._table[16 * first : 16 * (last + 1)] = tb[16 * first : 16 * (last + 1)]
        else:
            start = prev = first
            for i in [*idx[1:], -1]:  # -1: ends the last run
                if i != prev + 1:
                    self._table[16 * start : 16 * (prev + 1)] = tb[16 * start : 16 * (prev + 1)]
                    start = i
                prev = i
        self._holes_written += holes
        self._chunks += len(idx) - holes
        return len(idx) - holes

    def close(self) -> StreamStats:
        """Finish the stream (flushes a partial :meth:`append` chunk). Idempotent."""
        if not self.closed:
            if self._pending:
                self.write_chunk(self._append_offset // self.chunk_size, bytes(self._pending))
                self._append_offset += len(self._pending)
                self._pending = bytearray()
            if self.size is None:
                self.size = self._end
            self.closed = True
            self._task.close()
        holes = count_slots_holding(self._table, self._w.zero_id)
        return StreamStats(self._bytes_written, self._bytes_new, self._chunks, holes)

    # -- internals ---------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise UsageError(f"stream {self.name} is closed")
        self._w._check_open()

    def _slot_length(self, index: int) -> int:
        if index < 0:
            raise UsageError(f"stream {self.name}: negative slot")
        if self.size is None:
            return self.chunk_size
        start = index * self.chunk_size
        if start >= self.size:
            raise UsageError(f"stream {self.name}: slot {index} is past the end ({self.size})")
        return min(self.chunk_size, self.size - start)

    def _grow(self, index: int) -> None:
        need = 16 * (index + 1)
        if len(self._table) < need:
            self._table.extend(bytes(need - len(self._table)))

    def slot_id(self, index: int) -> bytes:
        """The chunk id now in slot ``index`` (the zero id for a hole or an unwritten slot)."""
        if index < 0:
            raise UsageError(f"stream {self.name}: negative slot")
        return bytes(self._table[16 * index : 16 * index + 16]) or self._w.zero_id

    def table(self) -> bytes:
        """A copy of the slot table (16 bytes per slot)."""
        return bytes(self._table)


class ArchiveWriter:
    """Collects the streams of one archive; use as a context manager and :meth:`commit`."""

    def __init__(
        self,
        repo: Repository,
        lock: Lock,
        progress: Progress = NULL_PROGRESS,
        options: WriterOptions | None = None,
    ) -> None:
        self.repo = repo
        self.progress = progress
        self.options = options or WriterOptions()
        self._lock = lock
        self._codecs = repo.codecs
        self.zero_id: bytes = self._codecs.zero_id
        self._streams: dict[str, StreamWriter] = {}
        self._mutex = threading.RLock()
        workers = max(1, self.options.workers)
        self._max_inflight = self.options.max_inflight or 4 * workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="vmarchive-compress")
        self._uploader = ThreadPoolExecutor(
            max(1, self.options.max_uploads), thread_name_prefix="vmarchive-upload"
        )
        # (chunk id, raw length, stream name, compression, the blob made at once, or the
        # chunk whose raw frame _drain writes into the pack)
        self._inflight: collections.deque[
            tuple[bytes, int, str, Future[bytes] | bytes | _RawChunk]
        ] = collections.deque()
        # Chunks accepted but not yet in a published pack: id -> encoded blob (a view of
        # its pack being built; None until it is in one).  Used for dedup within this
        # writer and for read_chunk.
        self._unpublished: dict[bytes, tuple[bytes | memoryview | None, int]] = {}
        self._builders: dict[str, PackBuilder] = {}  # stream name -> its pack being built
        # (publishing, its builder): the builder's mapping is reused once that is done
        self._uploads: collections.deque[
            tuple[Future[list[tuple[bytes, Location]]], PackBuilder]
        ] = collections.deque()
        self._free_maps: list[mmap.mmap] = []  # released by published packs' builders
        self._max_uploads = max(1, self.options.max_uploads)
        self._index_entries: list[tuple[bytes, Location]] = []
        self._read_back_packs: list[str] = []  # published with read_back (uploader threads)
        self._state = "open"  # open -> committed | published | aborted
        #: names of the index objects this writer published (:meth:`publish_chunks`)
        self.index_names: list[str] = []
        self._done = False  # counted out of repo's live writers
        self.packs_written = 0
        self.indices_written = 0
        repo._writer_started()

    # -- public API ----------------------------------------------------------------
    def stream(
        self,
        name: str,
        kind: str,
        size: int | None,
        chunk_size: int | None = None,
        attrs: Mapping[str, Any] | None = None,
        *,
        read_back: bool = False,
    ) -> StreamWriter:
        """Start a stream. ``size`` None: unknown, fixed by what is written.

        ``read_back``: the caller reads this stream's chunks back before the writer is
        done (a capture's round trip); its packs are published with that hint, so a remote
        backend can serve those reads from a local copy.

        Raises :class:`UsageError` for a duplicate name, an unknown kind or a bad size.
        """
        self._check_open()
        if name in self._streams:
            raise UsageError(f"stream {name!r} already exists in this archive")
        if not self._codecs.is_safe_stream_name(name):
            raise UsageError(f"unsafe stream name {name!r}")
        if kind not in STREAM_KINDS:
            raise UsageError(f"unknown stream kind {kind!r}")
        cs = chunk_size or self._codecs.default_chunk_size(kind)
        if cs <= 0 or (size is not None and size < 0):
            raise UsageError(f"stream {name!r}: bad size or chunk size")
        sw = StreamWriter(self, name, kind, size, cs, attrs or {}, read_back)
        self._streams[name] = sw
        return sw

    def content_id(self, data: bytes | bytearray | memoryview) -> bytes:
        """The id a slot holding ``data`` gets: the hole id for zeros, else its chunk id."""
        if self._codecs.is_zero(data):
            return self.zero_id
        return self._codecs.chunk_id(data)

    def read_chunk(self, chunk_id: bytes) -> bytes:
        """Read a chunk, including one still waiting in this writer's unpublished pack.

        Raises :class:`ChunkMissingError`, :class:`DamageError`.
        """
        with self._mutex:
            pending = self._unpublished.get(chunk_id)
            if pending is not None and pending[0] is None:
                self._drain(0)  # still compressing: finish it
                pending = self._unpublished.get(chunk_id)
        blob = pending[0] if pending is not None else None
        if pending is not None and blob is not None:
            data = self._codecs.decode_blob(chunk_id, blob, pending[1])
            self._codecs.verify_chunk(chunk_id, data)
            return data
        # Published meanwhile (indexed before it left _unpublished), or never ours.
        return self.repo.read_chunk(chunk_id)

    def read_chunks(self, chunk_ids: Sequence[bytes]) -> list[bytes | memoryview]:
        """:meth:`read_chunk` of each id, in order; runs of published chunks adjacent in a
        pack are read with one range read, and those stored as one raw block come back as
        read-only views of it (:func:`vmarchive.store.batchread.read_chunk_views`).
        """
        with self._mutex:
            mine = [cid in self._unpublished for cid in chunk_ids]
        out: list[bytes | memoryview] = []
        i = 0
        while i < len(chunk_ids):
            j = i
            while j < len(chunk_ids) and mine[j] == mine[i]:
                j += 1
            run = chunk_ids[i:j]
            if mine[i]:
                out += [self.read_chunk(cid) for cid in run]
            else:
                out += batchread.read_chunk_views(self.repo, run)
            i = j
        return out

    def flush(self) -> None:
        """Publish every chunk written so far: compressions finished, packs written and
        waited for -- what :meth:`commit` does first, done ahead of it (a capture does it
        beside its memory's round trip).  The index and the manifest wait for the commit.

        Raises :class:`BackendError` on storage failure.
        """
        self._check_open()
        with self._mutex:
            self._publish_packs()

    def _publish_packs(self) -> None:
        self._drain(0)
        for name in list(self._builders):
            self._finish_pack(name)
        self._wait_uploads()

    def commit(self, metadata: Mapping[str, Any]) -> str:
        """Flush everything, publish the manifest, return the archive id.

        Raises :class:`UsageError` for missing metadata keys, :class:`LockedError` if
        our lock was lost, :class:`BackendError` on storage failure.
        """
        self._check_open()
        for k in REQUIRED_METADATA:
            if k not in metadata:
                raise UsageError(f"archive metadata lacks {k!r}")
        streams = [sw for sw in self._streams.values()]
        for sw in streams:
            sw.close()
        with self._mutex:
            self._publish_packs()
            self._write_index()
            crashpoint.hit("before-manifest")
        self._lock.check()
        archive_id = self.repo._publish_manifest(
            dict(metadata),
            [
                (sw.name, sw.kind, sw.size or 0, sw.chunk_size, sw.attrs, sw.table())
                for sw in streams
            ],
        )
        crashpoint.hit("after-manifest")
        self._state = "committed"
        self.repo._cache_index_after_commit()
        self._shutdown()
        return archive_id

    def publish_chunks(self) -> list[str]:
        """End without a manifest, every chunk stored durable and indexed: for streams that
        another writer's archive takes over (a disk read by a process of its own, see
        :mod:`vmarchive.ops.disk_process`), which adopts the index objects named here
        (:meth:`Repository._adopt_index`) and points its own streams at the chunks.

        Until that archive is published nothing names the packs but these index objects:
        the other writer's shared lock keeps gc out meanwhile, as for its own packs.

        Raises :class:`LockedError` if our lock was lost, :class:`BackendError` on storage
        failure (then nothing is promised: the caller aborts).
        """
        self._check_open()
        for sw in list(self._streams.values()):
            sw.close()
        with self._mutex:
            self._publish_packs()
            self._write_index()
        self._lock.check()
        self._state = "published"
        self._shutdown()
        return list(self.index_names)

    def adopt_index(self, names: Iterable[str]) -> int:
        """Take in the index objects ``names`` that another writer published with
        :meth:`publish_chunks` (a process of this capture's): its chunks can then be
        referred to (:meth:`StreamWriter.set_chunks`) as any chunk of the repository.
        Returns how many were new to this writer's index.  Raises as
        :meth:`Repository._adopt_index`."""
        self._check_open()
        return self.repo._adopt_index(names)

    def abort(self) -> None:
        """Stop without publishing a manifest (idempotent).

        The chunks of the packs this writer already published and waited for are in the
        repository's in-memory index, but in no index object yet.  A later writer of the
        same :class:`Repository` (a capture retried with its stream stored opaquely: the
        disks' chunks again) would deduplicate against them and commit an archive naming
        chunks that no index object names: missing for every other process, their packs
        garbage for gc.  So the in-memory index is dropped and reloaded from ``index/`` on
        next use (local, no request to a backend that may be what failed); only while
        another writer of the same object runs -- dropping would lose its own entries --
        are they published instead.
        """
        if self._state == "open":
            self._state = "aborted"
            if self._index_entries and not self.repo._drop_index():
                try:
                    self._lock.check()
                    self.repo._publish_index(self._index_entries)
                except Exception as e:  # reported: nothing else can be done
                    log.error(
                        "aborted archive writer: %d chunks of its packs left unindexed "
                        "while another writer runs: %s",
                        len(self._index_entries),
                        e,
                    )
            self._index_entries = []
        self._shutdown()

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()

    # -- pipeline --------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._state != "open":
            raise UsageError(f"archive writer is {self._state}")

    def _has_chunk(self, chunk_id: bytes) -> bool:
        # Without the writer's mutex (the hot path of a second capture asks once per
        # chunk): a published chunk enters the index before it leaves _unpublished (see
        # _wait_upload), so asking in this order never misses one in between; a chunk
        # being stored meanwhile is found again by _store_chunk, which asks under it.
        return chunk_id in self._unpublished or self.repo._holds_chunk(chunk_id)

    def _store_chunk(
        self,
        data: bytes | bytearray | memoryview,
        stream: str,
        cid: bytes | None = None,
        handed_over: bool = False,
    ) -> tuple[bytes, bool]:
        """Return (chunk id, whether it was new); zero chunks return the hole id.  A new
        chunk goes into ``stream``'s pack.  ``cid``: :meth:`content_id` of ``data``, if
        the caller has it; ``handed_over``: as for :meth:`StreamWriter.write_chunk`."""
        codecs = self._codecs
        if cid is None:
            cid = self.content_id(data)
        if cid == self.zero_id or self._has_chunk(cid):
            return cid, False
        view = data if isinstance(data, bytes) else memoryview(data)
        n = len(view) if isinstance(view, bytes) else view.nbytes
        # Prepared before taking the writer's mutex: the probe's three zstd calls, a copy,
        # an encryption each hand the interpreter lock over and must take it back, and
        # under the mutex every other thread storing (the memory's parser beside a disk's
        # reader) waited for that too.  An incremental capture's parser waited 69 ms for
        # it while a disk thread stored 160 chunks.
        fut: Future[bytes] | bytes | _RawChunk | None = None
        raw: bytes | memoryview | None = None
        if codecs.stores_raw(view):
            # Stored as a raw frame, on this thread: handed to a compression thread it
            # cost more than itself in hand-offs (a first capture's 4096 random RAM
            # chunks: 0.15-0.3 CPU-s).  _drain writes the frame's pieces straight into
            # the pack: one copy, none when the caller's buffer is immutable or handed
            # over.
            if codecs.blob.encrypted:
                fut = codecs.encode_blob(cid, view, raw_blocks=True)
            elif isinstance(data, bytes):
                fut = _RawChunk(data)
            else:
                fut = _RawChunk(view if handed_over else bytes(view))
        else:
            raw = view if handed_over else bytes(data)  # the caller may reuse its buffer
        with self._mutex:
            if self._has_chunk(cid):  # stored by another thread meanwhile
                return cid, False
            if fut is None:
                assert raw is not None
                fut = self._pool.submit(codecs.encode_blob, cid, raw, raw_blocks=False)
            self._unpublished[cid] = (None, n)
            self._inflight.append((cid, n, stream, fut))
            self._drain(self._max_inflight)
        return cid, True

    def _drain(self, keep: int) -> None:
        """Move finished compressions into the pack until at most ``keep`` are in flight."""
        target = self._codecs.pack_target
        while len(self._inflight) > keep:
            cid, raw_len, stream, fut = self._inflight.popleft()
            builder = self._builders.get(stream)
            if builder is None:
                spare = self._free_maps.pop() if self._free_maps else None
                builder = self._builders[stream] = self._codecs.new_pack(spare)
            if isinstance(fut, _RawChunk):
                parts = self._codecs.raw_blob_parts(fut.data)
                assert parts is not None  # only made for a plain repository
                entry = builder.add_parts(cid, parts, raw_len)
            else:
                entry = builder.add(cid, fut if isinstance(fut, bytes) else fut.result(), raw_len)
            self._unpublished[cid] = (builder.blob(entry), raw_len)
            if builder.size >= target:
                self._finish_pack(stream)
            elif len(self._builders) > 1:
                sizes = {name: b.size for name, b in self._builders.items()}
                if sum(sizes.values()) > target + target // 2:
                    self._finish_pack(max(sizes, key=lambda name: sizes[name]))

    def _finish_pack(self, stream: str) -> None:
        """Hand the pack being built to an uploader (once fewer than ``max_uploads`` run).

        Assembling a pack (its SHA-256 costs more than compressing random data) and
        publishing it run on uploader threads, so the caller's thread goes on hashing.
        """
        builder = self._builders.pop(stream, None)
        if builder is None or builder.count == 0:
            return
        while len(self._uploads) >= self._max_uploads:
            self._wait_upload()
        read_back = self._streams[stream].read_back
        upload = self._uploader.submit(self._assemble_and_publish, builder, read_back)
        self._uploads.append((upload, builder))

    def _assemble_and_publish(
        self, builder: PackBuilder, read_back: bool
    ) -> list[tuple[bytes, Location]]:
        # The unpublished reads of its chunks are served from views of the builder's
        # mapping, which is the pack: nothing to hand over.
        pack_id, data, entries = self._codecs.finish_pack(builder)
        crashpoint.hit("before-pack")
        self.repo._publish_pack(pack_id, data, read_back=read_back)
        if read_back:
            self._read_back_packs.append(pack_id)
        return entries

    def _wait_upload(self) -> None:
        """Wait for the oldest upload; then its chunks are durable and indexable."""
        if not self._uploads:
            return
        upload, builder = self._uploads.popleft()
        entries = upload.result()
        self.packs_written += 1
        crashpoint.hit("after-pack")
        for cid, loc in entries:
            self.repo._add_location(cid, loc)
            self._unpublished.pop(cid, None)
        # Its chunks are read from the pack now: the mapping it was built in is free for
        # the next one unless a reader still holds a view of it (release() checks).
        mapping = builder.release()
        if mapping is not None and len(self._free_maps) < self._max_uploads + 1:
            self._free_maps.append(mapping)
        self._index_entries.extend(entries)
        if len(self._index_entries) >= self.options.index_flush_entries:
            self._write_index()

    def _wait_uploads(self) -> None:
        while self._uploads:
            self._wait_upload()

    def _write_index(self) -> None:
        if not self._index_entries:
            return
        crashpoint.hit("before-index")
        self.index_names.append(self.repo._publish_index(self._index_entries))
        crashpoint.hit("after-index")
        self.indices_written += 1
        self._index_entries = []

    def _shutdown(self) -> None:
        try:
            for _, _, _, fut in self._inflight:
                if isinstance(fut, Future):
                    fut.cancel()
            self._inflight.clear()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._uploader.shutdown(wait=True, cancel_futures=True)
            self._unpublished.clear()
            self._free_maps.clear()  # the mappings go now, not with the writer object
            if self._read_back_packs:  # read back by now: commit and abort come after
                self.repo._done_reading_back(self._read_back_packs)
                self._read_back_packs = []
        finally:
            if not self._done:
                self._done = True
                self.repo._writer_done()
            self._lock.release()


class _RawChunk:
    """A chunk waiting in the writer's queue to be stored as a raw frame (its bytes, or a
    buffer handed over: nothing else writes to it)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | memoryview) -> None:
        self.data = data
