"""The guest-physical memory map of a running QEMU guest (hypervisor layer).

What it is for: a migration stream carries RAM as RAMBlocks (``pc.ram``, ``pc.bios``...) by
offset, not by guest-physical address.  Exports that must place memory where the guest
sees it (ELF cores, raw physical images, ``diff`` by physical address) need to know which
RAMBlock range sits at which guest-physical address.  QEMU tells that only in
``info mtree -f`` (the flattened view of the ``memory`` address space) through the human
monitor; RAMBlock ids come from ``info ramblock``.  :func:`collect_memory_map` reads both
(plus vCPUs and architecture) and returns what a capture records in the archive metadata;
:class:`MemoryMap` is the recorded form (spec: ``formats/FORMAT.md``, "Memory map").

The parsers are pure functions of QEMU's text, so they are tested without a guest.  This
module imports nothing from libvirt at import time (exports read archives without libvirt).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from vmarchive.errors import FormatError

if TYPE_CHECKING:
    from vmarchive.hypervisor.qmp import QMP

#: Version of the ``memory_map`` JSON object this module writes and reads.
MEMORY_MAP_VERSION = 1
#: Metadata keys :func:`collect_memory_map` fills.
METADATA_KEYS = ("memory_map", "vcpus", "arch")

# "  0000000000100000-0000000009ffffff (prio 0, ram): pc.ram @0000000000100000"
# An accelerator name (" KVM") may follow when the accelerator maps the range itself.
_RANGE = re.compile(
    r"^\s+(?P<start>[0-9a-f]+)-(?P<last>[0-9a-f]+) \(prio -?\d+, (?P<type>[a-z/-]+)\):"
    r" (?P<name>.+?)(?: @(?P<offset>[0-9a-f]+))?(?: (?:KVM|HVF|WHPX|NVMM|HAX))?\s*$"
)
_FLATVIEW = re.compile(r"^FlatView #\d+\s*$")
_AS = re.compile(r'^ AS "(?P<name>[^"]*)"')
# "                  pc.ram    4 KiB  0x0000000000000000 0x000000000a000000 0x000000000a000000"
_RAMBLOCK = re.compile(
    r"^\s*(?P<name>\S+)\s+\d+ [KMGT]?i?B\s+0x(?P<offset>[0-9a-f]+)\s+0x(?P<used>[0-9a-f]+)"
    r"\s+0x(?P<total>[0-9a-f]+)\s*$"
)


class FlatRange(msgspec.Struct, frozen=True):
    """One line of a flat view: ``[start, start+size)`` of the address space."""

    start: int
    size: int
    type: str  # "ram", "rom", "i/o", "romd", "ramd", "nv-ram", ...
    region: str  # the MemoryRegion's name (not always the RAMBlock id)
    offset: int  # offset inside that region


class MemRange(msgspec.Struct, frozen=True):
    """A guest-physical range backed by RAM: ``size`` bytes of RAMBlock ``block`` at ``offset``."""

    start: int
    size: int
    block: str
    offset: int
    readonly: bool

    @property
    def end(self) -> int:
        return self.start + self.size

    def to_json(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "size": self.size,
            "block": self.block,
            "offset": self.offset,
            "readonly": self.readonly,
        }


class MemoryMap(msgspec.Struct, frozen=True):
    """The RAM-backed part of the guest-physical address space, sorted by address."""

    ranges: tuple[MemRange, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": MEMORY_MAP_VERSION,
            "source": "info mtree -f",
            "ranges": [r.to_json() for r in self.ranges],
        }

    @classmethod
    def from_json(cls, obj: object) -> MemoryMap:
        """The inverse of :meth:`to_json`.

        Raises FormatError for an unknown version, a malformed or overlapping range.
        """
        if not isinstance(obj, Mapping):
            raise FormatError("memory_map is not a JSON object")
        if obj.get("version") != MEMORY_MAP_VERSION:
            raise FormatError(f"memory_map has unknown version {obj.get('version')!r}")
        ranges: list[MemRange] = []
        raw = obj.get("ranges")
        if not isinstance(raw, list):
            raise FormatError("memory_map has no ranges list")
        for i, r in enumerate(raw):
            try:
                mr = MemRange(
                    start=_uint(r["start"]),
                    size=_uint(r["size"]),
                    block=str(r["block"]),
                    offset=_uint(r["offset"]),
                    readonly=bool(r.get("readonly", False)),
                )
            except (KeyError, TypeError, ValueError) as e:
                raise FormatError(f"memory_map range {i} is malformed: {e}") from e
            if mr.size == 0:
                raise FormatError(f"memory_map range {i} is empty")
            ranges.append(mr)
        ranges.sort(key=lambda m: m.start)
        for a, b in itertools.pairwise(ranges):
            if b.start < a.end:
                raise FormatError(f"memory_map ranges overlap at {b.start:#x}")
        return cls(tuple(ranges))

    def dump_blocks(self) -> list[MemRange]:
        """The ranges merged the way QEMU's ``dump-guest-memory`` merges them.

        QEMU joins neighbouring sections of the same RAMBlock that are contiguous both in
        guest-physical addresses and inside the block (``pc.ram`` split by the PAM
        ROM/RAM windows below 1 MiB becomes one block again); each result is one PT_LOAD.
        """
        out: list[MemRange] = []
        for r in self.ranges:
            if out:
                p = out[-1]
                if p.block == r.block and p.end == r.start and p.offset + p.size == r.offset:
                    out[-1] = MemRange(p.start, p.size + r.size, p.block, p.offset, p.readonly)
                    continue
            out.append(r)
        return out


def _uint(v: object) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"{v!r} is not a non-negative integer")
    return v


def parse_flatview(text: str, address_space: str = "memory") -> list[FlatRange]:
    """The ranges of the flat view that renders ``address_space`` in ``info mtree -f`` text.

    Raises FormatError when the text has no flat view for that address space.
    """
    views: list[tuple[set[str], list[FlatRange]]] = []
    for line in text.splitlines():
        if _FLATVIEW.match(line):
            views.append((set(), []))
            continue
        if not views:
            continue
        m = _AS.match(line)
        if m:
            views[-1][0].add(m.group("name"))
            continue
        m = _RANGE.match(line)
        if m:
            start, last = int(m.group("start"), 16), int(m.group("last"), 16)
            views[-1][1].append(
                FlatRange(
                    start=start,
                    size=last - start + 1,
                    type=m.group("type"),
                    region=m.group("name"),
                    offset=int(m.group("offset") or "0", 16),
                )
            )
    for names, ranges in views:
        if address_space in names:
            return ranges
    raise FormatError(f"'info mtree -f' shows no flat view of address space {address_space!r}")


def parse_ramblocks(text: str) -> dict[str, int]:
    """RAMBlock id -> used length, from ``info ramblock`` text."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        m = _RAMBLOCK.match(line)
        if m:
            out[m.group("name")] = int(m.group("used"), 16)
    return out


def block_for_region(region: str, blocks: Iterable[str]) -> str | None:
    """The RAMBlock id of a MemoryRegion name: equal, or ``<device path>/<name>``.

    ``None`` when no block or more than one block matches (two devices with equally named
    regions cannot be told apart from ``info mtree`` text alone).
    """
    found = [b for b in blocks if b == region or b.endswith("/" + region)]
    exact = [b for b in found if b == region]
    if len(exact) == 1:
        return exact[0]
    return found[0] if len(found) == 1 else None


def build_memory_map(mtree_text: str, ramblock_text: str) -> MemoryMap:
    """The RAM-backed ranges of the ``memory`` address space, each tied to its RAMBlock.

    Kept: ranges of type ``ram`` and ``rom`` (RAM-backed, as QEMU's dump keeps them);
    dropped: I/O, ROM devices (``romd``), RAM devices (``ramd``) and non-volatile memory
    (``nv-*``), which ``dump-guest-memory`` leaves out too.

    Raises FormatError when the text cannot be parsed, or a RAM range's region matches no
    single RAMBlock, or lies outside its block.
    """
    blocks = parse_ramblocks(ramblock_text)
    if not blocks:
        raise FormatError("'info ramblock' lists no RAM blocks")
    ranges: list[MemRange] = []
    for fr in parse_flatview(mtree_text):
        if fr.type not in ("ram", "rom"):
            continue
        block = block_for_region(fr.region, blocks)
        if block is None:
            raise FormatError(
                f"memory region {fr.region!r} at {fr.start:#x} matches no single RAM block"
                f" (blocks: {', '.join(sorted(blocks))})"
            )
        if fr.offset + fr.size > blocks[block]:
            raise FormatError(
                f"memory region {fr.region!r} at {fr.start:#x} reaches past RAM block {block!r}"
            )
        ranges.append(MemRange(fr.start, fr.size, block, fr.offset, fr.type == "rom"))
    ranges.sort(key=lambda r: r.start)
    return MemoryMap(tuple(ranges))


def collect_memory_map(
    qmp: QMP,
    mtree: str | None = None,
    ramblock: str | None = None,
) -> dict[str, Any]:
    """What a capture records so that memory exports can be made from the archive.

    Returns a dict to merge into the archive metadata, with exactly these keys:

    * ``memory_map``: :meth:`MemoryMap.to_json` of the guest's RAM-backed guest-physical
      ranges (from ``info mtree -f`` and ``info ramblock``);
    * ``vcpus``: the number of vCPUs (``query-cpus-fast``);
    * ``arch``: QEMU's target architecture (e.g. ``"x86_64"``): the ``target`` that
      ``query-cpus-fast`` gives for each vCPU (QEMU 3.0 on), else ``query-target``.

    The map of a running ``pc``/``q35`` guest changes only on hotplug or when the firmware
    reprograms the PAM/SMRAM windows, so reading it just before or after the instant is
    fine outside boot.

    ``mtree``, ``ramblock``: when the caller has them already (one round trip each less);
    else they are asked for.

    Raises QMPCommandError / HypervisorError (QEMU or libvirt failed) and FormatError
    (QEMU's text could not be parsed).
    """
    if mtree is None:
        mtree = qmp.hmp("info mtree -f")
    if ramblock is None:
        ramblock = qmp.hmp("info ramblock")
    cpus = qmp.execute("query-cpus-fast")
    arch = cpus[0].get("target") if cpus else None
    if not arch:  # one round trip less per capture where the vCPUs name it
        arch = qmp.execute("query-target")["arch"]
    return {
        "memory_map": build_memory_map(mtree, ramblock).to_json(),
        "vcpus": len(cpus),
        "arch": str(arch),
    }
