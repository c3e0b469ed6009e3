"""Pack files: many blobs in one object, with a trailer that lists them.

Layer: format.  A pack is ``header (16) || blob* || trailer body || footer (28)`` and is
written whole, then published under ``data/<2 hex>/<pack id>`` where the pack id is the
SHA-256 of the pack's tail (trailer body and footer) when its header carries
``FEATURE_PACK_TAIL_ID``, else of all its bytes (:func:`pack_id`).  The tail names every
blob by chunk id, offset and length, and each blob is checked by its chunk id when read, so
hashing the blobs again bought nothing but CPU.  The footer (a copy of the header, the
trailer offset and the trailer length, which are the last four bytes) lets a reader
range-GET only the tail: fetch :data:`~vmarchive.format.constants.PACK_TAIL_FIRST_FETCH`
bytes (or the whole pack when smaller), call :func:`pack_tail_size` and fetch more if it
says so, then :func:`decode_pack_trailer`.  The trailer alone is enough to rebuild the index.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from collections.abc import Sequence

import msgspec

from vmarchive.errors import FormatError
from vmarchive.format import constants as C
from vmarchive.format.blob import BlobCodec
from vmarchive.format.header import Header, decode_header, make_header, object_id


class PackEntry(msgspec.Struct, frozen=True):
    """Where one blob sits in its pack; ``length`` is stored bytes, ``raw_length`` chunk bytes."""

    chunk_id: bytes
    offset: int
    length: int
    raw_length: int


class PackBuilder:
    """Collects encoded blobs and produces the bytes of one pack, built in place.

    Each blob is copied once, into one page-aligned anonymous mapping that becomes the
    pack: :meth:`finish` appends the trailer and footer there and returns a view of it,
    so publishing the pack copies nothing more (a local backend writes it with O_DIRECT
    straight from the mapping).  :meth:`blob` is a view of a blob already added: the
    writer serves reads of unpublished chunks from it.  ``capacity``: the bytes expected
    (pages are touched only as they are written, but the whole mapping is charged to the
    kernel's commit limit: not a generous guess); when it runs out the pack moves to a
    mapping twice as large, and views taken before keep the old one alive.  ``mapping``:
    one to build in instead of a new one (from :meth:`release` of an earlier builder):
    touching fresh pages cost more than the copies this saves (4096 page faults per
    16 MiB, ~12 ms here).

    Not thread-safe: one builder per writer thread, or a lock around it.
    """

    def __init__(
        self,
        codec: BlobCodec,
        *,
        tail_id: bool = False,
        capacity: int = 1 << 20,
        mapping: mmap.mmap | None = None,
    ) -> None:
        """``tail_id``: name the pack by its tail (``FEATURE_PACK_TAIL_ID``), as the config of
        the repository says; without it, by all its bytes (repositories made before it)."""
        self.codec = codec
        required = C.FEATURE_PACK_TAIL_ID if tail_id else 0
        self._header = make_header(
            C.TYPE_PACK, encrypted=codec.encrypted, required=required
        ).encode()
        size = _mapping_size(max(capacity, C.HEADER_SIZE))
        self._map = mapping if mapping is not None and len(mapping) >= size else new_mapping(size)
        self._view = memoryview(self._map)
        self._addr = _address(self._map)
        self._view[: C.HEADER_SIZE] = self._header
        self._size = C.HEADER_SIZE
        self._entries: list[PackEntry] = []
        self._ids: set[bytes] = set()
        self._finished = False

    @property
    def size(self) -> int:
        """Bytes so far (header and blobs; the trailer adds about 28 bytes per entry)."""
        return self._size

    @property
    def count(self) -> int:
        return len(self._entries)

    @property
    def entries(self) -> list[PackEntry]:
        return list(self._entries)

    def __contains__(self, chunk_id: bytes) -> bool:
        return chunk_id in self._ids

    def add(self, chunk_id: bytes, encoded_blob: bytes | memoryview, raw_length: int) -> PackEntry:
        """Append one blob (from :func:`~vmarchive.format.blob.encode_blob`).

        Raises ValueError for a bad or duplicate chunk id, the zero id, a finished builder,
        or a pack that would pass 4 GiB.
        """
        return self.add_parts(chunk_id, (encoded_blob,), raw_length)

    def add_parts(
        self, chunk_id: bytes, parts: Sequence[bytes | memoryview], raw_length: int
    ) -> PackEntry:
        """:meth:`add` of the blob that ``parts`` joined would be (e.g.
        :func:`~vmarchive.format.blob.raw_frame_parts`), written into the pack piece by
        piece.  Raises as :meth:`add`."""
        if self._finished:
            raise ValueError("pack already finished")
        if len(chunk_id) != C.CHUNK_ID_SIZE or chunk_id == C.ZERO_ID:
            raise ValueError("bad chunk id for a pack entry")
        if chunk_id in self._ids:
            raise ValueError(f"chunk {chunk_id.hex()} is already in this pack")
        if not (0 <= raw_length <= C.MAX_CHUNK_SIZE):
            raise ValueError("raw length out of range")
        views = [memoryview(p).cast("B") for p in parts]
        length = sum(v.nbytes for v in views)
        if self._size + length + C.PACK_ENTRY_SIZE * (self.count + 1) > C.MAX_PACK_SIZE // 2:
            raise ValueError("pack too large")
        self._reserve(self._size + length)
        at = self._size
        for p, v in zip(parts, views, strict=True):
            n = v.nbytes
            if n < _OFF_GIL:
                self._view[at : at + n] = v
            elif type(p) is bytes:
                _memmove(self._addr + at, p, n)
            elif not v.readonly:  # a writable buffer: its address, through a ctypes view
                _memmove(self._addr + at, (ctypes.c_char * n).from_buffer(v), n)
            else:
                self._view[at : at + n] = v
            at += n
        entry = PackEntry(chunk_id, self._size, length, raw_length)
        self._size = at
        self._entries.append(entry)
        self._ids.add(chunk_id)
        return entry

    def blob(self, entry: PackEntry) -> memoryview:
        """The stored bytes of ``entry`` (added to this builder), as a read-only view."""
        return self._view[entry.offset : entry.offset + entry.length].toreadonly()

    def release(self) -> mmap.mmap | None:
        """After :meth:`finish`, once the pack is published: the mapping, for another
        builder, when no view of it (the pack, a blob) is still held anywhere; else None
        (it is then freed with the last view)."""
        if not self._finished:
            raise ValueError("pack not finished")
        mapping = self._map
        try:
            self._view.release()
            mapping.resize(len(mapping))  # refused while any buffer of it is exported
        except BufferError:
            return None
        return mapping

    def _reserve(self, need: int) -> None:
        if need <= len(self._map):
            return
        bigger = new_mapping(_mapping_size(max(need, 2 * len(self._map))))
        view = memoryview(bigger)
        view[: self._size] = self._view[: self._size]
        self._map, self._view = bigger, view  # views of the old mapping keep it alive
        self._addr = _address(bigger)

    def finish(self) -> tuple[str, memoryview]:
        """The pack id (see :func:`pack_id`) and the pack bytes (a read-only view of the
        builder's mapping).  Raises ValueError twice."""
        if self._finished:
            raise ValueError("pack already finished")
        self._finished = True
        plain = bytearray(struct.pack("<I", len(self._entries)))
        for e in self._entries:
            plain += struct.pack(C.PACK_ENTRY_STRUCT, e.chunk_id, e.offset, e.length, e.raw_length)
        trailer_offset = self._size
        aad = self._header + struct.pack("<Q", trailer_offset)
        body = self.codec.seal_body(bytes(plain), aad)
        footer = aad + struct.pack("<I", len(body))
        end = trailer_offset + len(body) + len(footer)
        self._reserve(end)
        self._view[trailer_offset : trailer_offset + len(body)] = body
        self._view[trailer_offset + len(body) : end] = footer
        data = self._view[:end].toreadonly()
        return pack_id(data), data


#: Pieces at least this large (bytes, or writable buffers) are copied by memmove through
#: ctypes, which releases the GIL for the call: the copy, and the page faults of a
#: mapping's first use, then run beside the other threads.
_OFF_GIL = 16 << 10
_memmove = ctypes.memmove


def _address(mapping: mmap.mmap) -> int:
    """Where ``mapping``'s bytes start (the ctypes view taken for it is released at once,
    so the mapping has no export left)."""
    first = ctypes.c_char.from_buffer(mapping)
    try:
        return ctypes.addressof(first)
    finally:
        del first


def new_mapping(size: int) -> mmap.mmap:
    """``size`` bytes of fresh private anonymous memory to build in.

    Private, not ``mmap.mmap(-1, size)``'s shared mapping: a shared anonymous mapping is
    shmem, whose pages cost more to fault in.  Copying 32 MiB into a fresh mapping took
    16-18 ms private against 21-25 ms shared here; an incremental capture writes its new
    chunks into fresh mappings (157 disk chunks, 40 MiB, when 1 % of a 1 GiB disk was
    rewritten).
    """
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def _mapping_size(n: int) -> int:
    """``n`` rounded up to whole pages (what a mapping holds)."""
    return -(-n // mmap.PAGESIZE) * mmap.PAGESIZE


def pack_id(data: bytes | memoryview) -> str:
    """The id a whole pack is named by: SHA-256 hex of its tail (from the trailer offset to
    the end) when its header has ``FEATURE_PACK_TAIL_ID``, else of all its bytes.

    Raises FormatError / UnsupportedVersionError when the footer is not one this release
    reads or its trailer offset lies outside the pack.
    """
    header, trailer_offset, _ = _footer(data)
    if not header.required & C.FEATURE_PACK_TAIL_ID:
        return object_id(data)
    if trailer_offset > len(data) - C.PACK_FOOTER_SIZE:
        raise FormatError(f"pack: trailer offset {trailer_offset} lies outside the pack")
    return object_id(memoryview(data)[trailer_offset:])


def _footer(tail: bytes | memoryview) -> tuple[Header, int, int]:
    if len(tail) < C.PACK_FOOTER_SIZE:
        raise FormatError(
            f"pack: truncated ({len(tail)} tail bytes, footer is {C.PACK_FOOTER_SIZE})"
        )
    mv = memoryview(tail)
    footer = mv[len(mv) - C.PACK_FOOTER_SIZE :]
    header = decode_header(footer, C.TYPE_PACK)
    trailer_offset, trailer_length = struct.unpack_from(C.PACK_FOOTER_STRUCT, footer, C.HEADER_SIZE)
    if trailer_offset < C.HEADER_SIZE or trailer_length > C.MAX_PACK_SIZE:
        raise FormatError("pack: footer fields out of range")
    return header, trailer_offset, trailer_length


def pack_tail_size(tail: bytes | memoryview) -> int:
    """How many bytes at the end of the pack :func:`decode_pack_trailer` needs.

    ``tail``: at least the last 28 bytes of the pack.  Raises FormatError /
    UnsupportedVersionError when the footer is not a pack footer this release reads.
    """
    _, _, trailer_length = _footer(tail)
    return trailer_length + C.PACK_FOOTER_SIZE


def decode_pack_trailer(
    codec: BlobCodec, tail: bytes | memoryview, pack_length: int | None = None
) -> list[PackEntry]:
    """The entries of a pack, from its last :func:`pack_tail_size` bytes or the whole pack.

    ``pack_length``: the pack's total size when known (checked against the footer).
    Raises FormatError (bad magic, truncation, inconsistent entries),
    UnsupportedVersionError (future version, unknown required feature), DamageError
    (MAC or checksum failure) and WrongKeyError (encrypted pack, no key).
    """
    header, trailer_offset, trailer_length = _footer(tail)
    need = trailer_length + C.PACK_FOOTER_SIZE
    if len(tail) < need:
        raise FormatError(f"pack: truncated (have {len(tail)} tail bytes, trailer needs {need})")
    end = trailer_offset + need
    if pack_length is not None and pack_length != end:
        raise FormatError(f"pack: {pack_length} bytes but the footer says {end}")
    mv = memoryview(tail)
    footer_at = len(mv) - C.PACK_FOOTER_SIZE
    aad = bytes(mv[footer_at : footer_at + C.PACK_TRAILER_AAD_SIZE])
    if len(mv) == end and bytes(mv[: C.HEADER_SIZE]) != aad[: C.HEADER_SIZE]:
        # Handed the whole pack: its leading header must be the footer's copy.
        raise FormatError("pack: header and footer disagree")
    plain = codec.open_body(
        mv[footer_at - trailer_length : footer_at],
        aad,
        encrypted=header.encrypted,
        what="pack trailer",
    )
    return _parse_entries(plain, trailer_offset)


def _parse_entries(plain: bytes, trailer_offset: int) -> list[PackEntry]:
    if len(plain) < 4:
        raise FormatError("pack trailer: truncated")
    (count,) = struct.unpack_from("<I", plain, 0)
    if len(plain) != 4 + count * C.PACK_ENTRY_SIZE:
        raise FormatError(f"pack trailer: {len(plain)} bytes for {count} entries")
    entries: list[PackEntry] = []
    seen: set[bytes] = set()
    position = C.HEADER_SIZE
    for chunk_id, offset, length, raw_length in struct.iter_unpack(C.PACK_ENTRY_STRUCT, plain[4:]):
        if chunk_id == C.ZERO_ID or chunk_id in seen:
            raise FormatError(f"pack trailer: zero or duplicate chunk id {chunk_id.hex()}")
        if offset != position or offset + length > trailer_offset or raw_length > C.MAX_CHUNK_SIZE:
            raise FormatError(f"pack trailer: entry {chunk_id.hex()} out of place")
        position = offset + length
        seen.add(chunk_id)
        entries.append(PackEntry(chunk_id, offset, length, raw_length))
    if position != trailer_offset:
        raise FormatError("pack trailer: blobs do not end where the trailer begins")
    return entries


def read_blob(pack: bytes | memoryview, entry: PackEntry) -> bytes:
    """The stored bytes of ``entry`` out of a whole pack.  Raises FormatError when truncated."""
    if entry.offset + entry.length > len(pack):
        raise FormatError(f"pack: blob {entry.chunk_id.hex()} lies past the end of the pack")
    return bytes(memoryview(pack)[entry.offset : entry.offset + entry.length])
