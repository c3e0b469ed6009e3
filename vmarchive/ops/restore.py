"""Restore an archive as a resumed guest: finish the migration the capture started (ops layer).

A capture is a live migration that has not finished.  :func:`restore` finishes it on a
target: the disks are rebuilt from the store (sparse: stored holes are never written),
the migration stream is regenerated from the page images and device sections (or the
opaque stream is replayed) and handed to libvirt inside a save image that this module
builds -- ``virDomainRestoreFlags`` starts QEMU with ``-incoming`` and the guest continues
at the captured instant: same boot, same processes, counters going on.

Routes (measured in ``scripts/bench_restore.py``; see the module notes below):

``fifo`` (default, a libvirtd on this host)
    The save image is a FIFO: the 92-byte header + XML are written into it, followed by
    the regenerated stream as QEMU reads it.  libvirt only reads the prefix and passes the
    descriptor to QEMU, so nothing of the RAM is ever staged on disk.  The disks are
    filled at the same time: each image is first created with its final size and
    structure (qcow2 tables computed from the slot table, so qcow2 is written in place,
    no temporary raw file), then its data is written while the memory stream flows; the
    stream's device sections, EOF and vmdesc are withheld until every disk is complete
    and fsynced, and QEMU reads no disk data before the migration's end (see
    :class:`_TailGate`).

``pool`` (``--pool``; any libvirt URI, also a remote one)
    Disks are created as volumes in the pool and uploaded through a sparse ``virStream``;
    the save image is uploaded as a temporary volume, restored from, and deleted.  One
    libvirt connection is all the target needs; the staging is that one save volume.

Verify before resume: every chunk is verified as it is read (store), the archive's chunks
are checked present before anything is written, the target's machine type, QEMU version
and CPU are checked before anything is written, the stream layout is validated against
its vmdesc, and a failure while the stream flows cuts the stream, so QEMU's incoming
migration fails and the guest never starts.  Whatever fails, what this restore created
(files, volumes, the domain) is removed.

:func:`clone` is a restore with a new name, UUID and MACs, links down and no shared host
resources; :func:`export_save` writes the save image (and the disks) for plain
``virsh restore``.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import glob
import hashlib
import logging
import os
import random
import shutil
import tempfile
import threading
import time
import uuid as uuid_mod
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import msgspec

from vmarchive.errors import (
    AlreadyExistsError,
    DamageError,
    FormatError,
    HypervisorError,
    StreamError,
    UsageError,
    VmarchiveError,
)
from vmarchive.format import migstream as ms
from vmarchive.format import saveimage
from vmarchive.hypervisor.connection import DEFAULT_URI, Connection, Domain
from vmarchive.hypervisor.restore import (
    Pool,
    TargetCheck,
    VolumeUpload,
    check_target,
    define_domain,
    domain_log_file,
    find_domain,
    remove_domain,
    restore_image,
    set_guest_time,
)
from vmarchive.ops import export_qcow2 as Q
from vmarchive.ops import restore_xml as rx
from vmarchive.ops.fileio import ImageWriter, pwrite_all
from vmarchive.ops.malloc_tuning import keep_freed_memory
from vmarchive.ops.outputs import check_output
from vmarchive.ops.restore_feed import FifoWriter
from vmarchive.progress import NULL_PROGRESS, Progress
from vmarchive.store import Archive, Repository, StreamInfo, VerifyReport
from vmarchive.store.batchread import all_present, read_chunk_views

log = logging.getLogger(__name__)

DEFAULT_DISK_DIR = Path("/var/lib/libvirt/images")
DISK_FORMATS = ("raw", "qcow2")
#: Names a clone without --name may take: DOMAIN-clone-ID, then -2 ... -100.
_CLONE_NAMES = 100
WRITE_SIZE = 4 << 20


# --- options and results ---------------------------------------------------------------------


@dataclass(frozen=True)
class RestoreOptions:
    """What to restore where (built by the CLI or by tests)."""

    archive: str
    repo: str
    uri: str = DEFAULT_URI
    #: Name of the new domain (default: the archived one; for a clone DOMAIN-clone-ID, -2...).
    name: str | None = None
    #: Directory for disk images and serial logs (local route); default DEFAULT_DISK_DIR.
    disk_dir: Path | None = None
    #: Storage pool on the target (pool route: works over any libvirt URI).
    pool: str | None = None
    #: Image format of the rebuilt disks (default: as archived).
    disk_format: str | None = None
    paused: bool = False
    replace: bool = False
    sync_time: bool = False
    passphrase: str | None = None
    #: Clone: new UUID and MACs, NIC links down unless keep_network.
    clone: bool = False
    keep_network: bool = False
    #: Compute SHA-256 of the regenerated stream and of each disk's contents (replay proof).
    digests: bool = False
    #: Ordinary RAM for a guest that had huge pages (a target without them).
    no_hugepages: bool = False


class DiskOut(msgspec.Struct, frozen=True):
    target: str
    path: str
    format: str
    size: int
    bytes_written: int
    sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return msgspec.structs.asdict(self)


@dataclass
class RestoreResult:
    domain: str
    uuid: str
    archive: str
    route: str
    duration_s: float
    paused: bool
    #: what the domain is left as: running, paused, or shut off (a disk-only archive)
    state: str = "running"
    disks: list[DiskOut] = field(default_factory=list)
    stream_bytes: int = 0
    stream_sha256: str | None = None
    #: Bytes staged on disk besides the final images (qcow2 conversion, save volume).
    staging_bytes: int = 0
    serial_logs: list[str] = field(default_factory=list)
    macs: list[str] = field(default_factory=list)
    links_down: int = 0
    #: How far the guest's clock is behind (the archive's age), seconds.
    clock_skew_s: float | None = None
    time_synced: bool = False
    time_note: str = ""
    target: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: the new UEFI variable store (guests with ``<nvram>``), on the target host
    nvram: str | None = None

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["disks"] = [x.to_json() for x in self.disks]
        return d


# --- the archive, read ---------------------------------------------------------------------


class _Writable(Protocol):
    def write(self, b: bytes | bytearray | memoryview, /) -> int | None: ...


@dataclass
class _Plan:
    archive: Archive
    xml: str
    live_xml: str
    disks: list[StreamInfo]
    layout: ms.StreamLayout | None
    opaque: StreamInfo | None

    @property
    def has_memory(self) -> bool:
        """False for a disk-only archive (a shut-off domain): disks and XML, nothing to
        resume."""
        return self.layout is not None or self.opaque is not None


def _meta_text(repo: Repository, archive: Archive, name: str) -> str | None:
    if not any(s.name == name for s in archive.streams):
        return None
    return repo.open_stream(archive, name).read_all().decode("utf-8")


def _plan(repo: Repository, archive: Archive) -> _Plan:
    """What the archive holds, checked. Raises FormatError / StreamError / UsageError."""
    xml = _meta_text(repo, archive, "domain.xml")
    if xml is None:
        raise FormatError(f"archive {archive.id[:12]} has no domain XML")
    live = _meta_text(repo, archive, "domain-live.xml") or xml
    layout: ms.StreamLayout | None = None
    opaque: StreamInfo | None = None
    devstate = [s for s in archive.streams if s.kind == "devstate"]
    streams = [s for s in archive.streams if s.kind == "stream"]
    if devstate:
        try:
            layout = ms.StreamLayout.from_json(devstate[0].attrs["layout"])
        except (KeyError, TypeError, ValueError) as e:
            raise StreamError(f"archive {archive.id[:12]}: unreadable stream layout: {e}") from e
        layout.validate()
        if layout.devstate_size != devstate[0].size:
            raise StreamError("device state size does not match the stream layout")
        ram = {s.name: s for s in archive.streams if s.kind == "ram"}
        for b in layout.ram_blocks:
            s = ram.get(f"ram:{b.idstr}")
            if s is None or s.size != b.used_length:
                raise StreamError(f"archive has no page image of RAM block {b.idstr!r}")
    elif streams:
        opaque = streams[0]
    disks = [s for s in archive.streams if s.kind == "disk"]
    for d in disks:
        rx.check_target_name(str(d.attrs.get("target", "")))
        if d.name != f"disk:{d.attrs['target']}":
            raise FormatError(f"disk stream {d.name!r} does not match its target")
    return _Plan(archive, xml, live, disks, layout, opaque)


def write_stream(
    repo: Repository, plan: _Plan, out: _Writable, cancelled: Callable[[], bool] = lambda: False
) -> int:
    """Write the archive's migration stream to ``out``; return its length.

    Raises DamageError (a chunk failed verification) or StreamError.
    """
    archive = plan.archive
    if plan.opaque is not None:
        r = repo.open_stream(archive, plan.opaque.name)
        n = 0
        for _off, data in r.iter_chunks():
            if cancelled():
                raise StreamError("restore cancelled")
            chunk = data if data is not None else bytes(r.chunk_size)
            chunk = chunk[: r.size - n]
            out.write(chunk)
            n += len(chunk)
        return n
    assert plan.layout is not None
    dev = next(s for s in archive.streams if s.kind == "devstate")
    devstate = repo.open_stream(archive, dev.name).read_all()

    def source(b: ms.RamBlock) -> Iterator[ms.RamExtent]:
        for ext in read_ahead(repo, archive.stream(f"ram:{b.idstr}")):
            if cancelled():
                raise StreamError("restore cancelled")
            yield ext

    return ms.regenerate(plan.layout, devstate, source, out)


#: Slots fetched per read task: the store reads the chunks of one task that lie back to
#: back in a pack with one range read, and a task per 64 KiB chunk cost a GIL hand-over per
#: chunk between the reader threads and the busy regenerator (measured with
#: scripts/bench_restore.py).  zstd and the pack reads release the GIL, so READ_THREADS
#: tasks overlap with the consumer; READ_AHEAD tasks are in flight at most.
BATCH_BYTES = 512 << 10
READ_AHEAD = 8
READ_THREADS = 2


def read_ahead(
    repo: Repository, s: StreamInfo
) -> Iterator[tuple[int, int, bytes | memoryview | None]]:
    """(offset, length, verified data or None for a hole) of every slot of ``s``, in order,
    read in batches on READ_THREADS threads, up to READ_AHEAD batches ahead.  Chunks stored
    as raw blocks come as read-only views of their batch's range read, not copied
    (:func:`vmarchive.store.batchread.read_chunk_views`).

    Raises DamageError / ChunkMissingError like :meth:`Repository.read_chunk`.
    """
    zero = repo.codecs.zero_id
    cs = s.chunk_size
    per_batch = max(1, BATCH_BYTES // cs)
    window: collections.deque[tuple[int, int, Future[list[bytes | memoryview]] | None]] = (
        collections.deque()
    )

    def batches() -> Iterator[tuple[int, int, list[bytes]]]:
        """(first slot, slot count, chunk ids) runs: all holes (no ids) or all data."""
        index = 0
        while index < s.slots:
            hole = s.chunk_id(index) == zero
            ids: list[bytes] = []
            j = index
            while j < s.slots and j - index < per_batch:
                cid = s.chunk_id(j)
                if (cid == zero) != hole:
                    break
                if not hole:
                    ids.append(cid)
                j += 1
            yield index, j - index, ids
            index = j

    def slots(
        first: int, count: int, fut: Future[list[bytes | memoryview]] | None
    ) -> Iterator[tuple[int, int, bytes | memoryview | None]]:
        datas = None if fut is None else fut.result()
        for k in range(count):
            off = (first + k) * cs
            length = min(cs, s.size - off)
            data = None if datas is None else datas[k]
            if data is not None and len(data) != length:
                raise DamageError(
                    f"stream {s.name}: a chunk has {len(data)} bytes, its slot {length}"
                )
            yield off, length, data

    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="restore-read") as pool:
        try:
            for first, count, ids in batches():
                fut = pool.submit(read_chunk_views, repo, ids) if ids else None
                window.append((first, count, fut))
                if len(window) > READ_AHEAD:
                    yield from slots(*window.popleft())
            while window:
                yield from slots(*window.popleft())
        finally:
            for _first, _count, fut in window:
                if fut is not None:
                    fut.cancel()


class _Hashing:
    def __init__(self, out: _Writable, h: Any) -> None:
        self.out = out
        self.h = h

    def write(self, b: bytes | bytearray | memoryview, /) -> int | None:
        n = self.out.write(b)
        if self.h is not None:
            self.h.update(b if n is None else memoryview(b)[:n])
        return n


# --- disks -------------------------------------------------------------------------------


def _hex(h: Any) -> str | None:
    return None if h is None else str(h.hexdigest())


def _digest_disk(h: Any, length: int, data: bytes | memoryview | None) -> None:
    if data is not None:
        h.update(data)
        return
    zero = bytes(min(length, 1 << 20))
    while length > 0:
        n = min(length, len(zero))
        h.update(zero[:n])
        length -= n


def _qcow2_layout(s: StreamInfo, zero_id: bytes) -> Q.Qcow2Layout:
    """The qcow2 layout of disk stream ``s``: every cluster a data slot touches is
    allocated, the rest reads as zeros (known from the slot table, before any read)."""
    cs = s.chunk_size
    clusters: set[int] = set()
    for i in range(s.slots):
        if s.chunk_id(i) != zero_id:
            start, end = i * cs, min((i + 1) * cs, s.size)
            clusters.update(range(start // Q.CLUSTER, -(-end // Q.CLUSTER)))
    return Q.plan(s.size, sorted(clusters))


class _Cancelled(Exception):
    """The other half of a restore failed: stop quietly (its error is the one reported)."""


class _DiskFile:
    """One rebuilt disk image on this host, made in two steps so that libvirt and QEMU can
    open it while its data is still being written.

    :meth:`create` makes the file at its final size with its final structure (for qcow2:
    header, L1, refcount and L2 tables, all computed from the slot table) -- what libvirt
    probes and QEMU opens when the incoming guest starts.  :meth:`fill` writes the data:
    QEMU reads no guest data before the incoming migration completes, and the restore
    holds back the end of the stream until every fill has finished and been fsynced.
    """

    def __init__(self, path: Path, fmt: str, s: StreamInfo, zero_id: bytes) -> None:
        self.path = path
        self.fmt = fmt
        self.stream = s
        self.layout = _qcow2_layout(s, zero_id) if fmt == "qcow2" else None
        self.fd = -1

    def create(self) -> None:
        """Create the file (O_EXCL: the caller removed what --replace allows)."""
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        if self.layout is None:
            os.ftruncate(self.fd, self.stream.size)
            return
        os.ftruncate(self.fd, self.layout.file_size)
        for off, blob in Q.metadata(self.layout):
            pwrite_all(self.fd, blob, off)

    def _host_offset(self, off: int) -> int:
        if self.layout is None:
            return off
        # The clusters of one data slot are consecutive in the file (data clusters are
        # laid out in guest order and every cluster the slot touches is allocated).
        cluster, within = divmod(off, Q.CLUSTER)
        return int(self.layout.data_offset[cluster]) + within

    def fill(
        self,
        extents: Iterator[tuple[int, int, bytes | memoryview | None]],
        h: Any,
        cancelled: Callable[[], bool],
        advance: Callable[[int], None],
    ) -> int:
        """Write the data of ``extents``; holes stay holes.  Returns data bytes written.

        The pages written go to the kernel's writeback while the fill goes on
        (:class:`ImageWriter`), so the fsync at the end finds little left to write: the
        whole image had gone to disk in that fsync (0.3 s of a 512 MiB restore's 1.5 s
        here) while the regenerated stream waited for it at the gate.
        """
        written = 0
        out = ImageWriter(self.fd)
        for off, length, data in extents:
            if cancelled():
                raise _Cancelled
            if h is not None:
                _digest_disk(h, length, data)
            if data is not None:
                out.write(data, self._host_offset(off))
                written += length
            advance(length)
        out.fsync()
        return written

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _write_disk_file(path: Path, fmt: str, repo: Repository, s: StreamInfo, h: Any = None) -> int:
    """Create and fill one image at once (export-save). Returns data bytes written."""
    f = _DiskFile(path, fmt, s, repo.codecs.zero_id)
    try:
        f.create()
        return f.fill(read_ahead(repo, s), h, lambda: False, lambda _n: None)
    finally:
        f.close()


class _TailGate:
    """A writer that withholds the end of the migration stream until ``barrier`` passes.

    QEMU finishes an incoming migration -- activates the disks and, unless paused, runs
    the guest -- only after it has read the stream's EOF marker.  Everything but the last
    ``hold`` bytes flows at once; :meth:`release` calls ``barrier`` (wait for the disks;
    it raises if they failed) and only then writes the rest.  With ``hold`` None nothing
    flows before the barrier (a stream whose end cannot be located, e.g. an opaque one).
    Only the withheld bytes are copied.
    """

    def __init__(self, out: _Writable, hold: int | None, barrier: Callable[[], None]) -> None:
        self.out = out
        self.hold = hold
        self.barrier = barrier
        self.tail = b""
        self.passed = False

    def _emit(self, b: bytes | bytearray | memoryview) -> None:
        if len(b):
            self.out.write(b)

    def write(self, b: bytes | bytearray | memoryview, /) -> int:
        n = len(b)
        if self.hold is None:
            if not self.passed:
                self.barrier()
                self.passed = True
            self._emit(b)
            return n
        if n >= self.hold:
            self._emit(self.tail)
            view = memoryview(b)
            self._emit(view[: n - self.hold])
            self.tail = bytes(view[n - self.hold :])
        else:
            both = self.tail + bytes(b)
            self._emit(both[: len(both) - self.hold] if len(both) > self.hold else b"")
            self.tail = both[-self.hold :] if len(both) > self.hold else both
        return n

    def release(self) -> None:
        """Deliver all but the withheld end, wait for the barrier, then write the end."""
        flush = getattr(self.out, "flush", None)
        if flush is not None:
            flush()
        if not self.passed:
            self.barrier()
            self.passed = True
        self._emit(self.tail)
        self.tail = b""


def _stream_hold(plan: _Plan) -> int | None:
    """Bytes at the end of the regenerated stream to withhold: the last RAM_TAIL_HOLD
    bytes of the RAM section, every device section, the EOF marker and the vmdesc.

    Where the cut falls if the barrier fails matters: QEMU 7.2 fails the incoming
    migration at once when its stream ends inside the RAM section (tests: damaged RAM
    chunks), but a stream that ended after the RAM section left it spinning at 100 % CPU
    and libvirt's restore waiting (seen here); so the cut is made inside RAM, and a failed
    feed also destroys the half-started domain (see ``_restore_fifo``).
    Per device section: type (1) + section id (4) + idstr length (1) + idstr + instance
    id (4) + version id (4), the body, footer 0x7E (1) + section id (4); then EOF (1),
    vmdesc type (1) + length (4) + the vmdesc.  None: the end cannot be located (an
    opaque stream), so nothing flows before the barrier.
    """
    layout = plan.layout
    if layout is None:
        return None
    sections = sum(14 + len(r.idstr.encode("ascii")) + r.length + 5 for r in layout.records)
    return RAM_TAIL_HOLD + sections + 1 + 5 + len(layout.vmdesc)


#: Bytes of the RAM section withheld with the device part (~15 page records).
RAM_TAIL_HOLD = 64 << 10


# --- the restore -------------------------------------------------------------------------


@dataclass
class _Created:
    """What this restore made, undone in reverse unless committed."""

    files: list[Path] = field(default_factory=list)
    dirs: list[Path] = field(default_factory=list)
    volumes: list[tuple[Pool, str]] = field(default_factory=list)
    domain: str | None = None


def _safe_child(directory: Path, filename: str) -> Path:
    """``directory/filename``, refusing anything that would land elsewhere."""
    if "/" in filename or filename in ("", ".", "..") or "\0" in filename:
        raise FormatError(f"refusing file name {filename!r}")
    base = directory.resolve()
    p = (base / filename).resolve()
    if p.parent != base:
        raise FormatError(f"refusing {p}: outside {base}")
    return p


#: The RAM block of a PC machine's UEFI variable store: QEMU maps the ``<loader>`` as
#: pflash unit 0 and the ``<nvram>`` file as unit 1, named ``system.flash0/1``.  A flash
#: device's content is RAM to the migration, so the archive holds the store as it was at
#: the instant.
NVRAM_RAM_BLOCK = "system.flash1"


def _no_memory(archive: Archive, why: str) -> str:
    kind = archive.metadata.get("kind")
    return f"archive {archive.id[:12]} ({kind}) holds no memory state: {why}"


def _nvram_content(repo: Repository, plan: _Plan) -> bytes | None:
    """The guest's UEFI variable store at the captured instant: the flash RAM block of a
    parsed memory state, or the file a disk-only capture archived.  None: not in the
    archive (an opaque stream; libvirt then starts from the firmware's template and the
    incoming migration fills it)."""
    names = {s.name for s in plan.archive.streams}
    for want in (f"ram:{NVRAM_RAM_BLOCK}", rx.NVRAM_META_STREAM):
        if want in names:
            return repo.open_stream(plan.archive, want).read_all()
    return None


def _write_new_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file (O_EXCL: the caller removed what --replace allows)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        pwrite_all(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def _existing_dir(directory: Path) -> Path:
    """``directory``, where the disk images go: it must exist (a mistyped ``--disk-dir``
    is refused, not created).  Raises UsageError."""
    if not directory.is_dir():
        what = "is not a directory" if os.path.lexists(directory) else "does not exist"
        raise UsageError(f"disk directory {directory} {what}")
    return directory


def _free_child(directory: Path, filename: str, replace: bool) -> Path:
    """:func:`_safe_child`, refused when it exists and ``replace`` does not allow it.
    Raises AlreadyExistsError, FormatError."""
    p = _safe_child(directory, filename)
    if os.path.lexists(p) and not replace:
        raise AlreadyExistsError(f"{p} exists (use --replace)", path=str(p))
    return p


def _archive_age(archive: Archive, now: float) -> float | None:
    t = archive.time
    if not t:
        return None
    try:
        dt = datetime.fromisoformat(t)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return now - dt.timestamp()


class _DiskFiller:
    """Fills the created disk images on a thread; :meth:`wait` is the stream's barrier."""

    def __init__(self, r: _Restore, files: list[_DiskFile]) -> None:
        self.r = r
        self.files = files
        self.cancel = threading.Event()
        self.error: BaseException | None = None
        self.results: list[DiskOut] = []
        self.finished_at: float | None = None
        self.thread = threading.Thread(target=self._run, name="restore-disks", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            for f in self.files:
                s = f.stream
                h = hashlib.sha256() if self.r.o.digests else None
                task = self.r.progress.task(f"disk {s.attrs['target']}", s.size)
                try:
                    n = f.fill(read_ahead(self.r.repo, s), h, self.cancel.is_set, task.advance)
                finally:
                    task.close()
                target = str(s.attrs["target"])
                self.results.append(DiskOut(target, str(f.path), f.fmt, s.size, n, _hex(h)))
        except BaseException as e:
            self.error = e
        finally:
            self.finished_at = time.monotonic()

    def wait(self) -> None:
        """Block until every disk is filled. Raises StreamError if one failed."""
        self.thread.join()
        if self.error is not None:
            raise StreamError(f"stream end withheld: a disk was not rebuilt ({self.error})")

    def stop(self) -> None:
        self.cancel.set()
        if self.thread.ident is not None:
            self.thread.join()

    def close(self) -> None:
        for f in self.files:
            f.close()


class _Restore:
    def __init__(
        self,
        o: RestoreOptions,
        repo: Repository,
        conn: Connection,
        progress: Progress,
        clock: Callable[[], float],
        rng: random.Random,
    ) -> None:
        self.o = o
        self.repo = repo
        self.conn = conn
        self.progress = progress
        self.clock = clock
        self.rng = rng
        self.t0 = time.monotonic()
        self.created = _Created()
        self.archive = repo.load_archive(o.archive)
        self.timings: dict[str, float] = {}
        self._tmark = time.monotonic()

    def _lap(self, what: str) -> None:
        now = time.monotonic()
        self.timings[what] = round(now - self._tmark, 4)
        self._tmark = now

    def _presence(self) -> VerifyReport:
        """Every chunk of the archive present: the fast check, and the repository's verify
        (which reloads the index and names what is wrong) only when that one doubts."""
        if all_present(self.repo, self.archive):
            return VerifyReport(ok=True, damaged=[], problems=[], archives_checked=1)
        return self.repo.verify([self.archive.id], full=False)

    def _check_target(self, root: Any, plan: _Plan, name: str) -> tuple[TargetCheck, Any, str]:
        """The target can run the guest; the (raw) domain to replace; the UUID to give.

        Raises HostPreconditionError, AlreadyExistsError."""
        o = self.o
        archive = self.archive
        ostype = root.find("os/type")
        cpu_xml, cpu_mode = rx.cpu_definition(plan.live_xml)
        if not plan.has_memory:
            # Only defined, booted afresh later: no stream to load, no running CPU to match.
            cpu_xml = cpu_mode = None
        tc = check_target(
            self.conn,
            arch=ostype.get("arch") if ostype is not None else None,
            machine=ostype.get("machine") if ostype is not None else None,
            virttype=root.get("type", "kvm"),
            emulator=root.findtext("devices/emulator"),
            cpu_xml=cpu_xml,
            cpu_mode=cpu_mode,
            source_qemu=str((archive.metadata.get("versions") or {}).get("qemu") or "")
            if plan.has_memory
            else None,
        )
        existing = find_domain(self.conn, name)
        if existing is not None and not o.replace:
            raise AlreadyExistsError(
                f"a domain named {name!r} exists on {self.conn.uri} (use --replace)", domain=name
            )
        # A restore keeps the archived UUID unless another domain holds it.
        new_uuid: str | None
        if o.clone:
            new_uuid = str(uuid_mod.UUID(int=self.rng.getrandbits(128), version=4))
        else:
            old = str(archive.metadata.get("uuid") or "") or None
            holder = find_domain(self.conn, uuid=old) if old else None
            if holder is not None and str(holder.name()) != name:
                new_uuid = str(uuid_mod.uuid4())
                log.warning("UUID %s is used by domain %s: given a new one", old, holder.name())
            else:
                new_uuid = old or ""
        return tc, existing, new_uuid

    # -- steps ----------------------------------------------------------------------------
    def run(self) -> RestoreResult:
        o = self.o
        archive = self.archive
        keep_freed_memory()  # fewer page faults while a gigabyte passes through
        plan = _plan(self.repo, archive)
        fmt_override = o.disk_format
        if fmt_override is not None and fmt_override not in DISK_FORMATS:
            raise UsageError(f"--disk-format must be one of {', '.join(DISK_FORMATS)}")
        pool = Pool(self.conn, o.pool) if o.pool else None
        if pool is not None and o.disk_dir is not None:
            raise UsageError("give --disk-dir or --pool, not both")
        disk_dir = _existing_dir(o.disk_dir or DEFAULT_DISK_DIR) if pool is None else None
        if o.clone and not o.name:
            name = rx.check_domain_name(self._clone_name(plan, disk_dir, pool))
        else:
            name = rx.check_domain_name(o.name or archive.domain)
        if pool is not None and fmt_override not in (None, "raw"):
            raise UsageError("--pool writes raw volumes (--disk-format raw)")
        if not plan.has_memory and o.paused:
            raise UsageError(
                _no_memory(archive, "nothing to resume paused (it is defined, shut off)")
            )
        root = rx.parse(plan.xml)

        # 1. target checks and 2. every chunk present (damage inside a chunk is caught as
        # it is read), both before anything is written; one waits on libvirt, the other
        # on the repository, so they run side by side.
        with ThreadPoolExecutor(1, thread_name_prefix="restore-verify") as ex:
            presence = ex.submit(self._presence)
            tc, existing, new_uuid = self._check_target(root, plan, name)
            report = presence.result()
        self._lap("checks")
        if not report.ok:
            raise DamageError(
                f"archive {archive.id[:12]} is damaged: {'; '.join(report.problems[:3])}",
                archive=archive.id,
            )
        # 3. where everything goes
        cpu_xml, _cpu_mode = rx.cpu_definition(plan.live_xml)
        disk_plan: dict[str, rx.DiskRewrite] = {}
        outs: list[tuple[StreamInfo, str, str]] = []  # stream, file/volume name, fmt
        for s in plan.disks:
            target = str(s.attrs["target"])
            fmt = fmt_override or str(s.attrs.get("format") or "raw")
            if fmt not in DISK_FORMATS:
                fmt = "raw"
            if pool is not None:
                fmt = "raw"
            fname = _disk_file_name(name, target, fmt)
            path = self._new_path(fname, disk_dir, pool)
            disk_plan[target] = rx.DiskRewrite(path, fmt)
            outs.append((s, fname, fmt))
        chardevs: dict[str, str] = {}
        for i, old_path in enumerate(rx.chardev_files(root)):
            log_name = f"{name}-console{i}.log"
            if disk_dir is not None:
                chardevs[old_path] = str(_safe_child(disk_dir, log_name))
            else:  # a path on the target host, beside the pool's volumes
                assert pool is not None
                chardevs[old_path] = f"{pool.path}/{log_name}"
        # A UEFI guest's variable store: a file of its own beside the disks, never the
        # archived path (the original's, or nobody's on another host).
        nvram: tuple[str, str, bytes | None] | None = None  # path, file/volume name, data
        if rx.nvram_path(root) is not None:
            nv_name = _nvram_file_name(name)
            nv_path = self._new_path(nv_name, disk_dir, pool)
            nvram = (nv_path, nv_name, _nvram_content(self.repo, plan))
        rw = rx.rewrite(
            plan.xml,
            rx.Rewrite(
                name=name,
                disks=disk_plan,
                chardev_paths=chardevs,
                uuid=new_uuid,
                clone=o.clone,
                keep_network=o.keep_network,
                no_hugepages=o.no_hugepages,
                nvram=nvram[0] if nvram is not None else None,
            ),
            self.rng,
        )
        cookie = f"<cookie>\n  {cpu_xml}\n</cookie>\n" if cpu_xml else None
        prefix = saveimage.encode_prefix(rw.xml, running=not o.paused, cookie=cookie)
        state = "shut off" if not plan.has_memory else "paused" if o.paused else "running"

        # 4. clobber what --replace allows, then write
        if existing is not None:
            log.info("replacing domain %s", name)
            # Its UEFI variables stay where they are: the restored domain has a store of its
            # own, and nothing of the replaced one is deleted (its disks are not either).
            remove_domain(self.conn, name, keep_nvram=True)
        result = RestoreResult(
            domain=name,
            uuid="",
            archive=archive.id,
            route="define" if not plan.has_memory else "pool" if pool is not None else "fifo",
            duration_s=0.0,
            paused=o.paused,
            state=state,
            macs=rw.macs,
            links_down=rw.links_down,
            serial_logs=list(chardevs.values()),
            target={"qemu": tc.qemu, "machine": tc.machine, "cpu": tc.cpu},
            notes=list(rw.notes),
        )
        for path in chardevs.values() if disk_dir is not None else ():
            if os.path.lexists(path):
                if not o.replace:
                    raise AlreadyExistsError(f"{path} exists (use --replace)", path=path)
                os.unlink(path)
            # libvirt creates the log when QEMU starts: ours to remove if the restore fails.
            self.created.files.append(Path(path))
        if nvram is not None:
            result.nvram = nvram[0]
            if nvram[2] is not None:
                how = "as archived"
            elif plan.has_memory:
                how = "made by libvirt from the firmware's template; the migration fills it"
            else:
                how = "made by libvirt from the firmware's template at the first start"
            result.notes.append(f"UEFI variables in {nvram[0]} ({how})")
            if pool is not None:
                self._upload_nvram(nvram[1], nvram[2], pool)
            else:
                self._write_nvram(Path(nvram[0]), nvram[2])
        qemu_log = domain_log_file(name)
        try:
            if not plan.has_memory:
                # A disk-only archive (a shut-off domain): its disks and its definition.
                for s, fname, fmt in outs:
                    if pool is not None:
                        result.disks.append(self._upload_disk(s, fname, pool))
                    else:
                        assert disk_dir is not None
                        result.disks.append(self._write_disk(s, fname, fmt, disk_dir))
                self._lap("disks")
                dom = define_domain(self.conn, rw.xml, name=name)
            elif pool is not None:
                for s, fname, _fmt in outs:
                    result.disks.append(self._upload_disk(s, fname, pool))
                self._lap("disks")
                h = hashlib.sha256() if o.digests else None
                dom = self._restore_pool(plan, prefix, name, pool, result, h)
            else:
                assert disk_dir is not None
                files = self._create_disks(outs, disk_dir)
                self._lap("disks_created")
                if not os.path.lexists(qemu_log):
                    # libvirt starts this log with QEMU; a failed restore must not leave it.
                    self.created.files.append(Path(qemu_log))
                dom = self._restore_fifo(plan, prefix, name, files, result)
        except HypervisorError as e:
            if "guest RAM" in str(e) and rx.has_hugepages(rx.parse(rw.xml)):
                raise HypervisorError(
                    f"{e} (the guest's RAM was on huge pages: reserve them on the target, "
                    "or restore with --no-hugepages)",
                    **e.fields,
                ) from e
            raise
        self.created.domain = name
        self._lap("restore")
        result.uuid = dom.uuid
        if not plan.has_memory:
            result.duration_s = round(time.monotonic() - self.t0, 4)
            result.timings = self.timings
            return result
        now = self.clock()
        age = _archive_age(archive, now)
        result.clock_skew_s = None if age is None else round(age, 3)
        if o.sync_time:
            if rx.has_agent_channel(rx.parse(rw.xml)):
                try:
                    set_guest_time(dom)
                    result.time_synced = True
                    result.time_note = "guest clock set through the guest agent"
                except HypervisorError as e:
                    result.time_note = f"guest clock not set: {e}"
            else:
                result.time_note = "guest clock not set: the domain has no guest-agent channel"
        elif age is not None:
            result.time_note = f"guest clock is {age:.1f} s behind (use --sync-time with an agent)"
        result.timings = self.timings
        result.duration_s = round(time.monotonic() - self.t0, 4)
        # The breakdown (seconds): checks, then -- from the start of the concurrent part --
        # when the disks were filled, when the stream reached its withheld end, how long it
        # waited there for the disks, and when the guest was running.
        log.debug("restore of %s took %.3f s: %s", name, result.duration_s, self.timings)
        return result

    def _clone_name(self, plan: _Plan, disk_dir: Path | None, pool: Pool | None) -> str:
        """A clone's name when none was given: ``DOMAIN-clone-ID`` (the archive id's first
        8 digits), else the first of ``-2``, ``-3``... that no domain on the target has
        and no file in ``disk_dir`` (volume in ``pool``) starts with: clones of one
        archive can be started one after another without naming each.  With --replace
        the first name, whatever holds it."""
        base = f"{self.archive.domain}-clone-{self.archive.id[:8]}"
        if self.o.replace:
            return base
        for i in range(1, _CLONE_NAMES + 1):
            name = base if i == 1 else f"{base}-{i}"
            if find_domain(self.conn, name) is not None:
                continue
            if disk_dir is not None and any(disk_dir.glob(f"{glob.escape(name)}-*")):
                continue
            if pool is not None:
                volumes = [_disk_file_name(name, str(s.attrs["target"]), "raw") for s in plan.disks]
                if any(pool.exists(v) for v in [*volumes, _nvram_file_name(name)]):
                    continue
            return name
        raise AlreadyExistsError(
            f"{base} and {_CLONE_NAMES - 1} more clone names are taken: give --name"
        )

    def _new_path(self, fname: str, disk_dir: Path | None, pool: Pool | None) -> str:
        """Where file ``fname`` of the new domain goes on the target: in ``disk_dir``, or as
        a volume of ``pool``.  Raises AlreadyExistsError when taken, unless --replace."""
        if disk_dir is not None:
            return str(_free_child(disk_dir, fname, self.o.replace))
        assert pool is not None
        if pool.exists(fname) and not self.o.replace:
            raise AlreadyExistsError(f"volume {fname} exists in pool {pool.name} (use --replace)")
        return f"{pool.path}/{fname}"

    def _write_disk(self, s: StreamInfo, fname: str, fmt: str, disk_dir: Path) -> DiskOut:
        """One disk as an image file, written whole (no stream to overlap with)."""
        path = _safe_child(disk_dir, fname)
        if os.path.lexists(path):
            os.unlink(path)  # --replace (checked in run)
        self.created.files.append(path)
        h = hashlib.sha256() if self.o.digests else None
        n = _write_disk_file(path, fmt, self.repo, s, h)
        return DiskOut(str(s.attrs["target"]), str(path), fmt, s.size, n, _hex(h))

    def _write_nvram(self, path: Path, data: bytes | None) -> None:
        if os.path.lexists(path):
            os.unlink(path)  # --replace (checked in run)
        self.created.files.append(path)  # or libvirt's copy of the template: ours to undo
        if data is not None:
            _write_new_file(path, data)

    @contextlib.contextmanager
    def _new_volume(self, pool: Pool, fname: str, size: int) -> Iterator[tuple[str, VolumeUpload]]:
        """A new raw volume (one of that name is removed: --replace was checked in run),
        ours to undo, and its upload stream: finished when the block ends, else aborted."""
        pool.delete(fname)
        path = pool.create(fname, size, "raw")
        self.created.volumes.append((pool, fname))
        up = pool.open_upload(fname, size)
        try:
            yield path, up
            up.finish()
        except BaseException:
            up.abort()
            raise

    def _upload_nvram(self, fname: str, data: bytes | None, pool: Pool) -> None:
        if data is None:  # libvirt makes it from the firmware's template
            pool.delete(fname)  # --replace (checked in run)
            return
        with self._new_volume(pool, fname, len(data)) as (_path, up):
            up.write(data)

    def _upload_disk(self, s: StreamInfo, fname: str, pool: Pool) -> DiskOut:
        """One disk as a raw volume in ``pool``, through a sparse upload stream."""
        h = hashlib.sha256() if self.o.digests else None
        size = int(s.size)
        task = self.progress.task(f"disk {s.attrs['target']}", size)
        try:
            written = 0
            with self._new_volume(pool, fname, size) as (path, up):
                for off, length, data in read_ahead(self.repo, s):
                    if h is not None:
                        _digest_disk(h, length, data)
                    if up.pos != off:
                        up.hole(off - up.pos)
                    if data is None:
                        up.hole(length)
                    else:
                        up.write(data)
                        written += length
                    task.advance(length)
            return DiskOut(str(s.attrs["target"]), path, "raw", size, written, _hex(h))
        finally:
            task.close()

    def _create_disks(
        self, outs: list[tuple[StreamInfo, str, str]], disk_dir: Path
    ) -> list[_DiskFile]:
        """Every image at its final path, size and structure; no data yet."""
        files: list[_DiskFile] = []
        try:
            for s, fname, fmt in outs:
                path = _safe_child(disk_dir, fname)
                if os.path.lexists(path):
                    os.unlink(path)  # --replace (checked in run)
                f = _DiskFile(path, fmt, s, self.repo.codecs.zero_id)
                files.append(f)
                self.created.files.append(path)
                f.create()
        except BaseException:
            for f in files:
                f.close()
            raise
        return files

    def _restore_fifo(
        self,
        plan: _Plan,
        prefix: bytes,
        name: str,
        files: list[_DiskFile],
        result: RestoreResult,
    ) -> Domain:
        """Fill the disks and feed the save image through a FIFO at the same time.

        libvirt reads the image's header and starts QEMU with ``-incoming``; QEMU opens the
        (already structured) images but reads no guest data until the migration completes,
        which needs the stream's EOF marker: :class:`_TailGate` holds the stream's end
        back until every disk is filled and fsynced.  Any failure on either side cuts the
        stream, QEMU's incoming migration fails, libvirt removes the half-started domain,
        and the caller undoes the rest.
        """
        h = hashlib.sha256() if self.o.digests else None
        disks = _DiskFiller(self, files)
        tmp = Path(tempfile.mkdtemp(prefix="vmarchive-restore-"))
        self.created.dirs.append(tmp)
        os.chmod(tmp, 0o711)
        fifo = tmp / "save.img"
        os.mkfifo(fifo, 0o600)
        cancel = threading.Event()
        restored = threading.Event()  # libvirt's restore call has returned (or raised)
        errors: list[BaseException] = []
        written = [0]
        t0 = time.monotonic()
        marks: dict[str, float] = {}

        def stop() -> bool:
            return cancel.is_set() or disks.error is not None

        def barrier() -> None:
            w0 = time.monotonic()
            marks["stream_held"] = w0 - t0
            disks.wait()
            marks["gate_wait"] = time.monotonic() - w0

        removers: list[threading.Thread] = []

        def remove_until_restored() -> None:
            while True:
                with contextlib.suppress(VmarchiveError):
                    remove_domain(self.conn, name)
                if restored.wait(0.1):
                    return

        def feed() -> None:
            w: FifoWriter | None = None
            fd = -1
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_CLOEXEC)
                if cancel.is_set():
                    return
                marks["fifo_opened"] = time.monotonic() - t0
                _enlarge_pipe(fd)
                w = FifoWriter(fd)
                w.write(prefix)
                gate = _TailGate(w, _stream_hold(plan), barrier)
                written[0] = write_stream(self.repo, plan, _Hashing(gate, h), stop)
                marks["stream_regenerated"] = time.monotonic() - t0
                gate.release()
                w.close()
            except BaseException as e:
                errors.append(e)
                if w is not None:
                    w.abort()
                if not cancel.is_set():
                    # A cut stream should fail QEMU's incoming migration, but QEMU 7.2
                    # can spin instead (see _stream_hold): never wait on it.  A failure
                    # found early can come before libvirt has started QEMU at all (a CI
                    # run hung so: QEMU spinning, restoreFlags waiting, the domain removed
                    # before it existed), so it is removed again until the call returns
                    # -- on a thread of its own: this one must go on to close the FIFO,
                    # whose end is what a libvirt still reading the header waits for.
                    remover = threading.Thread(
                        target=remove_until_restored, name="restore-remove", daemon=True
                    )
                    removers.append(remover)
                    remover.start()
            finally:
                # The writer's last write ends once QEMU reads or is gone (removed
                # above, or _unblock_fifo drains the FIFO): only then is the fd free.
                if w is not None:
                    w.join()
                if fd >= 0:
                    os.close(fd)

        t = threading.Thread(target=feed, name="restore-stream", daemon=True)
        disks.start()
        t.start()
        try:
            try:
                try:
                    dom = restore_image(self.conn, str(fifo), name=name, paused=self.o.paused)
                finally:
                    restored.set()
            except BaseException as e:
                cancel.set()
                disks.stop()
                _unblock_fifo(fifo, t)
                t.join()
                for remover in removers:
                    remover.join()
                # The first cause, not its echo: a disk failure cuts the stream, which
                # makes QEMU's incoming migration (and libvirt's restore) fail.
                if disks.error is not None and not isinstance(disks.error, _Cancelled):
                    raise disks.error from e
                damage = [x for x in errors if isinstance(x, VmarchiveError)]
                if damage:
                    raise damage[0] from e
                raise
            t.join()
            for remover in removers:
                remover.join()
            disks.stop()
            marks["running"] = time.monotonic() - t0
            if disks.error is not None or (errors and not isinstance(errors[0], BrokenPipeError)):
                # QEMU started although a half failed: never leave that guest running.
                self.created.domain = name
                raise disks.error or errors[0]
        finally:
            disks.close()
        for k, v in marks.items():
            self.timings[k] = round(v, 4)
        if disks.finished_at is not None:
            self.timings["disks_filled"] = round(disks.finished_at - t0, 4)
        result.disks.extend(disks.results)
        result.stream_bytes = written[0]
        result.stream_sha256 = h.hexdigest() if h is not None else None
        return dom

    def _restore_pool(
        self,
        plan: _Plan,
        prefix: bytes,
        name: str,
        pool: Pool,
        result: RestoreResult,
        h: Any,
    ) -> Domain:
        vol = f"{name}.vmarchive-save"
        # QEMU stops at the stream's end marker: trailing zeros of a generous sparse
        # volume are never read.  Bound: every page with a full record header.
        assert plan.layout is not None or plan.opaque is not None
        if plan.layout is not None:
            pages = sum(b.pages for b in plan.layout.ram_blocks)
            bound = (
                len(prefix)
                + pages * (4096 + 8 + 256)
                + plan.layout.devstate_size
                + len(plan.layout.vmdesc)
                + (16 << 20)
            )
        else:
            assert plan.opaque is not None
            bound = len(prefix) + plan.opaque.size
        try:
            with self._new_volume(pool, vol, bound) as (path, up):
                up.write(prefix)
                result.stream_bytes = write_stream(self.repo, plan, _Hashing(up, h))
            result.staging_bytes += up.sent
            result.stream_sha256 = h.hexdigest() if h is not None else None
            return restore_image(self.conn, path, name=name, paused=self.o.paused)
        finally:
            if (pool, vol) in self.created.volumes:  # not if it could not be created
                pool.delete(vol)
                self.created.volumes.remove((pool, vol))

    # -- cleanup --------------------------------------------------------------------------
    def undo(self) -> None:
        c = self.created
        if c.domain is not None:
            try:
                remove_domain(self.conn, c.domain)
            except VmarchiveError as e:
                log.warning("cannot remove domain %s: %s", c.domain, e)
        for pool, vol in reversed(c.volumes):
            pool.delete(vol)
        for p in reversed(c.files):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        for d in reversed(c.dirs):
            shutil.rmtree(d, ignore_errors=True)

    def finish(self) -> None:
        """Success: remove only the temporaries."""
        for d in self.created.dirs:
            shutil.rmtree(d, ignore_errors=True)


#: QEMU reads its incoming stream in 32 KiB pieces; a 64 KiB pipe makes the two processes
#: hand over every 64 KiB.  1 MiB is Linux's default limit for unprivileged pipes.
PIPE_SIZE = 1 << 20


def _disk_file_name(domain: str, target: str, fmt: str) -> str:
    """The file (or pool volume) a restored domain's disk ``target`` is written to."""
    return f"{domain}-{target}.{fmt}"


def _nvram_file_name(domain: str) -> str:
    """The file (or pool volume) of a restored domain's UEFI variable store."""
    return f"{domain}-nvram.fd"


def _enlarge_pipe(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


def _unblock_fifo(fifo: Path, t: threading.Thread) -> None:
    """Release a writer blocked in open() of a FIFO nobody opened for reading."""
    for _ in range(50):
        if not t.is_alive():
            return
        try:
            fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            return
        try:
            with contextlib.suppress(OSError):
                while os.read(fd, 1 << 20):
                    pass
        finally:
            os.close(fd)
        t.join(0.1)


def restore(
    options: RestoreOptions,
    progress: Progress = NULL_PROGRESS,
    *,
    clock: Callable[[], float] = time.time,
    rng: random.Random | None = None,
) -> RestoreResult:
    """Restore ``options.archive`` as a running (or paused) domain.

    Raises:
        NotFoundError, AmbiguousError: bad archive name; no such pool.
        AlreadyExistsError: the domain, a disk image or a log exists (without --replace).
        FormatError: a forged or unusable archive (disk target paths, XML).
        DamageError, ChunkMissingError: damaged data or a missing pack.
        StreamError: the stored memory state fails validation.
        HostPreconditionError: the target lacks the machine type, QEMU version or CPU.
        HypervisorError, ConnectionFailedError: libvirt or QEMU failed.
    Nothing this restore created is left behind when it raises.
    """
    repo = Repository.open(options.repo, options.passphrase)
    try:
        with repo.lock("shared"), Connection.open(options.uri) as conn:
            r = _Restore(options, repo, conn, progress, clock, rng or random.Random())
            try:
                result = r.run()
            except BaseException:
                r.undo()
                raise
            r.finish()
            return result
    finally:
        repo.close()


def clone(
    options: RestoreOptions,
    progress: Progress = NULL_PROGRESS,
    *,
    clock: Callable[[], float] = time.time,
    rng: random.Random | None = None,
) -> RestoreResult:
    """A restore that can run beside the original (see :class:`RestoreOptions`)."""
    from dataclasses import replace

    return restore(replace(options, clone=True), progress, clock=clock, rng=rng)


# --- export-save -------------------------------------------------------------------------


class ExportResult(msgspec.Struct, frozen=True):
    path: str
    bytes: int
    disks: list[DiskOut]
    domain: str
    #: the UEFI variable store the save image names (guests with ``<nvram>``)
    nvram: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "bytes": self.bytes,
            "domain": self.domain,
            "disks": [d.to_json() for d in self.disks],
            "nvram": self.nvram,
        }


def export_save(
    archive_name: str,
    repo_location: str,
    output: Path,
    *,
    disk_dir: Path | None = None,
    name: str | None = None,
    disk_format: str | None = None,
    replace: bool = False,
    paused: bool = False,
    passphrase: str | None = None,
    no_hugepages: bool = False,
) -> ExportResult:
    """Write a save image for ``virsh restore`` to ``output`` and the disks it names.

    The disks are rebuilt in ``disk_dir`` (default: the output's directory), serial logs
    go there too.  ``no_hugepages``: as :attr:`RestoreOptions.no_hugepages`.  Raises like
    :func:`restore` (no domain is created).
    """
    repo = Repository.open(repo_location, passphrase)
    made: list[Path] = []
    try:
        with repo.lock("shared"):
            archive = repo.load_archive(archive_name)
            plan = _plan(repo, archive)
            if not plan.has_memory:
                raise UsageError(_no_memory(archive, "a save image needs one"))
            dname = rx.check_domain_name(name or archive.domain)
            ddir = _existing_dir(disk_dir or output.resolve().parent)
            out = output.resolve()
            check_output(out, replace, flag="--replace")
            report = repo.verify([archive.id], full=False)
            if not report.ok:
                raise DamageError(f"archive {archive.id[:12]} is damaged: {report.problems[0]}")
            root = rx.parse(plan.xml)
            disks: dict[str, rx.DiskRewrite] = {}
            todo: list[tuple[StreamInfo, Path, str]] = []
            for s in plan.disks:
                target = str(s.attrs["target"])
                fmt = disk_format or str(s.attrs.get("format") or "raw")
                fmt = fmt if fmt in DISK_FORMATS else "raw"
                p = _free_child(ddir, f"{dname}-{target}.{fmt}", replace)
                disks[target] = rx.DiskRewrite(str(p), fmt)
                todo.append((s, p, fmt))
            chardevs = {
                old: str(_safe_child(ddir, f"{dname}-console{i}.log"))
                for i, old in enumerate(rx.chardev_files(root))
            }
            nvram: Path | None = None
            if rx.nvram_path(root) is not None:
                nvram = _free_child(ddir, f"{dname}-nvram.fd", replace)
            rw = rx.rewrite(
                plan.xml,
                rx.Rewrite(
                    name=dname,
                    disks=disks,
                    chardev_paths=chardevs,
                    uuid=str(archive.metadata.get("uuid") or ""),
                    no_hugepages=no_hugepages,
                    nvram=str(nvram) if nvram is not None else None,
                ),
            )
            cpu_xml, _mode = rx.cpu_definition(plan.live_xml)
            cookie = f"<cookie>\n  {cpu_xml}\n</cookie>\n" if cpu_xml else None
            if nvram is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(nvram)
                made.append(nvram)
                data = _nvram_content(repo, plan)
                if data is not None:  # else libvirt makes it from the template at restore
                    _write_new_file(nvram, data)
            outs: list[DiskOut] = []
            for s, p, fmt in todo:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
                made.append(p)
                n = _write_disk_file(p, fmt, repo, s)
                outs.append(DiskOut(str(s.attrs["target"]), str(p), fmt, s.size, n))
            tmp = out.with_name(f".{out.name}.partial")
            made.append(tmp)
            with open(tmp, "wb") as f:
                f.write(saveimage.encode_prefix(rw.xml, running=not paused, cookie=cookie))
                total = f.tell() + write_stream(repo, plan, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, out)
            made.remove(tmp)
            return ExportResult(
                str(out), total, outs, dname, str(nvram) if nvram is not None else None
            )
    except BaseException:
        for p in made:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        raise
    finally:
        repo.close()
