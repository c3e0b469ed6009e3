"""What memory exports and ``diff`` need from an archive, checked once (ops layer).

An archive's RAM is one ``ram`` stream per RAMBlock (offsets inside the block); placing it
at guest-physical addresses needs the memory map recorded at capture time:

* the metadata key ``memory_map`` (with ``vcpus`` and ``arch``; see ``formats/FORMAT.md``,
  "Memory map"), written by captures that call
  :func:`vmarchive.hypervisor.memmap.collect_memory_map`;
* else the ``mtree.txt`` and ``ramblock.txt`` meta streams (QEMU's ``info mtree -f`` and
  ``info ramblock`` text) that earlier captures stored, parsed with the same code.

An archive whose memory is an opaque migration stream (the parser refused it), a
disk-only archive, and one without any map are refused with a message that says which.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from typing import Any

import msgspec

from vmarchive.errors import FormatError, UsageError
from vmarchive.format import constants as C
from vmarchive.hypervisor.memmap import MemoryMap, MemRange, build_memory_map
from vmarchive.store import Archive, Repository, StreamInfo

log = logging.getLogger(__name__)

MTREE_STREAM = "mtree.txt"
RAMBLOCK_STREAM = "ramblock.txt"
DOMAIN_XML_STREAM = "domain.xml"


class NoMemoryMapError(UsageError):
    """The archive's memory cannot be placed at guest-physical addresses."""

    title = "memory cannot be mapped"


def ram_streams(archive: Archive) -> dict[str, StreamInfo]:
    """RAMBlock id -> its ``ram`` stream."""
    out: dict[str, StreamInfo] = {}
    for s in archive.streams:
        if s.kind == C.KIND_RAM:
            out[str(s.attrs.get("block", s.name.split(":", 1)[-1]))] = s
    return out


def _read_meta(repo: Repository, archive: Archive, name: str) -> str | None:
    if not any(s.name == name and s.kind == C.KIND_META for s in archive.streams):
        return None
    return repo.open_stream(archive, name).read_all().decode("utf-8", "replace")


def load_memory_map(repo: Repository, archive: Archive) -> MemoryMap:
    """The guest-physical memory map of ``archive``.

    Raises NoMemoryMapError (opaque-stream, disk-only or map-less archive) and
    FormatError (a recorded map that does not decode).
    """
    short = archive.id[:12]
    if not ram_streams(archive):
        opaque = [s for s in archive.streams if s.kind == C.KIND_STREAM]
        if opaque:
            why = opaque[0].attrs.get("refused") or opaque[0].attrs.get("reason")
            raise NoMemoryMapError(
                f"archive {short} holds its memory as an opaque migration stream"
                f"{f' (the parser refused it: {why})' if why else ''}: its RAM is not"
                " stored as page images, so it cannot be placed at guest-physical addresses"
            )
        raise NoMemoryMapError(f"archive {short} holds no guest memory (a disk-only archive)")
    recorded = archive.metadata.get("memory_map")
    if recorded is not None:
        return MemoryMap.from_json(recorded)
    mtree = _read_meta(repo, archive, MTREE_STREAM)
    ramblock = _read_meta(repo, archive, RAMBLOCK_STREAM)
    if mtree is None or ramblock is None:
        raise NoMemoryMapError(
            f"archive {short} records no guest-physical memory map (no metadata"
            f" 'memory_map', no {MTREE_STREAM} stream): its RAM blocks cannot be placed"
        )
    return build_memory_map(mtree, ramblock)


def archive_arch(repo: Repository, archive: Archive) -> str | None:
    """The guest architecture: metadata ``arch``, else the domain XML's ``os/type@arch``."""
    arch = archive.metadata.get("arch")
    if isinstance(arch, str):
        return arch
    xml = _read_meta(repo, archive, DOMAIN_XML_STREAM)
    if xml is None:
        return None
    try:
        node = ET.fromstring(xml).find("./os/type")
    except ET.ParseError:
        return None
    return None if node is None else node.get("arch")


class MappedBlock(msgspec.Struct, frozen=True):
    """One PT_LOAD-sized piece: guest-physical ``range`` read from ``stream`` at its offset."""

    range: MemRange
    stream: StreamInfo


def mapped_blocks(archive: Archive, mmap: MemoryMap) -> list[MappedBlock]:
    """The map's dump blocks, each with the ``ram`` stream it reads from.

    Raises FormatError when the map names a RAM block the archive lacks, or a range that
    lies past the end of its stream.
    """
    streams = ram_streams(archive)
    out: list[MappedBlock] = []
    for r in mmap.dump_blocks():
        s = streams.get(r.block)
        if s is None:
            raise FormatError(
                f"archive {archive.id[:12]}: the memory map places RAM block {r.block!r}"
                f" at {r.start:#x}, but the archive has no such block"
                f" (it has {', '.join(sorted(streams)) or 'none'})"
            )
        if r.offset + r.size > s.size:
            raise FormatError(
                f"archive {archive.id[:12]}: memory map range at {r.start:#x} reaches past"
                f" the end of RAM block {r.block!r}"
            )
        out.append(MappedBlock(r, s))
    return out


def devstate_of(repo: Repository, archive: Archive) -> tuple[dict[str, Any], bytes]:
    """The devstate stream's parser layout (JSON) and bytes.  Raises NoMemoryMapError."""
    dev = [s for s in archive.streams if s.kind == C.KIND_DEVSTATE]
    if not dev or "layout" not in dev[0].attrs:
        raise NoMemoryMapError(
            f"archive {archive.id[:12]} has no device state with a stream layout:"
            " the vCPU registers for the ELF notes are not available"
        )
    data = repo.open_stream(archive, dev[0].name).read_all()
    layout = dev[0].attrs["layout"]
    if not isinstance(layout, dict):
        raise FormatError(f"archive {archive.id[:12]}: devstate layout is not a JSON object")
    return layout, data
