"""Manifests (``archives/<archive id>``): one archive's metadata and named streams.

Layer: format.  Bytes: the 16-byte header (type "M") then a sealed body (zstd with frame
checksum; AES-256-GCM with the header as AAD when encrypted).  The plaintext body is::

    u32 LE  J = length of the JSON document
    J bytes canonical JSON: {"metadata": {...}, "streams": [{"attrs", "chunk_size",
            "kind", "name", "size", "slots"}, ...]}
    the slot tables of all streams, in stream order, 16 bytes per slot (ZERO_ID = hole)

Binary tables keep a 200 GB disk (800 000 slots of 256 KiB) at 12.8 MB before compression
rather than tens of MB of JSON.  The archive id is the SHA-256 of the manifest bytes.
"""

from __future__ import annotations

import re
import struct
from typing import Any

import msgspec

from vmarchive.errors import FormatError
from vmarchive.format import constants as C
from vmarchive.format.blob import BlobCodec
from vmarchive.format.config import canonical_json, parse_json
from vmarchive.format.header import decode_header, make_header, object_id

# Path-like names: components of safe characters separated by single slashes.
_COMPONENT = r"[A-Za-z0-9_+:@=,~#-][A-Za-z0-9._+:@=,~#-]*"
_NAME_RE = re.compile(rf"{_COMPONENT}(/{_COMPONENT})*")


def is_safe_stream_name(name: str) -> bool:
    """True when ``name`` may name a stream (and may be used as a relative path on restore).

    1-255 ASCII characters from ``A-Z a-z 0-9 . _ + : @ = , ~ # -`` and ``/``; no empty
    component, no component starting with a dot (so no ``.`` or ``..``), no leading or
    trailing slash.
    """
    return len(name) <= C.MAX_STREAM_NAME and _NAME_RE.fullmatch(name) is not None


def slot_count(size: int, chunk_size: int) -> int:
    """Slots of a stream: ceil(size / chunk_size)."""
    return -(-size // chunk_size)


class StreamEntry(msgspec.Struct, frozen=True):
    """One named stream; ``table`` holds one 16-byte chunk id per slot (ZERO_ID = hole)."""

    name: str
    kind: str
    size: int
    chunk_size: int
    attrs: dict[str, Any] = msgspec.field(default_factory=dict)
    table: bytes = b""

    @property
    def slots(self) -> int:
        return slot_count(self.size, self.chunk_size)

    def chunk_id(self, slot: int) -> bytes:
        """The id in ``slot`` (ZERO_ID for a hole).  Raises IndexError out of range."""
        if not 0 <= slot < self.slots:
            raise IndexError(slot)
        return self.table[slot * C.CHUNK_ID_SIZE : (slot + 1) * C.CHUNK_ID_SIZE]

    def slot_length(self, slot: int) -> int:
        """Bytes covered by ``slot`` (the last slot may be short)."""
        return min(self.chunk_size, self.size - slot * self.chunk_size)


class Manifest(msgspec.Struct, frozen=True):
    """An archive: free-form metadata (with required keys) and ordered streams."""

    metadata: dict[str, Any]
    streams: list[StreamEntry]

    def stream(self, name: str) -> StreamEntry:
        """The stream called ``name``.  Raises KeyError."""
        for s in self.streams:
            if s.name == name:
                return s
        raise KeyError(name)


def validate_manifest(m: Manifest) -> None:
    """Raise FormatError unless ``m`` obeys the rules of FORMAT.md "Manifests"."""
    if not isinstance(m.metadata, dict):
        raise FormatError("manifest: metadata is not an object")
    for key in C.REQUIRED_METADATA_KEYS:
        if not isinstance(m.metadata.get(key), str):
            raise FormatError(f"manifest: metadata lacks the string {key!r}")
    names: set[str] = set()
    for s in m.streams:
        if not isinstance(s.name, str) or not is_safe_stream_name(s.name):
            raise FormatError(f"manifest: unsafe stream name {s.name!r}")
        if s.name in names:
            raise FormatError(f"manifest: stream {s.name!r} appears twice")
        names.add(s.name)
        if s.kind not in C.STREAM_KINDS:
            raise FormatError(f"manifest: stream {s.name!r} has unknown kind {s.kind!r}")
        for label, v in (("size", s.size), ("chunk_size", s.chunk_size)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise FormatError(f"manifest: stream {s.name!r} {label} is not an integer")
        if not (1 <= s.chunk_size <= C.MAX_CHUNK_SIZE) or not (0 <= s.size < 1 << 63):
            raise FormatError(f"manifest: stream {s.name!r} size or chunk size out of range")
        if not isinstance(s.attrs, dict):
            raise FormatError(f"manifest: stream {s.name!r} attrs is not an object")
        if len(s.table) != C.CHUNK_ID_SIZE * s.slots:
            raise FormatError(
                f"manifest: stream {s.name!r} table has {len(s.table)} bytes for {s.slots} slots"
            )


def encode_manifest(codec: BlobCodec, m: Manifest) -> bytes:
    """The bytes of a manifest object.

    Raises FormatError when ``m`` breaks a rule (unsafe or duplicate name, unknown kind,
    table length, missing metadata key) and ValueError when metadata or attrs are not JSON.
    """
    validate_manifest(m)
    doc = {
        "metadata": m.metadata,
        "streams": [
            {
                "attrs": s.attrs,
                "chunk_size": s.chunk_size,
                "kind": s.kind,
                "name": s.name,
                "size": s.size,
                "slots": s.slots,
            }
            for s in m.streams
        ],
    }
    js = canonical_json(doc)
    body = b"".join(
        [struct.pack(C.MANIFEST_JSON_LENGTH_STRUCT, len(js)), js, *(s.table for s in m.streams)]
    )
    header = make_header(C.TYPE_MANIFEST, encrypted=codec.encrypted).encode()
    return header + codec.seal_body(body, header)


def _int(d: dict[str, Any], key: str, where: str) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise FormatError(f"manifest: {where} field {key!r} is not an integer")
    return v


def decode_manifest(codec: BlobCodec, data: bytes | memoryview) -> Manifest:
    """Parse, open and validate a manifest object.

    Raises FormatError (bad magic, truncation, bad JSON, rule broken), UnsupportedVersionError
    (future version, unknown required feature), DamageError (MAC or checksum failure) and
    WrongKeyError (encrypted manifest, no key).
    """
    header = decode_header(data, C.TYPE_MANIFEST)
    mv = memoryview(data)
    plain = codec.open_body(
        mv[C.HEADER_SIZE :], bytes(mv[: C.HEADER_SIZE]), encrypted=header.encrypted, what="manifest"
    )
    if len(plain) < 4:
        raise FormatError("manifest: truncated body")
    (jlen,) = struct.unpack_from(C.MANIFEST_JSON_LENGTH_STRUCT, plain, 0)
    if 4 + jlen > len(plain):
        raise FormatError("manifest: JSON length past the end of the body")
    doc = parse_json(plain[4 : 4 + jlen], "manifest")
    if not isinstance(doc, dict) or not isinstance(doc.get("streams"), list):
        raise FormatError("manifest: document lacks a streams list")
    position = 4 + jlen
    streams: list[StreamEntry] = []
    for i, s in enumerate(doc["streams"]):
        if not isinstance(s, dict):
            raise FormatError(f"manifest: stream {i} is not an object")
        size = _int(s, "size", f"stream {i}")
        chunk_size = _int(s, "chunk_size", f"stream {i}")
        slots = _int(s, "slots", f"stream {i}")
        if chunk_size < 1 or slots != slot_count(size, chunk_size):
            raise FormatError(f"manifest: stream {i} slot count inconsistent with its size")
        end = position + slots * C.CHUNK_ID_SIZE
        if end > len(plain):
            raise FormatError(f"manifest: stream {i} table past the end of the body")
        name, kind = s.get("name"), s.get("kind")
        if not isinstance(name, str) or not isinstance(kind, str):
            raise FormatError(f"manifest: stream {i} name or kind is not a string")
        attrs = s.get("attrs", {})
        streams.append(StreamEntry(name, kind, size, chunk_size, attrs, plain[position:end]))
        position = end
    if position != len(plain):
        raise FormatError(f"manifest: {len(plain) - position} stray bytes after the slot tables")
    m = Manifest(doc.get("metadata"), streams)  # type: ignore[arg-type]  # validated below
    validate_manifest(m)
    return m


def archive_id(encoded: bytes | memoryview) -> str:
    """The id of an archive: SHA-256 of the manifest object bytes, hex."""
    return object_id(encoded)
