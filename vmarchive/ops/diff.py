"""What changed between two archives of a guest, from their manifests alone (ops layer).

Two archives in one repository name equal chunks by equal ids (ids are keyed per
repository, see FORMAT.md section 7), so comparing the slot tables of two streams says
which slots differ without reading a byte of guest data.  The answer is exact at slot
granularity: a changed slot (64 KiB of RAM, 256 KiB of disk by default) may hold one
changed byte or all of them; an unchanged slot is unchanged (up to a 16-byte id
collision, about 2^-64 for any pair).

RAM is compared per RAMBlock (``ram`` streams matched by block id) and changed block ranges
are placed at guest-physical addresses with the archive's memory map (see
:mod:`vmarchive.ops.export_source`; reading the map's text is the only read, and only for
archives captured before the metadata carried ``memory_map``).  Disks are matched by
target.  The device state is reported changed or not.

With ``exact`` the changed chunks (only those) of both archives are read and compared page
by page, so the answer narrows to 4 KiB pages.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import msgspec

from vmarchive.errors import VmarchiveError
from vmarchive.format import constants as C
from vmarchive.hypervisor.memmap import MemoryMap
from vmarchive.ops.export_source import load_memory_map, ram_streams
from vmarchive.ops.repo import RepoRef, open_repo
from vmarchive.store import Archive, Repository, StreamInfo

log = logging.getLogger(__name__)


class Extent(msgspec.Struct, frozen=True):
    """``length`` bytes at ``offset``."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length

    def to_json(self) -> dict[str, int]:
        return {"offset": self.offset, "length": self.length}


class PhysExtent(msgspec.Struct, frozen=True):
    """A changed guest-physical range and where it lies in its RAM block."""

    address: int
    length: int
    block: str
    offset: int

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "length": self.length,
            "block": self.block,
            "offset": self.offset,
        }


class StreamDiff(msgspec.Struct, frozen=True):
    """Changed extents of one stream (a RAM block or a disk) between A and B."""

    name: str  # block id or disk target
    size_a: int | None  # None: absent from A
    size_b: int | None
    granularity: int
    changed: list[Extent]

    @property
    def changed_bytes(self) -> int:
        return sum(e.length for e in self.changed)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size_a": self.size_a,
            "size_b": self.size_b,
            "granularity": self.granularity,
            "changed_bytes": self.changed_bytes,
            "changed": [e.to_json() for e in self.changed],
        }


class DiffResult(msgspec.Struct, frozen=True):
    a: str
    b: str
    memory: list[StreamDiff]
    physical: list[PhysExtent] | None  # None: no memory map to place the blocks
    disks: list[StreamDiff]
    devstate_changed: bool | None  # None: not both archives have device state
    notes: list[str] = msgspec.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "memory": [d.to_json() for d in self.memory],
            "physical": None if self.physical is None else [p.to_json() for p in self.physical],
            "disks": [d.to_json() for d in self.disks],
            "devstate_changed": self.devstate_changed,
            "notes": self.notes,
        }


def changed_slots(a: StreamInfo | None, b: StreamInfo | None) -> tuple[int, list[Extent]]:
    """Byte extents whose slots differ (holes compare equal to holes), merged.

    A stream present on one side only is changed wherever it has data.  Streams with
    different chunk sizes cannot be compared by id: all of them is reported changed.
    Returns (granularity, extents).
    """
    if a is None and b is None:
        return 0, []
    if a is None or b is None:
        only = a if a is not None else b
        assert only is not None
        return only.chunk_size, _runs(
            only.chunk_size, only.size, (only.chunk_id(i) != C.ZERO_ID for i in range(only.slots))
        )
    if a.chunk_size != b.chunk_size:
        size = max(a.size, b.size)
        return max(a.chunk_size, b.chunk_size), [Extent(0, size)] if size else []
    cs = a.chunk_size
    size = max(a.size, b.size)
    ta, tb = a.table, b.table
    n = -(-size // cs)

    def differs() -> Iterator[bool]:
        for i in range(n):
            ida = ta[16 * i : 16 * i + 16] if i < a.slots else C.ZERO_ID
            idb = tb[16 * i : 16 * i + 16] if i < b.slots else C.ZERO_ID
            # A short last slot of the longer stream differs even when both are holes:
            # the sizes differ, so the stream did change there.
            yield ida != idb or (i >= a.slots) != (i >= b.slots)

    return cs, _runs(cs, size, differs())


def _runs(cs: int, size: int, flags: Iterator[bool]) -> list[Extent]:
    out: list[Extent] = []
    start: int | None = None
    i = -1
    for i, f in enumerate(flags):
        if f and start is None:
            start = i * cs
        elif not f and start is not None:
            out.append(Extent(start, i * cs - start))
            start = None
    if start is not None:
        out.append(Extent(start, min((i + 1) * cs, size) - start))
    return out


#: Granularity of ``exact`` diffs: the guest page (RAM) / 4 KiB (disks).
EXACT_GRANULARITY = 4096


def refine(
    repo: Repository, a: Archive, sa: StreamInfo, b: Archive, sb: StreamInfo, d: StreamDiff
) -> StreamDiff:
    """Narrow ``d``'s changed extents to the 4 KiB pages that really differ, by reading the
    changed chunks of both streams (and nothing else).  Past the end of the shorter stream
    every page counts as changed.  Raises DamageError for a chunk that fails verification."""
    ra, rb = repo.open_stream(a, sa.name), repo.open_stream(b, sb.name)
    g = EXACT_GRANULARITY
    out: list[Extent] = []
    for e in d.changed:
        pos = e.offset
        while pos < e.end:
            n = min(max(d.granularity, g), e.end - pos)
            da, db = ra.read_range(pos, n), rb.read_range(pos, n)
            # slices of unequal length (past the end of the shorter stream) differ too
            pages = [da[k : k + g] != db[k : k + g] for k in range(0, max(len(da), len(db)), g)]
            for ext in _runs(g, len(pages) * g, iter(pages)):
                out.append(Extent(pos + ext.offset, min(ext.length, e.end - pos - ext.offset)))
            pos += n
    merged: list[Extent] = []
    for x in out:
        if merged and merged[-1].end == x.offset:
            merged[-1] = Extent(merged[-1].offset, merged[-1].length + x.length)
        else:
            merged.append(x)
    return StreamDiff(d.name, d.size_a, d.size_b, g, merged)


def place(block: str, extents: list[Extent], mmap: MemoryMap) -> list[PhysExtent]:
    """The guest-physical ranges of changed ``extents`` of RAM block ``block``.

    A block range mapped twice (an alias) appears at each address; a range mapped
    nowhere (e.g. option ROM images QEMU keeps but the guest does not see) appears
    nowhere here (it is still in :attr:`DiffResult.memory`).
    """
    out: list[PhysExtent] = []
    for r in mmap.ranges:
        if r.block != block:
            continue
        for e in extents:
            lo = max(e.offset, r.offset)
            hi = min(e.end, r.offset + r.size)
            if lo < hi:
                out.append(PhysExtent(r.start + (lo - r.offset), hi - lo, block, lo))
    return out


def _merge_phys(parts: list[PhysExtent]) -> list[PhysExtent]:
    parts = sorted(parts, key=lambda p: p.address)
    out: list[PhysExtent] = []
    for p in parts:
        if out:
            q = out[-1]
            if (
                q.block == p.block
                and q.address + q.length == p.address
                and q.offset + q.length == p.offset
            ):
                out[-1] = PhysExtent(q.address, q.length + p.length, q.block, q.offset)
                continue
        out.append(p)
    return out


def _kind(archive: Archive, kind: str) -> list[StreamInfo]:
    return [s for s in archive.streams if s.kind == kind]


def _map_or_none(repo: Repository, archive: Archive, notes: list[str]) -> MemoryMap | None:
    try:
        return load_memory_map(repo, archive)
    except VmarchiveError as e:
        notes.append(f"{archive.id[:12]}: {e.message}")
        return None


def diff_archives(repo: Repository, a: Archive, b: Archive, exact: bool = False) -> DiffResult:
    """Compare two loaded archives of the same repository.

    ``exact``: narrow changed RAM and disk ranges to 4 KiB pages by reading the changed
    chunks of both archives (unchanged chunks are still never read).
    """
    notes: list[str] = []
    if a.domain != b.domain:
        notes.append(f"the archives are of different domains ({a.domain!r}, {b.domain!r})")
    ra, rb = ram_streams(a), ram_streams(b)
    opaque = False
    for arch, ram in ((a, ra), (b, rb)):
        if not ram and _kind(arch, C.KIND_STREAM):
            opaque = True
            notes.append(
                f"{arch.id[:12]}: memory is an opaque migration stream; RAM is not compared"
            )
    memory: list[StreamDiff] = []
    blocks = [] if opaque else sorted(set(ra) | set(rb), key=lambda k: (k not in rb, k))
    for block in blocks:
        sa, sb = ra.get(block), rb.get(block)
        gran, ext = changed_slots(sa, sb)
        d = StreamDiff(
            block, None if sa is None else sa.size, None if sb is None else sb.size, gran, ext
        )
        if exact and sa is not None and sb is not None:
            d = refine(repo, a, sa, b, sb, d)
        memory.append(d)
    physical: list[PhysExtent] | None = None
    if memory:
        map_b = _map_or_none(repo, b, notes) if rb else None
        map_a = _map_or_none(repo, a, notes) if ra else None
        if map_a is not None and map_b is not None and map_a != map_b:
            notes.append("the guest-physical memory maps differ; addresses are B's")
        mmap = map_b or map_a
        if mmap is not None:
            physical = _merge_phys([p for d in memory for p in place(d.name, d.changed, mmap)])
    da = {str(s.attrs.get("target", s.name)): s for s in _kind(a, C.KIND_DISK)}
    db = {str(s.attrs.get("target", s.name)): s for s in _kind(b, C.KIND_DISK)}
    disks: list[StreamDiff] = []
    for t in sorted(set(da) | set(db)):
        sa, sb = da.get(t), db.get(t)
        gran, ext = changed_slots(sa, sb)
        d = StreamDiff(
            t, None if sa is None else sa.size, None if sb is None else sb.size, gran, ext
        )
        if exact and sa is not None and sb is not None:
            d = refine(repo, a, sa, b, sb, d)
        disks.append(d)
    dev_a, dev_b = _kind(a, C.KIND_DEVSTATE), _kind(b, C.KIND_DEVSTATE)
    devstate_changed: bool | None = None
    if dev_a and dev_b:
        devstate_changed = bool(changed_slots(dev_a[0], dev_b[0])[1])
    return DiffResult(a.id, b.id, memory, physical, disks, devstate_changed, notes)


def diff(ref: RepoRef, name_a: str, name_b: str, exact: bool = False) -> DiffResult:
    """Compare archives ``name_a`` and ``name_b`` (ids or unique prefixes) of one repository.

    Raises NotFoundError/AmbiguousError (names), repository errors, FormatError (a recorded
    memory map that does not decode), DamageError (``exact``: a chunk fails verification).
    Reads manifests (and, for archives captured before the metadata carried
    ``memory_map``, the small map text streams); guest data only with ``exact``, and then
    only the chunks that differ.
    """
    with open_repo(ref) as repo:
        a = repo.load_archive(name_a)
        b = repo.load_archive(name_b)
        return diff_archives(repo, a, b, exact)
