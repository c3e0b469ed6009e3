"""Index objects (``index/<id>``): chunk id -> (pack id, offset, stored length, raw length).

Layer: format.  Bytes: the 16-byte header (type "I") then a sealed body (zstd with frame
checksum; AES-256-GCM with the header as AAD when encrypted).  The plaintext body lists the
pack ids once (32 bytes each) and one 32-byte entry per chunk that refers to a pack by its
number, sorted by chunk id: about 32 bytes per chunk, so ten million chunks (640 GB of
64 KiB chunks) take about 320 MB before compression.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable

import msgspec

from vmarchive.errors import FormatError
from vmarchive.format import constants as C
from vmarchive.format.blob import BlobCodec
from vmarchive.format.header import decode_header, make_header


class IndexEntry(msgspec.Struct, frozen=True):
    """Where a chunk is stored.  ``pack_id`` is the pack's id as 32 raw bytes (``.hex()`` names it)."""

    chunk_id: bytes
    pack_id: bytes
    offset: int
    length: int
    raw_length: int


#: One entry of an index object's body (:data:`~vmarchive.format.constants.INDEX_ENTRY_STRUCT`).
_ENTRY = struct.Struct(C.INDEX_ENTRY_STRUCT)
#: An index row as :func:`encode_index_rows` takes it: chunk id, pack id (32 raw bytes),
#: offset, stored length, raw length -- an :class:`IndexEntry`'s fields in order.
IndexRow = tuple[bytes, bytes, int, int, int]


def encode_index(codec: BlobCodec, entries: Iterable[IndexEntry]) -> bytes:
    """The bytes of one index object (entries are sorted; order of the input is free).

    Raises ValueError for a duplicate or malformed chunk id, a malformed pack id or a field
    out of range.
    """
    return encode_index_rows(
        codec, ((e.chunk_id, bytes(e.pack_id), e.offset, e.length, e.raw_length) for e in entries)
    )


def encode_index_rows(codec: BlobCodec, rows: Iterable[IndexRow]) -> bytes:
    """:func:`encode_index` of plain tuples (pack ids as ``bytes``): what a writer publishing
    hundreds of thousands of entries hands over without an object per entry."""
    items = sorted(rows, key=lambda r: r[0])
    packs = sorted({r[1] for r in items})
    if any(len(p) != C.OBJECT_ID_SIZE for p in packs):
        raise ValueError("pack ids must be 32 bytes")
    number = {p: i for i, p in enumerate(packs)}
    head = struct.pack(C.INDEX_COUNTS_STRUCT, len(packs), len(items))
    at = len(head) + C.OBJECT_ID_SIZE * len(packs)
    body = bytearray(at + _ENTRY.size * len(items))
    body[:at] = head + b"".join(packs)
    previous = b""
    for cid, pack, offset, length, raw_length in items:
        if len(cid) != C.CHUNK_ID_SIZE or cid == C.ZERO_ID:
            raise ValueError("bad chunk id in index entry")
        if cid == previous:
            raise ValueError(f"chunk {cid.hex()} appears twice in one index")
        previous = cid
        try:
            _ENTRY.pack_into(body, at, cid, number[pack], offset, length, raw_length)
        except struct.error as err:
            raise ValueError(f"index entry {cid.hex()} out of range") from err
        at += _ENTRY.size
    header = make_header(C.TYPE_INDEX, encrypted=codec.encrypted).encode()
    return header + codec.seal_body(bytes(body), header)


def decode_index(codec: BlobCodec, data: bytes | memoryview) -> list[IndexEntry]:
    """The entries of an index object, sorted by chunk id.

    Raises FormatError (bad magic, truncation, inconsistent counts, unsorted or duplicate
    ids, pack number out of range), UnsupportedVersionError (future version, unknown
    required feature), DamageError (MAC or checksum failure) and WrongKeyError (encrypted
    index, no key).
    """
    packs, entries = decode_index_packed(codec, data)
    return [
        IndexEntry(chunk_id, packs[pack_no], offset, length, raw_length)
        for chunk_id, pack_no, offset, length, raw_length in struct.iter_unpack(
            C.INDEX_ENTRY_STRUCT, entries
        )
    ]


def decode_index_packed(
    codec: BlobCodec, data: bytes | memoryview
) -> tuple[list[bytes], memoryview]:
    """:func:`decode_index` without an object per entry: the pack ids (32 raw bytes each,
    sorted) and the entries as they are in the body (``INDEX_ENTRY_STRUCT``, 32 bytes
    each, pack numbers counting from 0 in that list), checked the same way.  Loading a
    repository's index this way costs ~1 us an entry instead of ~8 (the per-entry objects)."""
    header = decode_header(data, C.TYPE_INDEX)
    mv = memoryview(data)
    plain = codec.open_body(
        mv[C.HEADER_SIZE :], bytes(mv[: C.HEADER_SIZE]), encrypted=header.encrypted, what="index"
    )
    if len(plain) < 8:
        raise FormatError("index: truncated body")
    npacks, nentries = struct.unpack_from(C.INDEX_COUNTS_STRUCT, plain, 0)
    table_end = 8 + npacks * C.OBJECT_ID_SIZE
    if len(plain) != table_end + nentries * C.INDEX_ENTRY_SIZE:
        raise FormatError(f"index: {len(plain)} bytes for {npacks} packs and {nentries} entries")
    packs = [plain[i : i + C.OBJECT_ID_SIZE] for i in range(8, table_end, C.OBJECT_ID_SIZE)]
    if any(a >= b for a, b in itertools.pairwise(packs)):
        raise FormatError("index: pack ids not sorted and unique")
    entries = memoryview(plain)[table_end:]
    previous = b""
    for chunk_id, pack_no, offset, _length, raw_length in struct.iter_unpack(
        C.INDEX_ENTRY_STRUCT, entries
    ):
        if chunk_id <= previous or chunk_id == C.ZERO_ID:
            raise FormatError(f"index: chunk id {chunk_id.hex()} out of order, repeated or zero")
        if pack_no >= npacks:
            raise FormatError(f"index: pack number {pack_no} of {npacks}")
        if offset < C.HEADER_SIZE or raw_length > C.MAX_CHUNK_SIZE:
            raise FormatError(f"index: entry {chunk_id.hex()} out of range")
        previous = chunk_id
    return packs, entries
