"""Local cache of the chunk index, so that opening a large repository does not decode
every index object again (store layer).

Without it every command that deduplicates or reads decodes all of ``index/`` and
inserts each entry into the :class:`~vmarchive.store.chunkindex.ChunkIndex` in Python:
4.3 s for 2 million chunks (512 GB of 256 KiB chunks; 17 s when each entry became an
object), 16 s for 8 million, linear in the repository.  The cache keeps the built table
(:meth:`ChunkIndex.snapshot`) with the names of the index objects it was built from.

Why it is safe: index objects are named by the hash of their bytes and never change; gc
rewrites every index naming a pack it deletes, under new names, and deletes the old
ones.  So the cache is used only when every index object it was built from is still
listed; the listed objects it lacks are decoded and added on top (what another client
published since; this host's own objects are in the journal, below).  Any object it
names gone -> the index is rebuilt from ``index/``.  It is an optimisation only: a
missing, truncated or damaged file (its xxh3-128 checksum covers everything after it),
another version, or another repository's file is ignored and rebuilt.  A table is
checked (every slot's pack number known, the entry count right) before it is written,
not when it is read: the checksum (or the seal) then vouches for it, and a load reads it
at the speed of the file.  Reads still check every chunk against its id; gc and verify,
which must see dangling entries, never use it.

File (``index-<hash of the repository config>.bin`` in the cache directory, replaced
atomically): ``magic "VMARIDXC" | version u32 | checksum[16] | names u64 | names x 32
bytes (sorted) | snapshot`` (:meth:`ChunkIndex.snapshot`); the xxh3-128 checksum covers
everything from the name count on.

For an encrypted repository the same bytes are sealed (AES-256-GCM, as the repository's
objects) with a key derived from its data key, so chunk sizes and the pack layout stay as
secret on this host as in the repository (as are the archive summaries):
``magic "VMARIDXE" | version u32 | salt[16] | length of part A u64 | table length u64``,
part A sealed (``names u64 | names | snapshot head | pack ids``), then the table sealed in
segments of :data:`SEAL_SEGMENT` bytes (the last shorter), so a load decrypts it into the
index's own buffer a segment at a time.  Each seal is ``nonce | ciphertext | tag``: the
key is derived for the file from its random salt, the nonce is the part's number (A: 0,
then 1, 2, ...), and each part's additional data is the file's head and that number, so a
part moved, dropped, cut short or taken from another file fails like a damaged one.

The journal beside it (``index-<hash>.journal``) spares each commit rewriting that file:
the table is the whole repository's (32 bytes a slot: 130 MB for 2 million chunks, written
again after every capture, by every capture of ``capture --all``), a commit adds a few
thousand entries.  Each index object published by this host is appended to the journal
as one record, and a load applies the records on top of the table.  A record is a fact
about the repository, true whatever the table holds -- "index object N names these
entries" -- so records need no order, may repeat what the table has, and may come from
several processes at once (appends are whole records under an exclusive ``flock``).  The
load checks the records' names as the table's: every one still listed, else rebuild.  The
journal is folded into the table (a full write, the journal emptied) at a commit when it
has grown past a sixteenth of the table (applying records costs ~1 us an entry, reading
the table ~0.05), when there is no table yet, or when the index in memory outgrew the
table (rehashed into one twice as large, which every load of the old table would do
again).  A record that is cut short or fails its checksum ends the journal there (a
process died appending): the objects of the records lost are decoded from the
repository, as any object the cache does not name.

Journal: ``magic "VMARIDXJ" | version u32``, then records: ``body length u32 |
xxh3-128 of the body[16] | body``; body: ``index object name[32] | packs u32 | pack ids x
32 bytes | entries u32 | entries x 32 bytes`` (as in the index object's body, their pack
numbers counting from 0 in the record's pack list; :meth:`ChunkIndex.pack_entries`).
Sealed (an encrypted repository): ``magic "VMARIDJE" | version u32``, then records
``sealed length u32 | nonce[12] | sealed body | tag[16]``, a random nonce each, under a
key derived for the journal; a record that does not open ends the journal as above.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import threading
from collections.abc import Iterable, Iterator, Sequence
from io import BufferedReader, BufferedWriter
from typing import Any

import xxhash

from vmarchive.errors import DamageError, FormatError
from vmarchive.format import crypto
from vmarchive.format.constants import NONCE_SIZE, SEAL_OVERHEAD
from vmarchive.store.chunkindex import SNAPSHOT_HEAD, ChunkIndex
from vmarchive.store.summarycache import derived_key, repository_cache

log = logging.getLogger(__name__)

MAGIC = b"VMARIDXC"
#: 2: tables are checked before they are written, not when read (version 1 files were
#: written unchecked, so they are rebuilt once)
VERSION = 2
_HEAD = struct.Struct("<8sI16sQ")  # magic, version, checksum, number of names: 36 bytes
JOURNAL_MAGIC = b"VMARIDXJ"
#: 2: pack numbers count from 0, as in index objects (1 counted from 1)
JOURNAL_VERSION = 2
_JHEAD = struct.Struct("<8sI")
_JRECORD = struct.Struct("<I16s")  # body length, xxh3-128 of the body
_U32 = struct.Struct("<I")
SEALED_MAGIC = b"VMARIDXE"
SEALED_VERSION = 1
_SHEAD = struct.Struct("<8sI16sQQ")  # magic, version, salt, part A length, table length
JOURNAL_SEALED_MAGIC = b"VMARIDJE"
JOURNAL_SEALED_VERSION = 1
#: Plaintext bytes of the table per sealed segment.
SEAL_SEGMENT = 4 << 20
#: The journal is folded into the table at a commit once it is larger than this share of
#: the table file (or than FOLD_MIN_BYTES, whichever is more).
FOLD_SHARE = 16
FOLD_MIN_BYTES = 1 << 20


class IndexCache:
    """The cached chunk index of one repository."""

    def __init__(self, path: str, seal_key: bytes | None = None) -> None:
        """``seal_key``: seal the files with keys derived from it (32 bytes: an encrypted
        repository's, :meth:`Codecs.local_cache_key`); None: plain files."""
        self.path = path
        self.journal_path = path.removesuffix(".bin") + ".journal"
        self._seal_key = seal_key

    @classmethod
    def for_repository(
        cls, encoded_config: bytes, encrypted: bool, seal_key: bytes | None = None
    ) -> IndexCache | None:
        """The cache of a repository, or None when there is none for it
        (:func:`~vmarchive.store.summarycache.repository_cache`)."""
        where = repository_cache(encoded_config, encrypted, seal_key)
        if where is None:
            return None
        root, name, key = where
        return cls(os.path.join(root, f"index-{name}.bin"), key)

    def _derived(self, purpose: bytes) -> bytes:
        assert self._seal_key is not None
        return derived_key(self._seal_key, b"index " + purpose)

    def load(self, listed: set[str]) -> tuple[ChunkIndex, set[str]] | None:
        """The cached index (the table, the journal's records on top) and the index
        object names it covers, when all of those are still ``listed``; None when there
        is no usable table (then build and :meth:`save`).

        The table is read straight into the index's own buffer (no second copy)."""
        try:
            with open(self.path, "rb") as f:
                idx, names = self._read(f) if self._seal_key is None else self._read_sealed(f)
            names |= self._apply_journal(idx)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.debug("index cache not usable (%s): rebuilding", e)
            return None
        if not names <= listed:
            log.debug("index cache: %d of its index objects are gone", len(names - listed))
            return None
        return idx, names

    def _read(self, f: BufferedReader) -> tuple[ChunkIndex, set[str]]:
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
        return _index_of(raw_names, nnames, snap_head, packs, table)

    def _read_sealed(self, f: BufferedReader) -> tuple[ChunkIndex, set[str]]:
        size = os.fstat(f.fileno()).st_size
        head = _exact(f, _SHEAD.size)
        magic, version, salt, len_a, len_table = _SHEAD.unpack(head)
        if magic != SEALED_MAGIC or version != SEALED_VERSION:
            raise ValueError(f"not a version {SEALED_VERSION} sealed index cache")
        segments = -(-len_table // SEAL_SEGMENT)
        if size != _SHEAD.size + len_a + len_table + (1 + segments) * SEAL_OVERHEAD:
            raise ValueError("truncated or padded")
        key = self._derived(b"table " + salt)
        part_a = _open_part(key, head, 0, _exact(f, len_a + SEAL_OVERHEAD))
        if len(part_a) < 8:
            raise ValueError("part A too short")
        (nnames,) = struct.unpack_from("<Q", part_a)
        at = 8 + 32 * nnames
        if len(part_a) < at + SNAPSHOT_HEAD.size:
            raise ValueError("part A too short")
        raw_names = part_a[8:at]
        snap_head = part_a[at : at + SNAPSHOT_HEAD.size]
        packs = part_a[at + SNAPSHOT_HEAD.size :]
        table = bytearray(len_table)
        for i in range(segments):
            n = min(SEAL_SEGMENT, len_table - i * SEAL_SEGMENT)
            sealed = _exact(f, n + SEAL_OVERHEAD)
            table[i * SEAL_SEGMENT : i * SEAL_SEGMENT + n] = _open_part(key, head, 1 + i, sealed)
        return _index_of(raw_names, nnames, snap_head, packs, table)

    # -- the journal ----------------------------------------------------------------------
    def _apply_journal(self, idx: ChunkIndex) -> set[str]:
        """Add the journal's records to ``idx``; the names of the index objects they are.
        Stops at a record cut short or failing its checksum (what follows it is not
        trusted); raises ValueError for a record whose checksum holds but whose body is
        wrong (written so: the whole cache is then rebuilt)."""
        names: set[str] = set()
        entries = 0
        try:
            with open(self.journal_path, "rb") as f:
                for body in self._journal_bodies(f):
                    name, packs, records = _decode_record(body)
                    idx.add_packed(records, packs)
                    names.add(name)
                    entries += len(records) // 32
        except FileNotFoundError:
            pass
        if names:
            log.debug("index cache journal: %d index objects, %d entries", len(names), entries)
        return names

    def append(self, objects: Iterable[tuple[str, Sequence[str], bytes | memoryview]]) -> bool:
        """Record that each index object (name, pack ids, its entries packed as in
        :meth:`ChunkIndex.pack_entries`) is in the repository.  False when there is no
        table to build on (then :meth:`save` the whole index) or the journal cannot be
        written, which never raises; ValueError for a name that is not a 32-byte hash."""
        if not os.path.exists(self.path):
            return False
        data = b"".join(
            self._frame(_record_body(name, packs, records)) for name, packs, records in objects
        )
        if not data:
            return True
        try:
            os.makedirs(os.path.dirname(self.journal_path), exist_ok=True)
            fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if _size(fd) == 0:  # new (or folded): the header first, once
                    data = self._journal_head() + data
                _write_all(fd, data)
            finally:
                os.close(fd)  # releases the lock
            return True
        except OSError as e:
            log.debug("cannot append to the index cache journal: %s", e)
            return False

    def needs_fold(self, index: ChunkIndex) -> bool:
        """Whether a commit should :meth:`save` the whole ``index``: no table yet, a journal
        grown past its share of the table, or an index that outgrew the table (rehashed
        into a larger one, which every load of the table would do again)."""
        if index.grown:
            return True
        try:
            table = os.path.getsize(self.path)
        except OSError:
            return True
        try:
            journal = os.path.getsize(self.journal_path)
        except OSError:
            return False
        return journal > max(FOLD_MIN_BYTES, table // FOLD_SHARE)

    def save(self, index: ChunkIndex, names: set[str]) -> None:
        """Write the cache for ``index`` built from exactly the index objects ``names``."""
        try:
            raw = [bytes.fromhex(n) for n in sorted(names)]
        except ValueError:
            raw = []
        if any(len(r) != 32 for r in raw) or len(raw) != len(names):
            log.debug("index cache not written: an index object name is not a hash")
            return
        try:
            index.check()  # a load trusts a table whose checksum holds: only good ones
        except ValueError as e:
            log.warning("index cache not written: %s", e)
            return
        parts = [b"".join(raw), *index.snapshot()]
        tmp = f"{self.path}.tmp{os.getpid()}.{threading.get_ident()}"
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(tmp, "wb") as f:
                if self._seal_key is None:
                    _write_plain(f, len(names), parts)
                else:
                    self._write_sealed(f, len(names), parts)
            # Under the journal's lock: a record appended meanwhile by another process
            # goes with the old journal; its object, if not in this table, is decoded
            # at the next load and journaled again.
            jfd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                fcntl.flock(jfd, fcntl.LOCK_EX)
                os.replace(tmp, self.path)
                os.ftruncate(jfd, 0)
            finally:
                os.close(jfd)
            index.grown = False  # the table written is as large as the index's
        except OSError as e:
            log.debug("cannot write the index cache: %s", e)
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def _write_sealed(self, f: BufferedWriter, nnames: int, parts: list[Any]) -> None:
        names, snap_head, packs, table = parts
        part_a = b"".join([struct.pack("<Q", nnames), names, snap_head, packs])
        salt = os.urandom(16)
        head = _SHEAD.pack(SEALED_MAGIC, SEALED_VERSION, salt, len(part_a), len(table))
        key = self._derived(b"table " + salt)
        f.write(head)
        f.write(_seal_part(key, head, 0, part_a))
        with memoryview(table) as view:
            for i, at in enumerate(range(0, len(table), SEAL_SEGMENT)):
                f.write(_seal_part(key, head, 1 + i, view[at : at + SEAL_SEGMENT]))

    # -- journal records, plain or sealed -------------------------------------------------
    def _journal_head(self) -> bytes:
        if self._seal_key is None:
            return _JHEAD.pack(JOURNAL_MAGIC, JOURNAL_VERSION)
        return _JHEAD.pack(JOURNAL_SEALED_MAGIC, JOURNAL_SEALED_VERSION)

    def _frame(self, body: bytes) -> bytes:
        """One journal record holding ``body``: checksummed, or sealed."""
        if self._seal_key is None:
            return _JRECORD.pack(len(body), xxhash.xxh3_128_digest(body)) + body
        sealed = crypto.seal(
            self._derived(b"journal"), body, self._journal_head(), os.urandom(NONCE_SIZE)
        )
        return _U32.pack(len(sealed)) + sealed

    def _journal_bodies(self, f: BufferedReader) -> Iterator[bytes]:
        """The bodies of a journal's whole records whose checksums hold (or that open),
        up to the first that does not (or is cut short): a process died appending it,
        what follows is not trusted."""
        head = f.read(_JHEAD.size)
        if head != self._journal_head():
            if head:
                log.debug("index cache journal %s ignored: another kind or version", f.name)
            return
        key = None if self._seal_key is None else self._derived(b"journal")
        while rec := f.read(_JRECORD.size if key is None else _U32.size):
            body: bytes | None = None
            if key is None:
                length, checksum = _JRECORD.unpack(rec) if len(rec) == _JRECORD.size else (0, b"")
                body = f.read(length) if length else b""
                if len(body) != length or xxhash.xxh3_128_digest(body) != checksum:
                    body = None
            elif len(rec) == _U32.size:
                (length,) = _U32.unpack(rec)
                sealed = f.read(length)
                try:
                    body = crypto.unseal(key, sealed, head) if len(sealed) == length else None
                except (DamageError, FormatError):
                    body = None
            if not body:
                log.debug("index cache journal ends in a damaged record: the rest ignored")
                return
            yield body


def _index_of(
    raw_names: bytes, nnames: int, snap_head: bytes, packs: bytes, table: bytearray
) -> tuple[ChunkIndex, set[str]]:
    """The index of a cache file's parts (read and vouched for) and the names it covers."""
    names = {raw_names[i : i + 32].hex() for i in range(0, len(raw_names), 32)}
    if len(names) != nnames:
        raise ValueError("a name listed twice")
    return ChunkIndex.from_snapshot(snap_head, packs, table), names


def _write_plain(f: BufferedWriter, nnames: int, parts: list[Any]) -> None:
    h = xxhash.xxh3_128(struct.pack("<Q", nnames))
    for part in parts:
        h.update(part)
    f.write(_HEAD.pack(MAGIC, VERSION, h.digest(), nnames))
    for part in parts:
        f.write(part)


def _seal_part(key: bytes, head: bytes, number: int, data: bytes | memoryview) -> bytes:
    return crypto.seal(key, data, head + _U32.pack(number), number.to_bytes(NONCE_SIZE, "little"))


def _open_part(key: bytes, head: bytes, number: int, sealed: bytes) -> bytes:
    """The plaintext of a sealed part; ValueError when it does not open where it is (or
    its nonce is not its number)."""
    if sealed[:NONCE_SIZE] != number.to_bytes(NONCE_SIZE, "little"):
        raise ValueError(f"sealed part {number} out of place")
    try:
        return crypto.unseal(key, sealed, head + _U32.pack(number))
    except (DamageError, FormatError) as e:
        raise ValueError(f"sealed part {number}: {e}") from e


def _record_body(name: str, packs: Sequence[str], records: bytes | memoryview) -> bytes:
    body = b"".join(
        [
            bytes.fromhex(name),
            _U32.pack(len(packs)),
            *(bytes.fromhex(p) for p in packs),
            _U32.pack(len(records) // 32),
            records,
        ]
    )
    if len(body) != 32 + 4 + 32 * len(packs) + 4 + len(records):
        raise ValueError("an index object or pack name is not a 32-byte hash")
    return body


def _decode_record(body: bytes) -> tuple[str, list[str], memoryview]:
    """(index object name, pack ids, packed entries) of one journal record's body."""
    mv = memoryview(body)
    if len(mv) < 40:
        raise ValueError("journal record too short")
    name = mv[:32].hex()
    (npacks,) = _U32.unpack_from(mv, 32)
    at = 36 + 32 * npacks
    if len(mv) < at + 4:
        raise ValueError("journal record: bad pack count")
    packs = [mv[p : p + 32].hex() for p in range(36, at, 32)]
    (nentries,) = _U32.unpack_from(mv, at)
    if len(mv) != at + 4 + 32 * nentries:
        raise ValueError("journal record: bad entry count")
    return name, packs, mv[at + 4 :]


def _size(fd: int) -> int:
    return os.fstat(fd).st_size


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _exact(f: BufferedReader, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError("truncated")
    return data


__all__ = ["IndexCache"]
