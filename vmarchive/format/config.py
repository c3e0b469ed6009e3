"""The repository config object (``config``): parameters every client must agree on.

Layer: format.  Bytes: the 16-byte header (type "C") followed by canonical JSON (UTF-8,
sorted keys, no spaces).  Never encrypted; in an encrypted repository it holds no secret
(the id secret lives in the key file) and its header carries the AES-256-GCM required
feature so that a reader without encryption support refuses the repository.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from vmarchive.errors import FormatError, UnsupportedVersionError
from vmarchive.format import constants as C
from vmarchive.format.crypto import KeyMaterial, Rng
from vmarchive.format.header import Header, decode_header


def canonical_json(obj: Any) -> bytes:
    """The one byte encoding of a JSON value used everywhere in the format.

    Sorted keys, no insignificant whitespace, ASCII only (non-ASCII escaped as \\uXXXX),
    no NaN/Infinity.  Raises ValueError/TypeError for values JSON cannot hold.
    """
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def parse_json(data: bytes, what: str) -> Any:
    """Parse JSON from the format; raise FormatError when it does not parse."""
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"{what}: invalid JSON ({e})") from e


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


@dataclass(frozen=True)
class RepoConfig:
    """Everything a client needs to read and write a repository (except the key)."""

    repository_id: bytes
    id_algorithm: str = C.ID_XXH3_128_KEYED
    compression: str = C.COMPRESSION_ZSTD
    compression_level: int = C.DEFAULT_ZSTD_LEVEL
    memory_chunk_size: int = C.DEFAULT_MEMORY_CHUNK
    disk_chunk_size: int = C.DEFAULT_DISK_CHUNK
    stream_chunk_size: int = C.DEFAULT_STREAM_CHUNK
    pack_size: int = C.DEFAULT_PACK_SIZE
    encryption: str = C.ENCRYPTION_NONE
    #: The id secret, stored here only in an unencrypted repository.
    secret: bytes | None = field(default=None, repr=False)
    version: int = C.WRITE_VERSION
    required_features: int = 0
    optional_features: int = 0

    @property
    def encrypted(self) -> bool:
        return self.encryption != C.ENCRYPTION_NONE

    @property
    def pack_tail_id(self) -> bool:
        """Whether writers name new packs by their tail (``FEATURE_PACK_TAIL_ID``)."""
        return bool(self.required_features & C.FEATURE_PACK_TAIL_ID)

    def validate(self) -> None:
        """Raise FormatError / UnsupportedVersionError when the values are not usable."""
        what = "config"
        if len(self.repository_id) != C.REPOSITORY_ID_SIZE:
            raise FormatError(f"{what}: repository id must be {C.REPOSITORY_ID_SIZE} bytes")
        if self.id_algorithm not in C.ID_ALGORITHMS:
            raise UnsupportedVersionError(
                f"{what}: unknown chunk id algorithm {self.id_algorithm!r}"
            )
        if self.compression not in C.COMPRESSIONS:
            raise UnsupportedVersionError(f"{what}: unknown compression {self.compression!r}")
        if not (C.MIN_ZSTD_LEVEL <= self.compression_level <= C.MAX_ZSTD_LEVEL):
            raise FormatError(f"{what}: zstd level {self.compression_level} out of range")
        if self.encryption not in C.ENCRYPTIONS:
            raise UnsupportedVersionError(f"{what}: unknown encryption {self.encryption!r}")
        for name, size in (
            ("memory", self.memory_chunk_size),
            ("disk", self.disk_chunk_size),
            ("stream", self.stream_chunk_size),
        ):
            if not (C.MIN_CHUNK_SIZE <= size <= C.MAX_CHUNK_SIZE) or size % C.MIN_CHUNK_SIZE:
                raise FormatError(
                    f"{what}: {name} chunk size {size} is not a multiple of 4 KiB in range"
                )
        biggest = max(self.memory_chunk_size, self.disk_chunk_size, self.stream_chunk_size)
        if not (biggest <= self.pack_size <= C.MAX_PACK_SIZE // 2):
            raise FormatError(f"{what}: pack size {self.pack_size} out of range")
        if self.encrypted:
            if self.secret is not None:
                raise FormatError(
                    f"{what}: an encrypted repository keeps its secret in the key file"
                )
            if not self.required_features & C.FEATURE_AES256GCM:
                raise FormatError(f"{what}: encrypted but the header lacks the AES-256-GCM feature")
        else:
            if self.secret is None or len(self.secret) != C.ID_SECRET_SIZE:
                raise FormatError(f"{what}: an unencrypted repository needs a 32-byte id secret")
            if self.required_features & C.FEATURE_AES256GCM:
                raise FormatError(f"{what}: AES-256-GCM feature set but encryption is none")


def new_config(
    *,
    encryption: str = C.ENCRYPTION_NONE,
    id_algorithm: str = C.ID_XXH3_128_KEYED,
    compression_level: int = C.DEFAULT_ZSTD_LEVEL,
    memory_chunk_size: int = C.DEFAULT_MEMORY_CHUNK,
    disk_chunk_size: int = C.DEFAULT_DISK_CHUNK,
    stream_chunk_size: int = C.DEFAULT_STREAM_CHUNK,
    pack_size: int = C.DEFAULT_PACK_SIZE,
    rng: Rng = os.urandom,
) -> tuple[RepoConfig, KeyMaterial]:
    """A fresh config and fresh key material for ``init``.

    ``rng`` supplies the repository id (32 bytes), then the id secret and the data key.
    In an unencrypted repository the data key is unused and the secret is copied into the
    config.  Raises FormatError / UnsupportedVersionError for unusable values.
    """
    repository_id = rng(C.REPOSITORY_ID_SIZE)
    key = KeyMaterial.generate(rng)
    encrypted = encryption != C.ENCRYPTION_NONE
    cfg = RepoConfig(
        repository_id=repository_id,
        id_algorithm=id_algorithm,
        compression_level=compression_level,
        memory_chunk_size=memory_chunk_size,
        disk_chunk_size=disk_chunk_size,
        stream_chunk_size=stream_chunk_size,
        pack_size=pack_size,
        encryption=encryption,
        secret=None if encrypted else key.id_secret,
        required_features=(C.FEATURE_AES256GCM if encrypted else 0) | C.FEATURE_PACK_TAIL_ID,
    )
    cfg.validate()
    return cfg, key


def encode_config(cfg: RepoConfig) -> bytes:
    """The bytes of the ``config`` object.  Raises FormatError for an invalid config."""
    cfg.validate()
    doc: dict[str, Any] = {
        "chunk_id_algorithm": cfg.id_algorithm,
        "chunk_sizes": {
            "disk": cfg.disk_chunk_size,
            "memory": cfg.memory_chunk_size,
            "stream": cfg.stream_chunk_size,
        },
        "compression": {"algorithm": cfg.compression, "level": cfg.compression_level},
        "encryption": cfg.encryption,
        "pack_size": cfg.pack_size,
        "repository_id": cfg.repository_id.hex(),
    }
    if cfg.secret is not None:
        doc["id_secret"] = cfg.secret.hex()
    header = Header(C.TYPE_CONFIG, cfg.version, cfg.required_features, cfg.optional_features)
    return header.encode() + canonical_json(doc)


def _get(doc: dict[str, Any], key: str, typ: type, what: str) -> Any:
    value = doc.get(key)
    if not isinstance(value, typ) or isinstance(value, bool):
        raise FormatError(f"{what}: field {key!r} missing or not a {typ.__name__}")
    return value


def _hex(doc: dict[str, Any], key: str, what: str) -> bytes:
    try:
        return bytes.fromhex(_get(doc, key, str, what))
    except ValueError as e:
        raise FormatError(f"{what}: field {key!r} is not hex") from e


def decode_config(data: bytes | memoryview) -> RepoConfig:
    """Parse and validate a ``config`` object.

    Raises FormatError (bad magic, truncation, bad JSON, inconsistent values) and
    UnsupportedVersionError (future version, unknown required feature, unknown algorithm).
    Unknown JSON keys are ignored (later versions may add optional settings).
    """
    what = "config"
    header = decode_header(data, C.TYPE_CONFIG)
    if len(data) > C.MAX_CONFIG_SIZE:
        raise FormatError(f"{what}: {len(data)} bytes is too large")
    doc = parse_json(bytes(data[C.HEADER_SIZE :]), what)
    if not isinstance(doc, dict):
        raise FormatError(f"{what}: not a JSON object")
    sizes = _get(doc, "chunk_sizes", dict, what)
    comp = _get(doc, "compression", dict, what)
    cfg = RepoConfig(
        repository_id=_hex(doc, "repository_id", what),
        id_algorithm=_get(doc, "chunk_id_algorithm", str, what),
        compression=_get(comp, "algorithm", str, what),
        compression_level=_get(comp, "level", int, what),
        memory_chunk_size=_get(sizes, "memory", int, what),
        disk_chunk_size=_get(sizes, "disk", int, what),
        stream_chunk_size=_get(sizes, "stream", int, what),
        pack_size=_get(doc, "pack_size", int, what),
        encryption=_get(doc, "encryption", str, what),
        secret=_hex(doc, "id_secret", what) if "id_secret" in doc else None,
        version=header.version,
        required_features=header.required,
        optional_features=header.optional,
    )
    cfg.validate()
    return cfg
