"""The 16-byte header that starts every binary object of a repository, and its checks.

Layer: format.  The checks run in a fixed order so that each damage maps to one error:
too short or wrong magic or type -> FormatError; a version outside READ_VERSIONS or an
unknown *required* feature bit -> UnsupportedVersionError; unknown *optional* bits are ignored.
"""

from __future__ import annotations

import hashlib
import struct

import msgspec

from vmarchive.errors import FormatError, UnsupportedVersionError
from vmarchive.format import constants as C


class Header(msgspec.Struct, frozen=True):
    """A decoded object header."""

    type_code: int
    version: int
    required: int
    optional: int

    @property
    def encrypted(self) -> bool:
        return bool(self.required & C.FEATURE_AES256GCM)

    def encode(self) -> bytes:
        return struct.pack(
            C.HEADER_STRUCT, C.MAGIC, self.type_code, 0, self.version, self.required, self.optional
        )


def make_header(type_code: int, *, encrypted: bool, optional: int = 0, required: int = 0) -> Header:
    """The header this release writes for a new object of ``type_code``.

    ``required``: required feature bits besides the encryption bit (``encrypted``).
    """
    if encrypted:
        required |= C.FEATURE_AES256GCM
    return Header(type_code, C.WRITE_VERSION, required, optional)


def decode_header(data: bytes | memoryview, type_code: int) -> Header:
    """Decode and check the header at the start of ``data``.

    Raises FormatError (truncated, bad magic, wrong object type, reserved byte set) and
    UnsupportedVersionError (unknown version, unknown required feature bit).
    """
    what = C.TYPE_NAMES.get(type_code, "object")
    if len(data) < C.HEADER_SIZE:
        raise FormatError(f"{what}: truncated header ({len(data)} bytes)")
    magic, tcode, reserved, version, required, optional = struct.unpack_from(
        C.HEADER_STRUCT, data, 0
    )
    if magic != C.MAGIC:
        raise FormatError(f"{what}: bad magic {bytes(magic)!r}")
    if tcode != type_code:
        got = C.TYPE_NAMES.get(tcode, repr(chr(tcode)))
        raise FormatError(f"{what}: object is a {got}")
    if version not in C.READ_VERSIONS:
        raise UnsupportedVersionError(
            f"{what}: format version {version} (this release reads {sorted(C.READ_VERSIONS)})",
            version=version,
        )
    unknown = required & ~C.KNOWN_REQUIRED_FEATURES
    if unknown:
        raise UnsupportedVersionError(
            f"{what}: unknown required feature bits {unknown:#010x}", features=unknown
        )
    if reserved != 0:
        raise FormatError(f"{what}: reserved header byte is {reserved}")
    return Header(tcode, version, required, optional)


def object_id(data: bytes | memoryview) -> str:
    """The id of an index, manifest, key file or whole-named pack: SHA-256 of its bytes, hex.

    Content naming means a PUT under a new key never replaces a different object, and a
    reader can check an object against its key name.
    """
    return hashlib.sha256(data).hexdigest()
