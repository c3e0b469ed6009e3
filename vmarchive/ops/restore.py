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
    descriptor to QEMU, so nothing of the RAM is ever staged on disk.

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
import hashlib
import logging
import os
import random
import shutil
import stat
import subprocess
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

from vmarchive.errors import (
    AlreadyExistsError,
    DamageError,
    FormatError,
    HostPreconditionError,
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
    VolumeUpload,
    check_target,
    domain_log_file,
    find_domain,
    remove_domain,
    restore_image,
    set_guest_time,
)
from vmarchive.ops import restore_xml as rx
from vmarchive.progress import NULL_PROGRESS, Progress
from vmarchive.store import Archive, Repository, StreamInfo

log = logging.getLogger(__name__)

DEFAULT_DISK_DIR = Path("/var/lib/libvirt/images")
DISK_FORMATS = ("raw", "qcow2")
WRITE_SIZE = 4 << 20


# --- options and results ---------------------------------------------------------------------


@dataclass(frozen=True)
class RestoreOptions:
    """What to restore where (built by the CLI or by tests)."""

    archive: str
    repo: str
    uri: str = DEFAULT_URI
    #: Name of the new domain (default: the archived one; required for a clone).
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


@dataclass(frozen=True)
class DiskOut:
    target: str
    path: str
    format: str
    size: int
    bytes_written: int
    sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RestoreResult:
    domain: str
    uuid: str
    archive: str
    route: str
    duration_s: float
    paused: bool
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
    else:
        kind = archive.metadata.get("kind")
        raise UsageError(
            f"archive {archive.id[:12]} ({kind}) holds no memory state: nothing to resume"
        )
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

    def source(b: ms.RamBlock) -> Iterator[tuple[int, int, bytes | None]]:
        for ext in read_ahead(repo, archive.stream(f"ram:{b.idstr}")):
            if cancelled():
                raise StreamError("restore cancelled")
            yield ext

    return ms.regenerate(plan.layout, devstate, source, out)


#: Chunks being fetched, decompressed and verified ahead of the consumer.  zstd and the
#: pack reads release the GIL, so this overlaps them with the regenerator's page loop
#: (measured: see scripts/bench_restore.py).
READ_AHEAD = 8
READ_THREADS = 2


def read_ahead(repo: Repository, s: StreamInfo) -> Iterator[tuple[int, int, bytes | None]]:
    """(offset, length, verified data or None for a hole) of every slot of ``s``, in order,
    with up to READ_AHEAD chunks read in parallel.

    Raises DamageError / ChunkMissingError like :meth:`Repository.read_chunk`.
    """
    zero = repo.codecs.zero_id
    cs = s.chunk_size
    window: collections.deque[tuple[int, int, Future[bytes] | None]] = collections.deque()
    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="restore-read") as pool:

        def take() -> tuple[int, int, bytes | None]:
            off, length, fut = window.popleft()
            data = None if fut is None else fut.result()
            if data is not None and len(data) != length:
                raise DamageError(
                    f"stream {s.name}: a chunk has {len(data)} bytes, its slot {length}"
                )
            return off, length, data

        try:
            for index in range(s.slots):
                off = index * cs
                cid = s.chunk_id(index)
                fut = None if cid == zero else pool.submit(repo.read_chunk, cid)
                window.append((off, min(cs, s.size - off), fut))
                if len(window) > READ_AHEAD:
                    yield take()
            while window:
                yield take()
        finally:
            for _off, _length, fut in window:
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


def _iter_disk(
    repo: Repository, archive: Archive, s: StreamInfo
) -> Iterator[tuple[int, int, bytes | None]]:
    yield from read_ahead(repo, s)


def _hex(h: Any) -> str | None:
    return None if h is None else str(h.hexdigest())


def _digest_disk(h: Any, length: int, data: bytes | None) -> None:
    if data is not None:
        h.update(data)
        return
    zero = bytes(min(length, 1 << 20))
    while length > 0:
        n = min(length, len(zero))
        h.update(zero[:n])
        length -= n


def _write_raw_file(
    path: Path, extents: Iterator[tuple[int, int, bytes | None]], size: int, h: Any
) -> int:
    """A sparse raw image: data written, holes left as holes. Returns data bytes written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    written = 0
    try:
        os.ftruncate(fd, size)
        for off, length, data in extents:
            if h is not None:
                _digest_disk(h, length, data)
            if data is None:
                continue
            view = memoryview(data)
            pos = off
            while view:
                n = os.pwrite(fd, view, pos)
                view = view[n:]
                pos += n
            written += length
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def _qemu_img() -> str:
    exe = shutil.which("qemu-img")
    if exe is None:
        raise HostPreconditionError("qemu-img is needed to write qcow2 disks")
    return exe


def _convert(src: Path, dst: Path, fmt: str) -> None:
    proc = subprocess.run(
        [_qemu_img(), "convert", "-q", "-f", "raw", "-O", fmt, str(src), str(dst)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise HypervisorError(f"qemu-img convert to {dst} failed: {proc.stderr.strip()}")


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

    # -- steps ----------------------------------------------------------------------------
    def run(self) -> RestoreResult:
        o = self.o
        archive = self.archive
        plan = _plan(self.repo, archive)
        name = rx.check_domain_name(o.name or archive.domain)
        if o.clone and not o.name:
            raise UsageError("a clone needs --name")
        fmt_override = o.disk_format
        if fmt_override is not None and fmt_override not in DISK_FORMATS:
            raise UsageError(f"--disk-format must be one of {', '.join(DISK_FORMATS)}")
        pool = Pool(self.conn, o.pool) if o.pool else None
        if pool is not None and o.disk_dir is not None:
            raise UsageError("give --disk-dir or --pool, not both")
        if pool is not None and fmt_override not in (None, "raw"):
            raise UsageError("--pool writes raw volumes (--disk-format raw)")
        root = rx.parse(plan.xml)

        # 1. target checks, before anything is written
        ostype = root.find("os/type")
        cpu_xml, cpu_mode = rx.cpu_definition(plan.live_xml)
        tc = check_target(
            self.conn,
            arch=ostype.get("arch") if ostype is not None else None,
            machine=ostype.get("machine") if ostype is not None else None,
            virttype=root.get("type", "kvm"),
            emulator=root.findtext("devices/emulator"),
            cpu_xml=cpu_xml,
            cpu_mode=cpu_mode,
            source_qemu=str((archive.metadata.get("versions") or {}).get("qemu") or ""),
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
        self._lap("checks")

        # 2. every chunk present (damage inside a chunk is caught as it is read)
        report = self.repo.verify([archive.id], full=False)
        if not report.ok:
            raise DamageError(
                f"archive {archive.id[:12]} is damaged: {'; '.join(report.problems[:3])}",
                archive=archive.id,
            )
        self._lap("verify")

        # 3. where everything goes
        disk_dir = (o.disk_dir or DEFAULT_DISK_DIR) if pool is None else None
        disk_plan: dict[str, rx.DiskRewrite] = {}
        outs: list[tuple[StreamInfo, str, str]] = []  # stream, file/volume name, fmt
        for s in plan.disks:
            target = str(s.attrs["target"])
            fmt = fmt_override or str(s.attrs.get("format") or "raw")
            if fmt not in DISK_FORMATS:
                fmt = "raw"
            if pool is not None:
                fmt = "raw"
            fname = f"{name}-{target}.{fmt}"
            if disk_dir is not None:
                path = str(_safe_child(disk_dir, fname))
                if os.path.lexists(path) and not o.replace:
                    raise AlreadyExistsError(f"{path} exists (use --replace)", path=path)
            else:
                assert pool is not None
                if pool.exists(fname) and not o.replace:
                    raise AlreadyExistsError(
                        f"volume {fname} exists in pool {pool.name} (use --replace)"
                    )
                path = f"{pool.path}/{fname}"
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
        rw = rx.rewrite(
            plan.xml,
            rx.Rewrite(
                name=name,
                disks=disk_plan,
                chardev_paths=chardevs,
                uuid=new_uuid,
                clone=o.clone,
                keep_network=o.keep_network,
            ),
            self.rng,
        )
        cookie = f"<cookie>\n  {cpu_xml}\n</cookie>\n" if cpu_xml else None
        prefix = saveimage.encode_prefix(rw.xml, running=not o.paused, cookie=cookie)

        # 4. clobber what --replace allows, then write
        if existing is not None:
            log.info("replacing domain %s", name)
            remove_domain(self.conn, name)
        result = RestoreResult(
            domain=name,
            uuid="",
            archive=archive.id,
            route="pool" if pool is not None else "fifo",
            duration_s=0.0,
            paused=o.paused,
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
        for s, fname, fmt in outs:
            result.disks.append(self._write_disk(s, fname, fmt, disk_dir, pool, result))
        self._lap("disks")

        # 5. memory: the save image, and the restore
        qemu_log = domain_log_file(name)
        if pool is None and not os.path.lexists(qemu_log):
            # libvirt starts this log with QEMU; a failed restore must not leave it.
            self.created.files.append(Path(qemu_log))
        dom = self._restore(plan, prefix, name, pool, result)
        self.created.domain = name
        self._lap("restore")
        result.uuid = dom.uuid
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
        return result

    def _write_disk(
        self,
        s: StreamInfo,
        fname: str,
        fmt: str,
        disk_dir: Path | None,
        pool: Pool | None,
        result: RestoreResult,
    ) -> DiskOut:
        h = hashlib.sha256() if self.o.digests else None
        extents = _iter_disk(self.repo, self.archive, s)
        size = int(s.size)
        task = self.progress.task(f"disk {s.attrs['target']}", size)
        try:
            if pool is not None:
                if pool.exists(fname):
                    pool.delete(fname)
                path = pool.create(fname, size, "raw")
                self.created.volumes.append((pool, fname))
                up = pool.open_upload(fname, size)
                try:
                    written = 0
                    for off, length, data in extents:
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
                    up.finish()
                except BaseException:
                    up.abort()
                    raise
                return DiskOut(str(s.attrs["target"]), path, "raw", size, written, _hex(h))
            assert disk_dir is not None
            path_p = _safe_child(disk_dir, fname)
            if os.path.lexists(path_p):
                os.unlink(path_p)
            if fmt == "raw":
                self.created.files.append(path_p)
                written = _write_raw_file(path_p, extents, size, h)
            else:
                staging = _safe_child(disk_dir, f".{fname}.raw-staging")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(staging)
                try:
                    written = _write_raw_file(staging, extents, size, h)
                    result.staging_bytes += written
                    self.created.files.append(path_p)
                    _convert(staging, path_p, fmt)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(staging)
            task.advance(size)
            return DiskOut(str(s.attrs["target"]), str(path_p), fmt, size, written, _hex(h))
        finally:
            task.close()

    def _restore(
        self,
        plan: _Plan,
        prefix: bytes,
        name: str,
        pool: Pool | None,
        result: RestoreResult,
    ) -> Domain:
        h = hashlib.sha256() if self.o.digests else None
        if pool is not None:
            return self._restore_pool(plan, prefix, name, pool, result, h)
        tmp = Path(tempfile.mkdtemp(prefix="vmarchive-restore-"))
        self.created.dirs.append(tmp)
        os.chmod(tmp, 0o711)
        fifo = tmp / "save.img"
        os.mkfifo(fifo, 0o600)
        cancel = threading.Event()
        errors: list[BaseException] = []
        written = [0]

        def feed() -> None:
            try:
                with open(fifo, "wb") as f:  # buffered: every write is complete
                    if cancel.is_set():
                        return
                    f.write(prefix)
                    written[0] = write_stream(self.repo, plan, _Hashing(f, h), cancel.is_set)
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=feed, name="restore-stream", daemon=True)
        t.start()
        try:
            dom = restore_image(self.conn, str(fifo), name=name, paused=self.o.paused)
        except BaseException as e:
            cancel.set()
            _unblock_fifo(fifo, t)
            t.join()
            damage = [x for x in errors if isinstance(x, VmarchiveError)]
            if damage:
                raise damage[0] from e
            raise
        t.join()
        if errors and not isinstance(errors[0], BrokenPipeError):
            # QEMU started although our stream failed: never leave that guest running.
            self.created.domain = name
            raise errors[0]
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
        pool.delete(vol)
        path = pool.create(vol, bound, "raw")
        self.created.volumes.append((pool, vol))
        try:
            up: VolumeUpload = pool.open_upload(vol, bound)
            try:
                up.write(prefix)
                result.stream_bytes = write_stream(self.repo, plan, _Hashing(up, h))
                up.finish()
            except BaseException:
                up.abort()
                raise
            result.staging_bytes += up.sent
            result.stream_sha256 = h.hexdigest() if h is not None else None
            return restore_image(self.conn, path, name=name, paused=self.o.paused)
        finally:
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
    if not options.name:
        raise UsageError("a clone needs --name")
    from dataclasses import replace

    return restore(replace(options, clone=True), progress, clock=clock, rng=rng)


# --- export-save -------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportResult:
    path: str
    bytes: int
    disks: list[DiskOut]
    domain: str

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "bytes": self.bytes,
            "domain": self.domain,
            "disks": [d.to_json() for d in self.disks],
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
) -> ExportResult:
    """Write a save image for ``virsh restore`` to ``output`` and the disks it names.

    The disks are rebuilt in ``disk_dir`` (default: the output's directory), serial logs
    go there too.  Raises like :func:`restore` (no domain is created).
    """
    repo = Repository.open(repo_location, passphrase)
    made: list[Path] = []
    try:
        with repo.lock("shared"):
            archive = repo.load_archive(archive_name)
            plan = _plan(repo, archive)
            dname = rx.check_domain_name(name or archive.domain)
            ddir = disk_dir or output.resolve().parent
            out = output.resolve()
            if os.path.lexists(out) and not replace:
                raise AlreadyExistsError(f"{out} exists (use --replace)", path=str(out))
            if os.path.lexists(out) and stat.S_ISDIR(os.lstat(out).st_mode):
                raise UsageError(f"{out} is a directory")
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
                p = _safe_child(ddir, f"{dname}-{target}.{fmt}")
                if os.path.lexists(p) and not replace:
                    raise AlreadyExistsError(f"{p} exists (use --replace)", path=str(p))
                disks[target] = rx.DiskRewrite(str(p), fmt)
                todo.append((s, p, fmt))
            chardevs = {
                old: str(_safe_child(ddir, f"{dname}-console{i}.log"))
                for i, old in enumerate(rx.chardev_files(root))
            }
            rw = rx.rewrite(
                plan.xml,
                rx.Rewrite(
                    name=dname,
                    disks=disks,
                    chardev_paths=chardevs,
                    uuid=str(archive.metadata.get("uuid") or ""),
                ),
            )
            cpu_xml, _mode = rx.cpu_definition(plan.live_xml)
            cookie = f"<cookie>\n  {cpu_xml}\n</cookie>\n" if cpu_xml else None
            outs: list[DiskOut] = []
            for s, p, fmt in todo:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
                if fmt == "raw":
                    made.append(p)
                    n = _write_raw_file(p, _iter_disk(repo, archive, s), s.size, None)
                else:
                    staging = _safe_child(ddir, f".{p.name}.raw-staging")
                    try:
                        n = _write_raw_file(staging, _iter_disk(repo, archive, s), s.size, None)
                        made.append(p)
                        _convert(staging, p, fmt)
                    finally:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(staging)
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
            return ExportResult(str(out), total, outs, dname)
    except BaseException:
        for p in made:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        raise
    finally:
        repo.close()
