"""The store's one seam onto the format layer (store layer).

Everything the store needs from ``vmarchive.format`` goes through :class:`Codecs`, which
binds the repository's config and key material once: the id function, the blob codec,
pack building, index and manifest encoding.  Keeping the seam narrow means a format
change touches this file, not the writer, reader and gc.
"""

from __future__ import annotations

import hashlib
import hmac
import mmap
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from vmarchive.errors import FormatError, UsageError, WrongKeyError
from vmarchive.format import constants as C
from vmarchive.format import pack as fpack
from vmarchive.format.blob import (
    BlobCodec,
    decode_blob,
    decode_blob_view,
    encode_blob,
    raw_frame_parts,
)
from vmarchive.format.chunkid import ZERO_ID, is_zero, make_id_function, verify_chunk
from vmarchive.format.config import RepoConfig, decode_config, encode_config, new_config
from vmarchive.format.crypto import (
    KeyMaterial,
    Rng,
    ScryptParams,
    keyfile_id,
    make_keyfile,
    open_keyfile,
)
from vmarchive.format.header import object_id
from vmarchive.format.index import decode_index, decode_index_packed, encode_index_rows
from vmarchive.format.manifest import (
    Manifest,
    StreamEntry,
    decode_manifest,
    encode_manifest,
    is_safe_stream_name,
)
from vmarchive.store.chunkindex import Location

#: Zero buffers per chunk length, for :meth:`Codecs.is_zero`.
_ZEROS: dict[int, bytes] = {}


@dataclass(frozen=True)
class InitOptions:
    """How to create a repository (``vmarchive init``)."""

    encryption: str = C.ENCRYPTION_NONE
    passphrase: str | None = field(default=None, repr=False)
    id_algorithm: str = C.ID_XXH3_128_KEYED
    compression_level: int = C.DEFAULT_ZSTD_LEVEL
    memory_chunk_size: int = C.DEFAULT_MEMORY_CHUNK
    disk_chunk_size: int = C.DEFAULT_DISK_CHUNK
    stream_chunk_size: int = C.DEFAULT_STREAM_CHUNK
    pack_size: int = C.DEFAULT_PACK_SIZE
    #: scrypt cost; tests lower it, users keep the default.
    scrypt: ScryptParams | None = None
    rng: Rng = os.urandom


# weakref: read-ahead cursors (store/readahead.py) follow a stream without keeping it
class StreamInfo(msgspec.Struct, frozen=True, weakref=True):
    """One stream of a loaded archive; ``table`` has 16 bytes per slot."""

    name: str
    kind: str
    size: int
    chunk_size: int
    attrs: dict[str, Any]
    table: bytes

    @property
    def slots(self) -> int:
        return len(self.table) // 16

    def chunk_id(self, index: int) -> bytes:
        return self.table[16 * index : 16 * index + 16]

    def chunk_ids(self) -> Iterator[bytes]:
        """Non-hole ids, in slot order (with repeats)."""
        t = self.table
        for i in range(0, len(t), 16):
            cid = t[i : i + 16]
            if cid != ZERO_ID:
                yield cid

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "size": self.size,
            "chunk_size": self.chunk_size,
            "attrs": self.attrs,
            "slots": self.slots,
            "holes": sum(1 for i in range(self.slots) if self.chunk_id(i) == ZERO_ID),
        }


class Codecs:
    """The format operations of one opened repository."""

    zero_id: bytes = ZERO_ID

    def __init__(self, config: RepoConfig, encoded_config: bytes, key: KeyMaterial | None) -> None:
        self.config = config
        self.encoded_config = encoded_config
        secret = key.id_secret if key is not None else config.secret
        if secret is None:
            raise WrongKeyError("repository is encrypted: a key is needed")
        self._idfn = make_id_function(config.id_algorithm, secret)
        # Random chunks (encrypted guest disks, compressed files, the guest's own random
        # pages) are stored as raw-block frames without running the compressor over them.
        self.blob = BlobCodec(
            config.compression_level,
            key if config.encrypted else None,
            skip_incompressible=True,
        )
        self.pack_target = config.pack_size
        self._data_key = key.data_key if key is not None and config.encrypted else None
        #: the key material of an encrypted repository (None for a plain one): what a helper
        #: process that writes into the same repository opens it with
        #: (:meth:`vmarchive.store.Repository.open`'s ``key``)
        self.key = key if config.encrypted else None

    def local_cache_key(self) -> bytes | None:
        """A key for what this host keeps about an encrypted repository outside it (the
        chunk-index cache, the archive summaries), derived from the data key; None for a
        plain repository."""
        if self._data_key is None:
            return None
        return hmac.new(self._data_key, b"vmarchive local cache", hashlib.sha256).digest()

    # -- construction --------------------------------------------------------------------
    @staticmethod
    def create(options: InitOptions) -> tuple[Codecs, list[tuple[str, bytes]]]:
        """New config + key material; returns the codecs and the key-file objects to write.

        Raises :class:`UsageError` for unusable options.
        """
        encrypted = options.encryption != C.ENCRYPTION_NONE
        if encrypted and not options.passphrase:
            raise UsageError("an encrypted repository needs a passphrase")
        try:
            cfg, key = new_config(
                encryption=options.encryption,
                id_algorithm=options.id_algorithm,
                compression_level=options.compression_level,
                memory_chunk_size=options.memory_chunk_size,
                disk_chunk_size=options.disk_chunk_size,
                stream_chunk_size=options.stream_chunk_size,
                pack_size=options.pack_size,
                rng=options.rng,
            )
        except FormatError as e:  # also UnsupportedVersionError's siblings
            raise UsageError(f"cannot create repository: {e.message}") from e
        except Exception as e:
            from vmarchive.errors import UnsupportedVersionError

            if isinstance(e, UnsupportedVersionError):
                raise UsageError(f"cannot create repository: {e.message}") from e
            raise
        objects: list[tuple[str, bytes]] = []
        if encrypted:
            assert options.passphrase is not None
            kf = make_keyfile(key, options.passphrase, options.rng, options.scrypt)
            objects.append((f"keys/{keyfile_id(kf)}", kf))
        raw = encode_config(cfg)
        return Codecs(cfg, raw, key if encrypted else None), objects

    @staticmethod
    def read_config(raw: bytes) -> RepoConfig:
        """Raises :class:`FormatError`, :class:`UnsupportedVersionError`."""
        return decode_config(raw)

    @staticmethod
    def config_encrypted(config: RepoConfig) -> bool:
        return config.encrypted

    @staticmethod
    def unlock(keyfiles: Sequence[bytes], passphrase: str) -> KeyMaterial:
        """The key material of the first key file ``passphrase`` opens.

        Raises :class:`WrongKeyError`.
        """
        for kf in keyfiles:
            try:
                return open_keyfile(kf, passphrase)
            except WrongKeyError:
                continue
        raise WrongKeyError("the passphrase does not open this repository")

    @staticmethod
    def open(config: RepoConfig, raw: bytes, key: KeyMaterial | None) -> Codecs:
        return Codecs(config, raw, key)

    # -- chunks --------------------------------------------------------------------------
    @staticmethod
    def is_zero(data: bytes | bytearray | memoryview) -> bool:
        """Whether ``data`` is all zero bytes, without copying it.

        ``bytes.startswith`` takes any buffer and is a plain memcmp (about 30 GB/s here),
        where the format's generic helper copies a memoryview first.
        """
        view = data if isinstance(data, bytes) else memoryview(data).cast("B")
        n = len(view)
        if n == 0:
            return True
        if view[0] or view[n - 1]:
            return False  # most data chunks are decided by their first or last byte
        zero = _ZEROS.get(n)
        if zero is None:
            if len(_ZEROS) >= 64:
                return is_zero(view)
            zero = _ZEROS.setdefault(n, bytes(n))
        return zero.startswith(view)

    def chunk_id(self, data: bytes | bytearray | memoryview) -> bytes:
        return self._idfn(data if isinstance(data, bytes | memoryview) else memoryview(data))

    def verify_chunk(self, chunk_id: bytes, data: bytes | memoryview) -> None:
        """Raises :class:`DamageError` when ``data`` does not hash to ``chunk_id``."""
        verify_chunk(self._idfn, chunk_id, data)

    def stores_raw(self, data: bytes | memoryview) -> bool:
        """Whether ``data`` would be stored as a raw frame (:meth:`BlobCodec.stores_raw`)."""
        return self.blob.stores_raw(data)

    def encode_blob(
        self, chunk_id: bytes, data: bytes | memoryview, raw_blocks: bool | None = None
    ) -> bytes:
        return encode_blob(self.blob, chunk_id, data, raw_blocks=raw_blocks)

    def decode_blob(self, chunk_id: bytes, blob: bytes | memoryview, raw_length: int) -> bytes:
        """Raises :class:`DamageError` (incl. :class:`FormatError`)."""
        return decode_blob(self.blob, chunk_id, blob, raw_length)

    def decode_blob_view(
        self, chunk_id: bytes, blob: bytes | memoryview, raw_length: int
    ) -> bytes | memoryview:
        """:meth:`decode_blob`; a raw-block chunk as a view of ``blob`` (no copy)."""
        return decode_blob_view(self.blob, chunk_id, blob, raw_length)

    @staticmethod
    def is_safe_stream_name(name: str) -> bool:
        return is_safe_stream_name(name)

    def default_chunk_size(self, kind: str) -> int:
        if kind in (C.KIND_RAM,):
            return self.config.memory_chunk_size
        if kind == C.KIND_DISK:
            return self.config.disk_chunk_size
        return self.config.stream_chunk_size

    # -- packs ---------------------------------------------------------------------------
    def new_pack(self, mapping: mmap.mmap | None = None) -> fpack.PackBuilder:
        """A pack builder; ``mapping``: one a finished builder released, to build in."""
        # Room for a pack of the target size, the blob that passes it (a chunk of the
        # repository's sizes, its frame a little larger) and a trailer: grown only past
        # that.  Not the format's largest chunk (1 GiB): a mapping of twice that is
        # refused where the kernel does not overcommit, or on a small host.
        cfg = self.config
        biggest = max(cfg.memory_chunk_size, cfg.disk_chunk_size, cfg.stream_chunk_size)
        capacity = self.pack_target + biggest + biggest // 64 + (64 << 10)
        return fpack.PackBuilder(
            self.blob, tail_id=cfg.pack_tail_id, capacity=capacity, mapping=mapping
        )

    def raw_blob_parts(self, data: bytes | memoryview) -> list[bytes | memoryview] | None:
        """The blob of a chunk that :meth:`stores_raw` as the pieces of its raw frame
        (:func:`~vmarchive.format.blob.raw_frame_parts`: views of ``data``), for
        :meth:`~vmarchive.format.pack.PackBuilder.add_parts`; None in an encrypted
        repository, whose blobs are sealed whole (:meth:`encode_blob`)."""
        if self.blob.encrypted:
            return None
        return raw_frame_parts(data)

    def finish_pack(
        self, builder: fpack.PackBuilder
    ) -> tuple[str, memoryview, list[tuple[bytes, Location]]]:
        pack_id, data = builder.finish()
        entries = [
            (e.chunk_id, Location(pack_id, e.offset, e.length, e.raw_length))
            for e in builder.entries
        ]
        return pack_id, data, entries

    @staticmethod
    def pack_tail_first_fetch() -> int:
        return C.PACK_TAIL_FIRST_FETCH

    @staticmethod
    def pack_tail_size(tail: bytes) -> int:
        """How many tail bytes the trailer needs. Raises :class:`FormatError`."""
        return fpack.pack_tail_size(tail)

    def entries_from_tail(
        self, pack_id: str, tail: bytes, size: int
    ) -> list[tuple[bytes, Location]]:
        """The entries of pack ``pack_id`` from its last bytes (or all of them, which also
        checks the leading header against the footer). Raises :class:`DamageError`."""
        return [
            (e.chunk_id, Location(pack_id, e.offset, e.length, e.raw_length))
            for e in fpack.decode_pack_trailer(self.blob, tail, size)
        ]

    @staticmethod
    def pack_id(data: bytes | memoryview) -> str:
        """The id a whole pack is named by (its tail's or its bytes' SHA-256, as its header
        says). Raises :class:`FormatError` when its footer is unreadable."""
        return fpack.pack_id(data)

    # -- index and manifests ------------------------------------------------------------------
    @staticmethod
    def object_id(data: bytes | memoryview) -> str:
        """SHA-256 of an object's bytes, hex: the name of indexes and manifests."""
        return object_id(data)

    def encode_index(self, entries: Sequence[tuple[bytes, Location]]) -> bytes:
        packs: dict[str, bytes] = {}  # a few packs for many entries: each converted once
        return encode_index_rows(
            self.blob,
            [
                (
                    cid,
                    packs.get(loc.pack_id)
                    or packs.setdefault(loc.pack_id, bytes.fromhex(loc.pack_id)),
                    loc.offset,
                    loc.length,
                    loc.raw_length,
                )
                for cid, loc in entries
            ],
        )

    def decode_index(self, data: bytes) -> list[tuple[bytes, Location]]:
        """Raises :class:`DamageError` (incl. :class:`FormatError`), :class:`UnsupportedVersionError`."""
        return [
            (e.chunk_id, Location(e.pack_id.hex(), e.offset, e.length, e.raw_length))
            for e in decode_index(self.blob, data)
        ]

    def decode_index_packed(self, data: bytes) -> tuple[list[str], memoryview]:
        """:meth:`decode_index` as (pack ids, 32-byte entries whose pack numbers count from
        0 in that list): see :func:`vmarchive.format.index.decode_index_packed`."""
        packs, entries = decode_index_packed(self.blob, data)
        return [p.hex() for p in packs], entries

    def encode_manifest(
        self,
        metadata: Mapping[str, Any],
        streams: Sequence[tuple[str, str, int, int, Mapping[str, Any], bytes]],
    ) -> bytes:
        m = Manifest(
            dict(metadata),
            [
                StreamEntry(name, kind, size, chunk_size, dict(attrs), table)
                for name, kind, size, chunk_size, attrs, table in streams
            ],
        )
        try:
            return encode_manifest(self.blob, m)
        except (FormatError, ValueError, TypeError) as e:
            raise UsageError(f"cannot encode the archive manifest: {e}") from e

    def decode_manifest(self, data: bytes) -> tuple[dict[str, Any], list[StreamInfo]]:
        """Raises :class:`DamageError` (incl. :class:`FormatError`), :class:`UnsupportedVersionError`."""
        m = decode_manifest(self.blob, data)
        return dict(m.metadata), [
            StreamInfo(s.name, s.kind, s.size, s.chunk_size, dict(s.attrs), bytes(s.table))
            for s in m.streams
        ]
