"""Forensic exports of an archive: guest memory as an ELF core or raw image, disks as images.

Layer: ops (store + hypervisor's pure memory-map code + format's ELF writer).  Nothing
here touches a live guest: everything comes from the archive.

* :func:`export_memory` ``elf``: an x86-64 core like QEMU's ``dump-guest-memory``
  (paging=false) -- one PT_LOAD per guest-physical block, PT_NOTE with each vCPU's
  NT_PRSTATUS and QEMU CPU state note decoded from the archived ``cpu`` sections.
  ``raw``: a sparse image where byte *a* of the file is guest-physical address *a*.
* :func:`export_disk`: one archived disk as a sparse raw file, or a qcow2 image written in
  one pass (:mod:`.export_qcow2`: the layout comes from the slot table, holes stay
  unallocated clusters).

Both stream chunk by chunk (memory use does not grow with the guest), leave holes unwritten
(sparse output), report progress, and publish the output by rename only when complete:
an interrupted export leaves no half-written file under the output name.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from vmarchive.errors import (
    AlreadyExistsError,
    NotFoundError,
    UsageError,
)
from vmarchive.format import constants as C
from vmarchive.format import elfcore
from vmarchive.format.elfcore_x86 import x86_registers
from vmarchive.format.migstream import StreamLayout
from vmarchive.ops import export_qcow2 as Q
from vmarchive.ops.export_source import (
    MappedBlock,
    NoMemoryMapError,
    archive_arch,
    devstate_of,
    load_memory_map,
    mapped_blocks,
)
from vmarchive.ops.fileio import ImageWriter
from vmarchive.ops.outputs import check_output
from vmarchive.ops.repo import RepoRef, open_repo
from vmarchive.progress import NULL_PROGRESS, Progress, Task
from vmarchive.store import Archive, Repository, StreamInfo, StreamReader

log = logging.getLogger(__name__)

#: Bytes gathered before one write: adjacent data slots are written together.
WRITE_BATCH = 4 << 20


class MemoryFormat(enum.StrEnum):
    ELF = "elf"
    RAW = "raw"


class DiskFormat(enum.StrEnum):
    RAW = "raw"
    QCOW2 = "qcow2"


@dataclass(frozen=True)
class ExportMemoryOptions:
    repo: RepoRef
    archive: str
    output: Path
    format: MemoryFormat = MemoryFormat.ELF
    force: bool = False


@dataclass(frozen=True)
class ExportDiskOptions:
    repo: RepoRef
    archive: str
    target: str
    output: Path
    format: DiskFormat = DiskFormat.RAW
    force: bool = False


class ExportResult(msgspec.Struct, frozen=True):
    archive: str
    output: str
    format: str
    size: int  # file size (apparent)
    data_bytes: int  # bytes actually written (holes excluded)
    segments: list[dict[str, Any]]
    vcpus: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "archive": self.archive,
            "output": self.output,
            "format": self.format,
            "size": self.size,
            "data_bytes": self.data_bytes,
            "segments": self.segments,
            "vcpus": self.vcpus,
        }


# --- output files --------------------------------------------------------------------------


@contextlib.contextmanager
def _publish(path: Path, force: bool, suffix: str = ".partial") -> Iterator[Path]:
    """A temporary file beside ``path``; renamed onto ``path`` if the body succeeds."""
    check_output(path, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    ok = False
    try:
        yield Path(tmp)
        if path.exists() and not force:  # appeared meanwhile
            raise AlreadyExistsError(f"output {path} exists (use --force to replace it)")
        os.replace(tmp, path)
        ok = True
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        if not ok:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _copy_stream(
    reader: StreamReader,
    src: int,
    length: int,
    out: ImageWriter,
    dst: int,
    task: Task,
) -> int:
    """Write ``length`` bytes of a stream from ``src`` to file offset ``dst``; holes are
    skipped (left sparse).  Returns the bytes written."""
    info = reader.stream
    cs = info.chunk_size
    end = src + length
    written = 0
    batch = bytearray()
    batch_at = 0
    pos = src
    while pos < end:
        slot = pos // cs
        stop = min((slot + 1) * cs, end, info.size)
        if stop <= pos:
            raise UsageError(f"stream {info.name} is shorter than the range to export")
        if info.chunk_id(slot) == C.ZERO_ID:
            if batch:
                written += out.write(batch, batch_at)
                batch = bytearray()
        else:
            if not batch:
                batch_at = dst + (pos - src)
            batch += reader.read_range(pos, stop - pos)
            if len(batch) >= WRITE_BATCH:
                written += out.write(batch, batch_at)
                batch = bytearray()
        task.advance(stop - pos)
        pos = stop
    if batch:
        written += out.write(batch, batch_at)
    return written


# --- memory --------------------------------------------------------------------------------


def elf_plan(
    repo: Repository, archive: Archive, blocks: list[MappedBlock]
) -> tuple[elfcore.CoreLayout, int]:
    """The core layout of ``archive`` and its vCPU count.

    Raises NoMemoryMapError (not x86-64, no device state) and StreamError (cpu sections
    that vmdesc does not describe).
    """
    arch = archive_arch(repo, archive)
    if arch is not None and arch != "x86_64":
        raise NoMemoryMapError(
            f"archive {archive.id[:12]} is of a {arch} guest: ELF export supports x86_64"
            " (use --format raw)"
        )
    layout_json, devstate = devstate_of(repo, archive)
    layout = StreamLayout.from_json(layout_json)
    cpus = x86_registers(layout, devstate)
    if not cpus:
        raise NoMemoryMapError(f"archive {archive.id[:12]} has no cpu sections to take notes from")
    expected = archive.metadata.get("vcpus")
    if isinstance(expected, int) and expected != len(cpus):
        log.warning("metadata says %d vCPUs, the stream has %d cpu sections", expected, len(cpus))
    machine, notes = elfcore.x86_notes(cpus)
    loads = [elfcore.LoadSegment(b.range.start, b.range.size) for b in blocks]
    return elfcore.plan_core(notes, loads, machine), len(cpus)


def export_memory(options: ExportMemoryOptions, progress: Progress = NULL_PROGRESS) -> ExportResult:
    """Write the archived guest memory to ``options.output``.

    Raises NotFoundError/AmbiguousError (archive name), NoMemoryMapError (opaque-stream,
    disk-only or map-less archive; ELF of a non-x86-64 guest), AlreadyExistsError (output
    exists without force), UsageError (cannot write), DamageError (a chunk fails
    verification; nothing is left under the output name).
    """
    check_output(options.output, options.force)
    with open_repo(options.repo) as repo:
        archive = repo.load_archive(options.archive)
        mmap = load_memory_map(repo, archive)
        blocks = mapped_blocks(archive, mmap)
        vcpus: int | None = None
        if options.format == MemoryFormat.ELF:
            plan, vcpus = elf_plan(repo, archive, blocks)
            offsets = list(plan.load_offsets)
            total = plan.size
        else:
            offsets = [b.range.start for b in blocks]
            total = max(b.range.end for b in blocks)
        task = progress.task("memory", total=sum(b.range.size for b in blocks))
        data = 0
        try:
            with _publish(options.output, options.force) as tmp:
                fd = os.open(tmp, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.ftruncate(fd, total)
                    out = ImageWriter(fd)
                    if options.format == MemoryFormat.ELF:
                        data += out.write(plan.head, 0)
                    for b, off in zip(blocks, offsets, strict=True):
                        reader = repo.open_stream(archive, b.stream.name)
                        data += _copy_stream(reader, b.range.offset, b.range.size, out, off, task)
                    out.fsync()
                finally:
                    os.close(fd)
        finally:
            task.close()
        segments = [
            {
                "start": b.range.start,
                "size": b.range.size,
                "block": b.range.block,
                "offset": b.range.offset,
                "file_offset": off,
            }
            for b, off in zip(blocks, offsets, strict=True)
        ]
        return ExportResult(
            archive=archive.id,
            output=str(options.output),
            format=options.format.value,
            size=total,
            data_bytes=data,
            segments=segments,
            vcpus=vcpus,
        )


# --- disks ---------------------------------------------------------------------------------


def disk_stream(archive: Archive, target: str) -> StreamInfo:
    """The ``disk`` stream of ``target``.

    Raises NotFoundError (naming the targets the archive has, or why the disk was not
    copied at capture).
    """
    disks = {
        str(s.attrs.get("target", s.name.split(":", 1)[-1])): s
        for s in archive.streams
        if s.kind == C.KIND_DISK
    }
    if target in disks:
        return disks[target]
    for d in archive.metadata.get("disks") or []:
        if isinstance(d, dict) and d.get("target") == target and not d.get("copied", True):
            raise NotFoundError(
                f"archive {archive.id[:12]}: disk {target} was not copied at capture"
                f" ({d.get('reason') or 'no reason recorded'})"
            )
    raise NotFoundError(
        f"archive {archive.id[:12]} has no disk {target!r}"
        f" (it has: {', '.join(sorted(disks)) or 'no disks'})"
    )


def export_disk(options: ExportDiskOptions, progress: Progress = NULL_PROGRESS) -> ExportResult:
    """Write one archived disk to ``options.output`` (sparse raw, or qcow2).

    Raises NotFoundError/AmbiguousError (archive or disk target), AlreadyExistsError,
    UsageError (cannot write), DamageError.
    """
    check_output(options.output, options.force)
    with open_repo(options.repo) as repo:
        archive = repo.load_archive(options.archive)
        stream = disk_stream(archive, options.target)
        reader = repo.open_stream(archive, stream.name)
        task = progress.task(f"disk {options.target}", total=stream.size)
        try:
            with _publish(options.output, options.force) as tmp:
                fd = os.open(tmp, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    out = ImageWriter(fd)
                    if options.format == DiskFormat.QCOW2:
                        data = _write_qcow2(reader, out, task)
                    else:
                        os.ftruncate(fd, stream.size)
                        data = _copy_stream(reader, 0, stream.size, out, 0, task)
                    out.fsync()
                finally:
                    os.close(fd)
        finally:
            task.close()
        return ExportResult(
            archive=archive.id,
            output=str(options.output),
            format=options.format.value,
            size=options.output.stat().st_size,
            data_bytes=data,
            segments=[{"target": options.target, "virtual_size": stream.size}],
        )


def _data_slots(info: StreamInfo) -> list[int]:
    return [i for i in range(info.slots) if info.chunk_id(i) != C.ZERO_ID]


def _write_qcow2(reader: StreamReader, out: ImageWriter, task: Task) -> int:
    """The stream as a qcow2 image in one pass: layout from the slot table, then data."""
    info = reader.stream
    cs = info.chunk_size
    slots = _data_slots(info)
    clusters: set[int] = set()
    for i in slots:
        start, end = i * cs, min((i + 1) * cs, info.size)
        clusters.update(range(start // Q.CLUSTER, -(-end // Q.CLUSTER)))
    layout = Q.plan(info.size, sorted(clusters))
    os.ftruncate(out.fd, layout.file_size)
    written = 0
    for off, blob in Q.metadata(layout):
        written += out.write(blob, off)
    done = 0
    for i in slots:
        pos = i * cs
        data = reader.read_range(pos, min(cs, info.size - pos))
        view = memoryview(data)
        while view:
            cluster, within = divmod(pos, Q.CLUSTER)
            n = min(len(view), Q.CLUSTER - within)
            written += out.write(view[:n], layout.data_offset[cluster] + within)
            view = view[n:]
            pos += n
        task.advance(i * cs + len(data) - done)
        done = i * cs + len(data)
    task.advance(info.size - done)
    return written
