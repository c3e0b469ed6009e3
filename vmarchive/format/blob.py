"""Blob codec: how one chunk, and any structure body, becomes stored bytes and back.

Layer: format.  A blob (a stored chunk) is a zstd frame (content size written, no frame
checksum: the chunk id is the check); in an encrypted repository it is sealed with
AES-256-GCM and the AAD ``b"VMAR" "B" 0 version chunk_id`` so a blob cannot be moved to
another chunk id.  Structure bodies (pack trailer, index, manifest) are zstd frames *with*
the frame checksum, sealed with the object's header as AAD when encrypted.

A codec made with ``skip_incompressible`` stores a chunk whose samples zstd cannot shrink as
a frame of raw blocks (:func:`raw_frame`) instead of running the compressor over all of it:
zstd level 3 spent ~1 s of CPU per GiB of random bytes to emit raw blocks anyway.  Readers
cannot tell the difference.  Whether a chunk is judged so depends only on its bytes (and
libzstd), so equal chunks still encode alike.

:class:`BlobCodec` is thread-safe: zstd contexts are per thread, AES-GCM is stateless.
"""

from __future__ import annotations

import os
import struct
import threading

import zstandard

from vmarchive.errors import DamageError, FormatError, WrongKeyError
from vmarchive.format import constants as C
from vmarchive.format.chunkid import verify_chunk
from vmarchive.format.crypto import KeyMaterial, Rng, seal, unseal

__all__ = [
    "BlobCodec",
    "decode_blob",
    "decode_blob_view",
    "encode_blob",
    "raw_frame",
    "raw_frame_parts",
    "verify_chunk",
]

#: Bytes of each of the three samples :meth:`BlobCodec.looks_incompressible` tries.
INCOMPRESSIBLE_SAMPLE = 2048

_ZSTD_MAGIC = struct.pack("<I", 0xFD2FB528)
_RAW_BLOCK_MAX = 128 * 1024  # RFC 8878 Block_Maximum_Size


def raw_frame(data: bytes | memoryview) -> bytes:
    """One zstd frame (RFC 8878) holding ``data`` uncompressed, with its content size.

    Single_Segment_flag set (the window is the content), no checksum, no dictionary; the
    content in Raw_Blocks of at most 128 KiB, the last one flagged (an empty content is one
    empty last block).  Any zstd decoder reads it as ``data``.
    """
    return b"".join(raw_frame_parts(data))


def raw_frame_parts(data: bytes | memoryview) -> list[bytes | memoryview]:
    """:func:`raw_frame` of ``data`` as the pieces it joins, in order: the headers, and
    views of ``data`` for the blocks' contents (``data`` itself when it is ``bytes`` in
    one block; nothing of it copied), for a caller that writes the frame straight into
    its own buffer (a pack being built)."""
    mv = memoryview(data).cast("B")
    n = mv.nbytes
    if n <= 0xFF:
        fhd, fcs = 0x20, struct.pack("<B", n)
    elif n <= 0xFFFF + 256:
        fhd, fcs = 0x60, struct.pack("<H", n - 256)
    elif n <= 0xFFFFFFFF:
        fhd, fcs = 0xA0, struct.pack("<I", n)
    else:
        fhd, fcs = 0xE0, struct.pack("<Q", n)
    parts: list[bytes | memoryview] = [_ZSTD_MAGIC + bytes([fhd]) + fcs]
    at = 0
    while True:
        size = min(_RAW_BLOCK_MAX, n - at)
        last = at + size == n
        parts.append(((size << 3) | int(last)).to_bytes(3, "little"))  # Block_Type 0: Raw
        # the whole of an immutable ``data`` in one block: itself, not a view of it
        whole = at == 0 and last and type(data) is bytes
        parts.append(data if whole else mv[at : at + size])
        at += size
        if last:
            return parts


class BlobCodec:
    """Compression level, optional key material and the nonce source of a repository."""

    def __init__(
        self,
        level: int = C.DEFAULT_ZSTD_LEVEL,
        key: KeyMaterial | None = None,
        rng: Rng = os.urandom,
        *,
        skip_incompressible: bool = False,
    ) -> None:
        if not (C.MIN_ZSTD_LEVEL <= level <= C.MAX_ZSTD_LEVEL):
            raise ValueError(f"zstd level {level} outside {C.MIN_ZSTD_LEVEL}..{C.MAX_ZSTD_LEVEL}")
        self.level = level
        self.key = key
        self.rng = rng
        self.skip_incompressible = skip_incompressible
        self._local = threading.local()

    def looks_incompressible(self, data: bytes | memoryview) -> bool:
        """Whether zstd level 1 cannot shrink any of three samples of ``data`` (its start,
        middle and end, :data:`INCOMPRESSIBLE_SAMPLE` bytes each).  Chunks smaller than
        four samples are never judged so.  Costs ~1 % of compressing the chunk."""
        mv = memoryview(data).cast("B")
        n = mv.nbytes
        size = INCOMPRESSIBLE_SAMPLE
        if n < 4 * size:
            return False
        probe: zstandard.ZstdCompressor | None = getattr(self._local, "probe", None)
        if probe is None:
            probe = self._local.probe = zstandard.ZstdCompressor(
                level=1, write_checksum=False, write_content_size=False, write_dict_id=False
            )
        for at in (0, (n - size) // 2, n - size):
            if len(probe.compress(mv[at : at + size])) < size:
                return False
        return True

    def stores_raw(self, data: bytes | memoryview) -> bool:
        """Whether :meth:`compress_blob` stores ``data`` as raw blocks:
        ``skip_incompressible`` and the chunk looks incompressible."""
        return self.skip_incompressible and self.looks_incompressible(data)

    def compress_blob(self, data: bytes | memoryview, *, raw_blocks: bool | None = None) -> bytes:
        """The zstd frame of one chunk: raw blocks when :meth:`stores_raw`, else compressed
        at the level.  ``raw_blocks``: the caller's answer of :meth:`stores_raw` for
        ``data`` (not asked again)."""
        if raw_blocks is None:
            raw_blocks = self.stores_raw(data)
        if raw_blocks:
            return raw_frame(data)
        return self.compress(data, checksum=False)

    @property
    def encrypted(self) -> bool:
        return self.key is not None

    def _compressor(self, checksum: bool) -> zstandard.ZstdCompressor:
        attr = "cc" if checksum else "cb"
        c: zstandard.ZstdCompressor | None = getattr(self._local, attr, None)
        if c is None:
            # Every parameter explicit so that output depends only on level and libzstd.
            c = zstandard.ZstdCompressor(
                level=self.level,
                write_checksum=checksum,
                write_content_size=True,
                write_dict_id=False,
                threads=0,
            )
            setattr(self._local, attr, c)
        return c

    def compress(self, data: bytes | memoryview, *, checksum: bool) -> bytes:
        out: bytes = self._compressor(checksum).compress(data)
        return out

    def nonce(self) -> bytes:
        n = self.rng(C.NONCE_SIZE)
        if len(n) != C.NONCE_SIZE:
            raise ValueError("rng returned the wrong number of bytes")
        return n

    # -- structure bodies -------------------------------------------------------------------

    def seal_body(self, plaintext: bytes, aad: bytes) -> bytes:
        """zstd (with frame checksum) then, when encrypted, AES-GCM with ``aad``."""
        frame = self.compress(plaintext, checksum=True)
        if self.key is None:
            return frame
        return seal(self.key.data_key, frame, aad, self.nonce())

    def open_body(
        self, body: bytes | memoryview, aad: bytes, *, encrypted: bool, what: str
    ) -> bytes:
        """Inverse of :meth:`seal_body`.

        ``encrypted`` is what the object's header says.  Raises DamageError (MAC failure,
        checksum failure, plaintext object in an encrypted repository), WrongKeyError
        (encrypted object but no key) and FormatError (not a zstd frame, too large).
        """
        if self.key is not None and not encrypted:
            raise DamageError(f"{what}: unencrypted object in an encrypted repository")
        if self.key is None and encrypted:
            raise WrongKeyError(f"{what}: object is encrypted and no key was given")
        if self.key is not None:
            frame: bytes | memoryview = unseal(self.key.data_key, body, aad)
        else:
            frame = body
        return decompress(frame, None, what=what)


_dctx = threading.local()  # one decompression context per thread


def decompress(frame: bytes | memoryview, expected: int | None, *, what: str) -> bytes:
    """Decompress exactly one zstd frame whose header states its content size.

    ``expected``: the exact decompressed size required (None: any up to MAX_BODY_SIZE).
    Raises FormatError when the bytes are not one whole frame (not zstd, no or an excessive
    content size, truncated, trailing bytes) and DamageError when the content is corrupt
    (bad block, frame checksum mismatch) or its size differs from ``expected``.
    """
    try:
        size = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as e:
        raise FormatError(f"{what}: not a zstd frame") from e
    if size < 0:
        raise FormatError(f"{what}: zstd frame states no content size")
    if expected is not None and size != expected:
        raise DamageError(f"{what}: frame holds {size} bytes, expected {expected}")
    if size > C.MAX_BODY_SIZE and expected is None:
        raise FormatError(f"{what}: frame claims {size} bytes")
    dctx: zstandard.ZstdDecompressor | None = getattr(_dctx, "d", None)
    if dctx is None:
        dctx = _dctx.d = zstandard.ZstdDecompressor()
    if size > 0:
        # One call that refuses trailing bytes; five times faster per 64 KiB chunk than a
        # decompression object.  Anything it rejects is decoded again below only to say
        # what is wrong (truncated, trailing bytes, corrupt).  (Not for empty frames:
        # zstandard < 0.22 let bytes after one pass.)
        try:
            fast: bytes = dctx.decompress(frame, allow_extra_data=False)
        except zstandard.ZstdError:
            pass
        else:
            if len(fast) != size:
                raise DamageError(f"{what}: decompressed {len(fast)} bytes, frame says {size}")
            return fast
    dobj = dctx.decompressobj()
    try:
        out: bytes = dobj.decompress(frame)
    except zstandard.ZstdError as e:
        raise DamageError(f"{what}: corrupt zstd frame ({e})") from e
    if not dobj.eof:
        raise FormatError(f"{what}: truncated zstd frame")
    if dobj.unused_data:
        raise FormatError(f"{what}: {len(dobj.unused_data)} bytes after the zstd frame")
    if len(out) != size:
        raise DamageError(f"{what}: decompressed {len(out)} bytes, frame says {size}")
    return out


#: Frame_Header_Descriptor -> Frame_Content_Size bytes, for the headers raw_frame writes
#: (single segment, no checksum, no dictionary).
_RAW_FCS_BYTES = {0x20: 1, 0x60: 2, 0xA0: 4, 0xE0: 8}


def decompress_view(frame: bytes | memoryview, expected: int, *, what: str) -> bytes | memoryview:
    """:func:`decompress`, except that a frame shaped as :func:`raw_frame` writes it for
    at most one block (header, then one last Raw_Block holding the whole content: chunks
    up to 128 KiB) comes back as a read-only view of its content in ``frame``.

    Such a block is the content verbatim (RFC 8878), so the view is what zstd would
    return, without its copy: incompressible chunks are most of a first capture's RAM,
    and each is read back for the round trip.  Any other frame goes to zstd.
    """
    mv = memoryview(frame).cast("B")
    if len(mv) >= 5 and expected <= _RAW_BLOCK_MAX and mv[:4] == _ZSTD_MAGIC:
        fcs = _RAW_FCS_BYTES.get(mv[4])
        at = 5 + (fcs or 0)
        if (
            fcs is not None
            and len(mv) == at + 3 + expected
            and int.from_bytes(mv[5:at], "little") + (256 if fcs == 2 else 0) == expected
            and int.from_bytes(mv[at : at + 3], "little") == (expected << 3) | 1
        ):
            return mv[at + 3 :].toreadonly()
    return decompress(frame, expected, what=what)


def blob_aad(chunk_id: bytes) -> bytes:
    """The AAD of an encrypted blob (24 bytes)."""
    return struct.pack(C.BLOB_AAD_STRUCT, C.MAGIC, C.TYPE_BLOB, 0, C.WRITE_VERSION, chunk_id)


def encode_blob(
    codec: BlobCodec,
    chunk_id: bytes,
    data: bytes | memoryview,
    *,
    raw_blocks: bool | None = None,
) -> bytes:
    """The stored bytes of one chunk (never call this for an all-zero chunk).
    ``raw_blocks``: as for :meth:`BlobCodec.compress_blob`.

    Raises ValueError for a chunk id that is not 16 bytes.
    """
    if len(chunk_id) != C.CHUNK_ID_SIZE:
        raise ValueError("chunk id must be 16 bytes")
    frame = codec.compress_blob(data, raw_blocks=raw_blocks)
    if codec.key is None:
        return frame
    return seal(codec.key.data_key, frame, blob_aad(chunk_id), codec.nonce())


def decode_blob(
    codec: BlobCodec, chunk_id: bytes, encoded: bytes | memoryview, raw_length: int
) -> bytes:
    """The chunk bytes of a stored blob, ``raw_length`` long.

    Does not recompute the id (use :func:`verify_chunk` with the repository's id function).
    Raises DamageError (MAC failure, corrupt frame, wrong length) and FormatError (not a
    zstd frame).
    """
    what, frame = _opened(codec, chunk_id, encoded, raw_length)
    return decompress(frame, raw_length, what=what)


def decode_blob_view(
    codec: BlobCodec, chunk_id: bytes, encoded: bytes | memoryview, raw_length: int
) -> bytes | memoryview:
    """:func:`decode_blob`, but a chunk stored as one raw block comes back as a read-only
    view of the frame (:func:`decompress_view`): no copy, and the view keeps the buffer
    it was read in alive."""
    what, frame = _opened(codec, chunk_id, encoded, raw_length)
    return decompress_view(frame, raw_length, what=what)


def _opened(
    codec: BlobCodec, chunk_id: bytes, encoded: bytes | memoryview, raw_length: int
) -> tuple[str, bytes | memoryview]:
    """The blob's zstd frame (decrypted when the codec has a key) and its name."""
    what = f"blob {chunk_id.hex()}"
    if codec.key is not None:
        frame: bytes | memoryview = unseal(codec.key.data_key, encoded, blob_aad(chunk_id))
    else:
        frame = encoded
    if raw_length < 0 or raw_length > C.MAX_CHUNK_SIZE:
        raise FormatError(f"{what}: raw length {raw_length} out of range")
    return what, frame
