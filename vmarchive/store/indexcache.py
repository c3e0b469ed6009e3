"""Local cache of the chunk index, so that opening a large repository does not decode
every index object again (store layer).

Without it every command that deduplicates or reads decodes all of ``index/`` and
inserts each entry into the :class:`~vmarchive.store.chunkindex.ChunkIndex` in Python:
measured 18 s for 2 million chunks (128 GiB of 64 KiB chunks), linear in the repository
-- a fleet's repository holds hundreds of millions.  The cache keeps the built table
(:meth:`ChunkIndex.snapshot`) with the names of the index objects it was built from.

Why it is safe: index objects are named by the hash of their bytes and never change; gc
rewrites every index naming a pack it deletes, under new names, and deletes the old
ones.  So the cache is used only when every index object it was built from is still
listed; the listed objects it lacks are decoded and added on top (what another client
published since: a commit writes the cache with its own object, see
:meth:`Repository._cache_index_after_commit`).  Any object it names gone -> the index
is rebuilt from ``index/``.  It is an optimisation only: a missing, truncated or damaged
file (its xxh3-128 checksum covers everything after it), another version, or another
repository's file is ignored and rebuilt.  Reads still check every chunk against its id;
gc and verify, which must see dangling entries, never use it.

File (``index-<hash of the repository config>.bin`` in the cache directory, replaced
atomically): ``magic "VMARIDXC" | version u32 | checksum[16] | names u64 | names x 32
bytes (sorted) | snapshot`` (:meth:`ChunkIndex.snapshot`); the xxh3-128 checksum covers
everything from the name count on.  Not kept for encrypted repositories (as the summary
cache): chunk sizes and pack layout stay inside the encrypted index objects there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
from io import BufferedReader

import xxhash

from vmarchive.store.chunkindex import SNAPSHOT_HEAD, ChunkIndex
from vmarchive.store.summarycache import repository_cache

log = logging.getLogger(__name__)

MAGIC = b"VMARIDXC"
VERSION = 1
_HEAD = struct.Struct("<8sI16sQ")  # magic, version, checksum, number of names: 36 bytes


class IndexCache:
    """The cached chunk index of one repository."""

    def __init__(self, path: str) -> None:
        self.path = path

    @classmethod
    def for_repository(cls, encoded_config: bytes, encrypted: bool) -> IndexCache | None:
        where = repository_cache(encoded_config, encrypted)
        return None if where is None else cls(os.path.join(where[0], f"index-{where[1]}.bin"))

    def load(self, listed: set[str]) -> tuple[ChunkIndex, set[str]] | None:
        """The cached index and the index object names it covers, when all of those are
        still ``listed``; None when there is no usable cache (then build and :meth:`save`).

        The table is read straight into the index's own buffer (no second copy)."""
        try:
            with open(self.path, "rb") as f:
                return self._read(f, listed)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.debug("index cache not usable (%s): rebuilding", e)
            return None

    def _read(self, f: BufferedReader, listed: set[str]) -> tuple[ChunkIndex, set[str]] | None:
        size = os.fstat(f.fileno()).st_size
        magic, version, checksum, nnames = _HEAD.unpack(_exact(f, _HEAD.size))
        if magic != MAGIC or version != VERSION:
            raise ValueError(f"not a version {VERSION} index cache")
        if _HEAD.size + 32 * nnames + SNAPSHOT_HEAD.size > size:
            raise ValueError("truncated")
        raw_names = _exact(f, 32 * nnames)
        snap_head = _exact(f, SNAPSHOT_HEAD.size)
        _count, npacks = SNAPSHOT_HEAD.unpack(snap_head)
        packs = _exact(f, 32 * npacks)
        table = bytearray(size - f.tell())
        if f.readinto(table) != len(table):
            raise ValueError("truncated table")
        h = xxhash.xxh3_128(struct.pack("<Q", nnames))
        for part in (raw_names, snap_head, packs, table):
            h.update(part)
        if h.digest() != checksum:
            raise ValueError("checksum mismatch")
        names = {raw_names[i : i + 32].hex() for i in range(0, len(raw_names), 32)}
        if len(names) != nnames:
            raise ValueError("a name listed twice")
        if not names <= listed:
            log.debug("index cache: %d of its index objects are gone", len(names - listed))
            return None
        return ChunkIndex.from_snapshot(snap_head, packs, table), names

    def save(self, index: ChunkIndex, names: set[str]) -> None:
        """Write the cache for ``index`` built from exactly the index objects ``names``."""
        try:
            raw = [bytes.fromhex(n) for n in sorted(names)]
        except ValueError:
            raw = []
        if any(len(r) != 32 for r in raw) or len(raw) != len(names):
            log.debug("index cache not written: an index object name is not a hash")
            return
        parts = [b"".join(raw), *index.snapshot()]
        h = xxhash.xxh3_128(struct.pack("<Q", len(names)))
        for part in parts:
            h.update(part)
        head = _HEAD.pack(MAGIC, VERSION, h.digest(), len(names))
        tmp = f"{self.path}.tmp{os.getpid()}.{threading.get_ident()}"
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(head)
                for part in parts:
                    f.write(part)
            os.replace(tmp, self.path)
        except OSError as e:
            log.debug("cannot write the index cache: %s", e)
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _exact(f: BufferedReader, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError("truncated")
    return data


__all__ = ["IndexCache"]
