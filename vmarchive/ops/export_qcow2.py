"""A streaming qcow2 (version 3) writer for exported disks (ops layer, pure: offsets and bytes).

Why not ``qemu-img convert`` from a raw file: that needs a temporary raw copy as large as
the disk's data and a second pass over it.  Here the whole qcow2 layout is computed from
the archive's slot table before a byte of data is read (which clusters hold data is known
from the manifest), so the data is written once, in order, straight into its final place.

Layout (cluster size 64 KiB, 16-bit refcounts, no compression, no backing file)::

    cluster 0          header (104 bytes, version 3; the rest zero = no extensions)
    L1 table           one u64 per 512 MiB of virtual size
    refcount table     one u64 per refcount block
    refcount blocks    one u16 per cluster of the file: 1 for every cluster written
    L2 tables          one per 512 MiB that holds data: u64 per cluster (host offset | COPIED)
    data clusters      in guest order

Facts from the qcow2 specification (QEMU's docs/interop/qcow2.txt): big-endian fields;
L1/L2 entries carry the host offset in bits 9-55 and bit 63 (COPIED) when the refcount is
exactly one; an unallocated L2 entry (0) reads as zeros.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence

import msgspec

CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
REFCOUNT_ORDER = 4  # 16-bit refcounts
QCOW2_MAGIC = b"QFI\xfb"
COPIED = 1 << 63
_L2_ENTRIES = CLUSTER // 8
_RC_ENTRIES = CLUSTER * 8 // (1 << REFCOUNT_ORDER)
# magic, version (2*4) + backing offset (8) + backing size, cluster bits (2*4) + size (8)
# + crypt (4) + l1 size (4) + l1 offset, refcount table offset (2*8) + refcount table
# clusters, nb snapshots (2*4) + snapshots offset (8) + incompatible, compatible, autoclear
# features (3*8) + refcount order, header length (2*4) = 104
_HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQII")
assert _HEADER.size == 104


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


class Qcow2Layout(msgspec.Struct, frozen=True):
    """Where everything of the image goes.  ``data_offset[c]`` is the host offset of guest
    cluster ``c`` (only clusters with data have one)."""

    size: int  # virtual size
    l1_offset: int
    l1_entries: int
    refcount_table_offset: int
    refcount_table_clusters: int
    refcount_blocks_offset: int
    refcount_blocks: int
    l2_offsets: dict[int, int]  # L1 index -> L2 table offset
    data_offset: dict[int, int]  # guest cluster -> host offset
    clusters: int  # clusters in the file

    @property
    def file_size(self) -> int:
        return self.clusters * CLUSTER


def plan(size: int, data_clusters: Sequence[int]) -> Qcow2Layout:
    """Lay out an image of ``size`` bytes whose guest clusters ``data_clusters`` (sorted,
    unique) hold data; every other cluster reads as zeros.  Raises ValueError for a cluster
    outside the image."""
    if data_clusters and not 0 <= min(data_clusters) <= max(data_clusters) < _ceil(size, CLUSTER):
        raise ValueError("data clusters outside the image")
    l1_entries = max(1, _ceil(size, CLUSTER * _L2_ENTRIES))
    l1_clusters = _ceil(l1_entries * 8, CLUSTER)
    l2_tables = sorted({c // _L2_ENTRIES for c in data_clusters})
    fixed = 1 + l1_clusters + len(l2_tables) + len(data_clusters)
    rb = 1
    while True:  # the refcount structures count themselves too
        rt = _ceil(rb * 8, CLUSTER)
        need = _ceil(fixed + rt + rb, _RC_ENTRIES)
        if need <= rb:
            break
        rb = need
    pos = CLUSTER
    l1_offset = pos
    pos += l1_clusters * CLUSTER
    rt_offset = pos
    pos += rt * CLUSTER
    rb_offset = pos
    pos += rb * CLUSTER
    l2_offsets = {}
    for t in l2_tables:
        l2_offsets[t] = pos
        pos += CLUSTER
    data_offset = {}
    for c in data_clusters:
        data_offset[c] = pos
        pos += CLUSTER
    return Qcow2Layout(
        size=size,
        l1_offset=l1_offset,
        l1_entries=l1_entries,
        refcount_table_offset=rt_offset,
        refcount_table_clusters=rt,
        refcount_blocks_offset=rb_offset,
        refcount_blocks=rb,
        l2_offsets=l2_offsets,
        data_offset=data_offset,
        clusters=pos // CLUSTER,
    )


def metadata(layout: Qcow2Layout) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) of the header and every table, one cluster-sized piece at a time
    (memory stays bounded whatever the disk size)."""
    yield (
        0,
        _HEADER.pack(
            QCOW2_MAGIC,
            3,
            0,  # no backing file
            0,
            CLUSTER_BITS,
            layout.size,
            0,  # no encryption
            layout.l1_entries,
            layout.l1_offset,
            layout.refcount_table_offset,
            layout.refcount_table_clusters,
            0,  # no snapshots
            0,
            0,  # incompatible features
            0,  # compatible features
            0,  # autoclear features
            REFCOUNT_ORDER,
            _HEADER.size,
        ),
    )
    l1 = bytearray(layout.l1_entries * 8)
    for t, off in layout.l2_offsets.items():
        struct.pack_into(">Q", l1, 8 * t, off | COPIED)
    yield layout.l1_offset, bytes(l1)
    rt = bytearray(layout.refcount_blocks * 8)
    for i in range(layout.refcount_blocks):
        struct.pack_into(">Q", rt, 8 * i, layout.refcount_blocks_offset + i * CLUSTER)
    yield layout.refcount_table_offset, bytes(rt)
    one = struct.pack(">H", 1)
    for i in range(layout.refcount_blocks):
        first = i * _RC_ENTRIES
        n = max(0, min(_RC_ENTRIES, layout.clusters - first))
        if n:
            yield layout.refcount_blocks_offset + i * CLUSTER, one * n
    by_table: dict[int, list[int]] = {}
    for c in layout.data_offset:
        by_table.setdefault(c // _L2_ENTRIES, []).append(c)
    for t, off in layout.l2_offsets.items():
        l2 = bytearray(CLUSTER)
        for c in by_table[t]:
            struct.pack_into(">Q", l2, 8 * (c % _L2_ENTRIES), layout.data_offset[c] | COPIED)
        yield off, bytes(l2)
