"""Compact in-memory chunk index (store layer): chunk id -> where its blob lives.

A repository may hold tens of millions of chunks; a ``dict[bytes, tuple]`` costs about
200 bytes per entry in CPython, this table 32 bytes per slot (about 43 per entry at the
0.75 load factor it grows at).  It is an open-addressing hash table with linear probing
in one ``bytearray``; records are ``id[16] | pack number u32 | offset u32 | length u32 |
raw length u32`` (little endian), pack number 0 meaning "empty slot".  Chunk ids are keyed
hashes, so their first 8 bytes are already uniformly distributed and serve as the hash.

Lookups cost about a microsecond in pure Python: negligible next to hashing and
compressing a chunk of tens of kilobytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence

import msgspec

from vmarchive.format.constants import ZERO_ID

_REC = struct.Struct("<16sIIII")
_REC_SIZE = _REC.size  # 16 + 4 * 4 = 32 bytes
_HEAD = struct.Struct("<16sI")
_MAX_U32 = 0xFFFFFFFF
#: A snapshot's first part: entry count u64 | pack count u64 (:meth:`ChunkIndex.snapshot`).
SNAPSHOT_HEAD = struct.Struct("<QQ")
#: the pack number of each 32-byte record, skipping the id and the other fields
_PACK_FIELD = struct.Struct("<16xI12x")


class Location(msgspec.Struct, frozen=True):
    """Where a chunk's encoded blob is: ``length`` bytes at ``offset`` in pack ``pack_id``."""

    pack_id: str
    offset: int
    length: int
    raw_length: int


class ChunkIndex:
    """Map of 16-byte chunk id -> :class:`Location`; entries are only ever added or dropped
    wholesale (gc builds a new index)."""

    def __init__(self, capacity: int = 1024) -> None:
        cap = 16
        while cap < capacity:
            cap *= 2
        self._cap = cap
        self._buf = bytearray(cap * _REC_SIZE)
        self._count = 0
        self._packs: list[str] = []
        self._pack_numbers: dict[str, int] = {}
        #: Whether the table was rehashed into a larger one since it was made or restored
        #: (:meth:`from_snapshot`): a saved snapshot of it is then smaller than it, and
        #: whoever loads that snapshot would rehash it again (see the index cache).
        self.grown = False

    def __len__(self) -> int:
        return self._count

    def _pack_number(self, pack_id: str) -> int:
        n = self._pack_numbers.get(pack_id)
        if n is None:
            self._packs.append(pack_id)
            n = len(self._packs)  # 1-based: 0 marks an empty slot
            if n > _MAX_U32:
                raise OverflowError("too many packs for the chunk index")
            self._pack_numbers[pack_id] = n
        return n

    def _find(self, chunk_id: bytes) -> tuple[int, bool]:
        """Byte position of ``chunk_id``'s slot, and whether it is occupied by it."""
        mask = self._cap - 1
        slot = int.from_bytes(chunk_id[:8], "little") & mask
        buf = self._buf
        while True:
            pos = slot * _REC_SIZE
            cid, pack = _HEAD.unpack_from(buf, pos)
            if pack == 0:
                return pos, False
            if cid == chunk_id:
                return pos, True
            slot = (slot + 1) & mask

    def add(self, chunk_id: bytes, loc: Location) -> bool:
        """Record ``chunk_id`` at ``loc`` unless already present; return whether added.

        Raises :class:`ValueError` for an id that is not 16 bytes or a location that
        does not fit the record.
        """
        if len(chunk_id) != 16:
            raise ValueError("chunk ids are 16 bytes")
        if max(loc.offset, loc.length, loc.raw_length) > _MAX_U32:
            raise ValueError("chunk location out of range")
        pos, found = self._find(chunk_id)
        if found:
            return False
        self._insert(
            pos, chunk_id, self._pack_number(loc.pack_id), loc.offset, loc.length, loc.raw_length
        )
        return True

    def _insert(
        self, pos: int, chunk_id: bytes, pack: int, offset: int, length: int, raw: int
    ) -> None:
        """Put a record for the absent ``chunk_id`` at ``pos`` (its free slot, as
        :meth:`_find` gave it), growing the table first when that would fill it past 3/4."""
        if (self._count + 1) * 4 > self._cap * 3:
            self._grow()
            pos, _ = self._find(chunk_id)
        _REC.pack_into(self._buf, pos, chunk_id, pack, offset, length, raw)
        self._count += 1

    def _grow(self) -> None:
        # ~0.65 us a slot in Python (a million slots: 0.7 s), done once per doubling
        self.grown = True
        old = self._buf
        self._cap *= 2
        self._buf = bytearray(self._cap * _REC_SIZE)
        mask = self._cap - 1
        buf = self._buf
        for pos in range(0, len(old), _REC_SIZE):
            cid, pack = _HEAD.unpack_from(old, pos)
            if pack == 0:
                continue
            slot = int.from_bytes(cid[:8], "little") & mask
            while _HEAD.unpack_from(buf, slot * _REC_SIZE)[1] != 0:
                slot = (slot + 1) & mask
            p = slot * _REC_SIZE
            buf[p : p + _REC_SIZE] = old[pos : pos + _REC_SIZE]

    def get(self, chunk_id: bytes) -> Location | None:
        """The location of ``chunk_id``, or ``None``."""
        pos, found = self._find(chunk_id)
        if not found:
            return None
        _cid, pack, offset, length, raw = _REC.unpack_from(self._buf, pos)
        return Location(self._packs[pack - 1], offset, length, raw)

    def __contains__(self, chunk_id: object) -> bool:
        return isinstance(chunk_id, bytes) and self._find(chunk_id)[1]

    def items(self) -> Iterator[tuple[bytes, Location]]:
        """Every (chunk id, location), in table order."""
        for cid, pack, offset, length, raw in _REC.iter_unpack(self._buf):
            if pack:
                yield cid, Location(self._packs[pack - 1], offset, length, raw)

    def pack_ids(self) -> list[str]:
        """Every pack some entry ever referred to."""
        return list(self._packs)

    def memory_bytes(self) -> int:
        """Approximate memory held by the table (for logs and the benchmark)."""
        return len(self._buf)

    # -- packed entries (index objects' bodies, the index cache's journal) ---------------
    @staticmethod
    def pack_entries(entries: Sequence[tuple[bytes, Location]]) -> tuple[bytes, list[str]]:
        """``entries`` as 32-byte records laid out as an index object's (id, pack number,
        offset, length, raw length; the pack numbers counting from 0 in the returned pack
        list): what :meth:`add_packed` takes."""
        numbers: dict[str, int] = {}
        out = bytearray(len(entries) * _REC_SIZE)
        pos = 0
        for cid, loc in entries:
            n = numbers.setdefault(loc.pack_id, len(numbers))
            _REC.pack_into(out, pos, cid, n, loc.offset, loc.length, loc.raw_length)
            pos += _REC_SIZE
        return bytes(out), list(numbers)

    def add_packed(
        self, records: bytes | memoryview, packs: Sequence[str], *, checked: bool = False
    ) -> int:
        """Add the entries of ``records`` (see :meth:`pack_entries`; present ids are kept,
        as :meth:`add` does); return how many were new.  Unless ``checked`` (the caller
        has checked them, as :func:`~vmarchive.format.index.decode_index_packed` does),
        raises ValueError, having added nothing, when a record's pack number is not in
        ``packs`` or its id is the zero id (never indexed: it names holes), or
        ``records`` is not whole records."""
        if len(records) % _REC_SIZE:
            raise ValueError("packed entries: not whole records")
        if not checked:
            npacks = len(packs)
            if any(pack >= npacks or cid == ZERO_ID for cid, pack, *_ in _REC.iter_unpack(records)):
                raise ValueError("packed entries: a pack number out of range or an empty id")
        numbers = [self._pack_number(p) for p in packs]
        added = 0
        for cid, pack, offset, length, raw in _REC.iter_unpack(records):
            pos, found = self._find(cid)
            if not found:
                self._insert(pos, cid, numbers[pack], offset, length, raw)
                added += 1
        return added

    # -- snapshots (the local index cache, :mod:`vmarchive.store.indexcache`) ------------
    def snapshot(self) -> list[bytes | bytearray]:
        """The table as consecutive parts (not joined: the table may be gigabytes):
        ``count u64 | packs u64``, the pack ids (32 bytes each), the table (its capacity
        is its length / 32).  The last part is the live table: write it out at once."""
        head = SNAPSHOT_HEAD.pack(self._count, len(self._packs))
        return [head, b"".join(bytes.fromhex(p) for p in self._packs), self._buf]

    @classmethod
    def from_snapshot(cls, head: bytes, packs: bytes, table: bytearray) -> ChunkIndex:
        """Inverse of :meth:`snapshot`; ``table`` becomes the new index's own (no copy).
        Raises ValueError when the parts do not hold one (sizes, capacity, pack list).

        The table itself is not scanned here (that is :meth:`check`, ~0.04 us a slot:
        0.6 s for the 16 million slots of 8 million chunks, at every load): the index
        cache checks each table before it writes it and its checksum then vouches for
        the bytes (see :mod:`vmarchive.store.indexcache`)."""
        if len(head) != SNAPSHOT_HEAD.size:
            raise ValueError("index snapshot truncated")
        count, npacks = SNAPSHOT_HEAD.unpack(head)
        cap = len(table) // _REC_SIZE
        if (
            len(packs) != 32 * npacks
            or len(table) % _REC_SIZE
            or cap < 16
            or cap & (cap - 1)
            or count * 4 > cap * 3
        ):
            raise ValueError("index snapshot: bad sizes")
        idx = cls.__new__(cls)
        idx._cap = cap
        idx._buf = table
        idx._packs = [packs[i : i + 32].hex() for i in range(0, len(packs), 32)]
        idx._pack_numbers = {p: n for n, p in enumerate(idx._packs, 1)}
        if len(idx._pack_numbers) != npacks:
            raise ValueError("index snapshot: a pack listed twice")
        idx._count = count
        idx.grown = False
        return idx

    def check(self) -> None:
        """Raise ValueError unless every occupied slot names a known pack and the count
        of occupied slots is the entry count (a table snapshots must hold)."""
        npacks = len(self._packs)
        occupied = 0
        for (pack,) in _PACK_FIELD.iter_unpack(self._buf):
            if pack:
                if pack > npacks:
                    raise ValueError("index table: pack number out of range")
                occupied += 1
        if occupied != self._count:
            raise ValueError("index table: the count disagrees with the table")
