"""libvirt's QEMU save image: the header and XML that precede a migration stream (format layer).

What it is for: a restore hands libvirt (``virDomainRestoreFlags``) a file that starts
with this prefix and continues with a QEMU migration stream; ``export-save`` writes the
same bytes to a file a user restores with plain ``virsh restore``.  libvirt 9.0 reads the
prefix, starts QEMU with ``-incoming`` and passes it the file descriptor positioned at the
stream: the stream part is only ever read sequentially, so it may come from a FIFO.

Layout (libvirt 9.0, ``qemu_saveimage.h``; integers in the host's byte order, which is
little-endian on every host we run on; libvirt itself byte-swaps an image whose version
reads as a swapped 2)::

    magic          16 bytes  "LibvirtQemudSave"  ("LibvirtQemudPart" while being written)
    version        u32       2 (version 1 had no ``compressed`` semantics we support)
    data_len       u32       bytes after the header up to the stream
    was_running    u32       1: resume after restore, 0: stay paused
    compressed     u32       0 = raw stream (the only value written or accepted here)
    cookie_offset  u32       offset of the cookie from the start of the XML; 0 = none
    unused         14 x u32  zero
                   -------- 16 + 5*4 + 14*4 = 92 bytes
    data           data_len bytes: domain XML, NUL, [cookie XML, NUL], zero padding
    stream         the QEMU migration stream, at offset 92 + data_len

The cookie is libvirt's ``<cookie>`` document; when present its ``<cpu>`` must be the live
CPU definition of the saved domain.  libvirt pads ``data`` so that the XML may later be
replaced in place by a longer one (``virsh save-image-define``); we pad to
:data:`DEFAULT_PADDING` bytes of slack and align the stream to 4 KiB.

Layer: ``vmarchive.format`` -- pure code, no I/O beyond the file objects handed in.
"""

from __future__ import annotations

import struct
from typing import Protocol

import msgspec

from vmarchive.errors import FormatError, UnsupportedVersionError

MAGIC = b"LibvirtQemudSave"
PARTIAL_MAGIC = b"LibvirtQemudPart"
VERSION = 2
UNUSED_WORDS = 14
#: magic, then version, data_len, was_running, compressed, cookie_offset, then unused words.
HEADER_STRUCT = struct.Struct(f"<16s5I{UNUSED_WORDS}I")
HEADER_SIZE = HEADER_STRUCT.size
assert HEADER_SIZE == 16 + 5 * 4 + UNUSED_WORDS * 4 == 92

COMPRESSED_RAW = 0
#: Slack left after the XML and cookie (libvirt leaves 64 KiB too).
DEFAULT_PADDING = 64 * 1024
#: The stream starts on a multiple of this (page-aligned reads for QEMU).
STREAM_ALIGN = 4096
#: A sanity bound: libvirt refuses more than 10 MiB of XML as well.
MAX_DATA_LEN = 16 << 20


class SaveHeader(msgspec.Struct, frozen=True):
    """The fixed 92-byte header."""

    data_len: int
    was_running: bool
    cookie_offset: int = 0
    compressed: int = COMPRESSED_RAW
    version: int = VERSION

    def encode(self) -> bytes:
        return HEADER_STRUCT.pack(
            MAGIC,
            self.version,
            self.data_len,
            int(self.was_running),
            self.compressed,
            self.cookie_offset,
            *([0] * UNUSED_WORDS),
        )

    @property
    def stream_offset(self) -> int:
        return HEADER_SIZE + self.data_len


def decode_header(data: bytes | memoryview) -> SaveHeader:
    """Decode and check the header at the start of ``data``.

    Raises:
        FormatError: too short, bad or partial magic, inconsistent lengths.
        UnsupportedVersionError: another version, or a compressed stream.
    """
    if len(data) < HEADER_SIZE:
        raise FormatError(f"save image: truncated header ({len(data)} bytes)")
    magic, version, data_len, running, compressed, cookie, *_unused = HEADER_STRUCT.unpack_from(
        data, 0
    )
    if magic == PARTIAL_MAGIC:
        raise FormatError("save image is incomplete (libvirt never finished writing it)")
    if magic != MAGIC:
        raise FormatError(f"not a libvirt save image (magic {bytes(magic)!r})")
    if version != VERSION:
        raise UnsupportedVersionError(f"save image version {version} (only {VERSION} is read)")
    if compressed != COMPRESSED_RAW:
        raise UnsupportedVersionError(f"save image stream is compressed (format {compressed})")
    if running not in (0, 1):
        raise FormatError(f"save image: was_running is {running}")
    if data_len > MAX_DATA_LEN or (cookie != 0 and cookie >= data_len):
        raise FormatError(f"save image: data_len {data_len} / cookie offset {cookie} invalid")
    return SaveHeader(data_len, bool(running), cookie, compressed, version)


def _padded_len(used: int, padding: int) -> int:
    end = HEADER_SIZE + used + padding
    return end + (-end % STREAM_ALIGN) - HEADER_SIZE


def encode_prefix(
    xml: str, *, running: bool, cookie: str | None = None, padding: int = DEFAULT_PADDING
) -> bytes:
    """Header + XML + NUL [+ cookie + NUL] + padding: everything before the stream.

    Raises FormatError if the XML or cookie contains a NUL or the result is too large.
    """
    x = xml.encode("utf-8")
    c = cookie.encode("utf-8") if cookie is not None else b""
    if b"\0" in x or b"\0" in c:
        raise FormatError("save image: XML must not contain NUL bytes")
    body = x + b"\0"
    cookie_offset = 0
    if cookie is not None:
        cookie_offset = len(body)
        body += c + b"\0"
    data_len = _padded_len(len(body), padding)
    if data_len > MAX_DATA_LEN:
        raise FormatError(f"save image: {data_len} bytes of XML exceed the limit")
    hdr = SaveHeader(data_len, running, cookie_offset)
    return hdr.encode() + body + bytes(data_len - len(body))


class SavePrefix(msgspec.Struct, frozen=True):
    """A decoded prefix: the header, the domain XML and the cookie (None when absent)."""

    header: SaveHeader
    xml: str
    cookie: str | None


def _cstring(data: bytes, start: int, what: str) -> str:
    end = data.find(b"\0", start)
    if end < 0:
        raise FormatError(f"save image: {what} is not NUL-terminated")
    try:
        return data[start:end].decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"save image: {what} is not UTF-8") from e


def decode_prefix(data: bytes | memoryview) -> SavePrefix:
    """Decode header, XML and cookie from the first ``92 + data_len`` bytes of an image.

    Raises FormatError / UnsupportedVersionError (see :func:`decode_header`).
    """
    hdr = decode_header(data)
    if len(data) < hdr.stream_offset:
        raise FormatError(
            f"save image: truncated XML ({len(data) - HEADER_SIZE} of {hdr.data_len} bytes)"
        )
    body = bytes(data[HEADER_SIZE : hdr.stream_offset])
    xml = _cstring(body, 0, "domain XML")
    cookie = None
    if hdr.cookie_offset:
        if hdr.cookie_offset < len(xml.encode()) + 1:
            raise FormatError("save image: the cookie overlaps the domain XML")
        cookie = _cstring(body, hdr.cookie_offset, "cookie")
    return SavePrefix(hdr, xml, cookie)


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


def read_prefix(f: _Readable) -> SavePrefix:
    """Read and decode the prefix from a binary file object positioned at its start; the
    file is left positioned at the stream.  Raises like :func:`decode_prefix`."""
    head = f.read(HEADER_SIZE)
    hdr = decode_header(head)
    rest = f.read(hdr.data_len)
    return decode_prefix(head + rest)
